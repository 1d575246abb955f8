"""Q-score probes: MapQ's spiral and shell radii, and which probe points count (numpy/scipy on
concrete coordinates, a fixed-shape padded `QProbes`).

Two selection rules, named after what they reproduce (see `select_probes`):

- `variant="mapq"` — gregdp/mapq `qscores.py` (`QscorePt3`, the per-atom function of both the
  single-process `CalcQ` and the multi-process `CalcQpn`): probes come from MapQ's spiral
  (`SpherePts`); a probe is rejected when any non-H atom of the whole model lies strictly within
  0.9·r of it; N + 2i points (i = 0..49) are tried until at least N survive, and then *all* the
  survivors of that try are used; a shell where no try reaches N contributes nothing.
- `variant="cctbx"` — `cctbx.maptbx.qscore` (`calc_qscore`, `generate_probes_np`): exactly N probes
  per shell (same spiral), a probe is kept iff its nearest atom is its own atom; no retries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import equinox as eqx
import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int
from scipy.spatial import cKDTree

from .._errors import InvalidAtomsError, ModelmapError
from .._progress import ProgressBar, progress_bar

__all__ = ["MAPQ_TRIES", "MAPQ_REJECT_FRACTION", "Variant", "spiral_points", "mapq_radii", "QProbes", "select_probes",
           "as_positions", "direction_table", "table_index"]

#: MapQ tries N, N+2, ..., N+98 spiral points per shell (`for i in range(0, 50)` in `QscorePt3`).
MAPQ_TRIES = 50
#: A probe is rejected when another atom is closer than this fraction of the shell radius.
MAPQ_REJECT_FRACTION = 0.9

Variant = Literal["mapq", "cctbx"]


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
        table = direction_table(self.n_points, self.max_points)
        n_tried = np.asarray(self.n_tried)
        out = table[table_index(n_tried, self.n_points)]
        out[np.arange(self.max_points) >= n_tried[..., None]] = 0.0  # padding, dropped shells
        return out

    def offsets(self) -> Float[np.ndarray, "n_atoms n_shells P 3"]:
        """Probe positions relative to their atom in Å, `(n_atoms, n_shells, P, 3)` float64."""
        return self.directions() * np.asarray(self.radii)[None, :, None, None]


def table_index(n_tried, n_points: int):
    """Row of `direction_table` for a spiral of `n_tried` points (N + 2i -> i)."""
    return np.maximum((n_tried - n_points) // 2, 0)


@functools.lru_cache(maxsize=64)
def direction_table(n_points: int, max_points: int) -> np.ndarray:
    """`(n_sizes, max_points, 3)`: row i = spiral of N + 2i points, zero padded."""
    sizes = [n_points + 2 * i for i in range(MAPQ_TRIES) if n_points + 2 * i <= max_points]
    table = np.zeros((max(len(sizes), 1), max_points, 3), np.float64)
    for i, n in enumerate(sizes):
        table[i, :n] = _spiral_cached(n)
    table.setflags(write=False)
    return table


def as_positions(positions, what: str) -> np.ndarray:
    """`positions` as a float64 `(n, 3)` array, checked (finite), `what` naming them in errors."""
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
    progress: "bool | ProgressBar" = False,
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
    - `progress`: a progress bar on stderr, one tick per shell (shown after a second); or a caller's
      `ProgressBar` to tick.

    **Returns:** a `QProbes`.
    """
    pos = as_positions(positions, "positions")
    prox = pos if proximity is None else as_positions(proximity, "proximity positions")
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
    with progress_bar(progress, "Q-score probes", n_shells) as bar:
        for s, rad in enumerate(radii):
            bar.describe(f"Q-score probes: shell {s + 1} of {n_shells} ({n_atoms} atoms)")
            _shell_probes(nb, pos, prox, float(rad), n_points, tries, frac, variant, n_tried, kept, s)
            bar.advance()
    max_points = max((n for (_, n) in kept), default=n_points)
    mask = np.zeros((n_atoms, n_shells, max_points), bool)
    for (s, n), (atoms, ok) in kept.items():
        mask[atoms, s, :n] = ok
    return QProbes.from_mask(radii, n_tried, mask, n_points, include_center, variant)


def _shell_probes(nb, pos, prox, rad: float, n_points: int, tries: int, frac: float, variant, n_tried, kept,
                  s: int) -> None:
    """One shell of `select_probes`: the spirals tried in turn; fills `n_tried[:, s]` and `kept`."""
    counts = nb.count_within((1.0 + frac) * rad)
    pending = np.arange(pos.shape[0])
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
