"""What a classifier's graph says about its head: the tensor to take the loss on, and its class names.

Logits
    Exported classifiers end in many ways: logits straight from a Gemm; Softmax; Softmax -> Reshape -> Identity
    (Paddle); LogSoftmax; a 1x1 Conv head and Flatten. Cross-entropy must be taken on logits, never on
    probabilities (softmax twice: weak, distorted gradients). `logits_tensor` walks back from the first graph
    output through ops that only move values (SHAPE_ONLY) and, if it meets a Softmax or LogSoftmax, takes that
    op's input. A tensor named in the model's `qatool.logits` metadata (`train-quant --logits`) wins.
    `looks_like_probabilities` tells when the output is probabilities anyway (a softmax written out as
    Exp/ReduceSum/Div, say), so the run can stop and ask for --logits instead of training on them.

Class names
    Models often carry their class names in the metadata, in output order (Paddle's `character`, or `labels`,
    `classes`, `class_names`), as one name per line, a JSON list, or comma-separated. Image folders sort by
    name, which is not that order once there are ten classes or the names are numbers ("0", "90", "180",
    "270" sort as 0, 180, 270, 90). `model_class_names` reads them; every output model stores the names it
    was trained with under CLASSES_KEY, one per line.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import UsageError
from ..ir.graph import Graph
from .base import pre_softmax

LOGITS_KEY = "qatool.logits"
CLASSES_KEY = "qatool.classes"
CLASS_NAME_KEYS = (CLASSES_KEY, "character", "labels", "classes", "class_names", "names")


def logits_tensor(graph: Graph) -> str:
    """The tensor to take the loss on: `qatool.logits` from the metadata if set, else the input of a final
    Softmax/LogSoftmax reached through shape-only ops, else the first graph output."""
    return graph.metadata.get(LOGITS_KEY) or pre_softmax(graph, graph.output_names[0]) or graph.output_names[0]


def set_logits(graph: Graph, name: str) -> None:
    """Record `name` as the logits tensor (`--logits`); it must be a value of the graph."""
    values = set(graph.input_names) | {o for n in graph.nodes for o in n.outputs if o}
    if name not in values:
        outputs = [o for n in graph.nodes[-8:] for o in n.outputs if o]
        raise UsageError(f"--logits {name}: the model has no tensor of that name (its last tensors: "
                         f"{', '.join(outputs)})")
    graph.metadata[LOGITS_KEY] = name


def looks_like_probabilities(values: np.ndarray) -> bool:
    """Every row non-negative and summing to 1 (within float error): softmax outputs, not logits."""
    v = np.asarray(values, np.float64).reshape(len(values), -1)
    return v.shape[1] > 1 and bool((v >= 0).all()) and bool(np.allclose(v.sum(axis=1), 1.0, atol=1e-3))


def check_logits(values: np.ndarray, graph: Graph, tensor: str) -> None:
    """Refuse to train on probabilities: the chosen tensor must not look like a softmax output."""
    if graph.metadata.get(LOGITS_KEY) or not looks_like_probabilities(values):
        return
    raise UsageError(f"the model's output {tensor!r} looks like probabilities (non-negative, rows sum to 1) and no "
                     "Softmax/LogSoftmax was found before it: name the tensor that holds the logits with "
                     "--logits TENSOR")


def parse_class_names(text: str) -> list[str] | None:
    """Class names from a metadata value: a JSON list (or dict index -> name), else lines, else commas."""
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, list) and len(value) > 1:
        return [str(v) for v in value]
    if isinstance(value, dict) and len(value) > 1:
        try:
            return [str(value[k]) for k in sorted(value, key=int)]
        except ValueError:
            return None
    for sep in ("\n", ","):
        names = [s.strip() for s in text.split(sep) if s.strip()]
        if len(names) > 1:
            return names
    return None


def model_class_names(graph: Graph) -> tuple[str, list[str]] | None:
    """(metadata key, class names in output order) if the model names its classes; None otherwise."""
    for key in CLASS_NAME_KEYS:
        if key in graph.metadata:
            names = parse_class_names(graph.metadata[key])
            if names:
                return key, names
    return None


def store_class_names(graph: Graph, names: list[str]) -> None:
    graph.metadata[CLASSES_KEY] = "\n".join(names)


def folder_class_names(graph: Graph, data_path, labels_file=None, echo=None) -> list[str] | None:
    """The class order to read an image folder in, for this model: the --labels file, else the class names in
    the model's metadata when the folders carry those names, else None (sorted folder names)."""
    from pathlib import Path

    from ..data.images import read_class_names

    say = echo or (lambda s: None)
    if labels_file:
        return read_class_names(labels_file)
    named = model_class_names(graph)
    root = Path(data_path)
    if named is None or not root.is_dir():
        return None
    key, names = named
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if set(folders) <= set(names):
        if folders != names:
            say(f"class order from the model's metadata ({key!r}): {', '.join(names)}")
        return names
    say(f"note: the class folders of {root} ({', '.join(folders[:6])}) are not the class names in the model's "
        f"metadata {key!r} ({', '.join(names[:6])}); the classes follow the sorted folder names (--labels FILE "
        "gives the folder of each output, in output order)")
    return None


def matched_order(labels: np.ndarray, predictions: np.ndarray, n_outputs: int) -> tuple[float, dict[int, int]]:
    """The one-to-one relabelling (class index -> output) that the predictions fit best, greedily from the
    largest cell of the confusion matrix, and the accuracy under it."""
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    confusion = np.zeros((n_labels, n_outputs), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    mapping: dict[int, int] = {}
    used: set[int] = set()
    for flat in np.argsort(-confusion, axis=None, kind="stable"):
        i, j = divmod(int(flat), n_outputs)
        if confusion[i, j] == 0:
            break
        if i not in mapping and j not in used:
            mapping[i] = j
            used.add(j)
    hits = sum(int(confusion[i, j]) for i, j in mapping.items())
    return hits / max(len(labels), 1), mapping


def near_chance(top1: float, n_classes: int) -> bool:
    """Right no more often than chance, give or take a tenth of the way to perfect (0.19 for 10 classes)."""
    chance = 1.0 / max(n_classes, 2)
    return top1 <= chance + 0.1 * (1 - chance)


def check_class_order(top1: float, outputs: np.ndarray, labels: np.ndarray, classes: list[str], where: str) -> None:
    """Stop when the float model is right no more often than chance, but its predictions fit another order of
    the classes: its classes are almost surely read in another order than its outputs."""
    from ..errors import DataError

    values = np.asarray(outputs).reshape(len(outputs), -1)
    n = max(len(classes), 2)
    chance = 1.0 / n
    if not near_chance(top1, n):
        return
    fitted, mapping = matched_order(np.asarray(labels), values.argmax(1), values.shape[1])
    if fitted < max(0.5, 3 * top1):
        return  # no better order either (an untrained model, say): nothing to say about the class order
    order = {j: classes[i] for i, j in mapping.items()}
    suggested = [order.get(j, "?") for j in range(values.shape[1])]
    raise DataError(f"the float model is right on only {100 * top1:.1f}% of {where} (chance for {n} classes: "
                    f"{100 * chance:.0f}%), but {100 * fitted:.1f}% under another class order: the classes are read "
                    f"in another order ({', '.join(classes[:10])}) than the model's outputs, which fit "
                    f"{', '.join(suggested[:10])}; give the class names in output order with --labels FILE")
