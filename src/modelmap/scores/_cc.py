"""Map–model correlation coefficients as phenix.map_model_cc defines them.

Afonine, Klaholz, Moriarty, Poon, Sobolev, Terwilliger, Adams & Urzhumtsev (2018), "New tools for
the analysis and validation of cryo-EM maps and atomic models", Acta Cryst. D74, 814-825. The
implementation read here is cctbx's `mmtbx/maps/correlation.py` (`five_cc`,
`get_selection_above_cutoff`, `from_map_map_atoms`, `from_map_and_xray_structure_or_fmodel`),
`mmtbx/maps/map_model_cc.py` (`map_model_cc.run`) and `mmtbx/maps/mtriage.py` (`get_atom_radius`).
Every CC is a plain Pearson correlation (`flex.linear_correlation`) of the experimental map and the
model map over a set of voxels:

| score | voxels |
|---|---|
| CC_box | all voxels of the box |
| CC_mask | inside the model mask (`model_mask`, the bulk-solvent mask); `N_in` = their number |
| CC_volume | the model map's `N_in + 1` highest voxels, ties included (model map >= its (N_in+1)-th largest value) |
| CC_peaks | the union of the `N_in + 1` highest voxels of the map and those of the model map |
| local CC | within `atom_radius` of the selected atoms (per chain, per residue, main chain, side chain) |

**Model map.** Phenix's model map is the Fourier synthesis of the model's structure factors with
every reflection of `d >= resolution` (electron table, the atoms' own B and occupancy) on the map's
grid, the box being a P1 cell. Here it is `render_model(..., method="fourier", sampling="point")`,
the same sharp-sphere synthesis, but on a padded box that is cropped back, so that ripples of atoms
near one face do not wrap onto the opposite face. For a map boxed around its model the two maps
differ by 1-2 % of their peak near the faces but the CCs hardly move: EMD-30342/7CEC at 3.9 Å
(atoms >= 5.2 Å from the faces) < 2e-4; a peptide at 2 Å with a 5 Å cushion < 3e-4 when both maps
are periodic (Phenix's synthetic tests) and < 1.5e-3 (CC_box) when only the model map is. Against
cctbx's own numbers for 7CEC (CC_mask 0.8077, CC_box 0.9150, CC_volume 0.8101, CC_peaks 0.7477)
this module gives 0.8075, 0.9155, 0.8101, 0.7471. The model mask follows cctbx's `atom_mask` rule
(and equals gemmi's `SolventMasker(AtomicRadiiSet.Cctbx)` voxel for voxel), so the rest is most
likely the model map (cctbx computes structure factors with its own approximate FFT algorithm).

**Two implementations, one API.** Concrete inputs (numpy arrays, or JAX arrays outside any
transformation) are scored in float64 numpy and give a Python float. Traced inputs (inside
`jax.jit`, `jax.grad`, `jax.vmap`) go through a JAX implementation that is differentiable in both
maps, so that e.g. `-cc_mask(map, render(atoms), mask)` is a refinement loss. Voxel selections
(`where`, the model mask) should then be concrete boolean arrays, gathered once with static indices;
a traced boolean selection is used as 0/1 weights instead (same value, more work). The selections
of CC_volume and CC_peaks depend on the maps; inside a transformation they are recomputed from the
traced maps with `stop_gradient` (a discrete choice carries no gradient).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._atoms import Atoms, validate_atoms
from .._errors import ModelmapError
from .._grid import Grid
from .._residues import group_members, is_protein, residue_groups
from ..io import AtomicModel, DensityMap
from ..io._map import map_array
from ..scattering import atomic_image
from ._mask import model_mask, neighbourhood_indices

__all__ = [
    "pearson",
    "cc_box",
    "cc_mask",
    "cc_volume",
    "cc_peaks",
    "volume_selection",
    "peaks_selection",
    "MapModelCC",
    "map_model_cc",
    "carbon_image_radius",
    "local_cc_atom_radius",
    "ResidueCC",
    "LocalCC",
    "local_cc",
    "MAIN_CHAIN_ATOMS",
]

#: atom names of a protein residue that phenix.map_model_cc counts as main chain
#: (`"protein and (name C or name N or name CA or name O or name CB)"`).
MAIN_CHAIN_ATOMS = ("N", "CA", "C", "O", "CB")


# ---------------------------------------------------------------------------------------------------
# Pearson correlation: numpy float64 for concrete inputs, JAX for traced ones
# ---------------------------------------------------------------------------------------------------
def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _as_numpy_mask(where, shape, what: str = "where") -> np.ndarray:
    w = np.asarray(where)
    if w.dtype != bool:
        raise TypeError(f"{what} must be a boolean array, got dtype {w.dtype}")
    if w.shape != tuple(shape):
        raise ValueError(f"{what} has shape {w.shape}, the maps {tuple(shape)}")
    return w


def _check_same_shape(a, b, names=("map", "model map")) -> None:
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ModelmapError(
            f"{names[0]} {tuple(np.shape(a))} and {names[1]} {tuple(np.shape(b))} are not on the "
            "same grid (different shapes)"
        )


def _pearson_numpy(a, b, where) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if where is not None:
        w = _as_numpy_mask(where, a.shape)
        a, b = a[w], b[w]
    a, b = a.ravel(), b.ravel()
    if a.size == 0:
        raise ModelmapError("the voxel selection is empty: no voxel to correlate over")
    for x, name in ((a, "first"), (b, "second")):
        if not np.all(np.isfinite(x)):
            raise ModelmapError(f"the {name} map has NaN or infinite values in the selection")
    if a.max() == a.min() or b.max() == b.min():
        return 0.0
    da = a - a.mean()
    db = b - b.mean()
    den = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    return float(np.dot(da, db)) / den if den > 0 else 0.0


def _pearson_jax(a, b, where):
    dtype = jnp.result_type(a, b, jnp.float32)
    shape = np.shape(a)
    a = jnp.asarray(a, dtype).reshape(-1)
    b = jnp.asarray(b, dtype).reshape(-1)
    if where is not None and not _is_traced(where):
        idx = np.flatnonzero(_as_numpy_mask(where, shape))
        if idx.size == 0:
            raise ModelmapError("the voxel selection is empty: no voxel to correlate over")
        a, b, where = a[idx], b[idx], None
    if where is None:
        w = None
        ma, mb = jnp.mean(a), jnp.mean(b)
        da, db = a - ma, b - mb
        saa, sbb, sab = jnp.sum(da * da), jnp.sum(db * db), jnp.sum(da * db)
        const = (jnp.max(a) == jnp.min(a)) | (jnp.max(b) == jnp.min(b))
    else:
        if tuple(np.shape(where)) != tuple(shape):
            raise ValueError(f"where has shape {np.shape(where)}, the maps {tuple(shape)}")
        w = jnp.asarray(where).reshape(-1).astype(dtype)
        n = jnp.sum(w)
        ma, mb = jnp.sum(w * a) / n, jnp.sum(w * b) / n
        da, db = a - ma, b - mb
        saa, sbb, sab = jnp.sum(w * da * da), jnp.sum(w * db * db), jnp.sum(w * da * db)
        sel = w > 0
        const = (jnp.max(jnp.where(sel, a, -jnp.inf)) == jnp.min(jnp.where(sel, a, jnp.inf))) | (
            jnp.max(jnp.where(sel, b, -jnp.inf)) == jnp.min(jnp.where(sel, b, jnp.inf))
        )
    den2 = saa * sbb
    ok = (~const) & (den2 > 0)
    return jnp.where(ok, sab / jnp.sqrt(jnp.where(ok, den2, 1)), 0).astype(dtype)


def pearson(
    a: Float[ArrayLike, "..."], b: Float[ArrayLike, "..."], where: Bool[ArrayLike, "..."] | None = None
) -> float | Float[Array, ""]:
    """Pearson correlation of `a` and `b` (`flex.linear_correlation` in cctbx), over `where`.

    `Σ (a - ā)(b - b̄) / √(Σ (a - ā)² Σ (b - b̄)²)`, means taken over the selected elements; 0 when
    either input is constant over the selection (as cctbx and Chimera report it).

    **Arguments:**

    - `a`, `b`: arrays of the same shape (typically two maps `(nz, ny, nx)`).
    - `where`: optional boolean array of that shape: the elements to correlate over.

    **Returns:** for concrete inputs a Python float computed in float64 (two-pass, mean-centred);
    for traced inputs a JAX scalar in the inputs' dtype, differentiable in `a` and `b`.

    Raises `ModelmapError` for shapes that differ, an empty selection, or (concrete inputs) NaN or
    infinite values in the selection.
    """
    _check_same_shape(a, b, ("first array", "second array"))
    if _is_traced(a, b, where):
        return _pearson_jax(a, b, where)
    return _pearson_numpy(a, b, where)


def cc_box(map: Float[ArrayLike, "nz ny nx"], model_map: Float[ArrayLike, "nz ny nx"]):
    """CC_box: Pearson correlation over every voxel of the box (cctbx `correlation.from_map_map`).

    Inflated for a zoned (masked) map, whose many zero voxels match the model map's near-zero
    background. See `pearson` for the return type.
    """
    _check_same_shape(map, model_map)
    return pearson(map, model_map)


def cc_mask(
    map: Float[ArrayLike, "nz ny nx"],
    model_map: Float[ArrayLike, "nz ny nx"],
    mask: Bool[ArrayLike, "nz ny nx"],
):
    """CC_mask: Pearson correlation over the voxels inside `mask` (cctbx `five_cc.cc_mask`).

    **Arguments:**

    - `map`, `model_map`: the experimental and the model map on the same grid.
    - `mask`: boolean, True inside the molecule (`model_mask`); concrete for a jitted loss.

    **Returns:** see `pearson`. Raises `ModelmapError` for an empty mask.
    """
    _check_same_shape(map, model_map)
    if not _is_traced(mask) and not np.any(np.asarray(mask)):
        raise ModelmapError("the mask is empty: no voxel of the map is inside the model")
    return pearson(map, model_map, where=mask)


def _check_n(n: int, size: int) -> int:
    if isinstance(n, jax.core.Tracer):
        raise TypeError("n_inside must be a concrete integer (it fixes the number of voxels)")
    n = int(n)
    if not 0 <= n < size:
        raise ValueError(f"n_inside must be in [0, {size - 1}] for a map of {size} voxels, got {n}")
    return n


def _top_threshold(x, n: int):
    """The (n+1)-th largest value of x (cctbx `get_selection_above_cutoff`: sorted descending, [n])."""
    if _is_traced(x):
        flat = jax.lax.stop_gradient(jnp.asarray(x)).reshape(-1)
        return jnp.sort(flat)[flat.size - 1 - n]
    flat = np.asarray(x).reshape(-1)
    k = flat.size - 1 - n
    return np.partition(flat, k)[k]


def volume_selection(model_map: Float[ArrayLike, "nz ny nx"], n_inside: int):
    """Voxels of CC_volume: model map >= its `(n_inside + 1)`-th largest value (ties included).

    **Returns:** a boolean array of the map's shape (numpy for concrete input, JAX otherwise).
    """
    n = _check_n(n_inside, int(np.prod(np.shape(model_map))))
    return model_map >= _top_threshold(model_map, n)


def peaks_selection(
    map: Float[ArrayLike, "nz ny nx"], model_map: Float[ArrayLike, "nz ny nx"], n_inside: int
):
    """Voxels of CC_peaks: the union of the `n_inside + 1` highest voxels of `map` and of
    `model_map` (each >= its own `(n_inside + 1)`-th largest value, ties included).

    **Returns:** a boolean array of the maps' shape (numpy for concrete input, JAX otherwise).
    """
    _check_same_shape(map, model_map)
    n = _check_n(n_inside, int(np.prod(np.shape(map))))
    return (map >= _top_threshold(map, n)) | (model_map >= _top_threshold(model_map, n))


def cc_volume(
    map: Float[ArrayLike, "nz ny nx"], model_map: Float[ArrayLike, "nz ny nx"], n_inside: int
):
    """CC_volume: Pearson correlation over the `n_inside + 1` highest voxels of the model map,
    ties included (cctbx `five_cc._cc_volume`). `n_inside` is the number of voxels inside the model
    mask. See `pearson` for the return type."""
    _check_same_shape(map, model_map)
    return pearson(map, model_map, where=volume_selection(model_map, n_inside))


def cc_peaks(
    map: Float[ArrayLike, "nz ny nx"], model_map: Float[ArrayLike, "nz ny nx"], n_inside: int
):
    """CC_peaks: Pearson correlation over the union of the `n_inside + 1` highest voxels of the map
    and of the model map (cctbx `five_cc._cc_peaks`). See `pearson` for the return type."""
    return pearson(map, model_map, where=peaks_selection(map, model_map, n_inside))


# ---------------------------------------------------------------------------------------------------
# input handling shared by map_model_cc and local_cc
# ---------------------------------------------------------------------------------------------------
def _check_resolution(resolution) -> float:
    try:
        d = float(resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be a number of Å, got {resolution!r}") from None
    if not math.isfinite(d) or d <= 0:
        raise ValueError(f"resolution must be a finite number > 0 Å, got {resolution}")
    return d


def _map_data(map) -> tuple[np.ndarray, Grid]:
    return map_array(map, what="the map")


def _atoms_of(model) -> tuple[Atoms, object]:
    if isinstance(model, AtomicModel):
        atoms, labels = model.atoms, model.labels
    elif isinstance(model, Atoms):
        atoms, labels = model, None
    else:
        raise TypeError(f"model must be an AtomicModel or Atoms, got {type(model).__name__}")
    if atoms.is_ensemble:
        raise ModelmapError("the model is an ensemble; score one member (atoms of one model)")
    validate_atoms(atoms, "model")
    return atoms, labels



def _model_map(model_map, atoms, grid, resolution, table) -> np.ndarray:
    if model_map is None:
        from ..render import render_model

        return np.asarray(
            render_model(atoms, grid, resolution, method="fourier", sampling="point", table=table),
            np.float64,
        )
    if isinstance(model_map, DensityMap) and not model_map.grid.same_as(grid):
        raise ModelmapError(f"the model map's grid {model_map.grid} does not match the map's grid {grid}")
    data, _ = map_array(model_map, grid, what="the model map")
    return data


# ---------------------------------------------------------------------------------------------------
# map_model_cc
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MapModelCC:
    """The four global CCs of phenix.map_model_cc (see the module docs for their voxel sets).

    **Fields:** `cc_mask`, `cc_box`, `cc_volume`, `cc_peaks` (floats), `n_inside` (voxels inside
    the model mask, `N_in`), `resolution` (Å).
    """

    cc_mask: float
    cc_box: float
    cc_volume: float
    cc_peaks: float
    n_inside: int
    resolution: float


def map_model_cc(
    map: DensityMap,
    model: AtomicModel | Atoms,
    resolution: float,
    *,
    model_map: DensityMap | Float[ArrayLike, "nz ny nx"] | None = None,
    table: str = "electron",
    mask: Bool[ArrayLike, "nz ny nx"] | None = None,
) -> MapModelCC:
    """CC_mask, CC_box, CC_volume and CC_peaks of a model against a map, as phenix.map_model_cc
    (cctbx `mmtbx.maps.correlation.five_cc`; Afonine et al. 2018, Acta Cryst. D74, 814).

    **Arguments:**

    - `map`: the experimental `DensityMap`.
    - `model`: an `AtomicModel` or `Atoms` (one model, not an ensemble).
    - `resolution`: D in Å (> 0): the model map keeps every frequency |s| <= 1/D.
    - `model_map`: the model map on the map's grid; by default the Fourier map of `model` at
      `resolution` with the atoms' B and occupancies (`render_model(atoms, map.grid, resolution,
      method="fourier", sampling="point", table=table)`), which is Phenix's map_calc without the
      periodic wrap-around (see the module docs).
    - `table`: scattering table of the default model map (`"electron"`, Phenix's default).
    - `mask`: the "inside" voxels; by default `model_mask(atoms, map.grid)` (cctbx's bulk-solvent
      mask with vdW radii, solvent radius 1.1 Å, shrink radius 0.9 Å).

    **Returns:** a `MapModelCC`.

    Raises `ModelmapError` for NaN in the map, a model map or mask on another grid, an empty mask
    (the model is not in the box: check the map's origin), and `ValueError` for resolution <= 0.
    """
    d = _check_resolution(resolution)
    data, grid = _map_data(map)
    atoms, _ = _atoms_of(model)
    calc = _model_map(model_map, atoms, grid, d, table)
    if mask is None:
        inside = model_mask(atoms, grid)
    else:
        inside = _as_numpy_mask(mask, grid.shape, "mask")
    n_in = int(inside.sum())
    if n_in == 0:
        raise ModelmapError(
            "the model mask is empty: no voxel of the map lies inside the model (is the model inside "
            f"the map's box? map origin {grid.origin}, extent {grid.extent} Å)"
        )
    if n_in >= data.size:
        raise ModelmapError("the model mask covers the whole box; CC_volume/CC_peaks are undefined")
    return MapModelCC(
        cc_mask=_pearson_numpy(data, calc, inside),
        cc_box=_pearson_numpy(data, calc, None),
        cc_volume=_pearson_numpy(data, calc, volume_selection(calc, n_in)),
        cc_peaks=_pearson_numpy(data, calc, peaks_selection(data, calc, n_in)),
        n_inside=n_in,
        resolution=d,
    )


# ---------------------------------------------------------------------------------------------------
# local CC
# ---------------------------------------------------------------------------------------------------
def carbon_image_radius(resolution: float, b_iso: float, table: str = "electron") -> float:
    """Radius (Å) of the Fourier image of a carbon atom at `resolution` with B = `b_iso`, as cctbx
    `maptbx.atom_curves(scattering_type="C", scattering_table="electron").image(d_min, b_iso,
    radius_max=max(15, d_min), radius_step=0.01).radius`.

    The image ρ(r) = (2/r) ∫₀^{1/D} s f_C(s) exp(-B s²/4) sin(2π s r) ds is tabulated at
    r = 0, 0.01, 0.02, … < max(15, D) Å (cctbx integrates with Simpson's rule, 2000 steps; here
    Gauss-Legendre, `scattering.atomic_image`, which agrees to far below the 0.01 Å step). The first
    inflection point is the first r_i whose second difference ρ_{i-1} + ρ_{i+1} - 2ρ_i is positive,
    placed half-way, (r_{i-1} + r_i)/2; the radius is twice that.

    **Arguments:**

    - `resolution`: D in Å.
    - `b_iso`: B in Å² (phenix.map_model_cc uses the mean B of all atoms).
    - `table`: scattering table (`"electron"` in cctbx).

    **Returns:** the radius in Å.
    """
    d = _check_resolution(resolution)
    if not math.isfinite(b_iso):
        raise ValueError(f"b_iso must be finite, got {b_iso}")
    step = 0.01
    r = np.arange(int(math.ceil(max(15.0, d) / step - 1e-9))) * step
    rho = atomic_image(6, r, d, b_iso, table=table)
    dxx = np.empty_like(rho)
    dxx[0] = 2 * (rho[1] - rho[0])
    dxx[1:-1] = rho[:-2] + rho[2:] - 2 * rho[1:-1]
    dxx[-1] = dxx[-2]
    pos = np.flatnonzero(dxx > 0)
    if pos.size == 0:
        raise ModelmapError(
            f"the carbon image at {d} Å, B = {b_iso} Å² has no inflection point within {r[-1]:.2f} Å"
        )
    i = int(pos[0])
    inflection = 0.5 * (r[i - 1] + r[i]) if i > 0 else 0.0
    return 2.0 * inflection


def local_cc_atom_radius(resolution: float, b_iso_mean: float, table: str = "electron") -> float:
    """phenix.map_model_cc's atom radius for local CCs (cctbx `mtriage.get_atom_radius` without a
    map): `max(3, min(10, max(resolution, carbon_image_radius(resolution, b_iso_mean))))` Å."""
    d = _check_resolution(resolution)
    return float(max(3.0, min(10.0, max(d, carbon_image_radius(d, b_iso_mean, table)))))


class ResidueCC(NamedTuple):
    """Local CC of one residue: `chain`, `residue_number`, `insertion_code`, `residue_name`,
    `cc`, `n_atoms`, `b_iso_mean`, `occupancy_mean`."""

    chain: str
    residue_number: int
    insertion_code: str
    residue_name: str
    cc: float
    n_atoms: int
    b_iso_mean: float
    occupancy_mean: float


@dataclasses.dataclass(frozen=True)
class LocalCC:
    """Local CCs of phenix.map_model_cc.

    **Fields:**

    - `atom_radius`: Å; the voxels within this distance of the selected atoms are correlated.
    - `chains`: `{chain id: cc}` in order of appearance.
    - `residues`: a list of `ResidueCC`, in order of appearance.
    - `main_chain`: CC over protein N, CA, C, O, CB (None if the model has none).
    - `side_chain`: CC over every other atom (None if none).
    """

    atom_radius: float
    chains: dict[str, float]
    residues: list[ResidueCC]
    main_chain: float | None
    side_chain: float | None


def local_cc(
    map: DensityMap,
    model: AtomicModel,
    resolution: float,
    *,
    model_map: DensityMap | Float[ArrayLike, "nz ny nx"] | None = None,
    atom_radius: float | None = None,
    table: str = "electron",
    residues: bool = True,
) -> LocalCC:
    """Per-chain, per-residue, main-chain and side-chain CCs, as phenix.map_model_cc.

    cctbx `map_model_cc.run` with `correlation.from_map_and_xray_structure_or_fmodel.cc`: for a set
    of atoms, the Pearson correlation of map and model map over every voxel within `atom_radius`
    (inclusive) of any of the set's atoms (`atom_neighbourhood_mask`, cctbx
    `grid_indices_around_sites`). The model map is the same Fourier map as in `map_model_cc` (cctbx
    sigma-scales it, which does not change a correlation).

    The atom radius, unless given, is `local_cc_atom_radius(resolution, mean B of all atoms)`:
    max(3, min(10, max(D, r_C))) Å, with r_C the image radius of a carbon atom at the mean B
    (`carbon_image_radius`), as cctbx `mtriage.get_atom_radius`.

    Groups: chains by chain id (cctbx lists each chain object, so a chain id split into several
    parts, e.g. protein then waters, appears once per part there); residues by (chain, number,
    insertion code) with all their atoms (cctbx lists alternate conformers of a residue separately);
    main chain = N, CA, C, O, CB of amino-acid residues (gemmi's residue table decides what an amino
    acid is; cctbx uses its own "protein" selection); side chain = every other atom, ligands and
    waters included, as in cctbx.

    **Arguments:**

    - `map`: the experimental `DensityMap`.
    - `model`: an `AtomicModel` (labels are needed for the groups).
    - `resolution`: D in Å.
    - `model_map`: as in `map_model_cc`.
    - `atom_radius`: Å; by default Phenix's rule above.
    - `table`: scattering table of the default model map.
    - `residues`: also compute the per-residue CCs (one selection per residue).

    **Returns:** a `LocalCC`.
    """
    d = _check_resolution(resolution)
    data, grid = _map_data(map)
    if not isinstance(model, AtomicModel):
        raise TypeError("local_cc needs an AtomicModel (chain and residue labels), e.g. from read_model")
    atoms, labels = _atoms_of(model)
    calc = _model_map(model_map, atoms, grid, d, table)
    b = np.asarray(atoms.b_factors, np.float64)
    occ = np.asarray(atoms.occupancies, np.float64)
    if atom_radius is None:
        radius = local_cc_atom_radius(d, float(b.mean()), table)
    else:
        radius = float(atom_radius)
        if not math.isfinite(radius) or radius <= 0:
            raise ValueError(f"atom_radius must be a finite number > 0 Å, got {atom_radius}")
    pos = np.asarray(atoms.positions, np.float64)
    flat_map, flat_calc = data.reshape(-1), calc.reshape(-1)

    def cc_of(selection: np.ndarray) -> float:
        idx = neighbourhood_indices(pos[selection], grid, radius)
        if idx.size == 0:
            return float("nan")  # the atoms are all outside the box
        return _pearson_numpy(flat_map[idx], flat_calc[idx], None)

    chain_ids = np.asarray(labels.chain).astype(str)
    chains = {}
    for cid in dict.fromkeys(chain_ids.tolist()):
        chains[cid] = cc_of(chain_ids == cid)

    res_list: list[ResidueCC] = []
    if residues:
        names = np.asarray(labels.residue_name).astype(str)
        icodes = np.asarray(labels.insertion_code).astype(str)
        for sel in group_members(residue_groups(labels, altloc=False)):
            first = int(sel[0])
            res_list.append(
                ResidueCC(str(chain_ids[first]), int(labels.residue_number[first]), str(icodes[first]), str(names[first]),
                          cc_of(sel), len(sel), float(b[sel].mean()), float(occ[sel].mean()))
            )

    names_atom = np.char.strip(np.asarray(labels.atom_name).astype(str))
    main = is_protein(labels.residue_name) & np.isin(names_atom, MAIN_CHAIN_ATOMS)
    return LocalCC(
        atom_radius=radius,
        chains=chains,
        residues=res_list,
        main_chain=cc_of(main) if main.any() else None,
        side_chain=cc_of(~main) if (~main).any() else None,
    )
