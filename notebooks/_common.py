"""Small helpers shared by the notebooks: package-built test data and where figures go.

The notebooks build their data with modelmap itself (an ideal α-helix from
`modelmap._peptide.ideal_peptide`), so they run anywhere modelmap installs. Figures are saved
under `$NB_FIGS` (default `nb_figs/` in the working directory) as well as shown.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import modelmap as mm
from modelmap import io
from modelmap._peptide import ideal_peptide


def helix(sequence: str = "AAAAGAAAAAAA", b_factor: float = 20.0) -> mm.AtomicModel:
    """An ideal α-helix of Ala/Gly (backbone + CB, Engh & Huber geometry) as an `AtomicModel`."""
    return io.model_from_structure(ideal_peptide(sequence, b_factor=b_factor))


def with_atoms(model: mm.AtomicModel, positions=None, b_factors=None, occupancies=None) -> mm.AtomicModel:
    """A copy of `model` with some of its atoms' arrays replaced (labels and structure kept)."""
    a = model.atoms
    return model.replace(atoms=mm.Atoms(
        a.positions if positions is None else np.asarray(positions, np.float32),
        a.atomic_numbers,
        a.b_factors if b_factors is None else np.asarray(b_factors, np.float32),
        a.occupancies if occupancies is None else np.asarray(occupancies, np.float32),
    ))


def save(fig, name: str) -> Path:
    """Save `fig` as `$NB_FIGS/name` (default `nb_figs/name`) and return the path."""
    folder = Path(os.environ.get("NB_FIGS", "nb_figs"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print(f"saved {path}")
    return path
