"""The shell function Ω(r; R, B) of the shell decomposition and its factor φ: their one home.

Urzhumtsev & Lunin (2022), Acta Cryst. D78, 1451; `shared/specs/shell_decomposition.md` §4. Every
function takes the array namespace `xp`: `jax.numpy` (the default; traced, differentiable, the
renderer's dtype) or `numpy` (float64, the offline fitter).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

__all__ = ["PHI_SERIES_BELOW", "phi", "phi_derivative", "omega", "omega_partials"]

_FOUR_PI2 = 4.0 * math.pi**2

#: Below this t, φ and φ' are taken from their Taylor series (spec §4.1: the double-`where` trick
#: with a series below 1e-4). The series are carried far enough that their truncation errors there,
#: t⁴/120 ≈ 1e-18 for φ and t³/30 ≈ 3e-14 for φ', are below float64 rounding of φ and within the
#: cancellation error of the closed form of φ' at the switch.
PHI_SERIES_BELOW = 1e-4


def phi(t, xp=jnp):
    """`φ(t) = (1 - e^{-t})/t` for t >= 0, with φ(0) = 1 and finite derivatives at 0.

    `-expm1(-t)/t` above `PHI_SERIES_BELOW`, the series `1 - t/2 + t²/6 - t³/24` below it (the
    double-`where` trick: the closed form never sees t = 0, so JAX's gradients stay finite).

    The two copies this replaces disagreed on the switch: the renderer's JAX φ used the spec's
    1e-4 with the series to t², whose error t³/24 (4e-14 relative at the switch) exceeds float64
    rounding; the fitter's numpy φ switched at 1e-6 to stay float64-exact. One switch (the spec's
    1e-4) with the series to t³ is float64-exact (error t⁴/120 < 1e-18) and float32-exact.

    **Arguments:**

    - `t`: `4 a R r` with `a = 4π²/B` (dimensionless, >= 0); any shape.
    - `xp`: `jax.numpy` or `numpy`.

    **Returns:** φ(t), shape of `t`.
    """
    small = t < PHI_SERIES_BELOW
    ts = xp.where(small, 1.0, t)
    return xp.where(small, 1 - t * (1 / 2 - t * (1 / 6 - t / 24)), -xp.expm1(-ts) / ts)


def phi_derivative(t, xp=jnp):
    """`φ'(t) = (e^{-t}(1 + t) - 1)/t²`, φ'(0) = -1/2 (series `-1/2 + t/3 - t²/8` below
    `PHI_SERIES_BELOW`).

    **Arguments:** as `phi`.

    **Returns:** φ'(t), shape of `t`.
    """
    small = t < PHI_SERIES_BELOW
    ts = xp.where(small, 1.0, t)
    return xp.where(small, -0.5 + t / 3 - t * t / 8, (xp.exp(-ts) * (1 + ts) - 1) / ts**2)


def omega(r, radius, width, xp=jnp):
    """The shell function `Ω(r; R, B) = (4π/B)^{3/2} exp(-4π²(r-R)²/B) φ(16π² r R/B)` (Å⁻³).

    A sphere of radius R (Å) blurred by B (Å²), integral 1, Fourier transform
    `exp(-B s²/4) sin(2π s R)/(2π s R)` (Urzhumtsev & Lunin 2022; spec §4.1). R = 0 gives the
    Gaussian `(4π/B)^{3/2} exp(-4π² r²/B)`; blurring by a Gaussian of B₀ adds B₀ to B (§4.2).
    Broadcasts; stable and differentiable at r = 0, R = 0.

    **Arguments:**

    - `r`: distance from the atom in Å (>= 0).
    - `radius`: the shell's radius R in Å (>= 0).
    - `width`: its B in Å² (> 0).
    - `xp`: `jax.numpy` or `numpy`.

    **Returns:** Ω, the broadcast shape of the arguments.
    """
    a = _FOUR_PI2 / width
    return (4 * math.pi / width) ** 1.5 * xp.exp(-a * (r - radius) ** 2) * phi(4 * a * radius * r, xp)


def omega_partials(r, radius, width, xp=jnp):
    """Ω and its partial derivatives with respect to R and B (spec §4.3), for the fitter's Jacobian:

    `∂Ω/∂R = P E [2a(r-R) φ(t) + 4a r φ'(t)]`,
    `∂Ω/∂B = -3/(2B) Ω + P E [a(r-R)²/B φ(t) - (t/B) φ'(t)]`,

    with `a = 4π²/B`, `t = 4aRr`, `P = (4π/B)^{3/2}`, `E = exp(-a(r-R)²)`.

    **Arguments:** as `omega`.

    **Returns:** `(Ω, ∂Ω/∂R, ∂Ω/∂B)`, each of the broadcast shape.
    """
    a = _FOUR_PI2 / width
    p = (4 * math.pi / width) ** 1.5
    e = xp.exp(-a * (r - radius) ** 2)
    t = 4 * a * radius * r
    ph, dph = phi(t, xp), phi_derivative(t, xp)
    om = p * e * ph
    d_radius = p * e * (2 * a * (r - radius) * ph + 4 * a * r * dph)
    d_width = -1.5 / width * om + p * e * (a * (r - radius) ** 2 / width * ph - t / width * dph)
    return om, d_radius, d_width
