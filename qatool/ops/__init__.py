"""Op implementations, one module per family; importing this package fills the registry."""

from . import (activations, conv, elementwise, linear, norm, pool, recurrent, reduce, resize, shape,  # noqa: F401
               shapelogic)
from .base import EVAL_REWRITES, REGISTRY, Context, Op, make_op, register, unbroadcast

from ..quant import ops as _quant_ops  # noqa: E402,F401  (registers the qatool.* fake-quant ops)
from ..quant import integer_eval as _integer_eval  # noqa: E402,F401  (registers the eval-mode integer kernels)

__all__ = ["EVAL_REWRITES", "REGISTRY", "Context", "Op", "make_op", "register", "unbroadcast"]
