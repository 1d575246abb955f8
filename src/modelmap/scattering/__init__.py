"""Atomic scattering factors as Gaussian sums, indexed by atomic number."""

from ._images import atomic_image as atomic_image
from ._tables import (
    ScatteringTable as ScatteringTable,
    get_table as get_table,
    TABLE_NAMES as TABLE_NAMES,
)
