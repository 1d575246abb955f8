"""Gaussian mixtures: K isotropic Gaussians per position."""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._atoms import Atoms
from ..scattering import ScatteringTable, get_table
from ._base import AbstractVolume

__all__ = ["GaussianMixtureVolume", "resolution_to_blur"]

_EIGHT_PI2 = 8.0 * math.pi**2


def resolution_to_blur(resolution: float) -> float:
    """Extra B (Å²) that stands for resolution `D` (Å) in a Gaussian model map: `B = 4 D²`.

    A Gaussian blur with this B has the Fourier transform `exp(-B s²/4)`, which falls to `1/e` at
    `s = 1/D`; its real-space σ is `D/(π√2) = 0.225 D`, the same as ChimeraX `molmap`.
    `D = 0` gives no blur.
    """
    if resolution < 0:
        raise ValueError(f"resolution must be >= 0 Å, got {resolution}")
    return 4.0 * float(resolution) ** 2


class GaussianMixtureVolume(AbstractVolume):
    """`n` positions with `K` isotropic Gaussians each.

    The density is `ρ(x) = Σ_j Σ_k A_jk (2π σ²_jk)^{-3/2} exp(-|x - x_j|² / (2 σ²_jk))`: amplitude
    `A_jk` is each Gaussian's integral, `σ²_jk` its per-axis variance in Å².

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å.
    - `amplitudes`: `(n, K)` integrals of the Gaussians (Å for the electron table, electrons for X-ray).
    - `variances`: `(n, K)` per-axis variances in Å², all > 0.
    """

    positions: Float[Array, "n 3"]
    amplitudes: Float[Array, "n K"]
    variances: Float[Array, "n K"]

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms,
        table: str | ScatteringTable = "electron",
        extra_b: float | Float[Array, ""] = 0.0,
        ensemble_weights: Float[Array, " m"] | None = None,
    ) -> "GaussianMixtureVolume":
        """Gaussians of the atoms' 5-Gaussian scattering factors with their B.

        For atom j with occupancy q_j, B_j and table coefficients (a_k, b_k):
        amplitude `q_j a_k`, variance `(b_k + B_j + extra_b) / (8π²)` — the real-space form of
        `f(s) exp(-(B_j + extra_b) s²/4)` (International Tables C 4.3.2.2 / Peng 1996 for
        `"electron"`, IT92 for `"xray"`; see `modelmap.scattering`).

        **Arguments:**

        - `atoms`: an `Atoms` pytree; an ensemble `(m, n, ...)` becomes one mixture of `m n`
          Gaussians sets whose amplitudes are weighted by `ensemble_weights / Σ weights`
          (uniform by default): the occupancy-weighted mean map of the members.
        - `table`: `"electron"`, `"xray"` or a `ScatteringTable`.
        - `extra_b`: extra isotropic blur in Å² added to every atom (see `resolution_to_blur`).
        - `ensemble_weights`: `(m,)` non-negative weights of the ensemble members.

        **Returns:** a `GaussianMixtureVolume`.
        """
        if isinstance(table, str):
            table = get_table(table, dtype=atoms.positions.dtype)
        dtype = atoms.positions.dtype
        z = atoms.atomic_numbers
        a = table.a[z].astype(dtype)
        b = table.b[z].astype(dtype)
        amplitudes = atoms.occupancies[..., None] * a
        variances = (b + atoms.b_factors[..., None] + extra_b) / _EIGHT_PI2
        positions = atoms.positions
        if positions.ndim == 3:
            m = positions.shape[0]
            w = jnp.ones((m,), dtype) if ensemble_weights is None else jnp.asarray(ensemble_weights, dtype)
            w = w / jnp.sum(w)
            amplitudes = (amplitudes * w[:, None, None]).reshape(-1, amplitudes.shape[-1])
            variances = variances.reshape(-1, variances.shape[-1])
            positions = positions.reshape(-1, 3)
        return cls(positions, amplitudes, variances)

    def total_mass(self) -> Float[Array, ""]:
        return jnp.sum(self.amplitudes)

    @property
    def n_positions(self) -> int:
        return self.positions.shape[0]
