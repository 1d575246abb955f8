"""Benchmark: sharpening (issue 20) beside phenix.auto_sharpen, on real maps, in the same run.

For each map + model: the original map, modelmap's global Guinier sharpening (the whole fitted B, as
Rosenthal & Henderson / RELION; and the B relative to the model's B = 0 map), modelmap's local
amplitude scaling (model map with the model's B, with B = 0, and with B = 0 and a model floor of 0.3) and phenix.auto_sharpen (cctbx-base,
its defaults: a b_iso sharpening chosen by the adjusted surface area, no model), each judged by
CC_mask against the model map at B = 0 and D (the Fourier map) and by the model's mean Q-score
(MapQ, σ 0.6), with its time. Every map is low-passed at D except the original.

phenix.auto_sharpen in cctbx-base: `cctbx/command_line/auto_sharpen.py` is there but no `phenix.*`
command is installed (cctbx-base has no dispatchers for phenix names), the command is deprecated
("replaced by phenix.map_sharpening", run it with `--force`), and its path imports
`mmtbx.command_line.map_box`, which imports the Phenix GUI package `wxGUI2` at module level (for its
GUI launcher only), absent from cctbx-base. The runner below puts an empty `wxGUI2` module in
`sys.modules` and calls `cctbx.maptbx.auto_sharpen.run` headless: nothing of the GUI is used.

The map goes to phenix with its origin moved to 0 (cctbx and the zoned crops' ORIGIN field disagree);
its output array is put back on the input's grid and checked against the input by a correlation.

    python benchmarks/bench_analysis_sharpen.py [--cases e30342,e2566,e5168]
        [--cctbx /work/venvs/cctbx/bin/python] [--out benchmarks/results/analysis_sharpen.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import modelmap as mm
from modelmap import Grid, render_model
from modelmap.analysis import guinier_b, local_amplitude_scale, sharpen
from modelmap.scores import map_model_cc, q_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODELMAP_TEST_DATA", ROOT.parent / "shared" / "data"))
CASES = {
    "e30342": ("EMD-30342 crop, 7CEC chain A", "emd30342_7cec/390_emd_30342_A_z4.mrc.gz",
               "emd30342_7cec/390_7cec_A.cif.gz", 3.9),
    "e2566": ("EMD-2566 zone, 3J6B chain 9", "emd2566_3j6b_chain9/2566_3J6B_9.mrc",
              "emd2566_3j6b_chain9/3J6B_9.pdb", 3.2),
    "e5168": ("EMD-5168 (100³), 3MFP", "emd5168_actin/emd_5168.map.gz", "emd5168_actin/3MFP.pdb", 6.6),
}

FLOOR = 0.3  # a --model-floor row beside LocScale's 0

RUNNER = """
import sys, types
stub = types.ModuleType("wxGUI2"); stub.utils = types.ModuleType("wxGUI2.utils")
sys.modules["wxGUI2"] = stub; sys.modules["wxGUI2.utils"] = stub.utils
from cctbx.maptbx.auto_sharpen import run
run(args=sys.argv[1:])
"""


def _shifted_model(model_path: Path, shift, out: Path) -> None:
    """Write the model moved by `shift` (Å) as PDB (for a map whose origin was moved to 0)."""
    import gemmi

    st = gemmi.read_structure(str(model_path))
    st.setup_entities()
    st.remove_hydrogens()
    d = gemmi.Position(*(float(v) for v in shift))
    for m in st:
        for ch in m:
            for res in ch:
                for atom in res:
                    atom.pos = atom.pos + d
    st.write_pdb(str(out))


def phenix_auto_sharpen(cctbx_python: str, data: np.ndarray, grid: Grid, resolution: float,
                        model_path: Path | None = None) -> dict:
    """Run phenix.auto_sharpen (cctbx-base) on `data` (with `model_path`: its model_sharpening); returns
    its map on `grid`, time, B values or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mm.write_map(tmp / "in.mrc", data, Grid(grid.shape, grid.voxel_size, (0.0, 0.0, 0.0)))
        (tmp / "run.py").write_text(RUNNER)
        extra = []
        if model_path is not None:
            _shifted_model(model_path, -np.asarray(grid.origin, float), tmp / "model.pdb")
            extra = ["pdb_file=model.pdb", "auto_sharpen_methods=model_sharpening"]
        t0 = time.perf_counter()
        proc = subprocess.run([cctbx_python, "run.py", "map_file=in.mrc", f"resolution={resolution}",
                               "sharpened_map_file=out.mrc", *extra], cwd=tmp, capture_output=True, text=True,
                              timeout=1800)
        seconds = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not (tmp / "out.mrc").exists():
            tail = " | ".join(log.strip().splitlines()[-3:])
            return {"error": f"phenix.auto_sharpen failed (exit {proc.returncode}): {tail}", "seconds": seconds}
        out = mm.read_map(tmp / "out.mrc")
        if tuple(out.data.shape) != tuple(grid.shape):
            return {"error": f"phenix.auto_sharpen wrote a map of shape {out.data.shape}, not {grid.shape}",
                    "seconds": seconds}

        def number(label):
            m = re.search(label + r"\s*:?\s*(-?[0-9.]+)", log)
            return float(m.group(1)) if m else None

        return {"map": np.asarray(out.data, np.float32), "seconds": seconds,
                "b_sharpen": number("Overall b_sharpen applied"), "final_b_iso": number("Final b_iso obtained"),
                "method": (re.search(r"Sharpening method used:\s*(.+)", log) or [None, None])[1]}


def model_bias(data, grid, atoms, model_b, d) -> dict:
    """How much the local scaling imprints the model: leave a contiguous 7 % of the atoms (from the
    middle of the file) out of the model map and compare the mean map value at those atoms with that
    at the kept atoms (a ratio), in the original map, the local map of the full model and the local
    map of the cut model."""
    n = atoms.positions.shape[0]
    keep = np.ones(n, bool)
    keep[n // 2: n // 2 + max(n * 7 // 100, 1)] = False
    cut = type(atoms)(atoms.positions[keep], atoms.atomic_numbers[keep], atoms.b_factors[keep], atoms.occupancies[keep])
    model_cut = np.asarray(render_model(cut, grid, d, method="fourier", sampling="point"))
    pos = jnp.asarray(atoms.positions)

    def ratio(m):
        v = np.asarray(mm.interpolate_map(jnp.asarray(m, jnp.float32), grid, pos))
        return float(v[~keep].mean() / v[keep].mean())

    return {"atoms_left_out": int((~keep).sum()), "original": ratio(data),
            "local, full model": ratio(local_amplitude_scale(data, grid, model_b, d)),
            "local, model without them": ratio(local_amplitude_scale(data, grid, model_cut, d)),
            f"local, model without them, floor {FLOOR:g}": ratio(local_amplitude_scale(data, grid, model_cut, d,
                                                                                       model_floor=FLOOR))}


def run_case(key: str, cctbx_python: str | None) -> dict:
    label, map_file, model_file, d = CASES[key]
    density = mm.read_map(DATA / map_file)
    model = mm.read_model(DATA / model_file)
    atoms, grid = model.atoms, density.grid
    data = np.asarray(density.data, np.float32)
    zero = type(atoms)(atoms.positions, atoms.atomic_numbers, np.zeros_like(atoms.b_factors), atoms.occupancies)
    t0 = time.perf_counter()
    model_zero = np.asarray(render_model(zero, grid, d, method="fourier", sampling="point"))
    model_b = np.asarray(render_model(atoms, grid, d, method="fourier", sampling="point"))
    t_render = (time.perf_counter() - t0) / 2

    def timed(f, *args, **kw):
        f(*args, **kw)  # compile
        t = time.perf_counter()
        out = jax.block_until_ready(f(*args, **kw))
        return out, time.perf_counter() - t

    fit, t_fit = timed(guinier_b, data, grid, d)
    fit0 = guinier_b(model_zero, grid, d)
    rows = {"original": {"map": data, "seconds": 0.0}}
    g, t = timed(sharpen, data, grid, fit.b, d)
    rows["global Guinier B"] = {"map": np.asarray(g), "seconds": t + t_fit, "b": fit.b}
    g, t = timed(sharpen, data, grid, fit.b - fit0.b, d)
    rows["global B relative to model"] = {"map": np.asarray(g), "seconds": t + 2 * t_fit, "b": fit.b - fit0.b}
    g, t = timed(local_amplitude_scale, data, grid, model_b, d)
    rows["local (model's B)"] = {"map": np.asarray(g), "seconds": t, "render_seconds": t_render}
    g, t = timed(local_amplitude_scale, data, grid, model_zero, d)
    rows["local (B = 0)"] = {"map": np.asarray(g), "seconds": t, "render_seconds": t_render}
    g, t = timed(local_amplitude_scale, data, grid, model_zero, d, model_floor=FLOOR)
    rows[f"local (B = 0, floor {FLOOR:g})"] = {"map": np.asarray(g), "seconds": t, "render_seconds": t_render}
    phenix = {}
    for name, model_path in (("phenix.auto_sharpen", None), ("phenix.auto_sharpen (model)", DATA / model_file)):
        run = ({"error": "not run (no --cctbx)"} if cctbx_python is None
               else phenix_auto_sharpen(cctbx_python, data, grid, d, model_path))
        if "map" in run:
            check = float(np.corrcoef(np.asarray(sharpen(data, grid, 0.0, d)).ravel(), run["map"].ravel())[0, 1])
            run["cc_with_input_lowpassed"] = check
            rows[name] = run
        phenix[name] = {k: v for k, v in run.items() if k != "map"}
    bias = model_bias(data, grid, atoms, model_b, d)
    out = {"case": key, "label": label, "map": map_file, "model": model_file, "resolution": d,
           "grid": list(grid.shape), "voxel_size": float(grid.voxel_size[0]), "atoms": int(atoms.positions.shape[0]),
           "guinier_b": fit.b, "guinier_rms": fit.rms, "model_b0_guinier_b": fit0.b,
           "phenix": phenix, "model_bias": bias, "rows": {}}
    for name, row in rows.items():
        dm = mm.io.DensityMap(jnp.asarray(row["map"], jnp.float32), grid)
        cc = map_model_cc(dm, atoms, d, model_map=model_zero)
        q = float(np.nanmean(np.asarray(q_score(dm, model).q)))
        out["rows"][name] = {"cc_mask": cc.cc_mask, "cc_box": cc.cc_box, "q_mean": q,
                             **{k: v for k, v in row.items() if k not in ("map",)}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="e30342,e2566,e5168")
    p.add_argument("--cctbx", default="/work/venvs/cctbx/bin/python",
                   help="python of a venv with cctbx-base (phenix.auto_sharpen); 'none' to skip it")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_analysis_sharpen.json"))
    args = p.parse_args()
    cctbx = None if args.cctbx == "none" else args.cctbx
    if cctbx is not None and not Path(cctbx).exists():
        sys.exit(f"--cctbx {cctbx}: no such file (the python of a venv with cctbx-base installed)")
    results = []
    for key in args.cases.split(","):
        r = run_case(key, cctbx)
        results.append(r)
        print(f"\n{r['label']} at {r['resolution']:g} Å: Guinier B {r['guinier_b']:.1f} Å², model map at B = 0 "
              f"{r['model_b0_guinier_b']:.1f} Å²")
        for name, ph in r["phenix"].items():
            print(f"  {name}: {ph.get('method') or ph.get('error')}, b_sharpen {ph.get('b_sharpen')}, "
                  f"CC with the input (low-passed) {ph.get('cc_with_input_lowpassed')}")
        b = r["model_bias"]
        print(f"  model bias: mean density at {b['atoms_left_out']} atoms left out of the model / at the kept "
              f"atoms: original {b['original']:.3f}, local (full model) {b['local, full model']:.3f}, local "
              f"(model without them) {b['local, model without them']:.3f}, the same with --model-floor {FLOOR:g} "
              f"{b[f'local, model without them, floor {FLOOR:g}']:.3f}")
        print(f"{'map':30s} {'CC_mask':>8s} {'mean Q':>8s} {'time (s)':>9s}")
        for name, row in r["rows"].items():
            print(f"{name:30s} {row['cc_mask']:8.4f} {row['q_mean']:8.4f} {row['seconds']:9.2f}")
    payload = {"benchmark": "analysis_sharpen", "device": str(jax.devices()[0]), "cpu": cpu_model(),
               "python": platform.python_version(), "jax": jax.__version__,
               "note": "CC_mask against the model map at B = 0 and D; mean Q (MapQ, sigma 0.6) of the model; "
                       "times: our functions after one warm-up call (compile excluded), phenix the whole "
                       "command (process start included); render_seconds: one model map", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
