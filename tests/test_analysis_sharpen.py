"""Sharpening (issue 20): Guinier B against known blurs and a numpy reference, global sharpening against
the B = 0 model map, local amplitude scaling on a map whose halves are blurred differently, the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import modelmap as mm
from modelmap import Grid, render_model
from modelmap.analysis import (
    SharpenError,
    b_factor_filter,
    band_transfers,
    guinier_b,
    local_amplitude_scale,
    lowpass,
    sharpen,
)
from modelmap.cli._app import app
from modelmap.scores import model_mask

D = 3.0


def _cc(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def crambin(shared_data):
    """1crn at B = 0, its Fourier map at 3 Å (the truth), and the map of its atoms with x below the median."""
    atoms = mm.read_model(shared_data / "models" / "1crn.pdb").atoms
    atoms = type(atoms)(atoms.positions, atoms.atomic_numbers, np.zeros_like(atoms.b_factors), atoms.occupancies)
    grid = Grid.around_positions(atoms.positions, 1.0, 8.0)
    x = np.asarray(atoms.positions)[:, 0]
    cut = float(np.median(x))
    left = x < cut
    part = type(atoms)(atoms.positions[left], atoms.atomic_numbers[left], atoms.b_factors[left], atoms.occupancies[left])
    truth = np.asarray(render_model(atoms, grid, D, method="fourier", sampling="point"))
    truth_left = np.asarray(render_model(part, grid, D, method="fourier", sampling="point"))
    xs = grid.origin[0] + np.arange(grid.shape[2]) * grid.voxel_size[0]
    left_voxels = np.broadcast_to(xs[None, None, :] < cut, grid.shape)
    return {"atoms": atoms, "grid": grid, "truth": truth, "truth_left": truth_left, "left": left_voxels,
            "mask": np.asarray(model_mask(atoms, grid))}


def _numpy_guinier(data, voxel, d_min, d_low):
    """ln(mean |F|) per one-voxel-wide shell against s², fitted between d_low and d_min (numpy only)."""
    f = np.abs(np.fft.fftn(np.asarray(data, np.float64)))
    freqs = np.meshgrid(*[np.fft.fftfreq(n, voxel) for n in data.shape], indexing="ij")
    s = np.sqrt(sum(q * q for q in freqs))
    n = min(data.shape) // 2
    edges = np.linspace(0, 0.5 / voxel, n + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    means = np.array([f[(s >= lo) & (s < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    use = (centres >= 1 / d_low) & (centres <= 1 / d_min)
    slope, _ = np.polyfit(centres[use] ** 2, np.log(means[use]), 1)
    return -4 * slope


def test_guinier_b_of_gaussian_blobs_is_their_b_and_matches_numpy():
    # random points, each a normalised 3-D Gaussian of B = 80 Å² (per-axis variance B/8π²): the
    # amplitudes are a flat Wilson average times exp(-B s²/4), so the Guinier B is 80
    grid = Grid((48, 48, 48), 1.0)
    rng = np.random.default_rng(3)
    spikes = np.zeros(grid.shape, np.float32)
    idx = rng.integers(0, 48, size=(400, 3))
    spikes[idx[:, 0], idx[:, 1], idx[:, 2]] += 1.0
    blobs = np.asarray(b_factor_filter(spikes, grid, 80.0))
    fit = guinier_b(blobs, grid, 3.0)
    assert fit.b == pytest.approx(80.0, abs=3.0)
    # the reference averages over the full transform, modelmap over the half (rfftn) layout, whose
    # kx = 0 plane weighs half as much: 79.04 against 79.53 Å² here
    assert fit.b == pytest.approx(_numpy_guinier(blobs, 1.0, 3.0, 10.0), abs=1.0)
    assert np.allclose(fit.curve[fit.used], fit.log_amplitude[fit.used], atol=5 * fit.rms + 1e-6)


def test_guinier_recovers_a_known_blur_and_sharpening_improves_cc(crambin):
    grid, truth = crambin["grid"], crambin["truth"]
    rng = np.random.default_rng(0)
    blurred = np.asarray(b_factor_filter(truth, grid, 80.0))
    blurred = blurred + rng.normal(size=grid.shape).astype(np.float32) * 0.05 * blurred.std()
    b0 = guinier_b(truth, grid, D).b  # the B = 0 model map's own fall-off (form factors, structure)
    fit = guinier_b(blurred, grid, D)
    assert fit.b - b0 == pytest.approx(80.0, abs=4.0)
    mask = crambin["mask"]
    before = _cc(blurred[mask], truth[mask])
    after = _cc(np.asarray(sharpen(blurred, grid, fit.b, D))[mask], truth[mask])
    assert after > before + 0.05, (before, after)


def test_sharpen_undoes_a_blur_exactly(crambin):
    grid, truth = crambin["grid"], crambin["truth"]
    restored = np.asarray(sharpen(b_factor_filter(truth, grid, 50.0), grid, 50.0, D))
    assert np.allclose(restored, np.asarray(lowpass(truth, grid, D)), atol=1e-4 * np.abs(truth).max())


def test_bands_sum_to_the_lowpass():
    grid = Grid((20, 18, 16), 1.2)
    total = sum(np.asarray(t) for t in band_transfers(grid, 3.0, 7))
    from modelmap.analysis import frequency_magnitude, soft_lowpass

    assert np.allclose(total, np.asarray(soft_lowpass(frequency_magnitude(grid), 3.0)), atol=1e-6)


def test_local_scaling_recovers_both_halves_better_than_global(crambin):
    """Atoms left of the median x blurred by B = 20 Å², the others by 120 Å², noise added: the local
    scaling (model map = the truth) raises the CC with the truth in both halves more than global
    Guinier sharpening, and in the blurred half far more than a global B relative to the model map."""
    grid, truth, t_left = crambin["grid"], crambin["truth"], crambin["truth_left"]
    rng = np.random.default_rng(0)
    data = np.asarray(b_factor_filter(t_left, grid, 20.0)) + np.asarray(b_factor_filter(truth - t_left, grid, 120.0))
    data = data + rng.normal(size=grid.shape).astype(np.float32) * 0.2 * data.std()
    fit = guinier_b(data, grid, D)
    glob = np.asarray(sharpen(data, grid, fit.b, D))
    relative = np.asarray(sharpen(data, grid, fit.b - guinier_b(truth, grid, D).b, D))
    local = np.asarray(local_amplitude_scale(data, grid, truth, D, window=3.0, n_bands=8))
    for half in (crambin["left"], ~crambin["left"]):
        sel = crambin["mask"] & half
        cc = {k: _cc(v[sel], truth[sel]) for k, v in
              {"orig": data, "global": glob, "relative": relative, "local": local}.items()}
        assert cc["local"] - cc["orig"] > cc["global"] - cc["orig"] + 0.003, cc
        assert cc["local"] > cc["relative"] - 0.01, cc
    sel = crambin["mask"] & ~crambin["left"]
    assert _cc(local[sel], truth[sel]) > _cc(relative[sel], truth[sel]) + 0.04


def test_bad_inputs_are_refused():
    grid = Grid((16, 16, 16), 1.0)
    data = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    with pytest.raises(SharpenError, match="Nyquist"):
        guinier_b(data, grid, 1.5)
    with pytest.raises(SharpenError, match="range is empty"):
        guinier_b(data, grid, 4.0, d_low=3.0)
    with pytest.raises(SharpenError, match="shape"):
        local_amplitude_scale(data, grid, data[:8], 3.0)
    with pytest.raises(SharpenError, match="zero everywhere"):
        local_amplitude_scale(data, grid, np.zeros_like(data), 3.0)
    coarse = Grid((32, 32, 32), 2.0)
    with pytest.warns(UserWarning, match="finer than about 5"):
        guinier_b(np.random.default_rng(1).normal(size=coarse.shape).astype(np.float32), coarse, 6.0, d_low=15.0)
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(SharpenError, match="NaN"):
        guinier_b(bad, grid, 3.0)


def test_cli_writes_maps_json_cxc_and_plot(crambin, tmp_path, shared_data):
    grid, truth = crambin["grid"], crambin["truth"]
    blurred = np.asarray(b_factor_filter(truth, grid, 60.0))
    map_path = mm.write_map(tmp_path / "blurred.mrc", blurred, grid)
    model = shared_data / "models" / "1crn.pdb"
    out = tmp_path / "out" / "crn"
    result = CliRunner().invoke(app, ["sharpen", str(map_path), "-d", "3", "--model", str(model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "crn.json").read_text())
    for name in ("global", "local"):
        written = mm.read_map(tmp_path / "out" / f"crn_{name}.mrc")
        assert written.grid.same_as(grid)
    assert (tmp_path / "out" / "crn.cxc").exists() and (tmp_path / "out" / "crn_guinier.png").exists()
    # with a model the global B is the map's Guinier B minus the B = 0 model map's: the blur added
    assert summary["global"]["b_applied"] == pytest.approx(60.0, abs=4.0)
    assert summary["global"]["b_applied"] == pytest.approx(
        summary["guinier"]["b"] - summary["model_map"]["guinier_b_at_b0"], abs=1e-6)
    assert summary["scores"]["global"]["cc_mask"] > summary["scores"]["original"]["cc_mask"]
    assert summary["scores"]["local"]["q_mean"] > summary["scores"]["original"]["q_mean"]
    # bad input: a resolution finer than the grid's Nyquist limit is one line, exit code 2
    bad = CliRunner().invoke(app, ["sharpen", str(map_path), "-d", "1", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Nyquist" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.x64
def test_local_scaling_and_sharpen_are_differentiable():
    """Gradients through `local_amplitude_scale` (in the model map) and `sharpen` (in B) equal central
    finite differences (float64)."""
    import jax
    import jax.numpy as jnp

    grid = Grid((12, 12, 12), 1.0)
    rng = np.random.default_rng(4)
    data = jnp.asarray(rng.normal(size=grid.shape))
    model = jnp.asarray(rng.normal(size=grid.shape))
    target = jnp.asarray(rng.normal(size=grid.shape))
    direction = jnp.asarray(rng.normal(size=grid.shape))

    @jax.jit
    def loss(m):
        return jnp.sum(local_amplitude_scale(data, grid, m, 3.0, window=2.0, n_bands=3) * target)

    h = 1e-4
    fd = (loss(model + h * direction) - loss(model - h * direction)) / (2 * h)
    assert float(jnp.vdot(jax.grad(loss)(model), direction)) == pytest.approx(float(fd), rel=1e-5)
    b_loss = jax.jit(lambda b: jnp.sum(sharpen(data, grid, b, 3.0) * target))
    fd_b = (b_loss(20.0 + h) - b_loss(20.0 - h)) / (2 * h)
    assert float(jax.grad(b_loss)(20.0)) == pytest.approx(float(fd_b), rel=1e-5)
