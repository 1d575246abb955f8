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
from ._diffmap import (
    DifferenceMap as DifferenceMap,
    DifferenceMapError as DifferenceMapError,
    DifferencePeaks as DifferencePeaks,
    difference_map as difference_map,
    difference_peaks as difference_peaks,
    local_scale_fit as local_scale_fit,
    shell_weights as shell_weights,
)
