"""Helpers shared by the benchmark scripts (imported as `_common`: the scripts run from benchmarks/)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np


def git_commit() -> str | None:
    """The repository's short commit hash (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cut_compact_regions(positions, residue, sizes, rng) -> list[np.ndarray]:
    """Index arrays of compact regions of a model: the whole residues (of any chain) nearest to a
    random residue, by the distance of their centroids, until there are at least `sizes[i]` atoms.

    A ball of protein: 3,000 atoms fit a 64³ box of 1.5 Å (a contiguous residue range of 3,000
    atoms spans more than 100 Å and does not). `residue` holds one key per atom, equal within a
    residue and with residues contiguous.
    """
    residue = np.asarray(residue)
    starts = np.flatnonzero(np.r_[True, residue[1:] != residue[:-1]])
    ends = np.r_[starts[1:], len(residue)]
    pos = np.asarray(positions, np.float64)
    centroids = np.stack([pos[a:b].mean(0) for a, b in zip(starts, ends)])
    counts = ends - starts
    out = []
    for want in sizes:
        centre = centroids[int(rng.integers(len(starts)))]
        order = np.argsort(np.linalg.norm(centroids - centre, axis=1), kind="stable")
        take = order[: int(np.searchsorted(np.cumsum(counts[order]), want)) + 1]
        out.append(np.concatenate([np.arange(starts[k], ends[k]) for k in np.sort(take)]))
    return out
