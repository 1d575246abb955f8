"""Write files atomically: to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success rename it to `path`.

    On any exception the temporary file is removed and `path` is left as it was. `protect` lists
    input files that must never be overwritten: writing onto one of them raises `ValueError`.
    The file gets the mode a plain `open(path, "w")` would give it: an existing file's mode, else
    `0o666 & ~umask` (the temporary file is created private, 0600, and must not stay so).
    """
    path = Path(path)
    for p in protect:
        if p is not None and path.exists() and Path(p).exists() and path.resolve() == Path(p).resolve():
            raise ValueError(f"refusing to overwrite the input file {p}; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _mode_for(path))
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _mode_for(path: Path) -> int:
    """The permission bits a new file at `path` gets from `open`: the existing file's, else
    0o666 without the process's umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
