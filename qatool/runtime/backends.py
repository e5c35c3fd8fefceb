"""Running a model over a data set: onnxruntime (any ONNX file) or qatool's engine (its simulation)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ModelError


def ort_session(model: onnx.ModelProto | str, threads: int | None = None,
                level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad models
        raise ModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e


def ort_run(sess: ort.InferenceSession, x: np.ndarray, what: str = "the model") -> np.ndarray:
    """The first output for one batch; onnxruntime's own exceptions (wrong input type or shape, a quantization
    parameter its kernel cannot take, ...) become one ModelError line naming `what`."""
    return ort_run_all(sess, x, what)[0]


def ort_run_all(sess: ort.InferenceSession, x: np.ndarray, what: str = "the model",
                outputs: list[str] | None = None) -> list[np.ndarray]:
    """Every output (or `outputs`) for one batch, in order (errors as `ort_run`). A model whose input declares a
    fixed batch of 1 (one whose batch could not be freed), or whose numerics hold per input (an int8 model with
    onnxruntime's DynamicQuantizeLSTM: `ir.batch.PER_INPUT_KEY`), runs image by image, its outputs joined on their
    batch axis."""
    from ..ir.batch import ort_run_per_image

    try:
        return ort_run_per_image(sess, {sess.get_inputs()[0].name: x}, output_names=outputs)
    except Exception as e:
        if type(e).__module__.startswith("onnxruntime"):
            raise ModelError(f"onnxruntime failed to run {what}: {str(e).splitlines()[0]}") from e
        raise


MAX_EVAL_BATCH = 256
EVAL_INPUT_BYTES = 16 * 1024**2  # float input per evaluation batch: ~27 images at 3x224x224, 256 at 28x28
DEFAULT_MEMORY_BUDGET = 1024**3  # intermediate values of an engine evaluation batch (`qatool --max-memory`)
_budget = {"bytes": DEFAULT_MEMORY_BUDGET}


def set_memory_budget(nbytes: int) -> None:
    """The bytes of intermediate values an engine evaluation batch may hold (`qatool --max-memory`)."""
    if nbytes < 1:
        raise ValueError("the memory budget must be positive")
    _budget["bytes"] = int(nbytes)


def engine_batch_size(model, data, outputs: list[str] | None = None) -> int:
    """The batch of an engine evaluation asking for `outputs`: as many images as fit the memory budget, from
    the intermediate values one image needs (`Model.activation_bytes`, measured once per model and outputs),
    at most the input-sized batch (`eval_batch_size`): the size of the data set never changes peak memory.
    1 for a model whose batch of 1 could not be freed (`Model.fixed_batch`)."""
    if model.fixed_batch is not None:
        return 1
    cache = model.__dict__.setdefault("_bytes_per_image", {})
    key = tuple(outputs or ())
    if key not in cache:
        x, _ = data.batch(np.arange(1))
        cache[key] = max(1, model.activation_bytes({model.input_names[0]: x}, outputs))
    return int(max(1, min(eval_batch_size(data), _budget["bytes"] // cache[key])))


def eval_batch_size(data) -> int:
    """The batch of an evaluation pass, from the size of one input: a model's activations are some tens of times
    its input, so a fixed input budget bounds the working set whatever the number of images."""
    return int(max(1, min(MAX_EVAL_BATCH, EVAL_INPUT_BYTES // data.input_bytes())))


def ort_logits(sess: ort.InferenceSession, data, batch_size: int | None = None,
               what: str = "the model") -> np.ndarray:
    bs = batch_size or eval_batch_size(data)
    return np.concatenate([ort_run(sess, x, what) for x, _ in data.batches(bs)])


def engine_logits(model, data, output: str | None = None, batch_size: int | None = None) -> np.ndarray:
    """Eval-mode logits of an engine Model (`output` names another tensor than the first graph output)."""
    name = model.input_names[0]
    outs = [output] if output else None
    bs = batch_size or engine_batch_size(model, data, outs)
    return np.concatenate([model.forward({name: x}, training=False, outputs=outs)[0].reshape(len(x), -1)
                           for x, _ in data.batches(bs)])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean((best == labels[:, None]).any(axis=1)))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def latency_ms(run, x: np.ndarray, runs: int, budget_s: float = 2.0) -> tuple[float, int]:
    """Warm latency of `run(x)` in milliseconds: one untimed run, then up to `runs` timed runs (at least one,
    fewer once `budget_s` seconds have been spent timing). Returns (median ms, timed runs)."""
    import time

    run(x)  # warm-up: first-run allocations, kernel selection, caches
    times: list[float] = []
    spent = 0.0
    while len(times) < max(runs, 1) and (not times or spent < budget_s):
        t0 = time.perf_counter()
        run(x)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return float(np.median(times) * 1e3), len(times)


def float_inference_session(float_graph) -> ort.InferenceSession:
    """The float model on onnxruntime in its inference form (BN folded, Dropout removed)."""
    from ..convert import normalize
    from ..ir.graph import to_onnx

    return ort_session(to_onnx(normalize(float_graph, for_training=False).graph))


def float_outputs(float_graph, data) -> np.ndarray:
    """The float model's first output on `data`, run by onnxruntime in its inference form."""
    return ort_logits(float_inference_session(float_graph), data)


class FloatModel:
    """The float model's graph outputs on onnxruntime (its inference form), as {name: array} per batch: the
    reference every label-free measure compares with."""

    def __init__(self, float_graph):
        self.session = float_inference_session(float_graph)
        self.input_name = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict:
        return dict(zip(self.names, ort_run_all(self.session, x, "the float model")))
