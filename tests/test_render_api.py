"""The render API every volume and render function shares: one `from_atoms`, planning from a volume
or from bounds, rendering under jit/vmap/grad/lax.map, the GPU accumulation path (forced on the
CPU) equal to the CPU path, and the Fourier map's device rules."""

import dataclasses
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modelmap as mm
from modelmap._peptide import ideal_peptide
from modelmap.io import model_from_structure
from modelmap.render._nufft import _require_finufft

from ._reference import cc

D = {"gaussian": 2.0, "splat": 3.5, "nufft": 3.5, "shells": 3.5}


def _atoms(seq="AAGAAA", dtype=jnp.float32, b=30.0):
    return model_from_structure(ideal_peptide(seq, b_factor=b), dtype=dtype).atoms


def _pair(kind, grid):
    """(volume class, unplanned render function) of a kind."""
    return {
        "gaussian": (mm.GaussianMixtureVolume, mm.GaussianMixtureRenderFn(grid)),
        "splat": (mm.IndependentAtomVolume, mm.SplatFourierRenderFn(grid)),
        "nufft": (mm.IndependentAtomVolume, mm.NufftRenderFn(grid)),
        "shells": (mm.ShellDecompositionVolume, mm.ShellRenderFn(grid)),
    }[kind]


def test_every_volume_is_built_the_same_way():
    names = None
    for cls in (mm.GaussianMixtureVolume, mm.IndependentAtomVolume, mm.ShellDecompositionVolume):
        params = list(inspect.signature(cls.from_atoms).parameters)[:3]
        assert names is None or params == names
        names = params
        assert issubclass(cls, mm.AbstractVolume)
    assert names == ["atoms", "resolution", "table"]
    atoms = _atoms()
    for cls in (mm.GaussianMixtureVolume, mm.IndependentAtomVolume, mm.ShellDecompositionVolume):
        v = cls.from_atoms(atoms, 3.0)
        for field in ("positions", "b_factors", "occupancies", "resolution"):
            assert getattr(v, field) is not None
        np.testing.assert_array_equal(np.asarray(v.occupancies), np.asarray(atoms.occupancies))
    # the interface is declared, never probed: an incomplete render function cannot be built
    with pytest.raises(TypeError):
        mm.AbstractRenderFn()


@pytest.mark.parametrize("kind", ["gaussian", "splat", "nufft", "shells"])
def test_bounds_render_traced_volumes_under_every_transformation(kind):
    atoms = _atoms()
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 8.0)
    cls, fn = _pair(kind, grid)
    d = D[kind]
    volume = cls.from_atoms(atoms, d)
    planned = fn.with_plan(volume)
    bounded = fn.with_bounds(mm.RenderBounds((0.0, 100.0), d, elements=[6, 7, 8]))
    assert bounded.is_planned and planned.is_planned and not fn.is_planned
    ref = planned(volume)
    peak = float(jnp.max(jnp.abs(ref)))
    # jit. The bounds' windows are wider, the shell tables' nodes and the NUFFT's B nodes differ,
    # the splat route's anti-aliasing blur comes from the lowest B allowed (0): equal to each
    # method's accuracy (splat: its eps, 1e-4)
    tol = {"gaussian": 2e-6, "shells": 5e-6, "nufft": 5e-6, "splat": 1e-4}[kind] * peak
    assert float(jnp.max(jnp.abs(eqx.filter_jit(lambda f, v: f(v))(bounded, volume) - ref))) <= tol
    # vmap over shifted copies, and lax.map
    shifts = jnp.asarray([[0.0, 0, 0], [0.5, -0.3, 0.2]], jnp.float32)
    stacked = eqx.tree_at(lambda v: v.positions, volume, volume.positions[None] + shifts[:, None])
    axes = eqx.tree_at(lambda v: v.positions, jax.tree.map(lambda _: None, volume), 0, is_leaf=lambda x: x is None)
    by_vmap = eqx.filter_vmap(lambda v: bounded(v), in_axes=(axes,))(stacked)
    by_map = jax.lax.map(lambda p: bounded(eqx.tree_at(lambda v: v.positions, volume, p)), stacked.positions)
    for k in range(2):
        one = planned(eqx.tree_at(lambda v: v.positions, volume, volume.positions + shifts[k]))
        assert float(jnp.max(jnp.abs(by_vmap[k] - one))) <= tol
        assert float(jnp.max(jnp.abs(by_map[k] - one))) <= tol
    # grad through a traced volume
    target = planned(eqx.tree_at(lambda v: v.positions, volume, volume.positions + shifts[1]))
    g = eqx.filter_jit(eqx.filter_grad(lambda v: -cc(bounded(v), target)))(volume)
    g_ref = eqx.filter_grad(lambda v: -cc(planned(v), target))(volume)
    scale = float(jnp.max(jnp.abs(g_ref.positions)))
    assert float(jnp.max(jnp.abs(g.positions - g_ref.positions))) <= 1e-3 * scale


@pytest.mark.parametrize("kind", ["gaussian", "splat", "nufft", "shells"])
def test_past_the_bounds_is_an_error_not_a_truncated_map(kind):
    atoms = _atoms("AAA")
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 8.0)
    cls, fn = _pair(kind, grid)
    d = D[kind]
    bounded = fn.with_bounds(mm.RenderBounds((10.0, 40.0), d, elements=[6, 7, 8]))
    hot = cls.from_atoms(eqx.tree_at(lambda a: a.b_factors, atoms, atoms.b_factors + 200.0), d)
    with pytest.raises(Exception, match="planned|left the range|window"):
        jax.block_until_ready(eqx.filter_jit(lambda f, v: f(v))(bounded, hot))
    # a concrete call says it in one line, as a modelmap error
    with pytest.raises(mm.PlanExceededError, match=r"^(?!.*EQX_ON_ERROR).*(planned|left the range|window)"):
        jax.block_until_ready(bounded(hot))


def test_unplanned_traced_render_says_how_to_plan():
    atoms = _atoms("AAA")
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 6.0)
    for kind in ("gaussian", "splat", "nufft", "shells"):
        cls, fn = _pair(kind, grid)
        with pytest.raises(ValueError, match=r"with_plan\(volume.*with_bounds\("):
            eqx.filter_jit(lambda v, fn=fn: fn(v))(cls.from_atoms(atoms, D[kind]))


def test_render_model_under_jit_says_what_to_do_instead():
    atoms = _atoms("AAA")
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 6.0)
    with pytest.raises(ValueError, match="with_plan"):
        eqx.filter_jit(lambda a: mm.render_model(a, grid, 2.0))(atoms)


def test_a_plan_for_a_stacked_batch_covers_every_member():
    a = _atoms("AAGAA", b=20.0)
    b = eqx.tree_at(lambda x: (x.positions, x.b_factors), a, (a.positions + 0.4, a.b_factors + 60.0))
    grid = mm.Grid.around_positions(a.positions, 1.0, 9.0)
    for kind in ("gaussian", "splat", "nufft", "shells"):
        cls, fn = _pair(kind, grid)
        va, vb = cls.from_atoms(a, D[kind]), cls.from_atoms(b, D[kind])
        axes = va.batch_axes()
        stacked = mm.batch.stack_volumes([va, vb])
        planned = fn.with_plan(stacked)
        maps = eqx.filter_vmap(lambda v: planned(v), in_axes=(axes,))(stacked)
        for k, v in enumerate((va, vb)):
            ref = fn.with_plan(v)(v)
            tol = (1e-4 if kind == "splat" else 5e-6) * float(jnp.max(jnp.abs(ref)))
            assert float(jnp.max(jnp.abs(maps[k] - ref))) <= tol, kind


def test_another_structure_of_the_same_shapes_does_not_recompile():
    """Plans from `with_plan` keep data-derived values (the Fourier B range, the aliasing blur) in
    arrays: a new structure with the same number of atoms and bucket sizes reuses the compilation."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    a = _atoms("AAGAAAA", b=30.0)
    b = eqx.tree_at(lambda x: (x.positions, x.b_factors), a, (a.positions + 0.3, a.b_factors * 1.7))
    grid = mm.Grid.around_positions(a.positions, 1.1, 9.0)
    for fn, cls, d in ((mm.SplatFourierRenderFn(grid, max_buckets=1), mm.IndependentAtomVolume, 3.7),
                       (mm.NufftRenderFn(grid), mm.IndependentAtomVolume, 3.7)):
        va, vb = cls.from_atoms(a, d), cls.from_atoms(b, d)
        fa, fb = fn.with_plan(va, b_margin=30.0), fn.with_plan(vb, b_margin=30.0)
        render = eqx.filter_jit(lambda f, v: f(v))
        render(fa, va).block_until_ready()
        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            out = render(fb, vb).block_until_ready()
        finally:
            jax.monitoring.clear_event_listeners()
        assert not compiles, type(fn).__name__
        ref = fn.with_plan(vb)(vb)
        assert float(jnp.max(jnp.abs(out - ref))) <= 1e-4 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("kind", ["gaussian", "shells", "splat"])
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.x64)])
def test_forced_gpu_accumulation_equals_the_cpu_path(kind, dtype):
    """`accumulate="scatter"` (the GPU path: one scatter-add per chunk, the backward vmapped) gives
    the CPU loop's map to 1e-6 of the peak and the same gradients."""
    atoms = _atoms("AAGAAAA", dtype=dtype)
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 6.0)
    cls, fn = _pair(kind, grid)
    volume = cls.from_atoms(atoms, D[kind])
    loop = dataclasses.replace(fn, accumulate="loop").with_plan(volume, b_margin=5.0)
    scatter = dataclasses.replace(fn, accumulate="scatter").with_plan(volume, b_margin=5.0)
    auto = fn.with_plan(volume, b_margin=5.0)
    m_loop, m_scatter, m_auto = loop(volume), scatter(volume), auto(volume)
    peak = float(jnp.max(jnp.abs(m_loop)))
    assert float(jnp.max(jnp.abs(m_scatter - m_loop))) <= 1e-6 * peak
    assert float(jnp.max(jnp.abs(m_auto - m_loop))) == 0.0  # the CPU picks the loop
    target = loop(eqx.tree_at(lambda v: v.positions, volume, volume.positions + 0.3))
    g_loop = eqx.filter_grad(lambda v: -cc(loop(v), target))(volume)
    g_scatter = eqx.filter_grad(lambda v: -cc(scatter(v), target))(volume)
    for leaf in ("positions", "b_factors", "occupancies", "resolution"):
        x, y = getattr(g_scatter, leaf), getattr(g_loop, leaf)
        if x is None or y is None or not jnp.issubdtype(jnp.asarray(y).dtype, jnp.inexact):
            continue
        scale = float(jnp.max(jnp.abs(y))) or 1.0
        assert float(jnp.max(jnp.abs(x - y))) <= (1e-5 if dtype == jnp.float32 else 1e-10) * scale, leaf


def test_nufft_works_under_vmap():
    """jax-finufft 1.3.1's batching rule fails on jax 0.10 (`batching.not_mapped` was removed);
    modelmap restores the name, so vmap over the NUFFT equals a loop."""
    atoms = _atoms("AAGA")
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 6.0)
    volume = mm.IndependentAtomVolume.from_atoms(atoms, 3.0)
    fn = mm.NufftRenderFn(grid).with_plan(volume, b_margin=10.0)
    bs = jnp.stack([volume.b_factors, volume.b_factors + 5.0])
    maps = jax.vmap(lambda b: fn(eqx.tree_at(lambda v: v.b_factors, volume, b)))(bs)
    for k in range(2):
        one = fn(eqx.tree_at(lambda v: v.b_factors, volume, bs[k]))
        assert float(jnp.max(jnp.abs(maps[k] - one))) <= 1e-6 * float(jnp.max(one))


def test_fourier_map_on_a_gpu_without_a_cuda_finufft():
    grid = mm.Grid((8, 8, 8), 1.0)
    # method="fourier" takes the pure-JAX route on a GPU unless jax-finufft has a CUDA build
    assert isinstance(mm.render.fourier_render_fn(grid, platform="gpu"), mm.SplatFourierRenderFn)
    assert isinstance(mm.render.fourier_render_fn(grid, platform="cpu"), mm.NufftRenderFn)
    with pytest.raises(ImportError, match="CPU-only build.*SplatFourierRenderFn"):
        _require_finufft("gpu")


def test_bounds_are_checked_and_cover_a_batch():
    with pytest.raises(ValueError, match="bounds need"):
        mm.RenderBounds((50.0, 10.0), 3.0)
    with pytest.raises(ValueError, match="table"):
        mm.RenderBounds((0.0, 10.0), 3.0, table="neutron")
    a, b = _atoms("AAA", b=12.0), _atoms("AGA", b=130.0)
    bounds = mm.RenderBounds.covering([a, b], 3.0, b_step=50.0)
    assert bounds.b_factor == (0.0, 150.0) and bounds.resolution == (3.0, 3.0)
    assert bounds.elements == (6, 7, 8)
    with pytest.raises(mm.UnknownElementError):
        mm.RenderBounds((0.0, 10.0), 3.0, elements=[0]).form_factor_widths()


@pytest.mark.parametrize("kind, accumulate", [("gaussian", "loop"), ("gaussian", "scatter"), ("shells", "loop")])
def test_window_classes_give_the_one_window_map_and_gradients(kind, accumulate):
    """`window_classes` (a window size chosen per chunk from the volume's values, `WindowClasses`)
    renders what one window for all renders, to float32 rounding, for members of a vmapped batch
    whose chunks need different sizes (each class loop runs for the batch's largest count), and
    its gradients are the one-window gradients. (The splat route passes it to its splatting.)"""
    atoms = _atoms("AAGAAAAG")
    cold_first = eqx.tree_at(lambda a: a.b_factors, atoms, jnp.where(jnp.arange(atoms.b_factors.shape[0]) < 20,
                                                                      10.0, 120.0))
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 8.0)
    cls, fn = _pair(kind, grid)
    fn = dataclasses.replace(fn, accumulate=accumulate, chunk_size=8)
    bounds = mm.RenderBounds((10.0, 120.0), D[kind], elements=[6, 7, 8])
    one = fn.with_bounds(bounds)
    many = dataclasses.replace(fn, window_classes=4).with_bounds(bounds)
    assert isinstance(many.plan, mm.WindowClasses) and len(many.plan.half_widths) > 1
    splat = mm.SplatFourierRenderFn(grid, window_classes=4).with_bounds(mm.RenderBounds((10.0, 120.0), 3.5))
    assert isinstance(splat.splat.plan, mm.WindowClasses)
    # two members: cold atoms first, and all hot (every chunk at the widest size)
    hot = eqx.tree_at(lambda a: a.b_factors, atoms, jnp.full_like(atoms.b_factors, 120.0))
    volumes = [cls.from_atoms(a, D[kind]) for a in (cold_first, hot)]
    if kind == "gaussian":  # the cold chunks do get narrower windows
        v = volumes[0]
        plan = many.plan.resolve(grid, v.positions.shape[0])
        fitted = plan.fit_chunks(grid, plan.n_sigma * jnp.sqrt(jnp.max(v.gaussian_variances(), axis=-1)))
        chosen = np.asarray(fitted.buckets[0].chunk_class)
        assert chosen.min() < chosen.max() == len(many.plan.half_widths) - 1
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *volumes)
    by_vmap = jax.vmap(many)(stacked)
    for k, v in enumerate(volumes):
        ref = one(v)
        assert float(jnp.max(jnp.abs(by_vmap[k] - ref))) <= 1e-6 * float(jnp.max(jnp.abs(ref)))
    target = one(cls.from_atoms(eqx.tree_at(lambda a: a.positions, cold_first, cold_first.positions + 0.3), D[kind]))
    g_one = eqx.filter_grad(lambda v: -cc(one(v), target))(volumes[0])
    g_vmap = jax.vmap(eqx.filter_grad(lambda v: -cc(many(v), target)))(stacked)
    for leaf in ("positions", "b_factors", "occupancies"):
        y = getattr(g_one, leaf)
        assert float(jnp.max(jnp.abs(getattr(g_vmap, leaf)[0] - y))) <= 1e-5 * float(jnp.max(jnp.abs(y))), leaf
