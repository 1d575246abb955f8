"""Atoms as sums of spherical shells: finite-resolution images with a resolution per atom."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._atoms import Atoms, Ensemble
from ..shells import D_RANGE, ShellTable, get_shell_table
from ._base import AbstractVolume, atoms_of

__all__ = ["ShellDecompositionVolume", "DEFAULT_SHELL_TERMS"]

DEFAULT_SHELL_TERMS = 6


class ShellDecompositionVolume(AbstractVolume):
    """Atoms whose images are the exact finite-resolution images at their own resolution,
    written as sums of shells (Urzhumtsev & Lunin, Acta Cryst. D78 (2022) 1451; IUCrJ 9 (2022) 728):

    `ρ_j(r) = q_j Σ_{m<K} w_m C_m(D_j) Ω(r; R_m(D_j), B_m(D_j) + B_j)`,

    `Ω(r; R, B) = (4π/B)^{3/2} exp(-4π²(r-R)²/B) φ(16π² r R/B)`, `φ(t) = (1 - e^{-t})/t`

    (a unit-integral spherical shell of radius R blurred by B; the Gaussian for R = 0), with
    `R_m = D r_m(D)`, `B_m = D² b_m(D)`, `C_m = D³ ρ0(D) c_m(D)` from the `ShellTable`'s normalized
    parameters interpolated smoothly in D. Term 0 is the Gaussian core, term m >= 1 the m-th
    Fourier ripple (at r ≈ 0.85, 1.41, 1.95, 2.47, ... D). The exact image is
    `ρ_{D,B}(r) = (2/r) ∫_0^{1/D} s f(s) exp(-B s²/4) sin(2π s r) ds` (hard cut |s| <= 1/D);
    keeping K terms drops the ripples beyond R ≈ (K/2) D, an error of about the first dropped
    ripple: 0.6 % of the peak for K = 6, 0.1 % for K = 16 (spec §7.1). The last kept term has
    weight w = 1/2 (a Cesàro taper, so that Σ C stays near f(0); spec §7.4), the others 1.

    Against the Fourier map the L2 error falls only as ~1/√R_cut: the dropped ripples decay as
    1/r², so the energy beyond R_cut goes as 1/R_cut. It matters where the atoms' transforms are
    still large at |s| = 1/D (low B/D²): 7CEC at 3.9 Å correlates with its Fourier map at CC 0.9989
    (K = 6) and 0.9996 (K = 12), but the low-B (3.6-44 Å²) 3ajo at 1.75 Å only at 0.9971 (K = 6),
    0.9980 (K = 8), 0.9988 (K = 12) and 0.9996 (K = 23) (`benchmarks/shells_convergence.py`).
    For 3ajo that is mostly the bound any finite window has: its *exact* atomic images,
    each cut at the radius K = 6 evaluates at B = 0 (R_cut + 0.6 D = 3.6 D), correlate at 0.9978,
    and at 6.6 D (K = 12) at 0.9990 (7CEC's at 0.9996 and 0.9999: at its B/D², more of the shell
    map's error is the truncation of blurred terms inside the window).

    Every leaf is differentiable: positions, B, occupancies and per-atom resolutions D
    (through the cubic Hermite interpolation of the table in D and the exact ρ0(D)).

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å.
    - `b_factors`: `(n,)` isotropic B in Å² (B_m + B_j must stay > 0; B_m >= ~2.7 D²).
    - `occupancies`: `(n,)` occupancies (weights).
    - `resolution`: `(n,)` per-atom resolution D in Å, 1 <= D <= 10.
    - `element_index`: `(n,)` row of each atom's element in `table` (integer leaf).
    - `table`: the `ShellTable`.
    - `n_terms`: K, the number of terms kept (static; default 6, at most `table.n_terms`).
    """

    positions: Float[Array, "n 3"]
    b_factors: Float[Array, " n"]
    occupancies: Float[Array, " n"]
    resolution: Float[Array, " n"]
    element_index: Int[Array, " n"]
    table: ShellTable
    n_terms: int = eqx.field(static=True, default=DEFAULT_SHELL_TERMS)

    shared_fields = ("table",)

    def __check_init__(self):
        if not 1 <= self.n_terms <= self.table.n_terms:
            raise ValueError(f"n_terms must be in [1, {self.table.n_terms}], got {self.n_terms}")

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms | Ensemble,
        resolution: float | Float[Array, "*n"],
        table: str | ShellTable = "electron",
        n_terms: int = DEFAULT_SHELL_TERMS,
    ) -> "ShellDecompositionVolume":
        """Shells of the atoms at a resolution D (one value, or one per atom).

        **Arguments:**

        - `atoms`: one structure (`Atoms` `(n, ...)`, concrete atomic numbers) or an `Ensemble`
          (its weighted mean map).
        - `resolution`: D in Å, a scalar or `(n,)` per-atom values in [1, 10].
        - `table`: `"electron"`, `"xray"` or a `ShellTable`.
        - `n_terms`: K terms kept (6 by default; 12-16 for a precise map).

        **Returns:** a `ShellDecompositionVolume`.
        """
        atoms, res = atoms_of(atoms, resolution, True, "ShellDecompositionVolume")
        dtype = atoms.positions.dtype
        if isinstance(table, str):
            table = get_shell_table(table, dtype=dtype)
        element_index = jnp.asarray(table.element_index(atoms.atomic_numbers))
        if not isinstance(res, jax.core.Tracer):
            r = np.asarray(res)
            if np.any(~np.isfinite(r)) or np.any(r < D_RANGE[0]) or np.any(r > D_RANGE[1]):
                raise ValueError(
                    f"resolutions must lie in [{D_RANGE[0]}, {D_RANGE[1]}] Å (the shell tables' range); "
                    f"got values from {np.nanmin(r):.3g} to {np.nanmax(r):.3g}"
                )
        return cls(atoms.positions, atoms.b_factors, atoms.occupancies, res, element_index, table, n_terms)

    def term_weights(self) -> Float[Array, " K"]:
        """`(K,)` the truncation weights: 1, ..., 1, 1/2 (spec §7.4); a single term keeps weight 1."""
        w = jnp.ones((self.n_terms,), self.positions.dtype)
        return w.at[-1].set(0.5) if self.n_terms > 1 else w

    def shell_parameters(self) -> tuple[Float[Array, "n K"], Float[Array, "n K"], Float[Array, "n K"]]:
        """Absolute shell parameters per atom and kept term: radii R (Å), total widths
        `B_m(D) + B_j` (Å²) and amplitudes `q_j w_m C_m(D)` (Å for electrons, electrons for X-ray:
        each term's integral)."""
        d = self.resolution
        r, b, c = self.table.normalized(self.element_index, d, self.n_terms)
        rho0 = self.table.rho0(self.element_index, d)
        radii = d[:, None] * r
        widths = d[:, None] ** 2 * b + self.b_factors[:, None]
        amps = (self.occupancies * d**3 * rho0)[:, None] * c * self.term_weights()
        return radii, widths, amps

    def total_mass(self) -> Float[Array, ""]:
        """`Σ_j q_j Σ_m w_m C_m`: the map's integral (≈ Σ q f(0) within a few % for K >= 5)."""
        return jnp.sum(self.shell_parameters()[2])

