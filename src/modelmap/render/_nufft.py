"""The exact finite-resolution Fourier map, through a type-1 NUFFT (jax-finufft).

The Fourier map of a model at resolution D is the Fourier synthesis of its structure factors with
every frequency |s| <= 1/D kept and every other dropped (a hard sphere, as phenix.map_model_cc and
servalcat use), ripples included:

    ρ(x) = (1/V) Σ_{|s| <= 1/D} F(s) exp(2πi s·(x - o)),
    F(s) = Σ_j q_j Σ_k a_{e_j k} exp(-(b_{e_j k} + B_j) s²/4) exp(-2πi s·(x_j - o)),

on the frequencies s = m / (N v) of a periodic box of N voxels of size v per axis (V its volume).

**Per-atom B, exactly.** Each Gaussian term of each atom has its own exponent β = b_ek + B_j. The
function β ↦ exp(-β s²/4) is replaced by its polynomial interpolant at `Q` Chebyshev nodes β_q of
the model's range [β_min, β_max]:

    exp(-β t) ≈ Σ_q L_q(β) exp(-β_q t),   t = s²/4 <= 1/(4 D²),

so that `F(s) = Σ_q exp(-β_q s²/4) N_q(s)`, where `N_q` is one type-1 NUFFT of the atoms with
strengths `Σ_k q_j a_ek L_q(b_ek + B_j)`. All Q transforms share the atoms' positions (one batched
jax-finufft call). Q is chosen so that the interpolation error is below `eps` relative to the largest
term, for every frequency inside the sphere; it is printed in `plan` and grows with (β_max - β_min)/D²
(about 11 for 7CEC at 3.9 Å, B 72-325 Å²). This is exact to `eps`, differentiable in B, and no
per-element or per-B binning is averaged.

**Padding.** The synthesis is periodic in its box, so an atom's ripples (which decay only as
(r/D)⁻², about 0.07 of the peak at r = D) that leave one side re-enter at the other. The box is
therefore padded by `padding` Å on every side (default 3 D, where one atom's ripple is below 1e-2 of
its peak), rounded up to FFT-friendly sizes, rendered, and cropped back to the grid. Atoms outside
the padded box are dropped (their weight set to 0) rather than wrapped in.

**Sampling.** `"point"` gives ρ at the grid points; `"average"` multiplies F by the voxel box's
transfer function Π_axes sinc(s_a v_a), giving the mean of ρ over each voxel's box.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from ..volumes import IndependentAtomVolume
from ._base import AbstractRenderFn

__all__ = ["NufftRenderFn", "chebyshev_nodes_for"]

_MAX_NODES = 64


def _require_finufft():
    try:
        from jax_finufft import nufft1
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NufftRenderFn needs jax-finufft, an optional dependency: pip install 'modelmap[nufft]' "
            "(or pip install jax-finufft)"
        ) from err
    return nufft1


def _smooth_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _chebyshev_points(q: int) -> np.ndarray:
    return np.cos(np.pi * (np.arange(q) + 0.5) / q)


def _lagrange_denominators(nodes: np.ndarray) -> np.ndarray:
    q = len(nodes)
    return np.array([np.prod([nodes[i] - nodes[p] for p in range(q) if p != i]) for i in range(q)])


def _lagrange(x, nodes: np.ndarray, xp=jnp):
    """Lagrange basis polynomials at `nodes` evaluated at x: shape x.shape + (Q,)."""
    denom = _lagrange_denominators(nodes)
    diff = x[..., None] - xp.asarray(nodes, dtype=x.dtype)  # (..., Q)
    cols = []
    for i in range(len(nodes)):
        others = xp.concatenate([diff[..., :i], diff[..., i + 1 :]], axis=-1)
        cols.append(xp.prod(others, axis=-1) / denom[i])
    return xp.stack(cols, axis=-1)


def chebyshev_nodes_for(beta_min: float, beta_max: float, resolution: float, eps: float) -> int:
    """Number of Chebyshev nodes in β for which interpolating exp(-β s²/4) over [β_min, β_max]
    errs by less than `eps · exp(-β_min s²/4)` at every |s| <= 1/resolution."""
    half = 0.5 * (beta_max - beta_min)
    z = half / (4 * resolution**2)  # the largest |exponent| over the interval, relative to its centre
    if z < 1e-12:
        return 1
    x = np.linspace(-1, 1, 2001)
    f = np.exp(-z * (x + 1))  # relative to the value at β_min
    for q in range(1, _MAX_NODES + 1):
        nodes = _chebyshev_points(q)
        interp = _lagrange(x, nodes, xp=np) @ np.exp(-z * (nodes + 1))
        if np.max(np.abs(interp - f)) <= eps:
            return q
    raise ValueError(
        f"B range {beta_min:.1f}-{beta_max:.1f} Å² at {resolution} Å needs more than {_MAX_NODES} "
        "Chebyshev nodes; split the model or use a coarser resolution"
    )


class NufftRenderFn(AbstractRenderFn):
    """The exact Fourier map at resolution D of an `IndependentAtomVolume` (see module docs).

    **Arguments:**

    - `grid`: the target `Grid`.
    - `resolution`: D in Å; frequencies |s| <= 1/D are kept. Must be coarser than the grid's
      Nyquist resolution (2 × the largest voxel size).
    - `sampling`: `"point"` (values at grid points) or `"average"` (voxel-box means).
    - `eps`: relative accuracy of the NUFFT and of the B interpolation.
    - `padding`: Å added on every side of the box before the synthesis (default 3 D).
    - `upsampfac`: finufft's upsampling factor; `None` picks 1.25 (about 4x fewer FFT points than the
      classic 2.0, accurate for `eps >= 1e-8`) and 2.0 for tighter `eps`.
    - `beta_range`: `(β_min, β_max)` in Å² that the B interpolation covers (static); set by
      `with_plan`, or planned at call time from a concrete volume.
    - `n_nodes`: the number Q of Chebyshev nodes (static; set with `beta_range`).
    """

    grid: Grid = eqx.field(static=True)
    resolution: float = eqx.field(static=True)
    sampling: Literal["point", "average"] = eqx.field(static=True, default="point")
    eps: float = eqx.field(static=True, default=1e-6)
    padding: float | None = eqx.field(static=True, default=None)
    upsampfac: float | None = eqx.field(static=True, default=None)
    beta_range: tuple[float, float] | None = eqx.field(static=True, default=None)
    n_nodes: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.sampling not in ("average", "point"):
            raise ValueError(f"sampling must be 'average' or 'point', got {self.sampling!r}")
        nyquist = 2 * max(self.grid.voxel_size)
        if not self.resolution >= nyquist * (1 - 1e-9):
            raise ValueError(
                f"resolution {self.resolution} Å is finer than the grid's Nyquist limit {nyquist:.4g} Å "
                "(2 × voxel size); use a finer grid or a coarser resolution"
            )

    # -- planning ----------------------------------------------------------------------------------
    def with_plan(self, volume: IndependentAtomVolume, b_margin: float = 0.0) -> "NufftRenderFn":
        """A copy whose B interpolation covers `volume`'s B (concrete), widened by `b_margin` Å²."""
        widths = np.asarray(volume.gaussian_widths(), np.float64)
        if widths.size == 0:
            raise ValueError("the volume has no atoms")
        lo = float(widths.min()) - b_margin
        hi = float(widths.max()) + b_margin
        if lo <= -1e-9 * max(abs(hi), 1.0) and lo < 0:
            raise ValueError(f"b_k + B must stay >= 0; the model reaches {lo:.2f} Å²")
        q = chebyshev_nodes_for(lo, hi, self.resolution, self.eps)
        return dataclasses.replace(self, beta_range=(lo, hi), n_nodes=q)

    # -- geometry ----------------------------------------------------------------------------------
    def padded_shape(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """`((Nz, Ny, Nx), (pz, py, px))`: padded box size and the padding before the grid."""
        pad_a = 3.0 * self.resolution if self.padding is None else float(self.padding)
        shape, before = [], []
        for n, v in zip(self.grid.shape, self.grid.voxel_size[::-1]):
            p = int(math.ceil(pad_a / v))
            total = _smooth_size(n + 2 * p)
            shape.append(total)
            before.append(p + (total - n - 2 * p) // 2)
        return tuple(shape), tuple(before)  # type: ignore[return-value]

    def __call__(self, volume: IndependentAtomVolume) -> Float[Array, "nz ny nx"]:
        """The Fourier map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray)."""
        render_fn = self._plan_at_call(
            volume, self.beta_range is not None, "its B interpolation", volume.b_factors, volume.positions
        )
        return _render_nufft(render_fn, volume)


def _axis_frequencies(n_modes: int, n_box: int, voxel: float) -> np.ndarray:
    m = np.arange(n_modes) - n_modes // 2
    return m / (n_box * voxel)


@eqx.filter_jit
def _render_nufft(rf: NufftRenderFn, volume: IndependentAtomVolume):
    nufft1 = _require_finufft()
    grid = rf.grid
    (Nz, Ny, Nx), (pz, py, px) = rf.padded_shape()
    vz, vy, vx = grid.voxel_size[::-1]
    D = rf.resolution
    # modes |m| <= M per axis, with M < N/2 so that +M and -M do not alias
    M = [min(int(math.floor(N * v / D + 1e-9)), (N - 1) // 2) for N, v in ((Nz, vz), (Ny, vy), (Nx, vx))]
    modes = tuple(2 * m + 1 for m in M)
    dtype = volume.positions.dtype
    cdtype = jnp.complex128 if dtype == jnp.float64 else jnp.complex64

    origin_pad = np.asarray(grid.origin) - np.array([px * vx, py * vy, pz * vz])
    period = np.array([Nx * vx, Ny * vy, Nz * vz])
    u = (volume.positions - jnp.asarray(origin_pad, dtype)) / jnp.asarray(period, dtype)  # (n, 3) in [0, 1)
    inside = jnp.all((u >= 0) & (u < 1), axis=-1)
    theta = 2 * jnp.pi * u

    # strengths: Σ_k q a_k L_q(β_k) for each Chebyshev node q
    lo, hi = rf.beta_range
    centre, half = 0.5 * (lo + hi), max(0.5 * (hi - lo), 1e-12)
    beta = volume.gaussian_widths()
    widths = eqx.error_if(
        beta,
        jnp.any((beta < lo - 1e-6 * (1 + abs(lo))) | (beta > hi + 1e-6 * (1 + abs(hi)))),
        "an atom's B left the range the Fourier renderer was planned for; rebuild it with "
        "with_plan(volume, b_margin=...)",
    )
    nodes = _chebyshev_points(rf.n_nodes)
    lag = _lagrange((widths - centre) / half, nodes)  # (n, K, Q)
    amps = jnp.where(inside[:, None], volume.gaussian_amplitudes(), 0)
    strengths = jnp.einsum("nk,nkq->qn", amps, lag).astype(cdtype)

    from jax_finufft.options import Opts

    upsampfac = rf.upsampfac or (1.25 if rf.eps >= 1e-8 else 2.0)
    fields = nufft1(
        modes, strengths, theta[:, 2], theta[:, 1], theta[:, 0], iflag=-1, eps=rf.eps,
        opts=Opts(upsampfac=upsampfac),
    )
    # fields: (Q, mz, my, mx), modes centred: index i <-> m = i - M

    sz = _axis_frequencies(modes[0], Nz, vz)
    sy = _axis_frequencies(modes[1], Ny, vy)
    sx = _axis_frequencies(modes[2], Nx, vx)
    s2 = sz[:, None, None] ** 2 + sy[None, :, None] ** 2 + sx[None, None, :] ** 2
    keep = s2 <= 1.0 / D**2 * (1 + 1e-12)
    beta_nodes = centre + half * nodes
    envelope = np.exp(-beta_nodes[:, None, None, None] * s2[None] / 4)  # (Q, mz, my, mx)
    multiplier = envelope * keep[None]
    if rf.sampling == "average":
        multiplier = multiplier * (np.sinc(sz * vz)[:, None, None] * np.sinc(sy * vy)[None, :, None]
                                   * np.sinc(sx * vx)[None, None, :])[None]
    F = jnp.sum(fields * jnp.asarray(multiplier, dtype), axis=0)  # (mz, my, mx)

    # half spectrum along x (m_x >= 0) for the real inverse transform, others in FFT order
    Mz, My, Mx = M
    half_spec = jnp.zeros((Nz, Ny, Nx // 2 + 1), cdtype)
    iz = np.arange(-Mz, Mz + 1) % Nz
    iy = np.arange(-My, My + 1) % Ny
    half_spec = half_spec.at[np.ix_(iz, iy, np.arange(Mx + 1))].set(F[:, :, Mx:])
    rho = jnp.fft.irfftn(half_spec, s=(Nz, Ny, Nx)) * (Nz * Ny * Nx) / float(period.prod())
    nz, ny, nx = grid.shape
    return rho[pz : pz + nz, py : py + ny, px : px + nx].astype(dtype)
