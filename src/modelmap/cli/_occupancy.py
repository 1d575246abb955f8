"""`modelmap occupancy`: local map scale (OccuPy's, from the map alone) and, with a model, fitted occupancies."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import _fail, _positive, check_outputs


def _choices(name: str, *values: str) -> type[enum.Enum]:
    """A str enum of `values` (what typer shows as the option's choices)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


ScaleMode = _choices("ScaleMode", "res", "occ")
Blur = _choices("Blur", "b", "res")
Groups = _choices("Groups", "residue", "atom")


def _gamma(value: float | None) -> float | None:
    if value is not None and not value > 1:
        raise typer.BadParameter(f"must be a number above 1, got {value}")
    return value


def occupancy(
    map_path: Annotated[Path, typer.Argument(metavar="MAP", help="The map (MRC/CCP4, .gz too).")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="A model (PDB/mmCIF): also fit its occupancies "
                                                   "and local resolution (or B) to the map, coordinates fixed.")] = None,
    resolution: Annotated[Optional[float], typer.Option("-d", "--resolution", help="The map's resolution in Å (needed "
                                                        "with --model; a floor for the default low-pass).",
                                                        callback=_positive)] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output prefix (default: MAP's name + "
                                                   "_occupancy beside it): PREFIX_scale.mrc, PREFIX_confidence.mrc, "
                                                   "modified maps, PREFIX.json, PREFIX.cxc, PREFIX_model.pdb/cif.")] = None,
    lowpass: Annotated[Optional[float], typer.Option("--lowpass", help="Low-pass in Å of the solvent model (default "
                                                     "max(8 Å, 3 voxels, -d)).", callback=_positive)] = None,
    mode: Annotated[ScaleMode, typer.Option("--mode", help="res: scale of the raw map (OccuPy's default, includes "
                                            "resolution); occ: of the low-passed map.")] = ScaleMode.res,
    amplify: Annotated[Optional[float], typer.Option("--amplify", help="Write a map amplified by scale^(1/γ-1) (γ > 1).",
                                                     callback=_gamma)] = None,
    attenuate: Annotated[Optional[float], typer.Option("--attenuate", help="Write a map attenuated by scale^(γ-1) "
                                                       "(γ > 1).", callback=_gamma)] = None,
    sigmoid: Annotated[Optional[float], typer.Option("--sigmoid", help="Write a sigmoid-modified map of this order "
                                                     "(> 1; needs --pivot).", callback=_gamma)] = None,
    pivot: Annotated[Optional[float], typer.Option("--pivot", help="The scale the sigmoid leaves unchanged, in (0, 1).")] = None,
    exclude_solvent: Annotated[bool, typer.Option("--exclude-solvent/--retain-solvent", help="Flatten solvent to 0 in "
                                                  "the modified maps.")] = False,
    blur: Annotated[Blur, typer.Option("--blur", help="With --model: fit one resolution per group (res; tells "
                                       "occupancy from resolution) or per-atom B (b; give -d the finest resolution) "
                                       "beside the occupancies.")] = Blur.res,
    groups: Annotated[Groups, typer.Option("--groups", help="With --model: one occupancy per residue or per atom.")] = Groups.residue,
    steps: Annotated[int, typer.Option("--steps", min=1, help="With --model: optimiser steps.")] = 60,
    absolute: Annotated[bool, typer.Option("--absolute/--relative", help="With --model: keep the fitted occupancies "
                                           "as they are instead of dividing by the largest.")] = False,
) -> None:
    """Local scale of MAP as OccuPy estimates it (scale, confidence and modified maps), and with --model
    the model's occupancies fitted to the map beside its local resolution, which tells occupancy from
    resolution (the map alone cannot)."""
    import numpy as np

    from .. import io
    from .._interpolate import interpolate_map
    from ..analysis import fit_occupancy, local_scale, modify_by_scale, solvent_figure, write_analysis
    from ..io._model import check_model_path
    from ..plots import save_png

    if sigmoid is not None and pivot is None:
        _fail("--sigmoid needs --pivot (the scale it leaves unchanged, in (0, 1))")
    if pivot is not None and not 0 < pivot < 1:
        _fail(f"--pivot must be in (0, 1), got {pivot}")
    if model is not None and resolution is None:
        _fail("--model needs the map's resolution: give -d D")
    prefix = output or map_path.with_name(map_path.name.split(".")[0] + "_occupancy")
    model_out = None
    if model is not None:
        suffix = ".cif" if model.name.lower().removesuffix(".gz").endswith(("cif", "mmcif")) else ".pdb"
        model_out = prefix.parent / f"{prefix.name}_model{suffix}"
    try:
        if model is not None:
            check_model_path(model)
        names = ["scale", "confidence"] + [n for n, g in (("amplified", amplify), ("attenuated", attenuate),
                                                          ("sigmoid", sigmoid)) if g is not None]
        outs = {n: prefix.parent / f"{prefix.name}_{n}.mrc" for n in names}
        plot = prefix.parent / f"{prefix.name}_solvent.png"
        outs |= {"json": prefix.parent / f"{prefix.name}.json", "cxc": prefix.parent / f"{prefix.name}.cxc",
                 "model": model_out, "plot": plot}
        check_outputs((map_path, model), outs)
        density = io.read_map(map_path)
        ls = local_scale(density.data, density.grid, lowpass=lowpass, resolution=resolution, mode=mode.value)
        maps = {"scale": np.asarray(ls.scale), "confidence": np.asarray(ls.confidence)}
        for name, how, g in (("amplified", "amplify", amplify), ("attenuated", "attenuate", attenuate),
                             ("sigmoid", "sigmoid", sigmoid)):
            if g is not None:
                maps[name] = np.asarray(modify_by_scale(density.data, ls, how, g, pivot=pivot,
                                                        exclude_solvent=exclude_solvent))
        summary = {"map": str(map_path), "local_scale": ls.summary(),
                   "modifications": {"amplify": amplify, "attenuate": attenuate, "sigmoid": sigmoid, "pivot": pivot,
                                     "exclude_solvent": exclude_solvent}}
        occ = at_atoms = None
        if model is not None:
            structure = io.read_model(model)
            fit = fit_occupancy(density, structure, resolution, blur=blur.value, groups=groups.value,
                                normalise=not absolute, max_steps=steps, progress=False)
            io.write_model(model_out, fit.model)
            occ = fit.occupancy
            at_atoms = np.asarray(interpolate_map(ls.scale, density.grid, structure.atoms.positions))
            summary["model"] = str(model)
            summary["occupancy_fit"] = fit.summary() | {
                "model_out": str(model_out),
                "cc_occupancy_vs_map_scale": float(np.corrcoef(occ, at_atoms)[0, 1])
                if np.ptp(occ) > 0 and np.ptp(at_atoms) > 0 else None}
        summary["plot"] = str(plot)
        # as OccuPy's script: the input map's surface coloured by the scale
        first = 2 if model_out is not None else 1
        colour = (f'open "{map_path.resolve()}"', f"volume #{first + 1} level {ls.full_scale * 0.5:.6g} style surface",
                  f"color sample #{first + 1} map #{first} palette red:white:blue range 0,1",
                  f"volume #{first} hide")
        written = write_analysis(prefix, maps, density.grid, summary, model_path=model_out, show="scale",
                                 level=0.5, extra_commands=colour, protect=(map_path, model))
        written["plot"] = save_png(solvent_figure(ls, occ, at_atoms), plot, protect=(map_path, model))
        if model_out is not None:
            written["model"] = model_out
    except (ValueError, FileExistsError, OSError) as err:
        _fail(str(err))
    typer.echo(f"scale: full scale {ls.full_scale:.4g} (tau {ls.tau:.4f}, {ls.kernel_voxels}-voxel kernel, low-pass "
               f"{ls.lowpass:.2f} Å); solvent peak {ls.solvent.mean:.4g} ± {ls.solvent.sigma:.4g}")
    if model is not None:
        s = summary["occupancy_fit"]
        typer.echo(f"occupancy: mean {s['occupancy_mean']:.3f} (min {s['occupancy_min']:.3f}) over {s['atoms']} atoms, "
                   f"{s['steps']} steps; model written to {model_out}")
    for name, path in written.items():
        typer.echo(f"wrote {path}")
