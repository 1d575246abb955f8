"""Fourier shell correlation between two maps on the same grid, and the resolution where it crosses
a threshold.

    FSC(k) = Re Σ_{s ∈ shell k} F₁(s) F₂*(s) / √(Σ_{shell k} |F₁(s)|² · Σ_{shell k} |F₂(s)|²)

(Harauz & van Heel 1986, Optik 73, 146; van Heel & Schatz 2005, J. Struct. Biol. 151, 250 for
thresholds; 0.143 for two half maps, Rosenthal & Henderson 2003, J. Mol. Biol. 333, 721; 0.5 for a
map against a model map, as phenix.mtriage's d_fsc_model). The sums run over the full sphere of
Fourier coefficients of the discrete transform of the box (computed with a real FFT and each
coefficient weighted by its multiplicity, so that F(-s) = F*(s) is counted once per half).

**Shells.** The frequency step is one Fourier pixel of the box, Δs = 1/L with L the box's longest
edge in Å (n·v; for a cubic box the usual 1/(N v)). Coefficient s falls in shell
k = round(|s|/Δs); shell k holds |s| ∈ [(k - ½)Δs, (k + ½)Δs) and is reported at s_k = kΔs. Shells
run from k = 0 (the mean, |s| = 0) up to the largest k with s_k <= the Nyquist frequency of the
coarsest axis, 1/(2 v_max) (as RELION and EMAN report up to N/2 for a cubic box); coefficients of
higher shells (the corners of the Fourier box) are not used.

**Resolution.** `fsc_resolution` returns 1/s at the first crossing of the threshold: the first shell
(with s > 0) whose FSC is below the threshold, with s found by linear interpolation of FSC against s
between that shell and the one before it.

This is a numpy float64 reference (a score, not a loss).
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import ArrayLike, Float

from .._errors import ModelmapError
from .._grid import Grid
from ..io import DensityMap
from ..io._map import map_array

__all__ = ["fsc", "fsc_resolution", "shell_indices"]


def shell_indices(grid: Grid) -> tuple[np.ndarray, np.ndarray, float]:
    """Shell of every coefficient of `numpy.fft.rfftn` of a map on `grid`.

    **Returns:** `(k, weight, ds)`: `k` an int array of the rfft's shape `(nz, ny, nx//2 + 1)` with
    each coefficient's shell (-1 beyond the last complete shell), `weight` its multiplicity in the
    full spectrum (1 for the planes kx = 0 and kx = nx/2, else 2), and `ds = 1/L_max` in Å⁻¹.
    """
    nz, ny, nx = grid.shape
    vx, vy, vz = grid.voxel_size
    ds = 1.0 / max(nx * vx, ny * vy, nz * vz)
    sz = np.fft.fftfreq(nz, vz)
    sy = np.fft.fftfreq(ny, vy)
    sx = np.fft.rfftfreq(nx, vx)
    s = np.sqrt(sz[:, None, None] ** 2 + sy[None, :, None] ** 2 + sx[None, None, :] ** 2)
    # round half up, with a tolerance so that |s| exactly on a shell boundary (common in boxes whose
    # edges are commensurate) always goes to the upper shell, whatever the rounding of s/ds
    k = np.floor(s / ds + 0.5 + 1e-9).astype(np.int64)
    k_max = int(math.floor(0.5 / max(vx, vy, vz) / ds + 1e-9))
    k[k > k_max] = -1
    weight = np.full(len(sx), 2.0)
    weight[0] = 1.0
    if nx % 2 == 0:
        weight[-1] = 1.0
    return k, np.broadcast_to(weight, k.shape), ds


def fsc(
    map1: DensityMap | Float[ArrayLike, "nz ny nx"],
    map2: DensityMap | Float[ArrayLike, "nz ny nx"],
    *,
    mask: Float[ArrayLike, "nz ny nx"] | None = None,
    grid: Grid | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two maps on the same grid (see the module docs for the shells).

    **Arguments:**

    - `map1`, `map2`: `DensityMap`s on the same grid, or `(nz, ny, nx)` arrays with `grid`.
    - `mask`: optional real-space mask (boolean or soft, values in [0, 1]) multiplied into both maps
      before the transform.
    - `grid`: the grid of array inputs (only its voxel size matters); for `DensityMap`s it must match.

    **Returns:** `(s, fsc)`: float64 arrays of shell frequencies s_k = k/L_max in Å⁻¹ (k = 0, 1, …)
    and the FSC in each shell (0 for a shell where either map has no power, i.e. less than 1e-20 of
    its strongest shell).

    Raises `ModelmapError` for maps on different grids, NaN values, or an all-zero mask.
    """
    a, g1 = map_array(map1, grid, what="map1")
    b, g2 = map_array(map2, grid, what="map2")
    if not g1.same_as(g2):
        raise ModelmapError(f"the maps are not on the same grid: {g1} vs {g2}; resample one first")
    if grid is not None and not grid.same_as(g1):
        raise ModelmapError(f"grid {grid} does not match the maps' grid {g1}")
    if mask is not None:
        w = np.asarray(mask, np.float64)
        if w.shape != a.shape:
            raise ModelmapError(f"the mask {w.shape} is not on the maps' grid {a.shape}")
        if not np.all(np.isfinite(w)) or not np.any(w != 0):
            raise ModelmapError("the mask is empty (all zero) or has NaN values")
        a, b = a * w, b * w
    k, weight, ds = shell_indices(g1)
    f1 = np.fft.rfftn(a)
    f2 = np.fft.rfftn(b)
    valid = k >= 0
    kk = k[valid]
    ww = weight[valid]
    n = int(kk.max()) + 1
    cross = np.bincount(kk, ww * (f1[valid] * np.conj(f2[valid])).real, minlength=n)
    p1 = np.bincount(kk, ww * np.abs(f1[valid]) ** 2, minlength=n)
    p2 = np.bincount(kk, ww * np.abs(f2[valid]) ** 2, minlength=n)
    den = np.sqrt(p1 * p2)
    # a shell without power (below rounding level of the map's strongest shell) has FSC 0
    has_power = (p1 > 1e-20 * p1.max()) & (p2 > 1e-20 * p2.max()) & (den > 0)
    out = np.zeros(n)
    np.divide(cross, den, out=out, where=has_power)
    return np.arange(n) * ds, out


def fsc_resolution(s: Float[ArrayLike, " n"], fsc: Float[ArrayLike, " n"], threshold: float) -> float:
    """Resolution (Å) at which an FSC curve first falls below `threshold` (0.143 for half maps,
    0.5 for map vs model).

    The first shell with s > 0 whose FSC is below the threshold is found; s at the crossing is
    interpolated linearly between it and the previous shell, and 1/s is returned.

    **Arguments:**

    - `s`: shell frequencies in Å⁻¹, increasing (as `fsc` returns them).
    - `fsc`: FSC values per shell.
    - `threshold`: the FSC level, in (-1, 1).

    **Returns:** the resolution in Å. If the curve never falls below the threshold, 1/s of the last
    shell (the resolution is at least that: limited by the sampling); if already the first shell with
    s > 0 is below it, `inf` (no resolution at all).
    """
    s = np.asarray(s, np.float64).reshape(-1)
    f = np.asarray(fsc, np.float64).reshape(-1)
    if s.shape != f.shape or s.size == 0:
        raise ValueError(f"s and fsc must be 1-D arrays of the same length, got {s.shape} and {f.shape}")
    if not np.all(np.isfinite(s)) or not np.all(np.isfinite(f)):
        raise ValueError("s and fsc must be finite")
    if np.any(np.diff(s) <= 0):
        raise ValueError("s must be strictly increasing")
    threshold = float(threshold)
    if not -1 < threshold < 1:
        raise ValueError(f"threshold must be in (-1, 1), got {threshold}")
    first = int(np.searchsorted(s, 0.0, side="right"))  # first shell with s > 0
    if first >= s.size:
        raise ValueError("no shell with s > 0")
    below = np.flatnonzero(f[first:] < threshold)
    if below.size == 0:
        return float(1.0 / s[-1])
    i = first + int(below[0])
    if i == first:
        return math.inf
    s0, s1, f0, f1 = s[i - 1], s[i], f[i - 1], f[i]
    sc = s0 + (f0 - threshold) / (f0 - f1) * (s1 - s0)
    return float(1.0 / sc)
