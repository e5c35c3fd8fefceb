"""Data without labels: image folders read for their pixels only, or `.npy` input tensor folders (label-free QAT,
calibration and evaluation of any model)."""

from __future__ import annotations

from ..ir.graph import Graph
from . import open_dataset
from .preprocess import METADATA_KEY, image_input, resolve_preprocess
from .tensors import TensorSet, is_tensor_folder


def unlabelled_preprocess(float_graph: Graph, data, val_data=None, preprocess: dict | None = None):
    """The preprocessing of image data (from the overrides, else the model's metadata or input shape; recorded
    in the graph's metadata), None when every folder holds `.npy` tensors (used as they are). Checks the model
    takes one image tensor. Reads no data."""
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
