"""`modelmap locres`: local resolution from two half maps, or from a map against a model (issue 20)."""

from __future__ import annotations

import enum
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import _fail, _positive, check_outputs


class Kernel(str, enum.Enum):
    sphere = "sphere"
    gaussian = "gaussian"


def _histogram(values, atoms, d_global: float, threshold: float):
    """Histogram of the local resolution inside the mask (and at the atoms)."""
    import numpy as np

    from ..plots._save import new_figure

    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(np.min(values)), float(np.quantile(values, 0.995))
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    ax.hist(np.clip(values, lo, hi), bins=bins, density=True, color="#3c8cdc", alpha=0.8,
            label=f"voxels in the mask ({values.size})")
    if atoms is not None:
        ax.hist(np.clip(atoms, lo, hi), bins=bins, density=True, histtype="step", color="#d2503c", lw=1.5,
                label=f"atoms ({atoms.size})")
    if np.isfinite(d_global):
        ax.axvline(d_global, color="k", ls="--", lw=1, label=f"global FSC={threshold:g}: {d_global:.2f} Å")
    ax.axvline(float(np.median(values)), color="#3c8cdc", ls=":", lw=1.5, label=f"median {np.median(values):.2f} Å")
    ax.set_xlabel("local resolution (Å)")
    ax.set_ylabel("fraction per Å (the last bin holds the top 0.5 %)")
    ax.legend(fontsize=8)
    return fig


def _atom_mask(positions, grid, radius: float):
    """Voxels within `radius` Å of an atom (atoms splatted to their nearest voxel, then a sphere)."""
    import jax.numpy as jnp
    import numpy as np

    from ..analysis import local_mean, window_transfer

    pos = np.asarray(positions, np.float64).reshape(-1, 3)
    ijk = np.rint((pos - np.asarray(grid.origin)) / np.asarray(grid.voxel_size)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.shape[::-1])), axis=1)
    points = np.zeros(grid.shape, np.float32)
    np.add.at(points, (ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]), 1.0)
    return np.asarray(local_mean(jnp.asarray(points), window_transfer(grid, radius, "sphere"))) > 1e-6


def locres(
    half1: Annotated[Path, typer.Argument(help="First half map (MRC), or the full map with --model and no HALF2.")],
    half2: Annotated[Optional[Path], typer.Argument(help="Second half map, on the same grid. Leave out for the map "
                                                    "against the model (--model).")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Model (PDB/mmCIF): with two half maps, the per-atom "
                                                  "resolutions are sampled at its atoms and it gives the mask; with one "
                                                  "map, the map is compared with this model's map (FSC 0.5).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output prefix: PREFIX_resolution.mrc, "
                                                   "PREFIX_mask.mrc, PREFIX.json, PREFIX.cxc, PREFIX_histogram.png "
                                                   "and with --model PREFIX_atoms.cif/.pdb + PREFIX_atoms.csv "
                                                   "(default: HALF1's name + _locres).")] = None,
    d_min: Annotated[Optional[float], typer.Option("--d-min", help="Finest resolution examined, Å (default: Nyquist, "
                                                   "2 × voxel size).", callback=_positive)] = None,
    n_shells: Annotated[int, typer.Option("--shells", min=2, max=200, help="Resolution shells between s = 0 and "
                                          "1/d_min (20, as cctbx).")] = 20,
    radius: Annotated[Optional[float], typer.Option("--radius", help="Correlation window radius, Å (default: the global "
                                                    "FSC resolution, as cctbx).", callback=_positive)] = None,
    kernel: Annotated[Kernel, typer.Option("--kernel", help="Window: sphere (cctbx's top-hat) or gaussian "
                                           "(radius = σ).")] = Kernel.sphere,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="Mask map (values > 0.5 inside) on the same grid; "
                                                 "default: within 3 Å of the model's atoms, else the smoothed "
                                                 "map above its mean + 1 sd.")] = None,
    model_b: Annotated[Optional[float], typer.Option("--model-b", help="Map vs model: render every atom with this B "
                                                     "(Å²) instead of its own.", callback=_positive)] = None,
) -> None:
    """Local resolution: per voxel, where the local correlation of two maps falls below the threshold
    (0.143 for half maps, 0.5 for a map against a model map), from shell-wise local correlations
    (cctbx's local_resolution_map, in JAX).

    Voxels outside the mask are given the global FSC resolution (the JSON says so: outside_mask =
    "global"). With --model, the per-atom resolutions (clipped to the shell tables' 1-10 Å) are
    written in the B-factor column of PREFIX_atoms and in PREFIX_atoms.csv, ready for
    `modelmap render --method shells --resolution-from-b` and refinement."""
    import numpy as np

    from .. import io
    from ..analysis import (
        atom_local_resolution,
        density_mask,
        local_resolution,
        local_resolution_model,
        write_analysis,
    )
    from ..plots import save_png

    if half2 is None and model is None:
        _fail("give two half maps, or one map and --model (map against the model)")
    kernel = kernel.value
    prefix = output or half1.with_name(half1.name.split(".")[0] + "_locres")
    # the per-atom model is written in the input's format (PDB stays PDB, anything else mmCIF)
    is_pdb = model is not None and model.name.lower().removesuffix(".gz").endswith((".pdb", ".ent"))
    model_ext = ".pdb" if is_pdb else ".cif"
    names = ["resolution", "mask"]
    outs = {f"-o ({n})": prefix.parent / f"{prefix.name}_{n}.mrc" for n in names}
    outs.update({"-o (json)": prefix.parent / f"{prefix.name}.json", "-o (cxc)": prefix.parent / f"{prefix.name}.cxc",
                 "-o (histogram)": prefix.parent / f"{prefix.name}_histogram.png"})
    if model is not None:
        outs["-o (atoms)"] = prefix.parent / f"{prefix.name}_atoms{model_ext}"
        outs["-o (csv)"] = prefix.parent / f"{prefix.name}_atoms.csv"
    inputs = (half1, half2, model, mask)
    check_outputs(inputs, outs)
    protect = tuple(p for p in inputs if p is not None)
    try:
        m1 = io.read_map(half1)
        grid = m1.grid
        atoms_model = io.read_model(model) if model is not None else None
        if atoms_model is not None and np.ndim(atoms_model.atoms.positions) != 2:
            raise ValueError(f"{model} holds {np.shape(atoms_model.atoms.positions)[0]} models; locres takes one "
                             "(write the member you want to its own file)")
        t0 = time.perf_counter()
        if half2 is not None:
            m2 = io.read_map(half2)
            if not m2.grid.same_as(grid):
                raise ValueError(f"{half1} and {half2} are not on the same grid: {grid} vs {m2.grid}")
            mode = "half maps"
            lr = local_resolution(m1.data, m2.data, grid, d_min=d_min, n_shells=n_shells, radius=radius, kernel=kernel)
            density = 0.5 * (np.asarray(m1.data) + np.asarray(m2.data))
        else:
            import equinox as eqx
            import jax.numpy as jnp

            from ..render import render_model

            mode = "map vs model"
            atoms = atoms_model.atoms
            if model_b is not None:
                atoms = eqx.tree_at(lambda a: a.b_factors, atoms, jnp.full_like(atoms.b_factors, model_b))
            model_map = render_model(atoms, grid, 0.0, sampling="point")
            lr = local_resolution_model(m1.data, model_map, grid, d_min=d_min, n_shells=n_shells, radius=radius,
                                        kernel=kernel)
            density = np.asarray(m1.data)
        seconds = time.perf_counter() - t0
        if mask is not None:
            mm_ = io.read_map(mask)
            if not mm_.grid.same_as(grid):
                raise ValueError(f"the mask {mask} is not on the maps' grid: {mm_.grid} vs {grid}")
            inside = np.asarray(mm_.data) > 0.5
            mask_rule = f"{mask} > 0.5"
        elif atoms_model is not None:
            inside = _atom_mask(atoms_model.atoms.positions, grid, 3.0)
            mask_rule = "within 3 Å of an atom"
        else:
            inside = density_mask(density, grid, lr.radius)
            mask_rule = f"the map smoothed (Gaussian σ {lr.radius:.3g} Å) above its mean + 1 sd"
        if not inside.any():
            raise ValueError(f"the mask ({mask_rule}) is empty")
        res = np.asarray(lr.resolution, np.float32)
        if atoms_model is not None:
            atom_values, flag = atom_local_resolution(res, grid, atoms_model.atoms.positions)
    except (ValueError, OSError) as err:
        _fail(str(err))

    fill = float(np.clip(lr.global_resolution, lr.d_min, lr.d_max))
    values = res[inside]
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    summary = {
        "mode": mode, "inputs": [str(p) for p in inputs if p is not None], **lr.settings(),
        "median_A": float(q[2]), "quantiles_A": {"5": q[0], "25": q[1], "50": q[2], "75": q[3], "95": q[4]},
        "mask": mask_rule, "mask_voxels": int(inside.sum()),
        "outside_mask": "global", "outside_value_A": fill,
        "fraction_at_low_limit": float(lr.low_limit[inside].mean()),
        "fraction_at_high_limit": float(lr.high_limit[inside].mean()),
        "seconds": seconds,
    }
    if atoms_model is None:
        atom_values = None
    else:
        summary["atoms"] = {"n": int(atom_values.size), "median": float(np.median(atom_values)),
                            "clipped_low": int((flag == 1).sum()), "clipped_high": int((flag == 2).sum()),
                            "outside_box": int((flag == 3).sum()), "range_A": [1.0, 10.0]}
    written_map = np.where(inside, res, np.float32(fill)).astype(np.float32)
    lo_c, hi_c = (float(v) for v in np.quantile(values, [0.02, 0.98]))
    nmod = 1 if model is not None else 0
    res_id, dens_id = f"#{1 + nmod}", f"#{2 + nmod}"
    cxc_dir = prefix.parent.resolve()
    dens_path = os.path.relpath(Path(half1).resolve(), cxc_dir)
    level = float(np.mean(density[inside]) + 1.0 * np.std(density[inside]))
    extra = (f'open "{dens_path}"', f"volume {dens_id} level {level:.6g} style surface",
             f"color sample {dens_id} map {res_id} palette blue:cyan:green:yellow:red range {lo_c:.3g},{hi_c:.3g}",
             f"volume {res_id} hide", f"key blue:{lo_c:.3g} cyan: green: yellow: red:{hi_c:.3g}")
    try:
        # the .cxc opens (the model), the resolution map, then the density coloured by the resolution
        written = write_analysis(prefix, {"resolution": written_map, "mask": inside.astype(np.float32)}, grid,
                                 summary, model_path=model, show="resolution", level=fill, extra_commands=extra,
                                 protect=protect)
        save_png(_histogram(values, atom_values, lr.global_resolution, lr.threshold),
                 outs["-o (histogram)"], protect=protect)
        if atoms_model is not None:
            import dataclasses

            import equinox as eqx
            import jax.numpy as jnp

            from ..io import write_model

            with_b = eqx.tree_at(lambda a: a.b_factors, atoms_model.atoms, jnp.asarray(atom_values))
            write_model(outs["-o (atoms)"], dataclasses.replace(atoms_model, atoms=with_b))
            lab = atoms_model.labels
            lines = ["chain,residue,atom,resolution,flag"]
            lines += [f"{lab.chain[i]},{lab.residue_number[i]}{lab.insertion_code[i].strip()},{lab.atom_name[i]},"
                      f"{atom_values[i]:.4f},{int(flag[i])}" for i in range(atom_values.size)]
            from ..io._atomic_write import atomic_path

            with atomic_path(outs["-o (csv)"], protect=protect) as tmp:
                tmp.write_text("\n".join(lines) + "\n")
    except (ValueError, OSError) as err:
        _fail(str(err))
    typer.echo(f"local resolution ({mode}, FSC {lr.threshold:g}, {lr.shells.size} shells, window {lr.kernel} "
               f"{lr.radius:.2f} Å): median {q[2]:.2f} Å (5-95 %: {q[0]:.2f}-{q[4]:.2f} Å) in the mask; global "
               f"{lr.global_resolution:.2f} Å; {seconds:.1f} s")
    if atom_values is not None:
        typer.echo(f"atoms: median {np.median(atom_values):.2f} Å, written to {outs['-o (atoms)']} (B column) and "
                   f"{outs['-o (csv)']}")
    typer.echo(f"wrote {written['resolution']}, {written['json']}, {written['cxc']}")

