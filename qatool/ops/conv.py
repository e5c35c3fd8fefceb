"""Convolutions: Conv and ConvTranspose, N-D (1-D, 2-D, 3-D), grouped and depthwise.

Both are built on two layout helpers that work in any number of spatial dimensions:

- `_im2col(x, ...)` gathers the receptive fields into a matrix `col[c, *k, n, *o] = x[n, c, o*s + k*d - pb]`
  (zero outside `x`, which is padded only when a window reaches outside it), so a convolution is GEMMs;
- `_col2im(col, ...)` is its adjoint: it adds every column back to where it came from, one strided slice per
  kernel tap (a Python loop over the K taps, never over pixels).

Conv's backward uses them as `dW = g @ colᵀ` and `dX = col2im(Wᵀ @ g)` (for stride 1: `dX = conv(g, flipped Wᵀ)`,
an im2col of g and a GEMM); ConvTranspose's forward is `col2im(Wᵀ @ x)` and its backward `dX = W @ im2col(g)`,
`dW = x @ im2col(g)ᵀ`.

Choices, each measured at batch 64 (float32; numbers in the classes' docstrings):
- a 1×1 stride-1 unpadded convolution is a plain matmul `w @ x.reshape(N, C, H*W)` (no im2col);
- a 2-D depthwise convolution runs as banded (Toeplitz) GEMMs on row-shifted views of one padded buffer
  (`_Banded`): no im2col matrix at all, and 1.5-2x faster than im2col with a tap-by-tap dX;
- group 1 with outputs of >= 256 pixels: one GEMM per image, `w (M, C*K) @ col[:, n] (C*K, P)`, which writes
  (N, M, P) directly (3x faster than one big GEMM + transposed copy for the first layers, where C*K is 9..25);
  otherwise one GEMM per group over the whole batch, `w (G, Mg, Cg*K) @ col (G, Cg*K, N*P)`, then one
  transposed copy to (N, M, P);
- dense stride-1 dX as a conv of dY with the flipped, transposed kernel where its im2col is no larger than dcol's
  (M * input pixels <= C * output pixels: same-padded convs that keep the channels): its GEMM has the forward's inner
  dimension (Mg*K) where Wᵀ @ g has only Mg and writes a K times larger matrix for col2im to scatter (ResNet's
  3x3 at 64x56x56, batch 32, 2 threads: 81 against 139 ms); dW by one GEMM per group over the batch, or per image
  summed where outputs have >= DW_PER_IMAGE_PIXELS pixels (even at 56x56, 3x faster at 7x7 and 14x14);
- 2-D with short output rows (<= 20 pixels, stride 1 down the rows): im2col/col2im in two passes, the Kw
  column shifts first, so the row taps move contiguous Oh*Ow blocks (2x faster for 5x5 kernels at 8..20 px);
- other depthwise convs (1-D, 3-D) scatter dX tap by tap (`dx[tap] += g * w[:, tap]`) instead of forming
  `Wᵀ @ g`, an outer product K times the size of the input.

Forward keeps the im2col matrix (or the banded path's padded input) for dW when training — the one thing
worth saving; outside training backward rebuilds it from the input. A fake-quantized input (every quantized
conv's, in QAT) is kept instead as its grid codes, a byte per value (`base.keep_compact`), and backward
rebuilds the matrix from those. dX is skipped when `needs_grad[0]` is
False (a first layer: the image needs no gradient).
"""

from __future__ import annotations

from itertools import product
from math import prod

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import ModelError
from .base import GridCodes, Op, expanded, keep_compact, register


# ---- geometry ----------------------------------------------------------------------------------------------
def _ints(v, n: int, default: int) -> list[int]:
    """An INTS attribute as a list of n Python ints (the default when absent)."""
    if v is None or len(v) == 0:
        return [default] * n
    return [int(i) for i in v]


def _tdiv(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero), as onnxruntime computes auto_pad splits."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _auto_pads(auto_pad: str, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(head, tail) padding of one spatial dim for auto_pad SAME_UPPER/SAME_LOWER/VALID (onnxruntime's rule:
    the output size is ceil(size / stride); an odd total goes to the tail for SAME_UPPER, the head for SAME_LOWER).
    """
    if auto_pad == "VALID":
        return 0, 0
    target = -(-size // stride)
    need = (target - 1) * stride + (kernel - 1) * dilation + 1 - size
    head = _tdiv(need + 1, 2) if auto_pad == "SAME_LOWER" else _tdiv(need, 2)
    return head, need - head


def _conv_geometry(op: Op, spatial: tuple[int, ...], kernel: tuple[int, ...]):
    """Strides, dilations, head pads, tail pads and output sizes of a Conv."""
    n = len(spatial)
    strides = _ints(op.strides, n, 1)
    dilations = _ints(op.dilations, n, 1)
    auto_pad = op.auto_pad.decode() if isinstance(op.auto_pad, bytes) else op.auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        pb, pe = zip(*(_auto_pads(auto_pad, spatial[i], kernel[i], strides[i], dilations[i]) for i in range(n)))
        pb, pe = list(pb), list(pe)
    elif auto_pad in ("NOTSET", ""):
        pads = _ints(op.pads, 2 * n, 0)
        pb, pe = pads[:n], pads[n:]
    else:
        raise ModelError(f"{op.op_type} node {op.node.name!r}: unknown auto_pad {auto_pad!r}")
    out = [(spatial[i] + pb[i] + pe[i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(n)]
    if any(o <= 0 for o in out):
        raise ModelError(f"{op.op_type} node {op.node.name!r}: input {tuple(spatial)} too small for kernel "
                         f"{tuple(kernel)} (dilations {dilations}, pads {pb + pe}, strides {strides})")
    return strides, dilations, pb, pe, out


# ---- layout helpers ---------------------------------------------------------------------------------------
def _span(out: int, kernel: int, stride: int, dilation: int) -> int:
    """How many input positions the windows of one spatial dim cover, from the first window's start."""
    return (out - 1) * stride + (kernel - 1) * dilation + 1


def _buffer_geometry(spatial, kernel, strides, dilations, pb, out):
    """A zero-padded buffer holding positions [lo, hi) of each spatial dim, covering the image and all windows.
    Returns (lo, buffer sizes, whether a buffer is needed at all)."""
    lo = [min(0, -p) for p in pb]
    hi = [max(s, _span(o, k, st, d) - p) for s, o, k, st, d, p in zip(spatial, out, kernel, strides, dilations, pb)]
    sizes = [h - l for h, l in zip(hi, lo)]
    return lo, sizes, any(l < 0 for l in lo) or any(h > s for h, s in zip(hi, spatial))


def _padded(x: np.ndarray, lo, sizes, fill=0) -> np.ndarray:
    """x placed at offset -lo in a buffer of `sizes` spatial extent filled with `fill` (zeros by default)."""
    if fill == 0:
        buf = np.zeros(x.shape[:2] + tuple(sizes), dtype=x.dtype)
    else:
        buf = np.full(x.shape[:2] + tuple(sizes), fill, dtype=x.dtype)
    buf[(slice(None), slice(None)) + tuple(slice(-l, -l + s) for l, s in zip(lo, x.shape[2:]))] = x
    return buf


def _unpad(buf: np.ndarray, lo, spatial) -> np.ndarray:
    """The image region of a buffer from _buffer_geometry, as a new contiguous array."""
    return np.ascontiguousarray(buf[(slice(None), slice(None)) + tuple(slice(-l, -l + s) for l, s in zip(lo, spatial))])


def _windows(x, kernel, strides, dilations, pb, out, fill=0):
    """A read-only view v[n, c, *o, *k] = x[n, c, o*s + k*d - pb] (`fill` outside x), padding x only if needed."""
    spatial = x.shape[2:]
    lo, sizes, need = _buffer_geometry(spatial, kernel, strides, dilations, pb, out)
    buf = _padded(x, lo, sizes, fill) if need else x
    # position p lives at buffer index p - lo; the first window starts at position -pb
    start = tuple(slice(-p - l, None) for p, l in zip(pb, lo))
    base = buf[(slice(None), slice(None)) + start]
    st = base.strides
    shape = base.shape[:2] + tuple(out) + tuple(kernel)
    strides = st[:2] + tuple(a * s for a, s in zip(st[2:], strides)) + tuple(a * d for a, d in zip(st[2:], dilations))
    return as_strided(base, shape, strides, writeable=False)


def _two_stage(kernel, strides, out) -> bool:
    """2-D, stride 1 down the rows, short output rows: gather (and scatter) in two passes, columns then rows.

    A tap-by-tap copy moves rows of only Ow elements; gathering the Kw column shifts first makes each row tap
    a contiguous Oh*Ow block. Measured: 2x faster for 5x5 kernels at 8..20 pixels, a loss at 28 and above.
    """
    return len(kernel) == 2 and strides[0] == 1 and kernel[0] > 1 and kernel[1] > 1 and out[1] <= 20


KEEP_COL_FACTOR = 2  # see Conv.forward


def _im2col(x, kernel, strides, dilations, pb, out) -> np.ndarray:
    """col[c, *k, n, *o] = x[n, c, o*s + k*d - pb], zero outside x; a new C-contiguous array."""
    nsp = len(kernel)
    n, c = x.shape[:2]
    col = np.empty((c,) + tuple(kernel) + (n,) + tuple(out), dtype=x.dtype)
    if _two_stage(kernel, strides, out):
        lo, sizes, need = _buffer_geometry(x.shape[2:], kernel, strides, dilations, pb, out)
        xt = (_padded(x, lo, sizes) if need else x).swapaxes(0, 1)  # (C, N, Hp, Wp)
        (kh, kw), (oh, ow) = kernel, out
        xh = np.empty((c, kw, n, xt.shape[2], ow), dtype=x.dtype)  # xh[c, j, n, h, o] = xp[n, c, h, o*s + j*d]
        for j in range(kw):
            w0 = j * dilations[1] - pb[1] - lo[1]
            xh[:, j] = xt[:, :, :, w0:w0 + (ow - 1) * strides[1] + 1:strides[1]]
        for i in range(kh):
            h0 = i * dilations[0] - pb[0] - lo[0]
            col[:, i] = xh[:, :, :, h0:h0 + oh]
        return col
    v = _windows(x, kernel, strides, dilations, pb, out)
    perm = (1,) + tuple(range(2 + nsp, 2 + 2 * nsp)) + (0,) + tuple(range(2, 2 + nsp))
    np.copyto(col, v.transpose(perm))
    return col


def _tap_slices(k, strides, dilations, pb, out, lo):
    """Buffer slices that kernel tap k reads for all outputs o (positions o*s + k*d - pb, buffer offset lo)."""
    return tuple(slice(kk * d - p - l, kk * d - p - l + (o - 1) * s + 1, s)
                 for kk, s, d, p, o, l in zip(k, strides, dilations, pb, out, lo))


def _col2im(col, shape, kernel, strides, dilations, pb, out) -> np.ndarray:
    """The adjoint of _im2col: y[n, c, o*s + k*d - pb] += col[c, *k, n, *o] over taps k; y has `shape`."""
    spatial = shape[2:]
    lo, sizes, need = _buffer_geometry(spatial, kernel, strides, dilations, pb, out)
    buf = np.zeros(shape[:2] + tuple(sizes), dtype=col.dtype)
    bt = buf.swapaxes(0, 1)  # (C, N, *S): the layout of one tap of col
    if _two_stage(kernel, strides, out):
        (kh, kw), (oh, ow) = kernel, out
        tmp = np.zeros((shape[1], kw, shape[0], sizes[0], ow), dtype=col.dtype)  # rows first, then columns
        for i in range(kh):
            h0 = i * dilations[0] - pb[0] - lo[0]
            tmp[:, :, :, h0:h0 + oh] += col[:, i]
        for j in range(kw):
            w0 = j * dilations[1] - pb[1] - lo[1]
            bt[:, :, :, w0:w0 + (ow - 1) * strides[1] + 1:strides[1]] += tmp[:, j]
    else:
        for k in product(*(range(kk) for kk in kernel)):
            bt[(slice(None), slice(None)) + _tap_slices(k, strides, dilations, pb, out, lo)] += col[(slice(None),) + k]
    return _unpad(buf, lo, spatial) if need else buf


def _channels_first(g: np.ndarray, groups: int) -> np.ndarray:
    """(N, G*Cg, *S) -> contiguous (G, Cg, N*P): the channel-major layout the GEMMs use."""
    n, c = g.shape[:2]
    return np.ascontiguousarray(g.reshape(n, groups, c // groups, -1).transpose(1, 2, 0, 3)).reshape(
        groups, c // groups, -1)


def _batch_first(m: np.ndarray, shape, bias=None) -> np.ndarray:
    """(C, N*P) channel-major result -> a new (N, C, *S) array, adding a per-channel bias on the way."""
    n, c = shape[:2]
    src = m.reshape((c, n) + tuple(shape[2:])).swapaxes(0, 1)
    y = np.empty(shape, dtype=m.dtype)
    if bias is None:
        np.copyto(y, src)
    else:
        np.add(src, bias.reshape((c,) + (1,) * (len(shape) - 2)), out=y)
    return y


def _check_kernel(op, kernel):
    if op.kernel_shape is not None and len(op.kernel_shape) and tuple(int(k) for k in op.kernel_shape) != kernel:
        raise ModelError(f"{op.op_type} node {op.node.name!r}: kernel_shape {list(op.kernel_shape)} does not "
                         f"match the weight's kernel {list(kernel)}")


def _check_group(op, c_in, group, what):
    if group < 1 or c_in % group:
        raise ModelError(f"{op.op_type} node {op.node.name!r}: {what} {c_in} not divisible by group {group}")


# ---- depthwise 2-D by banded (Toeplitz) GEMMs --------------------------------------------------------------
class _Banded:
    """A 2-D depthwise conv (one input and one output channel per group) as GEMMs with banded matrices.

    The input is laid out channels-first in a zero-padded buffer xb (C, rows, Wb), every image padded to Hr
    rows, Hr a multiple of the row stride, so that output row r (over all images: r = n*Or + oh) of kernel row
    i reads buffer row r*sh + off_i: a strided view Xv_i, no copy. The output columns are cut into blocks of
    B <= 16; kernel row i of a block becomes a banded matrix T_i (in_width, B), T_i[o*sw + j*dw, o] =
    w[c, i, j], so that, with X the block's input columns and G the output gradient on the same row grid
    (zero on the padding rows),

        Y[c] = Σ_i Xv_i[c] @ T_i[c]      dXv_i[c] += G[c] @ T_i[c]ᵀ      dW[c, i, j] = Σ_o (Gᵀ Xv_i)[c, o, o*sw + j*dw]

    The GEMMs do (B + Kw - 1)/Kw times the useful multiplies, but BLAS runs them near peak, whereas im2col
    writes a matrix K times the input (173 MB at 64x96x28x28) and keeps it for backward. Measured at batch
    64, 3x3, 96x28x28, one thread: fwd+bwd 87 ms against 150 ms for im2col + tap-by-tap dX (PyTorch: 63 ms).
    """

    block = 16

    @staticmethod
    def applies(kernel, cg, mg) -> bool:
        return len(kernel) == 2 and cg == 1 and mg == 1 and prod(kernel) > 1

    def __init__(self, x_shape, kernel, strides, dilations, pb, out):
        self.n, self.c, self.h, self.w = x_shape
        self.kernel, self.strides, self.dilations, self.pb, self.out = kernel, strides, dilations, pb, out
        self.lo, sizes, _ = _buffer_geometry(x_shape[2:], kernel, strides, dilations, pb, out)
        sh, sw = strides
        self.orows = max(out[0], -(-sizes[0] // sh))  # output rows per image on the grid
        self.hr = self.orows * sh  # buffer rows per image
        self.wb = sizes[1]
        self.row_off = [i * dilations[0] - pb[0] - self.lo[0] for i in range(kernel[0])]
        self.rows = self.n * self.hr + max(self.row_off) + 1  # tail rows keep every strided view in bounds
        nb = -(-out[1] // self.block)
        b = -(-out[1] // nb)
        col_off = -pb[1] - self.lo[1]
        # (first output column, block width, first buffer column, input width) of each column block
        self.blocks = [(o0, min(b, out[1] - o0), o0 * sw + col_off, (min(b, out[1] - o0) - 1) * sw
                        + (kernel[1] - 1) * dilations[1] + 1) for o0 in range(0, out[1], b)]
        self.bw = b

    def _image_region(self, buf):
        """The (C, N, H, W) image region of a (C, rows, Wb) buffer."""
        b = buf[:, :self.n * self.hr].reshape(self.c, self.n, self.hr, self.wb)
        return b[:, :, -self.lo[0]:-self.lo[0] + self.h, -self.lo[1]:-self.lo[1] + self.w]

    def _row_view(self, buf, i, c0, width, writeable=False):
        """Xv_i restricted to buffer columns [c0, c0 + width): (C, N*Or, width), row r = buffer row r*sh + off_i."""
        st = buf.strides
        base = buf[:, self.row_off[i]:, c0:]
        return as_strided(base, (self.c, self.n * self.orows, width), (st[0], st[1] * self.strides[0], st[2]),
                          writeable=writeable)

    def _input_buffer(self, x):
        xb = np.zeros((self.c, self.rows, self.wb), dtype=x.dtype)
        self._image_region(xb)[...] = x.swapaxes(0, 1)
        return xb

    def _taps(self, j, width):
        """Row and column indices of tap column j in a banded block: T[o*sw + j*dw, o] for o < width."""
        o = np.arange(width)
        return o * self.strides[1] + j * self.dilations[1], o

    def forward(self, x, w, bias, keep: bool):
        """y (N, C, Oh, Ow); keeps the input buffer for dW when `keep`, else backward rebuilds it from x."""
        kh, kw = self.kernel
        xb = self._input_buffer(x)
        b = self.bw
        t = np.zeros((self.c, kh, (b - 1) * self.strides[1] + (kw - 1) * self.dilations[1] + 1, b), dtype=w.dtype)
        wk = w.reshape(self.c, kh, kw)
        for j in range(kw):
            t[(slice(None), slice(None)) + self._taps(j, b)] = wk[:, :, j, None]
        y = np.empty((self.n, self.c) + tuple(self.out), dtype=x.dtype)
        shape = (self.c, self.n, self.orows)
        for o0, bb, c0, width in self.blocks:
            yb = np.matmul(self._row_view(xb, 0, c0, width), t[:, 0, :width, :bb])
            for i in range(1, kh):
                yb += np.matmul(self._row_view(xb, i, c0, width), t[:, i, :width, :bb])
            src = yb.reshape(shape + (bb,))[:, :, :self.out[0]].swapaxes(0, 1)
            if bias is None:
                y[..., o0:o0 + bb] = src
            else:
                np.add(src, bias.reshape(-1, 1, 1), out=y[..., o0:o0 + bb])
        self.xb, self.t, self.wk = (xb if keep else None), t, wk
        return y

    def _dx_as_conv(self, gy):
        """dX of a stride-1 conv is itself a depthwise conv: gy correlated with the flipped kernel, head padding
        d(k-1) - pad. One more banded forward, which beats scattering into the padded buffer (96x28x28 at
        batch 64, interleaved runs: 66 against 87 ms). None where that padding would be negative (pads wider
        than the kernel)."""
        pads = [d * (k - 1) - p for k, d, p in zip(self.kernel, self.dilations, self.pb)]
        if any(s != 1 for s in self.strides) or any(p < 0 for p in pads):
            return None
        conv = _Banded(gy.shape, self.kernel, self.strides, self.dilations, pads, (self.h, self.w))
        return conv.forward(gy, np.ascontiguousarray(self.wk[:, ::-1, ::-1]), None, keep=False)

    def backward(self, gy, x, need_x, need_w):
        kh, kw = self.kernel
        dx = self._dx_as_conv(gy) if need_x else None
        scatter_dx = need_x and dx is None  # otherwise dX is done: the loop below only forms dW
        xb = (self.xb if self.xb is not None else self._input_buffer(x)) if need_w else None
        dw = np.zeros((self.c, kh, kw), dtype=gy.dtype) if need_w else None
        dxb = np.zeros((self.c, self.rows, self.wb), dtype=gy.dtype) if scatter_dx else None
        for o0, bb, c0, width in (self.blocks if need_w or scatter_dx else ()):
            g = np.zeros((self.c, self.n, self.orows, bb), dtype=gy.dtype)  # the block's gradient on the grid
            g[:, :, :self.out[0]] = gy[..., o0:o0 + bb].swapaxes(0, 1)
            g = g.reshape(self.c, -1, bb)
            for i in range(kh):
                if need_w:
                    m = np.matmul(g.swapaxes(1, 2), self._row_view(xb, i, c0, width))  # (C, bb, width)
                    for j in range(kw):
                        rows, cols = self._taps(j, bb)
                        dw[:, i, j] += m[:, cols, rows].sum(axis=1)
                if scatter_dx:
                    self._row_view(dxb, i, c0, width, writeable=True)[...] += np.matmul(
                        g, self.t[:, i, :width, :bb].swapaxes(1, 2))
        if scatter_dx:
            dx = np.ascontiguousarray(self._image_region(dxb).swapaxes(0, 1))
        self.xb = self.t = self.wk = None
        return dx, dw


# ---- dense (and grouped) convolution by im2col + GEMMs --------------------------------------------------------
DW_PER_IMAGE_PIXELS = 1024  # see the module docstring


def _dense_conv(x, w, b, g, kernel, strides, dilations, pb, out):
    """y = conv(x, w) + b by im2col and GEMMs. Returns (y, the im2col matrix (C, *K, N, *O), per_image).

    One GEMM per image writes (N, M, P) directly: best for few groups and large images (the GEMM has a short
    inner dimension there, and the big output needs no transposition). Otherwise one GEMM per group over the
    whole batch, then a transposed copy to (N, M, P)."""
    n, c = x.shape[:2]
    m = w.shape[0]
    p, ck = prod(out), (c // g) * prod(kernel)
    col = _im2col(x, kernel, strides, dilations, pb, out)
    per_image = g == 1 and p >= 256 and n * m * ck <= 4_000_000
    if per_image:
        y = np.matmul(w.reshape(m, ck), col.reshape(ck, n, p).swapaxes(0, 1)).reshape((n, m) + tuple(out))
        if b is not None:
            y += b.reshape((m,) + (1,) * len(out))
    else:
        y = _batch_first(np.matmul(w.reshape(g, m // g, ck), col.reshape(g, ck, n * p)), (n, m) + tuple(out), b)
    return y, col, per_image


# ---- Conv --------------------------------------------------------------------------------------------------
@register("Conv")
class Conv(Op):
    """y[n, m, o] = b[m] + Σ_{c in group(m), k} w[m, c, k] · x[n, c, o·s + k·d − pad_head]."""

    attrs = {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None, "pads": None,
             "strides": None}

    def forward(self, ctx, x, w, b=None):
        n, c = x.shape[:2]
        m = w.shape[0]
        kernel = tuple(w.shape[2:])
        _check_kernel(self, kernel)
        g = int(self.group)
        _check_group(self, c, g, "input channels")
        if w.shape[1] * g != c or m % g:
            raise ModelError(f"Conv node {self.node.name!r}: weight {w.shape} does not fit input {x.shape} "
                             f"with group {g}")
        strides, dilations, pb, pe, out = _conv_geometry(self, x.shape[2:], kernel)
        self.geom = kernel, strides, dilations, pb, out
        self.x_shape, self.w, self.has_bias = x.shape, w, b is not None
        cg, mg, p = c // g, m // g, prod(out)
        self.pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pb) and not any(pe)
        # dW's input (dX needs only w and dY): a reference, dropped below where the im2col matrix or the banded
        # path's padded copy is kept instead (holding both would keep the input twice). A fake-quantized input
        # is kept as its grid codes (a byte per value), and then in place of either: backward rebuilds them.
        self.x = keep_compact(ctx, x) if self.needs_grad[1] else None
        compact = isinstance(self.x, GridCodes)
        if self.pointwise:  # 1x1: a plain (batched) matmul, no im2col
            y = np.matmul(w.reshape(g, mg, cg), x.reshape(n, g, cg, p)).reshape((n, m) + tuple(out))
            if b is not None:
                y += b.reshape((m,) + (1,) * len(out))
            return y
        keep = self.needs_grad[1] and ctx.training and not compact  # else backward rebuilds what dW needs
        self.banded = None
        if _Banded.applies(kernel, cg, mg):
            self.banded = _Banded(x.shape, kernel, strides, dilations, pb, out)
            y = self.banded.forward(x, w, b, keep)
            if keep:  # the padded input buffer is kept: backward reads it, not x
                self.x = None
            return y
        y, col, self.per_image = _dense_conv(x, w, b, g, kernel, strides, dilations, pb, out)
        # dW needs the im2col matrix; keeping it costs prod(kernel) / prod(strides) times the input (9x for a
        # 3x3 conv, 12x for ResNet's 7x7 stride-2 stem: half of ResNet18's training memory), rebuilding it is one
        # strided copy in backward. Kept only when it is at most KEEP_COL_FACTOR times the input.
        self.col = col if keep and col.nbytes <= KEEP_COL_FACTOR * x.nbytes else None
        if self.col is not None:
            self.x = None
        return y

    def backward(self, gy):
        kernel, strides, dilations, pb, out = self.geom
        w, g = self.w, int(self.group)
        n, c = self.x_shape[:2]
        m = w.shape[0]
        cg, mg, p, ck = c // g, m // g, prod(out), (c // g) * prod(kernel)
        dx = dw = db = None
        if self.has_bias and self.needs_grad[2]:
            db = gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))
        if self.pointwise:
            gm = gy.reshape(n, g, mg, p)
            if self.needs_grad[1]:
                if mg * cg <= p * (mg + cg):
                    # per-image GEMMs summed over the batch: no transposed copies of g or x
                    dw = np.matmul(gm, expanded(self.x).reshape(n, g, cg, p).swapaxes(2, 3)).sum(axis=0)
                else:  # a big weight (e.g. 320 -> 1280 at 7x7): N partial products would not fit; one GEMM
                    dw = np.matmul(_channels_first(gy, g), _channels_first(expanded(self.x), g).swapaxes(1, 2))
                dw = dw.reshape(w.shape)
            if self.needs_grad[0]:
                dx = np.matmul(w.reshape(g, mg, cg).transpose(0, 2, 1), gm).reshape(self.x_shape)
            self.x = None
            return dx, dw, db
        if self.banded is not None:
            dx, dw = self.banded.backward(gy, expanded(self.x), self.needs_grad[0], self.needs_grad[1])
            self.banded = self.x = None
            return dx, (None if dw is None else dw.reshape(w.shape)), db
        if self.needs_grad[1]:
            col = self.col if self.col is not None else _im2col(expanded(self.x), kernel, strides, dilations, pb, out)
            self.col = None
            if self.per_image and p >= DW_PER_IMAGE_PIXELS:
                # per-image GEMMs summed over the batch: no transposed copy of g
                colv = col.reshape(ck, n, p).swapaxes(0, 1)  # (N, C*K, P) view
                dw = np.matmul(gy.reshape(n, m, p), colv.swapaxes(1, 2)).sum(axis=0)
            else:  # one GEMM per group over the whole batch (col is already (G, Cg*K, N*P))
                dw = np.matmul(_channels_first(gy, g), col.reshape(g, ck, -1).transpose(0, 2, 1))
            dw = dw.reshape(w.shape)
            del col  # before dX: the two big matrices are never alive together
        if self.needs_grad[0]:
            if cg == 1 and mg == 1:
                dx = self._depthwise_dx(gy)
            elif all(s == 1 for s in strides) and m * prod(self.x_shape[2:]) <= c * p:
                # (its im2col of dY is M*K*N*P_in, dcol's is C*K*N*P_out: a "valid" conv that shrinks its
                # input, or one that widens the channels, keeps the dcol path: LeNet's 5x5 20->50 at 12x12,
                # a conv of dY would gather a matrix 5.6 times dcol's, and took 49 against 14 ms)
                dx = self._dx_as_conv(gy)
            else:
                g2 = _channels_first(gy, g)  # (G, Mg, N*P)
                dcol = np.matmul(w.reshape(g, mg, ck).transpose(0, 2, 1), g2)  # (G, Cg*K, N*P)
                del g2
                dx = _col2im(dcol.reshape((c,) + kernel + (n,) + tuple(out)), self.x_shape, kernel, strides,
                             dilations, pb, out)
        self.col = self.x = None
        return dx, dw, db

    def _dx_as_conv(self, gy):
        """dX of a stride-1 conv is a conv too: dY correlated with the flipped, transposed kernel (group g:
        (M, Cg, *K) -> (C, Mg, *K)), head padding d(k-1) - pad (negative crops). One im2col and a GEMM with the
        forward's inner dimension, where dcol = Wᵀ @ dY has an inner dimension of only Mg and writes a K times
        larger matrix that col2im then scatters (64 channels at 56x56, batch 32, 2 threads: 81 against 139 ms)."""
        kernel, strides, dilations, pb, out = self.geom
        w, g = self.w, int(self.group)
        m, cg = w.shape[:2]
        flip = (slice(None), slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)
        wt = np.ascontiguousarray(w.reshape((g, m // g, cg) + kernel).swapaxes(1, 2)[flip])
        wt = wt.reshape((g * cg, m // g) + kernel)
        pads = [d * (k - 1) - p for k, d, p in zip(kernel, dilations, pb)]
        dx, _, _ = _dense_conv(gy, wt, None, g, kernel, strides, dilations, pads, list(self.x_shape[2:]))
        return dx

    def _depthwise_dx(self, gy):
        """dX of a depthwise conv tap by tap: dx[n, c, o*s + k*d - pb] += gy[n, c, o] * w[c, k]."""
        kernel, strides, dilations, pb, out = self.geom
        spatial = self.x_shape[2:]
        lo, sizes, need = _buffer_geometry(spatial, kernel, strides, dilations, pb, out)
        buf = np.zeros(self.x_shape[:2] + tuple(sizes), dtype=gy.dtype)
        c = self.x_shape[1]
        wt = self.w.reshape((c, prod(kernel)) + (1,) * len(kernel))
        tmp = np.empty_like(gy)
        for t, k in enumerate(product(*(range(kk) for kk in kernel))):
            np.multiply(gy, wt[:, t], out=tmp)
            buf[(slice(None), slice(None)) + _tap_slices(k, strides, dilations, pb, out, lo)] += tmp
        return _unpad(buf, lo, spatial) if need else buf


# ---- ConvTranspose -----------------------------------------------------------------------------------------
@register("ConvTranspose")
class ConvTranspose(Op):
    """The adjoint of Conv: y[n, m, i·s + k·d − pad_head] += Σ_c x[n, c, i] · w[c, m, k], plus b[m].

    Output size: output_shape when given (pads then follow from it), in·s for auto_pad SAME_*, else
    s·(in−1) + output_padding + (k−1)·d + 1 − pad_head − pad_tail.
    """

    attrs = {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None, "output_padding": None,
             "output_shape": None, "pads": None, "strides": None}

    def _geometry(self, spatial, kernel):
        n = len(spatial)
        strides = _ints(self.strides, n, 1)
        dilations = _ints(self.dilations, n, 1)
        adj = _ints(self.output_padding, n, 0)
        auto_pad = self.auto_pad.decode() if isinstance(self.auto_pad, bytes) else self.auto_pad
        pads = _ints(self.pads, 2 * n, 0)
        pb, pe = pads[:n], pads[n:]
        if self.output_shape is not None and len(self.output_shape) > 0:
            out = [int(v) for v in self.output_shape][-n:]
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = [s * st for s, st in zip(spatial, strides)]
        else:
            if auto_pad == "VALID":
                pb, pe = [0] * n, [0] * n
            out = [st * (s - 1) + a + (k - 1) * d + 1 - b - e
                   for s, st, a, k, d, b, e in zip(spatial, strides, adj, kernel, dilations, pb, pe)]
            return strides, dilations, pb, out
        # total padding from the requested output size (onnxruntime: never negative); an odd total puts the
        # extra pixel at the tail for SAME_UPPER and at the head otherwise (the spec's rule)
        pb = []
        for s, st, a, k, d, o in zip(spatial, strides, adj, kernel, dilations, out):
            total = max(0, st * (s - 1) + a + (k - 1) * d + 1 - o)
            pb.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        return strides, dilations, pb, out

    def forward(self, ctx, x, w, b=None):
        n, c = x.shape[:2]
        g = int(self.group)
        _check_group(self, c, g, "input channels")
        if w.shape[0] != c:
            raise ModelError(f"ConvTranspose node {self.node.name!r}: weight {w.shape} does not fit input {x.shape}")
        kernel = tuple(w.shape[2:])
        _check_kernel(self, kernel)
        mg = w.shape[1]
        m, cg, kp = mg * g, c // g, prod(kernel)
        strides, dilations, pb, out = self._geometry(x.shape[2:], kernel)
        if any(o <= 0 for o in out):
            raise ModelError(f"ConvTranspose node {self.node.name!r}: output size {out} is not positive")
        self.geom = kernel, strides, dilations, pb, tuple(x.shape[2:])
        self.x_shape, self.w, self.has_bias = x.shape, w, b is not None
        xm = _channels_first(x, g)  # (G, Cg, N*P_in)
        self.xm = xm if self.needs_grad[1] else None
        dcol = np.matmul(w.reshape(g, cg, mg * kp).transpose(0, 2, 1), xm)  # (G, Mg*K, N*P_in)
        y = _col2im(dcol.reshape((m,) + kernel + (n,) + tuple(x.shape[2:])), (n, m) + tuple(out), kernel,
                    strides, dilations, pb, x.shape[2:])
        if b is not None:
            y += b.reshape((m,) + (1,) * len(out))
        return y

    def backward(self, gy):
        kernel, strides, dilations, pb, insp = self.geom
        w, g = self.w, int(self.group)
        n, c = self.x_shape[:2]
        mg = w.shape[1]
        m, cg, kp = mg * g, c // g, prod(kernel)
        dx = dw = db = None
        if self.has_bias and self.needs_grad[2]:
            db = gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))
        if self.needs_grad[0] or self.needs_grad[1]:
            colg = _im2col(gy, kernel, strides, dilations, pb, insp).reshape(g, mg * kp, -1)  # (G, Mg*K, N*P_in)
            if self.needs_grad[1]:
                dw = np.matmul(self.xm, colg.transpose(0, 2, 1)).reshape(w.shape)
            if self.needs_grad[0]:
                dx = _batch_first(np.matmul(w.reshape(g, cg, mg * kp), colg), self.x_shape)
        self.xm = None
        return dx, dw, db
