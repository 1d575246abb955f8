"""Benchmark: map-model scores on CPU — per-atom Q-score and the CC family, beside cctbx.

Cases, against the EMD-30342 crop (89 x 81 x 63 voxels of 1.113 Å, 3.9 Å):

- 7CEC chain A (4,308 atoms);
- the full 7CEC (17,561 atoms; 40 % of them inside the crop, the rest score against zeros).

For each: MapQ-exact per-atom Q (`q_score`; probe selection and evaluation timed apart), the
Fourier model map, the model mask, CC_mask/box/volume/peaks (`map_model_cc` with the model map
given) and the local CCs (`local_cc`), the map-model FSC, and the differentiable Q (compiled; its
value and its value_and_grad in positions). First call and median of `--repeats` further calls.

With `--cctbx-python PY` (a Python with `cctbx-base pandas gemmi`, see specs/scores.md §3) the
same run times cctbx on both cases: `five_cc` (CC_mask, CC_box, CC_volume, CC_peaks at 3.9 Å) and
`cctbx.maptbx.qscore` (8 probes + r = 0, and 32 probes), with the model shifted by the map's origin
as cctbx needs; and prints its numbers beside ours.

    python benchmarks/bench_scores.py [--repeats 3] [--cctbx-python PY] [--out FILE]

Prints a table and writes JSON (default benchmarks/results/scores.json).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import modelmap as mm
from _common import cpu_model, git_commit
from modelmap import scores

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "emd30342_7cec"
MAP = DATA / "390_emd_30342_A_z4.mrc.gz"
CASES = [("7CEC chain A", DATA / "390_7cec_A.cif.gz"), ("7CEC full", DATA / "390_7cec.cif.gz")]
D = 3.9


def timed(fn, repeats):
    """(first call s, median of `repeats` further calls s, last result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


# runs in the cctbx Python; arguments: map (.mrc, not gzipped), model (not gzipped), D
CCTBX_SCRIPT = """
import json, sys, time
import numpy as np, mrcfile
from iotbx.data_manager import DataManager
from iotbx.map_model_manager import map_model_manager
from mmtbx.maps.correlation import five_cc
from cctbx.maptbx.qscore import calc_qscore
from scitbx.array_family import flex
map_path, model_path, d = sys.argv[1], sys.argv[2], float(sys.argv[3])
out = {}
with mrcfile.open(map_path, permissive=True, header_only=True) as f:
    origin = np.array([float(f.header.origin[a]) for a in "xyz"])
dm = DataManager()
mmgr = dm.get_real_map(map_path)
model = dm.get_model(model_path)
# cctbx ignores an ORIGIN field that is not on a grid point: move the model instead
model.set_sites_cart(model.get_sites_cart() - flex.vec3_double([tuple(origin)] * model.get_number_of_atoms()))
base = map_model_manager(model=model, map_manager=mmgr)
t0 = time.perf_counter()
m = base.model()
m.setup_scattering_dictionaries(scattering_table="electron", d_min=d)
xrs = m.get_xray_structure()
r = five_cc(map=base.map_manager().map_data(), xray_structure=xrs, d_min=d, compute_cc_box=True).result
out["five_cc_s"] = time.perf_counter() - t0
for k in ("cc_mask", "cc_box", "cc_volume", "cc_peaks"):
    out[k] = getattr(r, k)
for name, n_probes, shells in (("q8_r0", 8, [0.0] + list(np.linspace(0.1, 2.0, 20))),
                               ("q32", 32, list(np.linspace(0.1, 2.0, 20)))):
    mmm = base.deep_copy()
    t0 = time.perf_counter()
    res = calc_qscore(mmm, n_probes=n_probes, shells=shells, nproc=1)
    out[name + "_s"] = time.perf_counter() - t0
    out[name + "_mean"] = float(np.mean(res["qscore_per_atom"]))
print(json.dumps(out))
"""


def run_cctbx(python: str, model_path: Path) -> dict:
    """Time cctbx's five_cc and qscore on `model_path` against the crop (files unzipped to a temp folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        m, x = Path(tmp) / "map.mrc", Path(tmp) / "model.cif"
        m.write_bytes(gzip.decompress(MAP.read_bytes()))
        x.write_bytes(gzip.decompress(model_path.read_bytes()))
        proc = subprocess.run([python, "-c", CCTBX_SCRIPT, str(m), str(x), str(D)],
                              capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_case(name, model_path, density, repeats):
    model = mm.read_model(model_path)
    atoms = model.atoms
    grid = density.grid
    row = {"case": name, "atoms": int(model.n_atoms), "grid_xyz": list(grid.shape[::-1]), "voxel": grid.voxel_size[0]}
    first, med, probes = timed(lambda: scores.select_probes(np.asarray(atoms.positions, np.float64)), repeats)
    row["q_probe_selection_s"] = med
    first, med, q = timed(lambda: scores.q_score(density, model, probes=probes), repeats)
    row["q_evaluation_s"] = med
    first, med, q = timed(lambda: scores.q_score(density, model), repeats)
    row["q_total_s"], row["q_mean"] = med, q.mean()
    first, med, model_map = timed(lambda: mm.render_model(atoms, grid, D, method="fourier", sampling="point"), repeats)
    row["model_map_first_s"], row["model_map_s"] = first, med
    model_map = np.asarray(model_map)
    first, med, mask = timed(lambda: scores.model_mask(atoms, grid), repeats)
    row["mask_s"] = med
    first, med, cc = timed(lambda: scores.map_model_cc(density, model, D, model_map=model_map, mask=mask), repeats)
    row["five_cc_s"] = med
    row.update(cc_mask=cc.cc_mask, cc_box=cc.cc_box, cc_volume=cc.cc_volume, cc_peaks=cc.cc_peaks)
    first, med, loc = timed(lambda: scores.local_cc(density, model, D, model_map=model_map), repeats)
    row["local_cc_s"], row["local_residues"] = med, len(loc.residues)
    first, med, _ = timed(lambda: scores.fsc(np.asarray(density.data), model_map, mask=mask, grid=grid), repeats)
    row["fsc_s"] = med
    # differentiable Q (same probes): compiled value and value_and_grad in positions
    data = jnp.asarray(density.data)
    heavy = np.asarray(atoms.atomic_numbers) > 1
    pos = jnp.asarray(np.asarray(atoms.positions)[heavy])
    dprobes = scores.select_probes(np.asarray(atoms.positions, np.float64)[heavy])
    qfun = jax.jit(lambda p: scores.q_score_differentiable(data, grid, p, dprobes))
    loss = jax.jit(jax.value_and_grad(lambda p: -jnp.mean(scores.q_score_differentiable(data, grid, p, dprobes))))
    first, med, _ = timed(lambda: qfun(pos), repeats)
    row["dq_first_s"], row["dq_s"] = first, med
    first, med, _ = timed(lambda: loss(pos), repeats)
    row["dq_grad_first_s"], row["dq_grad_s"] = first, med
    row["all_scores_s"] = (row["q_total_s"] + row["model_map_s"] + row["mask_s"] + row["five_cc_s"]
                           + row["local_cc_s"] + row["fsc_s"])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cctbx-python", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scores.json")
    args = parser.parse_args()
    density = mm.read_map(MAP)
    rows = [bench_case(name, path, density, args.repeats) for name, path in CASES]
    cctbx = {name: run_cctbx(args.cctbx_python, path) for name, path in CASES} if args.cctbx_python else None

    print(f"\nscores on {jax.devices()[0]} ({platform.processor() or platform.machine()}), D = {D} Å, "
          f"median of {args.repeats} after a first call (s)")
    head = ["case", "atoms", "Q probes", "Q eval", "Q total", "model map", "mask", "5 CCs", "local CC",
            "FSC", "all", "dQ", "dQ v&g", "mean Q", "CC_mask"]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["case"], str(r["atoms"])] + [f"{r[k]:.3f}" for k in (
            "q_probe_selection_s", "q_evaluation_s", "q_total_s", "model_map_s", "mask_s", "five_cc_s",
            "local_cc_s", "fsc_s", "all_scores_s", "dq_s", "dq_grad_s")] + [f"{r['q_mean']:.4f}", f"{r['cc_mask']:.4f}"]))
    if cctbx is not None:
        print("\ncctbx in the same run (s; CCs from its own model map, Q means):")
        for name, c in cctbx.items():
            print(f"  {name}: {json.dumps(c)}")
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(jax.devices()[0]),
           "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
           "python": platform.python_version(), "jax": jax.__version__, "modelmap": mm.__version__,
           "modelmap_git": git_commit()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "scores", "environment": env, "resolution": D,
                                    "rows": rows, "cctbx": cctbx}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
