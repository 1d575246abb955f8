"""Splitting one leading axis over the devices of a mesh, with `jax.shard_map`.

Both ways modelmap uses several devices come down to one pattern: a stack of independent pieces
of work on a leading axis (the structures of a batch, or the z-slabs of one large map), dealt in
equal runs to the devices of a `jax.sharding.Mesh`, each device computing its run alone, with
everything else (the render function's arrays, a volume every slab reads) replicated. It is written
with `jax.shard_map` rather than left to `jit`'s automatic sharding, so that each device gets only
its own share of the stacked inputs: an input that jax-finufft sees is never copied to every
device (automatic sharding replicates what a custom call reads).

**Across hosts.** The same code runs one problem over the devices of several hosts: call
`jax.distributed.initialize()` first in every process (it reads the coordinator address, the
number of processes and this process's id from the cluster's environment, e.g. SLURM's or
Cloud TPU's, or takes them as arguments), build the mesh over `jax.devices()` (every host's
devices), and run the same script in every process with the same inputs. The result is a global
array of which each host holds its own devices' part; `gather` brings the whole of it to every
host (`jax.experimental.multihost_utils.process_allgather`).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["mesh_axes", "shard_leading", "gather", "check_mesh"]


def check_mesh(mesh) -> Mesh:
    """`mesh`, checked to be a `jax.sharding.Mesh` (a clear error for anything else)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, e.g. jax.make_mesh((len(jax.devices()),), ('batch',)); "
            f"got {type(mesh).__name__}"
        )
    return mesh


def mesh_axes(mesh: Mesh) -> tuple[str, ...]:
    """Every axis name of `mesh`: the leading axis is split over all of its devices."""
    return tuple(check_mesh(mesh).axis_names)


def _auto(mesh: Mesh) -> Mesh:
    """`mesh` with automatic axes. `jax.make_mesh` gives explicit axes by default, under which every
    operation on a sharded array must name its output's sharding; modelmap only places its inputs
    and outputs, so it works on the same devices with automatic axes."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def shard_leading(fn: Callable, mesh: Mesh, sharded, replicated=None):
    """`fn(sharded, replicated)` computed with `sharded`'s leading axis split over `mesh`'s devices.

    The leading axis (length `L`) is padded to a multiple of the number of devices by repeating
    its last entry (whose results are dropped, so they add nothing to any gradient), dealt in equal
    runs to the devices, and `fn` runs once per device on its run; its outputs, stacked on the same
    leading axis, are joined and cut back to `L`. Differentiable (the cotangents of `replicated`
    are summed over the devices by `shard_map`'s transpose).

    **Arguments:**

    - `fn`: `(sharded_run, replicated) -> outputs`, every output with the run's leading axis;
      traced once, for one device's run (arrays of shape `(L / devices, ...)`).
    - `mesh`: the `jax.sharding.Mesh`; its axes are all used for the leading axis.
    - `sharded`: a pytree (equinox modules allowed) whose array leaves share the leading axis.
    - `replicated`: a pytree every device reads whole (non-array leaves are kept static).

    **Returns:** `fn`'s outputs for the whole leading axis, `(L, ...)`, sharded over the mesh.
    """
    axes = mesh_axes(mesh)
    mesh = _auto(mesh)
    n_dev = int(np.prod([mesh.shape[a] for a in axes]))
    s_dyn, s_static = eqx.partition(sharded, eqx.is_array)
    r_dyn, r_static = eqx.partition(replicated, eqx.is_array)
    leaves = jax.tree_util.tree_leaves(s_dyn)
    if not leaves:
        raise ValueError("nothing to shard: the sharded inputs hold no arrays")
    length = leaves[0].shape[0]
    if any(x.shape[:1] != (length,) for x in leaves):
        raise ValueError(f"every sharded array needs the same leading axis; got {[x.shape for x in leaves]}")
    extra = -length % n_dev
    if extra:
        s_dyn = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]), s_dyn)

    s_dyn = jax.tree.map(lambda x: _place(x, mesh, PartitionSpec(axes)), s_dyn)
    r_dyn = jax.tree.map(lambda x: _place(x, mesh, PartitionSpec()), r_dyn)

    def local(s, r):
        return fn(eqx.combine(s, s_static), eqx.combine(r, r_static))

    spec = PartitionSpec(axes)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec,
                        check_vma=False)(s_dyn, r_dyn)
    return jax.tree.map(lambda x: x[:length], out) if extra else out


def _place(x, mesh: Mesh, spec: PartitionSpec):
    """`x` laid out as `spec` on `mesh` (a sharding constraint; `mesh` has automatic axes)."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gather(array):
    """The whole of `array` as a numpy array on this host: a plain `np.asarray` when this process
    holds every part (one host), else `process_allgather` (after `jax.distributed.initialize()`)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)
