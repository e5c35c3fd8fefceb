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


def resolve_preprocess(graph, overrides: dict | None = None) -> Preprocess:
    """Preprocessing from explicit settings, else the model's metadata, else the model's input shape.

    `overrides` may hold size (H, W), color, mean, std. The result must fit the model's image input.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    base: dict = {}
    if METADATA_KEY in graph.metadata:
        try:
            stored = Preprocess.from_json(graph.metadata[METADATA_KEY])
            base = {"size": stored.size, "color": stored.color, "mean": stored.mean, "std": stored.std}
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"the model's {METADATA_KEY} metadata is malformed ({e}); give --size/--color") from e
    inp = graph.inputs[0]
    shape = inp.shape
    if len(graph.inputs) != 1 or shape is None or len(shape) != 4:
        raise UsageError(f"the model's input {inp.name!r} is not one image tensor (N, C, H, W): shape {shape}")
    c, h, w = shape[1:]
    if "size" not in overrides and "size" not in base:
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise UsageError(f"the model's input {inp.name!r} has dynamic height/width {shape}: give --size HxW")
        base["size"] = (h, w)
    if "color" not in overrides and "color" not in base:
        base["color"] = "gray" if c == 1 else "rgb"
    settings = {**base, **overrides}
    pre = Preprocess(size=tuple(settings["size"]), color=settings["color"],
                     mean=tuple(settings.get("mean", (0.0,))), std=tuple(settings.get("std", (1.0,))))
    if isinstance(c, int) and c > 0 and c != pre.channels:
        raise UsageError(f"the model expects {c} input channels but --color {pre.color} gives {pre.channels}")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and (h, w) != tuple(pre.size):
        raise UsageError(f"the model's input is {h}x{w} but the preprocessing size is {pre.size[0]}x{pre.size[1]}")
    return pre
