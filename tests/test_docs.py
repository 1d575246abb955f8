"""The documentation builds and every notebook runs.

- each `notebooks/*.py` (jupytext percent format) runs as a plain script in a subprocess, with a
  temporary working directory and the Agg backend, and must exit 0 (its figures go to that
  directory); the notebooks use only package-built data, so they need nothing from ../shared;
- `mkdocs build --strict` builds the site (API reference from the docstrings, CLI reference from the
  typer app) into a temporary directory: a broken link, a missing docstring target or a warning
  fails it. Skipped when mkdocs is not installed (`pip install -e ".[docs]"`; the `tests` extra
  includes it).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("[0-9]*.py"))


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", NB_FIGS=str(tmp_path / "figures"))
    # the checkout's sources first, whatever the installed copy points to
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path):
    run = subprocess.run([sys.executable, str(notebook)], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{notebook.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert list((tmp_path / "figures").glob("*.png")), f"{notebook.name} saved no figure"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed: pip install -e '.[docs]' (the tests extra includes it)")
def test_mkdocs_build_strict(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
