"""Trilinear interpolation of a map at positions (differentiable in positions and map values)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._grid import Grid

__all__ = ["interpolate_map"]


def interpolate_map(
    data: Float[Array, "nz ny nx"], grid: Grid, positions: Float[Array, "... 3"], fill: float = 0.0
) -> Float[Array, "..."]:
    """Trilinear interpolation of `data` at `positions` (Å, x/y/z), `fill` outside the grid.

    A position is outside when it is not within the grid points' span (as Chimera's
    `interpolated_values`: no extrapolation, no periodic wrap).

    **Arguments:**

    - `data`: the map `(nz, ny, nx)`.
    - `grid`: its grid.
    - `positions`: `(..., 3)` in Å.
    - `fill`: value for positions outside the grid.

    **Returns:** values of shape `positions.shape[:-1]`.
    """
    data = jnp.asarray(data)
    u = (jnp.asarray(positions) - jnp.asarray(grid.origin)) / jnp.asarray(grid.voxel_size)
    n = jnp.asarray(grid.shape[::-1])  # nx, ny, nz
    inside = jnp.all((u >= 0) & (u <= n - 1), axis=-1)
    i0 = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, jnp.maximum(n - 2, 0))
    t = u - i0
    out = 0.0
    for dz in (0, 1):
        wz = t[..., 2] if dz else 1 - t[..., 2]
        iz = jnp.minimum(i0[..., 2] + dz, n[2] - 1)
        for dy in (0, 1):
            wy = t[..., 1] if dy else 1 - t[..., 1]
            iy = jnp.minimum(i0[..., 1] + dy, n[1] - 1)
            for dx in (0, 1):
                wx = t[..., 0] if dx else 1 - t[..., 0]
                ix = jnp.minimum(i0[..., 0] + dx, n[0] - 1)
                out = out + wz * wy * wx * data[iz, iy, ix]
    return jnp.where(inside, out, fill)
