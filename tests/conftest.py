"""Shared fixtures.

Precision: the suite runs in JAX's default float32, as users run modelmap (64-bit types off). A test
that needs float64 (a float64 reference, a check against float64 finite differences, a tolerance
only float64 reaches) says so with `@pytest.mark.x64` (on the test, on one `pytest.param`, or as a
module's `pytestmark`): `jax_enable_x64` is then on for that test only, and the previous setting is
restored afterwards. Make float64 inputs inside such a test or in a function-scoped fixture: with
64-bit types off, `jnp.asarray(x, jnp.float64)` silently gives float32, and module- or
session-scoped fixtures are built before the switch (outside it). So that this cannot pass unseen,
JAX's "Explicitly requested dtype float64 ... will be truncated" warning is an error in the suite
(`pyproject.toml`, `filterwarnings`).

The switch is the global `jax.config.update`, not the `jax.enable_x64(True)` context manager: that
one is thread-local, so renderers that deal their work over threads (`ShellRenderFn(threads=...)`,
on by default on a multi-core CPU) would run their worker threads with 64-bit types off (a float64
`ShellRenderFn` render with `threads=2` inside the context manager raises "result_shape_dtypes
cannot specify 64-bit types when `jax_enable_x64` is disabled").

Real EMDB maps and PDB models are read in place from the project's shared data folder (never copied
into the repository). It is looked up as `$MODELMAP_TEST_DATA`, else `../shared/data` beside the
repository; tests that need it are skipped with the reason when it is absent (a user's machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _x64_when_marked(request):
    """`jax_enable_x64` on for a test marked `x64`, the previous setting restored afterwards (also
    when the test fails); nothing for the others."""
    if request.node.get_closest_marker("x64") is None:
        yield
        return
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop JAX's compiled functions after each test module: a whole run otherwise keeps every
    executable of the suite alive (gigabytes), and XLA once aborted compiling late in a run."""
    yield
    jax.clear_caches()


def _find_shared_data() -> Path | None:
    candidates = []
    if os.environ.get("MODELMAP_TEST_DATA"):
        candidates.append(Path(os.environ["MODELMAP_TEST_DATA"]))
    candidates += [REPO.parent / "shared" / "data", REPO / ".." / ".." / "shared" / "data"]
    for c in candidates:
        if (c / "README.md").exists():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared test data folder (EMDB maps + PDB models), or skip."""
    path = _find_shared_data()
    if path is None:
        pytest.skip(
            "shared test data not found: set MODELMAP_TEST_DATA to the folder with the EMDB maps "
            "and models (CI has it at ../shared/data)"
        )
    return path
