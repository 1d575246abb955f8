"""Writing an analysis's results: maps on the input's grid, a ChimeraX script and a JSON summary.

Every `modelmap` analysis command writes its outputs through `write_analysis`, so that they look alike:
`PREFIX_<name>.mrc` for each map (the input's grid and origin), `PREFIX.cxc` that opens them,
`PREFIX.json` with the summary; every file is written atomically and input files are never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._grid import Grid
from ..io._atomic_write import atomic_path
from ..io._chimerax import write_chimerax_script
from ..io._map import write_map


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_analysis(
    prefix: str | os.PathLike,
    maps: dict[str, np.ndarray],
    grid: Grid,
    summary: dict,
    *,
    model_path: str | os.PathLike | None = None,
    show: str | None = None,
    level: float | None = None,
    extra_commands: tuple[str, ...] = (),
    protect: tuple = (),
) -> dict[str, Path]:
    """Write `PREFIX_<name>.mrc` for every map, `PREFIX.json` (the summary) and `PREFIX.cxc`.

    **Arguments:**

    - `prefix`: path prefix of the outputs (its folder is created).
    - `maps`: name → `(nz, ny, nx)` array on `grid`.
    - `grid`: the input map's grid (origin kept).
    - `summary`: JSON-serialisable numbers and settings (numpy scalars and arrays are converted).
    - `model_path`: a model to open in the `.cxc` beside the map named `show`.
    - `show`: which map the `.cxc` opens (default: the first); `level` its contour level (default:
      the map's mean + 3σ).
    - `protect`: input files that must never be overwritten.

    **Returns:** name → path of everything written (`"json"` and `"cxc"` included).
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, data in maps.items():
        written[name] = write_map(prefix.parent / f"{prefix.name}_{name}.mrc", np.asarray(data, np.float32), grid,
                                  protect=protect)
    json_path = prefix.parent / f"{prefix.name}.json"
    with atomic_path(json_path, protect=protect) as tmp:
        tmp.write_text(json.dumps(_jsonable({**summary, "outputs": {k: str(v) for k, v in written.items()}}),
                                  indent=2) + "\n")
    written["json"] = json_path
    if maps:
        show = show or next(iter(maps))
        data = np.asarray(maps[show], np.float64)
        if level is None:
            level = float(data.mean() + 3.0 * data.std())
        written["cxc"] = write_chimerax_script(prefix.parent / f"{prefix.name}.cxc", model_path, written[show], level,
                                               extra_commands=extra_commands)
    return written
