"""References computed by onnxruntime itself, independent of qatool: one-node models run on the CPU provider.

    q = quantize_linear(x, scale, zero_point, axis=0)           # onnxruntime's QuantizeLinear
    y = dequantize_linear(q, scale, zero_point, axis=0)         # onnxruntime's DequantizeLinear
    (y,) = run_node("QLinearAdd", [a, sa, za, b, sb, zb, sc, zc], domain="com.microsoft")

Every input is a graph input of unknown shape (none is a constant), so one session serves every call with the
same op, attributes and input types: sessions are built once per test process and cached. Graph optimisations
are off: the node runs as written, with onnxruntime's own kernel for it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

_SESSIONS: dict[tuple, ort.InferenceSession] = {}


def _tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def node_session(op_type: str, in_dtypes: Sequence[Any], out_dtypes: Sequence[Any], attrs: dict | None = None,
                 domain: str = "", opset: int = 21) -> ort.InferenceSession:
    """The cached session of one node; `in_dtypes` None marks an omitted optional input."""
    attrs = dict(attrs or {})
    key = (op_type, domain, opset, tuple(sorted((k, repr(v)) for k, v in attrs.items())),
           tuple(None if d is None else np.dtype(d).str for d in in_dtypes),
           tuple(np.dtype(d).str for d in out_dtypes))
    sess = _SESSIONS.get(key)
    if sess is not None:
        return sess
    names = ["" if d is None else f"in{i}" for i, d in enumerate(in_dtypes)]
    outs = [f"out{i}" for i in range(len(out_dtypes))]
    node = helper.make_node(op_type, names, outs, domain=domain or None, **attrs)
    graph = helper.make_graph(
        [node], "ref",
        [helper.make_tensor_value_info(n, _tensor_type(d), None) for n, d in zip(names, in_dtypes) if n],
        [helper.make_tensor_value_info(o, _tensor_type(d), None) for o, d in zip(outs, out_dtypes)])
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    _SESSIONS[key] = sess
    return sess


def run_node(op_type: str, inputs: Sequence[np.ndarray | None], out_dtypes: Sequence[Any],
             attrs: dict | None = None, domain: str = "", opset: int = 21) -> list[np.ndarray]:
    inputs = [None if x is None else np.asarray(x) for x in inputs]
    sess = node_session(op_type, [None if x is None else x.dtype for x in inputs], out_dtypes, attrs, domain, opset)
    feeds = {f"in{i}": x for i, x in enumerate(inputs) if x is not None}
    return sess.run(None, feeds)


def quantize_linear(x, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """onnxruntime's QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), in the zero point's type
    (uint8 or int8). `axis`: per-axis scale and zero point (1-D)."""
    zero_point = np.asarray(zero_point)
    attrs = {} if axis is None else {"axis": axis}
    return run_node("QuantizeLinear", [np.asarray(x, np.float32), np.asarray(scale, np.float32), zero_point],
                    [zero_point.dtype], attrs)[0]


def dequantize_linear(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """onnxruntime's DequantizeLinear: (q - zero_point) * scale, float32."""
    q = np.asarray(q)
    attrs = {} if axis is None else {"axis": axis}
    return run_node("DequantizeLinear", [q, np.asarray(scale, np.float32), np.asarray(zero_point, q.dtype)],
                    [np.float32], attrs)[0]


def quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(integers, dequantized values) of onnxruntime's QuantizeLinear -> DequantizeLinear onto the grid
    [qmin, qmax]. The 8-bit type holding the grid (uint8 when qmin >= 0, else int8) saturates first; a
    narrower grid (low bits) then saturates again: clip(saturate_8bit(v), qmin, qmax) = saturate_grid(v)."""
    dtype = np.uint8 if qmin >= 0 else np.int8
    zp = np.asarray(zero_point).astype(dtype)
    q = quantize_linear(x, scale, zp, axis)
    if (qmin, qmax) != (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)):
        q = np.clip(q, qmin, qmax).astype(dtype)
    return q, dequantize_linear(q, scale, zp, axis)
