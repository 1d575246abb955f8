"""Concrete values onto the device without compiling anything.

`jnp.asarray(x, dtype)` and eager `jnp` operations compile a small XLA program for every new shape
and dtype (`stage`, `convert_element_type`, `broadcast_in_dim`: 10-35 ms each on the CPU); a
refinement's set-up made about 40 of them. `jax.device_put` of a numpy array compiles nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jaxtyping import Array

__all__ = ["on_host", "put"]


def put(x, dtype=None) -> Array:
    """`x` (a concrete value: numpy, a list, a number) as a JAX array on the default device,
    converted to `dtype` on the host; what `jnp.asarray(x, dtype)` gives, without a compilation.
    A JAX array of the right dtype is returned as it is."""
    if isinstance(x, jax.Array) and (dtype is None or x.dtype == np.dtype(dtype)):
        return x
    return jax.device_put(np.asarray(x, dtype))


def on_host(tree):
    """`tree` with every JAX array leaf as a numpy array: planning arithmetic on concrete values
    (window sizes from B, blur) then runs in numpy instead of compiling eager `jnp` operations."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)
