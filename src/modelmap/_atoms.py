"""Atoms as a JAX pytree, and their labels as numpy arrays."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._errors import InvalidAtomsError

__all__ = ["Atoms", "AtomLabels", "Ensemble", "validate_atoms"]


class Atoms(eqx.Module):
    """Atoms of a model: the part of a structure that maps depend on.

    A pytree: refine any subset of leaves by filtering (`eqx.partition`); `atomic_numbers` is an
    integer leaf and so is never selected by `eqx.is_inexact_array`.

    Leaves may carry leading axes: `read_model` stacks the members of a multi-model file as
    positions `(m, n, 3)`, the others `(m, n)`, and a batch of padded structures is stacked the same
    way. What a leading axis *means* is said by the caller, never guessed: wrap members that are to
    be averaged into one map in an `Ensemble`; render independent structures one map each with
    `modelmap.batch` or `jax.vmap`. Volumes are built from one structure `(n, ...)` or an `Ensemble`.

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å, in the model file's frame.
    - `atomic_numbers`: `(n,)` integers Z (1 for H ... 98 for Cf).
    - `b_factors`: `(n,)` isotropic B in Å² (Debye-Waller factor exp(-B s²/4)).
    - `occupancies`: `(n,)` occupancy in [0, 1].
    """

    positions: Float[Array, "*m n 3"]
    atomic_numbers: Int[Array, "*m n"]
    b_factors: Float[Array, "*m n"]
    occupancies: Float[Array, "*m n"]

    def __init__(self, positions, atomic_numbers, b_factors=None, occupancies=None):
        positions = jnp.asarray(positions)
        if not jnp.issubdtype(positions.dtype, jnp.floating):
            positions = positions.astype(jnp.float32)
        dtype = positions.dtype
        shape = positions.shape[:-1]
        self.positions = positions
        self.atomic_numbers = jnp.broadcast_to(jnp.asarray(atomic_numbers, jnp.int32), shape)
        self.b_factors = (
            jnp.zeros(shape, dtype) if b_factors is None else jnp.asarray(b_factors, dtype)
        )
        self.occupancies = (
            jnp.ones(shape, dtype) if occupancies is None else jnp.asarray(occupancies, dtype)
        )

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[-2]

    @property
    def is_ensemble(self) -> bool:
        return self.positions.ndim == 3


class Ensemble(eqx.Module):
    """Members of one model whose maps are averaged into one map, with weights.

    The map of an ensemble is `Σ_m w_m ρ_m / Σ_m w_m`, the weighted mean of its members' maps (NMR
    models, MD frames, conformational states). It is linear in the members, so a volume of the
    ensemble is the volume of all members' atoms with occupancies scaled by `w_m / Σ w`
    (`mean_atoms`); the weights are a differentiable leaf (ensemble reweighting against a map).
    Each member may differ in coordinates, B and occupancy, not in its atoms.

    An ensemble is never a batch: a batch renders one map per structure (`modelmap.batch`).

    **Arguments:**

    - `atoms`: `Atoms` with a leading member axis: positions `(m, n, 3)`, the others `(m, n)`.
    - `weights`: `(m,)` non-negative weights, not all 0 (default: equal).
    """

    atoms: Atoms
    weights: Float[Array, " m"]

    def __init__(self, atoms: Atoms, weights=None):
        if atoms.positions.ndim != 3:
            raise InvalidAtomsError(
                f"an Ensemble needs atoms with a leading member axis (m, n, 3); got positions of shape "
                f"{tuple(atoms.positions.shape)}"
            )
        m = atoms.positions.shape[0]
        z = np.asarray(atoms.atomic_numbers) if not isinstance(atoms.atomic_numbers, jax.core.Tracer) else None
        if z is not None and m > 1 and not (z == z[:1]).all():
            k = int(np.flatnonzero(~(z == z[:1]).all(axis=1))[0])
            raise InvalidAtomsError(
                f"ensemble member {k} has different atoms from member 0 (atomic numbers differ); "
                "members may differ in coordinates, B and occupancy only"
            )
        dtype = atoms.positions.dtype
        w = jnp.ones((m,), dtype) if weights is None else jnp.asarray(weights, dtype)
        if w.shape != (m,):
            raise InvalidAtomsError(f"an ensemble of {m} members needs {m} weights, got shape {tuple(w.shape)}")
        if not isinstance(w, jax.core.Tracer):
            wn = np.asarray(w)
            if not np.all(np.isfinite(wn)) or (wn < 0).any() or wn.sum() <= 0:
                raise InvalidAtomsError(f"ensemble weights must be finite, >= 0 and not all 0; got {wn}")
        self.atoms = atoms
        self.weights = w

    @property
    def n_members(self) -> int:
        return self.atoms.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return self.atoms.positions.shape[1]

    def mean_atoms(self) -> Atoms:
        """The members' atoms as one structure of `m n` atoms whose occupancies are scaled by
        `w_m / Σ w`: its map is the weighted mean map (differentiable in the weights)."""
        a = self.atoms
        w = self.weights / jnp.sum(self.weights)
        return Atoms(
            a.positions.reshape(-1, 3),
            a.atomic_numbers.reshape(-1),
            a.b_factors.reshape(-1),
            (a.occupancies * w[:, None]).reshape(-1),
        )


def validate_atoms(atoms: Atoms, what: str = "atoms", labels: "AtomLabels | None" = None) -> Atoms:
    """Check concrete atom values and raise `InvalidAtomsError` naming the first problem.

    Checks: positions finite, B finite, occupancy finite and >= 0, atomic numbers in 1..98.
    With `labels` the atom is named by its label (`A/GLU 12/CA`), else by its index.
    """
    pos = np.asarray(atoms.positions)
    n = pos.shape[-2]
    if n == 0:
        raise InvalidAtomsError(f"{what}: there are no atoms")

    def first(bad) -> tuple[int, str]:
        """The flat index of the first bad value and its atom's name."""
        k = int(np.flatnonzero(np.asarray(bad).reshape(-1))[0])
        i = k % n
        return k, (f"atom {labels.atom_id(i)}" if labels is not None and len(labels) == n else f"atom {i}")

    bad = ~np.all(np.isfinite(pos), axis=-1)
    if bad.any():
        raise InvalidAtomsError(
            f"{what}: {int(bad.sum())} atom(s) have NaN or infinite coordinates (first: {first(bad)[1]})"
        )
    for name, values in (("B-factor", atoms.b_factors), ("occupancy", atoms.occupancies)):
        v = np.asarray(values)
        if not np.all(np.isfinite(v)):
            raise InvalidAtomsError(f"{what}: {first(~np.isfinite(v))[1]} has a NaN or infinite {name}")
    occ = np.asarray(atoms.occupancies)
    if (occ < 0).any():
        i, atom = first(occ < 0)
        raise InvalidAtomsError(f"{what}: {atom} has a negative occupancy ({occ.reshape(-1)[i]})")
    z = np.asarray(atoms.atomic_numbers)
    if ((z < 1) | (z > 98)).any():
        i, atom = first((z < 1) | (z > 98))
        raise InvalidAtomsError(f"{what}: {atom} has atomic number {z.reshape(-1)[i]}, not 1..98")
    return atoms


@dataclasses.dataclass(frozen=True)
class AtomLabels:
    """Per-atom labels as numpy arrays (one entry per atom of the first model).

    `source_index` is `(n, 3)`: chain, residue and atom index of each atom inside the source
    structure's model, so that `write_model` can put changed values back in place.
    """

    chain: np.ndarray
    residue_name: np.ndarray
    residue_number: np.ndarray
    insertion_code: np.ndarray
    atom_name: np.ndarray
    altloc: np.ndarray
    element: np.ndarray
    is_hetero: np.ndarray
    source_index: np.ndarray

    def __len__(self) -> int:
        return len(self.atom_name)

    def __getitem__(self, index) -> "AtomLabels":
        return AtomLabels(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def atom_id(self, i: int) -> str:
        """A readable label such as `A/GLU 12A/CA.B`."""
        alt = f".{self.altloc[i]}" if self.altloc[i] else ""
        return (
            f"{self.chain[i]}/{self.residue_name[i]} {self.residue_number[i]}"
            f"{self.insertion_code[i]}/{self.atom_name[i]}{alt}"
        )
