"""Reading and writing MRC/CCP4 maps (and their .gz) through mrcfile.

The origin rule (DESIGN.md, the same as ChimeraX):

- **read**: the position of grid point 0 is the header ORIGIN field if it is non-zero, else
  NXSTART/NYSTART/NZSTART times the voxel size. Axis orders MAPC/MAPR/MAPS other than 1, 2, 3 are
  transposed to (z, y, x) on read; anything that is not a permutation of 1, 2, 3 is refused.
- **write**: voxel size always; when the origin is a whole number of voxels it goes into NSTART (and
  ORIGIN is 0), which every reader (ChimeraX, gemmi, cctbx, mrcfile users) places identically; else
  into the ORIGIN field (gemmi's reader ignores it: such a file is placed right by ChimeraX, cctbx
  only after shifting, and gemmi not at all; a warning says so).
"""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import mrcfile
import numpy as np
from jaxtyping import Array, Float

from .._errors import MapAxisOrderError, MapFileError, ModelmapError
from .._grid import Grid
from ._atomic_write import atomic_path

__all__ = ["DensityMap", "read_map", "write_map"]


class DensityMap(eqx.Module):
    """A map on a grid: `data` is `(nz, ny, nx)`, `grid` places it in space (Å).

    A pytree: `data` is its one leaf (differentiable, traced under `jax.jit`/`jax.vmap`), the `Grid`
    is static (part of the tree's structure, so a jitted function recompiles for a new grid, not
    for new values).

    **Arguments:**

    - `data`: the values `(nz, ny, nx)` (Å⁻² for electron maps from modelmap, the file's units for
      maps read from disk).
    - `grid`: the `Grid` that places them.
    """

    data: Float[Array, "nz ny nx"]
    grid: Grid = eqx.field(static=True)

    def __check_init__(self):
        if tuple(self.data.shape) != tuple(self.grid.shape):
            raise ValueError(f"map data {self.data.shape} does not match grid {self.grid.shape}")


_MODES_OK = (0, 1, 2, 6, 12)

# values per z-chunk when a map is scanned or written: a chunk's float64 temporaries take 8 MiB
# each, whatever the map's size (a map that only just fits in memory is never copied whole)
_CHUNK_VALUES = 1 << 20


def _z_chunks(shape: tuple[int, int, int]) -> list[slice]:
    nz, ny, nx = shape
    step = max(1, _CHUNK_VALUES // max(1, ny * nx))
    return [slice(i, min(i + step, nz)) for i in range(0, nz, step)]


def _count_not_finite(data: np.ndarray) -> int:
    """How many NaN or infinite values a `(nz, ny, nx)` map holds, one z-chunk at a time."""
    return sum(int(np.count_nonzero(~np.isfinite(data[s]))) for s in _z_chunks(data.shape))


def _header_stats(data: np.ndarray) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """The MRC header's DMIN, DMAX, DMEAN and RMS (the standard deviation about the mean, as
    mrcfile's `update_header_stats` defines it), summed in float64 one z-chunk at a time."""
    chunks = _z_chunks(data.shape)
    lo, hi, total = np.inf, -np.inf, 0.0
    for s in chunks:  # one pass for the extremes and the sum, a second about the mean
        lo, hi = min(lo, float(data[s].min())), max(hi, float(data[s].max()))
        total += float(data[s].sum(dtype=np.float64))
    mean = total / data.size
    var = sum(float(np.square(data[s].astype(np.float64) - mean).sum()) for s in chunks) / data.size
    return np.float32(lo), np.float32(hi), np.float32(mean), np.float32(np.sqrt(var))


def map_array(
    density, grid: Grid | None = None, *, what: str = "map", dtype=np.float64, need_grid: bool = True
) -> tuple[np.ndarray, Grid | None]:
    """`(data, grid)` of a map given as a `DensityMap`, a `(data, grid)` pair, or an array with `grid`.

    The one place where every function that takes a map checks it: a `(nz, ny, nx)` array of the
    grid's shape with finite values.

    **Arguments:**

    - `density`: a `DensityMap`, a `(data, Grid)` tuple, or an array `(nz, ny, nx)`.
    - `grid`: the grid of a bare array (ignored for the other two forms).
    - `what`: the map's name in error messages ("the target map", "map1", ...).
    - `dtype`: the returned array's dtype.
    - `need_grid`: whether a bare array without `grid` is an error (else the grid returned is `None`).

    **Returns:** `(data, grid)`.

    Raises `ModelmapError` naming the map for a wrong shape, a missing grid or NaN/infinite values.
    """
    own_grid = True  # the grid came with the data (else: the grid of a bare array, given apart)
    if isinstance(density, DensityMap):
        data, grid = density.data, density.grid
    elif isinstance(density, tuple) and len(density) == 2 and isinstance(density[1], Grid):
        data, grid = density
    else:
        data, own_grid = density, False
    data = np.asarray(data, dtype)
    if data.ndim != 3:
        raise ModelmapError(f"{what} must be a (nz, ny, nx) map, got an array of shape {data.shape}")
    if grid is None:
        if need_grid:
            raise ModelmapError(f"{what} is a bare array: pass a DensityMap (read_map) or give its grid")
    elif data.shape != tuple(grid.shape):
        if own_grid:
            raise ModelmapError(f"{what}: the data {data.shape} does not match its grid {tuple(grid.shape)}")
        raise ModelmapError(f"{what} {data.shape} is not on the same grid as {tuple(grid.shape)}")
    n_bad = _count_not_finite(data)
    if n_bad:
        raise ModelmapError(f"{what} has {n_bad} NaN or infinite value(s)")
    return data, grid


def read_map(path: str | os.PathLike, *, dtype=jnp.float32) -> DensityMap:
    """Read an MRC/CCP4 map (optionally gzipped) with the ChimeraX origin rule.

    **Arguments:**

    - `path`: `.mrc`, `.map`, `.ccp4` (and `.gz` of these).
    - `dtype`: dtype of the returned data.

    **Returns:** a `DensityMap` with data `(nz, ny, nx)` and its `Grid`.

    Raises `MapFileError` for a missing, empty or malformed file or non-orthogonal cell,
    `MapAxisOrderError` for an axis order that is not a permutation of (1, 2, 3), and
    `GridTooLargeError` when the data would not fit in memory (checked from the header first).
    """
    path = Path(path)
    if not path.exists():
        raise MapFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MapFileError(f"{path}: the file is empty")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.open(str(path), mode="r", permissive=True, header_only=True)
    except Exception as err:
        raise MapFileError(f"{path}: cannot read it as an MRC/CCP4 map ({err})") from err
    with mrc:
        h = mrc.header
        if not mrc.header.map.tobytes().startswith(b"MAP"):
            detail = "; ".join(str(w.message) for w in caught)
            raise MapFileError(
                f"{path}: not an MRC/CCP4 map (the MAP identifier is missing"
                + (f"; {detail})" if detail else ")")
            )
        nc, nr, ns = (int(h.nx), int(h.ny), int(h.nz))
        mode = int(h.mode)
        axes = (int(h.mapc), int(h.mapr), int(h.maps))
        nstart_crs = np.array([int(h.nxstart), int(h.nystart), int(h.nzstart)])
        cella = np.array([float(h.cella.x), float(h.cella.y), float(h.cella.z)])
        cellb = np.array([float(h.cellb.alpha), float(h.cellb.beta), float(h.cellb.gamma)])
        mxyz = np.array([int(h.mx), int(h.my), int(h.mz)])
        origin_field = np.array([float(h.origin.x), float(h.origin.y), float(h.origin.z)])
    if sorted(axes) != [1, 2, 3]:
        raise MapAxisOrderError(
            f"{path}: axis order MAPC/MAPR/MAPS = {axes} is not a permutation of (1, 2, 3); "
            "the file is malformed and cannot be transposed"
        )
    if mode not in _MODES_OK:
        raise MapFileError(f"{path}: MRC mode {mode} is not a real-valued map mode")
    if min(nc, nr, ns) < 1:
        raise MapFileError(f"{path}: the header gives {nc} x {nr} x {ns} grid points")
    if np.any(np.abs(cellb - 90.0) > 1e-3) and np.any(cellb != 0):
        raise MapFileError(f"{path}: non-orthogonal cell angles {tuple(cellb)} are not supported")
    # number of points in x, y, z (the file stores columns, rows, sections = axes[0], [1], [2])
    n_crs = np.array([nc, nr, ns])
    n_xyz = np.empty(3, int)
    nstart_xyz = np.empty(3, int)
    for i, ax in enumerate(axes):
        n_xyz[ax - 1] = n_crs[i]
        nstart_xyz[ax - 1] = nstart_crs[i]
    sampling = np.where(mxyz > 0, mxyz, n_xyz)
    if np.any(cella <= 0):
        raise MapFileError(f"{path}: cell lengths {tuple(cella)} must be positive")
    voxel = cella / sampling
    origin = origin_field if np.any(origin_field != 0) else nstart_xyz * voxel
    if not np.all(np.isfinite(origin)):
        raise MapFileError(f"{path}: the header origin {tuple(origin)} is not finite")
    grid = Grid(tuple(int(n) for n in n_xyz[::-1]), tuple(voxel), tuple(origin))
    grid.check_fits_in_memory(itemsize=4, copies=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(str(path), mode="r", permissive=True) as mrc:
                data = None if mrc.data is None else np.asarray(mrc.data)
    except Exception as err:
        raise MapFileError(f"{path}: cannot read the map data ({err})") from err
    if data is None or data.size != nc * nr * ns:
        detail = "; ".join(str(w.message) for w in caught)
        raise MapFileError(
            f"{path}: the header says {nc} x {nr} x {ns} values but the data block is "
            f"{'missing' if data is None else f'{data.size} values'}" + (f" ({detail})" if detail else "")
        )
    data = data.reshape(ns, nr, nc)  # (sections, rows, columns)
    if axes != (1, 2, 3):
        # array axis 0 = sections (axes[2]), 1 = rows (axes[1]), 2 = columns (axes[0]);
        # we want axis 0 = z (3), 1 = y (2), 2 = x (1)
        file_axes = [axes[2], axes[1], axes[0]]
        data = np.transpose(data, [file_axes.index(a) for a in (3, 2, 1)])
    n_bad = _count_not_finite(data)
    if n_bad:
        raise MapFileError(f"{path}: the map has {n_bad} NaN or infinite values")
    return DensityMap(jnp.asarray(data, dtype), grid)


MAP_SUFFIXES = (".mrc", ".map", ".ccp4")


def check_map_path(path: str | os.PathLike) -> Path:
    """Refuse a map file name that does not end in `.mrc`, `.map` or `.ccp4` (optionally followed
    by `.gz`): `write_map` writes MRC, and a `.txt` or `.pdb` holding one misleads every reader.

    **Returns:** the path.
    """
    path = Path(path)
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    if not name.endswith(MAP_SUFFIXES) or name in MAP_SUFFIXES:
        raise ValueError(f"{path}: a map file name ends in {', '.join(MAP_SUFFIXES)} (optionally + .gz); "
                         "the map is written as MRC")
    return path


def _is_whole_voxels(origin: np.ndarray, voxel: np.ndarray) -> tuple[bool, np.ndarray]:
    n = origin / voxel
    nearest = np.round(n)
    return bool(np.all(np.abs(n - nearest) < 1e-4)), nearest.astype(int)


def write_map(
    path: str | os.PathLike,
    density: DensityMap | Float[Array, "nz ny nx"],
    grid: Grid | None = None,
    *,
    overwrite: bool = True,
    protect: tuple = (),
) -> Path:
    """Write a map as MRC (mode 2, float32; `.gz` gzips it), atomically.

    **Arguments:**

    - `path`: output file: `.mrc`, `.map` or `.ccp4`, optionally + `.gz`.
    - `density`: a `DensityMap`, or an array `(nz, ny, nx)` together with `grid`.
    - `overwrite`: whether an existing file at `path` may be replaced.
    - `protect`: input files that must never be overwritten.

    **Returns:** the path written.

    The origin goes into NSTART when it is a whole number of voxels (placed alike by ChimeraX,
    gemmi, cctbx and mrcfile users), else into the ORIGIN field.
    """
    path = check_map_path(path)
    data, grid = map_array(density, grid, what=f"the map to write to {path}", dtype=np.float32)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    voxel = np.asarray(grid.voxel_size)
    origin = np.asarray(grid.origin)
    whole, nstart = _is_whole_voxels(origin, voxel)
    if not whole:
        warnings.warn(
            f"{path}: the origin {tuple(round(float(o), 4) for o in origin)} Å is not a whole number of voxels, so it goes into the "
            "MRC ORIGIN field; ChimeraX and mrcfile place it right, gemmi's reader ignores that field",
            stacklevel=2,
        )
    with atomic_path(path, protect=protect) as tmp:
        tmp_plain = tmp.with_name(tmp.name + ".mrc") if path.suffix == ".gz" else tmp
        # mrcfile writes the header (for a 1-voxel placeholder, then sized for the map) and the
        # map's values follow it one z-chunk at a time, with the statistics summed the same way:
        # nothing of the map's size is allocated (mrcfile's set_data and update_header_stats hold
        # a float32 temporary of the whole map, a memory map its pages)
        nz, ny, nx = data.shape
        with mrcfile.new(str(tmp_plain), overwrite=True) as mrc:
            mrc.set_data(np.zeros((1, 1, 1), np.float32))  # mode 2
            mrc.header.nx, mrc.header.ny, mrc.header.nz = nx, ny, nz
            mrc.header.mx, mrc.header.my, mrc.header.mz = nx, ny, nz
            mrc.voxel_size = tuple(float(v) for v in voxel)
            if whole:
                mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = (int(v) for v in nstart)
                mrc.header.origin = (0.0, 0.0, 0.0)
            else:
                mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
                mrc.header.origin = tuple(float(v) for v in origin)
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean, mrc.header.rms = _header_stats(data)
            offset = mrc.header.nbytes + int(mrc.header.nsymbt)
        with open(tmp_plain, "r+b") as f:
            f.seek(offset)
            f.truncate()  # the placeholder voxel
            for s in _z_chunks(data.shape):
                data[s].tofile(f)
        if path.suffix == ".gz":
            with open(tmp_plain, "rb") as src, gzip.open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp_plain.unlink()
    return path
