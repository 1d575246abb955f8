"""Map terms for refinement: least squares with a fitted scale and offset, −CC, and the
differentiable Q-score. Pure JAX, differentiable in the model map (and so in any leaf of the model
pytree that made it) and, for Q, in the positions directly."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._grid import Grid
from ..scores import QProbes, pearson, q_score_differentiable

__all__ = ["least_squares_loss", "cc_loss", "q_loss", "masked_cc"]


def _moments(model_map, target, where):
    """Both maps minus their means over `where`, zero outside it."""
    w = jnp.ones_like(target) if where is None else jnp.asarray(where, target.dtype)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mm = jnp.sum(w * model_map) / n
    mt = jnp.sum(w * target) / n
    dm = (model_map - mm) * w
    dt = (target - mt) * w
    return dm, dt


def masked_cc(
    model_map: Float[Array, "nz ny nx"], target: Float[Array, "nz ny nx"], where: Bool[Array, "nz ny nx"] | None = None
) -> Float[Array, ""]:
    """Pearson's correlation of the two maps over `where` (all voxels by default); 0 when either
    map is constant there (`modelmap.scores.pearson`)."""
    return pearson(model_map, target, where)


def least_squares_loss(
    model_map: Float[Array, "nz ny nx"], target: Float[Array, "nz ny nx"], where: Bool[Array, "nz ny nx"] | None = None
) -> Float[Array, ""]:
    """`min_{k, c} Σ (k ρ_model + c − ρ_target)² / Σ (ρ_target − mean)²` over `where`.

    The scale k and offset c are fitted in closed form (k = cov/var(ρ_model), c from the means), so
    the map's units and offset never matter; the value is `1 − CC²` of the two maps there, 0 for a
    perfect fit and 1 for none. Its gradient is that of the residual at the fitted (k, c) (the
    envelope theorem: the fit's own derivatives drop out).
    """
    dm, dt = _moments(model_map, target, where)
    smm, stt = jnp.sum(dm * dm), jnp.sum(dt * dt)
    k = jnp.where(smm > 0, jnp.sum(dm * dt) / jnp.where(smm > 0, smm, 1.0), 0.0)
    # the residual itself, not stt − smt²/smm: no cancellation when the fit is nearly perfect
    r = k * dm - dt
    return jnp.where(stt > 0, jnp.sum(r * r) / jnp.where(stt > 0, stt, 1.0), 0.0)


def cc_loss(
    model_map: Float[Array, "nz ny nx"], target: Float[Array, "nz ny nx"], where: Bool[Array, "nz ny nx"] | None = None
) -> Float[Array, ""]:
    """`1 − CC` of the two maps over `where` (CC_mask when `where` is the model mask)."""
    return 1.0 - masked_cc(model_map, target, where)


def q_loss(
    target: Float[Array, "nz ny nx"], grid: Grid, positions: Float[Array, "n 3"], probes: QProbes,
    sigma: float = 0.6,
) -> Float[Array, ""]:
    """`1 − mean Q` of the atoms in the target map, by the fixed-probe differentiable Q-score
    (`modelmap.scores.q_score_differentiable`): no model map is rendered; the gradient flows through
    the probe positions into the map's trilinear interpolation."""
    return 1.0 - jnp.mean(q_score_differentiable(target, grid, positions, probes, sigma))
