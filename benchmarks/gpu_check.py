"""GPU check: modelmap's renderers, the batch API and a refinement step, timed on one device.

Run on the device machine through `bash benchmarks/gpu_check.sh` (which installs the carried wheels
and points `MODELMAP_TEST_DATA` at the carried data; see benchmarks/gpu_prepare.sh), or here with
`--cpu` at small sizes (seconds to a minute) to check that it works:

    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json

What it measures (GPU sizes; `--cpu` in brackets):

- every renderer (`gaussian`: Gaussian mixture, exact voxel averages, `--res-gaussian` 1.5 Å;
  `splat_fourier`: the Fourier map by splatting + FFT, 4 Å, eps 1e-5 as `render_model` uses; `nufft`: the exact Fourier map through
  jax-finufft, 4 Å; `shells`: the shell decomposition, 6 terms, 4 Å), forward and `value_and_grad`
  of −CC against the model's own map (gradient with respect to every float leaf of the volume), at
  - `26k`: 4YVS as deposited (26,430 atoms, the asymmetric unit of the EV71 VLP) on a 1 Å grid with
    5 Å padding [`small`: 3AJO, 1,654 atoms];
  - `317k`: 4YVS's biological assembly (`gemmi.make_assembly`, 180-mer, 317,160 atoms), 1 Å grid
    [`large`: the assembly's first 3,000 atoms]; and the same assembly's Gaussian map streamed by
    8 z-slabs on one device (`stream_slabs`), with the device allocator's peak memory;
- the batch API: 256 structures of ~3,000 atoms (compact regions of 7CEC: the whole residues
  nearest a random residue) into 64³ boxes of 1.5 Å voxels [16 × ~300 atoms, 32³]: `render_batch` end to end,
  and `render_stacked` forward and value_and_grad per method over the planned groups;
- one refinement: 7CEC chain A (4,308 atoms) against the EMD-30342 crop at 3.9 Å with `refine`
  (xyz + B, L-BFGS, restraints from biotite's CCD when biotite imports, else none), `--refine-steps`
  steps in one macro-cycle [residues 1-25 of chain A, 2 steps];
- the GPU targets: >= 2,000 maps/s at 256 × 3k atoms into 64³ (`render_stacked` forward, Gaussian),
  26k atoms at 1 Å forward <= 20 ms (Gaussian), value_and_grad <= 3 × forward (each renderer, 26k).

How it is timed: each measurement is jitted as a whole (`jax.jit` over the arrays of its inputs,
the rest static), then `lower` and `compile` are timed separately (`lower_s`, `compile_s`), the first
run of the compiled function (`first_run_s`), and the median of up to `--repeats` further runs, each
ended by `jax.block_until_ready` (fewer when a measurement passes its time cap). Setup on the host
(volumes, window plans) is `setup_s`. The refinement is timed by `refine`'s own history (wall clock,
compilation inside its first step).

It survives failures: a measurement that raises records its error and the script goes on; a time
budget (`--budget-s`) skips what no longer fits, and a watchdog writes the JSON and exits if one
measurement hangs past it. The JSON is rewritten after every measurement, so a killed run leaves
what it had measured. It goes to `--out`, else `$OUT/gpu_check.json` when `$OUT` is set, else
`benchmarks/results/gpu/gpu_check_<date>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

if "--cpu" in sys.argv:  # before jax is imported
    os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

from _common import cpu_model, cut_compact_regions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "modelmap-gpu-check/1"
RENDERERS = ("gaussian", "splat_fourier", "nufft", "shells")
BATCH_METHODS = {"gaussian": "gaussian", "splat_fourier": "fourier", "shells": "shells"}  # renderer -> batch method
FILES = {
    "4yvs": "models/4YVS.cif.gz",
    "3ajo": "emd20026_apoferritin/3ajo_fitted_refined.pdb",
    "7cec": "emd30342_7cec/390_7cec.cif.gz",
    "7cec_A": "emd30342_7cec/390_7cec_A.cif.gz",
    "7cec_map": "emd30342_7cec/390_emd_30342_A_z4.mrc.gz",
}


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
    from modelmap.batch import plan_batch, render_batch, render_stacked
except ImportError as _err:  # the batch API is not there yet: its measurements record this
    plan_batch = render_batch = render_stacked = None
    BATCH_IMPORT_ERROR = f"modelmap.batch: {type(_err).__name__}: {_err}"
else:
    BATCH_IMPORT_ERROR = None


def mm_read_atoms(path):
    """(Atoms of the first model, chain ids (n,), residue keys (n,)) of a model file."""
    model = mm.read_model(path, models="first")
    lab = model.labels
    residue = np.array([f"{c}/{n}{i}" for c, n, i in zip(lab.chain, lab.residue_number, lab.insertion_code)])
    return model.atoms, np.asarray(lab.chain), residue


def mm_assembly_atoms(path):
    """Atoms of the first biological assembly of a model file (gemmi.make_assembly)."""
    import gemmi

    st = gemmi.read_structure(str(path), merge_chain_parts=False)
    st.setup_entities()
    assembly = gemmi.make_assembly(st.assemblies[0], st[0], gemmi.HowToNameCopiedChain.AddNumber)
    out = gemmi.Structure()
    out.add_model(assembly)
    return mm.io.model_from_structure(out, models="first").atoms


def mm_read_fragment(path, n_residues):
    """The `AtomicModel` of a model file, cut to its first `n_residues` residues per chain (None: all)."""
    import gemmi

    st = gemmi.read_structure(str(path), merge_chain_parts=False)
    st.setup_entities()
    if n_residues is not None:
        for chain in st[0]:
            del chain[n_residues:]
    return mm.io.model_from_structure(st, models="first")


def mm_take(atoms, index):
    """The atoms at `index` (numpy integer array or slice)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)[index]), atoms)


def mm_grid(atoms, voxel, padding):
    return mm.Grid.around_positions(np.asarray(atoms.positions), voxel_size=voxel, padding=padding)


def mm_volume(renderer, atoms, resolution):
    if renderer == "gaussian":
        return mm.GaussianMixtureVolume.from_atoms(atoms, resolution)
    if renderer in ("splat_fourier", "nufft"):
        return mm.IndependentAtomVolume.from_atoms(atoms, resolution)
    if renderer == "shells":
        return mm.ShellDecompositionVolume.from_atoms(atoms, resolution, n_terms=6)
    raise ValueError(f"unknown renderer {renderer!r}")


def mm_render_fn(renderer, grid, volume):
    """A render function planned for `volume` (concrete)."""
    if renderer == "gaussian":
        fn = mm.GaussianMixtureRenderFn(grid, sampling="average")
    elif renderer == "splat_fourier":
        fn = mm.render.SplatFourierRenderFn(grid, eps=1e-5)  # the accuracy render_model and the batch use
    elif renderer == "nufft":
        fn = mm.NufftRenderFn(grid)
    elif renderer == "shells":
        fn = mm.ShellRenderFn(grid)
    else:
        raise ValueError(f"unknown renderer {renderer!r}")
    return fn.with_plan(volume)


def mm_render(render_fn, volume):
    return render_fn(volume)


def mm_describe(render_fn) -> dict:
    """What the plan chose (best effort: window half widths, extra blur, Chebyshev nodes)."""
    out = {}
    for obj in (render_fn, getattr(render_fn, "splat", None)):
        plan = getattr(obj, "plan", None)
        if plan is not None and hasattr(plan, "buckets"):
            out["window_half_widths_xyz"] = [list(b.half_width) for b in plan.buckets]
            out["window_sources"] = [int(np.asarray(b.mask).sum()) for b in plan.buckets]
    for name in ("extra_b", "n_nodes", "profile_nodes", "resolution"):
        value = getattr(render_fn, name, None)
        if isinstance(value, (int, float)):
            out[name] = value
    return out


def mm_batch_render(structures, resolution, method, box, voxel, batch_size):
    """`render_batch`: (maps (B, box, box, box), origins (B, 3))."""
    out = render_batch(structures, resolution, method=method, box=box, voxel_size=voxel, batch_size=batch_size)
    return out.maps, out.origins


def mm_batch_plan(structures, resolution, method, box, voxel):
    """[(render_fn, stacked volumes, the structure of each member)] of `plan_batch`'s groups."""
    groups = plan_batch(structures, resolution, method=method, box=box, voxel_size=voxel)
    return [(g.render_fn, g.volumes, np.asarray(g.indices)) for g in groups]


def mm_render_stacked(render_fn, volumes, batch_size):
    return render_stacked(render_fn, volumes, batch_size=batch_size)


def mm_assemble(indices, parts, n):
    """(n, ...) the structures' maps, in input order, from the groups' maps."""
    from modelmap.batch import assemble

    return assemble(indices, parts, n)


def mm_read_map(path):
    return mm.read_map(path)


def mm_build_restraints(model):
    from modelmap.refine import build_restraints

    return build_restraints(model)


def mm_refine(model, density_map, resolution, restraints, steps):
    """`refine` (xyz + B) for `steps` steps in one macro-cycle (one compiled loop): the `RefineResult`."""
    from modelmap.refine import refine

    return refine(
        model, density_map, resolution, parameters=("xyz", "b"), restraints=restraints if restraints is not None else False,
        max_steps=steps, macro_cycles=1, progress=False,
    )


def mm_stream(atoms, grid, resolution, n_slabs):
    """The Gaussian map of `atoms` streamed by `n_slabs` z-slabs on the default device (`SlabPlan`,
    `stream_slabs`): one compiled slab render, each slab copied to a numpy map on the host.
    Returns (setup_s, first_s, second_s, slab description)."""
    from modelmap.render import SlabPlan, slab_memory_bytes, stream_slabs

    t0 = time.perf_counter()
    volume = mm.GaussianMixtureVolume.from_atoms(atoms, resolution)
    slabs = SlabPlan.build(mm.GaussianMixtureRenderFn(grid, sampling="average"), volume, n_slabs=n_slabs)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream_slabs(slabs, volume)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream_slabs(slabs, volume)
    second = time.perf_counter() - t0
    pad = slabs.render_fn.plan.pad
    return setup, first, second, {
        "n_slabs": slabs.n_slabs, "thickness": slabs.thickness,
        "slab_working_bytes_estimate": slab_memory_bytes(grid, slabs.thickness, pad, int(atoms.positions.shape[0])),
    }


def mm_version() -> str:
    return getattr(mm, "__version__", "unknown")


# ==================================================================================================
# End of the modelmap section.
# ==================================================================================================


class Budget:
    """The time left to the run, and a watchdog that saves and exits when a call hangs past it."""

    def __init__(self, seconds: float, report: "Report"):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self.report = report
        self._timer = threading.Timer(seconds + 5.0, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def _expire(self):
        self.report.abort(f"killed by the watchdog: the run passed its time budget of {self.seconds:.0f} s")
        os._exit(3)

    def cancel(self):
        self._timer.cancel()


class Report:
    """The JSON document, rewritten (atomically) after every change."""

    def __init__(self, path: Path, doc: dict):
        self.path = path
        self.doc = doc
        self.current: str | None = None
        self.lock = threading.Lock()

    def save(self):
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.doc, indent=1, default=_json_default) + "\n")
            os.replace(tmp, self.path)

    def put(self, name: str, entry: dict):
        self.doc["measurements"][name] = entry
        self.save()

    def abort(self, why: str):
        if self.current is not None:
            entry = self.doc["measurements"].setdefault(self.current, {})
            entry.update(status="error", error=why)
        self.doc["complete"] = False
        self.doc["aborted"] = why
        self.doc["elapsed_s"] = time.perf_counter() - T_START
        self.save()


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


T_START = time.perf_counter()


def _log(msg: str):
    print(f"[{time.perf_counter() - T_START:7.1f} s] {msg}", flush=True)


# ---- environment -----------------------------------------------------------------------------------
def _version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _source_digest() -> str:
    """sha256 of src/modelmap's .py files (the copy that runs, also where no .git travelled)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "src" / "modelmap").rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    devices = jax.devices()
    dev = devices[0]
    info = {
        "platform": dev.platform,
        "device_kind": getattr(dev, "device_kind", None),
        "devices": [str(d) for d in devices],
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {n: _version(n) for n in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "equinox",
                                          "numpy", "scipy", "optax", "optimistix", "gemmi", "mrcfile", "biotite",
                                          "jax-finufft")}
    versions["modelmap"] = mm_version()
    versions["modelmap_git"] = _git("rev-parse", "--short", "HEAD")
    versions["modelmap_src_sha256"] = _source_digest()
    return {"device": info, "versions": versions}


def _memory() -> dict:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has them
        return {}
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


# ---- timing ----------------------------------------------------------------------------------------
def time_jitted(func, args: tuple, repeats: int, cap_s: float, budget: Budget) -> dict:
    """Lower, compile, run once, then up to `repeats` timed runs of `func(*args)` jitted over the
    arrays in `args` (the rest static). Stops repeating past `cap_s` seconds in this measurement."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    jitted = jax.jit(lambda d: func(*eqx.combine(d, static)))
    t0 = time.perf_counter()
    lowered = jitted.lower(dynamic)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(dynamic))
    t3 = time.perf_counter()
    times = []
    for _ in range(repeats):
        if times and (time.perf_counter() - t0 > cap_s or budget.left() < 10 * times[-1] + 5):
            break
        s = time.perf_counter()
        out = jax.block_until_ready(compiled(dynamic))
        times.append(time.perf_counter() - s)
    return {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "first_run_s": t3 - t2,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "times_s": times,
        "repeats": len(times),
        "_out": out,
    }


def neg_cc(x, target):
    x = x - jnp.mean(x)
    y = target - jnp.mean(target)
    return -jnp.sum(x * y) / jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))


def forward(render_fn, volume):
    return mm_render(render_fn, volume)


def value_and_grad(render_fn, volume, target):
    return eqx.filter_value_and_grad(lambda v: neg_cc(mm_render(render_fn, v), target))(volume)


# ---- the run ---------------------------------------------------------------------------------------
class Check:
    def __init__(self, args, report: Report, budget: Budget):
        self.args = args
        self.report = report
        self.budget = budget
        self.data = Path(args.data)
        self.cpu = args.cpu

    def measure(self, name: str, fn, *, reserve: float, **fields):
        """Run `fn() -> dict` as measurement `name`, recording its result or error."""
        entry = {"status": None, "error": None, **fields}
        if self.args.only and not any(name.startswith(p) for p in self.args.only):
            return None
        if self.budget.left() < reserve:
            entry.update(status="skipped", error=f"time budget: {self.budget.left():.0f} s left, {reserve:.0f} s reserved")
            self.report.put(name, entry)
            _log(f"{name}: skipped (time budget)")
            return None
        self.report.current = name
        self.report.put(name, {**entry, "status": "running"})
        _log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            if any(name.startswith(p) for p in self.args.inject_error):
                raise RuntimeError("error injected by --inject-error (a test of the error path)")
            result = fn()
            entry.update(result)
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - record and go on
            entry.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                         traceback=traceback.format_exc()[-4000:])
        entry["wall_s"] = time.perf_counter() - t0
        entry["memory"] = _memory()
        entry.pop("_out", None)
        self.report.current = None
        self.report.put(name, entry)
        summary = entry["error"] if entry["status"] != "ok" else _summary(entry)
        _log(f"{name}: {entry['status']} {summary}")
        return entry

    # -- inputs --
    def load_inputs(self):
        a = self.args
        inputs = {}
        t0 = time.perf_counter()
        if self.cpu:
            atoms, _, _ = mm_read_atoms(self.data / FILES["3ajo"])
            inputs["small"] = (atoms, "3AJO (fitted into EMD-20026), all 1,654 atoms of chain A")
        else:
            atoms, _, _ = mm_read_atoms(self.data / FILES["4yvs"])
            inputs["26k"] = (atoms, "4YVS as deposited: the asymmetric unit of the EV71 VLP, 15 chains")
        if not a.skip_large:
            big = mm_assembly_atoms(self.data / FILES["4yvs"])
            if self.cpu:
                big = mm_take(big, slice(0, 3000))
                inputs["large"] = (big, "4YVS biological assembly (gemmi.make_assembly), its first 3,000 atoms")
            else:
                inputs["317k"] = (big, "4YVS biological assembly (gemmi.make_assembly): 12 operators on the 15 chains, 180 chains")
        self.inputs = {}
        for label, (atoms, what) in inputs.items():
            grid = mm_grid(atoms, a.voxel, a.padding)
            b = np.asarray(atoms.b_factors)
            self.inputs[label] = (atoms, grid)
            self.report.doc["inputs"][label] = {
                "what": what, "file": FILES["4yvs"] if label in ("26k", "317k", "large") else FILES["3ajo"],
                "n_atoms": int(atoms.positions.shape[0]), "grid_shape_zyx": list(grid.shape),
                "voxel_size": a.voxel, "padding": a.padding, "grid_origin_xyz": list(grid.origin),
                "n_voxels": int(np.prod(grid.shape)), "b_min": float(b.min()), "b_max": float(b.max()),
            }
        self.report.doc["inputs"]["load_s"] = time.perf_counter() - t0
        self.report.save()

    def resolution(self, renderer):
        return {"gaussian": self.args.res_gaussian, "splat_fourier": self.args.res_fourier,
                "nufft": self.args.res_fourier, "shells": self.args.res_shells}[renderer]

    # -- renderers --
    def renderer(self, renderer: str, label: str, *, device=None, tag: str = ""):
        atoms, grid = self.inputs[label]
        res = self.resolution(renderer)
        big = label in ("317k",)
        repeats = self.args.repeats_large if big else self.args.repeats
        cap = self.args.cap_large_s if big else self.args.cap_s
        reserve = self.args.reserve_large_s if big else self.args.reserve_s
        common = {"renderer": renderer, "size": label, "n_atoms": int(atoms.positions.shape[0]),
                  "grid_shape_zyx": list(grid.shape), "voxel_size": self.args.voxel, "resolution": res}
        state = {}

        def setup():
            t0 = time.perf_counter()
            with _on(device):
                local = atoms if device is None else jax.device_put(atoms, device)
                volume = mm_volume(renderer, local, res)
                render_fn = mm_render_fn(renderer, grid, volume)
                jax.block_until_ready(volume)
            state.update(volume=volume, render_fn=render_fn, setup_s=time.perf_counter() - t0)

        def run_forward():
            setup()
            with _on(device):
                r = time_jitted(forward, (state["render_fn"], state["volume"]), repeats, cap, self.budget)
            state["target"] = r["_out"]
            return {"setup_s": state["setup_s"], "plan": mm_describe(state["render_fn"]), **r}

        def run_vag():
            if "target" not in state:
                raise RuntimeError("no forward map to use as the target (the forward measurement failed)")
            with _on(device):
                r = time_jitted(value_and_grad, (state["render_fn"], state["volume"], state["target"]), repeats,
                                cap, self.budget)
            r["loss"] = float(r["_out"][0])
            return r

        base = f"render/{renderer}{tag}/{label}"
        fwd = self.measure(f"{base}/forward", run_forward, reserve=reserve, **common)
        vag = self.measure(f"{base}/value_and_grad", run_vag, reserve=reserve, **common)
        if fwd and vag and fwd.get("median_s") and vag.get("median_s"):
            vag["ratio_to_forward"] = vag["median_s"] / fwd["median_s"]
            self.report.save()

    # -- one large map streamed by z-slabs on one device --
    def streamed(self, label: str, n_slabs: int = 8):
        atoms, grid = self.inputs[label]
        res = self.resolution("gaussian")

        def run():
            setup, first, second, desc = mm_stream(atoms, grid, res, n_slabs)
            return {"setup_s": setup, "first_call_s": first, "median_s": second, **desc,
                    "note": "stream_slabs: the device holds one slab and its working memory; memory: the "
                            "device allocator's peak (peak_bytes_in_use) after the run"}

        self.measure(f"render/gaussian_streamed/{label}", run, reserve=self.args.reserve_large_s, renderer="gaussian",
                     size=label, n_atoms=int(atoms.positions.shape[0]), grid_shape_zyx=list(grid.shape),
                     voxel_size=self.args.voxel, resolution=res)

    # -- batch --
    def batch_structures(self):
        if getattr(self, "_structures", None) is None:
            a = self.args
            atoms, chain, residue = mm_read_atoms(self.data / FILES["7cec"])
            rng = np.random.default_rng(a.seed)
            n_atoms = a.batch_atoms
            sizes = (rng.integers(n_atoms[0], n_atoms[1] + 1, a.batch_size_n) if isinstance(n_atoms, tuple)
                     else np.full(a.batch_size_n, int(n_atoms)))
            cuts = cut_compact_regions(atoms.positions, residue, sizes, rng)
            self._structures = [mm_take(atoms, c) for c in cuts]
            n = np.array([len(c) for c in cuts])
            self.report.doc["inputs"]["batch"] = {
                "what": f"compact regions of 7CEC (whole residues nearest a random residue, seed {a.seed})", "file": FILES["7cec"], "n_structures": len(cuts),
                "atoms_min": int(n.min()), "atoms_mean": float(n.mean()), "atoms_max": int(n.max()),
                "box": a.box, "voxel_size": a.batch_voxel, "batch_size": a.batch_chunk,
            }
            self.report.save()
        return self._structures

    def batch(self, renderer: str):
        a = self.args
        method = BATCH_METHODS[renderer]
        res = self.resolution(renderer)
        common = {"renderer": renderer, "method": method, "resolution": res, "box": a.box,
                  "voxel_size": a.batch_voxel, "n_structures": a.batch_size_n}
        state = {}

        def need_api():
            if BATCH_IMPORT_ERROR:
                raise ImportError(BATCH_IMPORT_ERROR)
            return self.batch_structures()

        def run_render_batch():
            structures = need_api()
            times = []
            t0 = time.perf_counter()
            maps, origins = mm_batch_render(structures, res, method, a.box, a.batch_voxel, a.batch_chunk)
            jax.block_until_ready(maps)
            first = time.perf_counter() - t0
            for _ in range(max(1, a.repeats // 2)):
                if time.perf_counter() - t0 > a.cap_s or self.budget.left() < 3 * first + 5:
                    break
                s = time.perf_counter()
                maps, origins = mm_batch_render(structures, res, method, a.box, a.batch_voxel, a.batch_chunk)
                jax.block_until_ready(maps)
                times.append(time.perf_counter() - s)
            med = statistics.median(times) if times else None
            return {"first_call_s": first, "median_s": med, "times_s": times, "repeats": len(times),
                    "maps_shape": list(maps.shape), "origins_shape": list(np.shape(origins)),
                    "maps_per_s": len(structures) / med if med else None,
                    "note": "end to end: planning on the host + rendering (compiled after the first call)"}

        def run_stacked_forward():
            structures = need_api()
            t0 = time.perf_counter()
            groups = mm_batch_plan(structures, res, method, a.box, a.batch_voxel)
            jax.block_until_ready([g[1] for g in groups])
            state["groups"] = groups
            setup = time.perf_counter() - t0
            fns = tuple(g[0] for g in groups)
            vols = tuple(g[1] for g in groups)
            indices = tuple(g[2] for g in groups)
            r = time_jitted(lambda f, v: mm_assemble(indices, [mm_render_stacked(fi, vi, a.batch_chunk)
                                                               for fi, vi in zip(f, v)], len(structures)),
                            (fns, vols), a.repeats, a.cap_s, self.budget)
            r["maps_per_s"] = len(structures) / r["median_s"] if r["median_s"] else None
            return {"setup_s": setup, "n_groups": len(groups), "group_sizes": [len(g[2]) for g in groups], **r}

        def run_stacked_vag():
            if "groups" not in state:
                raise RuntimeError("no planned groups (the stacked forward measurement failed)")
            fns = tuple(g[0] for g in state["groups"])
            vols = tuple(g[1] for g in state["groups"])
            indices = tuple(g[2] for g in state["groups"])

            def vag(f, v):
                def loss(vs):
                    parts = [mm_render_stacked(fi, vi, a.batch_chunk) for fi, vi in zip(f, vs)]
                    return jnp.sum(mm_assemble(indices, parts, a.batch_size_n) ** 2)

                return eqx.filter_value_and_grad(loss)(v)

            r = time_jitted(vag, (fns, vols), a.repeats, a.cap_s, self.budget)
            r["maps_per_s"] = a.batch_size_n / r["median_s"] if r["median_s"] else None
            r["loss"] = float(r["_out"][0])
            return r

        base = f"batch/{method}"
        self.measure(f"{base}/stacked_forward", run_stacked_forward, reserve=a.reserve_s, **common)
        self.measure(f"{base}/stacked_value_and_grad", run_stacked_vag, reserve=a.reserve_s, **common)
        if renderer == "gaussian":
            self.measure(f"{base}/render_batch", run_render_batch, reserve=a.reserve_s, **common)

    # -- refinement --
    def refine(self):
        a = self.args

        def run():
            t0 = time.perf_counter()
            model = mm_read_fragment(self.data / FILES["7cec_A"], a.refine_residues)
            density = mm_read_map(self.data / FILES["7cec_map"])
            read_s = time.perf_counter() - t0
            restraints, why = None, None
            t0 = time.perf_counter()
            try:
                restraints = mm_build_restraints(model)
            except ImportError as e:  # biotite missing: refine unrestrained, and say so
                why = f"{type(e).__name__}: {e}"
            restraints_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cold = mm_refine(model, density, a.refine_resolution, restraints, a.refine_steps)
            wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = mm_refine(model, density, a.refine_resolution, restraints, a.refine_steps)
            wall_warm = time.perf_counter() - t0
            h = warm.history
            return {
                "n_atoms": int(model.atoms.positions.shape[0]), "resolution": a.refine_resolution,
                "read_s": read_s, "restraints": "biotite CCD" if restraints is not None else f"none ({why})",
                "restraints_s": restraints_s, "wall_s_refine": wall, "wall_s_refine_warm": wall_warm,
                "steps": int(warm.n_steps), "evaluations": int(warm.n_evaluations), "result": warm.result,
                "warm_s_per_evaluation": wall_warm / max(warm.n_evaluations, 1),
                "map_loss_first_last": [float(h["map_loss"][0]), float(h["map_loss"][-1])] if len(h["step"]) else None,
                "cold_steps": int(cold.n_steps),
                "note": "wall_s_refine: setup + compilation + the run (one compiled loop); wall_s_refine_warm: the "
                        "same refinement again (compiled); warm_s_per_evaluation: per value-and-gradient, line-search "
                        "trials included (warm wall includes setup: restraints' contact list, weighting)",
            }

        name = "refine/7cec_A/xyz_b"
        self.measure(name, run, reserve=a.reserve_refine_s, map=FILES["7cec_map"], model=FILES["7cec_A"])

    # -- targets --
    def targets(self):
        m = self.report.doc["measurements"]
        small = "small" if self.cpu else "26k"
        out = {}
        fwd = m.get(f"render/gaussian/{small}/forward", {})
        out["forward_26k_gaussian_le_20ms"] = _target(fwd.get("median_s"), 0.020, "<=")
        thr = m.get("batch/gaussian/stacked_forward", {})
        out["batch_maps_per_s_ge_2000"] = _target(thr.get("maps_per_s"), 2000.0, ">=")
        rb = m.get("batch/gaussian/render_batch", {})
        out["batch_maps_per_s_ge_2000_render_batch"] = _target(rb.get("maps_per_s"), 2000.0, ">=")
        for r in RENDERERS:
            vag = m.get(f"render/{r}/{small}/value_and_grad", {})
            out[f"value_and_grad_le_3x_forward_{r}"] = _target(vag.get("ratio_to_forward"), 3.0, "<=")
        if self.cpu:
            out["note"] = "CPU dry run at small sizes: the targets are for the GPU sizes and mean nothing here"
        self.report.doc["targets"] = out
        self.report.save()


def _target(value, bound, op):
    met = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {"value": value, "target": f"{op} {bound:g}", "met": met}


class _on:
    """`jax.default_device(device)` when a device is given, else nothing."""

    def __init__(self, device):
        self.ctx = jax.default_device(device) if device is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def _summary(e: dict) -> str:
    parts = []
    for k in ("compile_s", "median_s", "first_call_s", "maps_per_s", "ratio_to_forward", "first_value_s",
              "median_step_s"):
        v = e.get(k)
        if isinstance(v, (int, float)):
            parts.append(f"{k}={v:.4g}")
    return " ".join(parts)


def default_out(cpu: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "benchmarks" / "results" / ("cpu" if cpu else "gpu") / f"gpu_check_{stamp}.json"


def find_data(given: str | None) -> Path | None:
    """The data folder: --data, $MODELMAP_TEST_DATA, the carried copy, ../shared/data (as tests/conftest.py)."""
    candidates = [Path(given)] if given else []
    if os.environ.get("MODELMAP_TEST_DATA"):
        candidates.append(Path(os.environ["MODELMAP_TEST_DATA"]))
    candidates += [ROOT / "benchmarks" / ".gpu_carry" / "data", ROOT.parent / "shared" / "data",
                   ROOT / ".." / ".." / "shared" / "data"]
    for c in candidates:
        if (c / "README.md").exists():
            return c.resolve()
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU at small sizes (a dry run / CI check)")
    p.add_argument("--out", help="JSON path (default: $OUT/gpu_check.json, else benchmarks/results/...)")
    p.add_argument("--data", help="data folder (default: $MODELMAP_TEST_DATA, benchmarks/.gpu_carry/data, ../shared/data)")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run (GPU 450 s, CPU 240 s)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (GPU 10, CPU 2)")
    p.add_argument("--renderers", default=",".join(RENDERERS), help="comma-separated subset of " + ",".join(RENDERERS))
    p.add_argument("--only", default="", help="comma-separated name prefixes of the measurements to run (e.g. render/gaussian,batch)")
    p.add_argument("--skip-large", action="store_true", help="leave out the 317k-atom assembly")
    p.add_argument("--skip-refine", action="store_true")
    p.add_argument("--skip-batch", action="store_true")
    p.add_argument("--no-nufft-cpu", action="store_true",
                   help="on a GPU, do not retry NUFFT on the CPU when it fails on the GPU (the PyPI jax-finufft is CPU-only)")
    p.add_argument("--res-gaussian", type=float, default=1.5, help="Å (extra blur 4 D²)")
    p.add_argument("--res-fourier", type=float, default=4.0, help="Å, splat-Fourier and NUFFT")
    p.add_argument("--res-shells", type=float, default=4.0, help="Å")
    p.add_argument("--voxel", type=float, default=1.0, help="Å, the renderers' grids")
    p.add_argument("--padding", type=float, default=5.0, help="Å around the atoms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-cpu-backend", action="store_true", help="run the GPU sizes even when JAX has no GPU")
    p.add_argument("--inject-error", default="", help=argparse.SUPPRESS)  # tests: name prefixes that raise
    args = p.parse_args(argv)
    cpu = args.cpu
    args.budget_s = args.budget_s or (240.0 if cpu else 450.0)
    args.repeats = args.repeats or (2 if cpu else 10)
    args.repeats_large = min(args.repeats, 3)
    args.cap_s = 10.0 if cpu else 20.0  # seconds of timed runs per measurement
    args.cap_large_s = 10.0 if cpu else 15.0
    args.reserve_s = 5.0 if cpu else 20.0  # seconds that must be left to start a measurement
    args.reserve_large_s = 5.0 if cpu else 45.0
    args.reserve_refine_s = 10.0 if cpu else 40.0
    args.box = 32 if cpu else 64
    args.batch_voxel = 1.5
    args.batch_size_n = 16 if cpu else 256
    args.batch_atoms = 300 if cpu else 3000
    args.batch_chunk = 8 if cpu else 64
    args.refine_residues = 25 if cpu else None
    args.refine_steps = 2 if cpu else 5
    args.refine_resolution = 3.9
    args.renderers = [r for r in args.renderers.split(",") if r]
    args.only = [o for o in args.only.split(",") if o]
    args.inject_error = [o for o in args.inject_error.split(",") if o]
    unknown = set(args.renderers) - set(RENDERERS)
    if unknown:
        p.error(f"unknown renderers {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data = find_data(args.data)
    out = Path(args.out) if args.out else default_out(args.cpu)
    doc = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "cpu" if args.cpu else "gpu",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "complete": False,
        "data": str(data) if data else None,
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "batch_api": BATCH_IMPORT_ERROR or "ok",
        "inputs": {},
        "measurements": {},
        "targets": {},
    }
    report = Report(out, doc)
    doc.update(environment())
    report.save()
    _log(f"device {doc['device']['device_kind']} ({doc['device']['platform']}); JSON -> {out}")
    if data is None:
        report.abort("no data folder: set MODELMAP_TEST_DATA, or carry benchmarks/.gpu_carry/data")
        print("no data folder found (MODELMAP_TEST_DATA, benchmarks/.gpu_carry/data, ../shared/data)", file=sys.stderr)
        return 2
    if not args.cpu and jax.default_backend() == "cpu" and not args.allow_cpu_backend:
        # JAX found no GPU (or its CUDA plugin failed): the GPU sizes would only burn device time
        report.abort("JAX's backend is the CPU: no GPU found (see the jax lines of the log); pass --cpu for a dry run")
        print("JAX's default backend is the CPU: no GPU found. Stopping (use --cpu for a dry run).", file=sys.stderr)
        return 4
    budget = Budget(args.budget_s, report)
    args.data = str(data)
    check = Check(args, report, budget)
    try:
        check.load_inputs()
    except Exception as e:  # noqa: BLE001
        report.abort(f"reading the inputs failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    small = "small" if args.cpu else "26k"
    large = "large" if args.cpu else "317k"
    renderers = args.renderers
    on_gpu = jax.default_backend() != "cpu"

    # most important first: the batch throughput and the 26k renderers (the targets), then the rest
    if not args.skip_batch and "gaussian" in renderers:
        check.batch("gaussian")
    for r in renderers:
        check.renderer(r, small)
    if not args.skip_batch:
        for r in renderers:
            if r in BATCH_METHODS and r != "gaussian":
                check.batch(r)
    if not args.skip_refine:
        check.refine()
    if large in check.inputs:
        for r in renderers:
            if r == "nufft" and on_gpu and doc["measurements"].get(f"render/nufft/{small}/forward", {}).get("status") != "ok":
                continue  # it failed on the GPU at the small size already
            check.renderer(r, large)
        check.streamed(large)
    if "nufft" in renderers and on_gpu and not args.no_nufft_cpu and importlib.util.find_spec("jax_finufft"):
        if doc["measurements"].get(f"render/nufft/{small}/forward", {}).get("status") == "error":
            check.renderer("nufft", small, device=jax.devices("cpu")[0], tag="@cpu")
    check.targets()
    budget.cancel()
    doc["complete"] = True
    doc["elapsed_s"] = time.perf_counter() - T_START
    report.save()
    n_err = sum(1 for e in doc["measurements"].values() if e.get("status") == "error")
    _log(f"done: {len(doc['measurements'])} measurements, {n_err} errors; JSON -> {out}")
    for k, v in doc["targets"].items():
        if isinstance(v, dict):
            print(f"  target {k}: {v['value']} {v['target']} -> {v['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
