"""The deployable int8 model, written from the QAT graph with the very functions the simulation used.

Rewrites, on a copy of the engine's QAT graph (current parameters, BN statistics and quantizer state):
- FakeQuant(x) -> t            becomes  QuantizeLinear(x) -> DequantizeLinear -> t (trained scale / zero point);
                                        of a constant x, its integers and a DequantizeLinear;
- WeightQuant(W, [gamma, var]) becomes  an int8 initializer (W folded with its BN, per-channel scales, narrow
                                        range) and a DequantizeLinear with `axis`;
- FoldedBias(acc, ...) -> out  becomes  the layer's bias input: an int32 initializer with scale
                                        s_input * s_weight and a DequantizeLinear; the layer writes `out`;
- activations of fewer bits than their 8-bit container get an integer Clip right after the QuantizeLinear
  (uint8/int8 Clip to the b-bit grid), so the deployed model clips exactly where the simulation did; the
  Conv/Gemm before it still fuses, and the Clip costs one cheap pass over 8-bit data;
- a Relu/Clip between a layer and its QuantizeLinear is removed when the Q's grid already lies inside it (to
  within half a step: the int8 kernel's saturation then gives the same integers); Dropout and Identity are
  removed;
- a Mul of a DequantizeLinear by a positive scalar becomes a DequantizeLinear of the same integers with the
  scale multiplied (the rescaling the simulation computed in float);
- each DequantizeLinear feeds exactly one consumer (onnxruntime's node-unit rule);
- qatool.DynamicQuantizeLSTM(X, WeightQuant(W), WeightQuant(R), ..., W_scale, R_scale) becomes onnxruntime's
                                        com.microsoft DynamicQuantizeLSTM: W and R as int8 [D, K, 4H] (transposed,
                                        as the kernel reads them), their scales [D, 4H] (or [D]), int8 zero points
                                        0; the model's metadata then says to run it one input at a time
                                        (`ir.batch.PER_INPUT_KEY`).
The int8 weights and int32 biases are bit-identical to what the simulation fake-quantized.
"""

from __future__ import annotations

import copy
import json

import numpy as np

from ..convert import remove_inference_noops
from ..errors import DivergedError, ModelError
from ..ir.batch import PER_INPUT_KEY
from ..ir.graph import Graph, Node
from ..ir.roles import STATE_KEY, TRAINABLE_KEY
from ..quant.ops import bn_fold_factor, fold_weight, folded_bias, folded_step, weight_axis
from ..quant.prepare import DYNAMIC_KERNEL
from ..quant.qparams import (MIN_SCALE, Grid, activation_grid, activation_range, bias_integers,
                             grid_inside, quantize, weight_grid, weight_scales)

FLOAT_NODES_KEY = "qatool.float_nodes"
MS_DOMAIN = "com.microsoft"


def session_int8(session) -> Graph:
    """The int8 model of a QAT session's current state (its engine graph, as `qat_to_int8` converts it);
    DivergedError when that state overflows (its scales go non-finite: a diverged run is stopped, not
    exported)."""
    with np.errstate(over="ignore", invalid="ignore"):
        g = qat_to_int8(session.model.to_graph(), session.plan.report()["float_nodes"])
    bad = g.nonfinite_initializer()
    if bad is not None:
        raise DivergedError(f"the int8 model's {bad!r} is not finite")
    return g


def qat_to_int8(qat: Graph, float_nodes: list[dict] | None = None) -> Graph:
    """The int8 QDQ graph of a QAT graph (which is left unchanged)."""
    g = copy.deepcopy(qat)
    weight_scale: dict[str, np.ndarray] = {}
    grids: dict[str, Grid] = {}  # quantized tensor -> its activation grid
    producers = g.producers()
    lstm_weights = {n.input(k) for n in g.nodes if n.op_type == DYNAMIC_KERNEL for k in (1, 2)}
    new_nodes: list[Node] = []
    for node in g.nodes:
        if node.domain != "qatool":
            new_nodes.append(node)
        elif node.op_type == "FakeQuant":
            new_nodes += _activation_qdq(g, node, grids)
        elif node.op_type == "WeightQuant":
            if node.outputs[0] not in lstm_weights:  # those become the LSTM's own integer inputs
                new_nodes.append(_weight_dq(g, node, weight_scale))
        elif node.op_type == DYNAMIC_KERNEL:
            new_nodes.append(_dynamic_lstm(g, node, producers))
        elif node.op_type == "FoldedBias":
            _bias_into_layer(g, node, producers, weight_scale)
        else:
            raise ModelError(f"internal: unknown qatool op {node.op_type}")
    g.nodes = new_nodes
    g.other_opsets.pop("qatool", None)
    _fold_rescales(g)
    _remove_redundant_activations(g, grids)
    remove_inference_noops(g)
    g.toposort()
    _requantize_pass_through(g)
    _one_dequantize_per_consumer(g)
    g.cleanup()
    g.toposort()
    for key in (TRAINABLE_KEY, STATE_KEY):
        g.metadata.pop(key, None)
    g.metadata[FLOAT_NODES_KEY] = json.dumps(float_nodes or [])
    g.value_info.clear()  # intermediate types and shapes: onnxruntime infers them; they only weigh on the file
    return g


def _activation_qdq(g: Graph, node: Node, grids: dict[str, Grid]) -> list[Node]:
    x, scale, zero, span = node.inputs
    s = np.maximum(g.initializers[scale], MIN_SCALE)  # a learned (LSQ) scale is floored as in the simulation
    if not g.initializers[span][0] <= g.initializers[span][1]:
        raise ModelError(f"activation {node.outputs[0]!r} was never observed: train at least one step before export")
    grid = activation_grid(int(node.attrs.get("bits", 8)), bool(node.attrs.get("symmetric", 0)))
    t = node.outputs[0]
    s_name, z_name = g.unique_name(f"{t}_scale"), g.unique_name(f"{t}_zero_point")
    g.initializers[s_name] = np.asarray(s, np.float32).reshape(())
    g.initializers[z_name] = np.asarray(g.initializers[zero], np.float32).astype(grid.storage).reshape(())
    q = g.unique_name(f"{t}_quantized")
    grids[q] = grid
    if x in g.initializers:  # a constant operand: its integers are computed here, on the b-bit grid
        g.initializers[q] = quantize(g.initializers[x].astype(np.float32), s, g.initializers[z_name], grid)
        return [Node("DequantizeLinear", [q, s_name, z_name], [t], g.unique_name(f"{t}_DequantizeLinear"))]
    nodes = [Node("QuantizeLinear", [x, s_name, z_name], [q], g.unique_name(f"{t}_QuantizeLinear"))]
    info = np.iinfo(grid.storage)
    if (grid.qmin, grid.qmax) != (info.min, info.max):  # b < 8 bits in an 8-bit container: clip to the grid
        lo = _shared_constant(g, "qmin", grid.qmin, grid.storage)
        hi = _shared_constant(g, "qmax", grid.qmax, grid.storage)
        clipped = g.unique_name(f"{t}_quantized_clipped")
        nodes.append(Node("Clip", [q, lo, hi], [clipped], g.unique_name(f"{t}_Clip")))
        q = clipped
    nodes.append(Node("DequantizeLinear", [q, s_name, z_name], [t], g.unique_name(f"{t}_DequantizeLinear")))
    return nodes


def _shared_constant(g: Graph, base: str, value: int, dtype: np.dtype) -> str:
    """One scalar initializer per value, shared by every node that needs it (the Clips of all b-bit activations)."""
    a = np.asarray(value, dtype)
    name = f"{base}_{a.dtype.name}_{value}"
    held = g.initializers.get(name)
    if held is not None and held.dtype == a.dtype and held.shape == a.shape and held == a:
        return name
    name = g.unique_name(name)  # taken by another tensor: this value gets its own
    g.initializers[name] = a
    return name


def _weight_integers(g: Graph, node: Node) -> tuple[np.ndarray, np.ndarray]:
    """(integers, scale) of a WeightQuant's weight, as its forward computes them."""
    w = g.initializers[node.input(0)]
    axis = weight_axis(node.attrs.get("axis", 0))
    per_channel = bool(node.attrs.get("per_channel", 1))
    grid = weight_grid(int(node.attrs.get("bits", 8)))
    k = None
    if node.input(1):
        k = bn_fold_factor(g.initializers[node.input(1)], g.initializers[node.input(2)],
                           float(node.attrs.get("epsilon", 1e-5)))
        w = fold_weight(w, k, axis)
    if node.input(3):  # a learned step size (LSQ), scaled by the fold as the simulation scales it
        scale = folded_step(g.initializers[node.input(3)], k, per_channel)
    else:
        scale = weight_scales(w, axis if per_channel else None, grid)
    return quantize(w, scale, 0, grid, axis if per_channel else None), scale


def _weight_dq(g: Graph, node: Node, weight_scale: dict[str, np.ndarray]) -> Node:
    q, scale = _weight_integers(g, node)
    axis = int(node.attrs.get("axis", 0))
    per_channel = bool(node.attrs.get("per_channel", 1))
    w_q, s_out = node.outputs
    weight_scale[s_out] = scale
    names = _quantized_initializers(g, node.input(0), q, scale)
    attrs = {"axis": axis} if per_channel else {}
    return Node("DequantizeLinear", names, [w_q], g.unique_name(f"{node.input(0)}_DequantizeLinear"), attrs)


def _quantized_initializers(g: Graph, base: str, q: np.ndarray, scale: np.ndarray) -> list[str]:
    """The names of new initializers holding a weight's or a bias's integers `q`, its `scale` and zero points 0
    (in q's dtype)."""
    names = [g.unique_name(f"{base}_quantized"), g.unique_name(f"{base}_scale"), g.unique_name(f"{base}_zero_point")]
    g.initializers[names[0]] = q
    g.initializers[names[1]] = scale
    g.initializers[names[2]] = np.zeros(scale.shape, q.dtype)
    return names


def _dynamic_lstm(g: Graph, node: Node, producers: dict[str, Node]) -> Node:
    """The com.microsoft DynamicQuantizeLSTM of a qatool.DynamicQuantizeLSTM (see the module docstring)."""
    inputs = node.inputs[:8]
    quantized = []
    for k in (1, 2):
        wq = producers[node.input(k)]
        q, scale = _weight_integers(g, wq)  # [D, 4H, K] as the LSTM holds it; the kernel reads [D, K, 4H]
        names = _quantized_initializers(g, wq.input(0), np.ascontiguousarray(q.transpose(0, 2, 1)), scale)
        inputs[k] = names[0]
        quantized += names[1:]
    g.other_opsets[MS_DOMAIN] = 1
    g.metadata[PER_INPUT_KEY] = (f"{DYNAMIC_KERNEL} quantizes its activations over the whole batch it is given: "
                                 "one input at a time is what qatool trained and checked")
    attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
    return Node(DYNAMIC_KERNEL, inputs + quantized, list(node.outputs), node.name, attrs, MS_DOMAIN)


def _bias_into_layer(g: Graph, node: Node, producers: dict[str, Node], weight_scale: dict[str, np.ndarray]) -> None:
    acc, b, gamma, beta, mean, var, s_in, s_w = (node.input(i) for i in range(8))
    layer = producers[acc]
    inits = g.initializers
    bias = inits[b].reshape(-1) if b else None
    if gamma:
        k = bn_fold_factor(inits[gamma], inits[var], float(node.attrs.get("epsilon", 1e-5)))
        bias = folded_bias(bias, k, inits[beta], inits[mean])
    q, scale = bias_integers(bias, inits[s_in], weight_scale[s_w])
    base = f"{layer.name}_bias"
    names = _quantized_initializers(g, base, q, scale)  # int32 integers and zero points
    bias_out = g.unique_name(base)
    g.nodes.append(Node("DequantizeLinear", names, [bias_out], g.unique_name(f"{base}_DequantizeLinear"),
                        {"axis": 0}))
    layer.inputs = [layer.input(0), layer.input(1), bias_out]
    layer.outputs = [node.outputs[0]]


def _fold_rescales(g: Graph) -> None:
    """Mul(DequantizeLinear(q, s, z), c) -> DequantizeLinear(q, s * c, z) for a per-tensor DequantizeLinear and
    a positive scalar constant c: the same values (up to float rounding of s * c), and the consumer reads a
    DequantizeLinear, so it fuses (`quant.prepare._rescaled_input`: the Mul of HardSigmoid's x * alpha)."""
    producers = g.producers()
    for node in [n for n in g.nodes if n.op_type == "Mul" and len(n.inputs) == 2]:
        for i, j in ((0, 1), (1, 0)):
            dq, c = producers.get(node.input(i)), g.initializers.get(node.input(j))
            if dq is None or dq.op_type != "DequantizeLinear" or c is None or c.size != 1 \
                    or not float(c.reshape(())) > 0 or g.initializers[dq.input(1)].size != 1:
                continue
            scale = g.unique_name(f"{node.outputs[0]}_scale")
            g.initializers[scale] = (g.initializers[dq.input(1)] * c.astype(np.float32).reshape(())).astype(
                np.float32).reshape(())
            node.op_type, node.attrs, node.name = "DequantizeLinear", {}, g.unique_name(f"{node.name}_DequantizeLinear")
            node.inputs = [dq.input(0), scale, dq.input(2)]
            break


def _remove_redundant_activations(g: Graph, grids: dict[str, Grid]) -> None:
    """Drop a Relu/Clip feeding only a QuantizeLinear whose grid lies inside the activation's range
    (`qparams.grid_inside`): exact, not approximate, the integers are the same."""
    consumers = g.consumers()
    for node in [n for n in g.nodes if n.op_type in ("Relu", "Clip")]:
        users = consumers.get(node.outputs[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or node.outputs[0] in g.output_names:
            continue
        q = users[0]
        grid = grids.get(q.outputs[0])
        if grid is None:
            continue
        lo_act, hi_act = activation_range(node, g.initializers)
        if grid_inside(grid, g.initializers[q.input(1)], g.initializers[q.input(2)], lo_act, hi_act):
            q.inputs = [node.input(0), *q.inputs[1:]]
            g.nodes.remove(node)


def _requantize_pass_through(g: Graph) -> None:
    """After MaxPool/Reshape/Flatten/... of a dequantized tensor, quantize again with the same scale and zero
    point, so the next quantized op reads a DequantizeLinear (onnxruntime then runs the op itself on int8)."""
    from ..quant.prepare import passes_through

    producers, consumers = g.producers(), g.consumers()
    for node in list(g.nodes):
        dq = producers.get(node.input(0))
        if not passes_through(node) or dq is None or dq.op_type != "DequantizeLinear" \
                or "axis" in dq.attrs and g.initializers[dq.input(1)].ndim:
            continue
        out = node.outputs[0]
        if any(u.op_type == "QuantizeLinear" for u in consumers.get(out, [])):
            continue
        new = g.unique_name(f"{out}_float")
        q = g.unique_name(f"{out}_quantized")
        node.outputs = [new, *node.outputs[1:]]
        g.nodes.append(Node("QuantizeLinear", [new, dq.input(1), dq.input(2)], [q], g.unique_name(f"{out}_QuantizeLinear")))
        g.nodes.append(Node("DequantizeLinear", [q, dq.input(1), dq.input(2)], [out],
                            g.unique_name(f"{out}_DequantizeLinear")))
        producers = g.producers()
    g.toposort()


def _one_dequantize_per_consumer(g: Graph) -> None:
    consumers = g.consumers()
    for dq in [n for n in g.nodes if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.outputs[0], [])
        if dq.outputs[0] in g.output_names:
            continue
        for user in users[1:]:
            out = g.unique_name(f"{dq.outputs[0]}_{user.name}")
            g.nodes.append(Node("DequantizeLinear", list(dq.inputs), [out], g.unique_name(f"{dq.name}_{user.name}"),
                                dict(dq.attrs)))
            user.inputs = [out if i == dq.outputs[0] else i for i in user.inputs]
