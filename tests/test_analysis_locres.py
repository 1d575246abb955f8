"""Local resolution (issue 20): shell-wise local correlation of half maps and of a map against a
model map, checked against synthetic half maps with a known resolution field.

No real half maps are in the shared data, so the half maps are made from a real model (7CEC chain A):
three slabs of equal width along x whose atoms are rendered at 2.5, 4 and 6 Å (shell decomposition,
cut steeply at 1/D), plus independent white noise per half map (`synthetic_half_maps`).
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import modelmap as mm
from modelmap import Grid, ModelmapError
from modelmap.analysis import (
    atom_local_resolution,
    local_resolution,
    local_resolution_model,
    shell_transfer,
    synthetic_half_maps,
)
from modelmap.cli import app

MODEL = "emd30342_7cec/390_7cec_A.cif.gz"
LEVELS = (2.5, 4.0, 6.0)


def _slabs(positions) -> np.ndarray:
    """2.5 / 4 / 6 Å in three slabs of equal width along x."""
    x = np.asarray(positions)[:, 0]
    edges = x.min() + np.ptp(x) * np.array([1 / 3, 2 / 3])
    return np.asarray(LEVELS, np.float32)[np.searchsorted(edges, x)]


def _chain_a(shared_data, band: float | None):
    """7CEC chain A at B = 30 Å² (all atoms, or those within `band` Å of the median z)."""
    model = mm.read_model(shared_data / MODEL)
    atoms = eqx.tree_at(lambda a: a.b_factors, model.atoms, jnp.full_like(model.atoms.b_factors, 30.0))
    z = np.asarray(atoms.positions)[:, 2]
    sel = np.arange(z.size) if band is None else np.flatnonzero(np.abs(z - np.median(z)) < band)
    return jax.tree.map(lambda x: x[sel], atoms), sel


@pytest.fixture(scope="module")
def synthetic(shared_data):
    """A 30 Å thick slice of chain A (3,316 atoms, a 102 × 95 × 47 box of 1 Å voxels): the three
    regions are 29 Å wide. Rendered with the Gaussian images + steep cuts (the fast route of
    `synthetic_half_maps`; the slow test uses the shell decomposition on the whole chain)."""
    atoms, sel = _chain_a(shared_data, 15.0)
    truth = _slabs(atoms.positions)
    grid = Grid.around_positions(np.asarray(atoms.positions), voxel_size=1.0, padding=8.0)
    half1, half2, signal = synthetic_half_maps(atoms, truth, grid, key=jax.random.key(0), noise=1.5,
                                               method="gaussian")
    return dict(atoms=atoms, sel=sel, truth=truth, grid=grid, half1=half1, half2=half2, signal=signal)


def _region_medians(values, truth):
    return {d: float(np.median(values[truth == d])) for d in LEVELS}


def test_half_maps_recover_the_known_resolution_field(synthetic):
    s = synthetic
    lr = local_resolution(s["half1"], s["half2"], s["grid"])
    assert lr.threshold == 0.143 and lr.shells.size == 20 and lr.kernel == "sphere"
    assert lr.d_min == pytest.approx(2.0, abs=1e-4)  # Nyquist of 1 Å voxels
    assert 2.5 < lr.global_resolution < 6.0  # the whole map's FSC mixes the three regions
    per_atom, flag = atom_local_resolution(lr.resolution, s["grid"], s["atoms"].positions)
    med = _region_medians(per_atom, s["truth"])
    for d in LEVELS:
        assert abs(med[d] - d) <= 0.5, med
    assert med[2.5] < med[4.0] < med[6.0]
    # atoms on the molecule's surface can see noise only (over 10 Å: clipped); few of them
    assert np.mean(flag == 2) < 0.02 and not np.any(flag == 1) and not np.any(flag == 3)


def test_map_against_model_map_uses_the_half_bit_of_0_5(synthetic):
    """The full map against a noise-free model map (all resolutions, the atoms' B), threshold 0.5."""
    s = synthetic
    full = 0.5 * (s["half1"] + s["half2"])
    model_map = np.asarray(mm.render_model(s["atoms"], s["grid"], 0.0, sampling="point"))
    lr = local_resolution_model(full, model_map, s["grid"])
    assert lr.threshold == 0.5
    per_atom, _ = atom_local_resolution(lr.resolution, s["grid"], s["atoms"].positions)
    med = _region_medians(per_atom, s["truth"])
    for d in LEVELS:
        assert abs(med[d] - d) <= 0.5, med
    # a correlation: the model map's scale does not matter, even far below the variance floor of
    # local_correlation (1e-12) in its weakest shells
    tiny = local_resolution_model(full, model_map * 1e-9, s["grid"], radius=lr.radius)
    assert np.mean(np.abs(tiny.resolution - lr.resolution) <= 1e-3 * lr.resolution) > 0.999


def test_shells_are_a_partition_of_unity():
    s = jnp.linspace(0.0, 0.5, 2001)
    width = 0.025
    for edge in (0.0, 0.5, 1.0):
        bounds = (jnp.arange(24, dtype=jnp.float32) - 0.5) * width
        bands = shell_transfer(s[None, :], bounds[:-1, None], bounds[1:, None], edge)  # (23, 2001)
        inside = s <= 21 * width
        assert float(jnp.max(jnp.abs(bands.sum(0)[inside] - 1.0))) < 1e-5
        assert float(bands.min()) >= 0.0
    # the shell is 1 at its centre, 0 beyond one width from it
    one = shell_transfer(s, 0.2 - 0.5 * width, 0.2 + 0.5 * width, 0.5)
    assert float(one[jnp.argmin(jnp.abs(s - 0.2))]) == pytest.approx(1.0)
    assert float(jnp.max(jnp.where(jnp.abs(s - 0.2) >= width, one, 0.0))) == 0.0


def test_atom_sampling_clips_and_flags_to_the_shell_range():
    grid = Grid((6, 6, 6), 2.0, origin=(10.0, 0.0, 0.0))
    x = 10.0 + 2.0 * np.arange(6)
    locres = np.broadcast_to(0.5 + 0.3 * (x - 10.0), (6, 6, 6)).astype(np.float32)  # 0.5-3.5 Å along x
    pos = np.array([[11.0, 3.0, 3.0],   # 0.8 Å: below 1 Å, clipped up
                    [15.0, 3.0, 3.0],   # 2.0 Å
                    [19.0, 5.0, 1.0],   # 3.2 Å
                    [50.0, 3.0, 3.0]])  # outside the box
    values, flag = atom_local_resolution(locres, grid, pos, d_range=(1.0, 3.0))
    np.testing.assert_allclose(values, [1.0, 2.0, 3.0, 2.0], atol=1e-5)
    np.testing.assert_array_equal(flag, [1, 0, 2, 3])


def test_bad_inputs_are_refused_with_a_reason():
    grid = Grid((16, 16, 16), 1.0)
    a = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    with pytest.raises(ModelmapError, match="on the grid"):
        local_resolution(a, a[:8], grid)
    with pytest.raises(ModelmapError, match="NaN"):
        local_resolution(a, np.where(a > 2, np.nan, a), grid)
    with pytest.raises(ModelmapError, match="constant"):
        local_resolution(a, np.zeros_like(a), grid)
    with pytest.raises(ModelmapError, match="Nyquist"):
        local_resolution(a, a, grid, d_min=1.5)
    with pytest.raises(ModelmapError, match="n_shells"):
        local_resolution(a, a, grid, n_shells=1)
    with pytest.raises(ModelmapError, match="kernel"):
        local_resolution(a, a, grid, kernel="box")
    with pytest.raises(ModelmapError, match="no atom"):
        atom_local_resolution(a, grid, [[100.0, 0.0, 0.0]])


def test_cli_locres_writes_map_json_plot_and_per_atom_resolutions(synthetic, shared_data, tmp_path):
    from modelmap.cli._app import atom_resolutions

    s = synthetic
    h1, h2 = tmp_path / "h1.mrc", tmp_path / "h2.mrc"
    mm.write_map(h1, s["half1"], s["grid"])
    mm.write_map(h2, s["half2"], s["grid"])
    prefix = tmp_path / "out" / "lr"
    result = CliRunner().invoke(app, ["locres", str(h1), str(h2), "--model", str(shared_data / MODEL),
                                      "-o", str(prefix)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "lr.json").read_text())
    assert summary["threshold"] == 0.143 and summary["outside_mask"] == "global"
    written = mm.read_map(tmp_path / "out" / "lr_resolution.mrc")
    assert written.grid.same_as(s["grid"])
    assert (tmp_path / "out" / "lr.cxc").read_text().count("color sample") == 1
    assert (tmp_path / "out" / "lr_histogram.png").stat().st_size > 0
    # the per-atom model is what `modelmap render --local-resolution`/--resolution-from-b takes
    per_atom = mm.read_model(tmp_path / "out" / "lr_atoms.cif")
    d = atom_resolutions(per_atom, True, None)
    med = _region_medians(d[s["sel"]], s["truth"])  # the atoms of the slice the maps were made from
    for level in LEVELS:
        assert abs(med[level] - level) <= 0.5, med
    csv = np.genfromtxt(tmp_path / "out" / "lr_atoms.csv", delimiter=",", names=True, dtype=None, encoding=None)
    np.testing.assert_allclose(csv["resolution"], d, atol=1e-3)
    assert abs(summary["atoms"]["median"] - float(np.median(d))) < 1e-3
    g = s["grid"]
    pos = np.asarray(per_atom.atoms.positions)
    lo, hi = np.asarray(g.origin), np.asarray(g.origin) + (np.asarray(g.shape[::-1]) - 1) * np.asarray(g.voxel_size)
    assert summary["atoms"]["outside_box"] == int(np.sum(np.any((pos < lo) | (pos > hi), axis=1))) > 0
    # the written map sampled at the slice's atoms, as render --local-resolution does it
    sliced = mm.read_model(tmp_path / "out" / "lr_atoms.cif")
    d_map = np.asarray(mm.interpolate_map(written.data, written.grid, sliced.atoms.positions[s["sel"]]))
    assert np.median(np.abs(d_map - d[s["sel"]])) < 0.05


def test_cli_locres_refuses_maps_on_different_grids(tmp_path):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    mm.write_map(a, rng.normal(size=(16, 16, 16)).astype(np.float32), Grid((16, 16, 16), 1.0))
    mm.write_map(b, rng.normal(size=(16, 16, 16)).astype(np.float32), Grid((16, 16, 16), 1.1))
    result = CliRunner().invoke(app, ["locres", str(a), str(b), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "not on the same grid" in result.output
    assert not (tmp_path / "x_resolution.mrc").exists()
    # one map and no model: nothing to compare it with
    result = CliRunner().invoke(app, ["locres", str(a), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--model" in result.output


@pytest.mark.slow
def test_whole_chain_shell_decomposition_half_maps(shared_data):
    """The whole of chain A (4,308 atoms) rendered with the shell decomposition at each region's D.

    Noise 1.5: every region's median within 0.5 Å and its interior (atoms over 8 Å from a boundary)
    within 0.3 Å. Noise 1.0 (higher SNR): the band-passed signal of a better-resolved neighbour leaks
    into the windows of a region's boundary atoms and stays above the threshold, so boundary atoms are
    pulled towards the neighbour (the 6 Å region's median was 5.36 Å, measured); the interiors stay
    within 0.4 Å and every region still comes out in order."""
    atoms, _ = _chain_a(shared_data, None)
    truth = _slabs(atoms.positions)
    grid = Grid.around_positions(np.asarray(atoms.positions), voxel_size=1.0, padding=8.0)
    x = np.asarray(atoms.positions)[:, 0]
    edges = x.min() + np.ptp(x) * np.array([1 / 3, 2 / 3])
    interior = np.min(np.abs(x[:, None] - edges[None]), axis=1) > 8.0
    for noise, median_tol, interior_tol in ((1.5, 0.5, 0.3), (1.0, 0.75, 0.4)):
        h1, h2, _ = synthetic_half_maps(atoms, truth, grid, key=jax.random.key(0), noise=noise)
        lr = local_resolution(h1, h2, grid)
        per_atom, _ = atom_local_resolution(lr.resolution, grid, atoms.positions)
        med = _region_medians(per_atom, truth)
        assert med[2.5] < med[4.0] < med[6.0]
        for d in LEVELS:
            assert abs(med[d] - d) <= median_tol, (noise, med)
            assert abs(np.median(per_atom[(truth == d) & interior]) - d) <= interior_tol, (noise, d)


@pytest.mark.slow
def test_cli_locres_map_against_model(shared_data, tmp_path):
    """One map and --model: the map against the model's map (FSC 0.5). Crambin at a uniform 3 Å
    (B = 30 Å², cut steeply at 1/3 Å⁻¹) plus noise; the model map is rendered with --model-b 30."""
    model_path = shared_data / "models" / "1crn.pdb"
    model = mm.read_model(model_path)
    atoms = eqx.tree_at(lambda a: a.b_factors, model.atoms, jnp.full_like(model.atoms.b_factors, 30.0))
    grid = Grid.around_positions(np.asarray(atoms.positions), voxel_size=1.0, padding=8.0)
    half, _, _ = synthetic_half_maps(atoms, np.full(model.atoms.b_factors.shape, 3.0), grid,
                                     key=jax.random.key(2), noise=0.5, method="gaussian")
    path = tmp_path / "map.mrc"
    mm.write_map(path, half, grid)
    result = CliRunner().invoke(app, ["locres", str(path), "--model", str(model_path), "--model-b", "30",
                                      "-o", str(tmp_path / "mvm")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "mvm.json").read_text())
    assert summary["mode"] == "map vs model" and summary["threshold"] == 0.5
    assert abs(summary["atoms"]["median"] - 3.0) <= 0.5, summary["atoms"]
    assert (tmp_path / "mvm_atoms.pdb").exists() and (tmp_path / "mvm_atoms.csv").exists()
