"""Choose what each graph output is for, once, from its values on a sample batch and the op that made it.

The batch axis is the first axis whose size is the sample batch size (give an unusual size, e.g. 3). Then, per
output, the first rule that holds:

1. Classes: batch first, [N, C] or [N, C, 1, 1] with C > 1, read from a Softmax/LogSoftmax whose values are
   distributions over axis 1; or a model's only output [N, C] that no Softmax makes and whose rows are not
   distributions (a classifier's logits); or, for the first output only, with class labels (`labels_kind="classes"`) or a
   `qatool.logits` tensor named in the metadata. With labels, probabilities without a Softmax stop the run.
2. Sequence (CTC): rank 3, batch axis 0 or 1, read from a Softmax/LogSoftmax whose values are distributions over
   the last axis, in a model of one output (with more, it is a detector's class scores [N, anchors, C]: Tensor);
   or the first output with text labels (`labels_kind="text"`). The `character` metadata, when
   it fits the class count (ctc.ctc_characters), gives the text.
3. ProbabilityMap: [N, 1, H, W] whose values all lie in [0, 1] (give or take float error: onnxruntime's Sigmoid
   returns 1.0000001).
4. ClassMap: [N, C, H, W], C > 1, read from a Softmax/LogSoftmax, distributions over axis 1.
5. Rows: [N, rows, fields] (or [N, fields, rows]: the fields on the shorter axis) where some fields lie in
   [0, 1] and others do not: a detector's one output joining box offsets or pixels with objectness and class
   probabilities (YOLOX, YOLOv5's [N, anchors, 4 + 1 + C], YOLOv8's [N, 4 + C, anchors]). Each field gets its own
   normalised MSE and SQNR (as one tensor its loss and measure would be the boxes' alone), and a row's box values
   count by float's confidence in it: the largest of its probability fields that are near zero on average.
6. Tensor: anything else.

The loss of Classes, Sequence and ClassMap is taken on the Softmax's input (the logits), over the Softmax's axis;
ProbabilityMap, Rows and Tensor take it on the output itself.

`choose_output_tasks` makes that choice from the float model's outputs on a probe batch. Before it, one choice
per run (`is_labelled_classifier`): a classifier whose data has labels keeps the classifier recipe
(cross-entropy, top-1); anything else (data without labels, a `.npy` folder, a model whose first output is not
one class score per image) trains by distillation from the float model and is judged against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import is_tensor_folder
from ..data.images import has_class_folders
from ..errors import ModelError, UsageError
from ..ir.graph import Graph
from .base import LOSS_HEADS, OutputTask, head_node, softmax_axis
from .ctc import ctc_characters
from .kinds import (ClassMap, Classes, ProbabilityMap, Rows, Sequence, Tensor, confidence_fields,
                    probability_fields)

LOGITS_KEY = "qatool.logits"
CHARACTER_KEY = "character"
LABEL_KINDS = (None, "classes", "text")
PROBE_IMAGES = 3  # the batch of the probe that chooses the tasks (a size no other axis is likely to have)


def _distributions(v: np.ndarray, axis: int, log: bool) -> bool:
    """Non-negative values summing to 1 over `axis` (exp of them, for log-probabilities)."""
    p = np.exp(v.astype(np.float64)) if log else v.astype(np.float64)
    return v.shape[axis] > 1 and bool((p >= -1e-6).all()) and bool(np.allclose(p.sum(axis=axis), 1.0, atol=1e-3))


def choose_tasks(graph: Graph, outputs: dict[str, np.ndarray], batch: int, metadata: dict | None = None,
                 labels_kind: str | None = None, *, temperature: float = 1.0, alpha: float = 1.0,
                 threshold: float = 0.3) -> list[OutputTask]:
    """One task per output in `outputs` (graph output order), each with `why` saying which rule chose it.
    `labels_kind`: None (no labels), "classes" (an integer per image) or "text" (a string per image); labels
    describe the first output only."""
    if labels_kind not in LABEL_KINDS:
        raise UsageError(f"labels_kind {labels_kind!r}: expected one of {LABEL_KINDS}")
    meta = {**graph.metadata, **(metadata or {})}
    names = [n for n in graph.output_names if n in outputs] + [n for n in outputs if n not in graph.output_names]
    opts = {"temperature": temperature, "alpha": alpha, "threshold": threshold}
    return [_choose(graph, n, np.asarray(outputs[n]), batch, meta, labels_kind if i == 0 else None, opts,
                    len(names))
            for i, n in enumerate(names)]


def _choose(graph, name, v, batch, meta, labels, opts, n_outputs) -> OutputTask:
    shape, rank = tuple(v.shape), v.ndim
    b = next((i for i, d in enumerate(shape) if d == batch), None)
    node = head_node(graph, name)
    soft = node is not None and node.op_type in LOSS_HEADS
    log = soft and node.op_type == "LogSoftmax"
    named = meta.get(LOGITS_KEY) if graph.output_names[:1] == [name] else None
    if named or not soft:
        logits, axis = named or name, None
    else:
        logits, axis = node.input(0), softmax_axis(node, graph.opset)
    head = f"after {node.op_type} {node.name or ''}".rstrip() if node is not None else "no Softmax/Sigmoid before it"
    where = f"loss on {logits!r}" if logits != name else "loss on the output"
    t, a = opts["temperature"], opts["alpha"]

    if not np.issubdtype(v.dtype, np.floating):
        return Tensor(name, batch_axis=b, why=f"{v.dtype} output {list(shape)}: measured only (no gradient)")
    if b == 0 and (rank == 2 or (rank == 4 and shape[2:] == (1, 1))) and shape[1] > 1:
        if (soft and _distributions(v, 1, log)) or named:
            return Classes(name, logits, temperature=t, alpha=a, loss_axis=axis if axis is not None else 1,
                           why=f"{list(shape)} {head}: class scores of {shape[1]} classes ({where})")
        if n_outputs == 1 and rank == 2 and not soft and not _distributions(v, 1, False):
            return Classes(name, temperature=t, alpha=a, why=f"the model's only output, {list(shape)} with no "
                                                              f"Softmax: logits of {shape[1]} classes ({where})")
        if labels == "classes":
            if _distributions(v, 1, False):
                raise UsageError(f"the model's output {name!r} looks like probabilities (non-negative, rows sum to "
                                 "1) and no Softmax/LogSoftmax was found before it: name the tensor that holds the "
                                 "logits with --logits TENSOR")
            return Classes(name, temperature=t, alpha=a, why=f"{list(shape)} with class labels: logits of "
                                                              f"{shape[1]} classes ({where})")
    sequence = soft and _distributions(v, 2, log) if rank == 3 and b in (0, 1) and shape[2] > 1 else False
    if sequence and not labels and n_outputs > 1:
        return Tensor(name, batch_axis=b, why=f"rank 3 {list(shape)} {head} over the last axis, but the model has "
                                              f"{n_outputs} outputs: class scores of a detector, not a CTC sequence")
    # PyTorch's CTC layout: a recogniser's only output, time-major [T, N, C] logits with no Softmax after them
    time_major = rank == 3 and b == 1 and shape[2] > 1 and not soft and n_outputs == 1 and shape[0] != batch
    if rank == 3 and b in (0, 1) and shape[2] > 1 and (sequence or labels == "text" or time_major):
        chars, note = _characters(meta, shape[2])
        reason = (f"{head} over the last axis" if soft else "with text labels" if labels == "text" else
                  "time-major, the model's only output, with no Softmax: logits")
        return Sequence(name, logits, batch_axis=b, temperature=t, loss_axis=axis if axis is not None else -1,
                        characters=chars, why=f"rank 3 {list(shape)} {reason}: a CTC sequence of {shape[2]} classes "
                                              f"over {shape[1 - b]} steps, batch axis {b} ({where}){note}")
    if rank == 4 and b == 0 and shape[1] == 1 and v.size and v.min() >= -1e-5 and v.max() <= 1 + 1e-5:
        return ProbabilityMap(name, threshold=opts["threshold"],
                              why=f"{list(shape)} in [0, 1] {head}: a probability map (threshold "
                                  f"{opts['threshold']:g})")
    if rank == 4 and b == 0 and shape[1] > 1 and soft and _distributions(v, 1, log):
        return ClassMap(name, logits, temperature=t, loss_axis=axis if axis is not None else 1,
                        why=f"{list(shape)} {head} over axis 1: per-pixel scores of {shape[1]} classes ({where})")
    if rank == 3 and b == 0 and v.size:
        rows = _joined_rows(name, v, head)
        if rows is not None:
            return rows
    batch_note = f"batch axis {b}" if b is not None else f"no axis of size {batch}: one image per update"
    return Tensor(name, batch_axis=b, why=f"rank {rank} {list(shape)} {head}: a plain tensor ({batch_note})")


def _joined_rows(name: str, v: np.ndarray, head: str) -> Rows | None:
    """A Rows task when [N, A, B]'s shorter axis (the fields; ties: the last) holds some fields in [0, 1] and some
    not, else None."""
    axis = 1 if v.shape[1] < v.shape[2] else 2
    probs = probability_fields(v, axis)
    if probs.all() or not probs.any():
        return None
    which, confidence = np.flatnonzero(probs), confidence_fields(v, axis)
    weighted = (f"the others' rows weighted by the largest of field{'s' if len(confidence) > 1 else ''} "
                f"{_listed(confidence)} (near zero on average: a confidence)" if confidence else
                "no probability field is near zero on average, so every row counts alike")
    return Rows(name, field_axis=axis, probabilities=which, confidence=confidence,
                why=f"rank 3 {list(v.shape)} {head}: rows of {v.shape[axis]} fields on axis {axis}, {len(which)} in "
                    f"[0, 1] (fields {_listed(which)}) and {v.shape[axis] - len(which)} not: a detector's joined "
                    f"boxes and scores, each field normalised on its own, {weighted}")


def _listed(fields) -> str:
    return ", ".join(str(i) for i in fields[:8]) + (", ..." if len(fields) > 8 else "")


def _characters(meta: dict, num_classes: int) -> tuple[list[str] | None, str]:
    text = meta.get(CHARACTER_KEY)
    if not text:
        return None, "; no character list"
    try:
        chars = ctc_characters(text, num_classes)
    except ModelError as e:
        return None, f"; character list ignored: {e}"
    return chars, f"; {len(chars)} characters from metadata {CHARACTER_KEY!r}"


# ---- per run: the recipe, and the tasks from the float model's outputs ------------------------------------------
def is_labelled_classifier(graph: Graph, data) -> bool:
    """The classifier recipe applies: the model's first output is [N, classes] and `data` has labels (class
    sub-folders or a list file)."""
    return recipe_reason(graph, data)[0]


def recipe_reason(graph: Graph, data) -> tuple[bool, str]:
    """(the classifier recipe applies, why): see `is_labelled_classifier`."""
    if graph.output_classes() is None:
        shape = graph.outputs[0].shape
        return False, f"the model's first output {graph.outputs[0].name!r} {shape} is not one score per class"
    if is_tensor_folder(data):
        return False, f"{data} holds .npy input tensors, without labels"
    p = Path(data)
    if p.is_file():
        return True, f"{data} is a list file of labelled images and the model outputs {graph.output_classes()} classes"
    if p.is_dir() and has_class_folders(p):
        return True, f"{data} has class sub-folders and the model outputs {graph.output_classes()} classes"
    return False, f"{data} has no class sub-folders (no labels)"


def choose_output_tasks(float_graph: Graph, float_model, data, distill_outputs=None, echo=print,
                        temperature: float = 1.0, map_threshold: float = 0.3):
    """One task per graph output (or per output named in `distill_outputs`), chosen from the float model's
    values (`float_model`: a batch -> {output: array} run) on a probe batch; each choice and its reason is
    printed."""
    group = data.groups[0]
    x, _ = data.batch(group[np.arange(min(PROBE_IMAGES, len(group)))])
    outputs = float_model(x)
    if distill_outputs:
        unknown = [n for n in distill_outputs if n not in outputs]
        if unknown:
            raise UsageError(f"--distill-outputs {', '.join(unknown)}: the model has no output of that name (its "
                             f"outputs: {', '.join(outputs)})")
        outputs = {n: outputs[n] for n in distill_outputs}
    tasks = choose_tasks(float_graph, outputs, len(x), float_graph.metadata, None, temperature=temperature,
                         threshold=map_threshold)
    for t in tasks:
        echo(f"output {t.output}: {t.kind} ({t.why}); loss: {t.loss_name} on {t.loss_tensor}")
    return tasks
