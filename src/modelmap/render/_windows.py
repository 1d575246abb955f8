"""Local windows: every source touches only a small box of voxels around it.

The renderer adds each source's values into a window of `(2hz+1, 2hy+1, wx)` voxels around the
voxel nearest to it (`wx`: `2hx+1` rounded up to a multiple of `X_ALIGN`, the extra voxels on the +x
side; see `window_widths`). Sources are bucketed by window size (so a few wide atoms do not make
every window wide), or each chunk of them picks its size (`WindowClasses`), and each bucket is
processed in chunks inside a loop, so the memory held at once is one chunk of windows plus the map,
whatever the number of sources.

The map is accumulated in a padded copy of the grid (`window_pad`: `2 h_max` voxels on every side,
`wx - 1` along x) so that every window that touches the grid lies wholly inside it: no index is
ever clamped or wrapped. Sources whose
window does not touch the grid contribute nothing (their amplitude is masked to 0).

Windows are added to the map in one of two ways, chosen by platform (`accumulate="auto"`, through
`lax.platform_dependent`): on the CPU one source at a time in a `fori_loop` of
`dynamic_update_slice`s, which XLA's CPU backend runs fastest, each window's values computed where
it is added (a kernel with `factors`/`window`/`silent`, as `GaussianKernel`) and sources that add
nothing (padding) skipped; elsewhere (GPU) every window of a chunk at once, by one scatter-add over
flattened voxel indices (no sequential per-source loop).
Both are tested on the CPU (`accumulate="scatter"` forces the GPU path) for equal maps and gradients.

Gradients come from a hand-written VJP: the backward pass gathers the cotangent map in each window
and pulls it back through that chunk's window values, recomputed on the fly. Nothing of size
sources × window is kept between the passes.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from .._arrays import put
from .._grid import Grid

__all__ = [
    "AbstractWindowPlan", "WindowBucket", "WindowClasses", "WindowPlan", "UniformWindows", "GaussianKernel",
    "default_chunk_size",
    "splat_windows", "splat_kernel",
]

ACCUMULATE = ("auto", "loop", "scatter")


class WindowBucket(eqx.Module):
    """Sources that share one window size, or one window size per chunk of them.

    - `half_width`: `(hx, hy, hz)` in voxels (static): the bucket's widest window.
    - `indices`: `(n_chunks, chunk)` source indices (padding slots repeat a real index).
    - `mask`: `(n_chunks, chunk)` False on padding slots.
    - `classes`: optional, the half widths (static, narrowest first, the last `half_width`) that
      each chunk chooses from (`WindowClasses`); `None`: every chunk has `half_width`.
    - `chunk_class`: `(n_chunks,)` each chunk's index into `classes` (with `classes`).
    """

    half_width: tuple[int, int, int] = eqx.field(static=True)
    indices: Int[Array, "nc c"]
    mask: Bool[Array, "nc c"]
    classes: tuple[tuple[int, int, int], ...] | None = eqx.field(static=True, default=None)
    chunk_class: Int[Array, " nc"] | None = None

    @property
    def sizes(self) -> tuple[tuple[int, int, int], ...]:
        """The window sizes (half widths, x, y, z voxels) a chunk may have: `classes`, or the one."""
        return (self.half_width,) if self.classes is None else self.classes

    def size_of_chunks(self) -> Int[Array, " nc"]:
        """`(nc,)` each chunk's index into `sizes` (0 for a bucket of one size)."""
        if self.chunk_class is None:
            return jnp.zeros(self.indices.shape[:1], jnp.int32)
        return self.chunk_class


class AbstractWindowPlan(eqx.Module):
    """How a window renderer sizes its windows: planned per source from a volume (`WindowPlan`) or
    one size declared for any volume (`UniformWindows`)."""

    @abc.abstractmethod
    def resolve(self, grid: Grid, n_sources: int) -> "WindowPlan":
        """The `WindowPlan` for a volume of `n_sources` sources (at trace time: shapes only)."""
        raise NotImplementedError


class WindowPlan(AbstractWindowPlan):
    """Which window size each source gets, and the widest Gaussian each window holds exactly.

    - `buckets`: one `WindowBucket` per window size.
    - `max_variance`: `(n,)` the largest per-axis variance (Å²) that source's window covers to
      `n_sigma` standard deviations; rendering a wider source is an error (rebuild the plan).
    - `n_sigma`: the coverage in standard deviations (static).
    - `pad`: `(px, py, pz)` voxels of padding of the accumulation grid (static).
    """

    buckets: tuple[WindowBucket, ...]
    max_variance: Float[Array, " n"]
    n_sigma: float = eqx.field(static=True)
    pad: tuple[int, int, int] = eqx.field(static=True)

    @property
    def n_sources(self) -> int:
        return self.max_variance.shape[0]

    def resolve(self, grid: Grid, n_sources: int) -> "WindowPlan":
        """This plan, for a volume of `n_sources` sources (it must be the number planned for)."""
        if n_sources != self.n_sources:
            raise ValueError(
                f"the window plan is for {self.n_sources} sources, the volume has {n_sources}; plan it "
                "for this volume (with_plan) or declare bounds (with_bounds), which fit any number"
            )
        return self

    def split(self, parts: int) -> tuple["WindowPlan", ...]:
        """The plan's chunks dealt into `parts` plans of one shape (concrete; call outside `jit`).

        Every bucket's chunks are cut into `parts` runs of equal length, the last ones padded with
        masked chunks, so each part renders a disjoint share of the sources, the parts' maps add up
        to the whole map, and every part compiles to the same computation.
        """
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        out: list[list[WindowBucket]] = [[] for _ in range(parts)]
        for b in self.buckets:
            idx, mask, cls = np.asarray(b.indices), np.asarray(b.mask), np.asarray(b.size_of_chunks())
            q = -(-idx.shape[0] // parts)
            pad = q * parts - idx.shape[0]
            idx = np.concatenate([idx, np.broadcast_to(idx[:1], (pad, idx.shape[1]))])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
            cls = np.concatenate([cls, np.zeros(pad, cls.dtype)])
            for p in range(parts):
                run = slice(p * q, (p + 1) * q)
                chunk_class = None if b.classes is None else put(cls[run])
                out[p].append(WindowBucket(b.half_width, put(idx[run]), put(mask[run]), b.classes, chunk_class))
        return tuple(WindowPlan(tuple(bs), self.max_variance, self.n_sigma, self.pad) for bs in out)

    def with_spare(self, half_width: tuple[int, int, int], n: int) -> "WindowPlan":
        """A copy with `n` free (masked) slots for sources whose windows are `half_width` (x, y, z
        voxels): chunks added to the bucket of that size, or a new bucket. `refit` moves sources
        into free slots without changing any shape (concrete; call outside `jit`)."""
        half_width = tuple(int(h) for h in half_width)
        if n < 1:
            return self
        buckets = list(self.buckets)
        same = [i for i, b in enumerate(buckets) if b.half_width == half_width]
        # a new bucket gets chunks of 32: a chunk with any source in it is computed whole, and one
        # chunk of 1,080 wide windows holding 36 re-planned atoms made 7CEC's steps 1.8 times as slow
        c = int(buckets[same[0]].indices.shape[1]) if same else min(32, int(8 * math.ceil(n / 8)))
        nc = math.ceil(n / c)
        idx, mask = np.zeros((nc, c), np.int32), np.zeros((nc, c), bool)
        if same:
            b = buckets[same[0]]
            buckets[same[0]] = WindowBucket(half_width, put(np.concatenate([np.asarray(b.indices), idx])),
                                            put(np.concatenate([np.asarray(b.mask), mask])))
        else:
            buckets.append(WindowBucket(half_width, put(idx), put(mask)))
            buckets.sort(key=lambda b: b.half_width)
        pad = tuple(max(p, q) for p, q in zip(self.pad, window_pad(half_width)))
        return WindowPlan(tuple(buckets), self.max_variance, self.n_sigma, pad)

    def refit(self, grid: Grid, required: "WindowPlan", positions=None) -> "WindowPlan | None":
        """The sources re-dealt into this plan's buckets and slots so that each gets a window at
        least as large as in `required` (a plan for new variances, of the same sources and grid):
        every array keeps its shape, so a compiled function that took this plan runs the new one
        without recompiling. None when the buckets have too few slots (plan afresh then).

        Each source goes to the smallest bucket that holds its window, widest sources first;
        `max_variance` is what the chosen window covers. Within a bucket the sources are in voxel
        order (`locality_order`) when `positions` `(n, 3)` are given, else in index order: on the CPU
        an accumulation in index order took 1.6 times as long (7CEC, 4,308 atoms, 89 × 81 × 63).
        """
        n = self.n_sources
        if required.n_sources != n or required.n_sigma != self.n_sigma:
            return None
        need = np.zeros((n, 3), np.int64)
        for b in required.buckets:
            idx, mask = np.asarray(b.indices), np.asarray(b.mask)
            need[idx[mask]] = b.half_width
        keys = [np.asarray(b.half_width) for b in self.buckets]
        sizes = [int(np.prod(2 * k + 1)) for k in keys]
        capacity = [int(np.prod(b.indices.shape)) for b in self.buckets]
        members: list[list[int]] = [[] for _ in self.buckets]
        chosen = np.zeros(n, np.int64)
        rank = np.arange(n)
        if positions is not None:
            rank[locality_order(grid, np.asarray(positions, np.float64))] = np.arange(n)
        for i in np.argsort(-np.prod(2 * need + 1, axis=1), kind="stable"):
            fits = [j for j in range(len(keys)) if np.all(keys[j] >= need[i]) and len(members[j]) < capacity[j]]
            if not fits:
                return None
            j = min(fits, key=lambda j: sizes[j])
            members[j].append(int(i))
            chosen[i] = j
        buckets = []
        for b, m in zip(self.buckets, members):
            nc, c = b.indices.shape
            idx, mask = np.zeros(nc * c, np.int32), np.zeros(nc * c, bool)
            idx[: len(m)], mask[: len(m)] = sorted(m, key=rank.__getitem__), True
            idx[len(m):] = idx[0] if m else 0
            buckets.append(WindowBucket(b.half_width, put(idx.reshape(nc, c)), put(mask.reshape(nc, c))))
        fit = _covered_variance(np.stack(keys)[chosen], np.asarray(grid.voxel_size), self.n_sigma)
        return WindowPlan(tuple(buckets), put(fit, self.max_variance.dtype), self.n_sigma, self.pad)

    def fit_chunks(self, grid: Grid, radii: Float[Array, " n"]) -> "WindowPlan":
        """This plan with each chunk of a bucket with `classes` given the smallest of them whose
        window holds the `radii` (Å, `n_sigma` standard deviations of each source's widest
        Gaussian, or its reach) of all the chunk's sources, and `max_variance` what that window
        covers (works on traced radii: the choice is data, not shape). A source wider than the
        widest class keeps it, and the render's check then fails. Plans without classes are
        returned as they are."""
        if all(b.classes is None for b in self.buckets):
            return self
        if len(self.buckets) != 1:
            raise ValueError("a plan with window classes has one bucket")
        (b,) = self.buckets
        voxel = np.asarray(grid.voxel_size, np.float64)
        var = _covered_variance(np.asarray(b.classes), voxel, self.n_sigma)  # (K,) ascending
        r = lax.stop_gradient(radii)
        covered = jnp.asarray(self.n_sigma * np.sqrt(var), r.dtype)
        # the first class whose window holds the source (a masked slot needs none)
        need = jnp.where(b.mask, jnp.searchsorted(covered, r[b.indices], side="left"), 0)
        chunk_class = jnp.minimum(jnp.max(need, axis=1), len(b.classes) - 1).astype(jnp.int32)
        fit = jnp.asarray(var, self.max_variance.dtype)[chunk_class]
        # a source's own slot sets its variance (masked slots repeat a real index: they give 0); a
        # source in no slot (another share of a `split` plan) keeps what it had
        slots = jnp.where(b.mask, fit[:, None], 0).astype(self.max_variance.dtype)
        fitted = jnp.zeros_like(self.max_variance).at[b.indices].max(slots)
        present = jnp.zeros(self.max_variance.shape, bool).at[b.indices].max(b.mask)
        max_variance = jnp.where(present, fitted, self.max_variance)
        bucket = WindowBucket(b.half_width, b.indices, b.mask, b.classes, chunk_class)
        return WindowPlan((bucket,), max_variance, self.n_sigma, self.pad)

    @property
    def covered_radius(self) -> Float[Array, " n"]:
        """`(n,)` the radius (Å) of the ball around each source that its window holds."""
        return self.n_sigma * jnp.sqrt(self.max_variance)

    @classmethod
    def build(
        cls,
        grid: Grid,
        positions,
        max_variance,
        *,
        n_sigma: float = 5.0,
        chunk_size: int = 256,
        max_buckets: int | None = None,
    ) -> "WindowPlan":
        """Plan windows from concrete values (call outside `jit`).

        **Arguments:**

        - `grid`: the target grid.
        - `positions`: `(n, 3)` source positions in Å (used to order sources for locality).
        - `max_variance`: `(n,)` the widest per-axis variance (Å²) of each source.
        - `n_sigma`: each window covers at least this many standard deviations of the source's
          widest Gaussian beyond the source, in every direction.
        - `chunk_size`: sources per step of the scan.
        - `max_buckets`: at most this many window sizes (coarser sizes: fewer compiled scans, a
          little more work per source); `None` keeps every size exact.
        """
        pos = np.asarray(positions, np.float64)
        var = np.asarray(max_variance, np.float64)
        if pos.ndim != 2 or pos.shape[0] != var.shape[0]:
            raise ValueError(f"positions {pos.shape} and variances {var.shape} do not match")
        if not np.all(var > 0):
            raise ValueError("every Gaussian needs a positive variance (b_k + B + 4 D² > 0)")
        return cls.from_radii(
            grid, pos, n_sigma * np.sqrt(var), n_sigma=n_sigma, chunk_size=chunk_size,
            granularity=1 if max_buckets is None else None, max_buckets=max_buckets or 8,
        )

    @classmethod
    def from_radii(
        cls,
        grid: Grid,
        positions,
        radii,
        *,
        n_sigma: float = 1.0,
        chunk_size: int = 256,
        granularity: int | None = 1,
        max_buckets: int = 8,
    ) -> "WindowPlan":
        """Plan windows that hold a ball of radius `radii[i]` (Å) around every source (concrete).

        `granularity` rounds the half widths up to a multiple of it (fewer buckets, fewer compiled
        scans, slightly larger windows); `None` picks the smallest granularity that leaves at most
        `max_buckets` window sizes. `max_variance` is then `(covered radius / n_sigma)²`.
        """
        pos = np.asarray(positions, np.float64)
        radii = np.asarray(radii, np.float64)
        if pos.ndim != 2 or pos.shape[0] != radii.shape[0]:
            raise ValueError(f"positions {pos.shape} and radii {radii.shape} do not match")
        voxel = np.asarray(grid.voxel_size)
        exact = _half_widths(radii, voxel)  # (n, 3) x,y,z
        for g in [granularity] if granularity else range(1, int(exact.max()) + 2):
            half = np.maximum(g * np.ceil(exact / g).astype(np.int64), 1)
            if granularity or len(np.unique(half, axis=0)) <= max_buckets:
                break
        fit = _covered_variance(half, voxel, n_sigma)
        order = locality_order(grid, pos)
        keys = [tuple(int(v) for v in half[i]) for i in range(half.shape[0])]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i in order:
            groups.setdefault(keys[i], []).append(int(i))
        buckets = []
        for key in sorted(groups):
            members = np.asarray(groups[key], np.int64)
            c = min(chunk_size, int(8 * math.ceil(len(members) / 8)))
            nc = math.ceil(len(members) / c)
            padded = np.full(nc * c, members[0], np.int64)
            padded[: len(members)] = members
            mask = np.zeros(nc * c, bool)
            mask[: len(members)] = True
            buckets.append(
                WindowBucket(key, put(padded.reshape(nc, c).astype(np.int32)), put(mask.reshape(nc, c)))
            )
        hmax = half.max(axis=0)
        return cls(tuple(buckets), put(fit), float(n_sigma), window_pad(hmax))


def locality_order(grid: Grid, positions) -> np.ndarray:
    """Sources ordered by their voxel (z, then y, then x): the accumulation's cache locality."""
    idx = np.floor(np.asarray(grid.to_index(np.asarray(positions, np.float64)))).astype(np.int64)
    return np.lexsort((idx[:, 0], idx[:, 1], idx[:, 2]))


def default_chunk_size(cpu: int, other: int = 2048) -> int:
    """Sources per scan step for a plan made now: `cpu` on the CPU (small chunks keep a chunk's
    windows in cache), `other` on other backends, where one chunk is one scatter-add and fewer,
    larger steps keep the device busy (memory: `other` windows at once)."""
    return cpu if jax.default_backend() == "cpu" else other


#: A window's extent along x is `2 hx + 1` voxels rounded up to a multiple of this: XLA's CPU loop
#: adds rows of 8·k floats 3-4 times as fast per voxel (13 × 13 × 16 voxels: 0.28 ns each; 13 × 13 ×
#: 13: 1.0 ns, 1,800 windows of 5 Gaussian terms). The extra voxels, on the +x side, hold the
#: Gaussian's further tail: the map is a little more complete there, never less.
X_ALIGN = 8


def window_widths(half) -> tuple[int, int, int]:
    """`(wx, wy, wz)` voxels of a window of half widths `half` (x, y, z): `2h + 1`, `wx` rounded up to
    a multiple of `X_ALIGN`; the window spans `[-hx, wx - 1 - hx]` voxels along x from its centre."""
    hx, hy, hz = (int(h) for h in half)
    return X_ALIGN * math.ceil((2 * hx + 1) / X_ALIGN), 2 * hy + 1, 2 * hz + 1


def window_pad(half) -> tuple[int, int, int]:
    """`(px, py, pz)` voxels of padding of the accumulation grid on every side, so that every window
    of half widths up to `half` that touches the grid lies wholly inside it."""
    wx, wy, wz = window_widths(half)
    return wx - 1, wy - 1, wz - 1


def _half_widths(radii, voxel) -> np.ndarray:
    """`(n, 3)` half widths (x, y, z voxels) of windows that hold a ball of radius `radii` (Å) around
    a source anywhere within half a voxel of the window's centre."""
    return np.ceil(np.asarray(radii, np.float64)[:, None] / np.asarray(voxel)[None, :] + 0.5).astype(np.int64)


def _covered_variance(half, voxel, n_sigma: float) -> np.ndarray:
    """The per-axis variance (Å²) whose `n_sigma` ball a window of `half` voxels holds exactly."""
    return np.min(((np.asarray(half) - 0.5) * np.asarray(voxel) / n_sigma) ** 2, axis=-1)


class UniformWindows(AbstractWindowPlan):
    """One window size for every source, declared instead of planned from a volume.

    A render function built from declared bounds (`with_bounds`) holds this instead of a
    `WindowPlan`: it depends on no value of any volume, so the same compiled function renders any
    structure with any number of sources (the plan's index arrays are made from the shape at trace
    time), under `jit`, `vmap`, `grad` and `lax.map`. A source wider than the window is an error.

    **Arguments:**

    - `half_width`: `(hx, hy, hz)` voxels (static).
    - `n_sigma`: the coverage in standard deviations (static).
    - `chunk_size`: sources per scan step (static).
    """

    half_width: tuple[int, int, int] = eqx.field(static=True)
    n_sigma: float = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True, default=256)

    @classmethod
    def from_radius(cls, grid: Grid, radius: float, *, n_sigma: float = 1.0, chunk_size: int = 256) -> "UniformWindows":
        """Windows that hold a ball of `radius` Å around any source."""
        half = _half_widths(np.array([radius]), grid.voxel_size)[0]
        return cls(tuple(int(max(h, 1)) for h in half), float(n_sigma), int(chunk_size))

    def resolve(self, grid: Grid, n_sources: int) -> WindowPlan:
        """The plan for `n_sources` sources (shape only; constants inside a trace)."""
        c = min(self.chunk_size, max(8, 8 * math.ceil(n_sources / 8)))
        nc = max(1, math.ceil(n_sources / c))
        idx = np.minimum(np.arange(nc * c), max(n_sources - 1, 0))
        mask = np.arange(nc * c) < n_sources
        var = float(_covered_variance(self.half_width, grid.voxel_size, self.n_sigma))
        bucket = WindowBucket(self.half_width, jnp.asarray(idx.reshape(nc, c), jnp.int32), jnp.asarray(mask.reshape(nc, c)))
        return WindowPlan((bucket,), jnp.full((n_sources,), var), self.n_sigma, window_pad(self.half_width))


def _by_volume(half) -> tuple:
    """Sort key of window sizes: narrowest (fewest voxels) first."""
    return (int(np.prod(window_widths(half))), tuple(half))


class WindowClasses(AbstractWindowPlan):
    """A few window sizes declared for any volume; each chunk of `chunk_size` sources gets the
    smallest that holds all of them, chosen from the volume's values when it is rendered
    (`WindowPlan.fit_chunks`, under `jit` too), so no size depends on a concrete volume.

    Atoms of one structure span B from 10 to 300 Å²; one window for the widest (`UniformWindows`)
    makes every window as large as the widest atom's. With classes a chunk of narrow atoms gets a
    narrow window; the saving is largest when the sources come sorted by width (as
    `modelmap.batch.plan_batch` sorts them). Every size is compiled (one loop over its chunks each).

    **Arguments:**

    - `half_widths`: the window sizes, `(hx, hy, hz)` voxels each, narrowest first (static).
    - `n_sigma`: the coverage in standard deviations (static).
    - `chunk_size`: sources per scan step (static); a chunk's window is its widest source's.
    """

    half_widths: tuple[tuple[int, int, int], ...] = eqx.field(static=True)
    n_sigma: float = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True, default=256)

    def __check_init__(self):
        if not self.half_widths:
            raise ValueError("WindowClasses needs at least one window size")
        if list(self.half_widths) != sorted(self.half_widths, key=_by_volume):
            raise ValueError(f"window sizes must be given narrowest first, got {self.half_widths}")

    @classmethod
    def from_radii(
        cls, grid: Grid, smallest: float, largest: float, *, n_sigma: float = 1.0, chunk_size: int = 256,
        max_classes: int = 6,
    ) -> "WindowClasses":
        """Classes for sources whose radii (Å) lie in `[smallest, largest]`: every window size
        (whole voxels) between theirs, at most `max_classes` of them (the widest always kept, the
        others spread evenly in between)."""
        if not 0 < smallest <= largest:
            raise ValueError(f"need 0 < smallest <= largest radius, got {smallest}, {largest}")
        r = np.concatenate([np.linspace(smallest, largest, 512), [largest]])
        half = np.maximum(_half_widths(r, grid.voxel_size), 1)
        sizes = sorted({tuple(int(v) for v in h) for h in half}, key=_by_volume)
        if len(sizes) > max_classes:
            keep = np.unique(np.round(np.linspace(len(sizes) - 1, 0, max_classes)).astype(int))
            sizes = [sizes[k] for k in sorted(keep)]
        return cls(tuple(sizes), float(n_sigma), int(chunk_size))

    def resolve(self, grid: Grid, n_sources: int) -> WindowPlan:
        """The plan for `n_sources` sources, every chunk at the widest size until `fit_chunks`."""
        plan = UniformWindows(self.half_widths[-1], self.n_sigma, self.chunk_size).resolve(grid, n_sources)
        (b,) = plan.buckets
        chunk_class = jnp.full(b.indices.shape[:1], len(self.half_widths) - 1, jnp.int32)
        bucket = WindowBucket(b.half_width, b.indices, b.mask, self.half_widths, chunk_class)
        pad = window_pad(tuple(max(h[a] for h in self.half_widths) for a in range(3)))
        return WindowPlan((bucket,), plan.max_variance, self.n_sigma, pad)


def _erf_diff(lo, hi):
    """erf(hi) - erf(lo) for lo <= hi, without cancellation in the tails.

    Mirrored so that the interval's midpoint is >= 0 (erf is odd), then written with erfc, which
    keeps its relative precision where both ends lie far out in the tail.
    """
    mirror = (lo + hi) < 0
    a = jnp.where(mirror, -hi, lo)
    b = jnp.where(mirror, -lo, hi)
    return jax.scipy.special.erfc(a) - jax.scipy.special.erfc(b)


def axis_factors(d, variances, voxel: float, sampling: str):
    """Per-axis factor of a unit-integral Gaussian at offsets `d` (Å) from its centre.

    - `"point"`: the 1-D normal density `(2πσ²)^{-1/2} exp(-d²/(2σ²))` at the grid point.
    - `"average"`: its mean over the voxel's extent `[d - v/2, d + v/2]`:
      `(1/v) · ½ [erf((d + v/2)/(√2 σ)) - erf((d - v/2)/(√2 σ))]`.

    The product of the three axes' factors times the amplitude is the Gaussian's value (point) or
    exact voxel average (average).

    **Arguments:** `d` `(c, W)`, `variances` `(c, K)`; **Returns:** `(c, K, W)`.
    """
    var = variances[:, :, None]
    d = d[:, None, :]
    if sampling == "point":
        return jnp.exp(-0.5 * d * d / var) / jnp.sqrt(2 * jnp.pi * var)
    scale = 1.0 / jnp.sqrt(2.0 * var)
    return 0.5 / voxel * _erf_diff((d - 0.5 * voxel) * scale, (d + 0.5 * voxel) * scale)


class AbstractSilentKernel(eqx.Module):
    """A window kernel that can tell which sources add exactly nothing (the CPU loop skips them)."""

    @abc.abstractmethod
    def silent(self, *S) -> Array:
        """`(c,)` True for sources whose window is exactly 0."""


class AbstractPerSourceKernel(AbstractSilentKernel):
    """A window kernel whose values the CPU loop can compute one source at a time, where it adds
    them: `factors` once per chunk, `window` per source, `silent` for sources that add nothing."""

    @abc.abstractmethod
    def factors(self, dx, dy, dz, *S) -> tuple:
        """Per-source tables `(c, ...)` from a chunk's offsets and parameters."""

    @abc.abstractmethod
    def window(self, *tables_i) -> Array:
        """One source's window `(wz, wy, wx)` from its rows of `factors`."""


class GaussianKernel(AbstractPerSourceKernel):
    """Window values of a sum of isotropic Gaussians (separable: one factor per axis).

    Sources: `A` `(c, K)` amplitudes (integrals) and `V` `(c, K)` per-axis variances (Å²).
    """

    voxel: tuple[float, float, float] = eqx.field(static=True)
    sampling: str = eqx.field(static=True)

    def __call__(self, dx, dy, dz, A, V):
        fx, fy, afz = self.factors(dx, dy, dz, A, V)
        c, k = A.shape
        wz, wy, wx = afz.shape[-1], fy.shape[-1], fx.shape[-1]
        t = (afz[:, :, :, None] * fy[:, :, None, :]).reshape(c, k, wz * wy)
        # HIGHEST: a GPU's default matmul precision (TF32) would cost the map its 1e-5 accuracy
        return jnp.einsum("ckp,ckx->cpx", t, fx, precision=lax.Precision.HIGHEST).reshape(c, wz, wy, wx)

    # One source at a time (the CPU loop's forward map): `factors` once per chunk, `window` per source
    # where it is added to the map. A chunk's windows at once, `__call__`, took 3-4 times as long on
    # the CPU (1,706 atoms of 7CEC into 64³ of 1.5 Å: 17-28 ms against 5.8 ms): its (c, wz·wy, wx)
    # batched matmul contracts only K = 5 terms and its values went through memory.

    def factors(self, dx, dy, dz, A, V):
        """Per-source tables `(fx (c, K, wx), fy (c, K, wy), A·fz (c, K, wz))` for `window`."""
        fx = axis_factors(dx, V, self.voxel[0], self.sampling)
        fy = axis_factors(dy, V, self.voxel[1], self.sampling)
        fz = axis_factors(dz, V, self.voxel[2], self.sampling)
        return fx, fy, A[:, :, None] * fz

    def window(self, fx, fy, afz):
        """One source's window `(wz, wy, wx)` from its rows of `factors`: `__call__`'s values, as
        one `(wz, K) @ (K, wy·wx)` product. On the CPU this took 6.1 ms for 1,812 atoms of 7CEC into
        64³ of 1.5 Å against 9.3 ms for the K terms summed in one fused loop over the voxels."""
        k, wz = afz.shape
        rows = (fy[:, :, None] * fx[:, None, :]).reshape(k, -1)
        return jnp.dot(afz.T, rows, precision=lax.Precision.HIGHEST).reshape(wz, fy.shape[1], fx.shape[1])

    def silent(self, A, V):
        """`(c,)` True for sources whose window is exactly 0 (every amplitude 0: padding atoms)."""
        return jnp.all(A == 0, axis=1)


@jax.custom_batching.custom_vmap
def _live_count(live):
    """The number of True entries of `live` `(c,)`: the CPU loop's trip count over a chunk's sources,
    live ones first. Under `vmap` it is `c` instead, unbatched: a batched trip count would make the
    loop select the whole map at every step; the loop then visits every slot, the dead ones adding 0."""
    return jnp.sum(live, dtype=jnp.int32)


@_live_count.def_vmap
def _live_count_vmap(axis_size, in_batched, live):
    if not in_batched[0]:
        return _live_count(live), False
    return jnp.asarray(live.shape[-1], jnp.int32), False


@jax.custom_batching.custom_vmap
def _unbatched_max(count):
    """`count` (a scalar int): a loop's trip count. Under `vmap` the batch's largest, unbatched, so
    that the loop runs as one loop for the whole batch (see `_live_count`)."""
    return count


@_unbatched_max.def_vmap
def _unbatched_max_vmap(axis_size, in_batched, count):
    if not in_batched[0]:
        return _unbatched_max(count), False
    return jnp.max(count), False


@functools.lru_cache(maxsize=128)
def _bucket_splatter(
    padded_shape: tuple[int, int, int],
    halves: tuple[tuple[int, int, int], ...],
    pad: tuple[int, int, int],
    origin: tuple[float, float, float],
    voxel: tuple[float, float, float],
    kernel: Callable,
    forward_kernel: Callable | None = None,
    accumulate: str = "auto",
) -> Callable:
    """A function `(map_padded, P, mask, chunk_class, *S) -> map_padded` with a hand-written VJP,
    for one bucket.

    `P`: `(nc, c, 3)` positions; `mask`: `(nc, c)` False on padding slots; `chunk_class`: `(nc,)`
    the index into `halves` (x, y, z half widths, voxels) of each chunk's window size (one size:
    ignored); `S`: the sources' parameters, arrays `(nc, c, ...)`. `kernel(dx, dy, dz, *S_chunk)`
    gives a chunk's window values `(c, wz, wy, wx)` from the offsets (Å) of the window's voxels from
    the sources, `dx` `(c, wx)` etc.
    `kernel` must be hashable (an `eqx.Module` with static fields): it keys the compilation cache.
    `forward_kernel` (hashable), when given, computes the forward map's window values instead (e.g. a
    fast approximation of `kernel`): `forward_kernel.tables(*S_chunk)` gives per-source arrays
    `(c, ...)` once per chunk, and `forward_kernel.values(dx, dy, dz, *tables_i)` one source's window
    `(wz, wy, wx)` from its offsets `(wx,)`, `(wy,)`, `(wz,)` and its rows of the tables, evaluated
    where the window is added to the map, and `cotangents(dx, dy, dz, *tables_i, g_window) ->
    (table cotangents, (3,) offset gradient)`: the map's own (forward-kernel) values are then
    differentiated through their tables. Without it the VJP differentiates `kernel`.
    `accumulate`: `"loop"` (one source at a time), `"scatter"` (one scatter-add per chunk) or
    `"auto"` (the loop on the CPU, the scatter elsewhere). With several window sizes, the chunks of
    each size run in a loop of their own: every size is compiled once.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    _, pny, pnx = padded_shape

    def by_platform(loop_fn, scatter_fn, *args):
        if accumulate == "loop":
            return loop_fn(*args)
        if accumulate == "scatter":
            return scatter_fn(*args)
        return lax.platform_dependent(*args, cpu=loop_fn, default=scatter_fn)

    def chunk_ops(half):
        """(add a chunk's windows to the map, a chunk's cotangents from the cotangent map) for
        windows of `half` voxels."""
        widths = window_widths(half)  # x, y, z
        wz, wy, wx = widths[2], widths[1], widths[0]
        limits = np.array([padded_shape[2], padded_shape[1], padded_shape[0]]) - np.array(widths)
        # flat offsets of a window's voxels from its first voxel in the padded map, (wz*wy*wx,)
        local = ((np.arange(wz)[:, None, None] * pny + np.arange(wy)[None, :, None]) * pnx
                 + np.arange(wx)[None, None, :]).reshape(-1).astype(np.int32)

        def flat_indices(start):
            """`(c, wz*wy*wx)` flat indices into the padded map of every voxel of each window."""
            base = (start[:, 0] * pny + start[:, 1]) * pnx + start[:, 2]
            return base[:, None] + jnp.asarray(local)[None, :]

        def window_geometry(P, mask):
            """(starts (c, 3) z,y,x in the padded grid, offsets (Å) [(c, wx), (c, wy), (c, wz)], live (c,))."""
            u = (P - jnp.asarray(origin, P.dtype)) / jnp.asarray(voxel, P.dtype)  # (c, 3) x,y,z
            centre = jnp.round(lax.stop_gradient(u)).astype(jnp.int32)
            start = centre - jnp.asarray(half, jnp.int32) + jnp.asarray(pad, jnp.int32)
            inside = jnp.all((start >= 0) & (start <= jnp.asarray(limits, jnp.int32)), axis=1)
            offsets = []
            for ax in range(3):
                offs = jnp.arange(widths[ax], dtype=P.dtype) - half[ax]
                offsets.append((centre[:, ax : ax + 1].astype(P.dtype) + offs[None, :] - u[:, ax : ax + 1]) * voxel[ax])
            start_zyx = jnp.stack([start[:, 2], start[:, 1], start[:, 0]], axis=1)
            return start_zyx, offsets, inside & mask

        def window_values(P, mask, *S):
            """(starts (c, 3) z,y,x in the padded grid, values (c, wz, wy, wx))."""
            start_zyx, offsets, live = window_geometry(P, mask)
            vals = kernel(*offsets, *S)
            return start_zyx, jnp.where(live[:, None, None, None], vals, 0)

        def chunk_windows(P, mask, *S):
            """(starts (c, 3), values (c, wz, wy, wx)) of a chunk, from the forward kernel if any."""
            if forward_kernel is None:
                return window_values(P, mask, *S)
            start, offsets, live = window_geometry(P, mask)
            vals = jax.vmap(forward_kernel.values)(*offsets, *forward_kernel.tables(*S))
            return start, jnp.where(live[:, None, None, None], vals, 0)

        def add_chunk_scatter(m, P, mask, *S):
            # every window of the chunk in one scatter-add (GPU): no sequential loop over sources
            start, vals = chunk_windows(P, mask, *S)
            flat = m.reshape(-1).at[flat_indices(start).reshape(-1)].add(vals.reshape(-1).astype(m.dtype))
            return flat.reshape(m.shape)

        def add_chunk_loop(m, P, mask, *S):
            # one window at a time (CPU): XLA's CPU backend runs these in-place updates fastest
            if forward_kernel is None and not isinstance(kernel, AbstractPerSourceKernel):
                start, vals = window_values(P, mask, *S)
                return lax.fori_loop(0, P.shape[0], lambda j, m_: add_window(m_, start[j], vals[j]), m)
            # each window computed where it is added (see `GaussianKernel.factors`), and only the
            # sources that add anything: live ones, in their order, first; padding slots and silent
            # sources (zero amplitudes: a batch's padding atoms) are skipped, as they add exact 0
            start, offsets, live = window_geometry(P, mask)
            if isinstance(kernel, AbstractSilentKernel):
                live = live & ~kernel.silent(*S)
            order = jnp.argsort(~live, stable=True)
            if forward_kernel is None:
                make_tables = functools.partial(kernel.factors, *offsets, *S)

                def window(i, *rows):
                    return kernel.window(*rows)
            else:
                make_tables = functools.partial(forward_kernel.tables, *S)

                def window(i, *rows):
                    return forward_kernel.values(*(o[i] for o in offsets), *rows)
            # a chunk that adds nothing (free slots, padding atoms) computes no tables; a cond on
            # the map itself would copy it at every chunk
            tables = lax.cond(jnp.any(live), make_tables, lambda: jax.tree_util.tree_map(
                lambda t: jnp.zeros(t.shape, t.dtype), jax.eval_shape(make_tables)))

            def body(j, m_):
                i = order[j]
                # dead slots are visited only under vmap (`_live_count`), and add 0
                v = window(i, *(t[i] for t in tables))
                return add_window(m_, start[i], jnp.where(live[i], v, 0))

            return lax.fori_loop(0, _live_count(live), body, m)

        def add_window(m, start, values):
            s = (start[0], start[1], start[2])
            return lax.dynamic_update_slice(m, lax.dynamic_slice(m, s, (wz, wy, wx)) + values.astype(m.dtype), s)

        def add(m, P, mask, *S):
            return by_platform(add_chunk_loop, add_chunk_scatter, m, P, mask, *S)

        def chunk_grad(g, p, mk, *s):
            (start, _), pull = jax.vjp(lambda p_, *s_: window_values(p_, mk, *s_), p, *s)
            zero_start = np.zeros(start.shape, jax.dtypes.float0)
            gw = jax.vmap(lambda st: lax.dynamic_slice(g, (st[0], st[1], st[2]), (wz, wy, wx)))(start)
            return pull((zero_start, gw.astype(p.dtype)))

        def table_cotangents_loop(g, p, start, offsets, live, tables):
            # one source at a time, as the CPU forward adds them: a vmap over the chunk would turn the
            # window slices and table look-ups into batched gathers, several times slower on the CPU
            def body(i, acc):
                cts, gos = acc
                gw = lax.dynamic_slice(g, (start[i, 0], start[i, 1], start[i, 2]), (wz, wy, wx))
                gw = jnp.where(live[i], gw.astype(p.dtype), 0)
                ct, go = forward_kernel.cotangents(*(o[i] for o in offsets), *(t[i] for t in tables), gw)
                return tuple(a.at[i].set(c) for a, c in zip(cts, ct)), gos.at[i].set(go)

            init = (tuple(jnp.zeros_like(t) for t in tables), jnp.zeros(p.shape, p.dtype))
            return lax.fori_loop(0, p.shape[0], body, init)

        def table_cotangents_vmap(g, p, start, offsets, live, tables):
            # every source of the chunk at once (GPU)
            gw = g.reshape(-1)[flat_indices(start)].reshape(-1, wz, wy, wx).astype(p.dtype)
            gw = jnp.where(live[:, None, None, None], gw, 0)
            return jax.vmap(forward_kernel.cotangents)(*offsets, *tables, gw)

        def chunk_grad_tables(g, p, mk, *s):
            # the VJP of the forward kernel's own (table) values: the cotangent windows are reduced
            # to per-source table cotangents and position gradients, then pulled back through
            # `tables`, so no per-voxel work is differentiated
            start, offsets, live = window_geometry(p, mk)
            tables, pull = jax.vjp(forward_kernel.tables, *s)
            ct_tables, g_offsets = by_platform(
                table_cotangents_loop, table_cotangents_vmap, g, p, start, offsets, live, tables
            )
            # offsets are (voxel − position): d offset / d position = −1 along each axis
            return (-g_offsets, *pull(ct_tables))

        return add, (chunk_grad_tables if forward_kernel is not None else chunk_grad)

    ops = [chunk_ops(h) for h in halves]

    def class_loops(carry, chunk_class, step):
        """`carry` through `step(k, i, valid, carry)` for every chunk `i`, in one loop per window
        size `k` over the chunks of that size (a `lax.switch` per chunk would copy the map at
        every chunk). Under `vmap` each loop runs for the batch's largest count, a member's
        surplus trips marked invalid (they add nothing), so the carry is never selected whole."""
        nc = chunk_class.shape[0]
        order = jnp.argsort(chunk_class, stable=True)
        for k in range(len(ops)):
            start = jnp.sum(chunk_class < k, dtype=jnp.int32)
            count = jnp.sum(chunk_class == k, dtype=jnp.int32)

            def body(j, c, k=k, start=start, count=count):
                return step(k, order[jnp.minimum(start + j, nc - 1)], j < count, c)

            carry = lax.fori_loop(0, _unbatched_max(count), body, carry)
        return carry

    def chunk_grad_or_skip(k, g, p, mk, *s):
        # zeros for a chunk of free slots, as the forward adds nothing for it (a chunk of silent
        # sources is not skipped: the map's gradient with respect to their amplitudes is not 0)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, (p, *s))
        return lax.cond(jnp.any(mk), lambda: ops[k][1](g, p, mk, *s), lambda: zeros)

    @jax.custom_vjp
    def splat(m, P, mask, chunk_class, *S):
        if len(ops) == 1:
            return lax.scan(lambda m_, a: (ops[0][0](m_, a[0], a[1], *a[2:]), None), m, (P, mask, *S))[0]

        def step(k, i, valid, m_):
            return ops[k][0](m_, P[i], mask[i] & valid, *(s[i] for s in S))

        return class_loops(m, chunk_class, step)

    def splat_fwd(m, P, mask, chunk_class, *S):
        return splat(m, P, mask, chunk_class, *S), (P, mask, chunk_class, S)

    def splat_bwd(res, g):
        P, mask, chunk_class, S = res
        if len(ops) == 1:
            grads = lax.scan(lambda _, a: (None, chunk_grad_or_skip(0, g, *a)), None, (P, mask, *S))[1]
        else:
            def step(k, i, valid, acc):
                cts = chunk_grad_or_skip(k, g, P[i], mask[i] & valid, *(s[i] for s in S))
                # a surplus trip (vmap) writes its chunk's zeros over a chunk of another size: keep it
                return tuple(a.at[i].set(jnp.where(valid, ct, a[i])) for a, ct in zip(acc, cts))

            grads = class_loops(jax.tree_util.tree_map(jnp.zeros_like, (P, *S)), chunk_class, step)
        g_mask = np.zeros(mask.shape, jax.dtypes.float0)
        g_class = np.zeros(chunk_class.shape, jax.dtypes.float0)
        return (g, grads[0], g_mask, g_class, *grads[1:])

    splat.defvjp(splat_fwd, splat_bwd)
    return splat


def splat_kernel(
    grid: Grid,
    plan: WindowPlan,
    positions: Float[Array, "n 3"],
    sources: tuple,
    kernel: Callable,
    dtype,
    forward_kernel: Callable | None = None,
    accumulate: str = "auto",
) -> Float[Array, "nz ny nx"]:
    """Sum over sources of `kernel`'s values, each evaluated in the source's planned window.

    **Arguments:**

    - `grid`, `plan`: the target grid and a `WindowPlan` for these sources.
    - `positions`: `(n, 3)` source positions in Å.
    - `sources`: a tuple of `(n, ...)` arrays, each source's parameters, handed to `kernel` per chunk.
    - `kernel`: hashable callable `(dx, dy, dz, *sources_chunk) -> (c, wz, wy, wx)`.
    - `dtype`: the map's dtype.
    - `forward_kernel`: optional hashable object with `tables(*sources_chunk)` and
      `values(dx, dy, dz, *tables_i)` methods that computes the forward map's values instead, one
      window at a time, and their VJP (see `_bucket_splatter`).
    - `accumulate`: `"auto"` (by platform), `"loop"` (CPU path) or `"scatter"` (GPU path).

    **Returns:** the map `(nz, ny, nx)`.
    """
    px, py, pz = plan.pad
    nz, ny, nx = grid.shape
    padded_shape = (nz + 2 * pz, ny + 2 * py, nx + 2 * px)
    m = jnp.zeros(padded_shape, dtype)
    for bucket in plan.buckets:
        splat = _bucket_splatter(
            padded_shape, bucket.sizes, plan.pad, grid.origin, grid.voxel_size, kernel, forward_kernel, accumulate,
        )
        idx = bucket.indices
        m = splat(m, positions[idx], bucket.mask, bucket.size_of_chunks(), *(s[idx] for s in sources))
    return m[pz : pz + nz, py : py + ny, px : px + nx]


def splat_windows(
    grid: Grid,
    plan: WindowPlan,
    positions: Float[Array, "n 3"],
    amplitudes: Float[Array, "n K"],
    variances: Float[Array, "n K"],
    sampling: str,
    accumulate: str = "auto",
) -> Float[Array, "nz ny nx"]:
    """Sum of the sources' Gaussians on `grid`, each evaluated in its planned window.

    **Arguments:**

    - `grid`: target grid.
    - `plan`: a `WindowPlan` built for these sources.
    - `positions`, `amplitudes`, `variances`: the sources (see `GaussianMixtureVolume`).
    - `sampling`: `"average"` (exact voxel averages) or `"point"` (values at grid points).
    - `accumulate`: `"auto"` (by platform), `"loop"` (CPU path) or `"scatter"` (GPU path).

    **Returns:** the map `(nz, ny, nx)`.
    """
    kernel = GaussianKernel(tuple(grid.voxel_size), sampling)
    return splat_kernel(grid, plan, positions, (amplitudes, variances), kernel, amplitudes.dtype,
                        accumulate=accumulate)
