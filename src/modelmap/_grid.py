"""The regular grid that a map lives on.

Conventions (fixed across modelmap, see DESIGN.md):

- Map arrays are `(nz, ny, nx)` (C order, as `mrcfile` gives them).
- `voxel_size` and `origin` are given in **x, y, z order** (like positions), in Å.
- Voxel index `(k, j, i)` is the grid point at `origin + (i vx, j vy, k vz)`: `origin` is the position
  of grid point `(0, 0, 0)`. A voxel-average renderer integrates over the box of one voxel centred on
  its grid point.
"""

from __future__ import annotations

import math
import os

import equinox as eqx
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._errors import GridTooLargeError

__all__ = ["Grid", "DEFAULT_MEMORY_LIMIT", "MEMORY_LIMIT_ENV", "memory_limit_bytes"]

#: Environment variable that sets the memory limit of every size check, in bytes or with a binary
#: suffix (`"24G"`, `"512M"`, `"1.5T"`).
MEMORY_LIMIT_ENV = "MODELMAP_MEMORY_LIMIT"
#: The limit where neither the device nor the system says how much memory there is: 16 GiB.
DEFAULT_MEMORY_LIMIT = 16 * 2**30

_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps it at 1 or more ("1.5 GiB", "12.3 MiB")."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SUFFIXES and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _SUFFIXES[unit]
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"${MEMORY_LIMIT_ENV} must be a positive size such as 8G or 8589934592, got {text!r}")
    return int(value)


def memory_limit_bytes(device=None) -> tuple[int, str]:
    """The fixed memory a computation may plan for, in bytes, and where that number comes from.

    Size checks compare what a computation needs with this limit, never with the memory that
    happens to be free at the moment (which depends on other processes and would make the same
    call pass or fail from one run to the next). In order:

    1. `$MODELMAP_MEMORY_LIMIT` (`MEMORY_LIMIT_ENV`), when set;
    2. the device's own memory, `device.memory_stats()["bytes_limit"]` (what XLA's allocator may
       use on a GPU or TPU), for a `device` that reports it;
    3. the machine's physical memory (`SC_PHYS_PAGES × SC_PAGE_SIZE`) for the host or a CPU device;
    4. `DEFAULT_MEMORY_LIMIT` (16 GiB) where none of these is known.

    **Arguments:**

    - `device`: a `jax.Device`, or None for the host (where numpy arrays, e.g. a map being read,
      live).

    **Returns:** `(limit in bytes, a short description of its source)`.
    """
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        return _parse_bytes(env), f"${MEMORY_LIMIT_ENV}"
    if device is not None:
        try:
            stats = device.memory_stats()
        except Exception:  # pragma: no cover - a backend without allocator statistics
            stats = None
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"the memory of {device.platform} device {device.id}"
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")), "the machine's physical memory"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return DEFAULT_MEMORY_LIMIT, "modelmap's default limit"


def _triple(value, name: str) -> tuple[float, float, float]:
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,))
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {tuple(arr)}")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def _voxel_triple(value) -> tuple[float, float, float]:
    voxel = _triple(value, "voxel_size")
    if min(voxel) <= 0:
        raise ValueError(f"voxel_size must be positive, got {voxel}")
    return voxel


class Grid(eqx.Module):
    """A regular, axis-aligned grid of points.

    All fields are static (plain Python tuples), so a `Grid` can be a static argument of jitted
    functions and a field of render functions.

    **Arguments:**

    - `shape`: number of grid points `(nz, ny, nx)`.
    - `voxel_size`: spacing `(vx, vy, vz)` in Å; a scalar means cubic voxels.
    - `origin`: position `(x, y, z)` in Å of grid point `(0, 0, 0)`.
    """

    shape: tuple[int, int, int] = eqx.field(static=True)
    voxel_size: tuple[float, float, float] = eqx.field(static=True)
    origin: tuple[float, float, float] = eqx.field(static=True)

    def __init__(self, shape, voxel_size, origin=(0.0, 0.0, 0.0)):
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"a grid needs three positive sizes (nz, ny, nx), got {shape}")
        voxel = _voxel_triple(voxel_size)
        self.shape = shape  # type: ignore[assignment]
        self.voxel_size = voxel
        self.origin = _triple(origin, "origin")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def around_positions(
        cls,
        positions: ArrayLike,
        voxel_size: float | tuple[float, float, float] = 1.0,
        padding: float = 5.0,
    ) -> "Grid":
        """A grid that holds `positions` with `padding` Å of margin on every side.

        The origin is a whole multiple of the voxel size (so the map is written with an integer
        MRC `nstart`, which every reader places identically).

        **Arguments:**

        - `positions`: `(..., 3)` positions in Å (any leading shape, e.g. an ensemble).
        - `voxel_size`: Å, scalar or `(vx, vy, vz)`.
        - `padding`: Å of empty margin beyond the outermost atoms.

        **Returns:** the `Grid`. Raises `GridTooLargeError` where one map of it (float32) would not
        fit the memory limit (`check_fits_in_memory(copies=1)`).
        """
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if pos.shape[0] == 0:
            raise ValueError("cannot build a grid around zero positions")
        if not np.all(np.isfinite(pos)):
            raise ValueError("cannot build a grid around NaN or infinite positions")
        voxel = np.asarray(_voxel_triple(voxel_size))
        if not (np.isfinite(padding) and padding >= 0):
            raise ValueError(f"padding must be a finite number of Å, 0 or more, got {padding}")
        lo = np.floor((pos.min(0) - padding) / voxel) * voxel
        hi = pos.max(0) + padding
        n_xyz = np.floor((hi - lo) / voxel + 1e-9).astype(int) + 1
        grid = cls(tuple(int(n) for n in n_xyz[::-1]), tuple(voxel), tuple(lo))
        # the map itself must fit; what rendering needs beside it, renderers check (render_model
        # streams z-slabs where the whole map's working memory would not fit)
        grid.check_fits_in_memory(copies=1)
        return grid

    # -- derived quantities ------------------------------------------------------------------------
    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in Å³."""
        return math.prod(self.voxel_size)

    @property
    def extent(self) -> tuple[float, float, float]:
        """Length `(Lx, Ly, Lz)` in Å covered by the grid points' voxels (n · voxel size)."""
        nz, ny, nx = self.shape
        vx, vy, vz = self.voxel_size
        return (nx * vx, ny * vy, nz * vz)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates in Å of the grid points along x, y and z (three 1-D numpy arrays)."""
        nz, ny, nx = self.shape
        return tuple(
            o + v * np.arange(n)
            for o, v, n in zip(self.origin, self.voxel_size, (nx, ny, nz))
        )  # type: ignore[return-value]

    def coordinates(self) -> np.ndarray:
        """Positions `(nz, ny, nx, 3)` (x, y, z in Å) of every grid point."""
        x, y, z = self.axes()
        zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
        return np.stack([xx, yy, zz], axis=-1)

    def to_index(self, positions: Float[Array, "... 3"]) -> Float[Array, "... 3"]:
        """Fractional voxel indices `(i, j, k)` (x, y, z order) of positions in Å."""
        return (positions - np.asarray(self.origin)) / np.asarray(self.voxel_size)

    def to_position(self, index: Float[Array, "... 3"]) -> Float[Array, "... 3"]:
        """Positions in Å of fractional voxel indices `(i, j, k)` (x, y, z order)."""
        return np.asarray(self.origin) + index * np.asarray(self.voxel_size)

    def contains(self, positions: ArrayLike) -> np.ndarray:
        """Whether each position lies inside the grid's box (from grid point 0 to the last one).

        **Arguments:**

        - `positions`: `(..., 3)` positions in Å.

        **Returns:** a boolean array of shape `(...)`.
        """
        index = np.asarray(self.to_index(np.asarray(positions, np.float64)))
        upper = np.asarray(self.shape[::-1]) - 1
        return np.all((index >= 0) & (index <= upper), axis=-1)

    def same_as(self, other: "Grid") -> bool:
        """Whether `other` places the same points: the same shape, voxel sizes equal to 1e-6
        (relative) and origins within 1e-4 of a voxel (the rounding of values read from an MRC
        header, which stores them in float32).

        **Arguments:**

        - `other`: another `Grid`.

        **Returns:** `True` if a map on one grid is a map on the other.
        """
        return (
            tuple(self.shape) == tuple(other.shape)
            and bool(np.allclose(self.voxel_size, other.voxel_size, rtol=1e-6, atol=0))
            and bool(np.allclose(self.origin, other.origin, rtol=0, atol=1e-4 * min(self.voxel_size)))
        )

    def nbytes(self, itemsize: int = 4) -> int:
        return self.n_voxels * itemsize

    def check_fits_in_memory(
        self, itemsize: int = 4, copies: float = 4.0, *, device=None, limit: int | None = None
    ) -> None:
        """Raise `GridTooLargeError` if `copies` maps of this grid would not fit in memory.

        Called before anything of the grid's size is allocated. Deterministic: the need is
        compared with a fixed limit (`memory_limit_bytes`: `$MODELMAP_MEMORY_LIMIT`, else the
        device's memory, else the machine's physical memory), never with the memory free now.

        **Arguments:**

        - `itemsize`: bytes per value (4 for float32).
        - `copies`: how many maps of this grid the computation holds at once.
        - `device`: the `jax.Device` the maps live on; None for the host.
        - `limit`: the limit in bytes, instead of `memory_limit_bytes(device)`.
        """
        need = self.nbytes(itemsize) * copies
        have, source = (int(limit), "the given limit") if limit is not None else memory_limit_bytes(device)
        if need > have:
            nz, ny, nx = self.shape
            raise GridTooLargeError(
                f"a {nx} x {ny} x {nz} grid (x, y, z) needs about {format_bytes(need)} "
                f"({copies:g} copies of {format_bytes(self.nbytes(itemsize))}) but the memory limit is "
                f"{format_bytes(have)} ({source}; set ${MEMORY_LIMIT_ENV} to change it); use a larger "
                "voxel size, less padding or a smaller box"
            )

    def __repr__(self) -> str:
        return f"Grid(shape={self.shape}, voxel_size={self.voxel_size}, origin={self.origin})"
