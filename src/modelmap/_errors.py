"""Exceptions raised by modelmap.

Every failure that comes from the user's input has its own class, so that callers (and the command
line) can tell a malformed file from an unknown element or a grid that does not fit in memory. All of
them derive from `ModelmapError`, which itself is a `ValueError`.
"""


class ModelmapError(ValueError):
    """Base class of every input error raised by modelmap."""


class ModelFileError(ModelmapError):
    """A model file cannot be read, is empty, or holds no atoms after filtering."""


class UnknownElementError(ModelmapError):
    """An atom's element is not one of the scattering tables' elements."""


class InvalidAtomsError(ModelmapError):
    """Atom values that cannot make a map: NaN or infinite coordinates, negative occupancy or B."""


class MapFileError(ModelmapError):
    """A map file cannot be read, or its header is inconsistent."""


class MapAxisOrderError(MapFileError):
    """A map's MAPC/MAPR/MAPS axis order is not a permutation of (1, 2, 3)."""


class GridTooLargeError(ModelmapError, MemoryError):
    """A grid would need more memory than this machine has; raised before allocating it."""


class PlanExceededError(ModelmapError):
    """A volume left what its render function was planned for (a B, D or window past the plan's
    margins or bounds): rebuild the render function with wider margins or bounds."""
