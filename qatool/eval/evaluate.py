"""`qatool eval`: accuracy, agreement, size and latency of several models on one image data set.

Each model runs on a back end: `ort` (onnxruntime CPU on the file: any ONNX model, float or int8) or `engine`
(qatool's own executor in eval mode: a QAT checkpoint runs its fake-quant simulation, any other float model runs
as it is). So `qatool eval qat.onnx model_int8.onnx --backend engine --backend ort` compares what training
simulated with what onnxruntime deploys, on the same images.

Each model's preprocessing is its metadata's (or the overrides'); images are decoded once per distinct
preprocessing. Accuracy and agreement are computed over every readable image; latency is the warm median of
several runs on already-preprocessed tensors (decoding and normalisation are not timed).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, ModelError, UsageError
from ..ir.graph import Graph
from ..ir.io import atomic_write_bytes, load_graph, report_json
from ..data.images import ImageDataset, LoadedImages, StreamingImages
from ..data.preprocess import Preprocess, resolve_preprocess
from ..runtime.backends import (agreement, engine_logits, latency_ms, ort_logits, ort_run, ort_run_all, ort_session,
                                top1, topk)

BACKENDS = ("ort", "engine")
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "eval-report.schema.json"
DEFAULT_BATCH_SIZE = 64
LATENCY_RUNS_BATCH1 = 10
LATENCY_RUNS_BATCH = 5
LATENCY_BUDGET_S = 2.0  # per measurement (batch 1, batch N) and model, after the untimed warm-up run
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QGemm"}


@dataclass
class _Entry:
    """One model to evaluate, checked before anything runs."""

    path: Path
    backend: str
    graph: Graph
    preprocess: Preprocess
    fixed_batch: int | None  # the input's batch dimension when the model fixes it


def evaluate(models, data, backend="ort", batch_size: int = DEFAULT_BATCH_SIZE,
             preprocess_overrides: dict | None = None, threads: int | None = None, labels=None,
             latency: bool = True, json_path=None) -> dict:
    """Evaluate `models` (paths) on the image folder or list file `data`; returns the report (see
    schemas/eval-report.schema.json) and writes it atomically to `json_path` when given.

    `backend` is "ort" or "engine" for every model, or a sequence with one per model. `preprocess_overrides` may
    hold size/color/mean/std and wins over each model's metadata. `threads` sets onnxruntime's intra-op threads
    (None: onnxruntime's default). `labels` is a file of class names, one per line, in output order.
    `latency=False` skips the timing (the latency fields are null).
    """
    models = [Path(m) for m in models]
    if not models:
        raise UsageError("give at least one model to evaluate")
    backends = _backends(backend, len(models))
    if batch_size < 1:
        raise UsageError(f"the batch size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise UsageError(f"the thread count must be at least 1, got {threads}")
    if json_path is not None:
        target = Path(json_path).resolve()
        if any(target == m.resolve() for m in models):
            raise UsageError(f"--json {json_path} is one of the models; choose another file for the report")

    from ..tasks.choose import is_labelled_classifier
    from ..tasks.heads import folder_class_names

    first_graph = load_graph(models[0])  # ModelError when missing or not ONNX
    if not is_labelled_classifier(first_graph, data):
        report = _evaluate_any(models, backends, first_graph, data, batch_size, preprocess_overrides, threads,
                               latency)
        if json_path is not None:
            write_report(report, json_path)
        return report
    dataset = ImageDataset.open(data, folder_class_names(first_graph, data, labels))  # the first model's classes
    entries = [_check_model(m, b, dataset, preprocess_overrides, first_graph if i == 0 else None)
               for i, (m, b) in enumerate(zip(models, backends))]

    decoded: dict[tuple, LoadedImages] = {}  # decoding depends on size and colour only; mean/std apply per batch
    loaded: dict[Preprocess, LoadedImages] = {}
    results: list[dict] = []
    first: tuple[np.ndarray, np.ndarray] | None = None  # (sample indices, logits) of the first model
    for entry in entries:
        pre = entry.preprocess
        if pre not in loaded:
            key = (tuple(pre.size), pre.color)
            if key not in decoded:
                decoded[key] = dataset.load(pre)
            base = decoded[key]
            loaded[pre] = (LoadedImages(base.images, base.labels, pre, base.skipped)
                           if isinstance(base, LoadedImages) else StreamingImages(dataset, pre))
        images = loaded[pre]
        kept = _kept_indices(dataset, images)
        result, logits = _evaluate_one(entry, images, dataset.num_classes, batch_size, threads, latency)
        if first is None:
            first = (kept, logits)
        else:
            result["agreement_top1"] = _agreement(first, (kept, logits))
        results.append(result)

    skipped = sorted({str(p) for imgs in loaded.values() for p in imgs.skipped})
    report = {
        "qatool_version": _qatool_version(),
        "data": str(data),
        "images": len(dataset),
        "skipped_images": len(skipped),
        "classes": dataset.num_classes,
        "backend": backends[0] if len(set(backends)) == 1 else "mixed",
        "batch_size": batch_size,
        "threads": threads,
        "latency": {"runs_batch1": LATENCY_RUNS_BATCH1, "runs_batch": LATENCY_RUNS_BATCH,
                    "budget_s": LATENCY_BUDGET_S} if latency else None,
        "machine": machine_facts(),
        "results": results,
    }
    if json_path is not None:
        write_report(report, json_path)
    return report


def _evaluate_any(models, backends, first_graph, data, batch_size, overrides, threads, latency) -> dict:
    """Any model, data without labels: the first model is the reference; every other one is measured against it
    by what each output is for (qatool.tasks: decoded sequences, thresholded maps, top-1, SQNR, cosine)."""
    from ..convert import normalize
    from ..tasks.judge import Judge
    from ..data.unlabelled import data_kind, load_unlabelled, unlabelled_preprocess
    from ..tasks.choose import choose_output_tasks

    reference = normalize(first_graph, for_training=False, free_batch=True).graph
    pre = unlabelled_preprocess(reference, data, None, overrides)
    images, _ = load_unlabelled(reference, data, None, pre)
    runs = [_output_runner(m, b, threads) for m, b in zip(models, backends)]
    tasks = choose_output_tasks(reference, runs[0], images, echo=lambda s: None)
    judge = Judge(tasks, runs[0], images, min(batch_size, 64))
    results = []
    for i, (path, backend, run) in enumerate(zip(models, backends, runs)):
        measured = judge.measure(run) if i else None
        result = {"model": str(path), "backend": backend, "images": len(images),
                  "preprocess": json.loads(pre.to_json()) if pre is not None else None,
                  "top1": None, "top5": None, "agreement_top1": None,
                  "measure": measured["score_name"] if measured else None,
                  "score": measured["score"] if measured else None,
                  "outputs": measured["outputs"] if measured else None,
                  "size_bytes": Path(path).stat().st_size, "latency_ms_batch1": None, "latency_ms_batch": None,
                  "latency_batch_size": None}
        if latency:
            group = images.groups[0]
            nb = min(batch_size, len(group))
            ms1, _ = latency_ms(run, images.batch(group[:1])[0], LATENCY_RUNS_BATCH1, LATENCY_BUDGET_S)
            msb, _ = latency_ms(run, images.batch(group[:nb])[0], LATENCY_RUNS_BATCH, LATENCY_BUDGET_S)
            result.update(latency_ms_batch1=round(ms1, 4), latency_ms_batch=round(msb, 4), latency_batch_size=nb)
        results.append(result)
    return {"qatool_version": _qatool_version(), "data": str(data), "images": len(images),
            "skipped_images": len(getattr(images, "skipped", [])), "classes": None,
            "data_kind": data_kind(images), "tasks": [t.to_dict() for t in tasks],
            "backend": backends[0] if len(set(backends)) == 1 else "mixed", "batch_size": batch_size,
            "threads": threads, "latency": {"runs_batch1": LATENCY_RUNS_BATCH1, "runs_batch": LATENCY_RUNS_BATCH,
                                            "budget_s": LATENCY_BUDGET_S} if latency else None,
            "machine": machine_facts(), "results": results}


def _output_runner(path: Path, backend: str, threads: int | None):
    """A batch -> {output name: array} run of the model file on its back end (every graph output)."""
    if backend == "ort":
        sess = ort_session(str(path), threads=threads)
        names = [o.name for o in sess.get_outputs()]
        return lambda x: dict(zip(names, ort_run_all(sess, x, path.name)))
    from ..train.checkpoint import is_checkpoint

    graph = load_graph(path)
    if is_checkpoint(graph):
        from ..train.checkpoint import load_checkpoint
        from ..train.session import QatSession

        model = QatSession.from_checkpoint(load_checkpoint(path)).model
    else:
        from .. import engine

        model = engine.load(graph)
    name = model.input_names[0]
    return lambda x: dict(zip(model.output_names, model.forward({name: x}, training=False)))


def write_report(report: dict, path) -> None:
    try:
        atomic_write_bytes(path, report_json(report))
    except OSError as e:
        raise UsageError(f"cannot write the report {path}: {e.strerror or e}") from e


# ---- checks before running ---------------------------------------------------------------------------------------
def _backends(backend, n: int) -> list[str]:
    given = [backend] if isinstance(backend, str) else list(backend or ["ort"])
    for b in given:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend {b!r}; choose one of {', '.join(BACKENDS)}")
    if len(given) == 1:
        return given * n
    if len(given) != n:
        raise UsageError(f"--backend is given {len(given)} times for {n} models: give it once (for all models) "
                         "or once per model, in the models' order")
    return given


def _check_model(path: Path, backend: str, dataset: ImageDataset, overrides: dict | None,
                 graph: Graph | None = None) -> _Entry:
    from ..train.checkpoint import is_checkpoint

    graph = graph or load_graph(path)  # ModelError when missing or not ONNX
    pre = resolve_preprocess(graph, overrides)
    classes = graph.output_classes()
    if classes is not None and dataset.num_classes > classes:
        raise DataError(f"the data has {dataset.num_classes} classes but {path.name} has {classes} outputs")
    if backend == "engine" and not is_checkpoint(graph):
        quantized = sorted({n.op_type for n in graph.nodes} & QUANTIZED_OPS)
        if quantized:
            raise ModelError(f"{path.name} is a quantized model ({', '.join(quantized)}); the engine backend runs "
                             "float models and qatool QAT checkpoints (qat.onnx): use --backend ort for it")
    dim0 = graph.inputs[0].shape[0] if graph.inputs[0].shape else None
    fixed = dim0 if isinstance(dim0, int) and dim0 > 0 else None
    return _Entry(path, backend, graph, pre, fixed)


# ---- running ------------------------------------------------------------------------------------------------------
def _runner(entry: _Entry, threads: int | None):
    """(run one batch -> logits, logits over a data set with a batch size) for the entry's back end."""
    if entry.backend == "ort":
        sess = ort_session(str(entry.path), threads=threads)
        what = entry.path.name
        return (lambda x: ort_run(sess, x, what)), (lambda data, bs: ort_logits(sess, data, bs, what))

    from ..train.checkpoint import is_checkpoint

    if is_checkpoint(entry.graph):
        from ..train.checkpoint import load_checkpoint
        from ..train.session import QatSession

        session = QatSession.from_checkpoint(load_checkpoint(entry.path))
        model, output = session.model, session.logits
    else:
        from .. import engine

        model, output = engine.load(entry.graph), None
    name = model.input_names[0]
    outs = [output] if output else None
    return ((lambda x: model.forward({name: x}, training=False, outputs=outs)[0]),
            (lambda data, bs: engine_logits(model, data, output, bs)))


def _padded(x: np.ndarray, n: int) -> np.ndarray:
    """`x` with its last image repeated up to a batch of `n` (for models with a fixed batch dimension)."""
    return x if len(x) >= n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def _evaluate_one(entry: _Entry, images: LoadedImages, num_classes: int, batch_size: int, threads: int | None,
                  latency: bool) -> tuple[dict, np.ndarray]:
    run, logits_of = _runner(entry, threads)
    fixed = entry.fixed_batch
    if fixed is None or fixed == 1:
        logits = np.asarray(logits_of(images, fixed or batch_size))
    else:  # a fixed batch of N > 1: pad the last batch, keep the real images' rows
        logits = np.concatenate([run(_padded(x, fixed))[:len(x)] for x, _ in images.batches(fixed)])
    if logits.ndim != 2 or logits.shape[0] != len(images):
        raise ModelError(f"{entry.path.name}: the first output has shape {logits.shape}, expected "
                         f"({len(images)}, classes)")
    if logits.shape[1] < num_classes:
        raise DataError(f"the data has {num_classes} classes but {entry.path.name} has {logits.shape[1]} outputs")
    result = {
        "model": str(entry.path),
        "backend": entry.backend,
        "preprocess": json.loads(entry.preprocess.to_json()),
        "images": len(images),
        "top1": top1(logits, images.labels),
        "top5": topk(logits, images.labels, 5),
        "agreement_top1": None,
        "size_bytes": entry.path.stat().st_size,
        "latency_ms_batch1": None,
        "latency_ms_batch": None,
        "latency_batch_size": None,
    }
    if latency:
        n1 = fixed or 1
        nb = fixed or min(batch_size, len(images))
        x1 = _padded(images.batch(np.arange(min(n1, len(images))))[0], n1)
        xb = _padded(images.batch(np.arange(min(nb, len(images))))[0], nb)
        ms1, _ = latency_ms(run, x1, LATENCY_RUNS_BATCH1, LATENCY_BUDGET_S)
        msb, _ = latency_ms(run, xb, LATENCY_RUNS_BATCH, LATENCY_BUDGET_S)
        result.update(latency_ms_batch1=round(ms1, 4), latency_ms_batch=round(msb, 4), latency_batch_size=nb)
    return result, logits


def _kept_indices(dataset: ImageDataset, images: LoadedImages) -> np.ndarray:
    """Indices into dataset.samples of the images that were decoded (in order). A streamed set keeps every
    sample (an unreadable one is evaluated as a blank image)."""
    if not images.skipped or isinstance(images, StreamingImages):
        return np.arange(len(dataset))
    skipped = set(images.skipped)
    return np.array([i for i, (p, _) in enumerate(dataset.samples) if p not in skipped], np.int64)


def _agreement(first: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Share of the images both models saw where they predict the same class. Each argument is
    (indices into the data set's samples, logits of those images)."""
    (ia, la), (ib, lb) = first, other
    if len(ia) == len(ib) and np.array_equal(ia, ib):
        return agreement(la, lb)
    _, ja, jb = np.intersect1d(ia, ib, return_indices=True)
    return agreement(la[ja], lb[jb]) if len(ja) else None


def machine_facts() -> dict:
    import onnx
    import onnxruntime

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_available": available, "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__}


def _qatool_version() -> str:
    from .. import __version__

    return __version__


# ---- the table ----------------------------------------------------------------------------------------------------
def format_size(n: int) -> str:
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.2f} MB"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def format_table(report: dict) -> list[str]:
    """The side-by-side table: one row per model, plus a header line and a note on agreement."""
    if report.get("tasks") is not None:
        return _format_any(report)
    results = report["results"]
    names = [Path(r["model"]).name for r in results]
    if len(set(names)) < len(names):  # the same file name twice: show the paths as given
        names = [r["model"] for r in results]
    bs = report["batch_size"]
    sizes = {r["latency_batch_size"] for r in results if r["latency_batch_size"] is not None}
    nb = sizes.pop() if len(sizes) == 1 else bs
    header = ["model", "backend", "top-1", "top-5", "agree", "size", "ms b=1", f"ms b={nb}"]
    rows = []
    for name, r in zip(names, results):
        msb = _ms(r["latency_ms_batch"])
        if r["latency_batch_size"] not in (None, nb):
            msb += f" (b={r['latency_batch_size']})"
        rows.append([name, r["backend"], _pct(r["top1"]), _pct(r["top5"]), _pct(r["agreement_top1"]),
                     format_size(r["size_bytes"]), _ms(r["latency_ms_batch1"]), msb])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    threads = report["threads"] or "onnxruntime default"
    skipped = f", {report['skipped_images']} unreadable skipped" if report["skipped_images"] else ""
    out = [f"{report['images']} images{skipped}, {report['classes']} classes from {report['data']}; "
           f"threads: {threads}", line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    out.append("agree: share of images whose top-1 class equals the first model's; "
               "latency: warm median in ms, preprocessing not timed")
    return out


def _format_any(report: dict) -> list[str]:
    """The table of a run without labels: each model's measures against the first."""
    from ..tasks.judge import describe

    out = [f"{report['images']} {report['data_kind']} from {report['data']} (no labels); the first model is the "
           "reference; threads: " + str(report["threads"] or "onnxruntime default")]
    for t in report["tasks"]:
        out.append(f"output {t['output']}: {t['kind']} ({t['why']})")
    for r in report["results"]:
        speed = (f"{_ms(r['latency_ms_batch1'])} ms at b=1, {_ms(r['latency_ms_batch'])} ms at "
                 f"b={r['latency_batch_size']}" if r["latency_ms_batch1"] is not None else "not timed")
        head = f"{Path(r['model']).name} ({r['backend']}, {format_size(r['size_bytes'])}, {speed})"
        out.append(head + (f": {describe({'outputs': r['outputs']})}" if r["outputs"] else ": the reference"))
    return out
