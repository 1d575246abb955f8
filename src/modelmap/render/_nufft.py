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
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from ..volumes import IndependentAtomVolume
from ._base import AbstractRenderFn, RenderBounds, check_sampling, checked_call, device_of, split_margin

__all__ = ["NufftRenderFn", "chebyshev_nodes_for"]

_MAX_NODES = 64


def _require_finufft(platform: str = "cpu"):
    """jax-finufft's `nufft1`, checked for `platform` ("cpu", "gpu", ...).

    jax-finufft's PyPI wheels are CPU-only; a GPU needs a CUDA build (conda-forge's, or from
    source), which ships the `jax_finufft_gpu` extension. jax-finufft 1.3.1's batching rule reads
    `jax.interpreters.batching.not_mapped`, which jax 0.10 removed (an unmapped axis is `None`
    there; fixed upstream after 1.3.1): the name is restored, as `None`, so that `jax.vmap` over
    the NUFFT works (tests/test_fourier.py checks vmap against a loop).
    """
    try:
        import jax_finufft
        from jax_finufft import nufft1
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NufftRenderFn needs jax-finufft: pip install jax-finufft (CPU wheels for Linux and macOS); "
            "or render the same map with SplatFourierRenderFn (method='fourier' on a GPU)"
        ) from err
    if platform != "cpu":
        try:
            import jax_finufft.jax_finufft_gpu  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"NufftRenderFn on {platform}: this jax-finufft {getattr(jax_finufft, '__version__', '')} "
                "is a CPU-only build (PyPI's wheels are). Install a CUDA build (conda install -c "
                "conda-forge jax-finufft with a CUDA jaxlib, or build it from source with "
                "JAX_FINUFFT_USE_CUDA=ON), or use SplatFourierRenderFn, the same map to 1e-5 in pure "
                "JAX (method='fourier' picks it on a GPU)"
            ) from err
    from jax._src.interpreters import batching

    if not hasattr(batching, "not_mapped"):
        batching.not_mapped = None
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


class NufftRenderFn(AbstractRenderFn[IndependentAtomVolume]):
    """The exact Fourier map at the volume's resolution D of an `IndependentAtomVolume` (module docs).

    Planning fixes what sets the transform's shapes: the finest D its frequencies reach (the modes),
    the padding, and the Chebyshev nodes of the B interpolation; the B range they interpolate over is
    an array, so another structure with the same shapes does not recompile. A volume whose D is
    finer than planned, or whose B left the planned range, is an error.

    **Arguments:**

    - `grid`: the target `Grid`.
    - `sampling`: `"point"` (values at grid points) or `"average"` (voxel-box means).
    - `eps`: relative accuracy of the NUFFT and of the B interpolation.
    - `padding`: Å added on every side of the box before the synthesis (default 3 D of the coarsest
      planned D).
    - `upsampfac`: finufft's upsampling factor; `None` picks 1.25 (about 4x fewer FFT points than the
      classic 2.0, accurate for `eps >= 1e-8`) and 2.0 for tighter `eps`.
    - `resolution_range`: `(finest, coarsest)` D in Å the plan holds (static; set by planning).
    - `n_nodes`: the number Q of Chebyshev nodes in B (static; set by planning, a multiple of 4).
    - `beta_range`: `(2,)` array, the `(lowest, highest)` b_k + B in Å² interpolated over.
    """

    grid: Grid = eqx.field(static=True)
    sampling: Literal["point", "average"] = eqx.field(static=True, default="point")
    eps: float = eqx.field(static=True, default=1e-6)
    padding: float | None = eqx.field(static=True, default=None)
    upsampfac: float | None = eqx.field(static=True, default=None)
    resolution_range: tuple[float, float] | None = eqx.field(static=True, default=None)
    n_nodes: int | None = eqx.field(static=True, default=None)
    beta_range: Float[Array, "2"] | None = None

    def __check_init__(self):
        check_fourier_fields(self.grid, self.sampling, self.resolution_range, strict=False)

    @property
    def is_planned(self) -> bool:
        return self.beta_range is not None

    # -- planning ----------------------------------------------------------------------------------
    def _planned(self, beta_lo: float, beta_hi: float, d_lo: float, d_hi: float) -> "NufftRenderFn":
        if beta_lo < 0 and beta_lo <= -1e-9 * max(abs(beta_hi), 1.0):
            raise ValueError(f"b_k + B must stay >= 0; the plan reaches {beta_lo:.2f} Å²")
        q = chebyshev_nodes_for(beta_lo, beta_hi, d_lo, self.eps)
        q = min(4 * math.ceil(q / 4), _MAX_NODES)  # few distinct shapes: fewer compilations
        return dataclasses.replace(self, resolution_range=(d_lo, d_hi), n_nodes=q,
                                   beta_range=jnp.asarray([beta_lo, beta_hi], jnp.float32))

    def with_plan(
        self, volume: IndependentAtomVolume, b_margin: float | tuple[float, float] = 0.0, d_margin: float = 0.0
    ) -> "NufftRenderFn":
        """A copy whose B interpolation covers `volume`'s B (concrete; a leading batch axis: every
        member), widened by `b_margin` Å² (a pair: `(below, above)`), for its resolution D (lowered
        by `d_margin` Å)."""
        below, above = split_margin(b_margin)
        widths = np.asarray(volume.gaussian_widths(), np.float64)
        if widths.size == 0:
            raise ValueError("the volume has no atoms")
        d = np.asarray(volume.resolution, np.float64)
        return self._planned(float(widths.min()) - below, float(widths.max()) + above,
                             float(d.min()) - d_margin, float(d.max()))

    def with_bounds(self, bounds: RenderBounds) -> "NufftRenderFn":
        """A copy that holds every volume within `bounds`."""
        bk_lo, bk_hi = bounds.form_factor_widths()
        d_lo, d_hi = bounds.resolution
        if not d_lo > 0:
            raise ValueError("the Fourier map's bounds need a finest resolution D > 0")
        return self._planned(bk_lo + bounds.b_factor[0], bk_hi + bounds.b_factor[1], d_lo, d_hi)

    # -- geometry ----------------------------------------------------------------------------------
    def padded_shape(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """`((Nz, Ny, Nx), (pz, py, px))`: padded box size and the padding before the grid."""
        return padded_box(self.grid, self.padding, self.resolution_range)

    def __call__(self, volume: IndependentAtomVolume) -> Float[Array, "nz ny nx"]:
        """The Fourier map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray)."""
        nufft1 = _require_finufft(device_of(volume).platform)
        return checked_call(_render_nufft, self._plan_at_call(volume), volume, nufft1)


def check_nyquist(grid: Grid, resolution: float, strict: bool) -> None:
    """A Fourier map at `resolution` D needs D >= 2 × the largest voxel size (the grid's Nyquist
    resolution); `strict`: D > it (the splat route needs room for its anti-aliasing blur). Within
    float32 rounding (1e-6) of the limit counts as the limit: a volume stores D in its dtype."""
    nyquist = 2 * max(grid.voxel_size)
    ok = resolution > nyquist * (1 + 1e-9) if strict else resolution >= nyquist * (1 - 1e-6)
    if not ok:
        raise ValueError(
            f"resolution {resolution} Å is {'at or ' if strict else ''}finer than the grid's Nyquist limit "
            f"{nyquist:.4g} Å (2 × voxel size); use a finer grid or a coarser resolution"
            + ("; NufftRenderFn reaches the Nyquist limit itself" if strict else "")
        )


def check_fourier_fields(grid: Grid, sampling: str, resolution_range, strict: bool) -> None:
    """The checks both Fourier-map render functions make of their fields: a known `sampling`, and
    a planned finest D (`resolution_range[0]`, when planned) within the grid's Nyquist limit
    (`check_nyquist`, `strict` as there)."""
    check_sampling(sampling)
    if resolution_range is not None:
        check_nyquist(grid, resolution_range[0], strict=strict)


def padded_box(grid: Grid, padding: float | None, resolution_range) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """`((Nz, Ny, Nx), (pz, py, px))`: the grid padded by `padding` Å (default 3 D of the coarsest
    D) on every side, rounded up to FFT-friendly sizes, and the padding before the grid."""
    if padding is None and resolution_range is None:
        raise ValueError("plan the render function first (with_plan / with_bounds): the padding is 3 D")
    pad_a = 3.0 * resolution_range[1] if padding is None else float(padding)
    shape, before = [], []
    for n, v in zip(grid.shape, grid.voxel_size[::-1]):
        p = int(math.ceil(pad_a / v))
        total = _smooth_size(n + 2 * p)
        shape.append(total)
        before.append(p + (total - n - 2 * p) // 2)
    return tuple(shape), tuple(before)  # type: ignore[return-value]


def _axis_frequencies(n_modes: int, n_box: int, voxel: float) -> np.ndarray:
    m = np.arange(n_modes) - n_modes // 2
    return m / (n_box * voxel)


def hard_sphere(s2: np.ndarray, finest: float, d_volume, dtype):
    """`|s| <= 1/D` on frequencies whose squares are `s2` (Å⁻², numpy): the Fourier map's cut, for
    the planned finest D (static) and the volume's own D (traced), with a relative margin of 1e-6
    so that a frequency on the sphere is kept in float32 as in float64."""
    static = s2 <= (1 + 1e-6) / finest**2
    return jnp.asarray(static) & (jnp.asarray(s2, dtype) <= (1 + 1e-6) / d_volume**2)


def check_resolution(volume, finest: float):
    """The volume's D, checked (under jit) to be at least the finest D the render was planned for."""
    d = volume.resolution
    return eqx.error_if(
        d, jnp.any(d < finest * (1 - 1e-6)) | jnp.any(~jnp.isfinite(d)),
        f"the volume's resolution is finer than the {finest:.4g} Å the Fourier renderer was planned "
        "for; rebuild it with with_plan(volume) or with_bounds(...)",
    )


@eqx.filter_jit
def _render_nufft(rf: NufftRenderFn, volume: IndependentAtomVolume, nufft1):
    grid = rf.grid
    (Nz, Ny, Nx), (pz, py, px) = rf.padded_shape()
    vz, vy, vx = grid.voxel_size[::-1]
    D = rf.resolution_range[0]  # the modes reach 1/D of the finest planned D
    d_volume = check_resolution(volume, D)
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
    lo, hi = rf.beta_range[0].astype(dtype), rf.beta_range[1].astype(dtype)
    centre, half = 0.5 * (lo + hi), jnp.maximum(0.5 * (hi - lo), 1e-12)
    beta = volume.gaussian_widths()
    widths = eqx.error_if(
        beta,
        jnp.any((beta < lo - 1e-6 * (1 + jnp.abs(lo))) | (beta > hi + 1e-6 * (1 + jnp.abs(hi)))),
        "an atom's B left the range the Fourier renderer was planned for; rebuild it with "
        "with_plan(volume, b_margin=...) or wider with_bounds(...)",
    )
    nodes = _chebyshev_points(rf.n_nodes)
    lag = _lagrange((widths - centre) / half, nodes)  # (n, K, Q)
    amps = jnp.where(inside[:, None], volume.gaussian_amplitudes(), 0)
    strengths = jnp.einsum("nk,nkq->qn", amps, lag).astype(cdtype)

    from jax_finufft.options import Opts

    upsampfac = rf.upsampfac or (1.25 if rf.eps >= 1e-8 else 2.0)
    if jax.config.jax_enable_x64 and dtype == jnp.float32:
        # jax-finufft 1.3.1's JVP mixes complex64 and complex128 tangents when 64-bit types are on
        # and the inputs are float32: transform in float64 there and come back
        strengths, theta = strengths.astype(jnp.complex128), theta.astype(jnp.float64)
    fields = nufft1(
        modes, strengths, theta[:, 2], theta[:, 1], theta[:, 0], iflag=-1, eps=rf.eps,
        opts=Opts(upsampfac=upsampfac),
    ).astype(cdtype)
    # fields: (Q, mz, my, mx), modes centred: index i <-> m = i - M

    sz = _axis_frequencies(modes[0], Nz, vz)
    sy = _axis_frequencies(modes[1], Ny, vy)
    sx = _axis_frequencies(modes[2], Nx, vx)
    s2_np = sz[:, None, None] ** 2 + sy[None, :, None] ** 2 + sx[None, None, :] ** 2
    s2 = jnp.asarray(s2_np, dtype)
    keep = hard_sphere(s2_np, D, d_volume, dtype)
    beta_nodes = centre + half * jnp.asarray(nodes, dtype)
    envelope = jnp.exp(-beta_nodes[:, None, None, None] * s2[None] / 4)  # (Q, mz, my, mx)
    multiplier = envelope * keep[None]
    if rf.sampling == "average":
        multiplier = multiplier * jnp.asarray(np.sinc(sz * vz)[:, None, None] * np.sinc(sy * vy)[None, :, None]
                                              * np.sinc(sx * vx)[None, None, :], dtype)[None]
    F = jnp.sum(fields * multiplier, axis=0)  # (mz, my, mx)

    # half spectrum along x (m_x >= 0) for the real inverse transform, others in FFT order
    Mz, My, Mx = M
    half_spec = jnp.zeros((Nz, Ny, Nx // 2 + 1), cdtype)
    iz = np.arange(-Mz, Mz + 1) % Nz
    iy = np.arange(-My, My + 1) % Ny
    half_spec = half_spec.at[np.ix_(iz, iy, np.arange(Mx + 1))].set(F[:, :, Mx:])
    rho = jnp.fft.irfftn(half_spec, s=(Nz, Ny, Nx)) * (Nz * Ny * Nx) / float(period.prod())
    nz, ny, nx = grid.shape
    return rho[pz : pz + nz, py : py + ny, px : px + nx].astype(dtype)
