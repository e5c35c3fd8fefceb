"""A safe start and a safe end: the int8 accuracy of a QAT session, measured before the first step and at
checkpoints, and the best of them kept.

Each measurement exports the session's current state to the int8 model (the same export that writes
model_int8.onnx) and runs it on onnxruntime over the validation images: the accuracy a user would get if the
run stopped there. The measurement before any step is post-training quantization with the run's own placement
(and, with the default calibrated start, its calibrated ranges): QAT's floor. With `keep="best"` the
checkpoint of the best measurement is saved beside qat.onnx (qat_best.onnx) and becomes the int8 model; the
choice is made on the validation images, so their accuracy is optimistic for the selected model, which every
report of it says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.backends import ort_logits, ort_run_all, ort_session, top1
from ..export.int8 import session_int8
from ..ir.graph import to_onnx
from ..tasks.heads import near_chance

KEEP = ("best", "last")
# an int8 model this far below float on the validation images gets a warning that says what to try
FAR_BELOW_FLOAT = 0.05


def start_at_chance(start: float, top1_float: float | None, n_classes: int) -> bool:
    """The quantized start (post-training quantization) is at chance while the float model is not: the bits
    destroy the model's signal (the run warns; measured on docs/benchmarks.md section 4's Paddle models at
    W4A4)."""
    return top1_float is not None and near_chance(start, n_classes) and not near_chance(top1_float, n_classes)


def int8_top1(session, data) -> float:
    """Top-1 on `data` of the int8 model of the session's current state, run by onnxruntime."""
    sess = ort_session(to_onnx(session_int8(session)))
    return top1(ort_logits(sess, data, what="the int8 model"), data.labels)


def best_path(qat_path: str | os.PathLike) -> Path:
    p = Path(qat_path)
    return p.with_name(p.stem + "_best" + p.suffix)


def int8_measures(session, judge) -> dict:
    """Every output of the int8 model of the session's current state (onnxruntime) measured by `judge`
    (qatool.tasks.judge) against the float model."""
    sess = ort_session(to_onnx(session_int8(session)))
    names = [o.name for o in sess.get_outputs()]
    return judge.measure(lambda x: dict(zip(names, ort_run_all(sess, x, "the int8 model"))))


@dataclass
class Validator:
    """Measures the int8 model at the steps it is called for and keeps the best checkpoint: the latest one within
    `margin` of the highest score measured, since a difference that small is noise and the later step has
    trained longer.

    For a classifier with labels the score is int8 top-1 and the margin one validation image (measured on
    PaddleOCR's text direction, 500 validation images: the start at 491 right beat step 150 at 490, and on the
    held-out test set the start was 1.2 points the worse). With `judge` (any model, no labels) the score is the
    judge's (qatool.tasks.judge: the task measure against the float model) under `key`; when it is a share of the
    validation inputs (agreement, IoU) the margin is its standard error at the highest score h over n inputs,
    sqrt(h (1 - h) / n). Measured on PP-OCRv4 rec (300 validation lines, test lines read as float reads them):
    a zero margin kept step 200 at 94.3 % over step 800 at 93.7 % (test: 88.0 % against 94.7 %), and step 400 at
    96.0 % over step 800 at 95.3 % (test: 92.3 % against 94.3 %). A score of another scale (SQNR in dB, a user's
    metric) has no margin beyond float error."""

    session: object
    data: object
    save_best: object  # callable(path, step): writes the session's checkpoint at `path`
    qat_path: Path
    keep: str = "best"
    history: list[dict] = field(default_factory=list)
    kept: dict | None = None
    judge: object = None
    key: str = "top1_int8"
    retreats: list[dict] = field(default_factory=list)  # qatool.train.retreat's, recorded with the validations

    @property
    def start(self) -> float | None:
        return self.history[0][self.key] if self.history and self.history[0]["step"] == 0 else None

    def margin(self, highest: float) -> float:
        """How far below `highest` a later score still counts as as good (see the class notes); 1e-9 is float
        error, so equal counts compare equal."""
        n = max(len(self.data), 1)
        if self.judge is None:
            return 1.0 / n + 1e-9
        if not self.judge.score_is_share:
            return 1e-9
        h = min(max(highest, 0.0), 1.0)
        return float(np.sqrt(h * (1.0 - h) / n)) + 1e-9

    @property
    def best(self) -> dict | None:
        """The kept measurement (see the class notes)."""
        return self.kept

    def __call__(self, step: int) -> float:
        """Measure the session's current state at `step` and record it."""
        if self.history and self.history[-1]["step"] == step:  # already measured (a run of 0 steps, a resume)
            return self.history[-1][self.key]
        if self.judge is None:
            return self.record(step, int8_top1(self.session, self.data))
        measured = int8_measures(self.session, self.judge)
        return self.record(step, measured["score"], measured["outputs"])

    def record(self, step: int, acc: float, measures: dict | None = None) -> float:
        """Record a score measured elsewhere (the final export's), saving the checkpoint if it is the best."""
        if self.history and self.history[-1]["step"] == step:
            return self.history[-1][self.key]
        highest = max((r[self.key] for r in self.history), default=None)
        self.history.append({"step": step, self.key: acc, **({"measures": measures} if measures else {})})
        if highest is None or acc >= highest - self.margin(highest):
            self.kept = self.history[-1]
            if self.keep == "best":
                self.save_best(best_path(self.qat_path), step)
        return acc

    def summary(self) -> dict:
        best = self.best
        return {"keep": self.keep, "checkpoints": list(self.history),
                f"start_{self.key}": self.start,
                "best_step": best["step"] if best else None,
                f"best_{self.key}": best[self.key] if best else None,
                "selected_on": "validation data", "retreats": list(self.retreats)}

    def kept_step(self, last: int) -> int:
        """The step whose state becomes the int8 model."""
        best = self.best
        return best["step"] if self.keep == "best" and best is not None else last

    def ended_below_start(self) -> bool:
        return self.start is not None and bool(self.history) and self.history[-1][self.key] < self.start
