"""`modelmap sharpen`: global Guinier B sharpening and, with a model, local amplitude scaling (issue 20)."""

from __future__ import annotations

import enum
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import _fail, _not_negative, _positive, check_outputs


# the model map (model's B) may fall off this much faster than the map (Guinier B, Å²) before a warning
MODEL_B_EXCESS = 30.0


class ModelB(str, enum.Enum):
    model = "model"
    zero = "zero"


def _map_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".mrc", ".map", ".ccp4"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def sharpen_to_files(
    map_path: Path,
    resolution: float,
    prefix: Path,
    *,
    model_path: Path | None = None,
    b: float | None = None,
    d_low: float = 10.0,
    window: float | None = None,
    n_bands: int | None = None,
    model_b: str = "model",
    model_floor: float = 0.0,
    scores: bool = True,
) -> dict:
    """Sharpen a map and write `PREFIX_global.mrc` (and `PREFIX_local.mrc` with a model), `PREFIX.cxc`,
    `PREFIX.json` and the Guinier plot `PREFIX_guinier.png`.

    **Arguments:**

    - `map_path`: the map; `resolution`: its resolution D (Å).
    - `prefix`: output path prefix.
    - `model_path`: a model: adds the local amplitude scaling, makes the global B the map's Guinier B
      minus that of the model map at B = 0 (so the global map falls off like the model, not flat), and
      adds CC_mask / mean Q of each map (against the model map at B = 0, D) to the summary.
    - `b`: the B (Å²) to remove globally instead of the fitted one.
    - `d_low`: the low-resolution end of the Guinier fit (Å).
    - `window`, `n_bands`, `model_floor`: of `local_amplitude_scale`.
    - `model_b`: the model map of the local scaling with the model's B (`"model"`) or B = 0 (`"zero"`).
    - `scores`: score every map against the model (needs `model_path`).

    **Returns:** the summary written to the JSON (with `"outputs"`).
    """
    import jax.numpy as jnp
    import numpy as np

    from .. import io
    from ..analysis import amplitude_profile, default_window, guinier_b, local_amplitude_scale, sharpen, write_analysis
    from ..plots import guinier_figure, save_png

    t0 = time.perf_counter()
    prefix = Path(prefix)
    names = ["global"] + (["local"] if model_path is not None else [])
    outputs = {f"the {n} map": prefix.parent / f"{prefix.name}_{n}.mrc" for n in names}
    outputs.update({"the JSON summary": prefix.parent / f"{prefix.name}.json",
                    "the ChimeraX script": prefix.parent / f"{prefix.name}.cxc",
                    "the Guinier plot": prefix.parent / f"{prefix.name}_guinier.png"})
    inputs = (map_path, model_path)
    check_outputs(inputs, outputs)
    density = io.read_map(map_path)
    grid = density.grid
    data = np.asarray(density.data, np.float32)
    fit = guinier_b(data, grid, resolution, d_low)
    summary: dict = {
        "map": str(map_path), "model": None if model_path is None else str(model_path), "resolution": resolution,
        "guinier": {"b": fit.b, "intercept": fit.intercept, "d_low": fit.d_low, "d_high": fit.d_high,
                    "rms_residual": fit.rms, "shells_used": int(fit.used.sum())},
    }
    maps, curves, b_applied, b_from = {}, {}, fit.b, "the Guinier fit (the whole B: flat amplitudes)"
    if model_path is not None:
        from ..render import render_model

        model = io.read_model(model_path)
        atoms = model.atoms
        if atoms.positions.ndim == 3:
            raise ValueError(f"{model_path} holds {atoms.positions.shape[0]} models; sharpen uses one: keep one model")
        inside = grid.contains(atoms.positions)
        if not inside.any():
            raise ValueError(f"no atom of {model_path} lies inside the map's box (origin {grid.origin}, "
                             f"extent {grid.extent} Å): is the map's origin right?")
        zero_b = type(atoms)(atoms.positions, atoms.atomic_numbers, np.zeros_like(atoms.b_factors), atoms.occupancies)
        model_zero = np.asarray(render_model(zero_b, grid, resolution, method="fourier", sampling="point"))
        fit_zero = guinier_b(model_zero, grid, resolution, d_low)
        b_applied, b_from = fit.b - fit_zero.b, "the Guinier fit relative to the model map at B = 0"
        summary["model_map"] = {"guinier_b_at_b0": fit_zero.b, "relative_b": fit.b - fit_zero.b,
                                "atoms_inside": int(inside.sum()), "atoms": int(inside.size)}
        if model_b == "zero":
            reference = model_zero
        else:
            reference = np.asarray(render_model(atoms, grid, resolution, method="fourier", sampling="point"))
            b_model = guinier_b(reference, grid, resolution, d_low).b
            summary["model_map"]["guinier_b_with_model_b"] = b_model
            if b_model > fit.b + MODEL_B_EXCESS:
                warnings.warn(f"the model map with the model's B falls off faster than the map (Guinier B {b_model:.0f} "
                              f"vs {fit.b:.0f} Å²): the local scaling will blur the map (was it sharpened already?); "
                              "refine B against this map, or use --model-b zero", stacklevel=2)
        maps["local"] = np.asarray(local_amplitude_scale(data, grid, reference, resolution, window=window,
                                                         n_bands=n_bands, model_floor=model_floor))
        summary["local"] = {"window": window if window is not None else default_window(grid, resolution),
                            "n_bands": n_bands if n_bands is not None else 8, "model_b": model_b,
                            "model_floor": model_floor}
        curves["local"] = amplitude_profile(maps["local"], grid)
        curves["model map, B = 0"] = amplitude_profile(model_zero, grid)
    if b is not None:
        b_applied, b_from = float(b), "--b"
    maps = {"global": np.asarray(sharpen(data, grid, b_applied, resolution)), **maps}
    curves = {f"global (B = {b_applied:.1f} Å²)": amplitude_profile(maps["global"], grid), **curves}
    summary["global"] = {"b_applied": b_applied, "from": b_from}
    if model_path is not None:
        from ..scores import map_model_cc, q_score

        if scores:
            summary["scores"] = {}
            summary["scores_note"] = (f"CC_mask against the model map at B = 0 and {resolution:g} Å (Fourier map); "
                                      "mean Q-score (MapQ, sigma 0.6) of the model in each map")
            for name, m in (("original", data), *maps.items()):
                dm = io.DensityMap(jnp.asarray(m, jnp.float32), grid)
                cc = map_model_cc(dm, atoms, resolution, model_map=model_zero)
                q = q_score(dm, model)
                summary["scores"][name] = {"cc_mask": cc.cc_mask, "cc_box": cc.cc_box,
                                           "q_mean": float(np.nanmean(np.asarray(q.q)))}
    fig = guinier_figure(fit, curves, resolution=resolution)
    summary["plot"] = str(outputs["the Guinier plot"])
    summary["seconds"] = time.perf_counter() - t0
    written = write_analysis(prefix, maps, grid, summary, model_path=model_path,
                             show="local" if "local" in maps else "global", protect=tuple(p for p in inputs if p))
    written["guinier"] = save_png(fig, outputs["the Guinier plot"], protect=tuple(p for p in inputs if p))
    summary["outputs"] = {k: str(v) for k, v in written.items()}
    return summary


def sharpen(
    map: Annotated[Path, typer.Argument(help="Experimental map (MRC/CCP4, optionally .gz).")],
    resolution: Annotated[float, typer.Option("-d", "--resolution", help="The map's resolution D in Å (e.g. its "
                                              "FSC 0.143 resolution): the Guinier fit ends there and the sharpened "
                                              "maps are low-passed there.", callback=_positive)],
    model: Annotated[Optional[Path], typer.Option("--model", help="Atomic model (PDB/mmCIF) in the map: adds the "
                                                  "local amplitude scaling (LocScale's idea) and scores every map "
                                                  "(CC_mask against the model map at B = 0, mean Q).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="PREFIX", help="Output prefix: "
                                                   "PREFIX_global.mrc, PREFIX_local.mrc, PREFIX.json, PREFIX.cxc, "
                                                   "PREFIX_guinier.png (default: MAP's name + _sharpen beside it).")] = None,
    b: Annotated[Optional[float], typer.Option("--b", help="Remove this B (Å²) globally instead of the Guinier "
                                               "fit's (negative blurs).")] = None,
    d_low: Annotated[float, typer.Option("--d-low", help="Low-resolution end of the Guinier fit in Å.",
                                         callback=_positive)] = 10.0,
    window: Annotated[Optional[float], typer.Option("--window", help="Local scaling: σ of the Gaussian window in Å "
                                                    "(default D, at least 2 voxels).", callback=_positive)] = None,
    bands: Annotated[Optional[int], typer.Option("--bands", min=1, help="Local scaling: frequency bands up to 1/D "
                                                 "(default 8).")] = None,
    model_b: Annotated[ModelB, typer.Option("--model-b", help="Local scaling: the model map with the model's B "
                                            "(LocScale's advice: refined B) or B = 0 (as sharp as the model).")] = ModelB.model,
    model_floor: Annotated[float, typer.Option("--model-floor", help="Local scaling: fraction of each band's mean "
                                               "model power added everywhere, so density the model lacks is kept "
                                               "in part (0: LocScale, scaled towards 0).", callback=_not_negative)] = 0.0,
    scores: Annotated[bool, typer.Option("--scores/--no-scores", help="With --model: CC and Q of the original and "
                                         "sharpened maps in the JSON.")] = True,
) -> None:
    """Sharpen MAP: a global B from its Guinier plot (ln|F| against s², 10 Å to D), removed and the map
    low-passed at D (with --model the B relative to the model map at B = 0); with --model also the
    model-based local amplitude scaling (LocScale's idea). Writes MRC maps on MAP's grid, a .cxc, a
    JSON summary (B, CC_mask and Q of every map) and a Guinier plot."""
    from .._errors import ModelmapError

    prefix = output if output is not None else map.with_name(_map_stem(map) + "_sharpen")
    try:
        s = sharpen_to_files(map, resolution, prefix, model_path=model, b=b, d_low=d_low, window=window,
                             n_bands=bands, model_b=model_b.value, model_floor=model_floor,
                             scores=scores)
    except (ModelmapError, FileExistsError, ValueError, ImportError) as err:
        _fail(str(err))
    g = s["guinier"]
    typer.echo(f"{map} at {resolution:g} Å: Guinier B {g['b']:.1f} Å² ({g['d_low']:g}-{g['d_high']:g} Å, "
               f"{g['shells_used']} shells, rms residual {g['rms_residual']:.3f})")
    typer.echo(f"  global map: removed B {s['global']['b_applied']:.1f} Å² ({s['global']['from']})")
    if "model_map" in s:
        typer.echo(f"  model map at B = 0: Guinier B {s['model_map']['guinier_b_at_b0']:.1f} Å²; the map's B relative "
                   f"to it {s['model_map']['relative_b']:.1f} Å²")
    for name, sc in s.get("scores", {}).items():
        typer.echo(f"  {name:<9} CC_mask {sc['cc_mask']:.4f}  mean Q {sc['q_mean']:.4f}")
    for key, path in s["outputs"].items():
        typer.echo(f"wrote {path}")
    typer.echo(f"took {s['seconds']:.1f} s")
