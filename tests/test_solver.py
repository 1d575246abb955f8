"""The compiled refinement loop: the strong-Wolfe line search (unit tests on 1-D functions), L-BFGS
in one `lax.while_loop` (no host transfer per step), and `refine_batch` (vmapped runs) against
separate refinements."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modelmap.refine import LBFGS, StrongWolfe, minimise
from modelmap.refine._line_search import ACCEPT, CONTINUE, GIVE_UP


def _search(f, df, search=StrongWolfe(), a0=1.0):
    """Drive `search` along a 1-D function from 0: the trials made and the final verdict."""
    f0, s0 = jnp.float32(f(0.0)), jnp.float32(df(0.0))
    state = search.init(f0, s0, a0)
    trials = []
    for _ in range(search.max_trials):
        a = float(state.a)
        trials.append(a)
        verdict, _, state = search.step(state, f0, s0, jnp.float32(f(a)), jnp.float32(df(a)))
        if int(verdict) != CONTINUE:
            return trials, int(verdict)
    raise AssertionError("the search neither accepted nor gave up")


def test_line_search_accepts_a_point_meeting_the_strong_wolfe_conditions():
    c1, c2 = 1e-4, 0.9
    for m in (0.3, 1.0, 2.5, 7.0):  # minimum of (a - m)^2 at a = m: the first trial short, at, or past it
        f, df = (lambda a, m=m: (a - m) ** 2), (lambda a, m=m: 2 * (a - m))
        trials, verdict = _search(f, df)
        a = trials[-1]
        assert verdict == ACCEPT
        assert f(a) <= f(0) + c1 * a * df(0) + 1e-6
        assert abs(df(a)) <= c2 * abs(df(0)) + 1e-6


def test_line_search_brackets_then_zooms():
    # a first step far past the minimum (a = 1 against m = 0.05): the trials shrink inside (0, 1)
    trials, verdict = _search(lambda a: (a - 0.05) ** 2, lambda a: 2 * (a - 0.05))
    assert verdict == ACCEPT and len(trials) > 1
    assert all(0 < t < 1 for t in trials[1:]) and abs(trials[-1] - 0.05) < 0.05


def test_line_search_extrapolation_is_limited():
    # a linear descent never curves up: each trial grows by at most max_growth, and the search
    # gives up after max_trials with the extrapolation bounded
    search = StrongWolfe(max_trials=4, max_growth=10.0)
    trials, verdict = _search(lambda a: -a, lambda a: -1.0, search)
    assert verdict == GIVE_UP
    ratios = np.asarray(trials[1:]) / np.asarray(trials[:-1])
    assert np.all(ratios >= 2.0 - 1e-6) and np.all(ratios <= 10.0 + 1e-6)


def test_line_search_treats_nonfinite_values_as_too_long():
    f = lambda a: np.inf if a > 0.5 else (a - 0.3) ** 2  # noqa: E731
    trials, verdict = _search(f, lambda a: 2 * (a - 0.3))
    assert verdict == ACCEPT and trials[-1] <= 0.5


def _rosenbrock(y, args):
    x = y["x"]
    v = jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
    return v, {"v": v}


def test_lbfgs_minimises_rosenbrock_in_one_compiled_loop():
    y0 = {"x": jnp.zeros(10, jnp.float32)}
    state = minimise(_rosenbrock, LBFGS(rtol=1e-10), y0, None, 400)
    assert int(state.result) == 1  # converged
    np.testing.assert_allclose(np.asarray(state.y["x"]), 1.0, atol=1e-3)
    h = np.asarray(state.history["value"])[: int(state.step) + 1]
    assert np.all(np.diff(h) <= 1e-6 * np.abs(h[:-1]) + 1e-12)  # every accepted step decreases f


def test_compiled_loop_makes_no_host_transfer_per_step():
    y0 = {"x": jnp.zeros(10, jnp.float32)}
    budget = jnp.asarray(200, jnp.int32)
    solver = LBFGS(rtol=1e-10)
    minimise(_rosenbrock, solver, y0, None, 200, budget)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        state = minimise(_rosenbrock, solver, y0, None, 200, budget)
        steps = state.step  # still on the device
    assert int(steps) > 20


def test_a_stopped_run_goes_on_as_if_it_had_not_stopped():
    # a run stopped at every accepted point (`stop`) and resumed from its state, time and again,
    # takes the uninterrupted run's steps: the L-BFGS memory and the line search are carried over
    y0 = {"x": jnp.zeros(10, jnp.float32)}
    solver = LBFGS(rtol=1e-10)
    whole = minimise(_rosenbrock, solver, y0, None, 40)
    stop = lambda aux: aux["v"] >= 0.0  # noqa: E731  (true at every accepted point)
    minimise._cached.clear_cache()
    state, steps, runs = solver.init(_rosenbrock, y0, None, 40), 0, 0
    while steps < 40:
        before = float(state.f)
        state = minimise(_rosenbrock, solver, state, None, 40, jnp.asarray(40 - steps, jnp.int32), stop)
        if runs > 0:  # a resumed run's history starts at the point it resumed from
            assert float(state.history["value"][0]) == before
        steps += int(state.step)
        runs += 1
        assert int(state.result) in (2, 4)  # max steps or stopped
    assert runs == 41  # the start (stopped there), then one step per run
    assert minimise._cached._cache_size() == 1  # the fresh state and the resumed ones: one compiled loop
    assert int(whole.step) == 40
    np.testing.assert_allclose(np.asarray(state.y["x"]), np.asarray(whole.y["x"]), rtol=1e-5, atol=1e-6)


def test_vmapped_lbfgs_equals_separate_runs():
    starts = jnp.stack([jnp.full(8, v, jnp.float32) for v in (0.0, -0.5, 0.5, 1.5)])
    batch = jax.vmap(lambda x: minimise(_rosenbrock, LBFGS(rtol=1e-10), {"x": x}, None, 300))(starts)
    for i in range(4):
        one = minimise(_rosenbrock, LBFGS(rtol=1e-10), {"x": starts[i]}, None, 300)
        np.testing.assert_allclose(np.asarray(batch.y["x"][i]), np.asarray(one.y["x"]), atol=1e-4)


@pytest.mark.slow  # about a minute on two cores
def test_refine_batch_of_perturbed_crambins_equals_separate_refinements(shared_data):
    import modelmap as mm
    from modelmap import Atoms, Grid, IndependentAtomVolume, NufftRenderFn
    from modelmap.refine import refine, refine_batch

    pytest.importorskip("biotite")
    model = mm.read_model(shared_data / "models" / "1crn.pdb")
    truth = model.atoms
    grid = Grid.around_positions(np.asarray(truth.positions), voxel_size=1.0, padding=5.0)
    vol = IndependentAtomVolume.from_atoms(truth, 3.0)
    target = mm.DensityMap(NufftRenderFn(grid).with_plan(vol)(vol), grid)
    rng = np.random.default_rng(0)
    starts = [model.replace(atoms=Atoms(np.asarray(truth.positions) + rng.normal(0, 0.2, truth.positions.shape),
                                        truth.atomic_numbers, truth.b_factors, truth.occupancies)) for _ in range(4)]
    opts = dict(parameters=("xyz",), max_steps=24, macro_cycles=2)
    batch = refine_batch(starts, [target] * 4, 3.0, **opts)
    for start, rb in zip(starts, batch):
        alone = refine(start, target, 3.0, progress=False, **opts)
        p_alone, p_batch = np.asarray(alone.atoms.positions), np.asarray(rb.atoms.positions)
        shift = np.linalg.norm(p_alone - np.asarray(start.atoms.positions))
        assert np.linalg.norm(p_batch - p_alone) <= 1e-3 * shift
        assert rb.n_steps == alone.n_steps


def test_refine_batch_of_perturbed_helices_equals_separate_refinements():
    """The fast version of the crambin test above (a 5-residue helix, few steps)."""
    from tests.test_refine import _helix, _target

    from modelmap import Atoms
    from modelmap.refine import refine, refine_batch

    model = _helix("AAGAA")
    grid, target = _target(model)
    truth = model.atoms
    rng = np.random.default_rng(1)
    starts = [model.replace(atoms=Atoms(np.asarray(truth.positions) + rng.normal(0, 0.2, truth.positions.shape),
                                        truth.atomic_numbers, truth.b_factors, truth.occupancies)) for _ in range(3)]
    opts = dict(parameters=("xyz",), max_steps=12, macro_cycles=1)
    batch = refine_batch(starts, [target] * 3, 3.0, grid=grid, **opts)
    for start, rb in zip(starts, batch):
        alone = refine(start, target, 3.0, grid=grid, progress=False, **opts)
        p_alone, p_batch = np.asarray(alone.atoms.positions), np.asarray(rb.atoms.positions)
        shift = np.linalg.norm(p_alone - np.asarray(start.atoms.positions))
        assert np.linalg.norm(p_batch - p_alone) <= 1e-3 * shift and rb.n_steps == alone.n_steps
