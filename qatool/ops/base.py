"""The op protocol and the registry keyed by ONNX op_type.

One `Op` instance exists per graph node. Its forward computes the outputs from the inputs and saves on `self`
only what backward needs; its backward turns output gradients into input gradients. They sit side by side in
each op's class, a few lines each (tinygrad's `function.py`, micrograd's `engine.py`).

Rules every op follows
- Attributes are declared in `attrs` with their ONNX spec names and defaults; `__init__` sets them as
  attributes of the instance (`self.alpha`), so forward/backward read plain Python values.
- Ops compute in the dtype of their inputs (float32 in the engine, float64 in gradient checks): never
  hard-code float32 and never let a float64 Python scalar upcast a float32 array (use `x.dtype.type(c)`).
- `forward(ctx, *inputs)` receives `None` for omitted optional inputs and returns one array or a tuple.
- `backward(*grad_outputs)` receives `None` for outputs without gradient and returns one entry per input:
  an array shaped like that input, or None. It may skip inputs with `self.needs_grad[i]` False.
- Ops without a gradient (shape logic) set `differentiable = False`.
- Never write into an input, an output gradient `g`, or what `unbroadcast` returns: several ops return views
  of their inputs (Reshape, Slice, Expand...) and several share `g` between inputs. The only arrays written in
  place are state the op owns by contract (BN running statistics, quantizer state).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelError, UnsupportedOpError
from ..ir.graph import Node


@dataclass
class Context:
    """What a forward pass needs beyond the inputs: the mode, the seeded generator (Dropout), and the QAT phase.

    `bn_frozen`: BN-folded quantized layers use running statistics (the deployed numerics) even in training;
    `observers_frozen`: activation observers stop updating their ranges.
    `grad`: a backward may follow this op's forward, so it saves what that needs (Model.forward sets it per step:
    its `grad`, where a gradient flows through the step); an op that would compute something only for backward
    looks at it.
    """

    training: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    bn_frozen: bool = False
    observers_frozen: bool = False
    grad: bool = True
    # Outputs of this forward's fake-quant ops that lie on their grid: id -> (weak reference, scale, zero point,
    # qmin, qmax, factors). An op keeping such an input for backward keeps its grid codes instead
    # (`keep_compact`). `factors`: the scalars the grid values were then multiplied by, in turn (a Mul by a
    # constant, as hard-swish's x * (1/6), keeps its output on the grid). Model.forward empties it before and
    # after each forward.
    on_grid: dict = field(default_factory=dict)


class Op:
    op_type: ClassVar[str] = ""
    attrs: ClassVar[dict[str, Any]] = {}
    differentiable: ClassVar[bool] = True

    def __init__(self, node: Node, opset: int = 13):
        self.node = node
        self.opset = opset
        self.needs_grad: list[bool] = [True] * len(node.inputs)
        for key, default in self.attrs.items():
            setattr(self, key, node.attrs.get(key, default))

    def keep_attributes(self) -> None:
        """Mark the attributes set so far (configuration, owned helpers) as the op's own; `release` drops the rest."""
        self._static = frozenset([*self.__dict__, "_static"])

    def release(self) -> None:
        """Drop what the last forward saved for a backward (every attribute set since `keep_attributes`)."""
        static = self.__dict__.get("_static")
        if static is not None:
            for key in [k for k in self.__dict__ if k not in static]:
                del self.__dict__[key]

    def forward(self, ctx: Context, *inputs: np.ndarray | None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, *grad_outputs: np.ndarray | None):
        raise ModelError(f"op {self.op_type} (node {self.node.name!r}) has no gradient")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.node.name!r})"


REGISTRY: dict[str, type[Op]] = {}


def register(*op_types: str):
    """Class decorator: register an Op class under one or more ONNX op_types."""

    def wrap(cls: type[Op]) -> type[Op]:
        for t in op_types:
            if t in REGISTRY:
                raise AssertionError(f"op {t} registered twice")
            REGISTRY[t] = cls
        if not cls.op_type:
            cls.op_type = op_types[0]
        return cls

    return wrap


# Rewrites of a graph's (topologically sorted) nodes for the engine's eval-mode forwards without a gradient:
# fn(graph) -> the nodes to run instead, or None; the first that applies is used. Training forwards and backward
# always run the graph's own nodes.
EVAL_REWRITES: list = []


def register_eval_rewrite(fn):
    """Function decorator: add an eval-mode rewrite (see EVAL_REWRITES)."""
    EVAL_REWRITES.append(fn)
    return fn


def make_op(node: Node, opset: int = 13) -> Op:
    """Instantiate the Op for a node; an unknown op_type raises an error that names it and lists what exists."""
    cls = REGISTRY.get(node.op_type) if node.domain in ("", "ai.onnx") else REGISTRY.get(f"{node.domain}.{node.op_type}")
    if cls is None:
        raise UnsupportedOpError(node.op_type if not node.domain else f"{node.domain}.{node.op_type}", node.name,
                                 list(REGISTRY))
    return cls(node, opset)


# ---- helpers shared by op modules -----------------------------------------------------------------------------
def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` over the axes that numpy broadcasting expanded to go from `shape` to `grad.shape`."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, s in enumerate(shape) if s == 1 and grad.shape[i + extra] != 1
    )
    g = grad.sum(axis=axes, keepdims=True) if axes else grad
    return g.reshape(shape)


class BitMask:
    """A bool array kept for backward at one bit per value (np.packbits), where numpy's bool takes a byte.

    The straight-through masks of fake-quant, Clip and Relu are a gradient's only saved state at every
    activation; packed they cost an eighth. Packing is one fast pass (~10x quicker than the multiply that
    applies the mask), unpacking in backward another; `apply(g)` is g * mask in g's dtype."""

    def __init__(self, mask: np.ndarray):
        self.shape = mask.shape
        self.bits = np.packbits(mask.reshape(-1))

    def unpack(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).view(np.bool_).reshape(self.shape)

    def apply(self, g: np.ndarray) -> np.ndarray:
        """g * mask, a new array in g's dtype (g is never written)."""
        return np.multiply(g, self.unpack(), dtype=g.dtype)


_BLOCK = 1 << 15  # elements per cache-sized block of GridCodes' passes (3x faster than whole-tensor passes)


class GridCodes:
    """A fake-quantized tensor kept for backward as its integer grid codes (a byte per value at 8 bits) and its
    per-tensor scale and zero point: `expand()` gives back the same floats, (code - z) * s being exactly the
    product fake-quant formed (the code minus z is the integer it multiplied by s; the codes are stored from
    qmin up, unsigned); bit for bit but for the sign of zeros (a -0.0, from rounding a small negative value,
    comes back as +0.0: no product or sum that backward forms with it changes value)."""

    def __init__(self, x: np.ndarray, scale, zero, qmin: int, qmax: int, factors: tuple = ()):
        self.scale, self.factors, self.dtype = scale, factors, x.dtype
        t = x.dtype.type
        self.offset = t(zero) - t(qmin)  # code = q + z - qmin, in [0, qmax - qmin]
        step = float(scale)
        for f in factors:
            step *= float(f)
        inv, half = t(1 / step), self.offset + t(0.5)
        # x * inv is the integer q to a few ulps (|q| < 2^16): + offset + 0.5, truncated, is its code
        flat = np.ascontiguousarray(x).reshape(-1)
        self.codes = np.empty(x.shape, np.uint8 if qmax - qmin <= 0xFF else np.uint16)
        codes = self.codes.reshape(-1)
        buf = np.empty(min(flat.size, _BLOCK), x.dtype)
        for i in range(0, flat.size, _BLOCK):
            b = buf[:min(flat.size - i, _BLOCK)]
            np.multiply(flat[i:i + b.size], inv, out=b)
            b += half
            codes[i:i + b.size] = b

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def expand(self) -> np.ndarray:
        y = np.empty(self.codes.shape, self.dtype)
        flat, out = self.codes.reshape(-1), y.reshape(-1)
        for i in range(0, flat.size, _BLOCK):
            b = out[i:i + _BLOCK]
            np.copyto(b, flat[i:i + _BLOCK])
            b -= self.offset
            b *= self.scale
            for f in self.factors:  # the products the forward formed, in its order
                b *= f
        return y


def keep_compact(ctx: Context, x: np.ndarray | None):
    """What an op keeps of its input x for backward: x's grid codes (`GridCodes`) where x is the output of a
    fake-quant of this forward (a quarter of the bytes at 8 bits), else x itself. `expanded` reverses it."""
    if x is None or not ctx.grad:
        return x
    entry = ctx.on_grid.get(id(x))
    if entry is None or entry[0]() is not x:
        return x
    _, scale, zero, qmin, qmax, factors = entry
    if qmax - qmin > 0xFFFF:  # codes of up to 16 bits
        return x
    return GridCodes(x, scale, zero, qmin, qmax, factors)


def note_scaled_grid(ctx: Context, y: np.ndarray, x: np.ndarray, c: np.ndarray) -> None:
    """y = x * c with x on a fake-quant grid (ctx.on_grid) and c one value: y is on that grid times c. Only
    where the codes come back exactly: c finite, nonzero, and s * c far from float under- and overflow."""
    entry = ctx.on_grid.get(id(x))
    if entry is None or entry[0]() is not x or c.size != 1 or c.ndim > x.ndim or c.dtype != x.dtype \
            or y.shape != x.shape:
        return
    ref, scale, zero, qmin, qmax, factors = entry
    f = c.reshape(-1)[0]
    step = abs(float(scale) * float(f))
    for g in factors:
        step *= abs(float(g))
    if not (np.isfinite(step) and 1e-20 < step < 1e20):
        return
    ctx.on_grid[id(y)] = (weakref.ref(y), scale, zero, qmin, qmax, factors + (f,))


def expanded(x):
    """The array an op kept with `keep_compact`."""
    return x.expand() if isinstance(x, GridCodes) else x


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
