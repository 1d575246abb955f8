"""cryoJAX's side of benchmarks/bench_batch.py: run in cryoJAX's own interpreter (its venv), not this one.

Reads the structures bench_batch.py saved (`--case`, an npz: padded per-structure arrays in cryoJAX's
frame, where coordinate 0 is grid index n // 2 on every axis), builds one cryoJAX
`GaussianMixtureVolume` per structure the way cryoJAX documents it
(`from_tabulated_parameters` with its Peng 1996 table, each atom's B plus the resolution's blur as
`extra_b_factors`, amplitudes times occupancy; padding atoms get amplitude 0), stacks them, and
times `GaussianMixtureRenderFn` (the "spread" backend: each Gaussian spread over its `n_spread`
nearest voxels, exact voxel averages by erf; `n_spread` per Gaussian term from
`suggest_n_spread(cutoff_sigma=5)` over all the structures) vmapped over the structures
(`jax.lax.map` with `batch_size`, i.e. vmap in chunks, as modelmap's `render_stacked`): the forward
maps and `value_and_grad` of sum(maps²) with respect to the volumes, for each batch size.

Prints the report as one JSON line on stdout after every batch size (the last line is the whole
report; `complete` says whether every size ran); progress goes to stderr. Only numpy and the
standard library at module level: it must import in an interpreter without modelmap.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from importlib import metadata

import numpy as np


def _log(msg):
    print(f"[cryojax] {msg}", file=sys.stderr, flush=True)


def _time(compiled_call, repeats, cap_s):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled_call())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        if times and time.perf_counter() - t0 > cap_s:
            break
        s = time.perf_counter()
        out = jax.block_until_ready(compiled_call())
        times.append(time.perf_counter() - s)
    return first, times, out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True, help="npz from bench_batch.py")
    p.add_argument("--sizes", required=True, help="comma-separated batch sizes (first B structures)")
    p.add_argument("--batch-size", type=int, default=64, help="structures vmapped at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap-s", type=float, default=60.0, help="stop repeating past this many seconds")
    p.add_argument("--max-s", type=float, default=60.0, help="skip a batch predicted to take longer per call")
    p.add_argument("--map-out", help="save the first structure's forward map here (npy)")
    args = p.parse_args(argv)

    import cryojax.simulator as cxs
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from cryojax.constants import PengScatteringFactorParameters

    case = dict(np.load(args.case))
    box = int(case["box"])
    voxel = float(case["voxel_size"])
    blur = float(case["blur"])
    pos, z, b, occ, mask = case["positions"], case["atomic_numbers"], case["b_factors"], case["occupancies"], case["mask"]

    def volume(i):
        v = cxs.GaussianMixtureVolume.from_tabulated_parameters(
            jnp.asarray(pos[i], jnp.float32), PengScatteringFactorParameters(z[i]), extra_b_factors=b[i] + blur
        )
        weight = jnp.asarray(np.where(mask[i], occ[i], 0.0), jnp.float32)[:, None]
        return eqx.tree_at(lambda v: v.amplitudes, v, v.amplitudes * weight)

    t0 = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    volumes = [volume(i) for i in range(max(sizes))]
    everything = cxs.GaussianMixtureVolume(
        jnp.concatenate([v.positions for v in volumes]),
        jnp.concatenate([v.amplitudes for v in volumes]),
        jnp.concatenate([v.variances for v in volumes]),
    )
    n_spread = cxs.suggest_n_spread(everything, voxel, cutoff_sigma=5.0)
    render_fn = cxs.GaussianMixtureRenderFn((box, box, box), voxel, n_spread=n_spread)
    setup_s = time.perf_counter() - t0
    _log(f"{len(volumes)} volumes, n_spread {n_spread}, setup {setup_s:.1f} s")

    def render_all(vs):
        return jax.lax.map(render_fn, vs, batch_size=min(args.batch_size, jax.tree_util.tree_leaves(vs)[0].shape[0]))

    forward = jax.jit(render_all)
    vag = jax.jit(jax.value_and_grad(lambda vs: jnp.sum(render_all(vs) ** 2)))
    results = {}
    per_structure = {}  # mode -> the last measured per-structure time, to predict the next size
    for n in sizes:
        stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *volumes[:n])
        row = {}
        for mode, fn in (("forward", forward), ("value_and_grad", vag)):
            predicted = per_structure.get(mode, 0.0) * n
            if predicted > args.max_s:
                row[mode] = {"status": "skipped", "error": f"predicted {predicted:.0f} s per call > --max-s {args.max_s:g}"}
                _log(f"B={n} {mode}: skipped")
                continue
            try:
                t0 = time.perf_counter()
                compiled = fn.lower(stacked).compile()
                compile_s = time.perf_counter() - t0
                first, times, out = _time(lambda: compiled(stacked), args.repeats, args.cap_s)
                med = statistics.median(times) if times else first
                per_structure[mode] = med / n
                row[mode] = {"status": "ok", "error": None, "compile_s": compile_s, "first_run_s": first,
                             "median_s": med, "times_s": times, "per_structure_s": med / n, "maps_per_s": n / med}
                if mode == "forward" and n == sizes[0] and args.map_out:
                    np.save(args.map_out, np.asarray(out[0]))
                _log(f"B={n} {mode}: compile {compile_s:.1f} s, median {med:.3f} s, {n / med:.1f} maps/s")
            except Exception as e:  # noqa: BLE001 - record and go on
                row[mode] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
                _log(f"B={n} {mode}: {row[mode]['error']}")
        results[str(n)] = row
        _report(results, n_spread, setup_s, args, done=n == sizes[-1])


def _report(results, n_spread, setup_s, args, done):
    """Print the report so far as one JSON line (after every batch size, so that a process killed
    later, e.g. for memory, keeps the rows it finished)."""
    import jax

    versions = {}
    for name in ("cryojax", "jax", "jaxlib", "equinox", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    print(json.dumps({
        "complete": done,
        "python": sys.executable, "python_version": platform.python_version(), "versions": versions,
        "device": str(jax.devices()[0]), "n_spread": list(n_spread) if isinstance(n_spread, tuple) else n_spread,
        "setup_s": setup_s, "batch_size": args.batch_size, "results": results,
        "how": "cxs.GaussianMixtureVolume.from_tabulated_parameters(positions, PengScatteringFactorParameters(Z), "
               "extra_b_factors=B + 4 D^2), amplitudes * occupancy; cxs.GaussianMixtureRenderFn((n, n, n), voxel, "
               "n_spread=suggest_n_spread(all volumes, voxel, cutoff_sigma=5)); jax.lax.map(render_fn, stacked, "
               "batch_size) under jax.jit; value_and_grad of sum(maps**2) w.r.t. the stacked volumes",
    }), flush=True)


if __name__ == "__main__":
    main()
