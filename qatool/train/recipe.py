"""Choices of the default recipe that are made from evidence on the user's model and data.

BatchNormalization's phase (`bn_evidence`)
    A model trained elsewhere carries BN running statistics from other data and large batches. The batch
    statistics of a small fine-tuning batch can be far from them: the PaddleOCR text-direction classifier is
    97.7 % right in eval mode on its fine-tuning images and 79.7 % right in training mode at batch 32. Training
    with batch statistics then trains a different model than the one deployed, and drags the running
    statistics toward noisy batch estimates. Before QAT, the float model runs on a few training batches twice,
    in eval mode (running statistics) and in training mode (batch statistics, running statistics left as they
    were); when batch statistics cost more than BN_LOSS_RATIO x the eval-mode loss (plus BN_LOSS_SLACK), BN
    uses its running statistics from the first step (`freeze_bn_after` 0). Otherwise the schedule stays:
    batch statistics for the first half, then frozen. On the bundled sample models (trained here, at this batch
    size, on this data) the two losses are within a few percent, so their recipe is unchanged.

The quantized start's gradients (`gradient_evidence`)
    At low activation bits the check above can pass while training with batch statistics still fails: the
    calibrated quantized model's batch deviations can be far smaller than its running ones (4-bit activations
    with min/max ranges round most small values to zero), and batch normalisation then multiplies the gradient
    by sigma_running / sigma_batch at every layer. Measured on the PP-LCNet orientation classifier at W4A4: a
    gradient norm of 3.4e6 with batch statistics against 25 with running statistics, and SGD diverged at step 2.
    So one training batch runs forward and backward through the calibrated QAT model in both BN modes; when
    batch statistics give a gradient more than GRAD_RATIO times larger, BN uses its running statistics from the
    first step. The bundled MobileNet at W4A4 shows the opposite (0.80 with batch statistics, 78 without: its
    batch statistics repair what 4-bit ranges broke), and keeps its schedule.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from ..engine.model import Model
from ..ir.graph import Graph
from ..tasks.heads import logits_tensor
from .loss import softmax_cross_entropy

BN_LOSS_RATIO = 1.25
BN_LOSS_SLACK = 0.05
BN_PROBE_BATCHES = 4
GRAD_RATIO = 100.0


@dataclass
class BnEvidence:
    images: int
    eval_loss: float  # running statistics
    train_loss: float  # batch statistics
    eval_acc: float
    train_acc: float

    @property
    def freeze_from_start(self) -> bool:
        return self.train_loss > BN_LOSS_RATIO * self.eval_loss + BN_LOSS_SLACK

    def to_dict(self) -> dict:
        return {**asdict(self), "freeze_from_start": self.freeze_from_start}

    def summary(self) -> str:
        what = ("BN uses its running statistics from the first step" if self.freeze_from_start else
                "BN trains with batch statistics for the first half of the run")
        return (f"BN check on {self.images} training images: float loss {self.eval_loss:.3f} (top-1 "
                f"{self.eval_acc:.3f}) with running statistics, {self.train_loss:.3f} ({self.train_acc:.3f}) with "
                f"batch statistics: {what}")


def has_batchnorm(graph: Graph) -> bool:
    return any(n.op_type == "BatchNormalization" for n in graph.nodes)


@contextmanager
def _probing(model: Model):
    """Run a probe on `model` and leave it as it was: Dropout off (only BN's behaviour is compared), observers
    held, and afterwards the running statistics (which training mode moves) and the phase flags put back."""
    ctx = model.ctx
    flags = ctx.bn_frozen, ctx.observers_frozen
    state = {k: v.copy() for k, v in model.state.items()}
    dropout = [st.op for st in model._steps if st.op.op_type == "Dropout" and not st.op.is_test]
    for op in dropout:
        op.is_test = 1
    ctx.observers_frozen = True

    def restore() -> None:
        for k, v in state.items():
            model.state[k][...] = v

    try:
        yield restore  # for the probe to call after each training-mode forward
    finally:
        restore()
        for op in dropout:
            op.is_test = 0
        ctx.bn_frozen, ctx.observers_frozen = flags


def _probe_index(n: int, count: int, seed: int) -> np.ndarray:
    """The seeded training images every probe uses."""
    return np.random.default_rng([seed, 7]).permutation(n)[:count]


def bn_evidence(float_graph: Graph, data, batch_size: int, seed: int = 0,
                batches: int = BN_PROBE_BATCHES) -> BnEvidence:
    """Float loss and accuracy on `batches` seeded training batches, with BN's running statistics and with batch
    statistics (Dropout off in both; `float_graph` is not changed: the probe runs on a copy)."""
    model = Model(copy.deepcopy(float_graph), seed=seed)
    logits = logits_tensor(model.graph)
    index = _probe_index(len(data), batch_size * batches, seed)
    n = len(index)
    totals = {False: [0.0, 0], True: [0.0, 0]}
    with _probing(model) as restore:
        for start in range(0, n, batch_size):
            x, y = data.batch(index[start:start + batch_size])
            for training in (False, True):
                out = model.forward({model.input_names[0]: x}, training=training, outputs=[logits])[0]
                out = out.reshape(len(out), -1).astype(np.float32)
                loss, _ = softmax_cross_entropy(out, y)
                totals[training][0] += loss * len(y)
                totals[training][1] += int((out.argmax(1) == y).sum())
                restore()
    return BnEvidence(n, totals[False][0] / n, totals[True][0] / n, totals[False][1] / n, totals[True][1] / n)


@dataclass
class GradientEvidence:
    images: int
    batch_stats_norm: float  # gradient norm with BN's batch statistics
    running_stats_norm: float  # with its running statistics

    @property
    def freeze_from_start(self) -> bool:
        return self.batch_stats_norm > GRAD_RATIO * self.running_stats_norm

    def to_dict(self) -> dict:
        return {**asdict(self), "freeze_from_start": self.freeze_from_start}

    def summary(self) -> str:
        return (f"BN check on the quantized start: gradient norm {self.batch_stats_norm:.3g} with batch statistics, "
                f"{self.running_stats_norm:.3g} with running statistics"
                + (": batch statistics amplify the gradient, BN uses its running statistics from the first step"
                   if self.freeze_from_start else ""))


def gradient_evidence(session, data, batch_size: int, seed: int = 0) -> GradientEvidence:
    """The parameters' gradient norm of one seeded training batch through the calibrated QAT session, with BN's
    batch statistics and with its running statistics (observers held, state restored, Dropout off)."""
    model = session.model
    index = _probe_index(len(data), batch_size, seed)
    x, y = data.batch(index)
    norms = {}
    with _probing(model) as restore:
        for frozen in (False, True):
            model.ctx.bn_frozen = frozen
            out = model.forward({session.input_name: x}, training=True, outputs=[session.logits])[0]
            _, grad = softmax_cross_entropy(out.reshape(len(out), -1), y)
            grads = model.backward([grad.reshape(out.shape)])
            with np.errstate(over="ignore", invalid="ignore"):
                norms[frozen] = float(np.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values())))
            restore()
    return GradientEvidence(len(index), norms[False], norms[True])
