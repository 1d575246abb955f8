"""Scale: forward and value_and_grad versus atoms and grid size, 4YVS's assembly beside gemmi, the
10⁶-atom memory estimate, and the overhead of sharding over 4 forced CPU devices.

    PYTHONPATH=src python benchmarks/bench_scale.py            # full (about 10-15 min on 2 cores)
    PYTHONPATH=src python benchmarks/bench_scale.py --quick    # fewer sizes (a few minutes)
    PYTHONPATH=src python benchmarks/bench_scale.py --extra    # shells, splat gradient at 317k, 10⁶ atoms
    PYTHONPATH=src python benchmarks/bench_scale.py --fourier  # NUFFT over atoms; Fourier and shells over grids
    python benchmarks/bench_scale.py --plot FULL.json EXTRA.json FOURIER.json   # every series in one plot

Every case runs in its own subprocess, so that its peak memory (`ru_maxrss` of that process: the
import of JAX and modelmap included, about 0.3 GB) is its own. Times: the first call (compilation
included) and the best of `--repeats` further calls, each ended by `jax.block_until_ready`.
value_and_grad is of a least-squares loss against the model's own map times 0.9, with respect to
every float leaf of the volume. Atoms: the first n atoms of 4YVS's biological assembly (gemmi
`make_assembly`, 317,160 atoms); the 10⁶ case tiles 4 copies of it side by side (1,268,640 atoms).
Writes benchmarks/results/bench_scale_<date>.json and log-log PNG plots beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODELMAP_TEST_DATA", ROOT.parent / "shared" / "data"))
MODEL = DATA / "models" / "4YVS.cif.gz"


# -- one case, in a subprocess -----------------------------------------------------------------
def _assembly_atoms(n: int | None, tiles: int = 1):
    import jax.numpy as jnp
    import numpy as np

    import modelmap as mm

    atoms = mm.read_model(MODEL, assembly="1", models="first").atoms
    if n is not None:
        atoms = mm.Atoms(*(np.asarray(x)[:n] for x in (atoms.positions, atoms.atomic_numbers, atoms.b_factors,
                                                           atoms.occupancies)))
    if tiles > 1:
        pos = np.asarray(atoms.positions)
        span = pos.max(0) - pos.min(0) + 10.0
        shifts = [np.array([i % 2, (i // 2) % 2, i // 4]) * span for i in range(tiles)]
        atoms = mm.Atoms(np.concatenate([pos + s for s in shifts]), np.tile(np.asarray(atoms.atomic_numbers), tiles),
                         np.tile(np.asarray(atoms.b_factors), tiles), np.tile(np.asarray(atoms.occupancies), tiles))
    return mm.Atoms(jnp.asarray(atoms.positions, jnp.float32), np.asarray(atoms.atomic_numbers),
                    jnp.asarray(atoms.b_factors, jnp.float32), jnp.asarray(atoms.occupancies, jnp.float32))


def _timed(fn, repeats):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def run_case(case: dict) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import modelmap as mm
    from modelmap.render import SlabPlan, render_slabs, slab_memory_bytes

    kind, renderer = case["kind"], case.get("renderer", "gaussian")
    out = dict(case)
    atoms = _assembly_atoms(case.get("n"), case.get("tiles", 1))
    n = int(atoms.positions.shape[0])
    voxel = case.get("voxel", 1.0)
    if case.get("box"):  # a cubic grid of `box` points over the atoms' extent (the grid-size series)
        pos = np.asarray(atoms.positions)
        span = float((pos.max(0) - pos.min(0)).max()) + 10.0
        voxel = span / case["box"]
        lo = pos.min(0) - 5.0
        grid = mm.Grid((case["box"],) * 3, voxel, tuple(lo))
    else:
        grid = mm.Grid.around_positions(np.asarray(atoms.positions), voxel, 5.0)
    out.update(n_atoms=n, grid_shape_zyx=list(grid.shape), voxel=voxel)
    res = case.get("resolution", 2.0 if renderer != "shells" else 3.0)
    if kind == "gemmi":
        import gemmi

        st = gemmi.read_structure(str(MODEL))
        st.setup_entities()
        model = gemmi.make_assembly(st.assemblies[0], st[0], gemmi.HowToNameCopiedChain.AddNumber)
        nz, ny, nx = grid.shape
        shift = gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(-np.asarray(grid.origin))))
        model.transform_pos_and_adp(shift)
        t0 = time.perf_counter()
        dc = gemmi.DensityCalculatorE()
        dc.d_min = 2.0 * voxel
        dc.blur = 4.0 * res**2  # as modelmap's Gaussian method at D: B + 4 D²
        dc.grid.set_unit_cell(gemmi.UnitCell(nx * voxel, ny * voxel, nz * voxel, 90, 90, 90))
        dc.grid.set_size(nx, ny, nz)  # the same grid points as modelmap's (x fastest in gemmi)
        dc.add_model_density_to_grid(model)
        out.update(forward_first_s=time.perf_counter() - t0, forward_s=time.perf_counter() - t0)
    elif kind == "estimate":  # the memory estimate and the slab count, nothing of the grid's size allocated
        vol = mm.GaussianMixtureVolume.from_atoms(atoms, res)
        fn = mm.GaussianMixtureRenderFn(grid, sampling="point")
        t0 = time.perf_counter()
        try:
            slabs = SlabPlan.build(fn, vol, memory_limit=case.get("limit"))
            pad = slabs.render_fn.plan.pad
            out.update(n_slabs=slabs.n_slabs, thickness=slabs.thickness,
                       slab_working_bytes=slab_memory_bytes(grid, slabs.thickness, pad, n),
                       whole_working_bytes=slab_memory_bytes(grid, grid.shape[0], pad, n), map_bytes=grid.nbytes())
        except mm._errors.GridTooLargeError as err:
            out["refused"] = str(err)
        out["plan_s"] = time.perf_counter() - t0
    else:
        if renderer == "gaussian":
            vol = mm.GaussianMixtureVolume.from_atoms(atoms, res)
            fn = mm.GaussianMixtureRenderFn(grid, sampling="point")
        elif renderer == "shells":
            vol = mm.ShellDecompositionVolume.from_atoms(atoms, res, n_terms=6)
            fn = mm.ShellRenderFn(grid)
        elif renderer == "nufft":
            vol = mm.IndependentAtomVolume.from_atoms(atoms, res)
            fn = mm.NufftRenderFn(grid)
        else:
            vol = mm.IndependentAtomVolume.from_atoms(atoms, res)
            fn = mm.SplatFourierRenderFn(grid)
        t0 = time.perf_counter()
        fn = fn.with_plan(vol)
        out["plan_s"] = time.perf_counter() - t0
        if kind == "sharded":
            mesh = jax.make_mesh((len(jax.devices()),), ("d",))
            slabs = SlabPlan.build(fn, vol, n_slabs=case["slabs"])
            call = (lambda: render_slabs(slabs, vol, mesh)) if case["slabs"] > 1 else (lambda: fn(vol))
        elif kind == "streamed_auto":  # as many slabs as the machine's memory limit asks for
            slabs = SlabPlan.build(fn, vol)
            out["n_slabs"] = slabs.n_slabs
            from modelmap.render import stream_slabs

            call = lambda: stream_slabs(slabs, vol)  # noqa: E731
        elif kind == "streamed":
            slabs = SlabPlan.build(fn, vol, n_slabs=case["slabs"])
            from modelmap.render import stream_slabs

            call = lambda: stream_slabs(slabs, vol)  # noqa: E731
        else:
            call = lambda: fn(vol)  # noqa: E731
        m, out["forward_first_s"], out["forward_s"] = _timed(call, case.get("repeats", 2))
        if case.get("grad", True) and kind == "plain":
            target = 0.9 * m
            vag = eqx.filter_jit(eqx.filter_value_and_grad(lambda v: jnp.sum((fn(v) - target) ** 2)))
            _, out["vag_first_s"], out["vag_s"] = _timed(lambda: vag(vol), case.get("repeats", 2))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["devices"] = [str(d) for d in jax.devices()]
    return out


def spawn(case: dict, devices: int = 1, timeout: float = 900) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CASE ")]
    if proc.returncode or not lines:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    r = json.loads(lines[-1][5:])
    r["wall_s"] = time.perf_counter() - t0
    print(_row(r), flush=True)
    return r


def _row(r: dict) -> str:
    def f(k, fmt="{:.3g}"):
        v = r.get(k)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    label = f"{r['kind']}/{r.get('renderer', '')}" + (f"/slabs={r['slabs']}" if "slabs" in r else "")
    return (f"{label:28s} {r.get('n_atoms', '-')!s:>9} {'x'.join(map(str, r.get('grid_shape_zyx', [])[::-1])):>13} "
            f"{f('forward_s'):>9} {f('vag_s'):>9} {f('forward_first_s'):>9} {f('peak_rss_gb', '{:.2f}'):>7}"
            + (f"  {r['error']}" if "error" in r else "") + (f"  slabs {r['n_slabs']}" if "n_slabs" in r else "")
            + ("  REFUSED" if "refused" in r else ""))


def _series_plot(results, series: str, x_of, xlabel: str, what: str, path: Path, gemmi_point: bool) -> str:
    """Log-log time (forward, value_and_grad) and peak memory of one series, per renderer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (renderer, marker) in enumerate((("gaussian", "o"), ("splat_fourier", "s"), ("shells", "^"), ("nufft", "D"))):
        # the atoms series runs on to the 10⁶-atom case where it was rendered (`--extra`)
        rs = sorted((r for r in results if r["kind"] == "plain" and r.get("renderer") == renderer
                     and (r.get("series") == series or (series == "atoms" and r.get("series") == "1e6"))
                     and "forward_s" in r), key=x_of)
        if not rs:
            continue
        x = [x_of(r) for r in rs]
        axes[0].loglog(x, [r["forward_s"] for r in rs], marker + "-", color=f"C{i}", label=f"{renderer} forward")
        g = [r for r in rs if "vag_s" in r]
        if g:
            axes[0].loglog([x_of(r) for r in g], [r["vag_s"] for r in g], marker + "--", color=f"C{i}", mfc="none",
                           label=f"{renderer} value_and_grad")
        axes[1].loglog(x, [r["peak_rss_gb"] for r in rs], marker + "-", color=f"C{i}", label=renderer)
    g = [r for r in results if r["kind"] == "gemmi" and "forward_s" in r]
    if gemmi_point and g:
        axes[0].loglog([x_of(g[0])], [g[0]["forward_s"]], "k*", ms=12, label="gemmi DensityCalculatorE (4YVS)")
        axes[1].loglog([x_of(g[0])], [g[0]["peak_rss_gb"]], "k*", ms=12, label="gemmi (4YVS)")
    axes[0].set(xlabel=xlabel, ylabel="seconds (best of repeats)", title=f"time vs {what} (CPU)")
    axes[1].set(xlabel=xlabel, ylabel="peak RSS of the process (GB)", title=f"peak memory vs {what}")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plots(results: list[dict], stem: Path) -> list[str]:
    boxes = sorted({r["box"] for r in results if r.get("series") == "grid" and "box" in r}) or [64, 256]
    return [
        _series_plot(results, "atoms", lambda r: r["n_atoms"], "atoms (4YVS assembly, first n; 1 Å grid around them)",
                     "atoms", stem.with_name(stem.name + "_atoms.png"), True),
        _series_plot(results, "grid", lambda r: r["box"] ** 3, f"grid points ({boxes[0]}³ ... {boxes[-1]}³), 10k atoms", "grid size",
                     stem.with_name(stem.name + "_grid.png"), False),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--extra", action="store_true", help="only the shell series, the splat-Fourier gradient at "
                   "317k atoms and the 10⁶-atom renders (written to bench_scale_<date>_extra.json)")
    p.add_argument("--fourier", action="store_true", help="only the NUFFT atoms series (1k to 317k) and the grid "
                   "series of the NUFFT, splat-Fourier and shell renderers (written to bench_scale_<date>_fourier.json)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="only plot: the series of these result files together "
                   "(e.g. a full run, its --extra and --fourier runs), beside the first one as <stem>_all_*.png")
    p.add_argument("--out", help="JSON path (default benchmarks/results/bench_scale_<date>.json)")
    a = p.parse_args(argv)
    if a.case:
        print("CASE " + json.dumps(run_case(json.loads(a.case))), flush=True)
        return 0
    if a.plot:
        # a case measured again in a later file replaces the earlier row
        key = lambda r: tuple(str(r.get(k)) for k in ("kind", "series", "renderer", "n_atoms", "box", "slabs", "limit"))  # noqa: E731
        merged = list({key(r): r for f in a.plot for r in json.loads(Path(f).read_text())["results"]}.values())
        first = Path(a.plot[0])
        print("wrote " + ", ".join(plots(merged, first.with_name(first.stem + "_all"))))
        return 0
    import gemmi
    import jax

    started = time.perf_counter()
    atoms_series = [1000, 10000, 100000, None] if not a.quick else [1000, 30000, None]
    boxes = [64, 128, 256, 512] if not a.quick else [64, 128, 256]
    print(f"{'case':28s} {'atoms':>9} {'grid x,y,z':>13} {'fwd s':>9} {'vag s':>9} {'1st fwd':>9} {'RSS GB':>7}")
    results = extra_cases() if a.extra else fourier_cases() if a.fourier else main_cases(atoms_series, boxes, a.quick)
    doc = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "jax": jax.__version__, "gemmi": gemmi.__version__, "device": str(jax.devices()[0])},
        "command": " ".join(sys.argv), "elapsed_s": time.perf_counter() - started, "results": results,
    }
    suffix = "_extra" if a.extra else "_fourier" if a.fourier else ""
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"bench_scale_{datetime.date.today():%Y%m%d}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # the extra and Fourier sets alone make no whole series: plot them with `--plot` beside a full run
    doc["plots"] = [] if a.extra or a.fourier else plots(results, out.with_suffix(""))
    out.write_text(json.dumps(doc, indent=1))
    written = f" and {', '.join(doc['plots'])}" if doc["plots"] else ""
    print(f"wrote {out}{written} in {doc['elapsed_s']:.0f} s")
    return 0


def extra_cases() -> list[dict]:
    """The cases the first full run left out: the shell renderer over the atoms series (to 10⁵ atoms), the
    splat-Fourier value_and_grad at 317k atoms, and the 10⁶-atom case rendered (whole, and streamed
    in z-slabs at the machine's memory limit), not only estimated."""
    results = []
    for n in (1000, 10000, 100000):
        results.append(spawn({"kind": "plain", "series": "atoms", "renderer": "shells", "n": n, "resolution": 3.0,
                              "grad": n <= 10000, "repeats": 1 if n > 10000 else 2}))
    results.append(spawn({"kind": "plain", "series": "atoms", "renderer": "splat_fourier", "n": None,
                          "resolution": 3.0, "grad": True, "repeats": 1}))
    results.append(spawn({"kind": "plain", "series": "1e6", "renderer": "gaussian", "n": None, "tiles": 4,
                          "grad": False, "repeats": 1}))
    results.append(spawn({"kind": "streamed_auto", "series": "1e6", "renderer": "gaussian", "n": None, "tiles": 4,
                          "repeats": 1}))
    return results


def fourier_cases() -> list[dict]:
    """The exact Fourier map (`NufftRenderFn`, jax-finufft on the CPU) over the atoms series at 3 Å
    (forward to 317k atoms, value_and_grad to 10⁴), and the grid series (10k atoms, 64³ to 256³) of
    the NUFFT, splat-Fourier and shell renderers at 4 Å (a 64³ box over 10k atoms has voxels of
    about 1.6 Å: Nyquist 3.2 Å)."""
    results = [spawn({"kind": "plain", "series": "atoms", "renderer": "nufft", "n": n, "resolution": 3.0,
                      "grad": n is not None and n <= 10000, "repeats": 2 if n is not None and n <= 10000 else 1})
               for n in (1000, 10000, 100000, None)]
    for renderer in ("nufft", "splat_fourier", "shells"):
        for box in (64, 128, 256):
            results.append(spawn({"kind": "plain", "series": "grid", "renderer": renderer, "n": 10000, "box": box,
                                  "resolution": 4.0, "grad": box <= 128}))
    return results


def main_cases(atoms_series, boxes, quick) -> list[dict]:
    results = []
    for n in atoms_series:
        results.append(spawn({"kind": "plain", "series": "atoms", "renderer": "gaussian", "n": n}))
        if n is None or n <= 30000:
            results.append(spawn({"kind": "plain", "series": "atoms", "renderer": "splat_fourier", "n": n,
                                  "resolution": 3.0, "grad": n is not None}))
    results.append(spawn({"kind": "gemmi", "series": "4yvs", "n": None}))
    for box in boxes:
        results.append(spawn({"kind": "plain", "series": "grid", "renderer": "gaussian", "n": 10000, "box": box}))
    results.append(spawn({"kind": "streamed", "series": "4yvs", "renderer": "gaussian", "n": None, "slabs": 8,
                          "repeats": 1}))
    results.append(spawn({"kind": "estimate", "series": "1e6", "n": None, "tiles": 4}))
    results.append(spawn({"kind": "estimate", "series": "1e6", "n": None, "tiles": 4, "limit": 2 * 2**30}))
    results.append(spawn({"kind": "estimate", "series": "1e6", "n": None, "tiles": 4, "limit": 2**28}))
    for slabs in (1, 4):
        results.append(spawn({"kind": "sharded", "series": "shard", "renderer": "gaussian", "n": 30000,
                              "slabs": slabs, "repeats": 3}, devices=4))
    if not quick:
        results += extra_cases()
    return results


if __name__ == "__main__":
    sys.exit(main())
