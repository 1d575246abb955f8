"""Batches: one map per structure (or per pose), never averaged.

A batch of structures of different sizes is padded to a few bucket sizes with zero-occupancy atoms
(whose images are exactly 0), stacked on a leading axis, and rendered by one compiled function per
bucket under `lax.map(..., batch_size=...)`, which bounds the memory held at once. One render
function, planned from the whole batch's bounds (`with_bounds`), serves every bucket: it depends on
no value of any structure, so another batch within the same bounds reuses the compiled functions.
The window an atom needs grows with its widest Gaussian (`b_k + B`: 7CEC's atoms span 72-269 Å²),
so each structure's atoms are sorted from the narrowest to the widest and every chunk of them gets
the smallest of a few window sizes that holds it, chosen from the values when it is rendered
(`WindowClasses`; one window sized for the widest atom costs 1.9× per map: 13.0 against 6.9 ms
for 64 regions of 7CEC in 64³ boxes of 1.5 Å on the CPU).
Everything is differentiable through the whole batch.

Maps either share one grid, or each structure gets a box of the same shape centred on it (the
shape ML models train on): its origin is a whole number of voxels (written as an MRC `nstart`), and
the structure is rendered shifted by minus that origin on one reference grid whose origin is 0 —
the same map, exactly, because every renderer depends on positions only relative to the grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jaxtyping import Array, Float

from .._atoms import Atoms, validate_atoms
from .._errors import InvalidAtomsError
from .._grid import Grid
from .._sharding import shard_leading
from ..render import (
    AbstractRenderFn,
    GaussianMixtureRenderFn,
    RenderBounds,
    ShellRenderFn,
    SplatFourierRenderFn,
)
from ..render._render import volume_for_method
from ..render._windows import locality_order
from ..scattering import get_table
from ..volumes import DEFAULT_SHELL_TERMS, AbstractVolume

__all__ = [
    "assemble",
    "default_batch_size",
    "BatchGroup",
    "BatchMaps",
    "bucket_size",
    "member_count",
    "pad_atoms",
    "plan_batch",
    "render_batch",
    "render_poses",
    "render_stacked",
    "stack_volumes",
]

METHODS = ("gaussian", "fourier", "shells")


def default_batch_size(platform: str | None = None) -> int:
    """Structures per step of a batch's `lax.map` on `platform` (default: JAX's default backend):
    1 on the CPU, where XLA runs one computation on one core and a vmapped window loop becomes
    batched scatters (measured: 1.5-2× slower per map for the Gaussian and Fourier methods at 16
    than at 1); 32 elsewhere, where the structures of a step run in parallel."""
    return 1 if (platform or jax.default_backend()) == "cpu" else 32


def bucket_size(n: int, minimum: int = 256) -> int:
    """The padded size of a structure of `n` atoms: the smallest of `minimum · 2^k · (1, 5/4, 3/2,
    7/4)` that holds it (at most 25 % padding above `minimum`, four sizes per doubling)."""
    size = minimum
    while True:
        for s in (size, size * 5 // 4, size * 3 // 2, size * 7 // 4):
            if s >= n:
                return s
        size *= 2


def member_count(m: int) -> int:
    """The padded member count of a group of `m` structures: the smallest of 1, 2, 3, 4, 6, 8, 12,
    16, … (`2^k` and `3 · 2^k`) that holds it. A new batch whose groups pad to counts already seen
    compiles nothing new; the padding members are silent (every atom at zero occupancy)."""
    if m < 1:
        raise ValueError(f"a group holds at least one structure, got {m}")
    size = 1
    while True:
        for s in (size, size * 3 // 2):
            if s >= m:
                return s
        size *= 2


def pad_atoms(atoms: Atoms, n: int) -> Atoms:
    """`atoms` padded to `n` atoms with zero-occupancy copies of its first atom placed at the mean
    position: they contribute exactly 0 to any map and do not move the structure's centre."""
    return Atoms(*_padded(atoms, n))


def _padded(atoms: Atoms, n: int) -> tuple:
    """The four arrays of `pad_atoms` (numpy for numpy inputs: eager jnp ops compile once per
    atom count, ~0.5 s per new size)."""
    k = atoms.positions.shape[0]
    if k > n:
        raise ValueError(f"cannot pad {k} atoms to {n}")
    extra = n - k
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(atoms)) else jnp
    centre = xp.mean(atoms.positions, axis=0)
    return (
        xp.concatenate([atoms.positions, xp.broadcast_to(centre, (extra, 3))]),
        xp.concatenate([atoms.atomic_numbers, xp.broadcast_to(atoms.atomic_numbers[:1], (extra,))]),
        xp.concatenate([atoms.b_factors, xp.broadcast_to(atoms.b_factors[:1], (extra,))]),
        xp.concatenate([atoms.occupancies, xp.zeros((extra,), atoms.occupancies.dtype)]),
    )


def stack_volumes(volumes: Sequence[AbstractVolume]) -> AbstractVolume:
    """Volumes of one kind and size stacked on a leading axis (their shared tables are kept once;
    numpy leaves give numpy leaves)."""
    parts = [_split(v) for v in volumes]
    # numpy leaves stack on the host (jnp.stack compiles once per count of volumes)
    xp = np if all(isinstance(x, np.ndarray) for p in parts for x in jax.tree.leaves(p[0])) else jnp
    stacked = jax.tree.map(lambda *xs: xp.stack(xs), *[p[0] for p in parts])
    return eqx.combine(stacked, parts[0][1])


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _built(method: str, arrays: tuple, resolution: float, table: str, n_terms: int) -> AbstractVolume:
    return volume_for_method(method, Atoms(*arrays), resolution, table, n_terms)


def _host_volume(method: str, arrays: tuple, resolution: float, table: str, n_terms: int) -> AbstractVolume:
    """The volume of one padded structure (`_padded` arrays), with numpy leaves, built on the host
    CPU: the Gaussian and Fourier volumes by one compiled call per bucket size (eager ops would
    compile anew for every new shape and dispatch ~20 times per structure), the shell volume
    eagerly (its element tables are chosen from the concrete atomic numbers)."""
    with jax.default_device(jax.devices("cpu")[0]):
        if method == "shells":
            volume = volume_for_method(method, Atoms(*arrays), resolution, table, n_terms)
        else:
            volume = _built(method, arrays, float(resolution), table, n_terms)
        return jax.tree.map(np.asarray, volume)


def _split(volumes: AbstractVolume):
    """(per-atom leaves, shared rest) of a volume, stacked or not (`batch_axes`)."""
    axes = volumes.batch_axes()
    spec = jax.tree.map(lambda a: a == 0 if a is not None else False, axes, is_leaf=lambda x: x is None)
    return eqx.partition(volumes, spec)


@eqx.filter_jit
def render_stacked(
    render_fn: AbstractRenderFn, volumes: AbstractVolume, batch_size: int | None = None, mesh: Mesh | None = None
) -> Float[Array, "B nz ny nx"]:
    """The map of every volume of a stacked batch: `lax.map` over the leading axis, `batch_size`
    volumes at a time (vmapped inside each step; `None` or 1: one at a time, without vmap).

    **Arguments:**

    - `render_fn`: a planned render function (`with_bounds`, or `with_plan` of the stacked batch).
    - `volumes`: volumes stacked on a leading axis (`stack_volumes`, `plan_batch`).
    - `batch_size`: volumes per step, bounding the memory held at once (per device with `mesh`).
    - `mesh`: a `jax.sharding.Mesh`: the batch axis is split over all of its devices
      (`jax.shard_map`), each device rendering its own run of volumes; only the render function's
      arrays and the volumes' shared tables are replicated (`modelmap._sharding.shard_leading`).
      `None`: one device.

    **Returns:** `(B, nz, ny, nx)` (sharded over `mesh` when given); differentiable with respect to
    `volumes` (and `render_fn`'s arrays).
    """
    dynamic, static = _split(volumes)

    def run(d, shared):
        fn, rest = shared
        n = jax.tree_util.tree_leaves(d)[0].shape[0]
        size = None if batch_size is None else min(int(batch_size), n)
        # one at a time without vmap: lax.map(batch_size=1) vmaps each step over an axis of 1, which
        # turns the CPU window loop's in-place updates into scatters and makes its trip count batched
        return lax.map(lambda x: fn(eqx.combine(x, rest)), d, batch_size=None if size == 1 else size)

    if mesh is None:
        return run(dynamic, (render_fn, static))
    return shard_leading(run, mesh, dynamic, (render_fn, static))


@eqx.filter_jit
def render_poses(
    render_fn: AbstractRenderFn,
    volume: AbstractVolume,
    rotations,
    translations=None,
    center=None,
    batch_size: int | None = None,
) -> Float[Array, "P nz ny nx"]:
    """One map per pose of one volume: `x' = R (x - c) + c + t` (see `AbstractVolume.rotate_to_pose`).

    **Arguments:**

    - `render_fn`: a planned render function.
    - `volume`: one structure's volume.
    - `rotations`: `(P, 3, 3)` matrices or `(P, 4)` unit quaternions (w, x, y, z);
      `modelmap.euler_to_matrix` turns RELION angles into matrices.
    - `translations`: `(P, 3)` shifts in Å (default none).
    - `center`: `(3,)` fixed point of the rotations in Å (default the mean of the positions).
    - `batch_size`: poses per step of the `lax.map`.

    **Returns:** `(P, nz, ny, nx)`.
    """
    rotations = jnp.asarray(rotations)
    p = rotations.shape[0]
    shifts = jnp.zeros((p, 3), volume.positions.dtype) if translations is None else jnp.asarray(translations)

    def one(pose):
        r, t = pose
        return render_fn(volume.rotate_to_pose(r, center).translate_to_pose(t))

    size = None if batch_size is None else min(int(batch_size), p)
    return lax.map(one, (rotations, shifts), batch_size=None if size == 1 else size)  # as render_stacked


class BatchGroup(eqx.Module):
    """Structures padded to one bucket size, stacked, with the render function that covers them.

    - `volumes`: the stacked volumes `(B_pad, n_bucket, ...)`, positions shifted into the reference
      grid, each structure's atoms sorted by width (`plan_batch`). The first `len(indices)` members
      are the structures; the rest (`member_count`) are silent padding members, every atom at zero
      occupancy, whose maps are exactly 0 and are dropped by `assemble`.
    - `render_fn`: the planned render function on the reference grid.
    - `indices`: the structure of each real member, in order (static).
    - `atom_index`: `(B_pad, n_bucket)` the index in its structure of the atom in each slot, -1 for a
      padding slot or member (numpy): gradients with respect to `volumes` map back to the
      structures' atoms.
    - `origins`: `(len(indices), 3)` x, y, z in Å of each structure's grid point (0, 0, 0) (numpy).
    """

    volumes: AbstractVolume
    render_fn: AbstractRenderFn
    indices: tuple[int, ...] = eqx.field(static=True)
    atom_index: np.ndarray
    origins: np.ndarray


@dataclasses.dataclass(frozen=True)
class BatchMaps:
    """The maps of a batch, in input order, and where each lies.

    - `maps`: `(B, nz, ny, nx)` (Å⁻² for the electron table).
    - `origins`: `(B, 3)` x, y, z in Å of each map's grid point (0, 0, 0).
    - `shape`, `voxel_size`: the maps' common grid shape `(nz, ny, nx)` and voxel `(vx, vy, vz)` Å.
    """

    maps: Array
    origins: np.ndarray
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]

    def grid(self, i: int) -> Grid:
        """The `Grid` of map `i` (for `write_map(path, maps[i], batch.grid(i))`)."""
        return Grid(self.shape, self.voxel_size, tuple(float(x) for x in self.origins[i]))


def _box_origins(structures: Sequence[Atoms], shape, voxel, names) -> np.ndarray:
    """Origins (whole voxels) of boxes of `shape` centred on each structure; a structure that does
    not fit is an error naming it."""
    nz, ny, nx = shape
    span = (np.array([nx, ny, nz]) - 1) * voxel
    origins = []
    for k, a in enumerate(structures):
        p = np.asarray(a.positions, np.float64)
        lo, hi = p.min(0), p.max(0)
        origin = np.round(((lo + hi) / 2 - span / 2) / voxel) * voxel
        if np.any(lo < origin - 1e-6) or np.any(hi > origin + span + 1e-6):
            ext = hi - lo
            raise InvalidAtomsError(
                f"{names[k]} spans {ext[0]:.1f} x {ext[1]:.1f} x {ext[2]:.1f} Å (x, y, z), more than the "
                f"box of {nx} x {ny} x {nz} voxels of {voxel[0]:g} Å holds "
                f"({span[0]:.1f} x {span[1]:.1f} x {span[2]:.1f} Å); use a larger box or voxel size"
            )
        origins.append(origin)
    return np.asarray(origins)


def plan_batch(
    structures: Sequence[Atoms],
    resolution: float,
    *,
    method: Literal["gaussian", "fourier", "shells"] = "gaussian",
    grid: Grid | None = None,
    box: int | tuple[int, int, int] | None = None,
    voxel_size: float | tuple[float, float, float] = 1.0,
    sampling: Literal["average", "point"] | None = None,
    table: str = "electron",
    n_terms: int = DEFAULT_SHELL_TERMS,
    bucket_minimum: int = 256,
    b_step: float = 50.0,
    b_margin: float = 0.0,
    window_classes: int | None = None,
    pad_members: bool = True,
    names: Sequence[str] | None = None,
) -> list[BatchGroup]:
    """Pad, group and stack a batch of structures, with a render function that covers all of them.

    **Arguments:**

    - `structures`: `Atoms`, one structure each (`(n_i, ...)`; concrete).
    - `resolution`: D in Å (`method` decides its meaning, as in `modelmap.render_model`).
    - `method`: `"gaussian"`, `"fourier"` (`SplatFourierRenderFn`: pure JAX on any device,
      the NUFFT map to 1e-5; its windows and blur come from the bounds) or `"shells"`.
    - `grid`: one grid shared by every map; or
    - `box`: each map on a box of `box³` voxels (or `(nz, ny, nx)`) of `voxel_size` Å centred on
      its structure.
    - `sampling`: `"average"` (voxel means) or `"point"`; default: `"average"` for the Gaussian
      method, `"point"` for the others (the shell map is always point-sampled).
    - `table`: `"electron"` or `"xray"`.
    - `n_terms`: shell terms kept (shell method).
    - `bucket_minimum`: the smallest bucket size (`bucket_size`).
    - `b_step`: the batch's lowest B is rounded down, and its widest `b_k + B` up, to a multiple
      of this many Å², so that other batches within the same bounds reuse the compiled functions.
    - `b_margin`: extra B (Å²) the plan allows, for B that will be refined.
    - `window_classes`: window sizes the render function chooses from per chunk of atoms
      (`WindowClasses`; each compiled once); 1: one window, sized for the widest atom, for all.
      `None`: 6 on the CPU, where a batch renders one structure at a time; 1 elsewhere, where
      `render_stacked` vmaps many structures per step and each size's loop then runs for the
      step's largest count of chunks of that size (the sizes its members need add up; not yet
      measured on a GPU).
    - `pad_members`: pad each group's count of structures to 1, 2, 3, 4, 6, 8, 12, … (`member_count`)
      with silent members, so that the next batch of the same bucket sizes compiles nothing new
      although its groups hold other counts (each new count compiles the group's functions anew:
      seconds each). False: exactly the batch's structures.
    - `names`: a name per structure for error messages (default "structure k").

    **Returns:** a list of `BatchGroup`, one per bucket size, all with the same render function.
    Each structure's atoms are sorted from the narrowest to the widest Gaussian (`atom_index`
    says where each went), so that each chunk of atoms gets a window sized for them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if (grid is None) == (box is None):
        raise ValueError("give either a shared grid or a box size (one box per structure)")
    structures = list(structures)
    if not structures:
        raise ValueError("the batch is empty")
    names = list(names) if names is not None else [f"structure {k}" for k in range(len(structures))]
    tab = get_table(table)
    for k, a in enumerate(structures):
        if not isinstance(a, Atoms) or a.positions.ndim != 2:
            raise InvalidAtomsError(
                f"{names[k]}: a batch holds single structures (Atoms of shape (n, ...)); an ensemble "
                "is rendered as one mean map with modelmap.Ensemble"
            )
        if a.positions.shape[0] == 0:
            raise InvalidAtomsError(f"{names[k]} has no atoms")
        validate_atoms(a, names[k])
        tab.check_elements(a.atomic_numbers, names[k])
    if box is not None:
        shape = (int(box),) * 3 if np.ndim(box) == 0 else tuple(int(b) for b in box)
        voxel = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))
        origins = _box_origins(structures, shape, voxel, names)
        shifts = origins  # rendered on a reference grid at origin 0
        ref = Grid(shape, tuple(voxel), (0.0, 0.0, 0.0))
    else:
        ref = grid
        origins = np.tile(np.asarray(grid.origin), (len(structures), 1))
        shifts = np.zeros_like(origins)
    sampling = sampling or ("average" if method == "gaussian" else "point")
    if method == "shells" and sampling != "point":
        raise ValueError("the shell map is sampled at grid points: pass sampling='point'")
    # one render function for the whole batch: bounds from its lowest and highest B (rounded to
    # b_step, so that other batches reuse it), window sizes chosen per chunk of atoms by their width
    if window_classes is None:
        window_classes = 6 if jax.default_backend() == "cpu" else 1
    covering = RenderBounds.covering(structures, resolution, b_margin=b_margin, table=table, b_step=b_step,
                                     n_terms=n_terms)
    # each atom's widest Gaussian, b_k + B: what its window must hold
    widest_term = np.asarray(tab.b).max(axis=1)
    widths = [widest_term[np.asarray(a.atomic_numbers)] + np.asarray(a.b_factors, np.float64) + b_margin
              for a in structures]
    top = b_step * math.ceil(max(float(w.max()) for w in widths) / b_step)
    bounds = RenderBounds(covering.b_factor, resolution, covering.elements, table, n_terms, widest=top)
    render_fn = _render_fn(method, ref, sampling, window_classes).with_bounds(bounds)
    if method == "fourier":
        # the anti-aliasing blur B_x of the batch's own lowest B, not of the bound rounded down
        # (B_x grows as the lowest B drops: 50 Å² more on every atom costs 1.4× per map). B_x is
        # an array, so this compiles nothing new; the windows, sized for the bound's wider blur,
        # hold the narrower Gaussians, and each chunk takes the size its atoms need
        exact = RenderBounds((min(float(np.min(np.asarray(a.b_factors))) for a in structures) - b_margin,
                              bounds.b_factor[1]), resolution, covering.elements, table, n_terms, widest=top)
        render_fn = eqx.tree_at(lambda r: r.extra_b, render_fn,
                                jnp.asarray(render_fn.anti_aliasing_blur(exact), render_fn.extra_b.dtype))
    groups: dict[int, list[int]] = {}
    for k, a in enumerate(structures):
        groups.setdefault(bucket_size(a.positions.shape[0], bucket_minimum), []).append(k)
    out = []
    for size in sorted(groups):
        members = groups[size]
        count = member_count(len(members)) if pad_members else len(members)
        parts, atom_index = [], np.full((count, size), -1, np.int64)
        for j, k in enumerate(members):
            order = _width_order(widths[k], ref, np.asarray(structures[k].positions, np.float64) - shifts[k])
            # on the host (structures are concrete): only the group's padded shape reaches JAX, so a
            # structure of a new atom count compiles nothing (eager ops on its own shape would)
            a = jax.tree.map(lambda x: np.asarray(x)[order], structures[k])
            a = eqx.tree_at(lambda x: x.positions, a, a.positions - shifts[k].astype(a.positions.dtype))
            parts.append(_padded(a, size))
            atom_index[j, : len(order)] = order
        vols = [_host_volume(method, x, resolution, table, n_terms) for x in parts]
        # silent members (the first one's atoms at zero occupancy): maps of exactly 0, dropped
        silent = eqx.tree_at(lambda v: v.occupancies, vols[0], np.zeros_like(vols[0].occupancies))
        vols += [silent] * (count - len(members))
        volumes = jax.device_put(stack_volumes(vols))  # one transfer per leaf, nothing compiled
        out.append(BatchGroup(volumes, render_fn, tuple(members), atom_index, np.asarray(origins[members])))
    return out


def _width_order(width: np.ndarray, grid: Grid, positions: np.ndarray, step: float = 10.0) -> np.ndarray:
    """A structure's atoms from the narrowest to the widest (`width`: `b_k + B`, Å², each atom's
    widest Gaussian, in classes of `step` Å²), in voxel order within a class (cache locality): each
    chunk of the render's scan then holds atoms of about one width, and gets a window sized for
    them (`WindowClasses`) rather than for the structure's widest atom."""
    rank = np.empty(len(width), np.int64)
    rank[locality_order(grid, positions)] = np.arange(len(width))
    return np.lexsort((rank, np.floor(width / step)))


def assemble(groups: Sequence[BatchGroup | Sequence[int]], rendered: Sequence[Array], n_structures: int) -> Array:
    """The map of every structure, `(n_structures, nz, ny, nx)`, in the structures' order.

    **Arguments:**

    - `groups`: the `BatchGroup`s of `plan_batch` (or, for each, the structure index of each member).
    - `rendered`: `render_stacked` of each group, `(B_pad, nz, ny, nx)` (the maps of its padding
      members, past its structures, are dropped).
    - `n_structures`: how many structures the batch holds.

    **Returns:** the maps, in the structures' order (differentiable).
    """
    maps = jnp.zeros((n_structures, *rendered[0].shape[1:]), rendered[0].dtype)
    for g, r in zip(groups, rendered):
        index = np.asarray(g.indices if isinstance(g, BatchGroup) else g)
        # padding members' rows go to an index past the end and are dropped: the scatter's shapes
        # are the group's padded ones, so a new count of structures compiles nothing new
        rows = np.full(r.shape[0], n_structures, np.int64)
        rows[: len(index)] = index
        maps = maps.at[rows].add(r, mode="drop")
    return maps


def _render_fn(method: str, grid: Grid, sampling: str, window_classes: int) -> AbstractRenderFn:
    if method == "gaussian":
        return GaussianMixtureRenderFn(grid, sampling=sampling, window_classes=window_classes)
    if method == "fourier":
        return SplatFourierRenderFn(grid, sampling=sampling, eps=1e-5, window_classes=window_classes)
    return ShellRenderFn(grid, window_classes=window_classes)


def render_batch(
    structures: Sequence[Atoms], resolution: float, *, batch_size: int | None = None, mesh: Mesh | None = None,
    **options,
) -> BatchMaps:
    """Render one map per structure (see `plan_batch` for the arguments; `batch_size` structures are
    rendered at a time inside each bucket's `lax.map`; `None`: `default_batch_size()`).

    With `mesh` (a `jax.sharding.Mesh`) every group's structures are split over the mesh's devices
    (`render_stacked(..., mesh=mesh)`), each device rendering its share; the maps are the same as
    on one device. Across hosts, call `jax.distributed.initialize()` first and build the mesh over
    `jax.devices()` (docs: how-to "Sharding over devices and hosts").

    **Returns:** `BatchMaps` with `maps` `(B, nz, ny, nx)` in input order and each map's origin.
    """
    groups = plan_batch(structures, resolution, **options)
    batch_size = default_batch_size() if batch_size is None else batch_size
    rendered = [render_stacked(g.render_fn, g.volumes, batch_size, mesh) for g in groups]
    origins = np.zeros((len(structures), 3))
    for g in groups:
        origins[list(g.indices)] = g.origins
    return BatchMaps(assemble(groups, rendered, len(structures)), origins, groups[0].render_fn.grid.shape,
                     groups[0].render_fn.grid.voxel_size)
