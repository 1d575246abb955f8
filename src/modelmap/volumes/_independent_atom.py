"""Independent atoms described in Fourier space by their scattering factors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._atoms import Atoms, Ensemble
from ..scattering import ScatteringTable, get_table
from ._base import AbstractVolume, atoms_of

__all__ = ["IndependentAtomVolume"]


class IndependentAtomVolume(AbstractVolume):
    """Atoms as point scatterers with form factors, for the Fourier map at resolution D: the
    structure factor of the model is

    `F(s) = Σ_j q_j f_{e_j}(s) exp(-B_j s²/4) exp(-2πi s·x_j)`, kept for |s| <= 1/D,

    with `f_e(s) = Σ_k a_ek exp(-b_ek s²/4)` the scattering factor of atom j's scattering type
    (element) e_j from `table` (International Tables C 4.3.2.2 / Peng 1996 for electrons, IT92 for
    X-rays; s = 1/d in Å⁻¹), q_j its occupancy and B_j its own isotropic B in Å². Every atom keeps
    its own B: nothing is averaged per element. The hard cut at 1/D is one sphere for the whole map
    (phenix.map_model_cc's and servalcat's model map), so `resolution` is a scalar.

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å.
    - `b_factors`: `(n,)` B in Å².
    - `occupancies`: `(n,)` occupancies.
    - `resolution`: `()` D in Å (> 0).
    - `atomic_numbers`: `(n,)` the scattering type of each atom (an integer leaf, never differentiated).
    - `table`: the `ScatteringTable` giving each type's Gaussian coefficients.
    """

    positions: Float[Array, "n 3"]
    b_factors: Float[Array, " n"]
    occupancies: Float[Array, " n"]
    resolution: Float[Array, ""]
    atomic_numbers: Int[Array, " n"]
    table: ScatteringTable

    shared_fields = ("table",)

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms | Ensemble,
        resolution: float | Float[Array, ""],
        table: str | ScatteringTable = "electron",
    ) -> "IndependentAtomVolume":
        """The atoms' structure-factor description at resolution D (Å, > 0).

        **Arguments:**

        - `atoms`: one structure (`Atoms` `(n, ...)`) or an `Ensemble` (its weighted mean map).
        - `resolution`: D in Å: the Fourier map keeps |s| <= 1/D.
        - `table`: `"electron"`, `"xray"` or a `ScatteringTable`.

        **Returns:** an `IndependentAtomVolume`.
        """
        atoms, res = atoms_of(atoms, resolution, False, "IndependentAtomVolume")
        if not isinstance(res, jax.core.Tracer) and not float(np.asarray(res)) > 0:
            raise ValueError(f"the Fourier map needs a resolution D > 0 Å (the cut |s| <= 1/D), got {float(res)}")
        if isinstance(table, str):
            table = get_table(table, dtype=atoms.positions.dtype)
        return cls(atoms.positions, atoms.b_factors, atoms.occupancies, res, atoms.atomic_numbers, table)

    def total_mass(self) -> Float[Array, ""]:
        """`Σ q_j f_j(0)`: the integral of the unfiltered map (the Fourier map's integral too)."""
        return jnp.sum(self.occupancies * self.table.f0(self.atomic_numbers))

    def gaussian_widths(self) -> Float[Array, "n K"]:
        """`b_ek + B_j` (Å²) for every atom and Gaussian term: the exponents the renderer sees."""
        return self.table.b[self.atomic_numbers].astype(self.b_factors.dtype) + self.b_factors[..., None]

    def gaussian_amplitudes(self) -> Float[Array, "n K"]:
        """`q_j a_ek` for every atom and Gaussian term."""
        return self.occupancies[..., None] * self.table.a[self.atomic_numbers].astype(self.occupancies.dtype)
