"""The interface every render function shares, and the bounds a plan can be declared from."""


import abc
import re
from typing import Generic, TypeVar

import equinox as eqx
import jax
import numpy as np
from equinox import AbstractVar

from .._errors import PlanExceededError
from .._grid import Grid
from ..scattering import TABLE_NAMES, get_table
from ..volumes import AbstractVolume

__all__ = ["AbstractRenderFn", "RenderBounds", "SAMPLINGS", "check_sampling", "checked_call", "device_of", "is_traced",
           "split_margin"]

VolumeT = TypeVar("VolumeT", bound=AbstractVolume)


#: What a render function's map values are: `"point"`, the map at the grid points, or `"average"`,
#: its mean over each voxel's box (centred on the grid point).
SAMPLINGS = ("average", "point")


def check_sampling(sampling: str) -> None:
    """Raise `ValueError` unless `sampling` is one of `SAMPLINGS`."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be 'average' or 'point', got {sampling!r}")


def is_traced(*values) -> bool:
    """Whether any array in `values` (pytrees) is a tracer (inside jit/grad/vmap)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(values))


def device_of(volume) -> jax.Device:
    """The device a volume is rendered on: its positions' device when they are a concrete JAX
    array, else (numpy arrays, or traced) JAX's default device."""
    pos = volume.positions
    if isinstance(pos, jax.Array) and not isinstance(pos, jax.core.Tracer):
        return next(iter(pos.devices()))
    return jax.devices()[0]


def split_margin(b_margin) -> tuple[float, float]:
    """`(below, above)` Å² from a `with_plan` B margin: one number for both, or a pair (B may drop
    by `below` and grow by `above`; both >= 0)."""
    below, above = (float(x) for x in np.broadcast_to(np.asarray(b_margin, np.float64), (2,)))
    if not (below >= 0 and above >= 0):
        raise ValueError(f"b_margin must be >= 0 Å² (or a pair (below, above) of them), got {b_margin}")
    return below, above


def checked_call(fn, *args):
    """`fn(*args)`; on concrete inputs, an `eqx.error_if` check that fails inside `fn` (a volume past
    its plan) is raised as a `PlanExceededError` with just its message, instead of equinox's runtime
    error and its long traceback. Traced calls are left alone (the check stays in the computation)."""
    if is_traced(args):
        return fn(*args)
    try:
        return fn(*args)
    except eqx.EquinoxRuntimeError as err:
        found = re.search(r"EquinoxRuntimeError: (.*?)(?:\n\s*\n|$)", str(err), re.S)
        raise PlanExceededError(found.group(1).strip() if found else str(err)) from None


class RenderBounds(eqx.Module):
    """What a render function must hold when it is planned without a volume (`with_bounds`).

    A render function planned from bounds depends on no value of any volume: one compiled function
    renders every structure within them, traced or not, under `jit`, `vmap`, `grad` and `lax.map`.
    A volume outside its bounds is an error when it is rendered (`eqx.error_if`), never a truncated
    map. All fields are static.

    **Arguments:**

    - `b_factor`: `(lowest, highest)` atom B in Å² (the highest sets the window size; the lowest the
      Fourier routes' B interpolation and anti-aliasing blur).
    - `resolution`: `(finest, coarsest)` D in Å, or one number for both (the Gaussian method's blur
      and the shell images widen with D; the Fourier map's frequencies reach 1/D of the finest).
    - `elements`: atomic numbers that may occur (`None`: every element of the table, which sizes
      the windows for the widest form factor of all: larger windows).
    - `table`: `"electron"` or `"xray"`.
    - `n_terms`: the most shell terms a `ShellDecompositionVolume` keeps (the shell method's window
      grows with them; 6 by default).
    - `widest`: optional, the largest `b_k + B` (Å²) of any atom (its element's widest form-factor
      term plus its own B): sizes the Gaussian windows more tightly than the widest term of all
      `elements` plus the highest B (a calcium at low B and carbons at high B need less than a
      calcium at the carbons' B).
    """

    b_factor: tuple[float, float] = eqx.field(static=True)
    resolution: tuple[float, float] = eqx.field(static=True)
    elements: tuple[int, ...] | None = eqx.field(static=True, default=None)
    table: str = eqx.field(static=True, default="electron")
    n_terms: int = eqx.field(static=True, default=6)
    widest: float | None = eqx.field(static=True, default=None)

    def __init__(self, b_factor, resolution=0.0, elements=None, table: str = "electron", n_terms: int = 6,
                 widest: float | None = None):
        b = tuple(float(x) for x in np.broadcast_to(np.asarray(b_factor, np.float64), (2,)))
        d = tuple(float(x) for x in np.broadcast_to(np.asarray(resolution, np.float64), (2,)))
        if not all(np.isfinite(b + d)) or b[0] > b[1] or d[0] > d[1] or d[0] < 0:
            raise ValueError(
                f"bounds need finite (lowest, highest) B and 0 <= (finest, coarsest) D; got B {b}, D {d}"
            )
        if table not in TABLE_NAMES:
            raise ValueError(f"table must be one of {TABLE_NAMES}, got {table!r}")
        self.b_factor = b
        self.resolution = d
        self.elements = None if elements is None else tuple(sorted({int(z) for z in np.ravel(elements)}))
        self.table = table
        self.n_terms = int(n_terms)
        self.widest = None if widest is None else float(widest)

    def widest_gaussian(self) -> float:
        """The largest `b_k + B` (Å²) within the bounds: `widest`, else the widest form-factor term
        of `elements` plus the highest B (before any resolution blur)."""
        full = self.form_factor_widths()[1] + self.b_factor[1]
        return full if self.widest is None else min(self.widest, full)

    def narrowest_gaussian(self) -> float:
        """The smallest widest-term `max_k b_k + B` (Å²) within the bounds: the narrowest atom's
        widest Gaussian (its element's, at the lowest B), before any resolution blur."""
        tab = get_table(self.table)
        z = np.flatnonzero(np.asarray(tab.defined)) if self.elements is None else np.asarray(self.elements)
        return float(np.asarray(tab.b)[z].max(axis=1).min()) + self.b_factor[0]

    def form_factor_widths(self) -> tuple[float, float]:
        """`(smallest, largest)` Gaussian width b_k (Å²) of the table's factors for `elements`."""
        tab = get_table(self.table)
        z = np.flatnonzero(np.asarray(tab.defined)) if self.elements is None else np.asarray(self.elements)
        tab.check_elements(z, "bounds")
        b = np.asarray(tab.b)[z]
        return float(b.min()), float(b.max())

    @classmethod
    def covering(
        cls, atoms, resolution, *, b_margin: float = 0.0, d_margin: float = 0.0, table: str = "electron",
        b_step: float | None = None, n_terms: int = 6,
    ) -> "RenderBounds":
        """Bounds that hold every structure in `atoms` (an `Atoms`, an `Ensemble` or a sequence of
        them, concrete) at `resolution` (a number or per-atom arrays), widened by the margins.

        `b_step` rounds the highest B up (and the lowest down) to a multiple of it, so that batches
        of other structures get the same bounds, hence the same compiled function.
        """
        from .._atoms import Ensemble

        items = atoms if isinstance(atoms, (list, tuple)) else [atoms]
        b, z, d = [], [], [np.ravel(np.asarray(resolution, np.float64))]
        for a in items:
            a = a.atoms if isinstance(a, Ensemble) else a
            b.append(np.ravel(np.asarray(a.b_factors, np.float64)))
            z.append(np.ravel(np.asarray(a.atomic_numbers)))
        b = np.concatenate(b)
        d = np.concatenate(d)
        lo, hi = float(b.min()) - b_margin, float(b.max()) + b_margin
        if b_step:
            lo, hi = b_step * np.floor(lo / b_step), b_step * np.ceil(hi / b_step)
        return cls((lo, hi), (max(float(d.min()) - d_margin, 0.0), float(d.max()) + d_margin),
                   np.unique(np.concatenate(z)), table, n_terms)


class AbstractRenderFn(eqx.Module, Generic[VolumeT]):
    """Renders a volume of one kind onto `grid`, giving a `(nz, ny, nx)` array.

    A render function is *planned* before it renders a traced volume (inside `jit`, `vmap`, `grad`,
    `lax.map`), in one of two ways:

    - `with_plan(volume, b_margin=..., d_margin=...)`: sized for a concrete volume (windows bucketed
      per atom: fastest for a known model), allowing B and D to grow by the margins; a volume with a
      leading batch axis gives a plan that covers every member;
    - `with_bounds(RenderBounds(...))`: sized for declared bounds, from no volume at all (any
      structure within them, any number of atoms).

    Called unplanned on a concrete volume, it plans for it on the fly. Past a plan's bounds the
    render is an error (`eqx.error_if`), never a truncated map.
    """

    grid: AbstractVar[Grid]

    @abc.abstractmethod
    def __call__(self, volume: VolumeT):
        """The map `(nz, ny, nx)` of `volume` on `grid`."""
        raise NotImplementedError

    @abc.abstractmethod
    def with_plan(
        self, volume: VolumeT, b_margin: float | tuple[float, float] = 0.0, d_margin: float = 0.0
    ) -> "AbstractRenderFn[VolumeT]":
        """A copy planned for the concrete `volume`, allowing every atom's B to change by `b_margin`
        Å² (one number: up or down; a pair `(below, above)`: down by the first, up by the second)
        and D by `d_margin` Å (where the method has a per-atom D)."""
        raise NotImplementedError

    @abc.abstractmethod
    def with_bounds(self, bounds: RenderBounds) -> "AbstractRenderFn[VolumeT]":
        """A copy planned for every volume within `bounds` (no volume needed)."""
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def is_planned(self) -> bool:
        """Whether the function can render a traced volume."""
        raise NotImplementedError

    def _plan_at_call(self, volume: VolumeT):
        """`self` when planned; else `self.with_plan(volume)` for a concrete volume; a traced one is
        an error that says how to plan."""
        if self.is_planned:
            return self
        if is_traced(volume):
            name = type(self).__name__
            raise ValueError(
                f"{name} is not planned, and the volume is traced here (inside jit/grad/vmap), so its "
                f"values cannot size the render. Plan it outside the transformation, either for a known "
                f"model: `render_fn = {name}(grid, ...).with_plan(volume, b_margin=...)`, or for any "
                f"structure within declared bounds: `render_fn = {name}(grid, ...).with_bounds("
                "modelmap.RenderBounds(b_factor=(0, 300), resolution=3.0))`"
            )
        return self.with_plan(volume)


def per_slot_max(values, n_leading: int) -> np.ndarray:
    """Max over `n_leading` leading (batch) axes of a concrete per-atom array: a plan for a stacked
    batch of volumes that covers every member in every atom slot."""
    v = np.asarray(values, np.float64)
    return v.max(axis=tuple(range(n_leading))) if n_leading else v
