"""Tensor folders: a folder of `.npy` files, each one input tensor already preprocessed ([C, H, W] or
[1, C, H, W], used as it is). The fallback for any pipeline qatool does not know: run the model's own
preprocessing, save what it feeds the model, and point qatool at the folder.

Files are read when a batch needs them (a set of large detector inputs does not have to fit in memory); files
of different shapes form different groups, and a batch never mixes two groups.

Free sizes (`pad_free_dims`): where the model leaves the height or width free (a recogniser's line width),
files of nearby sizes share a group: each such size is rounded up to a multiple of `multiple` and the tensor is
padded on the right / bottom with the pad value, as the models' own pipelines pad a batch of lines to its widest
(PaddleOCR pads 0 after normalisation). Off unless asked for (train-quant --pad-multiple): on PP-OCRv4's
recogniser, which its pipeline feeds a line at a time, padded training lines read fewer test lines
(docs/benchmarks.md section 8), though 600 rendered lines held 229 widths and most batches were one to three.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import _Batches


def npy_files(root: Path) -> list[Path]:
    """The `.npy` files under `root`, at any depth, sorted (hidden ones left out)."""
    return [f for f in sorted(root.rglob("*.npy")) if f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(root).parts)]


def is_tensor_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and bool(npy_files(p))


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, read from its header alone."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)  # maps the file: reads the header only
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npy file: {e}") from e
    return tuple(a.shape), a.dtype


class TensorSet(_Batches):
    """The `.npy` files of a folder as model inputs, without labels."""

    labels = None
    preprocess = None
    classes: list[str] = []
    labelled = False
    num_classes = 0

    def __init__(self, root: str | os.PathLike):
        self.source = Path(root)
        self.skipped: list[Path] = []
        self.paths = npy_files(self.source)
        if not self.paths:
            raise DataError(f"{self.source} holds no .npy files")
        shapes = []
        for p in self.paths:
            shape, dtype = _header(p)
            if len(shape) == 4 and shape[0] == 1:
                shape = shape[1:]
            if len(shape) != 3:
                raise DataError(f"{p} holds a tensor of shape {list(shape)}; each .npy file must be one input "
                                "[C, H, W] (or [1, C, H, W])")
            if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
                raise DataError(f"{p} holds {dtype} values; expected numbers")
            shapes.append(shape)
        self.shapes = shapes
        self.file_shapes = list(shapes)
        self.pad_value = 0.0
        self.pad_multiple = 1
        self._regroup()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="npy")

    def _regroup(self) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(self.shapes):
            by_shape.setdefault(shape, []).append(i)
        self._groups = [np.array(v, np.int64) for _, v in sorted(by_shape.items())]

    def pad_free_dims(self, shape: list | None, multiple: int, pad_value: float = 0.0) -> TensorSet:
        """Round each height / width the model input `shape` ([N, C, H, W]) leaves free up to a multiple of
        `multiple`, padding right / bottom with `pad_value` (1: every size as it is). Returns itself."""
        if multiple < 1:
            raise DataError(f"the pad multiple must be at least 1, got {multiple}")
        free = [k for k in (1, 2) if shape and len(shape) == 4 and not (isinstance(shape[k + 1], int)
                                                                         and shape[k + 1] > 0)]
        self.shapes = [tuple(-(-d // multiple) * multiple if k in free else d for k, d in enumerate(s))
                       for s in self.file_shapes]
        self.pad_value, self.pad_multiple = float(pad_value), multiple if free else 1
        self._regroup()
        return self

    def describe(self) -> str:
        """'input tensors of N sizes' (and how free sizes were padded)."""
        sizes = f"{len(self._groups)} size{'s' if len(self._groups) != 1 else ''}"
        padded = f", free sizes padded to a multiple of {self.pad_multiple}" if self.pad_multiple > 1 else ""
        return f"input tensors ({sizes}{padded})"

    def __len__(self) -> int:
        return len(self.paths)

    def labels_fit(self, n_outputs: int | None) -> bool:
        return True

    def load(self, pre=None, max_bytes: int | None = None) -> TensorSet:
        """Itself: the files are read batch by batch (the preprocessing is the files' own)."""
        return self

    @property
    def groups(self) -> list[np.ndarray]:
        return self._groups

    def item_shape(self, i: int) -> tuple[int, ...]:
        return self.shapes[i]

    def check_fits(self, shape: list | None, what: str) -> None:
        """Every tensor fits the model input `shape` ([N, C, H, W], symbolic dims free); else one clear error."""
        if not shape or len(shape) != 4:
            return
        for p, s in zip(self.paths, self.file_shapes):
            if any(isinstance(d, int) and d > 0 and d != v for d, v in zip(shape[1:], s)):
                dims = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape[1:])
                raise DataError(f"{p} holds a tensor of shape {list(s)} but {what} takes "
                                f"[N, {dims.replace('x', ', ')}]")

    def _read(self, index: np.ndarray) -> np.ndarray:
        arrays = []
        for i in index:
            try:
                a = np.load(self.paths[int(i)], allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {self.paths[int(i)]}: {e}") from e
            arrays.append(a.reshape(self.file_shapes[int(i)]))
        out = np.full((len(arrays), *self.shapes[int(index[0])]), self.pad_value, np.float32)
        for k, a in enumerate(arrays):
            out[(k, *(slice(0, d) for d in a.shape))] = a
        return out

    def prefetch(self, index: np.ndarray) -> Future:
        return self._reader.submit(self._read, np.asarray(index))

    def to_input(self, raw: np.ndarray, index: np.ndarray, rng: np.random.Generator | None = None,
                 flip: bool = True) -> np.ndarray:
        """The tensors as they are (already preprocessed: no augmentation applies)."""
        return np.ascontiguousarray(raw)
