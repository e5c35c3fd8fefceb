"""Reductions (Reduce*) and ArgMax/ArgMin.

Axes are an attribute up to opset 12 for ReduceSum and up to opset 17 for the others, and an optional int64 input
from then on (13 / 18), when `noop_with_empty_axes` appeared: empty or omitted axes reduce over all axes, or,
with noop_with_empty_axes=1, reduce over no axes (only the elementwise part, e.g. |x| for ReduceL1, remains).
"""

from __future__ import annotations

import numpy as np

from .base import Op, normalize_axis, register


class _Reduce(Op):
    attrs = {"axes": None, "keepdims": 1, "noop_with_empty_axes": 0}
    axes_input_opset = 18  # first opset where axes is an input
    keeps_input = True  # backward reads x (ReduceSum/ReduceMean need only its shape)

    def _axes(self, x: np.ndarray, axes_in) -> tuple[int, ...]:
        """The axes to reduce (sorted, non-negative); () for noop_with_empty_axes, a reduction over no axes
        that still applies the elementwise part (onnxruntime: ReduceL1 -> |x|, ReduceSumSquare -> x^2)."""
        if self.opset >= self.axes_input_opset:
            axes = [] if axes_in is None else np.asarray(axes_in).reshape(-1).tolist()
            if not axes and self.noop_with_empty_axes:
                return ()
        else:
            axes = list(self.axes or [])
        if not axes:
            return tuple(range(x.ndim))
        return tuple(sorted({normalize_axis(int(a), x.ndim) for a in axes}))

    def forward(self, ctx, x, axes_in=None):
        axes = self._axes(x, axes_in)
        self.shape, self.ax = x.shape, axes
        self.x = x if self.keeps_input else None
        y = np.asarray(self.reduce(x, axes))  # keepdims=True
        self.yk = y
        return y if self.keepdims else y.reshape([d for i, d in enumerate(x.shape) if i not in axes])

    def backward(self, g):
        rest = (None,) * (len(self.needs_grad) - 1)
        return (self.grad(g.reshape(self.yk.shape)), *rest)

    # subclasses: reduce(x, axes) -> keepdims result; grad(gk) -> gradient shaped like x, from the keepdims g
    def reduce(self, x, axes):  # pragma: no cover - abstract
        raise NotImplementedError

    def grad(self, gk):  # pragma: no cover - abstract
        raise NotImplementedError

    def _count(self) -> int:
        """Number of elements reduced into each output element."""
        n = 1
        for a in self.ax:
            n *= self.shape[a]
        return n


def _expand(gk: np.ndarray, shape) -> np.ndarray:
    """gk (keepdims shape) broadcast to `shape` as a fresh writable array."""
    out = np.empty(shape, gk.dtype)
    out[...] = gk
    return out


@register("ReduceSum")
class ReduceSum(_Reduce):
    axes_input_opset = 13
    keeps_input = False

    def reduce(self, x, axes):
        return np.sum(x, axis=axes, keepdims=True, dtype=x.dtype)

    def grad(self, gk):
        return _expand(gk, self.shape)


@register("ReduceMean")
class ReduceMean(_Reduce):
    keeps_input = False
    def reduce(self, x, axes):
        if not np.issubdtype(x.dtype, np.floating):
            s = np.sum(x, axis=axes, keepdims=True, dtype=x.dtype)
            n = max(1, self._count())
            return (s - np.fmod(s, n)) // n  # integer mean truncates toward zero, as onnxruntime does
        return np.mean(x, axis=axes, keepdims=True)

    def grad(self, gk):
        return _expand(gk / gk.dtype.type(self._count()), self.shape)


class _ReduceExtremum(_Reduce):
    """ReduceMax/ReduceMin: the gradient is shared equally among the elements equal to the extremum
    (PyTorch's amax/amin rule)."""

    def grad(self, gk):
        m = self.x == self.yk
        n = np.sum(m, axis=self.ax, keepdims=True, dtype=gk.dtype)
        return np.multiply(m, gk / n, dtype=gk.dtype)


@register("ReduceMax")
class ReduceMax(_ReduceExtremum):
    def reduce(self, x, axes):
        return np.max(x, axis=axes, keepdims=True)


@register("ReduceMin")
class ReduceMin(_ReduceExtremum):
    def reduce(self, x, axes):
        return np.min(x, axis=axes, keepdims=True)


@register("ReduceProd")
class ReduceProd(_Reduce):
    def reduce(self, x, axes):
        return np.prod(x, axis=axes, keepdims=True, dtype=x.dtype)

    def grad(self, gk):
        # d prod / d x_i = product of the others: y / x_i without zeros; with exactly one zero in the slice
        # only that element gets the product of the rest; with more zeros everything is 0.
        x, t = self.x, gk.dtype.type
        zero = x == 0
        nz = np.sum(zero, axis=self.ax, keepdims=True)
        if not nz.any():
            return (self.yk * gk) / x
        safe = np.where(zero, t(1), x)
        p = np.prod(safe, axis=self.ax, keepdims=True)  # product of the non-zero elements
        d = np.where(nz == 0, p / safe, t(0))
        d = np.where(zero & (nz == 1), p, d)
        return d * gk


@register("ReduceSumSquare")
class ReduceSumSquare(_Reduce):
    def reduce(self, x, axes):
        return np.sum(x * x, axis=axes, keepdims=True, dtype=x.dtype)

    def grad(self, gk):
        d = self.x * gk
        d *= gk.dtype.type(2)
        return d


@register("ReduceL2")
class ReduceL2(_Reduce):
    def reduce(self, x, axes):
        return np.sqrt(np.sum(x * x, axis=axes, keepdims=True, dtype=x.dtype))

    def grad(self, gk):
        y = self.yk
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(y > 0, gk / y, gk.dtype.type(0))  # x / ||x||, 0 at the origin
        return self.x * s


@register("ReduceL1")
class ReduceL1(_Reduce):
    def reduce(self, x, axes):
        return np.sum(np.abs(x), axis=axes, keepdims=True, dtype=x.dtype)

    def grad(self, gk):
        d = np.sign(self.x)
        d *= gk
        return d


@register("ReduceLogSum")
class ReduceLogSum(_Reduce):
    keeps_input = False
    def reduce(self, x, axes):
        return np.log(np.sum(x, axis=axes, keepdims=True, dtype=x.dtype))

    def grad(self, gk):
        return _expand(gk / np.exp(self.yk), self.shape)


@register("ReduceLogSumExp")
class ReduceLogSumExp(_Reduce):
    def reduce(self, x, axes):
        m = np.max(x, axis=axes, keepdims=True)
        m = np.where(np.isfinite(m), m, x.dtype.type(0))  # all -inf slice: log(0) = -inf, not NaN
        e = np.exp(x - m)
        with np.errstate(divide="ignore"):
            return np.log(np.sum(e, axis=axes, keepdims=True)) + m

    def grad(self, gk):
        d = self.x - self.yk
        np.exp(d, out=d)  # softmax over the reduced axes
        d *= gk
        return d


# ---- arg reductions ----------------------------------------------------------------------------------------------
class _ArgReduce(Op):
    attrs = {"axis": 0, "keepdims": 1, "select_last_index": 0}
    differentiable = False
    fn = staticmethod(np.argmax)

    def forward(self, ctx, x):
        axis = normalize_axis(self.axis, x.ndim)
        if self.select_last_index:
            n = x.shape[axis]
            i = (n - 1) - self.fn(np.flip(x, axis=axis), axis=axis, keepdims=bool(self.keepdims))
        else:
            i = self.fn(x, axis=axis, keepdims=bool(self.keepdims))
        return np.asarray(i, dtype=np.int64)


@register("ArgMax")
class ArgMax(_ArgReduce):
    fn = staticmethod(np.argmax)


@register("ArgMin")
class ArgMin(_ArgReduce):
    fn = staticmethod(np.argmin)
