"""Q-score (Pintilie et al. 2020, Nat. Methods 17, 328-334), exactly as MapQ computes it.

The Q-score of an atom is the Pearson correlation ("correlation about the mean") between

- `u`: map values at probe points on spheres of radius r = 0.1, 0.2, ..., 2.0 Å around the atom,
  plus the map value at the atom itself repeated N times (r = 0), and
- `v`: a reference Gaussian A·exp(-r²/2σ²) + B at the same radii (σ = 0.6 Å by default).

Which probe points count is what distinguishes implementations. Two are offered, named:

- `variant="mapq"` — gregdp/mapq `qscores.py` (`QscorePt3`, the per-atom function of both the
  single-process `CalcQ` and the multi-process `CalcQpn`): probes come from MapQ's spiral
  (`SpherePts`); a probe is rejected when any non-H atom of the whole model lies strictly within
  0.9·r of it; N + 2i points (i = 0..49) are tried until at least N survive, and then *all* the
  survivors of that try are used; a shell where no try reaches N contributes nothing.
- `variant="cctbx"` — `cctbx.maptbx.qscore` (`calc_qscore`, `generate_probes_np`): exactly N probes
  per shell (same spiral), a probe is kept iff its nearest atom is its own atom; no retries.

Everything discrete (probe selection) is numpy/scipy on concrete coordinates and lives in a
fixed-shape, padded `QProbes`. The exact score `q_score` evaluates it in numpy with a float64
Pearson correlation; by default the map values follow Chimera's float32 trilinear interpolation
(`interpolate_volume_data`, operation by operation), which is what MapQ's numbers contain.
`q_score_differentiable` evaluates the same probes in JAX, differentiable in the atom positions
(probes move rigidly with their atom) and in the map.

MapQ run with more than one process (`CalcQpn`; command line `np=N`, GUI "2/4/8/auto") scores
against a map re-sampled by `MaskMapResize`; `mapq_regrid` reproduces that map. Through it, MapQ's
published per-atom Q-scores for EMD-30342/7CEC chain A (3 decimals) are matched for all 4308 atoms
(max deviation 0.0005, i.e. rounding) and its 6-decimal per-residue table to about 1e-5: a residual
per-atom noise of a few 1e-6 remains whose source (Chimera build arithmetic) could not be pinned down.
It is at the level where MapQ's own numbers depend on float32 details of the run: emulating
`CalcQpn`'s split of the atoms (sorted by x) over 1 to 32 processes, one box each, and the float32
or float64 arithmetic of the box's grid points and of the index transforms moves 1e-6-sized
differences around (55-72 % of the 1606 residue values exact, max 0.8-1.9e-5) without removing
them, so the single box is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int
from scipy.spatial import cKDTree

from .._atoms import AtomLabels, Atoms
from .._errors import InvalidAtomsError, ModelmapError
from .._grid import Grid
from .._interpolate import interpolate_map, interpolate_map_chimera, interpolate_map_numpy
from .._residues import group_members, residue_groups, residue_kind
from ..io._map import DensityMap, map_array

__all__ = [
    "spiral_points",
    "mapq_radii",
    "QProbes",
    "select_probes",
    "QScores",
    "ResidueQ",
    "q_score",
    "q_score_differentiable",
    "mapq_min_max",
    "expected_q",
    "estimated_resolution",
    "mapq_regrid",
]

#: MapQ tries N, N+2, ..., N+98 spiral points per shell (`for i in range(0, 50)` in `QscorePt3`).
MAPQ_TRIES = 50
#: A probe is rejected when another atom is closer than this fraction of the shell radius.
MAPQ_REJECT_FRACTION = 0.9

Variant = Literal["mapq", "cctbx"]
Interpolation = Literal["chimera", "float64"]


# --------------------------------------------------------------------------------------------------
# Probe geometry
# --------------------------------------------------------------------------------------------------


def spiral_points(n: int) -> Float[np.ndarray, "n 3"]:
    """`n` unit vectors on MapQ's generalized spiral (`SpherePts` in gregdp/mapq `qscores.py`).

    The Saff & Kuijlaars (1997, Math. Intelligencer 19, 5-11) spiral, in MapQ's fixed orientation:
    for k = 1..n, h_k = -1 + 2(k-1)/(n-1), φ_k = acos h_k,
    θ_1 = θ_n = 0, θ_k = (θ_{k-1} + 3.6/√(n(1-h_k²))) mod 2π, and the point is
    (sin φ cos θ, sin φ sin θ, cos φ). The first point is (0, 0, -1) and the last (0, 0, 1).
    Computed with Python's `math` in float64 in MapQ's order of operations, so that
    `centre + radius * spiral_points(n)` reproduces MapQ's probe coordinates bit for bit.

    **Arguments:**

    - `n`: number of points, at least 2.

    **Returns:** a new float64 array `(n, 3)` (x, y, z).
    """
    return _spiral_cached(_check_n(n)).copy()


def _check_n(n) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 2:
        raise ValueError(f"the spiral needs an integer number of points >= 2, got {n!r}")
    return int(n)


@functools.lru_cache(maxsize=256)
def _spiral_cached(n: int) -> np.ndarray:
    thetas: list[float] = []
    out = np.empty((n, 3), np.float64)
    for k in range(1, n + 1):
        h = -1.0 + (2.0 * float(k - 1) / float(n - 1))
        phi = math.acos(h)
        if k == 1 or k == n:
            theta = 0.0
        else:
            theta = (thetas[k - 2] + 3.6 / math.sqrt(n * (1.0 - h**2.0))) % (2 * math.pi)
        thetas.append(theta)
        out[k - 1] = (math.sin(phi) * math.cos(theta), math.sin(phi) * math.sin(theta), math.cos(phi))
    out.setflags(write=False)
    return out


def mapq_radii(step: float = 0.1, stop: float = 2.0) -> Float[np.ndarray, "20"]:
    """MapQ's shell radii in Å: `RAD = step; while RAD < stop + 0.001: ...; RAD += step`.

    Built by the same float accumulation as `QscorePt3` (so the third radius is
    0.30000000000000004, not 0.3): for the defaults the 20 radii 0.1, 0.2, ..., 2.0 Å.

    **Arguments:**

    - `step`: shell spacing `dRAD` in Å (MapQ: 0.1).
    - `stop`: largest radius `toRAD` in Å (MapQ: 2.0).

    **Returns:** float64 array of the radii.
    """
    if not (step > 0 and stop > 0):
        raise ValueError(f"step and stop must be positive, got {step!r}, {stop!r}")
    radii = []
    rad = float(step)
    while rad < stop + 0.001:
        radii.append(rad)
        rad += step
    return np.array(radii, np.float64)


def _cctbx_radii() -> np.ndarray:
    # cctbx program default: np.linspace(shell_radius_start=0.1, stop=2.0, num=20), no r = 0 shell
    return np.linspace(0.1, 2.0, 20)


# --------------------------------------------------------------------------------------------------
# Probe selection
# --------------------------------------------------------------------------------------------------


class QProbes(eqx.Module):
    """The probe points of a Q-score: fixed shapes, padded, with a mask (jit friendly).

    Probe `p` of shell `s` of atom `a` sits at `position[a] + offsets()[a, s, p]` and counts iff
    `mask[a, s, p]`. The points of a shell are the `n_tried[a, s]` points of
    `spiral_points(n_tried[a, s])` scaled by `radii[s]` (MapQ's successful try; 0 = shell dropped),
    in spiral order (the rejected ones with mask False); entries beyond that are padding (offset 0,
    mask False). The padding width `max_points` is the largest spiral actually used (at most
    N + 98 = 106 for MapQ with N = 8; 106 for 7CEC, where on average 8.3 probes per shell count).

    The same probes are also listed compactly, one entry per counted probe in (atom, shell, slot)
    order (`atom_index`, `shell_index`, `slot_index`): `q_score_differentiable` evaluates that list,
    whose length is fixed by the selection, instead of the mostly empty padded array. `offsets()`
    materialises the padded `(n_atoms, n_shells, P, 3)` array on demand (24 bytes per entry).

    **Fields:**

    - `radii`: `(n_shells,)` shell radii in Å (float64).
    - `n_tried`: `(n_atoms, n_shells)` spiral size used per shell (int32; 0 if the shell is empty).
    - `mask`: `(n_atoms, n_shells, P)` which probes count (bool).
    - `n_kept`: `(n_atoms, n_shells)` int32, probes counted per shell (`mask.sum(-1)`).
    - `atom_index`, `shell_index`, `slot_index`: `(n_probes,)` int32, the counted probes.
    - `n_points`: N, the probes asked for per shell; also the weight of the r = 0 value.
    - `include_center`: whether the atom's own map value (r = 0) enters N times.
    - `variant`: `"mapq"` or `"cctbx"` (how the probes were chosen).
    """

    radii: Float[np.ndarray, " n_shells"]
    n_tried: Int[np.ndarray, "n_atoms n_shells"]
    mask: Bool[np.ndarray, "n_atoms n_shells P"]
    n_kept: Int[np.ndarray, "n_atoms n_shells"]
    atom_index: Int[np.ndarray, " n_probes"]
    shell_index: Int[np.ndarray, " n_probes"]
    slot_index: Int[np.ndarray, " n_probes"]
    n_points: int = eqx.field(static=True)
    include_center: bool = eqx.field(static=True)
    variant: str = eqx.field(static=True)

    @classmethod
    def from_mask(cls, radii, n_tried, mask, n_points: int, include_center: bool = True,
                  variant: str = "mapq") -> "QProbes":
        """Build from the padded description (derives the compact probe list)."""
        mask = np.asarray(mask, bool)
        a, s, p = (x.astype(np.int32) for x in np.nonzero(mask))
        n_kept = mask.sum(-1).astype(np.int32)
        return cls(np.asarray(radii, np.float64), np.asarray(n_tried, np.int32), mask, n_kept,
                   a, s, p, int(n_points), bool(include_center), str(variant))

    @property
    def n_atoms(self) -> int:
        return int(self.mask.shape[0])

    @property
    def n_shells(self) -> int:
        return int(self.mask.shape[1])

    @property
    def max_points(self) -> int:
        return int(self.mask.shape[2])

    @property
    def n_probes(self) -> int:
        """Number of counted probes (all atoms and shells, r = 0 not included)."""
        return int(self.atom_index.shape[0])

    def counts(self) -> Int[np.ndarray, "n_atoms n_shells"]:
        """Number of probes used per atom and shell."""
        return np.asarray(self.n_kept)

    def directions(self) -> Float[np.ndarray, "n_atoms n_shells P 3"]:
        """Unit vectors of every (padded) probe, float64 numpy."""
        table = _direction_table(self.n_points, self.max_points)
        n_tried = np.asarray(self.n_tried)
        out = table[_table_index(n_tried, self.n_points)]
        out[np.arange(self.max_points) >= n_tried[..., None]] = 0.0  # padding, dropped shells
        return out

    def offsets(self) -> Float[np.ndarray, "n_atoms n_shells P 3"]:
        """Probe positions relative to their atom in Å, `(n_atoms, n_shells, P, 3)` float64."""
        return self.directions() * np.asarray(self.radii)[None, :, None, None]


def _table_index(n_tried, n_points: int):
    return np.maximum((n_tried - n_points) // 2, 0)


@functools.lru_cache(maxsize=64)
def _direction_table(n_points: int, max_points: int) -> np.ndarray:
    """`(n_sizes, max_points, 3)`: row i = spiral of N + 2i points, zero padded."""
    sizes = [n_points + 2 * i for i in range(MAPQ_TRIES) if n_points + 2 * i <= max_points]
    table = np.zeros((max(len(sizes), 1), max_points, 3), np.float64)
    for i, n in enumerate(sizes):
        table[i, :n] = _spiral_cached(n)
    table.setflags(write=False)
    return table


def _as_positions(positions, what: str) -> np.ndarray:
    pos = np.asarray(positions, np.float64)
    if pos.ndim != 2 or pos.shape[-1] != 3:
        raise ValueError(f"{what} must be an (n, 3) array of x, y, z in Å, got shape {pos.shape}")
    bad = ~np.all(np.isfinite(pos), axis=-1)
    if bad.any():
        raise InvalidAtomsError(
            f"{what}: {int(bad.sum())} position(s) are NaN or infinite (first: atom "
            f"{int(np.flatnonzero(bad)[0])})"
        )
    return pos


def select_probes(
    positions: ArrayLike,
    proximity: ArrayLike | None = None,
    *,
    variant: Variant = "mapq",
    n_points: int = 8,
    radii: ArrayLike | None = None,
    include_center: bool | None = None,
) -> QProbes:
    """Choose the probe points of every atom (numpy/scipy on concrete coordinates).

    `variant="mapq"` follows `QscorePt3` (gregdp/mapq `qscores.py`): on each shell r, spirals of
    n = N + 2i points (i = 0..49, `SpherePts`) are tried in turn; a point is rejected when any
    proximity atom lies strictly closer than 0.9·r (`ptGrid.NumPtsNearPt(pt, 0.9*r) > 0`); the first
    try that keeps at least N points wins and *all* its kept points are used; if none does, the shell
    is dropped for that atom.

    `variant="cctbx"` follows `cctbx.maptbx.qscore` (`shell_probes_precalculate`): exactly N spiral
    points per shell, each kept iff no proximity atom is strictly closer to it than its own atom
    (its own atom is its nearest; ties kept).

    Vectorised over atoms: each atom's proximity neighbours within (1 + f)·r_max are gathered once
    with a KD-tree (f = 0.9 or 1); a probe p = x + r·u is blocked by neighbour b iff
    u·(x_b - x) > (|x_b - x|² + (1 - f²)·r²)/(2r), one matrix product per shell and try; the rare
    probes within 1e-9 Å of the threshold are decided again with MapQ's own arithmetic
    (`|x_b - p| < 0.9 r`, p = x + u·r).

    **Arguments:**

    - `positions`: `(n, 3)` positions in Å of the atoms to score.
    - `proximity`: `(m, 3)` positions of the atoms that can block probes; MapQ uses every non-H atom
      of the whole model. Defaults to `positions`. An atom at the very position of the scored atom
      (itself, or a coincident alt-loc) never blocks.
    - `variant`: `"mapq"` or `"cctbx"`.
    - `n_points`: N, probes per shell (MapQ: 8; the cctbx program uses 32).
    - `radii`: shell radii in Å; default `mapq_radii()` for MapQ and `linspace(0.1, 2, 20)` for cctbx.
    - `include_center`: whether the r = 0 value enters (N times). Default True (MapQ always; cctbx's
      program default shells have no r = 0, its unit tests do).

    **Returns:** a `QProbes`.
    """
    pos = _as_positions(positions, "positions")
    prox = pos if proximity is None else _as_positions(proximity, "proximity positions")
    if pos.shape[0] == 0:
        raise ModelmapError("there are no atoms to score")
    if isinstance(n_points, bool) or int(n_points) != n_points or int(n_points) < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    n_points = int(n_points)
    if variant not in ("mapq", "cctbx"):
        raise ValueError(f"variant must be 'mapq' or 'cctbx', got {variant!r}")
    if radii is None:
        radii = mapq_radii() if variant == "mapq" else _cctbx_radii()
    radii = np.asarray(radii, np.float64).reshape(-1)
    if radii.size == 0 or not np.all(np.isfinite(radii)) or np.any(radii <= 0):
        raise ValueError(f"shell radii must be positive and finite, got {radii}")
    include_center = True if include_center is None else bool(include_center)
    frac = MAPQ_REJECT_FRACTION if variant == "mapq" else 1.0
    tries = MAPQ_TRIES if variant == "mapq" else 1
    nb = _Neighbours.build(pos, prox, (1.0 + frac) * float(radii.max()))
    n_atoms, n_shells = pos.shape[0], radii.shape[0]
    n_tried = np.zeros((n_atoms, n_shells), np.int32)
    kept: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for s, rad in enumerate(radii):
        rad = float(rad)
        counts = nb.count_within((1.0 + frac) * rad)
        pending = np.arange(n_atoms)
        for i in range(tries):
            if pending.size == 0:
                break
            n = n_points + 2 * i
            ok = _kept_points(nb, pos, prox, pending, _spiral_cached(n), rad, frac, counts, variant)
            good = ok.sum(1) >= n_points if variant == "mapq" else np.ones(pending.size, bool)
            if good.any():
                n_tried[pending[good], s] = n
                kept[(s, n)] = (pending[good], ok[good])
            pending = pending[~good]
    max_points = max((n for (_, n) in kept), default=n_points)
    mask = np.zeros((n_atoms, n_shells, max_points), bool)
    for (s, n), (atoms, ok) in kept.items():
        mask[atoms, s, :n] = ok
    return QProbes.from_mask(radii, n_tried, mask, n_points, include_center, variant)


@dataclasses.dataclass(frozen=True)
class _Neighbours:
    """Proximity atoms near each scored atom, sorted by distance and padded.

    `vec[a, k]` = x_b - x_a, `dist2[a, k]` = |x_b - x_a|², `index[a, k]` = b (-1 = padding, with
    vec 0 and dist2 = inf, which never blocks).
    """

    vec: np.ndarray
    dist2: np.ndarray
    index: np.ndarray

    @classmethod
    def build(cls, pos: np.ndarray, prox: np.ndarray, reach: float) -> "_Neighbours":
        tree_a, tree_b = cKDTree(pos), cKDTree(prox)
        pairs = tree_a.sparse_distance_matrix(tree_b, reach + 1e-6, output_type="ndarray")
        a, b = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
        vec = prox[b] - pos[a]
        d2 = np.einsum("ij,ij->i", vec, vec)
        # an atom at the scored atom's own position (itself, a coincident alt-loc) is at distance
        # r from every probe of shell r, so it never blocks in either variant
        far = d2 > 0
        a, b, vec, d2 = a[far], b[far], vec[far], d2[far]
        order = np.lexsort((d2, a))
        a, b, vec, d2 = a[order], b[order], vec[order], d2[order]
        counts = np.bincount(a, minlength=pos.shape[0])
        width = max(int(counts.max(initial=0)), 1)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(a.size) - start[a]
        out_vec = np.zeros((pos.shape[0], width, 3))
        out_d2 = np.full((pos.shape[0], width), np.inf)
        out_idx = np.full((pos.shape[0], width), -1, np.int64)
        out_vec[a, slot] = vec
        out_d2[a, slot] = d2
        out_idx[a, slot] = b
        return cls(out_vec, out_d2, out_idx)

    def count_within(self, reach: float) -> np.ndarray:
        """Per atom, the number of neighbours closer than `reach` (they come first in each row)."""
        return (self.dist2 < (reach + 1e-6) ** 2).sum(1)


def _kept_points(nb, pos, prox, atoms, unit, rad, frac, counts, variant, chunk=1 << 16):
    """`(len(atoms), n)`: which of the spiral points `pos[a] + unit * rad` are not blocked.

    Atoms are processed in chunks of similar neighbour count (`counts`: neighbours within reach
    of this shell), each chunk with as many neighbour columns as its most crowded atom needs.
    """
    n = unit.shape[0]
    out = np.ones((atoms.size, n), bool)
    c = (1.0 - frac * frac) * rad * rad
    tol = 1e-9
    unit_t = np.ascontiguousarray(unit.T)
    order = np.argsort(counts[atoms], kind="stable")
    cnt = counts[atoms][order]
    lo = int(np.searchsorted(cnt, 1))  # atoms without neighbours in reach keep every point
    while lo < order.size:
        k = int(cnt[min(lo + max(1, chunk // (n * max(int(cnt[lo]), 1))), order.size) - 1])
        hi = min(order.size, lo + max(1, chunk // (n * k)))
        k = int(cnt[hi - 1])
        rows = order[lo:hi]
        sel = atoms[rows]
        m = sel.size
        w = nb.vec[sel, :k].reshape(m * k, 3)
        thr = ((nb.dist2[sel, :k] + c) * (0.5 / rad)).reshape(m * k, 1)
        gap = w @ unit_t  # (m*k, n): u·(x_b - x) ...
        gap -= thr  # ... minus the blocking threshold; > 0 means blocked
        gap = gap.reshape(m, k, n)
        worst = gap[:, 0, :].copy()
        for j in range(1, k):
            np.maximum(worst, gap[:, j, :], out=worst)
        keep = worst <= 0
        near = np.abs(worst) < tol
        if near.any():  # decide again exactly as MapQ / cctbx do it
            mi, p = np.nonzero(near)
            keep[mi, p] = ~_blocked_exact(nb, pos, prox, sel[mi], unit[p], rad, frac, k, variant)
        out[rows] = keep
        lo = hi
    return out


def _blocked_exact(nb, pos, prox, a, u, rad, frac, k, variant):
    """MapQ's own test for single points: p = x + u·r; blocked iff some |x_b - p| < 0.9 r (MapQ)
    or < |x - p| (cctbx)."""
    pt = pos[a] + u * rad  # (q, 3)
    idx = nb.index[a, :k]  # (q, k)
    v = prox[np.maximum(idx, 0)] - pt[:, None, :]
    length = np.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2])
    if variant == "mapq":
        limit = np.full(a.size, rad * frac)
    else:
        d = pos[a] - pt
        limit = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
    return ((length < limit[:, None]) & (idx >= 0)).any(1)


# --------------------------------------------------------------------------------------------------
# The exact score
# --------------------------------------------------------------------------------------------------


def mapq_min_max(data: ArrayLike) -> tuple[float, float]:
    """MapQ's `MinMaxD`: the reference Gaussian's floor and peak from whole-map statistics.

    maxD = min(mean + 10·sd, max), minD = max(mean - sd, min), with the population sd over every
    voxel (zeros of a zoned map included). The reference is then A·exp(-r²/2σ²) + B with
    A = maxD - minD, B = minD. (Pearson's correlation makes A and B irrelevant for any A > 0.)

    **Returns:** `(minD, maxD)` as floats.
    """
    m = np.asarray(data)
    if m.size == 0:
        raise ValueError("the map is empty")
    mean, sd = float(np.mean(m, dtype=np.float64)), float(np.std(m, dtype=np.float64))
    return max(mean - sd, float(np.min(m))), min(mean + 10.0 * sd, float(np.max(m)))


def _evaluate_exact(
    data: np.ndarray,
    grid: Grid,
    pos: np.ndarray,
    probes: QProbes,
    sigma: float,
    interpolation: Interpolation,
    a_b: tuple[float, float],
) -> np.ndarray:
    """Per-atom Q in float64 from concrete probes (only the kept probes are interpolated)."""
    if interpolation == "chimera":
        interp = functools.partial(interpolate_map_chimera, np.asarray(data, np.float32), grid)
    elif interpolation == "float64":
        interp = functools.partial(interpolate_map_numpy, np.asarray(data, np.float64), grid)
    else:
        raise ValueError(f"interpolation must be 'chimera' or 'float64', got {interpolation!r}")
    min_d, max_d = a_b
    amp, base = max_d - min_d, min_d
    n_atoms = pos.shape[0]
    n_pts = probes.n_points
    mask = np.asarray(probes.mask)
    n_tried = np.asarray(probes.n_tried)
    radii = np.asarray(probes.radii)
    table = _direction_table(n_pts, probes.max_points)
    # shift both series by their r = 0 values before summing (exact Pearson, no cancellation)
    center = interp(pos).astype(np.float64)
    g0 = amp * math.exp(-0.5 * (0.0 / sigma) ** 2) + base
    w0 = float(n_pts) if probes.include_center else 0.0
    cnt = np.full(n_atoms, w0)
    su = np.zeros(n_atoms)
    suu = np.zeros(n_atoms)
    sv = np.zeros(n_atoms)
    svv = np.zeros(n_atoms)
    suv = np.zeros(n_atoms)
    for s, rad in enumerate(radii):
        a, p = np.nonzero(mask[:, s, :])
        if a.size == 0:
            continue
        offs = table[_table_index(n_tried[a, s], n_pts), p] * rad
        vals = interp(pos[a] + offs).astype(np.float64)
        du = vals - center[a]
        dv = (amp * math.exp(-0.5 * (rad / sigma) ** 2) + base) - g0
        c = np.bincount(a, minlength=n_atoms).astype(np.float64)
        bu = np.bincount(a, weights=du, minlength=n_atoms)
        cnt += c
        su += bu
        suu += np.bincount(a, weights=du * du, minlength=n_atoms)
        sv += c * dv
        svv += c * dv * dv
        suv += bu * dv
    with np.errstate(invalid="ignore", divide="ignore"):
        mu, mv = su / cnt, sv / cnt
        cov = suv - cnt * mu * mv
        var_u = np.maximum(suu - cnt * mu * mu, 0.0)
        var_v = np.maximum(svv - cnt * mv * mv, 0.0)
        den = np.sqrt(var_u * var_v)
        q = np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(q, -1.0, 1.0)


def _model_parts(model_or_atoms):
    """(positions (n,3) float64, is_hydrogen (n,), labels or None)."""
    labels = None
    atoms = model_or_atoms
    if hasattr(model_or_atoms, "atoms") and hasattr(model_or_atoms, "labels"):
        atoms, labels = model_or_atoms.atoms, model_or_atoms.labels
    if not isinstance(atoms, Atoms):
        raise TypeError(
            "q_score needs an AtomicModel (modelmap.read_model) or an Atoms pytree, got "
            f"{type(model_or_atoms).__name__}"
        )
    pos = np.asarray(atoms.positions)
    z = np.asarray(atoms.atomic_numbers)
    if pos.ndim != 2:
        raise ValueError(f"positions of shape {pos.shape}: score one model of an ensemble at a time")
    pos = _as_positions(pos, "atom positions")
    if np.asarray(atoms.positions).dtype != np.float64 and labels is not None:
        pos = _source_positions(model_or_atoms, pos)
    return pos, z == 1, labels


def _source_positions(model, pos32: np.ndarray) -> np.ndarray:
    """The float64 coordinates of the source structure when `pos32` is just them in float32.

    `read_model` stores float32 positions by default, which moves atoms by up to ~8e-6 Å at 150 Å
    from the origin: enough to flip MapQ's probe rejections at near ties. When every position is
    the float32 rounding of the file's coordinate, the file's float64 coordinates are used.
    """
    structure = getattr(model, "structure", None)
    src = getattr(model.labels, "source_index", None)
    indices = getattr(model, "model_indices", (0,))
    if structure is None or src is None or len(src) != pos32.shape[0]:
        return pos32
    try:
        gm = structure[int(indices[0])]
        exact = np.array(
            [gm[int(c)][int(r)][int(a)].pos.tolist() for c, r, a in src], np.float64
        ).reshape(-1, 3)
    except (IndexError, TypeError, AttributeError):
        return pos32
    if np.array_equal(exact.astype(np.float32), pos32.astype(np.float32)):
        return exact
    return pos32


def _selection_mask(selection, n: int) -> np.ndarray:
    if selection is None:
        return np.ones(n, bool)
    sel = np.asarray(selection)
    if sel.dtype == bool:
        if sel.shape != (n,):
            raise ValueError(f"a boolean selection needs shape ({n},), got {sel.shape}")
        return sel
    if not np.issubdtype(sel.dtype, np.integer):
        raise TypeError("selection must be a boolean mask or integer atom indices")
    out = np.zeros(n, bool)
    out[sel] = True
    return out


def q_score(
    density_map,
    model_or_atoms,
    *,
    sigma: float = 0.6,
    n_points: int = 8,
    variant: Variant = "mapq",
    selection: ArrayLike | None = None,
    radii: ArrayLike | None = None,
    include_center: bool | None = None,
    interpolation: Interpolation = "chimera",
    probes: QProbes | None = None,
) -> "QScores":
    """Per-atom Q-score exactly as MapQ computes it (Pintilie et al. 2020, Nat. Methods 17, 328).

    For every non-H atom (selected by `selection`): u = the map value at the atom repeated N times,
    then the map values at the kept probes of every shell (`select_probes`); v = MapQ's reference
    Gaussian A·exp(-r²/2σ²) + B at the same radii, with A, B from `mapq_min_max` (`MinMaxD`);
    Q = Pearson(u, v) in float64 (`FitMap.overlap_and_correlation`'s "about mean" value; 0 when
    either series is constant). Probes are blocked by every non-H atom of the model, scored or not.
    Hydrogens are never scored (NaN) and never block probes.

    Interpolation is trilinear, 0 outside the map. `interpolation="chimera"` (default) follows
    Chimera's C++ `interpolate_volume_data` operation by operation: float32 probe coordinates,
    float32 index transform and weights, and "outside" from the last grid plane on;
    `"float64"` is plain float64 trilinear. They differ by ~2e-6 in Q (rms), the size of the
    residual left against MapQ's own 6-decimal output.

    Coordinates: an `AtomicModel` read with float32 positions is scored at its file's float64
    coordinates (float32 moves atoms by up to ~1e-5 Å, enough to flip MapQ's probe rejections at
    near ties); bare `Atoms` are used as given.

    To match a MapQ run made with several processes (`CalcQpn`), score against
    `mapq_regrid(map, atoms)` instead of the map itself.

    **Arguments:**

    - `density_map`: a `DensityMap` (`modelmap.read_map`).
    - `model_or_atoms`: an `AtomicModel` (gives per-residue aggregation) or an `Atoms` pytree.
    - `sigma`: width σ of the reference Gaussian in Å (MapQ: 0.6; EMDB validation uses 0.4).
    - `n_points`: N, probes per shell (MapQ: 8).
    - `variant`: `"mapq"` or `"cctbx"` (see `select_probes`).
    - `selection`: atoms to score (boolean mask or indices over all atoms); default all.
    - `radii`, `include_center`: shells, see `select_probes`.
    - `interpolation`: `"chimera"` or `"float64"`.
    - `probes`: precomputed probes for exactly the scored atoms, in order (skips the selection;
      their variant, N, shells and r = 0 setting apply).

    **Returns:** a `QScores` (per-atom Q, NaN where not scored, with aggregation methods).
    """
    if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of Å, got {sigma!r}")
    data, grid = _map_parts(density_map)
    pos, is_h, labels = _model_parts(model_or_atoms)
    heavy = ~is_h
    if not heavy.any():
        raise ModelmapError("the model has no non-hydrogen atoms to score")
    scored = heavy & _selection_mask(selection, pos.shape[0])
    if not scored.any():
        raise ModelmapError("the selection holds no non-hydrogen atoms")
    idx = np.flatnonzero(scored)
    if probes is None:
        probes = select_probes(
            pos[idx], pos[heavy], variant=variant, n_points=n_points, radii=radii,
            include_center=include_center,
        )
    elif probes.n_atoms != idx.size:
        raise ValueError(f"probes are for {probes.n_atoms} atoms but {idx.size} are scored")
    q_sel = _evaluate_exact(data, grid, pos[idx], probes, float(sigma), interpolation,
                            mapq_min_max(data))
    q = np.full(pos.shape[0], np.nan)
    q[idx] = q_sel
    return QScores(q=q, labels=labels, sigma=float(sigma), variant=probes.variant,
                   n_points=probes.n_points)


def _map_parts(density_map) -> tuple[np.ndarray, Grid]:
    data, grid = map_array(density_map, what="the map", dtype=None)
    return data, grid


# --------------------------------------------------------------------------------------------------
# Results and aggregation
# --------------------------------------------------------------------------------------------------

#: MapQ `SetBBAts`: protein backbone (OT1/OT2 are CHARMM's C-terminal oxygens; OXT counts as side
#: chain there too, and CB is side chain).
_PROTEIN_BACKBONE = frozenset("N CA C O OT1 OT2".split())
#: Nucleic phosphate backbone (OP3/O3P, the 5'-terminal phosphate oxygen, added here).
_NUCLEIC_BACKBONE = frozenset("P OP1 OP2 OP3 O1P O2P O3P O5' C5' O3'".split())
_NUCLEIC_SUGAR = frozenset("C1' C2' C3' C4' O4' O2'".split())


@dataclasses.dataclass(frozen=True)
class ResidueQ:
    """Mean Q of one residue's non-H atoms, and of its parts (NaN where a part has no atoms).

    Protein: `backbone` = N, CA, C, O; `side_chain` = the rest. Nucleic acids: `backbone` =
    phosphate (P, OP1, OP2, O5', C5', O3'), `sugar` = C1'-C4', O4', O2', `base` = the rest
    (`side_chain` = `base`). Other residues: only `residue`.
    """

    residue: float
    backbone: float = math.nan
    side_chain: float = math.nan
    sugar: float = math.nan
    base: float = math.nan
    kind: str = "other"
    n_atoms: int = 0


ResidueKey = tuple[str, int, str, str]


@dataclasses.dataclass(frozen=True)
class QScores:
    """Per-atom Q-scores with MapQ's aggregations (`QStats1`, `SaveQStats`).

    **Fields:**

    - `q`: `(n_atoms,)` float64, one per atom of the model; NaN for hydrogens and unscored atoms.
    - `labels`: the model's `AtomLabels` (None when scored from a bare `Atoms`).
    - `sigma`, `variant`, `n_points`: how they were computed.
    """

    q: np.ndarray
    labels: AtomLabels | None
    sigma: float
    variant: str
    n_points: int

    @property
    def scored(self) -> np.ndarray:
        """Boolean mask of the atoms that have a Q-score."""
        return np.isfinite(self.q)

    def mean(self) -> float:
        """Mean Q over all scored atoms (MapQ's model Q)."""
        if not self.scored.any():
            return math.nan
        return float(np.mean(self.q[self.scored]))

    def _need_labels(self) -> AtomLabels:
        if self.labels is None:
            raise ModelmapError(
                "per-residue and per-chain Q need atom labels: score an AtomicModel "
                "(modelmap.read_model), not bare Atoms"
            )
        return self.labels

    def per_chain(self) -> dict[str, float]:
        """Mean Q over the scored atoms of each chain (MapQ's chain Q), in order of appearance."""
        lab = self._need_labels()
        ok = self.scored
        out: dict[str, float] = {}
        for chain in dict.fromkeys(lab.chain[ok].tolist()):
            sel = ok & (lab.chain == chain)
            out[str(chain)] = float(np.mean(self.q[sel]))
        return out

    def per_residue(self) -> dict[ResidueKey, ResidueQ]:
        """Mean Q per residue, keyed by (chain, residue number, insertion code, residue name).

        Residues in order of appearance; residues without scored atoms are left out.
        """
        lab = self._need_labels()
        out: dict[ResidueKey, ResidueQ] = {}
        for idx in group_members(residue_groups(lab, altloc=False, name=True), np.flatnonzero(self.scored)):
            first = int(idx[0])
            key = (str(lab.chain[first]), int(lab.residue_number[first]), str(lab.insertion_code[first]),
                   str(lab.residue_name[first]))
            qs, names = self.q[idx], lab.atom_name[idx]
            kind = residue_kind(key[3])

            def mean_of(sel):
                return float(np.mean(qs[sel])) if np.any(sel) else math.nan

            every = mean_of(np.ones(idx.size, bool))
            if kind == "protein":
                bb = np.isin(names, list(_PROTEIN_BACKBONE))
                out[key] = ResidueQ(every, mean_of(bb), mean_of(~bb), kind="protein",
                                    n_atoms=idx.size)
            elif kind == "nucleic":
                bb = np.isin(names, list(_NUCLEIC_BACKBONE))
                sugar = np.isin(names, list(_NUCLEIC_SUGAR))
                base = ~bb & ~sugar
                out[key] = ResidueQ(every, mean_of(bb), mean_of(base), mean_of(sugar),
                                    mean_of(base), kind="nucleic", n_atoms=idx.size)
            else:
                out[key] = ResidueQ(every, kind="other", n_atoms=idx.size)
        return out


# --------------------------------------------------------------------------------------------------
# Expected Q for a resolution
# --------------------------------------------------------------------------------------------------

# (slope, intercept) of Q = slope·R + intercept, from gregdp/mapq `qscores.py` eQ_protein,
# eQ_nucleic, eQ_ion, eQ_water (ions and water have one line for both sigmas there).
_EXPECTED_LINEAR = {
    ("protein", 0.6): (-0.1775, 1.1192),
    ("protein", 0.4): (-0.1866, 1.1242),
    ("nucleic", 0.6): (-0.1377, 0.9973),
    ("nucleic", 0.4): (-0.1465, 0.9436),
    ("ion", 0.6): (-0.1103, 1.0795),
    ("ion", 0.4): (-0.1103, 1.0795),
    ("water", 0.6): (-0.0895, 1.0001),
    ("water", 0.4): (-0.0895, 1.0001),
}
# cubic fits of MapQ's `ExpectedQScore` (coefficients of R³, R², R, 1)
_EXPECTED_CUBIC = {
    0.6: (-0.0019064058, 0.0499875375, -0.4513945578, 1.5361860733),
    0.4: (-0.0020025943, 0.0504435042, -0.4343663048, 1.3945104702),
}


def _sigma_key(sigma: float) -> float:
    for s in (0.6, 0.4):
        if abs(float(sigma) - s) < 1e-5:
            return s
    raise ValueError(f"MapQ has expected-Q fits only for sigma 0.6 and 0.4 Å, got {sigma!r}")


def expected_q(resolution: ArrayLike, sigma: float = 0.6, kind: str = "protein"):
    """Expected Q-score at a map resolution, from MapQ's fits (gregdp/mapq `qscores.py`).

    `kind="protein"`: Q = -0.1775·R + 1.1192 (σ = 0.6) or -0.1866·R + 1.1242 (σ = 0.4)
    (`eQ_protein`); `"nucleic"`: -0.1377·R + 0.9973 / -0.1465·R + 0.9436; `"ion"`:
    -0.1103·R + 1.0795; `"water"`: -0.0895·R + 1.0001 (`eQ_ion`, `eQ_water`, same for both σ);
    `"cubic"`: the cubic `ExpectedQScore` that MapQ's per-residue tables use now.

    **Arguments:**

    - `resolution`: map resolution R in Å (scalar or array).
    - `sigma`: 0.6 or 0.4 Å.
    - `kind`: `"protein"`, `"nucleic"`, `"ion"`, `"water"` or `"cubic"`.

    **Returns:** the expected Q (float or array, like `resolution`).
    """
    r = np.asarray(resolution, np.float64)
    if np.any(~np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    s = _sigma_key(sigma)
    if kind == "cubic":
        c3, c2, c1, c0 = _EXPECTED_CUBIC[s]
        out = c3 * r**3 + c2 * r**2 + c1 * r + c0
    else:
        if (kind, s) not in _EXPECTED_LINEAR:
            raise ValueError(f"kind must be protein, nucleic, ion, water or cubic, got {kind!r}")
        a, b = _EXPECTED_LINEAR[(kind, s)]
        out = a * r + b
    return float(out) if out.ndim == 0 else out


def estimated_resolution(q: ArrayLike, sigma: float = 0.6, kind: str = "protein"):
    """Resolution in Å at which MapQ's linear fit expects this Q: R = (Q - b)/a.

    MapQ's "Est.Res." column: (Q - 1.1192)/-0.1775 for protein at σ = 0.6.

    **Arguments:**

    - `q`: Q-score(s).
    - `sigma`: 0.6 or 0.4 Å.
    - `kind`: `"protein"`, `"nucleic"`, `"ion"` or `"water"`.

    **Returns:** the resolution in Å (float or array).
    """
    s = _sigma_key(sigma)
    if (kind, s) not in _EXPECTED_LINEAR:
        raise ValueError(f"kind must be protein, nucleic, ion or water, got {kind!r}")
    a, b = _EXPECTED_LINEAR[(kind, s)]
    out = (np.asarray(q, np.float64) - b) / a
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------------
# MapQ's multi-process re-gridding
# --------------------------------------------------------------------------------------------------


def _py2_round(x: np.ndarray) -> np.ndarray:
    """Python 2 `round()`: halves away from zero."""
    x = np.asarray(x, np.float64)
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def mapq_regrid(density_map, atoms_or_positions, *, bound: int = 6):
    """The map that MapQ's multi-process mode actually scores: `MaskMapResize` (gregdp/mapq).

    `CalcQpn` (MapQ with more than one process) writes, for each process, a box around that
    process's atoms: `bound` = 6 voxels beyond the atoms' extreme fractional grid indices (box size
    rounded to whole voxels); its origin is the original origin plus that offset, **rounded to a
    multiple of the voxel size in absolute coordinates**; its values are the original map
    trilinearly interpolated (Chimera, float32) at the new grid points, 0 outside the original
    map; it is saved as MRC (float32 ORIGIN field, cell = voxel·n in float32). When the original
    origin is not a multiple of the voxel size (the common case for cropped maps) the new grid is
    shifted by a fraction of a voxel and every value is a re-interpolation: scores differ from a
    single-process run by up to ~0.2 per atom.

    The values on the common absolute grid do not depend on how the atoms were split over the
    processes; the box only decides where the map ends (values beyond are 0), and it reaches about
    6 voxels (at least 5) past every atom, well beyond the 2 Å probe shells and their interpolation
    cells. So one box around all scored atoms gives the Q-scores of any number of processes.
    (`MaskMapResize` also takes a radius `R`, which it does not use.)

    **Arguments:**

    - `density_map`: the original `DensityMap`.
    - `atoms_or_positions`: the scored atoms (`AtomicModel`, `Atoms` or `(n, 3)` positions, Å);
      hydrogens in an `AtomicModel`/`Atoms` are dropped, as MapQ only scores non-H atoms.
    - `bound`: margin in voxels (MapQ: 6; smaller margins can cut off probes, whose values become 0).

    **Returns:** the re-gridded `DensityMap` (float32 data).
    """
    if isinstance(bound, bool) or int(bound) != bound or bound < 0:
        raise ValueError(f"bound must be a whole number of voxels >= 0, got {bound!r}")
    data, grid = _map_parts(density_map)
    if isinstance(atoms_or_positions, Atoms) or hasattr(atoms_or_positions, "labels"):
        pos, is_h, _ = _model_parts(atoms_or_positions)
        pos = pos[~is_h]
    else:
        pos = _as_positions(atoms_or_positions, "positions")
    if pos.shape[0] == 0:
        raise ModelmapError("mapq_regrid needs at least one (non-H) atom")
    step = np.asarray(grid.voxel_size, np.float64)
    origin = np.asarray(grid.origin, np.float64)
    # _multiscale.get_atom_coordinates -> float32; xyz_to_ijk applied to the float32 array
    inv = 1.0 / step
    ijk = (pos.astype(np.float32).astype(np.float64) * inv + inv * -origin).astype(np.float32)
    lo = ijk.min(0).astype(np.float64) - bound
    hi = ijk.max(0).astype(np.float64) + bound
    n_xyz = _py2_round(step * (hi - lo + 1) / step).astype(int)
    new_origin = _py2_round((origin + lo * step) / step) * step
    # grid points of the new box (float32, as VolumeData.grid_indices + affine_transform_vertices)
    ax = [
        (new_origin[a] + step[a] * np.arange(n_xyz[a], dtype=np.float64)).astype(np.float32)
        for a in range(3)
    ]
    zz, yy, xx = np.meshgrid(ax[2], ax[1], ax[0], indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1)
    values = interpolate_map_chimera(data, grid, pts)
    # Chimera's MRC writer: ORIGIN field (float32), cell = step * size (float32), nstart 0
    cell = (step * n_xyz).astype(np.float32).astype(np.float64)
    new_grid = Grid(
        tuple(int(n) for n in n_xyz[::-1]),
        tuple(cell / n_xyz),
        tuple(new_origin.astype(np.float32).astype(np.float64)),
    )
    return DensityMap(jnp.asarray(values), new_grid)


# --------------------------------------------------------------------------------------------------
# Differentiable Q
# --------------------------------------------------------------------------------------------------


def q_score_differentiable(
    map_data: Float[Array, "nz ny nx"],
    grid: Grid,
    positions: Float[Array, "n 3"],
    probes: QProbes,
    sigma: float | Float[Array, ""] = 0.6,
) -> Float[Array, " n"]:
    """Per-atom Q-score as a pure JAX function, differentiable in positions, map and σ.

    The same estimator as `q_score` for the given `probes`, for refinement losses: which probes
    count is fixed (chosen by `select_probes` from concrete positions, outside the gradient); each
    probe moves rigidly with its atom (position + fixed offset), and its value comes from
    `interpolate_map` (trilinear), so the gradient flows through the probe positions and the
    interpolation. Shapes are fixed by the selection (`probes.n_probes` values plus one per atom),
    so the function is jit- and vmap-able (e.g. over a batch of positions with the same probes).
    The reference Gaussian is exp(-r²/2σ²): Pearson's correlation makes MapQ's A and B irrelevant.
    Q = 0 where the values are constant. Trilinear interpolation is piecewise linear, so Q has kinks
    where a probe crosses a voxel face; its gradient is that of the piece the probe is in.

    **Arguments:**

    - `map_data`: the map `(nz, ny, nx)`.
    - `grid`: its `Grid`.
    - `positions`: `(n, 3)` positions in Å of the scored atoms, in the order of `probes`.
    - `probes`: from `select_probes` (for these atoms).
    - `sigma`: reference width σ in Å.

    **Returns:** `(n,)` Q-scores in the dtype of `positions` (float32 by default).
    """
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.floating):
        positions = positions.astype(jnp.float32)
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be (n, 3), got {positions.shape}")
    n_atoms = positions.shape[0]
    if n_atoms != probes.n_atoms:
        raise ValueError(f"probes are for {probes.n_atoms} atoms, got {n_atoms} positions")
    dtype = positions.dtype
    n_shells = probes.n_shells
    atom = jnp.asarray(probes.atom_index)
    shell = jnp.asarray(probes.shell_index)
    slot = jnp.asarray(probes.slot_index)
    radii = jnp.asarray(probes.radii, dtype)
    table = jnp.asarray(_direction_table(probes.n_points, probes.max_points), dtype)
    # the barrier keeps XLA from constant-folding these gathers (seconds of compile time for
    # millions of probes) when the probes are closed over in a jitted function
    table, n_tried = jax.lax.optimization_barrier((table, jnp.asarray(probes.n_tried)))
    row = jnp.maximum((n_tried[atom, shell] - probes.n_points) // 2, 0)
    offsets = jax.lax.stop_gradient(table[row, slot] * radii[shell][:, None])  # (K, 3)
    u = interpolate_map(map_data, grid, positions[atom] + offsets).astype(dtype)  # (K,)
    c = interpolate_map(map_data, grid, positions).astype(dtype)  # (n,)
    sigma = jnp.asarray(sigma, dtype)
    g = jnp.exp(-0.5 * (radii / sigma) ** 2) - 1  # reference per shell, shifted by g(r=0) = 1
    # Sums over the probes of each atom. Only sums of map values need a scatter (per atom and
    # shell); everything that depends on the shell alone is a product with the counts per shell,
    # so nothing large is constant-folded when the probes are closed over in a jitted loss.
    counts = jnp.asarray(probes.n_kept).astype(dtype)  # (n, S)
    w0 = jnp.asarray(probes.n_points if probes.include_center else 0, dtype)
    n_probe = counts.sum(1)
    total = w0 + n_probe
    safe = jnp.where(total > 0, total, 1)
    du = u - c[atom]  # both series are shifted by their r = 0 values (well conditioned)
    cell = atom * n_shells + shell
    su_shell = jax.ops.segment_sum(du, cell, num_segments=n_atoms * n_shells,
                                   indices_are_sorted=True).reshape(n_atoms, n_shells)
    suu = jax.ops.segment_sum(du * du, atom, num_segments=n_atoms, indices_are_sorted=True)
    su = su_shell.sum(1)
    sv = counts @ g
    mu, mv = su / safe, sv / safe
    # centred sums; the r = 0 entries (w0 of them) sit at (0, 0) before centring
    cov = su_shell @ g - mu * sv - mv * su + total * mu * mv
    var_u = suu - 2 * mu * su + total * mu * mu
    var_v = counts @ (g * g) - 2 * mv * sv + total * mv * mv
    den2 = jnp.maximum(var_u, 0) * jnp.maximum(var_v, 0)
    ok = den2 > 0
    return jnp.where(ok, cov / jnp.sqrt(jnp.where(ok, den2, 1)), 0)
