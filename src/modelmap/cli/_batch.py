"""`modelmap batch`: many model maps from a manifest, in this process or on Ray (issue 18)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import Method, Sampling, Table, _fail, _not_negative, _positive


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


def batch(
    manifest: Annotated[Path, typer.Argument(help="CSV (with a header row) or JSON lines: one entry per row with the "
                                             "fields model, resolution, method, voxel_size, padding, box, like, map, "
                                             "name, sampling, table (see the docs: Batch jobs).")],
    output_dir: Annotated[Path, typer.Option("-o", "--output-dir", help="Folder for the maps, the per-entry records "
                                             "and the results table (results.csv, results.json).")],
    store: Annotated[bool, typer.Option("--store/--mrc", help="Write one zarr store OUTDIR/maps.zarr (every entry with "
                                        "the same box; for ML) instead of one MRC file per entry.")] = False,
    engine: Annotated[Engine, typer.Option("--engine", help="local: in this process; ray: on Ray workers (one per "
                                           "GPU), needs pip install 'modelmap[cluster]'.")] = Engine.local,
    address: Annotated[Optional[str], typer.Option("--address", help="--engine ray: a running Ray cluster's address "
                                                   "(default: start Ray on this machine).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="--engine ray: how many workers (default: one "
                                                   "per GPU; without GPUs one per two CPUs).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo entries whose outputs are complete from an earlier run "
                                        "(by default a rerun does only the missing or failed ones).")] = False,
    resolution: Annotated[Optional[float], typer.Option("-d", "--resolution", help="Resolution D in Å of rows that give "
                                                        "none.", callback=_not_negative)] = None,
    method: Annotated[Method, typer.Option("--method", help="Method of rows that give none (as modelmap render).")] = Method.gaussian,
    voxel_size: Annotated[float, typer.Option("--voxel-size", help="Voxel size in Å of rows that give none.", callback=_positive)] = 1.0,
    padding: Annotated[float, typer.Option("--padding", help="Å of margin around the model, for rows without a box or "
                                           "like.", callback=_not_negative)] = 5.0,
    box: Annotated[Optional[int], typer.Option("--box", min=1, help="A box of this many voxels per axis, centred on the "
                                               "model, for rows that give no grid (needed by --store).")] = None,
    sampling: Annotated[Sampling, typer.Option("--sampling", help="Sampling of rows that give none (as modelmap render).")] = Sampling.point,
    table: Annotated[Table, typer.Option("--table", help="Scattering factors of rows that give none.")] = Table.electron,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")] = True,
) -> None:
    """Render (and score) every entry of MANIFEST: one map per entry, a results table, faults recorded
    and the job going on; rerun the same command to resume (complete entries are skipped).

    Exit code 0 when every entry is done, 1 when some failed (see the table), 2 for a bad manifest
    or option (nothing run)."""
    from ..batch import JobDefaults, read_manifest, run_job

    try:
        defaults = JobDefaults(resolution=resolution, method=method.value, voxel_size=voxel_size, padding=padding,
                               box=box, sampling=sampling.value, table=table.value)
        entries = read_manifest(manifest, defaults)
        report = run_job(entries, output_dir, store=store, engine=engine.value, address=address, workers=workers,
                         force=force, progress=progress)
    except (ValueError, ImportError, FileExistsError) as err:
        _fail(str(err))
    done, skipped, failed = report.count("ok"), report.count("skipped"), report.count("failed")
    rate = done / report.seconds if report.seconds > 0 else 0.0
    workers_text = f", {report.workers} worker{'s' * (report.workers > 1)}" if report.engine == "ray" else ""
    typer.echo(f"{len(entries)} entries: {done} done ({rate:.2f} per second, {report.engine}{workers_text}), "
               f"{skipped} complete from an earlier run (skipped), {failed} failed")
    for row in report.results:
        if row["status"] == "failed":
            typer.secho(f"  failed: {row['entry']} (line {row['line']}): {row['error']}", fg=typer.colors.RED, err=True)
    typer.echo(f"wrote {report.table_csv} and {report.table_json}" + (f"; maps in {output_dir / 'maps.zarr'}" if store else ""))
    if failed:
        raise typer.Exit(code=1)
