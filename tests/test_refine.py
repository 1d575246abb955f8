"""Refinement: the map terms, the splatted Fourier map, and synthetic recovery of coordinates, B,
occupancy, per-atom resolution and rigid-body motion (small models, fast on CPU). The full 7CEC
chain A cases of the issue are in `benchmarks/bench_refine.py`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("biotite")
pytest.importorskip("jax_finufft")

import modelmap as mm  # noqa: E402
from modelmap import Atoms, Grid, IndependentAtomVolume, NufftRenderFn, ShellRenderFn  # noqa: E402
from modelmap._peptide import ideal_peptide  # noqa: E402
from modelmap.io import model_from_structure  # noqa: E402
from modelmap.refine import build_restraints, cc_loss, least_squares_loss, masked_cc, refine  # noqa: E402
from modelmap.refine._parameters import rotation as _rotation  # noqa: E402
from modelmap.render import SplatFourierRenderFn  # noqa: E402
from modelmap.volumes import ShellDecompositionVolume  # noqa: E402


def _helix(sequence="AAAAGAAAAAAAGAAA", b=30.0):
    model = model_from_structure(ideal_peptide(sequence, b_factor=b))
    # B varies smoothly along the chain and out to the side chains, as in real models
    res = np.asarray(model.labels.residue_number, np.float64)
    side = ~np.isin(np.asarray(model.labels.atom_name), ["N", "CA", "C", "O"])
    bvals = np.asarray(model.atoms.b_factors) + 2.0 * res + 6.0 * side
    return model.replace(atoms=Atoms(model.atoms.positions, model.atoms.atomic_numbers, bvals,
                                     model.atoms.occupancies))


def _target(model, resolution=3.0, voxel=1.0):
    grid = Grid.around_positions(np.asarray(model.atoms.positions), voxel_size=voxel, padding=6.0)
    vol = IndependentAtomVolume.from_atoms(model.atoms, resolution)
    return grid, NufftRenderFn(grid)(vol)


def _rmsd(a, b):
    return float(np.sqrt(np.mean(np.sum((np.asarray(a) - np.asarray(b)) ** 2, -1))))


# ---- map terms -----------------------------------------------------------------------------

@pytest.mark.x64
def test_least_squares_loss_is_the_fitted_residual():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(6, 7, 8))
    m = 0.3 * t + rng.normal(scale=0.5, size=t.shape) + 2.0
    where = rng.random(t.shape) > 0.3
    # independent reference: numpy least squares for scale and offset over the mask
    A = np.stack([m[where], np.ones(where.sum())], 1)
    coef, res, *_ = np.linalg.lstsq(A, t[where], rcond=None)
    expected = res[0] / np.sum((t[where] - t[where].mean()) ** 2)
    got = float(least_squares_loss(jnp.asarray(m), jnp.asarray(t), jnp.asarray(where)))
    assert got == pytest.approx(expected, rel=1e-10)
    cc = np.corrcoef(m[where], t[where])[0, 1]
    assert got == pytest.approx(1 - cc**2, rel=1e-10)
    assert float(cc_loss(jnp.asarray(m), jnp.asarray(t), jnp.asarray(where))) == pytest.approx(1 - cc, rel=1e-10)
    # the target's scale and offset do not matter
    assert float(least_squares_loss(jnp.asarray(m), jnp.asarray(5 * t - 3), jnp.asarray(where))) == pytest.approx(got, rel=1e-9)
    # a perfect fit up to scale and offset is 0
    assert float(least_squares_loss(jnp.asarray(2 * t + 1), jnp.asarray(t))) == pytest.approx(0, abs=1e-20)
    assert float(masked_cc(jnp.zeros_like(jnp.asarray(t)), jnp.asarray(t))) == 0.0


@pytest.mark.x64
def test_least_squares_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=(5, 5, 5)))
    m = jnp.asarray(rng.normal(size=(5, 5, 5)))
    g = jax.grad(least_squares_loss)(m, t)
    for idx in [(0, 0, 0), (2, 3, 1), (4, 4, 4)]:
        e = jnp.zeros_like(m).at[idx].set(1e-6)
        fd = (least_squares_loss(m + e, t) - least_squares_loss(m - e, t)) / 2e-6
        assert float(g[idx]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


# ---- the splatted Fourier map ----------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["point", "average"])
def test_splat_fourier_map_equals_the_nufft_fourier_map(sampling):
    model = _helix()
    grid = Grid.around_positions(np.asarray(model.atoms.positions), voxel_size=0.9, padding=5.0)
    vol = IndependentAtomVolume.from_atoms(model.atoms, 3.0)
    ref = np.asarray(NufftRenderFn(grid, sampling=sampling, eps=1e-8)(vol))
    out = np.asarray(SplatFourierRenderFn(grid, sampling=sampling)(vol))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    # the X-ray table and a coarser resolution too
    vol_x = IndependentAtomVolume.from_atoms(model.atoms, 4.5, table="xray")
    ref_x = np.asarray(NufftRenderFn(grid, sampling=sampling, eps=1e-8)(vol_x))
    out_x = np.asarray(SplatFourierRenderFn(grid, sampling=sampling)(vol_x))
    assert np.abs(out_x - ref_x).max() <= 1e-4 * np.abs(ref_x).max()


@pytest.mark.x64
def test_splat_fourier_gradients_match_the_nufft_route():
    model = _helix("AAGAA")
    grid = Grid.around_positions(np.asarray(model.atoms.positions), voxel_size=1.0, padding=5.0)
    a = model.atoms
    atoms = Atoms(jnp.asarray(a.positions, jnp.float64), a.atomic_numbers, jnp.asarray(a.b_factors, jnp.float64),
                  jnp.asarray(a.occupancies, jnp.float64))
    vol = IndependentAtomVolume.from_atoms(atoms, 3.0)
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=grid.shape))
    nufft = NufftRenderFn(grid, eps=1e-10).with_plan(vol, b_margin=5)
    splat = SplatFourierRenderFn(grid, eps=1e-7).with_plan(vol, b_margin=5)

    def loss(rf, pos, b):
        v = IndependentAtomVolume(pos, b, vol.occupancies, vol.resolution, vol.atomic_numbers, vol.table)
        return jnp.sum(w * rf(v))

    g_ref = jax.grad(lambda p, b: loss(nufft, p, b), argnums=(0, 1))(vol.positions, vol.b_factors)
    g = jax.grad(lambda p, b: loss(splat, p, b), argnums=(0, 1))(vol.positions, vol.b_factors)
    for x, y in zip(g, g_ref):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-5 * np.abs(np.asarray(y)).max()


def test_splat_fourier_refuses_nyquist_and_traced_planning():
    grid = Grid((10, 10, 10), 1.0)
    with pytest.raises(ValueError, match="Nyquist"):
        SplatFourierRenderFn(grid).with_plan(IndependentAtomVolume.from_atoms(Atoms(jnp.ones((1, 3)) * 5, [6], [20.0]), 2.0))
    vol = IndependentAtomVolume.from_atoms(Atoms(jnp.ones((1, 3)) * 5, [6], [20.0]), 3.0)
    with pytest.raises(ValueError, match="with_plan"):
        jax.jit(lambda v: SplatFourierRenderFn(grid)(v))(vol)


@pytest.mark.x64
def test_rotation_is_rodrigues():
    from scipy.spatial.transform import Rotation

    v = np.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [1e-9, 0, 0], [2.0, 1.0, -0.5]])
    r = np.asarray(_rotation(jnp.asarray(v, jnp.float64)))
    np.testing.assert_allclose(r, Rotation.from_rotvec(v).as_matrix(), atol=1e-12)


def test_parameter_units_are_the_gauss_newton_diagonal():
    """`_units` is 1/√(Σ (∂ρ/∂p)²) of each atom's Fourier map, up to one scale per parameter kind.
    Reference: the derivative maps of isolated atoms, by forward-mode AD through the NUFFT map on a
    grid fine enough that the voxel sum is the integral (Parseval)."""
    from modelmap.refine._parameters import units as _units
    from modelmap.scattering import get_table

    z = np.array([6, 8, 16, 7])
    b = np.array([20.0, 60.0, 80.0, 150.0])
    pos = np.array([[0.0, 0.0, 0.0], [22.0, 0.0, 0.0], [0.0, 22.0, 0.0], [22.0, 22.0, 0.0]])
    grid = Grid.around_positions(pos, voxel_size=0.9, padding=11.0)
    vol = IndependentAtomVolume.from_atoms(Atoms(pos, z, b, np.ones(4)), 3.0)
    render = NufftRenderFn(grid).with_plan(vol)
    curv = {"xyz": [], "b": [], "occ": []}
    for i in range(4):
        for key, leaf, tangent in (("b", "b_factors", np.eye(4)[i]), ("occ", "occupancies", np.eye(4)[i]),
                                   ("xyz", "positions", np.eye(4)[i][:, None] * np.array([1.0, 0, 0]))):
            def f(x, leaf=leaf):
                return render(eqx.tree_at(lambda v: getattr(v, leaf), vol, x))
            x0 = getattr(vol, leaf)
            _, dmap = jax.jvp(f, (x0,), (jnp.asarray(tangent, x0.dtype),))
            curv[key].append(float(np.sum(np.asarray(dmap, np.float64) ** 2)))
    got = _units(b, z, 3.0, get_table("electron"), jnp.float32)  # as refine() calls it for a float32 model
    for k, key in enumerate(("xyz", "b", "occ")):
        expected = 1.0 / np.sqrt(curv[key])
        ratio = np.asarray(got[k]) / expected
        assert np.ptp(ratio) / ratio.mean() < 0.02, (key, ratio)


# ---- synthetic recovery ----------------------------------------------------------------------

def test_refine_recovers_coordinates_and_b_of_a_helix():
    model = _helix()
    grid, target = _target(model)
    truth = model.atoms
    rng = np.random.default_rng(3)
    start = Atoms(np.asarray(truth.positions) + rng.normal(0, 0.3, truth.positions.shape), truth.atomic_numbers,
                  np.clip(np.asarray(truth.b_factors) + rng.normal(0, 15, truth.n_atoms), 5, 300), truth.occupancies)
    r = refine(model.replace(atoms=start), target, 3.0, grid=grid, parameters=("xyz", "b"), max_steps=150,
               progress=False)
    assert r.result in ("converged", "max_steps")
    assert _rmsd(start.positions, truth.positions) > 0.45
    assert _rmsd(r.atoms.positions, truth.positions) <= 0.1
    b, bt = np.asarray(r.atoms.b_factors), np.asarray(truth.b_factors)
    assert np.corrcoef(b, bt)[0, 1] >= 0.98 and np.sqrt(np.mean((b - bt) ** 2)) <= 3.0
    restraints = build_restraints(model)
    assert float(restraints.bond_rmsd(r.atoms.positions)) <= 0.02
    assert float(restraints.angle_rmsd(r.atoms.positions)) <= 2.5
    h = r.history
    assert h["map_loss"][-1] < 0.01 * h["map_loss"][0]
    assert f"map loss {h['map_loss'][0]:.4f} -> {h['map_loss'][-1]:.4f}" in r.summary()
    assert h["bond_rmsd"][0] > 0.2 and h["bond_rmsd"][-1] <= 0.02
    # the report counts clashes and moves: the perturbed start has close contacts, the result none
    g = r.geometry
    assert g["clashes_at_start"] > 0 and g["clashes_under_2.2"] == 0 and g["atoms_moved_over_3"] == 0
    assert abs(g["bond_rmsd"] - float(restraints.bond_rmsd(r.atoms.positions))) < 1e-6
    assert r.monomer_library.startswith("CCD")
    assert r.model is not None and r.model.n_atoms == model.n_atoms


def test_joint_refinement_moves_b_as_far_as_the_map_asks():
    """xyz and B together from B 20 Å² too low everywhere: the restraints' stiffness on coordinates
    must not freeze B (the kinds' units are balanced by curvature; before, the demo's helix kept
    its mean B at 20.2 Å² against a target's 40 after 60 steps)."""
    model = _helix()
    grid, target = _target(model)
    truth = model.atoms
    rng = np.random.default_rng(5)
    start = Atoms(np.asarray(truth.positions) + rng.normal(0, 0.2, truth.positions.shape), truth.atomic_numbers,
                  np.asarray(truth.b_factors) - 20.0, truth.occupancies)
    r = refine(model.replace(atoms=start), target, 3.0, grid=grid, parameters=("xyz", "b"), max_steps=30,
               progress=False)
    offset = float(np.mean(np.asarray(r.atoms.b_factors) - np.asarray(truth.b_factors)))
    assert abs(offset) <= 3.0, offset
    assert any("b unit" in e for e in r.events)


def test_refine_b_alone_unrestrained():
    model = _helix()
    grid, target = _target(model)
    truth = model.atoms
    rng = np.random.default_rng(4)
    start = Atoms(truth.positions, truth.atomic_numbers,
                  np.clip(np.asarray(truth.b_factors) + rng.normal(0, 15, truth.n_atoms), 5, 300), truth.occupancies)
    seen = []
    r = refine(start, target, 3.0, grid=grid, parameters=("b",), restraints=False, max_steps=60, progress=False,
               progress_every=1, callback=lambda step, atoms, res: seen.append((step, np.asarray(atoms.b_factors), res)))
    b, bt = np.asarray(r.atoms.b_factors), np.asarray(truth.b_factors)
    # the callback sees the model at every recorded step, starting from the start
    assert [s for s, _, _ in seen] == list(r.history["step"]) and seen[0][2] is None
    np.testing.assert_allclose(seen[0][1], np.asarray(start.b_factors), rtol=1e-6)
    assert np.corrcoef(b, bt)[0, 1] >= 0.999 and np.sqrt(np.mean((b - bt) ** 2)) <= 1.0
    np.testing.assert_array_equal(np.asarray(r.atoms.positions), np.asarray(truth.positions))


def test_a_second_refinement_with_a_callback_compiles_nothing():
    """The progress bar and the user's callback reach the host through one module-level function:
    a new refinement of the same shapes reuses the compiled run (a per-call reporter made every
    call recompile, 9 s on crambin, a notebook's second call as slow as its first)."""
    model = _helix()
    grid, target = _target(model)
    truth = model.atoms
    start = Atoms(truth.positions, truth.atomic_numbers, np.asarray(truth.b_factors) + 5.0, truth.occupancies)
    compiles, seen = [], []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def run(tag):
        return refine(start, target, 3.0, grid=grid, parameters=("b",), restraints=False, max_steps=4,
                      progress=True, progress_every=1, callback=lambda step, atoms, res: seen.append((tag, step)))

    run("first")
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        r = run("second")
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []
    # each call's callback saw its own steps, and only those
    assert [s for t, s in seen if t == "second"] == list(r.history["step"])


@pytest.mark.x64
def test_the_declared_objective_structure_is_the_traced_one(monkeypatch):
    """The solver's state is made from `objective_structure` instead of tracing the objective: it
    must be what tracing gives (dtypes too: a mismatch breaks the loop's carry), here with 64-bit
    floats on, where a value promoted to float64 would show."""
    from modelmap.refine import _refine as R

    model = _helix()
    grid, target = _target(model)
    seen = []
    init = R._init_state

    def spy(fn, solver, u, args, max_steps, structure):
        seen.append((structure, eqx.filter_eval_shape(fn, u, args)))
        return init(fn, solver, u, args, max_steps, structure)

    monkeypatch.setattr(R, "_init_state", spy)
    refine(model, target, 3.0, grid=grid, parameters=("xyz", "b", "occ"), max_steps=1, macro_cycles=1,
           progress=False)
    assert seen
    for declared, traced in seen:
        assert jax.tree_util.tree_structure(declared) == jax.tree_util.tree_structure(traced)
        for d, t in zip(jax.tree_util.tree_leaves(declared), jax.tree_util.tree_leaves(traced)):
            assert (d.shape, d.dtype) == (t.shape, t.dtype)


def test_b_from_a_flat_start_re_plans_without_recompiling():
    """Atoms whose B reaches the render plan's ceiling stop the run; every atom is re-planned around
    its B and dealt into the compiled plan's spare slots, so the loop compiles once (the b-flat case
    of the issue compiled it twice: the re-plan's render function had another static setting)."""
    model = _helix()
    grid, target = _target(model)
    truth = model.atoms
    bt = np.asarray(truth.b_factors)
    flat = Atoms(truth.positions, truth.atomic_numbers, np.full(truth.n_atoms, 20.0), truth.occupancies)
    from modelmap.refine._solver import minimise

    minimise._cached.clear_cache()
    r = refine(flat, target, 3.0, grid=grid, parameters=("b",), restraints=False, max_steps=60, progress=False,
               b_window=10.0)
    b = np.asarray(r.atoms.b_factors)
    assert any("reached their B ceiling" in e for e in r.events), r.events
    assert minimise._cached._cache_size() == 1  # one compiled loop for every run
    assert np.sqrt(np.mean((b - bt) ** 2)) <= 2.0


def test_refine_occupancy():
    model = _helix()
    truth = model.atoms
    half = np.zeros(truth.n_atoms, bool)
    half[::5] = True  # every fifth atom at occupancy 0.5 in the target
    occ_true = np.where(half, 0.5, 1.0)
    grid, target = _target(model.replace(atoms=Atoms(truth.positions, truth.atomic_numbers, truth.b_factors, occ_true)))
    r = refine(model, target, 3.0, grid=grid, parameters=("occ",), max_steps=80, progress=False)
    occ = np.asarray(r.atoms.occupancies)
    assert np.all(np.abs(occ[half] - 0.5) <= 0.1)
    assert np.all(np.abs(occ[~half] - 1.0) <= 0.1)


def test_refine_occupancy_per_residue():
    """One shift per residue; and the run is the compiled loop of a per-atom refinement of the
    same model (group parameters padded to one per atom), so the two compile once."""
    from modelmap.refine._solver import minimise

    minimise._cached.clear_cache()
    model = _helix()
    truth = model.atoms
    res = np.asarray(model.labels.residue_number)
    half = np.isin(res, [3, 7, 12])  # whole residues at occupancy 0.5 in the target
    occ_true = np.where(half, 0.5, 1.0)
    grid, target = _target(model.replace(atoms=Atoms(truth.positions, truth.atomic_numbers, truth.b_factors, occ_true)))
    # the starting occupancies differ within residues: each residue's atoms get one shared shift
    start = np.where(np.arange(truth.n_atoms) % 3 == 0, 0.95, 1.0)
    r = refine(model.replace(atoms=Atoms(truth.positions, truth.atomic_numbers, truth.b_factors, start)), target,
               3.0, grid=grid, parameters=("occ",), occupancy_groups="residue", max_steps=30, progress=False)
    occ = np.asarray(r.atoms.occupancies)
    shift = occ - start
    for k in np.unique(res):
        sel = res == k
        free = (occ[sel] > 0.0) & (occ[sel] < 1.0)
        assert free.any()
        common = shift[sel][free]
        assert np.ptp(common) <= 1e-4
        # atoms the final clip into [0, 1] set to 1 would have gone past it by the same shift
        assert np.all(start[sel][~free] + common.mean() >= 1.0 - 1e-5)
    # the residues' mean occupancies are recovered, up to the 0.05 spread of the start
    means = np.array([occ[res == k].mean() for k in np.unique(res)])
    truth_means = np.array([occ_true[res == k].mean() for k in np.unique(res)])
    assert np.all(np.abs(means - truth_means) <= 0.05)
    assert np.all((occ >= 0.0) & (occ <= 1.0))
    refine(model, target, 3.0, grid=grid, parameters=("occ",), max_steps=30, progress=False)  # per atom
    assert minimise._cached._cache_size() == 1


def test_refine_occupancy_groups_check_their_inputs():
    model = _helix("AAGAA")
    grid, target = _target(model)
    with pytest.raises(ValueError, match="needs an AtomicModel"):
        refine(model.atoms, target, 3.0, grid=grid, parameters=("occ",), restraints=False, occupancy_groups="residue")
    with pytest.raises(ValueError, match="one entry per atom"):
        refine(model, target, 3.0, grid=grid, parameters=("occ",), occupancy_groups=np.zeros(3, int))
    with pytest.raises(ValueError, match="occupancy_groups must be"):
        refine(model, target, 3.0, grid=grid, parameters=("occ",), occupancy_groups="chain")


@pytest.mark.slow
def test_refine_per_atom_resolution_in_two_regions():
    model = _helix("AAAAAAAAAAAAAAAA", b=20.0)
    a = model.atoms
    first = np.asarray(model.labels.residue_number) <= 8
    d_true = np.where(first, 2.5, 5.0).astype(np.float32)
    grid = Grid.around_positions(np.asarray(a.positions), voxel_size=1.0, padding=6.0)
    target = ShellRenderFn(grid)(ShellDecompositionVolume.from_atoms(a, d_true))
    r = refine(model, target, 3.5, grid=grid, parameters=("res",), max_steps=60, progress=False)
    err = np.abs(r.resolution - d_true)
    assert np.median(err[first]) <= 0.3 and np.median(err[~first]) <= 0.3


def test_refine_resolution_per_residue():
    model = _helix("AAAAAAAAAA", b=20.0)
    a = model.atoms
    res = np.asarray(model.labels.residue_number)
    first = res <= 5
    d_true = np.where(first, 2.5, 5.0).astype(np.float32)
    grid = Grid.around_positions(np.asarray(a.positions), voxel_size=1.0, padding=6.0)
    target = ShellRenderFn(grid)(ShellDecompositionVolume.from_atoms(a, d_true))
    starts = []
    # resolutions=None: refining "res" starts from the scan by default
    r = refine(model, target, 3.5, grid=grid, parameters=("res",), resolution_groups="residue",
               max_steps=8, progress=False, callback=lambda step, atoms, d: starts.append(d))
    for k in np.unique(res):  # one resolution per residue, from the scan on
        assert np.ptp(starts[0][res == k]) <= 1e-6 and np.ptp(r.resolution[res == k]) <= 1e-4
    # the scan starts each residue near its resolution (a uniform 3.5 Å is 1 and 1.5 Å off), refinement
    # brings it closer
    err0, err = np.abs(starts[0] - d_true), np.abs(r.resolution - d_true)
    assert np.max(err0) <= 0.75
    assert np.max(err) <= 0.05 and np.mean(err) < np.mean(err0)


def test_refine_rigid_body_per_chain():
    model = _helix()
    truth = np.asarray(model.atoms.positions, np.float64)
    from scipy.spatial.transform import Rotation

    c = truth.mean(0)
    moved = Rotation.from_rotvec([0.0, 0.05, 0.03]).apply(truth - c) + c + np.array([0.8, -0.5, 0.4])
    grid, target = _target(model)
    a = model.atoms
    start = model.replace(atoms=Atoms(moved, a.atomic_numbers, a.b_factors, a.occupancies))
    r = refine(start, target, 3.0, grid=grid, parameters=("rigid",), max_steps=40, progress=False)
    assert _rmsd(moved, truth) > 1.0
    assert _rmsd(r.atoms.positions, truth) <= 0.05
    # a rigid motion keeps the geometry exactly
    d0 = np.linalg.norm(truth[1:] - truth[:-1], axis=1)
    d1 = np.linalg.norm(np.asarray(r.atoms.positions)[1:] - np.asarray(r.atoms.positions)[:-1], axis=1)
    np.testing.assert_allclose(d1, d0, atol=1e-3)


def test_refine_checks_its_inputs():
    model = _helix("AAGAA")
    grid, target = _target(model)
    with pytest.raises(ValueError, match="parameters must name"):
        refine(model, target, 3.0, grid=grid, parameters=("coords",))
    with pytest.raises(TypeError, match="unknown option.*solver"):
        refine(model, target, 3.0, grid=grid, solver="bfgs")
    with pytest.raises(ValueError, match="b_bounds"):
        refine(model, target, 3.0, grid=grid, b_bounds=(0.0, 500.0))
    with pytest.raises(ValueError, match="AtomicModel"):
        refine(model.atoms, target, 3.0, grid=grid, parameters=("xyz",))
    with pytest.raises(ValueError, match="coordinates only"):
        refine(model, target, 3.0, grid=grid, parameters=("b",), loss="q")
    with pytest.raises(ValueError, match="grid"):
        refine(model, target, 3.0, parameters=("b",))
    with pytest.raises(ValueError, match="NaN"):
        refine(model, target.at[0, 0, 0].set(jnp.nan), 3.0, grid=grid, parameters=("b",))


def test_refine_command_writes_the_model_and_reports(tmp_path):
    from typer.testing import CliRunner

    from modelmap.cli import app

    model = _helix("AAGAAAGA")
    grid, target = _target(model)
    map_path = tmp_path / "target.mrc"
    mm.write_map(map_path, mm.DensityMap(target.astype(jnp.float32), grid))
    a = model.atoms
    rng = np.random.default_rng(8)
    start = model.replace(atoms=Atoms(np.asarray(a.positions) + rng.normal(0, 0.25, a.positions.shape),
                                      a.atomic_numbers, a.b_factors, a.occupancies))
    model_path = tmp_path / "start.pdb"
    mm.write_model(model_path, start)
    out = tmp_path / "refined.cif"
    res = CliRunner().invoke(app, ["refine", str(map_path), str(model_path), "-d", "3", "-o", str(out),
                                   "--refine", "xyz,b", "--steps", "60", "--json", str(tmp_path / "r.json"),
                                   "--plot", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["cc_mask"] > report["before"]["cc_mask"]
    assert report["after"]["q_mean"] > report["before"]["q_mean"]
    assert report["after"]["bond_rmsd"] < report["before"]["bond_rmsd"]
    refined = mm.read_model(out)
    assert _rmsd(refined.atoms.positions, a.positions) < _rmsd(start.atoms.positions, a.positions) / 2
    assert "CC_mask" in res.output and (tmp_path / "refined_shift.defattr").exists()
    assert 'open "refined_shift.defattr"' in (tmp_path / "refined.cxc").read_text()  # the default .cxc
    assert (tmp_path / "r_refine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # inputs are never overwritten; bad parameter names are an error
    res = CliRunner().invoke(app, ["refine", str(map_path), str(model_path), "-d", "3", "-o", str(model_path)])
    assert res.exit_code == 2 and "overwrite" in res.output
    res = CliRunner().invoke(app, ["refine", str(map_path), str(model_path), "-d", "3", "-o", str(out),
                                   "--refine", "xyz,coords"])
    assert res.exit_code == 2 and "parameters must name" in res.output


def test_refine_command_takes_per_atom_resolutions_from_a_local_resolution_map(tmp_path):
    import json

    from typer.testing import CliRunner

    from modelmap._interpolate import interpolate_map
    from modelmap.cli import app

    model = _helix("AAGAAAGA")
    grid, target = _target(model)
    map_path, model_path, lr_path = tmp_path / "target.mrc", tmp_path / "start.pdb", tmp_path / "locres.mrc"
    mm.write_map(map_path, mm.DensityMap(target.astype(jnp.float32), grid))
    mm.write_model(model_path, model)
    # 3 Å on the low-x half of the box, 4.5 Å on the other
    nz, ny, nx = grid.shape
    lr = np.broadcast_to(np.where(np.arange(nx) < nx // 2, 3.0, 4.5), grid.shape).astype(np.float32)
    mm.write_map(lr_path, lr, grid)
    args = ["refine", str(map_path), str(model_path), "-d", "3", "--refine", "xyz", "--steps", "4", "--macro-cycles", "1",
            "--local-resolution", str(lr_path), "--no-progress"]
    res = CliRunner().invoke(app, args + ["-o", str(tmp_path / "r.cif"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resolution_start"] == str(lr_path)
    start = np.asarray(mm.read_model(model_path).atoms.positions)
    want = np.asarray(interpolate_map(lr, grid, start))
    assert want.min() < 3.5 < want.max()  # atoms on both sides
    np.testing.assert_allclose(report["resolutions"], want, rtol=1e-6)  # kept: res is not refined
    assert (tmp_path / "r_resolution.defattr").exists()
    # a value outside the shell tables' [1, 10] Å is an error naming the map, not a clipped value
    mm.write_map(lr_path, np.full(grid.shape, 12.0, np.float32), grid)
    res = CliRunner().invoke(app, args + ["-o", str(tmp_path / "r2.cif")])
    assert res.exit_code == 2 and "locres.mrc" in res.output and "outside [1, 10]" in res.output


def test_refine_with_the_q_loss_raises_q():
    model = _helix()
    grid, target = _target(model)
    a = model.atoms
    rng = np.random.default_rng(3)
    start = model.replace(atoms=Atoms(np.asarray(a.positions) + rng.normal(0, 0.3, a.positions.shape),
                                      a.atomic_numbers, a.b_factors, a.occupancies))
    r = refine(start, target, 3.0, grid=grid, parameters=("xyz",), loss="q", max_steps=60, progress=False)
    q = 1.0 - r.history["map_loss"]  # the Q loss is 1 − mean differentiable Q
    assert q[-1] > q[0] + 0.02
    assert _rmsd(r.atoms.positions, a.positions) < 0.9 * _rmsd(start.atoms.positions, a.positions)
    # the Q loss against the exact q_score: the refined model scores higher there too
    from modelmap.scores import q_score

    dm = mm.DensityMap(target, grid)
    assert q_score(dm, r.model).mean() > q_score(dm, start).mean()


@pytest.mark.slow
def test_b_refinement_runs_on_low_b_models(shared_data):
    """B from 3.6 Å² (3AJO in EMD-20026 at 1.75 Å) refines with the defaults: no planning margin
    stops it (it used to: "every Gaussian needs b_k + B + B_x > 0"), and B stays within b_bounds."""
    model = mm.read_model(shared_data / "emd20026_apoferritin" / "3ajo_fitted_refined.pdb")
    density = mm.read_map(shared_data / "emd20026_apoferritin" / "emd20026_prot.mrc.gz")
    b0 = np.asarray(model.atoms.b_factors)
    assert b0.min() < 4.0
    r = refine(model, density, 1.75, parameters=("b",), max_steps=20, progress=False)
    b = np.asarray(r.atoms.b_factors)
    assert r.result in ("converged", "max_steps") and np.all(np.isfinite(b))
    assert b.min() >= 1.0 - 1e-4 and b.max() <= 500.0
    assert r.history["map_loss"][-1] < r.history["map_loss"][0]
