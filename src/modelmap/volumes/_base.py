"""The interface every volume shares: positions, B, occupancy, resolution, poses."""


import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox import AbstractVar
from jaxtyping import Array, Float

from .._atoms import Atoms, Ensemble
from .._errors import InvalidAtomsError
from .._pose import as_rotation_matrix, check_rotation, rotate_positions

__all__ = ["AbstractVolume", "atoms_of"]


class AbstractVolume(eqx.Module):
    """A parametrization of the sources of a map, rendered onto a grid by a render function.

    Every volume has the same per-atom fields, with the same names and units:

    - `positions`: `(n, 3)` x, y, z in Å, in the model's frame;
    - `b_factors`: `(n,)` isotropic B in Å² (Debye-Waller factor `exp(-B s²/4)`);
    - `occupancies`: `(n,)` occupancies (weights of the atoms' images);
    - `resolution`: D in Å, `(n,)` per atom or `()` for the whole map where the method has one
      resolution (the Fourier map's hard cut |s| <= 1/D).

    Every volume is built the same way, `Volume.from_atoms(atoms, resolution, table)`, from one
    structure (`Atoms` of shape `(n, ...)`) or an `Ensemble` (the weighted mean map of its members).
    A batch of structures is a volume whose leaves carry a leading axis, rendered by `jax.vmap` or
    `modelmap.batch`: never averaged.
    """

    positions: AbstractVar[Float[Array, "n 3"]]
    b_factors: AbstractVar[Float[Array, " n"]]
    occupancies: AbstractVar[Float[Array, " n"]]
    resolution: AbstractVar[Float[Array, "*n"]]

    @classmethod
    @abc.abstractmethod
    def from_atoms(cls, atoms: Atoms | Ensemble, resolution, table="electron"):
        """The volume of `atoms` (one structure or an `Ensemble`) at resolution D (Å)."""
        raise NotImplementedError

    @abc.abstractmethod
    def total_mass(self) -> Float[Array, ""]:
        """The integral of the map over all space (Å⁻² · Å³ for the electron table)."""
        raise NotImplementedError

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[-2]

    #: Fields shared by every member of a batch instead of stacked (a volume's scattering or shell
    #: table): `batch_axes` gives them `None`.
    shared_fields: ClassVar[tuple[str, ...]] = ()

    def batch_axes(self):
        """`jax.vmap` `in_axes` for a batch of such volumes stacked on a leading axis: 0 for every
        per-atom leaf, `None` for the `shared_fields` (not stacked)."""
        axes = jax.tree.map(lambda _: 0, self)
        for name in self.shared_fields:
            axes = eqx.tree_at(lambda v: getattr(v, name), axes, None, is_leaf=lambda x: x is None)
        return axes

    def rotate_to_pose(self, rotation, center: Float[Array, "3"] | None = None):
        """The volume rotated rigidly: `x' = R (x - c) + c` for every atom.

        **Arguments:**

        - `rotation`: a `(3, 3)` rotation matrix R or a unit quaternion `(4,)` in (w, x, y, z)
          order (scalar first); `modelmap.euler_to_matrix` gives R from RELION's Euler angles.
        - `center`: `(3,)` the fixed point c in Å; default the mean of the positions (padding atoms
          of a batch sit at that mean and do not move it).

        **Returns:** a volume of the same kind; every other field is unchanged (B, occupancy and
        resolution are isotropic). NaN or a matrix that is not a rotation is an error (under jit
        through `eqx.error_if`).
        """
        r = as_rotation_matrix(check_rotation(rotation))
        c = jnp.mean(self.positions, axis=0) if center is None else jnp.asarray(center, self.positions.dtype)
        moved = rotate_positions(self.positions, r.astype(self.positions.dtype), c)
        return eqx.tree_at(lambda v: v.positions, self, moved)

    def translate_to_pose(self, offset: Float[Array, "3"]):
        """The volume shifted rigidly by `offset` `(3,)` (x, y, z in Å); NaN is an error."""
        t = jnp.asarray(offset, self.positions.dtype)
        if t.shape != (3,):
            raise ValueError(f"a translation is a (3,) x, y, z offset in Å, got shape {tuple(t.shape)}")
        if isinstance(t, jax.core.Tracer):
            t = eqx.error_if(t, ~jnp.all(jnp.isfinite(t)), "the translation has NaN or infinite entries")
        elif not np.all(np.isfinite(np.asarray(t))):
            raise ValueError(f"the translation has NaN or infinite entries: {np.asarray(t)}")
        return eqx.tree_at(lambda v: v.positions, self, self.positions + t)


def atoms_of(atoms: Atoms | Ensemble, resolution, per_atom: bool, what: str):
    """The one structure a volume is built from, and its resolution.

    An `Ensemble` becomes its `mean_atoms()` (occupancies times `w_m / Σ w`); `Atoms` must be one
    structure `(n, ...)`. `resolution` is broadcast to `(n,)` (per-atom; for an ensemble a per-atom
    value of one member is repeated for every member) or kept a scalar (`per_atom=False`).

    **Returns:** `(atoms (N,), resolution)` with `resolution` `(N,)` or `()`, in the atoms' dtype.
    """
    dtype = atoms.atoms.positions.dtype if isinstance(atoms, Ensemble) else atoms.positions.dtype
    res = jnp.asarray(resolution, dtype)
    if isinstance(atoms, Ensemble):
        m, n = atoms.n_members, atoms.n_atoms
        if per_atom:
            res = jnp.broadcast_to(res, (m, n) if res.ndim == 2 else (n,))
            res = jnp.broadcast_to(res, (m, n)).reshape(-1)
        atoms = atoms.mean_atoms()
    elif atoms.positions.ndim != 2:
        raise InvalidAtomsError(
            f"{what}.from_atoms takes one structure, positions (n, 3); got {tuple(atoms.positions.shape)}. "
            "To average members into one map wrap them in modelmap.Ensemble(atoms, weights); to render "
            "one map per structure use modelmap.batch.render_batch or jax.vmap over volumes"
        )
    elif per_atom:
        res = jnp.broadcast_to(res, atoms.b_factors.shape)
    if not per_atom and res.ndim != 0:
        raise ValueError(f"{what} has one resolution for the whole map; got shape {tuple(res.shape)}")
    return atoms, res
