"""Rows of the PDB Chemical Component Dictionary (CCD) that the restraint library reads.

The CCD subset that biotite ships (`biotite.structure.info`, `components.bcif`) is the source of
residue topology and ideal coordinates (`modelmap.refine._library`). Reading it is slow the first
time in a process: biotite deserialises whole columns of `chem_comp_atom` (2.3 million rows),
about 5 s on a 2-core CPU, before the first component. So the rows of the components nearly every
model has (the standard amino acids, MSE, the eight standard nucleotides, water) are shipped
beside this module in `_ccd_standard.json`, written from biotite's CCD by
`python -m modelmap.refine._ccd` (the file records biotite's version; a test checks the rows
against the installed CCD). Every other component is read from biotite's CCD.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

__all__ = ["COLUMNS", "STANDARD_COMPONENTS", "ccd_rows"]

# the columns the library reads, per category; float columns hold NaN where the CCD has no value
COLUMNS = {
    "chem_comp_atom": {
        "atom_id": str, "type_symbol": str, "pdbx_aromatic_flag": str, "pdbx_stereo_config": str,
        **{f"{p}Cartn_{c}{s}": float for p, s in (("pdbx_model_", "_ideal"), ("model_", "")) for c in "xyz"},
    },
    "chem_comp_bond": {"atom_id_1": str, "atom_id_2": str, "value_order": str},
}

STANDARD_COMPONENTS = tuple(
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL MSE "
    "A C G U DA DC DG DT HOH".split()
)

_STANDARD_FILE = Path(__file__).with_name("_ccd_standard.json")


def _column(values, kind) -> np.ndarray:
    if kind is float:
        return np.asarray([np.nan if v is None else v for v in values], np.float64)
    return np.asarray(values, dtype=str)


@functools.cache
def _standard() -> dict:
    try:
        return json.loads(_STANDARD_FILE.read_text())["components"]
    except FileNotFoundError:  # pragma: no cover - a broken install: read everything from biotite
        return {}


def _from_biotite(category: str, name: str) -> dict[str, np.ndarray] | None:
    try:
        import biotite.structure.info as info
    except ImportError as err:  # pragma: no cover - biotite is a dependency
        raise ImportError(
            "modelmap.refine reads the Chemical Component Dictionary through biotite: pip install biotite"
        ) from err
    try:
        rows = info.get_from_ccd(category, name)
    except Exception:
        return None
    if rows is None:
        return None
    out = {}
    for column, kind in COLUMNS[category].items():
        if column not in rows:
            continue
        if kind is float:
            out[column] = rows[column].as_array(np.float64, masked_value=np.nan)
        else:
            out[column] = np.asarray(rows[column].as_array(), dtype=str)
    return out


def ccd_rows(category: str, name: str) -> dict[str, np.ndarray] | None:
    """The rows of component `name` in CCD `category`, one array per column of `COLUMNS`.

    **Arguments:**

    - `category`: `"chem_comp_atom"` or `"chem_comp_bond"`.
    - `name`: the component id (`"ALA"`, `"HEM"`).

    **Returns:** `{column: array}` (strings, or float64 with NaN for missing values), or None where
    the CCD has no rows for it (a component without bonds has no `chem_comp_bond` rows).
    """
    if category not in COLUMNS:
        raise ValueError(f"category must be one of {sorted(COLUMNS)}, got {category!r}")
    shipped = _standard().get(name)
    if shipped is not None:
        rows = shipped.get(category)
        return None if rows is None else {c: _column(v, COLUMNS[category][c]) for c, v in rows.items()}
    return _from_biotite(category, name)


def write_standard(path: Path = _STANDARD_FILE) -> None:
    """Write the shipped rows of `STANDARD_COMPONENTS` from the installed biotite's CCD."""
    import biotite

    components = {}
    for name in STANDARD_COMPONENTS:
        entry = {}
        for category in COLUMNS:
            rows = _from_biotite(category, name)
            if rows is not None:
                entry[category] = {c: [None if isinstance(x, float) and np.isnan(x) else x for x in v.tolist()]
                                   for c, v in rows.items()}
        components[name] = entry
    text = json.dumps({"source": f"biotite {biotite.__version__} components.bcif (PDB CCD subset)",
                       "components": components}, separators=(",", ":"))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


if __name__ == "__main__":  # pragma: no cover
    write_standard()
    print(f"wrote {_STANDARD_FILE}")
