"""Normalisation and regularisation: BatchNormalization, InstanceNormalization, LayerNormalization, Dropout.

Statistics are computed on a 3-D view of the input, (N, C, S) with S = product of the spatial axes, so every
reduction is one vectorised pass (np.einsum, which accumulates float32 as accurately as np.sum here and needs
no temporary for sums of products) and there is no Python loop over channels.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .base import BitMask, Op, normalize_axis, register, unbroadcast


def _sum_nc(a: np.ndarray) -> np.ndarray:
    """Per-channel sum of an (N, C, S) array."""
    return np.einsum("ncs->c", a)


def _dot_nc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel sum of a * b for (N, C, S) arrays, without a temporary."""
    return np.einsum("ncs,ncs->c", a, b)


def batch_moments(x3: np.ndarray):
    """Per-channel mean and biased variance of an (N, C, S) array, and (xs, ms): xs - ms is x3 centred.

    One pass of sums: mean and variance from sum(x) and sum(x*x). That loses digits when a channel's mean is large
    against its spread (the float32 sums cancel), so then centre first (two passes): xs = x3 - mean, ms = 0;
    otherwise xs is x3 itself and ms the mean."""
    dt = x3.dtype.type
    count = dt(x3.shape[0] * x3.shape[2])
    mu = _sum_nc(x3) / count
    var = np.maximum(_dot_nc(x3, x3) / count - mu * mu, dt(0))
    if np.any(mu * mu > dt(4) * var):
        xs = x3 - mu[:, None]
        return mu, _dot_nc(xs, xs) / count, xs, np.zeros_like(mu)
    return mu, var, x3, mu


def _n_outputs(node) -> int:
    outs = list(node.outputs)
    while outs and not outs[-1]:
        outs.pop()
    return len(outs)


@register("BatchNormalization")
class BatchNormalization(Op):
    """y = (x - mean) / sqrt(var + epsilon) * scale + bias, per channel (axis 1).

    Eval mode (ctx.training False): `mean`/`var` are the running statistics (onnxruntime's inference kernel).
    Training mode (ctx.training True): the batch statistics over all axes but 1 normalise (biased variance, as
    PyTorch and the ONNX spec), and the running statistics are updated IN PLACE in the `mean`/`var` input
    arrays (the engine's live state):  running = running * momentum + batch * (1 - momentum).

    Extra outputs: opset >= 14 with training_mode=1 returns (Y, running_mean, running_var); opset < 14 with
    more than one output returns (Y, running_mean, running_var, saved_mean, saved_var) where, as onnxruntime
    does, saved_mean is the batch mean and saved_var the batch inverse standard deviation 1/sqrt(var + eps).
    Opset 7's spatial=0 (statistics per activation: reduce over axis 0 only, parameters shaped x.shape[1:]) is
    supported; `is_test` (opset 6) is ignored in favour of ctx.training.
    """

    attrs = {"epsilon": 1e-5, "momentum": 0.9, "spatial": 1, "training_mode": 0, "is_test": 0}

    def forward(self, ctx, x, scale, bias, mean, var):
        per_activation = self.opset < 9 and not self.spatial
        n = x.shape[0]
        x3 = x.reshape(n, -1, 1) if per_activation else x.reshape(n, x.shape[1], -1)
        c = x3.shape[1]
        dt = x.dtype.type
        eps = dt(self.epsilon)

        def vec(v):
            return np.asarray(v).reshape(c).astype(x.dtype, copy=False)

        scale_v, bias_v = vec(scale), vec(bias)
        self.shapes = x.shape, np.shape(scale), np.shape(bias), np.shape(mean), np.shape(var)
        self.training = bool(ctx.training and not ctx.bn_frozen)  # frozen: running statistics, as in eval
        self.scale_v = scale_v
        if self.training:
            count = x3.shape[0] * x3.shape[2]
            mu, var_b, xs, ms = batch_moments(x3)
            invstd = dt(1) / np.sqrt(var_b + eps)
            self.count = count
            # Running-statistics update. Deliberate choice: the variance uses the UNBIASED batch variance
            # (PyTorch's rule, so models trained here match PyTorch-trained ones); the ONNX spec and
            # onnxruntime's training kernel use the biased one. A batch of one value per channel keeps var_b.
            self.unbias = count / max(count - 1, 1)
            mom = float(self.momentum)
            for run, batch in ((mean, mu), (var, var_b * dt(self.unbias))):
                if not (isinstance(run, np.ndarray) and run.flags.writeable):
                    raise ModelError(
                        f"BatchNormalization node {self.node.name!r}: the running mean/var inputs must be writable "
                        "numpy arrays (the engine's state) to be updated in training mode")
                run *= run.dtype.type(mom)
                run += (batch * dt(1 - mom)).reshape(run.shape)
            stats = (mean, var, mu, invstd)
        else:
            xs, ms = x3, vec(mean)
            invstd = dt(1) / np.sqrt(vec(var) + eps)
            stats = (mean, var, ms, invstd)
        # y = (xs - ms) * a + bias, computed as xs * a + (bias - ms * a): one pass over the tensor, no temporary.
        # Saved for backward: xs (the input itself, or the centred input) and ms (its per-channel offset).
        a = scale_v * invstd
        y = xs * a[:, None]
        y += (bias_v - ms * a)[:, None]
        self.xs, self.ms = xs, ms
        self.a, self.invstd = a, invstd
        y = y.reshape(x.shape)
        n_out = _n_outputs(self.node)
        if n_out <= 1:
            return y
        running_mean, running_var, saved_mean, saved_invstd = stats
        if self.training:
            running_mean, running_var = running_mean.copy(), running_var.copy()
        extra = (running_mean, running_var)
        if self.opset < 14:
            extra += (saved_mean.reshape(np.shape(mean)), saved_invstd.reshape(np.shape(var)))
        return ((y,) + extra)[:n_out]

    def backward(self, g, g_rmean=None, g_rvar=None, g_smean=None, g_sinv=None):
        x_shape, scale_shape, bias_shape, mean_shape, var_shape = self.shapes
        c = self.a.shape[0]
        g3 = g.reshape(x_shape[0], c, -1)
        a, invstd = self.a, self.invstd
        dt = g.dtype.type
        gsum = _sum_nc(g3)

        def vec(v):
            return None if v is None else np.asarray(v).reshape(c)

        g_rmean, g_rvar, g_smean, g_sinv = vec(g_rmean), vec(g_rvar), vec(g_smean), vec(g_sinv)
        dx = dmean = dvar = None
        xs, ms = self.xs, self.ms
        gxc = _dot_nc(g3, xs) - ms * gsum  # sum(g * (x - mean))
        dscale = gxc * invstd
        if self.training:
            count = self.count
            # gradients reaching the batch mean / biased batch variance through the extra outputs
            mom = float(self.momentum)
            g_mu = np.zeros(c, g.dtype)
            g_vb = np.zeros(c, g.dtype)
            if g_rmean is not None:
                g_mu += g_rmean * dt(1 - mom)
            if g_smean is not None:
                g_mu += g_smean
            if g_rvar is not None:
                g_vb += g_rvar * dt((1 - mom) * self.unbias)
            if g_sinv is not None:
                g_vb -= g_sinv * dt(0.5) * invstd ** 3
            if self.needs_grad[0]:
                # full batch-norm gradient a * (g - mean(g) - xhat * mean(g * xhat)) plus the extra outputs' part:
                # dx = g * a + (x - mu) * k + c0 = g * a + xs * k + (c0 - ms * k)
                k = (g_vb * dt(2) - a * invstd * invstd * gxc) / dt(count)
                c0 = (g_mu - a * gsum) / dt(count) - ms * k
                dx = g3 * a[:, None]
                dx += xs * k[:, None]
                dx += c0[:, None]
            if len(self.needs_grad) > 3 and self.needs_grad[3] and g_rmean is not None:
                dmean = (g_rmean * dt(mom)).reshape(mean_shape)
            if len(self.needs_grad) > 4 and self.needs_grad[4] and g_rvar is not None:
                dvar = (g_rvar * dt(mom)).reshape(var_shape)
        else:
            if self.needs_grad[0]:
                dx = g3 * a[:, None]
            if len(self.needs_grad) > 3 and self.needs_grad[3]:
                dm = -a * gsum
                for extra in (g_rmean, g_smean):
                    if extra is not None:
                        dm = dm + extra
                dmean = dm.reshape(mean_shape)
            if len(self.needs_grad) > 4 and self.needs_grad[4]:
                dv = dt(-0.5) * invstd * invstd * self.scale_v * dscale
                if g_rvar is not None:
                    dv = dv + g_rvar
                if g_sinv is not None:
                    dv = dv - g_sinv * dt(0.5) * invstd ** 3
                dvar = dv.reshape(var_shape)
        if dx is not None:
            dx = dx.reshape(x_shape)
        return dx, dscale.reshape(scale_shape), gsum.reshape(bias_shape), dmean, dvar


@register("InstanceNormalization")
class InstanceNormalization(Op):
    """y = (x - mean_nc) / sqrt(var_nc + epsilon) * scale_c + bias_c, statistics per sample and channel."""

    attrs = {"epsilon": 1e-5}

    def forward(self, ctx, x, scale, bias):
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        s = x3.shape[2]
        dt = x.dtype.type
        mu = np.einsum("ncs->nc", x3) / dt(s)
        xc = x3 - mu[..., None]
        var = np.einsum("ncs,ncs->nc", xc, xc) / dt(s)
        invstd = dt(1) / np.sqrt(var + dt(self.epsilon))
        a = scale.astype(x.dtype, copy=False) * invstd  # (N, C)
        y = xc * a[..., None]
        y += bias.astype(x.dtype, copy=False)[:, None]
        self.xc, self.invstd, self.a, self.x_shape = xc, invstd, a, x.shape
        return y.reshape(x.shape)

    def backward(self, g):
        xc, invstd, a = self.xc, self.invstd, self.a
        dt = g.dtype.type
        g3 = g.reshape(xc.shape)
        s = xc.shape[2]
        gsum = np.einsum("ncs->nc", g3)
        gxc = np.einsum("ncs,ncs->nc", g3, xc)
        dx = None
        if self.needs_grad[0]:
            k = a * invstd * invstd * gxc / dt(s)
            dx = g3 * a[..., None]
            dx -= xc * k[..., None]
            dx -= (a * gsum / dt(s))[..., None]
            dx = dx.reshape(self.x_shape)
        return dx, np.einsum("nc,nc->c", gxc, invstd), gsum.sum(axis=0)


@register("LayerNormalization")
class LayerNormalization(Op):
    """Normalise over axes [axis, rank): y = (x - mean) * invstd * Scale + B (opset 17).

    Optional outputs Mean and InvStdDev (shaped like x with the normalised axes set to 1); gradients flowing
    into them are propagated too. `stash_type` is ignored: statistics are computed in the input's dtype.
    """

    attrs = {"axis": -1, "epsilon": 1e-5, "stash_type": 1}

    def forward(self, ctx, x, scale, bias=None):
        axis = normalize_axis(self.axis, x.ndim)
        norm_shape = x.shape[axis:]
        d = int(np.prod(norm_shape))
        x2 = x.reshape(-1, d)
        dt = x.dtype.type
        mu = np.einsum("md->m", x2) / dt(d)
        xhat = x2 - mu[:, None]
        var = np.einsum("md,md->m", xhat, xhat) / dt(d)
        invstd = dt(1) / np.sqrt(var + dt(self.epsilon))
        xhat *= invstd[:, None]
        scale_f = np.broadcast_to(scale.astype(x.dtype, copy=False), norm_shape).reshape(d)
        y = xhat * scale_f
        if bias is not None:
            y += np.broadcast_to(bias.astype(x.dtype, copy=False), norm_shape).reshape(d)
        self.xhat, self.invstd, self.scale_f = xhat, invstd, scale_f
        self.shapes = x.shape, norm_shape, scale.shape, None if bias is None else bias.shape
        stat_shape = x.shape[:axis] + (1,) * (x.ndim - axis)
        n_out = _n_outputs(self.node)
        if n_out <= 1:
            return y.reshape(x.shape)
        return (y.reshape(x.shape), mu.reshape(stat_shape), invstd.reshape(stat_shape))[:n_out]

    def backward(self, g, g_mean=None, g_invstd=None):
        x_shape, norm_shape, scale_shape, bias_shape = self.shapes
        xhat, invstd = self.xhat, self.invstd
        dt = g.dtype.type
        d = xhat.shape[1]
        g2 = g.reshape(-1, d)
        dx = dscale = dbias = None
        if self.needs_grad[0]:
            dxhat = g2 * self.scale_f
            m1 = np.einsum("md->m", dxhat) / dt(d)
            m2 = np.einsum("md,md->m", dxhat, xhat) / dt(d)
            if g_invstd is not None:  # d invstd / dx = -invstd^2 * xhat / d
                m2 += g_invstd.reshape(-1) * invstd / dt(d)
            dxhat -= xhat * m2[:, None]
            dxhat -= m1[:, None]
            dxhat *= invstd[:, None]
            if g_mean is not None:
                dxhat += (g_mean.reshape(-1) / dt(d))[:, None]
            dx = dxhat.reshape(x_shape)
        if len(self.needs_grad) > 1 and self.needs_grad[1]:
            dscale = unbroadcast(np.einsum("md,md->d", g2, xhat).reshape(norm_shape), scale_shape)
        if bias_shape is not None and len(self.needs_grad) > 2 and self.needs_grad[2]:
            dbias = unbroadcast(g2.sum(axis=0).reshape(norm_shape), bias_shape)
        return dx, dscale, dbias


@register("Dropout")
class Dropout(Op):
    """Inverted dropout, active only when ctx.training is True and the training_mode input (opset 12+), if
    given, is true; eval mode returns the input array itself. The ratio is an attribute before opset 12 and an
    optional input (default 0.5) from 12 on. The mask comes from ctx.rng (the `seed` attribute is ignored so a
    run is reproducible from the engine's one seed). The optional second output is the boolean keep-mask."""

    attrs = {"ratio": 0.5, "seed": 0, "is_test": 0}

    def forward(self, ctx, x, ratio=None, training_mode=None):
        r = float(np.asarray(ratio)) if ratio is not None else float(self.ratio)
        active = (ctx.training and not self.is_test and r > 0.0
                  and (training_mode is None or bool(np.asarray(training_mode))))
        want_mask = _n_outputs(self.node) > 1
        if not active:
            self.m = None
            return (x, np.ones(x.shape, dtype=bool)) if want_mask else x
        keep = 1.0 - r
        if keep <= 0.0:
            mask = np.zeros(x.shape, dtype=bool)
        else:
            rdt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
            mask = ctx.rng.random(x.shape, dtype=rdt) < rdt.type(keep)
        # the scaled mask in x's dtype: forward is one multiply; backward keeps the mask a bit per value and
        # applies mask and scale in turn (the same products: g * s where kept, 0 elsewhere)
        scale = x.dtype.type(1.0 / keep if keep > 0 else 0.0)
        y = x * np.multiply(mask, scale, dtype=x.dtype)
        self.m = (BitMask(mask), scale) if ctx.grad else None
        return (y, mask) if want_mask else y

    def backward(self, g, g_mask=None):
        if self.m is None:
            gx = g
        else:
            mask, scale = self.m
            gx = mask.apply(g)
            gx *= scale
        return (gx,) + (None,) * (len(self.needs_grad) - 1)
