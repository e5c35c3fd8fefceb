"""Data-movement ops: reshapes, transposes, slicing, padding, gathers, casts, Where.

Forward returns a view of the input wherever numpy allows (Reshape, Flatten, Transpose, Squeeze, Unsqueeze,
Slice, Split, Identity, Expand, Cast to the same dtype); backward is the matching reshape / transpose /
scatter of the gradient. Shape-like inputs (shape, axes, starts, pads, repeats...) arrive as int64 arrays.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from ..errors import ModelError
from .base import Op, normalize_axis, register, unbroadcast


# ---- private helpers -------------------------------------------------------------------------------------------
def _ints(a) -> list[int]:
    """An int64 array / list / scalar as a list of Python ints (Python ints never overflow on INT64_MAX + dim)."""
    return [int(v) for v in np.asarray(a).reshape(-1)]


def _axis_index(axis: int, index) -> tuple:
    """An index tuple that applies `index` along `axis` and takes everything on the axes before it."""
    return (slice(None),) * axis + (index,)


def _only_first(op: Op, g):
    """Backward result for ops differentiable only w.r.t. input 0: one entry per node input."""
    return (g,) + (None,) * (len(op.node.inputs) - 1)


def _is_float(dt: np.dtype) -> bool:
    dt = np.dtype(dt)
    return dt.kind == "f" or dt.name.startswith(("bfloat16", "float8", "float4"))


def _norm_indices(idx: np.ndarray, dim: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.size and idx.min() < 0:
        idx = np.where(idx < 0, idx + dim, idx)
    return idx


# ---- reshapes ---------------------------------------------------------------------------------------------------
@register("Identity")
class Identity(Op):
    def forward(self, ctx, x):
        return x

    def backward(self, g):
        return (g,)


@register("Flatten")
class Flatten(Op):
    attrs = {"axis": 1}

    def forward(self, ctx, x):
        self.in_shape = x.shape
        axis = normalize_axis(self.axis, x.ndim)
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))

    def backward(self, g):
        return (g.reshape(self.in_shape),)


@register("Reshape")
class Reshape(Op):
    attrs = {"allowzero": 0, "shape": None}  # `shape` is the attribute form of opset < 5

    def forward(self, ctx, x, shape=None):
        if shape is None:
            shape = self.shape
        dims = _ints(shape)
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        self.in_shape = x.shape
        return x.reshape(dims)

    def backward(self, g):
        return _only_first(self, g.reshape(self.in_shape))


@register("Transpose")
class Transpose(Op):
    attrs = {"perm": None}

    def forward(self, ctx, x):
        perm = list(self.perm) if self.perm is not None else list(range(x.ndim))[::-1]
        self.inv = np.argsort(perm)
        return x.transpose(perm)

    def backward(self, g):
        return (g.transpose(self.inv),)


@register("Squeeze")
class Squeeze(Op):
    attrs = {"axes": None}  # attribute before opset 13, input from 13

    def forward(self, ctx, x, axes=None):
        if axes is None:
            axes = self.axes
        self.in_shape = x.shape
        if axes is None or np.size(axes) == 0:
            return np.squeeze(x)
        return np.squeeze(x, axis=tuple(normalize_axis(a, x.ndim) for a in _ints(axes)))

    def backward(self, g):
        return _only_first(self, g.reshape(self.in_shape))


@register("Unsqueeze")
class Unsqueeze(Op):
    attrs = {"axes": None}  # attribute before opset 13, input from 13

    def forward(self, ctx, x, axes=None):
        if axes is None:
            axes = self.axes
        if axes is None:
            raise ModelError(f"Unsqueeze node {self.node.name!r} has no axes")
        self.in_shape = x.shape
        return np.expand_dims(x, tuple(_ints(axes)))

    def backward(self, g):
        return _only_first(self, g.reshape(self.in_shape))


@register("DepthToSpace", "SpaceToDepth")
class DepthToSpace(Op):
    attrs = {"blocksize": None, "mode": "DCR"}

    def forward(self, ctx, x):
        n, c, h, w = x.shape
        b = int(self.blocksize)
        if self.node.op_type == "SpaceToDepth":
            tmp = (n, c, h // b, b, w // b, b)
            perm = (0, 3, 5, 1, 2, 4)
            out = (n, c * b * b, h // b, w // b)
        elif self.mode == "DCR":
            tmp = (n, b, b, c // (b * b), h, w)
            perm = (0, 3, 4, 1, 5, 2)
            out = (n, c // (b * b), h * b, w * b)
        elif self.mode == "CRD":
            tmp = (n, c // (b * b), b, b, h, w)
            perm = (0, 1, 4, 2, 5, 3)
            out = (n, c // (b * b), h * b, w * b)
        else:
            raise ModelError(f"DepthToSpace node {self.node.name!r}: unknown mode {self.mode!r}")
        self.in_shape = x.shape
        self.mid_shape = tuple(tmp[p] for p in perm)
        self.inv = np.argsort(perm)
        return x.reshape(tmp).transpose(perm).reshape(out)

    def backward(self, g):
        return (g.reshape(self.mid_shape).transpose(self.inv).reshape(self.in_shape),)


# ---- joining and splitting -------------------------------------------------------------------------------------
@register("Concat")
class Concat(Op):
    attrs = {"axis": None}

    def forward(self, ctx, *xs):
        axis = normalize_axis(int(self.axis), xs[0].ndim)
        self.ax = axis
        self.bounds = np.cumsum([x.shape[axis] for x in xs])[:-1]
        return np.concatenate(xs, axis=axis)

    def backward(self, g):
        parts = np.split(g, self.bounds, axis=self.ax)
        return tuple(p if need else None for p, need in zip(parts, self.needs_grad))


@register("Split")
class Split(Op):
    attrs = {"axis": 0, "split": None, "num_outputs": None}  # `split` attribute before opset 13

    def forward(self, ctx, x, split=None):
        axis = normalize_axis(self.axis, x.ndim)
        dim = x.shape[axis]
        if split is None:
            split = self.split
        if split is not None and np.size(split) > 0:
            sizes = _ints(split)
        else:
            n = int(self.num_outputs) if self.num_outputs is not None else len(self.node.outputs)
            chunk = -(-dim // n)
            sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
            if sizes[-1] < 0 or (self.num_outputs is None and dim % n):
                raise ModelError(f"Split node {self.node.name!r}: cannot split a dimension of {dim} into {n} parts")
        if sum(sizes) != dim:
            raise ModelError(f"Split node {self.node.name!r}: sizes {sizes} do not add up to the dimension {dim}")
        self.ax, self.sizes, self.in_shape, self.dtype = axis, sizes, x.shape, x.dtype
        offs = np.concatenate([[0], np.cumsum(sizes)])
        return tuple(x[_axis_index(axis, slice(int(a), int(b)))] for a, b in zip(offs[:-1], offs[1:]))

    def backward(self, *gs):
        parts = []
        for g, size in zip(gs, self.sizes):
            if g is None:
                shape = list(self.in_shape)
                shape[self.ax] = size
                g = np.zeros(shape, next((h.dtype for h in gs if h is not None), self.dtype))
            parts.append(g)
        return _only_first(self, np.concatenate(parts, axis=self.ax))


# ---- slicing and padding ---------------------------------------------------------------------------------------
@register("Slice")
class Slice(Op):
    attrs = {"starts": None, "ends": None, "axes": None}  # attribute form before opset 10

    def forward(self, ctx, x, starts=None, ends=None, axes=None, steps=None):
        if starts is None:  # opset < 10
            starts, ends, axes = self.starts, self.ends, self.axes
        starts, ends = _ints(starts), _ints(ends)
        axes = _ints(axes) if axes is not None and np.size(axes) else list(range(len(starts)))
        steps = _ints(steps) if steps is not None and np.size(steps) else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = normalize_axis(a, x.ndim)
            dim = x.shape[a]
            if st == 0:
                raise ModelError(f"Slice node {self.node.name!r}: step 0")
            s = s + dim if s < 0 else s
            e = e + dim if e < 0 else e
            if st > 0:
                s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            else:  # ONNX clamps to [0, dim-1] / [-1, dim-1]; an end of -1 means "past the first element"
                s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
                if dim == 0:
                    s = 0
            index[a] = slice(s, e if e >= 0 else None, st)
        self.index, self.in_shape = tuple(index), x.shape
        return x[self.index]

    def backward(self, g):
        gx = np.zeros(self.in_shape, g.dtype)
        gx[self.index] = g
        return _only_first(self, gx)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


@register("Pad")
class Pad(Op):
    attrs = {"mode": "constant", "pads": None, "value": 0.0}  # pads/value attributes before opset 11

    def forward(self, ctx, x, pads=None, constant_value=None, axes=None):
        if pads is None:  # opset < 11
            pads, cval = self.pads, self.value
        else:
            empty = constant_value is None or np.size(constant_value) == 0
            cval = 0 if empty else np.asarray(constant_value).reshape(-1)[0]
        if self.mode not in _PAD_MODES:
            raise ModelError(f"Pad node {self.node.name!r}: unknown mode {self.mode!r}")
        pads, r = _ints(pads), x.ndim
        ax = [normalize_axis(a, r) for a in _ints(axes)] if axes is not None and np.size(axes) else list(range(r))
        if len(pads) != 2 * len(ax):
            raise ModelError(f"Pad node {self.node.name!r}: {len(pads)} pads for {len(ax)} axes")
        begin, end = [0] * r, [0] * r
        for i, a in enumerate(ax):
            begin[a], end[a] = pads[i], pads[i + len(ax)]
        # Negative pads crop first (as onnxruntime does), then the positive pads are added to the cropped data.
        self.in_shape = x.shape
        self.crop = None
        if any(p < 0 for p in begin + end):
            self.crop = tuple(slice(max(-b, 0), d - max(-e, 0)) for b, e, d in zip(begin, end, x.shape))
            x = x[self.crop]
        self.pb, self.pe = [max(b, 0) for b in begin], [max(e, 0) for e in end]
        self.mid_shape = x.shape
        self.inner = tuple(slice(b, b + d) for b, d in zip(self.pb, x.shape))
        if not any(self.pb) and not any(self.pe):
            return x
        if self.mode == "constant":
            out = np.full([d + b + e for d, b, e in zip(x.shape, self.pb, self.pe)], cval, dtype=x.dtype)
            out[self.inner] = x
            return out
        return np.pad(x, list(zip(self.pb, self.pe)), mode=_PAD_MODES[self.mode])

    def backward(self, g):
        if self.mode == "constant":
            g = g[self.inner]
        else:
            g = self._fold(g)
        if self.crop is not None:
            gx = np.zeros(self.in_shape, g.dtype)
            gx[self.crop] = g
            g = gx
        return _only_first(self, g)

    def _fold(self, g):
        """Sum the gradient of each padded position back into the input position it was copied from."""
        for ax, (b, e, n) in enumerate(zip(self.pb, self.pe, self.mid_shape)):
            if not b and not e:
                continue
            core = g[_axis_index(ax, slice(b, b + n))].copy()
            if self.mode == "edge":
                if b:
                    core[_axis_index(ax, slice(0, 1))] += g[_axis_index(ax, slice(0, b))].sum(ax, keepdims=True)
                if e:
                    core[_axis_index(ax, slice(n - 1, n))] += g[_axis_index(ax, slice(b + n, None))].sum(
                        ax, keepdims=True)
            else:
                src = np.pad(np.arange(n), (b, e), mode=_PAD_MODES[self.mode])
                for pos in (slice(0, b), slice(b + n, b + n + e)):
                    s = src[pos]
                    if s.size == 0:
                        continue
                    part = g[_axis_index(ax, pos)]
                    if np.unique(s).size == s.size:
                        core[_axis_index(ax, s)] += part
                    else:
                        np.add.at(core, _axis_index(ax, s), part)
            g = core
        return g


# ---- broadcasting and repetition -------------------------------------------------------------------------------
@register("Expand")
class Expand(Op):
    def forward(self, ctx, x, shape):
        self.in_shape = x.shape
        # A read-only broadcast view: no copy; consumers compute from it like from any array.
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(shape))))

    def backward(self, g):
        return _only_first(self, unbroadcast(g, self.in_shape))


@register("Tile")
class Tile(Op):
    def forward(self, ctx, x, repeats):
        self.reps, self.in_shape = _ints(repeats), x.shape
        return np.tile(x, self.reps)

    def backward(self, g):
        inter = [v for r, d in zip(self.reps, self.in_shape) for v in (r, d)]
        g = g.reshape(inter).sum(axis=tuple(range(0, 2 * len(self.reps), 2)))
        return _only_first(self, g)


# ---- gathers ---------------------------------------------------------------------------------------------------
@register("Gather")
class Gather(Op):
    attrs = {"axis": 0}

    def forward(self, ctx, x, indices):
        axis = normalize_axis(self.axis, x.ndim)
        idx = _norm_indices(indices, x.shape[axis])
        self.ax, self.idx, self.in_shape = axis, idx, x.shape
        return np.asarray(np.take(x, idx, axis=axis))

    def backward(self, g):
        if not self.needs_grad[0]:
            return None, None
        gx = np.zeros(self.in_shape, g.dtype)
        if self.idx.ndim == 0:
            gx[_axis_index(self.ax, int(self.idx))] = g
        else:
            np.add.at(gx, _axis_index(self.ax, self.idx), g)
        return gx, None


@register("GatherElements")
class GatherElements(Op):
    attrs = {"axis": 0}

    def forward(self, ctx, x, indices):
        axis = normalize_axis(self.axis, x.ndim)
        idx = _norm_indices(indices, x.shape[axis])
        r = idx.ndim
        # Open grids over the index shape (which may be smaller than the data's on the other axes).
        self.index = tuple(idx if d == axis else
                           np.arange(idx.shape[d]).reshape([-1 if k == d else 1 for k in range(r)])
                           for d in range(r))
        self.in_shape = x.shape
        return x[self.index]

    def backward(self, g):
        if not self.needs_grad[0]:
            return None, None
        gx = np.zeros(self.in_shape, g.dtype)
        np.add.at(gx, self.index, g)
        return gx, None


# ---- selection and casts ---------------------------------------------------------------------------------------
@register("Where")
class Where(Op):
    def forward(self, ctx, cond, x, y):
        self.cond, self.shapes = cond, (x.shape, y.shape)
        return np.asarray(np.where(cond, x, y))

    def backward(self, g):
        zero = g.dtype.type(0)
        gx = unbroadcast(np.where(self.cond, g, zero), self.shapes[0]) if self.needs_grad[1] else None
        gy = unbroadcast(np.where(self.cond, zero, g), self.shapes[1]) if self.needs_grad[2] else None
        return None, gx, gy


@register("Trilu")
class Trilu(Op):
    attrs = {"upper": 1}

    def forward(self, ctx, x, k=None):
        self.k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
        return self._apply(x)

    def _apply(self, x):
        return np.triu(x, self.k) if self.upper else np.tril(x, self.k)

    def backward(self, g):
        return _only_first(self, self._apply(g))


def _cast(x: np.ndarray, dtype: np.dtype, saturate: int) -> np.ndarray:
    if dtype == object:
        raise ModelError("casting to string tensors is not supported")
    if saturate and dtype.name.startswith("float8") and _is_float(x.dtype):
        import ml_dtypes

        m = float(ml_dtypes.finfo(dtype).max)
        x = np.clip(x, x.dtype.type(-m), x.dtype.type(m))
    return np.asarray(x.astype(dtype, copy=False))


@register("Cast")
class Cast(Op):
    attrs = {"to": None, "saturate": 1, "round_mode": "up"}

    def __init__(self, node, opset=13):
        super().__init__(node, opset)
        if self.to is None:
            raise ModelError(f"Cast node {node.name!r} has no 'to' attribute")
        self.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(self.to)))
        if self.dtype == object:
            raise ModelError(f"Cast node {node.name!r}: casting to {onnx.TensorProto.DataType.Name(self.to)} "
                             "(string) is not supported")

    def forward(self, ctx, x):
        self.in_dtype = x.dtype
        return _cast(x, self.dtype, self.saturate)

    def backward(self, g):
        if g is None or not (_is_float(self.in_dtype) and _is_float(self.dtype)):
            return (None,)
        return (g.astype(self.in_dtype, copy=False),)


@register("CastLike")
class CastLike(Op):
    attrs = {"saturate": 1, "round_mode": "up"}

    def forward(self, ctx, x, target):
        self.in_dtype, self.dtype = x.dtype, target.dtype
        return _cast(x, target.dtype, self.saturate)

    def backward(self, g):
        if g is None or not (_is_float(self.in_dtype) and _is_float(self.dtype)):
            return None, None
        return g.astype(self.in_dtype, copy=False), None
