"""Elementwise activations and softmax-like ops."""

from __future__ import annotations

import numpy as np

from .base import Op, register


@register("Relu")
class Relu(Op):
    def forward(self, ctx, x):
        self.mask = x > 0
        return np.maximum(x, x.dtype.type(0))

    def backward(self, g):
        return (g * self.mask,)
