"""The engine's quantization ops (domain "qatool"), inserted by `qatool.quant.prepare`.

- FakeQuant(x, scale, zero_point, span) -> y: activation fake-quant, per tensor. In training mode (until the
  observers freeze) it first updates its observer (`span` = [min, max], moving average or running extremes)
  and recomputes `scale` / `zero_point` in place: all three are state arrays, saved with the model.
- WeightQuant(w, [gamma, var], [scale]) -> (w_q, scale): per-channel symmetric fake-quant of the weight, with
  the scale recomputed from the current weight every step. With gamma/var (a following BatchNormalization) the
  weight is first folded, w * gamma / sqrt(var + eps), so what is quantized is what the int8 model will hold.
  With a `scale` input (LSQ) the step sizes are trained parameters, steps of the unfolded weight that the fold
  factor scales (`folded_step`).
- FoldedBias(y, [b], [gamma, beta, mean, var], s_in, s_w) -> out: adds the bias of a quantized Conv/Gemm, on
  the int32 grid of scale s_in * s_w (what the int8 model adds). With a folded BN, until BN freezes and only in
  training mode it instead undoes the fold and normalises with the batch statistics (PyTorch's ConvBn QAT):
  z = y / k + b; out = BN_batch(z), updating the running statistics (computed from y's own statistics). In eval mode or once frozen:
  out = y + q((b - mean) * k + beta): exactly the deployed computation.
Straight-through estimator everywhere: the gradient passes where the value was inside the grid, zero outside.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..errors import DivergedError
from ..ir.graph import Node
from ..ops.base import BitMask, Op, register
from ..ops.norm import _dot_nc, _sum_nc, batch_moments
from .qparams import (BIAS_GRID, MIN_SCALE, activation_grid, activation_qparams, channel_axes, channel_shape,
                      fake_quant, lsq_fake_quant, lsq_grad_scale, weight_grid, weight_scales)


def bn_fold_factor(gamma: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """k = gamma / sqrt(var + eps), in the arrays' dtype: the one formula training and export share."""
    return gamma / np.sqrt(var + var.dtype.type(eps))


def fold_weight(w: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """`w` times the fold factor `k` along its output-channel `axis`: the folded weight that training, the start's
    rounding and the export all quantize (and, applied to a gradient, the chain rule through that product)."""
    return w * k.reshape(channel_shape(w.ndim, axis))


def fold_magnitude(k: np.ndarray | None, per_channel: bool):
    """What a learned weight step size is multiplied by to become the folded weight's: |k| per channel (max|k|
    per tensor), floored at MIN_SCALE; 1 without a BatchNormalization."""
    if k is None:
        return np.float32(1)
    m = np.abs(k) if per_channel else np.abs(k).max()
    return np.maximum(m, MIN_SCALE).astype(k.dtype)


def folded_step(learned: np.ndarray, k: np.ndarray | None, per_channel: bool) -> np.ndarray:
    """The folded weight's step size from a learned (LSQ) one. LSQ learns the step of the unfolded weight: as
    the BN statistics move during QAT the fold factor k rescales weight and step together, so the grid stays
    where the gradient put it relative to the weights (as max|w k| / qmax does for the observed scale)."""
    return np.maximum(learned * fold_magnitude(k, per_channel), MIN_SCALE).astype(np.float32)


def folded_bias(b: np.ndarray | None, k: np.ndarray, beta: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(b - mean) * k + beta: the bias of a Conv/Gemm after folding its BatchNormalization."""
    centred = -mean if b is None else b - mean
    return centred * k + beta


def _reduce_axes(ndim: int, axis: int | tuple[int, ...]) -> tuple[int, ...]:
    axes = channel_axes(axis)
    return tuple(i for i in range(ndim) if i not in axes)


@register("qatool.FakeQuant")
class FakeQuant(Op):
    """With learn_scale=1 (LSQ) the scale is a trained parameter: the observer only initialises it (its first
    batch), and backward returns the scale's gradient."""

    attrs = {"bits": 8, "symmetric": 0, "observer": "moving_average", "momentum": 0.9, "learn_scale": 0,
             "addend": 0.0}

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
        s, z = activation_qparams(float(span[0]), float(span[1]), self.grid, float(self.addend))
        scale[...] = s
        zero_point[...] = z

    def forward(self, ctx, x, scale, zero_point, span):
        observed = span[0] <= span[1]
        # A frozen observer that has never seen a batch still takes its first one: there is no range otherwise.
        if ctx.training and (not observed or not (ctx.observers_frozen or self.learn_scale)):
            self.observe(x, span, scale, zero_point)
        if not span[0] <= span[1]:  # never observed anything: nothing to quantize with yet
            self.mask = self.dy_ds = None
            return x
        if self.learn_scale and self.needs_grad[1]:
            s = np.maximum(scale, MIN_SCALE)
            y, mask, self.dy_ds = lsq_fake_quant(x, s, zero_point, self.grid)
            self.mask = BitMask(mask)
            self.lsq_scale = lsq_grad_scale(x[0].size, self.grid)  # N = features per sample
            return y
        self.dy_ds = None
        y, mask = fake_quant(x, scale, zero_point, self.grid, want_mask=self.needs_grad[0])
        self.mask = None if mask is None else BitMask(mask)  # a bit per value (the straight-through mask)
        # y is on the grid: an op that keeps it for backward keeps its codes (ops.base.keep_compact), with the
        # scale and zero point fake_quant used (float32, in x's dtype)
        t = x.dtype.type
        ctx.on_grid[id(y)] = (weakref.ref(y), t(np.float32(np.asarray(scale).reshape(-1)[0])),
                              t(np.float32(np.asarray(zero_point).reshape(-1)[0])), self.grid.qmin, self.grid.qmax,
                              ())
        return y

    def backward(self, g):
        dx = g if self.mask is None else self.mask.apply(g)
        dscale = None
        if self.dy_ds is not None:
            dscale = np.asarray(np.sum(g * self.dy_ds) * self.lsq_scale, dtype=g.dtype)
        return dx, dscale, None, None


def weight_axis(value) -> int | tuple[int, ...]:
    """A WeightQuant's `axis` attribute: one axis as an int, several as a tuple."""
    return int(value) if np.ndim(value) == 0 else channel_axes(value)


@register("qatool.WeightQuant")
class WeightQuant(Op):
    """Inputs (w, [gamma, var], [scale]): with a `scale` input (LSQ) the step sizes are trained parameters
    instead of max|w| / qmax recomputed every step. `axis`: the output-channel axis, or a list of axes whose every
    combination is a channel (an LSTM's [D, 4H, K] weight: [0, 1], a scale per direction and gate row)."""

    attrs = {"bits": 8, "axis": 0, "per_channel": 1, "epsilon": 1e-5}

    def __init__(self, node: Node, opset: int = 13):
        super().__init__(node, opset)
        self.grid = weight_grid(int(self.bits))

    def forward(self, ctx, w, gamma=None, var=None, scale=None):
        axis = weight_axis(self.axis)
        per = axis if self.per_channel else None
        self.w = w
        self.k = None
        if gamma is not None:
            self.k = bn_fold_factor(gamma, var, self.epsilon)
            self.sigma = np.sqrt(var + var.dtype.type(self.epsilon))
            w = fold_weight(w, self.k, axis)
        self.dy_ds = None
        if scale is None:
            scale = weight_scales(w, per, self.grid).astype(w.dtype)
            w_q, self.mask = fake_quant(w, scale, 0, self.grid, per)
        else:
            learned = scale
            scale = folded_step(learned, self.k, bool(self.per_channel)).astype(w.dtype)
            w_q, self.mask, dy_ds = lsq_fake_quant(w, scale, 0, self.grid, per)
            if self.needs_grad[3]:
                self.dy_ds = dy_ds
                n = w.size // w.shape[per] if per is not None else w.size  # weights per step size
                # LSQ's gradient of the folded step, divided by the fold magnitude m: the learned step then moves
                # by what LSQ would move the folded step, over m (the true gradient, times m, would scale the
                # relative update by m^2: up to ~200x for this repository's depthwise layers)
                self.lsq_scale = lsq_grad_scale(n, self.grid) / fold_magnitude(self.k, bool(self.per_channel))
        return w_q, scale

    def backward(self, g, g_scale=None):
        axis = weight_axis(self.axis)
        others = _reduce_axes(g.ndim, axis)
        gf = g * self.mask
        dscale = None
        if self.dy_ds is not None:
            gs = g * self.dy_ds
            dscale = ((gs.sum(axis=others) if self.per_channel else gs.sum()) * self.lsq_scale).astype(g.dtype)
        if self.k is None:
            return gf, None, None, dscale
        dw = fold_weight(gf, self.k, axis)
        dgamma = (gf * self.w).sum(axis=others) / self.sigma if self.needs_grad[1] else None
        return dw, dgamma, None, dscale


@register("qatool.FoldedBias")
class FoldedBias(Op):
    """See the module docstring. The batch-statistics path normalises y itself instead of forming z = y / k + b:
    z - mean(z) = (y - mean(y)) / k and var(z) = var(y) / k^2, so out = (y - mean(y)) * a + beta with
    a = gamma * invstd / k, invstd = 1 / sqrt(var(y) / k^2 + eps); b cancels (its gradient is exactly 0) and
    enters only the running mean. Two passes over the tensor fewer forward and three backward than building z
    and running BatchNormalization on it (ResNet18 at batch 32: 20 such layers a step)."""

    attrs = {"axis": 1, "epsilon": 1e-5, "momentum": 0.9}

    def __init__(self, node: Node, opset: int = 13):
        super().__init__(node, opset)
        self.has_bn = bool(node.input(2))

    def forward(self, ctx, y, b, gamma, beta, mean, var, s_in, s_w):
        axis = int(self.axis) % y.ndim
        shape = channel_shape(y.ndim, axis)
        self.batch_stats = self.has_bn and ctx.training and not ctx.bn_frozen
        self.b_shape = None if b is None else b.shape
        if self.has_bn:
            self.k = bn_fold_factor(gamma, var, self.epsilon)
            self.sigma = np.sqrt(var + var.dtype.type(self.epsilon))
        if b is not None:
            b = b.reshape(-1)
        if self.batch_stats:
            return self._batch_norm(y, b, gamma, beta, mean, var, axis)
        bias = self.deployed_bias(b, gamma, beta, mean, var)
        self.b, self.mean = b, mean
        bias_q, _ = fake_quant(bias, s_in * s_w, 0, BIAS_GRID, want_mask=False)
        return y + bias_q.reshape(shape)

    def deployed_bias(self, b, gamma, beta, mean, var) -> np.ndarray | None:
        """The float bias the int8 model's layer adds, before its int32 quantization: b, or with the folded BN
        (b - mean) * k + beta."""
        b = None if b is None else b.reshape(-1)
        if not self.has_bn:
            return b
        return folded_bias(b, bn_fold_factor(gamma, var, self.epsilon), beta, mean)

    def _batch_norm(self, y, b, gamma, beta, mean, var, axis):
        dt = y.dtype.type
        y3 = y.reshape(int(np.prod(y.shape[:axis])), y.shape[axis], -1)  # (N, C, S)
        n = y3.shape[0] * y3.shape[2]
        mu, var_y, xs, ms = batch_moments(y3)
        k = self.k
        var_z = var_y / (k * k)
        invstd = dt(1) / np.sqrt(var_z + dt(self.epsilon))
        r = invstd / k  # xhat = (y - mean(y)) * r = (z - mean(z)) * invstd
        a = gamma * r
        out = xs * a[:, None]
        out += (beta - ms * a)[:, None]
        # running statistics of z (PyTorch's rule: the unbiased batch variance), in place
        unbias = dt(n / max(n - 1, 1))
        mom = dt(self.momentum)
        mu_z = mu / k if b is None else mu / k + b
        for run, batch in ((mean, mu_z), (var, var_z * unbias)):
            run *= mom
            run += (batch * (dt(1) - mom)).reshape(run.shape)
        self.xs, self.ms, self.n, self.a, self.r, self.invstd = xs, ms, n, a, r, invstd
        return out.reshape(y.shape)

    def backward(self, g):
        axis = int(self.axis) % g.ndim
        others = _reduce_axes(g.ndim, axis)
        if self.batch_stats:
            dt = g.dtype.type
            g3 = g.reshape(self.xs.shape)
            sg = _sum_nc(g3)  # dbeta
            sgx = _dot_nc(g3, self.xs) - self.ms * sg  # sum of g * (y - mean(y))
            dgamma_bn = sgx * self.r  # sum of g * xhat
            n, a = dt(self.n), self.a
            # dy = a * (g - mean(g) - xhat * mean(g * xhat))
            c1 = a * self.r * dgamma_bn / n
            dy = g3 * a[:, None]
            dy -= self.xs * c1[:, None]
            dy += (self.ms * c1 - a * sg / n)[:, None]
            # gamma also scales k = gamma / sigma, which moves invstd: d/dgamma of gamma * invstd / k is
            # invstd / k * (1 - eps * invstd^2)
            dgamma = dgamma_bn * (dt(1) - dt(self.epsilon) * self.invstd * self.invstd)
            db = np.zeros(self.a.shape, dtype=g.dtype)  # b cancels in z - mean(z)
            self.xs = None
            return dy.reshape(g.shape), self._as_bias(db), dgamma, sg, None, None, None, None
        dbias = g.sum(axis=others)  # straight through the bias's own fake-quant
        if not self.has_bn:
            return g, self._as_bias(dbias), None, None, None, None, None, None
        centred = -self.mean if self.b is None else self.b.reshape(-1) - self.mean
        dgamma = dbias * centred / self.sigma
        return g, self._as_bias(dbias * self.k), dgamma, dbias, None, None, None, None

    def _as_bias(self, db: np.ndarray) -> np.ndarray | None:
        """The bias gradient in the bias's own shape (a Gemm's C may be (1, N))."""
        return None if self.b_shape is None else db.reshape(self.b_shape)
