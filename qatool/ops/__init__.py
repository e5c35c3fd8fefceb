"""Op implementations, one module per family; importing this package fills the registry."""

from . import activations, conv, elementwise, linear, norm, pool, reduce, resize, shape, shapelogic  # noqa: F401
from .base import REGISTRY, Context, Op, make_op, register, unbroadcast

from ..quant import ops as _quant_ops  # noqa: E402,F401  (registers the qatool.* fake-quant ops)

__all__ = ["REGISTRY", "Context", "Op", "make_op", "register", "unbroadcast"]
