"""All the scores of a model against a map in one call, as `modelmap score` reports them."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from .._atoms import validate_atoms
from .._progress import ProgressBar, progress_bar
from ..io import AtomicModel, DensityMap
from ._cc import LocalCC, MapModelCC, local_cc, map_model_cc
from ._fsc import fsc, fsc_resolution
from ._mask import model_mask
from ._mapq import expected_q, mapq_regrid
from ._q_aggregate import QScores
from ._qscore import q_score

__all__ = ["ScoreReport", "score_model"]


@dataclasses.dataclass(frozen=True)
class ScoreReport:
    """The scores of one model against one map.

    **Fields:**

    - `resolution`: D in Å used for the model map (and expected Q).
    - `cc`: `MapModelCC` (CC_mask, CC_box, CC_volume, CC_peaks, N_in).
    - `local`: `LocalCC` (per chain, per residue, main chain, side chain).
    - `q`: `QScores` (per atom; `per_residue()`, `per_chain()`, `mean()`).
    - `expected_q`: MapQ's expected protein Q at `resolution` for the Q's σ (NaN for a σ other
      than 0.6 or 0.4 Å, which MapQ has no fit for).
    - `fsc_s`, `fsc_values`: map vs model-map FSC inside the model mask (model map to the grid's
      Nyquist frequency), and `fsc_05` / `fsc_0143` the resolutions (Å) where it crosses 0.5 / 0.143.
    - `fraction_inside`: per chain, the fraction of its atoms inside the map's box (the scores
      see only those).
    """

    resolution: float
    cc: MapModelCC
    local: LocalCC
    q: QScores
    expected_q: float
    fsc_s: np.ndarray
    fsc_values: np.ndarray
    fsc_05: float
    fsc_0143: float
    fraction_inside: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """The headline numbers as a flat dict (JSON-ready)."""
        return {
            "resolution": self.resolution,
            "cc_mask": self.cc.cc_mask,
            "cc_box": self.cc.cc_box,
            "cc_volume": self.cc.cc_volume,
            "cc_peaks": self.cc.cc_peaks,
            "n_inside_mask": self.cc.n_inside,
            "cc_main_chain": self.local.main_chain,
            "cc_side_chain": self.local.side_chain,
            "local_cc_atom_radius": self.local.atom_radius,
            "q_mean": self.q.mean(),
            "q_sigma": self.q.sigma,
            "q_variant": self.q.variant,
            "q_expected": self.expected_q,
            "fsc_0.5": self.fsc_05,
            "fsc_0.143": self.fsc_0143,
        }

    def to_json(self) -> dict:
        """Everything: the summary, per chain (CC and Q), per residue and per atom."""
        labels = self.q.labels
        q_res = self.q.per_residue()
        cc_res = {(r.chain, r.residue_number, r.insertion_code, r.residue_name): r for r in self.local.residues}
        residues = []
        for key in dict.fromkeys(list(cc_res) + list(q_res)):
            rq, rc = q_res.get(key), cc_res.get(key)
            residues.append({
                "chain": key[0], "number": int(key[1]), "icode": key[2], "name": key[3],
                "cc": None if rc is None else _num(rc.cc),
                "q": None if rq is None else _num(rq.residue),
                "q_backbone": None if rq is None else _num(rq.backbone),
                "q_side_chain": None if rq is None else _num(rq.side_chain),
            })
        atoms = [
            {"chain": str(labels.chain[i]), "number": int(labels.residue_number[i]),
             "icode": str(labels.insertion_code[i]), "residue": str(labels.residue_name[i]),
             "name": str(labels.atom_name[i]), "altloc": str(labels.altloc[i]), "q": _num(self.q.q[i])}
            for i in range(len(labels))
        ]
        q_chain = self.q.per_chain()
        chains = [{"chain": c, "cc": _num(self.local.chains.get(c, math.nan)), "q": _num(q_chain.get(c, math.nan)),
                   "fraction_inside": _num(self.fraction_inside.get(c, math.nan))}
                  for c in dict.fromkeys(list(self.local.chains) + list(q_chain))]
        fsc_curve = [{"s": float(s), "fsc": float(f)} for s, f in zip(self.fsc_s, self.fsc_values)]
        return {"summary": {k: _num(v) for k, v in self.summary().items()}, "chains": chains,
                "residues": residues, "atoms": atoms, "fsc": fsc_curve}


def _num(v):
    """JSON-safe number: NaN and None become null."""
    if v is None or isinstance(v, str):
        return v
    v = float(v)
    return None if not math.isfinite(v) else v


def score_model(
    density_map: DensityMap,
    model: AtomicModel,
    resolution: float,
    *,
    sigma: float = 0.6,
    q_variant: str = "mapq",
    mapq_multiprocess: bool = False,
    table: str = "electron",
    progress: "bool | ProgressBar" = False,
) -> ScoreReport:
    """Score `model` against `density_map`: the CC family, local CC, Q-scores and FSC.

    The model map is the Fourier map at `resolution` on the map's grid (`map_model_cc`), rendered
    once and shared by the CCs; the FSC uses a second one cut at the grid's Nyquist frequency.

    **Arguments:**

    - `density_map`: the experimental map.
    - `model`: an `AtomicModel` (labels are needed for per-residue values).
    - `resolution`: D in Å.
    - `sigma`: Q-score reference width in Å (0.6, MapQ's default; 0.4 as EMDB reports).
    - `q_variant`: `"mapq"` or `"cctbx"` (see `q_score`).
    - `mapq_multiprocess`: score Q against the map as MapQ's multi-process mode re-grids it
      (`mapq_regrid`), to reproduce values published from such runs.
    - `table`: scattering table of the model maps.
    - `progress`: a progress bar on stderr, by stage and by Q-score shell, shown once the work has
      taken a second (for large models); or a caller's `ProgressBar` to tick.

    **Returns:** a `ScoreReport`.
    """
    from ..render import render_model

    if not (isinstance(resolution, (int, float)) and math.isfinite(resolution) and resolution > 0):
        raise ValueError(f"the resolution must be a positive number of Å, got {resolution!r}")
    atoms = validate_atoms(model.atoms, str(model.path) if getattr(model, "path", None) else "model",
                           getattr(model, "labels", None))
    if atoms.is_ensemble:
        raise ValueError("score one model at a time (this file has several models)")
    grid = density_map.grid
    inside = fraction_inside(grid, atoms.positions, model.labels.chain)
    with progress_bar(progress, "score", 5) as bar:
        bar.describe("model map")
        model_map = np.asarray(render_model(atoms, grid, resolution, method="fourier", sampling="point", table=table))
        bar.advance()
        bar.describe("mask and CC")
        mask = model_mask(atoms, grid)
        cc = map_model_cc(density_map, model, resolution, model_map=model_map, mask=mask)
        bar.advance()
        bar.describe("local CC")
        local = local_cc(density_map, model, resolution, model_map=model_map)
        bar.advance()
        bar.describe("Q-score")
        q_map = mapq_regrid(density_map, model) if mapq_multiprocess else density_map
        q = q_score(q_map, model, sigma=sigma, variant=q_variant, progress=bar)
        bar.advance()
        bar.describe("FSC")
        nyquist = 2 * max(grid.voxel_size)
        sharp_map = np.asarray(render_model(atoms, grid, nyquist, method="fourier", sampling="point", table=table))
        s, f = fsc(np.asarray(density_map.data), sharp_map, mask=mask, grid=grid)
        bar.advance()
    expected = float(expected_q(resolution, sigma=sigma)) if sigma in (0.6, 0.4) else math.nan
    return ScoreReport(
        resolution=float(resolution), cc=cc, local=local, q=q, expected_q=expected,
        fsc_s=s, fsc_values=f, fsc_05=fsc_resolution(s, f, 0.5), fsc_0143=fsc_resolution(s, f, 0.143),
        fraction_inside=inside,
    )


# below this fraction of a chain's atoms inside the map's box, its scores describe a fragment
_INSIDE_WARNING = 0.9


def fraction_inside(grid, positions, chains) -> dict[str, float]:
    """The fraction of each chain's atoms inside `grid`'s box.

    Warns (one warning naming every chain's fraction) when a chain has under 90 % of its atoms
    inside: the scores see only the atoms inside, e.g. a whole model scored against a crop around
    one of its chains.

    **Arguments:**

    - `grid`: the map's `Grid`.
    - `positions`: `(n, 3)` atom positions in Å.
    - `chains`: `(n,)` chain names.

    **Returns:** chain name → fraction of its atoms inside, in the chains' order.
    """
    inside = grid.contains(positions)
    chains = np.asarray(chains)
    per_chain = {str(c): float(inside[chains == c].mean()) for c in dict.fromkeys(chains.tolist())}
    if min(per_chain.values()) < _INSIDE_WARNING:
        listed = ", ".join(f"{c} {100 * f:.0f} %" for c, f in per_chain.items())
        warnings.warn(
            f"only {int(inside.sum())} of {inside.size} atoms ({100 * inside.mean():.0f} %) lie inside the map's "
            f"box, so the scores describe only those; inside per chain: {listed}", stacklevel=3)
    return per_chain
