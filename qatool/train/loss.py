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


def distillation_loss(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, temperature: float,
                      alpha: float) -> tuple[float, np.ndarray]:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * cross-entropy (Hinton et al.;
    MNN's distillTrainQuant): the mean loss over the batch and its gradient w.r.t. the student logits
    (`qatool.tasks.class_distillation`)."""
    from ..tasks.losses import class_distillation

    return class_distillation(student, teacher, labels, temperature, alpha)
