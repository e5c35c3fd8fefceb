"""Optimisers that update the engine's parameter arrays in place, and learning-rate schedules.

Their state (`state_arrays()` / `load_state_arrays()`) is plain float32 arrays, saved beside a checkpoint.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import ConfigError


class SGD:
    """SGD with momentum and weight decay, PyTorch's formulation: v = m*v + (g + wd*p); p -= lr*v.

    `lr_multipliers` (name -> factor) gives some parameters their own learning rate, lr * factor (PyTorch's
    parameter groups)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 lr_multipliers: dict[str, float] | None = None):
        self.params = params
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.lr_multipliers = _check_multipliers(params, lr_multipliers)
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
            p -= _scaled(lr, self.lr_multipliers.get(name)) * v

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for k, v in self.velocity.items():
            v[...] = arrays[f"velocity/{k}"]


class Adam:
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, PyTorch's `Adam` formulation.
    `lr_multipliers` as in SGD. `relative`: parameters whose update is also scaled by their own magnitude, so
    that a step moves them by about lr times their size (Adam's step is ~lr whatever the gradient's scale: LSQ's
    step sizes, some of them ~1e-6, went negative in its first step at lr 3e-5)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, lr_multipliers: dict[str, float] | None = None,
                 relative: Sequence[str] = ()):
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.lr_multipliers = _check_multipliers(params, lr_multipliers)
        self.relative = set(relative)
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = np.zeros((), np.int64)

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        self.t += 1
        b1, b2 = self.betas
        t = int(self.t)
        step_size = np.float32((self.lr if lr is None else lr) / (1 - b1**t))
        corr2 = np.float32(math.sqrt(1 - b2**t))
        eps, wd = np.float32(self.eps), np.float32(self.weight_decay)
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            if wd:
                g = g + wd * p
            m, v = self.m[name], self.v[name]
            m *= np.float32(b1)
            m += np.float32(1 - b1) * g
            v *= np.float32(b2)
            v += np.float32(1 - b2) * (g * g)
            update = _scaled(step_size, self.lr_multipliers.get(name)) * m / (np.sqrt(v) / corr2 + eps)
            if name in self.relative:
                update *= np.abs(p)
            p -= update

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"m/{k}": v for k, v in self.m.items()}
        out.update({f"v/{k}": v for k, v in self.v.items()})
        out["t"] = self.t
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for k in self.m:
            self.m[k][...] = arrays[f"m/{k}"]
            self.v[k][...] = arrays[f"v/{k}"]
        self.t[...] = arrays["t"]


def _scaled(lr: np.float32, multiplier: float | None) -> np.float32:
    return lr if multiplier is None else lr * np.float32(multiplier)


def _check_multipliers(params: dict[str, np.ndarray], multipliers: dict[str, float] | None) -> dict[str, float]:
    multipliers = dict(multipliers or {})
    unknown = sorted(set(multipliers) - set(params))
    if unknown:
        raise ConfigError(f"learning-rate multipliers for unknown parameters: {', '.join(unknown[:5])}")
    return multipliers


def tensor_sizes(params: dict[str, np.ndarray]) -> dict[str, float]:
    """Each parameter tensor's RMS, as lr multipliers (`--update-scale tensor`). An all-zero tensor (a bias that
    starts at 0) takes the median of the others, so that it can move at all."""
    rms = {k: float(np.sqrt(np.mean(np.square(v, dtype=np.float64)))) if v.size else 0.0 for k, v in params.items()}
    moving = [r for r in rms.values() if r > 0]
    fallback = float(np.median(moving)) if moving else 1.0
    return {k: r if r > 0 else fallback for k, r in rms.items()}


def step_sizes(params: dict[str, np.ndarray], weight_steps: dict[str, float]) -> dict[str, float]:
    """Each parameter's lr multiplier under `--update-scale step`: a quantized weight's quantization step (the
    median over its channels, `weight_steps`), so that lr is a fraction of a step; every other parameter (biases,
    norms, float layers) takes the median of those."""
    fallback = float(np.median(list(weight_steps.values()))) if weight_steps else 1.0
    return {k: weight_steps.get(k, fallback) for k in params}


OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")


def make_optimizer(name: str, params: dict[str, np.ndarray], lr: float, momentum: float, weight_decay: float,
                   lr_multipliers: dict[str, float] | None = None, relative: Sequence[str] = ()):
    """SGD or Adam; `relative` (Adam only) as in Adam."""
    if name == "sgd":
        return SGD(params, lr, momentum=momentum, weight_decay=weight_decay, lr_multipliers=lr_multipliers)
    if name == "adam":
        return Adam(params, lr, weight_decay=weight_decay, lr_multipliers=lr_multipliers, relative=relative)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def learning_rate(step: int, total: int, base: float, schedule: str = "constant", warmup_steps: int = 0,
                  step_size: int | None = None, step_gamma: float = 0.1) -> float:
    """The learning rate at `step` (0-based) of `total`: linear warm-up, then constant / cosine / step decay."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    if schedule == "cosine":
        span = max(total - warmup_steps, 1)
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))
    if schedule == "step":
        size = step_size or max(total // 3, 1)
        return base * step_gamma ** ((step - warmup_steps) // size)
    raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
