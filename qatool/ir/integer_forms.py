"""Rewrite ops into the equivalent forms whose pieces onnxruntime runs as integer kernels.

- HardSwish(x) = x * HardSigmoid(x; alpha = 1/6, beta = 0.5): the ONNX definition, and what onnxruntime itself
  expands the function into. Quantized, the Mul runs as a QLinearMul; a whole HardSwish has no integer kernel
  and would stay float between a DequantizeLinear and a QuantizeLinear.
- HardSigmoid(x; alpha, beta) = Clip(x * alpha + beta, 0, 1). Quantized (`quant/prepare.py`), the Mul by alpha
  is a rescaling of x's DequantizeLinear, the Add a QLinearAdd whose output range [0, 1] makes the Clip
  redundant: one integer kernel where onnxruntime's own quantizer leaves a float HardSigmoid between a
  DequantizeLinear and a QuantizeLinear (measured on PP-LCNet at 224 x 224, batch 32: those conversions and the
  float HardSigmoid were 41 % of the int8 model's time).
- Div(x, c) = Mul(x, 1 / c) for a constant c without zeros (Paddle's and TF's hard-swish end in a division by
  6): onnxruntime has QLinearMul and no integer Div. The two differ by float rounding of 1 / c only (at most an
  ulp of the quotient), and training and export both see the Mul.
- Mul(Mul(u, v), c) = Mul(u, Mul(v, c)) for a positive scalar c and a factor v read only by the product: the
  scaling of v is then a rescaled DequantizeLinear once quantized, one rounding fewer than a QLinearMul after
  the product.

Each rewrite is a check (`*_why_not`: the reason it does not apply, or None) and a rewrite; `rewrite_all`
applies them in order and counts the nodes rewritten per op type. Graph input and output names are kept.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Node

HARD_SWISH_ALPHA = 1.0 / 6.0
HARD_SWISH_BETA = 0.5


def hard_swish_why_not(graph: Graph, node: Node) -> str | None:
    if node.op_type != "HardSwish" or node.domain:
        return "not an ONNX HardSwish"
    return None


def rewrite_hard_swish(graph: Graph, node: Node) -> None:
    """x -> HardSigmoid(x) -> h; Mul(x, h) writes the HardSwish's output."""
    x, y = node.input(0), node.outputs[0]
    h = graph.unique_name(f"{y}_hardsigmoid")
    sigmoid = Node("HardSigmoid", [x], [h], graph.unique_name(f"{node.name}_HardSigmoid"),
                   {"alpha": HARD_SWISH_ALPHA, "beta": HARD_SWISH_BETA})
    mul = Node("Mul", [x, h], [y], graph.unique_name(f"{node.name}_Mul"))
    i = graph.nodes.index(node)
    graph.nodes[i:i + 1] = [sigmoid, mul]


def hard_sigmoid_why_not(graph: Graph, node: Node) -> str | None:
    if node.op_type != "HardSigmoid" or node.domain:
        return "not an ONNX HardSigmoid"
    if float(node.attrs.get("alpha", 0.2)) <= 0:
        return "its alpha is not positive"
    return None


def rewrite_hard_sigmoid(graph: Graph, node: Node) -> None:
    """x -> Mul(x, alpha) -> Add(., beta) -> Clip(., 0, 1), which writes the HardSigmoid's output."""
    x, y = node.input(0), node.outputs[0]
    dtype = np.float32
    consts = []
    for what, value in (("alpha", float(node.attrs.get("alpha", 0.2))), ("beta", float(node.attrs.get("beta", 0.5))),
                        ("zero", 0.0), ("one", 1.0)):
        name = graph.unique_name(f"{node.name}_{what}")
        graph.initializers[name] = np.asarray(value, dtype)
        consts.append(name)
    alpha, beta, zero, one = consts
    scaled, shifted = graph.unique_name(f"{y}_scaled"), graph.unique_name(f"{y}_shifted")
    new = [Node("Mul", [x, alpha], [scaled], graph.unique_name(f"{node.name}_Mul")),
           Node("Add", [scaled, beta], [shifted], graph.unique_name(f"{node.name}_Add")),
           Node("Clip", [shifted, zero, one], [y], graph.unique_name(f"{node.name}_Clip"))]
    i = graph.nodes.index(node)
    graph.nodes[i:i + 1] = new


def div_why_not(graph: Graph, node: Node) -> str | None:
    if node.op_type != "Div":
        return "not a Div"
    c = graph.initializers.get(node.input(1))
    if c is None:
        return "its divisor is not a constant"
    if not np.issubdtype(c.dtype, np.floating):
        return "its divisor is not floating point"
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        return "its divisor has zeros or non-finite values"
    return None


def rewrite_div(graph: Graph, node: Node) -> None:
    """Div(x, c) -> Mul(x, 1 / c), the reciprocal a new constant (c may be shared with other nodes)."""
    c = graph.initializers[node.input(1)]
    name = graph.unique_name(f"{node.input(1)}_reciprocal")
    graph.initializers[name] = (np.ones((), c.dtype) / c).astype(c.dtype)
    node.op_type = "Mul"
    node.inputs = [node.input(0), name]
    node.attrs = {}


def _positive_scalar(graph: Graph, name: str) -> bool:
    c = graph.initializers.get(name)
    return c is not None and np.issubdtype(c.dtype, np.floating) and c.size == 1 and float(c.reshape(())) > 0


def scalar_of_product_why_not(graph: Graph, node: Node) -> str | None:
    """Mul(Mul(u, v), c) with c a positive scalar, the inner Mul read only here, and v read only by it."""
    if node.op_type != "Mul" or len(node.inputs) != 2 or not _positive_scalar(graph, node.input(1)):
        return "not a Mul by a positive scalar constant"
    inner = graph.producers().get(node.input(0))
    consumers = graph.consumers()
    if inner is None or inner.op_type != "Mul" or len(consumers.get(node.input(0), [])) != 1 \
            or node.input(0) in graph.output_names:
        return "it does not scale a product that only it reads"
    if not any(len(consumers.get(v, [])) == 1 and v not in graph.initializers for v in inner.inputs):
        return "neither factor of the product is read only by it"
    return None


def rewrite_scalar_of_product(graph: Graph, node: Node) -> None:
    """Mul(Mul(u, v), c) -> Mul(u, Mul(v, c)): the scalar moves onto the factor only the product reads (Paddle's
    and TF's hard-swish x * clip(x + 3, 0, 6) / 6 becomes x * (clip(x + 3, 0, 6) / 6)). Quantized, Mul(v, c) is
    then a rescaling of v's DequantizeLinear (no rounding of its own) instead of a QLinearMul after the product."""
    consumers = graph.consumers()
    inner = graph.producers()[node.input(0)]
    u, v = inner.inputs
    if not (len(consumers.get(v, [])) == 1 and v not in graph.initializers):
        u, v = v, u
    scaled = graph.unique_name(f"{v}_scaled")
    c = node.input(1)
    node.inputs, node.outputs, inner.inputs, inner.outputs = [v, c], [scaled], [u, scaled], list(node.outputs)
    i, j = graph.nodes.index(inner), graph.nodes.index(node)
    graph.nodes[i], graph.nodes[j] = node, inner  # the scaling runs first


# in this order: the HardSigmoids that HardSwish leaves are decomposed in turn; a Div becomes the Mul whose
# scalar then moves onto a factor
_REWRITES = ((hard_swish_why_not, rewrite_hard_swish), (hard_sigmoid_why_not, rewrite_hard_sigmoid),
             (div_why_not, rewrite_div), (scalar_of_product_why_not, rewrite_scalar_of_product))


def rewrite_all(graph: Graph) -> dict[str, int]:
    """Apply every rewrite wherever its check passes; returns how many nodes of each op_type were rewritten."""
    done: dict[str, int] = {}
    for why_not, rewrite in _REWRITES:
        for node in list(graph.nodes):
            if why_not(graph, node) is None:
                done[node.op_type] = done.get(node.op_type, 0) + 1
                rewrite(graph, node)
    return done
