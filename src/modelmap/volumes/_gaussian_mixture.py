"""Gaussian mixtures: each atom's scattering factor as K isotropic Gaussians, blurred by its B."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._atoms import Atoms, Ensemble
from ..scattering import ScatteringTable, get_table
from ._base import AbstractVolume, atoms_of

__all__ = ["GaussianMixtureVolume", "resolution_to_blur"]

_EIGHT_PI2 = 8.0 * math.pi**2


def resolution_to_blur(resolution):
    """Extra B (Å²) that stands for resolution `D` (Å) in a Gaussian model map: `B = 4 D²`.

    A Gaussian blur with this B has the Fourier transform `exp(-B s²/4)`, which falls to `1/e` at
    `s = 1/D`; its real-space σ is `D/(π√2) = 0.225 D`, the same as ChimeraX `molmap`.
    `D = 0` gives no blur. Works on numbers and arrays (traced too).
    """
    if not isinstance(resolution, jax.core.Tracer) and np.any(np.asarray(resolution) < 0):
        raise ValueError(f"resolution must be >= 0 Å, got {resolution}")
    return 4.0 * resolution**2


class GaussianMixtureVolume(AbstractVolume):
    """Atoms whose images are sums of K isotropic Gaussians (the form factors' Gaussian terms),
    blurred by each atom's B and by a Gaussian for its resolution.

    Atom j's density is `ρ_j(x) = q_j Σ_k a_jk (2π σ²_jk)^{-3/2} exp(-|x - x_j|² / (2 σ²_jk))`,
    `σ²_jk = (b_jk + B_j + 4 D_j²) / (8π²)`: the real-space form of
    `q_j f_j(s) exp(-(B_j + 4 D_j²) s²/4)` with `f_j(s) = Σ_k a_jk exp(-b_jk s²/4)` (the 5-Gaussian
    electron factors of International Tables C 4.3.2.2 / Peng 1996, or IT92 for X-rays; see
    `modelmap.scattering`). The resolution enters as the blur `B = 4 D²` (`resolution_to_blur`,
    ChimeraX `molmap`'s σ = 0.225 D); D = 0 renders the atoms with their own B only. Every leaf is
    differentiable.

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å.
    - `b_factors`: `(n,)` B in Å².
    - `occupancies`: `(n,)` occupancies.
    - `resolution`: `(n,)` D in Å per atom (>= 0).
    - `amplitudes`: `(n, K)` the Gaussian terms' integrals a_jk (Å for the electron table, electrons
      for X-ray).
    - `widths`: `(n, K)` the Gaussian terms' own widths b_jk in Å² (sinθ/λ convention).
    """

    positions: Float[Array, "n 3"]
    b_factors: Float[Array, " n"]
    occupancies: Float[Array, " n"]
    resolution: Float[Array, " n"]
    amplitudes: Float[Array, "n K"]
    widths: Float[Array, "n K"]

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms | Ensemble,
        resolution: float | Float[Array, "*n"] = 0.0,
        table: str | ScatteringTable = "electron",
    ) -> "GaussianMixtureVolume":
        """The atoms' 5-Gaussian scattering factors with their B, blurred for resolution D.

        **Arguments:**

        - `atoms`: one structure (`Atoms` `(n, ...)`) or an `Ensemble` (its weighted mean map).
        - `resolution`: D in Å, a number or `(n,)` per atom; the blur `4 D²` Å² is added to every
          atom's B (0: none).
        - `table`: `"electron"`, `"xray"` or a `ScatteringTable`.

        **Returns:** a `GaussianMixtureVolume`.
        """
        atoms, res = atoms_of(atoms, resolution, True, "GaussianMixtureVolume")
        dtype = atoms.positions.dtype
        if isinstance(table, str):
            table = get_table(table, dtype=dtype)
        resolution_to_blur(res)  # a negative D is an error
        z = atoms.atomic_numbers
        return cls(atoms.positions, atoms.b_factors, atoms.occupancies, res,
                   table.a[z].astype(dtype), table.b[z].astype(dtype))

    @classmethod
    def from_gaussians(
        cls, positions: Float[Array, "n 3"], amplitudes: Float[Array, "n K"], variances: Float[Array, "n K"]
    ) -> "GaussianMixtureVolume":
        """A free mixture: Gaussians of integrals `amplitudes` and per-axis variances `variances`
        (Å²) at `positions` (B = 0, occupancy 1, D = 0, widths `8π² σ²`). numpy inputs give numpy
        leaves (a volume to plan windows for, on the host), others JAX arrays."""
        numpy = all(isinstance(x, np.ndarray) for x in (positions, amplitudes, variances))
        xp = np if numpy else jnp
        positions = xp.asarray(positions)
        dtype = positions.dtype
        lead = positions.shape[:-1]
        return cls(positions, xp.zeros(lead, dtype), xp.ones(lead, dtype), xp.zeros(lead, dtype),
                   xp.asarray(amplitudes, dtype), _EIGHT_PI2 * xp.asarray(variances, dtype))

    def gaussian_amplitudes(self) -> Float[Array, "n K"]:
        """`q_j a_jk`: the integral of every Gaussian."""
        return self.occupancies[..., None] * self.amplitudes

    def gaussian_variances(self) -> Float[Array, "n K"]:
        """`(b_jk + B_j + 4 D_j²) / (8π²)`: every Gaussian's per-axis variance in Å²."""
        blur = self.b_factors + 4.0 * self.resolution**2
        return (self.widths + blur[..., None]) / _EIGHT_PI2

    def total_mass(self) -> Float[Array, ""]:
        return jnp.sum(self.gaussian_amplitudes())
