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


def _atom_spec(labels, i: int) -> str:
    icode = labels.insertion_code[i].strip()
    return f"/{labels.chain[i]}:{labels.residue_number[i]}{icode}@{labels.atom_name[i]}"


def write_attribute_file(path: str | os.PathLike, labels, values, attribute: str) -> Path:
    """Write a ChimeraX attribute-assignment file (`.defattr`) giving atoms a float attribute.

    Atoms whose value is NaN (e.g. hydrogens, which have no Q-score) are left out, so ChimeraX
    leaves them without the attribute (`color byattribute ... noValueColor` colours them).

    **Arguments:**

    - `path`: the `.defattr` file to write (atomically).
    - `labels`: `AtomLabels` of the model (chain, residue number, insertion code, atom name).
    - `values`: `(n,)` one value per atom.
    - `attribute`: the attribute's name (letters, digits, underscores; not starting with a digit).

    **Returns:** the path written.
    """
    if not attribute.replace("_", "a").isalnum() or attribute[0].isdigit():
        raise ValueError(f"{attribute!r} is not a valid ChimeraX attribute name")
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size != len(labels):
        raise ValueError(f"{values.size} values for {len(labels)} atoms")
    path = Path(path)
    # "any": atoms with alternate locations share one spec in ChimeraX
    lines = ["# written by modelmap", f"attribute: {attribute}", "match mode: any", "recipient: atoms"]
    lines += [f"\t{_atom_spec(labels, i)}\t{v:.4f}" for i, v in enumerate(values) if np.isfinite(v)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
