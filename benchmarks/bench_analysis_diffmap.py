"""Benchmark: difference maps (issue 20), modelmap beside phenix.real_space_diff_map and servalcat fofc.

Cases: atoms are removed from a deposited / fitted model, the difference map of the map against the
rest is computed by each tool on the same inputs, and the removed atoms are looked for among the
positive peaks.

1. `apo6`: EMD-20026 (apoferritin, 1.75 Å) with 3AJO fitted: the 6 hetero atoms the map supports
   (map value at the atom >= 3σ of the masked map: 2 Mg, 4 waters) removed.
2. `apo_het`: the same map, all 12 Mg and 229 waters removed; the 6 supported ones are the targets,
   and the top-20 peaks' "purity" (within 1 Å of any removed atom) is reported.
3. `7cec_trp190`, `7cec_tyr329`: EMD-30342 zone (3.9 Å) with 7CEC chain A, the side chain (CB
   onwards) of Trp 190 / Tyr 329 removed.

modelmap runs twice: in this process (`wall_s_first` with compilation, `wall_s` warm; reading the
files not included) and as `modelmap diffmap` on the anchors' files (`modelmap_cli`: a new process,
so JAX's start-up, compilation and the files' reading and writing are in its time, as they are in
the anchors').

Per tool and case: for each target atom the nearest positive peak's rank, height and distance;
how many targets have a peak within 1 Å; the strongest peak within 5 Å of the removed atoms (rank,
height, distance to the nearest removed atom); the CC of the tool's difference map with modelmap's
over the map's support; wall time. All maps go through the same peak search
(`modelmap.analysis.difference_peaks`: local maxima >= 3σ, 2 Å away from the zone's edge) after
dividing each by its own standard deviation over the map's support (voxels not exactly 0), so that
heights are comparable: phenix divides by the σ of the whole box, servalcat by the σ in its mask.

Anchors (each in its own venv, run as a subprocess):
- phenix.real_space_diff_map: cctbx-base from PyPI ships the module
  `mmtbx.command_line.real_space_diff_map` but no `phenix.real_space_diff_map` launcher (the
  dispatcher names come from a Phenix / libtbx build, not from the wheel), so it runs as
  `PYTHON -m mmtbx.command_line.real_space_diff_map model.pdb map.mrc resolution=D
  scattering_table=electron` (`--phenix PYTHON`, e.g. /work/venvs/cctbx/bin/python). It writes
  `map_model_difference_2.ccp4` (map_type=vector: (F_obs, φ_obs) − k·exp(−B s²/4)(F_calc, φ_calc),
  k and B searched per ~30 Å box) and `_1` (obs_phase: (|F_obs| − |F_calc|, φ_obs)); both are scored.
- servalcat fofc (`--servalcat PATH`): with one map (`--map`; no half maps are in the shared data)
  it has no noise estimate, so every shell gets weight 1 and the map is F_o − D·F_c with D fitted
  per resolution bin; `--mask_radius 3` gives it a mask to normalise in (`*_normalized_fofc.mrc`).

Frames: both anchors read the map with a zero origin (gemmi and cctbx place a map by NSTART and
ignore the ORIGIN field the crops use), so the map is written with origin 0 and the model
translated by −origin (as `_servalcat.py` does); their maps come back on the same voxels.

    python benchmarks/bench_analysis_diffmap.py --phenix /work/venvs/cctbx/bin/python \\
        --servalcat /work/venvs/servalcat/bin/servalcat --out benchmarks/results/analysis_diffmap.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemmi
import jax
import numpy as np
from scipy.spatial import cKDTree

import modelmap as mm
from _common import cpu_model
from modelmap import Grid
from modelmap.analysis import difference_map, difference_peaks

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODELMAP_TEST_DATA", ROOT.parent / "shared" / "data"))
APO_MAP = DATA / "emd20026_apoferritin" / "emd20026_prot.mrc.gz"
APO_MODEL = DATA / "emd20026_apoferritin" / "3ajo_fitted_refined.pdb"
CEC_MAP = DATA / "emd30342_7cec" / "390_emd_30342_A_z4.mrc.gz"
CEC_MODEL = DATA / "emd30342_7cec" / "390_7cec_A.cif.gz"
BACKBONE = ("N", "CA", "C", "O")


def case_inputs(name):
    """(map, model, resolution, removed indices, target indices, description)."""
    if name.startswith("apo"):
        density, model, d = mm.read_map(APO_MAP), mm.read_model(APO_MODEL), 1.75
        lab = model.labels
        sd = density.data[density.data != 0].std()
        at = np.asarray(mm.interpolate_map(density.data, density.grid, model.atoms.positions)) / sd
        het = np.asarray(lab.is_hetero)
        supported = np.flatnonzero(het & (at >= 3.0))
        if name == "apo6":
            return density, model, d, supported, supported, "the 6 Mg/waters the map supports (>= 3σ at the atom) removed"
        if name == "apo_het":
            return (density, model, d, np.flatnonzero(het), supported,
                    "all 12 Mg and 229 waters removed; targets: the 6 the map supports")
    if name.startswith("7cec_"):
        density, model, d = mm.read_map(CEC_MAP), mm.read_model(CEC_MODEL), 3.9
        lab = model.labels
        resnum = {"7cec_trp190": 190, "7cec_tyr329": 329}[name]
        removed = np.flatnonzero((np.asarray(lab.residue_number) == resnum) & ~np.isin(lab.atom_name, BACKBONE))
        return (density, model, d, removed, removed,
                f"side chain of {lab.residue_name[removed[0]]} {resnum} (CB onwards, {len(removed)} atoms) removed")
    raise SystemExit(f"unknown case {name!r}")


def write_anchor_inputs(folder: Path, density, model_path, model, removed):
    """The map at a zero origin and the model without the removed atoms, moved by −origin, as PDB
    (phenix) and mmCIF (servalcat); P 1 in the map's box cell."""
    grid = density.grid
    mm.write_map(folder / "map.mrc", density.data, Grid(grid.shape, grid.voxel_size, (0.0, 0.0, 0.0)))
    lab = model.labels
    drop = {(str(lab.chain[i]), int(lab.residue_number[i]), str(lab.atom_name[i])) for i in removed}
    st = gemmi.read_structure(str(model_path))
    st.remove_hydrogens()
    for ch in st[0]:
        for res in ch:
            # by index, last first (a removal shifts the atoms after it)
            for k in reversed(range(len(res))):
                if (ch.name, res.seqid.num, res[k].name) in drop:
                    del res[k]
    st.remove_empty_chains()
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(-np.asarray(grid.origin, float)))))
    nz, ny, nx = grid.shape
    vx, vy, vz = grid.voxel_size
    st.cell = gemmi.UnitCell(nx * vx, ny * vy, nz * vz, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st.setup_entities()
    st.write_pdb(str(folder / "model.pdb"))
    st.make_mmcif_document().write_file(str(folder / "model.cif"))
    n = sum(1 for ch in st[0] for res in ch for _ in res)
    if n != model.n_atoms - len(removed):
        raise RuntimeError(f"the anchors' model has {n} atoms, expected {model.n_atoms - len(removed)}")
    return n


def run(cmd, cwd) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    out = {"command": " ".join(map(str, cmd)), "wall_s": time.perf_counter() - t, "returncode": proc.returncode}
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
    return out


def read_back(path, shape):
    data = np.asarray(mm.read_map(path).data, np.float32)
    if data.shape != tuple(shape):
        raise ValueError(f"{path}: shape {data.shape}, expected {tuple(shape)}")
    return data


def score(diff, grid, support, kept_atoms, removed_pos, target_pos, reference=None) -> dict:
    """Peak metrics of one difference map (any scale: divided by its σ over the support here)."""
    sd = float(diff[support].std())
    norm = diff / sd
    peaks = difference_peaks(norm, grid, kept_atoms, threshold=3.0, max_peaks=None, support=support)
    out = {"n_peaks_3sigma": len(peaks), "top_heights": np.round(peaks.heights[:5], 2).tolist()}
    if len(peaks):
        d_t, i_t = cKDTree(peaks.positions).query(target_pos)
        out["targets"] = [{"rank": int(i) + 1, "height": round(float(peaks.heights[i]), 2), "distance": round(float(d), 2)}
                          for d, i in zip(d_t, i_t)]
        out["targets_within_1A"] = int(np.sum(d_t < 1.0))
        d_r = cKDTree(removed_pos).query(peaks.positions)[0]
        near = np.flatnonzero(d_r < 5.0)
        if len(near):
            j = int(near[0])
            out["strongest_near_removed"] = {"rank": j + 1, "height": round(float(peaks.heights[j]), 2),
                                             "distance": round(float(d_r[j]), 2)}
        k = min(20, len(peaks))
        out["top20_within_1A_of_removed"] = int(np.sum(d_r[:k] < 1.0))
        kt = min(len(target_pos), len(peaks))
        out["top_n_targets_within_1A"] = int(np.sum(cKDTree(target_pos).query(peaks.positions[:kt])[0] < 1.0))
    if reference is not None:
        out["cc_with_modelmap"] = round(float(np.corrcoef(diff[support], reference[support])[0, 1]), 4)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="apo6,apo_het,7cec_trp190,7cec_tyr329")
    ap.add_argument("--phenix", default=None, help="python of a venv with cctbx-base (runs -m mmtbx.command_line.real_space_diff_map)")
    ap.add_argument("--servalcat", default=None, help="servalcat command")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis_diffmap.json"))
    args = ap.parse_args()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpu": cpu_model(), "platform": platform.platform(), "device": str(jax.devices()[0]),
                           "cpu_count": os.cpu_count()},
               "versions": {"modelmap": mm.__version__, "jax": jax.__version__, "gemmi": gemmi.__version__},
               "cases": {}}
    rows = []
    for name in args.cases.split(","):
        density, model, d, removed, targets, desc = case_inputs(name)
        model_path = APO_MODEL if name.startswith("apo") else CEC_MODEL
        grid = density.grid
        pos = np.asarray(model.atoms.positions, np.float64)
        kept = np.setdiff1d(np.arange(model.n_atoms), removed)
        kept_atoms = jax.tree.map(lambda x: x[kept], model.atoms)
        support = density.data != 0
        case = {"description": desc, "resolution": d, "removed": len(removed), "targets": len(targets),
                "target_labels": [model.labels.atom_id(int(i)) for i in targets], "grid": list(grid.shape[::-1]),
                "tools": {}}
        times = []
        for _ in range(2):  # first call compiles; the second is the warm time
            t = time.perf_counter()
            r = difference_map(density.data, grid, kept_atoms, d)
            difference_peaks(r.normalised, grid, kept_atoms, threshold=3.0, support=r.support)
            times.append(time.perf_counter() - t)
        ours = r.difference
        case["tools"]["modelmap"] = {"wall_s_first": times[0], "wall_s": times[1],
                                     **score(ours, grid, support, kept_atoms, pos[removed], pos[targets])}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            n_written = write_anchor_inputs(tmp, density, model_path, model, removed)
            case["anchor_model_atoms"] = n_written
            # the command line on the anchors' files: like-for-like wall time (process start, JAX
            # start-up and compilation, reading and writing included)
            run_ = run([sys.executable, "-m", "modelmap.cli", "diffmap", "map.mrc", "model.pdb", "-d", str(d),
                        "-o", "mmdiff"], tmp)
            entry = {"wall_s": run_["wall_s"], "command": run_["command"]}
            if run_["returncode"] != 0:
                entry["error"] = run_.get("error", "failed")
            else:
                entry.update(score(read_back(tmp / "mmdiff_diff_raw.mrc", grid.shape), grid, support, kept_atoms,
                                   pos[removed], pos[targets], ours))
            case["tools"]["modelmap_cli"] = entry
            if args.phenix:
                run_ = run([args.phenix, "-m", "mmtbx.command_line.real_space_diff_map", "model.pdb", "map.mrc",
                            f"resolution={d}", "scattering_table=electron"], tmp)
                for label, fname in (("phenix_vector", "map_model_difference_2.ccp4"),
                                     ("phenix_obs_phase", "map_model_difference_1.ccp4")):
                    entry = {"wall_s": run_["wall_s"], "command": run_["command"]}
                    if run_["returncode"] != 0 or not (tmp / fname).exists():
                        entry["error"] = run_.get("error", f"{fname} not written")
                    else:
                        data = read_back(tmp / fname, grid.shape)
                        entry.update(score(data, grid, support, kept_atoms, pos[removed], pos[targets], ours))
                    case["tools"][label] = entry
            if args.servalcat:
                run_ = run([args.servalcat, "fofc", "--map", "map.mrc", "--model", "model.cif", "-d", str(d),
                            "--mask_radius", "3", "-o", "sv"], tmp)
                entry = {"wall_s": run_["wall_s"], "command": run_["command"],
                         "note": "one map: no noise estimate, weight 1 in every shell, F_o - D·F_c with D per bin"}
                fname = tmp / "sv_normalized_fofc.mrc"
                if run_["returncode"] != 0 or not fname.exists():
                    entry["error"] = run_.get("error", f"{fname.name} not written")
                else:
                    data = read_back(fname, grid.shape)
                    entry.update(score(data, grid, support, kept_atoms, pos[removed], pos[targets], ours))
                case["tools"]["servalcat_fofc"] = entry
        results["cases"][name] = case
        for tool, e in case["tools"].items():
            s = e.get("strongest_near_removed", {})
            rows.append((name, tool, e.get("targets_within_1A"), case["targets"], e.get("top_n_targets_within_1A"),
                         s.get("rank"), s.get("height"), s.get("distance"), e.get("top20_within_1A_of_removed"),
                         e.get("cc_with_modelmap"), e.get("wall_s"), e.get("error", "")[:60]))
        print(f"{name}: {desc}", flush=True)
    hdr = ("case", "tool", "targets<1Å", "of", "top-n on targets", "best-near rank", "height σ", "dist Å",
           "top20<1Å", "CC vs modelmap", "time s", "error")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    fmt = lambda v: "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
