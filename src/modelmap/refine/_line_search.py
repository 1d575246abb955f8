"""A strong-Wolfe line search as a state machine: one trial per call, no host round-trip.

Nocedal & Wright, *Numerical Optimization* (2006), Algorithms 3.5-3.6, written so that every trial
step is one iteration of the solver's `lax.while_loop` (`modelmap.refine._solver`): the solver
evaluates the objective and its gradient at `y + a d`, hands `(a, f(a), f'(a))` to `step`, and gets
back whether the trial is accepted, or the next trial step. Along a descent direction `d` with
slope `f'(0) = ∇f(y)·d < 0`, a step `a` is accepted when it meets the strong Wolfe conditions

    f(a) <= f(0) + c1 a f'(0)   (sufficient decrease)   and   |f'(a)| <= c2 |f'(0)|   (curvature).

From `a = 1` the step grows (to the zero of f' extrapolated linearly from the last two trials,
between 2 and `max_growth` times further: a first L-BFGS direction is often far shorter than the
step thousands of parameters want) until the minimum along `d` is bracketed; then the bracket
shrinks to the minimum of the quadratic through f(lo), f'(lo) and f(hi), kept 10 % inside it.
A trial with a non-finite value or slope counts as too long. The curvature condition keeps
sᵀy > 0 for the L-BFGS memory and rejects steps that overshoot the line's minimum.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = ["StrongWolfe", "WolfeState"]

CONTINUE, ACCEPT, GIVE_UP = 0, 1, 2


class WolfeState(eqx.Module):
    """The bracket `[lo, hi]` of a strong-Wolfe search (`hi = inf` while extrapolating), with the
    values and slopes known at its ends, the next trial step `a` and the trials made."""

    lo: Float[Array, ""]
    f_lo: Float[Array, ""]
    dg_lo: Float[Array, ""]
    hi: Float[Array, ""]
    f_hi: Float[Array, ""]
    a: Float[Array, ""]
    trials: Int[Array, ""]


class StrongWolfe(eqx.Module):
    """A strong-Wolfe line search (module docs), one trial per `step`.

    **Arguments:**

    - `c1`: the sufficient-decrease constant (1e-4).
    - `c2`: the curvature constant (0.9, the usual value for quasi-Newton directions).
    - `max_trials`: trials before the search gives up (the solver then takes the lowest trial that
      met the sufficient decrease, if any).
    - `max_growth`: the largest factor by which one extrapolation lengthens the step (100).
    """

    c1: float = eqx.field(static=True, default=1e-4)
    c2: float = eqx.field(static=True, default=0.9)
    max_trials: int = eqx.field(static=True, default=10)
    max_growth: float = eqx.field(static=True, default=100.0)

    def __check_init__(self):
        if not 0 < self.c1 < self.c2 < 1:
            raise ValueError(f"the Wolfe constants need 0 < c1 < c2 < 1, got c1={self.c1}, c2={self.c2}")
        if self.max_trials < 1 or not self.max_growth > 2:
            raise ValueError("max_trials must be >= 1 and max_growth > 2")

    def init(self, f0: Float[Array, ""], slope: Float[Array, ""], a0: float | Array = 1.0) -> WolfeState:
        """The search along a direction of slope `slope` (< 0) from a point of value `f0`, first trial `a0`."""
        dt = jnp.result_type(f0)
        z = jnp.zeros((), dt)
        return WolfeState(lo=z, f_lo=jnp.asarray(f0, dt), dg_lo=jnp.asarray(slope, dt), hi=jnp.full((), jnp.inf, dt),
                          f_hi=jnp.full((), jnp.nan, dt), a=jnp.asarray(a0, dt), trials=jnp.zeros((), jnp.int32))

    def step(
        self,
        state: WolfeState,
        f0: Float[Array, ""],
        slope: Float[Array, ""],
        f_a: Float[Array, ""],
        dg_a: Float[Array, ""],
    ) -> tuple[Int[Array, ""], Bool[Array, ""], WolfeState]:
        """Take the result of the trial at `state.a`: the value `f_a` and slope `dg_a = ∇f(y + a d)·d`.

        **Arguments:**

        - `state`: the search.
        - `f0`, `slope`: f(0) and f'(0) < 0 of the line.
        - `f_a`, `dg_a`: f(a) and f'(a) at the trial `a = state.a`.

        **Returns:** `(verdict, sufficient, new_state)`: `verdict` is 0 (try `new_state.a` next),
        1 (accept `a`: the strong Wolfe conditions hold) or 2 (give up: `max_trials` trials made);
        `sufficient` says whether `a` met the sufficient decrease and lowered f below every
        earlier acceptable trial (a fallback the solver may keep).
        """
        a, lo, f_lo, dg_lo, hi, f_hi = state.a, state.lo, state.f_lo, state.dg_lo, state.hi, state.f_hi
        finite = jnp.isfinite(f_a) & jnp.isfinite(dg_a)
        too_long = ~finite | (f_a > f0 + self.c1 * a * slope) | (f_a >= f_lo)
        wolfe = ~too_long & (jnp.abs(dg_a) <= self.c2 * jnp.abs(slope))
        past = ~too_long & ~wolfe & (dg_a > 0)  # past the line's minimum: it lies in [lo, a]
        short = ~too_long & ~wolfe & ~past  # short of it: extrapolate
        # the zero of f' extrapolated through (lo, f'(lo)) and (a, f'(a))
        a_ext = jnp.where(dg_a > dg_lo, a - dg_a * (a - lo) / jnp.where(dg_a > dg_lo, dg_a - dg_lo, 1.0), 10.0 * a)
        hi = jnp.where(too_long | past, a, hi)
        f_hi = jnp.where(too_long | past, f_a, f_hi)
        lo_new = jnp.where(short, a, lo)
        f_lo = jnp.where(short, f_a, f_lo)
        dg_lo = jnp.where(short, dg_a, dg_lo)
        lo = lo_new
        grow = jnp.clip(a_ext, 2.0 * a, self.max_growth * a)
        width = hi - lo
        excess = f_hi - f_lo - dg_lo * width
        quad = jnp.isfinite(f_hi) & (excess > 0)
        safe_excess = jnp.where(quad, excess, 1.0)
        a_q = jnp.where(quad, lo - dg_lo * width * width / (2.0 * safe_excess), lo + 0.5 * width)
        a_zoom = jnp.clip(a_q, lo + 0.1 * width, hi - 0.1 * width)
        a_next = jnp.where(jnp.isinf(hi), grow, a_zoom)
        trials = state.trials + 1
        verdict = jnp.where(wolfe, ACCEPT, jnp.where(trials >= self.max_trials, GIVE_UP, CONTINUE))
        new = WolfeState(lo=lo, f_lo=f_lo, dg_lo=dg_lo, hi=hi, f_hi=f_hi, a=a_next.astype(a.dtype), trials=trials)
        return verdict.astype(jnp.int32), ~too_long, new
