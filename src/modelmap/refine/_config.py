"""`RefineConfig`: how a refinement runs, with defaults and validation in one place."""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["PARAMETERS", "RefineConfig"]

PARAMETERS = ("xyz", "b", "occ", "res", "rigid")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """How `refine` runs (a frozen dataclass: make variants with `dataclasses.replace`, or pass
    fields as keywords to `refine`). Every field is checked when the config is made.

    **Fields:**

    - `parameters`: any of `"xyz"`, `"b"`, `"occ"`, `"res"` (per-atom resolution), `"rigid"` (one
      rigid body per chain, or per `rigid_groups` of `refine`).
    - `loss`: `"ls"` (least squares with a fitted scale and offset), `"cc"` (1 − CC) or `"q"`
      (1 − mean differentiable Q-score; coordinates only).
    - `max_steps`: accepted optimiser steps in all.
    - `macro_cycles`: compiled runs the steps are split into; between them (on the host) the
      non-bonded contacts are rebuilt, render plans widened for B that reached them, and the map
      weight lowered when the geometry is outside `max_bond_rmsd` / `max_angle_rmsd`.
    - `rtol`: a step that lowers the objective by less than `rtol` × |objective| is quiet; three
      quiet steps in a row end a run (converged).
    - `map_weight`: `"auto"` (module docs of `modelmap.refine._refine`) or a fixed w.
    - `weight_scale`: multiplies the automatic w. 0.4 by default, measured on 7CEC chain A (200
      steps) against EMD-30342: 0.4 gave CC_mask 0.880, mean Q 0.476, 4 contacts under 2.2 Å (the
      deposited model's 4), bonds 0.008 Å, angles 1.40°, 2 backbone atoms moved > 3 Å; 0.5 gave
      0.892, 0.482, 11 contacts, 0.013 Å, 2.14°, 8 backbone atoms (the same code, 2026-12-06;
      servalcat: 0.847, 0.456, 11 contacts); 1.0 let the map pull atoms into noise (angle rmsd 3.4°
      after the first cycle, 30+ clashes). Against a noise-free synthetic map (xyz + B from a
      0.3 Å / 15 Å² perturbed start, 250 steps) 0.4 reached coordinate rmsd 0.091 Å and B RMSE
      2.2 Å² (criteria rmsd ≤ 0.2 Å, B r ≥ 0.98 from step 27; 0.5: step 26).
    - `max_bond_rmsd` (Å), `max_angle_rmsd` (°): the geometry the automatic weight keeps.
    - `b_bounds`: physical bounds of B in Å² (every atom stays within them, nothing else bounds B).
    - `d_bounds`: bounds of per-atom resolutions in Å.
    - `d_margin`: Å; per-atom resolutions stay within this of their start (and the resolution scan
      searches this range).
    - `b_window`: Å²; a cost knob, not a bound: the render windows first hold B up to
      `B + b_window` of every atom; a run stops when an atom reaches it, every atom is re-planned
      around its B then (without recompiling where the new windows fit the compiled ones; an atom
      whose B rose by more than half its room gets twice the room), so B goes anywhere within
      `b_bounds`.
    - `table`: scattering table, `"electron"` or `"xray"`.
    - `n_terms`: shell terms K of the shell model map (default of `ShellDecompositionVolume`).
    - `q_sigma`: σ (Å) of the Q loss.
    - `progress_every`: steps between progress reports (progress bar, `callback`).
    """

    parameters: tuple[str, ...] = ("xyz", "b")
    loss: Literal["ls", "cc", "q"] = "ls"
    max_steps: int = 200
    macro_cycles: int = 3
    rtol: float = 1e-7
    map_weight: float | Literal["auto"] = "auto"
    weight_scale: float = 0.4
    max_bond_rmsd: float = 0.02
    max_angle_rmsd: float = 2.5
    b_bounds: tuple[float, float] = (1.0, 500.0)
    d_bounds: tuple[float, float] = (1.5, 9.5)
    d_margin: float = 2.0
    b_window: float = 60.0
    table: str = "electron"
    n_terms: int | None = None
    q_sigma: float = 0.6
    progress_every: int = 5

    def __post_init__(self):
        params = tuple(dict.fromkeys((self.parameters,) if isinstance(self.parameters, str) else self.parameters))
        object.__setattr__(self, "parameters", params)
        unknown = [p for p in params if p not in PARAMETERS]
        if unknown or not params:
            raise ValueError(f"parameters must name some of {PARAMETERS}, got {params}")
        if self.loss not in ("ls", "cc", "q"):
            raise ValueError(f"loss must be 'ls', 'cc' or 'q', got {self.loss!r}")
        if self.loss == "q" and set(params) - {"xyz", "rigid"}:
            raise ValueError("the Q loss depends on coordinates only: refine xyz and/or rigid with it")
        if self.max_steps < 1 or self.macro_cycles < 1 or self.progress_every < 1:
            raise ValueError("max_steps, macro_cycles and progress_every must be >= 1")
        if not 0 < self.rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {self.rtol}")
        if self.map_weight != "auto" and not (isinstance(self.map_weight, (int, float)) and self.map_weight > 0):
            raise ValueError(f"map_weight must be 'auto' or a positive number, got {self.map_weight!r}")
        if not self.weight_scale > 0:
            raise ValueError(f"weight_scale must be > 0, got {self.weight_scale}")
        lo, hi = self.b_bounds
        if not 0 < lo < hi:
            raise ValueError(f"b_bounds must be (lowest, highest) B with 0 < lowest < highest Å², got {self.b_bounds}")
        lo, hi = self.d_bounds
        if not 0 < lo < hi:
            raise ValueError(f"d_bounds must be (finest, coarsest) D in Å with 0 < finest < coarsest, got {self.d_bounds}")
        if not (self.b_window > 0 and self.d_margin >= 0):
            raise ValueError("b_window must be > 0 Å² and d_margin >= 0 Å")
        if self.table not in ("electron", "xray"):
            raise ValueError(f"table must be 'electron' or 'xray', got {self.table!r}")
        if not self.q_sigma > 0:
            raise ValueError(f"q_sigma must be > 0 Å, got {self.q_sigma}")
