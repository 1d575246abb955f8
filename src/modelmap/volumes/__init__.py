"""Parametrizations of a model map's sources (what is rendered)."""

from ._base import AbstractVolume as AbstractVolume
from ._gaussian_mixture import (
    GaussianMixtureVolume as GaussianMixtureVolume,
    resolution_to_blur as resolution_to_blur,
)
