"""MapQ emulation: what makes `q_score` reproduce MapQ's numbers (gregdp/mapq `qscores.py`).

- `mapq_min_max`: the reference Gaussian's floor and peak (`MinMaxD`);
- the exact estimator `evaluate_exact`: float64 Pearson correlation over the probes, with the map
  values from Chimera's float32 trilinear interpolation (`interpolate_map_chimera`, what MapQ's
  numbers contain) or plain float64 interpolation;
- `model_parts`: the scored atoms at the model file's own float64 coordinates;
- `mapq_regrid`: the re-sampled map that MapQ's multi-process mode (`CalcQpn`) scores;
- `expected_q` / `estimated_resolution`: MapQ's fits of Q against resolution.

MapQ run with more than one process (`CalcQpn`; command line `np=N`, GUI "2/4/8/auto") scores
against a map re-sampled by `MaskMapResize`; `mapq_regrid` reproduces that map. Through it, MapQ's
published per-atom Q-scores for EMD-30342/7CEC chain A (3 decimals) are matched for all 4308 atoms
(max deviation 0.0005, i.e. rounding) and its 6-decimal per-residue table to about 1e-5: a residual
per-atom noise of a few 1e-6 remains whose source (Chimera build arithmetic) could not be pinned down.
It is at the level where MapQ's own numbers depend on float32 details of the run: emulating
`CalcQpn`'s split of the atoms (sorted by x) over 1 to 32 processes, one box each, and the float32
or float64 arithmetic of the box's grid points and of the index transforms moves 1e-6-sized
differences around (55-72 % of the 1606 residue values exact, max 0.8-1.9e-5) without removing
them, so the single box is kept.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from .._atoms import AtomLabels, Atoms
from .._errors import ModelmapError
from .._grid import Grid
from .._interpolate import interpolate_map_chimera, interpolate_map_numpy
from ..io._map import DensityMap, map_array
from ..io._model import AtomicModel
from ._probes import QProbes, as_positions, direction_table, table_index

__all__ = ["Interpolation", "mapq_min_max", "evaluate_exact", "model_parts", "map_parts", "mapq_regrid",
           "expected_q", "estimated_resolution"]

Interpolation = Literal["chimera", "float64"]


# --------------------------------------------------------------------------------------------------
# The exact estimator
# --------------------------------------------------------------------------------------------------


def mapq_min_max(data: ArrayLike) -> tuple[float, float]:
    """MapQ's `MinMaxD`: the reference Gaussian's floor and peak from whole-map statistics.

    maxD = min(mean + 10·sd, max), minD = max(mean - sd, min), with the population sd over every
    voxel (zeros of a zoned map included). The reference is then A·exp(-r²/2σ²) + B with
    A = maxD - minD, B = minD. (Pearson's correlation makes A and B irrelevant for any A > 0.)

    **Returns:** `(minD, maxD)` as floats.
    """
    m = np.asarray(data)
    if m.size == 0:
        raise ValueError("the map is empty")
    mean, sd = float(np.mean(m, dtype=np.float64)), float(np.std(m, dtype=np.float64))
    return max(mean - sd, float(np.min(m))), min(mean + 10.0 * sd, float(np.max(m)))


def evaluate_exact(
    data: np.ndarray,
    grid: Grid,
    pos: np.ndarray,
    probes: QProbes,
    sigma: float,
    interpolation: Interpolation,
    a_b: tuple[float, float],
) -> np.ndarray:
    """Per-atom Q in float64 from concrete probes (only the kept probes are interpolated)."""
    if interpolation == "chimera":
        interp = functools.partial(interpolate_map_chimera, np.asarray(data, np.float32), grid)
    elif interpolation == "float64":
        interp = functools.partial(interpolate_map_numpy, np.asarray(data, np.float64), grid)
    else:
        raise ValueError(f"interpolation must be 'chimera' or 'float64', got {interpolation!r}")
    min_d, max_d = a_b
    amp, base = max_d - min_d, min_d
    n_atoms = pos.shape[0]
    n_pts = probes.n_points
    mask = np.asarray(probes.mask)
    n_tried = np.asarray(probes.n_tried)
    radii = np.asarray(probes.radii)
    table = direction_table(n_pts, probes.max_points)
    # shift both series by their r = 0 values before summing (exact Pearson, no cancellation)
    center = interp(pos).astype(np.float64)
    g0 = amp * math.exp(-0.5 * (0.0 / sigma) ** 2) + base
    w0 = float(n_pts) if probes.include_center else 0.0
    cnt = np.full(n_atoms, w0)
    su = np.zeros(n_atoms)
    suu = np.zeros(n_atoms)
    sv = np.zeros(n_atoms)
    svv = np.zeros(n_atoms)
    suv = np.zeros(n_atoms)
    for s, rad in enumerate(radii):
        a, p = np.nonzero(mask[:, s, :])
        if a.size == 0:
            continue
        offs = table[table_index(n_tried[a, s], n_pts), p] * rad
        vals = interp(pos[a] + offs).astype(np.float64)
        du = vals - center[a]
        dv = (amp * math.exp(-0.5 * (rad / sigma) ** 2) + base) - g0
        c = np.bincount(a, minlength=n_atoms).astype(np.float64)
        bu = np.bincount(a, weights=du, minlength=n_atoms)
        cnt += c
        su += bu
        suu += np.bincount(a, weights=du * du, minlength=n_atoms)
        sv += c * dv
        svv += c * dv * dv
        suv += bu * dv
    with np.errstate(invalid="ignore", divide="ignore"):
        mu, mv = su / cnt, sv / cnt
        cov = suv - cnt * mu * mv
        var_u = np.maximum(suu - cnt * mu * mu, 0.0)
        var_v = np.maximum(svv - cnt * mv * mv, 0.0)
        den = np.sqrt(var_u * var_v)
        q = np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(q, -1.0, 1.0)


def map_parts(density_map) -> tuple[np.ndarray, Grid]:
    data, grid = map_array(density_map, what="the map", dtype=None)
    return data, grid


def model_parts(model_or_atoms: AtomicModel | Atoms) -> tuple[np.ndarray, np.ndarray, AtomLabels | None]:
    """The atoms to score as MapQ sees them.

    **Arguments:**

    - `model_or_atoms`: an `AtomicModel` (scored at its file's float64 coordinates when its positions
      are their float32 rounding) or one structure's `Atoms`.

    **Returns:** `(positions (n, 3) float64 in Å, is_hydrogen (n,), labels or None)`.
    """
    labels = None
    atoms = model_or_atoms
    if isinstance(model_or_atoms, AtomicModel):
        atoms, labels = model_or_atoms.atoms, model_or_atoms.labels
    if not isinstance(atoms, Atoms):
        raise TypeError(
            "q_score needs an AtomicModel (modelmap.read_model) or an Atoms pytree, got "
            f"{type(model_or_atoms).__name__}"
        )
    pos = np.asarray(atoms.positions)
    z = np.asarray(atoms.atomic_numbers)
    if pos.ndim != 2:
        raise ValueError(f"positions of shape {pos.shape}: score one model of an ensemble at a time")
    pos = as_positions(pos, "atom positions")
    if np.asarray(atoms.positions).dtype != np.float64 and labels is not None:
        pos = _source_positions(model_or_atoms, pos)
    return pos, z == 1, labels


def _source_positions(model: AtomicModel, pos32: np.ndarray) -> np.ndarray:
    """The float64 coordinates of the source structure when `pos32` is just them in float32.

    `read_model` stores float32 positions by default, which moves atoms by up to ~8e-6 Å at 150 Å
    from the origin: enough to flip MapQ's probe rejections at near ties. When every position is
    the float32 rounding of the file's coordinate, the file's float64 coordinates are used.
    """
    src = model.labels.source_index
    if model.structure is None or src is None or len(src) != pos32.shape[0]:
        return pos32
    try:
        gm = model.structure[int(model.model_indices[0])]
        exact = np.array(
            [gm[int(c)][int(r)][int(a)].pos.tolist() for c, r, a in src], np.float64
        ).reshape(-1, 3)
    except (IndexError, TypeError, AttributeError):
        return pos32
    if np.array_equal(exact.astype(np.float32), pos32.astype(np.float32)):
        return exact
    return pos32


# --------------------------------------------------------------------------------------------------
# Expected Q for a resolution
# --------------------------------------------------------------------------------------------------


# (slope, intercept) of Q = slope·R + intercept, from gregdp/mapq `qscores.py` eQ_protein,
# eQ_nucleic, eQ_ion, eQ_water (ions and water have one line for both sigmas there).
_EXPECTED_LINEAR = {
    ("protein", 0.6): (-0.1775, 1.1192),
    ("protein", 0.4): (-0.1866, 1.1242),
    ("nucleic", 0.6): (-0.1377, 0.9973),
    ("nucleic", 0.4): (-0.1465, 0.9436),
    ("ion", 0.6): (-0.1103, 1.0795),
    ("ion", 0.4): (-0.1103, 1.0795),
    ("water", 0.6): (-0.0895, 1.0001),
    ("water", 0.4): (-0.0895, 1.0001),
}
# cubic fits of MapQ's `ExpectedQScore` (coefficients of R³, R², R, 1)
_EXPECTED_CUBIC = {
    0.6: (-0.0019064058, 0.0499875375, -0.4513945578, 1.5361860733),
    0.4: (-0.0020025943, 0.0504435042, -0.4343663048, 1.3945104702),
}


def _sigma_key(sigma: float) -> float:
    for s in (0.6, 0.4):
        if abs(float(sigma) - s) < 1e-5:
            return s
    raise ValueError(f"MapQ has expected-Q fits only for sigma 0.6 and 0.4 Å, got {sigma!r}")


def expected_q(resolution: ArrayLike, sigma: float = 0.6, kind: str = "protein"):
    """Expected Q-score at a map resolution, from MapQ's fits (gregdp/mapq `qscores.py`).

    `kind="protein"`: Q = -0.1775·R + 1.1192 (σ = 0.6) or -0.1866·R + 1.1242 (σ = 0.4)
    (`eQ_protein`); `"nucleic"`: -0.1377·R + 0.9973 / -0.1465·R + 0.9436; `"ion"`:
    -0.1103·R + 1.0795; `"water"`: -0.0895·R + 1.0001 (`eQ_ion`, `eQ_water`, same for both σ);
    `"cubic"`: the cubic `ExpectedQScore` that MapQ's per-residue tables use now.

    **Arguments:**

    - `resolution`: map resolution R in Å (scalar or array).
    - `sigma`: 0.6 or 0.4 Å.
    - `kind`: `"protein"`, `"nucleic"`, `"ion"`, `"water"` or `"cubic"`.

    **Returns:** the expected Q (float or array, like `resolution`).
    """
    r = np.asarray(resolution, np.float64)
    if np.any(~np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    s = _sigma_key(sigma)
    if kind == "cubic":
        c3, c2, c1, c0 = _EXPECTED_CUBIC[s]
        out = c3 * r**3 + c2 * r**2 + c1 * r + c0
    else:
        if (kind, s) not in _EXPECTED_LINEAR:
            raise ValueError(f"kind must be protein, nucleic, ion, water or cubic, got {kind!r}")
        a, b = _EXPECTED_LINEAR[(kind, s)]
        out = a * r + b
    return float(out) if out.ndim == 0 else out


def estimated_resolution(q: ArrayLike, sigma: float = 0.6, kind: str = "protein"):
    """Resolution in Å at which MapQ's linear fit expects this Q: R = (Q - b)/a.

    MapQ's "Est.Res." column: (Q - 1.1192)/-0.1775 for protein at σ = 0.6.

    **Arguments:**

    - `q`: Q-score(s).
    - `sigma`: 0.6 or 0.4 Å.
    - `kind`: `"protein"`, `"nucleic"`, `"ion"` or `"water"`.

    **Returns:** the resolution in Å (float or array).
    """
    s = _sigma_key(sigma)
    if (kind, s) not in _EXPECTED_LINEAR:
        raise ValueError(f"kind must be protein, nucleic, ion or water, got {kind!r}")
    a, b = _EXPECTED_LINEAR[(kind, s)]
    out = (np.asarray(q, np.float64) - b) / a
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------------
# MapQ's multi-process re-gridding
# --------------------------------------------------------------------------------------------------


def _py2_round(x: np.ndarray) -> np.ndarray:
    """Python 2 `round()`: halves away from zero."""
    x = np.asarray(x, np.float64)
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def mapq_regrid(density_map, atoms_or_positions, *, bound: int = 6):
    """The map that MapQ's multi-process mode actually scores: `MaskMapResize` (gregdp/mapq).

    `CalcQpn` (MapQ with more than one process) writes, for each process, a box around that
    process's atoms: `bound` = 6 voxels beyond the atoms' extreme fractional grid indices (box size
    rounded to whole voxels); its origin is the original origin plus that offset, **rounded to a
    multiple of the voxel size in absolute coordinates**; its values are the original map
    trilinearly interpolated (Chimera, float32) at the new grid points, 0 outside the original
    map; it is saved as MRC (float32 ORIGIN field, cell = voxel·n in float32). When the original
    origin is not a multiple of the voxel size (the common case for cropped maps) the new grid is
    shifted by a fraction of a voxel and every value is a re-interpolation: scores differ from a
    single-process run by up to ~0.2 per atom.

    The values on the common absolute grid do not depend on how the atoms were split over the
    processes; the box only decides where the map ends (values beyond are 0), and it reaches about
    6 voxels (at least 5) past every atom, well beyond the 2 Å probe shells and their interpolation
    cells. So one box around all scored atoms gives the Q-scores of any number of processes.
    (`MaskMapResize` also takes a radius `R`, which it does not use.)

    **Arguments:**

    - `density_map`: the original `DensityMap`.
    - `atoms_or_positions`: the scored atoms (`AtomicModel`, `Atoms` or `(n, 3)` positions, Å);
      hydrogens in an `AtomicModel`/`Atoms` are dropped, as MapQ only scores non-H atoms.
    - `bound`: margin in voxels (MapQ: 6; smaller margins can cut off probes, whose values become 0).

    **Returns:** the re-gridded `DensityMap` (float32 data).
    """
    if isinstance(bound, bool) or int(bound) != bound or bound < 0:
        raise ValueError(f"bound must be a whole number of voxels >= 0, got {bound!r}")
    data, grid = map_parts(density_map)
    if isinstance(atoms_or_positions, (Atoms, AtomicModel)):
        pos, is_h, _ = model_parts(atoms_or_positions)
        pos = pos[~is_h]
    else:
        pos = as_positions(atoms_or_positions, "positions")
    if pos.shape[0] == 0:
        raise ModelmapError("mapq_regrid needs at least one (non-H) atom")
    step = np.asarray(grid.voxel_size, np.float64)
    origin = np.asarray(grid.origin, np.float64)
    # _multiscale.get_atom_coordinates -> float32; xyz_to_ijk applied to the float32 array
    inv = 1.0 / step
    ijk = (pos.astype(np.float32).astype(np.float64) * inv + inv * -origin).astype(np.float32)
    lo = ijk.min(0).astype(np.float64) - bound
    hi = ijk.max(0).astype(np.float64) + bound
    n_xyz = _py2_round(step * (hi - lo + 1) / step).astype(int)
    new_origin = _py2_round((origin + lo * step) / step) * step
    # grid points of the new box (float32, as VolumeData.grid_indices + affine_transform_vertices)
    ax = [
        (new_origin[a] + step[a] * np.arange(n_xyz[a], dtype=np.float64)).astype(np.float32)
        for a in range(3)
    ]
    zz, yy, xx = np.meshgrid(ax[2], ax[1], ax[0], indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1)
    values = interpolate_map_chimera(data, grid, pts)
    # Chimera's MRC writer: ORIGIN field (float32), cell = step * size (float32), nstart 0
    cell = (step * n_xyz).astype(np.float32).astype(np.float64)
    new_grid = Grid(
        tuple(int(n) for n in n_xyz[::-1]),
        tuple(cell / n_xyz),
        tuple(new_origin.astype(np.float32).astype(np.float64)),
    )
    return DensityMap(jnp.asarray(values), new_grid)
