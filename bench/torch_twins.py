"""The PyTorch twins of the sample models, shared by the benchmarks (development only: needs torch==2.13.0).

A twin is the module class from sample_models/make_models.py, filled with the ONNX file's initializers by
state_dict name (the TorchScript exporter keeps those names), so PyTorch and qatool start from the very same
float weights. qatool itself never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
if str(SAMPLES) not in sys.path:
    sys.path.insert(0, str(SAMPLES))


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """name -> array of every initializer of the ONNX file."""
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def torch_module(name: str, weights: dict[str, np.ndarray]):
    """The make_models.py module for `name`, with the ONNX initializers copied in by state_dict name."""
    import torch

    import make_models

    module = make_models.MODELS[name][0]()
    state = module.state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in weights or tuple(weights[key].shape) != tuple(value.shape):
            raise SystemExit(f"{name}: the ONNX file has no initializer {key!r} shaped {tuple(value.shape)}")
        state[key] = torch.from_numpy(np.array(weights[key], dtype=np.float32))
    module.load_state_dict(state)
    return module
