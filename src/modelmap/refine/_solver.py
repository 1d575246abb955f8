"""L-BFGS with a strong-Wolfe line search, as one compiled loop (the optimistix pattern).

`LBFGS` has `init / step / terminate / postprocess` like an optimistix solver, and `minimise` runs
them in one `lax.while_loop` inside one `eqx.filter_jit`: no value leaves the device between steps,
so a whole refinement cycle compiles as one function that can be vmapped over structures or
sharded. Every iteration of the loop makes exactly one evaluation of the objective and its gradient
(the objective appears once in the compiled graph): at the start point first, then at each trial
step `y + a d` of the line search (`modelmap.refine._line_search.StrongWolfe`), whose state is part
of the solver's state.

The direction is optax's L-BFGS (`optax.scale_by_lbfgs`, Nocedal & Wright Alg. 7.4, memory 10,
scaled initial Hessian). The memory restarts when a step fails the curvature condition
(sᵀy <= 0), when the direction is not one of descent, and when the line search finds no
decrease. A step that lowers the objective by less than `rtol` × |f| (or finds no decrease)
counts as quiet; `quiet_steps` quiet steps in a row end the run as converged, and so do two
failed line searches in a row.

The objective is `fn(y, args) -> (value, aux)`; `aux` (a pytree of scalars) is recorded at every
accepted step (`history`), and `stop(aux)` (optional, static) ends the run early when true at
an accepted point (`RESULT_STOPPED`), e.g. when a neighbour list has gone stale. `callback`
(optional, static) is called on the host with `(step, value, aux, extra)` every `every` accepted steps
through `jax.debug.callback`: a progress bar at a cadence, not a round-trip the loop waits on.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._line_search import ACCEPT, GIVE_UP, StrongWolfe, WolfeState

__all__ = ["LBFGS", "SolverState", "minimise", "RESULT_NAMES"]

RUNNING, CONVERGED, MAX_STEPS, NONFINITE, STOPPED = 0, 1, 2, 3, 4
RESULT_NAMES = {RUNNING: "running", CONVERGED: "converged", MAX_STEPS: "max_steps", NONFINITE: "nonfinite",
                STOPPED: "stopped"}


def _where(c, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(c, x, y), a, b)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _axpy(y, a, d):
    return jax.tree_util.tree_map(lambda p, q: (p + a.astype(p.dtype) * q).astype(p.dtype), y, d)


class SolverState(eqx.Module):
    """Everything a run carries between iterations (all arrays: vmap-able)."""

    y: PyTree  # the accepted point
    f: Float[Array, ""]
    grad: PyTree
    aux: PyTree
    d: PyTree  # the search direction from y
    slope: Float[Array, ""]  # ∇f(y)·d
    memory: Any  # optax L-BFGS state
    search: WolfeState
    best: tuple  # (y, f, grad, aux, a, slope): the lowest trial with a sufficient decrease
    has_best: Bool[Array, ""]
    started: Bool[Array, ""]  # the start point has been evaluated
    step: Int[Array, ""]  # accepted steps
    evaluations: Int[Array, ""]
    quiet: Int[Array, ""]
    result: Int[Array, ""]
    history: PyTree  # per accepted step (row 0: the start): value and aux


def _empty_history(f, aux, max_steps: int) -> dict:
    """Rows for the start and `max_steps` accepted steps: NaN (floats) or 0 until written."""
    return {"value": jnp.full((max_steps + 1,), jnp.nan, f.dtype),
            "aux": jax.tree_util.tree_map(lambda s: jnp.full((max_steps + 1, *s.shape), jnp.nan, s.dtype)
                                          if jnp.issubdtype(s.dtype, jnp.floating)
                                          else jnp.zeros((max_steps + 1, *s.shape), s.dtype), aux)}


class LBFGS(eqx.Module):
    """L-BFGS with a strong-Wolfe line search (module docs).

    **Arguments:**

    - `rtol`: a step that lowers the objective by less than `rtol` × |f| is quiet.
    - `quiet_steps`: quiet steps in a row that end the run (converged).
    - `memory_size`: L-BFGS memory.
    - `search`: the `StrongWolfe` line search.
    """

    rtol: float = eqx.field(static=True, default=1e-7)
    quiet_steps: int = eqx.field(static=True, default=3)
    memory_size: int = eqx.field(static=True, default=10)
    search: StrongWolfe = StrongWolfe()

    @property
    def _tx(self) -> optax.GradientTransformation:
        return optax.chain(optax.scale_by_lbfgs(memory_size=self.memory_size), optax.scale(-1.0))

    def _direction(self, grad, memory, y):
        d, memory = self._tx.update(grad, memory, y)
        d = jax.tree_util.tree_map(lambda g, x: x.astype(g.dtype), grad, d)
        return d, memory, _vdot(grad, d)

    def _fresh(self, y):
        memory = self._tx.init(y)
        # init's scalars are weakly typed where an update's are not
        shapes = jax.eval_shape(self._tx.update, y, memory, y)[1]
        return jax.tree_util.tree_map(lambda x, s: jnp.asarray(x, s.dtype), memory, shapes)

    def _scaled_gradient(self, grad, y):
        """`_direction(grad, _fresh(y), y)` in closed form: optax's first L-BFGS step is the gradient
        times min(1, 1/|g|), and its memory then holds only (y, grad). Written out, the loop's compiled
        graph holds one two-loop recursion instead of two (compiling the solver alone: 1.63 s → 1.31 s)."""
        norm = jnp.sqrt(_vdot(grad, grad))
        scale = jnp.minimum(1.0, 1.0 / norm)
        d = jax.tree_util.tree_map(lambda g: (-scale * g).astype(g.dtype), grad)
        lbfgs, *rest = self._fresh(y)
        lbfgs = lbfgs._replace(count=jnp.ones_like(lbfgs.count), params=y, updates=grad)
        return d, (lbfgs, *rest), _vdot(grad, d)

    def _descent(self, grad, memory, y):
        """A descent direction from the memory, or from a fresh memory (a scaled gradient step)."""
        d1, m1, s1 = self._direction(grad, memory, y)
        d0, m0, s0 = self._scaled_gradient(grad, y)
        ok = s1 < 0
        return _where(ok, d1, d0), _where(ok, m1, m0), jnp.where(ok, s1, s0)

    def init(self, fn, y, args, max_steps: int, structure=None) -> SolverState:
        """The state before the first evaluation (the first iteration evaluates `y`).

        `structure`: `fn`'s output `(value, aux)` as `jax.ShapeDtypeStruct`s where the caller knows
        it; else `fn` is traced for it (a refinement's objective: ~0.5 s on 7CEC, paid again when
        the loop compiles)."""
        f_struct, aux_struct = eqx.filter_eval_shape(fn, y, args) if structure is None else structure
        dt = f_struct.dtype
        zero_aux = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct)
        zeros_y = jax.tree_util.tree_map(jnp.zeros_like, y)
        f0 = jnp.zeros((), dt)
        i0 = jnp.zeros((), jnp.int32)
        return SolverState(
            y=y, f=f0, grad=zeros_y, aux=zero_aux, d=zeros_y, slope=f0, memory=self._fresh(y),
            search=self.search.init(f0, -jnp.ones((), dt), 0.0),
            best=(y, f0, zeros_y, zero_aux, f0, f0), has_best=jnp.zeros((), bool), started=jnp.zeros((), bool),
            step=i0, evaluations=i0, quiet=i0, result=i0, history=_empty_history(f0, zero_aux, max_steps),
        )

    def resume(self, state: SolverState, max_steps: int) -> SolverState:
        """`state` (where an earlier run stopped) as the start of a new run: its point, value,
        gradient, search direction, line search and L-BFGS memory kept; the counts, the result and
        the history (row 0: the point) begun anew.

        For a run stopped for the host's work (a rebuilt contact list, re-planned render windows)
        whose objective is the same function of the same parameters: 7CEC's B from a flat start,
        with three re-plans, took 95 evaluations restarting the memory at each and 76 going on."""
        history = _empty_history(state.f, state.aux, max_steps)
        history = {"value": history["value"].at[0].set(jnp.where(state.started, state.f, jnp.nan)),
                   "aux": jax.tree_util.tree_map(lambda h, x: h.at[0].set(x), history["aux"], state.aux)}
        i0 = jnp.zeros((), jnp.int32)
        return eqx.tree_at(lambda s: (s.step, s.evaluations, s.quiet, s.result, s.history), state,
                           (i0, i0, i0, i0, history))

    def step(self, fn, state: SolverState, args, max_steps: int, budget, stop=None, callback=None, every: int = 1,
             monitor=None):
        """One iteration: evaluate the trial point, advance the line search, accept or go on."""
        a = state.search.a
        trial = _axpy(state.y, a, state.d)
        (value, aux), grad = jax.value_and_grad(fn, has_aux=True)(trial, args)
        dg = _vdot(grad, state.d)
        evaluations = state.evaluations + 1

        # --- the first iteration: the start point --------------------------------------------
        finite_start = jnp.isfinite(value) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g))
                                                                   for g in jax.tree_util.tree_leaves(grad)]))

        # --- a line-search trial ----------------------------------------------------------------
        verdict, sufficient, search = self.search.step(state.search, state.f, state.slope, value, dg)
        better = sufficient & (~state.has_best | (value < state.best[1]))
        best = _where(better, (trial, value, grad, aux, a, dg), state.best)
        has_best = state.has_best | better
        accept_trial = verdict == ACCEPT
        fallback = (verdict == GIVE_UP) & has_best
        failed = (verdict == GIVE_UP) & ~has_best

        take = ~state.started | accept_trial | fallback
        new = _where(accept_trial | ~state.started, (trial, value, grad, aux, a, dg), best)
        y1, f1, g1, aux1, a1, dg1 = new
        # the L-BFGS memory: kept when the step meets sᵀy = a (f'(a) − f'(0)) > 0, else restarted
        curvature_ok = state.started & (a1 * (dg1 - state.slope) > 0)
        memory = _where(curvature_ok, state.memory, self._fresh(y1))
        # after a failed search: stay at y, restart the memory (a scaled gradient step)
        at_y = failed & state.started
        y_next = _where(take, y1, state.y)
        f_next = jnp.where(take, f1, state.f)
        g_next = _where(take, g1, state.grad)
        aux_next = _where(take, aux1, state.aux)
        memory = _where(at_y, self._fresh(state.y), memory)
        moved = take | failed  # a new search starts from y_next, along a new direction
        d, memory, slope = _where(moved, self._descent(g_next, memory, y_next), (state.d, state.memory, state.slope))

        decrease = state.f - f1
        quiet_step = state.started & (failed | (take & (decrease <= self.rtol * jnp.maximum(jnp.abs(f1), 1e-30))))
        quiet = jnp.where(quiet_step, state.quiet + 1, jnp.where(take, 0, state.quiet))
        # a failed search restarts the memory; a second one in a row (along the scaled gradient) ends
        # the run: at the minimum the trials only see float rounding (10 trials each)
        quiet = jnp.where(failed & state.started, jnp.maximum(quiet, self.quiet_steps - 1), quiet)
        step = state.step + jnp.where(take & state.started, 1, 0)

        search = _where(moved, self.search.init(f_next, slope, 1.0), search)
        has_best = has_best & ~moved

        history = state.history
        row = jnp.where(take, step, max_steps + 1)  # out of range: dropped
        history = {"value": history["value"].at[row].set(f1, mode="drop"),
                   "aux": jax.tree_util.tree_map(lambda h, x: h.at[row].set(x, mode="drop"), history["aux"], aux1)}

        result = state.result
        result = jnp.where(~state.started & ~finite_start, NONFINITE, result)
        result = jnp.where((result == 0) & (quiet >= self.quiet_steps), CONVERGED, result)
        result = jnp.where((result == 0) & take & ~(slope < 0), CONVERGED, result)  # a zero gradient
        if stop is not None:
            result = jnp.where((result == 0) & take & stop(aux_next), STOPPED, result)
        result = jnp.where((result == 0) & (step >= jnp.minimum(budget, max_steps)), MAX_STEPS, result)
        result = jnp.where((result == 0) & (evaluations >= max_steps * (self.search.max_trials + 1) + 1),
                           MAX_STEPS, result)

        if callback is not None:
            report = take & ((step % every == 0) | (result != 0))
            extra = None if monitor is None else monitor(y_next, args)
            jax.lax.cond(report, lambda: jax.debug.callback(callback, step, f_next, aux_next, extra), lambda: None)

        return SolverState(
            y=y_next, f=f_next, grad=g_next, aux=aux_next, d=d, slope=slope, memory=memory, search=search,
            best=best, has_best=has_best, started=jnp.ones((), bool), step=step, evaluations=evaluations,
            quiet=quiet, result=result.astype(jnp.int32), history=history,
        )

    def terminate(self, state: SolverState) -> Bool[Array, ""]:
        return state.result != RUNNING

    def postprocess(self, state: SolverState) -> SolverState:
        return state


@eqx.filter_jit
def minimise(
    fn: Callable,
    solver: LBFGS,
    y0: PyTree,
    args: PyTree,
    max_steps: int,
    budget: Int[Array, ""] | int | None = None,
    stop: Callable | None = None,
    callback: Callable | None = None,
    every: int = 1,
    monitor: Callable | None = None,
) -> SolverState:
    """Minimise `fn(y, args) -> (value, aux)` from `y0` with `solver`, in one `lax.while_loop`.

    **Arguments:**

    - `fn`: the objective (scalar value and an aux pytree of arrays); hashable (it is static).
    - `solver`: an `LBFGS`.
    - `y0`: the start (a pytree of float arrays), or the `SolverState` of an earlier run to go on
      from (`LBFGS.resume`: its L-BFGS memory and line search kept). A run from a state that
      `solver.init` made is the same as one from its `y`, and compiles once with the runs that go on.
    - `args`: the objective's other arguments (traced).
    - `max_steps`: accepted steps at most (static: sizes the history).
    - `budget`: accepted steps at most for this run (traced: another budget does not recompile);
      default `max_steps`.
    - `stop`: optional `stop(aux) -> bool`, checked at every accepted point.
    - `callback`: optional host callback `(step, value, aux, extra)` every `every` accepted steps,
      `extra = monitor(y, args)` computed on the device (`None` without a `monitor`).

    **Returns:** the final `SolverState` (`y`, `f`, `aux`, `step`, `result`, `history`).
    """
    budget = jnp.asarray(max_steps if budget is None else budget, jnp.int32)
    state = solver.resume(y0, max_steps) if isinstance(y0, SolverState) else solver.init(fn, y0, args, max_steps)
    state = jax.lax.while_loop(
        lambda s: ~solver.terminate(s),
        lambda s: solver.step(fn, s, args, max_steps, budget, stop, callback, every, monitor),
        state,
    )
    return solver.postprocess(state)
