import abc

import equinox as eqx
from equinox import AbstractVar

from .._grid import Grid


class AbstractRenderFn(eqx.Module):
    """Renders a volume onto `grid`, giving a `(nz, ny, nx)` array."""

    grid: AbstractVar[Grid]

    @abc.abstractmethod
    def __call__(self, volume):
        raise NotImplementedError
