"""Reading and writing ONNX files, with clear errors and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import ModelError
from .graph import Graph, from_onnx, to_onnx


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with its external data), or raise ModelError saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{p} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{p} is not an ONNX model (it holds no graph)")
    _load_external_data(model, p.parent)
    return model


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Load external tensors, refusing any location outside the model's folder (path traversal)."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    base = base.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ModelError(
                f"tensor {tensor.name!r} points to external data outside the model's folder ({location}); refused"
            )
        if not target.is_file():
            raise ModelError(f"external data file {location!r} of tensor {tensor.name!r} is missing")
        try:
            load_external_data_for_tensor(tensor, str(base))
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read external data of tensor {tensor.name!r}: {e}") from e
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def load_graph(path: str | os.PathLike) -> Graph:
    return from_onnx(load_proto(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_proto(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf refuses messages over 2 GiB
        raise ModelError(f"model too large to serialise in one file: {e}") from e
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ModelError(f"cannot write {path}: {e.strerror or e}") from e


def save_graph(graph: Graph, path: str | os.PathLike) -> None:
    save_proto(to_onnx(graph), path)


def report_json(report) -> bytes:
    """A report as standard JSON (indented, newline-terminated): numpy scalars as numbers, and a non-finite
    float (an SQNR of identical outputs is inf) as null, since JSON has no infinity."""
    import json
    import math

    import numpy as np

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, np.integer)):
            o = o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o

    return (json.dumps(clean(report), indent=2, allow_nan=False) + "\n").encode()
