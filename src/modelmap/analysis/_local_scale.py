"""Local map scale from the map alone, as OccuPy defines it, and OccuPy's scale-based modifications.

OccuPy (Forsberg, Bharadwaj & Lindahl et al., *OccuPy: estimation and modification of local occupancy in
cryo-EM maps*, PyPI `occupy` 0.1.13, `occupy_lib/estimate.py`, `occupancy.py`, `solvent.py`; read, not
copied) estimates the local scale of a map:

1. A low-pass `lp = max(8 Å, 3 voxels)` (or a given one). The low-passed map feeds the solvent model,
   and, in `"occ"` mode, the scale itself (the default `"res"` mode uses the raw map, so its scale also
   carries resolution).
2. A spherical kernel of radius `lp/2` Å inside a cube of odd side `clip(odd(⌊lp/voxel⌋), 3, 9)` voxels;
   its n voxels set τ, the real root in (0, 1) of xⁿ + x − 1 = 0 (the percentile at which the max of n
   draws is as likely to be exceeded as not; `max_filter_tau`).
3. The scale `s(x) = clip(max_kernel(x) / S, 0, 1)`: a grey-scale dilation (max filter, edges mirrored)
   over the kernel, normalised by S, the largest τ-percentile of the voxel values in 20 tiles per axis
   (tiles within a sphere of tile indices; `tile_normalisation`).
4. A solvent model: one Gaussian c·exp(−(x−μ)²/2σ²) least-squares fitted to the histogram (1000 bins,
   density) of the low-passed map inside the box's inscribed sphere (`fit_solvent_model`); from it a
   confidence per grey level, the fraction of voxels at that level that are not solvent, made
   monotone and concave downwards from the top (`solvent_confidence`).
5. Modifications (`modify_by_scale`): amplify `data·s^(1/γ−1)`, attenuate `data·s^(γ−1)` (plus drawn
   solvent where density is taken away), or a sigmoid of the scale about a pivot; scales at or below
   `scale_limit` are left alone; every change is gated by the confidence,
   `out = modified·c + data·(1 − c)`, and clipped to the input's range.

Differences from OccuPy, on purpose: no cubic/even-box requirement (tiles, the solvent sphere and the
low-pass are per axis), no down-sampling to 256³, voxel sizes per axis (Å distances; OccuPy uses x's), the
histogram fit is evaluated at bin centres (OccuPy: `linspace(min, max, 1000)`), the minimum voxel is mapped to the
lowest confidence level (OccuPy's index −1 gives it the highest), and the sigmoid is evaluated
analytically (OccuPy: a 100-level table). Everything on voxels is JAX (one max per kernel offset, FFT
low-pass); the 1000-bin histogram work is numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._errors import ModelmapError
from .._grid import Grid
from ._fourier import apply_radial_filter, lowpass as _lowpass

__all__ = [
    "LocalScale",
    "SolventModel",
    "fit_solvent_model",
    "local_scale",
    "max_filter",
    "max_filter_tau",
    "modify_by_scale",
    "occupy_lowpass_transfer",
    "scale_kernel",
    "solvent_confidence",
    "solvent_figure",
    "tile_normalisation",
]


class LocalScaleError(ModelmapError):
    """Bad input to the local-scale analysis (a map too small or flat, an unusable setting)."""


def _voxel(grid: Grid) -> np.ndarray:
    """Voxel sizes (vz, vy, vx) in Å, in the map's axis order."""
    return np.asarray(grid.voxel_size, np.float64)[::-1]


def occupy_lowpass_transfer(grid: Grid, resolution: float) -> Float[Array, "nz ny nxh"]:
    """OccuPy's low-pass (`map_tools.lowpass`, no resampling) as a transfer function in `rfftn` layout.

    OccuPy keeps k = ⌊n·voxel/resolution⌋ frequency indices per axis (k ≤ n/2): indices −k … k−1 on
    the full axes and 0 … k on the half axis, inside a ball of radius k + 1 whose centre sits half an
    index off the zero frequency, at (−½, −½, +½) (its mask is built on the shifted cube). A hard
    edge a little beyond 1/resolution, not quite centred. Per axis for non-cubic maps (OccuPy needs
    a cube).

    **Arguments:**

    - `grid`: the map's grid.
    - `resolution`: Å.

    **Returns:** 0/1 transfer `(nz, ny, nx // 2 + 1)`.
    """
    nz, ny, nx = grid.shape
    v = _voxel(grid)
    k = [min(int(math.floor(n * vv / resolution)), n // 2) for n, vv in zip((nz, ny, nx), v)]
    fz = np.rint(np.fft.fftfreq(nz) * nz)[:, None, None]
    fy = np.rint(np.fft.fftfreq(ny) * ny)[None, :, None]
    fx = np.arange(nx // 2 + 1)[None, None, :]
    box = (fz >= -k[0]) & (fz < k[0]) & (fy >= -k[1]) & (fy < k[1]) & (fx <= k[2])
    ball = ((fz + 0.5) / (k[0] + 1)) ** 2 + ((fy + 0.5) / (k[1] + 1)) ** 2 + ((fx - 0.5) / (k[2] + 1)) ** 2 <= 1.0
    return jnp.asarray(box & ball, jnp.float32)


def max_filter_tau(n: int) -> float:
    """τ for a max over `n` voxels: the real root in (0, 1) of xⁿ + x − 1 = 0 (OccuPy's `set_tau`).

    If each voxel is below its τ-percentile with probability τ, the max of n voxels is below it with
    probability τⁿ = 1 − τ: the max is as likely above as below, so the max filter's value reads as
    the τ-percentile of the full-scale distribution. n = 1 gives ½, n = 2 the golden ratio's 0.618;
    τ → 1 as n grows. Solved by bisection to machine precision (OccuPy tabulates it).

    **Arguments:**

    - `n`: number of voxels in the kernel (≥ 1).

    **Returns:** τ as a float.
    """
    n = int(n)
    if n < 1:
        raise LocalScaleError(f"a max filter needs at least one voxel, got n = {n}")
    lo, hi = 0.0, 1.0  # f(0) = -1 < 0, f(1) = 1 > 0, f increasing on [0, 1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid**n + mid - 1.0 > 0.0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def scale_kernel(grid: Grid, radius: float, half_width: int | None = None) -> Bool[np.ndarray, "kz ky kx"]:
    """The spherical max-filter kernel: voxels of a cube whose centre lies within `radius` Å.

    OccuPy's kernel (`spherical_kernel`): a cube of odd side, `1 + 2·half_width` voxels per axis,
    holding the voxels within `radius` of the centre voxel. By default `half_width` is OccuPy's:
    ⌊radius/voxel⌋ per axis, clipped to [1, 4] (its cube side is `clip(odd(⌊lp/voxel⌋), 3, 9)`).

    **Arguments:**

    - `grid`: the map's grid (voxel sizes in Å).
    - `radius`: Å (OccuPy: half the low-pass resolution).
    - `half_width`: voxels per side of the centre (all axes); default OccuPy's.

    **Returns:** a boolean array `(kz, ky, kx)`, odd sides, centre voxel `True`.
    """
    if not (math.isfinite(radius) and radius > 0):
        raise LocalScaleError(f"kernel radius must be a finite number of Å above 0, got {radius}")
    v = _voxel(grid)
    if half_width is None:
        h = np.clip(np.floor(radius / v + 1e-9).astype(int), 1, 4)
    else:
        if int(half_width) < 0:
            raise LocalScaleError(f"kernel half width must be 0 or more voxels, got {half_width}")
        h = np.full(3, int(half_width))
    axes = [np.arange(-k, k + 1) * vk for k, vk in zip(h, v)]
    dz, dy, dx = np.meshgrid(*axes, indexing="ij")
    # float32 distances, as OccuPy compares them
    dist = np.sqrt((dz * dz + dy * dy + dx * dx).astype(np.float32))
    return dist <= np.float32(radius)


def max_filter(data: Float[ArrayLike, "nz ny nx"], kernel: Bool[np.ndarray, "kz ky kx"]) -> Float[Array, "nz ny nx"]:
    """Grey-scale dilation: the max of `data` over `kernel` centred on every voxel.

    The map's edges are mirrored (`d c b a | a b c d`), as `scipy.ndimage.maximum_filter`'s default
    `mode="reflect"` that OccuPy uses. One `jnp.maximum` per kernel voxel over the whole map (JAX,
    runs on GPU).

    **Arguments:**

    - `data`: the map `(nz, ny, nx)`.
    - `kernel`: boolean footprint with odd sides (`scale_kernel`).

    **Returns:** the filtered map, same shape and dtype.
    """
    kernel = np.asarray(kernel, bool)
    if kernel.ndim != 3 or any(k % 2 == 0 for k in kernel.shape) or not kernel.any():
        raise LocalScaleError(f"the max-filter kernel must be a non-empty 3-D array of odd sides, got {kernel.shape}")
    offsets = jnp.asarray(np.argwhere(kernel), jnp.int32)
    data = jnp.asarray(data)
    if not jnp.issubdtype(data.dtype, jnp.floating):
        data = data.astype(jnp.float32)
    return _max_filter(data, offsets, tuple(k // 2 for k in kernel.shape))


@functools.partial(jax.jit, static_argnums=(2,))
def _max_filter(data, offsets, half):
    pad = jnp.pad(data, [(h, h) for h in half], mode="symmetric")

    def body(k, out):
        part = jax.lax.dynamic_slice(pad, (offsets[k, 0], offsets[k, 1], offsets[k, 2]), data.shape)
        return jnp.maximum(out, part)

    return jax.lax.fori_loop(0, offsets.shape[0], body, jnp.full_like(data, -jnp.inf))


def _tiling(n: int, tile: int, n_tiles: int) -> tuple[int, int, int, int]:
    """OccuPy's `compute_tiling` on one axis: (tiles, tile size, step, first edge)."""
    tile = max(int(tile), 1)
    n_tiles = min(n_tiles, n - tile + 1)
    if n_tiles < 2:
        return 1, min(tile, n), 1, (n - min(tile, n)) // 2
    step = tile + (n - n_tiles * tile) // (n_tiles - 1)
    step = max(step, 1)
    edge = (n - ((n_tiles - 1) * step + tile)) // 2
    return n_tiles, tile, step, max(edge, 0)


def tile_normalisation(data: Float[ArrayLike, "nz ny nx"], tau: float, n_tiles: int = 20,
                       tile_size: int | None = None) -> float:
    """The full-scale value S: the largest τ-percentile of the voxel values over tiles of the map.

    OccuPy's `percentile_filter_tiled`: `n_tiles` tiles per axis (side `tile_size` voxels, default
    n_axis // n_tiles), evenly spread (overlapping if need be); only tiles whose index lies within a
    sphere of radius `n_tiles/2 − 1` about the middle tile are used (the box's corners are solvent);
    in each, the sorted values' element ⌊τ·m⌋ (m voxels per tile); S is the largest of these.

    **Arguments:**

    - `data`: the map (OccuPy's scale map input: raw, or low-passed in `"occ"` mode).
    - `tau`: the percentile in (0, 1] (`max_filter_tau`).
    - `n_tiles`: tiles per axis.
    - `tile_size`: voxels per tile side (default: per axis, the axis length // n_tiles).

    **Returns:** S as a float (map units).
    """
    if not 0 < tau <= 1:
        raise LocalScaleError(f"tau must be in (0, 1], got {tau}")
    data = jnp.asarray(data)
    shape = data.shape
    per_axis = [_tiling(n, (n // n_tiles) if tile_size is None else tile_size, n_tiles) for n in shape]
    nt = min(p[0] for p in per_axis)
    per_axis = [_tiling(n, p[1], nt) for n, p in zip(shape, per_axis)]
    tiles = [p[1] for p in per_axis]
    starts = [p[3] + p[2] * np.arange(nt) for p in per_axis]
    i, j, k = np.meshgrid(np.arange(nt), np.arange(nt), np.arange(nt), indexing="ij")
    r = np.sqrt((i - nt / 2) ** 2 + (j - nt / 2) ** 2 + (k - nt / 2) ** 2)
    keep = np.argwhere(r < nt / 2 - 1) if nt > 2 else np.argwhere(np.ones_like(r, bool))
    if not len(keep):
        keep = np.argwhere(r == r.min())
    # gather every kept tile's voxels: (tiles, m)
    oz, oy, ox = np.meshgrid(np.arange(tiles[0]), np.arange(tiles[1]), np.arange(tiles[2]), indexing="ij")
    iz = starts[0][keep[:, 0]][:, None] + oz.ravel()[None]
    iy = starts[1][keep[:, 1]][:, None] + oy.ravel()[None]
    ix = starts[2][keep[:, 2]][:, None] + ox.ravel()[None]
    values = jnp.sort(data[iz, iy, ix], axis=1)
    m = values.shape[1]
    return float(jnp.max(values[:, min(int(math.floor(tau * m)), m - 1)]))


@dataclasses.dataclass(frozen=True)
class SolventModel:
    """One Gaussian fitted to the solvent peak of a map's histogram: c·exp(−(x−μ)²/2σ²).

    **Fields:** `scale` c (histogram density), `mean` μ and `sigma` σ (map units), the fitted histogram
    (`bins`: centres, `density`) and `edge`, the grey level above which the model falls below 10⁻⁹
    (OccuPy's "solvent drop to 0 %").
    """

    scale: float
    mean: float
    sigma: float
    bins: np.ndarray
    density: np.ndarray
    edge: float

    def __call__(self, x):
        return self.scale * np.exp(-((np.asarray(x, np.float64) - self.mean) ** 2) / (2.0 * self.sigma**2))


def fit_solvent_model(values: Float[ArrayLike, " m"], n_bins: int = 1000) -> SolventModel:
    """Least-squares fit of one Gaussian to the main peak of the histogram of `values` (OccuPy's
    `fit_solvent_to_histogram`).

    The histogram is a density over `n_bins` bins between the values' min and max. Start: the peak
    bin's centre and height, and the width at which the histogram first drops below 1/e of the peak;
    then Levenberg-Marquardt over all bins (`scipy.optimize.least_squares`).

    **Arguments:**

    - `values`: the map values the solvent model is fitted to (OccuPy: the low-passed map inside the
      box's inscribed sphere).
    - `n_bins`: histogram bins.

    **Returns:** a `SolventModel`.
    """
    from scipy.optimize import least_squares

    x = np.asarray(values, np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size < 10 or not np.ptp(x) > 0:
        raise LocalScaleError("the solvent model needs a map with more than 10 distinct, finite values")
    density, edges = np.histogram(x, bins=n_bins, density=True)
    centres = 0.5 * (edges[:-1] + edges[1:])
    step = edges[1] - edges[0]
    peak = int(np.argmax(density))
    height = density[peak]
    below = np.flatnonzero(density[peak:] < height / math.e)
    width = (below[0] if len(below) else n_bins - peak) * step
    width = max(width, step)

    def residual(p):
        c, mu, sigma = p
        return c * np.exp(-((centres - mu) ** 2) / (2.0 * sigma * sigma)) - density

    fit = least_squares(residual, [height, centres[peak], width], method="lm", x_scale=[height, width, width])
    c, mu, sigma = (float(v) for v in fit.x)
    sigma = abs(sigma)
    if not (np.all(np.isfinite(fit.x)) and sigma > 0 and c > 0):
        raise LocalScaleError("the solvent model (one Gaussian on the map's histogram) did not fit")
    model = c * np.exp(-((centres - mu) ** 2) / (2.0 * sigma * sigma))
    above = np.flatnonzero(model >= 1e-9)
    edge = float(centres[above[-1]]) if len(above) else float(mu)
    return SolventModel(c, mu, sigma, centres, density, edge)


def solvent_confidence(data: Float[ArrayLike, "nz ny nx"], solvent: SolventModel,
                       n_bins: int = 1000) -> tuple[Float[Array, "nz ny nx"], np.ndarray, np.ndarray]:
    """Confidence that each voxel is not solvent, from the solvent model (OccuPy's `estimate_confidence`).

    Over the histogram (density, `n_bins` bins) of the whole map, the content fraction per grey level
    is `(h + 0.01 − g)/(h + 0.01)` with g the solvent Gaussian at the bin's lower edge. Walking down from
    the top level it is made monotone and its decrements non-decreasing (a concave fall-off); below the
    first level that reaches 0 everything is 0. Each voxel gets the value of its grey level.

    **Arguments:**

    - `data`: the map the confidence is read from (OccuPy: the low-passed map).
    - `solvent`: the fitted `SolventModel`.
    - `n_bins`: grey levels.

    **Returns:** `(confidence, levels, mapping)`: the confidence map in [0, 1], the levels' lower
    edges and the confidence of each level.
    """
    data = jnp.asarray(data)
    lo, hi = float(jnp.min(data)), float(jnp.max(data))
    if not hi > lo:
        raise LocalScaleError("the map is flat: no confidence can be told from its histogram")
    density, edges = np.histogram(np.asarray(data, np.float64).ravel(), bins=n_bins, range=(lo, hi), density=True)
    g = np.clip(solvent(edges[:-1]), 0.0, None)
    frac = (density + 0.01 - g) / (density + 0.01)
    out = frac.copy()
    dt = 0.0
    for i in range(n_bins - 2, -1, -1):  # 1000 grey levels, not voxels
        out[i] = min(out[i], out[i + 1], out[i + 1] - dt)
        dt = out[i + 1] - out[i]
        if i >= 1 and out[i - 1] <= 0:
            out[: i - 1] = 0.0
            break
    out = np.clip(out, 0.0, 1.0)
    level = jnp.clip(jnp.floor((data - lo) / (hi - lo) * n_bins - 1.0), 0, n_bins - 1).astype(jnp.int32)
    return jnp.asarray(out, data.dtype)[level], edges[:-1], out


def _inscribed_ellipsoid(shape) -> np.ndarray:
    """Voxels of the box's inscribed sphere (OccuPy's `create_radial_mask` with radius n//2, centre
    (n−1)/2; per axis for a non-cubic box)."""
    axes = [((np.arange(n) - (n - 1) / 2.0) / max(n // 2, 1)) ** 2 for n in shape]
    return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]) <= 1.0


@dataclasses.dataclass(frozen=True)
class LocalScale:
    """What `local_scale` returns.

    **Fields:**

    - `scale`: `(nz, ny, nx)` local scale in [0, 1] (OccuPy's `scale_<mode>_*.mrc`).
    - `confidence`: `(nz, ny, nx)` confidence in [0, 1] that a voxel is not solvent (`conf_*.mrc`).
    - `solvent`: the `SolventModel`.
    - `full_scale`: S, the map value of scale 1 (`tile_normalisation`).
    - `tau`, `kernel`: the percentile and the boolean kernel used; `kernel_voxels` its size.
    - `lowpass`: Å, the low-pass of the solvent model (and of the scale in `"occ"` mode).
    - `mode`: `"res"` or `"occ"`.
    - `confidence_limit`: the lowest scale OccuPy calls confident (the first grey level of confidence
      above ½, over S).
    - `levels`, `mapping`: the confidence per grey level (for plots).
    """

    scale: Array
    confidence: Array
    solvent: SolventModel
    full_scale: float
    tau: float
    kernel: np.ndarray
    kernel_voxels: int
    lowpass: float
    mode: str
    confidence_limit: float
    levels: np.ndarray
    mapping: np.ndarray

    def summary(self) -> dict:
        """JSON-ready numbers and settings."""
        return {"mode": self.mode, "lowpass_A": self.lowpass, "tau": self.tau, "kernel_voxels": self.kernel_voxels,
                "kernel_shape": list(self.kernel.shape), "full_scale": self.full_scale,
                "solvent_peak": self.solvent.mean, "solvent_sigma": self.solvent.sigma,
                "solvent_edge": self.solvent.edge, "confidence_limit": self.confidence_limit}


def local_scale(
    data: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    *,
    lowpass: float | None = None,
    resolution: float | None = None,
    mode: str = "res",
    kernel_radius: float | None = None,
    kernel_half_width: int | None = None,
    tau: float | None = None,
    n_tiles: int = 20,
    tile_size: int | None = None,
    n_bins: int = 1000,
    lowpass_shape: str = "occupy",
) -> LocalScale:
    """Local scale of a map from the map alone, as OccuPy estimates it (module docs for the steps).

    **Arguments:**

    - `data`: the map `(nz, ny, nx)` on `grid`.
    - `grid`: its grid (voxel sizes in Å).
    - `lowpass`: Å; default `max(8 Å, 3 voxels, resolution)` (OccuPy's `--lowpass`).
    - `resolution`: Å; the map's resolution, a floor for the default low-pass.
    - `mode`: `"res"` (OccuPy's default: the scale of the raw map, resolution included) or `"occ"` (of
      the low-passed map: closer to occupancy, OccuPy's `--lp-scale`).
    - `kernel_radius`: Å, the max filter's radius (default `lowpass / 2`).
    - `kernel_half_width`: voxels of the kernel's cube per side (default OccuPy's, `scale_kernel`).
    - `tau`: the percentile of the normalisation (default `max_filter_tau` of the kernel's size).
    - `n_tiles`, `tile_size`: the normalisation's tiles (`tile_normalisation`).
    - `n_bins`: histogram levels of the solvent model and the confidence.
    - `lowpass_shape`: `"occupy"` (OccuPy's index-space cut, `occupy_lowpass_transfer`) or `"radial"`
      (a hard cut at |s| = 1/lowpass).

    **Returns:** a `LocalScale`.
    """
    data = jnp.asarray(data, jnp.float32)
    if data.ndim != 3 or tuple(data.shape) != tuple(grid.shape):
        raise LocalScaleError(f"the map's shape {tuple(data.shape)} is not the grid's {grid.shape}")
    if min(data.shape) < 4:
        raise LocalScaleError(f"the map is too small for a local scale: {tuple(data.shape)} voxels")
    if not bool(jnp.all(jnp.isfinite(data))):
        raise LocalScaleError("the map holds NaN or infinite values")
    if mode not in ("res", "occ"):
        raise LocalScaleError(f"mode must be 'res' or 'occ', got {mode!r}")
    if lowpass_shape not in ("occupy", "radial"):
        raise LocalScaleError(f"lowpass_shape must be 'occupy' or 'radial', got {lowpass_shape!r}")
    for name, value in (("lowpass", lowpass), ("resolution", resolution), ("kernel_radius", kernel_radius)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise LocalScaleError(f"{name} must be a finite number of Å above 0, got {value}")
    if tau is not None and not 0 < tau <= 1:
        raise LocalScaleError(f"tau must be in (0, 1], got {tau}")
    if int(n_tiles) < 1:
        raise LocalScaleError(f"n_tiles must be 1 or more, got {n_tiles}")
    v = _voxel(grid)
    if lowpass is None:
        lowpass = max(8.0, 3.0 * float(v.max()), resolution or 0.0)
    lowpass = float(lowpass)
    # OccuPy low-passes only when the cut lies inside Nyquist with room (lp > 2 voxels)
    if lowpass <= 2.0 * float(v.max()):
        lp_data = data
    elif lowpass_shape == "occupy":
        lp_data = apply_radial_filter(data, grid, occupy_lowpass_transfer(grid, lowpass))
    else:
        lp_data = _lowpass(data, grid, lowpass, width=0.0)
    kernel = scale_kernel(grid, kernel_radius or lowpass / 2.0, kernel_half_width)
    n_v = int(kernel.sum())
    tau = max_filter_tau(n_v) if tau is None else float(tau)
    scale_input = lp_data if mode == "occ" else data
    full = tile_normalisation(scale_input, tau, int(n_tiles), tile_size)
    if not full > 0:
        raise LocalScaleError(f"the map's full-scale value (its largest tile percentile) is {full:.3g}, not above 0: "
                              "is the density negative?")
    scale = jnp.clip(max_filter(scale_input, kernel) / full, 0.0, 1.0)
    sphere = _inscribed_ellipsoid(data.shape)
    solvent = fit_solvent_model(np.asarray(lp_data)[sphere], n_bins)
    confidence, levels, mapping = solvent_confidence(lp_data, solvent, n_bins)
    confident = np.flatnonzero(mapping > 0.5)
    limit = float(levels[confident[0]] / full) if len(confident) else 1.0
    return LocalScale(scale, confidence, solvent, full, tau, kernel, n_v, lowpass, mode, limit, levels, mapping)


def _sigmoid(x, pivot: float, order: float):
    """OccuPy's sigmoid on [0, 1]: f(x) = 1/(1 + (μ(1−x)/(x(1−μ)))^m), μ chosen so that f(pivot) = pivot."""
    k = (1.0 / pivot - 1.0) ** (-1.0 / order) * (1.0 - pivot) / pivot
    mu = 1.0 / (1.0 + k)
    xs = jnp.clip(x, 1e-12, 1.0 - 1e-7)
    ratio = mu * (1.0 - xs) / (xs * (1.0 - mu))
    f = 1.0 / (1.0 + ratio**order)
    return jnp.where(x <= 0, 0.0, jnp.where(x >= 1, 1.0, f))


def modify_by_scale(
    data: Float[ArrayLike, "nz ny nx"],
    scale: LocalScale,
    how: str,
    gamma: float,
    *,
    pivot: float | None = None,
    scale_limit: float = 0.05,
    exclude_solvent: bool = False,
    key: jax.Array | None = None,
) -> Float[Array, "nz ny nx"]:
    """Amplify, attenuate or sigmoid-modify a map by its local scale, gated by the solvent confidence
    (OccuPy's `modify` + `suppress` + range clip).

    With the scale s (set to 1, unchanged, where s ≤ `scale_limit`): amplify multiplies by
    s^(1/γ − 1) (γ = ∞ brings every scale to 1), attenuate by s^(γ − 1) (and, unless solvent is
    excluded, adds solvent drawn from the solvent model times (1 − modification), so attenuated
    density fades into noise), sigmoid maps s to f(s) (a sigmoid of order γ with f(pivot) = pivot:
    scales above the pivot are raised, below it lowered). Then `out = modified·c + data·(1 − c)` (c
    the confidence; the second term dropped with `exclude_solvent`) and out is clipped to the input's
    range.

    **Arguments:**

    - `data`: the map (OccuPy modifies the raw map).
    - `scale`: its `LocalScale`.
    - `how`: `"amplify"`, `"attenuate"` or `"sigmoid"`.
    - `gamma`: the power (> 1), or the sigmoid's order.
    - `pivot`: the sigmoid's fixed scale in (0, 1) (needed for `"sigmoid"`).
    - `scale_limit`: scales at or below it are not modified (amplify/attenuate).
    - `exclude_solvent`: flatten solvent (confidence 0) to 0 instead of keeping the input there.
    - `key`: `jax.random` key for the drawn solvent (default `PRNGKey(0)`).

    **Returns:** the modified map.
    """
    data = jnp.asarray(data, jnp.float32)
    s = jnp.asarray(scale.scale)
    if s.shape != data.shape:
        raise LocalScaleError(f"the map {tuple(data.shape)} and its scale {tuple(s.shape)} differ in shape")
    if how not in ("amplify", "attenuate", "sigmoid"):
        raise LocalScaleError(f"how must be 'amplify', 'attenuate' or 'sigmoid', got {how!r}")
    if not (math.isfinite(gamma) and gamma > 1):
        raise LocalScaleError(f"gamma must be a finite number above 1, got {gamma}")
    if how == "sigmoid":
        if pivot is None or not 0 < pivot < 1:
            raise LocalScaleError(f"the sigmoid needs a pivot in (0, 1), got {pivot}")
        mod = jnp.where(s > 0, _sigmoid(s, pivot, gamma) / jnp.maximum(s, 1e-12), 0.0)
    else:
        if not 0 <= scale_limit < 1:
            raise LocalScaleError(f"scale_limit must be in [0, 1), got {scale_limit}")
        t = jnp.where(s > scale_limit, s, 1.0)
        mod = t ** ((1.0 / gamma - 1.0) if how == "amplify" else (gamma - 1.0))
    out = data * mod
    if how != "amplify" and not exclude_solvent:
        key = jax.random.PRNGKey(0) if key is None else key
        noise = scale.solvent.mean + scale.solvent.sigma * jax.random.normal(key, data.shape, data.dtype)
        out = out + noise * jnp.clip(1.0 - mod, 0.0, 1.0)
    c = jnp.asarray(scale.confidence)
    out = out * c + (0.0 if exclude_solvent else data * (1.0 - c))
    return jnp.clip(out, jnp.min(data), jnp.max(data))


def solvent_figure(scale: LocalScale, occupancy: np.ndarray | None = None, scale_at_atoms: np.ndarray | None = None):
    """The solvent model beside the histogram it was fitted to (log scale) and the confidence per
    grey level (OccuPy's `solModel` plot); with `occupancy` and `scale_at_atoms`, a second panel of the
    fitted occupancy of each atom against the map-only scale there.

    **Returns:** a `matplotlib.figure.Figure`.
    """
    from ..plots._save import new_figure

    two = occupancy is not None and scale_at_atoms is not None
    fig = new_figure(10.0 if two else 6.0, 3.6)
    axes = fig.subplots(1, 2 if two else 1)
    ax = axes[0] if two else axes
    sm = scale.solvent
    ax.semilogy(sm.bins, np.maximum(sm.density, 1e-12), "k-", lw=1, label="low-passed map (inside sphere)")
    ax.semilogy(sm.bins, np.maximum(sm(sm.bins), 1e-12), "g-", lw=1, label=f"solvent μ {sm.mean:.3g}, σ {sm.sigma:.3g}")
    positive = sm.density[sm.density > 0]
    ax.set_ylim(0.5 * positive.min(), 2.0 * sm.density.max())
    ax.set_xlabel("map value")
    ax.set_ylabel("density")
    twin = ax.twinx()
    twin.plot(scale.levels, scale.mapping, "r-", lw=1, label="confidence")
    twin.set_ylim(-0.02, 1.02)
    twin.set_ylabel("confidence", color="r")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(f"solvent model (low-pass {scale.lowpass:.2f} Å)", fontsize=9)
    if two:
        axes[1].plot(np.asarray(scale_at_atoms), np.asarray(occupancy), ".", ms=2, alpha=0.4)
        axes[1].plot([0, 1], [0, 1], "k:", lw=0.8)
        axes[1].set_xlabel("map-only scale at the atom")
        axes[1].set_ylabel("fitted occupancy")
        axes[1].set_xlim(0, 1.02)
        axes[1].set_ylim(0, 1.02)
        axes[1].set_title("model-aware occupancy vs map-only scale", fontsize=9)
    return fig
