"""Build the shell tables shipped with modelmap (deterministic; run offline).

    python -m modelmap.shells.build [--out DIR] [--table electron|xray|all] [--processes N]

writes `shells_<table>_v1.npz` into `DIR` (default: the package's `shells/data` folder). For every
element and every D of the grid the exact image (B = 0) is fitted in normalized units
(`modelmap.shells._fit`), each D warm-started from the previous one (continuation from 1 Å up); a
step whose parameters jump (|Δr| > 0.01, or b or c changing by more than 5 % for a term that
matters) is refitted cold, and the solution closer to the previous D is kept. Results depend only
on the inputs (no randomness; each element's sweep is sequential, elements run in parallel).

Arrays in the file (spec §11): `elements` [E] symbols, `atomic_numbers` [E], `d_grid` [nD] Å,
`params` [E, nD, K, 3] normalized (r, b, c), `log_rho0` [E, nD], `fit_err` [E, nD] (max |model -
image| / ρ0 on [0, 11 D]), `ripple_amp` [E, nD, K] (|image| / ρ0 at each term's extremum; 1 for the
Gaussian), `cold_refit` [E, nD] bool, and `metadata` (JSON string).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path

import gemmi
import numpy as np

from .._progress import progress_bar
from ._fit import FITTER_VERSION, FitSettings, ShellFit, fit_image, normalized_image

ELEMENTS = ("H", "C", "N", "O", "S", "P", "Se", "Na", "Mg", "K", "Ca", "Cl", "Mn", "Fe", "Co", "Ni",
            "Cu", "Zn")
D_MIN, D_MAX, D_STEP = 1.0, 10.0, 0.1
MAX_FIT_ERROR = 1e-4  # a fit worse than this (relative to the peak) is refitted cold
TABLE_SOURCES = {
    "electron": "International Tables Vol. C (2011) Table 4.3.2.2 = Peng et al. (1996), 5 Gaussians (gemmi Element.c4322)",
    "xray": "International Tables Vol. C Table 6.1.1.4 (IT92), 4 Gaussians + constant (gemmi Element.it92)",
}
DATA_DIR = Path(__file__).parent / "data"


def d_grid() -> np.ndarray:
    n = int(round((D_MAX - D_MIN) / D_STEP)) + 1
    return np.round(D_MIN + D_STEP * np.arange(n), 10)


def _jump(prev: np.ndarray, new: np.ndarray, amp: np.ndarray) -> float:
    """Largest continuity violation between neighbouring D (> 1 means a jump), per the spec:
    |Δr| <= 0.01 and relative Δb, Δc <= 5 % (c relative to the largest of |c_prev| and 0.05)."""
    dr = np.max(np.abs(new[:, 0] - prev[:, 0])) / 0.01
    db = np.max(np.abs(new[:, 1] - prev[:, 1]) / prev[:, 1]) / 0.05
    dc = np.max(np.abs(new[:, 2] - prev[:, 2]) / np.maximum(np.abs(prev[:, 2]), 0.05)) / 0.05
    return float(max(dr, db, dc))


def _fit(z, d, table, settings, start) -> ShellFit | None:
    try:
        return fit_image(z, d, table, settings, start=start)
    except np.linalg.LinAlgError:
        return None


def _step(z, d, table, settings, prev: ShellFit, symbol) -> tuple[ShellFit, float, bool]:
    """Fit at D warm-started from the neighbouring solution `prev`; refit cold on a jump or a poor
    fit. Returns (fit, continuity measure, whether a cold fit was tried)."""
    fit = _fit(z, d, table, settings, prev.params)
    cold = False
    if fit is None:  # the warm start failed numerically (an SVD inside TRF): start cold
        fit = fit_image(z, d, table, settings)
        cold = True
        print(f"  {table} {symbol} D={d}: warm start failed, fitted cold", file=sys.stderr, flush=True)
    j = _jump(prev.params, fit.params, None)
    if j > 1.0 or fit.max_error > MAX_FIT_ERROR:
        cold_fit = _fit(z, d, table, settings, None) or fit
        jc = _jump(prev.params, cold_fit.params, None)
        cold = True
        # an accurate fit beats a continuous one; between two accurate fits keep the closer
        if (cold_fit.max_error <= MAX_FIT_ERROR < fit.max_error) or (
            jc < j and (cold_fit.max_error <= MAX_FIT_ERROR or fit.max_error > MAX_FIT_ERROR)
        ):
            fit, j = cold_fit, jc
    return fit, j, cold


def sweep_element(args) -> dict:
    """Fit one element over the whole D grid with continuation.

    The sweep starts cold at the smallest D whose cold fit is accurate (normally the first), goes
    down from there to the grid's start, then up to its end, each D warm-started from its
    neighbour."""
    symbol, table, settings = args
    z = gemmi.Element(symbol).atomic_number
    grid = d_grid()
    k = settings.n_shells + 1
    params = np.zeros((len(grid), k, 3))
    log_rho0 = np.zeros(len(grid))
    err = np.zeros(len(grid))
    amp = np.zeros((len(grid), k))
    cold = np.zeros(len(grid), bool)
    jumps = []
    x = np.arange(0.0, settings.x_fit + 0.5 * settings.step, settings.step)

    def store(i, fit):
        params[i] = fit.params
        log_rho0[i] = np.log(fit.rho0)
        err[i] = fit.max_error
        y, _ = normalized_image(z, float(grid[i]), x, table)
        amp[i, 0] = 1.0
        amp[i, 1:] = np.abs(np.interp(fit.extrema, x, y))

    first = 0
    while True:
        fit = _fit(z, float(grid[first]), table, settings, None)
        if fit is not None and fit.max_error <= MAX_FIT_ERROR:
            break
        first += 1
        if first == len(grid):
            raise RuntimeError(f"{table} {symbol}: no accurate cold fit anywhere on the D grid")
    if first:
        print(f"  {table} {symbol}: cold fits inaccurate below D={grid[first]}, continuing downward from it",
              file=sys.stderr, flush=True)
    cold[first] = True
    store(first, fit)
    order = list(range(first - 1, -1, -1)) + list(range(first + 1, len(grid)))
    for i in order:
        neighbour = i + 1 if i < first else i - 1
        prev = ShellFit(params[neighbour], 0.0, 0.0, np.zeros(0), False)
        fit, j, was_cold = _step(z, float(grid[i]), table, settings, prev, symbol)
        cold[i] = was_cold
        if j > 1.0:
            jumps.append((float(grid[i]), round(j, 3)))
        store(i, fit)
    return dict(symbol=symbol, z=z, params=params, log_rho0=log_rho0, err=err, amp=amp, cold=cold, jumps=jumps)


def build_table(table: str, elements=ELEMENTS, settings: FitSettings = FitSettings(), processes: int = 1,
                progress: bool = False) -> dict:
    """Fit every element of `elements` over the D grid; returns the arrays of the table file.

    Each element's fit summary goes to stderr; `progress` adds a bar there (one tick per element).
    """
    jobs = [(el, table, settings) for el in elements]
    t0 = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack, progress_bar(progress, f"{table} shell table", len(jobs)) as bar:
        if processes > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(processes))
            fitted = pool.imap(sweep_element, jobs)
        else:
            fitted = map(sweep_element, jobs)
        for res in fitted:
            results.append(res)
            print(f"  {table} {res['symbol']}: max fit error {res['err'].max():.2e}, "
                  f"{int(res['cold'].sum())} cold refits, jumps {res['jumps']}", file=sys.stderr, flush=True)
            bar.describe(f"{res['symbol']} done")
            bar.advance()
    metadata = dict(
        format="modelmap shell table v1",
        scattering_table=table,
        source=TABLE_SOURCES[table],
        image="exact finite-resolution image, hard sphere |s| <= 1/D, B = 0, Gauss-Legendre 800 nodes",
        normalization="R = D r, B = D^2 b, C = D^3 rho0(D) c; term 0 is the Gaussian (r = 0)",
        fit_range_in_D=settings.x_fit,
        fit_step_in_D=settings.step,
        error_range_in_D=settings.err_range,
        n_terms=settings.n_shells + 1,
        b_caps=list(settings.caps),
        b_min=settings.b_min,
        r_move=settings.r_move,
        d_grid=[D_MIN, D_MAX, D_STEP],
        fitter="scipy least_squares TRF, analytic Jacobian, continuation in D from 1 A up",
        fitter_version=FITTER_VERSION,
        settings=dataclasses.asdict(settings),
        max_fit_error=float(max(r["err"].max() for r in results)),
        continuity_jumps={r["symbol"]: r["jumps"] for r in results if r["jumps"]},
        spec="shared/specs/shell_decomposition.md sections 6.2, 9, 11",
        build_seconds=round(time.perf_counter() - t0, 1),
    )
    return dict(
        elements=np.asarray([r["symbol"] for r in results]),
        atomic_numbers=np.asarray([r["z"] for r in results], np.int32),
        d_grid=d_grid(),
        params=np.stack([r["params"] for r in results]),
        log_rho0=np.stack([r["log_rho0"] for r in results]),
        fit_err=np.stack([r["err"] for r in results]).astype(np.float32),
        ripple_amp=np.stack([r["amp"] for r in results]).astype(np.float32),
        cold_refit=np.stack([r["cold"] for r in results]),
        metadata=np.asarray(json.dumps(metadata, sort_keys=True)),
    )


def table_path(table: str, directory: Path = DATA_DIR) -> Path:
    return Path(directory) / f"shells_{table}_v1.npz"


def write_table(arrays: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder")
    parser.add_argument("--table", default="all", choices=["electron", "xray", "all"])
    parser.add_argument("--elements", default=",".join(ELEMENTS), help="comma-separated symbols")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    tables = ["electron", "xray"] if args.table == "all" else [args.table]
    for table in tables:
        arrays = build_table(table, tuple(args.elements.split(",")), processes=args.processes, progress=True)
        path = table_path(table, args.out)
        write_table(arrays, path)
        meta = json.loads(str(arrays["metadata"]))
        print(f"wrote {path}: {len(arrays['elements'])} elements x {len(arrays['d_grid'])} D, "
              f"max fit error {meta['max_fit_error']:.2e}, {meta['build_seconds']} s")


if __name__ == "__main__":
    main()
