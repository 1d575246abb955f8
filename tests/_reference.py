"""Small references shared by the tests: Pearson CC and float64 central-difference gradient checks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def cc(a, b):
    """Pearson correlation of two maps (differentiable)."""
    a = a - a.mean()
    b = b - b.mean()
    return jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))


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
