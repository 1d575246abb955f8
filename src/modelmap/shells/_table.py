"""Shell tables at run time: normalized shell parameters, smooth in the resolution D.

A table (built offline by `python -m modelmap.shells.build`, shipped as package data) holds, per
element and per D on a 0.1 Å grid from 1 to 10 Å, the normalized parameters `(r_m, b_m, c_m)`
of the shell decomposition (spec §5, §11):

    ρ_{D,B}(r) ≈ Σ_m C_m Ω(r; R_m, B_m + B),   R_m = D r_m,   B_m = D² b_m,   C_m = D³ ρ0(D) c_m.

Between grid points the parameters are interpolated with a cubic Hermite spline whose slopes are
centred differences (Catmull-Rom; second-order one-sided at the ends), so they and their D-derivatives are continuous (spec §9,
option A); the peak height ρ0(D) = 4π ∫_0^{1/D} s² f(s) ds is computed exactly (Gauss-Legendre on
the scattering factor's Gaussians), not interpolated. The supported range is 1 ≤ D ≤ 10 Å.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import equinox as eqx
import gemmi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._errors import UnknownElementError
from ..scattering._tables import _coefficients

__all__ = ["ShellTable", "get_shell_table", "D_RANGE"]

D_RANGE = (1.0, 10.0)
_N_GL = 32  # Gauss-Legendre nodes for ρ0(D): exact to float64 for the 5-Gaussian factors at D >= 1 Å


class ShellTable(eqx.Module):
    """Normalized shell parameters of a set of elements on a uniform D grid.

    **Arguments:**

    - `name`: the scattering table the shells were fitted to (`"electron"` or `"xray"`).
    - `symbols`: element symbols, one per row.
    - `d_start`, `d_step`: the D grid is `d_start + d_step · i`, i = 0 .. nD-1 (Å).
    - `params`: `(E, nD, K, 3)` normalized `(r, b, c)` per term; term 0 is the Gaussian (r = 0).
    - `slopes`: `(E, nD, K, 3)` their derivatives with respect to the grid index (centred differences).
    - `gauss_a`, `gauss_b`: `(E, 5)` the element's scattering factor `f(s) = Σ a exp(-b s²/4)`.
    - `metadata`: the build's metadata as a JSON string.
    """

    name: str = eqx.field(static=True)
    symbols: tuple[str, ...] = eqx.field(static=True)
    d_start: float = eqx.field(static=True)
    d_step: float = eqx.field(static=True)
    params: Float[Array, "E nD K 3"]
    slopes: Float[Array, "E nD K 3"]
    gauss_a: Float[Array, "E 5"]
    gauss_b: Float[Array, "E 5"]
    metadata: str = eqx.field(static=True, repr=False)

    @property
    def n_terms(self) -> int:
        """The number of terms tabulated (the most a volume can keep)."""
        return self.params.shape[2]

    @property
    def info(self) -> dict:
        return json.loads(self.metadata)

    def element_index(self, atomic_numbers, what: str = "model") -> np.ndarray:
        """Row of the table for each atomic number (concrete); `UnknownElementError` if missing."""
        z = np.asarray(atomic_numbers).reshape(-1)
        lookup = {gemmi.Element(s).atomic_number: i for i, s in enumerate(self.symbols)}
        missing = sorted({int(v) for v in z if int(v) not in lookup})
        if missing:
            names = [gemmi.Element(v).name if 0 < v <= 118 else str(v) for v in missing]
            raise UnknownElementError(
                f"{what}: the {self.name} shell table has no shells for element(s) {', '.join(names)}; "
                f"it covers {' '.join(self.symbols)} (add elements with "
                f"`python -m modelmap.shells.build --elements ...`)"
            )
        return np.asarray([lookup[int(v)] for v in z], np.int32).reshape(np.shape(atomic_numbers))

    def normalized(self, element_index: Int[Array, " n"], resolution: Float[Array, " n"], n_terms: int):
        """Normalized `(r, b, c)` of the first `n_terms` terms at D, each `(n, n_terms)`.

        Cubic Hermite interpolation in D with the tabulated centred slopes: C¹ in D, so
        `jax.grad` with respect to D is continuous. D outside the grid is clamped to its end
        intervals (callers check the supported range).
        """
        n_d = self.params.shape[1]
        u = (resolution - self.d_start) / self.d_step
        i = jnp.clip(jnp.floor(u), 0, n_d - 2).astype(jnp.int32)
        t = (u - i)[:, None, None]
        p0 = self.params[element_index, i, :n_terms]
        p1 = self.params[element_index, i + 1, :n_terms]
        m0 = self.slopes[element_index, i, :n_terms]
        m1 = self.slopes[element_index, i + 1, :n_terms]
        t2, t3 = t * t, t * t * t
        p = (2 * t3 - 3 * t2 + 1) * p0 + (t3 - 2 * t2 + t) * m0 + (-2 * t3 + 3 * t2) * p1 + (t3 - t2) * m1
        p = p.astype(resolution.dtype)
        return p[..., 0], p[..., 1], p[..., 2]

    def rho0(self, element_index: Int[Array, " n"], resolution: Float[Array, " n"]) -> Float[Array, " n"]:
        """Exact peak height ρ0(D) = 4π ∫_0^{1/D} s² f(s) ds = (4π/D³) ∫_0^1 u² f(u/D) du at B = 0
        (Å⁻² for electrons, e/Å³ for X-rays), by Gauss-Legendre quadrature."""
        u, w = _gauss_legendre()
        u = jnp.asarray(u, resolution.dtype)
        w = jnp.asarray(w, resolution.dtype)
        a = self.gauss_a[element_index].astype(resolution.dtype)  # (n, 5)
        b = self.gauss_b[element_index].astype(resolution.dtype)
        s2 = (u[None, :] / resolution[:, None]) ** 2  # (n, q)
        f = jnp.sum(a[:, :, None] * jnp.exp(-b[:, :, None] * s2[:, None, :] / 4), axis=1)
        return 4 * jnp.pi / resolution**3 * jnp.sum(w * u * u * f, axis=-1)


@functools.cache
def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(_N_GL)
    return 0.5 * (x + 1), 0.5 * w


def catmull_rom_slopes(params: np.ndarray) -> np.ndarray:
    """Slopes along axis 1 per grid index: centred differences inside, second-order one-sided
    differences at the two ends (a first-order end slope doubles the error of the end intervals)."""
    m = np.empty_like(params)
    m[:, 1:-1] = 0.5 * (params[:, 2:] - params[:, :-2])
    m[:, 0] = 0.5 * (-3 * params[:, 0] + 4 * params[:, 1] - params[:, 2])
    m[:, -1] = 0.5 * (3 * params[:, -1] - 4 * params[:, -2] + params[:, -3])
    return m


def load_shell_table(path, dtype=jnp.float32) -> ShellTable:
    """Read a table file written by `python -m modelmap.shells.build`."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = str(arrays["metadata"])
    info = json.loads(meta)
    d = np.asarray(arrays["d_grid"], np.float64)
    step = float(np.round(d[1] - d[0], 10))
    if not np.allclose(np.diff(d), step, atol=1e-9):
        raise ValueError(f"{path}: the D grid is not uniform")
    if d[0] > D_RANGE[0] + 1e-9 or d[-1] < D_RANGE[1] - 1e-9:
        raise ValueError(f"{path}: the D grid {d[0]}-{d[-1]} Å does not cover {D_RANGE}")
    params = np.asarray(arrays["params"], np.float64)
    a, b, _ = _coefficients(info["scattering_table"])
    z = np.asarray(arrays["atomic_numbers"])
    return ShellTable(
        name=info["scattering_table"],
        symbols=tuple(str(s) for s in arrays["elements"]),
        d_start=float(d[0]),
        d_step=step,
        params=jnp.asarray(params, dtype),
        slopes=jnp.asarray(catmull_rom_slopes(params), dtype),
        gauss_a=jnp.asarray(a[z], dtype),
        gauss_b=jnp.asarray(b[z], dtype),
        metadata=meta,
    )


def get_shell_table(name: str = "electron", dtype=jnp.float32) -> ShellTable:
    """The shipped shell table fitted to scattering table `name` (`"electron"` or `"xray"`).

    **Arguments:**

    - `name`: `"electron"` (ITC 4.3.2.2 / Peng 1996) or `"xray"` (IT92).
    - `dtype`: floating dtype of the arrays (float64 is float32 while 64-bit types are off).

    **Returns:** a `ShellTable` (cached: the same immutable table for the same arguments).
    """
    # cached by the dtype JAX will really use, so that a float64 table asked for while 64-bit
    # types are off is not served as float32 after they are turned on
    return _shell_table(name, jax.dtypes.canonicalize_dtype(dtype))


@functools.cache
def _shell_table(name: str, dtype) -> ShellTable:
    if name not in ("electron", "xray"):
        raise ValueError(f"unknown shell table {name!r}; choose 'electron' or 'xray'")
    path = resources.files("modelmap.shells") / "data" / f"shells_{name}_v1.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"the shell table {path} is missing from this installation; regenerate it with "
            f"`python -m modelmap.shells.build --table {name}`"
        )
    with resources.as_file(path) as p:
        return load_shell_table(p, dtype)
