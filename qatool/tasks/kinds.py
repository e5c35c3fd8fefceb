"""The kinds of output: one OutputTask and one Meter per kind.

Temperature: KL is taken at T = 1 by default. The teacher is the float model of the same network, not a larger
model whose "dark knowledge" at high T is worth transferring: what the int8 model must reproduce is the
distribution it deploys, softmax(z) at T = 1, and above all its argmax. At high T the loss tends to the squared
error of the centred logits over all C classes, which for a 6625-class CTC head spends the gradient on thousands of
classes that never win. T^2 keeps the gradient's scale independent of T, so `temperature` can be raised (today's
--distill-temperature is 4) without retuning the learning rate.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError
from .base import Meter, OutputTask, rows_along, sqnr_db
from .ctc import ctc_greedy_decode, ctc_text, similarity
from .losses import NMSE_EPS, class_distillation, kl_divergence, normalised_mse


# ---- Classes ---------------------------------------------------------------------------------------------------
class ClassesMeter(Meter):
    """agreement = share of images whose int8 top-1 class is float's; top1_int8 / top1_float against labels."""

    primary = "agreement"

    def __init__(self):
        super().__init__(0)
        self.same = self.labelled = self.hits_int8 = self.hits_float = 0

    def _update(self, q, f, labels):
        pq, pf = q.argmax(axis=1).reshape(len(q)), f.argmax(axis=1).reshape(len(f))
        self.same += int(np.sum(pq == pf))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            self.labelled += len(labels)
            self.hits_int8 += int(np.sum(pq == labels))
            self.hits_float += int(np.sum(pf == labels))

    def _result(self):
        out = {"agreement": self.same / max(self.images, 1)}
        if self.labelled:
            out |= {"top1_int8": self.hits_int8 / self.labelled, "top1_float": self.hits_float / self.labelled}
        return out


class Classes(OutputTask):
    """Class logits or probabilities [N, C] (or [N, C, 1, 1]). Loss: T^2 KL(softmax(t/T) || softmax(s/T)) over
    `loss_axis`, mean over the batch; with labels and alpha < 1, alpha * that + (1 - alpha) * cross-entropy."""

    kind = "classes"

    def __init__(self, output, loss_tensor=None, *, temperature=1.0, alpha=1.0, loss_axis=1, why=""):
        super().__init__(output, loss_tensor, batch_axis=0, why=why)
        self.temperature, self.alpha, self.loss_axis = float(temperature), float(alpha), loss_axis

    @property
    def loss_name(self):
        return "kl" if self.alpha >= 1 else "kl+ce"

    def loss(self, student, teacher, labels=None):
        if labels is None or self.alpha >= 1:
            return kl_divergence(student, teacher, self.temperature, self.loss_axis)
        return class_distillation(student, teacher, labels, self.temperature, self.alpha, self.loss_axis)

    def meter(self):
        return ClassesMeter()

    def options(self):
        return {"temperature": self.temperature, "alpha": self.alpha, "loss_axis": self.loss_axis}


# ---- Sequence (CTC) --------------------------------------------------------------------------------------------
class SequenceMeter(Meter):
    """Greedy CTC decoding of int8 and float: seq_agreement (same sequence), char_agreement (mean of
    1 - edit distance / max(len, 1)); with label strings (needs `characters`) the same against the labels.
    With `characters` the sequences compared are the decoded texts without leading and trailing whitespace
    (a line's text: a recogniser emits a space for a wide margin, and whether it does is not what it read),
    else the class indices."""

    primary = "seq_agreement"

    def __init__(self, batch_axis, characters):
        super().__init__(batch_axis)
        self.characters = characters
        self.sums = dict.fromkeys(("seq_agreement", "char_agreement", "seq_acc_int8", "char_acc_int8",
                                   "seq_acc_float", "char_acc_float"), 0.0)
        self.labelled = 0

    def _update(self, q, f, labels):
        dq = self._decode(q)
        df = self._decode(f)
        self._add("agreement", dq, df)
        if labels is not None:
            if self.characters is None:
                raise UsageError("text labels need the model's characters to compare with (metadata 'character')")
            self.labelled += len(labels)
            for who, texts in (("int8", dq), ("float", df)):
                self._add(f"acc_{who}", texts, [str(t).strip() for t in labels])

    def _decode(self, scores):
        seqs = ctc_greedy_decode(np.moveaxis(scores, self.batch_axis, 0))
        return seqs if self.characters is None else [ctc_text(s, self.characters).strip() for s in seqs]

    def _add(self, suffix, a, b):
        self.sums[f"seq_{suffix}"] += sum(x == y for x, y in zip(a, b, strict=True))
        self.sums[f"char_{suffix}"] += sum(similarity(x, y) for x, y in zip(a, b, strict=True))

    def _result(self):
        out = {k: self.sums[k] / max(self.images, 1) for k in ("seq_agreement", "char_agreement")}
        if self.labelled:
            out |= {k: v / self.labelled for k, v in self.sums.items() if "acc" in k}
        return out


class Sequence(OutputTask):
    """CTC scores [N, T, C] (or [T, N, C]: batch_axis=1) over C classes per time step, class 0 the blank.
    Loss: T^2 KL per time step over `loss_axis`, mean over N and T (labels are for measuring only)."""

    kind = "sequence"
    loss_name = "kl"

    def __init__(self, output, loss_tensor=None, *, batch_axis=0, temperature=1.0, loss_axis=-1, characters=None,
                 why=""):
        super().__init__(output, loss_tensor, batch_axis=batch_axis, why=why)
        self.temperature, self.loss_axis, self.characters = float(temperature), loss_axis, characters

    def loss(self, student, teacher, labels=None):
        return kl_divergence(student, teacher, self.temperature, self.loss_axis)

    def meter(self):
        return SequenceMeter(self.batch_axis, self.characters)

    def options(self):
        return {"batch_axis": self.batch_axis, "temperature": self.temperature, "loss_axis": self.loss_axis,
                "characters": len(self.characters) if self.characters is not None else None}


# ---- ProbabilityMap --------------------------------------------------------------------------------------------
class ProbabilityMapMeter(Meter):
    """map_iou = sum over the set of |Q & F| / sum of |Q | F| with Q = q > threshold, F = f > threshold (1 when
    both are empty everywhere); pixel_agreement = share of pixels where Q == F."""

    primary = "map_iou"

    def __init__(self, threshold):
        super().__init__(0)
        self.threshold = threshold
        self.inter = self.union = self.same = self.pixels = 0

    def _update(self, q, f, labels):
        bq, bf = q > self.threshold, f > self.threshold
        self.inter += int(np.sum(bq & bf))
        self.union += int(np.sum(bq | bf))
        self.same += int(np.sum(bq == bf))
        self.pixels += bq.size

    def _result(self):
        return {"map_iou": self.inter / self.union if self.union else 1.0,
                "pixel_agreement": self.same / max(self.pixels, 1)}


class ProbabilityMap(OutputTask):
    """A map [N, 1, H, W] of values in [0, 1] (a DB text detector's sigmoid map). Loss: normalised MSE."""

    kind = "probability_map"
    loss_name = "nmse"

    def __init__(self, output, *, threshold=0.3, eps=NMSE_EPS, why=""):
        super().__init__(output, None, batch_axis=0, why=why)
        self.threshold, self.eps = float(threshold), float(eps)

    def loss(self, student, teacher, labels=None):
        return normalised_mse(student, teacher, self.eps)

    def meter(self):
        return ProbabilityMapMeter(self.threshold)

    def options(self):
        return {"threshold": self.threshold, "eps": self.eps}


# ---- ClassMap --------------------------------------------------------------------------------------------------
class ClassMapMeter(Meter):
    """From the confusion matrix of float's argmax over axis 1 (rows) and int8's (columns), summed over the set:
    pixel_agreement = trace / pixels; miou = mean over classes present in either of diag / (row + col - diag)."""

    primary = "miou"

    def __init__(self):
        super().__init__(0)
        self.confusion = None

    def _update(self, q, f, labels):
        c = q.shape[1]
        if self.confusion is None:
            self.confusion = np.zeros((c, c), np.int64)
        pairs = f.argmax(axis=1).reshape(-1) * c + q.argmax(axis=1).reshape(-1)
        self.confusion += np.bincount(pairs, minlength=c * c).reshape(c, c)

    def _result(self):
        m = self.confusion if self.confusion is not None else np.zeros((1, 1), np.int64)
        diag = np.diag(m)
        union = m.sum(0) + m.sum(1) - diag
        present = union > 0
        return {"miou": float(np.mean(diag[present] / union[present])) if present.any() else 1.0,
                "pixel_agreement": float(diag.sum() / max(m.sum(), 1))}


class ClassMap(OutputTask):
    """Per-pixel classes [N, C, H, W], C > 1. Loss: T^2 KL over `loss_axis` per pixel, mean over N, H, W."""

    kind = "class_map"
    loss_name = "kl"

    def __init__(self, output, loss_tensor=None, *, temperature=1.0, loss_axis=1, why=""):
        super().__init__(output, loss_tensor, batch_axis=0, why=why)
        self.temperature, self.loss_axis = float(temperature), loss_axis

    def loss(self, student, teacher, labels=None):
        return kl_divergence(student, teacher, self.temperature, self.loss_axis)

    def meter(self):
        return ClassMapMeter()

    def options(self):
        return {"temperature": self.temperature, "loss_axis": self.loss_axis}


# ---- Tensor ----------------------------------------------------------------------------------------------------
class Tensor(OutputTask):
    """Anything else (boxes, features, detector heads). Loss: normalised MSE. Measure: SQNR (and cosine)."""

    kind = "tensor"
    loss_name = "nmse"
    measures_share = False

    def __init__(self, output, *, batch_axis=0, eps=NMSE_EPS, why=""):
        super().__init__(output, None, batch_axis=batch_axis, why=why)
        self.eps = float(eps)

    def loss(self, student, teacher, labels=None):
        return normalised_mse(student, teacher, self.eps)

    def options(self):
        return {"batch_axis": self.batch_axis, "eps": self.eps}


# ---- Rows (fields of different kinds joined in one tensor) -----------------------------------------------------
SPARSE_MEAN = 0.1  # a probability field whose mean is below this is near zero away from objects: a confidence


def _in_unit_range(fields: np.ndarray) -> np.ndarray:
    """Per row of [fields, values]: all its values lie in [0, 1] (give or take float error)."""
    return (fields.min(axis=1) >= -1e-5) & (fields.max(axis=1) <= 1 + 1e-5)


def probability_fields(v: np.ndarray, field_axis: int) -> np.ndarray:
    """Per field along `field_axis`: all its values lie in [0, 1] (give or take float error)."""
    return _in_unit_range(rows_along(np.asarray(v, np.float64), field_axis))


def confidence_fields(v: np.ndarray, field_axis: int) -> list[int]:
    """The probability fields whose mean is below SPARSE_MEAN: objectness (YOLOX, YOLOv5), or every class score
    where no objectness is (YOLOv8); not class scores conditioned on an object (YOLOX's: 0.26 on average)."""
    f = rows_along(np.asarray(v, np.float64), field_axis)
    return [int(k) for k in np.flatnonzero(_in_unit_range(f) & (f.mean(axis=1) < SPARSE_MEAN))]


def field_weights(t: np.ndarray, probabilities, confidence) -> np.ndarray:
    """[fields, values] weights of the teacher's `t` [fields, values]: 1 for the probability fields (every row's
    scores count: a background row that lights up is a false detection); for the other fields (box values) the
    row's confidence, the largest of its `confidence` fields (a background row's boxes are never decoded). All 1
    without confidence fields."""
    w = np.ones_like(t)
    if len(confidence):
        values = np.ones(len(t), bool)
        values[list(probabilities)] = False
        w[values] = t[list(confidence)].max(axis=0)
    return w


class RowsMeter(Meter):
    """SQNR per field over the whole set, each field's rows weighted as the loss weights them (`field_weights`):
    field_sqnr_db = their mean in dB (each capped to +-100 dB), worst_field_sqnr_db = the lowest, field_sqnr_dbs =
    each."""

    primary = "field_sqnr_db"

    def __init__(self, field_axis, probabilities=(), confidence=()):
        super().__init__(0)
        self.field_axis, self.probabilities, self.confidence = field_axis, probabilities, confidence
        self.field_signal = self.field_noise = 0.0

    def _update(self, q, f, labels):
        fq, ff = rows_along(q, self.field_axis), rows_along(f, self.field_axis)
        w = field_weights(ff, self.probabilities, self.confidence)
        self.field_signal = self.field_signal + np.sum(w * ff * ff, axis=1)
        self.field_noise = self.field_noise + np.sum(w * (fq - ff) ** 2, axis=1)

    def _result(self):
        dbs = [min(max(sqnr_db(float(s), float(n)), -100.0), 100.0)
               for s, n in zip(np.atleast_1d(self.field_signal), np.atleast_1d(self.field_noise))]
        return {"field_sqnr_db": float(np.mean(dbs)) if dbs else math.nan,
                "worst_field_sqnr_db": min(dbs) if dbs else math.nan, "field_sqnr_dbs": [round(d, 2) for d in dbs]}


class Rows(OutputTask):
    """Rows of fields [N, rows, fields] (or [N, fields, rows]: `field_axis` 1) that join values of different kinds
    in one tensor: a detector's box offsets or pixels beside its objectness and class probabilities. The fields'
    scales differ by orders of magnitude (yolox: box offsets' mean square 1.8, objectness' 0.007), and 99 % of the
    rows are background, whose box values the detector's decoding throws away: one normalised MSE over the whole
    tensor is the background boxes' error alone. Here each field is normalised by its own energy, and the box
    values of each row count by the teacher's confidence in it (`field_weights`; `confidence` holds the sparse
    probability fields, `probabilities` all of them). Loss: the mean over fields of each field's weighted
    normalised MSE. Measure: each field's weighted SQNR, their mean."""

    kind = "rows"
    loss_name = "nmse per field"
    measures_share = False

    def __init__(self, output, *, field_axis=2, probabilities=(), confidence=(), eps=NMSE_EPS, why=""):
        super().__init__(output, None, batch_axis=0, why=why)
        self.field_axis, self.eps = int(field_axis), float(eps)
        self.probabilities, self.confidence = [int(k) for k in probabilities], [int(k) for k in confidence]

    def loss(self, student, teacher, labels=None):
        d = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
        t = rows_along(np.asarray(teacher, np.float64), self.field_axis)
        dk = rows_along(d, self.field_axis)
        w = field_weights(t, self.probabilities, self.confidence)
        denom = np.sum(w * t * t, axis=1) + self.eps * max(t.shape[1], 1)
        loss = float(np.mean(np.sum(w * dk * dk, axis=1) / denom))
        g = dk * w * (2.0 / (len(t) * denom))[:, None]
        grad = np.moveaxis(g.reshape(np.moveaxis(d, self.field_axis, 0).shape), 0, self.field_axis)
        return loss, grad.astype(student.dtype, copy=False)

    def meter(self):
        return RowsMeter(self.field_axis, self.probabilities, self.confidence)

    def options(self):
        return {"field_axis": self.field_axis, "probabilities": self.probabilities, "confidence": self.confidence,
                "eps": self.eps}


KINDS = {cls.kind: cls for cls in (Classes, Sequence, ProbabilityMap, ClassMap, Rows, Tensor)}
