"""One call from atoms to a map: picks the volume and render function for a method."""

from __future__ import annotations

from typing import Literal

from .._atoms import Atoms, validate_atoms
from .._grid import Grid
from ..scattering import get_table
from ..volumes import GaussianMixtureVolume, resolution_to_blur
from ._gaussian_mixture import GaussianMixtureRenderFn

METHODS = ("gaussian",)


def render_model(
    atoms: Atoms,
    grid: Grid,
    resolution: float = 0.0,
    *,
    method: Literal["gaussian"] = "gaussian",
    table: str = "electron",
    sampling: Literal["average", "point"] = "average",
):
    """Render `atoms` onto `grid` at `resolution` Å (concrete inputs; checks them first).

    **Arguments:**

    - `atoms`: an `Atoms` pytree (an ensemble renders the mean map of its members).
    - `grid`: the target grid.
    - `resolution`: D in Å. For `method="gaussian"` it becomes the extra blur
      `B = 4 D²` (`resolution_to_blur`); 0 means the atoms' own B only.
    - `method`: `"gaussian"` (5-Gaussian scattering factors, `GaussianMixtureRenderFn`).
    - `table`: `"electron"` or `"xray"`.
    - `sampling`: `"average"` (exact voxel averages) or `"point"`.

    **Returns:** the map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    validate_atoms(atoms)
    tab = get_table(table, dtype=atoms.positions.dtype)
    tab.check_elements(atoms.atomic_numbers)
    volume = GaussianMixtureVolume.from_atoms(atoms, tab, extra_b=resolution_to_blur(resolution))
    return GaussianMixtureRenderFn(grid, sampling=sampling)(volume)
