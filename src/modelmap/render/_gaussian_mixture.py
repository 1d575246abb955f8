"""Rendering Gaussian mixtures: exact voxel averages (erf) or point samples, in local windows."""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._arrays import on_host
from .._grid import Grid
from ..volumes import GaussianMixtureVolume
from ._base import (
    AbstractRenderFn,
    RenderBounds,
    check_sampling,
    checked_call,
    device_of,
    is_traced,
    per_slot_max,
    split_margin,
)
from ._windows import (
    ACCUMULATE,
    AbstractWindowPlan,
    UniformWindows,
    WindowClasses,
    WindowPlan,
    default_chunk_size,
    splat_windows,
)

__all__ = ["GaussianMixtureRenderFn"]

_EIGHT_PI2 = 8.0 * math.pi**2


class GaussianMixtureRenderFn(AbstractRenderFn[GaussianMixtureVolume]):
    """Render a `GaussianMixtureVolume` onto a grid.

    - `sampling="average"`: each voxel gets the exact mean of every Gaussian over the voxel's box
      (centred on its grid point), a product of erf differences along x, y and z. The map times the
      voxel volume sums to the total amplitude (Σ occupancy · f(0)) up to the window truncation.
    - `sampling="point"`: each voxel gets the Gaussians' values at its grid point (what gemmi's
      `DensityCalculator` and most real-space programs compute).

    Every source touches only its own window, which covers at least `n_sigma` standard deviations of
    its widest Gaussian; sources are bucketed by window size and processed `chunk_size` at a time
    (see `modelmap.render._windows`). Cost grows with sources × window, memory with the map plus one
    chunk of windows; gradients (positions, B, occupancy, resolution, form factors) come from a
    hand-written VJP.

    Plan it for a model (`with_plan(volume, b_margin=..., d_margin=...)`, windows bucketed per atom)
    or for declared bounds (`with_bounds(RenderBounds(...))`, one window for any structure within
    them); an unplanned function plans on the fly for a concrete volume. A Gaussian wider than its
    window is an error, never a truncated map.

    **Arguments:**

    - `grid`: the target `Grid`.
    - `sampling`: `"average"` or `"point"`.
    - `n_sigma`: window coverage in standard deviations (>= 5 recommended).
    - `chunk_size`: sources per scan step; `None`: 256 on the CPU, 2048 on a GPU (at planning).
    - `plan`: a `WindowPlan` (from `with_plan`), `UniformWindows` (from `with_bounds`) or `None`.
    - `max_buckets`: at most this many window sizes in a `with_plan` plan (fewer compiled scans,
      slightly larger windows); `None`: every size exact.
    - `accumulate`: how windows are added: `"auto"` (a loop on the CPU, one scatter-add per chunk
      on a GPU), `"loop"` or `"scatter"` (to force either, e.g. to test the GPU path on the CPU).
    - `window_classes`: window sizes a `with_bounds` plan may choose from, per chunk of sources
      (`WindowClasses`: narrow windows for chunks of narrow atoms, each size compiled once); 1:
      one window for every source (`UniformWindows`).
    """

    grid: Grid = eqx.field(static=True)
    sampling: Literal["average", "point"] = eqx.field(static=True, default="average")
    n_sigma: float = eqx.field(static=True, default=5.0)
    chunk_size: int | None = eqx.field(static=True, default=None)
    plan: AbstractWindowPlan | None = None
    max_buckets: int | None = eqx.field(static=True, default=None)
    accumulate: str = eqx.field(static=True, default="auto")
    window_classes: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        check_sampling(self.sampling)
        if self.window_classes < 1:
            raise ValueError(f"window_classes must be at least 1, got {self.window_classes}")
        if self.n_sigma <= 0:
            raise ValueError("n_sigma must be positive")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {self.accumulate!r}")

    @property
    def is_planned(self) -> bool:
        return self.plan is not None

    def with_plan(
        self, volume: GaussianMixtureVolume, b_margin: float | tuple[float, float] = 0.0, d_margin: float = 0.0
    ) -> "GaussianMixtureRenderFn":
        """A copy with windows planned for `volume` (concrete; a leading batch axis: every member),
        allowing every atom's B to grow by `b_margin` Å² (a pair: its second entry; a lower B
        always fits) and its D by `d_margin` Å."""
        b_margin = split_margin(b_margin)[1]
        if is_traced(volume):
            raise ValueError("with_plan needs a concrete volume: call it outside jit/grad/vmap, or use with_bounds")
        self.grid.check_fits_in_memory(itemsize=np.dtype(volume.positions.dtype).itemsize, device=device_of(volume))
        volume = on_host(volume)
        grown = eqx.tree_at(lambda v: (v.b_factors, v.resolution), volume,
                            (volume.b_factors + b_margin, volume.resolution + d_margin))
        variances = np.asarray(grown.gaussian_variances(), np.float64)
        if np.any(volume.gaussian_variances() <= 0):
            raise ValueError(
                "every Gaussian needs a positive variance (b_k + B + 4 D² > 0); the X-ray table "
                "has a b = 0 term, so give the atoms B > 0 or a resolution D > 0"
            )
        n_lead = volume.positions.ndim - 2
        plan = WindowPlan.build(
            self.grid,
            np.asarray(volume.positions).reshape(-1, *volume.positions.shape[-2:])[0],
            per_slot_max(variances.max(axis=-1), n_lead),
            n_sigma=self.n_sigma,
            chunk_size=self.chunk_size or default_chunk_size(256),
            max_buckets=self.max_buckets,
        )
        return eqx.tree_at(lambda r: r.plan, self, plan, is_leaf=lambda x: x is None)

    def with_bounds(self, bounds: RenderBounds) -> "GaussianMixtureRenderFn":
        """A copy with one window that holds the widest Gaussian within `bounds`: the largest
        `b_k + B` (`RenderBounds.widest_gaussian`) plus `4 D²` of the coarsest D; or, with
        `window_classes > 1`, up to that many sizes down to the narrowest atom's (its element's
        widest term at the lowest B, with `4 D²` of the finest D), one chosen per chunk."""
        var = (bounds.widest_gaussian() + 4.0 * bounds.resolution[1] ** 2) / _EIGHT_PI2
        if not var > 0:
            raise ValueError("the bounds allow no positive Gaussian variance")
        radius = self.n_sigma * math.sqrt(var)
        chunk = self.chunk_size or default_chunk_size(256)
        if self.window_classes > 1:
            low = (bounds.narrowest_gaussian() + 4.0 * bounds.resolution[0] ** 2) / _EIGHT_PI2
            smallest = self.n_sigma * math.sqrt(low) if low > 0 else radius
            windows = WindowClasses.from_radii(self.grid, min(smallest, radius), radius, n_sigma=self.n_sigma,
                                               chunk_size=chunk, max_classes=self.window_classes)
        else:
            windows = UniformWindows.from_radius(self.grid, radius, n_sigma=self.n_sigma, chunk_size=chunk)
        return eqx.tree_at(lambda r: r.plan, self, windows, is_leaf=lambda x: x is None)

    def __call__(self, volume: GaussianMixtureVolume) -> Float[Array, "nz ny nx"]:
        """The map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray)."""
        plan = self._plan_at_call(volume).plan.resolve(self.grid, volume.positions.shape[0])
        return checked_call(_render_planned, self.grid, self.sampling, self.accumulate, plan, volume)


@eqx.filter_jit
def _render_planned(grid: Grid, sampling: str, accumulate: str, plan: WindowPlan, volume: GaussianMixtureVolume):
    # jitted as a whole, so that eager calls compile once per shape and reuse it
    variances = volume.gaussian_variances()
    plan = plan.fit_chunks(grid, plan.n_sigma * jnp.sqrt(jnp.max(variances, axis=-1)))
    variances = eqx.error_if(
        variances,
        jnp.any(variances > plan.max_variance[:, None] * (1 + 1e-6)),
        "a Gaussian is wider than the window planned for it (B or D grew past the plan's margins or "
        "bounds); rebuild the render function with with_plan(volume, b_margin=..., d_margin=...) or "
        "wider with_bounds(...)",
    )
    variances = eqx.error_if(variances, jnp.any(variances <= 0), "Gaussian variances must be > 0")
    return splat_windows(grid, plan, volume.positions, volume.gaussian_amplitudes(), variances, sampling,
                         accumulate)
