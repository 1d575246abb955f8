"""Benchmark: local resolution, modelmap beside cctbx's `local_resolution_map` on the same half maps.

No real half maps are in the shared data (see ../shared/data/README.md), so the half maps are
synthetic, made from a real model with a known resolution field: 7CEC chain A (B = 30 Å² for every
atom) cut into three slabs of equal width along x whose atoms are at 2.5, 4 and 6 Å, plus independent
white noise per half map (`modelmap.analysis.synthetic_half_maps`). Cases:

- `slice`: the 30 Å thick slice of the test suite (3,316 atoms, 102 × 95 × 47 voxels of 1 Å), Gaussian
  atom images cut steeply at 1/D, noise 1.5 × the signal's sd;
- `chain`: the whole chain (4,308 atoms, 104 × 95 × 75), shell-decomposition images at each D, cut
  steeply at 1/D, noise 1.5;
- `chain-low-noise`: the same at noise 1.0.

Both tools get the same half maps (MRC files), the same finest resolution (Nyquist, 2 Å), 20 shells
and the same window radius (the global FSC = 0.143 resolution; cctbx's default radius is the map's
resolution, which the script sets to the same value). cctbx runs in its own venv (`--cctbx`, the
venv's python) through `iotbx.map_model_manager.map_model_manager(...).local_resolution_map`,
headless; its map is read back and checked to be on the same grid.

Reported per case: the median local resolution at the atoms of each region (truth 2.5 / 4 / 6 Å),
the same over each region's interior (atoms over 8 Å from a boundary), the two tools' agreement
(Pearson r of the per-atom values, median |difference|), and wall times (modelmap: first call with
compilation and a second call; cctbx: the call, maps read before). Timings are indications: the
machine's 2 cores were shared with other jobs.

    python benchmarks/bench_analysis_locres.py --cctbx /work/venvs/cctbx/bin/python
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import modelmap as mm
from modelmap import Grid
from modelmap.analysis import atom_local_resolution, local_resolution, synthetic_half_maps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

LEVELS = (2.5, 4.0, 6.0)
CASES = {"slice": (15.0, "gaussian", 1.5), "chain": (None, "shells", 1.5), "chain-low-noise": (None, "shells", 1.0)}

CCTBX_SCRIPT = r'''
import json, sys, time
from iotbx.map_manager import map_manager
from iotbx.map_model_manager import map_model_manager
h1, h2, out = sys.argv[1:4]
d_min, radius, n_bins = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
m1, m2 = map_manager(h1), map_manager(h2)
mmm = map_model_manager(map_manager_1=m1, map_manager_2=m2)
mmm.set_resolution(radius)  # cctbx's smoothing radius = resolution x smoothing_radius_ratio (1)
t = time.perf_counter()
lr = mmm.local_resolution_map(d_min=d_min, smoothing_radius=radius, n_bins=n_bins, fsc_cutoff=0.143)
seconds = time.perf_counter() - t
lr.write_map(out)
print(json.dumps({"seconds": seconds}))
'''


def make_case(model_path: Path, band, method, noise, seed=0):
    model = mm.read_model(model_path)
    atoms = eqx.tree_at(lambda a: a.b_factors, model.atoms, jnp.full_like(model.atoms.b_factors, 30.0))
    z = np.asarray(atoms.positions)[:, 2]
    sel = np.arange(z.size) if band is None else np.flatnonzero(np.abs(z - np.median(z)) < band)
    atoms = jax.tree.map(lambda x: x[sel], atoms)
    x = np.asarray(atoms.positions)[:, 0]
    edges = x.min() + np.ptp(x) * np.array([1 / 3, 2 / 3])
    truth = np.asarray(LEVELS, np.float32)[np.searchsorted(edges, x)]
    interior = np.min(np.abs(x[:, None] - edges[None]), axis=1) > 8.0
    grid = Grid.around_positions(np.asarray(atoms.positions), voxel_size=1.0, padding=8.0)
    h1, h2, _ = synthetic_half_maps(atoms, truth, grid, key=jax.random.key(seed), noise=noise, method=method)
    return atoms, truth, interior, grid, h1, h2


def regions(values, truth, interior) -> dict:
    return {"median": {str(d): float(np.median(values[truth == d])) for d in LEVELS},
            "interior_median": {str(d): float(np.median(values[(truth == d) & interior])) for d in LEVELS}}


def run_cctbx(python: str, h1: Path, h2: Path, out: Path, d_min: float, radius: float, n_bins: int) -> dict:
    script = out.parent / "cctbx_locres.py"
    script.write_text(CCTBX_SCRIPT)
    t = time.perf_counter()
    proc = subprocess.run([python, str(script), str(h1), str(h2), str(out), str(d_min), str(radius), str(n_bins)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"cctbx's local_resolution_map failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds_with_start": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--cctbx", default=None, help="python of a venv with cctbx-base (e.g. /work/venvs/cctbx/bin/python)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--shells", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_path = args.data / "emd30342_7cec" / "390_7cec_A.cif.gz"
    if not model_path.exists():
        sys.exit(f"{model_path} not found: pass --data (the shared data folder)")
    results = []
    for name in args.cases.split(","):
        band, method, noise = CASES[name]
        atoms, truth, interior, grid, h1, h2 = make_case(model_path, band, method, noise)
        t = time.perf_counter()
        lr = local_resolution(h1, h2, grid, n_shells=args.shells)
        first = time.perf_counter() - t
        t = time.perf_counter()
        lr = local_resolution(h1, h2, grid, n_shells=args.shells)
        second = time.perf_counter() - t
        ours, _ = atom_local_resolution(lr.resolution, grid, atoms.positions, d_range=(0.0, 1e9))
        row = {"case": name, "atoms": int(truth.size), "grid": list(grid.shape), "render": method, "noise": noise,
               "global_fsc_resolution": lr.global_resolution, "radius": lr.radius, "n_shells": args.shells,
               "modelmap": {**regions(ours, truth, interior), "seconds_first": first, "seconds": second}}
        if args.cctbx:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                mm.write_map(tmp / "h1.mrc", h1, grid)
                mm.write_map(tmp / "h2.mrc", h2, grid)
                try:
                    timing = run_cctbx(args.cctbx, tmp / "h1.mrc", tmp / "h2.mrc", tmp / "lr.mrc", lr.d_min,
                                       lr.radius, args.shells)
                    theirs_map = mm.read_map(tmp / "lr.mrc")
                    if not theirs_map.grid.same_as(grid):
                        raise RuntimeError(f"cctbx's map came back on another grid: {theirs_map.grid} vs {grid}")
                    theirs, _ = atom_local_resolution(theirs_map.data, grid, atoms.positions, d_range=(0.0, 1e9))
                    row["cctbx"] = {**regions(theirs, truth, interior), **timing}
                    row["agreement"] = {"pearson_r_atoms": float(np.corrcoef(ours, theirs)[0, 1]),
                                        "median_abs_diff_atoms": float(np.median(np.abs(ours - theirs)))}
                except RuntimeError as err:
                    row["cctbx"] = {"error": str(err)}
        results.append(row)
    print(f"\n{'case':16} {'tool':9} {'2.5 Å':>6} {'4 Å':>6} {'6 Å':>6} | {'interior 2.5/4/6':>20} | {'time s':>7}")
    for r in results:
        for tool in ("modelmap", "cctbx"):
            t = r.get(tool)
            if t is None or "error" in t:
                if t is not None:
                    print(f"{r['case']:16} {tool:9} {t['error']}")
                continue
            m, i = t["median"], t["interior_median"]
            secs = t["seconds"]
            print(f"{r['case']:16} {tool:9} {m['2.5']:6.2f} {m['4.0']:6.2f} {m['6.0']:6.2f} | "
                  f"{i['2.5']:6.2f} {i['4.0']:6.2f} {i['6.0']:6.2f} | {secs:7.2f}")
        if "agreement" in r:
            a = r["agreement"]
            print(f"{'':16} per-atom r {a['pearson_r_atoms']:.3f}, median |diff| {a['median_abs_diff_atoms']:.2f} Å; "
                  f"global FSC {r['global_fsc_resolution']:.2f} Å, window {r['radius']:.2f} Å")
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_analysis_locres_{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_model(), "device": str(jax.devices()[0]), "python": platform.python_version(),
            "jax": jax.__version__, "modelmap": mm.__version__ if hasattr(mm, "__version__") else None,
            "cctbx_python": args.cctbx, "command": " ".join(sys.argv)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
