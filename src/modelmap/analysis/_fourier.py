"""Fourier filters and local (windowed) statistics of maps, computed by FFT over the whole map.

Every map analysis in `modelmap.analysis` is built from these: radial transfer functions (low-,
high- and band-passes, B-factor sharpening), and local means / variances / correlations inside a
Gaussian or spherical window, each one FFT convolution over the whole map (no per-voxel loop, the
same code on CPU and GPU, differentiable).

Conventions: maps are `(nz, ny, nx)` on a `Grid` (Å); spatial frequency `s = 1/d` in Å⁻¹, so a
resolution `d` Å is the frequency `1/d`. The FFT is periodic: a window that crosses the box's edge
wraps around, as in cctbx's `local_resolution_map` and LocScale's FFT windows; pad a map whose density
touches its edges.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._grid import Grid


def frequency_magnitude(grid: Grid) -> Float[Array, "nz ny nxh"]:
    """|s| (Å⁻¹) at every point of the half-complex (`rfftn`) layout of a map on `grid`.

    **Arguments:**

    - `grid`: the map's grid; its voxel size sets the frequency step `1/(n·voxel)` on each axis.

    **Returns:** an array of shape `(nz, ny, nx // 2 + 1)`.
    """
    nz, ny, nx = grid.shape
    vx, vy, vz = (float(v) for v in np.broadcast_to(np.asarray(grid.voxel_size, float), (3,)))
    fz = np.fft.fftfreq(nz, d=vz)[:, None, None]
    fy = np.fft.fftfreq(ny, d=vy)[None, :, None]
    fx = np.fft.rfftfreq(nx, d=vx)[None, None, :]
    return jnp.asarray(np.sqrt(fz * fz + fy * fy + fx * fx), jnp.float32)


def apply_radial_filter(
    data: Float[ArrayLike, "nz ny nx"], grid: Grid, transfer: Float[ArrayLike, "nz ny nxh"]
) -> Float[Array, "nz ny nx"]:
    """Multiply a map's Fourier transform by `transfer` (same layout as `frequency_magnitude`).

    **Returns:** the filtered map, real, on the same grid.
    """
    data = jnp.asarray(data)
    return jnp.fft.irfftn(jnp.fft.rfftn(data) * transfer, s=data.shape).astype(data.dtype)


def soft_lowpass(s: Float[ArrayLike, "..."], resolution: float, width: float = 0.1) -> Float[Array, "..."]:
    """Low-pass transfer: 1 below `(1 - width)/resolution`, a raised-cosine edge to 0 at `1/resolution`.

    **Arguments:**

    - `s`: frequencies |s| (Å⁻¹).
    - `resolution`: the cut-off d (Å); nothing beyond `1/d` passes.
    - `width`: the edge's width as a fraction of `1/d` (0 gives a hard edge).
    """
    s = jnp.asarray(s)
    s_cut = 1.0 / float(resolution)
    if width <= 0:
        return (s <= s_cut).astype(jnp.float32)
    s_lo = (1.0 - width) * s_cut
    t = jnp.clip((s - s_lo) / (s_cut - s_lo), 0.0, 1.0)
    return (0.5 * (1.0 + jnp.cos(math.pi * t))).astype(jnp.float32)


def lowpass(data: Float[ArrayLike, "nz ny nx"], grid: Grid, resolution: float, width: float = 0.1):
    """The map low-passed to `resolution` Å with a raised-cosine edge (see `soft_lowpass`)."""
    return apply_radial_filter(data, grid, soft_lowpass(frequency_magnitude(grid), resolution, width))


def bandpass(data: Float[ArrayLike, "nz ny nx"], grid: Grid, d_low: float, d_high: float, width: float = 0.1):
    """The map band-passed between resolutions `d_low` > `d_high` Å (soft edges at both ends)."""
    s = frequency_magnitude(grid)
    transfer = soft_lowpass(s, d_high, width) * (1.0 - soft_lowpass(s, d_low, width))
    return apply_radial_filter(data, grid, transfer)


def b_factor_filter(data: Float[ArrayLike, "nz ny nx"], grid: Grid, b: float | Array):
    """Multiply amplitudes by exp(-B s²/4): B > 0 blurs, B < 0 sharpens (Å²; the crystallographic B)."""
    s = frequency_magnitude(grid)
    return apply_radial_filter(data, grid, jnp.exp(-jnp.asarray(b) * s * s / 4.0))


def window_transfer(grid: Grid, radius: float, kernel: str = "gaussian") -> Float[Array, "nz ny nxh"]:
    """Fourier transform of a normalised (sum 1) window on `grid`, for FFT convolution.

    **Arguments:**

    - `radius`: Å. For `kernel="gaussian"` the standard deviation σ of exp(-r²/2σ²); for
      `kernel="sphere"` the radius of a ball (voxels whose centre lies within it, at least one voxel).
    - `kernel`: `"gaussian"` or `"sphere"`.

    **Returns:** the window's `rfftn`, centred at the grid's point (0, 0, 0) (periodic).
    """
    if not radius > 0:
        raise ValueError(f"window radius must be > 0 Å, got {radius}")
    nz, ny, nx = grid.shape
    vx, vy, vz = (float(v) for v in np.broadcast_to(np.asarray(grid.voxel_size, float), (3,)))
    # signed periodic distances of each voxel from voxel (0, 0, 0)
    dz = (np.fft.fftfreq(nz) * nz * vz)[:, None, None]
    dy = (np.fft.fftfreq(ny) * ny * vy)[None, :, None]
    dx = (np.fft.fftfreq(nx) * nx * vx)[None, None, :]
    r2 = dz * dz + dy * dy + dx * dx
    if kernel == "gaussian":
        w = np.exp(-r2 / (2.0 * radius * radius))
    elif kernel == "sphere":
        w = (r2 <= radius * radius).astype(np.float64)
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'sphere', got {kernel!r}")
    w /= w.sum()
    return jnp.asarray(np.fft.rfftn(w), jnp.complex64)


def local_mean(data: Float[ArrayLike, "nz ny nx"], window: Float[ArrayLike, "nz ny nxh"]):
    """Windowed mean of a map: its convolution with a normalised window (`window_transfer`)."""
    data = jnp.asarray(data)
    return jnp.fft.irfftn(jnp.fft.rfftn(data) * window, s=data.shape).astype(data.dtype)


def local_correlation(
    a: Float[ArrayLike, "nz ny nx"],
    b: Float[ArrayLike, "nz ny nx"],
    window: Float[ArrayLike, "nz ny nxh"],
    *,
    centred: bool = True,
    eps: float = 1e-12,
) -> Float[Array, "nz ny nx"]:
    """Local Pearson correlation of two maps inside a window, at every voxel.

    cc(x) = cov_w(a, b)(x) / sqrt(var_w(a)(x) · var_w(b)(x)), with windowed moments
    E_w[f](x) = (w ∗ f)(x). With `centred=False` the local means are not removed (the form used for
    band-passed maps, whose mean is zero by construction: cctbx's local_resolution_map and FSC).

    **Returns:** the correlation map (0 where either map is locally constant).
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    ab = local_mean(a * b, window)
    aa = local_mean(a * a, window)
    bb = local_mean(b * b, window)
    if centred:
        ma = local_mean(a, window)
        mb = local_mean(b, window)
        ab = ab - ma * mb
        aa = aa - ma * ma
        bb = bb - mb * mb
    denom = jnp.sqrt(jnp.maximum(aa, 0.0) * jnp.maximum(bb, 0.0))
    return jnp.where(denom > eps, ab / jnp.maximum(denom, eps), 0.0)


def radial_average(
    data: Float[ArrayLike, "nz ny nx"], grid: Grid, n_shells: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean Fourier amplitude |F| per resolution shell (for Guinier plots and amplitude matching).

    **Returns:** `(s, amplitude)`: shell centres (Å⁻¹) up to Nyquist and the mean |F| in each.
    """
    s = np.asarray(frequency_magnitude(grid), np.float64)
    f = np.abs(np.asarray(jnp.fft.rfftn(jnp.asarray(data, jnp.float32))))
    s_max = 0.5 / float(np.max(np.asarray(grid.voxel_size, float)))
    n = n_shells or max(min(grid.shape) // 2, 2)
    edges = np.linspace(0.0, s_max, n + 1)
    idx = np.clip(np.digitize(s, edges) - 1, 0, n)
    inside = s <= s_max
    counts = np.bincount(idx[inside], minlength=n)[:n]
    sums = np.bincount(idx[inside], weights=f[inside], minlength=n)[:n]
    amp = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return 0.5 * (edges[:-1] + edges[1:]), amp
