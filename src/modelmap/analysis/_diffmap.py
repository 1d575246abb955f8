"""Difference maps: the experimental map minus the model map, scaled locally, in σ units, and their peaks.

    Δ(x) = m(x) − a(x) − k(x)·c(x)

with `m` the experimental map, `c` the model map rendered at every atom's own B (and its own local
resolution when one is given per atom), and `k(x)`, `a(x)` a scale and an offset fitted by weighted
least squares inside a Gaussian window around every voxel (FFT local means from `_fourier`): smooth
fields, no box seams. phenix.real_space_diff_map (cctbx `mmtbx/command_line/real_space_diff_map.py`)
instead fits `k·exp(−B s²/4)` of F_calc to F_obs separately in boxes of about 30 Å and pastes the
boxes together; servalcat's `fofc` (Yamashita, Palmer, Burnley & Murshudov 2021, Acta Cryst. D77,
1282) weights F_obs − D·F_calc per resolution shell with weights from half-map FSCs.

With half maps, each shell is weighted as in a σA / FSC-weighted map (Read 1986, Acta Cryst. A42,
140; Yamashita et al. 2021): the observed coefficients by w(s) = FSC_full(s) = 2·FSC_half/(1 + FSC_half)
(the fraction of signal in the averaged map), the model's by w(s)·D(s), D(s) = Re⟨F_o F_c*⟩/⟨|F_c|²⟩ the
model's scale in the shell; the local scale is fitted after that.

The difference is divided by a σ: the standard deviation of Δ over the map's support (global), or
a local σ(x) = √(windowed mean of Δ²) in a wider window (`sigma="local"`), so peaks read in σ as in
Coot and ChimeraX. Peaks are the local maxima above a threshold with sub-voxel positions (a parabola
through each axis' three values) and the nearest model atom.

Conventions: maps `(nz, ny, nx)` on a `Grid` (Å), positions x/y/z Å, B in Å², resolution in Å
(DESIGN.md). Pure JAX on the maps (FFTs and pointwise operations: the same code on CPU and GPU);
the peak list's nearest-atom search runs in numpy (scipy's k-d tree) on the few peaks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._atoms import Atoms, AtomLabels
from .._errors import ModelmapError
from .._grid import Grid
from ..render import render_model
from ._fourier import apply_radial_filter, frequency_magnitude, local_mean, soft_lowpass, window_transfer


class DifferenceMapError(ModelmapError, ValueError):
    """Bad input to `difference_map` or `difference_peaks` (shapes, resolutions, options)."""


@dataclasses.dataclass(frozen=True)
class DifferenceMap:
    """The result of `difference_map` (every map `(nz, ny, nx)` on the input grid, float32).

    - `difference`: Δ = m − a − k·c in the map's units (0 outside the support).
    - `normalised`: Δ/σ (σ units; what peaks and contours are read in).
    - `model_map`: the scaled model map a + k·c that was subtracted.
    - `scale`: k(x), the local scale of the model map to the map.
    - `offset`: a(x), the local offset.
    - `sigma`: the global σ (a float) or the local σ(x) map.
    - `support`: where the map is defined (bool): the voxels that are not exactly 0 in a masked map,
      else every voxel.
    - `b_fit`: the B (Å²) added to every atom's B by the global fit (`fit_b=True`), else 0.
    - `shell_weights`: with half maps, `(s, fsc_half, w, D)` per shell (Å⁻¹), else `None`.
    - `settings`: the options used (window radii, resolution, method).
    """

    difference: np.ndarray
    normalised: np.ndarray
    model_map: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    sigma: float | np.ndarray
    support: np.ndarray
    b_fit: float
    shell_weights: tuple | None
    settings: dict


@jax.jit
def local_scale_fit(
    m: Float[ArrayLike, "nz ny nx"],
    c: Float[ArrayLike, "nz ny nx"],
    weight: Float[ArrayLike, "nz ny nx"],
    window: Float[ArrayLike, "nz ny nxh"],
    ridge: float = 0.1,
) -> tuple[Float[Array, "nz ny nx"], Float[Array, "nz ny nx"]]:
    """Local least-squares scale and offset of `c` to `m`: min over k, a of Σ_y w(y) g(x−y) (m − a − k c)²
    at every voxel x, for a normalised window g (`window_transfer`) and voxel weights w (the support).

    Closed form from windowed moments: k = cov_g(m, c)/var_g(c), a = ⟨m⟩_g − k⟨c⟩_g (one FFT
    convolution per moment: smooth fields, no boxes). Where the model map is locally flat (solvent,
    far from atoms) the slope is pulled towards the global one k₀ by a ridge term:
    k = (cov + ρ·v̄·k₀)/(var + ρ·v̄), v̄ the mean local variance of `c` over the support.

    **Arguments:**

    - `m`, `c`: the map and the model map.
    - `weight`: voxel weights in [0, 1] (1 inside the support).
    - `window`: the window's transform (`window_transfer(grid, radius, "gaussian")`).
    - `ridge`: ρ above (0: plain local least squares).

    Jitted (one fused computation on CPU or GPU) and differentiable in `m` and `c`.

    **Returns:** `(k, a)`, maps.
    """
    m = jnp.asarray(m, jnp.float32)
    c = jnp.asarray(c, jnp.float32)
    w = jnp.asarray(weight, jnp.float32)
    n_w = jnp.maximum(jnp.sum(w), 1.0)
    # global weighted fit (the ridge's target)
    gm = jnp.sum(w * m) / n_w
    gc = jnp.sum(w * c) / n_w
    gvar = jnp.sum(w * (c - gc) ** 2) / n_w
    k0 = jnp.sum(w * (m - gm) * (c - gc)) / n_w / jnp.maximum(gvar, 1e-30)
    # windowed weighted moments (centred on the global means for float32 accuracy)
    mc, cc = m - gm, c - gc
    sw = local_mean(w, window)
    sw_safe = jnp.maximum(sw, 1e-6)
    mean_m = local_mean(w * mc, window) / sw_safe
    mean_c = local_mean(w * cc, window) / sw_safe
    cov = local_mean(w * mc * cc, window) / sw_safe - mean_m * mean_c
    var = jnp.maximum(local_mean(w * cc * cc, window) / sw_safe - mean_c * mean_c, 0.0)
    v_bar = jnp.sum(w * var) / n_w
    k = (cov + ridge * v_bar * k0) / jnp.maximum(var + ridge * v_bar, 1e-30)
    a = gm + mean_m - k * (gc + mean_c)
    # far outside the support (no weight in the window) fall back on the global fit
    inside = sw > 1e-3
    k = jnp.where(inside, k, k0)
    a = jnp.where(inside, a, gm - k0 * gc)
    return k, a


def shell_weights(
    half1: Float[ArrayLike, "nz ny nx"],
    half2: Float[ArrayLike, "nz ny nx"],
    model_map: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Array, Array]:
    """Per-shell weights of an FSC / σA-weighted difference map from two half maps.

    FSC_half per shell (the shells of `modelmap.scores.fsc`: one Fourier pixel of the longest edge),
    w = FSC_full = 2·FSC_half/(1 + FSC_half) clipped to [0, 1] (Rosenthal & Henderson 2003: the
    correlation of the averaged map with the truth is √FSC_full; FSC_full is the fraction of its power
    that is signal), and D = Re Σ F_o F_c*/Σ|F_c|² of the averaged map against the model map
    (Read 1986's D, the model's scale per shell).

    **Returns:** `(s, fsc_half, w, D)` per shell (numpy) and the weight maps `w(s)`, `w(s)·D(s)` in
    the `rfftn` layout (JAX), for `apply_radial_filter`. Coefficients beyond the last complete shell
    get weight 0.
    """
    from ..scores._fsc import shell_indices

    k, mult, ds = shell_indices(grid)
    n = int(k.max()) + 1
    f1 = jnp.fft.rfftn(jnp.asarray(half1, jnp.float32))
    f2 = jnp.fft.rfftn(jnp.asarray(half2, jnp.float32))
    fc = jnp.fft.rfftn(jnp.asarray(model_map, jnp.float32))
    fo = 0.5 * (f1 + f2)
    idx = jnp.asarray(np.where(k >= 0, k, n), jnp.int32).ravel()
    mw = jnp.asarray(mult, jnp.float32).ravel()

    def shell_sum(x):
        return jax.ops.segment_sum(mw * x.ravel(), idx, num_segments=n + 1)[:n]

    s12 = shell_sum(jnp.real(f1 * jnp.conj(f2)))
    s11 = shell_sum(jnp.abs(f1) ** 2)
    s22 = shell_sum(jnp.abs(f2) ** 2)
    fsc_half = np.asarray(s12 / jnp.sqrt(jnp.maximum(s11 * s22, 1e-30)), np.float64)
    oc = shell_sum(jnp.real(fo * jnp.conj(fc)))
    cc_ = shell_sum(jnp.abs(fc) ** 2)
    d = np.asarray(jnp.where(cc_ > 1e-30 * jnp.max(cc_), oc / jnp.maximum(cc_, 1e-30), 0.0), np.float64)
    fsc_half[0] = 1.0  # the mean: not a resolution shell
    w = np.clip(2.0 * fsc_half / (1.0 + np.maximum(fsc_half, 0.0)), 0.0, 1.0)
    w_full = np.append(w, 0.0)[np.where(k >= 0, k, n)]
    d_full = np.append(d, 0.0)[np.where(k >= 0, k, n)]
    s = np.arange(n) * ds
    return (s, fsc_half, w, d, jnp.asarray(w_full, jnp.float32), jnp.asarray(w_full * d_full, jnp.float32))


def _support_of(data: np.ndarray) -> np.ndarray:
    """The voxels a masked map defines: not exactly 0, when at least 1 % of the box is exactly 0
    (a masked or zoned map); else the whole box."""
    zero = data == 0
    return ~zero if zero.mean() >= 0.01 else np.ones(data.shape, bool)


def _check_resolution(resolution, n_atoms: int) -> np.ndarray:
    r = np.asarray(resolution, np.float64)
    if r.ndim == 0:
        r = np.full(n_atoms, float(r))
    if r.shape != (n_atoms,):
        raise DifferenceMapError(f"resolution must be one value or one per atom ({n_atoms}), got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise DifferenceMapError(f"resolution must be finite and above 0 Å, got {np.min(r):.3g} to {np.max(r):.3g}")
    return r


def difference_map(
    map: Float[ArrayLike, "nz ny nx"] | None,
    grid: Grid,
    atoms: Atoms,
    resolution: float | Float[ArrayLike, " n"],
    *,
    half_maps: tuple[Float[ArrayLike, "nz ny nx"], Float[ArrayLike, "nz ny nx"]] | None = None,
    model_map: Float[ArrayLike, "nz ny nx"] | None = None,
    method: str = "auto",
    table: str = "electron",
    scale_radius: float | None = None,
    fit_b: bool = False,
    b_range: tuple[float, float] = (-40.0, 120.0),
    sigma: str = "global",
    sigma_radius: float | None = None,
    support: ArrayLike | None = None,
    lowpass: bool = True,
    ridge: float = 0.1,
) -> DifferenceMap:
    """The model-aware difference map m − a(x) − k(x)·c(x) and its σ-normalised version.

    **Arguments:**

    - `map`: the experimental map `(nz, ny, nx)` on `grid`; `None` with `half_maps` (their mean).
    - `grid`: its grid (Å; the origin places the atoms).
    - `atoms`: the model (its per-atom B and occupancy are used as they are).
    - `resolution`: D in Å, one value or one per atom (e.g. a local-resolution map sampled at the
      atoms: `render`'s `atom_resolutions`).
    - `half_maps`: two half maps on `grid`: per-shell FSC / σA weights (module docs).
    - `model_map`: a model map already rendered on `grid` (then `atoms` only names the peaks' atoms).
    - `method`: how the model map is rendered: `"fourier"` (the exact Fourier map cut at 1/D, as
      F_calc to d_min in phenix.real_space_diff_map), `"shells"` (per-atom resolution,
      `ShellDecompositionVolume`), `"gaussian"`; `"auto"`: fourier for one D, shells for per-atom D.
    - `table`: scattering factors, `"electron"` or `"xray"`.
    - `scale_radius`: σ (Å) of the Gaussian window of the local scale fit (default max(2·D, 5 Å):
      FWHM 2.35σ, about 12 Å, a few residues, so that one missing side chain or ligand moves k little).
    - `fit_b`: also fit one B (Å², in `b_range`) added to every atom's B, by least squares over the
      support before the local fit (the map's overall blur relative to the model's B).
    - `sigma`: `"global"` (one σ over the support) or `"local"` (σ(x) in a window of `sigma_radius`,
      default 2·`scale_radius`, never below half the global σ).
    - `support`: bool mask of the voxels the map defines (default: not exactly 0 in a masked map).
    - `lowpass`: low-pass the map to min(D) (raised-cosine edge, 10 %) as the model map is, so that
      noise beyond D does not enter the difference.
    - `ridge`: pull of the local scale towards the global one where the model map is flat
      (`local_scale_fit`).

    **Returns:** a `DifferenceMap`.

    Raises `DifferenceMapError` for maps of the wrong shape, bad resolutions or options.
    """
    if sigma not in ("global", "local"):
        raise DifferenceMapError(f"sigma must be 'global' or 'local', got {sigma!r}")
    if method not in ("auto", "fourier", "shells", "gaussian"):
        raise DifferenceMapError(f"method must be auto, fourier, shells or gaussian, got {method!r}")
    if half_maps is not None:
        if len(half_maps) != 2:
            raise DifferenceMapError("half_maps takes two maps")
        h1, h2 = (np.asarray(h, np.float32) for h in half_maps)
        for name, h in (("half map 1", h1), ("half map 2", h2)):
            if h.shape != tuple(grid.shape):
                raise DifferenceMapError(f"{name} has shape {h.shape}, the grid {tuple(grid.shape)}")
        if map is None:
            map = 0.5 * (h1 + h2)
    if map is None:
        raise DifferenceMapError("give a map or two half maps")
    m = np.asarray(map, np.float32)
    if m.shape != tuple(grid.shape):
        raise DifferenceMapError(f"the map has shape {m.shape}, the grid {tuple(grid.shape)}")
    if not np.all(np.isfinite(m)):
        raise DifferenceMapError("the map has NaN or infinite values")
    res = _check_resolution(resolution, atoms.n_atoms)
    per_atom = not np.all(res == res[0])
    d_min = float(res.min())
    if method == "auto":
        method = "shells" if per_atom else "fourier"
    if per_atom and method != "shells":
        raise DifferenceMapError("a resolution per atom needs method='shells'")
    scale_radius = float(scale_radius) if scale_radius is not None else max(2.0 * d_min, 5.0)
    sigma_radius = float(sigma_radius) if sigma_radius is not None else 2.0 * scale_radius
    for name, v in (("scale_radius", scale_radius), ("sigma_radius", sigma_radius)):
        if not (math.isfinite(v) and v > 0):
            raise DifferenceMapError(f"{name} must be a finite number above 0 Å, got {v}")
    lo_b, hi_b = (float(b) for b in b_range)
    if fit_b and not lo_b < hi_b:
        raise DifferenceMapError(f"b_range must be (low, high) with low < high, got {b_range}")

    sup = _support_of(m) if support is None else np.asarray(support, bool)
    if sup.shape != m.shape:
        raise DifferenceMapError(f"the support has shape {sup.shape}, the map {m.shape}")
    if not sup.any():
        raise DifferenceMapError("the support is empty (the map is all zero?)")

    if model_map is None:
        r = res.astype(np.float32) if method == "shells" else d_min
        c = render_model(atoms, grid, r, method=method, table=table, sampling="point")
    else:
        c = np.asarray(model_map, np.float32)
        if c.shape != m.shape:
            raise DifferenceMapError(f"the model map has shape {c.shape}, the map {m.shape}")
    c = jnp.asarray(c, jnp.float32)
    s = frequency_magnitude(grid)
    transfer = soft_lowpass(s, d_min, 0.1) if lowpass else jnp.ones_like(s)
    weights = None
    if half_maps is not None:
        s_sh, fsc_half, w_sh, d_sh, w_map, wd_map = shell_weights(h1, h2, c, grid)
        weights = (s_sh, fsc_half, w_sh, d_sh)
        m_f = apply_radial_filter(jnp.asarray(m), grid, transfer * w_map)
        c_f = apply_radial_filter(c, grid, transfer * wd_map)
    else:
        m_f = apply_radial_filter(jnp.asarray(m), grid, transfer)
        c_f = apply_radial_filter(c, grid, transfer)

    w = jnp.asarray(sup, jnp.float32)
    b_fit = 0.0
    if fit_b:
        b_fit = _fit_global_b(m_f, c_f, w, s, lo_b, hi_b)
        c_f = apply_radial_filter(c_f, grid, jnp.exp(-b_fit * s * s / 4.0))

    window = window_transfer(grid, scale_radius, "gaussian")
    k, a = local_scale_fit(m_f, c_f, w, window, ridge)
    scaled = a + k * c_f
    diff = w * (m_f - scaled)
    n_w = jnp.maximum(jnp.sum(w), 1.0)
    sd_global = float(jnp.sqrt(jnp.sum(w * diff * diff) / n_w))
    if sd_global <= 0:
        raise DifferenceMapError("the difference map is zero everywhere: the model explains the map exactly")
    if sigma == "local":
        sw = jnp.maximum(local_mean(w, window_transfer(grid, sigma_radius, "gaussian")), 1e-6)
        var = local_mean(diff * diff, window_transfer(grid, sigma_radius, "gaussian")) / sw
        sd = jnp.maximum(jnp.sqrt(jnp.maximum(var, 0.0)), 0.5 * sd_global)
        sd_out: float | np.ndarray = np.asarray(sd, np.float32)
    else:
        sd = sd_global
        sd_out = sd_global
    norm = diff / sd
    settings = {"resolution": d_min, "per_atom_resolution": bool(per_atom), "method": method, "table": table,
                "scale_radius": scale_radius, "sigma": sigma, "sigma_radius": sigma_radius if sigma == "local" else None,
                "fit_b": bool(fit_b), "lowpass": bool(lowpass), "ridge": float(ridge),
                "half_maps": half_maps is not None, "support_fraction": float(sup.mean()),
                "sigma_global": sd_global}
    return DifferenceMap(
        difference=np.asarray(diff, np.float32), normalised=np.asarray(norm, np.float32),
        model_map=np.asarray(scaled, np.float32), scale=np.asarray(k, np.float32), offset=np.asarray(a, np.float32),
        sigma=sd_out, support=sup, b_fit=float(b_fit), shell_weights=weights, settings=settings,
    )


def _fit_global_b(m, c, w, s, lo: float, hi: float, n: int = 33) -> float:
    """The B (Å²) in [lo, hi] whose blur exp(−B s²/4) of `c` best fits `m` (weighted least squares
    with a free scale and offset), from a grid of `n` values refined by a parabola through the best three."""
    fc = jnp.fft.rfftn(c)
    n_w = jnp.maximum(jnp.sum(w), 1.0)
    gm = jnp.sum(w * m) / n_w
    var_m = jnp.sum(w * (m - gm) ** 2)

    def residual(b):
        cb = jnp.fft.irfftn(fc * jnp.exp(-b * s * s / 4.0), s=c.shape)
        gc = jnp.sum(w * cb) / n_w
        cov = jnp.sum(w * (m - gm) * (cb - gc))
        var = jnp.sum(w * (cb - gc) ** 2)
        return var_m - cov * cov / jnp.maximum(var, 1e-30)

    bs = np.linspace(lo, hi, n)
    r = np.asarray(jax.lax.map(residual, jnp.asarray(bs, jnp.float32)), np.float64)
    i = int(np.argmin(r))
    if 0 < i < n - 1:
        y0, y1, y2 = r[i - 1], r[i], r[i + 1]
        den = y0 - 2 * y1 + y2
        if den > 0:
            return float(bs[i] + 0.5 * (y0 - y2) / den * (bs[1] - bs[0]))
    return float(bs[i])


@dataclasses.dataclass(frozen=True)
class DifferencePeaks:
    """Peaks of a difference map, strongest first (`difference_peaks`).

    - `positions`: `(n, 3)` x/y/z in Å (sub-voxel).
    - `heights`: values at the peaks (σ units for a normalised map; negative for holes).
    - `nearest_atom`: index of the nearest model atom (-1 without atoms).
    - `distance`: its distance in Å (inf without atoms).
    """

    positions: np.ndarray
    heights: np.ndarray
    nearest_atom: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return int(self.heights.shape[0])

    def rows(self, labels: AtomLabels | None = None) -> list[dict]:
        """One dict per peak: rank, x, y, z, height, nearest atom (its label when `labels` is given), distance."""
        out = []
        for i in range(len(self)):
            j = int(self.nearest_atom[i])
            row = {"rank": i + 1, "x": float(self.positions[i, 0]), "y": float(self.positions[i, 1]),
                   "z": float(self.positions[i, 2]), "height": float(self.heights[i]),
                   "nearest_atom": j if j >= 0 else None,
                   "distance": float(self.distance[i]) if np.isfinite(self.distance[i]) else None}
            if labels is not None and j >= 0:
                row["nearest_label"] = labels.atom_id(j)
            out.append(row)
        return out


def _local_maxima(x: Float[Array, "nz ny nx"]) -> Array:
    """Voxels at least as high as their 26 neighbours, one voxel per plateau (strictly above the
    neighbours that come before it in C order)."""
    pad = jnp.pad(x, 1, constant_values=-jnp.inf)
    nz, ny, nx = x.shape
    is_max = jnp.ones(x.shape, bool)
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dz == dy == dx == 0:
                    continue
                nb = pad[1 + dz: 1 + dz + nz, 1 + dy: 1 + dy + ny, 1 + dx: 1 + dx + nx]
                # strictly greater than the neighbours "before" it, at least equal to those after:
                # a plateau gives one peak
                before = (dz, dy, dx) < (0, 0, 0)
                is_max = is_max & ((x > nb) if before else (x >= nb))
    return is_max


def difference_peaks(
    data: Float[ArrayLike, "nz ny nx"],
    grid: Grid,
    atoms: Atoms | Float[ArrayLike, "n 3"] | None = None,
    *,
    threshold: float = 3.0,
    sign: int = 1,
    max_peaks: int | None = 100,
    min_separation: float = 0.0,
    support: ArrayLike | None = None,
    edge_margin: float = 2.0,
) -> DifferencePeaks:
    """Local maxima (or minima, `sign=-1`) of a difference map beyond `threshold`, strongest first.

    A peak is a voxel at least as high as its 26 neighbours (one per plateau); its position is refined
    by a parabola through the logarithms of the three values along each axis (a Gaussian through
    them; within ± half a voxel) and its height is the voxel's value plus the three axes' rises to
    their vertices. The nearest model atom is found
    with a k-d tree (scipy).

    **Arguments:**

    - `data`: the map (normally `DifferenceMap.normalised`, σ units).
    - `grid`: its grid.
    - `atoms`: the model (`Atoms` or `(n, 3)` positions) for the nearest atom; `None`: no atoms.
    - `threshold`: keep peaks with `sign·height >= threshold`.
    - `sign`: 1 for positive peaks (missing atoms), -1 for negative (holes: atoms the map lacks).
    - `max_peaks`: keep this many at most (`None`: all).
    - `min_separation`: drop a peak closer than this (Å) to a stronger one (0: keep all).
    - `support`: bool mask of the voxels the map defines (`DifferenceMap.support`); peaks closer than
      `edge_margin` Å to its edge are dropped. A zoned map (MapQ's zone, a mask around one chain)
      cuts the density of unmodelled neighbours at its edge, and those cut blobs would otherwise be
      the strongest peaks (EMD-20026's crop: the top 30 peaks of the deposited model all lie within
      1.5 Å of the zone's edge). `None`: every voxel.

    **Returns:** `DifferencePeaks` (heights with their sign).
    """
    if sign not in (1, -1):
        raise DifferenceMapError(f"sign must be 1 or -1, got {sign}")
    x = np.asarray(data, np.float32)
    if x.shape != tuple(grid.shape):
        raise DifferenceMapError(f"the map has shape {x.shape}, the grid {tuple(grid.shape)}")
    y = jnp.asarray(sign * x)
    cand = _local_maxima(y) & (y >= threshold)
    if support is not None:
        sup = np.asarray(support, bool)
        if sup.shape != x.shape:
            raise DifferenceMapError(f"the support has shape {sup.shape}, the map {x.shape}")
        if edge_margin > 0:
            # inside by edge_margin: a ball of that radius around the voxel lies wholly in the support
            ball = window_transfer(grid, float(edge_margin), "sphere")
            cand = cand & (local_mean(jnp.asarray(sup, jnp.float32), ball) > 0.999)
        else:
            cand = cand & jnp.asarray(sup)
    cand = np.asarray(cand)
    idx = np.argwhere(cand)  # (k, j, i)
    ys = np.asarray(y)
    vals = ys[tuple(idx.T)]
    order = np.argsort(-vals, kind="stable")
    idx, vals = idx[order], vals[order]
    # sub-voxel refinement: a parabola through the logarithms of the three values along each axis
    # (exact for a Gaussian peak), through the values themselves where one is <= 0; edge voxels keep
    # their grid position. Height: y1 · exp(sum of the log-rises) + sum of the linear rises.
    shape = np.asarray(x.shape)
    offs = np.zeros(idx.shape, np.float64)
    log_rise = np.zeros((len(idx), 3))
    lin_rise = np.zeros((len(idx), 3))
    y1 = vals.astype(np.float64)
    for axis in range(3):
        ok = (idx[:, axis] > 0) & (idx[:, axis] < shape[axis] - 1)
        lo_i, hi_i = idx.copy(), idx.copy()
        lo_i[:, axis] = np.clip(idx[:, axis] - 1, 0, shape[axis] - 1)
        hi_i[:, axis] = np.clip(idx[:, axis] + 1, 0, shape[axis] - 1)
        y0, y2 = ys[tuple(lo_i.T)].astype(np.float64), ys[tuple(hi_i.T)].astype(np.float64)
        logs = (y0 > 0) & (y1 > 0) & (y2 > 0)
        f0 = np.where(logs, np.log(np.where(logs, y0, 1.0)), y0)
        f1 = np.where(logs, np.log(np.where(logs, y1, 1.0)), y1)
        f2 = np.where(logs, np.log(np.where(logs, y2, 1.0)), y2)
        den = f0 - 2 * f1 + f2
        good = ok & (den < 0)
        t = np.clip(np.where(good, 0.5 * (f0 - f2) / np.where(good, den, -1.0), 0.0), -0.5, 0.5)
        offs[:, axis] = t
        r = -0.25 * (f0 - f2) * t  # the rise from the voxel to the vertex (of log y where logs)
        log_rise[:, axis] = np.where(logs, r, 0.0)
        lin_rise[:, axis] = np.where(logs, 0.0, r)
    heights = y1 * np.exp(log_rise.sum(axis=1)) + lin_rise.sum(axis=1)
    # strongest first by the refined height (the voxel values ranked the candidates)
    order = np.argsort(-heights, kind="stable")
    idx, offs, heights = idx[order], offs[order], heights[order]
    kji = idx + offs
    vx, vy, vz = (float(v) for v in np.broadcast_to(np.asarray(grid.voxel_size, float), (3,)))
    pos = np.asarray(grid.origin, np.float64)[None, :] + kji[:, ::-1] * np.array([vx, vy, vz])
    if min_separation > 0 and len(pos):
        keep = []
        for i in range(len(pos)):
            if all(np.linalg.norm(pos[i] - pos[j]) >= min_separation for j in keep):
                keep.append(i)
        pos, heights = pos[keep], heights[keep]
    if max_peaks is not None:
        pos, heights = pos[:max_peaks], heights[:max_peaks]
    if atoms is None:
        nearest = np.full(len(pos), -1)
        dist = np.full(len(pos), np.inf)
    else:
        from scipy.spatial import cKDTree

        apos = np.asarray(atoms.positions if isinstance(atoms, Atoms) else atoms, np.float64).reshape(-1, 3)
        if len(apos) == 0 or len(pos) == 0:
            nearest = np.full(len(pos), -1)
            dist = np.full(len(pos), np.inf)
        else:
            dist, nearest = cKDTree(apos).query(pos)
    return DifferencePeaks(positions=pos.astype(np.float64), heights=sign * heights,
                           nearest_atom=np.asarray(nearest, np.int64), distance=np.asarray(dist, np.float64))
