"""Small references shared by the tests: Pearson CC, scattering factors in numpy float64 and float64
central-difference gradient checks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from modelmap.scattering._tables import _coefficients


def cc(a, b):
    """Pearson correlation of two maps (differentiable)."""
    a = a - a.mean()
    b = b - b.mean()
    return jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))


def scattering_factor(z, s, table="electron"):
    """f(s) = Σ_k a_k exp(-b_k s²/4) of atomic numbers `z` at frequencies `s` (Å⁻¹; broadcast
    against each other), in numpy float64 from the table's coefficients: a float64 reference that
    needs no 64-bit JAX types."""
    a, b, _ = _coefficients(table)
    z = np.asarray(z)
    s2 = np.asarray(s, np.float64)[..., None] ** 2
    return np.sum(a[z] * np.exp(-b[z] * s2 / 4), axis=-1)


def assert_gradients_match_central_differences(loss, atoms, picks, h=1e-5, rtol=1e-5):
    """`jax.grad` of `loss(atoms)` equals float64 central differences at the picked entries.

    `picks` maps a leaf name of `Atoms` to a list of indices; the tolerance is `rtol` times the
    largest gradient entry of that leaf. Needs 64-bit types: mark the test `x64`.
    """
    assert jax.config.jax_enable_x64, "float64 central differences: mark the test @pytest.mark.x64"
    grads = eqx.filter_jit(eqx.filter_grad(loss))(atoms)
    loss_j = eqx.filter_jit(loss)
    for leaf, indices in picks.items():
        g = np.asarray(getattr(grads, leaf))
        scale = np.max(np.abs(g))
        for idx in indices:
            def shifted(delta, leaf=leaf, idx=idx):
                arr = getattr(atoms, leaf).at[idx].add(delta)
                return float(loss_j(eqx.tree_at(lambda a: getattr(a, leaf), atoms, arr)))

            fd = (shifted(h) - shifted(-h)) / (2 * h)
            assert abs(g[idx] - fd) <= rtol * scale, (leaf, idx, g[idx], fd)
