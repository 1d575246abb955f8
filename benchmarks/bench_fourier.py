"""Benchmark: exact Fourier model maps on CPU, modelmap's NUFFT route against gemmi's FFT route.

For 7.5k atoms (the first 7,500 of 7CEC), 17.5k (all of 7CEC) and 26k (4YVS), at D = 3 Å on a 1 Å
grid with 5 Å padding (`Grid.around_positions`), electron factors, each atom's own B:

- modelmap `NufftRenderFn` ("point" sampling, eps 1e-6, default internal padding 3 D): the first
  call (trace + compile + run) and the median of `--repeats` further calls; also `value_and_grad`
  of a CC loss with respect to the volume (positions, B, occupancies, resolution).
- gemmi's FFT route on the same padded box: `DensityCalculatorE` (direct summation with a blur
  chosen so that aliasing is below 1e-6 at |s| <= 1/D), `numpy.fft.rfftn`, un-blur, hard cut at
  1/D, `irfftn`; timed as a whole, and the density step alone.
- the agreement of the two maps (CC and max |difference| / max), so the reader sees they compute
  the same thing.

Run from the repository root (needs the shared data folder beside the repository, or
MODELMAP_TEST_DATA):

    python benchmarks/bench_fourier.py [--sizes 7.5k,17.5k,26k] [--repeats 3] [--out FILE]

Prints a table and writes JSON (default benchmarks/results/fourier.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import equinox as eqx
import gemmi
import jax
import jax.numpy as jnp
import numpy as np

import modelmap as mm
from _common import cpu_model, git_commit

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODELMAP_TEST_DATA", REPO.parent / "shared" / "data"))
SIZES = {
    "7.5k": ("emd30342_7cec/390_7cec.cif.gz", 7500),
    "17.5k": ("emd30342_7cec/390_7cec.cif.gz", None),
    "26k": ("models/4YVS.cif.gz", None),
}
RESOLUTION = 3.0


def _timed(fn, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def gemmi_fourier_route(structure, atoms_kept, render_fn, blur):
    """(map on the grid, seconds for the density step) via gemmi's FFT route on the padded box."""
    grid = render_fn.grid
    (nz, ny, nx), (pz, py, px) = render_fn.padded_shape()
    vx, vy, vz = grid.voxel_size
    o = np.asarray(grid.origin) - np.array([px * vx, py * vy, pz * vz])
    st = structure.clone()
    model = st[0]
    keep = set(map(tuple, atoms_kept))
    for ci, chain in enumerate(model):
        for ri, res in enumerate(chain):
            for ai in reversed(range(len(res))):
                if (ci, ri, ai) not in keep:
                    del res[ai]
                else:
                    a = res[ai]
                    a.pos = gemmi.Position(a.pos.x - o[0], a.pos.y - o[1], a.pos.z - o[2])
    dc = gemmi.DensityCalculatorE()
    dc.grid.unit_cell = gemmi.UnitCell(nx * vx, ny * vy, nz * vz, 90, 90, 90)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(nx, ny, nz)
    dc.blur = blur
    t0 = time.perf_counter()
    dc.put_model_density_on_grid(model)
    t_density = time.perf_counter() - t0
    arr = np.array(dc.grid, copy=False)  # x, y, z
    f = np.fft.rfftn(arr)
    sx = np.fft.fftfreq(nx, vx)[:, None, None]
    sy = np.fft.fftfreq(ny, vy)[None, :, None]
    sz = np.fft.rfftfreq(nz, vz)[None, None, :]
    s2 = sx**2 + sy**2 + sz**2
    f *= np.exp(blur * s2 / 4) * (s2 <= (1 + 1e-12) / render_fn.resolution_range[0] ** 2)
    rho = np.fft.irfftn(f, s=(nx, ny, nz), axes=(0, 1, 2)).transpose(2, 1, 0)
    gz, gy, gx = grid.shape
    return rho[pz : pz + gz, py : py + gy, px : px + gx], t_density


def aliasing_free_blur(b_min: float, voxel: float, resolution: float, eps: float = 1e-6) -> float:
    """Smallest extra blur with exp(-(b_min + blur) s_a²/4) exp(blur/(4 D²)) <= eps, where
    s_a = 1/v - 1/D is the lowest frequency that aliases into |s| <= 1/D."""
    sa2 = (1 / voxel - 1 / resolution) ** 2
    blur = (np.log(1 / eps) - b_min * sa2 / 4) / (sa2 / 4 - 1 / (4 * resolution**2))
    return float(max(blur, 0.0))


def run_size(label, repeats):
    path, n_keep = SIZES[label]
    model = mm.read_model(DATA / path, models="first")
    atoms = model.atoms
    kept = model.labels.source_index
    if n_keep is not None:
        atoms = jax.tree_util.tree_map(lambda x: x[:n_keep], atoms)
        kept = kept[:n_keep]
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 5.0)
    vol = mm.IndependentAtomVolume.from_atoms(atoms, RESOLUTION)
    t0 = time.perf_counter()
    render_fn = mm.NufftRenderFn(grid).with_plan(vol, b_margin=10.0)
    t_plan = time.perf_counter() - t0
    fwd = eqx.filter_jit(lambda r, v: r(v))
    first, median = _timed(lambda: fwd(render_fn, vol), repeats)
    ours = np.asarray(fwd(render_fn, vol), np.float64)
    target = jnp.asarray(ours + np.random.default_rng(0).normal(0, 0.1 * ours.std(), ours.shape), jnp.float32)

    def loss(v):
        m = render_fn(v)
        a, b = m - m.mean(), target - target.mean()
        return -jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))

    vg = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    vg_first, vg_median = _timed(lambda: vg(vol), repeats)

    b_min = float(np.min(np.asarray(atoms.b_factors))) + 0.2
    blur = aliasing_free_blur(b_min, 1.0, RESOLUTION)
    g_times, d_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        theirs, t_density = gemmi_fourier_route(model.structure, kept, render_fn, blur)
        g_times.append(time.perf_counter() - t0)
        d_times.append(t_density)
    cc = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    rel = float(np.max(np.abs(ours - theirs)) / np.max(theirs))
    g = statistics.median(g_times)
    return {
        "size": label, "atoms": int(atoms.n_atoms), "grid_xyz": list(grid.shape[::-1]),
        "padded_zyx": list(render_fn.padded_shape()[0]), "chebyshev_nodes": render_fn.n_nodes,
        "b_range": [float(np.min(atoms.b_factors)), float(np.max(atoms.b_factors))],
        "modelmap_plan_s": t_plan, "modelmap_first_s": first, "modelmap_forward_s": median,
        "modelmap_value_and_grad_first_s": vg_first, "modelmap_value_and_grad_s": vg_median,
        "gemmi_route_s": g, "gemmi_density_step_s": statistics.median(d_times), "gemmi_blur": blur,
        "ratio_forward_vs_gemmi": median / g, "ratio_vg_vs_forward": vg_median / median,
        "cc_vs_gemmi": cc, "max_rel_diff_vs_gemmi": rel,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="7.5k,17.5k,26k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fourier.json")
    args = parser.parse_args()
    rows = [run_size(s.strip(), args.repeats) for s in args.sizes.split(",")]
    import jax_finufft.jax_finufft_version as jfv

    env = {
        "device": str(jax.devices()[0]), "cpus": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "equinox": eqx.__version__, "gemmi": gemmi.__version__,
        "jax_finufft": getattr(jfv, "__version__", getattr(jfv, "version", "?")),
        "numpy": np.__version__, "modelmap": mm.__version__,
    }
    head = f"{'size':>6} {'atoms':>6} {'Q':>3} {'ours fwd':>9} {'ours v&g':>9} {'gemmi':>7} {'fwd/gemmi':>9} {'vg/fwd':>7} {'CC':>8} {'maxdiff':>8}"
    print(f"Fourier maps at {RESOLUTION} Å, 1 Å grid, 5 Å padding; {env['device']}, {env['cpus']} CPUs")
    print(head)
    for r in rows:
        print(f"{r['size']:>6} {r['atoms']:>6} {r['chebyshev_nodes']:>3} {r['modelmap_forward_s']:>8.2f}s "
              f"{r['modelmap_value_and_grad_s']:>8.2f}s {r['gemmi_route_s']:>6.2f}s {r['ratio_forward_vs_gemmi']:>9.2f} "
              f"{r['ratio_vg_vs_forward']:>7.2f} {r['cc_vs_gemmi']:>8.5f} {r['max_rel_diff_vs_gemmi']:>8.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "fourier", "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {"resolution": RESOLUTION, "voxel": 1.0, "padding": 5.0, "eps": 1e-6},
        "environment": {**env, "cpu_model": cpu_model(), "modelmap_git": git_commit()}, "sizes": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
