"""One call from atoms to a map: picks the volume and render function for a method."""

from __future__ import annotations

from typing import Literal

from .._atoms import Atoms, validate_atoms
from .._grid import Grid
from ..scattering import get_table
from ..volumes import GaussianMixtureVolume, IndependentAtomVolume, resolution_to_blur
from ._gaussian_mixture import GaussianMixtureRenderFn
from ._nufft import NufftRenderFn

METHODS = ("gaussian", "fourier")


def render_model(
    atoms: Atoms,
    grid: Grid,
    resolution: float = 0.0,
    *,
    method: Literal["gaussian", "fourier"] = "gaussian",
    table: str = "electron",
    sampling: Literal["average", "point"] = "average",
):
    """Render `atoms` onto `grid` at `resolution` Å (concrete inputs; checks them first).

    **Arguments:**

    - `atoms`: an `Atoms` pytree (an ensemble renders the mean map of its members).
    - `grid`: the target grid.
    - `resolution`: D in Å. For `method="gaussian"` it becomes the extra blur
      `B = 4 D²` (`resolution_to_blur`); 0 means the atoms' own B only. For `method="fourier"`
      it is the hard cut |s| <= 1/D of the Fourier synthesis.
    - `method`: `"gaussian"` (5-Gaussian scattering factors, `GaussianMixtureRenderFn`) or
      `"fourier"` (the exact finite-resolution Fourier map, `NufftRenderFn`; needs jax-finufft).
    - `table`: `"electron"` or `"xray"`.
    - `sampling`: `"average"` (exact voxel averages) or `"point"`.

    **Returns:** the map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    validate_atoms(atoms)
    tab = get_table(table, dtype=atoms.positions.dtype)
    tab.check_elements(atoms.atomic_numbers)
    if method == "fourier":
        if resolution <= 0:
            raise ValueError("the Fourier map needs a resolution D > 0 Å (the cut |s| <= 1/D)")
        return NufftRenderFn(grid, resolution, sampling=sampling)(IndependentAtomVolume.from_atoms(atoms, tab))
    volume = GaussianMixtureVolume.from_atoms(atoms, tab, extra_b=resolution_to_blur(resolution))
    return GaussianMixtureRenderFn(grid, sampling=sampling)(volume)
