"""Files: models through gemmi, maps through mrcfile, ChimeraX scripts."""

from ._model import (
    AtomicModel as AtomicModel,
    read_model as read_model,
    write_model as write_model,
    model_from_structure as model_from_structure,
)
from ._map import DensityMap as DensityMap, read_map as read_map, write_map as write_map
from ._chimerax import (
    suggest_contour_level as suggest_contour_level,
    write_attribute_file as write_attribute_file,
    write_chimerax_script as write_chimerax_script,
)
