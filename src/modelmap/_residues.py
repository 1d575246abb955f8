"""What kind of residue a residue name is, and which atoms form one residue: their one home.

**Kinds.** A residue name is classified by gemmi's table of chemical components
(`gemmi.find_tabulated_residue(name)`: `is_amino_acid()`, `is_nucleic_acid()`, `is_water()`),
which covers the standard residues, the common modified ones (MSE, SEP, TPO, ...), UNK, ASX/GLX
and the water names (HOH, WAT, DOD, H2O), plus the force-field names that are not chemical
components and that gemmi does not know: CHARMM/AMBER histidine and cysteine states (HSD, HSE,
HSP, HID, HIE, HIP, CYX) as amino acids, and the old nucleotide names (T, ADE, CYT, GUA, URA, THY)
as nucleic acids.

This replaces three definitions that disagreed: Q-score's aggregation listed 32 names by hand
(MapQ-like, with the force-field names but without modified residues such as SEP or TPO, whose
backbone is a peptide backbone all the same), local CC asked gemmi (without the force-field names,
so a CHARMM model's histidines had no main chain), and the restraints' list holds the 20 standard
amino acids and MSE (the residues with Engh & Huber backbone values, a narrower idea). gemmi's
table plus the force-field names is the superset that is right for all three questions of "is
this residue protein / nucleic acid / water".

**Groups.** One residue = one chain, residue number and insertion code (and, where asked, one
alternate conformer), numbered in order of first appearance.
"""

from __future__ import annotations

import functools
from typing import Literal

import gemmi
import numpy as np
from jaxtyping import Int

from ._atoms import AtomLabels

__all__ = ["ResidueKind", "residue_kind", "is_protein", "is_nucleic", "is_water", "residue_groups", "group_members"]

ResidueKind = Literal["protein", "nucleic", "water", "other"]

#: Force-field residue names that are not chemical components (gemmi does not know them).
_FORCE_FIELD_AMINO_ACIDS = frozenset("HSD HSE HSP HID HIE HIP CYX".split())
_FORCE_FIELD_NUCLEOTIDES = frozenset("T ADE CYT GUA URA THY".split())


@functools.lru_cache(maxsize=4096)
def residue_kind(name: str) -> ResidueKind:
    """`"protein"`, `"nucleic"`, `"water"` or `"other"` for a residue name (module docstring).

    **Arguments:**

    - `name`: residue name (component id), any case, surrounding blanks ignored.

    **Returns:** the kind.
    """
    key = str(name).strip().upper()
    if key in _FORCE_FIELD_AMINO_ACIDS:
        return "protein"
    if key in _FORCE_FIELD_NUCLEOTIDES:
        return "nucleic"
    info = gemmi.find_tabulated_residue(key) if key else None
    if info is None:
        return "other"
    if info.is_amino_acid():
        return "protein"
    if info.is_nucleic_acid():
        return "nucleic"
    if info.is_water():
        return "water"
    return "other"


def _kind_mask(names, kind: ResidueKind) -> np.ndarray:
    names = np.asarray(names).astype(str)
    unique, inverse = np.unique(names, return_inverse=True)
    return np.array([residue_kind(n) == kind for n in unique], bool)[inverse.reshape(-1)].reshape(names.shape)


def is_protein(names) -> np.ndarray:
    """Boolean array: which residue names are amino acids (`residue_kind(name) == "protein"`)."""
    return _kind_mask(names, "protein")


def is_nucleic(names) -> np.ndarray:
    """Boolean array: which residue names are nucleotides (`residue_kind(name) == "nucleic"`)."""
    return _kind_mask(names, "nucleic")


def is_water(names) -> np.ndarray:
    """Boolean array: which residue names are water (`residue_kind(name) == "water"`)."""
    return _kind_mask(names, "water")


def residue_groups(labels: AtomLabels, *, altloc: bool = True, name: bool = False) -> Int[np.ndarray, " n"]:
    """The residue of every atom: `(n,)` int32 group ids 0, 1, ... in order of first appearance.

    One group per chain, residue number and insertion code, and (with `altloc`) per alternate
    conformer: the atoms of conformer A, of conformer B and the residue's atoms without an altloc
    are three groups. Without `altloc` a residue's conformers are one group (as MapQ's and
    phenix.map_model_cc's per-residue numbers). With `name`, residues of different names at one
    chain, number and insertion code (microheterogeneity) are separate groups.

    **Arguments:**

    - `labels`: the model's `AtomLabels`.
    - `altloc`: whether alternate conformers are separate groups.
    - `name`: whether the residue name is part of a residue's identity.

    **Returns:** `(n,)` int32.
    """
    fields = [labels.chain, labels.residue_number, labels.insertion_code]
    if altloc:
        fields.append(labels.altloc)
    if name:
        fields.append(labels.residue_name)
    keys = np.rec.fromarrays([np.asarray(f).astype(str) for f in fields])
    if keys.size == 0:
        return np.zeros(0, np.int32)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)].astype(np.int32)


def group_members(groups: Int[np.ndarray, " n"], subset=None) -> list[Int[np.ndarray, " m"]]:
    """The atom indices of every group, groups in increasing id (for `residue_groups`: order of
    appearance), members in increasing index; groups without members are left out.

    **Arguments:**

    - `groups`: `(n,)` group id of every atom (e.g. from `residue_groups`).
    - `subset`: indices of the atoms to include (default all).

    **Returns:** a list of int arrays.
    """
    index = np.arange(len(groups)) if subset is None else np.asarray(subset, np.int64).reshape(-1)
    if index.size == 0:
        return []
    g = np.asarray(groups)[index]
    order = np.argsort(g, kind="stable")
    starts = np.flatnonzero(np.diff(g[order]))
    return np.split(index[order], starts + 1)
