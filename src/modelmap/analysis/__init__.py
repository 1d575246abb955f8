"""Map analyses, model-aware where that makes them better (issue 20).

Local scale and occupancy (`local_scale`, `fit_occupancy`), difference maps (`difference_map`),
local resolution (`local_resolution`) and sharpening (`sharpen`), each a function usable from Python
and a `modelmap` command. The building blocks, Fourier filters and local statistics computed by FFT
over the whole map, live in `_fourier.py`; outputs are written by `write_analysis`.
"""

from ._fourier import (
    apply_radial_filter as apply_radial_filter,
    b_factor_filter as b_factor_filter,
    bandpass as bandpass,
    frequency_magnitude as frequency_magnitude,
    local_correlation as local_correlation,
    local_mean as local_mean,
    lowpass as lowpass,
    radial_average as radial_average,
    soft_lowpass as soft_lowpass,
    window_transfer as window_transfer,
)
from ._output import write_analysis as write_analysis
from ._local_scale import (
    LocalScale as LocalScale,
    SolventModel as SolventModel,
    fit_solvent_model as fit_solvent_model,
    local_scale as local_scale,
    max_filter as max_filter,
    max_filter_tau as max_filter_tau,
    modify_by_scale as modify_by_scale,
    occupy_lowpass_transfer as occupy_lowpass_transfer,
    scale_kernel as scale_kernel,
    solvent_confidence as solvent_confidence,
    solvent_figure as solvent_figure,
    tile_normalisation as tile_normalisation,
)
from ._occupancy import OccupancyFit as OccupancyFit, fit_occupancy as fit_occupancy, regional_map as regional_map
