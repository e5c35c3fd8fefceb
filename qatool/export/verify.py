"""Check the int8 model on onnxruntime: which nodes became integer kernels, and does it compute what the
simulation computed.

Fusion: the model is loaded with extended optimisation and the optimised graph is saved
(`optimized_model_filepath`); onnxruntime names each fused kernel after the node it replaced, so every node meant
to be int8 is looked up by name and must have become its QLinear/QGemm kernel. For each one that did not, the
QDQ rule it broke is read off the unoptimised graph.

Numerics: the same batch through onnxruntime and through the engine's simulation: top-1 agreement and the
largest difference of the outputs in quantization steps of the output's scale.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..runtime.backends import ort_session

# op_type of a quantized node -> the onnxruntime kernels it may become
INT8_KERNELS = {
    "Conv": ("QLinearConv",),
    "Gemm": ("QGemm",),
    "MatMul": ("QLinearMatMul", "MatMulIntegerToFloat", "QGemm"),
    "Add": ("QLinearAdd",),
    "Mul": ("QLinearMul",),
    "Concat": ("QLinearConcat",),
    "GlobalAveragePool": ("QLinearGlobalAveragePool",),
    "AveragePool": ("QLinearAveragePool",),
    "Sigmoid": ("QLinearSigmoid",),
    "LeakyRelu": ("QLinearLeakyRelu",),
    "LSTM": ("DynamicQuantizeLSTM",),
}
COUNTED_KERNELS = ("QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM")


@dataclass
class FusionReport:
    kernels: dict[str, int] = field(default_factory=dict)  # op_type -> count in the optimised graph
    expected: int = 0  # nodes meant to run as integer kernels
    fused: int = 0
    unfused: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op_type, why)
    # float ops of the optimised graph that read a DequantizeLinear and feed a QuantizeLinear: each costs two
    # conversions and a float pass (node, op_type, why it is float)
    float_between: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def integer_kernels(self) -> int:
        return sum(self.kernels.values())

    def to_dict(self) -> dict:
        return {"kernels": self.kernels, "integer_kernels": self.integer_kernels, "expected": self.expected,
                "fused": self.fused, "unfused": [{"node": n, "op_type": t, "reason": r} for n, t, r in self.unfused],
                "float_between_qdq": [{"node": n, "op_type": t, "reason": r} for n, t, r in self.float_between]}


def fusion_lines(f: dict) -> list[str]:
    """The summary lines of a FusionReport's dict: onnxruntime's own count of integer kernels, the nodes that
    did not fuse, and the float ops left between a DequantizeLinear and a QuantizeLinear."""
    kernels = ", ".join(f"{k} {v}" for k, v in sorted(f["kernels"].items()))
    total = f.get("integer_kernels", sum(f["kernels"].values()))
    lines = [f"onnxruntime's optimised graph: {total} integer kernels ({kernels}); {f['fused']} of {f['expected']} "
             "quantized nodes fused"]
    lines += [f"  not fused: {u['node']} ({u['op_type']}): {u['reason']}" for u in f["unfused"]]
    between = f.get("float_between_qdq", [])
    if between:
        groups: dict[tuple[str, str], int] = {}
        for b in between:
            groups[(b["op_type"], b["reason"])] = groups.get((b["op_type"], b["reason"]), 0) + 1
        lines.append(f"  {len(between)} float ops between DequantizeLinear and QuantizeLinear (two conversions each): "
                     + "; ".join(f"{t} x{n} ({why})" for (t, why), n in groups.items()))
    return lines


def optimized_graph(model_path: str | Path) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        ort_session(str(model_path), level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized_path=out)
        return onnx.load(out)


def check_fusion(model_path: str | Path, meant_int8: list[tuple[str, str]],
                 float_reasons: dict[str, str] | None = None) -> FusionReport:
    """`meant_int8`: (node name, op_type) of every node that should have become an integer kernel;
    `float_reasons`: node name -> why the placement left it float (for the float ops found between Q/DQ)."""
    opt = optimized_graph(model_path)
    by_name = {n.name: n.op_type for n in opt.graph.node}
    report = FusionReport(expected=len(meant_int8))
    for n in opt.graph.node:
        if n.op_type.startswith("QLinear") or n.op_type in COUNTED_KERNELS:
            report.kernels[n.op_type] = report.kernels.get(n.op_type, 0) + 1
    report.float_between = _float_between_qdq(opt, float_reasons or {})
    source = onnx.load(str(model_path))
    for name, op_type in meant_int8:
        if by_name.get(name) in INT8_KERNELS.get(op_type, ()):
            report.fused += 1
        else:
            report.unfused.append((name, op_type, _why_not_fused(source, name)))
    return report


def _float_between_qdq(opt: onnx.ModelProto, reasons: dict[str, str]) -> list[tuple[str, str, str]]:
    producers = {o: n for n in opt.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in opt.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for n in opt.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.domain not in ("", "ai.onnx"):
            continue
        reads_dq = any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)
        feeds_q = any(u.op_type == "QuantizeLinear" for o in n.output for u in consumers.get(o, []))
        if reads_dq and feeds_q:
            found.append((n.name, n.op_type, reasons.get(n.name, f"onnxruntime has no integer {n.op_type} here")))
    return found


def _why_not_fused(model: onnx.ModelProto, name: str) -> str:
    """The QDQ node-unit rule a node breaks, read off the unoptimised graph."""
    nodes = {n.name: n for n in model.graph.node}
    node = nodes.get(name)
    if node is None:
        return "the node is not in the exported graph"
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in model.graph.initializer}
    for i in node.input:
        if not i or i in inits:
            continue
        p = producers.get(i)
        if p is None or p.op_type != "DequantizeLinear":
            return f"input {i!r} is not produced by a DequantizeLinear"
        if len(consumers.get(i, [])) > 1:
            return f"the DequantizeLinear of input {i!r} feeds more than one node"
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return "its output does not go straight into one QuantizeLinear"
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        dq = producers.get(node.input[2])
        zp = inits.get(dq.input[2]) if dq is not None and len(dq.input) > 2 else None
        if zp is None or zp.data_type != onnx.TensorProto.INT32:
            return "its bias is not an int32 DequantizeLinear"
    return "onnxruntime's QDQ selector rejected it (types, axis or opset)"


@dataclass
class Agreement:
    images: int
    agreement_top1: float
    max_diff_steps: float | None  # largest |simulation - onnxruntime| over the output, in quantization steps
    max_abs_diff: float

    def to_dict(self) -> dict:
        return {"images": self.images, "agreement_top1": self.agreement_top1,
                "max_diff_steps": self.max_diff_steps, "max_abs_diff": self.max_abs_diff}


def output_scale(model: onnx.ModelProto) -> float | None:
    """The scale of the DequantizeLinear that produces the first graph output, if one does."""
    out = model.graph.output[0].name
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if out in n.output and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            return float(onnx.numpy_helper.to_array(inits[n.input[1]]))
    return None


def compare(simulated: np.ndarray, deployed: np.ndarray, scale: float | None) -> Agreement:
    simulated = simulated.reshape(len(simulated), -1)  # one row per input, whatever the output's rank
    deployed = deployed.reshape(len(deployed), -1)
    diff = np.abs(simulated.astype(np.float64) - deployed.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    agree = float(np.mean(simulated.argmax(1) == deployed.argmax(1))) if simulated.size else 1.0
    return Agreement(len(simulated), agree, max_abs / scale if scale else None, max_abs)
