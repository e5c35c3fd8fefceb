"""A user's own measure: `--metric FILE.py:FUNCTION`, a Python function `(outputs, batch) -> score`.

`outputs` is {output name: array} of the model being judged (the int8 model on onnxruntime, the simulation)
for one batch, `batch` the input array of that batch (N, C, H, W, preprocessed). It returns a number (higher is
better); the run's score is the mean over the images (each batch's score weighted by its size). A detector's
mAP with its own NMS and decoding can so choose the checkpoint. The function is loaded once, from the file, by
path; any error it raises stops the run with one line naming it.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from ..errors import UsageError


class UserMetric:
    def __init__(self, spec: str):
        path, sep, name = str(spec).rpartition(":")
        if not sep or not path or not name:
            raise UsageError(f"--metric {spec}: expected FILE.py:FUNCTION")
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"--metric {spec}: no file {file}")
        module_spec = importlib.util.spec_from_file_location(f"qatool_user_metric_{file.stem}", file)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"--metric {spec}: {file} is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's code: any error at all
            raise UsageError(f"--metric {spec}: loading {file} raised {type(e).__name__}: {e}") from e
        fn = getattr(module, name, None)
        if not callable(fn):
            raise UsageError(f"--metric {spec}: {file} has no function {name!r}")
        self.fn, self.spec = fn, str(spec)
        self.name = f"{name} ({file.name})"

    def start(self) -> _Mean:
        return _Mean(self)

    def score(self, outputs: dict, batch: np.ndarray) -> float:
        try:
            value = self.fn(outputs, batch)
        except Exception as e:  # the user's code
            raise UsageError(f"--metric {self.spec} raised {type(e).__name__}: {e}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--metric {self.spec} returned {type(value).__name__}, not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"--metric {self.spec} returned {value}")
        return value


class _Mean:
    """The image-weighted mean of a metric's batch scores."""

    def __init__(self, metric: UserMetric):
        self.metric, self.total, self.images = metric, 0.0, 0

    def update(self, outputs: dict, batch: np.ndarray, labels=None) -> None:
        self.total += self.metric.score(outputs, batch) * len(batch)
        self.images += len(batch)

    def result(self) -> float:
        return self.total / self.images if self.images else math.nan
