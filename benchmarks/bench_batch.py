"""Benchmark: many small structures into one box each, through modelmap's batch API, on this CPU.

The structures are compact regions of 7CEC (the whole residues nearest a random residue, seed 0:
balls of protein; contiguous residue ranges of 3,000 atoms span > 100 Å, more than the box), of
300-3,000 atoms (uniform; `--quick`: 300-1,000), each rendered into its own box of
64³ voxels of 1.5 Å centred on it (`plan_batch` places the boxes). For batches of the first
B = 1, 8, 64, 256 structures (`--quick`: 1, 8), in one run:

- modelmap, `plan_batch` + `render_stacked` (`batch_size`: `default_batch_size()`, 1 on the CPU) jitted as a
  whole: the Gaussian mixture (exact voxel averages, resolution 1.5 Å: extra blur 4 D²), the shell
  decomposition (4 Å, 6 terms) and the splat-Fourier map (4 Å); the forward maps, and value_and_grad
  of sum(maps²) with respect to the stacked volumes (the batch API's own example). Compilation
  (`compile_s`) is timed apart from the median of `--repeats` runs.
- "alone": the same structures one at a time with the single-structure API (own volume, own planned
  render function, same box; the splat-Fourier map at the batch's eps, 1e-5), warm, for 3 structures spread over the size range (`--quick`: 2);
  a line a + b·atoms through their times predicts each batch's one-at-a-time time, so
  `ratio_to_alone` = batched time per structure / predicted one-at-a-time time per structure.
  Target: <= 1.2.
- gemmi, a Python loop of `DensityCalculatorE.put_model_density_on_grid` (its own electron-density
  model map: the atoms' 5-Gaussian electron factors with B + the same blur, sampled at the grid
  points) on the same boxes, plus the copy of the box out of gemmi's grid; one core; gemmi's default
  cutoff. Target: modelmap's Gaussian forward maps/s >= the gemmi loop's.
- cryoJAX (`--cryojax-python`, default /work/venvs/cryojax/bin/python if it exists), in its own
  interpreter through `benchmarks/bench_batch_cryojax.py`: its `GaussianMixtureRenderFn` (spread
  backend, erf voxel averages) vmapped over the same structures (`jax.lax.map`, batch_size 64),
  forward and value_and_grad.

The maps of the first structure are compared (Pearson CC): gemmi and cryoJAX against modelmap's
Gaussian map, to show that the boxes and models agree. A measurement predicted (from the previous
batch size) to take more than `--max-call-s` per call is skipped and recorded as such, so the
run keeps to a few minutes on 2 cores; the shell renderer's larger batches usually are.

    python benchmarks/bench_batch.py --quick    # smoke run: B = 1, 8 (3-5 minutes on 2 cores, mostly compiling)
    python benchmarks/bench_batch.py --out /tmp/batch_cpu.json   # B = 1, 8, 64, 256 (longer; big cases skip)

Prints a table; writes JSON only with `--out` (commit only GPU results, under benchmarks/results/gpu/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from _common import cpu_model, cut_compact_regions, git_commit

ROOT = Path(__file__).resolve().parents[1]
MODEL = "emd30342_7cec/390_7cec.cif.gz"
RESOLUTION = {"gaussian": 1.5, "shells": 4.0, "fourier": 4.0}  # Å, per batch method
DEFAULT_CRYOJAX = "/work/venvs/cryojax/bin/python"

# ==================================================================================================
# modelmap API: EVERY modelmap call of this script is in this section (adjust here after the render
# API refactor). Written for the new API: volumes `from_atoms(atoms, resolution)`, render functions
# built from the grid alone and planned by `.with_plan(volume)`, `modelmap.batch`.
# ==================================================================================================
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import modelmap as mm  # noqa: E402
try:
    from modelmap.batch import plan_batch, render_stacked
except ImportError as _err:  # before the batch API lands
    raise SystemExit(f"bench_batch.py needs the batch API, modelmap.batch ({type(_err).__name__}: {_err})") from None


def mm_read_atoms(path):
    """(Atoms of the first model, chain ids (n,), residue keys (n,)) of a model file."""
    model = mm.read_model(path, models="first")
    lab = model.labels
    residue = np.array([f"{c}/{n}{i}" for c, n, i in zip(lab.chain, lab.residue_number, lab.insertion_code)])
    return model.atoms, np.asarray(lab.chain), residue


def mm_take(atoms, index):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)[index]), atoms)


def mm_arrays(atoms):
    """numpy (positions (n, 3), atomic numbers, B, occupancies)."""
    return (np.asarray(atoms.positions, np.float64), np.asarray(atoms.atomic_numbers),
            np.asarray(atoms.b_factors, np.float64), np.asarray(atoms.occupancies, np.float64))


def mm_assemble(indices, parts, n):
    """(n, ...) the maps of the structures, in input order, from the groups' maps."""
    from modelmap.batch import assemble

    return assemble(indices, parts, n)


def mm_plan(structures, method, resolution, box, voxel):
    """[(render_fn, stacked volumes, member indices, origins (B_g, 3))] of `plan_batch`'s groups."""
    groups = plan_batch(structures, resolution, method=method, box=box, voxel_size=voxel)
    return [(g.render_fn, g.volumes, np.asarray(g.indices), np.asarray(g.origins)) for g in groups]


def mm_render_stacked(render_fn, volumes, batch_size):
    from modelmap.batch import default_batch_size

    return render_stacked(render_fn, volumes, batch_size=batch_size or default_batch_size())


def mm_alone(method, atoms, resolution, box, voxel, origin):
    """(render_fn, volume) of one structure with the single-structure API, in the batch's box."""
    grid = mm.Grid((box, box, box), voxel, tuple(float(o) for o in origin))
    if method == "gaussian":
        volume = mm.GaussianMixtureVolume.from_atoms(atoms, resolution)
        fn = mm.GaussianMixtureRenderFn(grid, sampling="average")
    elif method == "fourier":
        volume = mm.IndependentAtomVolume.from_atoms(atoms, resolution)
        fn = mm.render.SplatFourierRenderFn(grid, eps=1e-5)  # the batch's (and render_model's) accuracy
    else:
        volume = mm.ShellDecompositionVolume.from_atoms(atoms, resolution, n_terms=6)
        fn = mm.ShellRenderFn(grid)
    return fn.with_plan(volume), volume


def mm_render(render_fn, volume):
    return render_fn(volume)


def mm_blur(resolution):
    """The extra B (Å²) of the Gaussian renderer at this resolution (for gemmi and cryoJAX)."""
    return mm.resolution_to_blur(resolution)


# ==================================================================================================
# End of the modelmap section.
# ==================================================================================================


def _log(msg):
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


T0 = time.perf_counter()


def time_jitted(func, args, repeats, cap_s):
    """compile, first run, and up to `repeats` timed runs of `func(*args)` jitted over its arrays."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    jitted = jax.jit(lambda d: func(*eqx.combine(d, static)))
    t0 = time.perf_counter()
    compiled = jitted.lower(dynamic).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(dynamic))
    t2 = time.perf_counter()
    times = []
    for _ in range(repeats):
        if times and time.perf_counter() - t0 > cap_s:
            break
        s = time.perf_counter()
        out = jax.block_until_ready(compiled(dynamic))
        times.append(time.perf_counter() - s)
    med = statistics.median(times) if times else t2 - t1
    return {"status": "ok", "error": None, "compile_s": t1 - t0, "first_run_s": t2 - t1, "median_s": med,
            "times_s": times}, out


def _cc(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


# ---- modelmap -------------------------------------------------------------------------------------
def run_modelmap(args, structures, n_atoms, report):
    rows = report["modelmap"]
    first_maps = {}
    for method in args.methods:
        res = RESOLUTION[method]
        rows[method] = {"resolution": res, "batches": {}}
        per_structure = {}
        for n in args.sizes:
            row = rows[method]["batches"][str(n)] = {"n_structures": n, "atoms_mean": float(np.mean(n_atoms[:n]))}
            try:
                t0 = time.perf_counter()
                groups = mm_plan(structures[:n], method, res, args.box, args.voxel)
                jax.block_until_ready([g[1] for g in groups])
                row["setup_s"] = time.perf_counter() - t0
                row["n_groups"] = len(groups)
                if "_origins" not in report and n == args.sizes[-1]:
                    origins = np.zeros((n, 3))
                    for g in groups:
                        origins[g[2]] = g[3]
                    report["_origins"] = origins
            except Exception as e:  # noqa: BLE001
                row["error"] = f"planning: {type(e).__name__}: {e}"
                _log(f"{method} B={n}: {row['error']}")
                continue
            fns = tuple(g[0] for g in groups)
            vols = tuple(g[1] for g in groups)

            indices = tuple(np.asarray(g[2]) for g in groups)

            def forward(f, v):
                # the structures' maps, in input order
                parts = [mm_render_stacked(fi, vi, args.batch_size) for fi, vi in zip(f, v)]
                return mm_assemble(indices, parts, n)

            def vag(f, v):
                return eqx.filter_value_and_grad(lambda vs: jnp.sum(forward(f, vs) ** 2))(v)

            for mode, func in (("forward", forward), ("value_and_grad", vag)):
                predicted = per_structure.get(mode, 0.0) * n
                if predicted > args.max_call_s:
                    row[mode] = {"status": "skipped", "error": f"predicted {predicted:.0f} s per call > --max-call-s"}
                    _log(f"{method} B={n} {mode}: skipped ({row[mode]['error']})")
                    continue
                try:
                    r, out = time_jitted(func, (fns, vols), args.repeats, args.cap_s)
                except Exception as e:  # noqa: BLE001
                    row[mode] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
                    _log(f"{method} B={n} {mode}: {row[mode]['error']}")
                    continue
                r["per_structure_s"] = r["median_s"] / n
                r["maps_per_s"] = n / r["median_s"]
                per_structure[mode] = r["per_structure_s"]
                row[mode] = r
                if mode == "forward":
                    first_maps[method] = np.asarray(out[0])
                _log(f"{method} B={n} {mode}: compile {r['compile_s']:.1f} s, median {r['median_s']:.3f} s, "
                     f"{r['maps_per_s']:.1f} maps/s")
    return first_maps


def run_alone(args, structures, n_atoms, report):
    """The single-structure API on a few structures spread over the size range; a line in atoms."""
    origins = report.get("_origins")
    if origins is None:
        return
    order = np.argsort(n_atoms)
    picks = [int(order[int(round(q * (len(order) - 1)))]) for q in np.linspace(1 / 6, 5 / 6, args.alone)] \
        if args.alone > 2 else [int(order[0]), int(order[-1])]
    for method in args.methods:
        res = RESOLUTION[method]
        entry = report["modelmap"][method]["alone"] = {"structures": picks, "atoms": [int(n_atoms[i]) for i in picks]}
        for mode in ("forward", "value_and_grad"):
            times = []
            try:
                for i in picks:
                    fn, vol = mm_alone(method, structures[i], res, args.box, args.voxel, origins[i])
                    func = (lambda f, v: mm_render(f, v)) if mode == "forward" else \
                        (lambda f, v: eqx.filter_value_and_grad(lambda w: jnp.sum(mm_render(f, w) ** 2))(v))
                    r, _ = time_jitted(func, (fn, vol), args.repeats, args.cap_s)
                    times.append(r["median_s"])
            except Exception as e:  # noqa: BLE001
                entry[mode] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
                _log(f"{method} alone {mode}: {entry[mode]['error']}")
                continue
            x = np.array([n_atoms[i] for i in picks], np.float64)
            slope, intercept = np.polyfit(x, times, 1) if len(set(x)) > 1 else (0.0, float(np.mean(times)))
            entry[mode] = {"status": "ok", "error": None, "median_s": times, "intercept_s": float(intercept),
                           "per_atom_s": float(slope)}
            _log(f"{method} alone {mode}: {', '.join(f'{t * 1e3:.1f} ms' for t in times)} at {entry['atoms']} atoms")
            for n, row in report["modelmap"][method]["batches"].items():
                m = row.get(mode)
                if isinstance(m, dict) and m.get("status") == "ok":
                    alone = float(np.mean(intercept + slope * n_atoms[: int(n)]))
                    m["alone_per_structure_s"] = alone
                    m["ratio_to_alone"] = m["per_structure_s"] / alone


# ---- gemmi ------------------------------------------------------------------------------------------
def run_gemmi(args, structures, report):
    import gemmi

    origins = report.get("_origins")
    if origins is None:
        report["gemmi"] = {"error": "no box origins (the Gaussian batch plan failed)"}
        return None
    blur = mm_blur(RESOLUTION["gaussian"])
    box, voxel = args.box, args.voxel
    n_max = max(args.sizes)
    calc = gemmi.DensityCalculatorE()
    calc.blur = blur
    calc.d_min = 0.0
    models, points = [], None
    radius = 0.0
    for i in range(n_max):
        pos, z, b, q = mm_arrays(structures[i])
        local = pos - origins[i]
        model = gemmi.Model("1")
        model.add_chain(gemmi.Chain("A"))
        residue = gemmi.Residue()
        residue.name = "UNK"
        residue.seqid = gemmi.SeqId(1, " ")
        for xyz, zi, bi, qi in zip(local, z, b, q):
            atom = gemmi.Atom()
            atom.element = gemmi.Element(int(zi))
            atom.name = atom.element.name
            atom.pos = gemmi.Position(*xyz)
            atom.b_iso = float(bi)
            atom.occ = float(qi)
            residue.add_atom(atom)
        model["A"].add_residue(residue)
        radius = max(radius, max(calc.estimate_radius(a) for a in model["A"][0]))
        models.append((model, local))
    # P1 cell larger than the box by 2 radii + 1 voxel; atoms farther than a radius outside the box
    # are dropped (they cannot reach it), so nothing wraps into the box
    margin = 2 * math.ceil(radius / voxel) + 1
    points = box + margin
    cell = gemmi.UnitCell(points * voxel, points * voxel, points * voxel, 90, 90, 90)
    kept = []
    for model, local in models:
        inside = np.all((local > -radius) & (local < box * voxel + radius), axis=1)
        residue = model["A"][0]
        for k in np.flatnonzero(~inside)[::-1]:
            del residue[int(k)]
        kept.append(int(inside.sum()))
    calc.grid.set_unit_cell(cell)
    calc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calc.grid.set_size(points, points, points)
    assert np.allclose(calc.grid.spacing, voxel), calc.grid.spacing

    def one(model):
        calc.put_model_density_on_grid(model)
        return np.array(calc.grid.array, copy=False)[:box, :box, :box].transpose(2, 1, 0).copy()

    first_map = one(models[0][0])
    passes = []
    for _ in range(max(1, min(args.repeats, 2))):
        times = []
        for model, _ in models:
            s = time.perf_counter()
            one(model)
            times.append(time.perf_counter() - s)
        passes.append(times)
    per = np.median(np.array(passes), axis=0)
    out = {"blur": blur, "cell_points": points, "cutoff": calc.cutoff, "radius_max": radius, "threads": 1,
           "atoms_kept_min": int(min(kept)), "batches": {}}
    for n in args.sizes:
        total = float(per[:n].sum())
        out["batches"][str(n)] = {"total_s": total, "per_structure_s": total / n, "maps_per_s": n / total}
        _log(f"gemmi B={n}: {total:.3f} s, {n / total:.1f} maps/s")
    report["gemmi"] = out
    return first_map


# ---- cryoJAX ----------------------------------------------------------------------------------------
def run_cryojax(args, structures, report, tmp: Path):
    origins = report.get("_origins")
    if not args.cryojax_python or not Path(args.cryojax_python).exists():
        report["cryojax"] = {"error": f"no cryoJAX interpreter (--cryojax-python {args.cryojax_python!r}); "
                                      "make one: python3 -m venv V && V/bin/pip install 'cryojax==0.6.*'"}
        _log("cryoJAX: " + report["cryojax"]["error"])
        return None
    if origins is None:
        report["cryojax"] = {"error": "no box origins (the Gaussian batch plan failed)"}
        return None
    n_max = max(args.sizes)
    arrays = [mm_arrays(s) for s in structures[:n_max]]
    width = max(a[0].shape[0] for a in arrays)
    centre = args.voxel * (args.box // 2)  # cryoJAX's coordinate 0 is at grid index n // 2
    shape = (n_max, width)
    pos = np.zeros(shape + (3,), np.float32)
    z = np.full(shape, 6, np.int32)
    b = np.zeros(shape, np.float32)
    q = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    for i, (p, zi, bi, qi) in enumerate(arrays):
        k = p.shape[0]
        pos[i, :k] = p - origins[i] - centre
        pos[i, k:] = 0.0
        z[i, :k], b[i, :k], q[i, :k], mask[i, :k] = zi, bi, qi, True
        b[i, k:] = np.median(bi)
    case = tmp / "cryojax_case.npz"
    np.savez(case, positions=pos, atomic_numbers=z, b_factors=b, occupancies=q, mask=mask, box=args.box,
             voxel_size=args.voxel, blur=mm_blur(RESOLUTION["gaussian"]))
    map_out = tmp / "cryojax_first.npy"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_ENABLE_X64")}
    cmd = [args.cryojax_python, str(ROOT / "benchmarks" / "bench_batch_cryojax.py"), "--case", str(case),
           "--sizes", ",".join(str(n) for n in args.sizes), "--batch-size", str(args.batch_size or 64),
           "--repeats", str(args.repeats), "--cap-s", str(args.cap_s), "--max-s", str(args.max_call_s),
           "--map-out", str(map_out)]
    _log("cryoJAX: " + " ".join(cmd[:2]) + " ...")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.cryojax_timeout_s)
    except subprocess.TimeoutExpired:
        report["cryojax"] = {"error": f"timed out after {args.cryojax_timeout_s} s"}
        return None
    except OSError as e:
        report["cryojax"] = {"error": f"{type(e).__name__}: {e}"}
        return None
    for line in proc.stderr.splitlines():
        if line.startswith("[cryojax]"):
            _log(line)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    # the rows it finished (it prints its report after every batch size), and why it stopped
    report["cryojax"] = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not lines:
        report["cryojax"]["error"] = f"exit {proc.returncode}: {proc.stderr[-2000:]}"
        _log(f"cryoJAX failed: {report['cryojax']['error'][-500:]}")
    return np.load(map_out) if map_out.exists() else None


# ---- report -------------------------------------------------------------------------------------------
def targets(report, args):
    out = {}
    mmr = report["modelmap"]
    gem = report.get("gemmi", {}).get("batches", {})
    for method, entry in mmr.items():
        for n, row in entry.get("batches", {}).items():
            for mode in ("forward", "value_and_grad"):
                m = row.get(mode)
                if isinstance(m, dict) and "ratio_to_alone" in m:
                    out[f"{method}/{mode}/B={n}: batched per structure <= 1.2 x alone"] = {
                        "value": m["ratio_to_alone"], "met": m["ratio_to_alone"] <= 1.2}
                # the same API one structure at a time (B = 1, the same bounds): batching's own cost
                # (the per-structure times differ by the structures' sizes too)
                one = entry["batches"].get("1", {}).get(mode)
                if (n != "1" and isinstance(m, dict) and m.get("status") == "ok" and isinstance(one, dict)
                        and one.get("status") == "ok"):
                    ratio = (m["per_structure_s"] / row["atoms_mean"]) / (one["per_structure_s"] / entry["batches"]["1"]["atoms_mean"])
                    out[f"{method}/{mode}/B={n}: per atom <= 1.2 x B=1 of the batch API"] = {
                        "value": ratio, "met": ratio <= 1.2}
    for n, row in mmr.get("gaussian", {}).get("batches", {}).items():
        m = row.get("forward")
        if isinstance(m, dict) and m.get("status") == "ok" and n in gem:
            out[f"gaussian/forward/B={n}: maps/s >= gemmi loop"] = {
                "value": m["maps_per_s"], "gemmi": gem[n]["maps_per_s"], "met": m["maps_per_s"] >= gem[n]["maps_per_s"]}
    report["targets"] = out


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def print_table(report, args):
    print()
    print(f"{'method':22s} {'mode':15s} {'B':>4s} {'compile s':>9s} {'per map ms':>10s} {'maps/s':>8s} "
          f"{'vs alone':>8s}")
    for method, entry in report["modelmap"].items():
        for n, row in entry.get("batches", {}).items():
            for mode in ("forward", "value_and_grad"):
                m = row.get(mode, {"status": "error", "error": row.get("error")})
                if m.get("status") != "ok":
                    print(f"{'modelmap ' + method:22s} {mode:15s} {n:>4s}  {m.get('status')}: {str(m.get('error'))[:60]}")
                    continue
                print(f"{'modelmap ' + method:22s} {mode:15s} {n:>4s} {m['compile_s']:9.2f} "
                      f"{m['per_structure_s'] * 1e3:10.2f} {m['maps_per_s']:8.1f} {_fmt(m.get('ratio_to_alone'), '8.2f')}")
        alone = entry.get("alone", {})
        for mode in ("forward", "value_and_grad"):
            a = alone.get(mode)
            if isinstance(a, dict) and a.get("status") == "ok":
                ms = ", ".join(f"{t * 1e3:.1f}" for t in a["median_s"])
                print(f"{'  alone ' + method:22s} {mode:15s}      ms at {alone['atoms']} atoms: {ms}")
    for n, g in report.get("gemmi", {}).get("batches", {}).items():
        print(f"{'gemmi loop':22s} {'forward':15s} {n:>4s} {'-':>9s} {g['per_structure_s'] * 1e3:10.2f} {g['maps_per_s']:8.1f}")
    cj = report.get("cryojax", {})
    for n, row in cj.get("results", {}).items():
        for mode, m in row.items():
            if m.get("status") != "ok":
                print(f"{'cryoJAX gaussian':22s} {mode:15s} {n:>4s}  {m.get('status')}: {str(m.get('error'))[:60]}")
                continue
            print(f"{'cryoJAX gaussian':22s} {mode:15s} {n:>4s} {m['compile_s']:9.2f} {m['per_structure_s'] * 1e3:10.2f} "
                  f"{m['maps_per_s']:8.1f}")
    if "error" in cj:
        print(f"cryoJAX: {cj['error'][:200]}")
    if report.get("map_cc"):
        print("map CC of the first structure against modelmap's Gaussian map:",
              ", ".join(f"{k} {v:.4f}" for k, v in report["map_cc"].items()))
    print()
    for k, v in report.get("targets", {}).items():
        print(f"target {k}: {v['value']:.3g} -> {'met' if v['met'] else 'NOT met'}"
              + (f" (gemmi {v['gemmi']:.3g})" if "gemmi" in v else ""))


def _versions():
    out = {}
    for name in ("jax", "jaxlib", "equinox", "numpy", "gemmi"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["modelmap"] = getattr(mm, "__version__", None)
    out["modelmap_git"] = git_commit()
    return out


def find_data(given):
    for c in ([Path(given)] if given else []) + (
        [Path(os.environ["MODELMAP_TEST_DATA"])] if os.environ.get("MODELMAP_TEST_DATA") else []
    ) + [ROOT.parent / "shared" / "data", ROOT / ".." / ".." / "shared" / "data"]:
        if (c / "README.md").exists():
            return c.resolve()
    raise SystemExit("shared data not found: set MODELMAP_TEST_DATA (or --data)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: B = 1, 8; 300-1,000 atoms; 2 repeats")
    p.add_argument("--sizes", help="batch sizes (default 1,8,64,256)")
    p.add_argument("--methods", default="gaussian,shells,fourier")
    p.add_argument("--atoms", default=None, help="min,max atoms per structure (default 300,3000)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--voxel", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures rendered at once by render_stacked (default: modelmap's default_batch_size(), "
                        "1 on the CPU) and by cryoJAX's lax.map (default 64)")
    p.add_argument("--repeats", type=int, help="timed runs (default 3, --quick 2)")
    p.add_argument("--cap-s", type=float, default=20.0, help="stop repeating a measurement past this")
    p.add_argument("--max-call-s", type=float, default=20.0,
                   help="skip a measurement predicted (from the previous batch size) to take longer per call")
    p.add_argument("--alone", type=int, help="structures timed one at a time (default 3, --quick 2)")
    p.add_argument("--no-gemmi", action="store_true")
    p.add_argument("--cryojax-python", default=os.environ.get("CRYOJAX_PYTHON",
                                                              DEFAULT_CRYOJAX if Path(DEFAULT_CRYOJAX).exists() else ""))
    p.add_argument("--cryojax-timeout-s", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data")
    p.add_argument("--out", help="write the JSON here (nothing is written without it)")
    args = p.parse_args(argv)
    args.sizes = sorted(int(s) for s in (args.sizes or ("1,8" if args.quick else "1,8,64,256")).split(","))
    args.atoms = tuple(int(s) for s in (args.atoms or ("300,1000" if args.quick else "300,3000")).split(","))
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.alone = args.alone or (2 if args.quick else 3)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = set(args.methods) - set(RESOLUTION)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {sorted(RESOLUTION)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    data = find_data(args.data)
    atoms, chain, residue = mm_read_atoms(data / MODEL)
    rng = np.random.default_rng(args.seed)
    n_max = max(args.sizes)
    wanted = rng.integers(args.atoms[0], args.atoms[1] + 1, size=n_max)
    cuts = cut_compact_regions(atoms.positions, residue, wanted, rng)
    structures = [mm_take(atoms, c) for c in cuts]
    n_atoms = np.array([len(c) for c in cuts])
    report = {
        "schema": "modelmap-bench-batch/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": {"jax": str(jax.devices()[0]), "platform": jax.default_backend(), "cpu": cpu_model(),
                   "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": _versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "structures": {"file": MODEL, "what": "compact regions of 7CEC (whole residues nearest a random "
                       f"residue), seed {args.seed}", "n": int(n_max), "atoms_min": int(n_atoms.min()),
                       "atoms_mean": float(n_atoms.mean()), "atoms_max": int(n_atoms.max()),
                       "atoms": n_atoms.tolist(), "box": args.box, "voxel_size": args.voxel,
                       "resolutions": {m: RESOLUTION[m] for m in args.methods}},
        "modelmap": {},
    }
    _log(f"{n_max} structures of {n_atoms.min()}-{n_atoms.max()} atoms (mean {n_atoms.mean():.0f}) into "
         f"{args.box}^3 x {args.voxel} Å; {jax.devices()[0]}")
    first = run_modelmap(args, structures, n_atoms, report)
    run_alone(args, structures, n_atoms, report)
    cc = {}
    if not args.no_gemmi:
        g = run_gemmi(args, structures, report)
        if g is not None and "gaussian" in first:
            cc["gemmi (point sampled)"] = _cc(g, first["gaussian"])
    with tempfile.TemporaryDirectory() as tmp:
        c = run_cryojax(args, structures, report, Path(tmp))
        if c is not None and "gaussian" in first:
            cc["cryoJAX"] = _cc(c, first["gaussian"])
    report["map_cc"] = cc
    report.pop("_origins", None)
    targets(report, args)
    report["elapsed_s"] = time.perf_counter() - T0
    print_table(report, args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
