"""Map sharpening: a global B from a Guinier fit, and model-based local amplitude scaling (issue 20).

Two ways to restore the high-resolution contrast a cryo-EM map loses to motion, radiation damage and
imperfect alignment (its amplitudes fall off roughly as exp(-B s²/4)):

- **global** (`guinier_b`, `sharpen`): fit ln|F| against s² between ~10 Å and the resolution D (the
  Guinier plot of Rosenthal & Henderson 2003, J. Mol. Biol. 333, 721; RELION's `postprocess
  --auto_bfac`, which fits from 10 Å to D as well), then multiply the amplitudes by exp(+B s²/4) and
  low-pass at D;
- **local, model-based** (`local_amplitude_scale`): the idea of LocScale (Jakobi, Wagner & Raunser
  2017, eLife 6, e27131): in every neighbourhood, scale the map's radial amplitude profile to that of
  a model map, so that well-ordered and flexible parts each get their own sharpening. Done here with
  band-passes and windowed means computed by FFT over the whole map (no FFT per voxel).

Conventions (`DESIGN.md`): maps `(nz, ny, nx)` on a `Grid` (Å), s = 1/d in Å⁻¹, B in Å² with the
Debye-Waller factor exp(-B s²/4) on amplitudes. FFTs are periodic: pad a map whose density touches its
box's edge.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._errors import ModelmapError
from .._grid import Grid
from ..render._base import is_traced
from ._fourier import (
    b_factor_filter,
    frequency_magnitude,
    local_mean,
    lowpass,
    radial_average,
    soft_lowpass,
    window_transfer,
)

__all__ = ["GuinierFit", "SharpenError", "amplitude_profile", "band_transfers", "default_window", "guinier_b",
           "local_amplitude_scale", "relative_b", "sharpen"]


# Rosenthal & Henderson 2003 fit their straight line beyond ~ 10 Å towards high resolution; at
# EMD-5168's 6.6 Å the 10-6.6 Å range gave B = 1038 Å² (a low-pass in the deposited map, measured)
GUINIER_MAX_D = 5.0


class SharpenError(ModelmapError):
    """Inputs that cannot be sharpened: a resolution beyond Nyquist, a fit range without shells,
    maps on different grids, a map without signal."""


class GuinierFit(NamedTuple):
    """A straight-line fit ln|F|(s) ≈ `intercept` - `b`·s²/4 over the shells between `d_low` and `d_high`.

    **Fields:**

    - `b`: the fitted B (Å²): the map's amplitudes fall off as exp(-b s²/4) in the fitted range.
      Positive for a blurred map; `sharpen(map, grid, b)` undoes it.
    - `intercept`: ln|F| of the line at s = 0.
    - `d_low`, `d_high`: the fitted range (Å), low to high resolution.
    - `s`: shell centres (Å⁻¹) from 0 to Nyquist (`radial_average`).
    - `log_amplitude`: ln of the mean |F| in each shell (NaN for an empty shell).
    - `used`: which shells the fit used (boolean).
    - `curve`: the fitted line at every `s` (`intercept - b s²/4`).
    - `rms`: root-mean-square residual of ln|F| about the line over the used shells.
    """

    b: float
    intercept: float
    d_low: float
    d_high: float
    s: np.ndarray
    log_amplitude: np.ndarray
    used: np.ndarray
    curve: np.ndarray
    rms: float


def _nyquist(grid: Grid) -> float:
    """The finest resolution (Å) the grid holds on every axis: twice the largest voxel size."""
    return 2.0 * float(np.max(np.asarray(grid.voxel_size, float)))


def _check_map(data, grid: Grid, what: str = "map") -> jnp.ndarray:
    """The map as a float array on `grid` (float32 unless given float64 with x64 on); values are
    checked when concrete (not under `jit`/`grad`)."""
    data = jnp.asarray(data)
    if not jnp.issubdtype(data.dtype, jnp.floating):
        data = data.astype(jnp.float32)
    if tuple(data.shape) != tuple(grid.shape):
        raise SharpenError(f"the {what} has shape {tuple(data.shape)} but the grid is {tuple(grid.shape)}")
    if not is_traced(data) and not np.isfinite(np.asarray(data)).all():
        raise SharpenError(f"the {what} holds NaN or infinite values")
    return data


def guinier_b(
    map: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    d_min: float,
    d_low: float = 10.0,
    *,
    n_shells: int | None = None,
) -> GuinierFit:
    """The map's global B from its Guinier plot: ln(mean |F| per shell) against s², fitted by a straight
    line between `d_low` and `d_min` (Rosenthal & Henderson 2003; RELION postprocess's automatic
    B-factor uses the same plot and range).

    A map whose amplitudes are F₀(s)·exp(-B s²/4) gives the fitted `b` of F₀ plus B: the fitted value
    includes the fall-off of the atoms' own scattering factors and of the structure (≈ 20-60 Å² for a
    protein between 10 Å and 3-4 Å), so sharpening by the whole fitted B flattens the amplitudes as
    Rosenthal & Henderson do, while `b(map) - b(model map at B = 0)` is the blur relative to a model.

    **Arguments:**

    - `map`: the map `(nz, ny, nx)` on `grid`.
    - `grid`: its grid (Å); only the voxel size matters.
    - `d_min`: the high-resolution end of the fit (Å), usually the map's FSC resolution; not finer
      than Nyquist (2 × the largest voxel size).
    - `d_low`: the low-resolution end (Å), > `d_min`; 10 Å leaves out the low-resolution shells that
      the solvent and the particle's shape dominate. A `d_min` coarser than 5 Å gives a warning: the
      fit then measures the structure's fall-off (and any filter the map was given), not a blur.
    - `n_shells`: shells from 0 to Nyquist (default: half the smallest box edge, one voxel wide).

    **Returns:** a `GuinierFit`.

    Raises `SharpenError` for a range outside the grid's frequencies, fewer than 3 shells with
    signal in it, or a map with NaN values.
    """
    data = _check_map(map, grid)
    d_min, d_low = float(d_min), float(d_low)
    if not (math.isfinite(d_min) and d_min > 0):
        raise SharpenError(f"the resolution d_min must be a finite number above 0 Å, got {d_min}")
    nyquist = _nyquist(grid)
    if d_min < nyquist * (1 - 1e-6):
        raise SharpenError(f"d_min {d_min:g} Å is finer than the grid's Nyquist limit {nyquist:g} Å "
                           f"(2 × voxel size)")
    if not d_low > d_min:
        raise SharpenError(f"the fit range is empty: d_low {d_low:g} Å must be above d_min {d_min:g} Å")
    s, log_amp = amplitude_profile(data, grid, n_shells)
    used = (s >= 1.0 / d_low) & (s <= 1.0 / d_min) & np.isfinite(log_amp)
    if used.sum() < 3:
        raise SharpenError(f"only {int(used.sum())} shells with signal between {d_low:g} and {d_min:g} Å: "
                           f"widen the range or use a larger box (shell width {s[1] - s[0]:.4f} Å⁻¹)")
    if d_min > GUINIER_MAX_D:
        warnings.warn(f"a Guinier fit from {d_low:g} to {d_min:g} Å: a protein's amplitudes fall off as a straight "
                      f"line in s² only at resolutions finer than about {GUINIER_MAX_D:g} Å; coarser, the fit measures "
                      "the structure's own fall-off and any low-pass the map was given (check the Guinier plot, or "
                      "give the B yourself)", stacklevel=2)
    x = s[used] ** 2
    slope, intercept = np.polyfit(x, log_amp[used], 1)
    curve = intercept + slope * s**2
    rms = float(np.sqrt(np.mean((log_amp[used] - curve[used]) ** 2)))
    return GuinierFit(b=float(-4.0 * slope), intercept=float(intercept), d_low=d_low, d_high=d_min, s=s,
                      log_amplitude=log_amp, used=used, curve=curve, rms=rms)


def sharpen(
    map: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    b: float | Float[Array, ""],
    resolution: float | None = None,
    *,
    width: float = 0.1,
) -> Float[Array, "nz ny nx"]:
    """Remove a blur of `b` Å² from a map: amplitudes times exp(+b s²/4), then low-passed at `resolution`.

    `b_factor_filter(map, grid, -b)`: a positive `b` sharpens, a negative one blurs. Without the
    low-pass the noise beyond the map's resolution is amplified without bound, so pass the map's
    resolution D (a raised-cosine edge of relative `width` ending at 1/D, `soft_lowpass`), as
    RELION's postprocess and phenix.auto_sharpen cut the sharpened map at D. Differentiable in `map`
    and `b`.

    **Arguments:**

    - `map`: `(nz, ny, nx)` on `grid`.
    - `grid`: its grid (Å).
    - `b`: the B to remove (Å²), e.g. `guinier_b(...).b`.
    - `resolution`: D (Å) of the low-pass, or `None` for none.
    - `width`: the low-pass edge's width as a fraction of 1/D.

    **Returns:** the sharpened map on the same grid (float32; float64 for float64 input with x64 on).
    """
    data = jnp.asarray(map)
    if not jnp.issubdtype(data.dtype, jnp.floating):
        data = data.astype(jnp.float32)
    out = b_factor_filter(data, grid, -jnp.asarray(b, data.dtype))
    if resolution is not None:
        out = lowpass(out, grid, float(resolution), width)
    return out


def band_transfers(grid: Grid, resolution: float, n_bands: int, width: float = 0.1) -> list[Array]:
    """Radial transfer functions of `n_bands` frequency bands of equal width in s from 0 to 1/`resolution`
    that sum to the soft low-pass at `resolution`: band k = L(s_k) - L(s_(k-1)), with L the raised-cosine
    low-pass `soft_lowpass` at s_k = k/(n_bands·D). A map is the sum of its bands (up to D).

    **Returns:** a list of `n_bands` arrays in the `rfftn` layout of `grid`.
    """
    s = frequency_magnitude(grid)
    s_max = 1.0 / float(resolution)
    bands, below = [], jnp.zeros_like(s)
    for k in range(1, n_bands + 1):
        upto = soft_lowpass(s, 1.0 / (s_max * k / n_bands), width)
        bands.append(upto - below)
        below = upto
    return bands


def default_window(grid: Grid, resolution: float) -> float:
    """The default window of `local_amplitude_scale` (Å): σ = D, at least 2 voxels."""
    return max(float(resolution), 2.0 * float(np.max(np.asarray(grid.voxel_size, float))))


def local_amplitude_scale(
    map: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    model_map: Float[ArrayLike, "nz ny nx"],
    resolution: float,
    *,
    window: float | None = None,
    n_bands: int | None = None,
    kernel: str = "gaussian",
    eps: float = 1e-2,
    model_floor: float = 0.0,
    return_scales: bool = False,
):
    """Model-based local sharpening: the map's local radial amplitude profile scaled to the model map's.

    The map and the model map are split into `n_bands` frequency bands up to `resolution`
    (`band_transfers`, soft edges, summing to the low-passed map). In each band k, the local power of
    both maps is the windowed mean of the squared band (`local_mean` of m_k², c_k², one FFT
    convolution over the whole map); the map's band is multiplied at every voxel by
    sqrt(P_c,k / (P_m,k + eps·<P_m,k>)) and the bands are summed:

        out(x) = Σ_k m_k(x) · sqrt(P_c,k(x) / (P_m,k(x) + eps·<P_m,k>)).

    **Relation to LocScale** (Jakobi, Wagner & Raunser 2017, eLife 6, e27131): LocScale cuts a cube
    around every voxel from both maps, Fourier transforms the two cubes, scales the map cube's radial
    amplitude profile to the model cube's and keeps the new centre voxel: one FFT pair per voxel. Here
    the same ratio of radial amplitude profiles is taken per frequency band, but the "cube" is a
    smooth window (a Gaussian of σ = `window` Å by default) whose local powers come from one FFT
    convolution per band over the whole map: cost n_bands × a few whole-map FFTs, the same on CPU and
    GPU, differentiable, and the scale varies smoothly from voxel to voxel (no box seams). What
    differs: the radial shells are `n_bands` soft bands (LocScale's shells are one cube-Fourier-pixel
    wide), a band's power is averaged over a weighted window instead of a hard cube, and the phases of
    each band are kept as they are (LocScale also keeps the map's phases). Like LocScale, the output
    takes the model map's amplitude scale (its units) and solvent where the model has nothing is
    scaled towards 0; the model map should carry refined B-factors (LocScale's advice), or B = 0 to
    sharpen as far as the model allows.

    **Arguments:**

    - `map`: the experimental map `(nz, ny, nx)` on `grid`.
    - `grid`: its grid (Å).
    - `model_map`: the model map on the same grid (e.g. `render_model(atoms, grid, resolution)`).
    - `resolution`: D (Å): bands cover s ≤ 1/D; nothing beyond passes.
    - `window`: the window's size in Å: σ of the Gaussian window, or the radius of a ball for
      `kernel="sphere"` (default `default_window`: D, at least 2 voxels; on EMD-30342 at 3.9 Å a
      σ of 2.5-3.9 Å scored better than 7.8-12 Å, and smaller windows imprint more of the model).
    - `n_bands`: frequency bands from 0 to 1/D (default 8; 8 and 12 scored alike, 4 worse).
    - `kernel`: `"gaussian"` or `"sphere"` (`window_transfer`).
    - `eps`: regularisation: the fraction of the band's mean map power added to its local power,
      so that a map with almost no power in a window is not amplified without bound.
    - `model_floor`: the fraction of the band's mean model power added to its local model power:
      0 (LocScale) scales density the model does not explain towards 0; a floor keeps some of it
      (a band of a region without model is then scaled like the map's average, not to 0).
    - `return_scales`: also return the per-band scale maps `(n_bands, nz, ny, nx)`.

    **Returns:** the scaled map on the same grid (the map's float dtype, float32 by default), or
    `(map, scales)`.

    Raises `SharpenError` for maps on different grids, NaN values, a resolution beyond Nyquist or a
    model map without signal.
    """
    data = _check_map(map, grid)
    model = _check_map(model_map, grid, "model map")
    resolution = float(resolution)
    nyquist = _nyquist(grid)
    if not (math.isfinite(resolution) and resolution > 0):
        raise SharpenError(f"the resolution must be a finite number above 0 Å, got {resolution}")
    if resolution < nyquist * (1 - 1e-6):
        raise SharpenError(f"resolution {resolution:g} Å is finer than the grid's Nyquist limit {nyquist:g} Å")
    if not is_traced(model) and not np.any(np.asarray(model)):
        raise SharpenError("the model map is zero everywhere: is the model inside the map's box?")
    if window is None:
        window = default_window(grid, resolution)
    window = float(window)
    if not (math.isfinite(window) and window > 0):
        raise SharpenError(f"the window must be a finite number of Å above 0, got {window}")
    if n_bands is None:
        n_bands = 8
    if int(n_bands) < 1:
        raise SharpenError(f"n_bands must be at least 1, got {n_bands}")
    w = window_transfer(grid, window, kernel)
    f_map = jnp.fft.rfftn(data)
    f_model = jnp.fft.rfftn(model)
    out = jnp.zeros_like(data)
    scales = []
    for t in band_transfers(grid, resolution, int(n_bands)):
        m = jnp.fft.irfftn(f_map * t, s=data.shape)
        c = jnp.fft.irfftn(f_model * t, s=data.shape)
        p_map = jnp.maximum(local_mean(m * m, w), 0.0)
        p_model = jnp.maximum(local_mean(c * c, w), 0.0)
        p_model = p_model + model_floor * jnp.mean(p_model)
        floor = eps * jnp.mean(p_map) + 1e-30
        scale = jnp.sqrt(p_model / (p_map + floor))
        out = out + m * scale
        if return_scales:
            scales.append(scale)
    out = out.astype(data.dtype)
    if return_scales:
        return out, jnp.stack(scales)
    return out


def amplitude_profile(map: Float[ArrayLike, "nz ny nx"], grid: Grid, n_shells: int | None = None):
    """`(s, ln mean |F|)` per shell: the curve of a Guinier plot (NaN for an empty shell)."""
    s, amp = radial_average(jnp.asarray(map, jnp.float32), grid, n_shells)
    with np.errstate(divide="ignore"):
        return s, np.where(amp > 0, np.log(np.maximum(amp, 1e-300)), np.nan)


def relative_b(fit_map: GuinierFit, fit_model: GuinierFit) -> float:
    """The blur of a map relative to a model map (Å²): the difference of their Guinier B over the same
    range, the B that `sharpen` removes so that the map's fall-off matches the model map's."""
    if (fit_map.d_low, fit_map.d_high) != (fit_model.d_low, fit_model.d_high):
        raise SharpenError("the two Guinier fits cover different ranges; fit both over the same one")
    return fit_map.b - fit_model.b
