"""What an output is for: the base of the output tasks, their meters, and the walk to an output's logits.

An `OutputTask` is chosen once per graph output (tasks.choose) and then answers, without the caller asking which
kind it is: which tensor the loss is taken on (`loss_tensor`), the loss of the student against the teacher
(`loss`), and a `Meter` that measures the int8 model against float over a validation set (ultralytics'
BaseValidator habit: a base with a few hooks, one subclass per task).

Every meter reports, against float, accumulated over the whole set without keeping outputs:
- `sqnr_db` = 10 log10(sum f^2 / sum (q - f)^2), the sums over every value of every image (inf when q == f
  everywhere, -inf when f is all zero and q is not);
- `cosine`: the cosine of q and f per image (flattened), averaged over the images (per image, so a few images
  of large magnitude do not decide it; two all-zero images count 1, one all-zero image 0). Without a batch axis
  each update counts as one image.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir.graph import Graph, Node

LOSS_HEADS = ("Softmax", "LogSoftmax")
SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Dropout")
HEADS = (*LOSS_HEADS, "Sigmoid")


def head_node(graph: Graph, output_name: str) -> Node | None:
    """The Softmax, LogSoftmax or Sigmoid that `output_name` is read from through shape-only ops, or None."""
    producers = graph.producers()
    t = output_name
    while (node := producers.get(t)) is not None and node.op_type in SHAPE_ONLY:
        t = node.input(0)
    return node if node is not None and node.op_type in HEADS else None


def pre_softmax(graph: Graph, output_name: str) -> str | None:
    """The input (logits) of the Softmax/LogSoftmax that `output_name` is read from through shape-only ops
    (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Transpose, Dropout), or None when there is none."""
    node = head_node(graph, output_name)
    return node.input(0) if node is not None and node.op_type in LOSS_HEADS else None


def softmax_axis(node: Node, opset: int) -> int:
    """The axis of a Softmax/LogSoftmax as written (ONNX default: -1 from opset 13, 1 before)."""
    return int(node.attrs.get("axis", -1 if opset >= 13 else 1))


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), inf-safe: inf for no noise, -inf for noise on a zero signal."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def rows_along(x: np.ndarray, axis: int | None) -> np.ndarray:
    """[x.shape[axis], values]: `axis` first, the rest flattened (one row when `axis` is None): per image along
    the batch axis, per field along a Rows output's field axis."""
    return x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def cosines(q: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [rows, values] arrays; 1 where both rows are zero, 0 where one is."""
    nq, nf = np.linalg.norm(q, axis=1), np.linalg.norm(f, axis=1)
    dot = np.sum(q * f, axis=1)
    both = (nq > 0) & (nf > 0)
    return np.where(both, dot / np.where(both, nq * nf, 1.0), np.where((nq == 0) & (nf == 0), 1.0, 0.0))


class Meter:
    """Streams int8-vs-float measures over a set. Subclasses add `_update` and `_result` and name `primary`."""

    primary = "sqnr_db"

    def __init__(self, batch_axis: int | None = 0):
        self.batch_axis = batch_axis
        self.signal = self.noise = self.cosine_sum = 0.0
        self.images = 0

    def update(self, int8_out: np.ndarray, float_out: np.ndarray, labels=None) -> None:
        q, f = np.asarray(int8_out, np.float64), np.asarray(float_out, np.float64)
        if q.shape != f.shape:
            raise ValueError(f"int8 output of shape {q.shape} against float output of shape {f.shape}")
        self.signal += float(np.sum(f * f))
        self.noise += float(np.sum((q - f) ** 2))
        c = cosines(rows_along(q, self.batch_axis), rows_along(f, self.batch_axis))
        self.cosine_sum += float(c.sum())
        self.images += len(c)
        self._update(q, f, labels)

    def result(self) -> dict:
        """{"primary": name of the headline measure, that measure, ..., "sqnr_db", "cosine", "images"}."""
        return {"primary": self.primary, **self._result(), "sqnr_db": sqnr_db(self.signal, self.noise),
                "cosine": self.cosine_sum / self.images if self.images else math.nan, "images": self.images}

    def _update(self, q: np.ndarray, f: np.ndarray, labels) -> None:
        pass

    def _result(self) -> dict:
        return {}


class OutputTask:
    """One graph output and what it is for. Subclasses set `kind`, `loss_name` and implement `loss` and `meter`."""

    kind = "tensor"
    loss_name = ""
    measures_share = True  # the meter's primary measure is a share of the inputs in [0, 1] (agreement, IoU), not dB

    def __init__(self, output: str, loss_tensor: str | None = None, *, batch_axis: int | None = 0, why: str = ""):
        self.output = output
        self.loss_tensor = loss_tensor or output
        self.batch_axis = batch_axis
        self.why = why

    def loss(self, student: np.ndarray, teacher: np.ndarray, labels=None) -> tuple[float, np.ndarray]:
        """(loss, d loss / d student) on values of `loss_tensor`; the gradient has the student's shape and dtype."""
        raise NotImplementedError

    def meter(self) -> Meter:
        """A fresh meter of int8 against float outputs (values of `output`)."""
        return Meter(self.batch_axis)

    def options(self) -> dict:
        return {"batch_axis": self.batch_axis}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "output": self.output, "loss_tensor": self.loss_tensor, "loss": self.loss_name,
                "options": self.options(), "why": self.why}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.output!r}, loss on {self.loss_tensor!r})"
