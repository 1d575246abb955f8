"""Local resolution: the resolution at which two maps stop agreeing, voxel by voxel (issue 20).

The method is cctbx's `iotbx.map_model_manager.map_model_manager.local_resolution_map` (the
cctbx/Phenix project), done with FFTs and pointwise operations in JAX so that it runs on a GPU too:

1. both maps are split into `n_shells` resolution shells (band-passes) between s = 0 and
   `1/d_min` (Å⁻¹);
2. in every shell the local correlation of the two band-passed maps is computed in a window around
   each voxel (a sphere of radius `radius` Å by default, as cctbx's top-hat; or a Gaussian): for
   half maps it is the local half-map FSC, FSC_half(s; x);
3. at every voxel the frequency where the local correlation first falls below the threshold is found,
   scanning from low to high s and interpolating linearly in s between the shell centres; the local
   resolution is 1/s there.

Two differences from cctbx, both measured in `benchmarks/bench_analysis_locres.py`: cctbx takes the
*finest* shell whose correlation is still at or above the threshold (and the coarsest below it), so
one noisy excursion above the threshold at high resolution makes a voxel look better; here the
*first* crossing from low resolution is taken. cctbx also smooths the finished map with the window;
here it is not smoothed (the correlations already are).

Thresholds: 0.143 for two half maps (Rosenthal & Henderson 2003, J. Mol. Biol. 333, 721) and 0.5 for a
map against a model map (phenix.mtriage's d_fsc_model; 0.5 against a noise-free reference corresponds
to 0.143 between half maps, since FSC_ref = √(2 FSC/(1 + FSC))).

Shells. Shell k (k = 1…n) is centred at s_k = k·Δs with Δs = (1/d_min)/n and spans
[s_k - Δs/2, s_k + Δs/2] with raised-cosine edges `edge`·Δs wide (`shell_transfer`; 0.5 by default:
softer than cctbx's hard bins, whose real-space ringing is longer, and narrower than cos² shells,
which blur the crossing). Neighbouring shells sum to one (a partition of unity). cctbx bins hold equal
numbers of reflections; the crossing is interpolated between shell centres the same way.

Units and conventions: Å, maps `(nz, ny, nx)` on a `Grid`; resolution d = 1/s. The FFT is periodic,
so a window that crosses the box's edge wraps around (as in cctbx).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._errors import ModelmapError
from .._grid import Grid
from .._interpolate import interpolate_map
from ..shells import D_RANGE
from ._fourier import frequency_magnitude, local_correlation, local_mean, window_transfer

__all__ = [
    "LocalResolution",
    "local_resolution",
    "local_resolution_model",
    "atom_local_resolution",
    "density_mask",
    "synthetic_half_maps",
    "shell_transfer",
    "HALF_MAP_THRESHOLD",
    "MODEL_THRESHOLD",
]

HALF_MAP_THRESHOLD = 0.143
MODEL_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class LocalResolution:
    """A local-resolution map and how it was made.

    **Fields:**

    - `resolution`: `(nz, ny, nx)` float32 numpy array, the local resolution in Å at every voxel
      (no mask applied; `d_max` where the maps disagree already in the first shell, `d_min` where
      they agree up to the last one).
    - `shells`: `(n,)` shell centres s_k in Å⁻¹.
    - `threshold`: the correlation level whose crossing defines the resolution.
    - `radius`, `kernel`: the correlation window (Å; "sphere" or "gaussian").
    - `d_min`: the finest resolution examined (Å, 1/s_n); `d_max`: 1/s_1 (Å).
    - `global_resolution`: the FSC resolution of the whole maps at the same threshold (Å;
      `modelmap.scores.fsc`), `inf` if the first shell is already below it.
    - `low_limit`, `high_limit`: boolean maps of the voxels whose value is a limit (the correlation was
      below the threshold already in the first shell / never fell below it).
    """

    resolution: np.ndarray
    shells: np.ndarray
    threshold: float
    radius: float
    kernel: str
    d_min: float
    d_max: float
    global_resolution: float
    low_limit: np.ndarray
    high_limit: np.ndarray

    def settings(self) -> dict:
        """The settings and shells as plain numbers (for a JSON summary)."""
        return {"threshold": self.threshold, "radius_A": self.radius, "kernel": self.kernel,
                "d_min_A": self.d_min, "d_max_A": self.d_max, "n_shells": int(self.shells.size),
                "shell_centres_per_A": [float(s) for s in self.shells],
                "global_resolution_A": self.global_resolution}


def _smooth_step(u, edge):
    """0 below -edge/2, 1 above +edge/2, a raised cosine between (a hard step for edge = 0)."""
    if edge <= 0:
        return (u >= 0).astype(jnp.float32)
    t = jnp.clip(u / edge + 0.5, 0.0, 1.0)
    return 0.5 - 0.5 * jnp.cos(jnp.pi * t)


def shell_transfer(s, lower, upper, edge):
    """Transfer function of one resolution shell: 1 on [lower, upper] (Å⁻¹), with raised-cosine edges
    `edge` × (upper - lower) wide centred on the two boundaries (0: a hard bin; 1: a cos² shell that
    overlaps its neighbours up to their centres). Shells of the same width and edge on consecutive
    boundaries sum to one at every |s| (a partition of unity): pass the very same boundary values.

    **Arguments:** `s` frequencies |s| (Å⁻¹); `lower`, `upper` the shell's boundaries (Å⁻¹); `edge` a
    fraction in [0, 1].
    """
    width = upper - lower
    return _smooth_step((s - lower) / width, edge) - _smooth_step((s - upper) / width, edge)


@partial(jax.jit, static_argnames=("shape", "edge"))
def _crossing_scan(f1, f2, s_mag, centres, ds, window, threshold, shape, edge):
    """First crossing below `threshold` of the shell-wise local correlation (see the module docs).

    Returns `(s_cross, low, high)`: the crossing frequency per voxel and the two limit flags."""

    def body(carry, shell):
        s_k, lower, upper = shell
        found, s_cross, prev = carry
        band = shell_transfer(s_mag, lower, upper, edge)
        b1 = jnp.fft.irfftn(f1 * band, s=shape)
        b2 = jnp.fft.irfftn(f2 * band, s=shape)
        # the correlation does not depend on each map's scale: bring both to unit mean square so that a
        # weak shell (a model map at a large B) is not lost under local_correlation's variance floor
        b1 = b1 * jax.lax.rsqrt(jnp.maximum(jnp.mean(b1 * b1), 1e-30))
        b2 = b2 * jax.lax.rsqrt(jnp.maximum(jnp.mean(b2 * b2), 1e-30))
        cc = local_correlation(b1, b2, window, centred=False)
        below = cc < threshold
        new = ~found & below
        # linear interpolation in s between the previous shell (above) and this one (below); on the
        # first shell there is no previous one: the crossing is at s_1 (a limit)
        frac = jnp.clip((prev - threshold) / jnp.maximum(prev - cc, 1e-6), 0.0, 1.0)
        s_here = jnp.where(s_k == centres[0], s_k, s_k - ds + frac * ds)
        s_cross = jnp.where(new, s_here, s_cross)
        return (found | below, s_cross, cc), None

    init = (jnp.zeros(shape, bool), jnp.full(shape, centres[-1], jnp.float32), jnp.ones(shape, jnp.float32))
    # consecutive shells share the very same boundary values, so that their transfers sum to one
    bounds = (jnp.arange(centres.size + 1, dtype=jnp.float32) + 0.5) * ds
    (found, s_cross, _), _ = jax.lax.scan(body, init, (centres, bounds[:-1], bounds[1:]))
    return s_cross, found


def _check_pair(a, b, grid: Grid, what: str):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.ndim != 3 or a.shape != tuple(grid.shape) or b.shape != a.shape:
        raise ModelmapError(f"{what} must be two (nz, ny, nx) maps on the grid {tuple(grid.shape)}, got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not (bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))):
        raise ModelmapError(f"{what}: a map has NaN or infinite values")
    if float(jnp.std(a)) == 0.0 or float(jnp.std(b)) == 0.0:
        raise ModelmapError(f"{what}: a map is constant (no signal to correlate)")
    return a, b


def local_resolution(
    half1: Float[ArrayLike, "nz ny nx"],
    half2: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    *,
    threshold: float = HALF_MAP_THRESHOLD,
    d_min: float | None = None,
    n_shells: int = 20,
    radius: float | None = None,
    radius_ratio: float = 1.0,
    kernel: str = "sphere",
    edge: float = 0.5,
) -> LocalResolution:
    """Local resolution of two half maps: where the local half-map FSC falls below 0.143.

    The shell-wise local correlation of cctbx's `local_resolution_map` (see the module docs), in JAX:
    per shell one band-pass of each half map and three windowed means, each an FFT over the whole map
    (memory: a few maps, whatever the number of shells).

    **Arguments:**

    - `half1`, `half2`: the two half maps, `(nz, ny, nx)` on `grid`.
    - `grid`: their grid (Å).
    - `threshold`: the FSC level (0.143, the half-map convention; `local_resolution_model` uses 0.5).
    - `edge`: the shells' soft edges, a fraction of their width (`shell_transfer`).
    - `d_min`: the finest resolution examined, Å (default the Nyquist resolution, 2 × voxel size).
    - `n_shells`: number of shells between s = 0 and 1/d_min (20, as cctbx).
    - `radius`: the correlation window, Å (the sphere's radius or the Gaussian's σ). Default
      `radius_ratio` × the global FSC resolution (cctbx: the map's resolution), at least 2 voxels.
    - `kernel`: "sphere" (cctbx's top-hat) or "gaussian".

    **Returns:** a `LocalResolution` (the map in Å, the shells, the settings, the global FSC
    resolution).

    Raises `ModelmapError` for maps of the wrong shape, non-finite or constant maps, or bad settings.
    """
    from ..scores import fsc, fsc_resolution

    a, b = _check_pair(half1, half2, grid, "local resolution")
    v_max = float(max(grid.voxel_size))
    nyquist = 2.0 * v_max
    if d_min is None:
        d_min = nyquist
    if not (np.isfinite(d_min) and d_min >= nyquist - 1e-6):
        raise ModelmapError(f"d_min must be at least the Nyquist resolution {nyquist:g} Å of the map's grid "
                            f"(voxel {v_max:g} Å), got {d_min}")
    if not (isinstance(n_shells, (int, np.integer)) and 2 <= n_shells <= 200):
        raise ModelmapError(f"n_shells must be an integer in [2, 200], got {n_shells}")
    s_fsc, curve = fsc(np.asarray(a), np.asarray(b), grid=grid)
    global_d = float(fsc_resolution(s_fsc, curve, threshold))
    if radius is None:
        if not (radius_ratio > 0):
            raise ModelmapError(f"radius_ratio must be > 0, got {radius_ratio}")
        base = global_d if np.isfinite(global_d) else 2.0 * d_min
        radius = max(radius_ratio * base, 2.0 * v_max)
    if not (np.isfinite(radius) and radius > 0):
        raise ModelmapError(f"the window radius must be a positive number of Å, got {radius}")
    if kernel not in ("sphere", "gaussian"):
        raise ModelmapError(f"kernel must be 'sphere' or 'gaussian', got {kernel!r}")
    if not 0.0 <= edge <= 1.0:
        raise ModelmapError(f"edge must be a fraction in [0, 1] of the shell width, got {edge}")
    ds = (1.0 / d_min) / n_shells
    centres = (np.arange(1, n_shells + 1) * ds).astype(np.float32)
    window = window_transfer(grid, float(radius), kernel)
    s_cross, found_any = _crossing_scan(jnp.fft.rfftn(a), jnp.fft.rfftn(b), frequency_magnitude(grid),
                                        jnp.asarray(centres), jnp.float32(ds), window, jnp.float32(threshold),
                                        tuple(grid.shape), float(edge))
    s_cross = np.asarray(s_cross)
    return LocalResolution(
        resolution=(1.0 / s_cross).astype(np.float32),
        shells=centres,
        threshold=float(threshold),
        radius=float(radius),
        kernel=kernel,
        d_min=float(1.0 / centres[-1]),
        d_max=float(1.0 / centres[0]),
        global_resolution=global_d,
        low_limit=np.asarray(s_cross <= centres[0] * (1 + 1e-6)),
        high_limit=~np.asarray(found_any),
    )



def local_resolution_model(
    density: Float[ArrayLike, "nz ny nx"],
    model_map: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    *,
    threshold: float = MODEL_THRESHOLD,
    **settings,
) -> LocalResolution:
    """Local resolution of a map against a model map: where their local correlation falls below 0.5.

    The same shell-wise local correlation as `local_resolution` (cctbx's `local_resolution_map` with a
    model), with the map-vs-model threshold 0.5 (phenix.mtriage's d_fsc_model convention). The model
    map should carry signal to high resolution (render it with the atoms' B and no resolution cut, or
    a cut finer than `d_min`): where it has no power the correlation is meaningless.

    **Arguments:** `density` the experimental (full) map and `model_map` the model map, on `grid`;
    `threshold` 0.5; `settings` those of `local_resolution` (`d_min`, `n_shells`, `radius`,
    `radius_ratio`, `kernel`, `edge`).

    **Returns:** a `LocalResolution`.
    """
    return local_resolution(density, model_map, grid, threshold=threshold, **settings)


def density_mask(
    data: Float[ArrayLike, "nz ny nx"], grid: Grid, radius: float, *, sigma: float = 1.0
) -> Bool[np.ndarray, "nz ny nx"]:
    """Voxels inside the molecule: the map smoothed by a Gaussian of σ = `radius` Å above its mean +
    `sigma` standard deviations (of the smoothed map).

    **Returns:** a boolean `(nz, ny, nx)` numpy array.
    """
    smooth = np.asarray(local_mean(jnp.asarray(data, jnp.float32), window_transfer(grid, radius, "gaussian")))
    return smooth > smooth.mean() + sigma * smooth.std()


def atom_local_resolution(
    locres: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    positions: Float[ArrayLike, "n 3"],
    *,
    d_range: tuple[float, float] = D_RANGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom resolutions sampled from a local-resolution map, ready for `ShellDecompositionVolume`.

    The map is interpolated trilinearly at the atoms (`interpolate_map`); values are clipped into
    `d_range` (the shell tables' range, `modelmap.shells.D_RANGE` = [1, 10] Å) and atoms outside the
    map's box get the median of the others.

    **Arguments:**

    - `locres`: the local-resolution map (Å) on `grid`.
    - `positions`: `(n, 3)` atom positions, Å (x, y, z).
    - `d_range`: the range values are clipped to.

    **Returns:** `(resolution, flag)`: `(n,)` float32 per-atom resolutions in Å, and an `(n,)` int8
    flag: 0 in range, 1 clipped up to `d_range[0]`, 2 clipped down to `d_range[1]`, 3 outside the box.
    """
    pos = np.asarray(positions, np.float32)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] == 0:
        raise ModelmapError(f"positions must be an (n, 3) array with n >= 1, got shape {pos.shape}")
    data = jnp.asarray(locres, jnp.float32)
    if data.shape != tuple(grid.shape):
        raise ModelmapError(f"the local-resolution map {tuple(data.shape)} is not on the grid {tuple(grid.shape)}")
    lo, hi = float(d_range[0]), float(d_range[1])
    values = np.asarray(interpolate_map(data, grid, jnp.asarray(pos), fill=np.nan), np.float64)
    outside = ~np.isfinite(values)
    if outside.all():
        raise ModelmapError("no atom lies inside the local-resolution map's box")
    flag = np.zeros(values.shape, np.int8)
    flag[values < lo] = 1
    flag[values > hi] = 2
    flag[outside] = 3
    values = np.where(outside, np.median(values[~outside]), values)
    return np.clip(values, lo, hi).astype(np.float32), flag


def synthetic_half_maps(
    atoms,
    resolution: Float[ArrayLike, " n"],
    grid: Grid,
    *,
    key: Array,
    noise: float = 1.0,
    edge_width: float = 0.05,
    method: str = "shells",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two half maps with a known local-resolution field, for testing local-resolution methods.

    The atoms of each resolution D (all atoms with the same value of `resolution`) are rendered with
    `ShellDecompositionVolume` at D (their finite-resolution images, with the atoms' own B) and then
    low-passed with a steep raised-cosine edge ending at 1/D (`lowpass`, edge `edge_width`/D wide):
    the shell images alone taper around 1/D (amplitude about one half at 1/D), so without the cut a
    region of high signal-to-noise would be resolvable somewhat beyond D. Each half map is the sum of
    the regions plus independent white Gaussian noise of standard deviation `noise` × the signal's
    standard deviation over the voxels inside the molecule (`density_mask`); the spectral SNR then
    falls with s as the signal's |F|² (form factors × exp(-B s²/2)), as in a real reconstruction.

    **Arguments:**

    - `atoms`: `modelmap.Atoms` of one structure.
    - `resolution`: `(n,)` per-atom resolutions D in Å (in the shell tables' range [1, 10]).
    - `grid`: the maps' grid.
    - `key`: a `jax.random` key (the two noise maps come from its split).
    - `noise`: noise standard deviation relative to the signal's inside the molecule.
    - `edge_width`: the low-pass edge as a fraction of 1/D.
    - `method`: "shells" (the shell decomposition at each atom's D, as above) or "gaussian" (the
      atoms' 5-Gaussian images at their own B, `GaussianMixtureVolume`, then the same steep cut at
      1/D: the same resolution field, a faster render).

    **Returns:** `(half1, half2, signal)`, float32 `(nz, ny, nx)` numpy arrays.
    """
    from ..render import GaussianMixtureRenderFn, ShellRenderFn
    from ..volumes import GaussianMixtureVolume, ShellDecompositionVolume
    from ._fourier import lowpass

    res = np.asarray(resolution, np.float32).reshape(-1)
    n = int(np.asarray(atoms.positions).shape[-2])
    if res.shape != (n,):
        raise ModelmapError(f"resolution must have one value per atom ({n}), got shape {res.shape}")
    if method == "shells":
        render = ShellRenderFn(grid)
        volume = ShellDecompositionVolume.from_atoms(atoms, res)
    elif method == "gaussian":
        render = GaussianMixtureRenderFn(grid, sampling="point")
        volume = GaussianMixtureVolume.from_atoms(atoms)
    else:
        raise ModelmapError(f"method must be 'shells' or 'gaussian', got {method!r}")
    occupancies = volume.occupancies
    signal = jnp.zeros(grid.shape, jnp.float32)
    for d in np.unique(res):
        # one region at a time: the others at occupancy 0 (the same plan, compiled once)
        region = eqx.tree_at(lambda v: v.occupancies, volume, jnp.where(jnp.asarray(res == d), occupancies, 0.0))
        signal = signal + lowpass(render(region), grid, float(d), edge_width)
    signal = np.asarray(signal, np.float32)
    sd = float(signal[density_mask(signal, grid, 2.0 * float(max(grid.voxel_size)), sigma=0.5)].std())
    k1, k2 = jax.random.split(key)
    n1 = np.asarray(jax.random.normal(k1, grid.shape, jnp.float32)) * (noise * sd)
    n2 = np.asarray(jax.random.normal(k2, grid.shape, jnp.float32)) * (noise * sd)
    return signal + n1, signal + n2, signal
