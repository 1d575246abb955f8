"""Sharding over devices (batch axis, z-slabs), streaming by slabs, and whole assemblies.

The sharded checks run in a subprocess with 4 forced CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`), so the rest of the suite keeps one device:
sharded == single-device to 1e-6 of the peak, forward and gradient, in float64 (where the order of a
sum over devices cannot hide a wrong term behind float32 rounding; the float32 maps agree to 6e-7,
checked in-process for the streamed slabs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modelmap as mm
from modelmap._errors import GridTooLargeError, ModelFileError
from modelmap.render import SlabPlan, render_slabs, stream_slabs, stream_value_and_grad

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs with 4 CPU devices; prints one JSON line of relative errors (of the peak / of the largest
# gradient entry). `KINDS` selects the window renderers of the z-slab check.
SHARDED = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np, equinox as eqx
    jax.config.update("jax_enable_x64", True)
    import modelmap as mm
    from modelmap.batch import plan_batch, render_batch, render_stacked
    from modelmap.render import SlabPlan, render_slabs

    assert len(jax.devices()) == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("d",))
    rng = np.random.default_rng(0)
    out = {}

    def atoms(n, spread, dtype):
        return mm.Atoms(jnp.asarray(rng.normal(size=(n, 3)) * spread, dtype), rng.choice([6, 7, 8, 16], n).astype(np.int32),
                        jnp.asarray(rng.uniform(15, 45, n), dtype), jnp.ones((n,), dtype))

    def rel(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    # the batch axis: 5 structures (one bucket, one B class: one group) over 4 devices (one padded run)
    group = plan_batch([atoms(n, 2.0, jnp.float64) for n in (40, 70, 55, 30, 60)], 3.0, box=24, voxel_size=1.0)
    assert len(group) == 1
    group = group[0]

    def batch_loss(v, m):
        return jnp.sum(render_stacked(group.render_fn, v, 1, m) ** 2)

    out["batch_forward"] = rel(render_stacked(group.render_fn, group.volumes, 1, mesh),
                               render_stacked(group.render_fn, group.volumes, 1, None))
    g1 = eqx.filter_grad(batch_loss)(group.volumes, None)
    g4 = eqx.filter_grad(batch_loss)(group.volumes, mesh)
    out["batch_grad"] = max(rel(g4.positions, g1.positions), rel(g4.b_factors, g1.b_factors))

    # z-slabs of one map: 4 slabs over 4 devices
    for kind in os.environ["KINDS"].split(","):
        a = atoms(150, 5.0, jnp.float64)
        grid = mm.Grid.around_positions(np.asarray(a.positions), 1.0, 3.0)
        if kind == "gaussian":
            vol = mm.GaussianMixtureVolume.from_atoms(a, 2.0)
            fn = mm.GaussianMixtureRenderFn(grid, max_buckets=1).with_plan(vol)  # one window size: one compiled scan
        else:
            vol = mm.ShellDecompositionVolume.from_atoms(a, 3.0, n_terms=6)
            bounds = mm.RenderBounds((15, 45), 3.0, elements=[6, 7, 8, 16])
            fn = mm.ShellRenderFn(grid).with_bounds(bounds)  # one window size: one compiled scan
        slabs = SlabPlan.build(fn, vol, n_slabs=4, margin=0.5)
        whole = fn(vol)
        out[f"slab_forward_{kind}"] = rel(render_slabs(slabs, vol, mesh), whole)
        target = 0.9 * whole + 0.01

        def loss(v, m):
            rendered = fn(v) if m is None else render_slabs(slabs, v, m)
            return jnp.sum((rendered - target) ** 2)

        v1, g1 = eqx.filter_value_and_grad(loss)(vol, None)
        v4, g4 = eqx.filter_value_and_grad(loss)(vol, mesh)
        out[f"slab_value_{kind}"] = abs(float(v4 - v1)) / abs(float(v1))
        out[f"slab_grad_{kind}"] = max(rel(g4.positions, g1.positions), rel(g4.b_factors, g1.b_factors),
                                       rel(g4.occupancies, g1.occupancies))
    print("RESULT " + json.dumps(out))
    """
)


def _run_sharded(kinds: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", KINDS=kinds,
               PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_sharded_batch_and_slabs_equal_one_device():
    r = _run_sharded("gaussian")
    assert r["batch_forward"] <= 1e-6
    assert r["batch_grad"] <= 1e-6
    assert r["slab_forward_gaussian"] <= 1e-6
    assert r["slab_value_gaussian"] <= 1e-9
    assert r["slab_grad_gaussian"] <= 1e-6


@pytest.mark.slow
def test_sharded_slabs_shells_equal_one_device():
    r = _run_sharded("shells")
    assert r["slab_forward_shells"] <= 1e-6
    assert r["slab_grad_shells"] <= 1e-6


def _small_volume(n=120, seed=1):
    rng = np.random.default_rng(seed)
    atoms = mm.Atoms(jnp.asarray(rng.normal(size=(n, 3)) * 5, jnp.float32), np.full(n, 6, np.int32),
                     jnp.asarray(rng.uniform(10, 60, n), jnp.float32), jnp.ones((n,), jnp.float32))
    grid = mm.Grid.around_positions(np.asarray(atoms.positions), 1.0, 3.0)
    return atoms, grid, mm.GaussianMixtureVolume.from_atoms(atoms, 2.0)


def test_streamed_slabs_equal_whole_map():
    _, grid, vol = _small_volume()
    fn = mm.GaussianMixtureRenderFn(grid, max_buckets=1)
    whole = np.asarray(fn(vol))
    slabs = SlabPlan.build(fn, vol, n_slabs=3)
    assert slabs.n_slabs == 3 and 3 * slabs.thickness >= grid.shape[0]
    streamed = stream_slabs(slabs, vol)
    assert isinstance(streamed, np.ndarray)
    np.testing.assert_allclose(streamed, whole, atol=1e-6 * np.abs(whole).max())


@pytest.mark.slow
def test_streamed_value_and_grad_equal_whole_map():
    _, grid, vol = _small_volume()
    fn = mm.GaussianMixtureRenderFn(grid, max_buckets=1)
    whole = np.asarray(fn(vol))
    slabs = SlabPlan.build(fn, vol, n_slabs=3)
    target = 0.8 * whole

    def loss(m, t):
        return jnp.sum((m - t) ** 2)

    value, grad = stream_value_and_grad(slabs, vol, loss, target)
    v1, g1 = eqx.filter_value_and_grad(lambda v: loss(fn.with_plan(vol)(v), target))(vol)
    assert abs(value - float(v1)) <= 1e-4 * abs(float(v1))
    np.testing.assert_allclose(grad.positions, g1.positions, atol=1e-4 * float(jnp.abs(g1.positions).max()))


def test_render_model_streams_when_the_whole_map_does_not_fit(monkeypatch):
    atoms, grid, vol = _small_volume()
    whole = np.asarray(mm.render_model(atoms, grid, 2.0))
    # room for the map and the working memory of half of it, not for the whole map's
    pad = mm.GaussianMixtureRenderFn(grid).with_plan(vol).plan.pad
    limit = grid.nbytes() + mm.render.slab_memory_bytes(grid, grid.shape[0] // 2 + 1, pad, 120)
    monkeypatch.setenv("MODELMAP_MEMORY_LIMIT", str(limit))
    slabs = SlabPlan.build(mm.GaussianMixtureRenderFn(grid), vol)
    assert slabs.n_slabs > 1
    streamed = mm.render_model(atoms, grid, 2.0)
    assert isinstance(streamed, np.ndarray)
    np.testing.assert_allclose(streamed, whole, atol=1e-6 * np.abs(whole).max())


def test_cli_render_streams_a_map_that_fits_once_but_not_four_times(shared_data, tmp_path, monkeypatch):
    """The CLI asks only that the map fit once: render_model streams its working memory and
    write_map copies nothing, so a map over a quarter of the limit is rendered, not refused."""
    from typer.testing import CliRunner

    from modelmap.cli import app

    path = shared_data / "models" / "1crn.pdb"
    args = ["render", str(path), "-d", "2", "--padding", "60", "--no-cxc", "-o"]
    res = CliRunner().invoke(app, args + [str(tmp_path / "whole.mrc")])
    assert res.exit_code == 0, res.output
    whole = mm.read_map(tmp_path / "whole.mrc")
    atoms = mm.read_model(path).atoms
    vol = mm.GaussianMixtureVolume.from_atoms(atoms, 2.0)
    grid = whole.grid
    pad = mm.GaussianMixtureRenderFn(grid).with_plan(vol).plan.pad
    limit = grid.nbytes() + mm.render.slab_memory_bytes(grid, grid.shape[0] // 4 + 1, pad, atoms.n_atoms)
    assert 4 * grid.nbytes() > limit  # the CLI's former check (four maps) refused this grid
    monkeypatch.setenv("MODELMAP_MEMORY_LIMIT", str(limit))
    assert SlabPlan.build(mm.GaussianMixtureRenderFn(grid), vol).n_slabs > 1
    res = CliRunner().invoke(app, args + [str(tmp_path / "streamed.mrc")])
    assert res.exit_code == 0, res.output
    streamed = mm.read_map(tmp_path / "streamed.mrc")
    assert streamed.grid.same_as(grid)
    # float32 sums in another order (the slabs' window plan is not the whole map's): 3e-6 of the
    # peak where a protein's windows overlap, spread over the model, not at the slabs' seams
    peak = float(np.abs(whole.data).max())
    np.testing.assert_allclose(np.asarray(streamed.data), np.asarray(whole.data), atol=1e-5 * peak)


def test_memory_estimate_refuses_before_allocating():
    _, grid, vol = _small_volume()
    with pytest.raises(GridTooLargeError, match=r"grid \(x, y, z.*120 atoms.*memory limit is"):
        SlabPlan.build(mm.GaussianMixtureRenderFn(grid), vol, memory_limit=grid.nbytes())


def test_slabs_refuse_the_fourier_map_and_atoms_past_the_margin():
    atoms, grid, vol = _small_volume()
    with pytest.raises(ValueError, match="not local"):
        SlabPlan.build(mm.NufftRenderFn(grid), mm.IndependentAtomVolume.from_atoms(atoms, 3.0))
    fn = mm.GaussianMixtureRenderFn(grid).with_plan(vol)
    slabs = SlabPlan.build(fn, vol, n_slabs=2, margin=0.5)
    moved = eqx.tree_at(lambda v: v.positions, vol, vol.positions.at[0, 2].add(2.0))
    with pytest.raises(Exception, match="margin"):
        jax.block_until_ready(render_slabs(slabs, moved))


def test_read_model_assembly(shared_data):
    path = shared_data / "models" / "4YVS.cif.gz"
    with pytest.raises(ModelFileError, match=r"no assembly '7'; the assemblies defined are: '1'"):
        mm.read_model(path, assembly="7")
    model = mm.read_model(path, assembly="1")
    assert model.n_atoms == 317_160


def test_cli_render_assembly(shared_data, tmp_path):
    from typer.testing import CliRunner

    from modelmap.cli import app

    out = tmp_path / "crn.mrc"
    res = CliRunner().invoke(app, ["render", str(shared_data / "models" / "1crn.pdb"), "-d", "3", "--assembly", "1",
                                   "-o", str(out), "--no-cxc"])
    assert res.exit_code == 0, res.output
    assert out.exists()
    res = CliRunner().invoke(app, ["render", str(shared_data / "models" / "1crn.pdb"), "-d", "3", "--assembly", "9",
                                   "-o", str(tmp_path / "x.mrc"), "--no-cxc"])
    assert res.exit_code != 0 and "no assembly '9'" in res.output
