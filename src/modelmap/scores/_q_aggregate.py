"""Q-score results and MapQ's aggregations (`QStats1`, `SaveQStats`): model, chain and residue
means, with the residue split into backbone / side chain (protein) or phosphate / sugar / base
(nucleic acids). Residue kinds and groups come from `modelmap._residues`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .._atoms import AtomLabels
from .._errors import ModelmapError
from .._residues import group_members, residue_groups, residue_kind

__all__ = ["ResidueQ", "ResidueKey", "QScores"]

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
