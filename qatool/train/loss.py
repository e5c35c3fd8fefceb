"""Losses: each returns (loss value, gradient w.r.t. the logits)."""

from __future__ import annotations

import numpy as np


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, by a stable log-softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(z)
    sum_exp = exp.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    rows = np.arange(n)
    loss = float(np.mean(np.log(sum_exp[:, 0]) - z[rows, labels]))
    grad = exp / sum_exp
    grad[rows, labels] -= 1
    grad *= logits.dtype.type(1.0 / n)
    return loss, grad


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def distillation_loss(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, temperature: float,
                      alpha: float) -> tuple[float, np.ndarray]:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * cross-entropy (Hinton et al.;
    MNN's distillTrainQuant). Returns the mean loss over the batch and its gradient w.r.t. the student logits."""
    t = np.float64(temperature)
    log_ps = _log_softmax(student.astype(np.float64) / t)
    log_pt = _log_softmax(teacher.astype(np.float64) / t)
    pt = np.exp(log_pt)
    n = student.shape[0]
    kl = float(np.sum(pt * (log_pt - log_ps)) / n)
    ce, dce = softmax_cross_entropy(student, labels)
    loss = alpha * t * t * kl + (1 - alpha) * ce
    dkl = (np.exp(log_ps) - pt) * (alpha * t / n)  # d(alpha T^2 KL)/d student = alpha T (p_s - p_t) / n
    grad = (dkl + (1 - alpha) * dce).astype(student.dtype)
    return loss, grad
