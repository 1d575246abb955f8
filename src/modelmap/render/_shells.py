"""Rendering shell decompositions: every atom's finite-resolution image in a local window."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from ..shells import D_RANGE, get_shell_table
from ..shells._omega import omega
from ..volumes._shell_decomposition import ShellDecompositionVolume
from ._base import AbstractRenderFn, RenderBounds, checked_call, device_of, is_traced, per_slot_max, split_margin
from ._windows import (
    ACCUMULATE,
    AbstractSilentKernel,
    AbstractWindowPlan,
    UniformWindows,
    WindowClasses,
    WindowPlan,
    default_chunk_size,
    splat_kernel,
    window_widths,
)

__all__ = ["ShellRenderFn", "shell_reach"]

_FOUR_PI2 = 4.0 * math.pi**2
_NODES_PER_SIGMA = 10.0  # profile-table nodes per σ of the narrowest term (error ~1e-6 of the peak)


def shell_reach(radii, widths, n_sigma: float):
    """How far (Å) an atom's kept terms reach: `max_m R_m + n_sigma σ_m`, `σ_m² = (B_m + B)/(8π²)`
    (spec §8: every kept term is evaluated completely, so the map is smooth in all parameters)."""
    return jnp.max(radii + n_sigma * jnp.sqrt(widths / (2 * _FOUR_PI2)), axis=-1)


class ShellKernel(AbstractSilentKernel):
    """Window values of `Σ_m C_m Ω(|d|; R_m, B_m)`; sources `R`, `B`, `C`, each `(c, K)`; term 0 has
    R = 0 (the Gaussian core) and is evaluated as a Gaussian."""

    def __call__(self, dx, dy, dz, radii, widths, amps):
        r2 = dz[:, :, None, None] ** 2 + dy[:, None, :, None] ** 2 + dx[:, None, None, :] ** 2
        return _profile(None, radii, widths, amps, r2=r2)

    def silent(self, radii, widths, amps):
        """`(c,)` True for atoms whose every term is 0 (zero occupancy: a batch's padding atoms)."""
        return jnp.all(amps == 0, axis=1)


def _profile(r, radii, widths, amps, r2=None):
    """`Σ_m C_m Ω(r; R_m, B_m)` at radii `r` `(c, ...)` for sources `(c, K)`; term 0 (R = 0) is
    evaluated as the Gaussian `C_0 (4π/B_0)^{3/2} exp(-4π² r²/B_0)` from `r2` = r² (default `r*r`;
    `r` itself, then found from `r2` where None, is needed only by the shells m >= 1)."""
    if r is None:
        positive = r2 > 0
        r = jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)
    elif r2 is None:
        r2 = r * r
    lead = (slice(None),)
    tail = (None,) * (r.ndim - 1)
    out = None
    for m in range(radii.shape[1]):
        b = widths[lead + (m,) + tail]
        if m == 0:
            term = amps[lead + (m,) + tail] * (4 * math.pi / b) ** 1.5 * jnp.exp(-_FOUR_PI2 / b * r2)
        else:
            term = amps[lead + (m,) + tail] * omega(r, radii[lead + (m,) + tail], b)
        out = term if out is None else out + term
    return out


class ShellProfileKernel(eqx.Module):
    """Fast window values of `Σ_m C_m Ω(|d|; R_m, B_m)` and their VJP, for float32 maps.

    Each source's radial profile ρ and its derivative are evaluated exactly at `n_nodes` equally
    spaced radii from 0 to `r_max` (`tables`, once per chunk of sources), and every voxel of its
    window gets the cubic Hermite interpolant of that table at its distance `|d|` (`values`): one
    square root, four table look-ups and a few multiply-adds per voxel instead of `2K - 1`
    exponentials. The interpolation error is at most `h⁴ max|ρ⁽⁴⁾|/384` for node spacing h: about
    1e-6 of the peak or less when h is at most a tenth of the narrowest term's σ
    (`ShellRenderFn.with_plan` picks `n_nodes` so). Used through `splat_kernel(forward_kernel=...)`;
    gradients differentiate the interpolated map itself (`cotangents`: a radial histogram of the
    cotangent window per source, pulled back through `tables`), so they are exact for the map that
    was rendered and cost a few forward passes instead of the exact terms' VJP.

    **Arguments:**

    - `r_max`: the largest distance (Å) of a voxel from its source in any window (a window's corner).
    - `n_nodes`: nodes of each source's table.
    """

    r_max: float = eqx.field(static=True)
    n_nodes: int = eqx.field(static=True)

    def tables(self, radii, widths, amps):
        """`(ρ, h dρ/dr)` at the nodes `r_i = i h`, each `(c, n_nodes)`, from sources `(c, K)`."""
        step = self.r_max / (self.n_nodes - 1)
        nodes = jnp.broadcast_to(jnp.arange(self.n_nodes, dtype=radii.dtype) * step, (radii.shape[0], self.n_nodes))
        f, df = jax.jvp(lambda x: _profile(x, radii, widths, amps), (nodes,), (jnp.ones_like(nodes),))
        return f, df * step

    def _locate(self, dx, dy, dz):
        """Per voxel of a window: `r² > 0`, `r` (1 where r = 0), its node `i` and `s = r/h - i`."""
        n = self.n_nodes
        r2 = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2
        positive = r2 > 0
        r = jnp.sqrt(jnp.where(positive, r2, 1.0))
        u = jnp.where(positive, r, 0.0) * ((n - 1) / self.r_max)
        i = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n - 2)
        return positive, r, i, jnp.clip(u - i, 0.0, 1.0)

    @staticmethod
    def _coefficients(f, df, i):
        """The cubic Hermite interpolant on [r_i, r_{i+1}] in s: `((c3 s + c2) s + d0) s + f0`."""
        f0, f1, d0, d1 = f[i], f[i + 1], df[i], df[i + 1]
        return f0, d0, 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1

    def values(self, dx, dy, dz, f, df):
        """One source's window `(wz, wy, wx)` from its offsets (Å) and its tables `(n_nodes,)`."""
        _, _, i, s = self._locate(dx, dy, dz)
        f0, d0, c2, c3 = self._coefficients(f, df, i)
        return ((c3 * s + c2) * s + d0) * s + f0

    def cotangents(self, dx, dy, dz, f, df, g):
        """The VJP of `values` for one source: `((ct_f, ct_df), ∂/∂(dx, dy, dz))` from the cotangent
        window `g` `(wz, wy, wx)`.

        The interpolant is linear in the table, `v = h00 f_i + h10 df_i + h01 f_{i+1} + h11 df_{i+1}`
        (the cubic Hermite basis in s), so the table cotangents are `g`-weighted histograms of the
        voxels' basis values over their nodes; the offsets enter through `r = |d|` only, so their
        gradient is `Σ g (dv/dr) d / r` (0 at r = 0, where the profile is flat).
        """
        n = self.n_nodes
        positive, r, i, s = self._locate(dx, dy, dz)
        s2 = s * s
        s3 = s2 * s
        basis = jnp.stack([2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, 3 * s2 - 2 * s3, s3 - s2], axis=-1)
        hist = jax.ops.segment_sum((g[..., None] * basis).reshape(-1, 4), i.ravel(), n)
        ct_f = hist[:, 0].at[1:].add(hist[:-1, 2])
        ct_df = hist[:, 1].at[1:].add(hist[:-1, 3])
        _, d0, c2, c3 = self._coefficients(f, df, i)
        dv_dr = ((3 * c3 * s + 2 * c2) * s + d0) * ((n - 1) / self.r_max)
        w = jnp.where(positive, g * dv_dr / r, 0.0)
        grad = jnp.stack([
            jnp.sum(jnp.sum(w, axis=(0, 1)) * dx),
            jnp.sum(jnp.sum(w, axis=(0, 2)) * dy),
            jnp.sum(jnp.sum(w, axis=(1, 2)) * dz),
        ])
        return (ct_f, ct_df), grad


class ShellRenderFn(AbstractRenderFn[ShellDecompositionVolume]):
    """Render a `ShellDecompositionVolume` onto a grid: the atoms' images at their own resolutions,
    sampled at the grid points.

    Each atom is evaluated in a cubic window that holds the ball of radius
    `max_m (R_m + n_sigma σ_m)` around it (spec §8; ≈ 3.5 D + 3σ for K = 6), so every kept term is
    evaluated completely and the map is smooth in positions, B, occupancies and resolutions. Atoms are
    bucketed by window size and processed `chunk_size` at a time (`modelmap.render._windows`);
    gradients come from a VJP that recomputes each chunk's windows (through the profile tables in
    float32).

    Plan it for a model (`with_plan(volume, b_margin=..., d_margin=...)`) or for declared bounds
    (`with_bounds(RenderBounds(...))`); an unplanned function plans on the fly for a concrete volume.
    An atom that reaches beyond its window (B or D grown past the plan) is an error, never a
    truncated map.

    **Arguments:**

    - `grid`: the target `Grid`.
    - `n_sigma`: how many standard deviations of each term's blur the window covers beyond its
      radius (3 by default, as the spec).
    - `chunk_size`: atoms per scan step; `None`: 64 on the CPU, 1024 on a GPU (at planning).
    - `plan`: a `WindowPlan` (from `with_plan`), `UniformWindows` (from `with_bounds`) or `None`.
    - `profile_nodes`: nodes of each atom's radial profile table for the fast float32 map and its
      gradients (`ShellProfileKernel`), set by planning (a multiple of 32, so that other structures
      rarely need another compilation); `None` evaluates every term at every voxel. Float64 maps
      always use the exact terms.
    - `threads`: a concrete call on the CPU deals the atoms' chunks over this many threads, each
      rendering its share as its own computation (XLA runs one computation on one core); the maps
      are summed (equal to one computation up to float32 rounding of the sum's order). `None`: the
      cores this process may use, at most 8. Traced calls (under jit/grad/vmap) and other devices
      render in one computation.
    - `accumulate`: `"auto"` (a loop on the CPU, one scatter-add per chunk on a GPU), `"loop"` or
      `"scatter"` (to force either).
    - `window_classes`: window sizes a `with_bounds` plan may choose from per chunk of atoms
      (`WindowClasses`, down to the reach of the narrowest atom within the bounds); 1: one for all.
    """

    grid: Grid = eqx.field(static=True)
    n_sigma: float = eqx.field(static=True, default=3.0)
    chunk_size: int | None = eqx.field(static=True, default=None)
    plan: AbstractWindowPlan | None = None
    profile_nodes: int | None = eqx.field(static=True, default=None)
    threads: int | None = eqx.field(static=True, default=None)
    accumulate: str = eqx.field(static=True, default="auto")
    window_classes: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if self.window_classes < 1:
            raise ValueError(f"window_classes must be at least 1, got {self.window_classes}")
        if self.n_sigma <= 0:
            raise ValueError("n_sigma must be positive")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {self.accumulate!r}")

    @property
    def is_planned(self) -> bool:
        return self.plan is not None

    def _nodes(self, narrowest_width: float, corner: float) -> int:
        """Profile-table nodes: spacing <= a tenth of the narrowest term's σ, from r = 0 to the
        corner of the widest window, rounded up to a multiple of 32."""
        sigma = math.sqrt(narrowest_width / (2 * _FOUR_PI2))
        nodes = max(16, int(math.ceil(_NODES_PER_SIGMA * corner / sigma)) + 1)
        return 32 * math.ceil(nodes / 32)

    def with_plan(
        self, volume: ShellDecompositionVolume, b_margin: float | tuple[float, float] = 0.0, d_margin: float = 0.0
    ) -> "ShellRenderFn":
        """A copy with windows planned for `volume` (concrete; a leading batch axis: every member),
        allowing B to change by `b_margin` Å² (a pair: `(below, above)`) and D by `d_margin` Å."""
        below, above = split_margin(b_margin)
        if is_traced(volume):
            raise ValueError("with_plan needs a concrete volume: call it outside jit/grad/vmap, or use with_bounds")
        self.grid.check_fits_in_memory(itemsize=np.dtype(volume.positions.dtype).itemsize, device=device_of(volume))
        n_lead = volume.positions.ndim - 2
        flat = _flatten(volume)
        _check_concrete(flat)
        reach = np.asarray(_reach(flat, self.n_sigma))
        if above or d_margin:
            grown = eqx.tree_at(
                lambda v: (v.b_factors, v.resolution),
                flat,
                (flat.b_factors + above, jnp.minimum(flat.resolution + d_margin, D_RANGE[1])),
            )
            reach = np.maximum(reach, np.asarray(_reach(grown, self.n_sigma)))
        positions = np.asarray(volume.positions).reshape(-1, *volume.positions.shape[-2:])[0]
        plan = WindowPlan.from_radii(
            self.grid, positions, per_slot_max(reach.reshape(volume.positions.shape[:-1]), n_lead),
            n_sigma=self.n_sigma, chunk_size=self.chunk_size or default_chunk_size(64, 1024), granularity=None,
        )
        # profile tables: D may drop by d_margin, B by `below` (to at most half)
        _, widths, _ = flat.shell_parameters()
        widths = np.asarray(widths, np.float64)
        if d_margin:
            sharper = eqx.tree_at(lambda v: v.resolution, flat, jnp.maximum(flat.resolution - d_margin, D_RANGE[0]))
            widths = np.minimum(widths, np.asarray(sharper.shell_parameters()[1], np.float64))
        narrowest = float(np.min(np.maximum(widths - below, 0.5 * widths)))
        nodes = self._nodes(narrowest, _window_corner(self.grid, plan.buckets))
        return dataclasses.replace(self, plan=plan, profile_nodes=nodes)

    def with_bounds(self, bounds: RenderBounds) -> "ShellRenderFn":
        """A copy with one window that holds every atom within `bounds`: its reach is the largest
        over the bounds' elements and over D in the resolution range (sampled every 0.02 Å and at
        the ends, plus 1 %), at the highest B, with `bounds.n_terms` terms."""
        table = get_shell_table(bounds.table)
        d_lo, d_hi = max(bounds.resolution[0], D_RANGE[0]), min(bounds.resolution[1], D_RANGE[1])
        if not (D_RANGE[0] <= bounds.resolution[0] and bounds.resolution[1] <= D_RANGE[1]):
            raise ValueError(f"the shell method's resolutions lie in [{D_RANGE[0]}, {D_RANGE[1]}] Å; "
                             f"the bounds ask for {bounds.resolution}")
        rows = (np.arange(len(table.symbols)) if bounds.elements is None
                else np.unique(table.element_index(np.asarray(bounds.elements), "bounds")))
        d = np.unique(np.concatenate([np.arange(d_lo, d_hi, 0.02), [d_lo, d_hi]]))
        e, dd = (x.ravel() for x in np.meshgrid(rows, d, indexing="ij"))
        k = min(bounds.n_terms, table.n_terms)

        def probe(b):
            n = e.size
            return ShellDecompositionVolume(jnp.zeros((n, 3)), jnp.full((n,), b), jnp.ones((n,)), jnp.asarray(dd),
                                            jnp.asarray(e, jnp.int32), table, k)

        reach = 1.01 * float(np.max(np.asarray(_reach(probe(bounds.b_factor[1]), self.n_sigma))))
        if self.window_classes > 1:
            smallest = float(np.min(np.asarray(_reach(probe(bounds.b_factor[0]), self.n_sigma))))
            windows = WindowClasses.from_radii(self.grid, min(smallest, reach), reach, n_sigma=self.n_sigma,
                                               chunk_size=self.chunk_size or default_chunk_size(64, 1024),
                                               max_classes=self.window_classes)
        else:
            windows = UniformWindows.from_radius(self.grid, reach, n_sigma=self.n_sigma,
                                                 chunk_size=self.chunk_size or default_chunk_size(64, 1024))
        narrowest = float(np.min(np.asarray(probe(bounds.b_factor[0]).shell_parameters()[1])))
        if not narrowest > 0:
            raise ValueError("B_m(D) + B must be > 0 for every kept term within the bounds (the lowest B is too low)")
        plan = windows.resolve(self.grid, 1)
        return dataclasses.replace(self, plan=windows,
                                   profile_nodes=self._nodes(narrowest, _window_corner(self.grid, plan.buckets)))

    def __call__(self, volume: ShellDecompositionVolume) -> Float[Array, "nz ny nx"]:
        """The map `(nz, ny, nx)`: Å⁻² for the electron table, e/Å³ for X-ray."""
        render_fn = self._plan_at_call(volume)
        plan = render_fn.plan.resolve(self.grid, volume.positions.shape[0])

        def render(p: WindowPlan):
            return checked_call(_render_planned, self.grid, self.n_sigma, render_fn.profile_nodes, self.accumulate, p,
                                volume)

        parts = _cpu_threads(self.threads, volume)
        if parts == 1:
            return render(plan)
        with concurrent.futures.ThreadPoolExecutor(parts) as pool:
            maps = list(pool.map(lambda p: jax.block_until_ready(render(p)), plan.split(parts)))
        return functools.reduce(jnp.add, maps)


def _flatten(volume: ShellDecompositionVolume) -> ShellDecompositionVolume:
    """A volume with any leading batch axes merged into its atom axis (concrete planning only)."""
    lead = volume.positions.ndim - 2
    if lead == 0:
        return volume
    return eqx.tree_at(
        lambda v: (v.positions, v.b_factors, v.occupancies, v.resolution, v.element_index),
        volume,
        (volume.positions.reshape(-1, 3), volume.b_factors.reshape(-1), volume.occupancies.reshape(-1),
         volume.resolution.reshape(-1), volume.element_index.reshape(-1)),
    )


def _cpu_threads(threads: int | None, volume: ShellDecompositionVolume) -> int:
    """How many threads render a call: 1 when traced, in float64 or off the CPU, else `threads`
    (default: the cores this process may use, at most 8)."""
    if is_traced(volume):  # first: a tracer is a jax.Array too, without devices
        return 1
    if jnp.dtype(volume.positions.dtype).itemsize > 4:
        # float64 (exact terms, references): one computation, since a thread-local
        # `jax.enable_x64(True)` of the caller would not reach worker threads
        return 1
    pos = volume.positions
    devices = pos.devices() if isinstance(pos, jax.Array) else {jax.devices()[0]}  # numpy: the default device
    if any(d.platform != "cpu" for d in devices):
        return 1
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _window_corner(grid: Grid, buckets) -> float:
    """The largest distance (Å) of a voxel from its source in the buckets' windows: a voxel is at
    most `h + 1/2` voxels from it along y and z, `wx - 1 - hx + 1/2` along x (`window_widths`)."""
    voxel = np.asarray(grid.voxel_size, np.float64)

    def corner(h):
        wx = window_widths(h)[0]
        return float(np.linalg.norm((np.array([wx - 1 - h[0], h[1], h[2]]) + 0.5) * voxel))

    return max(corner(h) for b in buckets for h in b.sizes)


def _reach(volume: ShellDecompositionVolume, n_sigma: float):
    radii, widths, _ = volume.shell_parameters()
    return shell_reach(radii, widths, n_sigma)


def _check_concrete(volume: ShellDecompositionVolume) -> None:
    d = np.asarray(volume.resolution)
    if not np.all(np.isfinite(d)) or np.any(d < D_RANGE[0]) or np.any(d > D_RANGE[1]):
        raise ValueError(f"resolutions must lie in [{D_RANGE[0]}, {D_RANGE[1]}] Å; got {d.min():.3g} to {d.max():.3g}")
    _, widths, _ = volume.shell_parameters()
    if np.any(np.asarray(widths) <= 0):
        raise ValueError("B_m(D) + B must be > 0 for every kept term (B below -2.7 D² is not allowed)")


@eqx.filter_jit
def _render_planned(
    grid: Grid, n_sigma: float, profile_nodes: int | None, accumulate: str, plan: WindowPlan,
    volume: ShellDecompositionVolume,
):
    d = volume.resolution
    d = eqx.error_if(
        d, jnp.any((d < D_RANGE[0]) | (d > D_RANGE[1])), f"a resolution left [{D_RANGE[0]}, {D_RANGE[1]}] Å"
    )
    volume = eqx.tree_at(lambda v: v.resolution, volume, d)
    radii, widths, amps = volume.shell_parameters()
    widths = eqx.error_if(widths, jnp.any(widths <= 0), "B_m(D) + B must be > 0 for every kept term")
    reach = shell_reach(radii, widths, n_sigma)
    plan = plan.fit_chunks(grid, reach)
    widths = eqx.error_if(
        widths,
        jnp.any(reach > plan.covered_radius * (1 + 1e-6)),
        "an atom reaches beyond the window planned for it (B or D grew past the plan's margins); "
        "rebuild the render function with with_plan(volume, b_margin=..., d_margin=...) or wider "
        "with_bounds(...)",
    )
    fast = None
    if profile_nodes is not None and jnp.dtype(amps.dtype).itemsize <= 4:
        fast = ShellProfileKernel(_window_corner(grid, plan.buckets), profile_nodes)
    return splat_kernel(
        grid, plan, volume.positions, (radii, widths, amps), ShellKernel(), amps.dtype, forward_kernel=fast,
        accumulate=accumulate,
    )
