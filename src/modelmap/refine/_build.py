"""`build_restraints`: the restraints of a model, from the chemical library (`_library`), its links
and its alternate conformers, as the index arrays of a `Restraints` (`_restraints`)."""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import put
from .._errors import ModelmapError
from .._residues import residue_kind
from ._neighbours import VDW_RADII
from ._library import (
    LINK_CUTOFF,
    OMEGA_SIGMA,
    ResidueTemplate,
    RestraintsWarning,
    _disulfide_link,
    _nucleic_link,
    _peptide_link,
    residue_template,
)
from ._restraints import Restraints, RestraintWeights, _dihedral

# one compiled call per peptide link: `_dihedral`'s dozen operations dispatched one by one for each of
# 7CEC chain A's 550 links took about 0.3 s of build_restraints' 0.9 s
_dihedral_jit = jax.jit(_dihedral)

__all__ = ["build_restraints"]


def _padded(rows) -> tuple[np.ndarray, np.ndarray]:
    """Rows of atom indices of different lengths as `(index, mask)` arrays `(len(rows), longest)`,
    padded with index 0 and mask False."""
    width = max((len(r) for r in rows), default=1)
    index = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for k, r in enumerate(rows):
        index[k, : len(r)] = r
        mask[k, : len(r)] = True
    return index, mask


def _resolve(tuples, residues, n_atoms_altloc):
    """All atom-index tuples for named atoms `[(residue slot, name), ...]`, one per consistent
    combination of alternate conformers (altlocs: blank or all the same)."""
    altloc = n_atoms_altloc
    choices = []
    for slot, name in tuples:
        cands = residues[slot].get(name)
        if not cands:
            return []
        choices.append(cands)
    out = []
    for combo in itertools.product(*choices):
        alts = {altloc[i] for i in combo if altloc[i]}
        if len(alts) <= 1 and len(set(combo)) == len(combo):
            out.append(combo)
    return out


def build_restraints(
    model,
    *,
    monomer_library: str | os.PathLike | None = None,
    engh_huber: bool = True,
    weights: RestraintWeights | None = None,
    b_sigma: float = 5.0,
    occupancy_sigma: float = 0.01,
    resolution_bounds: tuple[float, float] = (1.0, 30.0),
    resolution_sigma: float = 0.1,
    nonbonded: bool = True,
    nonbonded_buffer: float = 2.0,
    dtype=jnp.float32,
) -> Restraints:
    """Restraints for an `AtomicModel` from a chemical library (never from the model's geometry).

    Residues are matched to dictionary components by residue name; restraints are made for the atoms
    present (a truncated side chain loses the terms that need its missing atoms). Consecutive
    residues of one chain are linked (peptide, nucleic acid) when C(i)-N(i+1) (O3'(i)-P(i+1)) is
    shorter than 2.5 Å in the input; CYS pairs with SG-SG < 2.5 Å get a disulfide. Alternate
    conformers: each restraint is made once per consistent combination of altlocs (blank atoms are
    shared), no non-bonded term between different altlocs, and the occupancies of the conformers of
    an atom are restrained to sum to 1.

    **Arguments:**

    - `model`: an `AtomicModel` (`read_model`); an ensemble uses its first member for the links and
      the neighbour list.
    - `monomer_library`: a CCP4 monomer library folder; default `$CLIBD_MON` if set. Components it
      lacks come from the CCD (biotite).
    - `engh_huber`: Engh & Huber (1991) backbone values for amino acids (see the module docstring).
    - `weights`: `RestraintWeights`.
    - `b_sigma` (Å²), `occupancy_sigma`, `resolution_bounds` (Å), `resolution_sigma` (Å): see
      `Restraints.energy_terms`.
    - `nonbonded`: build the non-bonded neighbour list; `nonbonded_buffer` (Å) its margin.
    - `dtype`: float dtype of the ideal values.

    **Returns:** `Restraints`. Warns (`RestraintsWarning`) naming the residues without dictionary
    entry and atoms that their component does not have; those atoms get no restraints and no
    non-bonded term.
    """
    if monomer_library is not None and not Path(monomer_library).is_dir():
        raise ModelmapError(f"monomer library {monomer_library}: no such folder")
    lib = str(monomer_library) if monomer_library else None
    labels = model.labels
    pos = np.asarray(model.atoms.positions, np.float64)
    if pos.ndim == 3:
        pos = pos[0]
    n = len(labels)
    if n == 0:
        raise ModelmapError("the model has no atoms")
    alt_codes = {a: k + 1 for k, a in enumerate(sorted({str(a) for a in labels.altloc if a}))}
    altloc = np.array([alt_codes.get(str(a), 0) for a in labels.altloc], np.int32)

    # group atoms into residues, in file order
    res_keys: list[tuple] = []
    residues: list[dict[str, list[int]]] = []
    key_to_slot: dict[tuple, int] = {}
    for i in range(n):
        key = (str(labels.chain[i]), int(labels.residue_number[i]), str(labels.insertion_code[i]),
               str(labels.residue_name[i]))
        if key not in key_to_slot:
            key_to_slot[key] = len(res_keys)
            res_keys.append(key)
            residues.append(defaultdict(list))
        residues[key_to_slot[key]][str(labels.atom_name[i])].append(i)

    bonds, angles, planes, chirals, torsions = {}, {}, {}, {}, {}
    restrained = np.zeros(n, bool)
    unknown_res, unknown_atoms = [], []

    def add(kind, store, named, values, slots):
        rs = [residues[s] for s in slots]
        for combo in _resolve([(k, nm) for k, nm in named], rs, altloc):
            if kind == "plane":
                key = tuple(sorted(combo))
            elif kind == "chiral":
                key = combo
            else:
                key = combo if combo[0] < combo[-1] else combo[::-1]
            store.setdefault(key, values)
            restrained[list(combo)] = True

    templates: list[ResidueTemplate | None] = []
    for slot, key in enumerate(res_keys):
        t = residue_template(key[3], engh_huber=engh_huber, monomer_library=lib)
        templates.append(t)
        if t is None:
            unknown_res.append(f"{key[0]}/{key[3]} {key[1]}{key[2]}")
            continue
        names = set(t.atoms)
        for nm, idx in residues[slot].items():
            if nm not in names:
                unknown_atoms += [labels.atom_id(i) for i in idx]
        s = [slot]
        for a, b, d0, sg in t.bonds:
            add("bond", bonds, [(0, a), (0, b)], (d0, sg), s)
        for a, b, c, t0, sg in t.angles:
            add("angle", angles, [(0, a), (0, b), (0, c)], (t0, sg), s)
        for names_, sg in t.planes:
            present = [(0, x) for x in names_ if x in residues[slot]]
            if len(present) >= 4:
                add("plane", planes, present, sg, s)
        for c, a, b, d, v0, sg in t.chirals:
            add("chiral", chirals, [(0, c), (0, a), (0, b), (0, d)], (v0, sg), s)
        if len(t.atoms) == 1:  # a single-atom component (ion, water O) is known but has no terms
            for idx in residues[slot].values():
                restrained[idx] = True
        if residue_kind(key[3]) == "water":
            for idx in residues[slot].values():
                restrained[idx] = True

    def close(slot_a, name_a, slot_b, name_b) -> bool:
        ia, ib = residues[slot_a].get(name_a, []), residues[slot_b].get(name_b, [])
        return any(np.linalg.norm(pos[i] - pos[j]) < LINK_CUTOFF for i in ia for j in ib)

    def add_link(link, slots, omega=False):
        lb, la, lp = link
        if omega:  # cis or trans as in the input (a class, not a value taken from the model)
            named = [(0, "CA"), (0, "C"), (1, "N"), (1, "CA")]
            for combo in _resolve(named, [residues[s] for s in slots], altloc):
                w = float(_dihedral_jit(*(np.asarray(pos[i]) for i in combo)))
                torsions.setdefault(combo, (180.0 if abs(w) > math.pi / 2 else 0.0, OMEGA_SIGMA))
        for x, y, d0, sg in lb:
            add("bond", bonds, [x, y], (d0, sg), slots)
        for atoms3, t0, sg in ((x[:3], x[3], x[4]) for x in la):
            add("angle", angles, list(atoms3), (t0, sg), slots)
        for atoms_, sg in lp:
            present = [(k, x) for k, x in atoms_ if x in residues[slots[k]]]
            if len(present) >= 4:
                add("plane", planes, present, sg, slots)

    for slot in range(len(res_keys) - 1):
        a, b = res_keys[slot], res_keys[slot + 1]
        ta, tb = templates[slot], templates[slot + 1]
        if a[0] != b[0] or ta is None or tb is None:
            continue
        if {"N", "CA", "C"} <= set(ta.atoms) and {"N", "CA"} <= set(tb.atoms) and close(slot, "C", slot + 1, "N"):
            add_link(_peptide_link(b[3]), [slot, slot + 1], omega=True)
        elif "O3'" in ta.atoms and "P" in tb.atoms and close(slot, "O3'", slot + 1, "P"):
            add_link(_nucleic_link(), [slot, slot + 1])
    cys = [s for s, k in enumerate(res_keys) if k[3] == "CYS" and "SG" in residues[s]]
    for x, y in itertools.combinations(cys, 2):
        if close(x, "SG", y, "SG"):
            add_link(_disulfide_link(), [x, y])

    unrestrained = tuple(unknown_res) + tuple(unknown_atoms)
    if unknown_res or unknown_atoms:
        parts = []
        if unknown_res:
            parts.append(f"{len(unknown_res)} residue(s) without a dictionary entry: "
                         + ", ".join(unknown_res[:20]) + (" ..." if len(unknown_res) > 20 else ""))
        if unknown_atoms:
            parts.append(f"{len(unknown_atoms)} atom(s) not in their component: "
                         + ", ".join(unknown_atoms[:20]) + (" ..." if len(unknown_atoms) > 20 else ""))
        warnings.warn("no restraints for " + "; ".join(parts), RestraintsWarning, stacklevel=2)

    # alternate conformer groups (atoms with the same residue and name, all with an altloc)
    groups = []
    for slot, res in enumerate(residues):
        for idx in res.values():
            if len(idx) > 1 and all(altloc[i] for i in idx):
                groups.append(idx)
    alt_index, alt_mask = _padded(groups)

    def arr(store, width):
        keys = list(store)
        return np.asarray(keys, np.int32).reshape(-1, width), [store[k] for k in keys]

    bi, bv = arr(bonds, 2)
    ai, av = arr(angles, 3)
    ci, cv = arr(chirals, 4)
    ti, tv = arr(torsions, 4)
    pi, pm = _padded(list(planes))
    ps = np.asarray(list(planes.values()), np.float64)

    elements = [str(e).upper() for e in labels.element]
    radius = np.array([VDW_RADII.get(e, 0.0) if restrained[i] else 0.0 for i, e in enumerate(elements)])

    f = lambda x: put(x, dtype)  # noqa: E731
    r = Restraints(
        bond_index=put(bi, np.int32),
        bond_ideal=f([v[0] for v in bv]),
        bond_sigma=f([v[1] for v in bv]),
        angle_index=put(ai, np.int32),
        angle_ideal=f(np.radians([v[0] for v in av])),
        angle_sigma=f(np.radians([v[1] for v in av])),
        plane_index=put(pi, np.int32),
        plane_mask=put(pm),
        plane_sigma=f(ps),
        chiral_index=put(ci, np.int32),
        chiral_ideal=f([v[0] for v in cv]),
        chiral_sigma=f([v[1] for v in cv]),
        torsion_index=put(ti, np.int32),
        torsion_ideal=f(np.radians([v[0] for v in tv])),
        torsion_sigma=f(np.radians([v[1] for v in tv])),
        nonbonded_index=put(np.zeros((0, 2), np.int32)),
        nonbonded_distance=f(np.zeros(0)),
        alt_group_index=put(alt_index),
        alt_group_mask=put(alt_mask),
        vdw_radius=f(radius),
        altloc_code=put(altloc),
        weights=weights if weights is not None else RestraintWeights(),
        b_sigma=float(b_sigma),
        occupancy_sigma=float(occupancy_sigma),
        resolution_bounds=(float(resolution_bounds[0]), float(resolution_bounds[1])),
        resolution_sigma=float(resolution_sigma),
        nonbonded_buffer=float(nonbonded_buffer),
        unrestrained=unrestrained,
        library=(f"CCP4 monomer library {lib}, then the CCD (biotite)" if lib
                 else "CCD (biotite)" + (" with Engh & Huber backbone" if engh_huber else "")),
    )
    if nonbonded:
        r = r.with_nonbonded(pos)
    return r
