"""Rendering Gaussian mixtures: exact voxel averages (erf) or point samples, in local windows."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from ..volumes import GaussianMixtureVolume
from ._base import AbstractRenderFn, is_traced
from ._windows import WindowPlan, splat_windows

__all__ = ["GaussianMixtureRenderFn"]


class GaussianMixtureRenderFn(AbstractRenderFn):
    """Render a `GaussianMixtureVolume` onto a grid.

    - `sampling="average"`: each voxel gets the exact mean of every Gaussian over the voxel's box
      (centred on its grid point), a product of erf differences along x, y and z. The map times the
      voxel volume sums to the total amplitude (Σ occupancy · f(0)) up to the window truncation.
    - `sampling="point"`: each voxel gets the Gaussians' values at its grid point (what gemmi's
      `DensityCalculator` and most real-space programs compute).

    Every source touches only its own window, which covers at least `n_sigma` standard deviations of
    its widest Gaussian; sources are bucketed by window size and processed `chunk_size` at a time
    (see `modelmap.render._windows`). Cost grows with sources × window, memory with the map plus one
    chunk of windows; gradients (positions, amplitudes, variances) come from a hand-written VJP.

    Window sizes are planned from concrete variances. Calling the function on a concrete volume
    plans on the fly; under `jax.jit` / `jax.grad` build the plan first with
    `render_fn.with_plan(volume, b_margin=...)` (a volume whose Gaussians have grown wider than
    planned raises an error instead of giving a truncated map).

    **Arguments:**

    - `grid`: the target `Grid`.
    - `sampling`: `"average"` or `"point"`.
    - `n_sigma`: window coverage in standard deviations (>= 5 recommended).
    - `chunk_size`: sources per scan step.
    - `plan`: a `WindowPlan`, or `None` to plan at call time from a concrete volume.
    - `max_buckets`: at most this many window sizes in the plan (fewer compiled scans, slightly
      larger windows); `None`: every size exact.
    """

    grid: Grid = eqx.field(static=True)
    sampling: Literal["average", "point"] = eqx.field(static=True, default="average")
    n_sigma: float = eqx.field(static=True, default=5.0)
    chunk_size: int = eqx.field(static=True, default=256)
    plan: WindowPlan | None = None
    max_buckets: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.sampling not in ("average", "point"):
            raise ValueError(f"sampling must be 'average' or 'point', got {self.sampling!r}")
        if self.n_sigma <= 0:
            raise ValueError("n_sigma must be positive")

    def with_plan(self, volume: GaussianMixtureVolume, b_margin: float = 0.0) -> "GaussianMixtureRenderFn":
        """A copy with windows planned for `volume` (concrete), allowing B to grow by `b_margin` Å²."""
        if is_traced(volume.variances, volume.positions):
            raise ValueError("with_plan needs a concrete volume: call it outside jit/grad")
        self.grid.check_fits_in_memory(itemsize=np.dtype(volume.amplitudes.dtype).itemsize)
        if np.any(np.asarray(volume.variances) <= 0):
            raise ValueError(
                "every Gaussian needs a positive variance (b_k + B + extra_b > 0); the X-ray table "
                "has a b = 0 term, so give the atoms B > 0 or an extra blur"
            )
        plan = WindowPlan.build(
            self.grid,
            volume.positions,
            np.max(np.asarray(volume.variances), axis=-1),
            n_sigma=self.n_sigma,
            chunk_size=self.chunk_size,
            variance_margin=b_margin / (8 * np.pi**2),
            max_buckets=self.max_buckets,
        )
        return eqx.tree_at(lambda r: r.plan, self, plan, is_leaf=lambda x: x is None)

    def __call__(self, volume: GaussianMixtureVolume) -> Float[Array, "nz ny nx"]:
        """The map `(nz, ny, nx)` in the units of the amplitudes per Å³."""
        render_fn = self._plan_at_call(
            volume, self.plan is not None, "its windows", volume.variances, volume.positions
        )
        plan = render_fn.plan
        if plan.n_sources != volume.positions.shape[0]:
            raise ValueError(
                f"the window plan is for {plan.n_sources} sources, the volume has {volume.positions.shape[0]}"
            )
        return _render_planned(self.grid, self.sampling, plan, volume)


@eqx.filter_jit
def _render_planned(grid: Grid, sampling: str, plan: WindowPlan, volume: GaussianMixtureVolume):
    # jitted as a whole, so that eager calls compile once per shape and reuse it
    variances = eqx.error_if(
        volume.variances,
        jnp.any(volume.variances > plan.max_variance[:, None] * (1 + 1e-6)),
        "a Gaussian is wider than the window planned for it (B grew past the plan's margin); "
        "rebuild the render function with with_plan(volume, b_margin=...)",
    )
    variances = eqx.error_if(variances, jnp.any(variances <= 0), "Gaussian variances must be > 0")
    return splat_windows(grid, plan, volume.positions, volume.amplitudes, variances, sampling)
