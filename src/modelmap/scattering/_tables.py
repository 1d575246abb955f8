"""Gaussian-sum scattering factor tables taken from gemmi.

- `"electron"`: International Tables for Crystallography Vol. C (2011), Table 4.3.2.2, which is the
  fit of Peng, Ren, Dudarev & Whelan (1996), Acta Cryst. A52, 257-276, for sinθ/λ <= 2 Å⁻¹: five
  Gaussians, no constant (gemmi `Element.c4322`). f in Å; a map made from it is in Å⁻²
  (the Coulomb potential in volts is 47.878 V·Å² times this, before the relativistic factor).
- `"xray"`: International Tables Vol. C Table 6.1.1.4 (IT92): four Gaussians plus a constant
  (gemmi `Element.it92`). f in electrons; a map is in e/Å³. The constant is stored as a fifth
  Gaussian with b = 0, which is exact: c = c·exp(-0·s²/4).

Both are written in sinθ/λ = s/2: `f(s) = Σ_k a_k exp(-b_k s²/4)`. A term with the atom's B becomes, in
real space, `a_k (4π/(b_k+B))^{3/2} exp(-4π² r²/(b_k+B))`, a Gaussian of per-axis variance
`(b_k + B)/(8π²)` and integral `a_k`.
"""

from __future__ import annotations

import functools

import equinox as eqx
import gemmi
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._errors import UnknownElementError

__all__ = ["ScatteringTable", "get_table", "TABLE_NAMES"]

TABLE_NAMES = ("electron", "xray")
MAX_Z = 98


class ScatteringTable(eqx.Module):
    """Gaussian coefficients of f(s) for Z = 0..98 (row 0 is unused and all zero).

    **Arguments:**

    - `name`: `"electron"` or `"xray"`.
    - `a`: `(99, K)` amplitudes (Å for electron, electrons for X-ray).
    - `b`: `(99, K)` widths in Å² (in the sinθ/λ convention, `exp(-b s²/4)`).
    - `defined`: `(99,)` bool, whether gemmi has coefficients for this Z.
    """

    name: str = eqx.field(static=True)
    a: Float[Array, "99 K"]
    b: Float[Array, "99 K"]
    defined: tuple[bool, ...] = eqx.field(static=True, repr=False)

    def f0(self, atomic_numbers) -> Float[Array, "..."]:
        """Scattering factor at s = 0 (the integral of the atom's map), per atom."""
        return jnp.sum(self.a[jnp.asarray(atomic_numbers)], axis=-1)

    def __call__(self, atomic_numbers, s) -> Float[Array, "..."]:
        """f(s) at spatial frequency s = 1/d (Å⁻¹); broadcasts atomic_numbers against s."""
        z = jnp.asarray(atomic_numbers)
        s2 = jnp.asarray(s)[..., None] ** 2
        return jnp.sum(self.a[z] * jnp.exp(-self.b[z] * s2 / 4), axis=-1)

    def check_elements(self, atomic_numbers, what: str = "model") -> None:
        """Raise `UnknownElementError` for atomic numbers the table has no coefficients for."""
        z = np.asarray(atomic_numbers).reshape(-1)
        bad = (z < 0) | (z > MAX_Z)
        bad[~bad] = ~np.asarray(self.defined)[z[~bad]]
        if bad.any():
            zs = sorted(set(int(v) for v in z[bad]))
            names = [gemmi.Element(v).name if 0 < v <= MAX_Z else str(v) for v in zs]
            raise UnknownElementError(
                f"{what}: the {self.name} scattering table has no factors for element(s) "
                f"{', '.join(names)} (atomic number(s) {zs})"
            )


@functools.cache
def _coefficients(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if name not in TABLE_NAMES:
        raise ValueError(f"unknown scattering table {name!r}; choose one of {TABLE_NAMES}")
    k = 5
    a = np.zeros((MAX_Z + 1, k))
    b = np.zeros((MAX_Z + 1, k))
    defined = np.zeros(MAX_Z + 1, bool)
    for z in range(1, MAX_Z + 1):
        el = gemmi.Element(z)
        if name == "electron":
            coef = el.c4322
            ak, bk = list(coef.a), list(coef.b)
        else:
            coef = el.it92
            ak, bk = list(coef.a) + [coef.c], list(coef.b) + [0.0]
        if not any(ak):
            continue
        a[z, : len(ak)] = ak
        b[z, : len(bk)] = bk
        defined[z] = True
    return a, b, defined


def get_table(name: str = "electron", dtype=jnp.float32) -> ScatteringTable:
    """The Gaussian-sum table `name` (`"electron"` or `"xray"`) as a `ScatteringTable`.

    **Arguments:**

    - `name`: `"electron"` (ITC 4.3.2.2 / Peng 1996) or `"xray"` (IT92).
    - `dtype`: floating dtype of the coefficient arrays.

    **Returns:** a `ScatteringTable` with `(99, 5)` arrays `a`, `b`.
    """
    a, b, defined = _coefficients(name)
    return ScatteringTable(name, jnp.asarray(a, dtype), jnp.asarray(b, dtype), tuple(bool(d) for d in defined))
