"""What a refinement reports: `RefineResult`, the geometry checks users look at first, progress.

Beside bond and angle rmsd (which look fine while a model is broken), the report counts what a
structural biologist checks first: **clashes** (heavy-atom pairs closer than 2.2 Å that are not
bonded and not 1-3 neighbours through a bond, as in the issue's comparison with servalcat; a
deposited model has almost none) and the **largest moves** of atoms from the start, the backbone
(N, CA, C, O) apart.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .._atoms import Atoms
from ..io import AtomicModel

__all__ = ["RefineResult", "clashes", "largest_moves", "geometry_report"]

BACKBONE = ("N", "CA", "C", "O")
CLASH_DISTANCE = 2.2  # Å


def clashes(positions: np.ndarray, atomic_numbers: np.ndarray, bond_index: np.ndarray | None,
            altloc: np.ndarray | None = None, cutoff: float = CLASH_DISTANCE) -> np.ndarray:
    """Heavy-atom (Z > 1) pairs `(i, j, d)` closer than `cutoff` Å that are neither bonded (1-2) nor
    1-3 neighbours in the bond graph `bond_index` `(nb, 2)` (no exclusions when `None`), nor in
    different alternate conformers. Returns an `(k, 3)` float array sorted by distance."""
    from scipy.spatial import cKDTree

    from ._neighbours import non_excluded

    pos = np.asarray(positions, np.float64)
    heavy = np.flatnonzero(np.asarray(atomic_numbers) > 1)
    if len(heavy) < 2:
        return np.zeros((0, 3))
    pairs = cKDTree(pos[heavy]).query_pairs(cutoff, output_type="ndarray")
    if not len(pairs):
        return np.zeros((0, 3))
    pairs = np.sort(heavy[pairs], axis=1)
    pairs, _ = non_excluded(pairs, len(pos), None if bond_index is None else np.asarray(bond_index), altloc)
    d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=-1)
    out = np.column_stack([pairs.astype(np.float64), d]).reshape(-1, 3)
    return out[np.argsort(out[:, 2])]


def largest_moves(start: np.ndarray, end: np.ndarray, labels=None, threshold: float = 3.0) -> dict:
    """Displacements `|end − start|` (Å): the largest, how many atoms (and backbone atoms, with
    labels) moved more than `threshold` Å, and the backbone atoms that did (labelled)."""
    d = np.linalg.norm(np.asarray(end, np.float64) - np.asarray(start, np.float64), axis=-1)
    out = {"max_shift": float(d.max(initial=0.0)), "mean_shift": float(d.mean()) if d.size else 0.0,
           f"atoms_moved_over_{threshold:g}": int(np.sum(d > threshold))}
    if labels is not None:
        backbone = np.isin(np.asarray(labels.atom_name), BACKBONE) & ~np.asarray(labels.is_hetero, bool)
        moved = np.flatnonzero(backbone & (d > threshold))
        out[f"backbone_moved_over_{threshold:g}"] = [f"{labels.atom_id(i)} {d[i]:.2f}" for i in moved[np.argsort(-d[moved])]]
        top = np.argsort(-d)[:5]
        out["largest"] = [f"{labels.atom_id(i)} {d[i]:.2f}" for i in top]
    return out


def geometry_report(restraints, start: np.ndarray, end: np.ndarray, atomic_numbers, labels=None) -> dict:
    """Bond/angle rmsd, clashes under 2.2 Å and moves of the refined coordinates `end` (Å)."""
    out = {}
    if restraints is not None:
        summary = restraints.summary(end)
        out["bond_rmsd"] = summary["bond_rmsd"]
        out["angle_rmsd"] = summary["angle_rmsd"]
        bonds = np.asarray(restraints.bond_index)
    else:
        bonds = None
    altloc = None if labels is None else np.asarray(labels.altloc)
    found = clashes(end, atomic_numbers, bonds, altloc)
    out["clashes_under_2.2"] = int(len(found))
    out["clashes_at_start"] = int(len(clashes(start, atomic_numbers, bonds, altloc)))
    if labels is not None and len(found):
        out["worst_clashes"] = [f"{labels.atom_id(int(i))} - {labels.atom_id(int(j))} {d:.2f}" for i, j, d in found[:5]]
    out.update(largest_moves(start, end, labels))
    return out


@dataclasses.dataclass
class RefineResult:
    """What `refine` returns.

    **Fields:**

    - `atoms`: the refined `Atoms` (positions Å, B Å², occupancies).
    - `resolution`: `(n,)` refined per-atom resolutions in Å, or `None` when none were refined.
    - `model`: the input `AtomicModel` with the refined atoms (write it with `write_model`), or
      `None` when `Atoms` were given.
    - `history`: per accepted step, numpy arrays `step`, `loss` (the objective), `map_loss`,
      `geometry` (E_geom), `bond_rmsd` (Å), `angle_rmsd` (°), `map_weight`, `cycle` (the compiled
      run it belongs to).
    - `result`: `"converged"` (the last run ended with `rtol`'s quiet steps), `"max_steps"` or
      `"nonfinite"` (stopped at the last finite point).
    - `n_steps`: accepted optimiser steps; `n_evaluations`: objective evaluations (line-search
      trials included).
    - `map_weight`: the weight w of the last run.
    - `mask`: the boolean refinement mask `(nz, ny, nx)`.
    - `geometry`: `geometry_report` of the result (bond/angle rmsd, clashes under 2.2 Å at the
      start and end, largest moves).
    - `monomer_library`: where the restraints' dictionary came from.
    - `events`: what happened between compiled runs (contact rebuilds, re-plans, weight changes).
    - `time`: wall-clock seconds, compilation included.
    """

    atoms: Atoms
    resolution: np.ndarray | None
    model: AtomicModel | None
    history: dict[str, np.ndarray]
    result: str
    n_steps: int
    n_evaluations: int
    map_weight: float
    mask: np.ndarray
    geometry: dict
    monomer_library: str | None
    events: list
    time: float

    def summary(self) -> str:
        """One paragraph: result, steps, the map loss and the geometry before and after."""
        h = self.history
        if not len(h["step"]):
            return f"{self.result}: no steps"
        g = self.geometry
        bits = [f"{self.result} after {self.n_steps} steps ({self.time:.1f} s)",
                f"map loss {h['map_loss'][0]:.4f} -> {h['map_loss'][-1]:.4f}"]
        if "bond_rmsd" in g:
            bits.append(f"bond rmsd {h['bond_rmsd'][0]:.4f} -> {g['bond_rmsd']:.4f} Å, "
                        f"angle rmsd {h['angle_rmsd'][0]:.2f} -> {g['angle_rmsd']:.2f}°")
        bits.append(f"clashes < 2.2 Å {g['clashes_at_start']} -> {g['clashes_under_2.2']}")
        bits.append(f"max shift {g['max_shift']:.2f} Å")
        return ", ".join(bits)


class Progress:
    """A rich progress bar (step, map loss, bond and angle rmsd) fed by the solver's host callback,
    or nothing."""

    def __init__(self, enabled: bool, total: int):
        self._p = None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as _P, TextColumn, TimeElapsedColumn
        except ImportError:  # pragma: no cover - rich comes with typer
            return
        self._p = _P(TextColumn("refine"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     TextColumn("{task.fields[info]}"), transient=False)
        self._task = self._p.add_task("refine", total=total, info="")
        self._p.start()

    @property
    def enabled(self) -> bool:
        return self._p is not None

    def update(self, step, value, aux):
        if self._p is None:
            return
        bond, angle = float(aux["bond_rmsd"]), float(aux["angle_rmsd"])
        geo = "" if math.isnan(bond) else f"  bonds {bond:.4f} Å  angles {angle:.2f}°"
        self._p.update(self._task, completed=min(int(step), self._p.tasks[0].total),
                       info=f"map loss {float(aux['map_loss']):.4f}{geo}")

    def close(self):
        if self._p is not None:
            self._p.stop()
