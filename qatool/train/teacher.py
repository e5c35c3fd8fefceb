"""The teacher: a float model run by onnxruntime in eval mode, giving the tensors a student is trained to match."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..convert import normalize, normalize_proto
from ..errors import ModelError
from ..ir.graph import Graph, to_onnx
from ..ir.io import load_proto
from ..runtime.backends import ort_run_all, ort_session
from ..tasks.heads import logits_tensor


class Teacher:
    """Gives the teacher's `tensors` for a batch (default: its logits: a final Softmax/LogSoftmax is cut off,
    the loss needs logits). `model` is a float ONNX file or a float graph (normalised for inference here)."""

    def __init__(self, model: str | os.PathLike | Graph, tensors: list[str] | None = None):
        if isinstance(model, Graph):
            graph = normalize(model, for_training=False).graph
            self.path = "the float model"
        else:
            graph = normalize_proto(load_proto(model), for_training=False).graph
            self.path = str(model)
        wanted = tensors or [logits_tensor(graph)]
        known = set(graph.input_names) | {o for n in graph.nodes for o in n.outputs if o}
        missing = [t for t in wanted if t not in known]
        if missing:
            raise ModelError(f"the teacher {self.path} has no tensor {missing[0]!r}")
        if wanted != graph.output_names:
            graph.outputs = [dataclasses.replace(graph.outputs[0], name=t, shape=None) for t in wanted]
            graph.cleanup()
        self.tensors = wanted
        self.session = ort_session(to_onnx(graph))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return ort_run_all(self.session, x, f"the teacher {self.path}", self.tensors)
