"""Broadcasting binary ops, variadic ops and elementwise math.

Integer tensors (int64 shape arithmetic in exported graphs) follow onnxruntime's integer semantics in forward:
Div truncates toward zero, Pow on integers truncates the real power. Backward never writes into `g`: one output
gradient may be shared by several consumers (Add hands the same array to both inputs).
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from .base import Op, expanded, keep_compact, note_scaled_grid, register, unbroadcast


def _is_int(x: np.ndarray) -> bool:
    return not np.issubdtype(x.dtype, np.floating)


def _needs(op: Op, i: int) -> bool:
    return i < len(op.needs_grad) and op.needs_grad[i]


# ---- binary arithmetic -------------------------------------------------------------------------------------------
@register("Add")
class Add(Op):
    def forward(self, ctx, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


@register("Sub")
class Sub(Op):
    def forward(self, ctx, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        gb = -unbroadcast(g, self.shapes[1]) if _needs(self, 1) else None
        return unbroadcast(g, self.shapes[0]), gb


@register("Mul")
class Mul(Op):
    """Keeps each operand only for the other's gradient: b where a needs one, a where b does. A Mul by a
    constant (hard-swish's x * (1/6), a scale) then keeps nothing of its tensor input; a fake-quantized operand
    is kept as its grid codes (`keep_compact`)."""

    def forward(self, ctx, a, b):
        self.shapes = a.shape, b.shape
        self.a = keep_compact(ctx, a) if _needs(self, 1) else None
        self.b = keep_compact(ctx, b) if _needs(self, 0) else None
        y = a * b
        if ctx.grad and ctx.on_grid and not _is_int(y):  # grid values times a constant stay on the grid
            note_scaled_grid(ctx, y, a, b)
            note_scaled_grid(ctx, y, b, a)
        return y

    def backward(self, g):
        ga = unbroadcast(g * expanded(self.b), self.shapes[0]) if _needs(self, 0) else None
        gb = unbroadcast(g * expanded(self.a), self.shapes[1]) if _needs(self, 1) else None
        return ga, gb


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division truncating toward zero (C / onnxruntime), exact for all int64 values."""
    return (a - np.fmod(a, b)) // b


@register("Div")
class Div(Op):
    def forward(self, ctx, a, b):
        if _is_int(a):
            return _int_div(a, b)
        self.a_shape, self.b = a.shape, b
        y = a / b
        self.y = y if _needs(self, 1) else None  # only b's gradient reads it
        return y

    def backward(self, g):
        ga_full = g / self.b
        ga = unbroadcast(ga_full, self.a_shape) if _needs(self, 0) else None
        gb = None
        if _needs(self, 1):
            d = ga_full * self.y  # d(a/b)/db = -a/b^2 = -y/b; ga may alias ga_full, so a new array
            np.negative(d, out=d)
            gb = unbroadcast(d, self.b.shape)
        return ga, gb


@register("Pow")
class Pow(Op):
    """y = a ** b. The output has a's type; b may be a float or an integer tensor.

    Gradient w.r.t. a: b * a^(b-1); w.r.t. b (float b only): y * log(a), taken as 0 where a <= 0 (the real power
    is not differentiable in b there).
    """

    def forward(self, ctx, a, b):
        self.a, self.b = a, b
        if _is_int(a):
            if _is_int(b) and not (b < 0).any():
                return np.power(a, b.astype(a.dtype, copy=False))
            # onnxruntime computes in double and truncates toward zero
            return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
        t = a.dtype.type
        self.e = None
        if b.size == 1 and b.ndim <= a.ndim:  # scalar exponent: fast paths for the common ones
            e = float(b.reshape(-1)[0])
            self.e = e
            if e == 2:
                y = a * a
            elif e == 1:
                y = a.copy()
            elif e == 0.5:
                y = np.sqrt(a)
            else:
                y = np.power(a, t(e))
        else:
            y = np.power(a, b.astype(a.dtype, copy=False))
        self.y = y if _needs(self, 1) and not _is_int(b) else None  # only b's gradient reads it
        return y

    def backward(self, g):
        a, b, t = self.a, self.b, g.dtype.type
        ga = gb = None
        if _needs(self, 0):
            e = self.e
            if e == 2:
                d = a * t(2)
            elif e == 1:
                d = np.ones_like(a)
            elif e is not None:
                d = np.power(a, t(e - 1))
                d *= t(e)
            else:
                bb = b.astype(a.dtype, copy=False)
                d = np.power(a, bb - 1) * bb
            d *= g
            ga = unbroadcast(d, a.shape)
        if _needs(self, 1) and not _is_int(b):
            pos = a > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                la = np.log(np.where(pos, a, t(1)))  # log a where a > 0, 0 elsewhere
            d = self.y * la
            d *= g
            gb = unbroadcast(d, b.shape)
        return ga, gb


# ---- variadic ----------------------------------------------------------------------------------------------------
class _Variadic(Op):
    def _total(self, xs):
        y = xs[0] + xs[1] if len(xs) > 1 else xs[0].copy()
        for x in xs[2:]:
            if np.broadcast_shapes(y.shape, x.shape) == y.shape:
                y += x
            else:
                y = y + x
        return y


@register("Sum")
class Sum(_Variadic):
    def forward(self, ctx, *xs):
        self.shapes = [x.shape for x in xs]
        return self._total(xs)

    def backward(self, g):
        return tuple(unbroadcast(g, s) if _needs(self, i) else None for i, s in enumerate(self.shapes))


@register("Mean")
class Mean(_Variadic):
    def forward(self, ctx, *xs):
        self.shapes = [x.shape for x in xs]
        y = self._total(xs)
        y /= y.dtype.type(len(xs))
        return y

    def backward(self, g):
        gn = g / g.dtype.type(len(self.shapes))
        return tuple(unbroadcast(gn, s) if _needs(self, i) else None for i, s in enumerate(self.shapes))


class _Extremum(Op):
    """Max/Min over broadcast inputs; the gradient goes to the input holding the extremum, ties to the first."""

    fn = staticmethod(np.maximum)
    first_wins = staticmethod(np.greater_equal)

    def forward(self, ctx, *xs):
        self.xs = xs
        self.y = reduce(self.fn, xs) if len(xs) > 1 else xs[0].copy()
        return self.y

    def backward(self, g):
        xs = self.xs
        if len(xs) == 1:
            return (g,)
        if len(xs) == 2:
            m = self.first_wins(*xs)
            m = np.broadcast_to(m, g.shape)
            ga = unbroadcast(np.multiply(g, m, dtype=g.dtype), xs[0].shape) if _needs(self, 0) else None
            gb = unbroadcast(np.multiply(g, ~m, dtype=g.dtype), xs[1].shape) if _needs(self, 1) else None
            return ga, gb
        grads, taken = [], np.zeros(g.shape, bool)
        for i, x in enumerate(xs):
            m = np.equal(x, self.y)
            m = np.broadcast_to(m, g.shape) & ~taken
            taken |= m
            grads.append(unbroadcast(np.multiply(g, m, dtype=g.dtype), x.shape) if _needs(self, i) else None)
        return tuple(grads)


@register("Max")
class Max(_Extremum):
    fn = staticmethod(np.maximum)
    first_wins = staticmethod(np.greater_equal)


@register("Min")
class Min(_Extremum):
    fn = staticmethod(np.minimum)
    first_wins = staticmethod(np.less_equal)


# ---- unary math --------------------------------------------------------------------------------------------------
@register("Sqrt")
class Sqrt(Op):
    def forward(self, ctx, x):
        self.y = np.sqrt(x)
        return self.y

    def backward(self, g):
        d = self.y * g.dtype.type(2)
        with np.errstate(divide="ignore"):
            np.divide(g, d, out=d)
        return (d,)


@register("Neg")
class Neg(Op):
    def forward(self, ctx, x):
        return np.negative(x)

    def backward(self, g):
        return (np.negative(g),)


@register("Exp")
class Exp(Op):
    def forward(self, ctx, x):
        self.y = np.exp(x)
        return self.y

    def backward(self, g):
        return (g * self.y,)


@register("Log")
class Log(Op):
    def forward(self, ctx, x):
        self.x = x
        return np.log(x)

    def backward(self, g):
        return (g / self.x,)


@register("Abs")
class Abs(Op):
    def forward(self, ctx, x):
        self.x = x
        return np.abs(x)

    def backward(self, g):
        d = np.sign(self.x)
        d *= g
        return (d,)


@register("Reciprocal")
class Reciprocal(Op):
    def forward(self, ctx, x):
        self.y = np.reciprocal(x)
        return self.y

    def backward(self, g):
        d = self.y * self.y
        d *= g
        np.negative(d, out=d)
        return (d,)


class _Piecewise(Op):
    """Rounding ops: the gradient is zero almost everywhere, so the engine treats them as constants
    (`differentiable = False`); backward, if called directly, returns that zero gradient."""

    differentiable = False
    fn = staticmethod(np.floor)

    def forward(self, ctx, x):
        self.shape, self.dtype = x.shape, x.dtype
        return self.fn(x)

    def backward(self, g):
        return (np.zeros(self.shape, self.dtype),)


@register("Floor")
class Floor(_Piecewise):
    fn = staticmethod(np.floor)


@register("Ceil")
class Ceil(_Piecewise):
    fn = staticmethod(np.ceil)


@register("Round")
class Round(_Piecewise):
    fn = staticmethod(np.rint)  # half to even, as ONNX specifies
