"""Quantization grids and the maths of scales and zero points.

Every function here is shared by the training-time simulation and the int8 export, so that both compute the
same float32 values bit for bit (the numerics contract in the design notes).

- Weights: symmetric, signed, zero point 0, narrow range [-(2^(b-1)-1), 2^(b-1)-1], per output channel;
  scale = max|w_c| / qmax (at <= 4 bits: the clipped scale of least squared error, `clip_search`).
- Activations: asymmetric unsigned [0, 2^b-1] with the range stretched to contain 0, or symmetric signed
  [-2^(b-1), 2^(b-1)-1] with zero point 0.
- Bias: int32, scale = s_input * s_weight[c], zero point 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The smallest scale used: an all-zero tensor still gets a valid, finite grid (PyTorch uses the same floor).
MIN_SCALE = np.float32(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Grid:
    """An integer grid [qmin, qmax] and the integer type that stores it."""

    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def storage(self) -> np.dtype:
        if self.qmax > 255 or self.qmin < -128:
            return np.dtype(np.int32)
        return np.dtype(np.int8) if self.signed else np.dtype(np.uint8)


# Weights at 3 and 4 bits use the full signed range [-2^(b-1), 2^(b-1)-1] (as onnxruntime's int4): the one extra
# level on the negative side is worth having when there are only 15. Measured post-training at W4A8 with the
# error-chosen scales below (test split of docs/benchmarks.md section 4): PaddleOCR text direction 87.8 -> 91.6 %
# (onnxruntime quantize_static int4: 91.0), PP-LCNet orientation 85.0 -> 89.25 % (onnxruntime: 80.0); after
# QAT the sample MobileNet W4A4 rows stay within their seed noise. Scales stay max|w| / qmax (qmax = 2^(b-1)-1),
# so the extra level only ever holds clipped negative weights. At 8 bits the narrow range is kept (what
# onnxruntime's per-channel int8 weights use, and the -128 level buys nothing there); at 2 bits the grid stays
# ternary {-1, 0, 1}.
FULL_RANGE_WEIGHT_BITS = (3, 4)


def weight_grid(bits: int) -> Grid:
    """Symmetric: narrow range [-(2^(b-1)-1), 2^(b-1)-1], or full range [-2^(b-1), 2^(b-1)-1] at 3-4 bits."""
    q = 2 ** (bits - 1) - 1
    return Grid(-q - 1 if bits in FULL_RANGE_WEIGHT_BITS else -q, q)


def activation_grid(bits: int, symmetric: bool) -> Grid:
    if symmetric:
        return Grid(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return Grid(0, 2**bits - 1)


BIAS_GRID = Grid(-(2**31), 2**31 - 1)


def activation_qparams(lo: float, hi: float, grid: Grid, addend: float = 0.0) -> tuple[np.float32, int]:
    """(scale, zero point) for a float range [lo, hi]; the range is first stretched to contain 0. `addend`: the
    constant an Add adds before this quantizer (`off_tie`)."""
    lo32, hi32 = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    if grid.signed:  # symmetric: zero point 0
        scale = np.maximum(np.maximum(-lo32, hi32) / np.float32(grid.qmax), MIN_SCALE)
        return off_tie(np.float32(scale), addend), 0
    scale = off_tie(np.float32(np.maximum((hi32 - lo32) / np.float32(grid.qmax - grid.qmin), MIN_SCALE)), addend)
    zp = int(np.clip(grid.qmin - np.rint(lo32 / scale), grid.qmin, grid.qmax))
    return scale, zp


# onnxruntime's QLinearAdd computes in fixed point (MLAS: integer multipliers of the scale ratios, a rounding
# shift), the simulation in float; the two round alike except at ties. An Add of a constant c hits a tie for
# every input at its zero point when c / scale lies half-way between two levels, and the common ranges make
# that systematic: Paddle's hard-swish adds 3 and clips to [0, 6] (3 / (6 / 255) = 127.5), a HardSigmoid adds
# 0.5 and clips to [0, 1]. Measured on PaddleOCR's text-direction model: 5 % of such an Add's outputs one step
# apart, top-1 agreement 0.996; with the scale moved off the tie, 1.000.
TIE_MARGIN = 0.05


def off_tie(scale: np.float32, addend: float) -> np.float32:
    """The scale, narrowed just enough that addend / scale is a quarter step from a level rather than near half
    of one. Narrowed, not widened: the range shrinks by about half a step at its ends, so a Clip the range
    was taken after (hard-swish's [0, 6]) stays redundant and the Add still fuses."""
    t = abs(float(addend)) / float(scale)
    if t < 1.0 or abs(t - np.floor(t) - 0.5) >= TIE_MARGIN:
        return scale
    return np.float32(abs(float(addend)) / (np.floor(t) + 0.75))


# At <= 4 bits (qmax <= 7) the weight scale is chosen per channel by error: of the scales max|w| / qmax * r for
# these r, the one whose fake-quantized weights are closest to the weights (least squared error). Measured on the
# PaddleOCR text-direction classifier at W4A8 (post-training, same placement, 500 val images): KL to the float
# model 0.43 with max|w| / qmax, 0.30 with this search; top-1 0.844 -> 0.868 (onnxruntime's int4 quantize_static:
# 0.920 on the same images; its KL is not comparable, it quantizes the Softmax output). Top-1 of a 4-bit start
# swings by points with small changes of the scales (a fixed 0.97 x max gave 0.936, 0.9 x gave 0.902), so the
# smooth measure chose. At 8 bits max|w| / qmax is kept: the rounding error is small there.
CLIP_RATIOS = np.linspace(1.0, 0.5, 11, dtype=np.float32)
SEARCH_MAX_QMAX = 7


def channel_axes(axis: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The axes that index a weight's channels: one output-channel axis, or several (an LSTM's [D, 4H, K] weight
    has a channel per direction and gate row, axes (0, 1))."""
    return (int(axis),) if np.ndim(axis) == 0 else tuple(int(a) for a in axis)


def weight_scales(w: np.ndarray, axis: int | tuple[int, ...] | None, grid: Grid) -> np.ndarray:
    """Per-channel (along `axis`, or each combination of several `axis`) or per-tensor (axis None) symmetric
    scales, float32: max|w| / qmax, or at <= 4 bits the clipped scale of least squared error (`clip_search`). A
    deterministic function of `w`, so the simulation (every step) and the export compute the same scales from the
    same weights."""
    if axis is None:
        m = np.abs(w).max(initial=0.0)
    else:
        axes = channel_axes(axis)
        other = tuple(i for i in range(w.ndim) if i not in axes)
        m = np.abs(w).max(axis=other, initial=0.0) if other else np.abs(w)
    scale = np.maximum(np.asarray(m, np.float32) / np.float32(grid.qmax), MIN_SCALE).astype(np.float32)
    if grid.qmax > SEARCH_MAX_QMAX:
        return scale
    if axis is None:
        rows = w.reshape(1, -1)
    else:
        rows = np.moveaxis(w, axes, tuple(range(len(axes)))).reshape(scale.size, -1)
    return clip_search(rows.astype(np.float32, copy=False), scale.reshape(-1), grid).reshape(scale.shape)


def clip_search(rows: np.ndarray, scale: np.ndarray, grid: Grid) -> np.ndarray:
    """For each row of `rows` (one channel's weights) the scale among scale * CLIP_RATIOS that gives the least
    sum of squared fake-quantization errors (ties: the larger scale, i.e. less clipping)."""
    best, best_err = scale, None
    for r in CLIP_RATIOS:
        s = np.maximum(scale * r, MIN_SCALE)[:, None]
        q = np.divide(rows, s)
        np.rint(q, out=q)
        np.clip(q, grid.qmin, grid.qmax, out=q)
        q *= s
        q -= rows
        err = np.einsum("ck,ck->c", q, q)
        if best_err is None:
            best, best_err = s[:, 0].copy(), err
        else:
            better = err < best_err
            best = np.where(better, s[:, 0], best)
            best_err = np.where(better, err, best_err)
    return best.astype(np.float32)


def bias_integers(bias: np.ndarray, s_in, s_w) -> tuple[np.ndarray, np.ndarray]:
    """The int32 bias of a quantized layer and its scale s_input * s_weight[c] (float32, in the bias's shape)."""
    scale = np.broadcast_to(np.asarray(s_in * s_w).astype(np.float32), bias.shape).copy()
    return quantize(bias, scale, 0, BIAS_GRID, 0), scale


def activation_range(node, values: dict) -> tuple[float, float]:
    """[lo, hi] of a Relu, or of a Clip whose bounds (inputs 1 and 2) are in `values` (omitted: unbounded)."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    lo = float(np.asarray(values[node.input(1)]).reshape(())) if node.input(1) else -np.inf
    hi = float(np.asarray(values[node.input(2)]).reshape(())) if node.input(2) else np.inf
    return lo, hi


def grid_inside(grid: Grid, scale, zero_point, lo_act: float, hi_act: float) -> bool:
    """Whether the float range of a quantizer's grid lies inside [lo_act, hi_act] to within half a step: then
    quantizing x and quantizing clip(x, lo_act, hi_act) give the same integers, and the int8 export drops the
    Relu/Clip (the half step absorbs float rounding of the scale: 255 * float32(6/255) is a hair above 6)."""
    s, z = float(scale), float(zero_point)
    lo, hi = (grid.qmin - z) * s, (grid.qmax - z) * s
    return lo > lo_act - s / 2 and hi < hi_act + s / 2


def channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def quantize(x: np.ndarray, scale, zero_point, grid: Grid, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Integers exactly as ONNX QuantizeLinear computes them: saturate(round_half_even(x / scale) + zp)."""
    s, z = _broadcast(scale, zero_point, x.ndim, axis)
    q = np.rint(x / s) + z
    # in float64: the int32 grid's qmax, 2^31 - 1, is 2^31 in float32, which the cast would wrap to -2^31
    return np.clip(q.astype(np.float64), grid.qmin, grid.qmax).astype(grid.storage)


def _broadcast(scale, zero_point, ndim: int, axis: int | tuple[int, ...] | None):
    s = np.asarray(scale, np.float32)
    z = np.asarray(zero_point, np.float32)
    if axis is None:
        return s, z
    axes = channel_axes(axis)
    if s.ndim == len(axes) and s.ndim < ndim:
        other = tuple(i for i in range(ndim) if i not in axes)
        s = np.expand_dims(s, other)
        z = np.expand_dims(z, other) if z.ndim == len(axes) else z
    return s, z


def fake_quant(x: np.ndarray, scale, zero_point, grid: Grid, axis: int | tuple[int, ...] | None = None,
               want_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantize then dequantize: ((clip(rint(x / s) + z) - z) * s), and the straight-through mask.

    The mask is True where rint(x / s) + z lies inside [qmin, qmax]: there the gradient passes unchanged; outside
    (where the value was clipped) it is zero. Computed in place in one new buffer (the input is never written).
    The zero point moves onto the clip bounds instead: clip(q + z, qmin, qmax) - z = clip(q, qmin - z, qmax - z)
    exactly for the integer-valued q (two passes fewer over the tensor).
    """
    s, z = _broadcast(scale, zero_point, x.ndim, axis)
    dtype = x.dtype
    s = s.astype(dtype, copy=False)
    buf = np.divide(x, s)
    np.rint(buf, out=buf)
    z = z.astype(dtype, copy=False)
    lo, hi = dtype.type(grid.qmin) - z, dtype.type(grid.qmax) - z
    mask = None
    if want_mask:
        mask = buf >= lo
        mask &= buf <= hi
    np.clip(buf, lo, hi, out=buf)
    buf *= s
    return buf, mask


def lsq_fake_quant(x: np.ndarray, scale, zero_point, grid: Grid, axis: int | tuple[int, ...] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fake quantization with a learned step size (LSQ, Esser et al. 2020): returns (y, mask, dy_ds).

    y and mask as `fake_quant`. dy_ds is the elementwise derivative of y with respect to the scale:
    rint(x/s) - x/s where x/s + z lies inside the grid, and (qmin - z) or (qmax - z) where it was clipped.
    """
    s, z = _broadcast(scale, zero_point, x.ndim, axis)
    dtype = x.dtype
    s, z = s.astype(dtype, copy=False), z.astype(dtype, copy=False)
    v = x / s
    q = np.rint(v)
    q += z
    below, above = q < grid.qmin, q > grid.qmax
    mask = ~(below | above)
    np.clip(q, grid.qmin, grid.qmax, out=q)
    q -= z
    dy_ds = np.where(mask, q - v, q)  # inside: rint(v) - v; clipped: y / s, i.e. qmin - z or qmax - z
    y = q * s
    return y, mask, dy_ds


def lsq_grad_scale(n_elements: int, grid: Grid) -> float:
    """LSQ's gradient scale for the step size: 1 / sqrt(N * Qp)."""
    return 1.0 / float(np.sqrt(max(n_elements, 1) * max(grid.qmax, 1)))
