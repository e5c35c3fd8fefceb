"""Preprocessing config: size, resize mode, colour, mean/std, layout. It travels in the model's metadata.

Resize modes (the pipelines of the models users bring):
- `stretch`: the image is resized to H x W whatever its aspect ratio (torchvision classifiers);
- `pad`: the image fills the height H, its width follows the aspect ratio (rounded up) and is padded on the right
  up to W; an image wider than that is squeezed to W (PaddleOCR's recogniser, `resize_norm_img`);
- `letterbox`: the aspect ratio is kept and the image centred, padded on both sides (YOLO).
The pad value is given in the normalised space (PaddleOCR pads 0 after normalisation; YOLO's grey 114 is
114/255 with mean 0, std 1), so padding is applied after normalisation, exactly as those pipelines do.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UsageError

METADATA_KEY = "qatool.preprocess"
COLORS = ("gray", "rgb", "bgr")
RESIZE_MODES = ("stretch", "pad", "letterbox")


@dataclass(frozen=True)
class Preprocess:
    """Pixels are scaled to [0, 1], then (x - mean) / std per channel; layout NCHW."""

    size: tuple[int, int]  # (H, W)
    color: str = "rgb"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    resize: str = "stretch"
    pad_value: float = 0.0  # in the normalised space: what the padded pixels of `pad` / `letterbox` hold

    def __post_init__(self):
        if self.color not in COLORS:
            raise UsageError(f"color must be one of {', '.join(COLORS)}, not {self.color!r}")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
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
                   std=tuple(d.get("std", (1.0,))), layout=d.get("layout", "NCHW"),
                   resize=d.get("resize", "stretch"), pad_value=float(d.get("pad_value", 0.0)))

    def placement(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Where an image of `width` x `height` goes in the H x W input: (top, left, h, w) of its resized copy."""
        h, w = self.size
        if self.resize == "stretch":
            return 0, 0, h, w
        if self.resize == "pad":
            return 0, 0, h, max(1, min(w, math.ceil(h * width / height)))
        scale = min(h / height, w / width)
        rh, rw = max(1, min(h, round(height * scale))), max(1, min(w, round(width * scale)))
        return (h - rh) // 2, (w - rw) // 2, rh, rw

    def normalize(self, batch_uint8: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, C, H, W) float32, scaled and normalised; outside each image's box
        ((top, left, h, w) rows of `boxes`, from `placement`) the pixels are `pad_value`."""
        x = batch_uint8.astype(np.float32).transpose(0, 3, 1, 2)
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1) * np.float32(255)
        inv = np.float32(1) / (np.asarray(self.std, np.float32).reshape(1, -1, 1, 1) * np.float32(255))
        x -= mean
        x *= inv
        if boxes is not None and self.resize != "stretch":
            h, w = self.size
            top, left, bh, bw = (boxes[:, i, None] for i in range(4))
            rows = (np.arange(h) >= top) & (np.arange(h) < top + bh)  # (N, H)
            cols = (np.arange(w) >= left) & (np.arange(w) < left + bw)  # (N, W)
            outside = ~(rows[:, :, None] & cols[:, None, :])
            x[np.broadcast_to(outside[:, None], x.shape)] = np.float32(self.pad_value)
        return np.ascontiguousarray(x)


def resolve_preprocess(graph, overrides: dict | None = None) -> Preprocess:
    """Preprocessing from explicit settings, else the model's metadata, else the model's input shape.

    `overrides` may hold size (H, W), color, mean, std, resize, pad_value. The result must fit the model's image
    input.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    base: dict = {}
    if METADATA_KEY in graph.metadata:
        try:
            stored = Preprocess.from_json(graph.metadata[METADATA_KEY])
            base = {"size": stored.size, "color": stored.color, "mean": stored.mean, "std": stored.std,
                    "resize": stored.resize, "pad_value": stored.pad_value}
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"the model's {METADATA_KEY} metadata is malformed ({e}); give --size/--color") from e
    shape = image_input(graph)
    c, h, w = shape[1:]
    if "size" not in overrides and "size" not in base:
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise UsageError(f"the model's input {graph.inputs[0].name!r} has dynamic height/width {shape}: give "
                             "--size HxW")
        base["size"] = (h, w)
    if "color" not in overrides and "color" not in base:
        base["color"] = "gray" if c == 1 else "rgb"
    settings = {**base, **overrides}
    pre = Preprocess(size=tuple(settings["size"]), color=settings["color"],
                     mean=tuple(settings.get("mean", (0.0,))), std=tuple(settings.get("std", (1.0,))),
                     resize=settings.get("resize", "stretch"), pad_value=float(settings.get("pad_value", 0.0)))
    if isinstance(c, int) and c > 0 and c != pre.channels:
        raise UsageError(f"the model expects {c} input channels but --color {pre.color} gives {pre.channels}")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and (h, w) != tuple(pre.size):
        raise UsageError(f"the model's input is {h}x{w} but the preprocessing size is {pre.size[0]}x{pre.size[1]}")
    return pre


def image_input(graph) -> list:
    """The shape of the model's one image input (N, C, H, W); a UsageError for any other kind of input."""
    inp = graph.inputs[0]
    shape = inp.shape
    if len(graph.inputs) != 1 or shape is None or len(shape) != 4:
        raise UsageError(f"the model's input {inp.name!r} is not one image tensor (N, C, H, W): shape {shape}")
    return list(shape)
