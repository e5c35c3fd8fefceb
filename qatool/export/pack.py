"""Store weights of 4 bits or fewer as ONNX INT4, two to a byte, without losing the integer kernels.

onnxruntime's CPU integer kernels read 8-bit weights, so a DequantizeLinear of an INT4 weight would leave its
Conv/Gemm in float. Instead each packed weight is widened by a Cast back to int8 in front of its
DequantizeLinear: Cast of a constant is folded when onnxruntime loads the model, so the optimised graph is the
same as with int8 weights (QLinearConv, QGemm, ...), while the file holds half the bytes. INT4 needs opset 21
(onnxruntime >= 1.20), so the model is upgraded with onnx's version converter when anything is packed.

Packing is lossless by construction: only an int8 weight whose every value lies in INT4's [-8, 7] is packed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

INT4_OPSET = 21
INT4_MIN, INT4_MAX = -8, 7


def pack_int4_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every int8 weight that fits in INT4 stored as INT4 (unchanged when none fits)."""
    names = _int4_weights(model)
    if not names:
        return model
    if _default_opset(model) < INT4_OPSET:
        model = version_converter.convert_version(model, INT4_OPSET)
        del model.graph.value_info[:]  # the converter's shape inference adds them; qat_to_int8 writes none
    g = model.graph
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {n.name for n in g.node}
    casts = []
    for t in g.initializer:
        if t.name not in names:
            continue
        values = numpy_helper.to_array(t)
        packed = _unique(f"{t.name}_int4", taken)
        cast = helper.make_node("Cast", [packed], [t.name], name=_unique(f"{t.name}_Cast", taken), to=TensorProto.INT8)
        t.CopyFrom(helper.make_tensor(packed, TensorProto.INT4, values.shape, _pack_nibbles(values), raw=True))
        casts.append(cast)
    nodes = casts + list(g.node)  # the Casts read initializers only, so first is topological order
    del g.node[:]
    g.node.extend(nodes)
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import), True))
    return model


def _int4_weights(model: onnx.ModelProto) -> set[str]:
    """int8 initializers read only by DequantizeLinear nodes (as their data input) whose values fit INT4."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n, i))
    outputs = {o.name for o in model.graph.output}
    out = set()
    for t in model.graph.initializer:
        users = readers.get(t.name, [])
        if t.data_type != TensorProto.INT8 or not users or t.name in outputs \
                or any(n.op_type != "DequantizeLinear" or i != 0 for n, i in users):
            continue
        values = numpy_helper.to_array(t)
        if values.size and INT4_MIN <= int(values.min()) and int(values.max()) <= INT4_MAX:
            out.add(t.name)
    return out


def _pack_nibbles(values) -> bytes:
    """Two's-complement nibbles, the first element in the low half of each byte (ONNX's INT4 layout)."""
    u = (values.ravel().astype(np.uint8) & 0x0F)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def _default_opset(model: onnx.ModelProto) -> int:
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 1)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate

