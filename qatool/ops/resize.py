"""Resize (opset 10 through 19+) and Upsample (opset 7-9).

Every supported mode is separable: along each resized axis, output position p reads a few input positions
("taps") with weights — one tap for nearest, two for linear, four for cubic. The forward pass applies the taps
axis by axis (a gather per tap, or a strided view when the tap indices are regular, plus a multiply-add); the
backward pass applies the TRANSPOSED taps, built once per shape: for each input position, the output positions
that read it and their weights. So the gradient is also a few gathers (no np.add.at, no reduction over tiny
axes, which numpy does slowly), e.g. a nearest 2x upsample's gradient is two strided slices added per axis.

Coordinates are computed as onnxruntime does, in float32 (this decides the ties of nearest rounding), with
onnxruntime's output-size rules (floor(float32(scale) * in) for scales, float32(out) / float32(in) for sizes).
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import Op, normalize_axis, register

_F32 = np.float32
_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "asymmetric", "align_corners", "pytorch_half_pixel",
                "tf_half_pixel_for_nn")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _original_coords(mode: str, n_out: int, n_in: int, scale: float) -> np.ndarray:
    """x_original for x_resized = 0..n_out-1, in float32 like onnxruntime."""
    xr = np.arange(n_out, dtype=_F32)
    s = _F32(scale)
    if mode == "half_pixel":
        return (xr + _F32(0.5)) / s - _F32(0.5)
    if mode == "asymmetric":
        return xr / s
    if mode == "pytorch_half_pixel":
        return (xr + _F32(0.5)) / s - _F32(0.5) if n_out > 1 else np.zeros(n_out, _F32)
    if mode == "align_corners":
        if n_out == 1:
            return np.zeros(1, _F32)
        return xr * _F32(n_in - 1) / _F32(n_out - 1)
    if mode == "tf_half_pixel_for_nn":
        return (xr + _F32(0.5)) / s
    if mode == "half_pixel_symmetric":
        adjustment = _F32(n_out) / (s * _F32(n_in))
        offset = _F32(n_in) / _F32(2) * (_F32(1) - adjustment)
        return (np.float64(offset) + (xr.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(_F32)
    raise ModelError(f"Resize: coordinate_transformation_mode {mode!r} is not supported; "
                     f"supported: {', '.join(_COORD_MODES)}")


def _round_half_away(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def _nearest_index(x: np.ndarray, mode: str, downsample: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        x64 = x.astype(np.float64)
        r = np.where(x64 == np.trunc(x64) + 0.5, np.floor(x64), _round_half_away(x64))
    elif mode == "round_prefer_ceil":
        r = _round_half_away(x)
    elif mode == "floor":
        r = np.floor(x)
    elif mode == "ceil":
        r = np.ceil(x)
    elif mode == "simple":  # Upsample and Resize-10: ceil when downsampling, truncation otherwise
        r = np.ceil(x) if downsample else np.trunc(x)
    else:
        raise ModelError(f"Resize: nearest_mode {mode!r} is not supported; supported: {', '.join(_NEAREST_MODES[:4])}")
    return r.astype(np.int64)


def _cubic_coeffs(s: np.ndarray, a: float) -> np.ndarray:
    """The 4 cubic convolution weights for taps at offsets -1, 0, 1, 2 (shape (4, n))."""
    a = np.float64(a)
    s = s.astype(np.float64)
    t = [s + 1, s, 1 - s, 2 - s]
    out = []
    for i, d in enumerate(t):
        if i in (1, 2):  # |d| <= 1
            out.append(((a + 2) * d - (a + 3)) * d * d + 1)
        else:  # 1 < |d| < 2
            out.append(((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
    return np.stack(out)


def _axis_taps(mode, coord_mode, nearest_mode, n_in, n_out, scale, cubic_a, exclude_outside):
    """Forward taps of one axis: list of (indices (n_out,) int64, weights (n_out,) float64 or None)."""
    x = _original_coords(coord_mode, n_out, n_in, scale)
    if mode == "nearest":
        idx = np.clip(_nearest_index(x, nearest_mode, scale < 1), 0, n_in - 1)
        return [(idx, None)]
    if mode == "linear":
        xc = np.clip(x, _F32(0), _F32(n_in - 1))
        i0 = np.floor(xc).astype(np.int64)
        w1 = (xc - i0.astype(_F32)).astype(np.float64)
        return [(i0, 1.0 - w1), (np.minimum(i0 + 1, n_in - 1), w1)]
    if mode == "cubic":
        i0 = np.floor(x).astype(np.int64)
        w = _cubic_coeffs(x - i0.astype(_F32), cubic_a)
        idx = [i0 + k for k in (-1, 0, 1, 2)]
        if exclude_outside:
            inside = np.stack([(i >= 0) & (i < n_in) for i in idx])
            w = np.where(inside, w, 0.0)
            w = w / w.sum(axis=0, keepdims=True)
        return [(np.clip(i, 0, n_in - 1), w[k]) for k, i in enumerate(idx)]
    raise ModelError(f"Resize: mode {mode!r} is not supported; supported: nearest, linear, cubic")


def _simplify(taps):
    """Merge taps with equal index arrays, drop all-zero taps, mark all-one weights as None."""
    merged: list[list] = []
    for idx, w in taps:
        w = None if w is None else np.asarray(w, np.float64)
        if w is not None and not np.any(w):
            continue
        for m in merged:
            if np.array_equal(m[0], idx):
                m[1] = (np.ones(len(idx)) if m[1] is None else m[1]) + (1.0 if w is None else w)
                break
        else:
            merged.append([idx, w])
    out = []
    for idx, w in merged:
        if w is not None and np.all(w == 1.0):
            w = None
        out.append((idx, w))
    return out


def _as_selector(idx: np.ndarray):
    """A slice when the indices are a regular increasing progression (a view, no copy), else the array."""
    n = len(idx)
    if n == 1:
        return slice(int(idx[0]), int(idx[0]) + 1)
    step = int(idx[1] - idx[0])
    if step >= 1 and np.array_equal(idx, idx[0] + step * np.arange(n)):
        return slice(int(idx[0]), int(idx[-1]) + 1, step)
    return idx


def _transpose_taps(taps, n_in, n_out):
    """For each input position, the output positions reading it and their weights, as taps over n_in."""
    pos, tgt, wts = [], [], []
    for idx, w in taps:
        pos.append(np.arange(n_out))
        tgt.append(idx)
        wts.append(np.ones(n_out) if w is None else w)
    pos, tgt, wts = np.concatenate(pos), np.concatenate(tgt), np.concatenate(wts)
    keep = wts != 0
    pos, tgt, wts = pos[keep], tgt[keep], wts[keep]
    order = np.lexsort((pos, tgt))
    pos, tgt, wts = pos[order], tgt[order], wts[order]
    counts = np.bincount(tgt, minlength=n_in)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(tgt)) - starts[tgt]
    t = int(counts.max()) if len(tgt) else 0
    out = []
    for r in range(t):
        sel = rank == r
        p = np.zeros(n_in, np.int64)
        w = np.zeros(n_in)
        p[tgt[sel]] = pos[sel]  # inputs without an r-th reader keep position 0 with weight 0
        w[tgt[sel]] = wts[sel]
        out.append((p, w))
    return _simplify(out)


class _AxisPlan:
    __slots__ = ("axis", "n_in", "n_out", "fwd", "taps", "_bwd")

    def __init__(self, axis, n_in, n_out, taps):
        self.axis, self.n_in, self.n_out, self.taps = axis, n_in, n_out, taps
        self.fwd = [(_as_selector(i), w) for i, w in taps]
        self._bwd = None

    @property
    def bwd(self):
        if self._bwd is None:
            self._bwd = [(_as_selector(i), w) for i, w in _transpose_taps(self.taps, self.n_in, self.n_out)]
        return self._bwd


def _apply(x: np.ndarray, axis: int, taps) -> np.ndarray:
    """y[..., p, ...] = sum_t w_t[p] * x[..., sel_t[p], ...] along `axis`."""
    lead = (slice(None),) * axis
    bshape = (-1,) + (1,) * (x.ndim - axis - 1)
    dt = x.dtype
    y = None
    for sel, w in taps:
        # np.take (not x[..., idx]: fancy indexing returns a non-C-ordered array that slows every later op)
        fresh = not isinstance(sel, slice)  # np.take made a copy we may scale in place
        part = np.take(x, sel, axis=axis) if fresh else x[lead + (sel,)]
        if w is not None:
            wb = w.astype(dt).reshape(bshape)
            if fresh:
                part *= wb
            else:
                part = part * wb
            fresh = True
        if y is None:
            y = part if fresh else part.copy()
        else:
            y += part
    return y


def _resize_plan(x_shape, mode, coord_mode, nearest_mode, out_shape, scales, cubic_a=-0.75, exclude_outside=0):
    plans = []
    for axis, (n_in, n_out, s) in enumerate(zip(x_shape, out_shape, scales)):
        if n_out <= 0 or n_in <= 0:
            raise ModelError(f"Resize: output size {n_out} along axis {axis} (input {n_in}) is empty")
        if n_in == n_out:
            # onnxruntime copies an axis whose size does not change, whatever its scale and coordinate mode
            continue
        taps = _simplify(_axis_taps(mode, coord_mode, nearest_mode, n_in, n_out, s, cubic_a, exclude_outside))
        plans.append(_AxisPlan(axis, n_in, n_out, taps))
    # gather along the axes that shrink first, so that every later pass works on the smaller tensor
    plans.sort(key=lambda p: p.n_out / p.n_in)
    return plans


class _ResizeBase(Op):
    """Shared forward/backward: subclasses produce (mode, coord_mode, nearest_mode, out_shape, scales)."""

    def _config(self, x, inputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, ctx, x, *rest):
        mode, coord_mode, nearest_mode, out_shape, scales = self._config(x, rest)
        if mode != "nearest" and not np.issubdtype(x.dtype, np.floating):
            raise ModelError(f"{self.op_type} node {self.node.name!r}: mode {mode!r} of a {x.dtype} tensor is not "
                             "supported (float tensors only)")
        key = (x.shape, mode, coord_mode, nearest_mode, tuple(out_shape), tuple(float(s) for s in scales))
        cache = self.__dict__.setdefault("_plans", {})
        plans = cache.get(key)
        if plans is None:
            plans = _resize_plan(x.shape, mode, coord_mode, nearest_mode, out_shape, scales,
                                 float(getattr(self, "cubic_coeff_a", -0.75)),
                                 int(getattr(self, "exclude_outside", 0)))
            cache[key] = plans
        self.plans, self.x_shape = plans, x.shape
        y = x
        for p in plans:
            y = _apply(y, p.axis, p.fwd)
        return y

    def backward(self, g):
        for p in reversed(self.plans):
            g = _apply(g, p.axis, p.bwd)
        return (g,) + (None,) * (len(self.needs_grad) - 1)


def _out_from_scales(x_shape, scales):
    scales = [_F32(s) for s in scales]
    return [int(s * _F32(n)) for s, n in zip(scales, x_shape)], scales


@register("Resize")
class Resize(_ResizeBase):
    """Resize: inputs (X, scales) at opset 10, (X, roi, scales, sizes) from 11 on.

    Modes nearest / linear / cubic (N-D, separable), coordinate_transformation_mode half_pixel,
    half_pixel_symmetric (19), asymmetric, align_corners, pytorch_half_pixel, tf_half_pixel_for_nn; nearest_mode
    round_prefer_floor / round_prefer_ceil / floor / ceil; opset 18's axes and keep_aspect_ratio_policy. roi is
    ignored (it only matters for tf_crop_and_resize, which is not supported); antialias=1 is not supported.
    Opset 10 behaves as onnxruntime's Resize-10: asymmetric coordinates and Upsample's nearest rounding.
    """

    attrs = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor",
             "cubic_coeff_a": -0.75, "exclude_outside": 0, "extrapolation_value": 0.0, "antialias": 0, "axes": None,
             "keep_aspect_ratio_policy": "stretch"}

    def _config(self, x, inputs):
        mode = _str(self.mode)
        where = f"Resize node {self.node.name!r}"
        if self.opset < 11:
            scales_in, sizes_in = (inputs[0] if inputs else None), None
            coord_mode, nearest_mode = "asymmetric", "simple"
        else:
            roi, scales_in, sizes_in = (list(inputs) + [None] * 3)[:3]
            coord_mode = _str(self.coordinate_transformation_mode)
            nearest_mode = _str(self.nearest_mode)
        if coord_mode == "tf_crop_and_resize":
            raise ModelError(f"{where}: coordinate_transformation_mode 'tf_crop_and_resize' (roi crops) is not "
                             "supported by the engine")
        if self.opset >= 18 and self.antialias:
            raise ModelError(f"{where}: antialias=1 is not supported by the engine")
        rank = x.ndim
        axes = list(range(rank))
        if self.opset >= 18 and self.axes is not None and len(self.axes):
            axes = [normalize_axis(int(a), rank) for a in self.axes]
        have_scales = scales_in is not None and np.size(scales_in) > 0
        have_sizes = sizes_in is not None and np.size(sizes_in) > 0
        if have_scales == have_sizes:
            raise ModelError(f"{where}: exactly one of 'scales' and 'sizes' must be given")
        if have_scales:
            vals = np.asarray(scales_in, np.float32).reshape(-1)
            if len(vals) != len(axes):
                raise ModelError(f"{where}: {len(vals)} scales for {len(axes)} axes")
            full = [1.0] * rank
            for a, s in zip(axes, vals):
                if not s > 0:
                    raise ModelError(f"{where}: scales must be positive, got {vals.tolist()}")
                full[a] = s
            out_shape, scales = _out_from_scales(x.shape, full)
        else:
            vals = np.asarray(sizes_in, np.int64).reshape(-1)
            if len(vals) != len(axes):
                raise ModelError(f"{where}: {len(vals)} sizes for {len(axes)} axes")
            out_shape = list(x.shape)
            for a, s in zip(axes, vals):
                out_shape[a] = int(s)
            scales = [_F32(o) / _F32(n) if n else _F32(1) for o, n in zip(out_shape, x.shape)]
            policy = _str(self.keep_aspect_ratio_policy) if self.opset >= 18 else "stretch"
            if policy in ("not_larger", "not_smaller"):
                pick = min if policy == "not_larger" else max
                s_pol = pick(scales[a] for a in axes)
                scales = [s_pol if i in axes else _F32(1) for i in range(rank)]
                out_shape = [int(_round_half_away(np.asarray(s_pol * _F32(n)))) if i in axes else n
                             for i, n in enumerate(x.shape)]
            elif policy != "stretch":
                raise ModelError(f"{where}: keep_aspect_ratio_policy {policy!r} is not supported")
        return mode, coord_mode, nearest_mode, out_shape, scales


@register("Upsample")
class Upsample(_ResizeBase):
    """Upsample (deprecated at opset 10): scales as an attribute (opset 7) or an input (opset 9); nearest or
    linear, asymmetric coordinates, onnxruntime's nearest rounding (truncation; ceil on a shrinking axis)."""

    attrs = {"mode": "nearest", "scales": None}

    def _config(self, x, inputs):
        scales_in = inputs[0] if inputs and inputs[0] is not None else self.scales
        if scales_in is None:
            raise ModelError(f"Upsample node {self.node.name!r} has no scales")
        vals = np.asarray(scales_in, np.float32).reshape(-1)
        if len(vals) != x.ndim:
            raise ModelError(f"Upsample node {self.node.name!r}: {len(vals)} scales for a rank-{x.ndim} input")
        out_shape, scales = _out_from_scales(x.shape, vals)
        mode = _str(self.mode)
        if mode == "bilinear":  # opset <= 6 spelling
            mode = "linear"
        return mode, "asymmetric", "simple", out_shape, scales
