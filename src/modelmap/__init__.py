"""modelmap: differentiable cryo-EM model maps from atomic models, on JAX.

Data flow: `read_model` (gemmi) gives an `AtomicModel` whose `atoms` is an `Atoms` pytree;
a volume (`GaussianMixtureVolume.from_atoms`) is rendered onto a `Grid` by a render function
(`GaussianMixtureRenderFn`); `read_map`/`write_map` (mrcfile) handle maps; `modelmap.scores` compares
a model with a map (`map_model_cc`, `q_score`, `fsc`, `score_model`).

Conventions: Å, Å², positions `(n, 3)` x/y/z, maps `(nz, ny, nx)`, `Grid.origin` = position of grid
point (0, 0, 0). See DESIGN.md.
"""

from ._atoms import (
    Atoms as Atoms,
    AtomLabels as AtomLabels,
    Ensemble as Ensemble,
    validate_atoms as validate_atoms,
)
from ._errors import (
    ModelmapError as ModelmapError,
    ModelFileError as ModelFileError,
    UnknownElementError as UnknownElementError,
    InvalidAtomsError as InvalidAtomsError,
    MapFileError as MapFileError,
    MapAxisOrderError as MapAxisOrderError,
    GridTooLargeError as GridTooLargeError,
    PlanExceededError as PlanExceededError,
)
from ._grid import Grid as Grid
from ._interpolate import interpolate_map as interpolate_map
from ._pose import (
    as_rotation_matrix as as_rotation_matrix,
    euler_to_matrix as euler_to_matrix,
    matrix_to_euler as matrix_to_euler,
    quaternion_to_matrix as quaternion_to_matrix,
)
from .io import (
    AtomicModel as AtomicModel,
    DensityMap as DensityMap,
    read_map as read_map,
    read_model as read_model,
    write_map as write_map,
    write_model as write_model,
    write_chimerax_script as write_chimerax_script,
)
from .render import (
    AbstractRenderFn as AbstractRenderFn,
    GaussianMixtureRenderFn as GaussianMixtureRenderFn,
    NufftRenderFn as NufftRenderFn,
    RenderBounds as RenderBounds,
    ShellRenderFn as ShellRenderFn,
    SlabPlan as SlabPlan,
    SplatFourierRenderFn as SplatFourierRenderFn,
    UniformWindows as UniformWindows,
    WindowClasses as WindowClasses,
    WindowPlan as WindowPlan,
    render_model as render_model,
    render_slabs as render_slabs,
    stream_slabs as stream_slabs,
)
from . import batch as batch
from . import scores as scores
from .batch import render_batch as render_batch
from .scores import (
    fsc as fsc,
    local_cc as local_cc,
    map_model_cc as map_model_cc,
    q_score as q_score,
    score_model as score_model,
)
from .scattering import ScatteringTable as ScatteringTable, get_table as get_table
from .shells import ShellTable as ShellTable, get_shell_table as get_shell_table
from .volumes import (
    AbstractVolume as AbstractVolume,
    GaussianMixtureVolume as GaussianMixtureVolume,
    IndependentAtomVolume as IndependentAtomVolume,
    ShellDecompositionVolume as ShellDecompositionVolume,
    resolution_to_blur as resolution_to_blur,
)

__version__ = "0.1.0"
