"""Benchmark: the throughput of a `modelmap batch` job (entries per second) in this process and on a
local Ray with 1 and 2 workers, on this machine.

The job: `--entries` (default 48) models, each a run of consecutive residues of 7CEC chain A
(20-80 residues, about 150-650 atoms, seed 0) written as PDB files into a temporary folder,
rendered by the Gaussian method at 2 Å into a box of 64³ voxels of 2 Å (MRC outputs, no scores).
Each engine runs the same manifest into a fresh folder through `run_job`, timed from the call to
its return: reading, planning, compiling (each worker compiles the buckets it meets: 5-6 bucket
sizes here), rendering, writing; for Ray also its start-up on this machine (`ray.init()`, the
actors importing JAX). In-process is run a second time with `force=True` (everything compiled):
the warm rate, what a long job approaches. Maps of every engine are checked equal (to 1e-6 of
the peak).

    python benchmarks/bench_jobs.py            # ~2-3 minutes on 2 cores
    python benchmarks/bench_jobs.py --entries 16 --out /tmp/jobs.json

Prints a table; writes `benchmarks/results/bench_jobs.json` and `.md` (or `--out`), which stay
local as every CPU benchmark's output (`.gitignore`); the measured numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from _common import cpu_model, git_commit

ROOT = Path(__file__).resolve().parents[1]
MODEL = "emd30342_7cec/390_7cec_A.cif.gz"


def shared_data() -> Path:
    for c in (os.environ.get("MODELMAP_TEST_DATA"), ROOT.parent / "shared" / "data", ROOT / ".." / ".." / "shared" / "data"):
        if c and (Path(c) / "README.md").exists():
            return Path(c)
    raise SystemExit("shared data not found: set MODELMAP_TEST_DATA")


def write_models(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` runs of 20-80 consecutive residues of 7CEC chain A, as PDB files."""
    import gemmi

    rng = np.random.default_rng(seed)
    source = gemmi.read_structure(str(shared_data() / MODEL))
    numbers = [r.seqid.num for r in source[0][0]]
    paths = []
    for k in range(n):
        length = int(rng.integers(20, 81))
        start = int(rng.integers(0, len(numbers) - length))
        first, last = numbers[start], numbers[start + length - 1]
        st = source.clone()
        chain = st[0][0]
        for i in reversed(range(len(chain))):
            if not first <= chain[i].seqid.num <= last:
                del chain[i]
        path = folder / f"7cec_A_{k:03d}.pdb"
        st.write_pdb(str(path))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_jobs.json")
    parser.add_argument("--no-ray", action="store_true", help="in-process only")
    args = parser.parse_args()

    import jax

    import modelmap as mm
    from modelmap.batch import JobDefaults, read_manifest, run_job

    tmp = Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    models = write_models(tmp, args.entries)
    manifest = tmp / "manifest.csv"
    manifest.write_text("model\n" + "".join(f"{p}\n" for p in models))
    entries = read_manifest(manifest, JobDefaults(resolution=2.0, voxel_size=2.0, box=64))
    atoms = [mm.read_model(p).n_atoms for p in models]
    sizes = sorted({mm.batch.bucket_size(n) for n in atoms})

    runs = []

    def run(label, engine, workers=None, force=False, folder=None):
        folder = folder or tmp / label.replace(" ", "_")
        t0 = time.perf_counter()
        report = run_job(entries, folder, engine=engine, workers=workers, force=force)
        seconds = time.perf_counter() - t0
        assert report.count("ok") == len(entries), [r["error"] for r in report.results if r["error"]]
        runs.append({"run": label, "engine": engine, "workers": report.workers, "seconds": round(seconds, 2),
                     "entries_per_s": round(len(entries) / seconds, 2)})
        print(f"{label:28} {seconds:7.1f} s  {len(entries) / seconds:6.2f} entries/s", flush=True)
        return folder

    print(f"{len(entries)} entries, {min(atoms)}-{max(atoms)} atoms (buckets {sizes}), box 64³ of 2 Å, gaussian 2 Å")
    local = run("in-process (cold)", "local")
    run("in-process (warm, --force)", "local", force=True, folder=local)
    folders = {}
    if not args.no_ray:
        for w in (1, 2):
            folders[w] = run(f"ray, {w} worker{'s' * (w > 1)} (cold)", "ray", workers=w)
    # every engine made the same maps
    worst = 0.0
    for folder in folders.values():
        for e in entries:
            a = np.asarray(mm.read_map(local / f"{e.name}.mrc").data)
            b = np.asarray(mm.read_map(folder / f"{e.name}.mrc").data)
            worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
    versions = {p: metadata.version(p) for p in ("jax", "jaxlib", "ray", "zarr", "numpy") if _installed(p)}
    result = {
        "benchmark": "bench_jobs", "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "device": {"platform": jax.default_backend(), "cpu": cpu_model(), "cores": os.cpu_count(),
                   "python": platform.python_version()},
        "versions": versions,
        "job": {"entries": len(entries), "atoms": [min(atoms), max(atoms)], "bucket_sizes": sizes,
                "box": 64, "voxel_size": 2.0, "method": "gaussian", "resolution": 2.0, "outputs": "mrc"},
        "runs": runs, "max_difference_to_in_process": worst,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = ["| run | workers | seconds | entries/s |", "|---|---|---|---|"]
    table += [f"| {r['run']} | {r['workers']} | {r['seconds']} | {r['entries_per_s']} |" for r in runs]
    md = (f"# bench_jobs ({result['date']}, commit {result['commit']})\n\n{result['device']['cpu']}, "
          f"{result['device']['cores']} cores, JAX {versions.get('jax')} ({result['device']['platform']}), "
          f"Ray {versions.get('ray')}; {len(entries)} entries of {min(atoms)}-{max(atoms)} atoms, box 64³ of 2 Å, "
          f"Gaussian 2 Å, MRC outputs; cold runs include compiling (and Ray's start-up).\n\n"
          + "\n".join(table) + f"\n\nlargest difference to the in-process maps: {worst:.1e} of the peak\n")
    args.out.with_suffix(".md").write_text(md)
    print(f"largest difference to the in-process maps: {worst:.1e} of the peak; wrote {args.out} and .md")


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
