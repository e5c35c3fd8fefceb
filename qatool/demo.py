"""`qatool demo` / `make demo`: the pipeline on the bundled sample model and digits.

What exists so far: convert (training and inference forms), the engine checked against onnxruntime on real
data, and a short float fine-tune on the engine. QAT, int8 export and eval join as they land.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import api
from .errors import DataError
from .train.data import ImageDataset
from .train.loss import softmax_cross_entropy
from .train.optim import SGD
from .train.preprocess import METADATA_KEY, Preprocess

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DEFAULT_MODEL = SAMPLES / "lenet_bn.onnx"
DEFAULT_DATA = SAMPLES / "data" / "mnist"


def _top1(logits_batches, labels) -> float:
    return float(np.mean(np.concatenate([b.argmax(1) for b in logits_batches]) == labels))


def run_demo(output_dir: str | Path, echo: Callable[[str], None] = print, steps: int = 100,
             batch_size: int = 64, model_path: Path = DEFAULT_MODEL, data_dir: Path = DEFAULT_DATA) -> dict:
    import onnxruntime as ort

    import qatool.engine

    if not model_path.is_file() or not (data_dir / "val").is_dir():
        raise DataError(f"the demo needs the bundled sample model and data ({model_path}, {data_dir}); "
                        "run it from a clone of the qatool repository")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"[1/4] convert {model_path.name} --for-training and for inference")
    train_path, infer_path = out / "train.onnx", out / "float.onnx"
    for line in api.convert(model_path, train_path, for_training=True).summary_lines():
        echo("      " + line)
    api.convert(model_path, infer_path, for_training=False)

    model = qatool.engine.load(train_path, seed=0)
    pre = Preprocess.from_json(model.graph.metadata[METADATA_KEY])
    echo(f"[2/4] load digits from {data_dir} ({pre.size[0]}x{pre.size[1]} {pre.color})")
    train = ImageDataset.open(data_dir / "train").load(pre)
    val = ImageDataset.open(data_dir / "val").load(pre)
    echo(f"      {len(train)} training and {len(val)} validation images")

    echo("[3/4] engine (eval mode) against onnxruntime on the validation images")
    sess = ort.InferenceSession(str(infer_path), providers=["CPUExecutionProvider"])
    name = model.input_names[0]
    ort_logits = [sess.run(None, {name: x})[0] for x, _ in val.batches(256)]
    eng_logits = [model.forward({name: x})[0] for x, _ in val.batches(256)]
    top1_ort, top1_eng = _top1(ort_logits, val.labels), _top1(eng_logits, val.labels)
    agree = float(np.mean(np.concatenate(ort_logits).argmax(1) == np.concatenate(eng_logits).argmax(1)))
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_logits, eng_logits))
    echo(f"      top-1 onnxruntime {top1_ort:.4f}, engine {top1_eng:.4f}, agreement {agree:.4f}, "
         f"max |diff| {max_diff:.2e}")

    echo(f"[4/4] float fine-tune on the engine: {steps} steps, batch {batch_size}, SGD lr 1e-3 momentum 0.9")
    rng = np.random.default_rng(0)
    opt = SGD(model.params, lr=1e-3, momentum=0.9)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = train.batch(rng.integers(0, len(train), batch_size))
        loss, dlogits = softmax_cross_entropy(model.forward({name: x}, training=True)[0], y)
        opt.step(model.backward([dlogits]))
        losses.append(loss)
    ms = (time.perf_counter() - t0) * 1000 / steps
    top1_tuned = _top1([model.forward({name: x})[0] for x, _ in val.batches(256)], val.labels)
    model.save(out / "finetuned.onnx")
    echo(f"      loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}; {ms:.1f} ms/step; "
         f"val top-1 {top1_tuned:.4f}")
    echo("")
    echo(f"{'model':<28}{'val top-1':>10}")
    echo(f"{'float (onnxruntime)':<28}{top1_ort:>10.4f}")
    echo(f"{'float (qatool engine)':<28}{top1_eng:>10.4f}")
    echo(f"{'fine-tuned (qatool engine)':<28}{top1_tuned:>10.4f}")
    echo(f"files in {out}/: train.onnx, float.onnx, finetuned.onnx")
    return {"top1_ort": top1_ort, "top1_engine": top1_eng, "agreement": agree, "top1_finetuned": top1_tuned,
            "ms_per_step": ms}
