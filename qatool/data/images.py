"""Image data: an image folder (one sub-folder per class), a list file of `relative/path label` lines, or any
folder of images without labels (flat or nested).

A loaded set (LoadedImages in memory, StreamingImages from disk, or `tensors.TensorSet` for `.npy` folders) gives
batches of the model's float input and, when the set is labelled, their labels (`labels` is None otherwise).
Its `groups` are the indices of items that share one input shape: a batch never mixes two groups (images of one
preprocessing are one group; `.npy` files of different shapes are not).
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError, UsageError
from .preprocess import Preprocess

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are refused as decompression bombs
IN_MEMORY_BYTES = 2 * 1024**3  # decoded sets up to this size are kept in memory; larger ones are streamed


def read_class_names(path: str | os.PathLike) -> list[str]:
    """A labels file: one class name per line, in the model's output order."""
    try:
        names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the labels file {path}: {getattr(e, 'strerror', None) or e}") from e
    if not names:
        raise UsageError(f"the labels file {path} holds no class names")
    return names


UNLABELLED = -1  # the label of every sample of an unlabelled folder


@dataclass
class ImageDataset:
    samples: list[tuple[Path, int]]
    classes: list[str]  # empty for an unlabelled folder
    source: Path

    @classmethod
    def open(cls, path: str | os.PathLike, class_names: list[str] | None = None,
             labelled: bool = True) -> ImageDataset:
        """An image folder, or a list file whose paths are relative to the file's folder. A folder whose images
        sit in sub-folders is read as class folders when `labelled`; any other folder of images (flat, or
        nested when not `labelled`) is read without labels."""
        p = Path(path)
        if p.is_dir():
            if labelled and has_class_folders(p):
                return cls.from_folder(p, class_names)
            return cls.unlabelled(p)
        if p.is_file():
            return cls.from_list_file(p)
        raise DataError(f"data path not found: {p}")

    @classmethod
    def unlabelled(cls, root: Path) -> ImageDataset:
        """Every image under `root`, at any depth, in sorted path order, without labels."""
        samples = [(f, UNLABELLED) for f in image_files(root)]
        if not samples:
            raise DataError(f"{root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}) "
                            "and no .npy tensors")
        return cls(samples, [], root)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def labels_fit(self, n_outputs: int | None) -> bool:
        """The labels are class indices of a model with `n_outputs` outputs (None: unknown, taken as fitting): an
        image folder needs one class folder per output, a list file's labels must be outputs."""
        if n_outputs is None or not self.labelled:
            return True
        if self.source.is_dir():
            return self.num_classes == n_outputs
        return self.num_classes <= n_outputs

    @classmethod
    def from_folder(cls, root: Path, class_names: list[str] | None = None) -> ImageDataset:
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise DataError(f"{root} has no class sub-folders (expected one sub-folder of images per class)")
        classes = class_names or folders
        index = {c: i for i, c in enumerate(classes)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DataError(f"sub-folders {unknown[:5]} of {root} are not in the labels file")
        samples = [(f, index[c]) for c in folders for f in image_files(root / c)]
        if not samples:
            raise DataError(f"{root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return cls(samples, classes, root)

    @classmethod
    def from_list_file(cls, path: Path) -> ImageDataset:
        samples = []
        base = path.parent
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not a text list file of 'relative/path label' lines") from e
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DataError(f"{path}:{lineno}: expected 'relative/path label' with an integer label >= 0, "
                                f"got {line!r}")
            samples.append((base / parts[0], int(parts[1])))
        if not samples:
            raise DataError(f"{path} lists no images")
        n = max(label for _, label in samples) + 1
        return cls(samples, [str(i) for i in range(n)], path)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, pre: Preprocess, max_bytes: int | None = None) -> LoadedImages | StreamingImages:
        """The images, decoded into memory when they fit in `max_bytes` (default IN_MEMORY_BYTES) as uint8,
        else streamed from disk."""
        h, w = pre.size
        limit = IN_MEMORY_BYTES if max_bytes is None else max_bytes
        if len(self.samples) * h * w * pre.channels > limit:
            return StreamingImages(self, pre)
        return self.load_all(pre)

    def load_all(self, pre: Preprocess) -> LoadedImages:
        """Decode every image into memory (uint8); unreadable images are skipped and counted."""
        h, w = pre.size
        images = np.empty((len(self.samples), h, w, pre.channels), np.uint8)
        boxes = np.empty((len(self.samples), 4), np.int64)
        labels = np.empty(len(self.samples), np.int64)
        kept = 0
        skipped: list[Path] = []
        for path, label in self.samples:
            decoded = decode_image(path, pre)
            if decoded is None:
                skipped.append(path)
                continue
            images[kept], boxes[kept] = decoded
            labels[kept] = label
            kept += 1
        if kept == 0:
            raise DataError(f"none of the {len(self.samples)} images in {self.source} could be read")
        return LoadedImages(images[:kept], labels[:kept] if self.labelled else None, pre, skipped,
                            boxes[:kept] if pre.resize != "stretch" else None)


class _Batches:
    """What every loaded set shares: raw batches (`prefetch`) made into model inputs (`to_input`), sequential
    evaluation batches within each group of one input shape."""

    labels: np.ndarray | None

    @property
    def groups(self) -> list[np.ndarray]:
        return [np.arange(len(self))]

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model input of the items `index` (one group) and their labels (None for an unlabelled set)."""
        return self.to_input(self.prefetch(index).result(), index), self.labels_of(index)

    def labels_of(self, index: np.ndarray) -> np.ndarray | None:
        return None if self.labels is None else self.labels[index]

    def batches(self, batch_size: int):
        """Sequential batches (for evaluation), group by group; the next one is read while the caller works."""
        spans = [g[s:s + batch_size] for g in self.groups for s in range(0, len(g), batch_size)]
        pending = self.prefetch(spans[0]) if spans else None
        for k, idx in enumerate(spans):
            raw = pending.result()
            if k + 1 < len(spans):
                pending = self.prefetch(spans[k + 1])
            yield self.to_input(raw, idx), self.labels_of(idx)

    def input_bytes(self) -> int:
        """Bytes of one item's float input (the largest group's)."""
        return max(int(np.prod(self.item_shape(int(g[0])))) for g in self.groups if len(g)) * 4


class _ImageBatches(_Batches):
    preprocess: Preprocess
    boxes: np.ndarray | None

    def item_shape(self, i: int) -> tuple[int, ...]:
        return self.preprocess.input_shape

    def to_input(self, raw: np.ndarray, index: np.ndarray, rng: np.random.Generator | None = None,
                 flip: bool = True) -> np.ndarray:
        """Raw uint8 images of items `index` as the model's normalised input; augmented when `rng` is given."""
        if rng is not None:
            raw = augment(raw, rng, flip)
        return self.preprocess.normalize(raw, None if self.boxes is None else self.boxes[index])


@dataclass
class LoadedImages(_ImageBatches):
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None  # (N,) int64, None when unlabelled
    preprocess: Preprocess
    skipped: list[Path] = field(default_factory=list)
    boxes: np.ndarray | None = None  # (N, 4) top, left, h, w of each image (pad / letterbox)

    def __len__(self) -> int:
        return len(self.images)

    def uint8_batch(self, index: np.ndarray) -> np.ndarray:
        return self.images[index]

    def prefetch(self, index: np.ndarray) -> Future:
        """A future of `uint8_batch(index)` (already done: the images are in memory)."""
        f: Future = Future()
        f.set_result(self.uint8_batch(index))
        return f


class StreamingImages(_ImageBatches):
    """A set too large for memory: each batch is decoded from disk by a pool of threads (Pillow releases the GIL
    while decoding), and the next batch is prefetched in the background while the current one trains.

    An image that turns out unreadable is replaced by a blank one (so batches keep their labels aligned) and
    listed in `skipped`.
    """

    def __init__(self, dataset: ImageDataset, pre: Preprocess, workers: int | None = None):
        self.paths = [p for p, _ in dataset.samples]
        self.labels = np.array([label for _, label in dataset.samples], np.int64) if dataset.labelled else None
        self.preprocess = pre
        self.boxes = np.zeros((len(self.paths), 4), np.int64) if pre.resize != "stretch" else None
        self.skipped: list[Path] = []
        self._lock = threading.Lock()
        self._decoders = ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int) -> np.ndarray:
        decoded = decode_image(self.paths[i], self.preprocess)
        if decoded is None:
            with self._lock:
                self.skipped.append(self.paths[i])
            h, w = self.preprocess.size
            return np.zeros((h, w, self.preprocess.channels), np.uint8)
        arr, box = decoded
        if self.boxes is not None:
            self.boxes[i] = box
        return arr

    def uint8_batch(self, index: np.ndarray) -> np.ndarray:
        return np.stack(list(self._decoders.map(self._decode, [int(i) for i in index])))

    def prefetch(self, index: np.ndarray) -> Future:
        return self._prefetcher.submit(self.uint8_batch, index)


def has_class_folders(root: Path) -> bool:
    """The images of `root` sit in its sub-folders, none directly in it: the layout of class folders."""
    top = [f for f in root.iterdir() if not f.name.startswith(".")]
    return any(d.is_dir() for d in top) and not any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in top)


def image_files(root: Path) -> list[Path]:
    """The image files under `root`, at any depth, sorted (hidden files and folders left out)."""
    return [f for f in sorted(root.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(root).parts)]


def decode_image(path: Path, pre: Preprocess) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """(H, W, C) uint8 in the preprocessing's colour and size, and the (top, left, h, w) box the image fills
    (the rest is the pad of `pad` / `letterbox`); None when the file is not a readable image."""
    mode = "L" if pre.color == "gray" else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    return None
                img = img.convert(mode)
                h, w = pre.size
                top, left, bh, bw = pre.placement(img.width, img.height)
                if img.size != (bw, bh):
                    img = img.resize((bw, bh), Image.BILINEAR)
                if (bh, bw) != (h, w):
                    canvas = Image.new(mode, (w, h))
                    canvas.paste(img, (left, top))
                    img = canvas
                arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if pre.color == "bgr":
        arr = arr[:, :, ::-1]
    return arr, (top, left, bh, bw)


def batch_indices(groups: int | list[np.ndarray], batch_size: int, step: int, seed: int) -> np.ndarray:
    """The items of training step `step`: a fresh permutation per epoch, a pure function of (seed, step), so
    a resumed run draws exactly the batches the uninterrupted run would have drawn. `groups` is the set's size
    (one group) or its groups of one input shape: then every group is permuted and cut into batches (a group's
    last, smaller batch kept), and the epoch's batches are shuffled, so no batch mixes two shapes."""
    if isinstance(groups, (int, np.integer)) or len(groups) == 1:
        n = groups if isinstance(groups, (int, np.integer)) else len(groups[0])
        per_epoch = max(n // batch_size, 1)
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        picked = perm[pos * batch_size:(pos + 1) * batch_size]
        return picked if isinstance(groups, (int, np.integer)) else groups[0][picked]
    per_epoch = sum(-(-len(g) // batch_size) for g in groups)
    epoch, pos = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    spans = [g[perm[s:s + batch_size]] for g in groups
             for perm in [rng.permutation(len(g))] for s in range(0, len(g), batch_size)]
    return spans[rng.permutation(len(spans))[pos]]


def augment(images: np.ndarray, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """Random crop with zero padding (1/8 of the size on each side) and, if `flip`, random horizontal flips.
    (N, H, W, C) uint8 in and out."""
    n, h, w, _ = images.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = np.zeros((n, h + 2 * ph, w + 2 * pw, images.shape[3]), images.dtype)
    padded[:, ph:ph + h, pw:pw + w] = images
    dy = rng.integers(0, 2 * ph + 1, n)
    dx = rng.integers(0, 2 * pw + 1, n)
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mirror = rng.random(n) < 0.5
        out[mirror] = out[mirror, :, ::-1]
    return out
