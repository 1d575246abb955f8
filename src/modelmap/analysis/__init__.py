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
from ._sharpen import (
    GuinierFit as GuinierFit,
    SharpenError as SharpenError,
    amplitude_profile as amplitude_profile,
    band_transfers as band_transfers,
    default_window as default_window,
    guinier_b as guinier_b,
    local_amplitude_scale as local_amplitude_scale,
    relative_b as relative_b,
    sharpen as sharpen,
)
from ._locres import (
    HALF_MAP_THRESHOLD as HALF_MAP_THRESHOLD,
    MODEL_THRESHOLD as MODEL_THRESHOLD,
    LocalResolution as LocalResolution,
    atom_local_resolution as atom_local_resolution,
    density_mask as density_mask,
    local_resolution as local_resolution,
    local_resolution_model as local_resolution_model,
    shell_transfer as shell_transfer,
    synthetic_half_maps as synthetic_half_maps,
)
from ._diffmap import (
    DifferenceMap as DifferenceMap,
    DifferenceMapError as DifferenceMapError,
    DifferencePeaks as DifferencePeaks,
    difference_map as difference_map,
    difference_peaks as difference_peaks,
    local_scale_fit as local_scale_fit,
    shell_weights as shell_weights,
)
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
