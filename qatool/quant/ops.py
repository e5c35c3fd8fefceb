"""The engine's quantization ops (domain "qatool"), inserted by `qatool.quant.prepare`.

- FakeQuant(x, scale, zero_point, span) -> y: activation fake-quant, per tensor. In training mode (until the
  observers freeze) it first updates its observer (`span` = [min, max], moving average or running extremes)
  and recomputes `scale` / `zero_point` in place: all three are state arrays, saved with the model.
- WeightQuant(w, [gamma, var]) -> (w_q, scale): per-channel symmetric fake-quant of the weight, with the scale
  recomputed from the current weight every step. With gamma/var (a following BatchNormalization) the weight is
  first folded, w * gamma / sqrt(var + eps), so what is quantized is what the int8 model will hold.
- FoldedBias(y, [b], [gamma, beta, mean, var], s_in, s_w) -> out: adds the bias of a quantized Conv/Gemm, on
  the int32 grid of scale s_in * s_w (what the int8 model adds). With a folded BN, until BN freezes and only in
  training mode it instead undoes the fold and normalises with the batch statistics (PyTorch's ConvBn QAT):
  z = y / k + b; out = BN_batch(z), updating the running statistics. In eval mode or once frozen:
  out = y + q((b - mean) * k + beta): exactly the deployed computation.
Straight-through estimator everywhere: the gradient passes where the value was inside the grid, zero outside.
"""

from __future__ import annotations

import numpy as np

from ..errors import DivergedError
from ..ir.graph import Node
from ..ops.base import Op, register
from ..ops.norm import BatchNormalization
from .qparams import BIAS_GRID, activation_grid, activation_qparams, channel_shape, fake_quant, weight_grid, weight_scales


def bn_fold_factor(gamma: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """k = gamma / sqrt(var + eps), in the arrays' dtype: the one formula training and export share."""
    return gamma / np.sqrt(var + var.dtype.type(eps))


def folded_bias(b: np.ndarray | None, k: np.ndarray, beta: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(b - mean) * k + beta: the bias of a Conv/Gemm after folding its BatchNormalization."""
    centred = -mean if b is None else b - mean
    return centred * k + beta


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


@register("qatool.FakeQuant")
class FakeQuant(Op):
    attrs = {"bits": 8, "symmetric": 0, "observer": "moving_average", "momentum": 0.9}

    def __init__(self, node: Node, opset: int = 13):
        super().__init__(node, opset)
        self.grid = activation_grid(int(self.bits), bool(self.symmetric))

    def observe(self, x: np.ndarray, span: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> None:
        """Update the observed range `span` = [min, max] with this batch, then the scale and zero point."""
        dt = span.dtype.type
        lo, hi = dt(x.min()), dt(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DivergedError(f"activation {self.node.outputs[0]!r} holds non-finite values")
        if not span[0] <= span[1]:  # first batch: the range starts as [inf, -inf]
            span[0], span[1] = lo, hi
        elif self.observer == "maximum":
            span[0], span[1] = min(span[0], lo), max(span[1], hi)
        else:
            m = dt(self.momentum)
            span[0] = span[0] * m + lo * (dt(1) - m)
            span[1] = span[1] * m + hi * (dt(1) - m)
        s, z = activation_qparams(float(span[0]), float(span[1]), self.grid)
        scale[...] = s
        zero_point[...] = z

    def forward(self, ctx, x, scale, zero_point, span):
        # A frozen observer that has never seen a batch still takes its first one: there is no range otherwise.
        if ctx.training and (not ctx.observers_frozen or not span[0] <= span[1]):
            self.observe(x, span, scale, zero_point)
        if not span[0] <= span[1]:  # never observed anything: nothing to quantize with yet
            self.mask = None
            return x
        y, self.mask = fake_quant(x, scale, zero_point, self.grid, want_mask=self.needs_grad[0])
        return y

    def backward(self, g):
        return (g if self.mask is None else g * self.mask), None, None, None


@register("qatool.WeightQuant")
class WeightQuant(Op):
    attrs = {"bits": 8, "axis": 0, "per_channel": 1, "epsilon": 1e-5}

    def __init__(self, node: Node, opset: int = 13):
        super().__init__(node, opset)
        self.grid = weight_grid(int(self.bits))

    def forward(self, ctx, w, gamma=None, var=None):
        axis = int(self.axis)
        self.w = w
        self.k = None
        if gamma is not None:
            self.k = bn_fold_factor(gamma, var, self.epsilon)
            self.sigma = np.sqrt(var + var.dtype.type(self.epsilon))
            w = w * self.k.reshape(channel_shape(w.ndim, axis))
        scale = weight_scales(w, axis if self.per_channel else None, self.grid).astype(w.dtype)
        w_q, self.mask = fake_quant(w, scale, 0, self.grid, axis if self.per_channel else None)
        return w_q, scale

    def backward(self, g, g_scale=None):
        axis = int(self.axis)
        gf = g * self.mask
        if self.k is None:
            return gf, None, None
        shape = channel_shape(gf.ndim, axis)
        dw = gf * self.k.reshape(shape)
        dgamma = None
        if self.needs_grad[1]:
            dk = (gf * self.w).sum(axis=_reduce_axes(gf.ndim, axis))
            dgamma = dk / self.sigma
        return dw, dgamma, None


@register("qatool.FoldedBias")
class FoldedBias(Op):
    attrs = {"axis": 1, "epsilon": 1e-5, "momentum": 0.9}

    def __init__(self, node: Node, opset: int = 13):
        super().__init__(node, opset)
        self.has_bn = bool(node.input(2))
        if self.has_bn:
            bn_node = Node("BatchNormalization", ["z", *node.inputs[2:6]], ["out"], name=node.name,
                           attrs={"epsilon": self.epsilon, "momentum": self.momentum})
            self.bn = BatchNormalization(bn_node, opset)

    def forward(self, ctx, y, b, gamma, beta, mean, var, s_in, s_w):
        axis = int(self.axis) % y.ndim
        shape = channel_shape(y.ndim, axis)
        self.batch_stats = self.has_bn and ctx.training and not ctx.bn_frozen
        self.b_shape = None if b is None else b.shape
        if self.has_bn:
            self.k = bn_fold_factor(gamma, var, self.epsilon)
            self.sigma = np.sqrt(var + var.dtype.type(self.epsilon))
        if self.batch_stats:
            self.y = y
            z = y / self.k.reshape(shape)
            if b is not None:
                z += b.reshape(shape)
            self.b = b
            self.bn.needs_grad = [True, *self.needs_grad[2:6]]
            return self.bn.forward(ctx, z, gamma, beta, mean, var)
        if b is not None:
            b = b.reshape(-1)
        bias = folded_bias(b, self.k, beta, mean) if self.has_bn else b
        self.b, self.mean = b, mean
        bias_q, _ = fake_quant(bias, s_in * s_w, 0, BIAS_GRID, want_mask=False)
        return y + bias_q.reshape(shape)

    def backward(self, g):
        axis = int(self.axis) % g.ndim
        shape = channel_shape(g.ndim, axis)
        others = _reduce_axes(g.ndim, axis)
        db = dgamma = dbeta = None
        if self.batch_stats:
            dz, dgamma_bn, dbeta, _, _ = self.bn.backward(g)
            dy = dz / self.k.reshape(shape)
            db = dz.sum(axis=others)
            # z = y / k: the fold factor k = gamma / sigma also depends on gamma
            dk = -(dz * self.y).sum(axis=others) / (self.k * self.k)
            dgamma = dgamma_bn + dk / self.sigma
            return dy, self._as_bias(db), dgamma, dbeta, None, None, None, None
        dbias = g.sum(axis=others)  # straight through the bias's own fake-quant
        if not self.has_bn:
            return g, self._as_bias(dbias), None, None, None, None, None, None
        centred = -self.mean if self.b is None else self.b.reshape(-1) - self.mean
        dgamma = dbias * centred / self.sigma
        return g, self._as_bias(dbias * self.k), dgamma, dbias, None, None, None, None

    def _as_bias(self, db: np.ndarray) -> np.ndarray | None:
        """The bias gradient in the bias's own shape (a Gemm's C may be (1, N))."""
        return None if self.b_shape is None else db.reshape(self.b_shape)
