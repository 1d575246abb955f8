"""Batches (one map per structure), poses and ensembles: equal to one-at-a-time renders, with
gradients, one compilation per bucket size, and clear errors for bad input."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import modelmap as mm
from modelmap._peptide import ideal_peptide
from modelmap.batch import (
    assemble,
    bucket_size,
    member_count,
    pad_atoms,
    plan_batch,
    render_batch,
    render_poses,
    render_stacked,
)
from modelmap.io import model_from_structure

from ._reference import cc

METHODS = [("gaussian", 1.5), ("fourier", 4.0), ("shells", 4.0)]
BUCKET = 32  # the smallest bucket size in these tests (small structures)


def _peptide(seq, shift=(0.0, 0.0, 0.0), b=20.0, dtype=jnp.float32):
    atoms = model_from_structure(ideal_peptide(seq, b_factor=b), dtype=dtype).atoms
    return eqx.tree_at(lambda a: a.positions, atoms, atoms.positions + jnp.asarray(shift, dtype))


def _structures(dtype=jnp.float32):
    # 24, 30 and 100 atoms: two share a bucket (32 with BUCKET = 32), one needs another (112)
    return [_peptide("AAGAA", (1.0, -2.0, 0.5), 25.0, dtype), _peptide("AAAAAA", (30.0, 5.0, -3.0), 40.0, dtype),
            _peptide("A" * 20, (-8.0, 0.0, 12.0), 30.0, dtype)]


@pytest.mark.parametrize("method, d", METHODS)
def test_batched_maps_equal_one_at_a_time_maps(method, d):
    structures = _structures()
    out = render_batch(structures, d, method=method, box=40, voxel_size=1.5, batch_size=2, bucket_minimum=BUCKET)
    assert out.maps.shape == (3, 40, 40, 40)
    for k, s in enumerate(structures):
        # the same render function on the structure alone, unpadded, on its own grid
        grid = out.grid(k)
        groups = plan_batch([s], d, method=method, box=40, voxel_size=1.5, bucket_minimum=BUCKET)
        np.testing.assert_allclose(groups[0].origins[0], out.origins[k])
        alone = render_stacked(groups[0].render_fn, groups[0].volumes)[0]
        peak = float(jnp.max(jnp.abs(alone)))
        # (the Fourier route's anti-aliasing blur comes from each batch's own lowest B: two batches
        # give the map to its accuracy, eps 1e-5, not to rounding)
        assert float(jnp.max(jnp.abs(out.maps[k] - alone))) <= (2e-5 if method == "fourier" else 1e-6) * peak
        # and the renderer's own map of the structure on that grid (planned for it alone): equal to
        # the bounds' wider windows (Gaussian, shells: 1e-6 / 3e-6 of the peak) or to the NUFFT map
        # (the batch's Fourier map is the pure-JAX splat route, eps 1e-5)
        ref = mm.render_model(s, grid, d, method=method, sampling="average" if method == "gaussian" else "point")
        tol = {"gaussian": 2e-6, "fourier": 2e-5, "shells": 5e-6}[method]
        assert float(jnp.max(jnp.abs(out.maps[k] - ref))) <= tol * float(jnp.max(jnp.abs(ref)))
        # the origin is a whole number of voxels and the box holds the structure
        assert np.allclose(out.origins[k] / 1.5, np.round(out.origins[k] / 1.5))


def test_padding_atoms_contribute_exactly_zero():
    s = _structures()[0]
    groups = plan_batch([s], 1.5, box=40, voxel_size=1.5)  # padded to 256
    order = groups[0].atom_index[0][groups[0].atom_index[0] >= 0]  # the batch's atom order (by width)
    padded = pad_atoms(jax.tree.map(lambda x: x[order], s), 512)
    vol = mm.GaussianMixtureVolume.from_atoms(
        eqx.tree_at(lambda a: a.positions, padded, padded.positions - jnp.asarray(groups[0].origins[0], jnp.float32)), 1.5)
    a = groups[0].render_fn(jax.tree.map(lambda x: x[0], groups[0].volumes))
    b = groups[0].render_fn(vol)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-7 * float(jnp.max(a))
    assert bucket_size(100) == 256 and bucket_size(300) == 320 and bucket_size(385) == 448
    assert bucket_size(1000, 32) == 1024 and bucket_size(1025, 32) == 1280


def test_one_compilation_per_bucket():
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    structures = _structures()
    more = [_peptide("AAGA", (3.0, 1.0, 0.0), 22.0), _peptide("AAAAA", (0.0, 9.0, 2.0), 45.0),
            _peptide("A" * 22, (5.0, 5.0, 5.0), 33.0)]
    # a box no other test uses, so nothing is compiled yet
    g1 = plan_batch(structures, 1.5, box=36, voxel_size=1.5, bucket_minimum=BUCKET)
    # other structures, the same bucket sizes (32, 112) and B class (B <= 50 Å²)
    g2 = plan_batch(more, 1.5, box=36, voxel_size=1.5, bucket_minimum=BUCKET)
    assert [len(g.indices) for g in g1] == [2, 1] and [len(g.indices) for g in g2] == [2, 1]
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for g in g1:
            render_stacked(g.render_fn, g.volumes, 2).block_until_ready()
        first = len(compiles)
        for g in g2:
            render_stacked(g.render_fn, g.volumes, 2).block_until_ready()
    finally:
        jax.monitoring.clear_event_listeners()
    assert first == 2  # one per group (bucket size, B class)
    assert len(compiles) == first  # a new batch of the same buckets and bounds reuses them


def test_a_new_count_of_structures_in_a_bucket_compiles_nothing_new():
    """Groups are padded to 1, 2, 3, 4, 6, 8, … members with silent ones: a batch of 5 after a
    batch of 6 (both padded to 6) compiles nothing, and the padding members' maps are dropped."""
    assert [member_count(m) for m in (1, 2, 3, 4, 5, 6, 7, 9, 13, 17, 25)] == [1, 2, 3, 4, 6, 6, 8, 12, 16, 24, 32]
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    peptides = [_peptide("AAG"[: 2 + k % 2] + "A", (2.0 * k, 1.0, 0.0), 20.0 + 3 * k) for k in range(6)]
    six = plan_batch(peptides, 1.5, box=34, voxel_size=1.5, bucket_minimum=BUCKET)  # a box no other test uses
    five = plan_batch(peptides[1:], 1.5, box=34, voxel_size=1.5, bucket_minimum=BUCKET)
    exact = plan_batch(peptides[1:], 1.5, box=34, voxel_size=1.5, bucket_minimum=BUCKET, pad_members=False)
    assert [len(g.indices) for g in five] == [5] and five[0].volumes.positions.shape[0] == 6
    assert exact[0].volumes.positions.shape[0] == 5
    assert np.all(five[0].atom_index[5] == -1) and five[0].origins.shape == (5, 3)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        render_stacked(six[0].render_fn, six[0].volumes, 1).block_until_ready()
        first = len(compiles)
        padded = render_stacked(five[0].render_fn, five[0].volumes, 1)
    finally:
        jax.monitoring.clear_event_listeners()
    assert first > 0 and len(compiles) == first
    assert float(jnp.abs(padded[5]).max()) == 0.0  # the silent member's map
    maps = assemble(five, [padded], 5)
    want = assemble(exact, [render_stacked(exact[0].render_fn, exact[0].volumes, 1)], 5)
    np.testing.assert_array_equal(np.asarray(maps), np.asarray(want))


@pytest.mark.x64
def test_gradients_through_a_batch_equal_per_structure_gradients():
    structures = _structures(jnp.float64)[:2]
    (group,) = plan_batch(structures, 1.5, box=32, voxel_size=1.5, bucket_minimum=BUCKET)
    rng = np.random.default_rng(0)
    targets = jnp.asarray(rng.normal(size=(2, 32, 32, 32)))

    def batch_loss(volumes):
        maps = render_stacked(group.render_fn, volumes, batch_size=1)
        return sum(-cc(maps[k], targets[k]) for k in range(2))

    grads = eqx.filter_grad(batch_loss)(group.volumes)
    for k in range(2):
        one = jax.tree.map(lambda x: x[k], group.volumes)
        g = eqx.filter_grad(lambda v: -cc(group.render_fn(v), targets[k]))(one)
        np.testing.assert_allclose(np.asarray(grads.positions[k]), np.asarray(g.positions), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grads.b_factors[k]), np.asarray(g.b_factors), rtol=1e-9, atol=1e-12)
    # float64 central differences through the whole batch
    loss = eqx.filter_jit(batch_loss)
    h = 1e-5
    for leaf, idx in (("positions", (1, 3, 0)), ("b_factors", (0, 7)), ("occupancies", (1, 2))):
        arr = getattr(group.volumes, leaf)

        def at(delta, leaf=leaf, idx=idx, arr=arr):
            return float(loss(eqx.tree_at(lambda v: getattr(v, leaf), group.volumes, arr.at[idx].add(delta))))

        fd = (at(h) - at(-h)) / (2 * h)
        g = float(getattr(grads, leaf)[idx])
        assert abs(g - fd) <= 1e-6 * max(1e-8, float(jnp.max(jnp.abs(getattr(grads, leaf))))), (leaf, g, fd)


def test_shared_grid_batch():
    structures = _structures()[:2]
    grid = mm.Grid.around_positions(jnp.concatenate([s.positions for s in structures]), 1.5, 5.0)
    out = render_batch(structures, 2.0, grid=grid, bucket_minimum=BUCKET)
    for k, s in enumerate(structures):
        ref = mm.render_model(s, grid, 2.0)
        assert float(jnp.max(jnp.abs(out.maps[k] - ref))) <= 2e-6 * float(jnp.max(ref))
        assert out.grid(k) == grid


def test_bad_batches_are_clear_errors():
    s = _structures()
    empty = mm.Atoms(jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(mm.InvalidAtomsError, match="structure 1 has no atoms"):
        render_batch([s[0], empty], 2.0, box=40)
    with pytest.raises(mm.InvalidAtomsError, match=r"structure 2 spans .* more than the box of 16 x 16 x 16"):
        render_batch(s, 2.0, box=16, voxel_size=1.0)
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), s[0], s[0])
    with pytest.raises(mm.InvalidAtomsError, match="Ensemble"):
        render_batch([stacked], 2.0, box=40)
    nan = eqx.tree_at(lambda a: a.positions, s[0], s[0].positions.at[2, 1].set(jnp.nan))
    with pytest.raises(mm.InvalidAtomsError, match="structure 0"):
        render_batch([nan], 2.0, box=40)
    with pytest.raises(ValueError, match="either a shared grid or a box"):
        render_batch(s, 2.0)


def test_a_structure_of_mixed_b_is_sorted_so_its_cold_chunks_get_narrow_windows():
    a = _peptide("A" * 24, b=160.0)
    mixed = eqx.tree_at(lambda x: x.b_factors, a, a.b_factors.at[::2].set(20.0))  # 60 cold, 60 hot, interleaved
    (group,) = plan_batch([mixed], 2.0, box=40, voxel_size=1.5, bucket_minimum=BUCKET)
    order = group.atom_index[0]
    assert sorted(order[order >= 0].tolist()) == list(range(120))
    np.testing.assert_array_equal(np.asarray(mixed.b_factors)[order[:60]], 20.0)  # the cold atoms first
    # each chunk gets the window of its widest atom: in chunks of 32, the first, cold, a narrower one
    fn, v = group.render_fn, jax.tree.map(lambda x: x[0], group.volumes)
    plan = dataclasses.replace(fn.plan, chunk_size=32).resolve(fn.grid, v.positions.shape[0])
    chosen = np.asarray(plan.fit_chunks(fn.grid, plan.n_sigma * jnp.sqrt(v.gaussian_variances().max(-1)))
                        .buckets[0].chunk_class)
    assert chosen[0] < chosen[1]
    out = render_batch([mixed], 2.0, box=40, voxel_size=1.5, bucket_minimum=BUCKET)
    ref = mm.render_model(mixed, out.grid(0), 2.0)
    assert float(jnp.max(jnp.abs(out.maps[0] - ref))) <= 2e-6 * float(jnp.max(ref))
    # gradients with respect to the sorted slots map back to the structure's atoms by atom_index
    target = mm.render_model(eqx.tree_at(lambda x: x.positions, mixed, mixed.positions + 0.2), out.grid(0), 2.0)
    grads = eqx.filter_grad(lambda vols: -cc(render_stacked(fn, vols)[0], target))(group.volumes)
    live = order >= 0
    g_pos = np.zeros((120, 3))
    g_pos[order[live]] = np.asarray(grads.positions[0])[live]
    fn_ref = mm.GaussianMixtureRenderFn(out.grid(0)).with_plan(mm.GaussianMixtureVolume.from_atoms(mixed, 2.0))
    ref_g = eqx.filter_grad(lambda v: -cc(fn_ref(v), target))(mm.GaussianMixtureVolume.from_atoms(mixed, 2.0))
    np.testing.assert_allclose(g_pos, np.asarray(ref_g.positions), atol=2e-3 * float(np.abs(ref_g.positions).max()))


def test_structures_are_grouped_by_size_alone():
    cold, hot = _peptide("AAGAA", b=20.0), _peptide("AAGAA", (2.0, 0, 0), b=140.0)
    groups = plan_batch([cold, hot, cold, _peptide("A" * 20)], 2.0, box=40, voxel_size=1.5, bucket_minimum=BUCKET)
    # one render function for the batch; a cold structure's windows come from its own atoms
    assert [g.indices for g in groups] == [(0, 1, 2), (3,)]
    assert groups[0].render_fn is groups[1].render_fn
    out = render_batch([cold, hot, cold], 2.0, box=40, voxel_size=1.5, bucket_minimum=BUCKET)
    for k, s in enumerate([cold, hot, cold]):
        ref = mm.render_model(s, out.grid(k), 2.0)
        assert float(jnp.max(jnp.abs(out.maps[k] - ref))) <= 2e-6 * float(jnp.max(ref))


# ---- poses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method, d", METHODS)
def test_rotated_volume_equals_the_rotated_model(method, d):
    atoms = _peptide("AAGAAA", (2.0, 1.0, -1.0))
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 12.0)
    r = jnp.asarray(Rotation.from_euler("zyz", [30, 50, -20], degrees=True).as_matrix(), jnp.float32)
    centre = jnp.mean(atoms.positions, axis=0)
    moved = eqx.tree_at(lambda a: a.positions, atoms, (atoms.positions - centre) @ r.T + centre)
    volume_cls = {"gaussian": mm.GaussianMixtureVolume, "fourier": mm.IndependentAtomVolume,
                  "shells": mm.ShellDecompositionVolume}[method]
    fn = {"gaussian": mm.GaussianMixtureRenderFn(grid), "fourier": mm.SplatFourierRenderFn(grid),
          "shells": mm.ShellRenderFn(grid)}[method]
    fn = fn.with_bounds(mm.RenderBounds((0, 100), d, elements=[6, 7, 8]))
    posed = fn(volume_cls.from_atoms(atoms, d).rotate_to_pose(r))
    ref = fn(volume_cls.from_atoms(moved, d))
    assert float(jnp.max(jnp.abs(posed - ref))) <= 1e-6 * float(jnp.max(jnp.abs(ref)))


def test_a_batch_of_poses_is_one_call_equal_to_a_loop():
    atoms = _peptide("AAGAAA")
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 10.0)
    volume = mm.GaussianMixtureVolume.from_atoms(atoms, 2.0)
    fn = mm.GaussianMixtureRenderFn(grid).with_bounds(mm.RenderBounds((0, 60), 2.0, elements=[6, 7, 8]))
    angles = np.array([[0.0, 0.0, 0.0], [30.0, 60.0, 90.0], [-120.0, 150.0, 10.0]])
    rots = mm.euler_to_matrix(*angles.T)
    shifts = jnp.asarray([[0.0, 0, 0], [1.0, -0.5, 0.25], [0.0, 2.0, 0.0]], jnp.float32)
    maps = render_poses(fn, volume, rots, shifts, batch_size=2)
    for p in range(3):
        one = fn(volume.rotate_to_pose(rots[p]).translate_to_pose(shifts[p]))
        assert float(jnp.max(jnp.abs(maps[p] - one))) <= 1e-6 * float(jnp.max(one))
    # quaternions give the same poses (w, x, y, z)
    quats = jnp.asarray(Rotation.from_matrix(np.asarray(rots, np.float64)).as_quat()[:, [3, 0, 1, 2]], jnp.float32)
    by_quat = render_poses(fn, volume, quats, shifts)
    assert float(jnp.max(jnp.abs(by_quat - maps))) <= 1e-5 * float(jnp.max(maps))


def test_nan_in_a_pose_is_an_error():
    atoms = _peptide("AAA")
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 6.0)
    volume = mm.GaussianMixtureVolume.from_atoms(atoms, 2.0)
    fn = mm.GaussianMixtureRenderFn(grid).with_bounds(mm.RenderBounds((0, 60), 2.0, elements=[6, 7, 8]))
    bad = jnp.eye(3).at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        volume.rotate_to_pose(bad)
    with pytest.raises(ValueError, match="NaN"):
        volume.translate_to_pose(jnp.asarray([0.0, jnp.nan, 0.0]))
    with pytest.raises(Exception, match="NaN"):
        render_poses(fn, volume, jnp.stack([jnp.eye(3), bad])).block_until_ready()


# ---- ensembles -------------------------------------------------------------------------------


def _ensemble(dtype=jnp.float32):
    a = _peptide("AAGAA", dtype=dtype)
    b = eqx.tree_at(lambda x: (x.positions, x.b_factors), a, (a.positions + jnp.asarray([0.7, 0.0, -0.3], dtype),
                                                             a.b_factors + 15.0))
    c = eqx.tree_at(lambda x: x.positions, a, a.positions + jnp.asarray([-0.4, 0.5, 0.2], dtype))
    return [a, b, c], jax.tree.map(lambda *x: jnp.stack(x), a, b, c)


@pytest.mark.parametrize("method, d", METHODS)
def test_ensemble_map_is_the_weighted_mean_of_members(method, d):
    members, stacked = _ensemble()
    grid = mm.Grid.around_positions(stacked.positions, 1.0, 8.0)
    w = jnp.asarray([1.0, 2.0, 0.5])
    sampling = "average" if method == "gaussian" else "point"
    maps = [mm.render_model(m, grid, d, method=method, sampling=sampling) for m in members]
    mean = sum(wi * m for wi, m in zip(w, maps)) / jnp.sum(w)
    ens = mm.render_model(mm.Ensemble(stacked, w), grid, d, method=method, sampling=sampling)
    assert float(jnp.max(jnp.abs(ens - mean))) <= 2e-6 * float(jnp.max(jnp.abs(mean)))


@pytest.mark.x64
def test_ensemble_weight_gradient_equals_central_differences():
    _, stacked = _ensemble(jnp.float64)
    grid = mm.Grid.around_positions(stacked.positions, 1.0, 6.0)
    target = mm.render_model(jax.tree.map(lambda x: x[1], stacked), grid, 2.0)
    fn = mm.GaussianMixtureRenderFn(grid).with_bounds(mm.RenderBounds((0, 60), 2.0, elements=[6, 7, 8]))

    def loss(w):
        return -cc(fn(mm.GaussianMixtureVolume.from_atoms(mm.Ensemble(stacked, w), 2.0)), target)

    w0 = jnp.asarray([1.0, 1.0, 1.0])
    g = jax.grad(loss)(w0)
    assert float(g[1]) < 0  # more weight on the member the target was made of raises the CC
    h = 1e-6
    for i in range(3):
        fd = (loss(w0.at[i].add(h)) - loss(w0.at[i].add(-h))) / (2 * h)
        assert abs(float(g[i]) - float(fd)) <= 1e-6 * float(jnp.max(jnp.abs(g)))


def test_ensemble_members_must_share_their_atoms():
    members, stacked = _ensemble()
    other = eqx.tree_at(lambda a: a.atomic_numbers, stacked, stacked.atomic_numbers.at[2, 0].set(8))
    with pytest.raises(mm.InvalidAtomsError, match="member 2 has different atoms"):
        mm.Ensemble(other)
    with pytest.raises(mm.InvalidAtomsError, match="3 weights"):
        mm.Ensemble(stacked, [1.0, 2.0])
    with pytest.raises(mm.InvalidAtomsError, match="not all 0"):
        mm.Ensemble(stacked, [0.0, 0.0, 0.0])


def _write_multimodel(path, n_models=3, mismatch=False):
    import gemmi

    st = ideal_peptide("AAGA")
    clones = [st[0].clone() for _ in range(1, n_models)]  # before add_model, which may move st[0]
    for k, m in enumerate(clones, start=1):
        m.num = k + 1
        for ch in m:
            for res in ch:
                for atom in res:
                    atom.pos = gemmi.Position(atom.pos.x + 0.3 * k, atom.pos.y, atom.pos.z - 0.2 * k)
        if mismatch and k == n_models - 1:
            m[0][0].remove_atom(m[0][0][0].name, "\0", m[0][0][0].element)
        st.add_model(m)
    st.setup_entities()
    st.write_pdb(str(path))


def test_cli_renders_the_mean_map_of_a_multi_model_file(tmp_path):
    from typer.testing import CliRunner

    from modelmap.cli import app

    path = tmp_path / "ens.pdb"
    _write_multimodel(path)
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(path), "-d", "3", "-o", str(tmp_path / "all.mrc"), "--no-cxc"])
    assert res.exit_code == 0, res.output
    assert "3 models × 19 atoms = 57 atoms; rendering the mean map of 3 models" in res.output
    res = runner.invoke(app, ["render", str(path), "-d", "3", "-o", str(tmp_path / "two.mrc"), "--no-cxc",
                              "--models", "1,3", "--like", str(tmp_path / "all.mrc")])
    assert res.exit_code == 0, res.output
    assert "rendering the mean map of 2 models (--models 1,3)" in res.output
    model = mm.read_model(path)
    grid = mm.read_map(tmp_path / "all.mrc").grid
    one = [mm.render_model(jax.tree.map(lambda x: x[k], model.atoms), grid, 3.0, sampling="point")  # the CLI default
           for k in range(3)]
    got = mm.read_map(tmp_path / "two.mrc").data
    assert np.max(np.abs(got - 0.5 * (one[0] + one[2]))) <= 1e-5 * float(jnp.max(one[0]))
    res = runner.invoke(app, ["render", str(path), "-d", "3", "-o", str(tmp_path / "m2.mrc"), "--no-cxc",
                              "--models", "2", "--like", str(tmp_path / "all.mrc")])
    assert res.exit_code == 0, res.output
    assert np.max(np.abs(mm.read_map(tmp_path / "m2.mrc").data - one[1])) <= 1e-5 * float(jnp.max(one[1]))
    res = runner.invoke(app, ["render", str(path), "-d", "3", "-o", str(tmp_path / "x.mrc"), "--models", "7"])
    assert res.exit_code != 0 and "no model(s) [7]" in res.output
    bad = tmp_path / "bad.pdb"
    _write_multimodel(bad, mismatch=True)
    res = runner.invoke(app, ["render", str(bad), "-d", "3", "-o", str(tmp_path / "y.mrc")])
    assert res.exit_code != 0 and "different atoms" in res.output


def test_dataclass_replace_keeps_render_functions_usable():
    # the accumulate switch is a static option a user may flip on a planned function
    grid = mm.Grid((8, 8, 8), 1.0)
    fn = mm.GaussianMixtureRenderFn(grid).with_bounds(mm.RenderBounds((0, 50), 2.0, elements=[6]))
    assert dataclasses.replace(fn, accumulate="scatter").is_planned


def test_gradients_of_a_new_batch_of_seen_group_shapes_compile_nothing():
    """The training-loop pattern of docs/how-to/batch.md: value_and_grad of a loss over the groups,
    without a jit around them, reuses each group's compiled functions for a new batch."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def batch(seqs, k0):
        return [_peptide(s, (2.0 * (k0 + k), 0.0, 0.0), 20.0 + k0 + k) for k, s in enumerate(seqs)]

    def value_and_grad(structures):
        groups = plan_batch(structures, 2.0, box=30, voxel_size=1.5, bucket_minimum=BUCKET)  # a box of its own

        def loss(volumes):
            return sum(jnp.sum(render_stacked(g.render_fn, v, 1) ** 2) for g, v in zip(groups, volumes))

        return jax.block_until_ready(eqx.filter_value_and_grad(loss)([g.volumes for g in groups]))

    value_and_grad(batch(["AAA", "AAG", "A" * 8], 0))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        value, grads = value_and_grad(batch(["GAA", "A" * 8, "AGA"], 3))  # other structures, the same group shapes
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == [] and np.isfinite(float(value))

