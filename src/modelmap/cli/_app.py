"""`modelmap` command line (typer): render, demo."""

from __future__ import annotations

import enum
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="modelmap",
    help="Differentiable cryo-EM model maps from atomic models (JAX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Method(str, enum.Enum):
    gaussian = "gaussian"
    fourier = "fourier"


class Table(str, enum.Enum):
    electron = "electron"
    xray = "xray"


class Sampling(str, enum.Enum):
    average = "average"
    point = "point"


class Altloc(str, enum.Enum):
    all = "all"
    first = "first"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _default_output(model: Path) -> Path:
    name = model.name
    for suffix in (".gz", ".cif", ".mmcif", ".pdb", ".ent"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return model.with_name(name + "_model_map.mrc")


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
    sampling: str = "average",
    hydrogens: bool = True,
    waters: bool = True,
    altloc: str = "all",
    cxc: bool = True,
    echo=print,
) -> dict:
    """Read a model, render its map, write the map (and a ChimeraX script). Returns a summary."""
    import numpy as np

    from .. import io
    from .._grid import Grid
    from ..render import render_model

    t0 = time.perf_counter()
    model = io.read_model(model_path, hydrogens=hydrogens, waters=waters, altloc=altloc)
    if like is not None:
        grid = io.read_map(like).grid
    else:
        grid = Grid.around_positions(model.atoms.positions, voxel_size, padding)
    grid.check_fits_in_memory()
    data = np.asarray(
        render_model(model.atoms, grid, resolution, method=method, table=table, sampling=sampling)
    )
    protect = (model_path,) + ((like,) if like is not None else ())
    io.write_map(output, data, grid, protect=protect)
    summary = {
        "model": str(model_path),
        "atoms": int(model.n_atoms),
        "map": str(output),
        "grid_xyz": list(grid.shape[::-1]),
        "voxel_size": list(grid.voxel_size),
        "origin": list(grid.origin),
        "max": float(data.max()),
        "seconds": time.perf_counter() - t0,
    }
    if cxc:
        heavy = int(np.sum(np.asarray(model.atoms.atomic_numbers).reshape(-1)[: model.n_atoms] > 1))
        level = io.suggest_contour_level(data, grid.voxel_volume, heavy)
        script = output.with_suffix(".cxc") if output.suffix != ".gz" else output.with_suffix("").with_suffix(".cxc")
        io.write_chimerax_script(script, model_path, output, level)
        summary["cxc"] = str(script)
        summary["contour_level"] = level
    return summary


@app.command()
def render(
    model: Annotated[Path, typer.Argument(help="Model file: PDB or mmCIF, optionally .gz.")],
    resolution: Annotated[
        float,
        typer.Option(
            "-d", "--resolution",
            help="Resolution D in Å. For --method gaussian it adds a Gaussian blur of B = 4·D² Å² "
            "to every atom's own B (σ = 0.225·D, as ChimeraX molmap); 0 = the atoms' own B only. "
            "For --method fourier it is the hard cut |s| <= 1/D of the exact Fourier map.",
        ),
    ],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output map (.mrc, .map or .mrc.gz).")] = None,
    like: Annotated[Optional[Path], typer.Option("--like", help="Use this map's grid (shape, voxel size, origin).")] = None,
    voxel_size: Annotated[float, typer.Option("--voxel-size", help="Voxel size in Å (without --like).")] = 1.0,
    padding: Annotated[float, typer.Option("--padding", help="Å of margin around the model (without --like).")] = 5.0,
    table: Annotated[Table, typer.Option("--table", help="Scattering factors: electron (ITC 4.3.2.2/Peng 1996) or xray (IT92).")] = Table.electron,
    method: Annotated[Method, typer.Option("--method", help="gaussian: 5-Gaussian form factors rendered in local windows; fourier: the exact "
                  "finite-resolution Fourier map (type-1 NUFFT, needs the 'nufft' extra).")] = Method.gaussian,
    sampling: Annotated[Sampling, typer.Option("--sampling", help="average: exact voxel averages (erf); point: values at grid points.")] = Sampling.average,
    hydrogens: Annotated[bool, typer.Option("--hydrogens/--no-hydrogens", help="Keep hydrogen atoms.")] = True,
    waters: Annotated[bool, typer.Option("--waters/--no-waters", help="Keep waters.")] = True,
    altloc: Annotated[Altloc, typer.Option("--altloc", help="all: every conformer at its occupancy; first: the first conformer only.")] = Altloc.all,
    cxc: Annotated[bool, typer.Option("--cxc/--no-cxc", help="Also write a ChimeraX script that opens model and map.")] = True,
) -> None:
    """Render the model map of MODEL and write it as MRC (plus a ChimeraX .cxc)."""
    from .._errors import ModelmapError

    output = output or _default_output(model)
    try:
        s = render_to_files(
            model, resolution, output, like=like, voxel_size=voxel_size, padding=padding,
            table=table.value, method=method.value, sampling=sampling.value, hydrogens=hydrogens,
            waters=waters, altloc=altloc.value, cxc=cxc,
        )
    except (ModelmapError, FileExistsError, ValueError, ImportError) as err:
        _fail(str(err))
    nx, ny, nz = s["grid_xyz"]
    typer.echo(f"read {s['model']}: {s['atoms']} atoms")
    typer.echo(f"wrote {s['map']}: {nx} x {ny} x {nz} voxels of {s['voxel_size'][0]:.4g} Å, "
               f"origin {tuple(round(o, 3) for o in s['origin'])} Å, max {s['max']:.4g}")
    if "cxc" in s:
        typer.echo(f"wrote {s['cxc']} (open in ChimeraX; contour level {s['contour_level']:.4g})")
    typer.echo(f"took {s['seconds']:.1f} s")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("-o", "--output-dir", help="Folder for the demo's files.")] = Path("modelmap-demo"),
    resolution: Annotated[float, typer.Option("-d", "--resolution", help="Resolution in Å.")] = 3.0,
) -> None:
    """Build an ideal α-helical peptide, render its model map, check it, and write everything."""
    import numpy as np

    from .. import io
    from .._peptide import ideal_peptide

    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / "helix.pdb"
    st = ideal_peptide("AAAAGAAAAAAA", b_factor=20.0)
    io.write_model(model_path, io.model_from_structure(st))
    typer.echo(f"built an ideal α-helix (12 residues, poly-Ala with one Gly, B = 20 Å²): {model_path}")
    map_path = output_dir / "helix_model_map.mrc"
    s = render_to_files(model_path, resolution, map_path, voxel_size=1.0, padding=5.0)
    nx, ny, nz = s["grid_xyz"]
    typer.echo(f"rendered it at {resolution:g} Å (electron factors, exact voxel averages): {map_path} "
               f"({nx} x {ny} x {nz} voxels of 1 Å)")
    # check: read the map back and look at the density at the atoms
    density = io.read_map(map_path)
    model = io.read_model(model_path)
    data = np.asarray(density.data)
    idx = np.rint(np.asarray(density.grid.to_index(np.asarray(model.atoms.positions)))).astype(int)
    at_atoms = data[idx[:, 2], idx[:, 1], idx[:, 0]]
    z = (at_atoms.mean() - data.mean()) / data.std()
    mass = data.sum() * density.grid.voxel_volume
    f0 = float(np.sum(np.asarray(__import__("modelmap").get_table("electron").f0(model.atoms.atomic_numbers))))
    typer.echo(f"check: map value at the atoms is {z:.1f} sd above the box mean; "
               f"integral {mass:.2f} Å (Σ f(0) = {f0:.2f} Å)")
    typer.echo(f"wrote {s['cxc']}: `chimerax {s['cxc']}` shows model and map (contour {s['contour_level']:.3g})")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
