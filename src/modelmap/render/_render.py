"""One call from atoms to a map: picks the volume and render function for a method."""

from __future__ import annotations

from typing import Literal

import jax

from .._atoms import Atoms, Ensemble, validate_atoms
from .._grid import Grid
from ..scattering import get_table
from ..volumes import (
    DEFAULT_SHELL_TERMS,
    GaussianMixtureVolume,
    IndependentAtomVolume,
    ShellDecompositionVolume,
)
from ._base import AbstractRenderFn, is_traced
from ._gaussian_mixture import GaussianMixtureRenderFn
from ._nufft import NufftRenderFn
from ._shells import ShellRenderFn
from ._slabs import NoAtomOnGridError, SlabPlan, stream_slabs
from ._splat_fourier import SplatFourierRenderFn

METHODS = ("gaussian", "fourier", "shells")


def fourier_render_fn(grid: Grid, sampling: str = "point", platform: str | None = None) -> AbstractRenderFn:
    """The render function of the Fourier map for `platform` (default: JAX's default backend):
    `NufftRenderFn` on the CPU, `SplatFourierRenderFn` (pure JAX, the same map to 1e-5) elsewhere,
    unless a CUDA build of jax-finufft is installed."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        try:
            import jax_finufft.jax_finufft_gpu  # noqa: F401
        except ImportError:
            return SplatFourierRenderFn(grid, sampling=sampling, eps=1e-5)
    return NufftRenderFn(grid, sampling=sampling)


def render_model(
    atoms: Atoms | Ensemble,
    grid: Grid,
    resolution=0.0,
    *,
    method: Literal["gaussian", "fourier", "shells"] = "gaussian",
    table: str = "electron",
    sampling: Literal["average", "point"] = "average",
    n_terms: int = DEFAULT_SHELL_TERMS,
):
    """Render `atoms` onto `grid` at `resolution` Å (concrete inputs; checks them first).

    **Arguments:**

    - `atoms`: one structure (`Atoms`) or an `Ensemble` (the weighted mean map of its members).
    - `grid`: the target grid.
    - `resolution`: D in Å. For `method="gaussian"` it becomes the extra blur
      `B = 4 D²` (`resolution_to_blur`); 0 means the atoms' own B only. For `method="fourier"`
      it is the hard cut |s| <= 1/D of the Fourier synthesis. For `method="shells"` it is each
      atom's resolution: a scalar, or an `(n,)` array of per-atom values in [1, 10] Å.
    - `method`: `"gaussian"` (5-Gaussian scattering factors, `GaussianMixtureRenderFn`),
      `"fourier"` (the exact finite-resolution Fourier map: `NufftRenderFn` on the CPU,
      `SplatFourierRenderFn` on a GPU unless jax-finufft has a CUDA build) or
      `"shells"` (the same images from the shell decomposition, a resolution per atom;
      `ShellRenderFn`).
    - `table`: `"electron"` or `"xray"`.
    - `sampling`: `"average"` (exact voxel averages) or `"point"`; the shell map is always
      sampled at the grid points (`"average"` is refused for it).
    - `n_terms`: terms kept per atom by the shell method (6 by default; 12-16 for a precise map).

    Memory: the Gaussian and shell maps are rendered whole when the map and its working memory fit
    the memory limit (`$MODELMAP_MEMORY_LIMIT`, else the device's or the machine's memory), else
    streamed by z-slabs (`SlabPlan`, `stream_slabs`: the same map, returned as a numpy array); a
    grid whose slabs cannot fit either is a `GridTooLargeError` naming the sizes, before anything
    of its size is allocated.

    **Returns:** the map `(nz, ny, nx)` (Å⁻² for the electron table, e/Å³ for X-ray).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if is_traced(atoms, resolution):
        raise ValueError(
            "render_model checks and plans concrete inputs, and these are traced (inside jit/grad/vmap). "
            "Inside a transformation build a volume and a planned render function outside it, e.g. "
            "`fn = GaussianMixtureRenderFn(grid).with_plan(GaussianMixtureVolume.from_atoms(atoms, D))` "
            "(or `.with_bounds(RenderBounds(...))`), then call `fn(GaussianMixtureVolume.from_atoms(atoms, D))`"
        )
    validate_atoms(atoms.atoms if isinstance(atoms, Ensemble) else atoms)
    tab = get_table(table)
    tab.check_elements(atoms.atoms.atomic_numbers if isinstance(atoms, Ensemble) else atoms.atomic_numbers)
    if method == "shells" and sampling != "point":
        raise ValueError("the shell map is sampled at grid points: pass sampling='point'")
    volume = volume_for_method(method, atoms, resolution, table, n_terms)
    if method == "fourier":
        return fourier_render_fn(grid, sampling)(volume)
    fn = ShellRenderFn(grid) if method == "shells" else GaussianMixtureRenderFn(grid, sampling=sampling)
    if isinstance(atoms, Ensemble):
        return fn(volume)
    # the fewest z-slabs whose working memory fits (1: the whole map at once)
    try:
        slabs = SlabPlan.build(fn, volume)
    except NoAtomOnGridError:
        return fn(volume)  # an empty map, as the whole grid renders it
    return fn(volume) if slabs.n_slabs == 1 else stream_slabs(slabs, volume)


def volume_for_method(method: str, atoms, resolution, table: str = "electron", n_terms: int = DEFAULT_SHELL_TERMS):
    """The volume a method renders (`"gaussian"`, `"fourier"` or `"shells"`; see `render_model`)."""
    if method == "gaussian":
        return GaussianMixtureVolume.from_atoms(atoms, resolution, table)
    if method == "fourier":
        return IndependentAtomVolume.from_atoms(atoms, resolution, table)
    if method == "shells":
        return ShellDecompositionVolume.from_atoms(atoms, resolution, table, n_terms=n_terms)
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
