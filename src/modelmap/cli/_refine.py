"""`modelmap refine`: refine a model against a map and report before and after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["refine_to_files", "before_after"]


def before_after(density, model, resolution: float, restraints) -> dict:
    """CC_mask (phenix.map_model_cc's), mean Q (MapQ, σ 0.6), bond / angle rmsd and clashes
    (heavy-atom contacts under 2.2 Å, not bonded or 1-3) of `model`."""
    from ..scores import map_model_cc, q_score

    cc = map_model_cc(density, model, resolution)
    q = q_score(density, model)
    from ..refine import clashes

    pos = np.asarray(model.atoms.positions)
    geo = restraints.summary(pos) if restraints is not None else {}
    bonds = None if restraints is None else np.asarray(restraints.bond_index)
    return {
        "cc_mask": float(cc.cc_mask),
        "cc_box": float(cc.cc_box),
        "q_mean": float(q.mean()),
        "bond_rmsd": float(geo.get("bond_rmsd", float("nan"))),
        "angle_rmsd": float(geo.get("angle_rmsd", float("nan"))),
        "clashes": int(len(clashes(pos, np.asarray(model.atoms.atomic_numbers), bonds, np.asarray(model.labels.altloc)))),
    }


def attribute_paths(output: Path) -> tuple[Path, Path]:
    """The ChimeraX attribute files written beside a refined model: shifts and resolutions."""
    from ._app import model_stem

    stem = model_stem(Path(output))
    return Path(output).with_name(stem + "_shift.defattr"), Path(output).with_name(stem + "_resolution.defattr")


def refine_to_files(
    map_path: Path,
    model_path: Path,
    resolution: float,
    output: Path,
    *,
    parameters: tuple[str, ...] = ("xyz", "b"),
    max_steps: int = 200,
    macro_cycles: int = 3,
    loss: str = "ls",
    monomer_library: Path | None = None,
    map_weight: float | str = "auto",
    occupancy_groups: str = "atom",
    resolution_groups: str = "atom",
    resolutions: str | float | None = None,
    local_resolution: Path | None = None,
    json_out: Path | None = None,
    cxc_out: Path | None = None,
    progress: bool = True,
    plot: Path | None = None,
) -> dict:
    """Refine `model_path` against `map_path`, write the refined model to `output`, and optionally a
    JSON report (before/after scores, the history), a ChimeraX script and the refinement plot
    (`modelmap.plots.write_refine_plots` with prefix `plot`).

    `local_resolution`: a local-resolution map (Å) sampled at the atoms (trilinear) for their
    resolutions, in place of `resolutions`: the model map is then the shell map at them, and with
    `"res"` they are where the refinement starts. An atom outside the map's box or a value outside
    [1, 10] Å is an error.

    The refined model keeps every record of the input; per-atom resolutions (with `"res"`, or from
    `local_resolution`) are
    written beside it as a ChimeraX attribute file `<output stem>_resolution.defattr` (attribute
    `resolution`, Å), and the shift of every atom as `<output stem>_shift.defattr`.

    **Returns:** a dict with `before`, `after`, `result`, `n_steps`, `time`, `map_weight` and the
    paths written.
    """
    from .. import io
    from ..io._atomic_write import atomic_path
    from ..io._model import check_model_path
    from ..refine import RefineConfig, build_restraints, refine
    from ._app import atom_resolutions, check_outputs

    inputs = (map_path, model_path) + ((local_resolution,) if local_resolution is not None else ())
    shift_path, res_path = attribute_paths(output)
    per_atom = "res" in parameters or local_resolution is not None
    check_outputs(inputs, {"the refined model (-o)": output, "--json": json_out, "--cxc": cxc_out,
                           "the shift attribute file": shift_path,
                           "the resolution attribute file": res_path if per_atom else None})
    check_model_path(output)
    density = io.read_map(map_path)
    model = io.read_model(model_path)
    if model.is_ensemble:
        raise ValueError(f"{model_path} has {model.atoms.positions.shape[0]} models; refine one (the first: split the file)")
    if local_resolution is not None:
        resolutions = atom_resolutions(model, False, local_resolution)
    restraints = build_restraints(model, monomer_library=monomer_library)
    before = before_after(density, model, resolution, restraints)
    result = refine(model, density, resolution, RefineConfig(
        parameters=parameters, max_steps=max_steps, macro_cycles=macro_cycles, loss=loss, map_weight=map_weight),
        restraints=restraints, occupancy_groups=occupancy_groups, resolution_groups=resolution_groups,
        resolutions=resolutions, progress=progress)
    refined = result.model
    after = before_after(density, refined, resolution, restraints)
    written = {"model": str(io.write_model(output, refined))}
    shift = np.linalg.norm(np.asarray(refined.atoms.positions, np.float64) - np.asarray(model.atoms.positions, np.float64),
                           axis=-1)
    io.write_attribute_file(shift_path, refined.labels, shift, "shift")
    written["shift_attributes"] = str(shift_path)
    if result.resolution is not None:
        io.write_attribute_file(res_path, refined.labels, result.resolution, "resolution")
        written["resolution_attributes"] = str(res_path)
    h = result.history
    summary = {
        "map": str(map_path), "model": str(model_path), "resolution": resolution,
        "parameters": list(parameters), "loss": loss, "occupancy_groups": occupancy_groups,
        "resolution_groups": resolution_groups, "resolution_start": (str(local_resolution) if local_resolution is not None
                             else "scan" if "res" in parameters and resolutions in (None, "scan") else "uniform"),
        "result": result.result, "n_steps": result.n_steps, "n_evaluations": result.n_evaluations,
        "map_weight": result.map_weight, "time": result.time, "before": before, "after": after,
        "geometry": result.geometry, "events": result.events, "monomer_library": result.monomer_library,
        "written": written,
    }
    payload = {**summary, "history": {k: [None if not np.isfinite(v) else float(v) for v in h[k]] for k in h}}
    if json_out is not None:
        if result.resolution is not None:
            payload["resolutions"] = [float(v) for v in result.resolution]
        with atomic_path(json_out, protect=inputs) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))
        written["json"] = str(json_out)
    if plot is not None:
        from ..plots import write_refine_plots

        written["plot"] = str(write_refine_plots(payload, plot, protect=inputs)["refine"])
    if cxc_out is not None:
        level = io.suggest_contour_level(density.data, density.grid.voxel_volume, refined.n_atoms)
        extra = [
            f'open "{Path(model_path).resolve()}"',
            "color #3 gray; style #3 stick; transparency #3 50 target a",
            f'open "{shift_path.name}"',
            "color byattribute a:shift #1 palette 0,white:0.5,orange:1.5,red noValueColor gray",
            "key white:0 orange:0.5 red:1.5 pos 0.85,0.1 size 0.03,0.3",
            "# or by the refined B: color bfactor #1 palette blue:white:red",
        ]
        if result.resolution is not None:
            extra.append(f'open "{Path(written["resolution_attributes"]).name}"')
        io.write_chimerax_script(cxc_out, output, map_path, level, extra_commands=tuple(extra))
        written["cxc"] = str(cxc_out)
    return summary
