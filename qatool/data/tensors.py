"""Tensor folders: a folder of `.npy` files, each one input tensor already preprocessed ([C, H, W] or
[1, C, H, W], used as it is). The fallback for any pipeline qatool does not know: run the model's own
preprocessing, save what it feeds the model, and point qatool at the folder.

Files are read when a batch needs them (a set of large detector inputs does not have to fit in memory); files
of different shapes form different groups, and a batch never mixes two groups.
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
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(shapes):
            by_shape.setdefault(shape, []).append(i)
        self._groups = [np.array(v, np.int64) for _, v in sorted(by_shape.items())]
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="npy")

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
        for p, s in zip(self.paths, self.shapes):
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
            arrays.append(a.reshape(self.shapes[int(i)]))
        return np.stack(arrays).astype(np.float32, copy=False)

    def prefetch(self, index: np.ndarray) -> Future:
        return self._reader.submit(self._read, np.asarray(index))

    def to_input(self, raw: np.ndarray, index: np.ndarray, rng: np.random.Generator | None = None,
                 flip: bool = True) -> np.ndarray:
        """The tensors as they are (already preprocessed: no augmentation applies)."""
        return np.ascontiguousarray(raw)
