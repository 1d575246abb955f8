"""Independent atoms described in Fourier space by their scattering factors."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._atoms import Atoms
from ..scattering import ScatteringTable, get_table
from ._base import AbstractVolume

__all__ = ["IndependentAtomVolume"]


class IndependentAtomVolume(AbstractVolume):
    """Atoms as point scatterers with form factors: the structure factor of the model is

    `F(s) = Σ_j q_j f_{e_j}(s) exp(-B_j s²/4) exp(-2πi s·x_j)`,

    with `f_e(s) = Σ_k a_ek exp(-b_ek s²/4)` the scattering factor of atom j's scattering type
    (element) e_j from `table` (International Tables C 4.3.2.2 / Peng 1996 for electrons, IT92 for
    X-rays; s = 1/d in Å⁻¹), q_j its occupancy (weight) and B_j its own isotropic B in Å². Every atom
    keeps its own B: nothing is averaged per element.

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å.
    - `weights`: `(n,)` occupancies (or ensemble weights times occupancies).
    - `b_factors`: `(n,)` B in Å².
    - `atomic_numbers`: `(n,)` the scattering type of each atom (an integer leaf, never differentiated).
    - `table`: the `ScatteringTable` giving each type's Gaussian coefficients.
    """

    positions: Float[Array, "n 3"]
    weights: Float[Array, " n"]
    b_factors: Float[Array, " n"]
    atomic_numbers: Int[Array, " n"]
    table: ScatteringTable

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms,
        table: str | ScatteringTable = "electron",
        ensemble_weights: Float[Array, " m"] | None = None,
    ) -> "IndependentAtomVolume":
        """The atoms' structure-factor description; an ensemble `(m, n)` is flattened to `m n`
        atoms with weights `occupancy · w_m / Σ w` (uniform `w` by default): the mean map."""
        dtype = atoms.positions.dtype
        if isinstance(table, str):
            table = get_table(table, dtype=dtype)
        positions, weights, b = atoms.positions, atoms.occupancies, atoms.b_factors
        z = atoms.atomic_numbers
        if positions.ndim == 3:
            m = positions.shape[0]
            w = jnp.ones((m,), dtype) if ensemble_weights is None else jnp.asarray(ensemble_weights, dtype)
            weights = (weights * (w / jnp.sum(w))[:, None]).reshape(-1)
            positions, b, z = positions.reshape(-1, 3), b.reshape(-1), z.reshape(-1)
        return cls(positions, weights, b, z, table)

    def total_mass(self) -> Float[Array, ""]:
        return jnp.sum(self.weights * self.table.f0(self.atomic_numbers))

    def gaussian_widths(self) -> Float[Array, "n K"]:
        """`b_ek + B_j` (Å²) for every atom and Gaussian term: the exponents the renderer sees."""
        return self.table.b[self.atomic_numbers].astype(self.b_factors.dtype) + self.b_factors[:, None]

    def gaussian_amplitudes(self) -> Float[Array, "n K"]:
        """`q_j a_ek` for every atom and Gaussian term."""
        return self.weights[:, None] * self.table.a[self.atomic_numbers].astype(self.weights.dtype)
