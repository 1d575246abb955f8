"""Starting per-atom resolutions from a scan of the local fit, before gradient refinement.

The map's fit as a function of one region's resolution is not convex: the finite-resolution image
of an atom has ripples (the Fourier cutoff at |s| = 1/D), and at B ~100 Å² or more a model at
3.5 Å fits a 5 Å region *worse* than one at 3 Å (7CEC chain A, least squares over the model's
mask: 0.0464 at 3.5 Å, 0.0438 at 3 Å, 0.0136 at 4.5 Å, 0 at the true 5 Å). Gradient descent from
a uniform start then walks the wrong way. As local-resolution tools do, the start is found by a
search instead: the whole model map is rendered at each of a few uniform resolutions, every residue
(or group) gets the resolution whose map correlates best with the target over the voxels nearest
to its atoms, refined by a parabola through the best candidate and its neighbours. Gradient
refinement (`refine(..., resolutions="scan")`) takes it from there.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

from .._grid import Grid


def scan_candidates(lo: float, hi: float, grid: Grid, step: float = 0.5) -> np.ndarray:
    """Uniform resolutions (Å) from `lo` (at least the grid's Nyquist resolution, 2 × its largest
    voxel) to `hi` in steps of `step`, both ends included."""
    lo = max(float(lo), 2.0 * max(grid.voxel_size))
    if not hi > lo:
        raise ValueError(f"the resolution scan needs an interval above the grid's Nyquist limit; got [{lo:.3g}, {hi:.3g}] Å")
    n = int(np.ceil((hi - lo) / step - 1e-9))
    return np.linspace(lo, hi, max(n, 1) + 1)


def voxel_groups(positions: np.ndarray, groups: np.ndarray, grid: Grid, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """`(flat voxel indices, their group)`: every voxel within `radius` (Å) of an atom, given to the
    group of the atom nearest to it."""
    dist, nearest = cKDTree(positions).query(grid.coordinates().reshape(-1, 3), distance_upper_bound=radius)
    inside = np.isfinite(dist)
    return np.flatnonzero(inside), groups[nearest[inside]]


def best_per_group(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Per group (rows of `scores` `(g, c)`, higher is better), the candidate with the best score,
    refined by the vertex of the parabola through it and its two neighbours (kept within them)."""
    c = np.asarray(candidates, np.float64)
    best = np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf), axis=1)
    out = c[best].copy()
    interior = (best > 0) & (best < len(c) - 1)
    i = np.flatnonzero(interior)
    b = best[i]
    y0, y1, y2 = scores[i, b - 1], scores[i, b], scores[i, b + 1]
    den = y0 - 2 * y1 + y2
    h = c[b + 1] - c[b]  # uniform steps
    shift = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
    out[i] = c[b] + np.clip(shift, -1.0, 1.0) * h
    return out


def local_cc_per_group(target: np.ndarray, model_map: np.ndarray, voxels: np.ndarray, vgroup: np.ndarray,
                       n_groups: int) -> np.ndarray:
    """Pearson CC of `target` and `model_map` over each group's voxels (NaN for a group with fewer
    than 4 voxels or no variance)."""
    x = np.asarray(target, np.float64).ravel()[voxels]
    y = np.asarray(model_map, np.float64).ravel()[voxels]
    cnt = np.bincount(vgroup, minlength=n_groups).astype(np.float64)
    sx, sy = np.bincount(vgroup, x, n_groups), np.bincount(vgroup, y, n_groups)
    sxx, syy, sxy = (np.bincount(vgroup, w, n_groups) for w in (x * x, y * y, x * y))
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / cnt
        vx = sxx - sx * sx / cnt
        vy = syy - sy * sy / cnt
        cc = cov / np.sqrt(vx * vy)
    cc[(cnt < 4) | ~(vx > 0) | ~(vy > 0)] = np.nan
    return cc


def scan_start(render_fn, volume, target, grid: Grid, d_lo, d_hi, groups: np.ndarray, resolution: float) -> np.ndarray:
    """Per-atom starting resolutions (Å): each group gets the uniform resolution in
    `[min d_lo, max d_hi]` (`scan_candidates`) whose map, `render_fn` of `volume` at that resolution,
    correlates best with `target` over the voxels nearest to its atoms; clipped into each atom's
    `[d_lo, d_hi]`."""
    candidates = scan_candidates(float(jnp.min(d_lo)), float(jnp.max(d_hi)), grid)
    voxels, vgroup = voxel_groups(np.asarray(volume.positions, np.float64), groups, grid,
                                  radius=max(2.0, 0.6 * float(resolution)))
    n_groups = int(groups.max()) + 1
    target = np.asarray(target)
    scores = np.stack([
        local_cc_per_group(target, np.asarray(render_fn(eqx.tree_at(
            lambda v: v.resolution, volume, jnp.full_like(volume.resolution, c)))), voxels, vgroup, n_groups)
        for c in candidates
    ], axis=1)
    best = best_per_group(scores, candidates)[groups]
    return np.clip(best, np.asarray(d_lo), np.asarray(d_hi))
