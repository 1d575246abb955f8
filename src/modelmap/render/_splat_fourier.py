"""The finite-resolution Fourier map by Gaussian splatting and one FFT: fast, for refinement.

`NufftRenderFn` computes the Fourier map of a model at resolution D exactly, through a type-1
NUFFT. The same map can be had from real-space splatting, because the hard-sphere filter is linear:

    ρ_D = F⁻¹[ 1(|s| <= 1/D) · exp(+B_x s²/4) · F[ρ_{B_x}] ],

where ρ_{B_x} is the model's density blurred by an extra B_x (every atom's Gaussians widened by
B_x: `GaussianMixtureVolume.from_gaussians` of `b_k + B + B_x`), sampled at the grid points of the padded box
(`GaussianMixtureRenderFn`, windows of ~4σ set by `eps`), and F the discrete Fourier transform of
that box. The extra blur is what makes the sampled density band-limited enough: a frequency s of ρ_{B_x} beyond
the grid's Nyquist limit folds back onto s − m/v (v the voxel size), and lands inside the kept
sphere only if |s| >= 1/v_max − 1/D = s_a. B_x is chosen so that every atom's Fourier amplitude
there, f(s_a) exp(−(B_x + B_min) s_a²/4), is below `eps` of its value at s = 0 (f the scattering
factor of each element present; without it, B_x = max(0, 4 ln(1/eps) / s_a² − B_min)).

Dividing by exp(−B_x s²/4) inside the sphere then restores the atoms' own B exactly. The price is an
amplification of float32 rounding by exp(B_x / (4 D²)), small when D is at least ~3 voxels
(7CEC at 3 Å on a 1.11 Å grid: B_x = 0 Å² at its own B, 72-312 Å²) and up to 1/eps when D is the grid's Nyquist
resolution (use `NufftRenderFn` there).

The box is padded as `NufftRenderFn` pads it (3 D on every side, rounded to FFT-friendly sizes), so
the two renderers give the same map up to `eps` (tested). Splatting costs atoms × window and its
gradient comes from the hand-written VJP of the window renderer, so value and gradient are several
times cheaper than the NUFFT route on CPU: this is the model map of `modelmap.refine`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import scipy.special
from jaxtyping import Array, Float

from .._arrays import on_host
from .._grid import Grid
from ..volumes import GaussianMixtureVolume, IndependentAtomVolume
from ._base import AbstractRenderFn, RenderBounds, checked_call, split_margin
from ._gaussian_mixture import GaussianMixtureRenderFn
from ._nufft import check_fourier_fields, check_nyquist, check_resolution, hard_sphere, padded_box

__all__ = ["SplatFourierRenderFn", "aliasing_blur"]

_EIGHT_PI2 = 8.0 * math.pi**2


def aliasing_blur(grid: Grid, resolution: float, b_min: float, eps: float, form_factors=None) -> float:
    """The extra blur B_x (Å²) that keeps aliasing into the sphere |s| <= 1/D below `eps` (module docs).

    **Arguments:**

    - `grid`: the grid (its largest voxel size sets the Nyquist limit).
    - `resolution`: D in Å.
    - `b_min`: the smallest B (Å²) of the atoms to render (their own B, before the blur).
    - `eps`: tolerated amplitude of the aliased frequencies relative to an atom's value at s = 0.
    - `form_factors`: optional `(a, b)` arrays `(e, K)` of the Gaussian coefficients of the atoms'
      scattering factors; their own decay at the aliasing frequency then counts too (a smaller B_x).
      Without them the bound is `exp(−(B_x + B_min) s_a²/4) <= eps`.

    **Returns:** B_x in Å² (>= 0).
    """
    s_a = 1.0 / max(grid.voxel_size) - 1.0 / resolution
    if s_a <= 0:
        raise ValueError(f"resolution {resolution} Å is finer than the grid's Nyquist limit")
    t = s_a**2 / 4.0
    upper = max(0.0, math.log(1.0 / eps) / t - b_min)
    if form_factors is None:
        return upper
    a, b = (np.asarray(x, np.float64) for x in form_factors)

    def worst(bx: float) -> float:
        f = np.sum(a * np.exp(-(b + b_min + bx) * t), axis=-1)
        return float(np.max(f / np.sum(a, axis=-1)))

    if worst(0.0) <= eps:
        return 0.0
    lo, hi = 0.0, upper
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if worst(mid) <= eps else (mid, hi)
    return hi


class SplatFourierRenderFn(AbstractRenderFn[IndependentAtomVolume]):
    """The Fourier map at the volume's resolution D of an `IndependentAtomVolume`, by splatting
    blurred Gaussians on the padded box and one real FFT there (see the module docs): the same map
    as `NufftRenderFn` to about `eps`, with cheaper values and gradients, in pure JAX (any device).

    Planning fixes the padded box and the finest D (`resolution_range`, static), the splatting
    windows, and the extra blur B_x (an array: another structure of the same shapes does not
    recompile). A volume with a finer D, or a B outside the plan, is an error.

    **Arguments:**

    - `grid`: the target `Grid`.
    - `sampling`: `"point"` (values at the grid points) or `"average"` (voxel-box means, by the
      sinc transfer function as in `NufftRenderFn`).
    - `eps`: relative amplitude of the aliased frequencies (sets the extra blur).
    - `padding`: Å added on every side (default 3 D of the coarsest planned D, as `NufftRenderFn`).
    - `max_buckets`: at most this many window sizes in the splatting (fewer compiled scans, larger
      windows); `None` (default): every size exact.
    - `n_sigma`: window coverage of the splatted Gaussians in standard deviations; `None` (default):
      from `eps`, where a Gaussian's 1-D tail mass beyond the window, erfc(n/√2), is `eps`/10
      (n = 3.9 at eps = 1e-3, 4.4 at 1e-4): the cut tails stay below the aliasing already allowed,
      and a narrower window is cheaper (a 4σ cube is half a 5σ one).
    - `accumulate`: the splatting's accumulation (`"auto"`, `"loop"`, `"scatter"`; see
      `GaussianMixtureRenderFn`).
    - `window_classes`: window sizes a `with_bounds` plan's splatting may choose from per chunk
      of atoms (see `GaussianMixtureRenderFn`); 1: one for all.
    - `resolution_range`: `(finest, coarsest)` D in Å of the plan (static).
    - `extra_b`: the extra blur B_x in Å² (an array), set by planning.
    - `splat`: the `GaussianMixtureRenderFn` of the padded box, set by planning.
    """

    grid: Grid = eqx.field(static=True)
    sampling: Literal["point", "average"] = eqx.field(static=True, default="point")
    eps: float = eqx.field(static=True, default=1e-4)
    padding: float | None = eqx.field(static=True, default=None)
    max_buckets: int | None = eqx.field(static=True, default=None)
    n_sigma: float | None = eqx.field(static=True, default=None)
    accumulate: str = eqx.field(static=True, default="auto")
    window_classes: int = eqx.field(static=True, default=1)
    resolution_range: tuple[float, float] | None = eqx.field(static=True, default=None)
    extra_b: Float[Array, ""] | None = None
    splat: GaussianMixtureRenderFn | None = None

    def __check_init__(self):
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.n_sigma is not None and not self.n_sigma > 0:
            raise ValueError(f"n_sigma must be positive, got {self.n_sigma}")
        check_fourier_fields(self.grid, self.sampling, self.resolution_range, strict=True)

    @property
    def is_planned(self) -> bool:
        return self.splat is not None

    def padded_shape(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """`((Nz, Ny, Nx), (pz, py, px))`, exactly as `NufftRenderFn` pads the same grid."""
        return padded_box(self.grid, self.padding, self.resolution_range)

    def padded_grid(self) -> Grid:
        """The padded box as a `Grid` (same voxels, origin moved out by the padding)."""
        (nz, ny, nx), (pz, py, px) = self.padded_shape()
        vx, vy, vz = self.grid.voxel_size
        ox, oy, oz = self.grid.origin
        return Grid((nz, ny, nx), self.grid.voxel_size, (ox - px * vx, oy - py * vy, oz - pz * vz))

    def _window_sigma(self) -> float:
        if self.n_sigma is not None:
            return self.n_sigma
        return math.sqrt(2.0) * float(scipy.special.erfcinv(self.eps / 10.0))

    def _blur(self, d_lo: float, b_min: float, elements, table) -> float:
        check_nyquist(self.grid, d_lo, strict=True)
        z = np.asarray(elements)
        return aliasing_blur(self.grid, d_lo, b_min, self.eps, (np.asarray(table.a)[z], np.asarray(table.b)[z]))

    def with_plan(
        self, volume: IndependentAtomVolume, b_margin: float | tuple[float, float] = 0.0, d_margin: float = 0.0
    ) -> "SplatFourierRenderFn":
        """A copy planned for `volume` (concrete; a leading batch axis: every member): B_x from its
        smallest B lowered by `b_margin` (a pair `(below, above)`: by `below`), windows that allow
        every B to grow by `b_margin` (`above`) Å², for its D (lowered by `d_margin` Å)."""
        below, above = split_margin(b_margin)
        b = np.asarray(volume.b_factors, np.float64)
        if b.size == 0:
            raise ValueError("the volume has no atoms")
        d = np.asarray(volume.resolution, np.float64)
        d_lo, d_hi = float(d.min()) - d_margin, float(d.max())
        extra = self._blur(d_lo, max(float(b.min()) - below, 0.0), np.unique(np.asarray(volume.atomic_numbers)),
                           volume.table)
        if float(np.asarray(volume.gaussian_widths()).min()) - below + extra <= 0:
            raise ValueError(
                f"every Gaussian needs b_k + B + B_x > 0; the plan lets B drop by {below} Å² to "
                f"{float(b.min()) - below:.2f} Å²: plan for a smaller drop"
            )
        rf = dataclasses.replace(self, resolution_range=(d_lo, d_hi), extra_b=jnp.asarray(extra, jnp.float32))
        splat = GaussianMixtureRenderFn(
            rf.padded_grid(), sampling="point", n_sigma=self._window_sigma(), max_buckets=self.max_buckets,
            accumulate=self.accumulate,
        ).with_plan(_gaussians(on_host(volume), extra), b_margin=above)
        return dataclasses.replace(rf, splat=splat)

    def anti_aliasing_blur(self, bounds: RenderBounds) -> float:
        """The extra blur B_x (Å²) that keeps aliasing below `eps` for every volume within
        `bounds`: that of their lowest B and finest D (`aliasing_blur`)."""
        from ..scattering import get_table

        table = get_table(bounds.table)
        elements = np.flatnonzero(np.asarray(table.defined)) if bounds.elements is None else bounds.elements
        return self._blur(bounds.resolution[0], max(bounds.b_factor[0], 0.0), elements, table)

    def with_bounds(self, bounds: RenderBounds) -> "SplatFourierRenderFn":
        """A copy that holds every volume within `bounds` (B_x from the lowest B and finest D)."""
        d_lo, d_hi = bounds.resolution
        extra = self.anti_aliasing_blur(bounds)
        rf = dataclasses.replace(self, resolution_range=(d_lo, d_hi), extra_b=jnp.asarray(extra, jnp.float32))
        # the splatted Gaussians are the atoms' own, widened by B_x: bounds of B shifted by B_x, at D = 0
        shifted = RenderBounds((bounds.b_factor[0] + extra, bounds.b_factor[1] + extra), 0.0, bounds.elements,
                               bounds.table, widest=None if bounds.widest is None else bounds.widest + extra)
        splat = GaussianMixtureRenderFn(
            rf.padded_grid(), sampling="point", n_sigma=self._window_sigma(), accumulate=self.accumulate,
            window_classes=self.window_classes,
        ).with_bounds(shifted)
        return dataclasses.replace(rf, splat=splat)

    def __call__(self, volume: IndependentAtomVolume) -> Float[Array, "nz ny nx"]:
        """The Fourier map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray)."""
        return checked_call(_render, self._plan_at_call(volume), volume)


def _gaussians(volume: IndependentAtomVolume, extra_b) -> GaussianMixtureVolume:
    """The atoms' Gaussians widened by `extra_b` (a numpy volume gives numpy leaves: planning)."""
    variances = (volume.gaussian_widths() + extra_b) / _EIGHT_PI2
    return GaussianMixtureVolume.from_gaussians(volume.positions, volume.gaussian_amplitudes(), variances)


def _transfer(rf: SplatFourierRenderFn, d_volume, dtype):
    """`1(|s| <= 1/D) exp(B_x s²/4)` (× the voxel sinc for "average") on the rfftn half spectrum."""
    (Nz, Ny, Nx), _ = rf.padded_shape()
    vx, vy, vz = rf.grid.voxel_size
    sz = np.fft.fftfreq(Nz, vz)
    sy = np.fft.fftfreq(Ny, vy)
    sx = np.fft.rfftfreq(Nx, vx)
    s2 = sz[:, None, None] ** 2 + sy[None, :, None] ** 2 + sx[None, None, :] ** 2
    # as NufftRenderFn: modes |m| <= (N - 1) // 2, so a Nyquist plane is never half-counted
    mz, my = np.abs(np.fft.fftfreq(Nz, 1.0 / Nz)), np.abs(np.fft.fftfreq(Ny, 1.0 / Ny))
    mx = np.arange(Nx // 2 + 1)
    modes = ((mz <= (Nz - 1) // 2)[:, None, None] & (my <= (Ny - 1) // 2)[None, :, None]
             & (mx <= (Nx - 1) // 2)[None, None, :])
    # the cut of the planned finest D (static) and of the volume's own D, as NufftRenderFn does
    keep = jnp.asarray(modes) & hard_sphere(s2, rf.resolution_range[0], d_volume, dtype)
    s2j = jnp.where(keep, jnp.asarray(s2, dtype), 0.0)
    h = jnp.where(keep, jnp.exp(rf.extra_b.astype(dtype) * s2j / 4.0), 0.0)
    if rf.sampling == "average":
        h = h * jnp.asarray(np.sinc(sz * vz)[:, None, None] * np.sinc(sy * vy)[None, :, None]
                            * np.sinc(sx * vx)[None, None, :], dtype)
    return h


@eqx.filter_jit
def _render(rf: SplatFourierRenderFn, volume: IndependentAtomVolume):
    dtype = volume.positions.dtype
    d_volume = check_resolution(volume, rf.resolution_range[0])
    (Nz, Ny, Nx), (pz, py, px) = rf.padded_shape()
    rho = rf.splat(_gaussians(volume, rf.extra_b))
    spectrum = jnp.fft.rfftn(rho) * _transfer(rf, d_volume, dtype)
    out = jnp.fft.irfftn(spectrum, s=(Nz, Ny, Nx)).astype(dtype)
    nz, ny, nx = rf.grid.shape
    return out[pz : pz + nz, py : py + ny, px : px + nx]
