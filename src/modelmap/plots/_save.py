"""Figures without pyplot, and PNGs written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ..io._atomic_write import atomic_path

__all__ = ["new_figure", "save_png", "plot_path"]


def new_figure(width: float, height: float):
    """A `matplotlib.figure.Figure` of `width` × `height` inches with constrained layout.

    Made directly, not through `pyplot`: no backend is chosen, no global figure registry is touched,
    so a user's own matplotlib setup is left as it was; `Figure.savefig` renders PNGs with Agg.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_png(figure, path: str | os.PathLike, *, dpi: int = 150, protect: tuple = ()) -> Path:
    """Write `figure` as a PNG at `path`, atomically (a temporary file renamed over it).

    **Arguments:**

    - `figure`: a `matplotlib.figure.Figure`.
    - `path`: the PNG to write (its folder is created).
    - `dpi`: dots per inch.
    - `protect`: input files that must never be overwritten.

    **Returns:** the path written.
    """
    path = Path(path)
    with atomic_path(path, protect=protect) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


def plot_path(prefix: str | os.PathLike, name: str) -> Path:
    """Where the plot `name` goes for a `--plot` value: `PREFIX_name.png`, or `DIR/name.png` when
    `prefix` is an existing folder or ends with a path separator."""
    text = os.fspath(prefix)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Path(text) / f"{name}.png"
    return Path(f"{text}_{name}.png")
