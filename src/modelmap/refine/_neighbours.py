"""Non-bonded contacts: the exclusions of the bond graph and the pair list of the repulsion.

The repulsion (`Restraints.energy_terms`, "nonbonded") acts on pairs closer than
r0 = 0.8 × (R_i + R_j) (0.7 × for 1-4 pairs) with Bondi (1964) van der Waals radii R; 1-2 and 1-3
pairs of the bond graph, atoms of different alternate conformers and atoms without a dictionary
entry (R = 0) are excluded. The pair list holds every pair within the largest r0 plus a buffer; the
refinement loop stops its compiled run when any atom has moved by more than half the buffer since
the list was built (a Verlet list), and the host rebuilds it (`Restraints.with_nonbonded`).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["NONBONDED_SCALE", "NONBONDED_SCALE_14", "NONBONDED_SIGMA", "VDW_RADII", "exclusions", "nonbonded_pairs"]

NONBONDED_SCALE = 0.8  # r0 = scale × (R_i + R_j)
NONBONDED_SCALE_14 = 0.7
# Å: σ of the harmonic repulsion ((r0 − d)/σ)² below r0. Refmac and servalcat use 0.2 Å with riding
# hydrogens, which carry much of their repulsion; without hydrogens 0.2 Å left 30 heavy-atom contacts
# under 2.2 Å on 7CEC chain A against EMD-30342 (servalcat: 11), 0.1 Å left 2 (weight_scale 0.3;
# bench_refine.py, real)
NONBONDED_SIGMA = 0.1

# Bondi (1964), J. Phys. Chem. 68, 441: van der Waals radii in Å
VDW_RADII = {"H": 1.20, "D": 1.20, "C": 1.70, "N": 1.55, "O": 1.52, "S": 1.80, "P": 1.80,
              "SE": 1.90, "F": 1.47, "CL": 1.75, "BR": 1.85, "I": 1.98}


def exclusions(bond_index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(1-2 and 1-3 pairs, 1-4 pairs) of the bond graph, each as sorted keys `i · n + j` (i < j)
    (cached: a refinement rebuilds its contact list many times over one bond graph)."""
    bond_index = np.ascontiguousarray(bond_index, np.int64).reshape(-1, 2)
    return _exclusions(bond_index.tobytes(), n)


@functools.lru_cache(maxsize=8)
def _exclusions(bonds: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    bond_index = np.frombuffer(bonds, np.int64).reshape(-1, 2)
    nbrs: list[set[int]] = [set() for _ in range(n)]
    for i, j in bond_index:
        nbrs[i].add(int(j))
        nbrs[j].add(int(i))
    excl, one_four = set(), set()
    for i in range(n):
        for j in nbrs[i]:
            excl.add((min(i, j), max(i, j)))
            for k in nbrs[j]:
                if k != i:
                    excl.add((min(i, k), max(i, k)))
    for i in range(n):
        for j in nbrs[i]:
            for k in nbrs[j]:
                for m in nbrs[k]:
                    if m != i and m != j:
                        p = (min(i, m), max(i, m))
                        if p not in excl:
                            one_four.add(p)

    def keys(pairs):
        a = np.asarray(sorted(pairs), np.int64).reshape(-1, 2)
        return np.sort(a[:, 0] * n + a[:, 1])

    return keys(excl), keys(one_four)


def nonbonded_pairs(pos, radius, altloc, bond_index, buffer: float) -> tuple[np.ndarray, np.ndarray]:
    """The non-bonded pairs `(k, 2)` (i < j) within the largest contact distance plus `buffer` Å of
    each other, and their contact distances r0 `(k,)` in Å (module docs).

    **Arguments:** `pos` `(n, 3)` Å; `radius` `(n,)` van der Waals radii in Å (0: no contacts);
    `altloc` `(n,)` alternate-conformer codes (0 or "": none); `bond_index` `(nb, 2)`; `buffer` Å.
    """
    from scipy.spatial import cKDTree

    n = len(radius)
    radius = np.asarray(radius, np.float64)
    active = np.flatnonzero(radius > 0)
    if len(active) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    cutoff = 2.0 * NONBONDED_SCALE * float(radius.max()) + buffer
    pairs = cKDTree(pos[active]).query_pairs(cutoff, output_type="ndarray")
    if not len(pairs):
        return np.zeros((0, 2), np.int64), np.zeros(0)
    pairs = np.sort(active[pairs], axis=1)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # (i, j) order, as the list has always been
    pairs, one_four = non_excluded(pairs, n, bond_index, altloc)
    scale = np.where(one_four, NONBONDED_SCALE_14, NONBONDED_SCALE)
    return pairs, scale * (radius[pairs[:, 0]] + radius[pairs[:, 1]])


def non_excluded(pairs: np.ndarray, n: int, bond_index, altloc=None) -> tuple[np.ndarray, np.ndarray]:
    """The pairs `(k, 2)` (i < j) that are neither 1-2 nor 1-3 in the bond graph nor atoms of
    different alternate conformers (`altloc`: codes, 0 or "" for none), and whether each is 1-4.
    Vectorised (a Python loop over 60k candidate pairs took 0.2 s per contact-list rebuild)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    key = pairs[:, 0] * n + pairs[:, 1]
    keep = np.ones(len(pairs), bool)
    one_four = np.zeros(len(pairs), bool)
    if bond_index is not None:
        excl, one_four_keys = exclusions(bond_index, n)
        keep &= ~np.isin(key, excl)
        one_four = np.isin(key, one_four_keys)
    if altloc is not None:
        alt = np.asarray(altloc)
        none = alt.dtype.type("") if alt.dtype.kind in "US" else alt.dtype.type(0)
        ai, aj = alt[pairs[:, 0]], alt[pairs[:, 1]]
        keep &= ~((ai != none) & (aj != none) & (ai != aj))
    return pairs[keep], one_four[keep]
