"""Masks on a map's grid built from atoms: the bulk-solvent "model mask" and atom neighbourhoods.

Both follow cctbx, the library behind phenix.map_model_cc (Afonine et al. 2018, Acta Cryst. D74,
814-825), so that the CCs computed over them are Phenix's:

- `model_mask` is the mask of `mmtbx.masks.mask_from_xray_structure` (C++ `mmtbx::masks::atom_mask`,
  `compute_accessible_surface` + `compute_contact_surface`), the flat bulk-solvent mask of Jiang &
  Brünger (1994, J. Mol. Biol. 243, 100-115) with van der Waals radii
  (`cctbx.eltbx.van_der_waals_radii`). `five_cc` calls the voxels where this mask is 0 "inside"
  and computes CC_mask over them.
- `atom_neighbourhood_mask` is `cctbx.maptbx.grid_indices_around_sites`: every grid point within a
  radius (inclusive) of any atom; local CCs (per residue, per chain) use it.

**Periodicity.** cctbx works in the P1 unit cell that *is* the map box, so atoms near one face also
mask voxels near the opposite face. modelmap's maps are not periodic (DESIGN.md), so by default both
masks are computed as on an infinite grid and cropped to the box; `periodic=True` reproduces cctbx's
wrap-around exactly. The two agree whenever every atom is farther than
`r_vdw + solvent_radius + shrink_radius` (about 3.8 Å for C) from the box faces, as in a map boxed
around its model.

Both functions are plain numpy (a mask is a discrete selection, not something to differentiate);
the result is a concrete boolean array to hand to the JAX CC functions.
"""

from __future__ import annotations

import math

import gemmi
import numpy as np
from jaxtyping import ArrayLike, Bool
from scipy import ndimage

from .._atoms import Atoms
from .._errors import InvalidAtomsError, ModelmapError
from .._grid import Grid

__all__ = [
    "CCTBX_VDW_RADII",
    "vdw_radii",
    "model_mask",
    "atom_neighbourhood_mask",
    "neighbourhood_indices",
]

#: van der Waals radii in Å used by cctbx's bulk-solvent mask (`cctbx.eltbx.van_der_waals_radii.vdw`):
#: C, N, O, S, P from Fokine & Urzhumtsev (2002, Acta Cryst. D58, 1387) / Fokine et al. (2003,
#: J. Appl. Cryst. 36, 352), most others from Bondi (1964, J. Phys. Chem. 68, 441).
CCTBX_VDW_RADII: dict[str, float] = {
    "H": 1.20, "D": 1.20, "He": 1.40, "Li": 1.82, "Be": 0.63, "B": 1.75, "C": 1.775, "N": 1.50,
    "O": 1.45, "F": 1.47, "Ne": 1.54, "Na": 2.27, "Mg": 1.73, "Al": 1.50, "Si": 2.10, "P": 1.90,
    "S": 1.80, "Cl": 1.75, "Ar": 1.88, "K": 2.75, "Ca": 1.95, "Sc": 1.32, "Ti": 1.95, "V": 1.06,
    "Cr": 1.13, "Mn": 1.19, "Fe": 1.26, "Co": 1.13, "Ni": 1.63, "Cu": 1.40, "Zn": 1.39, "Ga": 1.87,
    "Ge": 1.48, "As": 0.83, "Se": 1.90, "Br": 1.85, "Kr": 2.02, "Rb": 2.65, "Sr": 2.02, "Y": 1.61,
    "Zr": 1.42, "Nb": 1.33, "Mo": 1.75, "Tc": 2.00, "Ru": 1.20, "Rh": 1.22, "Pd": 1.63, "Ag": 1.72,
    "Cd": 1.58, "In": 1.93, "Sn": 2.17, "Sb": 1.12, "Te": 1.26, "I": 1.98, "Xe": 2.16, "Cs": 3.01,
    "Ba": 2.41, "La": 1.83, "Ce": 1.86, "Pr": 1.62, "Nd": 1.79, "Pm": 1.76, "Sm": 1.74, "Eu": 1.96,
    "Gd": 1.69, "Tb": 1.66, "Dy": 1.63, "Ho": 1.61, "Er": 1.59, "Tm": 1.57, "Yb": 1.54, "Lu": 1.53,
    "Hf": 1.40, "Ta": 1.22, "W": 1.26, "Re": 1.30, "Os": 1.58, "Ir": 1.22, "Pt": 1.72, "Au": 1.66,
    "Hg": 1.55, "Tl": 1.96, "Pb": 2.02, "Bi": 1.73, "Po": 1.21, "At": 1.12, "Rn": 2.30, "Fr": 3.24,
    "Ra": 2.57, "Ac": 2.12, "Th": 1.84, "Pa": 1.60, "U": 1.75, "Np": 1.71, "Pu": 1.67, "Am": 1.66,
    "Cm": 1.65, "Bk": 1.64, "Cf": 1.63,
}


def _radius_by_z() -> np.ndarray:
    table = np.full(99, np.nan)
    for symbol, r in CCTBX_VDW_RADII.items():
        table[gemmi.Element(symbol).atomic_number] = r
    return table


_VDW_BY_Z = _radius_by_z()


def vdw_radii(atomic_numbers: ArrayLike, radii: str = "cctbx") -> np.ndarray:
    """Van der Waals radii (Å) of atoms by atomic number, as cctbx's bulk-solvent mask uses them.

    **Arguments:**

    - `atomic_numbers`: `(n,)` integers Z.
    - `radii`: the table; only `"cctbx"` (`CCTBX_VDW_RADII`) is defined.

    **Returns:** `(n,)` float64 radii. Raises `ModelmapError` for an element the table lacks
    (cctbx raises "Atoms with unknown van der Waals radius" there too).
    """
    if radii != "cctbx":
        raise ValueError(f"unknown radii table {radii!r}; use 'cctbx' or pass per-atom radii")
    z = np.asarray(atomic_numbers, np.int64).reshape(-1)
    bad = (z < 1) | (z > 98)
    r = np.full(z.shape, np.nan)
    r[~bad] = _VDW_BY_Z[z[~bad]]
    bad |= np.isnan(r)
    if bad.any():
        zs = sorted(set(int(v) for v in z[bad]))
        raise ModelmapError(f"no van der Waals radius for atomic number(s) {zs} in the cctbx table")
    return r


def _positions(positions, what: str) -> np.ndarray:
    pos = np.asarray(positions, np.float64)
    if pos.ndim != 2 or pos.shape[-1] != 3:
        raise InvalidAtomsError(
            f"{what}: positions must be (n, 3) for one model, got shape {pos.shape}"
            + (" (an ensemble: pass one member)" if pos.ndim == 3 else "")
        )
    if not np.all(np.isfinite(pos)):
        raise InvalidAtomsError(f"{what}: positions contain NaN or infinite values")
    return pos


def _hit_indices(
    positions: np.ndarray,
    radii: np.ndarray,
    grid: Grid,
    pad: int,
    shape: tuple[int, int, int],
    periodic: bool,
    inclusive: bool,
    chunk_voxels: int = 1 << 22,
):
    """Yield flat indices (C order in `shape`) of grid points within `radii[a]` of atom `a`.

    `shape` is `grid.shape + 2·pad` (grid point (0,0,0) of `grid` is index `(pad, pad, pad)`). With
    `periodic`, indices wrap around `shape` (then `pad` must be 0), else points outside are dropped.
    Distances are exact (float64) from each grid point's position; `inclusive` chooses `d <= r` over
    `d < r`. Indices may repeat (atoms' neighbourhoods overlap). Memory is bounded by chunking atoms.
    """
    if positions.shape[0] == 0:
        return
    voxel = np.asarray(grid.voxel_size)[::-1]  # (vz, vy, vx)
    origin = (np.asarray(grid.origin) - pad * np.asarray(grid.voxel_size))[::-1]
    nshape = np.asarray(shape)  # (nz, ny, nx)
    strides = (shape[1] * shape[2], shape[2], 1)
    pos_zyx = positions[:, ::-1]
    # group atoms by radius so that each group shares one window of offsets
    for r in np.unique(radii):
        pos = pos_zyx[radii == r]
        half = np.ceil(r / voxel).astype(int) + 1
        offs = [np.arange(-h, h + 1) for h in half]
        base = np.floor((pos - origin) / voxel).astype(np.int64)  # (n, 3) z, y, x
        window = int(np.prod([len(o) for o in offs]))
        per_chunk = max(1, chunk_voxels // window)
        r2 = r * r
        for start in range(0, len(pos), per_chunk):
            p = pos[start : start + per_chunk]
            d2, flat = 0.0, 0
            for ax in range(3):  # separable: squared distance and flat index per axis
                idx = base[start : start + per_chunk, ax, None] + offs[ax][None]  # (c, w)
                dd = (origin[ax] + idx * voxel[ax] - p[:, ax, None]) ** 2
                if periodic:
                    idx = np.mod(idx, nshape[ax])
                else:
                    dd = np.where((idx >= 0) & (idx < nshape[ax]), dd, np.inf)
                expand = [slice(None)] + [None] * 3
                expand[ax + 1] = slice(None)
                d2 = d2 + dd[tuple(expand)]
                flat = flat + (idx * strides[ax])[tuple(expand)]
            hit = d2 <= r2 if inclusive else d2 < r2
            yield np.broadcast_to(flat, hit.shape)[hit]


def _mark_within(out, positions, radii, grid, pad, periodic, inclusive) -> None:
    """Set `out` True at grid points within `radii[a]` of atom `a` (see `_hit_indices`)."""
    flat = out.reshape(-1)
    for idx in _hit_indices(positions, radii, grid, pad, out.shape, periodic, inclusive):
        flat[idx] = True


def neighbourhood_indices(
    positions: ArrayLike, grid: Grid, radius: float, *, periodic: bool = False
) -> np.ndarray:
    """Sorted unique flat indices (C order in `grid.shape`) of the grid points within `radius`
    (inclusive) of any of `positions`: `atom_neighbourhood_mask(...).ravel().nonzero()[0]` without
    allocating a map-sized array (used for many small selections, e.g. one per residue)."""
    pos = _positions(np.asarray(positions, np.float64).reshape(-1, 3), "neighbourhood_indices")
    r = np.full(pos.shape[0], float(radius))
    parts = list(_hit_indices(pos, r, grid, 0, grid.shape, periodic, inclusive=True))
    if not parts:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(parts))


def _check_radius(value, name: str, allow_zero: bool = True) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number >= 0 Å, got {value}")
    return v


def model_mask(
    atoms: Atoms,
    grid: Grid,
    *,
    solvent_radius: float = 1.1,
    shrink_radius: float = 0.9,
    radii: str | ArrayLike = "cctbx",
    periodic: bool = False,
) -> Bool[np.ndarray, "nz ny nx"]:
    """The "inside the macromolecule" mask of phenix.map_model_cc on `grid`.

    cctbx's flat bulk-solvent mask (`mmtbx.masks.mask_from_xray_structure`, C++
    `atom_mask::compute_accessible_surface` and `compute_contact_surface`), as `five_cc` uses it
    (Afonine et al. 2018, Acta Cryst. D74, 814):

    1. a grid point closer than `r_vdw` to some atom is macromolecule;
    2. a grid point closer than `r_vdw + solvent_radius` to some atom but not in (1) is
       "accessible"; every other grid point is solvent;
    3. an accessible grid point closer than `shrink_radius` to a solvent grid point becomes solvent,
       the others become macromolecule.

    All comparisons are strict (`d < r`), as in cctbx; distances are float64 from each grid point.
    Step 3 is an exact Euclidean distance transform (`scipy.ndimage.distance_transform_edt`). Every
    atom counts, hydrogens and zero-occupancy atoms included, because `five_cc` passes the whole
    structure (the refinement mask of `mmtbx.masks.manager` drops them; this one does not).

    Note that with voxels coarser than `shrink_radius` (0.9 Å), step 3 finds no neighbour and the
    mask is simply "within r_vdw + solvent_radius of an atom".

    **Arguments:**

    - `atoms`: an `Atoms` pytree of one model (not an ensemble).
    - `grid`: the map's grid.
    - `solvent_radius`: probe radius in Å (cctbx `solvent_radius`, 1.1).
    - `shrink_radius`: shrink-truncation radius in Å (cctbx `shrink_truncation_radius`, 0.9).
    - `radii`: `"cctbx"` (`CCTBX_VDW_RADII`: C 1.775, N 1.5, O 1.45, S 1.8, P 1.9, H 1.2 Å) or an
      `(n,)` array of per-atom radii in Å.
    - `periodic`: treat the box as a periodic P1 cell, exactly as cctbx does; by default the grid is
      extended beyond the box (atoms outside it still count) and cropped.

    **Returns:** a boolean numpy array `(nz, ny, nx)`, True inside the macromolecule.
    """
    pos = _positions(atoms.positions, "model_mask")
    solvent_radius = _check_radius(solvent_radius, "solvent_radius")
    shrink_radius = _check_radius(shrink_radius, "shrink_radius")
    if isinstance(radii, str):
        r_atom = vdw_radii(atoms.atomic_numbers, radii)
    else:
        r_atom = np.asarray(radii, np.float64).reshape(-1)
        if r_atom.shape != (pos.shape[0],):
            raise ValueError(f"radii must have one value per atom ({pos.shape[0]}), got {r_atom.shape}")
        if not np.all(np.isfinite(r_atom)) or (r_atom < 0).any():
            raise ValueError("radii must be finite and >= 0 Å")
    voxel = np.asarray(grid.voxel_size)
    # grid points within shrink_radius of the box decide step 3 for the box's own points
    pad = 0 if periodic else int(np.max(np.ceil(shrink_radius / voxel))) + 1
    shape = tuple(n + 2 * pad for n in grid.shape)
    core = np.zeros(shape, bool)
    accessible = np.zeros(shape, bool)
    _mark_within(core, pos, r_atom, grid, pad, periodic, inclusive=False)
    _mark_within(accessible, pos, r_atom + solvent_radius, grid, pad, periodic, inclusive=False)
    accessible |= core
    solvent = ~accessible
    if shrink_radius > 0 and solvent.any():
        sampling = tuple(grid.voxel_size[::-1])
        if periodic:
            wrap = tuple(int(math.ceil(shrink_radius / v)) + 1 for v in sampling)
            padded = np.pad(accessible, [(w, w) for w in wrap], mode="wrap")
            dist = ndimage.distance_transform_edt(padded, sampling=sampling)
            dist = dist[tuple(slice(w, w + n) for w, n in zip(wrap, shape))]
        else:
            dist = ndimage.distance_transform_edt(accessible, sampling=sampling)
        inside = core | (accessible & ~(dist < shrink_radius))
    else:
        inside = accessible
    if pad:
        inside = inside[pad:-pad, pad:-pad, pad:-pad]
    return np.ascontiguousarray(inside)


def atom_neighbourhood_mask(
    positions: ArrayLike,
    grid: Grid,
    radius: float | ArrayLike,
    *,
    periodic: bool = False,
) -> Bool[np.ndarray, "nz ny nx"]:
    """Grid points within `radius` (inclusive, `d <= r`) of any of the atoms.

    The voxel set of cctbx `maptbx.grid_indices_around_sites`, over which
    `mmtbx.maps.correlation.from_map_map_atoms` (local CC per residue, per chain, main chain and
    side chain in phenix.map_model_cc) correlates the two maps.

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å (an empty selection gives an empty mask).
    - `grid`: the map's grid.
    - `radius`: Å, one value or `(n,)` per atom.
    - `periodic`: wrap around the box as cctbx does; by default points outside the box are dropped.

    **Returns:** a boolean numpy array `(nz, ny, nx)`.
    """
    pos = np.asarray(positions, np.float64).reshape(-1, 3)
    pos = _positions(pos, "atom_neighbourhood_mask")
    r = np.broadcast_to(np.asarray(radius, np.float64), (pos.shape[0],)).copy()
    if not np.all(np.isfinite(r)) or (r < 0).any():
        raise ValueError(f"radius must be finite and >= 0 Å, got {radius}")
    out = np.zeros(grid.shape, bool)
    _mark_within(out, pos, r, grid, 0, periodic, inclusive=True)
    return out
