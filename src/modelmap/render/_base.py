import abc

import equinox as eqx
import jax
from equinox import AbstractVar

from .._grid import Grid


def is_traced(*values) -> bool:
    """Whether any array in `values` (pytrees) is a tracer (inside jit/grad/vmap)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(values))


class AbstractRenderFn(eqx.Module):
    """Renders a volume onto `grid`, giving a `(nz, ny, nx)` array."""

    grid: AbstractVar[Grid]

    @abc.abstractmethod
    def __call__(self, volume):
        raise NotImplementedError

    def _plan_at_call(self, volume, planned: bool, what: str, *values):
        """`self` when it is already planned, else `self.with_plan(volume)` for a volume whose
        `values` (the arrays the plan is sized from) are concrete; traced ones are an error that
        says to plan outside jit/grad/vmap."""
        if planned:
            return self
        if is_traced(*values):
            raise ValueError(
                f"{type(self).__name__} sizes {what} from the volume's values, which are traced here "
                "(inside jit/grad/vmap); build the render function outside with "
                "`render_fn = render_fn.with_plan(volume, ...)` (margins for the values that will change)"
            )
        return self.with_plan(volume)
