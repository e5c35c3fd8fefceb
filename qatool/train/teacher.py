"""The teacher of distillation QAT: a float model run by onnxruntime in eval mode."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..convert import normalize_proto
from ..errors import ModelError
from ..eval.backends import ort_session
from ..ir.graph import to_onnx
from ..ir.io import load_proto
from .heads import logits_tensor


class Teacher:
    """Gives the teacher's logits for a batch (a final Softmax/LogSoftmax is cut off: the loss needs logits)."""

    def __init__(self, path: str | os.PathLike):
        graph = normalize_proto(load_proto(path), for_training=False).graph
        out = graph.outputs[0]
        logits = logits_tensor(graph)
        if logits != out.name:
            graph.outputs = [dataclasses.replace(out, name=logits, shape=None)]
            graph.cleanup()
        self.session = ort_session(to_onnx(graph))
        self.input_name = self.session.get_inputs()[0].name
        self.path = str(path)

    def logits(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run(None, {self.input_name: x})[0]
            return out.reshape(len(out), -1)
        except Exception as e:  # onnxruntime's own error types
            raise ModelError(f"the teacher {self.path} cannot run on the training images: "
                             f"{str(e).splitlines()[0]}") from e
