"""Preprocessing config: size, colour, mean/std, layout. It travels in the model's metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UsageError

METADATA_KEY = "qatool.preprocess"
COLORS = ("gray", "rgb", "bgr")


@dataclass(frozen=True)
class Preprocess:
    """Pixels are scaled to [0, 1], then (x - mean) / std per channel; layout NCHW."""

    size: tuple[int, int]  # (H, W)
    color: str = "rgb"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    def __post_init__(self):
        if self.color not in COLORS:
            raise UsageError(f"color must be one of {', '.join(COLORS)}, not {self.color!r}")
        if self.layout != "NCHW":
            raise UsageError(f"only the NCHW layout is supported, not {self.layout!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise UsageError(f"size must be two positive numbers HxW, not {self.size!r}")
        for what, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, self.channels):
                raise UsageError(f"{what} needs 1 or {self.channels} values for color {self.color}, got {len(v)}")
        if any(s == 0 for s in self.std):
            raise UsageError("std values must be non-zero")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def to_json(self) -> str:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        d = json.loads(text)
        return cls(size=tuple(d["size"]), color=d.get("color", "rgb"), mean=tuple(d.get("mean", (0.0,))),
                   std=tuple(d.get("std", (1.0,))), layout=d.get("layout", "NCHW"))

    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, C, H, W) float32, scaled and normalised."""
        x = batch_uint8.astype(np.float32).transpose(0, 3, 1, 2)
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1) * np.float32(255)
        inv = np.float32(1) / (np.asarray(self.std, np.float32).reshape(1, -1, 1, 1) * np.float32(255))
        x -= mean
        x *= inv
        return np.ascontiguousarray(x)
