"""Model-aware occupancy: per-atom (or per-residue) occupancy and blur fitted to a map with the model fixed.

OccuPy's local scale (`local_scale`) reads a map's local maximum, which falls both where a part of the
structure is partly occupied and where it is less well resolved (or more mobile): from the map alone the
two cannot be told apart (OccuPy's documentation says so). With a model the two differ in shape: a
partly occupied atom has the same width and a lower height, a blurred one a wider and lower image of the
same integral. `fit_occupancy` fits, by least squares of the model map to the map (the map scale and
offset fitted alongside), each group's occupancy together with its blur (one resolution D per group, the
shell-decomposition model map; or per-atom B), coordinates fixed: `modelmap.refine.refine` with
`parameters=("occ", "res")` (or `("occ", "b")`), no geometry restraints (nothing moves).

The least-squares map term has a free overall scale, so occupancies are relative: a map whose every atom
is at half occupancy fits as well with all occupancies 1. By default (`normalise=True`) the result is
divided by the 90th percentile of the fitted occupancies of the atoms inside the map, so the
best-occupied part reads 1 (as OccuPy's scale is normalised by a percentile, not the maximum: a few
noisy residues, or atoms outside the map that keep their start, do not set the scale), and clipped to
[0, 1]; `normalise=False` keeps the fit's values (absolute when the map is on the model map's scale).
Atoms outside the map keep their starting occupancy (nothing fits them): `atoms_outside` counts them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from jaxtyping import Array, Float

from .._atoms import Atoms
from .._errors import ModelmapError
from .._grid import Grid

__all__ = ["OccupancyFit", "fit_occupancy", "regional_map"]


NORMALISATION_QUANTILE = 0.9  # of the atoms' fitted occupancies: what reads as occupancy 1


class OccupancyFitError(ModelmapError):
    """Bad input to `fit_occupancy` (a parameter set, a group option or a map it cannot use)."""


@dataclasses.dataclass(frozen=True)
class OccupancyFit:
    """What `fit_occupancy` returns.

    **Fields:**

    - `occupancy`: `(n,)` fitted occupancies (normalised as asked; clipped to [0, 1] when normalised).
    - `b_factors`: `(n,)` B in Å² (the start where B was not fitted).
    - `resolution`: `(n,)` per-atom resolutions D in Å when fitted, else `None`.
    - `model`: the input `AtomicModel` with these occupancies and B (write it with `write_model`),
      or `None` when bare `Atoms` were given.
    - `normalisation`: what the fitted occupancies were divided by (1 when not normalised).
    - `atoms_outside`: atoms outside the map's box (they keep their starting occupancy).
    - `refinement`: the `RefineResult` (history, steps, time).
    """

    occupancy: np.ndarray
    b_factors: np.ndarray
    resolution: np.ndarray | None
    model: object | None
    normalisation: float
    atoms_outside: int
    refinement: object

    def summary(self) -> dict:
        """JSON-ready numbers."""
        occ = self.occupancy
        out = {"atoms": int(occ.size), "occupancy_mean": float(occ.mean()), "occupancy_min": float(occ.min()),
               "occupancy_max": float(occ.max()), "b_mean": float(self.b_factors.mean()),
               "normalisation": self.normalisation, "atoms_outside": self.atoms_outside, "steps": int(self.refinement.n_steps),
               "result": self.refinement.result, "time_s": float(self.refinement.time)}
        if self.resolution is not None:
            out["resolution_mean"] = float(self.resolution.mean())
        return out


def fit_occupancy(
    target,
    model,
    resolution: float,
    *,
    grid: Grid | None = None,
    blur: Literal["b", "res"] = "res",
    groups: Literal["residue", "atom"] | np.ndarray = "residue",
    resolutions: float | Float[Array, " n"] | None = None,
    normalise: bool = True,
    max_steps: int = 60,
    mask_radius: float | None = None,
    progress: bool = False,
    **options,
) -> OccupancyFit:
    """Per-group occupancy and per-atom blur fitted to a map by least squares, coordinates fixed.

    The model map is the exact finite-resolution map of the model (electron scattering, per-atom B and
    occupancy; with `blur="res"` the shell-decomposition map with a resolution per group); the loss is
    the least-squares misfit with a fitted scale and offset inside `mask_radius` of the atoms
    (`modelmap.refine.refine`, `loss="ls"`). Module docs for what the fit can tell apart.

    **Arguments:**

    - `target`: the map, a `DensityMap` or an `(nz, ny, nx)` array with `grid`.
    - `model`: an `AtomicModel` (needed for `groups="residue"`; `read_model`) or `Atoms`.
    - `resolution`: the map's resolution D in Å (the model map's; with `blur="res"` the start of the
      per-group resolutions unless `resolutions` is given).
    - `blur`: `"res"` (default) fits one resolution D per group (Å, within `d_margin` of its start,
      the shell-decomposition model map) beside the occupancies; `"b"` fits every atom's B (Å²)
      instead, with the Fourier model map at `resolution` (give the finest resolution in the map: B
      only blurs). On the synthetic map of `benchmarks/bench_analysis_occupancy.py` (regions at
      occupancy 1/0.7/0.5/0.3 and 5/3/4/3 Å) `"res"` recovers every region within 0.04 and `"b"`
      does not (errors 0.2-0.26, worse with more steps): a free B per atom trades against occupancy
      under the least-squares scale.
    - `groups`: `"residue"` (one occupancy per residue and alternate conformer), `"atom"`, or `(n,)`
      group ids.
    - `resolutions`: starting per-atom resolutions for `blur="res"` (default `resolution`).
    - `normalise`: divide occupancies by their 90th percentile over the atoms inside the map (module
      docs), so the best-occupied part reads 1.
    - `max_steps`: optimiser steps.
    - `mask_radius`: Å around the atoms where the map is fitted (default max(3 Å, D)).
    - `progress`: a progress bar on the terminal.
    - `options`: further `RefineConfig` fields (e.g. `b_bounds`, `d_margin`, `macro_cycles`).

    **Returns:** an `OccupancyFit`.
    """
    from ..refine import refine

    if blur not in ("b", "res"):
        raise OccupancyFitError(f"blur must be 'b' (per-atom B) or 'res' (per-group resolution), got {blur!r}")
    bad = {"parameters", "restraints"} & set(options)
    if bad:
        raise OccupancyFitError(f"fit_occupancy sets {sorted(bad)} itself (occupancy and blur, no restraints)")
    group_option = groups
    if isinstance(groups, str) and groups not in ("residue", "atom"):
        raise OccupancyFitError(f"groups must be 'residue', 'atom' or one id per atom, got {groups!r}")
    kwargs = dict(grid=grid, restraints=False, occupancy_groups=group_option, max_steps=max_steps,
                  mask_radius=mask_radius, progress=progress, **options)
    if blur == "res":
        kwargs["resolution_groups"] = group_option
        kwargs["resolutions"] = resolution if resolutions is None else resolutions
        params = ("occ", "res")
    else:
        params = ("occ", "b")
    result = refine(model, target, resolution, parameters=params, **kwargs)
    occ = np.asarray(result.atoms.occupancies, np.float64)
    map_grid = grid if grid is not None else getattr(target, "grid", None)
    inside = np.ones(occ.shape, bool) if map_grid is None else np.asarray(map_grid.contains(
        np.asarray(result.atoms.positions)), bool)
    norm = 1.0
    if normalise:
        norm = float(np.quantile(occ[inside], NORMALISATION_QUANTILE)) if inside.any() else 0.0
        if not norm > 0:
            raise OccupancyFitError("the fitted occupancies of the atoms inside the map are 0 or less: does the model "
                                    "lie in the map?")
        occ = np.clip(occ / norm, 0.0, 1.0)
    else:
        occ = np.maximum(occ, 0.0)
    b = np.asarray(result.atoms.b_factors, np.float64)
    res = None if result.resolution is None else np.asarray(result.resolution, np.float64)
    fitted = None
    if result.model is not None:
        a = result.model.atoms
        fitted = result.model.replace(atoms=Atoms(a.positions, a.atomic_numbers, a.b_factors, occ.astype(np.float32)))
    return OccupancyFit(occ, b, res, fitted, norm, int(np.sum(~inside)), result)


def regional_map(atoms: Atoms, grid: Grid, region, occupancies, resolutions) -> Float[Array, "nz ny nx"]:
    """A map whose regions have their own occupancy and resolution: the sum over regions of the exact
    finite-resolution Fourier map (`IndependentAtomVolume` + `NufftRenderFn`, cut at |s| ≤ 1/D_k) of the
    region's atoms at occupancy q_k. The synthetic truth for occupancy-versus-resolution tests.

    **Arguments:**

    - `atoms`: the model's atoms (their positions and B are kept; occupancies are replaced).
    - `grid`: the map's grid (its Nyquist limit must reach the finest resolution).
    - `region`: `(n,)` region index 0 … K−1 of every atom.
    - `occupancies`, `resolutions`: `(K,)` occupancy and resolution D (Å) of each region.

    **Returns:** the map `(nz, ny, nx)` (Å⁻², the electron table).
    """
    from ..render import NufftRenderFn
    from ..volumes import IndependentAtomVolume

    region = np.asarray(region)
    occupancies = np.asarray(occupancies, np.float64)
    resolutions = np.asarray(resolutions, np.float64)
    if region.shape != (atoms.n_atoms,) or len(occupancies) != len(resolutions) or region.min() < 0 \
            or region.max() >= len(occupancies):
        raise OccupancyFitError("region needs one index per atom into occupancies and resolutions (same lengths)")
    render = NufftRenderFn(grid)
    pos, z, b = (np.asarray(x) for x in (atoms.positions, atoms.atomic_numbers, atoms.b_factors))
    total = None
    for k in np.unique(region):
        sel = region == k
        part = Atoms(pos[sel], z[sel], b[sel], np.full(int(sel.sum()), occupancies[k], np.float32))
        m = render(IndependentAtomVolume.from_atoms(part, float(resolutions[k])))
        total = m if total is None else total + m
    return total
