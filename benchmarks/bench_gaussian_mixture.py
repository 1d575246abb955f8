"""Benchmark: Gaussian-mixture model maps on CPU, modelmap against gemmi and cryoJAX.

What it measures, for about 2.5k, 7.5k, 17.5k and 26k atoms (the first 2,500 and 7,500 atoms and
all 17,561 atoms of 7CEC, and all 26,430 atoms of 4YVS, from the shared data folder beside the repository, or $MODELMAP_TEST_DATA):

- modelmap `GaussianMixtureRenderFn` with sampling "average" (exact voxel means) and "point"
  (values at grid points): the forward map, and `value_and_grad` of a CC loss (negative Pearson
  correlation with a fixed target map) with respect to the volume's positions, B, occupancies,
  resolution (D = 0 here: no blur) and form-factor amplitudes and widths. The target is
  modelmap's "average" map of the same atoms moved by 0.5 Å rms Gaussian noise (seed 0).
- gemmi `DensityCalculatorE.put_model_density_on_grid` (direct summation, blur 0) on the same
  atoms and grid points: the atoms are shifted by -grid.origin into a P1 cell larger than the box
  (by gemmi's own largest atom radius, so nothing wraps into the box), with the grid size set so
  the spacing is the voxel size exactly. Its box region is compared with modelmap's "point" map.
- cryoJAX `GaussianMixtureRenderFn` (optional; "average" sampling only), built the way cryoJAX
  documents it: `GaussianMixtureVolume.from_tabulated_parameters` with its Peng (1996) table and
  each atom's B as `extra_b_factors` (amplitudes times occupancy), with the "spread" backend
  (`n_spread` from `suggest_n_spread(cutoff_sigma=5)`) and the "dense" backend. A single call
  longer than `--max-call-s` (60 s) is stopped and recorded as skipped, and so are the larger sizes.
  Its maps are compared with modelmap's "average" map.

Common settings: 1 Å voxels, 5 Å padding (`Grid.around_positions`), the electron table (ITC
4.3.2.2 = Peng et al. 1996), the atoms' own B and occupancy, float32 (JAX's default).

How it is timed: every (method, forward or value_and_grad, size) runs in its own fresh Python
process, so the "first call" is trace + compile + one run with nothing cached, and "median" is
the median of `--repeats` (default 5, at least 3) further calls, each ended by
`block_until_ready`. modelmap's window planning (`with_plan`, numpy) is timed separately ("setup"
in the JSON). gemmi has no compile step, so only its median is reported; it runs on one thread,
JAX on all CPUs. Ratios: each method's forward median over gemmi's, and value_and_grad over forward.

Memory (Linux): each process resets its peak-RSS mark (VmHWM) once its inputs are built and reports
"peak" = peak RSS over all its calls (compilation included) minus the RSS at that point, and
"steady" = peak RSS during the steady calls minus the RSS after the first call (a lower bound,
since memory the allocator kept from the first call is reused). The parent kills a process whose
RSS passes `--max-rss-gib` and records it as skipped (out of memory).

Map checks: max |map - reference| / max |reference|, gemmi against modelmap "point" and cryoJAX
against modelmap "average", over the whole box (and, in the JSON, away from the faces). gemmi
runs with its default cutoff (each atom is cut where its density falls below 1e-5), which is
what makes its map differ by up to ~1e-3 of the maximum where many high-B atoms overlap.

cryoJAX is looked for in the interpreter named by `--cryojax-python` (or $CRYOJAX_PYTHON), else in
this one; if it cannot be imported there its rows say "not installed". To keep it out of the main
environment, install it into a venv of its own:

    python3 -m venv /tmp/venv-cryojax
    /tmp/venv-cryojax/bin/pip install cryojax gemmi -e .

Run it from the repository root:

    python benchmarks/bench_gaussian_mixture.py                 # all sizes (~25 min on 2 CPUs)
    python benchmarks/bench_gaussian_mixture.py --quick         # only 2.5k atoms (~2 min)
    python benchmarks/bench_gaussian_mixture.py --sizes 2.5k,26k --repeats 5 \
        --cryojax-python /tmp/venv-cryojax/bin/python --out /tmp/gm.json

It prints a table and writes JSON (default benchmarks/results/gaussian_mixture.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import cpu_model, git_commit

DATA_DIR = Path(
    os.environ.get("MODELMAP_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gaussian_mixture.json"
VOXEL_SIZE = 1.0  # Å
PADDING = 5.0  # Å
TARGET_NOISE = 0.5  # Å rms displacement of the atoms that make the target map
CRYOJAX_N_SIGMA = 5.0  # cryoJAX spread width in σ, the same coverage as modelmap's default windows
INTERIOR_BORDER = 12  # voxels left out at the faces for the "interior" map difference

# label -> (model file under DATA_DIR, number of leading atoms to keep or None for all, description)
SIZES = {
    "2.5k": ("emd30342_7cec/390_7cec.cif.gz", 2500, "7CEC, first 2,500 atoms"),
    "7.5k": ("emd30342_7cec/390_7cec.cif.gz", 7500, "7CEC, first 7,500 atoms"),
    "17.5k": ("emd30342_7cec/390_7cec.cif.gz", None, "7CEC, all atoms"),
    "26k": ("models/4YVS.cif.gz", None, "4YVS, all atoms"),
}

# method -> (library, modes measured, method whose map is the reference for the comparison)
METHODS = {
    "modelmap-average": ("modelmap", ("forward", "value_and_grad"), None),
    "modelmap-point": ("modelmap", ("forward", "value_and_grad"), None),
    "gemmi-point": ("gemmi", ("forward",), "modelmap-point"),
    "cryojax-spread": ("cryojax", ("forward", "value_and_grad"), "modelmap-average"),
    "cryojax-dense": ("cryojax", ("forward", "value_and_grad"), "modelmap-average"),
}

PROTOCOL = "@@"  # worker stdout lines that start with this are messages to the parent


# ==================================================================================================
# Worker side: runs in a fresh process, possibly in another interpreter (cryoJAX's venv), so only
# the standard library and numpy are imported at module level.
# ==================================================================================================


def _emit(kind: str, payload=None) -> None:
    print(f"{PROTOCOL}{kind} {json.dumps(payload)}", flush=True)


def _proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    """This process's peak resident set size since start or the last `_reset_peak_rss`, in MiB.

    On Linux this is VmHWM, not `getrusage().ru_maxrss`: the latter also counts the parent's peak
    RSS, which the kernel copies into the child at exec.
    """
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def _reset_peak_rss() -> float | None:
    """Reset the peak-RSS mark (Linux >= 4.0); return the current RSS in MiB, or None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_mib("VmRSS")


def _measure(call, repeats: int, base_mib: float | None = None) -> dict:
    """Time `call` (which must block until its result is ready): a first call, then `repeats` more.

    Memory, in MiB: `rss_growth_mib` is the peak RSS over all calls (compilation included) minus
    the RSS before the first call (or `base_mib`). `rss_growth_steady_mib` is the peak RSS during
    the steady calls minus the RSS after the first call; memory that the allocator kept from the
    first call is reused without being counted, so it is a lower bound on what one call needs.
    """
    start = _reset_peak_rss()
    base = base_mib if base_mib is not None else start if start is not None else _peak_rss_mib()
    times = []

    def timed():
        _emit("call_start")
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        _emit("call_end")
        return out

    timed()
    peak_first = _peak_rss_mib()
    steady_base = _reset_peak_rss()
    for _ in range(repeats):
        out = timed()
    peak_steady = _peak_rss_mib()
    peak = max(peak_first, peak_steady) if steady_base is not None else peak_steady
    return {
        "first_call_s": times[0],
        "steady_s": times[1:],
        "median_s": statistics.median(times[1:]),
        "rss_base_mib": base,
        "rss_peak_mib": peak,
        "rss_growth_mib": peak - base,
        "rss_growth_steady_mib": None if steady_base is None else max(0.0, peak_steady - steady_base),
        "_out": out,
    }


def _neg_cc(volume, render_fn, target):
    """Negative Pearson correlation between the rendered map and `target` (both real space)."""
    import jax.numpy as jnp

    x = render_fn(volume)
    x = x - jnp.mean(x)
    y = target - jnp.mean(target)
    return -jnp.sum(x * y) / jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))


def _load_case(path: str) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _worker_env(spec: dict) -> dict:
    """Versions and devices seen by this interpreter."""
    from importlib import metadata

    versions = {}
    for name in ("jax", "jaxlib", "equinox", "gemmi", "numpy", "modelmap", "cryojax"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {"python": sys.executable, "python_version": platform.python_version(), "versions": versions}
    try:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
        info["jax_backend"] = jax.default_backend()
    except Exception as e:  # noqa: BLE001 - report, do not fail
        info["jax_devices"] = f"jax unavailable: {e}"
    try:
        import cryojax.simulator  # noqa: F401

        info["cryojax_import"] = "ok"
    except Exception as e:  # noqa: BLE001
        info["cryojax_import"] = f"{type(e).__name__}: {e}"
    return info


def _worker_prepare(spec: dict) -> dict:
    """Read the model, keep the leading atoms, build the grid and the target map; save to npz."""
    import equinox as eqx
    import jax

    import modelmap

    model = modelmap.read_model(spec["model"], models="first")
    atoms = model.atoms
    if atoms.positions.ndim == 3:
        atoms = jax.tree_util.tree_map(lambda x: x[0], atoms)
    if spec["n_atoms"] is not None:
        n = spec["n_atoms"]
        atoms = jax.tree_util.tree_map(lambda x: x[:n], atoms)
    grid = modelmap.Grid.around_positions(atoms.positions, VOXEL_SIZE, PADDING)

    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, TARGET_NOISE / math.sqrt(3), atoms.positions.shape).astype(np.float32)
    moved = eqx.tree_at(lambda a: a.positions, atoms, atoms.positions + noise)
    volume = modelmap.GaussianMixtureVolume.from_atoms(moved)
    render_fn = modelmap.GaussianMixtureRenderFn(grid, sampling="average").with_plan(volume)
    target = eqx.filter_jit(lambda rf, v: rf(v))(render_fn, volume)

    b = np.asarray(atoms.b_factors)
    np.savez(
        spec["case_out"],
        positions=np.asarray(atoms.positions),
        atomic_numbers=np.asarray(atoms.atomic_numbers),
        b_factors=b,
        occupancies=np.asarray(atoms.occupancies),
        grid_shape=np.asarray(grid.shape),
        voxel_size=np.asarray(grid.voxel_size),
        origin=np.asarray(grid.origin),
        target=np.asarray(target),
    )
    return {
        "n_atoms": int(atoms.positions.shape[0]),
        "grid_shape_zyx": list(grid.shape),
        "grid_origin_xyz": list(grid.origin),
        "n_voxels": grid.n_voxels,
        "b_min": float(b.min()),
        "b_max": float(b.max()),
    }


def _worker_modelmap(spec: dict, case: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import modelmap

    atoms = modelmap.Atoms(case["positions"], case["atomic_numbers"], case["b_factors"], case["occupancies"])
    grid = modelmap.Grid(tuple(case["grid_shape"]), tuple(case["voxel_size"]), tuple(case["origin"]))
    volume = modelmap.GaussianMixtureVolume.from_atoms(atoms, table="electron")
    target = jnp.asarray(case["target"])
    jax.block_until_ready((volume, target))

    sampling = spec["method"].split("-")[1]
    t0 = time.perf_counter()
    render_fn = modelmap.GaussianMixtureRenderFn(grid, sampling=sampling).with_plan(volume)
    setup_s = time.perf_counter() - t0

    result = _time_render(spec, render_fn, volume, target)
    result["setup_s"] = setup_s
    result["window_buckets"] = [list(b.half_width) for b in render_fn.plan.buckets]
    return result


def _time_render(spec: dict, render_fn, volume, target) -> dict:
    """Time the forward map or value_and_grad of -CC (by `spec["mode"]`) of any render function."""
    import equinox as eqx
    import jax

    if spec["mode"] == "forward":
        render = eqx.filter_jit(lambda rf, v: rf(v))
        return _measure(lambda: render(render_fn, volume).block_until_ready(), spec["repeats"])
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_neg_cc))
    result = _measure(lambda: jax.block_until_ready(value_and_grad(volume, render_fn, target)), spec["repeats"])
    result["loss"] = float(result["_out"][0])
    return result


def _worker_cryojax(spec: dict, case: dict) -> dict:
    import cryojax.simulator as cxs
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from cryojax.constants import PengScatteringFactorParameters

    nz, ny, nx = (int(n) for n in case["grid_shape"])
    voxel = case["voxel_size"]
    if not np.allclose(voxel, voxel[0]):
        raise ValueError("cryoJAX renders cubic voxels only")
    # cryoJAX puts the coordinate 0 at grid index n // 2 along each axis
    centre = case["origin"] + voxel * np.array([nx // 2, ny // 2, nz // 2])
    positions = jnp.asarray(case["positions"] - centre, jnp.float32)
    parameters = PengScatteringFactorParameters(case["atomic_numbers"])
    volume = cxs.GaussianMixtureVolume.from_tabulated_parameters(
        positions, parameters, extra_b_factors=case["b_factors"]
    )
    occupancies = jnp.asarray(case["occupancies"])[:, None]
    volume = eqx.tree_at(lambda v: v.amplitudes, volume, volume.amplitudes * occupancies)
    target = jnp.asarray(case["target"])
    jax.block_until_ready((volume, target))

    backend = spec["method"].split("-")[1]
    t0 = time.perf_counter()
    n_spread = None
    if backend == "spread":
        n_spread = cxs.suggest_n_spread(volume, float(voxel[0]), cutoff_sigma=CRYOJAX_N_SIGMA)
    render_fn = cxs.GaussianMixtureRenderFn(
        (nz, ny, nx), float(voxel[0]), n_spread=n_spread, n_batches=spec["cryojax_n_batches"]
    )
    setup_s = time.perf_counter() - t0

    result = _time_render(spec, render_fn, volume, target)
    result["setup_s"] = setup_s
    result["n_spread"] = n_spread
    result["n_batches"] = spec["cryojax_n_batches"]
    return result


def _worker_gemmi(spec: dict, case: dict) -> dict:
    import gemmi

    nz, ny, nx = (int(n) for n in case["grid_shape"])
    voxel = case["voxel_size"]
    positions = case["positions"].astype(np.float64) - case["origin"]  # box grid point 0 at the cell origin
    residue = gemmi.Residue()
    residue.name = "UNK"
    residue.seqid = gemmi.SeqId(1, " ")
    for xyz, z, b, q in zip(positions, case["atomic_numbers"], case["b_factors"], case["occupancies"]):
        atom = gemmi.Atom()
        atom.element = gemmi.Element(int(z))
        atom.name = atom.element.name
        atom.pos = gemmi.Position(*xyz)
        atom.b_iso = float(b)
        atom.occ = float(q)
        residue.add_atom(atom)
    model = gemmi.Model("1")
    model.add_chain(gemmi.Chain("A"))
    model["A"].add_residue(residue)

    calc = gemmi.DensityCalculatorE()
    calc.blur = 0.0
    calc.d_min = 0.0  # keep the grid size set below
    # P1 cell larger than the box by gemmi's largest atom radius (+1 voxel), so nothing wraps into it
    margin = math.ceil(max(calc.estimate_radius(atom) for atom in model["A"][0]) / float(voxel.min())) + 1
    points = [nx + margin, ny + margin, nz + margin]
    cell = gemmi.UnitCell(*(n * float(v) for n, v in zip(points, voxel)), 90, 90, 90)
    base = _reset_peak_rss()  # the grid gemmi allocates counts as its memory
    calc.grid.set_unit_cell(cell)
    calc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calc.grid.set_size(*points)
    if not np.allclose(calc.grid.spacing, voxel):
        raise RuntimeError(f"gemmi grid spacing {calc.grid.spacing} != voxel size {tuple(voxel)}")

    def call():
        calc.put_model_density_on_grid(model)
        return calc.grid

    result = _measure(call, spec["repeats"], base_mib=base)
    grid_array = np.array(calc.grid.array, copy=False)  # (x, y, z)
    result["_out"] = grid_array[:nx, :ny, :nz].transpose(2, 1, 0)
    result["first_call_s"] = None  # nothing to compile: the first call is just another call
    result["cell_points_xyz"] = points
    result["threads"] = 1
    return result


def worker_main(spec: dict) -> None:
    """Entry point of a worker process: run one task, report it on stdout."""
    try:
        task = spec["task"]
        if task == "env":
            result = _worker_env(spec)
        elif task == "prepare":
            result = _worker_prepare(spec)
        else:
            case = _load_case(spec["case"])
            library = METHODS[spec["method"]][0]
            run = {"modelmap": _worker_modelmap, "cryojax": _worker_cryojax, "gemmi": _worker_gemmi}[library]
            result = run(spec, case)
            out = result.pop("_out")
            if spec.get("map_out"):
                np.save(spec["map_out"], np.asarray(out, np.float32))
        _emit("result", result)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        _emit("error", f"{type(e).__name__}: {e}")
        sys.exit(1)


# ==================================================================================================
# Parent side: runs the workers, enforces the limits, compares maps, prints and saves.
# ==================================================================================================


def _rss_bytes(pid: int) -> int:
    """Current RSS of a process (Linux /proc), or 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def run_worker(python: str, spec: dict, *, max_call_s: float | None = None, max_rss: int | None = None):
    """Run one worker task in a fresh process. Returns `(result, None)` or `(None, reason)`.

    The process is killed if a single timed call runs longer than `max_call_s` or its RSS passes
    `max_rss` bytes.
    """
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        result = error = killed = None
        call_started = None
        eof = False
        while not eof:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
            elif line.startswith(PROTOCOL):
                kind, _, payload = line[len(PROTOCOL) :].partition(" ")
                payload = json.loads(payload)
                if kind == "call_start":
                    call_started = time.monotonic()
                elif kind == "call_end":
                    call_started = None
                elif kind == "result":
                    result = payload
                elif kind == "error":
                    error = payload
            if killed is None and proc.poll() is None:
                if max_rss and _rss_bytes(proc.pid) > max_rss:
                    killed = f"out of memory (RSS passed {max_rss / 2**30:.1f} GiB)"
                elif max_call_s and call_started and time.monotonic() - call_started > max_call_s:
                    killed = f"a single call took more than {max_call_s:g} s"
                if killed:
                    proc.kill()
        rc = proc.wait()
        if result is not None:
            return result, None
        if killed:
            return None, killed
        if error:
            return None, f"error: {error}"
        stderr.seek(0)
        tail = stderr.read().strip().splitlines()[-3:]
        why = "killed by the system (out of memory?)" if rc in (-9, 137) else f"exit code {rc}"
        return None, f"error: {why}: {' | '.join(tail)}"


def _add_map_differences(entry: dict, maps_dir: Path) -> None:
    """max |map - reference| / max |reference| for the methods that have a reference map.

    Over the whole box, and over the interior `INTERIOR_BORDER` voxels away from the faces
    (cryoJAX's spread backend wraps windows periodically, which only affects the faces).
    """
    for method, record in entry["methods"].items():
        reference = METHODS[method][2]
        path, ref_path = (maps_dir / f"{entry['label']}_{m}.npy" for m in (method, reference))
        if reference is None or not (path.exists() and ref_path.exists()):
            continue
        a, b = np.load(path).astype(np.float64), np.load(ref_path).astype(np.float64)
        inner = (slice(INTERIOR_BORDER, -INTERIOR_BORDER),) * 3
        scale = np.max(np.abs(b))
        record["max_rel_diff"] = {
            "reference": reference,
            "value": float(np.max(np.abs(a - b)) / scale),
            "interior": float(np.max(np.abs(a - b)[inner]) / scale),
        }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(args) -> dict:
    main_python = sys.executable
    env, why = run_worker(main_python, {"task": "env"})
    if env is None:
        raise SystemExit(f"cannot start a worker: {why}")

    cryojax_python = args.cryojax_python or os.environ.get("CRYOJAX_PYTHON") or main_python
    cryojax_env = env if cryojax_python == main_python else run_worker(cryojax_python, {"task": "env"})[0]
    if cryojax_env is not None and cryojax_env.get("cryojax_import") == "ok":
        cryojax_status = "ok"
    else:
        detail = cryojax_env.get("cryojax_import") if cryojax_env else f"cannot run {cryojax_python}"
        cryojax_status = f"not installed ({detail})"
    _log(f"cryojax: {cryojax_status} [{cryojax_python}]")

    max_rss = int(args.max_rss_gib * 2**30)
    report = {
        "benchmark": "gaussian_mixture",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "settings": {
            "repeats": args.repeats,
            "voxel_size_A": VOXEL_SIZE,
            "padding_A": PADDING,
            "table": "electron (ITC 4.3.2.2 = Peng et al. 1996), atoms' own B and occupancy",
            "dtype": "float32",
            "loss": "negative Pearson correlation with a fixed target map",
            "target": f"modelmap 'average' map of the same atoms moved by {TARGET_NOISE} Å rms noise (seed 0)",
            "modelmap": "GaussianMixtureRenderFn defaults (n_sigma=5, chunk_size=256), with_plan(volume)",
            "gemmi": "DensityCalculatorE, blur 0, default cutoff (1e-5), P1 cell = box + largest atom radius",
            "cryojax": f"spread: n_spread=suggest_n_spread(cutoff_sigma={CRYOJAX_N_SIGMA}); "
            f"dense: n_spread=None; n_batches={args.cryojax_n_batches}",
            "max_call_s_cryojax": args.max_call_s,
            "max_rss_gib": args.max_rss_gib,
            "timing": "first call = trace + compile + 1 run in a fresh process; median of `repeats` more",
            "memory": "per process, MiB: rss_growth = peak RSS over all calls (compilation included) minus "
            "the RSS once the inputs were built; rss_growth_steady = peak RSS during the steady calls minus "
            "the RSS after the first call (a lower bound: memory kept by the allocator is reused)",
        },
        "environment": {
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "modelmap_git": git_commit(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "mem_available_gib": round(_mem_available_bytes() / 2**30, 1),
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "python": env["python_version"],
            "jax_devices": env.get("jax_devices"),
            "versions": env["versions"],
            "cryojax": {"status": cryojax_status, "python": cryojax_python, "environment": cryojax_env},
        },
        "sizes": [],
    }

    blocked: dict[tuple[str, str], str] = {}  # (method, mode) -> why larger sizes are skipped
    with tempfile.TemporaryDirectory(prefix="bench_gm_") as tmp:
        tmp = Path(tmp)
        for label in args.sizes:
            model_file, n_atoms, description = SIZES[label]
            _log(f"[{label}] preparing {description}")
            case_path = tmp / f"{label}.npz"
            meta, why = run_worker(
                main_python,
                {
                    "task": "prepare",
                    "model": str(DATA_DIR / model_file),
                    "n_atoms": n_atoms,
                    "case_out": str(case_path),
                },
            )
            if meta is None:
                raise SystemExit(f"cannot prepare size {label}: {why}")
            entry = {"label": label, "description": description, "model": model_file, **meta, "methods": {}}
            report["sizes"].append(entry)

            for method in args.methods:
                library, modes, _ = METHODS[method]
                python = cryojax_python if library == "cryojax" else main_python
                record = entry["methods"].setdefault(method, {})
                for mode in modes:
                    if library == "cryojax" and cryojax_status != "ok":
                        record[mode] = {"status": "not installed"}
                        continue
                    if (method, mode) in blocked:
                        record[mode] = {"status": f"skipped: {blocked[method, mode]}"}
                        continue
                    if mode != "forward" and record["forward"]["status"] != "ok":
                        record[mode] = {"status": "skipped: the forward map was skipped"}
                        blocked[method, mode] = f"the forward map was skipped at {label}"
                        continue
                    _log(f"[{label}] {method} {mode} ...")
                    spec = {
                        "task": "measure",
                        "method": method,
                        "mode": mode,
                        "case": str(case_path),
                        "repeats": args.repeats,
                        "map_out": str(tmp / f"{label}_{method}.npy") if mode == "forward" else None,
                        "cryojax_n_batches": args.cryojax_n_batches,
                    }
                    limit = args.max_call_s if library == "cryojax" else None
                    result, why = run_worker(python, spec, max_call_s=limit, max_rss=max_rss)
                    if result is None:
                        record[mode] = {"status": f"skipped: {why}" if not why.startswith("error") else why}
                        blocked[method, mode] = f"{why} at {label}"
                        _log(f"[{label}] {method} {mode}: {record[mode]['status']}")
                    else:
                        record[mode] = {"status": "ok", **result}
                        _log(
                            f"[{label}] {method} {mode}: median {result['median_s']:.4g} s, "
                            f"ΔRSS {result['rss_growth_mib']:.0f} MiB"
                        )
            _add_map_differences(entry, tmp)
            _add_ratios(entry)
    return report


def _median(entry: dict, method: str, mode: str) -> float | None:
    m = entry["methods"].get(method, {}).get(mode, {})
    return m.get("median_s") if m.get("status") == "ok" else None


def _add_ratios(entry: dict) -> None:
    """forward / gemmi forward, and value_and_grad / forward, for every method."""
    gemmi = _median(entry, "gemmi-point", "forward")
    for method, record in entry["methods"].items():
        fwd = _median(entry, method, "forward")
        vg = _median(entry, method, "value_and_grad")
        record["ratios"] = {
            "forward_over_gemmi": fwd / gemmi if fwd and gemmi else None,
            "value_and_grad_over_forward": vg / fwd if vg and fwd else None,
        }


# ==================================================================================================
# Output
# ==================================================================================================


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _fmt_rss(m: dict) -> str:
    steady = m.get("rss_growth_steady_mib")
    return f"{m['rss_growth_mib']:.0f}/{_fmt(steady, '.0f')}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# (header, width, function of (method record, forward, value_and_grad) -> cell text)
_COLUMNS = [
    ("fwd 1st", 9, lambda r, f, v: _cell(f, lambda m: _fmt_s(m.get("first_call_s")))),
    ("fwd median", 12, lambda r, f, v: _cell(f, lambda m: _fmt_s(m["median_s"]))),
    ("fwd/gemmi", 11, lambda r, f, v: _fmt(r["ratios"]["forward_over_gemmi"], ".2f")),
    ("v&g 1st", 9, lambda r, f, v: _cell(v, lambda m: _fmt_s(m["first_call_s"]))),
    ("v&g median", 12, lambda r, f, v: _cell(v, lambda m: _fmt_s(m["median_s"]))),
    ("v&g/fwd", 9, lambda r, f, v: _fmt(r["ratios"]["value_and_grad_over_forward"], ".2f")),
    ("ΔRSS fwd", 13, lambda r, f, v: _cell(f, _fmt_rss)),
    ("ΔRSS v&g", 13, lambda r, f, v: _cell(v, _fmt_rss)),
    ("max|Δ|/max", 12, lambda r, f, v: _fmt(r.get("max_rel_diff", {}).get("value"), ".1e")),
]


def _cell(measurement: dict, show) -> str:
    """`show(measurement)` if it ran, "skip" if it was skipped, "-" if it does not apply."""
    if not measurement:
        return "-"
    return show(measurement) if measurement["status"] == "ok" else "skip"


def format_report(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v and k != "cryojax")
    cx = env["cryojax"]
    if cx["status"] == "ok":
        cx_versions = cx["environment"]["versions"]
        cryojax_line = f"cryojax {cx_versions['cryojax']} (jax {cx_versions['jax']}, {cx['python']})"
    else:
        cryojax_line = f"cryojax {cx['status']}"
    devices = ", ".join(env["jax_devices"])
    repeats = report["settings"]["repeats"]
    lines = [
        "Gaussian-mixture model maps on CPU: 1 Å voxels, 5 Å padding, electron table (Peng 1996), atoms' own B",
        f"device: {devices} | {env['cpu_count']} CPUs ({env['cpu_model']}) | {env['mem_available_gib']} GiB free",
        f"versions: {versions}; {cryojax_line}",
        (
            f"times in s: '1st' = trace + compile + one run in a fresh process, 'median' of {repeats} more; "
            "v&g = value_and_grad of -CC; gemmi is single-threaded"
        ),
        (
            "ΔRSS in MiB, 'peak/steady': peak RSS beyond the inputs over all calls (compilation included) / "
            "extra RSS during the steady calls"
        ),
        (
            "max|Δ|/max: largest difference from modelmap's map with the same sampling, over its maximum "
            "(gemmi: default cutoff 1e-5; cryoJAX spread wraps periodically at the faces, see 'interior' in the JSON)"
        ),
    ]
    header = f"{'method':<18}" + "".join(f"{title:>{width}}" for title, width, _ in _COLUMNS)
    for entry in report["sizes"]:
        nz, ny, nx = entry["grid_shape_zyx"]
        lines += [
            "",
            (
                f"== {entry['label']}: {entry['description']} ({entry['n_atoms']:,} atoms, "
                f"B {entry['b_min']:.0f}-{entry['b_max']:.0f} Å²) | grid {nx}x{ny}x{nz} (x,y,z) = "
                f"{entry['n_voxels'] / 1e6:.2f} M voxels, {entry['n_voxels'] * 4 / 2**20:.1f} MiB as float32"
            ),
            header,
        ]
        notes = []
        for method, record in entry["methods"].items():
            fwd, vg = record.get("forward", {}), record.get("value_and_grad", {})
            cells = "".join(f"{show(record, fwd, vg):>{width}}" for _, width, show in _COLUMNS)
            lines.append(f"{method:<18}{cells}")
            notes += [
                f"  {method} {mode}: {m['status']}"
                for mode, m in (("forward", fwd), ("value_and_grad", vg))
                if m and m["status"] != "ok"
            ]
        lines += notes
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help=f"comma-separated subset of {','.join(SIZES)} (default: all)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="steady-state calls after the first (>= 3)")
    parser.add_argument("--quick", action="store_true", help="only the 2.5k size (a smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument(
        "--cryojax-python", help="interpreter with cryojax installed (default $CRYOJAX_PYTHON, else this one)"
    )
    parser.add_argument("--cryojax-n-batches", type=int, default=1, help="cryoJAX n_batches (its default 1)")
    parser.add_argument(
        "--max-call-s", type=float, default=60.0, help="skip a cryoJAX measurement whose single call takes longer (s)"
    )
    parser.add_argument(
        "--max-rss-gib",
        type=float,
        default=round(0.8 * _mem_available_bytes() / 2**30, 1),
        help="kill and skip a measurement whose process passes this RSS (default 80%% of free)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.sizes:
        args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    else:
        args.sizes = ["2.5k"] if args.quick else list(SIZES)
    args.methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    for name, chosen, allowed in (("size", args.sizes, SIZES), ("method", args.methods, METHODS)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {list(allowed)}")
    args.sizes.sort(key=list(SIZES).index)  # ascending, so a method that fails stops growing
    args.methods.sort(key=list(METHODS).index)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    report = run_benchmark(args)
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
