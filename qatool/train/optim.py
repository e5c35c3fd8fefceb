"""Optimisers that update the engine's parameter arrays in place."""

from __future__ import annotations

import numpy as np


class SGD:
    """SGD with momentum and weight decay, PyTorch's formulation: v = m*v + (g + wd*p); p -= lr*v."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        self.params = params
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        lr = np.float32(self.lr if lr is None else lr)
        m, wd = np.float32(self.momentum), np.float32(self.weight_decay)
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            v = self.velocity[name]
            v *= m
            v += g
            if wd:
                v += wd * p
            p -= lr * v
