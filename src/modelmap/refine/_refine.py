"""`refine`: real-space refinement as compiled solver runs with host work between them.

The objective (`modelmap.refine._objective`) is minimised by `LBFGS` (`modelmap.refine._solver`:
L-BFGS with a strong-Wolfe line search, init / step / terminate in one `lax.while_loop`), so each
run is one compiled call with no host round-trip per step. Between runs, on the host:

- **macro-cycles**: the steps are split into `macro_cycles` runs; after each, when coordinates are
  refined and the bond rmsd exceeds `max_bond_rmsd` or the angle rmsd `max_angle_rmsd`, the map
  weight is divided by 3 (and up to two more runs are added at the end until the geometry holds),
  as Phenix's weight search lowers the data weight when geometry degrades;
- **contacts**: a run stops as soon as any atom has moved by more than half the non-bonded list's
  buffer since the list was built; the list is rebuilt and the run goes on (a Verlet list);
- **render plans**: the model map is planned for every atom's B up to B + a margin (`b_window` at
  first, doubled at a re-plan for each atom whose B rose by more than half its margin); a run
  stops when an atom reaches that ceiling (a run that went on would hold it there), and the
  host re-plans every atom around its B, dealing the new windows into the compiled plan's buckets
  and spare slots where they fit (`WindowPlan.refit`: no recompilation), else planning afresh. B
  is bounded only by the physical `b_bounds` (1-500 Å² by default).

A run stopped for the host's work goes on from the solver's state (`LBFGS.resume`: the same
parameters, the L-BFGS memory and line search kept; the objective is the same function of them).
A new macro-cycle starts afresh from the model its predecessor ended with (the parameters folded
into the model, new units, the memory restarted), since its weight makes another objective.

**Automatic weighting.** w = `weight_scale` · |∇E_geom| / |∇(n L_map)| over the refined parameters
(in their scaled units), as phenix.refine balances the gradients of data and restraints ("wxc",
Afonine et al. 2011). When coordinates are refined it is set again at the start of every
macro-cycle (the restraints' gradient falls as the geometry settles) but never raised (as a fit
converges the map's gradient shrinks, and a rising weight fits the map's noise: on EMD-30342 it
rose 3-fold over three cycles and left 86 clashes), and after a cycle whose geometry was loose it
is at most a third of the previous one. When only B, occupancies or
resolutions are refined it is set once, at the start, and kept: re-weighing from gradients that
shrink as the fit converges made B-only refinement drift with more steps. Both gradients come
from the compiled run itself, with no step taken: the objective's at w = 1, and at w = 0, where
only the restraints are left (a separate restraints-only gradient took 1.6 s to compile on 7CEC
chain A).

**Units across kinds.** When B, occupancies or resolutions are refined beside coordinates, their
units are rescaled once, at the start, to the objective's curvature of the coordinates at the
map weight (`_balance_units`), so that L-BFGS, whose step length the stiff restraints on
coordinates set, moves them too.

`refine_batch` runs the same loop for several structures of the same size at once (`vmap` of the
compiled run): ensembles, conformations, perturbed copies; each converges as it would alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable, Literal, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._arrays import put
from .._atoms import Atoms, validate_atoms
from .._grid import Grid
from ..io import AtomicModel, DensityMap
from ..io._map import map_array
from ..render import ShellRenderFn, SplatFourierRenderFn
from ..render._windows import WindowPlan
from ..scattering import get_table
from ..scores import atom_neighbourhood_mask, select_probes
from ..shells import D_RANGE
from ..volumes import IndependentAtomVolume, ShellDecompositionVolume
from ._config import PARAMETERS, RefineConfig
from ._objective import Args, Static, objective, objective_structure
from ._parameters import UNITS, build, group_units, parameter_groups, rigid_groups, units
from ._report import Progress, RefineResult, geometry_report
from ._build import build_restraints
from ._restraints import Restraints
from ._scan import scan_start
from ._solver import LBFGS, MAX_STEPS, NONFINITE, RESULT_NAMES, STOPPED, minimise

__all__ = ["PARAMETERS", "RefineConfig", "RefineResult", "refine", "refine_batch"]

_EXTRA_CYCLES = 2  # runs added at the end, at most, while the geometry is loose


class _Objective(eqx.Module):
    """`fn(u, args) -> (value, aux)` for the solver: the objective with its fixed parts."""

    static: Static

    def __call__(self, u, args):
        return objective(u, args, self.static)


class _Monitor(eqx.Module):
    """What the host callback receives besides the scalars: which reporter it is for (`tag`, a
    traced array, so that a new refinement reuses the compiled run) and, when `atoms`, the atoms of
    the current point."""

    tag: Array
    atoms: bool = eqx.field(static=True)

    def __call__(self, u, args):
        return self.tag, (build(u, args) if self.atoms else None)


# The host ends of running refinements' callbacks, by tag. The compiled run calls `_report`, one
# module-level function (a static argument of `minimise` that is the same object in every call),
# which hands the values to the run's own `_Reporter`: a reporter made per call and passed to
# `minimise` itself would be a new static argument, and every call to `refine` would recompile.
_REPORTERS: dict[int, "_Reporter"] = {}
_TAGS = itertools.count()


def _report(step, value, aux, extra) -> None:
    tag, atoms = extra
    reporter = _REPORTERS.get(int(tag))
    if reporter is not None:
        reporter(step, value, aux, atoms)


def _needs_host(aux):
    """Stop a run for the host: the contact list is stale, or a B reached the plan's ceiling."""
    return (aux["shift"] > aux["stale_shift"]) | (aux["at_ceiling"] > 0)


@dataclasses.dataclass
class _Problem:
    """One structure's refinement: its inputs, fixed parts and where it stands (host side)."""

    atoms: Atoms
    labels: object
    model: object
    grid: Grid
    restraints: Restraints | None
    args: Args
    u: dict
    start_positions: np.ndarray
    resolution: float
    refine_res: bool
    weight: float = 1.0
    done: bool = False
    result: str = "max_steps"
    steps: int = 0
    evaluations: int = 0
    loose: bool = False
    unit_scale: dict = dataclasses.field(default_factory=dict)  # `_balance_units`' factors
    b_margin: np.ndarray | None = None  # Å², per atom: its render plan's room above its B (`_b_ceiling`)
    state: object = None  # the solver's state where a run stopped for the host's work (the next run goes on from it)
    history: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)


def _config(config: RefineConfig | None, options: dict) -> RefineConfig:
    config = RefineConfig() if config is None else config
    if not isinstance(config, RefineConfig):
        raise TypeError(f"config must be a RefineConfig, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(RefineConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"refine() got unknown option(s) {unknown}; RefineConfig has {sorted(fields)}")
    return dataclasses.replace(config, **options) if options else config


def _as_inputs(model, target, grid):
    if isinstance(model, AtomicModel):
        if model.is_ensemble:
            raise ValueError("refine one model at a time; this one is an ensemble of "
                             f"{model.atoms.positions.shape[0]} members (refine_batch refines several)")
        atoms, labels = model.atoms, model.labels
    elif isinstance(model, Atoms):
        atoms, labels = model, None
        if atoms.is_ensemble:
            raise ValueError("refine one model at a time, not an ensemble (refine_batch refines several)")
    else:
        raise TypeError(f"model must be an AtomicModel or Atoms, got {type(model).__name__}")
    validate_atoms(atoms, "the model to refine", labels)
    data, grid = map_array(target, grid, what="the target map", dtype=np.float32)
    return atoms, labels, put(data), grid


def _b_ceiling(b: np.ndarray, margin, cfg: RefineConfig) -> np.ndarray:
    """Each atom's highest B in a run's render plan: B + its margin, at most the upper bound.

    The windows' cost grows with the ceiling (their volume as (B + B_x)^{3/2}), and each time an
    atom reaches its ceiling the run stops and every atom is re-planned around its B (dealt into
    the compiled windows' free slots, `_n_spare`: a restart of the solver, not a compilation).
    Every margin starts at `b_window`, and at a re-plan an atom whose B rose by more than half
    its margin gets twice the margin (`_grown_margin`): narrow windows where B settles, a few
    re-plans where it travels. Measured on 7CEC chain A (2 cores, same hour): a value and gradient of its xyz+B
    start took 133 ms with B + 60 Å² and 188 ms with B + max(60, B) for every atom."""
    return np.minimum(b + margin, cfg.b_bounds[1])


def _grown_margin(margin: np.ndarray, b: np.ndarray, planned: np.ndarray) -> np.ndarray:
    """The B margins at a re-plan: doubled for the atoms whose B rose by more than half their
    margin since the last plan (`planned`: their B then, or less where the ceiling was cut at the
    upper bound), the ones at their ceiling among them."""
    return np.where(b - planned > 0.5 * margin, 2.0 * margin, margin)


def _window_plans(render_fn) -> list[WindowPlan]:
    """The `WindowPlan`s inside a render function, in tree order."""
    leaves = jax.tree_util.tree_leaves(render_fn, is_leaf=lambda x: isinstance(x, WindowPlan))
    return [x for x in leaves if isinstance(x, WindowPlan)]


def _replace_plans(render_fn, plans: list[WindowPlan]):
    return eqx.tree_at(_window_plans, render_fn, plans)


def _n_spare(n: int) -> int:
    """Free window slots for atoms re-planned for the upper B bound: half the atoms, at least 128.

    Free slots cost no work (a chunk of free slots is skipped, `render._windows`), only their
    indices; with few of them a B-only run from a flat start, where most atoms outgrow their
    windows together, re-planned into a new shape and compiled its loop a second time (7CEC with
    1/32 of the atoms; a 90-atom helix with 64)."""
    return max(128, n // 2)


def _with_spare(render_fn, at_bound, n_spare: int):
    """`render_fn` with free slots, so that a re-plan fits without a change of shape: a quarter more
    in every bucket (an atom whose window grew a little finds room in the next size, not only in the
    widest: dealt into the bound-size slots, 7CEC's xyz+B steps took 0.19 s instead of 0.10 s after
    its first re-plan), and `n_spare` for windows at the upper B bound (`at_bound`: the same render
    function planned with every atom there)."""
    plans, bound = _window_plans(render_fn), _window_plans(at_bound)
    if len(plans) != len(bound) or not plans:
        return render_fn
    spare = []
    for p, q in zip(plans, bound):
        for b in p.buckets:
            p = p.with_spare(b.half_width, max(1, int(np.prod(b.indices.shape)) // 4))
        spare.append(p.with_spare(tuple(np.max([b.half_width for b in q.buckets], axis=0)), n_spare))
    return _replace_plans(render_fn, spare)


def _same_compiled_shape(a, b) -> bool:
    """Whether two render functions are the same to `jit`: equal static parts, equal array shapes."""
    (da, sa), (db, sb) = eqx.partition(a, eqx.is_array), eqx.partition(b, eqx.is_array)
    if jax.tree_util.tree_structure(sa) != jax.tree_util.tree_structure(sb):
        return False
    shapes = lambda d: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(d)]  # noqa: E731
    return jax.tree_util.tree_structure(da) == jax.tree_util.tree_structure(db) and shapes(da) == shapes(db)


def _keep_shapes(required_fn, old_fn, into_fn, grid: Grid, positions):
    """`into_fn` (planned like `old_fn`) with the windows of `required_fn` dealt into `old_fn`'s
    buckets (`WindowPlan.refit`, in voxel order of `positions`), so that the compiled run takes it
    without recompiling; None where they do not fit."""
    new, old = _window_plans(required_fn), _window_plans(old_fn)
    if len(new) != len(old) or not new:
        return None
    # (the splat-Fourier map splats on a padded grid of the same voxels: the order is the same)
    refit = [o.refit(grid, q, positions) for o, q in zip(old, new)]
    if any(r is None for r in refit):
        return None
    fn = _replace_plans(into_fn, refit)
    return fn if _same_compiled_shape(fn, old_fn) else None


def _model_map_fn(plan: Callable, ceiling: np.ndarray, cfg: RefineConfig, grid: Grid, old=None, positions=None):
    """The model map's render function for B up to `ceiling` (`plan(ceiling, exact)` plans one):
    `old`'s windows re-dealt where they hold the new ones (no recompilation), else a new plan
    with spare windows for `_n_spare` atoms at the upper B bound."""
    fresh = plan(ceiling, False)
    if old is not None:
        # the windows each atom needs come from the exact plan; the function that takes them is
        # planned like `old` (an exact plan's render function has other static settings)
        fn = _keep_shapes(plan(ceiling, True), old, fresh, grid, positions)
        if fn is not None:
            return fn
    n = len(ceiling)
    return _with_spare(fresh, plan(np.full(n, cfg.b_bounds[1]), False), _n_spare(n))


def _render_fn(grid: Grid, pos, z, b_ceiling, occ, res, per_atom: bool, cfg: RefineConfig, refine_res: bool,
               res_ref=None, exact: bool = False, b_floor: float | None = None):
    """The model map's render function, planned for every B in [b_floor, b_ceiling] (`b_floor`:
    default `b_bounds[0]`, where a refinement of B may take it; the smallest B sets the Fourier
    map's anti-aliasing blur, so a run that keeps B gives its own smallest B: 7CEC's occupancy run
    planned down to 1 Å² took 1.6 times as long per step) and resolutions within d_margin of
    `res_ref` for the shell map; `exact`: every window as small as it can be (as many buckets as
    sizes; what `_keep_shapes` deals into an earlier plan)."""
    floor = cfg.b_bounds[0] if b_floor is None else b_floor
    below = max(float(np.min(b_ceiling)) - floor, 0.0)
    pos = np.asarray(pos)
    pos = pos[0] if pos.ndim == 3 else pos  # a batch: windows depend on B and D, not on where atoms are
    atoms = Atoms(put(pos), z, put(b_ceiling, np.float32), put(occ))
    if per_atom:
        k = _shell_terms(cfg)
        vol = ShellDecompositionVolume.from_atoms(atoms, put(res_ref), cfg.table, k)
        return ShellRenderFn(grid).with_plan(vol, b_margin=(below, 0.0), d_margin=cfg.d_margin if refine_res else 0.0)
    vol = IndependentAtomVolume.from_atoms(atoms, float(res), cfg.table)
    return SplatFourierRenderFn(grid, eps=1e-3, max_buckets=None if exact else 3).with_plan(vol, b_margin=(below, 0.0))


def _shell_terms(cfg: RefineConfig) -> int:
    from ..volumes._shell_decomposition import DEFAULT_SHELL_TERMS

    return DEFAULT_SHELL_TERMS if cfg.n_terms is None else int(cfg.n_terms)


def _setup(model, target, resolution, cfg: RefineConfig, *, grid, restraints, monomer_library, mask, mask_radius,
           resolutions, rigid_groups_, occupancy_groups, resolution_groups):
    """A `_Problem` and its `Static` for one structure."""
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0 Å, got {resolution}")
    params = cfg.parameters
    atoms, labels, data, grid = _as_inputs(model, target, grid)
    n = atoms.n_atoms
    dtype = jnp.float32
    pos0 = np.asarray(atoms.positions, np.float32)
    b0 = np.clip(np.asarray(atoms.b_factors, np.float32), *cfg.b_bounds) if "b" in params else np.asarray(
        atoms.b_factors, np.float32)
    occ0 = np.asarray(atoms.occupancies, np.float32)
    occ_groups = parameter_groups(labels, n, occupancy_groups, "occupancy_groups")
    res_groups = parameter_groups(labels, n, resolution_groups, "resolution_groups")

    # ---- restraints --------------------------------------------------------------------------
    if restraints is True:
        if not isinstance(model, AtomicModel):
            raise ValueError("restraints=True needs an AtomicModel (residue names); pass Restraints or False")
        restraints = build_restraints(model, monomer_library=monomer_library)
    elif restraints is False:
        restraints = None
    if restraints is not None and restraints.n_atoms != n:
        raise ValueError(f"the restraints are for {restraints.n_atoms} atoms, the model has {n}")
    if restraints is not None:
        # room for 50 % more contacts, so rebuilding the list later does not recompile
        restraints = restraints.with_nonbonded(pos0, headroom=1.5)

    # ---- the model map -----------------------------------------------------------------------
    refine_res = "res" in params
    per_atom = refine_res or resolutions is not None
    d_bounds = (max(cfg.d_bounds[0], D_RANGE[0]), min(cfg.d_bounds[1], D_RANGE[1]))
    b_margin = np.full(n, cfg.b_window)
    ceiling = _b_ceiling(b0, b_margin, cfg) if "b" in params else b0
    b_floor = None if "b" in params else float(np.min(b0))  # B kept: the plan holds the model's own B
    if per_atom:
        if resolutions is None and refine_res:
            resolutions = "scan"
        scan = isinstance(resolutions, str)
        if scan and (resolutions != "scan" or not refine_res):
            raise ValueError("resolutions must be a number, one per atom, or 'scan' (with 'res' refined)")
        res_ref = np.broadcast_to(np.asarray(resolution if resolutions is None or scan else resolutions, np.float32),
                                  (n,)).copy()
        d_lo = np.maximum(res_ref - cfg.d_margin, d_bounds[0])
        d_hi = np.minimum(res_ref + cfg.d_margin, d_bounds[1])
        plan = lambda c, exact: _render_fn(grid, pos0, atoms.atomic_numbers, c, occ0, None, True, cfg, refine_res,
                                           res_ref, exact, b_floor)
        render_fn = _model_map_fn(plan, ceiling, cfg, grid) if "b" in params else plan(ceiling, False)
        k = _shell_terms(cfg)
        start = ShellDecompositionVolume.from_atoms(
            Atoms(put(pos0), atoms.atomic_numbers, put(b0), put(occ0)), put(res_ref),
            cfg.table, k)
        res0 = res_ref
        if scan:
            scan_groups = res_groups if res_groups is not None else (
                parameter_groups(labels, n, "residue", "resolution_groups") if labels is not None else np.arange(n))
            res0 = np.asarray(scan_start(render_fn, start, data, grid, put(d_lo), put(d_hi),
                                         scan_groups, resolution), np.float32)
        table_arg, z_arg = (start.table, k), start.element_index
    else:
        res0 = d_lo = d_hi = None
        plan = lambda c, exact: _render_fn(grid, pos0, atoms.atomic_numbers, c, occ0, resolution, False, cfg, False,
                                           None, exact, b_floor)
        render_fn = _model_map_fn(plan, ceiling, cfg, grid) if "b" in params else plan(ceiling, False)
        start = IndependentAtomVolume.from_atoms(atoms, float(resolution), cfg.table)
        table_arg, z_arg = start.table, start.atomic_numbers
    unit_xyz, unit_b, unit_occ = units(b0.astype(np.float64), np.asarray(atoms.atomic_numbers), float(resolution),
                                       get_table(cfg.table), dtype)

    def grouped(groups, unit, per_atom_units):
        """(the parameter of each atom, the unit of each parameter): one per atom, or one per group
        padded to one per atom. No atom refers to a padding entry: its gradient is 0 and L-BFGS
        leaves it at 0. So a refinement per group has the shapes of one per atom of the same model
        and runs the same compiled loop (occupancies per residue, then per atom, compile once: the
        loop takes 3-5 s to compile on 7CEC chain A)."""
        if groups is None:
            return np.arange(n, dtype=np.int32), per_atom_units
        rel = group_units(pos0.astype(np.float64), b0.astype(np.float64), float(resolution), groups)
        padded = np.ones(n)
        padded[: len(rel)] = unit * rel
        return groups, put(padded, dtype)

    occ_groups, unit_occ_group = grouped(occ_groups, UNITS["occ"], unit_occ)
    res_groups, unit_res_group = grouped(res_groups, UNITS["res"], put(np.full(n, UNITS["res"]), dtype))

    # ---- mask, rigid groups, probes ----------------------------------------------------------
    if mask is None:
        radius = max(3.0, float(resolution)) if mask_radius is None else float(mask_radius)
        mask = atom_neighbourhood_mask(pos0, grid, radius)
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(grid.shape) or not mask.any():
        raise ValueError("the refinement mask must be a non-empty boolean array of the map's shape")
    groups = rigid_groups(labels, n, rigid_groups_)
    n_groups = int(groups.max()) + 1
    p = pos0.astype(np.float64)
    centres = np.stack([p[groups == g].mean(0) for g in range(n_groups)])
    radii = np.array([max(math.sqrt(np.mean(np.sum((p[groups == g] - centres[g]) ** 2, -1))), 1.0)
                      for g in range(n_groups)])
    probes = None
    if cfg.loss == "q":  # MapQ's probes: rejected near any non-hydrogen atom
        heavy = np.asarray(atoms.atomic_numbers) != 1
        probes = select_probes(pos0, pos0[heavy])

    static = Static(
        render_fn=render_fn, loss=cfg.loss, n_atoms=n,
        use_geometry=restraints is not None and bool(set(params) & {"xyz", "b", "occ", "res"}),
        # a rigid motion leaves the geometry as it is: restraints act on xyz, B, occupancy, resolution
        restrain_xyz="xyz" in params, restrain_b="b" in params, restrain_occ="occ" in params,
        restrain_res=refine_res, q_sigma=float(cfg.q_sigma),
    )
    moving = bool(set(params) & {"xyz", "rigid"}) and restraints is not None
    stale = restraints.nonbonded_buffer / 2 if moving else math.inf
    args = Args(
        positions=put(pos0), atomic_numbers=z_arg, z=put(atoms.atomic_numbers), b_factors=put(b0),
        occupancies=put(occ0), resolutions=None if res0 is None else put(res0),
        groups=put(groups), centres=put(centres, dtype), radii=put(radii, dtype),
        unit_xyz=unit_xyz, unit_b=unit_b, unit_occ=unit_occ, occ_groups=put(occ_groups),
        unit_occ_group=unit_occ_group, res_groups=put(res_groups), unit_res_group=unit_res_group,
        d_lo=None if d_lo is None else put(d_lo), d_hi=None if d_hi is None else put(d_hi),
        b_lo=put(np.full(n, cfg.b_bounds[0]), dtype), b_hi=put(ceiling, dtype), b_max=put(cfg.b_bounds[1], dtype),
        target=data, mask=put(mask), restraints=restraints, list_positions=put(pos0),
        stale_shift=put(stale, dtype), weight=put(1.0, dtype), probes=probes, grid=grid, table=table_arg,
    )
    sizes = {"xyz": (n, 3), "rigid": (n_groups, 6), "occ": (int(unit_occ_group.shape[0]),),
             "res": (int(unit_res_group.shape[0]),), "b": (n,)}
    u = {name: put(np.zeros(sizes[name]), dtype) for name in params}
    problem = _Problem(atoms=atoms, labels=labels, model=model if isinstance(model, AtomicModel) else None,
                       grid=grid, restraints=restraints, args=args, u=u, start_positions=pos0.astype(np.float64),
                       resolution=float(resolution), refine_res=refine_res, b_margin=b_margin)
    return problem, static


def _rebase(problem: _Problem, static: Static, cfg: RefineConfig, fold: bool = True) -> tuple[_Problem, Static, list]:
    """Do the host's work: rebuild a stale contact list, re-plan the model map for B that reached
    the plan's ceiling; and with `fold`, fold the parameters into the model (a new start for the
    next run, new units). Without it the parameters stay as they are, so that the next run can
    go on from the solver's state (the objective is the same function of them)."""
    args = problem.args
    pos, b, occ, res = (None if x is None else np.asarray(x) for x in _build_jit(problem.u, args))
    events = []
    new = {}
    shift = float(np.sqrt(np.max(np.sum((pos - np.asarray(args.list_positions)) ** 2, -1))))
    if problem.restraints is not None and shift > 0.25 * problem.restraints.nonbonded_buffer:
        capacity = int(problem.restraints.nonbonded_index.shape[0])
        try:
            restraints = problem.restraints.with_nonbonded(pos, capacity=capacity)
        except ValueError:  # more contacts than the padded list holds: grow it (one recompilation)
            restraints = problem.restraints.with_nonbonded(pos, headroom=1.5)
        problem.restraints = restraints
        new["restraints"] = restraints
        new["list_positions"] = put(pos)
        events.append(f"contacts rebuilt after a {shift:.2f} Å move")
    if "b" in problem.u:
        hi = np.asarray(args.b_hi)
        at_ceiling = (b >= hi - 1e-3) & (hi < cfg.b_bounds[1])
        if at_ceiling.any():
            # every atom around its B now: the atoms on their way up get room too (an atom held at
            # its ceiling, a stiff wall, spoils L-BFGS's curvature pairs: 7CEC from a flat B took
            # 70 steps to an RMSE of 3 Å² re-planning only the atoms at the ceiling, 10 this way)
            problem.b_margin = _grown_margin(problem.b_margin, b, np.asarray(args.b_hi) - problem.b_margin)
            ceiling = _b_ceiling(b, problem.b_margin, cfg)
            res_ref = None if res is None else np.asarray(res)
            plan = lambda c, exact: _render_fn(problem.grid, pos, problem.atoms.atomic_numbers, c, occ,
                                               problem.resolution, isinstance(static.render_fn, ShellRenderFn), cfg,
                                               problem.refine_res, res_ref, exact)
            static = dataclasses.replace(static, render_fn=_model_map_fn(plan, ceiling, cfg, problem.grid,
                                                                         static.render_fn, pos))
            new["b_hi"] = put(ceiling, np.float32)
            events.append(f"model map re-planned: {int(at_ceiling.sum())} atoms reached their B ceiling")
    if fold:
        # the parameters folded into the model: the run starts again at u = 0
        new.update(positions=put(pos), b_factors=put(b), occupancies=put(occ))
        if res is not None:
            new["resolutions"] = put(res)
        if "b" in problem.u:
            # B units follow B (the map's curvature in B falls as B grows)
            new["unit_xyz"], new["unit_b"], new["unit_occ"] = units(
                b.astype(np.float64), np.asarray(problem.atoms.atomic_numbers), problem.resolution,
                get_table(cfg.table), jnp.float32)
            new["unit_b"] = new["unit_b"] * problem.unit_scale.get("b", 1.0)
        problem.u = {k: put(np.zeros(v.shape), v.dtype) for k, v in problem.u.items()}
    names = list(new)
    problem.args = eqx.tree_at(lambda a: [getattr(a, k) for k in names], args, [new[k] for k in names],
                               is_leaf=lambda x: x is None)
    return problem, static, events


_build_jit = eqx.filter_jit(build)

_UNIT_ARGS = {"b": "unit_b", "occ": "unit_occ_group", "res": "unit_res_group"}


def _probe(rng: np.random.Generator, x) -> np.ndarray:
    """A random direction of ±0.1 units for the parameters `x` (numpy, `x`'s dtype): where the
    weight and the unit balance measure the objective's curvature."""
    return (0.1 * rng.choice([-1.0, 1.0], x.shape)).astype(x.dtype)


def _moved(x, v: np.ndarray):
    """`x + v` on the host, then on the device (an eager jnp sum compiles once per shape)."""
    return put(np.asarray(x) + v)


def _balance_units(pr: _Problem, parts: Callable, gm: np.ndarray, gg: np.ndarray, w: float) -> None:
    """Rescale the units of B, occupancies and resolutions refined beside coordinates so that each
    kind has the objective's curvature of the coordinates (a diagonal preconditioner across kinds).

    The per-atom units (`units`) make atoms of one kind alike through the map term alone; with
    coordinates, the restraints (σ 0.02 Å on bonds) make their curvature tens of times the map's,
    and L-BFGS, scaled to it, took steps in B too short to move: the demo's helix kept its mean B
    at 20.2 Å² against a target's 40 after 60 steps. The curvature of each kind is measured along
    a random ±0.1-unit direction of that kind alone, at the map weight `w`."""
    if not ({"xyz", "rigid"} & set(pr.u) and set(_UNIT_ARGS) & set(pr.u)):
        return  # nothing to balance against the coordinates
    keys = sorted(pr.u)
    sizes = [int(np.prod(pr.u[k].shape)) for k in keys]
    cuts = np.cumsum([0, *sizes])
    rng = np.random.default_rng(1)
    curvature = {}
    for i, k in enumerate(keys):
        v = _probe(rng, pr.u[k])
        gm_v, gg_v = parts({**pr.u, k: _moved(pr.u[k], v)})
        sl = slice(cuts[i], cuts[i + 1])
        flat = np.ravel(np.asarray(v, np.float64))
        curvature[k] = flat @ (w * (gm_v[sl] - gm[sl]) + (gg_v[sl] - gg[sl])) / (flat @ flat)
    ref = curvature.get("xyz", curvature.get("rigid"))
    if ref is None or not ref > 0:
        return
    for k, name in _UNIT_ARGS.items():
        if k in curvature and curvature[k] > 0:
            scale = float(np.clip(math.sqrt(ref / curvature[k]), 0.1, 100.0))
            pr.unit_scale[k] = scale
            pr.args = eqx.tree_at(lambda a: getattr(a, name), pr.args, getattr(pr.args, name) * scale)
            pr.events.append(f"{k} unit × {scale:.3g} (curvature balanced with the coordinates)")


class _Reporter:
    """The host end of the solver's callback: the progress bar and the user's callback."""

    def __init__(self, progress: Progress, callback, problem: _Problem, refine_res: bool):
        self.progress, self.callback, self.problem, self.refine_res = progress, callback, problem, refine_res
        self.offset = 0

    def __call__(self, step, value, aux, extra):
        self.progress.update(self.offset + int(step), value, aux)
        if self.callback is not None and not (int(step) == 0 and self.offset > 0):  # a run's start: seen already
            pos, b, occ, res = (None if x is None else np.asarray(x) for x in extra)  # the atoms
            self.callback(self.offset + int(step), Atoms(pos, np.asarray(self.problem.atoms.atomic_numbers), b, occ),
                          res if self.refine_res else None)


def _append(problem: _Problem, state, cycle: int, first: bool):
    n = int(state.step)
    rows = np.arange(0 if first else 1, n + 1)
    h = jax.tree_util.tree_map(np.asarray, state.history)  # indexing device arrays compiles a gather
    aux = h["aux"]
    for r in rows:
        problem.history.append({
            "step": problem.steps + int(r), "loss": float(h["value"][r]), "map_loss": float(aux["map_loss"][r]),
            "geometry": float(aux["geometry"][r]), "bond_rmsd": float(aux["bond_rmsd"][r]),
            "angle_rmsd": float(aux["angle_rmsd"][r]), "map_weight": problem.weight, "cycle": cycle})


def _run_all(problems: list[_Problem], statics: list[Static], cfg: RefineConfig, *, batched: bool,
             progress: bool, callback) -> None:
    """The host loop over compiled runs (module docs), for one structure or a batch."""
    solver = LBFGS(rtol=cfg.rtol)
    per_run = -(-cfg.max_steps // cfg.macro_cycles)
    budgets = [cfg.max_steps // cfg.macro_cycles + (1 if c < cfg.max_steps % cfg.macro_cycles else 0)
               for c in range(cfg.macro_cycles)]
    budgets = [s for s in budgets if s > 0]

    bar = Progress(progress and not batched, cfg.max_steps)
    reporter = _Reporter(bar, callback, problems[0], problems[0].refine_res) if (
        not batched and (bar.enabled or callback is not None)) else None
    monitor = None
    if reporter is not None:
        tag = next(_TAGS)
        _REPORTERS[tag] = reporter
        monitor = _Monitor(put(tag, np.int32), callback is not None)

    def start(st: Static, u, args, state=None):
        """Where a run starts: the state a stopped run left (`state`), else a fresh one at `u`."""
        return state if state is not None else _init_state(_Objective(st), solver, u, args, per_run,
                                                           objective_structure(args))

    def run(st: Static, state, args, budget: int):
        """One compiled run of one structure (the same compiled function for every call, from a
        fresh state or one that goes on)."""
        return minimise(_Objective(st), solver, state, args, per_run, put(budget, np.int32), _needs_host,
                        None if reporter is None else _report, cfg.progress_every, monitor)

    def weigh(pr: _Problem, st: Static, cycle: int) -> None:
        """The automatic map weight at the start of a run (module docs)."""
        if cfg.map_weight != "auto":
            w = float(cfg.map_weight)
        elif pr.restraints is None or not st.use_geometry:
            w = 1.0  # nothing to balance the map against
        else:
            at = {x: eqx.tree_at(lambda a: a.weight, pr.args, put(x, np.float32)) for x in (0.0, 1.0)}

            def gradient(u, weight: float) -> np.ndarray:
                """The objective's gradient at u and map weight `weight`, flat, in float64: from the
                compiled run itself (no step taken), so that no other function is compiled."""
                state = run(st, start(st, u, at[weight]), at[weight], 0)
                return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(state.grad)])

            def parts(u):
                """(∇(n L_map), ∇E_geom) at u: the gradient at w = 1 minus the gradient at w = 0,
                which is the restraints' alone (the map term and the bound penalty scale with w)."""
                gg = gradient(u, 0.0)
                return gradient(u, 1.0) - gg, gg

            gm, gg = parts(pr.u)
            if st.restrain_xyz:  # the gradients' balance
                w = cfg.weight_scale * math.sqrt(gg @ gg / (gm @ gm)) if gm @ gm > 0 and gg @ gg > 0 else 1.0
            else:
                # B, occupancy or resolution alone: the restraints' gradient may vanish at the start
                # (every B alike); balance the curvatures along a random ±0.1-unit direction instead
                rng = np.random.default_rng(0)
                v = {k: _probe(rng, x) for k, x in pr.u.items()}
                gm_v, gg_v = parts({k: _moved(pr.u[k], v[k]) for k in pr.u})
                flat = np.concatenate([np.ravel(np.asarray(v[k], np.float64)) for k in sorted(v)])
                hm, hg = flat @ (gm_v - gm), flat @ (gg_v - gg)
                w = hg / hm if hm > 0 and hg > 0 else 1.0
            if cycle > 0:  # never raised: a fit that converges shrinks the map's gradient, not its noise
                w = min(w, pr.weight / 3.0 if pr.loose else pr.weight)
                pr.events.append(f"cycle {cycle}: map weight {w:.4g}")
            elif len(pr.u) > 1:
                _balance_units(pr, parts, gm, gg, w)
        pr.weight = w
        pr.args = eqx.tree_at(lambda a: a.weight, pr.args, put(w, np.float32))
        pr.state = None  # another objective: the L-BFGS memory starts again

    cycle = 0
    extra_cycles = 0
    first = True
    try:
        while cycle < len(budgets):
            if cycle == 0 or cfg.map_weight == "auto":
                for pr, st in zip(problems, statics):
                    # coordinates: re-weighed every cycle (the restraints' gradient falls as the
                    # geometry settles); B, occupancy, resolution alone: weighed once, at the start
                    if not pr.done and (cycle == 0 or st.restrain_xyz):
                        weigh(pr, st, cycle)
            left = [budgets[cycle]] * len(problems)
            while True:
                budget = [0 if pr.done else b for pr, b in zip(problems, left)]
                if not any(budget):
                    break
                if batched:
                    # one compiled call for the batch; members that are done get no steps
                    args = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[pr.args for pr in problems])
                    starts = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[
                        start(statics[0], pr.u, pr.args, pr.state) for pr in problems])
                    states = _minimise_batch(_Objective(statics[0]), solver, starts, args, per_run,
                                             put(budget, np.int32))
                    states = [jax.tree_util.tree_map(lambda x, i=i: x[i], states) for i in range(len(problems))]
                else:
                    if reporter is not None:
                        reporter.offset = problems[0].steps
                    pr = problems[0]
                    states = [run(statics[0], start(statics[0], pr.u, pr.args, pr.state), pr.args, budget[0])]
                stopped = False
                for i, (pr, state) in enumerate(zip(problems, states)):
                    if budget[i] == 0:
                        continue
                    code = int(state.result)
                    _append(pr, state, cycle, first)
                    pr.steps += int(state.step)
                    pr.evaluations += int(state.evaluations)
                    left[i] -= int(state.step)
                    if code == NONFINITE:
                        pr.done, pr.result = True, "nonfinite"
                        continue
                    pr.u = state.y
                    pr.result = RESULT_NAMES[code]
                    # a run stopped for the host's work goes on from where it stopped (its L-BFGS
                    # memory kept); one that ended starts the next afresh
                    pr.state = state if code == STOPPED else None
                    if code == STOPPED:
                        stopped = True
                    elif code != MAX_STEPS:
                        left[i] = 0  # converged: this cycle is over for it
                first = False
                for i, pr in enumerate(problems):
                    if pr.done:
                        continue
                    pr, st, events = _rebase(pr, statics[i], cfg, fold=pr.state is None)
                    statics[i] = st
                    pr.events.extend(f"cycle {cycle}: {e}" for e in events)
                    if pr.result == "converged" and not events and not (st.restrain_xyz and cfg.map_weight == "auto"):
                        # converged, nothing re-planned or rebuilt, a weight that stays: a later
                        # cycle would start at this minimum and end at it (its line searches fail)
                        pr.done = True
                if batched:
                    if any(s.render_fn is not statics[0].render_fn for s in statics[1:]):
                        # one plan for the batch: re-plan every member's map like the widest
                        statics = _common_static(problems, statics, cfg)
                    _same_capacity(problems)
                # a run stopped for a stale contact list goes on from the rebuilt list (each such run
                # takes at least one step: the list is fresh at its start), until its steps are used
                if not (stopped and any(x > 0 for x in left)):
                    break
            # ---- end of a macro-cycle: the geometry and the weight ------------------------------
            for pr, st in zip(problems, statics):
                if pr.done or not st.restrain_xyz or pr.restraints is None:
                    continue
                # the last accepted point's rmsds, recorded by the compiled run (the model now)
                bond, angle = pr.history[-1]["bond_rmsd"], pr.history[-1]["angle_rmsd"]
                pr.loose = bond > cfg.max_bond_rmsd or angle > cfg.max_angle_rmsd
                if pr.loose:
                    pr.events.append(f"cycle {cycle}: bond rmsd {bond:.4f} Å, angle rmsd {angle:.2f}°: loose")
            last = cycle == len(budgets) - 1
            if last and extra_cycles < _EXTRA_CYCLES and cfg.map_weight == "auto" and any(
                    pr.loose and not pr.done for pr in problems):
                budgets.append(max(budgets[-1] // 2, 10))
                extra_cycles += 1
            cycle += 1
    finally:
        bar.close()
        if monitor is not None:
            _REPORTERS.pop(int(monitor.tag), None)


@eqx.filter_jit
def _init_state(fn, solver: LBFGS, u, args, max_steps: int, structure):
    """A fresh solver state at `u` (compiled: no objective is evaluated, nor traced)."""
    return solver.init(fn, u, args, max_steps, structure)


@eqx.filter_jit
def _minimise_batch(fn, solver, states, args, max_steps: int, budget):
    """`minimise` vmapped over a batch of structures (leading axis of `states`, `args` and `budget`)."""
    return eqx.filter_vmap(lambda s_, a_, b_: minimise(fn, solver, s_, a_, max_steps, b_, _needs_host))(
        states, args, budget)


def _same_capacity(problems) -> None:
    """Pad every member's contact list to the longest (a batch stacks them)."""
    with_lists = [p for p in problems if p.restraints is not None]
    if not with_lists:
        return
    capacity = max(int(p.restraints.nonbonded_index.shape[0]) for p in with_lists)
    for p in with_lists:
        if int(p.restraints.nonbonded_index.shape[0]) != capacity:
            p.restraints = p.restraints.with_nonbonded(np.asarray(p.args.list_positions), capacity=capacity)
            p.args = eqx.tree_at(lambda a: a.restraints, p.args, p.restraints)


def _common_static(problems, statics, cfg):
    """Batched runs share one compiled objective: plan the model map for every member's ceiling."""
    ceilings = np.stack([np.asarray(pr.args.b_hi) for pr in problems])
    ceiling = ceilings.max(0)
    pr = problems[0]
    res_ref = None if pr.args.resolutions is None else np.asarray(pr.args.resolutions)
    pos = np.stack([np.asarray(p.args.positions) for p in problems])
    render_fn = _render_fn(pr.grid, pos, pr.atoms.atomic_numbers, ceiling, np.asarray(pr.args.occupancies),
                           pr.resolution, isinstance(statics[0].render_fn, ShellRenderFn), cfg, pr.refine_res,
                           res_ref)
    for p in problems:
        p.args = eqx.tree_at(lambda a: a.b_hi, p.args, put(ceiling, np.float32))
    return [dataclasses.replace(s, render_fn=render_fn) for s in statics]


def _result(problem: _Problem, cfg: RefineConfig, mask, t0: float) -> RefineResult:
    pos, b, occ, res = (None if x is None else np.asarray(x) for x in _build_jit(problem.u, problem.args))
    if "occ" in cfg.parameters:  # the soft bound lets them overshoot by ~1e-3 (`bound_penalty`)
        occ = np.clip(occ, 0.0, 1.0)
    atoms = Atoms(pos, problem.atoms.atomic_numbers, b, occ)
    model = problem.model.replace(atoms=atoms) if problem.model is not None else None
    keys = ("step", "loss", "map_loss", "geometry", "bond_rmsd", "angle_rmsd", "map_weight", "cycle")
    history = {k: np.asarray([row[k] for row in problem.history]) for k in keys}
    geometry = geometry_report(problem.restraints, problem.start_positions, pos, np.asarray(problem.atoms.atomic_numbers),
                               problem.labels)
    return RefineResult(
        atoms=atoms, resolution=res if problem.args.resolutions is not None else None, model=model, history=history,
        result=problem.result if problem.result != "stopped" else "max_steps", n_steps=problem.steps,
        n_evaluations=problem.evaluations, map_weight=problem.weight, mask=np.asarray(mask), geometry=geometry,
        monomer_library=None if problem.restraints is None else problem.restraints.library, events=problem.events,
        time=time.perf_counter() - t0,
    )


def refine(
    model: AtomicModel | Atoms,
    target: DensityMap | Float[Array, "nz ny nx"],
    resolution: float,
    config: RefineConfig | None = None,
    *,
    grid: Grid | None = None,
    restraints: Restraints | bool | None = True,
    monomer_library: str | None = None,
    mask: Array | np.ndarray | None = None,
    mask_radius: float | None = None,
    resolutions: float | Float[Array, " n"] | Literal["scan"] | None = None,
    rigid_groups: np.ndarray | None = None,
    occupancy_groups: Literal["residue", "atom"] | np.ndarray | None = None,
    resolution_groups: Literal["residue", "atom"] | np.ndarray | None = None,
    progress: bool = True,
    callback: Callable[[int, Atoms, np.ndarray | None], None] | None = None,
    **options,
) -> RefineResult:
    """Refine a model against a map under geometry restraints (module docs).

    **Arguments:**

    - `model`: an `AtomicModel` (needed for restraints; `read_model`) or bare `Atoms`.
    - `target`: the map, a `DensityMap` or an array `(nz, ny, nx)` with `grid`.
    - `resolution`: the map's resolution D in Å (the model map's resolution; the start of
      per-atom resolutions unless `resolutions` is given).
    - `config`: a `RefineConfig` (default: its defaults); any of its fields may also be given as
      keywords (`refine(model, map, 3.0, parameters=("b",), max_steps=50)`).
    - `restraints`: `True` builds them (`build_restraints`, with `monomer_library`), a
      `Restraints` uses those, `False`/`None` refines unrestrained.
    - `monomer_library`: a CCP4 monomer library folder for `restraints=True` (default: the CCD);
      `RefineResult.monomer_library` says which was used.
    - `mask`: voxels of the map term (boolean `(nz, ny, nx)`); default: within `mask_radius` of
      the starting atoms (default max(3 Å, D)).
    - `resolutions`: per-atom starting resolutions (Å) for the shell-decomposition model map (a
      number or one per atom), or `"scan"`: start each residue (or resolution group) at the
      uniform resolution in `resolution ± d_margin` whose model map correlates best with the
      target near its atoms (`modelmap.refine._scan`). Default: `"scan"` when `"res"` is refined,
      else `resolution` for every atom (the Fourier model map).
    - `rigid_groups`: `(n,)` group id of every atom, one rigid body per group (default: per chain).
    - `occupancy_groups`, `resolution_groups`: `None`/`"atom"` (one parameter per atom),
      `"residue"` (per residue and alternate conformer; needs an `AtomicModel`) or `(n,)` ids.
    - `progress`: a progress bar on the terminal (every `progress_every` steps).
    - `callback`: called on the host as `callback(step, atoms, resolution)` every
      `progress_every` steps (numpy-backed `Atoms`; per-atom resolutions or `None`).

    **Returns:** a `RefineResult` (with `summary()` and a `geometry` report).
    """
    cfg = _config(config, options)
    t0 = time.perf_counter()
    problem, static = _setup(model, target, resolution, cfg, grid=grid, restraints=restraints,
                             monomer_library=monomer_library, mask=mask, mask_radius=mask_radius,
                             resolutions=resolutions, rigid_groups_=rigid_groups, occupancy_groups=occupancy_groups,
                             resolution_groups=resolution_groups)
    _run_all([problem], [static], cfg, batched=False, progress=progress, callback=callback)
    return _result(problem, cfg, problem.args.mask, t0)


def refine_batch(
    models: Sequence[AtomicModel | Atoms],
    targets: Sequence[DensityMap | Float[Array, "nz ny nx"]],
    resolution: float,
    config: RefineConfig | None = None,
    *,
    grid: Grid | None = None,
    restraints: Sequence[Restraints] | bool | None = True,
    monomer_library: str | None = None,
    **options,
) -> list[RefineResult]:
    """Refine several structures of the same size against their maps in one compiled call per run
    (`vmap` of the solver): conformations or copies of one model, or any structures with the same
    number of atoms, with maps on one grid. Each member converges as it would alone (its own
    map weight, contact list, stopping point); the model map is planned for every member.

    **Arguments:** as `refine`, with sequences of models and targets (and optionally of
    `Restraints`); `grid` applies to array targets.

    **Returns:** one `RefineResult` per structure.
    """
    cfg = _config(config, options)
    if len(models) != len(targets) or not len(models):
        raise ValueError(f"refine_batch needs as many targets as models, got {len(models)} and {len(targets)}")
    t0 = time.perf_counter()
    rs = restraints if isinstance(restraints, (list, tuple)) else [restraints] * len(models)
    built = [_setup(m, t, resolution, cfg, grid=grid, restraints=r, monomer_library=monomer_library, mask=None,
                    mask_radius=None, resolutions=None, rigid_groups_=None, occupancy_groups=None,
                    resolution_groups=None) for m, t, r in zip(models, targets, rs)]
    problems = [b[0] for b in built]
    sizes = sorted({p.atoms.n_atoms for p in problems})
    if len(sizes) != 1:
        raise ValueError(f"refine_batch needs structures with the same number of atoms; got {sizes}")
    grids = {p.grid for p in problems}
    if len(grids) != 1:
        raise ValueError("refine_batch needs every target on one grid (shape, voxel size and origin)")
    _same_capacity(problems)
    statics = _common_static(problems, [b[1] for b in built], cfg)
    _run_all(problems, statics, cfg, batched=True, progress=False, callback=None)
    return [_result(p, cfg, p.args.mask, t0) for p in problems]
