"""ChimeraX command scripts (.cxc) that show a model and its map together."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._atomic_write import atomic_path

# A protein occupies about 1.21 Å³ per dalton (Harpaz, Gerstein & Chothia 1994); with about 14 Da
# per non-hydrogen atom (its hydrogens included) that is about 17 Å³ per heavy atom.
_VOLUME_PER_HEAVY_ATOM = 17.0


def suggest_contour_level(data, voxel_volume: float, n_heavy_atoms: int) -> float:
    """Contour level that encloses about the model's molecular volume (17 Å³ per heavy atom).

    **Returns:** the map value above which `n_heavy_atoms · 17 Å³ / voxel_volume` voxels lie
    (clamped to the map's range).
    """
    values = np.sort(np.asarray(data, np.float64).ravel())[::-1]
    n = int(round(n_heavy_atoms * _VOLUME_PER_HEAVY_ATOM / voxel_volume))
    n = min(max(n, 1), values.size)
    return float(values[n - 1])


def write_chimerax_script(
    path: str | os.PathLike,
    model_path: str | os.PathLike | None,
    map_path: str | os.PathLike,
    level: float,
    *,
    extra_commands: tuple[str, ...] = (),
) -> Path:
    """Write a `.cxc` that opens the model and the map (paths relative to the script) at `level`.

    **Returns:** the path written.
    """
    path = Path(path)
    lines = ["# written by modelmap; open with ChimeraX: chimerax " + path.name]
    rel = lambda p: os.path.relpath(Path(p).resolve(), path.resolve().parent)  # noqa: E731
    if model_path is not None:
        lines.append(f'open "{rel(model_path)}"')
    lines.append(f'open "{rel(map_path)}"')
    vol = "#2" if model_path is not None else "#1"
    lines.append(f"volume {vol} level {level:.6g} style mesh color #3c8cdc")
    if model_path is not None:
        lines += ["style #1 stick", "color #1 byhetero", "view"]
    lines += list(extra_commands)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
