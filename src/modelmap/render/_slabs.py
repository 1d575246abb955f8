"""One map cut into z-slabs: rendered slab by slab on one device (streamed), or over many devices.

A window renderer (`GaussianMixtureRenderFn`, `ShellRenderFn`) adds each atom into a small window
around it, so the part of the map in planes `[z0, z1)` needs only the atoms whose windows reach
those planes. `SlabPlan` cuts a grid into `S` slabs of `t` planes (the last one running past the
grid, cut off at the end) and lists, per slab and per window size, the atoms whose windows reach it
(the window's half width plus a `margin` for atoms that move, in a refinement, plus one voxel for
rounding). Every slab is rendered by the same computation: the render function on one reference
slab grid (the full grid's origin, `t` planes), with the atoms shifted by minus the slab's offset
(a whole number of planes: the same values), and that slab's atom lists. The maps of the slabs are
exact parts of the whole map (no seam: every window that touches a slab is added whole into it),
and gradients with respect to the atoms flow back through every slab they reach.

The same plan serves three ways of running it:

- `render_slabs(slabs, volume)`: every slab in one `lax.map` on one device (differentiable; the
  whole map on the device, the working memory of one slab);
- `render_slabs(slabs, volume, mesh=mesh)`: the slabs split over the devices of a mesh
  (`jax.shard_map`), each device rendering its own slabs; the volume is replicated;
- `stream_slabs` / `stream_value_and_grad`: one slab at a time on one device, each copied to a
  numpy map on the host, for a map that does not fit on the device beside its working memory.

The Fourier-map renderers are not local (the hard cut at 1/D spreads every atom's ripples over the
whole box) and are refused here: render them whole.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from .._errors import GridTooLargeError
from .._grid import MEMORY_LIMIT_ENV, Grid, format_bytes, memory_limit_bytes
from .._sharding import shard_leading
from ._base import AbstractRenderFn, device_of, is_traced
from ._gaussian_mixture import GaussianMixtureRenderFn
from ._shells import ShellRenderFn
from ._windows import WindowBucket, WindowPlan

__all__ = ["SlabPlan", "render_slabs", "stream_slabs", "stream_value_and_grad", "slab_memory_bytes"]

#: Maps of one slab's padded accumulation grid a render holds at once (forward and backward:
#: the accumulated map, its update, the cotangent and the gathered windows' source).
SLAB_COPIES = 4
#: Bytes per atom of a render's working memory (positions, Gaussians, window plan, gradients).
BYTES_PER_ATOM = 512


def slab_memory_bytes(grid: Grid, thickness: int, pad: tuple[int, int, int], n_atoms: int, itemsize: int = 4) -> int:
    """The working memory (bytes) of rendering one slab of `thickness` planes of `grid`: `SLAB_COPIES`
    padded slabs (`pad` `(px, py, pz)` voxels on each side) plus `BYTES_PER_ATOM` per atom (every
    atom is held, whichever slab it reaches). An estimate made before anything is allocated."""
    _, ny, nx = grid.shape
    px, py, pz = pad
    padded = (thickness + 2 * pz) * (ny + 2 * py) * (nx + 2 * px)
    return int(SLAB_COPIES * padded * itemsize + BYTES_PER_ATOM * n_atoms)



class NoAtomOnGridError(ValueError):
    """No atom's window reaches the grid: the map is zero, and there is nothing to split."""

class SlabPlan(eqx.Module):
    """A grid cut into z-slabs, each with the atoms whose windows reach it (see the module docs).

    Build it with `SlabPlan.build` from a window render function and a concrete volume; render with
    `render_slabs` (one device or a mesh) or `stream_slabs` (one slab at a time to the host).

    **Fields:**

    - `render_fn`: the render function on the reference slab grid (`t` planes at the full grid's
      origin), planned for the volume; its plan's atom lists are replaced by each slab's.
    - `indices`, `masks`: per window size, `(S, n_chunks, chunk)` the atoms of each slab (padding
      slots masked).
    - `planned_z`: `(n,)` the atoms' z (Å) the lists were made for.
    - `grid`: the whole map's grid (static).
    - `thickness`: planes per slab `t` (static); `S · t >= nz`.
    - `margin`: Å an atom may move along z from `planned_z` (static); farther is an error.
    """

    render_fn: AbstractRenderFn
    indices: tuple[Int[Array, "S nc c"], ...]
    masks: tuple[Bool[Array, "S nc c"], ...]
    planned_z: Float[Array, " n"]
    grid: Grid = eqx.field(static=True)
    thickness: int = eqx.field(static=True)
    margin: float = eqx.field(static=True)

    @property
    def n_slabs(self) -> int:
        return int(self.indices[0].shape[0])

    @classmethod
    def build(
        cls,
        render_fn: AbstractRenderFn,
        volume,
        *,
        n_slabs: int | None = None,
        margin: float = 0.0,
        multiple_of: int = 1,
        memory_limit: int | None = None,
    ) -> "SlabPlan":
        """Cut `render_fn.grid` into z-slabs for the concrete `volume` (call outside `jit`).

        **Arguments:**

        - `render_fn`: a `GaussianMixtureRenderFn` or `ShellRenderFn` on the whole grid, planned
          (`with_plan`, `with_bounds`) or not (it is then planned for `volume`).
        - `volume`: the volume to render (concrete; its atoms are listed per slab).
        - `n_slabs`: how many slabs; `None`: the fewest (a multiple of `multiple_of`) whose working
          memory (`slab_memory_bytes`) fits the memory limit, beside the whole map when the device
          is the host's CPU. 1 when the whole map fits.
        - `margin`: Å along z each atom may move after planning (refinement); farther is an error.
        - `multiple_of`: `n_slabs` is a multiple of this (the devices of a mesh).
        - `memory_limit`: bytes, instead of `memory_limit_bytes(device)` (`$MODELMAP_MEMORY_LIMIT`,
          the device's memory, the machine's).

        **Returns:** the `SlabPlan`. Raises `GridTooLargeError`, naming the sizes, where even
        one-plane slabs (or the map itself, on the host) cannot fit.
        """
        if not isinstance(render_fn, (GaussianMixtureRenderFn, ShellRenderFn)):
            raise ValueError(
                f"z-slabs need a window renderer (GaussianMixtureRenderFn or ShellRenderFn), got "
                f"{type(render_fn).__name__}: the Fourier map is not local (its ripples reach the whole "
                "box), so render it whole"
            )
        if is_traced(volume):
            raise ValueError("SlabPlan.build needs a concrete volume: call it outside jit/grad/vmap")
        if volume.positions.ndim != 2:
            raise ValueError("z-slabs render one structure (positions (n, 3)); render a batch with render_batch")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0 Å, got {margin}")
        grid = render_fn.grid
        nz, ny, nx = grid.shape
        n = int(volume.positions.shape[0])
        itemsize = np.dtype(volume.positions.dtype).itemsize
        # plan the windows on a one-plane slab: window sizes depend on the voxel only, and no check
        # of the whole grid's size is made where only slabs are ever held
        probe = dataclasses.replace(render_fn, grid=Grid((1, ny, nx), grid.voxel_size, grid.origin))
        if not probe.is_planned:
            probe = probe.with_plan(volume)
        plan = probe.plan.resolve(probe.grid, n)
        if n_slabs is None:
            n_slabs = _fewest_slabs(grid, plan.pad, n, itemsize, multiple_of, memory_limit, device_of(volume))
        n_slabs = int(n_slabs)
        if not 1 <= n_slabs:
            raise ValueError(f"n_slabs must be at least 1, got {n_slabs}")
        t = math.ceil(nz / n_slabs)
        slab_grid = Grid((t, ny, nx), grid.voxel_size, grid.origin)
        z = np.asarray(volume.positions, np.float64)[:, 2]
        vz = grid.voxel_size[2]
        centre = np.round((z - grid.origin[2]) / vz).astype(np.int64)
        reach = int(math.ceil(margin / vz)) + 1
        starts = np.arange(n_slabs) * t
        indices, masks, buckets = [], [], []
        for b in plan.buckets:
            members = np.asarray(b.indices).reshape(-1)[np.asarray(b.mask).reshape(-1)]
            hz = b.half_width[2] + reach
            lo, hi = centre[members] - hz, centre[members] + hz
            hits = (hi[None, :] >= starts[:, None]) & (lo[None, :] <= starts[:, None] + t - 1)  # (S, m)
            most = int(hits.sum(axis=1).max()) if members.size else 0
            if most == 0:
                continue
            c = b.indices.shape[1]
            nc = math.ceil(most / c)
            idx = np.full((n_slabs, nc * c), members[0], np.int32)
            mask = np.zeros((n_slabs, nc * c), bool)
            for s in range(n_slabs):
                kept = members[hits[s]]
                idx[s, : kept.size] = kept
                mask[s, : kept.size] = True
            indices.append(jnp.asarray(idx.reshape(n_slabs, nc, c)))
            masks.append(jnp.asarray(mask.reshape(n_slabs, nc, c)))
            buckets.append(WindowBucket(b.half_width, jnp.zeros((1, c), jnp.int32), jnp.zeros((1, c), bool)))
        if not buckets:
            raise NoAtomOnGridError("no atom's window reaches the grid")
        template = WindowPlan(tuple(buckets), plan.max_variance, plan.n_sigma, plan.pad)
        slab_fn = eqx.tree_at(lambda r: r.plan, dataclasses.replace(probe, grid=slab_grid), template)
        return cls(slab_fn, tuple(indices), tuple(masks), jnp.asarray(z, volume.positions.dtype), grid, t,
                   float(margin))

    def checked(self, volume):
        """`volume`, with an `eqx.error_if` that no atom moved along z by more than `margin` Å from
        where the slab lists were made (it would miss a slab it now reaches)."""
        z = volume.positions[:, 2]
        moved = jnp.abs(z - self.planned_z.astype(z.dtype)) > self.margin + 1e-3 * self.grid.voxel_size[2]
        pos = eqx.error_if(
            volume.positions, jnp.any(moved),
            f"an atom moved along z by more than the slab plan's margin ({self.margin:g} Å) from where it "
            "was planned; rebuild the SlabPlan (SlabPlan.build(..., margin=...))",
        )
        return eqx.tree_at(lambda v: v.positions, volume, pos)

    def render_slab(self, volume, indices, masks, s) -> Float[Array, "t ny nx"]:
        """The map of slab `s` (planes `s·t` to `s·t + t - 1`; traced or not) from its atom lists
        (`indices[k][s]`, `masks[k][s]` per window size)."""
        buckets = tuple(
            WindowBucket(b.half_width, i, m) for b, i, m in zip(self.render_fn.plan.buckets, indices, masks)
        )
        plan = eqx.tree_at(lambda p: p.buckets, self.render_fn.plan, buckets)
        fn = eqx.tree_at(lambda r: r.plan, self.render_fn, plan)
        dtype = volume.positions.dtype
        shift = jnp.stack([jnp.zeros((), dtype), jnp.zeros((), dtype),
                           (s * self.thickness).astype(dtype) * self.grid.voxel_size[2]])
        return fn(eqx.tree_at(lambda v: v.positions, volume, volume.positions - shift))

    def lists(self):
        """The per-slab arrays `(indices, masks, slab numbers)`, stacked on the slab axis."""
        return self.indices, self.masks, jnp.arange(self.n_slabs, dtype=jnp.int32)

    def without_lists(self) -> "SlabPlan":
        """This plan without its per-slab arrays (what every device needs whole)."""
        return eqx.tree_at(lambda p: (p.indices, p.masks), self, (None, None), is_leaf=lambda x: x is None)

    def crop(self, stacked: Float[Array, "S t ny nx"]) -> Float[Array, "nz ny nx"]:
        """The whole map from the slabs' maps `(S, t, ny, nx)` (planes past `nz` dropped)."""
        nz, ny, nx = self.grid.shape
        return stacked.reshape(self.n_slabs * self.thickness, ny, nx)[:nz]


def _fewest_slabs(grid: Grid, pad, n_atoms: int, itemsize: int, multiple_of: int, limit, device) -> int:
    """The fewest slabs (a multiple of `multiple_of`) whose working memory fits (see `SlabPlan.build`)."""
    have, source = (int(limit), "the given limit") if limit is not None else memory_limit_bytes(device)
    nz, ny, nx = grid.shape
    whole = grid.nbytes(itemsize)
    budget = have - (whole if device.platform == "cpu" else 0)
    multiple_of = max(int(multiple_of), 1)
    for s in range(multiple_of, nz + multiple_of, multiple_of):
        if slab_memory_bytes(grid, math.ceil(nz / s), pad, n_atoms, itemsize) <= budget:
            return s
    least = slab_memory_bytes(grid, 1, pad, n_atoms, itemsize)
    raise GridTooLargeError(
        f"a {nx} x {ny} x {nz} grid (x, y, z; the map alone {format_bytes(whole)}) with {n_atoms:,} atoms "
        f"does not fit: even one-plane slabs need {format_bytes(least)} of working memory"
        + (" beside the map" if device.platform == "cpu" else "")
        + f", and the memory limit is {format_bytes(have)} ({source}; set ${MEMORY_LIMIT_ENV} to change it); "
        "use a larger voxel size, a smaller box, or more devices"
    )


@eqx.filter_jit
def render_slabs(slabs: SlabPlan, volume, mesh: Mesh | None = None) -> Float[Array, "nz ny nx"]:
    """The whole map, rendered slab by slab (differentiable with respect to `volume`).

    **Arguments:**

    - `slabs`: a `SlabPlan` for this volume (atoms within its `margin`).
    - `volume`: the volume (traced or not), with the atoms the plan was built for.
    - `mesh`: a `jax.sharding.Mesh`: the slabs are split over all of its devices (`jax.shard_map`;
      give `SlabPlan.build(..., multiple_of=mesh.size)` for an even split), each rendering the atoms
      that reach its slabs, the volume replicated; gradients from every slab are summed. `None`: every
      slab on one device, one after another (`lax.map`).

    **Returns:** the map `(nz, ny, nx)`, equal to the unsliced render up to float rounding.
    """
    volume = slabs.checked(volume)

    def run(lists, shared):
        plan, vol = shared
        return lax.map(lambda a: plan.render_slab(vol, *a), lists)

    shared = (slabs.without_lists(), volume)
    stacked = run(slabs.lists(), shared) if mesh is None else shard_leading(run, mesh, slabs.lists(), shared)
    return slabs.crop(stacked)


@eqx.filter_jit
def _one_slab(plan: SlabPlan, volume, indices, masks, s):
    return plan.render_slab(plan.checked(volume), indices, masks, s)


def stream_slabs(slabs: SlabPlan, volume, out: np.ndarray | None = None) -> np.ndarray:
    """The whole map on the host, rendered one slab at a time on the volume's device: the device
    holds one slab and its working memory, never the whole map (one compiled computation for all).

    **Arguments:**

    - `slabs`: a `SlabPlan` for this volume; `volume`: the (concrete) volume.
    - `out`: optional `(nz, ny, nx)` numpy array (e.g. a `np.memmap`) to write into.

    **Returns:** the map `(nz, ny, nx)` as a numpy array.
    """
    nz, ny, nx = slabs.grid.shape
    if out is None:
        slabs.grid.check_fits_in_memory(np.dtype(volume.positions.dtype).itemsize, copies=1)
        out = np.empty((nz, ny, nx), np.dtype(volume.positions.dtype))
    bare = slabs.without_lists()
    t = slabs.thickness
    for s in range(slabs.n_slabs):
        part = _one_slab(bare, volume, *_lists_of(slabs, s), jnp.int32(s))
        out[s * t : min((s + 1) * t, nz)] = np.asarray(part)[: nz - s * t]
    return out


def stream_value_and_grad(slabs: SlabPlan, volume, loss: Callable, target) -> tuple[float, object]:
    """A loss that is a sum over voxels, and its gradient with respect to `volume`'s arrays,
    accumulated slab by slab on one device (the whole map is never held).

    **Arguments:**

    - `slabs`: a `SlabPlan` for this volume; `volume`: the (concrete) volume.
    - `loss`: `(map_slab, target_slab) -> scalar`, a sum over voxels that is 0 where both are 0
      (least squares `jnp.sum((m - t)**2)`, a weighted sum); planes past the grid are zeroed in both.
    - `target`: `(nz, ny, nx)` array (numpy: only one slab at a time goes to the device).

    **Returns:** `(value, gradient)`: the gradient a pytree like `volume` (`eqx.filter_grad`).
    """
    nz, ny, nx = slabs.grid.shape
    t = slabs.thickness
    bare = slabs.without_lists()
    target = np.asarray(target)
    if target.shape != (nz, ny, nx):
        raise ValueError(f"the target has shape {target.shape}, the grid {(nz, ny, nx)}")
    total, grad = 0.0, None
    for s in range(slabs.n_slabs):
        part = np.zeros((t, ny, nx), target.dtype)
        rows = target[s * t : min((s + 1) * t, nz)]
        part[: rows.shape[0]] = rows
        value, g = _slab_value_and_grad(bare, volume, loss, jnp.asarray(part), *_lists_of(slabs, s), jnp.int32(s))
        total += float(value)
        grad = g if grad is None else jax.tree.map(jnp.add, grad, g)
    return total, grad


@eqx.filter_jit
def _slab_value_and_grad(plan: SlabPlan, volume, loss, target_slab, indices, masks, s):
    nz = plan.grid.shape[0]
    valid = (s * plan.thickness + jnp.arange(plan.thickness)) < nz

    def f(v):
        m = plan.render_slab(plan.checked(v), indices, masks, s)
        keep = valid[:, None, None]
        return loss(jnp.where(keep, m, 0), jnp.where(keep, target_slab, 0))

    return eqx.filter_value_and_grad(f)(volume)


def _lists_of(slabs: SlabPlan, s: int):
    return tuple(i[s] for i in slabs.indices), tuple(m[s] for m in slabs.masks)

