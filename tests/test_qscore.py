"""Q-score: MapQ parity on EMD-30342 / 7CEC, the cctbx variant, and the differentiable Q.

Ground truth is MapQ's own output (gregdp/mapq `test/`, read in place from the shared data folder):
per-atom `_atom_site.Q_score` (3 decimals) and the per-residue table `..._All.txt` (6 decimals) for
chain A against the zoned map; the 100-atom files from jqscore's test data (σ = 0.6, 3 decimals;
σ = 0.4, 6 decimals). Numbers for the cctbx variant and for the single-process path come from
`specs/scores.md` §1.6 A.
"""

from __future__ import annotations

import math

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

import modelmap as mm
from modelmap._errors import InvalidAtomsError, ModelmapError
from modelmap.scores import (
    QProbes,
    QScores,
    estimated_resolution,
    expected_q,
    mapq_min_max,
    mapq_radii,
    mapq_regrid,
    q_score,
    q_score_differentiable,
    select_probes,
    spiral_points,
)

DIR = "emd30342_7cec"


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------


def _reference_q(path, tag: str = "Q_score") -> dict[tuple[str, int, str, str], float]:
    """MapQ's per-atom Q from an mmCIF, keyed by (chain, residue number, atom name, altloc)."""
    block = gemmi.cif.read(str(path)).sole_block()
    table = block.find("_atom_site.", ["auth_asym_id", "auth_seq_id", "auth_atom_id", "label_alt_id", tag])
    out = {}
    for row in table:
        alt = "" if row[3] in (".", "?") else row[3]
        out[(row[0], int(row[1]), row[2], alt)] = float(row[4])
    return out


def _keys(labels):
    return [
        (str(c), int(n), str(a), str(al))
        for c, n, a, al in zip(labels.chain, labels.residue_number, labels.atom_name, labels.altloc)
    ]


def _aligned_reference(model, path, tag="Q_score") -> np.ndarray:
    ref = _reference_q(path, tag)
    keys = _keys(model.labels)
    assert len(ref) == len(keys)
    return np.array([ref[k] for k in keys])


@pytest.fixture(scope="module")
def emd(shared_data):
    return mm.read_map(shared_data / DIR / "390_emd_30342_A_z4.mrc.gz")


@pytest.fixture(scope="module")
def chain_a(shared_data):
    return mm.read_model(shared_data / DIR / "390_7cec_A.cif.gz")


@pytest.fixture(scope="module")
def chain_a_probes(chain_a):
    """The file's float64 coordinates (what q_score uses for an AtomicModel) and MapQ's probes."""
    positions = np.array([cra.atom.pos.tolist() for cra in chain_a.structure[0].all()])
    np.testing.assert_array_equal(positions.astype(np.float32), np.asarray(chain_a.atoms.positions))
    return positions, select_probes(positions)


@pytest.fixture(scope="module")
def mapq_run(emd, chain_a, chain_a_probes):
    """Chain A scored the way MapQ's multi-process run did: against the re-gridded map."""
    _, probes = chain_a_probes
    regridded = mapq_regrid(emd, chain_a)
    return regridded, q_score(regridded, chain_a, probes=probes)


# ------------------------------------------------------------------------------------------------
# probe geometry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 8, 23, 106])
def test_spiral_points_closed_form(n):
    pts = spiral_points(n)
    assert pts.shape == (n, 3) and pts.dtype == np.float64
    k = np.arange(1, n + 1)
    h = -1 + 2 * (k - 1) / (n - 1)
    np.testing.assert_allclose(pts[:, 2], h, atol=1e-15)  # z = cos(acos h)
    step = np.zeros(n)
    step[1:-1] = 3.6 / np.sqrt(n * (1 - h[1:-1] ** 2))
    theta = np.mod(np.cumsum(step), 2 * np.pi)
    theta[-1] = 0.0
    sin_phi = np.sqrt(1 - h**2)
    expected = np.stack([sin_phi * np.cos(theta), sin_phi * np.sin(theta), h], axis=-1)
    np.testing.assert_allclose(pts, expected, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 1.0, atol=1e-15)
    # MapQ: first point at the south pole, (sin(acos(-1)), 0, -1) = (1.2e-16, 0, -1), last at the north
    np.testing.assert_array_equal(pts[0], [math.sin(math.pi), 0.0, -1.0])
    np.testing.assert_allclose(pts[-1], [0.0, 0.0, 1.0], atol=1e-15)


def test_spiral_points_fixed_orientation_and_errors():
    a = spiral_points(8)
    a[:] = 0  # a copy: the cache stays intact
    np.testing.assert_array_equal(spiral_points(8)[0], [math.sin(math.pi), 0.0, -1.0])
    # MapQ's spiral for N = 8, second point, from the recurrence by hand
    h = -1 + 2 / 7
    theta = 3.6 / math.sqrt(8 * (1 - h * h))
    assert spiral_points(8)[1] == pytest.approx(
        [math.sin(math.acos(h)) * math.cos(theta), math.sin(math.acos(h)) * math.sin(theta), h], abs=1e-15
    )
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="integer number of points"):
            spiral_points(bad)


def test_mapq_radii():
    r = mapq_radii()
    assert r.shape == (20,)
    assert r[0] == 0.1 and r[2] == 0.30000000000000004  # MapQ's float accumulation, kept
    assert r[-1] == pytest.approx(2.0, abs=1e-12)
    np.testing.assert_allclose(np.diff(r), 0.1, atol=1e-12)


def _brute_force_mapq(pos, prox, n_points=8, radii=None):
    """MapQ's rule point by point (independent of the vectorised code)."""
    radii = mapq_radii() if radii is None else radii
    counts = np.zeros((len(pos), len(radii)), int)
    tried = np.zeros((len(pos), len(radii)), int)
    for a, x in enumerate(pos):
        for s, r in enumerate(radii):
            for i in range(50):
                n = n_points + 2 * i
                kept = 0
                for u in spiral_points(n):
                    p = x + u * r
                    if not np.any(np.sqrt(((prox - p) ** 2).sum(1)) < 0.9 * r):
                        kept += 1
                if kept >= n_points:
                    counts[a, s], tried[a, s] = kept, n
                    break
    return counts, tried


def test_select_probes_mapq_rule_matches_brute_force():
    rng = np.random.default_rng(7)
    prox = rng.uniform(0, 7, size=(70, 3))  # crowded: many retries and some dropped shells
    pos = prox[:12]
    radii = mapq_radii()[::3]
    probes = select_probes(pos, prox, radii=radii)
    counts, tried = _brute_force_mapq(pos, prox, radii=radii)
    np.testing.assert_array_equal(probes.counts(), counts)
    np.testing.assert_array_equal(probes.n_tried, tried)
    assert (tried == 0).any() and (tried > 8).any()  # both cases were exercised
    # the padded layout and the compact list describe the same probes
    assert probes.max_points == tried.max()
    assert probes.n_probes == counts.sum()
    off = probes.offsets()
    a, s, p = probes.atom_index, probes.shell_index, probes.slot_index
    np.testing.assert_allclose(np.linalg.norm(off[a, s, p], axis=-1), radii[s], rtol=1e-14)
    beyond = np.arange(probes.max_points) >= probes.n_tried[..., None]
    assert not off[beyond].any() and not probes.mask[beyond].any()  # padding: zero, masked
    rejected = ~beyond & ~probes.mask
    assert rejected.any() and np.all(np.linalg.norm(off[rejected], axis=-1) > 0)


def test_select_probes_cctbx_rule_matches_kdtree():
    rng = np.random.default_rng(3)
    pos = rng.uniform(0, 8, size=(60, 3))
    probes = select_probes(pos, variant="cctbx", n_points=16)
    radii = np.linspace(0.1, 2.0, 20)
    assert probes.max_points == 16 and np.all(probes.n_tried == 16)
    _, nearest = cKDTree(pos).query(pos[:, None, None] + spiral_points(16)[None, None] * radii[None, :, None, None])
    np.testing.assert_array_equal(probes.mask, nearest == np.arange(60)[:, None, None])


# ------------------------------------------------------------------------------------------------
# MapQ parity, EMD-30342 / 7CEC chain A
# ------------------------------------------------------------------------------------------------


def test_mapq_parity_per_atom(shared_data, chain_a, mapq_run):
    ref = _aligned_reference(chain_a, shared_data / DIR / "390_7cec_A__Q__390_emd_30342_A_z4.cif.gz")
    q = mapq_run[1].q
    assert q.shape == (4308,) and np.isfinite(q).all()
    err = np.abs(q - ref)
    assert err.max() < 0.001
    # the file has 3 decimals: every atom within rounding (+ a few 1e-6)
    assert err.max() < 0.00052


@pytest.mark.x64
def test_atomic_model_is_scored_at_file_coordinates(shared_data, chain_a, chain_a_probes, mapq_run):
    """read_model keeps float32 positions; q_score takes the file's float64 coordinates instead."""
    regridded, scores = mapq_run
    f64 = q_score(regridded, mm.Atoms(chain_a_probes[0], chain_a.atoms.atomic_numbers))
    np.testing.assert_array_equal(f64.q, scores.q)
    # float32 coordinates (up to ~8e-6 Å off) flip some of MapQ's near-tie probe rejections
    f32 = q_score(regridded, mm.Atoms(np.asarray(chain_a.atoms.positions), chain_a.atoms.atomic_numbers))
    ref = _aligned_reference(chain_a, shared_data / DIR / "390_7cec_A__Q__390_emd_30342_A_z4.cif.gz")
    assert np.abs(f32.q - ref).max() > 0.002


def test_mapq_parity_mean(mapq_run):
    mean = mapq_run[1].mean()
    assert round(mean, 4) == pytest.approx(0.4506, abs=0.0005)
    assert mapq_run[1].per_chain() == {"A": pytest.approx(mean, abs=1e-15)}
    assert round(estimated_resolution(mean), 2) == 3.77  # the table's "Est.Res." for chain A


def _read_residue_table(path) -> dict[int, tuple[str, str, str, str]]:
    rows = {}
    for line in open(path):
        f = line.rstrip("\n").split("\t")
        if len(f) > 6 and f[0] == "A" and f[1] and f[2].isdigit():
            rows[int(f[2])] = (f[1], f[3], f[4], f[5])
    return rows


def test_mapq_parity_per_residue(shared_data, mapq_run):
    table = _read_residue_table(shared_data / DIR / "390_7cec_A__Q__390_emd_30342_A_z4_All.txt")
    scores = mapq_run[1]
    # MapQ's workers hand Q back as "%f" (6 decimals); residue means are of those
    rounded = QScores(np.round(scores.q, 6), scores.labels, scores.sigma, scores.variant, scores.n_points)
    residues = rounded.per_residue()
    assert len(residues) == len(table) == 553
    diffs = []
    for (chain, number, icode, name), rq in residues.items():
        ref_name, bb, sc, res = table[number]
        assert (chain, icode, name) == ("A", "", ref_name)
        for value, text in ((rq.backbone, bb), (rq.side_chain, sc), (rq.residue, res)):
            if text == "":
                assert math.isnan(value)  # glycine: no side chain
                continue
            diffs.append(round(value, 6) - float(text))
    diffs = np.abs(diffs)
    assert diffs.size == 1606
    # 6 printed decimals; our per-atom Q carries a residual noise of a few 1e-6 (see module doc)
    assert diffs.max() <= 1.5e-5
    assert np.mean(diffs <= 1.01e-6) > 0.5


def test_without_regridding_is_the_single_process_result(shared_data, emd, chain_a, chain_a_probes, mapq_run):
    scores = q_score(emd, chain_a, probes=chain_a_probes[1])
    assert scores.mean() == pytest.approx(0.4570, abs=0.0005)
    ref = _aligned_reference(chain_a, shared_data / DIR / "390_7cec_A__Q__390_emd_30342_A_z4.cif.gz")
    err = np.abs(scores.q - ref)
    assert err.mean() == pytest.approx(0.024, abs=0.003) and err.max() > 0.1
    # the re-gridded map: origin on the absolute voxel lattice, box about 6 voxels beyond the atoms
    grid = mapq_run[0].grid
    voxel = np.asarray(grid.voxel_size)
    n_vox = np.asarray(grid.origin) / voxel
    np.testing.assert_allclose(n_vox, np.round(n_vox), atol=1e-4)
    assert not np.allclose(np.asarray(emd.grid.origin) / voxel % 1, 0, atol=1e-3)
    idx = np.asarray(grid.to_index(chain_a_probes[0]))
    assert idx.min() >= 5 and (np.array(grid.shape[::-1]) - 1 - idx.max(0)).min() >= 5


def test_regrid_is_identity_on_the_voxel_lattice():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 22, 24)).astype(np.float32)
    grid = mm.Grid(data.shape, 1.25, (5 * 1.25, -3 * 1.25, 2 * 1.25))
    pos = grid.to_position(np.array([[10.3, 11.2, 9.7], [12.1, 9.5, 10.4]]))
    out = mapq_regrid(mm.DensityMap(jnp.asarray(data), grid), pos)
    start = np.round((np.asarray(out.grid.origin) - np.asarray(grid.origin)) / 1.25).astype(int)
    # x: indices 10.3..12.1 -> box from 4.3, 15 points; y: 9.5..11.2 -> box from 3.5, whose absolute
    # position is 0.5 voxel: Python 2 round() takes it away from zero, to 1 (numpy would give 0)
    assert out.grid.shape == (14, 15, 15) and (start == [4, 4, 4]).all()
    sub = data[start[2]:start[2] + 14, start[1]:start[1] + 15, start[0]:start[0] + 15]
    np.testing.assert_allclose(np.asarray(out.data), sub, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the 100-atom files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a100(shared_data):
    return mm.read_model(shared_data / DIR / "390_7cec_A100.cif")


def test_a100_sigma06_is_single_process(shared_data, emd, a100):
    ref = _aligned_reference(a100, shared_data / DIR / "390_7cec_A100__Q__390_emd_30342_A_z4.cif")
    direct = q_score(emd, a100, sigma=0.6)
    assert np.abs(direct.q - ref).max() < 0.00052  # 3 decimals: within rounding
    assert direct.mean() == pytest.approx(0.5197, abs=0.0005)
    # not made with the re-gridding, and the proximity set was the 100 atoms only
    regridded = q_score(mapq_regrid(emd, a100), a100, sigma=0.6)
    assert np.abs(regridded.q - ref).max() > 0.01
    chain = mm.read_model(shared_data / DIR / "390_7cec_A.cif.gz")
    whole = q_score(emd, chain, selection=np.arange(100))
    assert np.abs(whole.q[:100] - ref).max() > 0.01


def test_a100_sigma04_is_multi_process(shared_data, emd, a100):
    ref = _aligned_reference(a100, shared_data / DIR / "390_7cec_A100__Q__390_emd_30342_A_z4_s04.cif", "Q-score")
    regridded = q_score(mapq_regrid(emd, a100), a100, sigma=0.4)
    assert np.abs(regridded.q - ref).max() < 1e-5  # 6 decimals, same residual noise as above
    assert regridded.mean() == pytest.approx(0.4256, abs=0.0005)
    direct = q_score(emd, a100, sigma=0.4)
    assert np.abs(direct.q - ref).max() > 0.01


# ------------------------------------------------------------------------------------------------
# invariances, variants, aggregation, errors
# ------------------------------------------------------------------------------------------------


def test_invariant_to_map_scale_and_offset(emd, chain_a, chain_a_probes):
    probes = chain_a_probes[1]
    data = np.asarray(emd.data, np.float64)
    base = q_score((data, emd.grid), chain_a, probes=probes, interpolation="float64").q
    scaled = q_score((3.7 * data - 0.25, emd.grid), chain_a, probes=probes, interpolation="float64").q
    np.testing.assert_allclose(scaled, base, atol=1e-6)
    flipped = q_score((-2.0 * data + 1.0, emd.grid), chain_a, probes=probes, interpolation="float64").q
    np.testing.assert_allclose(flipped, -base, atol=1e-6)  # a < 0 flips the sign: the test can fail
    # MapQ's MinMaxD: A, B from whole-map statistics (they do not change Q)
    lo, hi = mapq_min_max(data)
    assert lo == pytest.approx(max(data.mean() - data.std(), data.min()))
    assert hi == pytest.approx(min(data.mean() + 10 * data.std(), data.max()))


def test_cctbx_variant_numbers(emd, chain_a):
    eight = q_score(emd, chain_a, variant="cctbx", n_points=8)  # shells [0, 0.1..2], r=0 kept
    assert eight.mean() == pytest.approx(0.4780, abs=0.002)
    thirty_two = q_score(emd, chain_a, variant="cctbx", n_points=32, include_center=False)
    assert thirty_two.mean() == pytest.approx(0.4667, abs=0.002)


def test_aggregation_protein_and_nucleic():
    names = ["N", "CA", "C", "O", "CB", "P", "OP1", "O5'", "C4'", "O4'", "N9", "C8", "O"]
    resn = ["ALA"] * 5 + ["G"] * 7 + ["HOH"]
    labels = mm.AtomLabels(
        chain=np.array(["A"] * 5 + ["B"] * 7 + ["C"]),
        residue_name=np.array(resn),
        residue_number=np.array([1] * 5 + [7] * 7 + [1]),
        insertion_code=np.array([""] * 12 + ["A"]),
        atom_name=np.array(names),
        altloc=np.array([""] * 13),
        element=np.array(["N", "C", "C", "O", "C", "P", "O", "O", "C", "O", "N", "C", "O"]),
        is_hetero=np.array([False] * 12 + [True]),
        source_index=np.zeros((13, 3), int),
    )
    q = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.6, 0.7, 0.2, 0.4, 0.8, 1.0, 0.3])
    scores = QScores(q, labels, 0.6, "mapq", 8)
    res = scores.per_residue()
    assert list(res) == [("A", 1, "", "ALA"), ("B", 7, "", "G"), ("C", 1, "A", "HOH")]
    ala, g, hoh = res.values()
    assert (ala.backbone, ala.side_chain, ala.residue) == pytest.approx((0.25, 0.9, 0.38))
    assert (g.backbone, g.sugar, g.base, g.side_chain) == pytest.approx((0.6, 0.3, 0.9, 0.9))
    assert g.kind == "nucleic" and hoh.kind == "other" and math.isnan(hoh.backbone)
    assert scores.per_chain() == pytest.approx({"A": 0.38, "B": 0.6, "C": 0.3})
    with pytest.raises(ModelmapError, match="need atom labels"):
        QScores(q, None, 0.6, "mapq", 8).per_residue()


def test_hydrogens_never_scored_and_errors(emd, chain_a):
    atoms = chain_a.atoms
    z = np.asarray(atoms.atomic_numbers).copy()
    z[:10] = 1
    with_h = mm.Atoms(atoms.positions, z, atoms.b_factors, atoms.occupancies)
    scores = q_score(emd, with_h, selection=np.arange(40))
    assert np.isnan(scores.q[:10]).all() and np.isfinite(scores.q[10:40]).all()
    assert np.isnan(scores.q[40:]).all()
    with pytest.raises(ModelmapError, match="no non-hydrogen atoms"):
        q_score(emd, mm.Atoms(atoms.positions[:5], np.ones(5, int)))
    with pytest.raises(ValueError, match="sigma must be a positive"):
        q_score(emd, chain_a, sigma=0.0)
    bad = np.asarray(atoms.positions).copy()
    bad[3, 1] = np.nan
    with pytest.raises(InvalidAtomsError, match="NaN or infinite"):
        q_score(emd, mm.Atoms(bad, atoms.atomic_numbers))
    with pytest.raises(InvalidAtomsError, match="NaN or infinite"):
        select_probes(bad)
    with pytest.raises(ValueError, match="variant"):
        select_probes(bad[:3], variant="chimerax")


def test_atoms_outside_the_map_score_zero(emd, chain_a):
    pos = np.asarray(chain_a.atoms.positions, np.float64)[:30] + 500.0  # far outside: all values 0
    scores = q_score(emd, mm.Atoms(pos, chain_a.atoms.atomic_numbers[:30]))
    np.testing.assert_array_equal(scores.q, 0.0)


def test_expected_q_and_estimated_resolution():
    assert expected_q(3.9) == pytest.approx(-0.1775 * 3.9 + 1.1192)
    assert expected_q(3.0, sigma=0.4) == pytest.approx(-0.1866 * 3.0 + 1.1242)
    assert expected_q(2.5, kind="nucleic") == pytest.approx(-0.1377 * 2.5 + 0.9973)
    assert expected_q(2.5, sigma=0.4, kind="nucleic") == pytest.approx(-0.1465 * 2.5 + 0.9436)
    assert expected_q(2.0, kind="ion") == pytest.approx(-0.1103 * 2.0 + 1.0795)
    assert expected_q(2.0, kind="water") == pytest.approx(-0.0895 * 2.0 + 1.0001)
    assert expected_q(3.0, kind="cubic") == pytest.approx(
        -0.0019064058 * 27 + 0.0499875375 * 9 - 0.4513945578 * 3 + 1.5361860733
    )
    r = np.array([1.5, 3.9, 6.0])
    np.testing.assert_allclose(estimated_resolution(expected_q(r)), r)
    np.testing.assert_allclose(estimated_resolution(expected_q(r, 0.4), 0.4), r)
    with pytest.raises(ValueError, match="sigma 0.6 and 0.4"):
        expected_q(3.0, sigma=0.5)
    with pytest.raises(ValueError, match="kind"):
        expected_q(3.0, kind="lipid")
    with pytest.raises(ValueError, match="positive"):
        expected_q(-1.0)


# ------------------------------------------------------------------------------------------------
# differentiable Q
# ------------------------------------------------------------------------------------------------


_q_jit = jax.jit(q_score_differentiable)


@pytest.fixture(scope="module")
def subset(emd, chain_a_probes):
    """60 atoms of chain A (probes blocked by all of chain A) for the gradient and batching tests."""
    positions, _ = chain_a_probes
    pick = np.arange(0, 4308, 72)[:60]
    return pick, positions[pick], select_probes(positions[pick], positions)


def test_differentiable_equals_exact_chain_a(chain_a_probes, mapq_run):
    positions, probes = chain_a_probes
    regridded, exact = mapq_run
    q32 = _q_jit(jnp.asarray(regridded.data, jnp.float32), regridded.grid,
                 jnp.asarray(positions, jnp.float32), probes)
    assert q32.dtype == jnp.float32 and q32.shape == (4308,)
    q32 = np.asarray(q32)
    # float32 positions (~150 Å from the origin) and arithmetic: ~1e-5, against MapQ's values too
    assert np.abs(q32 - exact.q).max() < 1e-4
    assert np.corrcoef(q32, exact.q)[0, 1] >= 0.99


@pytest.mark.x64
def test_differentiable_equals_exact_float64_and_gradient(emd, chain_a, subset):
    pick, pos, probes = subset
    exact = q_score(emd, chain_a, selection=pick, probes=probes, interpolation="float64").q[pick]
    data = jnp.asarray(emd.data, jnp.float64)
    pos = jnp.asarray(pos, jnp.float64)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=pick.size))

    @jax.jit
    def value_and_grad(p):
        def loss(p):
            q = q_score_differentiable(data, emd.grid, p, probes)
            return jnp.sum(weights * q), q
        return jax.value_and_grad(loss, has_aux=True)(p)

    (_, q64), grad = value_and_grad(pos)
    np.testing.assert_allclose(np.asarray(q64), exact, atol=1e-10)  # the same estimator
    grad = np.asarray(grad)
    assert np.abs(grad).max() > 1e-2  # Q does depend on the positions
    h = 1e-6
    for a in (0, 7, 31, 59):  # central differences in float64
        for d in range(3):
            e = jnp.zeros_like(pos).at[a, d].set(h)
            fd = (value_and_grad(pos + e)[0][0] - value_and_grad(pos - e)[0][0]) / (2 * h)
            assert grad[a, d] == pytest.approx(float(fd), rel=1e-5, abs=1e-7)


def test_differentiable_vmap(emd, subset):
    _, pos, probes = subset
    data = jnp.asarray(emd.data, jnp.float32)
    p32 = jnp.asarray(pos, jnp.float32)
    shifts = jnp.asarray(np.random.default_rng(1).normal(scale=0.2, size=(3, 1, 3)), jnp.float32)
    batch = p32[None] + shifts
    batched = jax.jit(jax.vmap(q_score_differentiable, in_axes=(None, None, 0, None)))(
        data, emd.grid, batch, probes
    )
    looped = np.stack([np.asarray(_q_jit(data, emd.grid, b, probes)) for b in batch])
    np.testing.assert_allclose(np.asarray(batched), looped, atol=2e-6)
    assert np.abs(looped[0] - np.asarray(_q_jit(data, emd.grid, p32, probes))).max() > 1e-3
    with pytest.raises(ValueError, match="probes are for 60 atoms"):
        q_score_differentiable(data, emd.grid, p32[:10], probes)


@pytest.mark.slow  # op-by-op execution compiles every primitive: ~6 s
def test_differentiable_jit_equals_eager(emd, subset):
    _, pos, probes = subset
    data = jnp.asarray(emd.data, jnp.float32)
    p32 = jnp.asarray(pos, jnp.float32)
    jitted = _q_jit(data, emd.grid, p32, probes)
    with jax.disable_jit():
        eager = q_score_differentiable(data, emd.grid, p32, probes)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=2e-6)


# ------------------------------------------------------------------------------------------------
# the whole 7CEC model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_7cec(shared_data, emd):
    model = mm.read_model(shared_data / DIR / "390_7cec.cif.gz")
    scores = q_score(emd, model)
    assert scores.q.shape == (17561,) and np.isfinite(scores.q).all()
    assert np.all(np.abs(scores.q) <= 1)
    per_chain = scores.per_chain()
    assert list(per_chain) == list("ABCDEFGHIJ")
    # the zoned map only holds chain A's density: other chains far away score exactly 0
    pos = np.asarray(model.atoms.positions)
    idx = np.asarray(emd.grid.to_index(pos))
    far = np.any((idx < -3) | (idx > np.array(emd.grid.shape[::-1]) + 2), axis=1)
    assert far.sum() > 5000 and np.all(scores.q[far] == 0)
    assert per_chain["A"] > 0.4
