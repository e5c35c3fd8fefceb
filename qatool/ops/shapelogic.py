"""Shape logic: ops whose outputs are shapes, constants, index ranges, masks and booleans (no gradient).

Every output is a numpy array (0-d where onnxruntime gives a scalar, never a Python or numpy scalar) with
onnxruntime's dtype: int64 for Shape/Size/NonZero, bool for comparisons and logic. Cast, CastLike, Where and
Trilu live in shape.py because they also carry float activations and have a gradient.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError
from .base import Op, register


def _tensor(v) -> np.ndarray:
    """A tensor attribute as a numpy array (the IR gives arrays; a raw TensorProto is accepted too)."""
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    return np.asarray(v)


@register("Shape")
class Shape(Op):
    attrs = {"start": 0, "end": None}  # start/end from opset 15; Python slicing clamps exactly as ONNX does
    differentiable = False

    def forward(self, ctx, x):
        return np.array(x.shape[self.start:self.end], dtype=np.int64)


@register("Size")
class Size(Op):
    differentiable = False

    def forward(self, ctx, x):
        return np.array(x.size, dtype=np.int64)


@register("Constant")
class Constant(Op):
    attrs = {"value": None, "value_float": None, "value_floats": None, "value_int": None, "value_ints": None,
             "value_string": None, "value_strings": None, "sparse_value": None}
    differentiable = False

    def __init__(self, node, opset=13):
        super().__init__(node, opset)
        if self.value is not None:
            self.array = _tensor(self.value)
            if self.array.dtype == object:
                raise ModelError(f"Constant node {node.name!r}: string tensors are not supported")
        elif self.value_float is not None:
            self.array = np.array(self.value_float, dtype=np.float32)
        elif self.value_floats is not None:
            self.array = np.array(self.value_floats, dtype=np.float32).reshape(-1)
        elif self.value_int is not None:
            self.array = np.array(self.value_int, dtype=np.int64)
        elif self.value_ints is not None:
            self.array = np.array(self.value_ints, dtype=np.int64).reshape(-1)
        elif self.value_string is not None or self.value_strings is not None:
            raise ModelError(f"Constant node {node.name!r}: string constants are not supported")
        elif self.sparse_value is not None:
            raise ModelError(f"Constant node {node.name!r}: sparse_value constants are not supported")
        else:
            raise ModelError(f"Constant node {node.name!r} has no value attribute")

    def forward(self, ctx):
        return self.array


@register("ConstantOfShape")
class ConstantOfShape(Op):
    attrs = {"value": None}
    differentiable = False

    def __init__(self, node, opset=13):
        super().__init__(node, opset)
        v = np.zeros(1, np.float32) if self.value is None else _tensor(self.value).reshape(-1)
        if v.size != 1:
            raise ModelError(f"ConstantOfShape node {node.name!r}: value must hold one element, not {v.size}")
        self.fill = v[0]
        self.dtype = v.dtype

    def forward(self, ctx, shape):
        return np.full(tuple(int(d) for d in np.asarray(shape).reshape(-1)), self.fill, dtype=self.dtype)


@register("Range")
class Range(Op):
    attrs = {"stash_type": 1}
    differentiable = False

    def forward(self, ctx, start, limit, delta):
        dt = np.asarray(start).dtype
        start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
        if delta == 0:
            raise ModelError(f"Range node {self.node.name!r}: delta is 0")
        # onnxruntime counts in double from (limit - start) computed in the input type.
        n = max(int(np.ceil(np.float64(limit - start) / np.float64(delta))), 0)
        ct = np.float32 if dt.name in ("float16", "bfloat16") and self.stash_type == 1 else dt
        out = start.astype(ct) + np.arange(n, dtype=ct) * delta.astype(ct)
        return out.astype(dt, copy=False)


def _binary(name: str, fn):
    @register(name)
    class _Bin(Op):
        differentiable = False

        def forward(self, ctx, a, b):
            return np.asarray(fn(a, b))

    _Bin.__name__ = _Bin.__qualname__ = name
    return _Bin


Equal = _binary("Equal", np.equal)
Less = _binary("Less", np.less)
LessOrEqual = _binary("LessOrEqual", np.less_equal)
Greater = _binary("Greater", np.greater)
GreaterOrEqual = _binary("GreaterOrEqual", np.greater_equal)
And = _binary("And", np.logical_and)
Or = _binary("Or", np.logical_or)
Xor = _binary("Xor", np.logical_xor)


@register("Not")
class Not(Op):
    differentiable = False

    def forward(self, ctx, x):
        return np.asarray(np.logical_not(x))


@register("NonZero")
class NonZero(Op):
    differentiable = False

    def forward(self, ctx, x):
        # onnxruntime treats a 0-d input as a 1-element vector: the output has shape (1, nnz).
        x = np.asarray(x).reshape(-1) if np.ndim(x) == 0 else x
        return np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)
