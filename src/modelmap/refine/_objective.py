"""The refinement objective: a map term plus geometry restraints, with per-step diagnostics.

For the refined parameters p (any of coordinates, B, occupancies, per-atom resolutions and a
rigid-body motion per group):

    E(p) = w · n · L_map(p) + E_geom(p) + P(p),

where L_map is a map term from `modelmap.refine._loss` over a mask around the starting model
(least squares with a fitted scale and offset, 1 − CC, or 1 − mean Q), n the number of atoms (so
that w · n · L_map reads as a sum over atoms like the restraints), E_geom the restraint energy of
`Restraints.energy` (dimensionless, Σ (Δ/σ)²), w the map weight and P the bound penalty
(`bound_penalty`).

**The model map.** With a single resolution D it is the Fourier map at D (`SplatFourierRenderFn`:
the exact hard-sphere Fourier map, as phenix.map_model_cc and servalcat compute it, to 1e-4); with
per-atom resolutions it is the shell decomposition (`ShellRenderFn`, Urzhumtsev & Lunin), the only
renderer whose atoms each have their own resolution.

`objective` returns the value and, as aux, the terms a refinement reports at every step: the map
loss, E_geom, bond and angle rmsd, and the largest displacement of any atom from where the
non-bonded contact list was built (`shift`, Å: the solver stops when it exceeds half the list's
buffer, so that the host rebuilds the list) and how many atoms' B reached the render plan's ceiling
(`at_ceiling`: the solver stops, the host re-plans the model map).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._grid import Grid
from ..render import ShellRenderFn
from ..volumes import IndependentAtomVolume, ShellDecompositionVolume
from ._loss import cc_loss, least_squares_loss, q_loss
from ._parameters import UNITS, build, shifted
from ._restraints import Restraints

__all__ = ["Args", "Static", "objective", "objective_structure"]

# what `objective` reports at every step (its aux), each a scalar of the positions' dtype
AUX_KEYS = ("map_loss", "geometry", "bond_rmsd", "angle_rmsd", "shift", "stale_shift", "at_ceiling")


class Static(eqx.Module):
    """Everything the objective needs that is fixed for a compiled run (hashable by identity)."""

    render_fn: eqx.Module
    loss: str = eqx.field(static=True)
    n_atoms: int = eqx.field(static=True)
    use_geometry: bool = eqx.field(static=True)
    restrain_xyz: bool = eqx.field(static=True)
    restrain_b: bool = eqx.field(static=True)
    restrain_occ: bool = eqx.field(static=True)
    restrain_res: bool = eqx.field(static=True)
    q_sigma: float = eqx.field(static=True)


class Args(eqx.Module):
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
    b_hi: Float[Array, " n"]  # the render plan's ceiling (or the physical bound b_max)
    b_max: Float[Array, ""]  # the physical upper bound of B
    target: Float[Array, "nz ny nx"]
    mask: Array
    restraints: Restraints | None
    list_positions: Float[Array, "n 3"]  # where the non-bonded contact list was built
    stale_shift: Float[Array, ""]  # Å: a move past this makes the contact list stale (inf: never)
    weight: Float[Array, ""]
    probes: object | None
    table: object
    grid: Grid = eqx.field(static=True)


def _model_map(pos, b, occ, res, args: Args, static: Static):
    if isinstance(static.render_fn, ShellRenderFn):
        return static.render_fn(_shell_volume(pos, b, occ, res, args, static))
    d = jnp.asarray(static.render_fn.resolution_range[0], pos.dtype)
    vol = IndependentAtomVolume(pos, b, occ, d, args.atomic_numbers, args.table)
    return static.render_fn(vol)


def _shell_volume(pos, b, occ, res, args: Args, static: Static):
    table, n_terms = args.table
    return ShellDecompositionVolume(pos, b, occ, res, args.atomic_numbers, table, n_terms)


def _map_loss(u, args: Args, static: Static):
    pos, b, occ, res = build(u, args)
    if static.loss == "q":
        return q_loss(args.target, args.grid, pos, args.probes, static.q_sigma)
    m = _model_map(pos, b, occ, res, args, static)
    fn = least_squares_loss if static.loss == "ls" else cc_loss
    return fn(m, args.target, args.mask)


def _geometry(u, args: Args, static: Static):
    if not static.use_geometry:
        return jnp.zeros((), args.positions.dtype)
    pos, b, occ, res = build(u, args)
    r = args.restraints
    terms = r.energy_terms(
        pos,
        b if static.restrain_b else None,
        # clipped: the bounds [0, 1] are `bound_penalty`'s (scaled to the map term); the restraint's
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


def bound_penalty(u, args: Args, static: Static):
    """w Σ ((p − clip(p)) / unit)² over B, occupancies and resolutions (w the map weight): 0
    inside the bounds. Where `build` clips B or a resolution into its bounds, the map's gradient
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
              "res": (args.d_lo, args.d_hi, UNITS["res"])}
    for name, raw in shifted(u, args).items():
        lo, hi, unit = bounds[name]
        total = total + jnp.sum(((raw - jnp.clip(raw, lo, hi)) / unit) ** 2)
    return args.weight.astype(dt) * total


def objective(u: dict, args: Args, static: Static):
    """`(E, aux)`: the objective (module docs) and the terms reported at every step."""
    dt = args.positions.dtype
    map_loss = _map_loss(u, args, static)
    geometry = _geometry(u, args, static)
    value = args.weight * static.n_atoms * map_loss + geometry + bound_penalty(u, args, static)
    pos = build(u, args)[0]
    shift = jnp.sqrt(jnp.max(jnp.sum((pos - args.list_positions) ** 2, -1)))
    raw = shifted(u, args)
    # atoms whose B reached the render plan's ceiling (not the physical bound): the host re-plans
    ceiling = jnp.sum((raw["b"] >= args.b_hi) & (args.b_hi < args.b_max)) if "b" in raw else jnp.zeros((), jnp.int32)
    if args.restraints is None:
        bond = angle = jnp.full((), jnp.nan, dt)
    else:
        bond, angle = args.restraints.bond_rmsd(pos), args.restraints.angle_rmsd(pos)
    aux = dict(zip(AUX_KEYS, (map_loss, geometry, bond, angle, shift, args.stale_shift, ceiling)))
    return value, jax.tree_util.tree_map(lambda x: jax.lax.stop_gradient(x).astype(dt), aux)


def objective_structure(args: Args):
    """`objective`'s output `(value, aux)` as `jax.ShapeDtypeStruct`s, without tracing it (a
    solver's `init` needs only this; tracing the model map for it cost ~0.5 s on 7CEC)."""
    scalar = jax.ShapeDtypeStruct((), args.positions.dtype)
    return scalar, {k: scalar for k in AUX_KEYS}
