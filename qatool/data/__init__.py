"""Data: image folders (class sub-folders, list files, or no labels), `.npy` tensor folders, preprocessing."""

from __future__ import annotations

import os

from .images import ImageDataset
from .tensors import TensorSet, is_tensor_folder


def open_dataset(path: str | os.PathLike, class_names: list[str] | None = None,
                 labelled: bool = True) -> ImageDataset | TensorSet:
    """A folder of `.npy` input tensors, or an image folder / list file (see ImageDataset.open); `.load(pre)` of
    either gives the batches."""
    if is_tensor_folder(path):
        return TensorSet(path)
    return ImageDataset.open(path, class_names, labelled)
