"""Fitting shell decompositions of exact atomic images (float64 numpy/scipy, offline).

Implements `shared/specs/shell_decomposition.md` §6.2. Everything is in normalized units: distance
x = r/D, image y(x) = ρ_D(xD)/ρ0(D), and the image is approximated by

    y(x) ≈ Σ_m c_m Ω(x; r_m, b_m),     Ω(x; r, b) = (4π/b)^{3/2} exp(-a (x-r)²) φ(4 a r x),  a = 4π²/b,

with φ(t) = (1 - e^{-t})/t. Term 0 is the Gaussian (r_0 = 0); term m >= 1 is a shell placed at the
m-th extremum of the image. Absolute parameters follow by `R = D r`, `B = D² b`, `C = D³ ρ0 c`
(the scaling property of Ω, §4.2).

The fit is a bounded nonlinear least squares (scipy `least_squares`, trust-region reflective, with
the analytic Jacobian of §4.3) with *locality bounds* (`|r_m - x_m| <= 0.25`, `b_m` in
`[0.02, cap_m]`, `cap = 20, 12, 8, 5, 3, 3, ...`, `c_m >= 0` at a maximum and `<= 0` at a minimum): without them the optimizer finds broad cancelling terms whose truncations are useless.
Along a grid of D values each fit is warm-started from the previous one (continuation), and checked
for continuity; a jump triggers a cold refit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import least_squares

from ..scattering._images import atomic_image
from ._omega import omega, omega_partials

__all__ = ["FitSettings", "ShellFit", "fit_image", "normalized_image", "find_extrema"]

FITTER_VERSION = "2"


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """Settings of the fit (all in units of D).

    - `x_fit`: fit on x in [0, x_fit] (12 by default).
    - `step`: grid step in x (0.01).
    - `n_shells`: shells kept in the table (the first `n_shells` extrema of the image; 22 by default,
      all of those well inside [0, x_fit]).
    - `caps`: upper bounds of b_m for m = 0, 1, ... (the last value repeats).
    - `b_min`: lower bound of every b_m.
    - `r_move`: how far a shell may move from its extremum.
    - `err_range`: the fit error is measured on x in [0, err_range] (11).
    """

    x_fit: float = 12.0
    step: float = 0.01
    n_shells: int = 22
    caps: tuple[float, ...] = (20.0, 12.0, 8.0, 5.0, 3.0)
    b_min: float = 0.02
    r_move: float = 0.25
    err_range: float = 11.0

    def cap(self, m: int) -> float:
        return self.caps[min(m, len(self.caps) - 1)]


@dataclasses.dataclass(frozen=True)
class ShellFit:
    """One fitted decomposition: `params` `(K, 3)` = normalized (r, b, c) per term, the peak height
    `rho0` of the exact image, and `max_error` = max |model - image| / ρ0 on [0, err_range]."""

    params: np.ndarray
    rho0: float
    max_error: float
    extrema: np.ndarray
    cold: bool


def normalized_image(z: int, resolution: float, x, table: str) -> tuple[np.ndarray, float]:
    """The exact image y(x) = ρ_D(xD)/ρ0 at B = 0 and its peak height ρ0 = ρ_D(0)."""
    rho = atomic_image(z, np.asarray(x) * resolution, resolution, 0.0, table, n_nodes=800)
    rho0 = float(atomic_image(z, np.zeros(1), resolution, 0.0, table, n_nodes=800)[0])
    return rho / rho0, rho0


def find_extrema(x, y) -> np.ndarray:
    """Positions of the interior extrema of y sampled on the uniform grid x (parabolic refinement)."""
    dy = np.diff(y)
    idx = np.nonzero(np.sign(dy[1:]) != np.sign(dy[:-1]))[0] + 1
    h = x[1] - x[0]
    out = []
    for i in idx:
        y0, y1, y2 = y[i - 1], y[i], y[i + 1]
        den = y0 - 2 * y1 + y2
        out.append(x[i] + (0.5 * h * (y0 - y2) / den if den != 0 else 0.0))
    return np.asarray(out)


class _Problem:
    """Residuals and Jacobian in the packed variables (b0, c0, r1, b1, c1, r2, ...)."""

    def __init__(self, x, y):
        self.x = x[:, None]
        self.y = y

    @staticmethod
    def unpack(v):
        k = (len(v) + 1) // 3
        r = np.concatenate([[0.0], v[2::3]])
        b = np.concatenate([[v[0]], v[3::3]])
        c = np.concatenate([[v[1]], v[4::3]])
        assert len(r) == k
        return r, b, c

    @staticmethod
    def pack(r, b, c):
        v = [b[0], c[0]]
        for m in range(1, len(r)):
            v += [r[m], b[m], c[m]]
        return np.asarray(v)

    def model(self, v):
        r, b, c = self.unpack(v)
        return omega(self.x, r[None], b[None], np) @ c

    def residuals(self, v):
        return self.model(v) - self.y

    def jacobian(self, v):
        r, b, c = self.unpack(v)
        om, d_r, d_b = omega_partials(self.x, r[None], b[None], np)
        n, k = om.shape
        jac = np.empty((n, 3 * k - 1))
        jac[:, 0] = c[0] * d_b[:, 0]
        jac[:, 1] = om[:, 0]
        jac[:, 2::3] = c[None, 1:] * d_r[:, 1:]
        jac[:, 3::3] = c[None, 1:] * d_b[:, 1:]
        jac[:, 4::3] = om[:, 1:]
        return jac


def _initial_terms(x, y, extrema, settings: FitSettings):
    """Gaussian at 0 and one shell per extremum, widths from the curvature, c by linear least squares."""
    h = x[1] - x[0]
    # y''(0) from the even extension: (2 y1 - 2 y0)/h²
    a0 = -(2 * y[1] - 2 * y[0]) / h**2 / (2 * y[0])
    b = [4 * np.pi**2 / a0]
    for xe in extrema:
        i = int(round(xe / h))
        d2 = (y[i + 1] - 2 * y[i] + y[i - 1]) / h**2
        b.append(-8 * np.pi**2 * y[i] / d2)
    r = np.concatenate([[0.0], extrema])
    b = np.asarray(b)
    b = np.clip(b, settings.b_min, [settings.cap(m) for m in range(len(b))])
    c, *_ = np.linalg.lstsq(omega(x[:, None], r[None], b[None], np), y, rcond=None)
    return r, b, c


def _bounds(extrema, signs, settings: FitSettings):
    lo, hi = [settings.b_min, -np.inf], [settings.cap(0), np.inf]
    if signs[0] > 0:
        lo[1] = 0.0
    else:
        hi[1] = 0.0
    for m, (xe, s) in enumerate(zip(extrema, signs[1:]), start=1):
        lo += [max(xe - settings.r_move, 0.0), settings.b_min, 0.0 if s > 0 else -np.inf]
        hi += [xe + settings.r_move, settings.cap(m), np.inf if s > 0 else 0.0]
    return np.asarray(lo), np.asarray(hi)


def fit_image(
    z: int,
    resolution: float,
    table: str,
    settings: FitSettings = FitSettings(),
    start: np.ndarray | None = None,
) -> ShellFit:
    """Fit the shell decomposition of element `z` at resolution D (B = 0), normalized units.

    **Arguments:**

    - `z`: atomic number.
    - `resolution`: D in Å.
    - `table`: `"electron"` or `"xray"`.
    - `settings`: `FitSettings`.
    - `start`: `(K, 3)` normalized parameters to warm-start from (continuation), or None (cold).

    **Returns:** a `ShellFit`.
    """
    x = np.arange(0.0, settings.x_fit + 0.5 * settings.step, settings.step)
    y, rho0 = normalized_image(z, resolution, x, table)
    extrema = find_extrema(x, y)
    if len(extrema) < settings.n_shells:
        raise RuntimeError(
            f"Z={z} D={resolution}: only {len(extrema)} extrema in [0, {settings.x_fit}], need {settings.n_shells}"
        )
    extrema = extrema[: settings.n_shells]
    # a maximum gets c >= 0, a minimum c <= 0 (by curvature, not by the image's sign there: a shallow
    # first minimum can lie above zero, e.g. the X-ray image of H at D = 1 Å)
    idx = np.clip(np.rint(extrema / settings.step).astype(int), 1, len(x) - 2)
    curvature = y[idx + 1] - 2 * y[idx] + y[idx - 1]
    signs = np.concatenate([[1.0], -np.sign(curvature)])
    lo, hi = _bounds(extrema, signs, settings)
    prob = _Problem(x, y)
    if start is None:
        r, b, c = _initial_terms(x, y, extrema, settings)
        v0 = prob.pack(r, b, c)
    else:
        v0 = prob.pack(start[:, 0], start[:, 1], start[:, 2])
    # strictly inside the bounds (TRF needs a feasible start; zero c on a one-sided bound is allowed)
    span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    v0 = np.clip(v0, lo + 1e-9 * span, hi - 1e-9 * span)
    sol = least_squares(
        prob.residuals, v0, jac=prob.jacobian, bounds=(lo, hi), method="trf",
        x_scale="jac", ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=400,
    )
    r, b, c = prob.unpack(sol.x)
    inside = x <= settings.err_range + 1e-9
    err = float(np.max(np.abs(sol.fun[inside])))
    return ShellFit(np.stack([r, b, c], axis=1), rho0, err, extrema, start is None)
