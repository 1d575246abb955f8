import abc

import equinox as eqx


class AbstractVolume(eqx.Module):
    """A parametrization of the sources of a map; rendered onto a grid by a render function."""

    @abc.abstractmethod
    def total_mass(self):
        """The integral of the map over all space (Å⁻² · Å³ for the electron table)."""
        raise NotImplementedError
