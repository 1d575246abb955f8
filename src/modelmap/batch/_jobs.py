"""Batch jobs: many model maps from a manifest, in this process or on Ray, resumable.

`run_job` is what `modelmap batch MANIFEST -o OUTDIR` runs. Each entry of the manifest
(`read_manifest`) is one model map, rendered by `render_batch` (a batch of one: its atoms padded
to a bucket size, its render function planned from bounds, so later entries of the same bucket,
B class, box and resolution reuse the compiled function), and optionally scored against a map
(`score_model`: CC_mask and mean Q, as `modelmap score`).

**Where the work runs.** `engine="local"` renders in this process, entry after entry, with a
progress bar. `engine="ray"` runs the same `JobWorker` as Ray actors (`_ray.py`): one per GPU, or
CPU workers, each a long-lived process that keeps the functions it compiled, fed with entries
grouped by size bucket so that each worker compiles few shapes.

**Outputs** are written by this process only (workers return the maps), each atomically:

- `OUTDIR/NAME.mrc` per entry (`write_map`), or with `store=True` one zarr store
  `OUTDIR/maps.zarr` (`ZarrStore`);
- `OUTDIR/records/NAME.json` per entry, written after its output: what was made, from which spec;
- `OUTDIR/results.csv` and `OUTDIR/results.json`: the results table (entry, status, atoms,
  seconds, CC_mask, mean Q, output, error), rewritten at the end of every run.

**Faults and resume.** An entry that fails (unreadable model, unknown element, grid too large for
memory, a worker that died) is recorded with its error and the job goes on. An entry is complete
when its record says it succeeded for the same spec (`JobEntry.key`) and its output is there; a
rerun of the same command skips complete entries (status `skipped`) and does the rest, so a job
killed midway resumes where it stopped. `force=True` redoes every entry.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io as _io
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .._errors import ModelmapError
from ..io._atomic_write import atomic_path
from ._manifest import JobEntry, ManifestError

__all__ = ["EntryResult", "JobReport", "JobWorker", "ZarrStore", "run_job"]

RESULT_COLUMNS = ("entry", "status", "atoms", "seconds", "cc_mask", "q_mean", "output", "error", "warnings",
                  "line", "model")


@dataclasses.dataclass
class EntryResult:
    """What became of one entry.

    **Fields:**

    - `name`: the entry's name.
    - `status`: `"ok"` (done in this run), `"failed"` (see `error`) or `"skipped"` (complete from
      an earlier run; its values are that run's).
    - `atoms`: atoms in the model.
    - `seconds`: time to read, render (and score) it, compilation included.
    - `cc_mask`, `q_mean`: scores against the entry's `map` (else `None`).
    - `error`, `warnings`: messages (empty when none).
    - `data`, `origin`, `voxel_size`: the map `(nz, ny, nx)` and where it lies (x, y, z in Å); only
      between a worker and the writer, never in the table.
    """

    name: str
    status: str
    atoms: int | None = None
    seconds: float | None = None
    cc_mask: float | None = None
    q_mean: float | None = None
    error: str = ""
    warnings: str = ""
    data: np.ndarray | None = dataclasses.field(default=None, repr=False)
    origin: tuple | None = None
    voxel_size: tuple | None = None

    def record(self) -> dict:
        """The JSON-ready values (no map)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("data", "origin", "voxel_size")}


def describe_error(err: BaseException) -> str:
    """One line for the results table: modelmap's own errors name the problem already."""
    text = str(err) if isinstance(err, ModelmapError) else f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:597] + "..."


class JobWorker:
    """Renders (and scores) entries in one process; the same object runs in-process and inside a
    Ray actor. JAX keeps what it compiled for the life of the process, so a long-lived worker
    compiles each bucket once; maps named by `like` and `map` are read once per worker.
    """

    def __init__(self):
        self._maps: dict[Path, object] = {}

    def _map(self, path: Path):
        from .. import io

        if path not in self._maps:
            self._maps[path] = io.read_map(path)
        return self._maps[path]

    def run(self, entries: Sequence[JobEntry]) -> list[EntryResult]:
        """`run_one` of each entry, in order."""
        return [self.run_one(e) for e in entries]

    def run_one(self, entry: JobEntry) -> EntryResult:
        """Read the entry's model, render its map (and score it); any error becomes a failed result.

        **Returns:** an `EntryResult` with the map (`data`) when it succeeded.
        """
        from .. import io
        from .._grid import Grid
        from ..scores import score_model
        from ._batch import render_batch

        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = io.read_model(entry.model, models="first")
                if entry.box is not None:
                    shape, grid_options = (entry.box,) * 3, {"box": entry.box, "voxel_size": entry.voxel_size}
                    Grid(shape, (entry.voxel_size,) * 3).check_fits_in_memory()
                elif entry.like is not None:
                    grid_options = {"grid": self._map(entry.like).grid}
                else:
                    grid_options = {"grid": Grid.around_positions(model.atoms.positions, entry.voxel_size, entry.padding)}
                out = render_batch([model.atoms], entry.resolution, method=entry.method, sampling=entry.sampling,
                                   table=entry.table, batch_size=1, names=[str(entry.model)], **grid_options)
                data, grid = np.asarray(out.maps[0]), out.grid(0)
                scores = {}
                if entry.map is not None:
                    s = score_model(self._map(entry.map), model, entry.resolution, table=entry.table).summary()
                    scores = {"cc_mask": _finite(s["cc_mask"]), "q_mean": _finite(s["q_mean"])}
            except Exception as err:  # one broken entry never stops the job
                return EntryResult(entry.name, "failed", seconds=time.perf_counter() - t0, error=describe_error(err),
                                   warnings=_joined(caught))
        return EntryResult(entry.name, "ok", atoms=int(model.n_atoms), seconds=time.perf_counter() - t0,
                           warnings=_joined(caught), data=data, origin=tuple(grid.origin),
                           voxel_size=tuple(grid.voxel_size), **scores)


def _finite(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _joined(caught) -> str:
    return "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


class MrcFiles:
    """One MRC file per entry, `OUTDIR/NAME.mrc` (`write_map`: atomic)."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir

    def path(self, entry: JobEntry) -> Path:
        return self.output_dir / f"{entry.name}.mrc"

    def complete(self, entry: JobEntry) -> bool:
        return self.path(entry).is_file()

    def write(self, entry: JobEntry, result: EntryResult) -> str:
        from .. import io
        from .._grid import Grid

        grid = Grid(result.data.shape, result.voxel_size, result.origin)
        return str(io.write_map(self.path(entry), result.data, grid, protect=entry.sources()))


class ZarrStore:
    """All maps of a job in one chunked zarr store, `OUTDIR/maps.zarr`, for ML data loaders.

    Every entry has the same box (`box` voxels along each axis); each has its own origin, voxel
    size, resolution and source:

    - `maps`: float32 `(N, box, box, box)`, `(z, y, x)` per map, one chunk per entry;
    - `origin`: float64 `(N, 3)`, x, y, z in Å of each map's grid point (0, 0, 0); NaN until the
      entry's map is written (it is written after the map, so a finite origin marks a complete map);
    - `voxel_size`: float64 `(N, 3)` Å (x, y, z); `resolution`: float64 `(N,)` Å;
    - attributes: `entries` (names), `sources` (model files), `methods`, `keys` (the specs the
      store was made for), `box`, `units` and `axes`.

    Why zarr and not HDF5: every chunk and metadata file of a zarr store is its own file, written
    to a temporary name and renamed (zarr's `LocalStore`), so a job killed while writing leaves
    every other map intact and readable, where a killed HDF5 writer can leave the whole file
    unreadable (HDF5 has no atomic update short of SWMR); readers (a training loop) can open the
    store while the job still writes; one chunk per map is exactly one training sample per read;
    and the same code reads it from object storage (S3, GCS) through fsspec when the data set
    moves to a cluster.
    """

    def __init__(self, path: Path, entries: Sequence[JobEntry], *, force: bool = False):
        zarr = _import_zarr()
        boxes = {e.box for e in entries}
        if None in boxes or len(boxes) != 1:
            bad = next((e for e in entries if e.box != entries[0].box or e.box is None), entries[0])
            raise ManifestError(f"--store holds maps of one fixed box: give every row the same 'box' (or the job --box); "
                                f"line {bad.line} ({bad.name}) has {'no box' if bad.box is None else f'box {bad.box}'}")
        self.box = int(entries[0].box)
        self.path = path
        self.index = {e.name: i for i, e in enumerate(entries)}
        keys = [e.key() for e in entries]
        root = zarr.open_group(str(path), mode="a")
        if "maps" in root and root.attrs.get("keys") != keys:
            if not force:
                raise ManifestError(f"{path} was made for another manifest (other entries or options); remove it, "
                                    "choose another output folder, or pass --force to remake it")
        if "maps" not in root or root.attrs.get("keys") != keys:
            root = zarr.open_group(str(path), mode="w")
            n, b = len(entries), self.box
            root.create_array("maps", shape=(n, b, b, b), chunks=(1, b, b, b), dtype="float32", fill_value=0.0)
            root.create_array("origin", shape=(n, 3), chunks=(1, 3), dtype="float64", fill_value=math.nan)
            root.create_array("voxel_size", shape=(n, 3), chunks=(n, 3), dtype="float64", fill_value=math.nan)
            root.create_array("resolution", shape=(n,), chunks=(n,), dtype="float64", fill_value=math.nan)
            root["voxel_size"][:] = np.repeat(np.asarray([[e.voxel_size] for e in entries], np.float64), 3, axis=1)
            root["resolution"][:] = np.asarray([e.resolution for e in entries], np.float64)
            root.attrs.update({
                "entries": [e.name for e in entries], "sources": [str(e.model) for e in entries],
                "methods": [e.method for e in entries], "keys": keys, "box": b,
                "axes": "maps[i] is (z, y, x); voxel (k, j, i) lies at origin + (i vx, j vy, k vz)",
                "units": "Å^-2 (electron table) or e/Å^3 (xray); origin and voxel_size in Å",
            })
        self.root = root

    def complete(self, entry: JobEntry) -> bool:
        try:
            return bool(np.all(np.isfinite(self.root["origin"][self.index[entry.name]])))
        except Exception:  # a chunk cut short by a crash: not complete
            return False

    def write(self, entry: JobEntry, result: EntryResult) -> str:
        i = self.index[entry.name]
        self.root["maps"][i] = result.data
        self.root["origin"][i] = np.asarray(result.origin, np.float64)  # last: marks the map complete
        return f"{self.path}[{i}]"


def _import_zarr():
    try:
        import zarr
    except ImportError:
        raise ImportError("--store writes a zarr store and needs zarr: pip install 'modelmap[store]' "
                          "(or pip install zarr)") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"--store needs zarr 3 or later (found {zarr.__version__}): pip install -U zarr")
    return zarr


@dataclasses.dataclass
class JobReport:
    """A finished (or interrupted) job: `results` in the manifest's order, the engine that ran it,
    how many workers, wall-clock `seconds`, and the results table's files."""

    results: list[dict]
    engine: str
    workers: int
    seconds: float
    table_csv: Path
    table_json: Path

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.results)


def run_job(
    entries: Sequence[JobEntry],
    output_dir: str | os.PathLike,
    *,
    store: bool = False,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
    chunk_size: int = 4,
) -> JobReport:
    """Render every entry of a manifest (and score those with a `map`), write the outputs and the
    results table; skip entries complete from an earlier run.

    **Arguments:**

    - `entries`: the checked manifest (`read_manifest`).
    - `output_dir`: the folder for maps, records and the results table (made if missing).
    - `store`: one zarr store `maps.zarr` (every entry needs the same `box`) instead of MRC files.
    - `engine`: `"local"` (this process) or `"ray"`.
    - `address`: a Ray cluster's address (`engine="ray"`; default: start Ray on this machine).
    - `workers`: Ray workers (default: one per GPU of the cluster; without GPUs, one per two CPUs).
    - `force`: redo entries that are complete.
    - `progress`: a progress bar on stderr.
    - `chunk_size`: entries per task sent to a Ray worker (entries of one compile key).

    **Returns:** a `JobReport`. Raises `ManifestError` (a store whose entries do not share a box, or
    made for another manifest) and `ImportError` (Ray or zarr missing) before any work.
    """
    from .._progress import ProgressBar

    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")
    if engine == "ray":
        from ._ray import import_ray

        import_ray()  # a missing Ray is said before any work
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = output_dir / "records"
    outputs = ZarrStore(output_dir / "maps.zarr", entries, force=force) if store else MrcFiles(output_dir)
    done: dict[str, dict] = {}
    todo = []
    for e in entries:
        record = None if force else _read_record(records / f"{e.name}.json")
        if record is not None and record.get("key") == e.key() and record.get("status") == "ok" and outputs.complete(e):
            done[e.name] = {**record, "status": "skipped"}
        else:
            todo.append(e)
    # entries of one compile key together, so a worker compiles each shape once
    todo.sort(key=lambda e: e.compile_key())
    chunks = _chunks(todo, chunk_size)
    n_workers = 1
    try:
        with ProgressBar("batch", len(todo), enabled=progress) as bar, _workers(engine, address, workers) as pool:
            n_workers = pool.size
            for chunk, results in pool.map(chunks):
                for entry, result in zip(chunk, results):
                    done[entry.name] = _finish(entry, result, outputs, records)
                    bar.describe(entry.name)
                    bar.advance()
    finally:
        rows = [_table_row(e, done.get(e.name)) for e in entries]
        seconds = time.perf_counter() - t0
        table_csv, table_json = _write_table(output_dir, rows, engine=engine, workers=n_workers, seconds=seconds)
    return JobReport(rows, engine, n_workers, seconds, table_csv, table_json)


class LocalPool:
    """The in-process engine: one `JobWorker`, chunk after chunk (the Ray engine's `RayPool` has
    the same `size` and `map`)."""

    size = 1

    def __init__(self):
        self.worker = JobWorker()

    def map(self, chunks: Sequence[Sequence[JobEntry]]) -> Iterator[tuple[Sequence[JobEntry], list[EntryResult]]]:
        for chunk in chunks:
            yield chunk, self.worker.run(chunk)


@contextlib.contextmanager
def _workers(engine: str, address: str | None, workers: int | None):
    if engine == "local":
        yield LocalPool()
        return
    from ._ray import RayPool

    with RayPool(address=address, workers=workers) as pool:
        yield pool


def _chunks(entries: Sequence[JobEntry], size: int) -> list[list[JobEntry]]:
    """Runs of at most `size` entries sharing a compile key (entries sorted by it)."""
    out: list[list[JobEntry]] = []
    for e in entries:
        if out and len(out[-1]) < size and out[-1][0].compile_key() == e.compile_key():
            out[-1].append(e)
        else:
            out.append([e])
    return out


def _finish(entry: JobEntry, result: EntryResult, outputs, records: Path) -> dict:
    """Write a successful entry's output, then its record (a failure gets a record only)."""
    record = result.record()
    if result.status == "ok":
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                record["output"] = outputs.write(entry, result)
            if caught:
                record["warnings"] = "; ".join(filter(None, [record["warnings"], _joined(caught)]))
        except Exception as err:
            record.update(status="failed", error=f"writing the output: {describe_error(err)}")
    record["key"] = entry.key()
    with atomic_path(records / f"{entry.name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _table_row(entry: JobEntry, record: dict | None) -> dict:
    r = record or {"status": "not run"}
    row = {c: r.get(c) for c in RESULT_COLUMNS}
    row.update(entry=entry.name, line=entry.line, model=str(entry.model), status=r["status"])
    row["seconds"] = None if row["seconds"] is None else round(float(row["seconds"]), 3)
    row["error"], row["warnings"] = row["error"] or "", row["warnings"] or ""
    return row


def _write_table(output_dir: Path, rows: list[dict], **job) -> tuple[Path, Path]:
    """`results.csv` and `results.json` (the same rows; the JSON also says how the job ran)."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed", "not run")}
    paths = output_dir / "results.csv", output_dir / "results.json"
    for path, text in zip(paths, (buffer.getvalue(), json.dumps({**job, "counts": counts, "entries": rows}, indent=1))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths
