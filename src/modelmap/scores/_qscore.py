"""Q-score (Pintilie et al. 2020, Nat. Methods 17, 328-334): the public front and the
differentiable variant.

The Q-score of an atom is the Pearson correlation ("correlation about the mean") between

- `u`: map values at probe points on spheres of radius r = 0.1, 0.2, ..., 2.0 Å around the atom,
  plus the map value at the atom itself repeated N times (r = 0), and
- `v`: a reference Gaussian A·exp(-r²/2σ²) + B at the same radii (σ = 0.6 Å by default).

Which probe points count is what distinguishes implementations (`variant="mapq"` or `"cctbx"`,
`scores._probes`). Everything discrete (probe selection) is numpy/scipy on concrete coordinates and
lives in a fixed-shape, padded `QProbes`. The exact score `q_score` evaluates it in numpy with a
float64 Pearson correlation; by default the map values follow Chimera's float32 trilinear
interpolation, which is what MapQ's numbers contain (`scores._mapq`: the MapQ emulation, with the
re-gridded map of MapQ's multi-process runs). `q_score_differentiable` evaluates the same probes in
JAX, differentiable in the atom positions (probes move rigidly with their atom) and in the map.
Aggregation per chain and residue: `QScores` (`scores._q_aggregate`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._errors import ModelmapError
from .._grid import Grid
from .._interpolate import interpolate_map
from .._progress import ProgressBar
from ._mapq import Interpolation, evaluate_exact, map_parts, mapq_min_max, model_parts
from ._probes import QProbes, Variant, direction_table, select_probes
from ._q_aggregate import QScores

__all__ = ["q_score", "q_score_differentiable"]


# --------------------------------------------------------------------------------------------------
# The exact score
# --------------------------------------------------------------------------------------------------


def _selection_mask(selection, n: int) -> np.ndarray:
    if selection is None:
        return np.ones(n, bool)
    sel = np.asarray(selection)
    if sel.dtype == bool:
        if sel.shape != (n,):
            raise ValueError(f"a boolean selection needs shape ({n},), got {sel.shape}")
        return sel
    if not np.issubdtype(sel.dtype, np.integer):
        raise TypeError("selection must be a boolean mask or integer atom indices")
    out = np.zeros(n, bool)
    out[sel] = True
    return out


def q_score(
    density_map,
    model_or_atoms,
    *,
    sigma: float = 0.6,
    n_points: int = 8,
    variant: Variant = "mapq",
    selection: ArrayLike | None = None,
    radii: ArrayLike | None = None,
    include_center: bool | None = None,
    interpolation: Interpolation = "chimera",
    probes: QProbes | None = None,
    progress: "bool | ProgressBar" = False,
) -> "QScores":
    """Per-atom Q-score exactly as MapQ computes it (Pintilie et al. 2020, Nat. Methods 17, 328).

    For every non-H atom (selected by `selection`): u = the map value at the atom repeated N times,
    then the map values at the kept probes of every shell (`select_probes`); v = MapQ's reference
    Gaussian A·exp(-r²/2σ²) + B at the same radii, with A, B from `mapq_min_max` (`MinMaxD`);
    Q = Pearson(u, v) in float64 (`FitMap.overlap_and_correlation`'s "about mean" value; 0 when
    either series is constant). Probes are blocked by every non-H atom of the model, scored or not.
    Hydrogens are never scored (NaN) and never block probes.

    Interpolation is trilinear, 0 outside the map. `interpolation="chimera"` (default) follows
    Chimera's C++ `interpolate_volume_data` operation by operation: float32 probe coordinates,
    float32 index transform and weights, and "outside" from the last grid plane on;
    `"float64"` is plain float64 trilinear. They differ by ~2e-6 in Q (rms), the size of the
    residual left against MapQ's own 6-decimal output.

    Coordinates: an `AtomicModel` read with float32 positions is scored at its file's float64
    coordinates (float32 moves atoms by up to ~1e-5 Å, enough to flip MapQ's probe rejections at
    near ties); bare `Atoms` are used as given.

    To match a MapQ run made with several processes (`CalcQpn`), score against
    `mapq_regrid(map, atoms)` instead of the map itself.

    **Arguments:**

    - `density_map`: a `DensityMap` (`modelmap.read_map`).
    - `model_or_atoms`: an `AtomicModel` (gives per-residue aggregation) or an `Atoms` pytree.
    - `sigma`: width σ of the reference Gaussian in Å (MapQ: 0.6; EMDB validation uses 0.4).
    - `n_points`: N, probes per shell (MapQ: 8).
    - `variant`: `"mapq"` or `"cctbx"` (see `select_probes`).
    - `selection`: atoms to score (boolean mask or indices over all atoms); default all.
    - `radii`, `include_center`: shells, see `select_probes`.
    - `interpolation`: `"chimera"` or `"float64"`.
    - `probes`: precomputed probes for exactly the scored atoms, in order (skips the selection;
      their variant, N, shells and r = 0 setting apply).
    - `progress`: a progress bar on stderr while the probes are chosen (one tick per shell, shown
      after a second of work); or a caller's `ProgressBar` to tick.

    **Returns:** a `QScores` (per-atom Q, NaN where not scored, with aggregation methods).
    """
    if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of Å, got {sigma!r}")
    data, grid = map_parts(density_map)
    pos, is_h, labels = model_parts(model_or_atoms)
    heavy = ~is_h
    if not heavy.any():
        raise ModelmapError("the model has no non-hydrogen atoms to score")
    scored = heavy & _selection_mask(selection, pos.shape[0])
    if not scored.any():
        raise ModelmapError("the selection holds no non-hydrogen atoms")
    idx = np.flatnonzero(scored)
    if probes is None:
        probes = select_probes(
            pos[idx], pos[heavy], variant=variant, n_points=n_points, radii=radii,
            include_center=include_center, progress=progress,
        )
    elif probes.n_atoms != idx.size:
        raise ValueError(f"probes are for {probes.n_atoms} atoms but {idx.size} are scored")
    q_sel = evaluate_exact(data, grid, pos[idx], probes, float(sigma), interpolation,
                            mapq_min_max(data))
    q = np.full(pos.shape[0], np.nan)
    q[idx] = q_sel
    return QScores(q=q, labels=labels, sigma=float(sigma), variant=probes.variant,
                   n_points=probes.n_points)


# --------------------------------------------------------------------------------------------------
# Differentiable Q
# --------------------------------------------------------------------------------------------------


def q_score_differentiable(
    map_data: Float[Array, "nz ny nx"],
    grid: Grid,
    positions: Float[Array, "n 3"],
    probes: QProbes,
    sigma: float | Float[Array, ""] = 0.6,
) -> Float[Array, " n"]:
    """Per-atom Q-score as a pure JAX function, differentiable in positions, map and σ.

    The same estimator as `q_score` for the given `probes`, for refinement losses: which probes
    count is fixed (chosen by `select_probes` from concrete positions, outside the gradient); each
    probe moves rigidly with its atom (position + fixed offset), and its value comes from
    `interpolate_map` (trilinear), so the gradient flows through the probe positions and the
    interpolation. Shapes are fixed by the selection (`probes.n_probes` values plus one per atom),
    so the function is jit- and vmap-able (e.g. over a batch of positions with the same probes).
    The reference Gaussian is exp(-r²/2σ²): Pearson's correlation makes MapQ's A and B irrelevant.
    Q = 0 where the values are constant. Trilinear interpolation is piecewise linear, so Q has kinks
    where a probe crosses a voxel face; its gradient is that of the piece the probe is in.

    **Arguments:**

    - `map_data`: the map `(nz, ny, nx)`.
    - `grid`: its `Grid`.
    - `positions`: `(n, 3)` positions in Å of the scored atoms, in the order of `probes`.
    - `probes`: from `select_probes` (for these atoms).
    - `sigma`: reference width σ in Å.

    **Returns:** `(n,)` Q-scores in the dtype of `positions` (float32 by default).
    """
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.floating):
        positions = positions.astype(jnp.float32)
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be (n, 3), got {positions.shape}")
    n_atoms = positions.shape[0]
    if n_atoms != probes.n_atoms:
        raise ValueError(f"probes are for {probes.n_atoms} atoms, got {n_atoms} positions")
    dtype = positions.dtype
    n_shells = probes.n_shells
    atom = jnp.asarray(probes.atom_index)
    shell = jnp.asarray(probes.shell_index)
    slot = jnp.asarray(probes.slot_index)
    radii = jnp.asarray(probes.radii, dtype)
    table = jnp.asarray(direction_table(probes.n_points, probes.max_points), dtype)
    # the barrier keeps XLA from constant-folding these gathers (seconds of compile time for
    # millions of probes) when the probes are closed over in a jitted function
    table, n_tried = jax.lax.optimization_barrier((table, jnp.asarray(probes.n_tried)))
    row = jnp.maximum((n_tried[atom, shell] - probes.n_points) // 2, 0)
    offsets = jax.lax.stop_gradient(table[row, slot] * radii[shell][:, None])  # (K, 3)
    u = interpolate_map(map_data, grid, positions[atom] + offsets).astype(dtype)  # (K,)
    c = interpolate_map(map_data, grid, positions).astype(dtype)  # (n,)
    sigma = jnp.asarray(sigma, dtype)
    g = jnp.exp(-0.5 * (radii / sigma) ** 2) - 1  # reference per shell, shifted by g(r=0) = 1
    # Sums over the probes of each atom. Only sums of map values need a scatter (per atom and
    # shell); everything that depends on the shell alone is a product with the counts per shell,
    # so nothing large is constant-folded when the probes are closed over in a jitted loss.
    counts = jnp.asarray(probes.n_kept).astype(dtype)  # (n, S)
    w0 = jnp.asarray(probes.n_points if probes.include_center else 0, dtype)
    n_probe = counts.sum(1)
    total = w0 + n_probe
    safe = jnp.where(total > 0, total, 1)
    du = u - c[atom]  # both series are shifted by their r = 0 values (well conditioned)
    cell = atom * n_shells + shell
    su_shell = jax.ops.segment_sum(du, cell, num_segments=n_atoms * n_shells,
                                   indices_are_sorted=True).reshape(n_atoms, n_shells)
    suu = jax.ops.segment_sum(du * du, atom, num_segments=n_atoms, indices_are_sorted=True)
    su = su_shell.sum(1)
    sv = counts @ g
    mu, mv = su / safe, sv / safe
    # centred sums; the r = 0 entries (w0 of them) sit at (0, 0) before centring
    cov = su_shell @ g - mu * sv - mv * su + total * mu * mv
    var_u = suu - 2 * mu * su + total * mu * mu
    var_v = counts @ (g * g) - 2 * mv * sv + total * mv * mv
    den2 = jnp.maximum(var_u, 0) * jnp.maximum(var_v, 0)
    ok = den2 > 0
    return jnp.where(ok, cov / jnp.sqrt(jnp.where(ok, den2, 1)), 0)
