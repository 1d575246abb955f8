"""Render functions: turn a volume into a map on a grid."""

from ._base import AbstractRenderFn as AbstractRenderFn, RenderBounds as RenderBounds
from ._gaussian_mixture import GaussianMixtureRenderFn as GaussianMixtureRenderFn
from ._nufft import NufftRenderFn as NufftRenderFn
from ._shells import ShellRenderFn as ShellRenderFn
from ._slabs import (
    SlabPlan as SlabPlan,
    render_slabs as render_slabs,
    slab_memory_bytes as slab_memory_bytes,
    stream_slabs as stream_slabs,
    stream_value_and_grad as stream_value_and_grad,
)
from ._splat_fourier import SplatFourierRenderFn as SplatFourierRenderFn, aliasing_blur as aliasing_blur
from ._windows import (
    AbstractWindowPlan as AbstractWindowPlan,
    UniformWindows as UniformWindows,
    WindowClasses as WindowClasses,
    WindowBucket as WindowBucket,
    WindowPlan as WindowPlan,
)
from ._render import (
    fourier_render_fn as fourier_render_fn,
    render_model as render_model,
    volume_for_method as volume_for_method,
)
