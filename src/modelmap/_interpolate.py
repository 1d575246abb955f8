"""Trilinear interpolation of a map at positions: the one home of the blend and its two cell rules.

- `interpolate_map` (JAX, differentiable in positions and map values) and `interpolate_map_numpy`
  (numpy, the data's own precision, e.g. a float64 reference) share one rule: a position counts
  when it lies within the span of the grid points (the last grid plane included).
- `interpolate_map_chimera` emulates Chimera's float32 C++ `interpolate_volume` (VolumeData
  `interpolate.cpp`) operation by operation, which MapQ's Q-scores contain: float32 fractional
  indices `fl(fl(t·x) + t₃)`, and the last grid plane counts as outside.

All three blend the eight corners with the same nested sum, in the order of Chimera's C++ code.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._grid import Grid

__all__ = ["interpolate_map", "interpolate_map_numpy", "interpolate_map_chimera"]


def _blend(data, lower, upper, frac, one):
    """`Σ` over the 8 corners of weight × value, nested as Chimera's C++ sums them.

    `lower`, `upper`: `(m, 3)` integer corner indices (i, j, k); `frac`: `(m, 3)` fractional
    offsets from `lower`; `one`: 1 in the weights' dtype.
    """
    i0, j0, k0 = lower[..., 0], lower[..., 1], lower[..., 2]
    i1, j1, k1 = upper[..., 0], upper[..., 1], upper[..., 2]
    fi1, fj1, fk1 = frac[..., 0], frac[..., 1], frac[..., 2]
    fi0, fj0, fk0 = one - fi1, one - fj1, one - fk1
    d = data
    return fk0 * (fj0 * (fi0 * d[k0, j0, i0] + fi1 * d[k0, j0, i1]) + fj1 * (fi0 * d[k0, j1, i0] + fi1 * d[k0, j1, i1])) + (
        fk1 * (fj0 * (fi0 * d[k1, j0, i0] + fi1 * d[k1, j0, i1]) + fj1 * (fi0 * d[k1, j1, i0] + fi1 * d[k1, j1, i1]))
    )


def _span_rule(xp, data, grid: Grid, positions, fill):
    """Trilinear interpolation with the grid-span rule, in the array namespace `xp`."""
    u = (positions - xp.asarray(grid.origin)) / xp.asarray(grid.voxel_size)
    n = xp.asarray(grid.shape[::-1])  # nx, ny, nz
    inside = xp.all((u >= 0) & (u <= n - 1), axis=-1)
    lower = xp.clip(xp.floor(u).astype(xp.int32), 0, xp.maximum(n - 2, 0))
    upper = xp.minimum(lower + 1, n - 1)
    frac = u - lower
    out = _blend(data, lower, upper, frac, 1)
    return xp.where(inside, out, xp.asarray(fill, out.dtype))


def interpolate_map(
    data: Float[Array, "nz ny nx"], grid: Grid, positions: Float[Array, "... 3"], fill: float = 0.0
) -> Float[Array, "..."]:
    """Trilinear interpolation of `data` at `positions` (Å, x/y/z), `fill` outside the grid.

    A position is outside when it is not within the grid points' span (as Chimera's
    `interpolated_values`: no extrapolation, no periodic wrap). Pure JAX: differentiable in the
    positions and the map values (piecewise linear: kinks at voxel faces).

    **Arguments:**

    - `data`: the map `(nz, ny, nx)`.
    - `grid`: its grid.
    - `positions`: `(..., 3)` in Å.
    - `fill`: value for positions outside the grid.

    **Returns:** values of shape `positions.shape[:-1]`.
    """
    return _span_rule(jnp, jnp.asarray(data), grid, jnp.asarray(positions), fill)


def interpolate_map_numpy(
    data: Float[np.ndarray, "nz ny nx"], grid: Grid, positions: Float[np.ndarray, "... 3"], fill: float = 0.0
) -> Float[np.ndarray, "..."]:
    """`interpolate_map` in numpy, in the precision of `data` and `positions` (float64 for a
    reference, whatever JAX's 64-bit setting is).

    **Arguments:** as `interpolate_map`, numpy arrays.

    **Returns:** values of shape `positions.shape[:-1]`.
    """
    return _span_rule(np, np.asarray(data), grid, np.asarray(positions), fill)


def _xyz_to_ijk_f32(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Chimera's `xyz_to_ijk_transform` (float64 `invert_matrix`) as the float32 C++ code sees it."""
    inv = 1.0 / np.asarray(grid.voxel_size, np.float64)
    shift = inv * -np.asarray(grid.origin, np.float64)
    return inv.astype(np.float32), shift.astype(np.float32)


def interpolate_map_chimera(
    data: Float[np.ndarray, "nz ny nx"], grid: Grid, positions: Float[np.ndarray, "... 3"]
) -> Float[np.ndarray, "..."]:
    """Trilinear interpolation as Chimera's `interpolate_volume` (C++, `Interpolate` namespace),
    float32 operation by operation: what MapQ's numbers contain.

    Points are cast to float32; per axis the fractional index is fl(fl(t·x) + t₃) in float32
    (`data_cell`); a point is outside (value 0) when its cell index is < 0 or >= n - 1, so the last
    grid plane counts as outside (unlike `interpolate_map`); the weights and the nested sum are
    float32 in the C++ order.

    **Arguments:**

    - `data`: the map `(nz, ny, nx)` (cast to float32).
    - `grid`: its grid.
    - `positions`: `(..., 3)` in Å.

    **Returns:** float32 values of shape `positions.shape[:-1]`, 0 outside.
    """
    data32 = np.asarray(data, np.float32)
    scale, shift = _xyz_to_ijk_f32(grid)
    p = np.asarray(positions, np.float32).reshape(-1, 3)
    ijk = p * scale + shift  # float32: fl(fl(t·x) + t3) per axis, as data_cell()
    fl = np.floor(ijk)
    lower = fl.astype(np.int64)
    n_xyz = np.array(grid.shape[::-1])
    inside = np.all((lower >= 0) & (lower < n_xyz - 1), axis=-1)
    lower = np.where(inside[:, None], lower, 0)
    frac = np.where(inside[:, None], ijk - fl, np.float32(0))
    val = _blend(data32, lower, lower + 1, frac, np.float32(1))
    return np.where(inside, val, np.float32(0)).reshape(np.shape(positions)[:-1])
