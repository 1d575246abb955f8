"""Benchmark: every map analysis beside the tool users run today, on the same inputs (issue 20).

Runs the four analysis benchmarks one after the other, each in its own process, with the anchors'
interpreters given here, and gathers their JSON into one file:

| script | modelmap | anchor (own venv) |
|---|---|---|
| `bench_analysis_occupancy.py` | `local_scale`, `fit_occupancy` | OccuPy (Python API, headless) |
| `bench_analysis_diffmap.py` | `difference_map` | phenix.real_space_diff_map (cctbx-base), servalcat fofc |
| `bench_analysis_locres.py` | `local_resolution` | cctbx `local_resolution_map` |
| `bench_analysis_sharpen.py` | `guinier_b`, `local_amplitude_scale` | phenix.auto_sharpen (cctbx-base) |

Each script prints its own table (times and agreement numbers) and documents its cases; an anchor that
is not given, or fails, is recorded as such by that script. A script that fails is recorded here with
its last lines and the others still run.

    python benchmarks/bench_analysis.py --occupy /work/venvs/occupy/bin/python \\
        --cctbx /work/venvs/cctbx/bin/python --servalcat /work/venvs/servalcat/bin/servalcat
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _commands(args, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "occupancy": [py, str(HERE / "bench_analysis_occupancy.py"), "--out", str(out / "occupancy.json")]
        + (["--occupy", args.occupy] if args.occupy else []),
        "diffmap": [py, str(HERE / "bench_analysis_diffmap.py"), "--out", str(out / "diffmap.json")]
        + (["--phenix", args.cctbx] if args.cctbx else []) + (["--servalcat", args.servalcat] if args.servalcat else []),
        "locres": [py, str(HERE / "bench_analysis_locres.py"), "--out", str(out / "locres.json")]
        + (["--cctbx", args.cctbx] if args.cctbx else []),
        "sharpen": [py, str(HERE / "bench_analysis_sharpen.py"), "--out", str(out / "sharpen.json")]
        + (["--cctbx", args.cctbx] if args.cctbx else []),
    }
    return {k: v for k, v in cmds.items() if k in args.tools.split(",")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", default="occupancy,diffmap,locres,sharpen")
    p.add_argument("--occupy", default=None, help="python of a venv with OccuPy (pip install occupy)")
    p.add_argument("--cctbx", default=None, help="python of a venv with cctbx-base")
    p.add_argument("--servalcat", default=None, help="servalcat command")
    p.add_argument("--out", default=str(HERE / "results" / f"bench_analysis_{time.strftime('%Y%m%d')}.json"))
    args = p.parse_args()
    gathered = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tool, cmd in _commands(args, Path(tmp)).items():
            print(f"== {tool}: {' '.join(cmd)}", flush=True)
            t = time.perf_counter()
            proc = subprocess.run(cmd, text=True, capture_output=True)
            print(proc.stdout, end="", flush=True)
            entry = {"command": cmd, "wall_s": time.perf_counter() - t, "returncode": proc.returncode}
            result = Path(tmp) / f"{tool}.json"
            if proc.returncode == 0 and result.exists():
                entry["result"] = json.loads(result.read_text())
            else:
                entry["error"] = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                print(f"   failed: {entry['error']}", flush=True)
            gathered[tool] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(gathered, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
