"""The suite's precision switch (`tests/conftest.py`): float32 by default, as users run modelmap;
float64 only in tests marked `x64`."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.x64
def test_a_test_marked_x64_has_64_bit_types_in_every_thread():
    assert jnp.asarray(np.float64(1.0)).dtype == jnp.float64
    seen = []
    worker = threading.Thread(target=lambda: seen.append(jnp.asarray(np.float64(1.0)).dtype))
    worker.start()
    worker.join()
    assert seen == [jnp.float64]  # worker threads too (ShellRenderFn deals its work over threads)


def test_other_tests_run_in_float32_also_after_a_marked_one():
    """Runs after the test above (pytest keeps the file's order): the switch was restored."""
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(np.float64(1.0)).dtype == jnp.float32
    assert jnp.zeros(3).dtype == jnp.float32


def test_asking_for_float64_without_the_mark_is_an_error():
    """JAX would silently give float32 and warn; the suite turns that warning into an error."""
    with pytest.raises(UserWarning, match="Explicitly requested dtype float64"):
        jnp.asarray(np.ones(2), jnp.float64)
