"""Matrix products: Gemm and MatMul."""

from __future__ import annotations

import numpy as np

from .base import Op, register, unbroadcast


@register("Gemm")
class Gemm(Op):
    """Y = alpha * A' @ B' + beta * C, with A' = A.T if transA, B' = B.T if transB; C broadcasts to (M, N).

    C is optional from opset 11 on; opset < 7's `broadcast` attribute is accepted and ignored (numpy broadcasting
    covers it).
    """

    attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0, "broadcast": 0}

    def forward(self, ctx, a, b, c=None):
        self.a, self.b = a, b
        self.c_shape = None if c is None else c.shape
        y = (a.T if self.transA else a) @ (b.T if self.transB else b)
        if self.alpha != 1.0:
            y *= y.dtype.type(self.alpha)
        if c is not None and self.beta != 0.0:
            if self.beta == 1.0:
                y += c
            else:
                y += c * y.dtype.type(self.beta)
        return y

    def backward(self, g):
        a, b = self.a, self.b
        ga = gb = gc = None
        gs = g * g.dtype.type(self.alpha) if self.alpha != 1.0 else g
        if self.needs_grad[0]:
            bt = b.T if self.transB else b  # (K, N)
            ga = bt @ gs.T if self.transA else gs @ bt.T
        if self.needs_grad[1]:
            at = a.T if self.transA else a  # (M, K)
            gb = gs.T @ at if self.transB else at.T @ gs
        if self.c_shape is not None and len(self.needs_grad) > 2 and self.needs_grad[2]:
            gc = unbroadcast(g, self.c_shape)
            gc = gc * gc.dtype.type(self.beta) if self.beta != 1.0 else gc
        return ga, gb, gc


@register("MatMul")
class MatMul(Op):
    """numpy.matmul semantics: 1-D operands are promoted (and the added axis removed), batch axes broadcast."""

    def forward(self, ctx, a, b):
        self.a, self.b = a, b
        return np.matmul(a, b)

    def backward(self, g):
        a, b = self.a, self.b
        a2 = a[None, :] if a.ndim == 1 else a  # (..., M, K)
        b2 = b[:, None] if b.ndim == 1 else b  # (..., K, N)
        # g with the axes that 1-D promotion removed put back: (..., M, N)
        if a.ndim == 1:
            g = g[..., None, :] if b.ndim > 1 else g[..., None]
        if b.ndim == 1:
            g = g[..., None]
        ga = gb = None
        if self.needs_grad[0]:
            if a2.ndim == 2 and b2.ndim > 2:
                # sum over the batch inside one GEMM: ga[m, k] = sum_{batch, n} g[.., m, n] b[.., k, n]
                gm = np.moveaxis(g, -2, 0).reshape(g.shape[-2], -1)
                bm = np.moveaxis(np.broadcast_to(b2, g.shape[:-2] + b2.shape[-2:]), -2, 0).reshape(b2.shape[-2], -1)
                ga = gm @ bm.T
            else:
                ga = unbroadcast(np.matmul(g, np.swapaxes(b2, -1, -2)), a2.shape)
            ga = ga.reshape(a.shape)
        if self.needs_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:
                # the common x @ W case: one GEMM over all batch rows
                am = np.broadcast_to(a2, g.shape[:-2] + a2.shape[-2:]).reshape(-1, a2.shape[-1])
                gb = am.T @ g.reshape(-1, g.shape[-1])
            else:
                gb = unbroadcast(np.matmul(np.swapaxes(a2, -1, -2), g), b2.shape)
            gb = gb.reshape(b.shape)
        return ga, gb
