"""`modelmap diffmap`: the experimental map minus the model map, scaled locally, in σ (issue 20)."""

from __future__ import annotations

import csv
import enum
import io
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import Table, _fail, _positive, atom_resolutions, check_outputs, model_stem


class Sigma(str, enum.Enum):
    global_ = "global"
    local = "local"


def diffmap_to_files(map_path: Path, model_path: Path, resolution: float, prefix: Path, *,
                     half_maps: tuple[Path, Path] | None = None, local_resolution: Path | None = None,
                     sigma: str = "global", scale_radius: float | None = None, fit_b: bool = False,
                     threshold: float = 3.0, n_peaks: int = 50, edge_margin: float = 2.0,
                     csv_out: Path | None = None, table: str = "electron", waters: bool = True,
                     hydrogens: bool = True) -> dict:
    """Read the map and model, compute the difference map and its peaks, write PREFIX_diff.mrc
    (σ units), PREFIX_diff_raw.mrc (map units), PREFIX_model_scaled.mrc, PREFIX.cxc, PREFIX.json
    (settings and the top peaks), PREFIX_peaks.png (`modelmap.plots.difference_figure`) and the
    peak CSV. Returns the JSON summary."""
    import numpy as np

    from .. import io as mio
    from ..analysis import difference_map, difference_peaks, write_analysis

    t0 = time.perf_counter()
    names = {n: prefix.parent / f"{prefix.name}_{n}.mrc" for n in ("diff", "diff_raw", "model_scaled")}
    inputs = (map_path, model_path, local_resolution, *(half_maps or ()))
    check_outputs(inputs, {**{f"the {n} map": p for n, p in names.items()},
                           "the JSON summary": prefix.parent / f"{prefix.name}.json",
                           "the ChimeraX script": prefix.parent / f"{prefix.name}.cxc",
                           "the peak plot": prefix.parent / f"{prefix.name}_peaks.png", "--csv": csv_out})
    density = mio.read_map(map_path)
    halves = None
    if half_maps is not None:
        h = [mio.read_map(p) for p in half_maps]
        for p, d in zip(half_maps, h):
            if not d.grid.same_as(density.grid):
                raise ValueError(f"the half map {p} is not on {map_path}'s grid ({d.grid} vs {density.grid})")
        halves = (h[0].data, h[1].data)
    model = mio.read_model(model_path, waters=waters, hydrogens=hydrogens, models="first")
    atoms = model.atoms
    if atoms.positions.ndim == 3:
        import jax

        atoms = jax.tree.map(lambda x: x[0], atoms)
    inside = np.asarray(density.grid.contains(atoms.positions))
    if not inside.any():
        raise ValueError(f"no atom of {model_path} lies inside {map_path}'s box: wrong model or map?")
    per_atom = resolution
    if local_resolution is not None:
        per_atom = atom_resolutions(model, False, local_resolution)
    r = difference_map(density.data, density.grid, atoms, per_atom, half_maps=halves, table=table,
                       sigma=sigma, scale_radius=scale_radius, fit_b=fit_b)
    pos = difference_peaks(r.normalised, density.grid, atoms, threshold=threshold, sign=1, max_peaks=n_peaks,
                           support=r.support, edge_margin=edge_margin)
    neg = difference_peaks(r.normalised, density.grid, atoms, threshold=threshold, sign=-1, max_peaks=n_peaks,
                           support=r.support, edge_margin=edge_margin)
    labels = model.labels
    summary = {
        "map": str(map_path), "model": str(model_path), "atoms": int(atoms.n_atoms),
        "atoms_inside_map": int(inside.sum()),
        **r.settings, "b_fit": r.b_fit,
        "half_maps": [str(p) for p in half_maps] if half_maps else None,
        "local_resolution": str(local_resolution) if local_resolution else None,
        "scale_percentiles_5_50_95": np.percentile(r.scale[r.support], [5, 50, 95]).tolist(),
        "threshold_sigma": threshold, "edge_margin": edge_margin,
        "n_positive_peaks": len(pos), "n_negative_peaks": len(neg),
        "positive_peaks": pos.rows(labels), "negative_peaks": neg.rows(labels),
    }
    if r.shell_weights is not None:
        s, fsc_half, w, d = r.shell_weights
        summary["shells"] = {"s": s, "fsc_half": fsc_half, "weight": w, "D": d}
    protect = tuple(p for p in inputs if p is not None)
    written = write_analysis(
        prefix, {"diff": r.normalised, "diff_raw": r.difference, "model_scaled": r.model_map}, density.grid, summary,
        model_path=model_path, show="diff", level=threshold,
        extra_commands=(f"volume #2 level {-threshold:g} color #d03030 level {threshold:g} color #30b030 style mesh",),
        protect=protect)
    from ..plots import difference_figure, save_png

    written["plot"] = save_png(
        difference_figure(np.asarray(r.normalised)[np.asarray(r.support)], summary["positive_peaks"],
                          summary["negative_peaks"], threshold=threshold),
        prefix.parent / f"{prefix.name}_peaks.png", protect=protect)
    if csv_out is not None:
        from ..io._atomic_write import atomic_path

        buf = io.StringIO()
        fields = ["sign", "rank", "x", "y", "z", "height", "nearest_atom", "nearest_label", "distance"]
        w_ = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w_.writeheader()
        for sign, peaks in (("+", pos), ("-", neg)):
            for row in peaks.rows(labels):
                w_.writerow({"sign": sign, **row})
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(csv_out, protect=protect) as tmp:
            tmp.write_text(buf.getvalue())
        written["csv"] = csv_out
    summary["written"] = {k: str(v) for k, v in written.items()}
    summary["seconds"] = time.perf_counter() - t0
    return summary


def diffmap(
    map: Annotated[Path, typer.Argument(help="Experimental map (MRC/CCP4, optionally .gz).")],
    model: Annotated[Path, typer.Argument(help="Model file: PDB or mmCIF, optionally .gz.")],
    resolution: Annotated[float, typer.Option("-d", "--resolution", help="Map resolution D in Å: the model map is the "
                                              "Fourier map cut at 1/D (each atom's own B) and the map is low-passed "
                                              "to D.", callback=_positive)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="PREFIX", help="Prefix of the outputs: "
                                                   "PREFIX_diff.mrc (σ units), PREFIX_diff_raw.mrc (map units), "
                                                   "PREFIX_model_scaled.mrc, PREFIX.cxc, PREFIX.json (default: "
                                                   "MODEL's name + _diffmap, beside the model).")] = None,
    half_maps: Annotated[Optional[tuple[Path, Path]], typer.Option("--half-maps", help="Two half maps on MAP's grid: "
                                                                   "shells weighted by FSC_full and the model's D per "
                                                                   "shell (σA-style).")] = None,
    local_resolution: Annotated[Optional[Path], typer.Option("--local-resolution", help="A local-resolution map (Å) "
                                                             "sampled at the atoms: each atom rendered at its own "
                                                             "resolution (shell decomposition, 1-10 Å).")] = None,
    sigma: Annotated[Sigma, typer.Option("--sigma", help="global: one σ over the map's support; local: σ(x) in a "
                                         "window twice the scale window's.")] = Sigma.global_,
    scale_radius: Annotated[Optional[float], typer.Option("--scale-radius", help="σ in Å of the Gaussian window of "
                                                          "the local scale fit (default max(2·D, 5 Å)).",
                                                          callback=_positive)] = None,
    fit_b: Annotated[bool, typer.Option("--fit-b", help="Also fit one B added to every atom's B (the map's blur).")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="Peaks and contours at ± this many σ.",
                                             callback=_positive)] = 3.0,
    peaks: Annotated[int, typer.Option("--peaks", min=0, help="List at most this many positive and negative peaks.")] = 50,
    edge_margin: Annotated[float, typer.Option("--edge-margin", help="Drop peaks closer than this (Å) to the edge of "
                                               "a masked / zoned map's support (cut neighbour density).")] = 2.0,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write the peak list as CSV.")] = None,
    table: Annotated[Table, typer.Option("--table", help="Scattering factors of the model map.")] = Table.electron,
    waters: Annotated[bool, typer.Option("--waters/--no-waters", help="Keep the model's waters.")] = True,
) -> None:
    """Difference map MAP − model map of MODEL, scaled by a smooth local least-squares fit (no
    boxes), in σ; positive peaks (density the model lacks) and negative ones (model without
    density), each with the nearest atom."""
    from .._errors import ModelmapError

    prefix = output or model.with_name(model_stem(model) + "_diffmap")
    try:
        s = diffmap_to_files(map, model, resolution, prefix, half_maps=half_maps, local_resolution=local_resolution,
                             sigma=sigma.value, scale_radius=scale_radius, fit_b=fit_b, threshold=threshold,
                             n_peaks=peaks, edge_margin=edge_margin, csv_out=csv_out, table=table.value,
                             waters=waters)
    except (ModelmapError, FileExistsError, ValueError, ImportError) as err:
        _fail(str(err))
    typer.echo(f"{map} − model map of {model} at {resolution:g} Å ({s['atoms_inside_map']} of {s['atoms']} atoms "
               f"inside the map), local scale in a {s['scale_radius']:.1f} Å window"
               + (f", B {s['b_fit']:+.1f} Å²" if fit_b else "") + f"; σ {s['sigma']}")
    typer.echo(f"  {s['n_positive_peaks']} peaks above +{threshold:g}σ, {s['n_negative_peaks']} below -{threshold:g}σ")
    for kind in ("positive_peaks", "negative_peaks"):
        for row in s[kind][:5]:
            near = f"{row.get('nearest_label', '?')} at {row['distance']:.2f} Å" if row["distance"] is not None else "-"
            typer.echo(f"    {row['height']:+6.1f}σ at ({row['x']:.2f}, {row['y']:.2f}, {row['z']:.2f}), nearest {near}")
    for what, path in s["written"].items():
        typer.echo(f"wrote {path}")
    typer.echo(f"took {s['seconds']:.1f} s")
