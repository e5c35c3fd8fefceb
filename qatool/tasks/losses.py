"""The losses of the output tasks: each returns (loss: float, gradient w.r.t. the student: same shape and dtype).

Every sum runs in float64; the gradient is cast back to the student's dtype (float32 in training). The KL's
elementwise work (softmaxes, logs) runs in the student's own float type: in float32 a recogniser's [N, T, 6625]
logits cost a third of the float64 time, and each term carries a relative error of ~1e-7.

- `kl_divergence`: T^2 * KL(softmax(t/T) || softmax(s/T)) over one axis, the mean over every other position
  (rows, time steps, pixels). Its gradient is T * (softmax(s/T) - softmax(t/T)) / P.
- `cross_entropy`: the mean cross-entropy of softmax(s) over one axis against integer labels per position.
- `class_distillation`: alpha * KL_T + (1 - alpha) * CE, the mix of train/loss.py `distillation_loss` (same
  formula, same values: tests/test_tasks.py checks it), kept here because tasks sit below qatool.train.
- `normalised_mse`: sum((s - t)^2) / (sum(t^2) + eps * size) over the whole batch: the inverse of the batch's
  SQNR in linear units, so the loss and the reported SQNR measure the same thing. eps (default 1e-6) is a floor
  on the teacher's mean square, so an all-zero teacher (a text map of an image without text) does not blow up.
"""

from __future__ import annotations

import numpy as np

NMSE_EPS = 1e-6


def log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def kl_divergence(student: np.ndarray, teacher: np.ndarray, temperature: float = 1.0,
                  axis: int = -1) -> tuple[float, np.ndarray]:
    """T^2 / P * sum_positions sum_c p_t (log p_t - log p_s), p = softmax(x / T) over `axis`, P = size / C.
    Gradient: T * (p_s - p_t) / P."""
    t = float(temperature)
    dtype = np.result_type(student.dtype, np.float32)
    log_ps = log_softmax(np.asarray(student, dtype) / dtype.type(t), axis)
    log_pt = log_softmax(np.asarray(teacher, dtype) / dtype.type(t), axis)
    pt = np.exp(log_pt)
    positions = max(student.size // max(student.shape[axis], 1), 1)
    loss = t * t * float(np.sum(pt * (log_pt - log_ps), dtype=np.float64)) / positions
    grad = np.exp(log_ps)
    grad -= pt
    grad *= dtype.type(t / positions)
    return loss, grad.astype(student.dtype, copy=False)


def cross_entropy(student: np.ndarray, labels: np.ndarray, axis: int = 1) -> tuple[float, np.ndarray]:
    """mean_i -log softmax(s_i)[label_i] over the positions i (every index but `axis`); grad (p - onehot) / P."""
    z = np.moveaxis(np.asarray(student, np.float64), axis, -1)
    rows = z.reshape(-1, z.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows of class scores")
    log_p = log_softmax(rows, -1)
    idx = np.arange(len(rows))
    grad = np.exp(log_p)
    grad[idx, labels] -= 1
    grad = np.moveaxis((grad / len(rows)).reshape(z.shape), -1, axis)
    return float(-log_p[idx, labels].mean()), grad.astype(student.dtype)


def class_distillation(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, temperature: float,
                       alpha: float, axis: int = 1) -> tuple[float, np.ndarray]:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels) (Hinton et al.)."""
    kl, dkl = kl_divergence(student, teacher, temperature, axis)
    ce, dce = cross_entropy(student, labels, axis)
    grad = alpha * dkl.astype(np.float64) + (1 - alpha) * dce.astype(np.float64)
    return alpha * kl + (1 - alpha) * ce, grad.astype(student.dtype)


def normalised_mse(student: np.ndarray, teacher: np.ndarray, eps: float = NMSE_EPS) -> tuple[float, np.ndarray]:
    """sum((s - t)^2) / D with D = sum(t^2) + eps * size, over the whole batch; gradient 2 (s - t) / D."""
    d = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
    t = np.asarray(teacher, np.float64)
    denom = float(np.sum(t * t)) + eps * max(t.size, 1)
    return float(np.sum(d * d)) / denom, (2.0 / denom * d).astype(student.dtype)
