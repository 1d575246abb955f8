"""Parametrizations of a model map's sources (what is rendered)."""

from ._base import AbstractVolume as AbstractVolume
from ._independent_atom import IndependentAtomVolume as IndependentAtomVolume
from ._gaussian_mixture import (
    GaussianMixtureVolume as GaussianMixtureVolume,
    resolution_to_blur as resolution_to_blur,
)
from ._shell_decomposition import (
    ShellDecompositionVolume as ShellDecompositionVolume,
    DEFAULT_SHELL_TERMS as DEFAULT_SHELL_TERMS,
)
