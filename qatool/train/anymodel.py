"""Any model, no labels: the pieces of label-free QAT (the float model is the teacher and the judge).

- `is_labelled_classifier`: chosen once per run: a classifier whose data has labels keeps the classifier recipe
  (cross-entropy, top-1); anything else (data without labels, a `.npy` folder, a model whose first output is not
  one class score per image) trains by distillation from the float model and is judged against it.
- `FloatModel`: the float model on onnxruntime (its inference form: BN folded, Dropout removed), giving every
  graph output as {name: array}: the reference every measure compares with.
- `choose_output_tasks`: what each graph output is for (qatool.tasks), from the float model's outputs on a few
  images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..convert import normalize_proto
from ..data import TensorSet, is_tensor_folder
from ..data.images import has_class_folders
from ..errors import UsageError
from ..ir.graph import Graph, to_onnx
from ..runtime.backends import ort_run_all, ort_session
from ..tasks import choose_tasks

PROBE_IMAGES = 3  # the batch of the probe that chooses the tasks (a size no other axis is likely to have)


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


class FloatModel:
    """The float model's graph outputs on onnxruntime, as {name: array} per batch."""

    def __init__(self, float_graph: Graph):
        infer = normalize_proto(to_onnx(float_graph), for_training=False).graph
        self.session = ort_session(to_onnx(infer))
        self.input_name = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict:
        return dict(zip(self.names, ort_run_all(self.session, x, "the float model")))


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


def unlabelled_preprocess(float_graph: Graph, data, val_data=None, preprocess: dict | None = None):
    """The preprocessing of image data (from the overrides, else the model's metadata or input shape; recorded
    in the graph's metadata), None when every folder holds `.npy` tensors (used as they are). Checks the model
    takes one image tensor. Reads no data."""
    from ..data.preprocess import METADATA_KEY, image_input, resolve_preprocess

    image_input(float_graph)
    if all(d is None or is_tensor_folder(d) for d in (data, val_data)):
        return None
    pre = resolve_preprocess(float_graph, preprocess)
    float_graph.metadata[METADATA_KEY] = pre.to_json()
    return pre


def load_unlabelled(float_graph: Graph, data, val_data=None, pre=None, pad_multiple: int = 1,
                    pad_value: float = 0.0):
    """(data set, validation set or None) read without labels: image folders (with `pre`) or `.npy` folders
    (each tensor must fit the model's input; the sizes the model leaves free rounded up to `pad_multiple`,
    padded with `pad_value`: TensorSet.pad_free_dims)."""
    from ..data import open_dataset

    loaded = []
    for d in (data, val_data):
        s = open_dataset(d, labelled=False) if d is not None else None
        if isinstance(s, TensorSet):
            s.check_fits(float_graph.inputs[0].shape, f"the model's input {float_graph.inputs[0].name!r}")
            s.pad_free_dims(float_graph.inputs[0].shape, pad_multiple, pad_value)
        loaded.append(s.load(pre) if s is not None else None)
    return loaded[0], loaded[1]


def data_kind(data) -> str:
    return "input tensors" if isinstance(data, TensorSet) else "images"
