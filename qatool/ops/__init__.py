"""Op implementations, one module per family; importing this package fills the registry."""

from . import activations, conv, elementwise, linear, norm, pool, reduce, resize, shape, shapelogic  # noqa: F401
from .base import REGISTRY, Context, Op, make_op, register, unbroadcast

__all__ = ["REGISTRY", "Context", "Op", "make_op", "register", "unbroadcast"]
