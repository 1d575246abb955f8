"""`modelmap` command line (typer): render, score, refine, batch, demo."""

from __future__ import annotations

import enum
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="modelmap",
    help="Differentiable cryo-EM model maps from atomic models (JAX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Method(str, enum.Enum):
    gaussian = "gaussian"
    fourier = "fourier"
    shells = "shells"


class Table(str, enum.Enum):
    electron = "electron"
    xray = "xray"


class Sampling(str, enum.Enum):
    average = "average"
    point = "point"


# what users compare a model map with is an experimental map: a band-limited function sampled at
# grid points; point samples correlate with one better than voxel averages (measured, README)
SAMPLING_HELP = (
    "point (default, every method): values at the grid points, as an experimental map is sampled, so "
    "the map compares with one like for like (3J6B chain 9 at 3.2 Å, CC with EMD-2566 in its zone: "
    "fourier 0.542 point vs 0.526 average, gaussian 0.492 vs 0.479); average: exact voxel averages "
    "(erf; gaussian and fourier), a map whose sum times the voxel volume is the atoms' total "
    "scattering on any grid."
)


class Altloc(str, enum.Enum):
    all = "all"
    first = "first"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line on the terminal (no source line, no category)."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"modelmap {version('modelmap')}")
        except PackageNotFoundError:
            typer.echo("modelmap (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print modelmap's version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    # warnings from the library read as one line each while a command runs (restored after it)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    ctx.call_on_close(lambda: setattr(warnings, "showwarning", previous))


def _positive(value: float | None) -> float | None:
    """Option check (before any work): a finite number above 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number above 0, got {value}")
    return value


def _not_negative(value: float | None) -> float | None:
    """Option check (before any work): a finite number, 0 or more."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number, 0 or more, got {value}")
    return value


def check_outputs(inputs, outputs: dict) -> None:
    """Refuse, before any work, an output path that is one of the `inputs` or that two outputs share.

    **Arguments:**

    - `inputs`: the input files (`None` entries are skipped).
    - `outputs`: what each output is (e.g. `"--json"`) mapped to its path (or `None`).
    """
    read = {Path(p).resolve() for p in inputs if p is not None}
    seen: dict[Path, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in read:
            raise FileExistsError(f"refusing to overwrite the input file {path} ({what}); choose another output path")
        if key in seen:
            raise ValueError(f"{seen[key]} and {what} both name {path}; give each output its own file")
        seen[key] = what


def _map_script_path(output: Path) -> Path:
    """The ChimeraX script written beside a rendered map: its name with .cxc for .mrc(.gz)."""
    return output.with_suffix(".cxc") if output.suffix != ".gz" else output.with_suffix("").with_suffix(".cxc")


def _q_attribute_path(cxc_out: Path) -> Path:
    """The Q-score attribute file written beside `score --cxc`'s script."""
    stem = cxc_out.name[: -len(cxc_out.suffix)] if cxc_out.suffix else cxc_out.name
    return cxc_out.with_name(stem + "_qscore.defattr")


def model_stem(model: Path) -> str:
    """A model file's name without its .gz and model suffixes."""
    name = model.name
    for suffix in (".gz", ".cif", ".mmcif", ".pdb", ".ent"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _default_output(model: Path) -> Path:
    return model.with_name(model_stem(model) + "_model_map.mrc")


def render_to_files(
    model_path: Path,
    resolution: float,
    output: Path,
    *,
    like: Path | None = None,
    voxel_size: float = 1.0,
    padding: float = 5.0,
    table: str = "electron",
    method: str = "gaussian",
    sampling: str = "point",
    hydrogens: bool = True,
    waters: bool = True,
    altloc: str = "all",
    cxc: bool = True,
    resolution_from_b: bool = False,
    local_resolution: Path | None = None,
    atom_b: float = 0.0,
    n_terms: int = 6,
    models: str | None = None,
    assembly: str | None = None,
) -> dict:
    """Read a model, render its map, write the map (and a ChimeraX script). Returns a summary.

    `assembly` names a biological assembly of the file to render instead of its coordinates as
    they are (`read_model(..., assembly=...)`).

    A multi-model file (NMR models, MD frames) renders the mean map of its models, or of those
    selected by `models` (model numbers as in the file: "1,3,5-8").

    For `method="shells"` every atom may have its own resolution: from `resolution` (one value),
    from the model's B-factor column (`resolution_from_b`; the atoms' B is then `atom_b`), or from
    a local-resolution map sampled at the atoms (`local_resolution`, trilinear).
    """
    import jax
    import numpy as np

    from .. import io
    from .._grid import Grid
    from ..io._map import check_map_path
    from ..render import render_model

    t0 = time.perf_counter()
    check_outputs((model_path, like, local_resolution),
                  {"the map (-o)": output, "its ChimeraX script": _map_script_path(output) if cxc else None})
    check_map_path(output)
    if method == "shells" and sampling != "point":
        raise ValueError("--method shells samples the map at grid points only: leave out --sampling average")
    model = io.read_model(model_path, hydrogens=hydrogens, waters=waters, altloc=altloc, assembly=assembly)
    if like is not None:
        grid = io.read_map(like).grid
        inside = grid.contains(model.atoms.positions)
        if not inside.all():
            warnings.warn(f"{int(inside.sum())} of {inside.size} atoms lie inside {like}'s box"
                          + ("; the map is empty" if not inside.any() else ""), stacklevel=2)
    else:
        grid = Grid.around_positions(model.atoms.positions, voxel_size, padding)
    # the map must fit on the host once; render_model streams z-slabs where its working memory
    # would not fit beside it, and write_map writes it without a copy
    grid.check_fits_in_memory(copies=1)
    members = select_models(model, models)
    atoms, per_atom = members, resolution
    if resolution_from_b or local_resolution is not None:
        if method != "shells":
            raise ValueError("a per-atom resolution needs --method shells")
        if resolution_from_b and local_resolution is not None:
            raise ValueError("give either --resolution-from-b or --local-resolution, not both")
        per_atom = atom_resolutions(model, resolution_from_b, local_resolution)
        if resolution_from_b:
            atoms = type(atoms)(atoms.positions, atoms.atomic_numbers, np.full(atoms.b_factors.shape, atom_b, np.float32),
                                atoms.occupancies)
    n_models = atoms.positions.shape[0] if atoms.positions.ndim == 3 else 1
    in_file = model.atoms.positions.shape[0] if model.atoms.positions.ndim == 3 else 1
    if n_models > 1:
        from .._atoms import Ensemble

        atoms = Ensemble(atoms)
    elif atoms.positions.ndim == 3:
        atoms = jax.tree.map(lambda x: x[0], atoms)
    data = np.asarray(
        render_model(atoms, grid, per_atom, method=method, table=table, sampling=sampling, n_terms=n_terms)
    )
    protect = (model_path,) + ((like,) if like is not None else ()) + (
        (local_resolution,) if local_resolution is not None else ()
    )
    io.write_map(output, data, grid, protect=protect)
    summary = {
        "model": str(model_path),
        "atoms": int(model.n_atoms),
        "models_in_file": in_file,
        "models": n_models,
        "map": str(output),
        "grid_xyz": list(grid.shape[::-1]),
        "voxel_size": list(grid.voxel_size),
        "origin": list(grid.origin),
        "max": float(data.max()),
        "resolution": [float(np.min(per_atom)), float(np.max(per_atom))],
        "seconds": time.perf_counter() - t0,
    }
    if cxc:
        heavy = int(np.sum(np.asarray(model.atoms.atomic_numbers).reshape(-1)[: model.n_atoms] > 1))
        level = io.suggest_contour_level(data, grid.voxel_volume, heavy)
        script = _map_script_path(output)
        io.write_chimerax_script(script, model_path, output, level)
        summary["cxc"] = str(script)
        summary["contour_level"] = level
    return summary


def select_models(model, models: str | None):
    """The model's atoms, restricted to the members whose model numbers `models` lists ("1,3,5-8";
    `None`: all). A selection from a single-model file, or of a number not in the file, is an error."""
    import jax
    import numpy as np

    atoms = model.atoms
    if models is None:
        return atoms
    numbers = [model.structure[i].num for i in model.model_indices]
    wanted: list[int] = []
    for part in models.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            wanted += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"--models takes model numbers such as 1,3,5-8; got {models!r}") from None
    missing = sorted(set(wanted) - set(numbers))
    if missing:
        raise ValueError(f"{model.path}: no model(s) {missing}; the file has models {numbers[0]}-{numbers[-1]}"
                         if len(numbers) > 1 else f"{model.path} holds one model; --models selects members of an ensemble")
    keep = np.asarray([numbers.index(w) for w in dict.fromkeys(wanted)])
    if atoms.positions.ndim != 3:
        return atoms
    return jax.tree.map(lambda x: x[keep], atoms)


def atom_resolutions(model, from_b: bool, local_resolution: Path | None):
    """Per-atom resolutions (Å) from the B-factor column or a local-resolution map, checked to lie
    in the shell tables' range [1, 10] Å (an atom outside it is an error, never clipped)."""
    import numpy as np

    from .. import io
    from .._interpolate import interpolate_map
    from ..shells import D_RANGE

    if from_b:
        values = np.asarray(model.atoms.b_factors, np.float64)
        source = f"the B-factor column of {model.path}"
    else:
        density = io.read_map(local_resolution)
        values = np.asarray(interpolate_map(density.data, density.grid, model.atoms.positions, fill=np.nan), np.float64)
        source = f"the local-resolution map {local_resolution}"
        outside = ~np.isfinite(values)
        if outside.any():
            raise ValueError(f"{int(outside.sum())} atom(s) lie outside {source}'s box")
    bad = ~np.isfinite(values) | (values < D_RANGE[0]) | (values > D_RANGE[1])
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {values.size} per-atom resolutions from {source} lie outside "
            f"[{D_RANGE[0]:g}, {D_RANGE[1]:g}] Å (values {np.nanmin(values):.3g} to {np.nanmax(values):.3g})"
        )
    return values.astype(np.float32)


@app.command()
def render(
    model: Annotated[Path, typer.Argument(help="Model file: PDB or mmCIF, optionally .gz.")],
    resolution: Annotated[
        Optional[float],
        typer.Option(
            "-d", "--resolution",
            help="Resolution D in Å. For --method gaussian it adds a Gaussian blur of B = 4·D² Å² "
            "to every atom's own B (σ = 0.225·D, as ChimeraX molmap); 0 = the atoms' own B only. "
            "For --method fourier it is the hard cut |s| <= 1/D of the exact Fourier map; for "
            "--method shells every atom's resolution (1-10 Å) unless a per-atom source is given.",
            callback=_not_negative,
        ),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output map: .mrc, .map or .ccp4, optionally + .gz "
                                                      "(default: MODEL's name + _model_map.mrc).")] = None,
    like: Annotated[Optional[Path], typer.Option("--like", help="Use this map's grid (shape, voxel size, origin).")] = None,
    voxel_size: Annotated[float, typer.Option("--voxel-size", help="Voxel size in Å (without --like).", callback=_positive)] = 1.0,
    padding: Annotated[float, typer.Option("--padding", help="Å of margin around the model (without --like).", callback=_not_negative)] = 5.0,
    table: Annotated[Table, typer.Option("--table", help="Scattering factors: electron (ITC 4.3.2.2/Peng 1996) or xray (IT92).")] = Table.electron,
    method: Annotated[Method, typer.Option("--method", help="gaussian: 5-Gaussian form factors rendered in local windows; fourier: the exact "
                  "finite-resolution Fourier map (type-1 NUFFT, jax-finufft); shells: the same atomic "
                  "images from the shell decomposition, with a resolution per atom (values at grid points).")] = Method.gaussian,
    resolution_from_b: Annotated[bool, typer.Option("--resolution-from-b", help="shells: read each atom's resolution (Å) from the B-factor "
                                                    "column; the atoms' B is then --atom-b.")] = False,
    local_resolution: Annotated[Optional[Path], typer.Option("--local-resolution", help="shells: a local-resolution map (Å, e.g. from "
                                                             "ResMap, cryoSPARC or RELION) sampled at the atoms (trilinear).")] = None,
    atom_b: Annotated[float, typer.Option("--atom-b", help="shells with --resolution-from-b: the atoms' B in Å².")] = 0.0,
    terms: Annotated[int, typer.Option("--terms", help="shells: terms kept per atom (6: < 0.7 % of the peak; 12-16: < 0.2 %).")] = 6,
    sampling: Annotated[Sampling, typer.Option("--sampling", help=SAMPLING_HELP)] = Sampling.point,
    hydrogens: Annotated[bool, typer.Option("--hydrogens/--no-hydrogens", help="Keep hydrogen atoms.")] = True,
    waters: Annotated[bool, typer.Option("--waters/--no-waters", help="Keep waters.")] = True,
    altloc: Annotated[Altloc, typer.Option("--altloc", help="all: every conformer at its occupancy; first: the first conformer only.")] = Altloc.all,
    cxc: Annotated[bool, typer.Option("--cxc/--no-cxc", help="Also write a ChimeraX script that opens model and map.")] = True,
    models: Annotated[Optional[str], typer.Option("--models", help="Multi-model files: the models to average, by number "
                                                  "(e.g. 1,3,5-8); default all.")] = None,
    assembly: Annotated[Optional[str], typer.Option("--assembly", help="Render this biological assembly of the file (e.g. 1; "
                                                    "gemmi make_assembly) instead of its coordinates as they are.")] = None,
) -> None:
    """Render the model map of MODEL and write it as MRC (plus a ChimeraX .cxc).

    A multi-model file (NMR models, MD frames) renders the mean map of its models."""
    from .._errors import ModelmapError

    output = output or _default_output(model)
    if resolution is None and not (resolution_from_b or local_resolution is not None):
        _fail("give the resolution with -d/--resolution (or, for --method shells, --resolution-from-b or --local-resolution)")
    try:
        s = render_to_files(
            model, resolution if resolution is not None else 0.0, output, like=like, voxel_size=voxel_size,
            padding=padding, table=table.value, method=method.value, sampling=sampling.value, hydrogens=hydrogens,
            waters=waters, altloc=altloc.value, cxc=cxc, resolution_from_b=resolution_from_b,
            local_resolution=local_resolution, atom_b=atom_b, n_terms=terms, models=models, assembly=assembly,
        )
    except (ModelmapError, FileExistsError, ValueError, ImportError) as err:
        _fail(str(err))
    nx, ny, nz = s["grid_xyz"]
    if s["models_in_file"] > 1:
        typer.echo(f"read {s['model']}: {s['models_in_file']} models × {s['atoms']} atoms "
                   f"= {s['models_in_file'] * s['atoms']} atoms; rendering "
                   + (f"the mean map of {s['models']} models" if s["models"] > 1 else "one model")
                   + (f" (--models {models})" if models else ""))
    else:
        typer.echo(f"read {s['model']}: {s['atoms']} atoms")
    lo, hi = s["resolution"]
    if method == Method.shells and lo != hi:
        typer.echo(f"per-atom resolution from {lo:.3g} to {hi:.3g} Å")
    typer.echo(f"wrote {s['map']}: {nx} x {ny} x {nz} voxels of {s['voxel_size'][0]:.4g} Å, "
               f"origin {tuple(round(o, 3) for o in s['origin'])} Å, max {s['max']:.4g}")
    if "cxc" in s:
        typer.echo(f"wrote {s['cxc']} (open in ChimeraX; contour level {s['contour_level']:.4g})")
    typer.echo(f"took {s['seconds']:.1f} s")


class QVariant(str, enum.Enum):
    mapq = "mapq"
    cctbx = "cctbx"


def score_to_files(
    map_path: Path,
    model_path: Path,
    resolution: float,
    *,
    json_out: Path | None = None,
    cxc_out: Path | None = None,
    sigma: float = 0.6,
    q_variant: str = "mapq",
    mapq_multiprocess: bool = False,
    table: str = "electron",
    progress: bool = False,
):
    """Score a model against a map; write the JSON report and the ChimeraX script if asked.

    **Returns:** the `ScoreReport`.
    """
    import json

    from .. import io
    from ..io._atomic_write import atomic_path
    from ..scores import score_model

    inputs = (map_path, model_path)
    defattr = _q_attribute_path(cxc_out) if cxc_out is not None else None
    check_outputs(inputs, {"--json": json_out, "--cxc": cxc_out, "the Q attribute file of --cxc": defattr})
    density = io.read_map(map_path)
    model = io.read_model(model_path)
    report = score_model(density, model, resolution, sigma=sigma, q_variant=q_variant,
                         mapq_multiprocess=mapq_multiprocess, table=table, progress=progress)
    if json_out is not None:
        payload = {"map": str(map_path), "model": str(model_path), **report.to_json()}
        with atomic_path(json_out, protect=inputs) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))
    if cxc_out is not None:
        io.write_attribute_file(defattr, model.labels, report.q.q, "qscore")
        level = io.suggest_contour_level(density.data, density.grid.voxel_volume, int(report.q.scored.sum()))
        io.write_chimerax_script(cxc_out, model_path, map_path, level, extra_commands=(
            f'open "{defattr.name}"',
            "color byattribute a:qscore #1 palette 0,red:0.5,white:1,blue noValueColor gray",
            "key red:0 white:0.5 blue:1 pos 0.85,0.1 size 0.03,0.3",
        ))
    return report


@app.command()
def score(
    map: Annotated[Path, typer.Argument(help="Experimental map (MRC/CCP4, optionally .gz).")],
    model: Annotated[Path, typer.Argument(help="Model file: PDB or mmCIF, optionally .gz.")],
    resolution: Annotated[float, typer.Option("-d", "--resolution", help="Map resolution D in Å: the model map is the Fourier "
                                              "map cut at |s| <= 1/D (as phenix.map_model_cc).", callback=_positive)],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every score (per atom, residue, chain; FSC curve) as JSON.")] = None,
    cxc_out: Annotated[Optional[Path], typer.Option("--cxc", help="Write a ChimeraX script (and a .defattr beside it) that colours the model by Q.")] = None,
    sigma: Annotated[float, typer.Option("--sigma", help="Q-score reference width in Å: 0.6 (MapQ's default) or 0.4 (as in EMDB validation reports).")] = 0.6,
    q_variant: Annotated[QVariant, typer.Option("--q-variant", help="mapq: MapQ's algorithm exactly; cctbx: cctbx.maptbx.qscore's (32 probes, no r = 0).")] = QVariant.mapq,
    mapq_multiprocess: Annotated[bool, typer.Option("--mapq-multiprocess", help="Score Q on the map as MapQ's multi-process mode re-grids it "
                                                    "(to reproduce values published from such runs).")] = False,
    table: Annotated[Table, typer.Option("--table", help="Scattering factors of the model map.")] = Table.electron,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="PREFIX", help="Write PNGs named PREFIX plus _fsc.png (FSC "
                                                 "with its 0.5 and 0.143 crossings), _residues.png (Q and CC per residue "
                                                 "along each chain) and _q_histogram.png (with MapQ's expected Q); a "
                                                 "folder (existing, or ending in /) gets fsc.png, ... inside.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr when "
                                           "scoring takes more than a second.")] = True,
) -> None:
    """Score MODEL against MAP: CC_mask, CC_box, CC_volume, CC_peaks, local CC, Q-score and FSC."""
    from .._errors import ModelmapError

    t0 = time.perf_counter()
    try:
        r = score_to_files(map, model, resolution, json_out=json_out, cxc_out=cxc_out, sigma=sigma,
                           q_variant=q_variant.value, mapq_multiprocess=mapq_multiprocess, table=table.value,
                           progress=progress)
        plots = {}
        if plot is not None:
            from ..plots import write_score_plots

            plots = write_score_plots(r, plot, protect=(map, model))
    except (ModelmapError, FileExistsError, ValueError, ImportError) as err:
        _fail(str(err))
    s = r.summary()
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.4f}"  # noqa: E731
    typer.echo(f"{model} against {map} at {resolution:g} Å")
    typer.echo(f"  CC_mask   {fmt(s['cc_mask'])}   ({s['n_inside_mask']} voxels inside the model mask)")
    typer.echo(f"  CC_box    {fmt(s['cc_box'])}")
    typer.echo(f"  CC_volume {fmt(s['cc_volume'])}")
    typer.echo(f"  CC_peaks  {fmt(s['cc_peaks'])}")
    typer.echo(f"  local CC  main chain {fmt(s['cc_main_chain'])}, side chain {fmt(s['cc_side_chain'])} "
               f"(atom radius {s['local_cc_atom_radius']:.2f} Å)")
    typer.echo(f"  Q-score   {fmt(s['q_mean'])} mean of {int(r.q.scored.sum())} atoms (σ {sigma:g} Å, {q_variant.value}); "
               f"expected at {resolution:g} Å: {fmt(s['q_expected'])}")
    q_chain = r.q.per_chain()
    for chain, cc in r.local.chains.items():
        typer.echo(f"    chain {chain:<4} CC {fmt(cc)}  Q {fmt(q_chain.get(chain))}")
    typer.echo(f"  FSC map vs model (inside the mask): {s['fsc_0.5']:.2f} Å at 0.5, {s['fsc_0.143']:.2f} Å at 0.143")
    if json_out is not None:
        typer.echo(f"wrote {json_out}")
    if cxc_out is not None:
        typer.echo(f"wrote {cxc_out} (open in ChimeraX: the model coloured by Q, red 0 to blue 1)")
    for path in plots.values():
        typer.echo(f"wrote {path}")
    typer.echo(f"took {time.perf_counter() - t0:.1f} s")


class Loss(str, enum.Enum):
    ls = "ls"
    cc = "cc"
    q = "q"


class Groups(str, enum.Enum):
    atom = "atom"
    residue = "residue"


@app.command()
def refine(
    map: Annotated[Path, typer.Argument(help="Experimental map (MRC/CCP4, optionally .gz).")],
    model: Annotated[Path, typer.Argument(help="Model file: PDB or mmCIF, optionally .gz.")],
    resolution: Annotated[float, typer.Option("-d", "--resolution", help="Map resolution D in Å (the model map is the Fourier map at D; "
                                              "with res, the start of every atom's resolution).", callback=_positive)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Refined model (.cif or .pdb); the input is never overwritten.")],
    parameters: Annotated[str, typer.Option("--refine", help="Comma-separated: xyz, b, occ, res (per-atom resolution), rigid (per chain).")] = "xyz,b",
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps in all.")] = 200,
    macro_cycles: Annotated[int, typer.Option("--macro-cycles", help="Restarts that re-weigh map against restraints and rebuild contacts.")] = 3,
    loss: Annotated[Loss, typer.Option("--loss", help="ls: least squares with fitted scale and offset; cc: 1 - CC; q: 1 - mean Q (xyz only).")] = Loss.ls,
    weight: Annotated[str, typer.Option("--weight", help="Map weight: auto (gradient norms, as phenix.refine) or a number.")] = "auto",
    occ_groups: Annotated[Groups, typer.Option("--occ-groups", help="With occ: one occupancy per atom, or per residue "
                                               "(and alternate conformer), as phenix.refine's occupancy groups.")] = Groups.atom,
    res_groups: Annotated[Groups, typer.Option("--res-groups", help="With res: one resolution per atom, or per residue "
                                               "(and alternate conformer).")] = Groups.atom,
    res_scan: Annotated[bool, typer.Option("--res-scan/--no-res-scan", help="With res: start each residue at the uniform "
                                           "resolution (RES ± 2 Å) that fits it best, instead of at RES.")] = True,
    local_resolution: Annotated[Optional[Path], typer.Option("--local-resolution", help="A local-resolution map (Å, e.g. "
                                                             "from modelmap locres, ResMap or MonoRes) sampled at the atoms: "
                                                             "the model map is the shell map at these per-atom resolutions "
                                                             "(fixed, or with res where they start, in place of --res-scan).")] = None,
    monomer_library: Annotated[Optional[Path], typer.Option("--monomer-library", help="A CCP4 monomer library folder "
                                                            "for the restraints (e.g. $CLIBD_MON); default: the PDB's CCD.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the before/after report and the per-step history as JSON.")] = None,
    cxc_out: Annotated[Optional[Path], typer.Option("--cxc", help="The ChimeraX script (map, refined model coloured by shift, "
                                                    "start model in gray); default: beside the refined model, OUTPUT stem + .cxc.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="PREFIX", help="Write a PNG named PREFIX plus _refine.png: "
                                                 "objective, map loss, bond and angle rmsd (with their limits) and map "
                                                 "weight per step, macro-cycles marked, CC_mask and mean Q before and "
                                                 "after; a folder (existing, or ending in /) gets refine.png inside.")] = None,
) -> None:
    """Refine MODEL against MAP (coordinates, B, occupancy, per-atom resolution, rigid bodies) under
    geometry restraints from the PDB Chemical Component Dictionary; report CC_mask, mean Q and
    bond / angle rmsd before and after."""
    from .._errors import ModelmapError
    from ._refine import refine_to_files

    names = tuple(p.strip() for p in parameters.split(",") if p.strip())
    try:
        map_weight = weight if weight == "auto" else float(weight)
    except ValueError:
        _fail(f"--weight must be 'auto' or a number, got {weight!r}")
    t0 = time.perf_counter()
    try:
        r = refine_to_files(map, model, resolution, output, parameters=names, max_steps=steps,
                            macro_cycles=macro_cycles, loss=loss.value, monomer_library=monomer_library,
                            map_weight=map_weight, occupancy_groups=occ_groups.value,
                            resolution_groups=res_groups.value,
                            resolutions=None if res_scan or "res" not in names else resolution,
                            local_resolution=local_resolution, json_out=json_out,
                            cxc_out=cxc_out or output.with_name(model_stem(output) + ".cxc"), progress=progress, plot=plot)
    except (ModelmapError, FileExistsError, ValueError, ImportError, TypeError) as err:
        _fail(str(err))
    b, a = r["before"], r["after"]
    typer.echo(f"refined {', '.join(names)} of {model} against {map} at {resolution:g} Å: "
               f"{r['result']} after {r['n_steps']} steps ({r['time']:.1f} s), map weight {r['map_weight']:.4g}")
    typer.echo(f"  {'':12} {'before':>9} {'after':>9}")
    for key, label, fmt in (("cc_mask", "CC_mask", "{:9.4f}"), ("cc_box", "CC_box", "{:9.4f}"),
                            ("q_mean", "mean Q", "{:9.4f}"), ("bond_rmsd", "bonds (Å)", "{:9.4f}"),
                            ("angle_rmsd", "angles (°)", "{:9.2f}"), ("clashes", "clashes", "{:9d}")):
        typer.echo(f"  {label:12} {fmt.format(b[key])} {fmt.format(a[key])}")
    g = r["geometry"]
    typer.echo("  (clashes: heavy-atom contacts under 2.2 Å, not bonded or 1-3)")
    typer.echo(f"  atoms moved {g['mean_shift']:.2f} Å on average (at most {g['max_shift']:.2f} Å); "
               f"{g['atoms_moved_over_3']} atoms and {len(g.get('backbone_moved_over_3', []))} backbone atoms moved > 3 Å")
    for line in g.get("backbone_moved_over_3", [])[:10]:
        typer.echo(f"    {line} Å")
    typer.echo(f"  restraints from {r['monomer_library']}")
    for what, path in r["written"].items():
        typer.echo(f"wrote {path} ({what.replace('_', ' ')})")
    typer.echo(f"took {time.perf_counter() - t0:.1f} s")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("-o", "--output-dir", help="Folder for the demo's files.")] = Path("modelmap-demo"),
    resolution: Annotated[float, typer.Option("-d", "--resolution", help="Resolution in Å.", callback=_positive)] = 3.0,
    steps: Annotated[int, typer.Option("--steps", help="Refinement steps.", min=1)] = 40,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the target's displacement and noise.")] = 0,
) -> None:
    """Render, score and refine on data made here: an ideal α-helix (the model) and a noisy map of a
    displaced copy with higher B (the target), all files written to one folder."""
    import jax
    import numpy as np

    from .. import io
    from .._atoms import Atoms
    from .._errors import ModelmapError
    from .._grid import Grid
    from .._peptide import ideal_peptide
    from ..render import render_model
    from ._refine import refine_to_files

    t0 = time.perf_counter()
    files = {name: output_dir / name for name in (
        "helix.pdb", "target.mrc", "helix_model_map.mrc", "score.json", "score.cxc", "helix_refined.pdb",
        "refine.json", "refine.cxc")}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        model = io.model_from_structure(ideal_peptide("AAAAGAAAAAAA", b_factor=20.0))
        io.write_model(files["helix.pdb"], model)
        typer.echo(f"model: an ideal α-helix, 12 residues (poly-Ala, one Gly), B = 20 Å²: {files['helix.pdb']}")

        # the target: the Fourier map at D of the helix moved by 0.5 Å plus 0.15 Å per atom, B = 40 Å²,
        # with noise of 10 % of its standard deviation (an explicit key: the same map every run)
        k_move, k_jitter, k_noise = jax.random.split(jax.random.key(seed), 3)
        pos = np.asarray(model.atoms.positions)
        direction = np.asarray(jax.random.normal(k_move, (3,)))
        moved = pos + 0.5 * direction / np.linalg.norm(direction) + 0.15 * np.asarray(jax.random.normal(k_jitter, pos.shape))
        true = Atoms(moved, model.atoms.atomic_numbers, np.full(len(pos), 40.0, np.float32), model.atoms.occupancies)
        grid = Grid.around_positions(pos, 1.0, 6.0)
        clean = np.asarray(render_model(true, grid, resolution, method="fourier", sampling="point"))
        noisy = clean + 0.1 * clean.std() * np.asarray(jax.random.normal(k_noise, clean.shape))
        io.write_map(files["target.mrc"], noisy.astype(np.float32), grid)
        typer.echo(f"target: the {resolution:g} Å Fourier map of the helix moved by 0.5 Å (+ 0.15 Å per atom), "
                   f"B = 40 Å², 10 % noise (seed {seed}): {files['target.mrc']}")

        s = render_to_files(files["helix.pdb"], resolution, files["helix_model_map.mrc"])
        typer.echo(f"render: the model's {resolution:g} Å map ({' x '.join(map(str, s['grid_xyz']))} voxels of 1 Å, "
                   f"Gaussian method, point samples): {files['helix_model_map.mrc']} and {s['cxc']}")

        r = score_to_files(files["target.mrc"], files["helix.pdb"], resolution, json_out=files["score.json"],
                           cxc_out=files["score.cxc"])
        typer.echo(f"score: CC_mask {r.cc.cc_mask:.4f}, mean Q {r.q.mean():.4f}: {files['score.json']} and {files['score.cxc']}")

        f = refine_to_files(files["target.mrc"], files["helix.pdb"], resolution, files["helix_refined.pdb"],
                            parameters=("xyz", "b"), max_steps=steps, macro_cycles=1, json_out=files["refine.json"],
                            cxc_out=files["refine.cxc"], progress=False)
    except (ModelmapError, FileExistsError, ValueError, ImportError) as err:
        _fail(str(err))
    b, a = f["before"], f["after"]
    refined = io.read_model(files["helix_refined.pdb"])
    error = lambda p: float(np.sqrt(np.mean(np.sum((np.asarray(p) - moved) ** 2, -1))))  # noqa: E731
    typer.echo(f"refine: xyz and B, {f['n_steps']} steps ({f['time']:.1f} s): {files['helix_refined.pdb']}, "
               f"{files['refine.json']} and {files['refine.cxc']}")
    typer.echo(f"  {'':22} {'before':>8} {'after':>8}")
    for label, before, after in (("CC_mask", b["cc_mask"], a["cc_mask"]), ("mean Q", b["q_mean"], a["q_mean"]),
                                 ("bond rmsd (Å)", b["bond_rmsd"], a["bond_rmsd"]),
                                 ("mean B (Å², true 40)", 20.0, float(np.mean(refined.atoms.b_factors))),
                                 ("rmsd to the true (Å)", error(pos), error(refined.atoms.positions))):
        typer.echo(f"  {label:22} {before:8.3f} {after:8.3f}")
    typer.echo(f"took {time.perf_counter() - t0:.1f} s; `chimerax {files['refine.cxc']}` shows the refined model in its map")


from ._batch import batch as _batch  # noqa: E402  (the command's code lives in _batch.py)

app.command(name="batch")(_batch)
from ._locres import locres as _locres  # noqa: E402  (the command's code lives in _locres.py)

app.command(name="locres")(_locres)

from ._sharpen import sharpen as _sharpen  # noqa: E402  (the command's code lives in _sharpen.py)

app.command(name="sharpen")(_sharpen)

from ._diffmap import diffmap as _diffmap  # noqa: E402  (the command's code lives in _diffmap.py)

app.command(name="diffmap")(_diffmap)

from ._occupancy import occupancy as _occupancy  # noqa: E402  (the command's code lives in _occupancy.py)

app.command(name="occupancy")(_occupancy)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
