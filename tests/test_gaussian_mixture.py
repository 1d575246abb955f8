import math

import equinox as eqx
import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modelmap as mm

from ._reference import assert_gradients_match_central_differences, cc
from modelmap._peptide import ideal_peptide
from modelmap.io import model_from_structure


def _atoms(n=3, seed=0, dtype=np.float64, b=(5.0, 20.0, 40.0), z=(6, 8, 16), centre=(4.0, 4.5, 5.0)):
    rng = np.random.default_rng(seed)
    pos = np.asarray(centre) + rng.uniform(-2.0, 2.0, size=(n, 3))
    return mm.Atoms(
        jnp.asarray(pos, dtype), np.asarray(z[:n]), jnp.asarray(b[:n], dtype), jnp.asarray([1.0, 0.7, 0.4][:n], dtype)
    )


def _density(points, atoms, table):
    """The mixture's density at points (..., 3), evaluated in 3-D (no separability used)."""
    vol = mm.GaussianMixtureVolume.from_atoms(atoms, 0.0, table)
    out = np.zeros(points.shape[:-1])
    for p, a, v in zip(np.asarray(vol.positions), np.asarray(vol.gaussian_amplitudes()), np.asarray(vol.gaussian_variances())):
        r2 = np.sum((points - p) ** 2, axis=-1)
        for ak, vk in zip(a, v):
            out += ak * (2 * np.pi * vk) ** -1.5 * np.exp(-r2 / (2 * vk))
    return out


@pytest.mark.x64
def test_voxel_averages_equal_dense_integration_float64():
    atoms = _atoms()
    grid = mm.Grid((12, 11, 10), (0.9, 0.85, 1.0), (0.2, 0.0, -0.3))
    table = mm.get_table("electron", dtype=jnp.float64)
    vol = mm.GaussianMixtureVolume.from_atoms(atoms, 0.0, table)
    ours = np.asarray(mm.GaussianMixtureRenderFn(grid, sampling="average")(vol))
    # dense integration: 12-point Gauss-Legendre per axis inside every voxel box, full 3-D density
    t, w = np.polynomial.legendre.leggauss(12)
    coords = grid.coordinates()  # (nz, ny, nx, 3)
    vx, vy, vz = grid.voxel_size
    ref = np.zeros(grid.shape)
    for iz, (tz, wz) in enumerate(zip(t, w)):
        for ty, wy in zip(t, w):
            offs = np.stack([0.5 * vx * t, np.full_like(t, 0.5 * vy * ty), np.full_like(t, 0.5 * vz * tz)], -1)
            pts = coords[..., None, :] + offs  # (nz, ny, nx, 12, 3)
            ref += (wz * wy / 8) * np.einsum("...q,q->...", _density(pts, atoms, table), w)
    peak = ref.max()
    assert np.max(np.abs(ours - ref)) <= 1e-6 * peak


@pytest.mark.x64
def test_point_samples_equal_the_density():
    atoms = _atoms(seed=1)
    grid = mm.Grid((10, 10, 10), 0.8, (0.5, 0.7, 1.0))
    table = mm.get_table("xray", dtype=jnp.float64)
    vol = mm.GaussianMixtureVolume.from_atoms(atoms, 0.0, table)
    ours = np.asarray(mm.GaussianMixtureRenderFn(grid, sampling="point")(vol))
    ref = _density(grid.coordinates(), atoms, table)
    assert np.max(np.abs(ours - ref)) <= 1e-6 * ref.max()


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.x64)])
def test_map_integral_equals_sum_of_occupancy_times_f0(dtype):
    atoms = _atoms(dtype=dtype, centre=(10.0, 10.0, 10.0))
    grid = mm.Grid((24, 24, 24), 0.9, (-1.0, -1.0, -1.0))
    for table_name in ("electron", "xray"):
        table = mm.get_table(table_name, dtype=dtype)
        vol = mm.GaussianMixtureVolume.from_atoms(atoms, math.sqrt(10.0 / 4), table)
        out = mm.GaussianMixtureRenderFn(grid)(vol)
        assert out.dtype == dtype
        total = float(np.sum(np.asarray(out, np.float64))) * grid.voxel_volume
        expected = float(np.sum(np.asarray(atoms.occupancies) * np.asarray(table.f0(atoms.atomic_numbers))))
        assert total == pytest.approx(expected, rel=1e-4)


def _gemmi_point_map(structure: gemmi.Structure, grid: mm.Grid) -> np.ndarray:
    """gemmi DensityCalculatorE (direct summation, blur 0) on the same grid points."""
    st = structure.clone()
    st.remove_empty_chains()
    ox, oy, oz = grid.origin
    for model in st:
        for chain in model:
            for res in chain:
                for atom in res:
                    atom.pos = gemmi.Position(atom.pos.x - ox, atom.pos.y - oy, atom.pos.z - oz)
    nz, ny, nx = grid.shape
    margin = 24  # voxels of empty cell beyond the box, so nothing wraps back in
    vx, vy, vz = grid.voxel_size
    dc = gemmi.DensityCalculatorE()
    dc.grid.unit_cell = gemmi.UnitCell((nx + margin) * vx, (ny + margin) * vy, (nz + margin) * vz, 90, 90, 90)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(nx + margin, ny + margin, nz + margin)
    dc.put_model_density_on_grid(st[0])
    arr = np.array(dc.grid, copy=False)  # (x, y, z)
    return np.transpose(arr[:nx, :ny, :nz], (2, 1, 0))


def test_point_map_equals_gemmi_density_calculator_3ajo(shared_data):
    model = mm.read_model(shared_data / "emd20026_apoferritin" / "3ajo_fitted_refined.pdb")
    grid = mm.Grid.around_positions(model.atoms.positions, 1.0, 5.0)
    ours = np.asarray(mm.render_model(model.atoms, grid, 0.0, sampling="point"))
    theirs = _gemmi_point_map(model.structure, grid)
    assert ours.shape == theirs.shape
    rel = np.max(np.abs(ours - theirs)) / theirs.max()
    assert rel <= 1e-3, rel
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99999


@pytest.mark.x64
def test_gradients_of_cc_loss_equal_float64_central_differences():
    model = model_from_structure(ideal_peptide("AGAA"), dtype=jnp.float64)
    atoms = model.atoms
    grid = mm.Grid.around_positions(atoms.positions, 0.8, 4.0)
    table = mm.get_table("electron", dtype=jnp.float64)
    rng = np.random.default_rng(5)
    shifted = eqx.tree_at(lambda a: a.positions, atoms, atoms.positions + rng.normal(0, 0.3, atoms.positions.shape))
    render_fn = mm.GaussianMixtureRenderFn(grid, n_sigma=8.0)
    target = render_fn(mm.GaussianMixtureVolume.from_atoms(shifted, math.sqrt(30.0 / 4), table))
    render_fn = render_fn.with_plan(mm.GaussianMixtureVolume.from_atoms(atoms, math.sqrt(30.0 / 4), table), b_margin=1.0)
    atoms = eqx.tree_at(lambda a: a.occupancies, atoms, jnp.linspace(0.5, 1.0, atoms.n_atoms))

    def loss(a):
        return -cc(render_fn(mm.GaussianMixtureVolume.from_atoms(a, math.sqrt(30.0 / 4), table)), target)

    assert_gradients_match_central_differences(
        loss,
        atoms,
        {
            "positions": [(0, 0), (3, 1), (7, 2), (12, 0), (18, 2)],
            "b_factors": [(0,), (5,), (11,)],
            "occupancies": [(2,), (9,), (17,)],
        },
    )


def test_jit_vmap_and_plain_call_agree():
    atoms = _atoms(dtype=np.float32, centre=(5.0, 5.0, 5.0))
    grid = mm.Grid((14, 13, 12), 0.9)
    vol = mm.GaussianMixtureVolume.from_atoms(atoms, math.sqrt(5.0 / 4))
    render_fn = mm.GaussianMixtureRenderFn(grid).with_plan(vol)
    plain = np.asarray(render_fn(vol))
    jitted = np.asarray(eqx.filter_jit(lambda r, v: r(v))(render_fn, vol))
    np.testing.assert_allclose(jitted, plain, rtol=1e-5, atol=1e-6 * plain.max())
    shifts = jnp.asarray([[0.0, 0, 0], [0.3, -0.2, 0.1], [-0.4, 0.5, 0.25]], jnp.float32)
    batch = eqx.tree_at(lambda v: v.positions, vol, vol.positions[None] + shifts[:, None, :])
    in_axes = eqx.tree_at(lambda v: v.positions, jax.tree.map(lambda _: None, vol), 0, is_leaf=lambda x: x is None)
    maps = np.asarray(jax.vmap(render_fn, in_axes=(in_axes,))(batch))
    for i in range(3):
        one = eqx.tree_at(lambda v: v.positions, vol, vol.positions + shifts[i])
        np.testing.assert_allclose(maps[i], np.asarray(render_fn(one)), rtol=1e-5, atol=1e-6 * plain.max())


@pytest.mark.x64
def test_atoms_near_and_beyond_the_edges():
    """A crop rendered directly equals the same crop of a larger map (padding logic)."""
    atoms = _atoms(n=3, dtype=np.float64, centre=(0.0, 0.0, 0.0), b=(10.0, 30.0, 60.0))
    far = mm.Atoms(jnp.asarray([[40.0, 0, 0]]), [8], jnp.asarray([20.0]), jnp.asarray([1.0]))
    both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), atoms, far)
    table = mm.get_table("electron", dtype=jnp.float64)
    big = mm.Grid((30, 30, 30), 1.0, (-15.0, -15.0, -15.0))
    small = mm.Grid((8, 9, 10), 1.0, (-1.0, -3.0, 0.0))  # cuts through the atoms
    vol = mm.GaussianMixtureVolume.from_atoms(both, 0.0, table)
    m_big = np.asarray(mm.GaussianMixtureRenderFn(big)(vol))
    m_small = np.asarray(mm.GaussianMixtureRenderFn(small)(vol))
    np.testing.assert_allclose(m_small, m_big[15:23, 12:21, 14:24], atol=1e-12)


@pytest.mark.x64
def test_ensemble_renders_the_mean_map():
    st = ideal_peptide("AAA")
    a = model_from_structure(st, dtype=jnp.float64).atoms
    b = eqx.tree_at(lambda x: x.positions, a, a.positions + jnp.asarray([0.7, 0.0, -0.3]))
    ens = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), a, b)
    grid = mm.Grid.around_positions(ens.positions, 1.0, 4.0)
    render = lambda atoms: np.asarray(mm.render_model(atoms, grid, 2.0))  # noqa: E731
    np.testing.assert_allclose(render(mm.Ensemble(ens)), 0.5 * (render(a) + render(b)), atol=1e-12)
    # a stacked Atoms is not averaged silently: it must say which it is
    with pytest.raises(mm.InvalidAtomsError, match="Ensemble"):
        mm.render_model(ens, grid, 2.0)


def test_wider_gaussian_than_planned_is_an_error():
    atoms = _atoms(dtype=np.float32)
    grid = mm.Grid((12, 12, 12), 1.0)
    vol = mm.GaussianMixtureVolume.from_atoms(atoms)
    render_fn = mm.GaussianMixtureRenderFn(grid).with_plan(vol, b_margin=10.0)
    wider = mm.GaussianMixtureVolume.from_atoms(eqx.tree_at(lambda a: a.b_factors, atoms, atoms.b_factors + 9.0))
    render_fn(wider)  # within the margin
    too_wide = mm.GaussianMixtureVolume.from_atoms(eqx.tree_at(lambda a: a.b_factors, atoms, atoms.b_factors + 30.0))
    with pytest.raises(Exception, match="wider than the window"):
        eqx.filter_jit(lambda r, v: r(v))(render_fn, too_wide).block_until_ready()


def test_unplanned_render_under_jit_says_what_to_do():
    atoms = _atoms(dtype=np.float32)
    vol = mm.GaussianMixtureVolume.from_atoms(atoms)
    render_fn = mm.GaussianMixtureRenderFn(mm.Grid((8, 8, 8), 1.0))
    with pytest.raises(ValueError, match=r"with_plan.*with_bounds"):
        jax.jit(lambda v: render_fn(v))(vol)


def test_zero_width_gaussian_is_refused():
    atoms = mm.Atoms(jnp.zeros((1, 3)), [6], jnp.zeros(1), jnp.ones(1))
    with pytest.raises(ValueError, match="positive variance"):
        mm.render_model(atoms, mm.Grid((8, 8, 8), 1.0, (-4.0, -4.0, -4.0)), 0.0, table="xray")


def test_resolution_blur_is_molmap_sigma():
    # B = 4 D^2  <=>  sigma = D / (pi sqrt 2) = 0.225 D
    for d in (2.0, 3.5, 6.0):
        sigma = math.sqrt(mm.resolution_to_blur(d) / (8 * math.pi**2))
        assert sigma == pytest.approx(d / (math.pi * math.sqrt(2)), rel=1e-12)
    with pytest.raises(ValueError):
        mm.resolution_to_blur(-1.0)


def test_refit_moves_sources_into_spare_windows_without_recompiling():
    """`WindowPlan.with_spare` + `refit` (what refinement does when B outgrows its plan): the
    re-dealt plan keeps every shape, so a compiled render runs it without recompiling, renders
    the map of a fresh plan, and is None when the spare slots are too few."""
    from modelmap.render._windows import WindowPlan

    rng = np.random.default_rng(3)
    n = 40
    grid = mm.Grid((24, 24, 24), 1.0)
    atoms = mm.Atoms(jnp.asarray(rng.uniform(6.0, 18.0, (n, 3)), jnp.float32), np.full(n, 6),
                     jnp.full(n, 20.0, jnp.float32), jnp.ones(n, jnp.float32))
    vol = mm.GaussianMixtureVolume.from_atoms(atoms)
    fn = mm.GaussianMixtureRenderFn(grid, max_buckets=None).with_plan(vol)
    wide = mm.GaussianMixtureRenderFn(grid).with_plan(eqx.tree_at(lambda v: v.b_factors, vol, jnp.full(n, 150.0)))
    spare_width = max(b.half_width for b in wide.plan.buckets)
    old = eqx.tree_at(lambda f: f.plan, fn, fn.plan.with_spare(spare_width, 8))

    grown_b = np.full(n, 20.0, np.float32)
    grown_b[:5] = 140.0  # five atoms outgrow their windows
    grown = eqx.tree_at(lambda v: v.b_factors, vol, jnp.asarray(grown_b))
    fresh = mm.GaussianMixtureRenderFn(grid, max_buckets=None).with_plan(grown)
    refit = old.plan.refit(grid, fresh.plan)
    assert refit is not None
    shapes = lambda p: [(b.half_width, b.indices.shape, b.mask.shape) for b in p.buckets]
    assert shapes(refit) == shapes(old.plan) and refit.pad == old.plan.pad
    assert np.all(np.asarray(refit.max_variance)[:5] >= np.asarray(fresh.plan.max_variance)[:5])

    render = eqx.filter_jit(lambda f, v: f(v))
    render(old, vol)
    before = render._cached._cache_size()
    with pytest.raises(Exception, match="wider than the window"):
        render(old, grown).block_until_ready()  # the old windows do not hold them
    refitted = eqx.tree_at(lambda f: f.plan, old, refit)
    got = np.asarray(render(refitted, grown))
    assert render._cached._cache_size() == before  # same shapes: no new compilation
    want = np.asarray(fresh(grown))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())

    too_many = np.full(n, 140.0, np.float32)  # 40 wide windows, 8 spare slots
    fresh_all = mm.GaussianMixtureRenderFn(grid, max_buckets=None).with_plan(
        eqx.tree_at(lambda v: v.b_factors, vol, jnp.asarray(too_many)))
    assert old.plan.refit(grid, fresh_all.plan) is None
    assert isinstance(refit, WindowPlan)


def test_free_mixture_from_numpy_plans_on_the_host_and_renders_as_from_jax():
    """`from_gaussians` of numpy arrays keeps numpy leaves (window planning then runs on the host,
    compiling nothing); its map equals the map of the same mixture given as JAX arrays."""
    rng = np.random.default_rng(1)
    pos = (4.0 + rng.uniform(-2.0, 2.0, size=(4, 3))).astype(np.float32)
    amp = rng.uniform(0.5, 2.0, size=(4, 2)).astype(np.float32)
    var = rng.uniform(0.2, 0.8, size=(4, 2)).astype(np.float32)
    host = mm.GaussianMixtureVolume.from_gaussians(pos, amp, var)
    dev = mm.GaussianMixtureVolume.from_gaussians(jnp.asarray(pos), jnp.asarray(amp), jnp.asarray(var))
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host))
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(dev))
    grid = mm.Grid((12, 12, 12), 0.7, (0.0, 0.0, 0.0))
    fn = mm.GaussianMixtureRenderFn(grid).with_plan(host)
    a, b = np.asarray(fn(host)), np.asarray(fn(dev))
    assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(b))
    np.testing.assert_allclose(np.asarray(host.gaussian_variances()), var, rtol=1e-6)
