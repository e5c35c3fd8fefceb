"""The pipeline functions that the CLI and users' scripts call."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .convert import ConvertResult, normalize_proto
from .errors import ModelError, UsageError
from .ir.graph import to_onnx
from .ir.io import load_proto, save_proto


def _refuse_overwrite(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise UsageError(f"the output {output_path} is the input file; choose another output path")


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, for_training: bool = False) -> ConvertResult:
    """Normalise a float ONNX model (see `qatool.convert`) and write it to `output_path` atomically."""
    _refuse_overwrite(input_path, output_path)
    result = normalize_proto(load_proto(input_path), for_training)
    model = to_onnx(result.graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:  # a bug of ours, but say it plainly
        raise ModelError(f"internal: the converted model fails onnx.checker: {str(e).splitlines()[0]}") from e
    save_proto(model, output_path)
    return result
