"""The manifest of a `modelmap batch` job: one entry (one model map) per row, checked up front.

A manifest is CSV with a header row (`.csv`) or JSON lines, one object per line (`.jsonl`,
`.ndjson`, `.json`). Its fields (columns or keys):

| field | meaning | default |
|---|---|---|
| `model` | PDB or mmCIF file (optionally .gz); relative paths are read from the manifest's folder | required |
| `resolution` | D in Å, as `modelmap render -d` | the job's `-d`, else required |
| `method` | `gaussian`, `fourier` or `shells` | the job's `--method` |
| `voxel_size` | Å | the job's `--voxel-size` |
| `padding` | Å around the model: a grid per entry (`modelmap render`'s default grid) | the job's `--padding` |
| `box` | a cube of `box` voxels centred on the model (`render_batch(box=...)`) | the job's `--box` |
| `like` | a map whose grid (shape, voxel size, origin) the entry uses | |
| `map` | an experimental map: also score the model against it (CC_mask, mean Q) at `resolution` | |
| `name` | the entry's name: its outputs are `NAME.mrc` and its row in the results | the model's name |
| `sampling` | `point` or `average` (as `modelmap render --sampling`) | the job's `--sampling` |
| `table` | `electron` or `xray` | the job's `--table` |

A row gives one grid: `box`, or `like`, or `padding` (with `voxel_size`); `box` and `like` take
no `padding`, `like` takes no `voxel_size`. Empty CSV cells and JSON `null` mean "not given".
Every row is checked before any work, and every problem is reported at once, each naming its line
and field.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path

from .._errors import ModelmapError

__all__ = ["JobDefaults", "JobEntry", "ManifestError", "read_manifest"]

METHODS = ("gaussian", "fourier", "shells")
SAMPLINGS = ("point", "average")
TABLES = ("electron", "xray")
FIELDS = ("model", "resolution", "method", "voxel_size", "padding", "box", "like", "map", "name", "sampling", "table")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ManifestError(ModelmapError):
    """A manifest that cannot be run: its message lists every bad row and field."""


@dataclasses.dataclass(frozen=True)
class JobDefaults:
    """What a row that leaves a field out gets (the `modelmap batch` options of the same names)."""

    resolution: float | None = None
    method: str = "gaussian"
    voxel_size: float = 1.0
    padding: float = 5.0
    box: int | None = None
    sampling: str = "point"
    table: str = "electron"


@dataclasses.dataclass(frozen=True)
class JobEntry:
    """One checked row of a manifest: one model map (and optionally its scores).

    **Fields:**

    - `name`: the entry's unique name (its output is `NAME.mrc`).
    - `line`: the manifest line it came from (for messages).
    - `model`: the model file.
    - `resolution`: D in Å.
    - `method`, `sampling`, `table`: as `modelmap render`.
    - `voxel_size`: Å (`None` with `like`).
    - `padding`: Å around the model, for a grid of its own (`None` with `box` or `like`).
    - `box`: voxels along each axis of a box centred on the model (`None` otherwise).
    - `like`: a map whose grid the entry uses (`None` otherwise).
    - `map`: an experimental map to score against (`None`: no scores).
    """

    name: str
    line: int
    model: Path
    resolution: float
    method: str = "gaussian"
    sampling: str = "point"
    table: str = "electron"
    voxel_size: float | None = 1.0
    padding: float | None = 5.0
    box: int | None = None
    like: Path | None = None
    map: Path | None = None

    def spec(self) -> dict:
        """What decides the entry's outputs (everything but its line), JSON-ready."""
        d = dataclasses.asdict(self)
        del d["line"]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    def key(self) -> str:
        """A digest of `spec()`: an output made for another spec is not reused on resume."""
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]

    def compile_key(self) -> tuple:
        """Entries with equal keys most likely reuse one compiled render function: same method,
        table, sampling, resolution, box and voxel size, and model files of about the same size
        (a proxy for the atom bucket, read from the file system without parsing the model)."""
        try:
            size = os.path.getsize(self.model) * (4 if self.model.suffix == ".gz" else 1)
        except OSError:
            size = 0
        return (self.method, self.table, self.sampling, self.resolution, self.box or 0, self.voxel_size or 0.0,
                int(math.log2(1 + size // 80)), str(self.like or ""))

    def sources(self) -> tuple[Path, ...]:
        """The input files of the entry (never overwritten by its outputs)."""
        return tuple(p for p in (self.model, self.like, self.map) if p is not None)


def read_manifest(path: str | os.PathLike, defaults: JobDefaults = JobDefaults()) -> list[JobEntry]:
    """Read and check a manifest (CSV with a header, or JSON lines; see the module docstring).

    **Arguments:**

    - `path`: the manifest file.
    - `defaults`: what rows that leave a field out get.

    **Returns:** the entries, in the manifest's order.

    Raises `ManifestError` listing every bad row (by line and field) before any work is done.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    rows = _read_rows(path)
    errors: list[str] = []
    entries: list[tuple[int, dict]] = []
    for line, row in rows:
        problems: list[str] = []
        values = _check_row(row, defaults, path.parent, problems)
        errors += [f"{path}, line {line}: {p}" for p in problems]
        if not problems:
            entries.append((line, values))
    if not rows:
        errors.append(f"{path}: the manifest has no entries")
    out = _named(entries, errors, path)
    if errors:
        shown = errors[:30] + ([f"... and {len(errors) - 30} more"] if len(errors) > 30 else [])
        raise ManifestError("the manifest has errors; nothing was run:\n  " + "\n  ".join(shown))
    return out


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, raw row) of every non-empty row of a CSV or JSON-lines manifest."""
    suffix = path.suffix.lower()
    rows = []
    if suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ManifestError(f"{path}: the CSV has no header row (model,resolution,...)")
            unknown = [c for c in reader.fieldnames if c and c.strip() not in FIELDS]
            if unknown:
                raise ManifestError(f"{path}, line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
                                    f"the columns are {', '.join(FIELDS)}")
            for row in reader:
                clean = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
                if None in row:
                    clean["__extra__"] = row[None]
                if any(v not in ("", None) for v in clean.values()):
                    rows.append((reader.line_num, clean))
    elif suffix in (".jsonl", ".ndjson", ".json"):
        for line, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                row = {"__json__": f"not a JSON object ({err.msg})"}
            if not isinstance(row, dict):
                row = {"__json__": "not a JSON object"}
            rows.append((line, row))
    else:
        raise ManifestError(f"{path}: a manifest is .csv (with a header row) or JSON lines (.jsonl, .ndjson, .json)")
    return rows


def _given(row: dict, field: str):
    v = row.get(field)
    return None if v is None or (isinstance(v, str) and v.strip() == "") else v


def _number(row, field, problems, *, integer=False, low=None, low_open=False):
    v = _given(row, field)
    if v is None:
        return None
    try:
        x = float(v)
        if integer and (x != int(x)):
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"field {field!r}: {v!r} is not {'a whole number' if integer else 'a number'}")
        return None
    bad = not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low))
    if bad:
        problems.append(f"field {field!r}: {v!r} must be a finite number {'above' if low_open else 'of at least'} {low:g}")
        return None
    return int(x) if integer else x


def _choice(row, field, default, choices, problems):
    v = _given(row, field)
    if v is None:
        return default
    if str(v) not in choices:
        problems.append(f"field {field!r}: {v!r} is not one of {', '.join(choices)}")
    return str(v)


def _check_row(row: dict, d: JobDefaults, folder: Path, problems: list[str]) -> dict:
    """The checked values of one row; every problem appended to `problems`."""
    if "__json__" in row:
        problems.append(row["__json__"])
        return {}
    if "__extra__" in row:
        problems.append(f"more cells than header columns ({row['__extra__']!r} left over)")
    unknown = [k for k in row if k not in FIELDS and not k.startswith("__")]
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(FIELDS)}")
    v: dict = {}
    model = _given(row, "model")
    if model is None:
        problems.append("field 'model': required (a PDB or mmCIF file)")
    v["model"] = None if model is None else folder / Path(str(model))
    for field in ("like", "map"):
        p = _given(row, field)
        v[field] = None if p is None else folder / Path(str(p))
    v["method"] = _choice(row, "method", d.method, METHODS, problems)
    v["sampling"] = _choice(row, "sampling", d.sampling, SAMPLINGS, problems)
    v["table"] = _choice(row, "table", d.table, TABLES, problems)
    res = _number(row, "resolution", problems, low=0.0)
    if res is None and _given(row, "resolution") is None:
        res = d.resolution
        if res is None:
            problems.append("field 'resolution': required (D in Å), or give the job a default with -d")
    v["resolution"] = res
    voxel = _number(row, "voxel_size", problems, low=0.0, low_open=True)
    padding = _number(row, "padding", problems, low=0.0)
    box = _number(row, "box", problems, integer=True, low=1)
    # one grid per row: its own fields decide; the job's defaults fill in the rest
    if v["like"] is not None:
        for field, value in (("box", box), ("padding", padding), ("voxel_size", voxel)):
            if value is not None:
                problems.append(f"field {field!r}: a row with 'like' takes its grid from that map; leave {field!r} out")
        voxel = padding = box = None
    elif box is not None or (padding is None and d.box is not None):
        if padding is not None:
            problems.append("field 'padding': a row with 'box' has a fixed box; leave 'padding' out")
        box, padding = box or d.box, None
    else:
        padding = d.padding if padding is None else padding
    if v["like"] is None:
        voxel = d.voxel_size if voxel is None else voxel
    v.update(voxel_size=voxel, padding=padding, box=box)
    if res is not None:
        if v["method"] == "fourier" and res <= 0:
            problems.append("field 'resolution': the Fourier map needs a resolution above 0")
        if v["method"] == "shells":
            from ..shells import D_RANGE

            if not D_RANGE[0] <= res <= D_RANGE[1]:
                problems.append(f"field 'resolution': the shell method covers {D_RANGE[0]:g}-{D_RANGE[1]:g} Å, got {res:g}")
        if v["map"] is not None and res <= 0:
            problems.append("field 'resolution': scoring against 'map' needs a resolution above 0")
    if v["method"] == "shells" and v["sampling"] == "average":
        problems.append("field 'sampling': the shell method samples at grid points only; use point")
    name = _given(row, "name")
    if name is not None and not _NAME.match(str(name)):
        problems.append(f"field 'name': {name!r} is not a file name (letters, digits, . _ + - only)")
    v["name"] = None if name is None else str(name)
    return v


def _model_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".cif", ".mmcif", ".pdb", ".ent"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._-+") or "entry"


def _named(entries: list[tuple[int, dict]], errors: list[str], path: Path) -> list[JobEntry]:
    """Entries with unique names: a row's `name`, else its model's stem (with `_K`, its entry
    number, where several unnamed rows share a stem)."""
    stems = [_model_stem(v["model"]) if v["name"] is None else None for _, v in entries]
    out, seen = [], {}
    for k, ((line, v), stem) in enumerate(zip(entries, stems), 1):
        name = v.pop("name") or (stem if stems.count(stem) == 1 else f"{stem}_{k}")
        if name in seen:
            errors.append(f"{path}, line {line}: field 'name': {name!r} is also the name of line {seen[name]}; "
                          "give each entry its own name")
        seen[name] = line
        out.append(JobEntry(name=name, line=line, **v))
    return out
