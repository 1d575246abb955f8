"""Benchmark: local map scale (map only) beside OccuPy, and model-aware occupancy (issue 20).

Cases:

1. `emd5168`: EMD-5168 (F-actin, 100³ voxels of 1.742 Å) through `modelmap.analysis.local_scale` and
   OccuPy 0.1.13 (`occupy_lib.estimate.occupy_run`, its Python API, headless, in its own venv through a
   subprocess), both with OccuPy's defaults: scale mode `res` and mode `occ` (OccuPy's `--lp-scale`),
   and the amplified map (γ = 2). Reports the CC and max |difference| of the scale maps, the CC of the
   confidence and amplified maps, OccuPy's logged τ, kernel size, full scale and solvent peak beside
   ours, and wall times (OccuPy's subprocess from start to end, ours with and without compilation).
2. `synthetic`: a 16-residue ideal helix in four regions of 4 residues with known occupancies
   (1.0, 0.7, 0.5, 0.3) and resolutions (5, 3, 4, 3 Å): each region's exact Fourier map (NUFFT, cut at
   its resolution) summed, plus 2 % Gaussian noise, on a 1.5 Å grid padded to a cube for OccuPy. Per
   region: the mean map-only scale at the atoms (modelmap's and OccuPy's, both modes) and the mean
   fitted occupancy of `fit_occupancy` with `blur="res"` (one resolution per residue, from a uniform
   4 Å start, `--steps`) and with `blur="b"` (per-atom B, model map at 3.1 Å; `--steps` and 4×
   as many), with the largest per-residue error.

OccuPy 0.1.13 calls `np.product`, which numpy 2 removed; the subprocess script sets
`np.product = np.prod` before importing it (nothing in its venv is changed).

    python benchmarks/bench_analysis_occupancy.py [--occupy /work/venvs/occupy/bin/python]
        [--cases emd5168,synthetic] [--out benchmarks/results/analysis_occupancy.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import modelmap as mm
from modelmap import Grid
from modelmap.analysis import fit_occupancy, local_scale, modify_by_scale, regional_map

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODELMAP_TEST_DATA", ROOT.parent / "shared" / "data"))
EMD5168 = DATA / "emd5168_actin" / "emd_5168.map.gz"

OCCUPY_SCRIPT = r'''
import json, sys, time
import numpy as np
if not hasattr(np, "product"):
    np.product = np.prod  # OccuPy 0.1.13 calls np.product, removed in numpy 2
import matplotlib
matplotlib.use("Agg")
from occupy_lib import estimate  # before args: the two import each other
from occupy_lib import args
from occupy_lib._version import __version__
settings = json.loads(sys.argv[2])
t = time.perf_counter()
estimate.occupy_run(args.occupy_options(input_map=sys.argv[1], chimerax=False, quiet=True, **settings))
print(json.dumps({"time": time.perf_counter() - t, "version": __version__}))
'''


def run_occupy(python: str, map_path: Path, workdir: Path, **settings) -> dict:
    """Run OccuPy on `map_path` in `workdir` (its outputs land there); returns its time and log numbers."""
    script = workdir / "run_occupy.py"
    script.write_text(OCCUPY_SCRIPT)
    t = time.perf_counter()
    proc = subprocess.run([python, str(script), map_path.name, json.dumps(settings)], cwd=workdir,
                          capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"OccuPy failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log = (workdir / f"log_{map_path.stem}.txt").read_text()

    def number(label):
        m = re.search(label + r"[^\n]*?:\s*(?:\[[^\]]*\])?\s*(-?[\d.]+)\s*$", log, re.M)
        return float(m.group(1)) if m else None

    return {"time_in_python": out["time"], "time_subprocess": wall, "version": out["version"],
            "tau": number(r"Tau      "), "kernel_voxels": number(r"Kernel nv"), "full_scale": number(r"Full scale"),
            "solvent_peak": number(r"Solvent peak"), "lowpass": number(r"LP Filt\. ")}


def _read(path: Path) -> np.ndarray:
    import mrcfile

    with mrcfile.open(path, permissive=True) as f:
        return np.asarray(f.data, np.float64)


def _cc(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def _timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    jax.block_until_ready(out.scale if hasattr(out, "scale") else out)
    return out, time.perf_counter() - t


def case_emd5168(python: str | None) -> list[dict]:
    density = mm.read_map(EMD5168)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="occupy_"))
    try:
        map_path = work / "emd_5168.map"
        with gzip.open(EMD5168, "rb") as src, open(map_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        for mode in ("res", "occ"):
            ls, t_first = _timed(local_scale, density.data, density.grid, mode=mode)
            ls, t_warm = _timed(local_scale, density.data, density.grid, mode=mode)
            ampl = np.asarray(modify_by_scale(density.data, ls, "amplify", 2.0))
            row = {"case": "emd5168", "mode": mode, "modelmap_time_first_s": t_first, "modelmap_time_s": t_warm,
                   "modelmap": {"tau": ls.tau, "kernel_voxels": ls.kernel_voxels, "full_scale": ls.full_scale,
                                "solvent_peak": ls.solvent.mean, "lowpass": ls.lowpass}}
            if python:
                try:
                    sub = work / mode
                    sub.mkdir()
                    os.link(map_path, sub / map_path.name)
                    occ = run_occupy(python, sub / map_path.name, sub, scale_mode=mode, amplify=2.0,
                                     lp_scale=mode == "occ")
                    scale = _read(sub / f"scale_{mode}_emd_5168.mrc")
                    conf = _read(sub / "conf_emd_5168.mrc")
                    amp = _read(sub / "ampl_2.0_emd_5168.mrc")
                    s = np.asarray(ls.scale)
                    row |= {"occupy": occ, "scale_cc": _cc(s, scale), "scale_max_abs_diff": float(np.abs(s - scale).max()),
                            "scale_mean_abs_diff": float(np.abs(s - scale).mean()),
                            "confidence_cc": _cc(ls.confidence, conf), "amplified_cc": _cc(ampl, amp)}
                except (RuntimeError, OSError, FileNotFoundError) as err:
                    row["occupy_error"] = str(err)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


OCC = np.array([1.0, 0.7, 0.5, 0.3])
RES = np.array([5.0, 3.0, 4.0, 3.0])


def _synthetic():
    from modelmap._peptide import ideal_peptide
    from modelmap.io import model_from_structure

    model = model_from_structure(ideal_peptide("AAAAGAAAAAAAGAAA", b_factor=20.0))
    a = model.atoms
    res = np.asarray(model.labels.residue_number)
    region = np.digitize(res, [res.min() + 4, res.min() + 8, res.min() + 12])
    grid = Grid.around_positions(np.asarray(a.positions), voxel_size=1.5, padding=5.0)
    n = 2 * ((max(grid.shape) + 1) // 2) + 8  # cubic and even for OccuPy, with room around
    pad = [(n - s) // 2 for s in grid.shape]
    origin = tuple(o - p * 1.5 for o, p in zip(grid.origin, pad[::-1]))
    grid = Grid((n, n, n), 1.5, origin)
    target = regional_map(a, grid, region, OCC, RES)
    target = target + 0.02 * float(jnp.max(target)) * jax.random.normal(jax.random.PRNGKey(1), target.shape)
    return model, region, grid, target


def _per_region(values, region) -> list[float]:
    return [float(np.mean(values[region == k])) for k in range(4)]


def case_synthetic(python: str | None, steps: int) -> list[dict]:
    model, region, grid, target = _synthetic()
    pos = model.atoms.positions
    rows = []
    for mode in ("res", "occ"):
        ls, t = _timed(local_scale, target, grid, mode=mode)
        at = np.asarray(mm.interpolate_map(ls.scale, grid, pos))
        means = _per_region(at, region)
        rows.append({"case": "synthetic", "method": f"modelmap local_scale ({mode})", "per_region": means,
                     "max_region_error": float(np.max(np.abs(np.array(means) - OCC))), "time_s": t})
    if python:
        work = Path(tempfile.mkdtemp(prefix="occupy_syn_"))
        try:
            path = mm.write_map(work / "synthetic.mrc", np.asarray(target), grid)
            for mode in ("res", "occ"):
                sub = work / mode
                sub.mkdir()
                os.link(path, sub / path.name)
                try:
                    occ = run_occupy(python, sub / path.name, sub, scale_mode=mode, lp_scale=mode == "occ")
                    scale = _read(sub / f"scale_{mode}_synthetic.mrc")
                    at = np.asarray(mm.interpolate_map(jnp.asarray(scale, jnp.float32), grid, pos))
                    means = _per_region(at, region)
                    rows.append({"case": "synthetic", "method": f"OccuPy {occ['version']} ({mode})", "per_region": means,
                                 "max_region_error": float(np.max(np.abs(np.array(means) - OCC))),
                                 "time_s": occ["time_subprocess"]})
                except (RuntimeError, OSError) as err:
                    rows.append({"case": "synthetic", "method": f"OccuPy ({mode})", "error": str(err)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    # blur="res" starts every residue at 4 Å; blur="b" needs the finest resolution (B only blurs): 3.1 Å,
    # just inside the 1.5 Å grid's Nyquist limit
    for blur, d, n in (("res", 4.0, steps), ("b", 3.1, steps), ("b", 3.1, 4 * steps)):
        t = time.perf_counter()
        fit = fit_occupancy(target, model, d, grid=grid, blur=blur, max_steps=n)
        t = time.perf_counter() - t
        means = _per_region(fit.occupancy, region)
        row = {"case": "synthetic", "method": f"modelmap fit_occupancy (blur={blur}, {n} steps)", "per_region": means,
               "max_region_error": float(np.max(np.abs(np.array(means) - OCC))),
               "max_residue_error": float(np.max(np.abs(fit.occupancy - OCC[region]))), "time_s": t,
               "steps": fit.refinement.n_steps, "normalisation": fit.normalisation}
        if fit.resolution is not None:
            row["resolution_per_region"] = _per_region(fit.resolution, region)
        else:
            row["b_per_region"] = _per_region(fit.b_factors, region)
        rows.append(row)
    return rows


def print_table(rows):
    for r in rows:
        if r["case"] == "emd5168":
            line = f"EMD-5168 {r['mode']}: modelmap {r['modelmap_time_s']:.3f} s (first {r['modelmap_time_first_s']:.2f} s)"
            if "scale_cc" in r:
                o = r["occupy"]
                line += (f", OccuPy {o['time_subprocess']:.2f} s (in Python {o['time_in_python']:.2f} s); scale CC "
                         f"{r['scale_cc']:.5f} max|d| {r['scale_max_abs_diff']:.2g}; confidence CC "
                         f"{r['confidence_cc']:.4f}; amplified CC {r['amplified_cc']:.5f}; full scale "
                         f"{r['modelmap']['full_scale']:.4f} vs {o['full_scale']}; tau {r['modelmap']['tau']:.4f} vs "
                         f"{o['tau']}; kernel {r['modelmap']['kernel_voxels']} vs {o['kernel_voxels']}; solvent peak "
                         f"{r['modelmap']['solvent_peak']:.3f} vs {o['solvent_peak']}")
            elif "occupy_error" in r:
                line += f"; OccuPy failed: {r['occupy_error']}"
            print(line)
    syn = [r for r in rows if r["case"] == "synthetic"]
    if syn:
        print("\nsynthetic helix, 4 regions: occupancy " + " / ".join(f"{o:.1f}" for o in OCC) + " at "
              + " / ".join(f"{d:g} Å" for d in RES))
        print(f"| {'method':44} | {'region means':27} | max error | time (s) |")
        print(f"|{'-' * 46}|{'-' * 29}|-----------|----------|")
        for r in syn:
            if "error" in r:
                print(f"| {r['method']:44} | failed: {r['error'][:60]}")
                continue
            means = " ".join(f"{v:.3f}" for v in r["per_region"])
            print(f"| {r['method']:44} | {means:27} | {r['max_region_error']:9.3f} | {r['time_s']:8.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--occupy", default="/work/venvs/occupy/bin/python",
                   help="the Python of a venv with OccuPy installed (pip install occupy); 'none' to skip it")
    p.add_argument("--cases", default="emd5168,synthetic")
    p.add_argument("--steps", type=int, default=15, help="fit_occupancy steps of the synthetic case")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis_occupancy.json"))
    args = p.parse_args()
    python = None if args.occupy == "none" else args.occupy
    if python and not Path(python).exists():
        print(f"note: OccuPy's Python {python} does not exist: OccuPy rows are skipped", file=sys.stderr)
        python = None
    cases = args.cases.split(",")
    rows = []
    if "emd5168" in cases:
        rows += case_emd5168(python)
    if "synthetic" in cases:
        rows += case_synthetic(python, args.steps)
    print_table(rows)
    meta = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "jax": jax.__version__, "modelmap": mm.__version__, "cases": cases,
            "occupy_python": python}
    try:
        from _common import cpu_model

        meta["cpu"] = cpu_model()
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
