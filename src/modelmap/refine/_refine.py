"""Real-space refinement: gradient descent on a map term plus geometry restraints.

The objective, for the refined parameters p (any of coordinates, B, occupancies, per-atom
resolutions and a rigid-body motion per chain):

    E(p) = w · n · L_map(p) + E_geom(p),

where L_map is a map term from `modelmap.refine._loss` over a mask around the starting model
(least squares with a fitted scale and offset, 1 − CC, or 1 − mean Q), n the number of atoms (so
that w · n · L_map reads as a sum over atoms like the restraints), E_geom the restraint energy of
`Restraints.energy` (dimensionless, Σ (Δ/σ)²), and w the map weight.

**The model map.** With a single resolution D the model map is the Fourier map at D
(`SplatFourierRenderFn`: the exact hard-sphere Fourier map, as phenix.map_model_cc and
servalcat compute it, to 1e-4); with per-atom resolutions (`"res"` refined, or a per-atom start) it
is the shell decomposition (`ShellRenderFn`, Urzhumtsev & Lunin), the only renderer whose atoms each
have their own resolution.

**Automatic weighting.** As phenix.refine weighs data against restraints (Afonine et al. 2011,
*Acta Cryst.* D67, 2011; "wxc"), w is set so that the gradients of the two terms have equal norms:
w = `weight_scale` · |∇E_geom| / |∇(n L_map)| over the refined parameters, at the start of every
macro-cycle (after which the L-BFGS memory restarts and the neighbour list is rebuilt). If a
macro-cycle ends with a bond rmsd above `max_bond_rmsd` or an angle rmsd above `max_angle_rmsd`, the
next cycle's w is at most a third of it (and up to two shorter cycles are added at the end until the
geometry holds), as Phenix's weight search lowers the data weight when geometry degrades. A number
given as `map_weight` is used as is.

**Parameters** are scaled to comparable units before the optimiser sees them: 1 Å for
coordinates and rigid-body translations, 1 Å at the chain's radius of gyration for rotations,
10 Å² for B, 0.1 for occupancies and 0.3 Å for resolutions (per-atom for coordinates, B and
occupancy: see `_units`). Occupancies and resolutions are refined per atom, or per group
(`occupancy_groups`, `resolution_groups`; as phenix.refine refines whole residues or alternate
conformers): one shift per group, added to the starting value of each of its atoms, in a unit that
gives every group the map curvature of a median atom (`_group_units`); at 3 Å and B ~100 Å² bonded
atoms' occupancies (or resolutions) are nearly indistinguishable in the map, and a group's are well
determined. B and resolution are clipped into
their bounds (`b_bounds` and `d_bounds`, within `b_margin`/`d_margin` of the start) where the atoms
are built, with a quadratic penalty outside that brings them back; occupancies are not clipped but
penalized outside [0, 1]; both penalties are matched to the map term's stiffness (`_bound_penalty`),
and occupancies are returned clipped into [0, 1]. Their restraints (B similarity along bonds,
alternate conformers summing to 1, resolution bounds) are part of E_geom.

**The optimiser.** L-BFGS (the default) takes optax's L-BFGS direction and a strong-Wolfe line
search run from Python, so that the objective's value and gradient are compiled once and every
trial step reuses them; Adam and optimistix's BFGS / L-BFGS are the alternatives (`solver`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Literal, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from .._atoms import Atoms, validate_atoms
from .._grid import Grid
from ..io import AtomicModel, DensityMap
from ..io._map import map_array
from ..render import ShellRenderFn, SplatFourierRenderFn
from ..scattering import get_table
from ..scores import atom_neighbourhood_mask, select_probes
from ..shells import D_RANGE
from ..volumes import IndependentAtomVolume, ShellDecompositionVolume
from ._loss import least_squares_loss, cc_loss, q_loss
from ._restraints import Restraints, build_restraints
from ._scan import scan_start

__all__ = ["PARAMETERS", "RefineResult", "refine"]

PARAMETERS = ("xyz", "b", "occ", "res", "rigid")
_UNITS = {"xyz": 1.0, "b": 10.0, "occ": 0.1, "res": 0.3}
_SOLVERS = ("lbfgs", "adam", "optx-lbfgs", "bfgs")
_DENSE_LIMIT = 3000  # parameters: the most a dense-Hessian solver (BFGS) is allowed


@dataclasses.dataclass
class RefineResult:
    """What `refine` returns.

    **Fields:**

    - `atoms`: the refined `Atoms` (positions Å, B Å², occupancies).
    - `resolutions`: `(n,)` refined per-atom resolutions in Å, or `None` when none were refined.
    - `model`: the input `AtomicModel` with the refined atoms (write it with `write_model`), or
      `None` when `Atoms` were given.
    - `history`: per step, numpy arrays `step`, `loss` (the objective), `map_loss`, `cc` (the map
      CC over the refinement mask: for the least-squares and CC losses), `mean_q` (for the Q loss),
      `bond_rmsd` (Å), `angle_rmsd` (°), `map_weight`, `time` (s since the start).
    - `result`: `"converged"` (relative decrease of the objective below `tol`), `"max_steps"` or
      `"nonfinite"` (stopped at the last finite point).
    - `n_steps`: optimiser steps taken.
    - `map_weight`: the weight w of the last macro-cycle.
    - `mask`: the boolean refinement mask `(nz, ny, nx)`.
    """

    atoms: Atoms
    resolutions: np.ndarray | None
    model: AtomicModel | None
    history: dict[str, np.ndarray]
    result: str
    n_steps: int
    map_weight: float
    mask: np.ndarray

    def summary(self) -> str:
        h = self.history
        first, last = 0, len(h["step"]) - 1
        if last < 0:
            return f"{self.result}: no steps"
        # the map score the loss followed: CC (least squares, 1 − CC) or mean Q (the Q loss)
        name, score = ("mean Q", h["mean_q"]) if np.isnan(h["cc"][last]) else ("CC", h["cc"])
        return (
            f"{self.result} after {self.n_steps} steps ({h['time'][last]:.1f} s): "
            f"{name} {score[first]:.4f} -> {score[last]:.4f}, bond rmsd {h['bond_rmsd'][first]:.4f} -> "
            f"{h['bond_rmsd'][last]:.4f} Å, angle rmsd {h['angle_rmsd'][first]:.2f} -> {h['angle_rmsd'][last]:.2f}°"
        )


class _Static(eqx.Module):
    """Everything the objective needs that is fixed for a refinement (hashable by identity)."""

    render_fn: eqx.Module
    loss: str = eqx.field(static=True)
    n_atoms: int = eqx.field(static=True)
    use_geometry: bool = eqx.field(static=True)
    restrain_xyz: bool = eqx.field(static=True)
    restrain_b: bool = eqx.field(static=True)
    restrain_occ: bool = eqx.field(static=True)
    restrain_res: bool = eqx.field(static=True)
    q_sigma: float = eqx.field(static=True)


class _Args(eqx.Module):
    """The arrays of the objective (traced: changing them does not recompile)."""

    positions: Float[Array, "n 3"]
    atomic_numbers: Array  # what the renderer indexes its table with (Z, or the shell table's index)
    z: Array  # atomic numbers Z
    b_factors: Float[Array, " n"]
    occupancies: Float[Array, " n"]
    resolutions: Float[Array, " n"] | None
    groups: Array  # (n,) rigid-body group of each atom
    centres: Float[Array, "g 3"]
    radii: Float[Array, " g"]
    unit_xyz: Float[Array, " n"]
    unit_b: Float[Array, " n"]
    unit_occ: Float[Array, " n"]  # per atom: the bound penalty's unit
    occ_groups: Array  # (n,) occupancy parameter of each atom (arange(n) for per-atom occupancies)
    unit_occ_group: Float[Array, " q"]  # the unit of each occupancy parameter
    res_groups: Array  # (n,) resolution parameter of each atom
    unit_res_group: Float[Array, " r"]  # the unit (Å) of each resolution parameter
    d_lo: Float[Array, " n"] | None
    d_hi: Float[Array, " n"] | None
    b_lo: Float[Array, " n"]
    b_hi: Float[Array, " n"]
    target: Float[Array, "nz ny nx"]
    mask: Array
    restraints: Restraints | None
    weight: Float[Array, ""]
    penalty: Float[Array, ""]  # 1, or 0 to leave `_bound_penalty` out (`_gradient_norms`)
    probes: object | None
    table: object
    grid: Grid = eqx.field(static=True)


def _rotation(v: Float[Array, "g 3"]) -> Float[Array, "g 3 3"]:
    """Rodrigues' rotation matrices of rotation vectors `v` (radians), smooth at 0."""
    theta2 = jnp.sum(v * v, -1)
    safe = jnp.where(theta2 > 1e-12, theta2, 1.0)
    theta = jnp.sqrt(safe)
    a = jnp.where(theta2 > 1e-12, jnp.sin(theta) / theta, 1.0 - theta2 / 6)
    b = jnp.where(theta2 > 1e-12, (1 - jnp.cos(theta)) / safe, 0.5 - theta2 / 24)
    z = jnp.zeros_like(v[:, 0])
    k = jnp.stack([
        jnp.stack([z, -v[:, 2], v[:, 1]], -1),
        jnp.stack([v[:, 2], z, -v[:, 0]], -1),
        jnp.stack([-v[:, 1], v[:, 0], z], -1),
    ], -2)
    eye = jnp.eye(3, dtype=v.dtype)
    return eye + a[:, None, None] * k + b[:, None, None] * (k @ k)


def _shifted(u: dict, args: _Args) -> dict:
    """The refined B, occupancies and resolutions before any clip: start + shift × unit (one shift
    per group for occupancies and resolutions), in the model's dtype (an optimiser's line search
    may step in float64 under x64)."""
    u = {k: v.astype(args.positions.dtype) for k, v in u.items()}
    out = {}
    if "b" in u:
        out["b"] = args.b_factors + u["b"] * args.unit_b
    if "occ" in u:
        out["occ"] = args.occupancies + (u["occ"] * args.unit_occ_group)[args.occ_groups]
    if "res" in u:
        out["res"] = args.resolutions + (u["res"] * args.unit_res_group)[args.res_groups]
    return out


def _build(u: dict, args: _Args, static: _Static):
    """(positions, B, occupancies, resolutions) from the scaled parameters `u`."""
    pos, b, occ, res = args.positions, args.b_factors, args.occupancies, args.resolutions
    raw = _shifted(u, args)
    u = {k: v.astype(pos.dtype) for k, v in u.items()}
    if "xyz" in u:
        pos = pos + u["xyz"] * args.unit_xyz[:, None]
    if "rigid" in u:
        rot = _rotation(u["rigid"][:, :3] / args.radii[:, None])
        shift = u["rigid"][:, 3:]
        c = args.centres[args.groups]
        pos = jnp.einsum("nij,nj->ni", rot[args.groups], pos - c) + c + shift[args.groups]
    if "b" in raw:
        b = jnp.clip(raw["b"], args.b_lo, args.b_hi)
    if "occ" in raw:
        # not clipped: most occupancies sit at their bound 1, where a clip's kink stalls L-BFGS; the
        # bound penalty keeps them within [0, 1] instead
        occ = raw["occ"]
    if "res" in raw:
        res = jnp.clip(raw["res"], args.d_lo, args.d_hi)
    return pos, b, occ, res


def _model_map(pos, b, occ, res, args: _Args, static: _Static):
    if isinstance(static.render_fn, ShellRenderFn):
        return static.render_fn(_shell_volume(pos, b, occ, res, args, static))
    d = jnp.asarray(static.render_fn.resolution_range[0], pos.dtype)
    vol = IndependentAtomVolume(pos, b, occ, d, args.atomic_numbers, args.table)
    return static.render_fn(vol)


def _shell_volume(pos, b, occ, res, args: _Args, static: _Static):
    table, n_terms = args.table
    return ShellDecompositionVolume(pos, b, occ, res, args.atomic_numbers, table, n_terms)


def _map_loss(u, args: _Args, static: _Static):
    pos, b, occ, res = _build(u, args, static)
    if static.loss == "q":
        return q_loss(args.target, args.grid, pos, args.probes, static.q_sigma)
    m = _model_map(pos, b, occ, res, args, static)
    fn = least_squares_loss if static.loss == "ls" else cc_loss
    return fn(m, args.target, args.mask)


def _geometry(u, args: _Args, static: _Static):
    if not static.use_geometry:
        return jnp.zeros((), args.positions.dtype)
    pos, b, occ, res = _build(u, args, static)
    r = args.restraints
    terms = r.energy_terms(
        pos,
        b if static.restrain_b else None,
        # clipped: the bounds [0, 1] are `_bound_penalty`'s (scaled to the map term); the restraint's
        # own bound term (σ 0.01) would be a wall ~10⁴ times stiffer than the map's curvature
        jnp.clip(occ, 0.0, 1.0) if static.restrain_occ else None,
        res if static.restrain_res else None,
    )
    if not static.restrain_xyz:
        terms = {k: v for k, v in terms.items() if k in ("b_similarity", "occupancy", "resolution")}
    total = jnp.zeros((), args.positions.dtype)
    for v in terms.values():
        total = total + v
    return total


def _bound_penalty(u, args: _Args, static: _Static):
    """w Σ ((p − clip(p)) / unit)² over B, occupancies and resolutions (w the map weight): 0
    inside the bounds. Where `_build` clips B or a resolution into its bounds, the map's gradient
    vanishes and this term brings the parameter back; occupancies are not clipped (most sit at their
    bound 1), so for them the penalty is the bound.

    Its stiffness follows the map term's: in the scaled units (alike for every atom or group) the
    map term w n L_map has a curvature of about 0.01–0.02 w per occupancy (measured on 7CEC), and
    this penalty 2 w, ~100 times stiffer. An occupancy overshoots its bound by about g / 2w units
    (g its map gradient; ~10⁻³ in occupancy, none at a perfect fit); a clipped B or resolution
    settles at its bound. A wall 10⁵–10⁶ times stiffer than the data (n Σ) scaled L-BFGS's curvature
    estimates to the wall: line searches failed whenever one atom reached a bound (7CEC B alone:
    ~10 trial steps each) and occupancy refinement stalled (56 % instead of 100 % of the
    half-occupancy atoms within ±0.1 after 200 steps)."""
    dt = args.positions.dtype
    total = jnp.zeros((), dt)
    bounds = {"b": (args.b_lo, args.b_hi, args.unit_b), "occ": (0.0, 1.0, args.unit_occ),
              "res": (args.d_lo, args.d_hi, _UNITS["res"])}
    for name, raw in _shifted(u, args).items():
        lo, hi, unit = bounds[name]
        total = total + jnp.sum(((raw - jnp.clip(raw, lo, hi)) / unit) ** 2)
    return (args.weight * args.penalty).astype(dt) * total


def _objective(u, args: _Args, static: _Static):
    return (args.weight * static.n_atoms * _map_loss(u, args, static) + _geometry(u, args, static)
            + _bound_penalty(u, args, static))


def _gradient_norms(u, args: _Args, static: _Static) -> tuple[float, float]:
    """(|∇(n L_map)|, |∇E_geom|) at `u`, from two calls of the compiled `_value_and_grad` (map
    weight 1 and 0, bound penalty left out) rather than a compilation of their own: the map term's
    gradient is the difference (float32 rounding ~1e-7 of |∇E_geom| per component)."""
    off = eqx.tree_at(lambda a: (a.weight, a.penalty), args, (jnp.ones_like(args.weight), jnp.zeros_like(args.penalty)))
    _, g1 = _value_and_grad(u, off, static)
    _, g0 = _value_and_grad(u, eqx.tree_at(lambda a: a.weight, off, jnp.zeros_like(args.weight)), static)
    leaves1, leaves0 = (jax.tree_util.tree_leaves(g) for g in (g1, g0))
    gm = math.sqrt(sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
                       for a, b in zip(leaves1, leaves0)))
    gg = math.sqrt(sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in leaves0))
    return gm, gg


@eqx.filter_jit
def _metrics(u, args: _Args, static: _Static):
    """(E_geom, bond rmsd Å, angle rmsd °) at `u`."""
    pos, *_ = _build(u, args, static)
    e = _geometry(u, args, static) + _bound_penalty(u, args, static)
    if args.restraints is None:
        nan = jnp.full((), jnp.nan, pos.dtype)
        return e, nan, nan
    return e, args.restraints.bond_rmsd(pos), args.restraints.angle_rmsd(pos)


@eqx.filter_jit
def _optax_step(u, state, args: _Args, static: _Static, opt):
    """One Adam step: (new u, new state, objective at u)."""
    value, grad = jax.value_and_grad(lambda p: _objective(p, args, static))(u)
    updates, state = opt.tx.update(grad, state, u)
    return jax.tree_util.tree_map(lambda p, d: (p + d).astype(p.dtype), u, updates), state, value


@eqx.filter_jit
def _value_and_grad(u, args: _Args, static: _Static):
    """The objective and its gradient: the one compiled model-map evaluation of an L-BFGS run."""
    return jax.value_and_grad(_objective)(u, args, static)


@eqx.filter_jit
def _lbfgs_direction(grad, state, u, opt):
    """(direction d = −P g, new memory, slope g·d)."""
    d, state = opt.tx.update(grad, state, u)
    d = jax.tree_util.tree_map(lambda g, x: x.astype(g.dtype), grad, d)
    return d, state, optax.tree.vdot(grad, d)


class _LBFGS(eqx.Module):
    """optax's L-BFGS direction (`optax.lbfgs` without its line search), with the strong-Wolfe
    line search of `_line_search` run from Python (`_run_lbfgs`), at most `max_trials` trials."""

    tx: optax.GradientTransformation = eqx.field(static=True)
    max_trials: int = eqx.field(static=True, default=10)


class _Adam(eqx.Module):
    tx: optax.GradientTransformation = eqx.field(static=True)


def _as_inputs(model, target, grid):
    if isinstance(model, AtomicModel):
        if model.is_ensemble:
            raise ValueError("refine one model at a time; this one is an ensemble of "
                             f"{model.atoms.positions.shape[0]} members")
        atoms, labels = model.atoms, model.labels
    elif isinstance(model, Atoms):
        atoms, labels = model, None
        if atoms.is_ensemble:
            raise ValueError("refine one model at a time, not an ensemble")
    else:
        raise TypeError(f"model must be an AtomicModel or Atoms, got {type(model).__name__}")
    validate_atoms(atoms, "the model to refine")
    data, grid = map_array(target, grid, what="the target map", dtype=np.float32)
    return atoms, labels, jnp.asarray(data), grid


def _rigid_groups(labels, n: int, groups):
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"rigid_groups must have one entry per atom ({n}), got {g.shape}")
        _, inv = np.unique(g, return_inverse=True)
        return inv.astype(np.int32)
    if labels is None:
        return np.zeros(n, np.int32)
    _, inv = np.unique(np.asarray(labels.chain), return_inverse=True)
    return inv.astype(np.int32)


def _parameter_groups(labels, n: int, groups, option: str) -> np.ndarray | None:
    """(n,) group index of every atom from 0 for `option` (`occupancy_groups` or
    `resolution_groups`), or None for one parameter per atom."""
    if groups is None or (isinstance(groups, str) and groups == "atom"):
        return None
    if isinstance(groups, str):
        if groups != "residue":
            raise ValueError(f"{option} must be None, 'atom', 'residue' or one group id per atom, got {groups!r}")
        if labels is None:
            raise ValueError(f"{option}='residue' needs an AtomicModel (chain, residue number and insertion "
                             "code of every atom); with bare Atoms give one group id per atom")
        # one group per residue and alternate conformer (a residue's shared atoms are one more)
        keys = [f"{c}\x1f{r}\x1f{i}\x1f{a}" for c, r, i, a in zip(
            labels.chain, labels.residue_number, labels.insertion_code, labels.altloc)]
        _, inv = np.unique(np.asarray(keys), return_inverse=True)
        return inv.reshape(-1).astype(np.int32)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"{option} must have one entry per atom ({n}), got shape {g.shape}")
    _, inv = np.unique(g, return_inverse=True)
    return inv.reshape(-1).astype(np.int32)


def _group_units(positions: np.ndarray, b0: np.ndarray, resolution: float, groups: np.ndarray) -> np.ndarray:
    """The unit of each group's shift relative to a single median atom's (multiply by 0.1 for
    occupancy, 0.3 Å for resolution): the shift of all its atoms whose map curvature equals that of
    one median atom's.

    Each atom is a Gaussian of total width β = B + 4 D² (variance σ² = β / 8π² per axis, the
    resolution as a blur, as in `_units`); the curvature of a group's shift is then proportional to
    Σ_ij ∫ρ_i ρ_j = Σ_ij (2π (σ_i² + σ_j²))^(-3/2) exp(−r_ij² / 2 (σ_i² + σ_j²)) over its atoms
    (elements ignored, as in `_units`). For a single atom this is `_units`' β^(3/4) law; for g well
    separated atoms the unit is 1/√g of theirs, and for g overlapping ones nearer 1/g. Resolution
    shifts use the same overlaps (∂ρ/∂D of neighbouring atoms overlap as their densities do).
    """
    from scipy.spatial import cKDTree

    var = (np.maximum(b0, 0.0) + 4.0 * resolution**2) / (8.0 * math.pi**2)
    ref = (4.0 * math.pi * np.median(var)) ** -1.5  # a median atom's ∫ρ²
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    total = np.empty(int(groups.max()) + 1)
    cut = 4.0 * math.sqrt(2.0 * var.max())  # pairs farther than 4σ of their sum add < e^-8
    for idx in np.split(order, bounds):
        v = var[idx]
        s = float(np.sum((4.0 * math.pi * v) ** -1.5))
        if len(idx) > 1:
            pairs = cKDTree(positions[idx]).query_pairs(cut, output_type="ndarray")
            if len(pairs):
                i, j = pairs[:, 0], pairs[:, 1]
                vv = v[i] + v[j]
                r2 = np.sum((positions[idx][i] - positions[idx][j]) ** 2, -1)
                s += 2.0 * float(np.sum((2.0 * math.pi * vv) ** -1.5 * np.exp(-r2 / (2.0 * vv))))
        total[groups[idx[0]]] = s
    return np.clip(np.sqrt(ref / total), 1e-3, 10.0)


def refine(
    model: AtomicModel | Atoms,
    target: DensityMap | Float[Array, "nz ny nx"],
    resolution: float,
    *,
    refine: Sequence[str] = ("xyz", "b"),
    grid: Grid | None = None,
    resolutions: float | Float[Array, " n"] | Literal["scan"] | None = None,
    restraints: Restraints | bool | None = True,
    loss: Literal["ls", "cc", "q"] = "ls",
    mask: Array | np.ndarray | None = None,
    mask_radius: float | None = None,
    solver: Literal["lbfgs", "adam", "optx-lbfgs", "bfgs"] = "lbfgs",
    max_steps: int = 200,
    macro_cycles: int = 3,
    tol: float = 1e-7,
    map_weight: float | Literal["auto"] = "auto",
    weight_scale: float = 1.0,
    max_bond_rmsd: float = 0.02,
    max_angle_rmsd: float = 2.5,
    learning_rate: float = 0.05,
    b_bounds: tuple[float, float] = (1.0, 500.0),
    b_margin: float = 60.0,
    d_margin: float = 2.0,
    d_bounds: tuple[float, float] = (1.5, 9.5),
    rigid_groups: np.ndarray | None = None,
    occupancy_groups: Literal["residue", "atom"] | np.ndarray | None = None,
    resolution_groups: Literal["residue", "atom"] | np.ndarray | None = None,
    table: str = "electron",
    n_terms: int | None = None,
    q_sigma: float = 0.6,
    progress: bool = True,
    callback: Callable[[int, Atoms, np.ndarray | None], None] | None = None,
) -> RefineResult:
    """Refine a model against a map by gradient descent under geometry restraints (module docs).

    **Arguments:**

    - `model`: an `AtomicModel` (needed for restraints; `read_model`) or bare `Atoms`.
    - `target`: the map, a `DensityMap` or an array `(nz, ny, nx)` with `grid`.
    - `resolution`: the map's resolution D in Å (the model map's resolution; the start of
      per-atom resolutions unless `resolutions` is given).
    - `refine`: any of `"xyz"`, `"b"`, `"occ"`, `"res"`, `"rigid"` (one rigid body per chain, or
      per `rigid_groups`).
    - `resolutions`: per-atom starting resolutions (Å) for the shell-decomposition model map (a
      number or one per atom: gradient refinement starts there), or `"scan"`: start each residue
      (or resolution group) at the uniform resolution in `resolution ± d_margin` (0.5 Å steps,
      above the grid's Nyquist limit) whose model map correlates best with the target near its
      atoms (`modelmap.refine._scan`: the fit is not convex in a region's resolution, so a uniform
      start can descend the wrong way). Default (`None`): `"scan"` when `"res"` is refined, else
      `resolution` for every atom.
    - `restraints`: `True` builds them from the chemical library (`build_restraints`; needs an
      `AtomicModel` and biotite), a `Restraints` uses those, `False`/`None` refines unrestrained.
    - `loss`: `"ls"` (least squares with a fitted scale and offset), `"cc"` (1 − CC) or `"q"`
      (1 − mean differentiable Q-score; coordinates only).
    - `mask`: voxels of the map term (boolean `(nz, ny, nx)`); default: within `mask_radius` of
      the starting atoms (default max(3 Å, D)).
    - `solver`: `"lbfgs"` (optax's L-BFGS direction, a strong-Wolfe line search), `"adam"` (optax, `learning_rate`
      in scaled units), `"optx-lbfgs"` or `"bfgs"` (optimistix; BFGS keeps a dense Hessian and is
      limited to 3000 parameters: rigid bodies, small selections).
    - `max_steps`: optimiser steps in all; `macro_cycles`: restarts that re-weigh and rebuild the
      neighbour list (steps are split evenly).
    - `tol`: stop a macro-cycle when the objective decreases (L-BFGS) or changes (Adam) by less
      than `tol` × |objective| over a step, three steps in a row.
    - `map_weight`: `"auto"` or a fixed w; `weight_scale` multiplies the automatic w.
    - `max_bond_rmsd`, `max_angle_rmsd`: Å and degrees; when a macro-cycle ends above either, the
      next one runs with at most a third of w, and up to two extra cycles (half as long) are added
      at the end until both hold (auto weight only).
    - `b_bounds`, `d_bounds`: bounds of B (Å²) and per-atom resolution (Å).
    - `b_margin`: Å²; each atom's B stays within this of its start (the map's windows are planned
      for it; run again from the result to go further).
    - `d_margin`: Å; likewise for each atom's resolution.
    - `rigid_groups`: `(n,)` group id of every atom, one rigid body per group (default: per chain).
    - `occupancy_groups`: `None` or `"atom"`: one occupancy per atom; `"residue"`: one per residue
      and alternate conformer (chain, residue number, insertion code, altloc; needs an
      `AtomicModel`); or an `(n,)` array of group ids. Each group's atoms keep their starting
      occupancies plus one shared shift; the bounds [0, 1] still apply to every atom.
    - `resolution_groups`: likewise for per-atom resolutions (`"res"`): one shared shift of the
      starting resolutions per residue (local resolution varies over several Å, and single atoms'
      resolutions are nearly indistinguishable in a map: the residue is the natural unit).
    - `table`: scattering table, `"electron"` or `"xray"`.
    - `n_terms`: shell terms K of the shell model map (default of `ShellDecompositionVolume`).
    - `q_sigma`: σ (Å) of the Q loss.
    - `progress`: a progress bar on the terminal.
    - `callback`: called as `callback(step, atoms, resolutions)` with the model at every recorded
      step (numpy-backed `Atoms`; per-atom resolutions or `None`), e.g. to track an error.

    **Returns:** a `RefineResult`.
    """
    refine = tuple(dict.fromkeys(refine))
    unknown = [p for p in refine if p not in PARAMETERS]
    if unknown or not refine:
        raise ValueError(f"refine must name some of {PARAMETERS}, got {refine}")
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if loss not in ("ls", "cc", "q"):
        raise ValueError(f"loss must be 'ls', 'cc' or 'q', got {loss!r}")
    if loss == "q" and set(refine) - {"xyz", "rigid"}:
        raise ValueError("the Q loss depends on coordinates only: refine xyz and/or rigid with it")
    if max_steps < 1 or macro_cycles < 1:
        raise ValueError("max_steps and macro_cycles must be >= 1")
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0 Å, got {resolution}")
    atoms, labels, data, grid = _as_inputs(model, target, grid)
    n = atoms.n_atoms
    occ_groups = _parameter_groups(labels, n, occupancy_groups, "occupancy_groups")
    res_groups = _parameter_groups(labels, n, resolution_groups, "resolution_groups")
    dtype = jnp.float32
    pos0 = jnp.asarray(atoms.positions, dtype)
    b0 = jnp.asarray(atoms.b_factors, dtype)
    occ0 = jnp.asarray(atoms.occupancies, dtype)

    # ---- restraints --------------------------------------------------------------------------
    if restraints is True:
        if not isinstance(model, AtomicModel):
            raise ValueError("restraints=True needs an AtomicModel (residue names); pass Restraints or False")
        restraints = build_restraints(model)
    elif restraints is False:
        restraints = None
    if restraints is not None and restraints.n_atoms != n:
        raise ValueError(f"the restraints are for {restraints.n_atoms} atoms, the model has {n}")
    capacity = None
    if restraints is not None:
        # room for 50 % more contacts, so rebuilding the list later does not recompile
        restraints = restraints.with_nonbonded(np.asarray(pos0), headroom=1.5)
        capacity = int(restraints.nonbonded_index.shape[0])

    # ---- the model map -----------------------------------------------------------------------
    per_atom = "res" in refine or resolutions is not None
    d_bounds = (max(d_bounds[0], D_RANGE[0]), min(d_bounds[1], D_RANGE[1]))
    if per_atom:
        from ..shells import get_shell_table
        from ..volumes._shell_decomposition import DEFAULT_SHELL_TERMS

        if resolutions is None and "res" in refine:
            resolutions = "scan"
        scan = isinstance(resolutions, str)
        if scan and (resolutions != "scan" or "res" not in refine):
            raise ValueError("resolutions must be a number, one per atom, or 'scan' (with 'res' refined)")
        res_ref = jnp.broadcast_to(jnp.asarray(resolution if resolutions is None or scan else resolutions, dtype), (n,))
        k = DEFAULT_SHELL_TERMS if n_terms is None else int(n_terms)
        start = ShellDecompositionVolume.from_atoms(Atoms(pos0, atoms.atomic_numbers, b0, occ0), res_ref, table, k)
        # each atom's resolution stays within d_margin of `res_ref` (the windows are planned so)
        d_lo = jnp.maximum(res_ref - d_margin, d_bounds[0])
        d_hi = jnp.minimum(res_ref + d_margin, d_bounds[1])
        render_fn = ShellRenderFn(grid).with_plan(
            start, b_margin=b_margin if "b" in refine else 0.0, d_margin=d_margin if "res" in refine else 0.0
        )
        res0 = res_ref
        if scan:
            scan_groups = res_groups if res_groups is not None else (
                _parameter_groups(labels, n, "residue", "resolution_groups") if labels is not None else np.arange(n))
            res0 = jnp.asarray(scan_start(render_fn, start, data, grid, d_lo, d_hi, scan_groups, resolution), dtype)
            start = eqx.tree_at(lambda v: v.resolution, start, res0)
        table_arg = (start.table, k)
        z_arg = start.element_index
    else:
        res0 = d_lo = d_hi = None
        start = IndependentAtomVolume.from_atoms(Atoms(pos0, atoms.atomic_numbers, b0, occ0), float(resolution), table)
        render_fn = SplatFourierRenderFn(grid, eps=1e-3, max_buckets=3).with_plan(
            start, b_margin=b_margin if "b" in refine else 0.0
        )
        table_arg = start.table
        z_arg = start.atomic_numbers
    # each atom's B stays within b_margin of its start (the render windows are planned for that)
    b_lo = jnp.maximum(b0 - b_margin, max(b_bounds[0], 0.0))
    b_hi = jnp.minimum(b0 + b_margin, b_bounds[1])
    unit_xyz, unit_b, unit_occ = _units(np.asarray(b0, np.float64), np.asarray(atoms.atomic_numbers), float(resolution),
                                        get_table(table), dtype)
    def group_units(groups, unit, per_atom):
        """(groups, the unit of each group's parameter): one per atom (`per_atom` units) or per group."""
        if groups is None:
            return np.arange(n, dtype=np.int32), per_atom
        rel = _group_units(np.asarray(pos0, np.float64), np.asarray(b0, np.float64), float(resolution), groups)
        return groups, jnp.asarray(unit * rel, dtype)

    occ_groups, unit_occ_group = group_units(occ_groups, _UNITS["occ"], unit_occ)
    res_groups, unit_res_group = group_units(res_groups, _UNITS["res"], jnp.full((n,), _UNITS["res"], dtype))
    n_occ, n_res = int(unit_occ_group.shape[0]), int(unit_res_group.shape[0])

    # ---- mask, rigid groups, probes ----------------------------------------------------------
    if mask is None:
        radius = max(3.0, float(resolution)) if mask_radius is None else float(mask_radius)
        mask = atom_neighbourhood_mask(np.asarray(pos0), grid, radius)
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(grid.shape) or not mask.any():
        raise ValueError("the refinement mask must be a non-empty boolean array of the map's shape")
    groups = _rigid_groups(labels, n, rigid_groups)
    n_groups = int(groups.max()) + 1
    p = np.asarray(pos0, np.float64)
    centres = np.stack([p[groups == g].mean(0) for g in range(n_groups)])
    radii = np.array([max(math.sqrt(np.mean(np.sum((p[groups == g] - centres[g]) ** 2, -1))), 1.0)
                      for g in range(n_groups)])
    probes = None
    if loss == "q":  # MapQ's probes: rejected near any non-hydrogen atom
        heavy = np.asarray(atoms.atomic_numbers) != 1
        probes = select_probes(np.asarray(pos0), np.asarray(pos0)[heavy])

    static = _Static(
        render_fn=render_fn, loss=loss, n_atoms=n,
        use_geometry=restraints is not None and bool(set(refine) & {"xyz", "b", "occ", "res"}),
        # a rigid motion leaves the geometry as it is: restraints act on xyz, B, occupancy, resolution
        restrain_xyz="xyz" in refine,
        restrain_b="b" in refine, restrain_occ="occ" in refine, restrain_res="res" in refine,
        q_sigma=float(q_sigma),
    )
    args = _Args(
        positions=pos0, atomic_numbers=z_arg, z=jnp.asarray(atoms.atomic_numbers), b_factors=b0, occupancies=occ0, resolutions=res0,
        groups=jnp.asarray(groups), centres=jnp.asarray(centres, dtype), radii=jnp.asarray(radii, dtype),
        unit_xyz=unit_xyz, unit_b=unit_b, unit_occ=unit_occ, occ_groups=jnp.asarray(occ_groups),
        unit_occ_group=unit_occ_group,
        res_groups=jnp.asarray(res_groups), unit_res_group=unit_res_group, d_lo=d_lo, d_hi=d_hi, b_lo=b_lo, b_hi=b_hi, target=data, mask=jnp.asarray(mask), restraints=restraints, weight=jnp.ones((), dtype),
        penalty=jnp.ones((), dtype),
        probes=probes, grid=grid, table=table_arg,
    )
    u = {}
    for name in refine:
        if name == "xyz":
            u[name] = jnp.zeros((n, 3), dtype)
        elif name == "rigid":
            u[name] = jnp.zeros((n_groups, 6), dtype)
        elif name == "occ":
            u[name] = jnp.zeros((n_occ,), dtype)
        elif name == "res":
            u[name] = jnp.zeros((n_res,), dtype)
        else:
            u[name] = jnp.zeros((n,), dtype)
    n_params = sum(x.size for x in u.values())
    if solver == "bfgs" and n_params > _DENSE_LIMIT:
        raise ValueError(
            f"solver='bfgs' keeps a dense {n_params}×{n_params} Hessian; use 'lbfgs' for more than "
            f"{_DENSE_LIMIT} parameters (or refine rigid bodies / a smaller selection)"
        )

    history = {k: [] for k in ("step", "loss", "map_loss", "cc", "mean_q", "bond_rmsd", "angle_rmsd",
                               "map_weight", "time")}
    t0 = time.perf_counter()
    if not static.use_geometry or map_weight != "auto":
        macro_cycles = 1  # nothing to re-weigh or rebuild: one uninterrupted L-BFGS run
    steps_per_cycle = [max_steps // macro_cycles + (1 if c < max_steps % macro_cycles else 0)
                       for c in range(macro_cycles)]
    steps_per_cycle = [s for s in steps_per_cycle if s > 0]
    result = "max_steps"
    step = 0
    weight = None if map_weight == "auto" else float(map_weight)
    bar = _Progress(progress, max_steps)
    opt = _make_optimiser(solver, learning_rate, tol)
    try:
        cycles = list(steps_per_cycle)
        loose = False  # the geometry is outside max_bond_rmsd / max_angle_rmsd after a cycle
        cycle = 0
        while cycle < len(cycles):
            if cycle > 0 and restraints is not None:
                pos_now = np.asarray(_build(u, args, static)[0])
                args = eqx.tree_at(lambda a: a.restraints, args,
                                   _rebuild_neighbours(args.restraints, pos_now, capacity))
            if map_weight == "auto" and not static.use_geometry:
                weight = 1.0  # nothing to balance the map against
            elif map_weight == "auto":
                gm, gg = _gradient_norms(u, args, static)
                w_new = weight_scale * gg / gm if gm > 0 and gg > 0 else 1.0
                if weight is not None and loose:
                    w_new = min(w_new, weight / 3)
                weight = w_new
            args = eqx.tree_at(lambda a: a.weight, args, jnp.asarray(weight, dtype))
            u, steps_done, converged, finite = _run_cycle(
                u, args, static, opt, cycles[cycle], tol, history, step, t0, bar, callback
            )
            step += steps_done
            if not finite:
                result = "nonfinite"
                break
            if static.restrain_xyz and args.restraints is not None:
                _, bond, angle = (float(x) for x in _metrics(u, args, static))
                loose = bond > max_bond_rmsd or angle > max_angle_rmsd
            last = cycle == len(cycles) - 1
            if last and loose and map_weight == "auto" and len(cycles) - len(steps_per_cycle) < 2:
                cycles.append(max(cycles[-1] // 2, 10))  # up to two more cycles to tighten the geometry
                bar.extend(cycles[-1])
                last = False
            if converged and last:
                result = "converged"
            cycle += 1
    finally:
        bar.close()
    pos, b, occ, res = (None if x is None else np.asarray(x) for x in _build(u, args, static))
    if "occ" in refine:  # the soft bound lets them overshoot by ~1e-3 (`_bound_penalty`)
        occ = np.clip(occ, 0.0, 1.0)
    out_atoms = Atoms(pos, atoms.atomic_numbers, b, occ)
    out_model = model.replace(atoms=out_atoms) if isinstance(model, AtomicModel) else None
    return RefineResult(
        atoms=out_atoms, resolutions=res if "res" in refine or resolutions is not None else None,
        model=out_model, history={k: np.asarray(v) for k, v in history.items()}, result=result,
        n_steps=step, map_weight=float(weight), mask=mask,
    )


def _units(b0: np.ndarray, atomic_numbers: np.ndarray, resolution: float, table, dtype):
    """Per-atom units of coordinates, B and occupancy: a diagonal preconditioner.

    Each unit is 1/√(curvature) of the least-squares map term in that parameter, for an atom alone
    in the Fourier map at resolution D (the Gauss-Newton diagonal). By Parseval the curvature is an
    integral over the kept sphere of the atom's transform g(s) = f(s) exp(−B s²/4) (f the
    scattering factor of its element) times the parameter's factor squared:

        xyz: ∫ (2π s)²/3 g² d³s,  B: ∫ (s²/4)² g² d³s,  occupancy: ∫ g² d³s,  |s| <= 1/D,

    (1-D radial quadrature, 129 nodes). Sharp atoms and heavy elements get small units, blurred and
    light ones large, so one L-BFGS step moves them alike. Normalized to 1 Å, 10 Å² and 0.1 at the
    median atom; factors kept in [0.1, 10].
    """
    s = np.linspace(0.0, 1.0 / resolution, 129)
    w = np.full(s.shape, s[1] - s[0])
    w[0] = w[-1] = 0.5 * w[0]  # trapezoid
    z = np.asarray(atomic_numbers)
    a, bk = (np.asarray(x, np.float64)[z] for x in (table.a, table.b))  # (n, K)
    f = np.einsum("nk,nks->ns", a, np.exp(-bk[:, :, None] * s**2 / 4.0))
    g2 = (f * np.exp(-np.maximum(b0, 0.0)[:, None] * s**2 / 4.0)) ** 2 * (4.0 * math.pi * s**2 * w)
    curvatures = {"xyz": g2 @ (4.0 * math.pi**2 * s**2 / 3.0), "b": g2 @ (s**2 / 4.0) ** 2, "occ": g2.sum(1)}
    out = []
    for key in ("xyz", "b", "occ"):
        u = 1.0 / np.sqrt(np.maximum(curvatures[key], 1e-300))
        out.append(jnp.asarray(_UNITS[key] * np.clip(u / np.median(u), 0.1, 10.0), dtype))
    return tuple(out)


def _rebuild_neighbours(restraints: Restraints, positions: np.ndarray, capacity: int) -> Restraints:
    try:
        return restraints.with_nonbonded(positions, capacity=capacity)
    except ValueError:  # more contacts than the padded list holds: grow it (one recompilation)
        return restraints.with_nonbonded(positions)


_build_jit = eqx.filter_jit(_build)


def _record(history, step, u, value, args, static, t0, bar, callback=None):
    e_geom, bond, angle = (float(x) for x in _metrics(u, args, static))
    w = float(args.weight)
    map_loss = (float(value) - e_geom) / (w * static.n_atoms)
    if static.loss == "ls":
        cc, mq = math.sqrt(min(max(1.0 - map_loss, 0.0), 1.0)), math.nan
    elif static.loss == "cc":
        cc, mq = 1.0 - map_loss, math.nan
    else:
        cc, mq = math.nan, 1.0 - map_loss
    for k, v in (("step", step), ("loss", float(value)), ("map_loss", map_loss), ("cc", cc), ("mean_q", mq),
                 ("bond_rmsd", bond), ("angle_rmsd", angle), ("map_weight", w),
                 ("time", time.perf_counter() - t0)):
        history[k].append(v)
    bar.update(step, cc if static.loss != "q" else mq, bond, angle)
    if callback is not None:
        pos, b, occ, res = (None if x is None else np.asarray(x) for x in _build_jit(u, args, static))
        callback(step, Atoms(pos, args.z, b, occ), res)


@functools.lru_cache(maxsize=16)
def _make_optimiser(solver: str, learning_rate: float, tol: float):
    """The optimiser, one object per setting, so that jitted steps compile once per shape and are
    reused by later refinements in the same process."""
    if solver == "lbfgs":
        # the line search runs in Python (`_run_lbfgs`): every trial step calls the one compiled
        # value-and-gradient, where optax's in-graph line search compiles the objective twice (its
        # loop body, and the first step's value) and a refinement's first call waited for both
        return _LBFGS(optax.lbfgs(linesearch=None))
    if solver == "adam":
        return _Adam(optax.adam(learning_rate))
    try:
        import optimistix as optx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"solver={solver!r} needs optimistix: pip install optimistix") from err
    if solver == "optx-lbfgs":
        return _Optx(optx.LBFGS(rtol=tol, atol=1e-12))
    return _Optx(optx.BFGS(rtol=tol, atol=1e-12))


class _Optx(eqx.Module):
    solver: eqx.Module


def _run_cycle(u, args, static, opt, n_steps, tol, history, step0, t0, bar, callback=None):
    """One macro-cycle: up to `n_steps` optimiser steps. Returns (u, steps, converged, finite)."""
    if isinstance(opt, _Optx):
        return _run_optx(u, args, static, opt, n_steps, history, step0, t0, bar, callback)
    if isinstance(opt, _LBFGS):
        return _run_lbfgs(u, args, static, opt, n_steps, tol, history, step0, t0, bar, callback)
    state = _initial_state(opt, u)
    quiet = 0
    last = None
    for k in range(n_steps):
        new_u, new_state, value = _optax_step(u, state, args, static, opt)
        value = float(value)
        if not math.isfinite(value) or not _all_finite(new_u):
            return u, k, False, False
        _record(history, step0 + k, u, value, args, static, t0, bar, callback)
        # Adam's values oscillate: a small change (not a decrease) counts as quiet; three in a row
        # end the cycle
        quiet = quiet + 1 if last is not None and abs(last - value) <= tol * max(abs(value), 1e-30) else 0
        last = value
        u, state = new_u, new_state
        if quiet >= 3:
            return u, k + 1, True, True
    return u, n_steps, False, True


def _initial_state(opt, u):
    state = opt.tx.init(u)
    # init's scalars are weakly typed where an update's are not: cast once, so that the jitted
    # update compiles once rather than twice
    shapes = eqx.filter_eval_shape(opt.tx.update, u, state, u)[1]
    return jax.tree_util.tree_map(lambda x, s: jnp.asarray(x, s.dtype), state, shapes)


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


_ARMIJO, _CURVATURE = 1e-4, 0.9  # the strong Wolfe conditions' c1 and c2


def _line_search(u, value, slope, d, args, static, max_trials: int):
    """A step along `d` that meets the strong Wolfe conditions (Nocedal & Wright, Alg. 3.5-3.6),
    each trial one call of the compiled `_value_and_grad`:

        f(a) <= f(0) + c1 a f'(0)   and   |f'(a)| <= c2 |f'(0)|,   f'(a) = ∇f(u + a d)·d.

    From a = 1 the step grows (to the zero of f' extrapolated from the last two trials, 2-100 times
    further: optax's first direction has norm <= 1, far shorter than the step thousands of
    parameters want; B alone on 7CEC: one trial fewer than with 10 times) until the minimum along `d` is bracketed, then the bracket shrinks
    to the minimum of the quadratic through f(lo), f'(lo) and f(hi) (kept 10 % inside it). The
    curvature condition keeps sᵀy > 0 for the L-BFGS memory and rejects steps that overshoot the
    line's minimum. Returns (u, f, ∇f, a, f'(a)) of the accepted step, after `max_trials` the
    lowest trial with a sufficient decrease, or None when no trial decreased f enough (float32
    noise)."""
    lo, f_lo, dg_lo = 0.0, value, slope
    hi, f_hi = math.inf, math.nan
    a, best = 1.0, None
    for _ in range(max_trials):
        trial = jax.tree_util.tree_map(lambda x, y: (x + a * y).astype(x.dtype), u, d)
        v, g = _value_and_grad(trial, args, static)
        v = float(v)
        dg = float(optax.tree.vdot(g, d)) if math.isfinite(v) else math.nan
        if not (math.isfinite(v) and math.isfinite(dg)) or v > value + _ARMIJO * a * slope or v >= f_lo:
            hi, f_hi = a, v  # too long
        else:
            if best is None or v < best[1]:
                best = (trial, v, g, a, dg)
            if abs(dg) <= _CURVATURE * abs(slope):
                return trial, v, g, a, dg
            if dg > 0:  # past the minimum: it lies between lo and a
                hi, f_hi = a, v
            else:  # short of it: extrapolate f' linearly to its zero, 2-100 times further
                a_next = a - dg * (a - lo) / (dg - dg_lo) if dg > dg_lo else 10.0 * a
                lo, f_lo, dg_lo = a, v, dg
        if math.isinf(hi):
            a = min(max(a_next, 2.0 * a), 100.0 * a)
            continue
        width = hi - lo
        excess = f_hi - f_lo - dg_lo * width
        a_q = lo - dg_lo * width * width / (2.0 * excess) if math.isfinite(f_hi) and excess > 0 else lo + 0.5 * width
        a = min(max(a_q, lo + 0.1 * width), hi - 0.1 * width)
    return best


def _run_lbfgs(u, args, static, opt, n_steps, tol, history, step0, t0, bar, callback=None):
    """L-BFGS (optax's direction) with a strong-Wolfe line search run from Python
    (`_line_search`), so that the objective compiles once. A direction that is not a descent one
    restarts the memory; a line search that finds no decrease (float32 noise) leaves u where it is
    and counts as quiet, as does a step that decreases the objective by less than `tol` × |f|;
    three quiet steps in a row end the cycle. Returns (u, steps, converged, finite)."""
    state = _initial_state(opt, u)
    value, grad = _value_and_grad(u, args, static)
    value = float(value)
    if not math.isfinite(value) or not _all_finite(grad):
        return u, 0, False, False
    quiet = 0
    for k in range(n_steps):
        _record(history, step0 + k, u, value, args, static, t0, bar, callback)
        d, new_state, slope = _lbfgs_direction(grad, state, u, opt)
        slope = float(slope)
        if not slope < 0:  # not a descent direction: restart the memory (a gradient step)
            d, new_state, slope = _lbfgs_direction(grad, _initial_state(opt, u), u, opt)
            slope = float(slope)
            if not slope < 0:  # a zero gradient
                return u, k + 1, True, True
        state = new_state
        found = _line_search(u, value, slope, d, args, static, opt.max_trials)
        if found is None:
            quiet += 1
        else:
            trial, v, g, a, dg = found
            # sᵀy = a (f'(a) − f'(0)) for s = a d; the Wolfe step has it > 0, a fallback may not:
            # restart the memory then
            if not a * (dg - slope) > 0:
                state = _initial_state(opt, trial)
            quiet = quiet + 1 if value - v <= tol * max(abs(v), 1e-30) else 0
            u, value, grad = trial, v, g
        if quiet >= 3:
            return u, k + 1, True, True
    return u, n_steps, False, True


_objective_jit = eqx.filter_jit(_objective)


def _optx_fn(static):
    return lambda y, a: (_objective(y, a, static), None)


@eqx.filter_jit
def _optx_minimise(u, args, static, opt, max_steps: int):
    import optimistix as optx

    sol = optx.minimise(_optx_fn(static), opt.solver, u, args, has_aux=True, max_steps=max_steps, throw=False)
    return sol.value, sol.stats["num_steps"], sol.result == optx.RESULTS.successful


def _run_optx(u, args, static, opt, n_steps, history, step0, t0, bar, callback=None):
    """An optimistix minimisation of one macro-cycle, run to its own termination inside one jitted
    call (its `rtol`/`atol` criteria); the history gets the start and the end of the cycle."""
    dtype = args.positions.dtype
    wide = jnp.result_type(float)  # optimistix's scalars follow the default float (float64 under x64)
    _record(history, step0, u, float(_objective_jit(u, args, static)), args, static, t0, bar, callback)
    y, steps, ok = _optx_minimise({k: v.astype(wide) for k, v in u.items()}, args, static, opt, n_steps)
    y = {k: v.astype(dtype) for k, v in y.items()}
    steps = max(int(steps), 1)
    value = float(_objective_jit(y, args, static))
    if not math.isfinite(value):
        return u, steps, False, False
    _record(history, step0 + steps, y, value, args, static, t0, bar, callback)
    return y, steps, bool(ok), True


class _Progress:
    """A rich progress bar (step, CC or mean Q, bond and angle rmsd), or nothing."""

    def __init__(self, enabled: bool, total: int):
        self._p = None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:  # pragma: no cover - rich comes with typer
            return
        self._p = Progress(
            TextColumn("refine"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), transient=False,
        )
        self._task = self._p.add_task("refine", total=total, info="")
        self._p.start()

    def update(self, step, score, bond, angle):
        if self._p is not None:
            self._p.update(self._task, completed=step + 1,
                           info=f"CC/Q {score:.4f}  bonds {bond:.4f} Å  angles {angle:.2f}°")

    def extend(self, n):
        if self._p is not None:
            self._p.update(self._task, total=self._p.tasks[0].total + n)

    def close(self):
        if self._p is not None:
            self._p.stop()
