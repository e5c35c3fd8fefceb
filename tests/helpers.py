"""Shared test utilities: onnxruntime runs, random weights, light model paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.stem.removeprefix("light_") for p in LIGHT_DIR.glob("light_*.onnx"))
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_models"


def ort_run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def randomize_weights(graph, seed: int = 0) -> None:
    """Replace the weights of Conv/ConvTranspose/Gemm/MatMul/BN with random values of sane scale, in place."""
    rng = np.random.default_rng(seed)
    inits = graph.initializers

    def put(name, arr):
        if name and name in inits and np.issubdtype(inits[name].dtype, np.floating):
            inits[name] = arr.astype(inits[name].dtype).reshape(inits[name].shape)

    for n in graph.nodes:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input(1) in inits:
            w = inits[n.input(1)]
            fan_in = w.size // w.shape[0] if n.op_type == "Conv" else (
                w.shape[1] if n.op_type == "Gemm" and n.attrs.get("transB", 0) else w.shape[0])
            put(n.input(1), rng.standard_normal(w.shape) * np.sqrt(2.0 / max(fan_in, 1)))
            if n.input(2) in inits:
                put(n.input(2), rng.normal(0, 0.1, inits[n.input(2)].shape))
        if n.op_type == "BatchNormalization":
            c = inits[n.input(1)].shape
            put(n.input(1), rng.uniform(0.5, 1.5, c))
            put(n.input(2), rng.normal(0, 0.1, c))
            put(n.input(3), rng.normal(0, 0.1, c))
            put(n.input(4), rng.uniform(0.5, 1.5, c))


def assert_close_rel(got: np.ndarray, want: np.ndarray, rel: float = 1e-4, what: str = "") -> None:
    """Elementwise |got - want| <= rel * max|want| (relative to the output's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(np.abs(want).max(), 1e-12)
    err = np.abs(got - want).max() / scale
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"
