"""Benchmark: shell-decomposition model maps on CPU, beside the NUFFT Fourier map and gemmi's FFT route.

For 17.5k atoms (all of 7CEC) and 26k (4YVS), at D = 3 Å on a 1 Å grid with 5 Å padding
(`Grid.around_positions`), electron factors, each atom's own B, all in the same run:

- modelmap `ShellRenderFn` (K = `--terms`, 6 by default): first call (trace + compile + run) and the
  median of `--repeats` further calls of the forward map (windows planned for the volume as it is,
  and again with the refinement margins below; a concrete call deals the atoms over the CPU's
  cores, `ShellRenderFn.threads`, and the same map as one computation under jit, on one core, is
  timed too), and of `value_and_grad` of a CC loss with respect to the volume (positions, B,
  occupancies and per-atom resolutions; one computation; windows with room for B + 10 Å² and
  D + 0.2 Å); gemmi's route runs on one core;
- modelmap `NufftRenderFn` (the exact Fourier map, "point" sampling, eps 1e-6): forward and
  `value_and_grad` the same way;
- gemmi's FFT route (`DensityCalculatorE` + FFT + hard cut at 1/D on the padded box; see
  `bench_fourier.py`);
- the agreement of the shell map with the NUFFT map (CC, max |difference| / max).

    python benchmarks/bench_shells.py [--sizes 17.5k,26k] [--terms 6] [--repeats 3] [--out FILE]

Prints a table and writes JSON (default benchmarks/results/shells.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import gemmi
import jax
import jax.numpy as jnp
import numpy as np

import modelmap as mm
from _common import cpu_model, git_commit
from modelmap.render._shells import _cpu_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fourier import DATA, REPO, _timed, aliasing_free_blur, gemmi_fourier_route  # noqa: E402

SIZES = {"17.5k": ("emd30342_7cec/390_7cec.cif.gz", None), "26k": ("models/4YVS.cif.gz", None),
         "7.5k": ("emd30342_7cec/390_7cec.cif.gz", 7500)}
RESOLUTION = 3.0


def _cc_loss(render_fn, target):
    def loss(v):
        m = render_fn(v)
        a, b = m - m.mean(), target - target.mean()
        return -jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))

    return eqx.filter_jit(eqx.filter_value_and_grad(loss))


def run_size(label, terms, repeats):
    path, n_keep = SIZES[label]
    model = mm.read_model(DATA / path, models="first")
    atoms, kept = model.atoms, model.labels.source_index
    if n_keep is not None:
        atoms = jax.tree_util.tree_map(lambda x: x[:n_keep], atoms)
        kept = kept[:n_keep]
    grid = mm.Grid.around_positions(atoms.positions, 1.0, 5.0)
    fwd = eqx.filter_jit(lambda r, v: r(v))
    row = {"size": label, "atoms": int(atoms.n_atoms), "grid_xyz": list(grid.shape[::-1]), "terms": terms}

    shells = mm.ShellDecompositionVolume.from_atoms(atoms, RESOLUTION, n_terms=terms)
    # forward: windows planned for the volume as it is (what `ShellRenderFn(grid)(volume)` plans);
    # value_and_grad: planned with room for B to grow by 10 Å² and D by 0.2 Å, as in refinement
    t0 = time.perf_counter()
    forward_fn = mm.ShellRenderFn(grid).with_plan(shells)
    row["shells_plan_s"] = time.perf_counter() - t0
    shell_fn = mm.ShellRenderFn(grid).with_plan(shells, b_margin=10.0, d_margin=0.2)
    row["shells_window_half_widths"] = sorted({b.half_width[0] for b in forward_fn.plan.buckets})
    row["shells_window_half_widths_with_margins"] = sorted({b.half_width[0] for b in shell_fn.plan.buckets})
    # a concrete call deals the atoms over the CPU's cores (`threads`); under jit it is one computation
    row["shells_threads"] = _cpu_threads(None, shells)
    row["shells_first_s"], row["shells_forward_s"] = _timed(lambda: forward_fn(shells), repeats)
    row["shells_first_one_thread_s"], row["shells_forward_one_thread_s"] = _timed(lambda: fwd(forward_fn, shells), repeats)
    row["shells_first_with_margins_s"], row["shells_forward_with_margins_s"] = _timed(lambda: shell_fn(shells), repeats)
    ours = np.asarray(forward_fn(shells), np.float64)
    target = jnp.asarray(ours + np.random.default_rng(0).normal(0, 0.1 * ours.std(), ours.shape), jnp.float32)
    vg = _cc_loss(shell_fn, target)
    row["shells_value_and_grad_first_s"], row["shells_value_and_grad_s"] = _timed(lambda: vg(shells), repeats)

    fourier = mm.IndependentAtomVolume.from_atoms(atoms, RESOLUTION)
    nufft_fn = mm.NufftRenderFn(grid).with_plan(fourier, b_margin=10.0)
    row["nufft_first_s"], row["nufft_forward_s"] = _timed(lambda: fwd(nufft_fn, fourier), repeats)
    ref = np.asarray(fwd(nufft_fn, fourier), np.float64)
    vg_n = _cc_loss(nufft_fn, target)
    row["nufft_value_and_grad_first_s"], row["nufft_value_and_grad_s"] = _timed(lambda: vg_n(fourier), repeats)

    blur = aliasing_free_blur(float(np.min(np.asarray(atoms.b_factors))) + 0.2, 1.0, RESOLUTION)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gemmi_fourier_route(model.structure, kept, nufft_fn, blur)
        times.append(time.perf_counter() - t0)
    row["gemmi_route_s"] = statistics.median(times)
    row["ratio_shells_forward_vs_gemmi"] = row["shells_forward_s"] / row["gemmi_route_s"]
    row["ratio_shells_forward_one_thread_vs_gemmi"] = row["shells_forward_one_thread_s"] / row["gemmi_route_s"]
    row["cc_shells_vs_nufft"] = float(np.corrcoef(ours.ravel(), ref.ravel())[0, 1])
    row["max_rel_diff_shells_vs_nufft"] = float(np.max(np.abs(ours - ref)) / np.max(ref))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="17.5k,26k")
    parser.add_argument("--terms", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "shells.json")
    args = parser.parse_args()
    rows = [run_size(s.strip(), args.terms, args.repeats) for s in args.sizes.split(",")]
    env = {
        "device": str(jax.devices()[0]), "cpus": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "equinox": eqx.__version__, "gemmi": gemmi.__version__,
        "numpy": np.__version__, "modelmap": mm.__version__,
    }
    print(f"Shell maps at {RESOLUTION} Å (K = {args.terms}), 1 Å grid, 5 Å padding; {env['device']}, {env['cpus']} CPUs; "
          f"shells forward on {rows[0]['shells_threads']} threads")
    print(f"{'size':>6} {'atoms':>6} {'shells fwd':>10} {'1 thread':>9} {'(margins)':>9} {'shells v&g':>10} {'nufft fwd':>9} {'nufft v&g':>9} "
          f"{'gemmi':>7} {'fwd/gemmi':>9} {'CC vs nufft':>11} {'maxdiff':>8}")
    for r in rows:
        print(f"{r['size']:>6} {r['atoms']:>6} {r['shells_forward_s']:>9.2f}s {r['shells_forward_one_thread_s']:>8.2f}s "
              f"{r['shells_forward_with_margins_s']:>8.2f}s "
              f"{r['shells_value_and_grad_s']:>9.2f}s "
              f"{r['nufft_forward_s']:>8.2f}s {r['nufft_value_and_grad_s']:>8.2f}s {r['gemmi_route_s']:>6.2f}s "
              f"{r['ratio_shells_forward_vs_gemmi']:>9.2f} {r['cc_shells_vs_nufft']:>11.5f} {r['max_rel_diff_shells_vs_nufft']:>8.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "shells", "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {"resolution": RESOLUTION, "voxel": 1.0, "padding": 5.0, "terms": args.terms},
        "environment": {**env, "cpu_model": cpu_model(), "modelmap_git": git_commit()}, "sizes": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
