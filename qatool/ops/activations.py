"""Elementwise activations and softmax-like ops.

Speed notes (float32, numpy 2, measured on the 2-core box; see design.md):
- `np.clip` has a SIMD fast path and is ~2x faster than `np.maximum`, so Relu/Clip/HardSigmoid clip.
- `np.where` and boolean indexing with a data-dependent mask are slow (~4 ns/element); masks are applied by
  multiplying (`np.multiply(g, mask, dtype=g.dtype)`, `BitMask.apply`), never by selecting. Masks kept for
  backward are packed a bit per value (`BitMask`).
- Backward never writes into `g`: one output gradient may be shared by several consumers.
"""

from __future__ import annotations

import math

import numpy as np

from .base import BitMask, Op, normalize_axis, register, unbroadcast

_FLT_MAX = 3.4028234663852886e38


def _max_value(dtype: np.dtype):
    return dtype.type(np.inf) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


def _min_value(dtype: np.dtype):
    return dtype.type(-np.inf) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min


# ---- Relu family ----------------------------------------------------------------------------------------------
@register("Relu")
class Relu(Op):
    """Keeps a one-bit mask (y > 0) for its backward, not its float output."""

    def forward(self, ctx, x):
        y = np.clip(x, x.dtype.type(0), _max_value(x.dtype))
        self.mask = BitMask(y > 0) if self.needs_grad[0] else None
        return y

    def backward(self, g):
        return (self.mask.apply(g),)


@register("LeakyRelu")
class LeakyRelu(Op):
    attrs = {"alpha": 0.01}

    """Keeps a bit per value (x > 0) for backward, not x."""

    def forward(self, ctx, x):
        self.pos = BitMask(x > 0) if self.needs_grad[0] else None
        a = x.dtype.type(self.alpha)
        y = x * a
        # max(x, a*x) is leaky relu when a <= 1, min(x, a*x) when a > 1
        return np.maximum(x, y, out=y) if a <= 1 else np.minimum(x, y, out=y)

    def backward(self, g):
        dt = g.dtype.type
        d = np.multiply(self.pos.unpack(), dt(1 - self.alpha), dtype=g.dtype)  # 1 where x > 0, alpha elsewhere
        d += dt(self.alpha)
        d *= g
        return (d,)


@register("PRelu")
class PRelu(Op):
    """y = x for x > 0, slope * x otherwise; slope broadcasts to x (unidirectional)."""

    def forward(self, ctx, x, slope):
        self.x, self.slope = x, slope
        self.neg = np.clip(x, _min_value(x.dtype), x.dtype.type(0))
        y = np.clip(x, x.dtype.type(0), _max_value(x.dtype))
        y += self.neg * slope
        return y

    def backward(self, g):
        gx = gs = None
        if self.needs_grad[0]:
            pos = self.x > 0
            d = np.broadcast_to(self.slope, self.x.shape) * ~pos  # slope where x <= 0, 0 elsewhere
            d += pos
            gx = d * g
        if len(self.needs_grad) > 1 and self.needs_grad[1]:
            gs = unbroadcast(g * self.neg, self.slope.shape)
        return gx, gs


@register("Clip")
class Clip(Op):
    """clip(x, min, max): min/max are attributes before opset 11 and optional scalar inputs from 11.

    An omitted bound does not clip. Backward passes the gradient where min < y < max (PyTorch's hardtanh/ReLU6
    rule: zero at the bounds): forward keeps that mask (one bit per value), not the output.
    """

    attrs = {"min": -_FLT_MAX, "max": _FLT_MAX}

    def forward(self, ctx, x, lo=None, hi=None):
        t = x.dtype.type
        if self.opset < 11:
            lo = None if "min" not in self.node.attrs else t(self.min)
            hi = None if "max" not in self.node.attrs else t(self.max)
        else:
            lo = None if lo is None else t(np.asarray(lo).reshape(-1)[0])
            hi = None if hi is None else t(np.asarray(hi).reshape(-1)[0])
        self.mask = None
        if lo is None and hi is None:
            return x
        # np.clip(x, lo, hi) with lo > hi gives hi, as ONNX specifies; explicit ±inf keeps numpy's fast path
        y = np.clip(x, _min_value(x.dtype) if lo is None else lo, _max_value(x.dtype) if hi is None else hi)
        if self.needs_grad[0]:
            if hi is None:
                mask = y > lo
            elif lo is None:
                mask = y < hi
            else:
                mask = y > lo
                mask &= y < hi
            self.mask = BitMask(mask)
        return y

    def backward(self, g):
        if self.mask is None:  # nothing clipped
            return g, None, None
        return self.mask.apply(g), None, None


# ---- smooth activations -----------------------------------------------------------------------------------------
@register("Sigmoid")
class Sigmoid(Op):
    def forward(self, ctx, x):
        y = np.negative(x)
        with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x gives y = 0, as it should
            np.exp(y, out=y)
        y += 1
        np.reciprocal(y, out=y)
        self.y = y
        return y

    def backward(self, g):
        y = self.y
        d = 1 - y
        d *= y
        d *= g
        return (d,)


@register("HardSigmoid")
class HardSigmoid(Op):
    attrs = {"alpha": 0.2, "beta": 0.5}

    def forward(self, ctx, x):
        t = x.dtype.type
        y = x * t(self.alpha)
        y += t(self.beta)
        np.clip(y, t(0), t(1), out=y)
        if self.needs_grad[0]:  # backward needs only where 0 < y < 1: a bit per value, not the output
            mask = y > 0
            mask &= y < 1
            self.mask = BitMask(mask)
        return y

    def backward(self, g):
        d = self.mask.apply(g)
        d *= g.dtype.type(self.alpha)
        return (d,)


@register("HardSwish")
class HardSwish(Op):
    """y = x * hardsigmoid(x) with alpha = 1/6, beta = 0.5; dy/dx = h + x/6 inside (-3, 3).

    Keeps x only: backward recomputes h from it (the same three passes as forward) rather than keeping a
    second input-sized array."""

    @staticmethod
    def _h(x):
        t = x.dtype.type
        h = x * t(1 / 6)
        h += t(0.5)
        np.clip(h, t(0), t(1), out=h)
        return h

    def forward(self, ctx, x):
        self.x = x
        return x * self._h(x)

    def backward(self, g):
        h = self._h(self.x)
        mask = h > 0
        mask &= h < 1
        d = np.multiply(self.x, mask, dtype=g.dtype)
        d *= g.dtype.type(1 / 6)
        d += h
        d *= g
        return (d,)


@register("Tanh")
class Tanh(Op):
    def forward(self, ctx, x):
        self.y = np.tanh(x)
        return self.y

    def backward(self, g):
        d = self.y * self.y
        np.subtract(1, d, out=d)
        d *= g
        return (d,)


@register("Elu")
class Elu(Op):
    attrs = {"alpha": 1.0}

    def forward(self, ctx, x):
        t = x.dtype.type
        self.pos = BitMask(x > 0)  # with e, all backward needs: a bit per value instead of x
        e = np.clip(x, t(-np.inf), t(0))
        np.expm1(e, out=e)
        e *= t(self.alpha)  # alpha * (exp(x) - 1) where x < 0, 0 elsewhere
        self.e = e
        y = np.clip(x, t(0), t(np.inf))
        y += e
        return y

    def backward(self, g):
        # dy/dx = 1 where x > 0, alpha * exp(x) = e + alpha elsewhere
        pos = self.pos.unpack()
        d = self.e + g.dtype.type(self.alpha)
        d *= ~pos
        d += pos
        d *= g
        return (d,)


@register("Selu")
class Selu(Op):
    attrs = {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}

    def forward(self, ctx, x):
        t = x.dtype.type
        self.pos = BitMask(x > 0)  # with e, all backward needs: a bit per value instead of x
        e = np.clip(x, t(-np.inf), t(0))
        np.expm1(e, out=e)
        e *= t(self.alpha * self.gamma)  # gamma * alpha * (exp(x) - 1) where x < 0
        self.e = e
        y = np.clip(x, t(0), t(np.inf))
        y *= t(self.gamma)
        y += e
        return y

    def backward(self, g):
        t = g.dtype.type
        pos = self.pos.unpack()
        d = self.e + t(self.alpha * self.gamma)  # gamma * alpha * exp(x) where x <= 0
        d *= ~pos
        d += np.multiply(pos, t(self.gamma), dtype=g.dtype)
        d *= g
        return (d,)


@register("Softplus")
class Softplus(Op):
    """y = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); dy/dx = sigmoid(x) = exp(x - y)."""

    def forward(self, ctx, x):
        t = x.dtype.type
        self.x = x
        e = np.abs(x)
        np.negative(e, out=e)
        np.exp(e, out=e)
        np.log1p(e, out=e)
        e += np.clip(x, t(0), t(np.inf))
        self.y = e
        return e

    def backward(self, g):
        d = self.x - self.y
        np.exp(d, out=d)
        d *= g
        return (d,)


# ---- erf and GELU ------------------------------------------------------------------------------------------------
# float32: the rational approximation Eigen and XLA use for float erf (max error 4e-7 against math.erf), one
# formula, no branches. float64 (gradient checks): fdlibm's piecewise rational approximations, accurate to
# ~1e-16, so finite differences of the forward match the analytic derivative.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)
# Coefficients of Sun Microsystems' fdlibm s_erf.c (freely distributable).
_ERX = 8.45062911510467529297e-01
_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
       -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
       1.32494738004321644526e-04, -3.96022827877536812320e-06)
_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
       3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
       -2.16637559486879084300e-03)
_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
       1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
       -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
       -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
       6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
       6.57024977031928170135e+00, -6.04244152148580987438e-02)
_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
       -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
       -4.83519191608651397019e+02)
_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
       3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
       -2.24409524465858183362e+01)


def _poly(z: np.ndarray, coeffs) -> np.ndarray:
    """sum(c_k z^k) for coeffs = (c_0, c_1, ...), by Horner, in z's dtype."""
    r = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        r *= z
        r += c
    return r


_CHUNK = 1 << 15  # elements per block of the float32 erf: temporaries stay in L2 cache (~3x faster than whole)


def _erf32_block(v: np.ndarray, out: np.ndarray, z: np.ndarray, q: np.ndarray) -> None:
    """out = erf(v) for one float32 block; clobbers v; z and q are scratch of the same length."""
    np.clip(v, np.float32(-4), np.float32(4), out=v)
    np.multiply(v, v, out=z)
    for r, coeffs in ((out, _ERF32_P), (q, _ERF32_Q)):  # Horner in z, highest power first
        np.multiply(z, np.float32(coeffs[0]), out=r)
        r += np.float32(coeffs[1])
        for c in coeffs[2:]:
            r *= z
            r += np.float32(c)
    out *= v
    out /= q


def _blocks(n: int):
    """(start, stop) of the blocks covering n elements, and the scratch length."""
    size = min(n, _CHUNK)
    return [(s, min(s + size, n)) for s in range(0, n, size)] if n else [], size


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf in x's dtype (float32: Eigen's rational form; float64 and others: fdlibm's pieces)."""
    if x.dtype == np.float32:
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty_like(flat)
        blocks, size = _blocks(flat.size)
        v, z, q = (np.empty(size, np.float32) for _ in range(3))
        for s, e in blocks:
            n = e - s
            np.copyto(v[:n], flat[s:e])
            _erf32_block(v[:n], out[s:e], z[:n], q[:n])
        return out.reshape(x.shape)
    x = np.asarray(x)
    flat = x.reshape(-1)
    a = np.abs(flat)
    out = np.sign(flat)  # |x| >= 6 (and +-inf): +-1 to working precision; NaN stays NaN
    i = np.flatnonzero(a < 0.84375)
    if i.size:
        v = flat[i]
        z = v * v
        out[i] = v + v * (_poly(z, _PP) / _poly(z, _QQ))
    i = np.flatnonzero((a >= 0.84375) & (a < 1.25))
    if i.size:
        s = a[i] - 1
        out[i] *= _ERX + _poly(s, _PA) / _poly(s, _QA)
    for lo, hi, rc, sc in ((1.25, 1 / 0.35, _RA, _SA), (1 / 0.35, 6.0, _RB, _SB)):
        i = np.flatnonzero((a >= lo) & (a < hi))
        if i.size:
            v = a[i]
            s = 1 / (v * v)
            r = np.exp(-v * v - 0.5625 + _poly(s, rc) / _poly(s, sc))
            out[i] *= 1 - r / v
    return out.reshape(x.shape)


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)
_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@register("Erf")
class Erf(Op):
    def forward(self, ctx, x):
        self.x = x
        return erf(x)

    def backward(self, g):
        d = self.x * self.x
        np.negative(d, out=d)
        np.exp(d, out=d)
        d *= g.dtype.type(_TWO_OVER_SQRT_PI)
        d *= g
        return (d,)


def _erf_block(v: np.ndarray, out: np.ndarray, z: np.ndarray, q: np.ndarray) -> None:
    """out = erf(v) for one block of any float dtype (clobbers v, z, q)."""
    if v.dtype == np.float32:
        _erf32_block(v, out, z, q)
    else:
        out[...] = erf(v)


@register("Gelu")
class Gelu(Op):
    """GELU (opset 20): x * Phi(x) with Phi exact (erf, approximate="none") or the tanh form.

    The erf form runs in cache-sized blocks (its ~30 elementwise passes are memory-bound on whole tensors);
    it saves Phi(x) for backward.
    """

    attrs = {"approximate": "none"}

    def forward(self, ctx, x):
        t = x.dtype.type
        self.x = x
        if self.approximate == "tanh":
            u = x * x
            u *= t(0.044715)
            u += 1
            u *= x
            u *= t(_SQRT_2_OVER_PI)
            np.tanh(u, out=u)
            self.th = u  # tanh(sqrt(2/pi) (x + 0.044715 x^3))
            cdf = u + 1
            cdf *= t(0.5)
            self.cdf = cdf
            return x * cdf
        if self.approximate != "none":
            raise ValueError(f"Gelu: unknown approximate={self.approximate!r} (expected 'none' or 'tanh')")
        flat = np.ascontiguousarray(x).reshape(-1)
        cdf, y = np.empty_like(flat), np.empty_like(flat)
        blocks, size = _blocks(flat.size)
        v, z, q = (np.empty(size, x.dtype) for _ in range(3))
        for s, e in blocks:
            n, xs, c = e - s, flat[s:e], cdf[s:e]
            np.multiply(xs, t(_INV_SQRT2), out=v[:n])
            _erf_block(v[:n], c, z[:n], q[:n])
            c *= t(0.5)
            c += t(0.5)
            np.multiply(xs, c, out=y[s:e])
        self.cdf = cdf.reshape(x.shape)
        return y.reshape(x.shape)

    def backward(self, g):
        t = g.dtype.type
        x = self.x
        if self.approximate == "tanh":
            # d/dx = cdf + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
            d = x * x
            d *= t(3 * 0.044715)
            d += 1
            d *= t(0.5 * _SQRT_2_OVER_PI)
            d *= x
            d *= 1 - self.th * self.th
            d += self.cdf
            d *= g
            return (d,)
        # d/dx = Phi(x) + x phi(x), blockwise like forward
        xf = np.ascontiguousarray(x).reshape(-1)
        gf = np.ascontiguousarray(g).reshape(-1)
        cf = self.cdf.reshape(-1)
        d = np.empty_like(gf)
        for s, e in _blocks(xf.size)[0]:
            xs, ds = xf[s:e], d[s:e]
            np.multiply(xs, xs, out=ds)
            ds *= t(-0.5)
            np.exp(ds, out=ds)
            ds *= t(_INV_SQRT_2PI)
            ds *= xs
            ds += cf[s:e]
            ds *= gf[s:e]
        return (d.reshape(g.shape),)


# ---- softmax -----------------------------------------------------------------------------------------------------
class _SoftmaxBase(Op):
    """Opset >= 13: along one axis (default -1). Opset < 13: x coerced to 2-D [prod(shape[:axis]), rest] and
    normalised along the second dimension (default axis 1)."""

    attrs = {"axis": -1}

    def __init__(self, node, opset=13):
        super().__init__(node, opset)
        if opset < 13 and "axis" not in node.attrs:
            self.axis = 1

    def _view(self, x):
        """x as the array and axis the op normalises along."""
        axis = normalize_axis(self.axis, x.ndim)
        if self.opset >= 13:
            return x, axis
        rows = math.prod(x.shape[:axis])
        return x.reshape(rows, math.prod(x.shape[axis:])), 1


@register("Softmax")
class Softmax(_SoftmaxBase):
    def forward(self, ctx, x):
        v, axis = self._view(x)
        y = v - v.max(axis=axis, keepdims=True)
        np.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        self.y, self.ax = y, axis
        return y.reshape(x.shape)

    def backward(self, g):
        y = self.y
        gv = g.reshape(y.shape)
        d = gv * y
        s = d.sum(axis=self.ax, keepdims=True)
        d -= y * s  # y * (g - sum(g * y))
        return (d.reshape(g.shape),)


@register("LogSoftmax")
class LogSoftmax(_SoftmaxBase):
    def forward(self, ctx, x):
        v, axis = self._view(x)
        y = v - v.max(axis=axis, keepdims=True)
        e = np.exp(y)
        y -= np.log(e.sum(axis=axis, keepdims=True))
        self.y, self.ax = y, axis
        return y.reshape(x.shape)

    def backward(self, g):
        y = self.y
        gv = g.reshape(y.shape)
        d = np.exp(y)
        d *= gv.sum(axis=self.ax, keepdims=True)
        np.subtract(gv, d, out=d)  # g - softmax * sum(g)
        return (d.reshape(g.shape),)
