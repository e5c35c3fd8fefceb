"""Pooling and local response normalisation: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, LRN.

Windowed pools read their input through the strided window view of `conv._windows` (padding with -inf or 0
only when a window reaches outside the input) and loop over the kernel taps (4 for 2x2), never over pixels.
MaxPool's forward is only a running maximum over the taps; its backward finds, tap by tap, the outputs whose
first maximum in row-major window order is that tap (the element onnxruntime's Indices points to) and writes
the gradient there: plain assignment when windows do not overlap (2x2 stride 2), accumulation when they do
(3x3 stride 2 pad 1). Masks by comparison beat tracking an argmax in forward (numpy's masked writes are slow).

Output sizes follow onnxruntime: floor or (ceil_mode) ceil of (in + pads - dilated kernel) / stride + 1, and in
ceil_mode a last window that would start inside the tail padding is dropped.
"""

from __future__ import annotations

from itertools import product
from math import prod

import numpy as np

from ..errors import ModelError
from .base import Op, register
from .conv import _buffer_geometry, _ints, _tap_slices, _tdiv, _unpad, _windows


def _pool_geometry(op: Op, spatial: tuple[int, ...]):
    """kernel, strides, dilations, head pads, tail pads and output sizes of a MaxPool/AveragePool node."""
    n = len(spatial)
    if op.kernel_shape is None or len(op.kernel_shape) != n:
        raise ModelError(f"{op.op_type} node {op.node.name!r}: kernel_shape {op.kernel_shape} does not match "
                         f"the {n} spatial dims of the input")
    kernel = [int(k) for k in op.kernel_shape]
    strides = _ints(op.strides, n, 1)
    dilations = _ints(getattr(op, "dilations", None), n, 1)
    auto_pad = op.auto_pad.decode() if isinstance(op.auto_pad, bytes) else op.auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = _ints(op.pads, 2 * n, 0)
        pb, pe = pads[:n], pads[n:]
    elif auto_pad == "VALID":
        pb, pe = [0] * n, [0] * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # onnxruntime sizes the SAME padding with the undilated kernel (the spec uses the dilated one; with
        # dilations > 1 onnxruntime's output is then smaller than ceil(in / stride)); we run what it runs
        pb, pe = [], []
        for s, k, st in zip(spatial, kernel, strides):
            need = (-(-s // st) - 1) * st + k - s
            head = _tdiv(need + 1, 2) if auto_pad == "SAME_LOWER" else _tdiv(need, 2)
            pb.append(head)
            pe.append(need - head)
    else:
        raise ModelError(f"{op.op_type} node {op.node.name!r}: unknown auto_pad {auto_pad!r}")
    out = []
    for s, k, st, d, b, e in zip(spatial, kernel, strides, dilations, pb, pe):
        span = s + b + e - (k - 1) * d - 1
        o = (-(-span // st) if op.ceil_mode else span // st) + 1
        if op.ceil_mode and (o - 1) * st >= s + b:  # the last window would start in the tail padding
            o -= 1
        out.append(o)
    if any(o <= 0 for o in out):
        raise ModelError(f"{op.op_type} node {op.node.name!r}: input {tuple(spatial)} too small for kernel "
                         f"{tuple(kernel)} (pads {pb + pe}, strides {strides}, dilations {dilations})")
    return kernel, strides, dilations, pb, pe, out


def _taps(kernel):
    return list(product(*(range(k) for k in kernel)))


def _scatter_taps(shape, kernel, strides, dilations, pb, out, dtype, tap_grad, overlap):
    """dx of a windowed pool: tap_grad(t, dst, add) writes (add False: windows do not overlap, so every input
    position is one tap's) or adds (True) the gradient of tap t into dst, that tap's strided view of dx."""
    spatial = shape[2:]
    lo, sizes, need = _buffer_geometry(spatial, kernel, strides, dilations, pb, out)
    buf = np.zeros(shape[:2] + tuple(sizes), dtype=dtype)
    for t, k in enumerate(_taps(kernel)):
        tap_grad(t, buf[(slice(None), slice(None)) + _tap_slices(k, strides, dilations, pb, out, lo)], overlap)
    return _unpad(buf, lo, spatial) if need else buf


class _Phases:
    """The input, padded, split by stride phase, so that every kernel tap reads its values for all outputs as one
    block with unit stride.

    Buffer position b (the padded input, as `_buffer_geometry` lays it out) lives in phase b % s at index b // s
    of each strided dim; tap k of a dim starts at b = k*d - pad - lo, so its block is phase (b % s), indices
    b // s .. b // s + out. One strided copy of the input (split) replaces the strided reads of every tap: for
    ResNet's 3x3 stride-2 MaxPool at 112x112, batch 32, nine strided passes over the output became contiguous
    (each ~3x faster), forward and backward; merge is split's adjoint for the gradient.
    """

    def __init__(self, shape, kernel, strides, dilations, pb, out):
        self.shape, self.strides = tuple(shape), list(strides)
        self.dilations, self.pb, self.out = dilations, pb, out
        self.lo, sizes, _ = _buffer_geometry(shape[2:], kernel, strides, dilations, pb, out)
        self.blocks = [-(-z // st) for z, st in zip(sizes, strides)]  # indices per phase, each dim

    def _cells(self):
        """For each phase: the phase index and, per dim, (index slice in the phase, input slice)."""
        for phase in product(*(range(st) for st in self.strides)):
            cells = []
            for a, st, l, n in zip(phase, self.strides, self.lo, self.shape[2:]):
                first = -(-(-l - a) // st) if -l - a > 0 else 0  # first index q with input position q*st + a + l >= 0
                x0 = first * st + a + l
                count = max(0, -(-(n - x0) // st)) if x0 < n else 0
                cells.append((slice(first, first + count), slice(x0, x0 + count * st, st)))
            yield phase, cells

    def full(self, fill, dtype) -> np.ndarray:
        """A phases array (N, C, *strides, *blocks) filled with `fill`."""
        return np.full(self.shape[:2] + tuple(self.strides) + tuple(self.blocks), fill, dtype=dtype)

    def split(self, x, fill):
        ph = self.full(fill, x.dtype)
        for phase, cells in self._cells():
            ph[(slice(None), slice(None)) + phase + tuple(c[0] for c in cells)] = \
                x[(slice(None), slice(None)) + tuple(c[1] for c in cells)]
        return ph

    def merge(self, ph):
        """The input-shaped array whose every position is ph's cell for it (padding cells are dropped)."""
        dx = np.empty(self.shape, dtype=ph.dtype)
        for phase, cells in self._cells():
            dx[(slice(None), slice(None)) + tuple(c[1] for c in cells)] = \
                ph[(slice(None), slice(None)) + phase + tuple(c[0] for c in cells)]
        return dx

    def tap(self, ph, k):
        """Tap k's block: out-shaped, unit stride along the last dim."""
        offs = [kk * d - p - l for kk, d, p, l in zip(k, self.dilations, self.pb, self.lo)]
        return ph[(slice(None), slice(None)) + tuple(b % st for b, st in zip(offs, self.strides))
                  + tuple(slice(b // st, b // st + o) for b, st, o in zip(offs, self.strides, self.out))]


def _overlapping(kernel, strides, dilations) -> bool:
    return any(st < (k - 1) * d + 1 for k, st, d in zip(kernel, strides, dilations))


# ---- MaxPool -----------------------------------------------------------------------------------------------
@register("MaxPool")
class MaxPool(Op):
    """Max over each window (padding never wins); optional second output Indices (int64, forward only): the
    flat index of the max in the unpadded input, row-major (storage_order 0) or column-major over the spatial
    dims (storage_order 1)."""

    attrs = {"auto_pad": "NOTSET", "ceil_mode": 0, "dilations": None, "kernel_shape": None, "pads": None,
             "storage_order": 0, "strides": None}

    def forward(self, ctx, x):
        geom = _pool_geometry(self, x.shape[2:])
        kernel, strides, dilations, pb, pe, out = geom
        self.geom, self.x_shape = geom, x.shape
        low = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
        self.phases = None
        if any(st > 1 for st in strides):  # strided taps: read them from stride phases instead (see _Phases)
            self.phases = _Phases(x.shape, kernel, strides, dilations, pb, out)
            ph = self.phases.split(x, low)

            def view(k):
                return self.phases.tap(ph, k)
        else:
            v = _windows(x, kernel, strides, dilations, pb, out, fill=low)

            def view(k):
                return v[(Ellipsis,) + k]
        taps = _taps(kernel)
        want_indices = len(self.node.outputs) > 1 and bool(self.node.outputs[1])
        y = view(taps[0]).copy()
        if not (ctx.grad or want_indices):
            for k in taps[1:]:
                np.maximum(y, view(k), out=y)
            return y
        # the winning tap of each window (the first maximum in row-major window order), for backward and Indices:
        # a byte per output instead of the padded input and the output kept for comparisons
        # (taps in increasing order: a tap beating the maximum so far is the largest winner index yet, so
        # win = max(win, t * beats), which is 30x faster than a masked copy)
        code = np.uint8 if len(taps) <= 256 else np.int32
        self.win = np.zeros(y.shape, dtype=code)
        beats = np.empty(y.shape, dtype=bool)
        tmp = np.empty(y.shape, dtype=code)
        for t, k in enumerate(taps[1:], 1):
            vk = view(k)
            np.greater(vk, y, out=beats)
            np.maximum(y, vk, out=y)
            np.multiply(beats, code(t), out=tmp)
            np.maximum(self.win, tmp, out=self.win)
        if want_indices:
            return y, self._indices()
        return y

    def _indices(self):
        kernel, strides, dilations, pb, pe, out = self.geom
        n, c = self.x_shape[:2]
        spatial = self.x_shape[2:]
        ktab = np.array(_taps(kernel), dtype=np.int64).reshape(-1, len(kernel))
        # flattening weights of the spatial dims: row-major, or column-major for storage_order 1
        order = range(len(spatial)) if self.storage_order else reversed(range(len(spatial)))
        weights, acc = [0] * len(spatial), 1
        for i in order:
            weights[i], acc = acc, acc * spatial[i]
        flat = np.arange(n * c, dtype=np.int64).reshape((n, c) + (1,) * len(spatial)) * prod(spatial)
        for i in range(len(spatial)):
            shape = [1] * len(spatial)
            shape[i] = out[i]
            pos = (np.arange(out[i], dtype=np.int64) * strides[i] - pb[i]).reshape(shape)
            flat = flat + (pos + ktab[self.win, i] * dilations[i]) * weights[i]
        return flat

    def backward(self, gy, *_):
        kernel, strides, dilations, pb, pe, out = self.geom
        if getattr(self, "win", None) is None:
            raise ModelError(f"MaxPool node {self.node.name!r}: backward needs a forward with grad=True")
        won = np.empty(gy.shape, dtype=bool)
        tmp = np.empty_like(gy)

        def tap_grad(t, dst, add):  # gy where tap t won, else 0 (a multiply: masked ufunc loops are 3x slower)
            np.equal(self.win, t, out=won)
            if add:
                np.multiply(gy, won, out=tmp)
                dst += tmp
            else:
                np.multiply(gy, won, out=dst)

        overlap = _overlapping(kernel, strides, dilations)
        if self.phases is None:
            dx = _scatter_taps(self.x_shape, kernel, strides, dilations, pb, out, gy.dtype, tap_grad, overlap)
        else:
            grid = self.phases
            dph = grid.full(0, gy.dtype)
            for t, k in enumerate(_taps(kernel)):
                tap_grad(t, grid.tap(dph, k), overlap)
            dx = grid.merge(dph)
        self.win = self.phases = None
        return (dx,)


# ---- AveragePool -------------------------------------------------------------------------------------------
@register("AveragePool")
class AveragePool(Op):
    """Mean over each window. The divisor counts the window's taps inside the input, plus those in the
    explicit pads when count_include_pad (never those past the pads that ceil_mode adds)."""

    attrs = {"auto_pad": "NOTSET", "ceil_mode": 0, "count_include_pad": 0, "dilations": None,
             "kernel_shape": None, "pads": None, "strides": None}

    def _divisor(self, spatial, dtype):
        kernel, strides, dilations, pb, pe, out = self.geom
        counts = []
        for s, k, st, d, b, e, o in zip(spatial, kernel, strides, dilations, pb, pe, out):
            pos = np.arange(o)[:, None] * st + np.arange(k)[None, :] * d - b
            lo, hi = (-b, s + e) if self.count_include_pad else (0, s)
            counts.append(((pos >= lo) & (pos < hi)).sum(axis=1))
        div = counts[0]
        for cnt in counts[1:]:
            div = np.multiply.outer(div, cnt)
        return div.astype(dtype)

    def forward(self, ctx, x):
        geom = _pool_geometry(self, x.shape[2:])
        kernel, strides, dilations, pb, pe, out = geom
        self.geom, self.x_shape = geom, x.shape
        v = _windows(x, kernel, strides, dilations, pb, out)
        taps = _taps(kernel)
        y = v[(Ellipsis,) + taps[0]].copy()
        for k in taps[1:]:
            y += v[(Ellipsis,) + k]
        self.div = self._divisor(x.shape[2:], x.dtype)
        y /= self.div
        return y

    def backward(self, gy):
        kernel, strides, dilations, pb, pe, out = self.geom
        gd = gy / self.div
        overlap = _overlapping(kernel, strides, dilations)

        def tap_grad(t, dst, add):
            if add:
                dst += gd
            else:
                np.copyto(dst, gd)

        return (_scatter_taps(self.x_shape, kernel, strides, dilations, pb, out, gy.dtype, tap_grad, overlap),)


# ---- global pools ------------------------------------------------------------------------------------------
@register("GlobalAveragePool")
class GlobalAveragePool(Op):
    def forward(self, ctx, x):
        self.x_shape = x.shape
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=x.dtype)

    def backward(self, gy):
        dx = np.empty(self.x_shape, dtype=gy.dtype)
        np.copyto(dx, gy * gy.dtype.type(1.0 / prod(self.x_shape[2:])))
        return (dx,)


@register("GlobalMaxPool")
class GlobalMaxPool(Op):
    def forward(self, ctx, x):
        self.x = x
        return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)

    def backward(self, gy):
        x = self.x
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        arg = flat.argmax(axis=2)[..., None]  # the first maximum gets the gradient
        dx = np.zeros(flat.shape, dtype=gy.dtype)
        np.put_along_axis(dx, arg, gy.reshape(n, c, 1), axis=2)
        self.x = None
        return (dx.reshape(x.shape),)


# ---- LRN ---------------------------------------------------------------------------------------------------
@register("LRN")
class LRN(Op):
    """y = x / (bias + alpha/size · Σ x²)^beta, summing over channels c − ⌊(size−1)/2⌋ … c + ⌈(size−1)/2⌉
    (onnxruntime accepts only odd sizes and 4-D inputs; this follows the spec for the others)."""

    attrs = {"alpha": 0.0001, "beta": 0.75, "bias": 1.0, "size": None}

    def _channel_window_sum(self, a, before, after):
        """Σ_{u=-before..after} a[:, c+u] (zero outside the channels), by one padded buffer and `size` adds."""
        n, c = a.shape[:2]
        size = before + after + 1
        pad = np.zeros((n, c + size - 1) + a.shape[2:], dtype=a.dtype)
        pad[:, before:before + c] = a
        out = pad[:, 0:c].copy()
        for u in range(1, size):
            out += pad[:, u:u + c]
        return out

    def forward(self, ctx, x):
        size = int(self.size) if self.size is not None else 0
        if size < 1:
            raise ModelError(f"LRN node {self.node.name!r}: attribute size must be a positive integer")
        t = x.dtype.type
        self.pre, self.post = (size - 1) // 2, size - 1 - (size - 1) // 2
        s = self._channel_window_sum(x * x, self.pre, self.post)
        s *= t(self.alpha / size)
        s += t(self.bias)
        r = np.power(s, t(-self.beta))
        self.x, self.s, self.r = x, s, r
        return x * r

    def backward(self, gy):
        x, s, r = self.x, self.s, self.r
        t = x.dtype.type
        # dx_i = g_i r_i − (2 α β / size) x_i Σ_{c: i in window(c)} g_c x_c r_c / s_c
        q = gy * x
        q *= r
        q /= s
        back = self._channel_window_sum(q, self.post, self.pre)
        back *= x
        back *= t(2 * self.alpha * self.beta / int(self.size))
        dx = gy * r
        dx -= back
        self.x = self.s = self.r = None
        return (dx,)
