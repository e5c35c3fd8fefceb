"""Placement of fake quantization: rules that only *mark* (`mark`), one pass that materialises (`insert`).

The rules mirror what onnxruntime fuses into integer kernels (its QDQ selectors), so that what is simulated
here is what runs after export:
- every quantized Conv/Gemm/MatMul reads a quantized input and a per-channel fake-quantized weight (with a
  following BatchNormalization folded into it), adds its bias on the int32 grid, and quantizes its output
  after a following Relu/Clip (which the output's range makes redundant in the int8 model);
- Add, Mul, Concat, GlobalAveragePool, AveragePool, Sigmoid and LeakyRelu read quantized inputs and quantize
  their output (onnxruntime has QLinear kernels for them); a constant operand of an Add or Mul (hard-swish's
  + 3, a scale) is quantized per tensor on the activation grid, as onnxruntime's quantizer does, so the node
  still runs as a QLinearAdd / QLinearMul;
- MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Expand, Gather, Tile, nearest-neighbour
  Resize, Identity and Dropout pass their input's quantization through (no new observer);
- a Mul of a quantized tensor by a positive scalar constant that only quantized Adds and Muls read is a
  rescaling: no quantizer, and in the int8 model its input's DequantizeLinear with the scale multiplied
  (HardSigmoid = Clip(x * alpha + beta, 0, 1) then runs as one QLinearAdd);
- the output tail stays float unless `QuantConfig.quantize_tail`: a weighted layer after which no other
  weighted layer lies on the way to a graph output keeps its output float (its input and weights are
  quantized: onnxruntime runs a MatMul as MatMulIntegerToFloat, a Gemm as QGemm with a float output, a Conv
  in float on the dequantized weights), and so does everything after it. One 8-bit scale over a whole output
  rounds every logit of a recogniser's 6,625 classes to a step of their joint range, and a detector head's
  class logits to the step of its box logits; the ops after the last weighted layer (softmax, decoding) are
  cheap beside the network;
- integer shape arithmetic (Shape -> Gather -> Mul -> Concat, which a model with a free batch or width computes
  at run time) stays as it is: an Add/Mul/Concat of integers is never quantized;
- an LSTM/GRU/RNN stays float (onnxruntime has no QDQ kernel for them), unless `QuantConfig.recurrent` is
  "dynamic": then an LSTM becomes onnxruntime's DynamicQuantizeLSTM (`DYNAMIC_REASON`), simulated by the engine's
  qatool.DynamicQuantizeLSTM with its W and R fake-quantized per direction and gate row (WeightQuant); it reads
  and writes float tensors, and counts as a weighted layer for the output tail. GRU and RNN have no such kernel;
- anything else stays float; the plan says which nodes and why. The graph input is quantized by the first
  quantized op that reads it, like every other float tensor a quantized op reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import ConfigError
from ..ir.graph import Graph, Node
from ..ir.roles import read_roles, write_roles
from .config import QuantConfig
from .qparams import activation_grid, activation_qparams

WEIGHTED = ("Conv", "Gemm", "MatMul")
WEIGHT_LAYERS = WEIGHTED + ("ConvTranspose",)  # what ends the output tail: a layer with a constant weight
TAIL_REASON = "the output tail (after the last weighted layer) stays float; --quantize-tail quantizes it"
ACTIVATION_QUANT = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu")
CONSTANT_OPERAND_QUANT = ("Add", "Mul")  # a constant operand is quantized like an activation (per tensor)
PASS_THROUGH = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity",
                "Dropout", "Expand", "Gather", "Tile", "Resize")
FUSED_ACTIVATIONS = ("Relu", "Clip")
DOMAIN = "qatool"


RECURRENT = ("LSTM", "GRU", "RNN")
DYNAMIC_KERNEL = "DynamicQuantizeLSTM"
DYNAMIC_REASON = ("onnxruntime's DynamicQuantizeLSTM: int8 weights per direction and gate row (per direction with "
                  "--per-tensor), its input and hidden state quantized to uint8 inside the kernel at run time, "
                  "per input")


def float_reason(op_type: str, recurrent: str = "float") -> str:
    """Why an op with no quantized form stays float (the placement report's words); `recurrent` is
    `QuantConfig.recurrent`."""
    if op_type in RECURRENT:
        why = (f"onnxruntime has no QDQ kernel for a recurrent op: {op_type} runs in float between "
               "DequantizeLinear and QuantizeLinear, its weights trained in float")
        if op_type != "LSTM":
            return why + (f" (and no dynamically quantized {op_type} kernel)" if recurrent == "dynamic" else "")
        return why + f"; --recurrent dynamic runs it as {DYNAMIC_KERNEL}"
    return f"onnxruntime has no integer kernel for {op_type}"


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# Ops whose output has the type of their first input: they carry integer shape arithmetic on.
_SAME_TYPE = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape", "Identity", "Expand", "Tile", "Add",
              "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min")


def integer_tensors(graph: Graph) -> set[str]:
    """Tensors known to hold integers or booleans (shape arithmetic such as Shape -> Gather -> Mul, which a model
    with a free batch or width computes at run time): never quantized."""
    ints = {k for k, v in graph.initializers.items() if v.dtype.kind in "iub"}
    ints |= {v.name for v in (*graph.inputs, *graph.value_info.values())
             if v.elem_type and v.elem_type not in _FLOAT_TYPES}
    for node in graph.nodes:
        if node.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin") or (
                node.op_type == "Cast" and node.attrs.get("to") not in _FLOAT_TYPES) or (
                node.op_type in _SAME_TYPE and node.input(0) in ints):
            ints.update(o for o in node.outputs if o)
    return ints


def passes_through(node: Node) -> bool:
    """Moves its input's values without computing new ones, so its output keeps the input's scale (onnxruntime
    runs it on the integers: its drop-QDQ rules). Resize only with nearest-neighbour sampling: a linear Resize
    of integers rounds its interpolated values (ties at every half), which the float simulation would not."""
    if node.op_type == "Resize":
        return node.attrs.get("mode", "nearest") in ("nearest", b"nearest")
    return node.op_type in PASS_THROUGH


@dataclass
class Layer:
    """A quantized Conv/Gemm/MatMul and what folds into it."""

    node: Node
    bn: Node | None
    activation: Node | None
    input_source: str  # the quantized tensor whose scale the layer's input carries
    float_output: bool = False  # in the output tail: input and weights quantized, output float


@dataclass
class Plan:
    layers: list[Layer] = field(default_factory=list)
    activation_ops: list[Node] = field(default_factory=list)
    dynamic_recurrent: list[Node] = field(default_factory=list)  # LSTMs that become DynamicQuantizeLSTM
    quantized: list[str] = field(default_factory=list)  # tensors that get their own FakeQuant, in order
    source: dict[str, str] = field(default_factory=dict)  # tensor -> the quantized tensor it shares scale with
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, op_type, why)
    rescaled: dict[str, str] = field(default_factory=dict)  # Mul-by-constant output -> its quantized input
    addends: dict[str, float] = field(default_factory=dict)  # quantized output of an Add of a constant -> it

    def summary(self) -> str:
        """One line: what is quantized, what stays float."""
        folded = sum(layer.bn is not None for layer in self.layers)
        tail = sum(layer.float_output for layer in self.layers)
        dynamic = len(self.dynamic_recurrent)
        return (f"{len(self.layers)} layers ({folded} with BN folded{f', {tail} with a float output' if tail else ''})"
                f"{f', {dynamic} LSTM as {DYNAMIC_KERNEL}' if dynamic else ''}"
                f", {len(self.quantized)} activation quantizers; {len(self.float_nodes)} nodes stay float")

    def report(self) -> dict:
        return {
            "quantized_layers": [layer.node.name for layer in self.layers],
            "folded_batchnorm": [layer.bn.name for layer in self.layers if layer.bn is not None],
            "float_output_layers": [layer.node.name for layer in self.layers if layer.float_output],
            "quantized_activations": len(self.quantized),
            "rescaled": len(self.rescaled),
            "float_nodes": [{"node": n, "op_type": t, "reason": why} for n, t, why in self.float_nodes],
            "dynamic_recurrent": [{"node": n.name, "op_type": "LSTM", "kernel": DYNAMIC_KERNEL,
                                   "reason": DYNAMIC_REASON} for n in self.dynamic_recurrent],
        }


def _is_excluded(node: Node, config: QuantConfig) -> bool:
    return node.name in config.exclude or node.op_type in config.exclude


def _weighted_why_not(graph: Graph, node: Node, trainable: set[str]) -> str | None:
    w = node.input(1)
    if w not in graph.initializers or w not in trainable:
        return "its weight is not a trainable initializer"
    ndim = graph.initializers[w].ndim
    if node.op_type == "Conv" and ndim < 3:
        return "unexpected weight rank"
    if node.op_type in ("Gemm", "MatMul") and ndim != 2:
        return "its weight is not a matrix"
    if node.op_type == "Gemm":
        if node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with transA or alpha != 1"
        c = node.input(2)
        if c:
            n_out = graph.initializers[w].shape[0 if node.attrs.get("transB", 0) else 1]
            if c not in graph.initializers or graph.initializers[c].size != n_out:
                return "its bias is not one constant value per output feature"
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                return "Gemm with beta != 1"
    if node.input(0) in graph.initializers:
        return "its input is a constant"
    return None


def _sole_consumer(graph: Graph, consumers: dict[str, list[Node]], tensor: str, op_types: tuple[str, ...],
                   config: QuantConfig) -> Node | None:
    users = consumers.get(tensor, [])
    if len(users) != 1 or tensor in graph.output_names:
        return None
    user = users[0]
    if user.op_type not in op_types or _is_excluded(user, config):
        return None
    return user


def _foldable_bn(graph: Graph, bn: Node | None) -> bool:
    return (bn is not None and len([o for o in bn.outputs if o]) == 1
            and all(bn.input(i) in graph.initializers for i in range(1, 5)))


def _constant_clip(graph: Graph, clip: Node | None) -> bool:
    return clip is not None and (clip.op_type == "Relu" or all(
        not i or i in graph.initializers for i in clip.inputs[1:]))


def _rescaled_input(graph: Graph, node: Node, plan: Plan, consumers: dict[str, list[Node]],
                    config: QuantConfig) -> str | None:
    """The quantized input of a Mul by a positive scalar constant that only quantized Adds and Muls read, or None:
    such a product needs no quantizer of its own, its DequantizeLinear is the input's with the scale multiplied
    (HardSigmoid's x * alpha before its + beta)."""
    if node.op_type != "Mul" or _is_excluded(node, config) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    x, c = (a, b) if b in graph.initializers else (b, a)
    value = graph.initializers.get(c)
    if value is None or x in graph.initializers or value.size != 1 or not float(value.reshape(())) > 0:
        return None
    if x not in plan.source or x in plan.rescaled:
        return None
    out = node.outputs[0]
    users = consumers.get(out, [])
    if users and out not in graph.output_names and all(
            u.op_type in CONSTANT_OPERAND_QUANT and not _is_excluded(u, config) for u in users):
        return x
    return None


def output_tail(graph: Graph, weight_layers: tuple[str, ...] = WEIGHT_LAYERS) -> set[str]:
    """The tensors from which no layer with a constant weight (Conv, ConvTranspose, Gemm, MatMul, or whatever
    `weight_layers` names) can be reached: what the last weighted layers compute and everything after them on the
    way to the graph outputs."""
    consumers = graph.consumers()
    feeds_layer: set[str] = set()
    for node in reversed(graph.nodes):
        weighted = node.op_type in weight_layers and node.input(1) in graph.initializers
        if weighted or any(o in feeds_layer for o in node.outputs):
            feeds_layer.update(i for i in node.inputs if i)
    tensors = {t for n in graph.nodes for t in (*n.inputs, *n.outputs) if t} | set(graph.input_names)
    return {t for t in tensors if t not in feeds_layer and t not in graph.initializers
            and (consumers.get(t) or t in graph.output_names)}


def _dynamic_lstm_why_not(graph: Graph, node: Node, trainable: set[str]) -> str | None:
    """Why an LSTM cannot become a DynamicQuantizeLSTM, or None."""
    if any(node.input(i) not in graph.initializers or node.input(i) not in trainable
           or graph.initializers[node.input(i)].ndim != 3 for i in (1, 2)):
        return "its W and R are not trainable initializers"
    if int(node.attrs.get("layout", 0)):
        return "layout 1 (batch first): onnxruntime's LSTM kernels run layout 0 only"
    if node.input(0) in graph.initializers:
        return "its input is a constant"
    return None


def check_recurrent(graph: Graph, config: QuantConfig) -> None:
    """ConfigError (one line) when `recurrent` is "dynamic" and the model has no LSTM for it."""
    if config.recurrent != "dynamic" or any(n.op_type == "LSTM" for n in graph.nodes):
        return
    others = sorted({n.op_type for n in graph.nodes if n.op_type in RECURRENT})
    if others:
        raise ConfigError(f"--recurrent dynamic: the model has no LSTM, and onnxruntime has no dynamically "
                          f"quantized {'/'.join(others)} kernel: use --recurrent float ({'/'.join(others)} then "
                          "runs in float)")
    raise ConfigError("--recurrent dynamic: the model has no LSTM (onnxruntime's DynamicQuantizeLSTM is its only "
                      "dynamically quantized recurrent kernel): use --recurrent float")


def mark(graph: Graph, config: QuantConfig) -> Plan:
    """Decide where fake quantization goes; the graph is not changed."""
    check_recurrent(graph, config)
    plan = Plan()
    consumers = graph.consumers()
    trainable = set(read_roles(graph)[0])
    absorbed: set[int] = set()
    dynamic = config.recurrent == "dynamic"
    tail = set() if config.quantize_tail else output_tail(graph, WEIGHT_LAYERS + (("LSTM",) if dynamic else ()))
    ints = integer_tensors(graph)

    def ensure_quantized(tensor: str) -> str:
        if tensor in plan.rescaled:  # read through its rescaled DequantizeLinear
            return tensor
        if tensor not in plan.source:
            plan.quantized.append(tensor)
            plan.source[tensor] = tensor
        return plan.source[tensor]

    def quantize_output(node: Node) -> Node | None:
        """Quantize the node's output, after a sole following Relu/Clip (returned, it is absorbed)."""
        out = node.outputs[0]
        act = _sole_consumer(graph, consumers, out, FUSED_ACTIVATIONS, config)
        if not _constant_clip(graph, act):
            act = None
        if act is not None:
            absorbed.add(id(act))
            out = act.outputs[0]
        ensure_quantized(out)
        return act

    for node in graph.nodes:
        if id(node) in absorbed:
            continue
        if _is_excluded(node, config):
            plan.float_nodes.append((node.name, node.op_type, "excluded by --exclude"))
            continue
        in_tail = all(o in tail for o in node.outputs if o)
        if node.op_type == "LSTM" and dynamic:
            why = _dynamic_lstm_why_not(graph, node, trainable)
            if why:
                plan.float_nodes.append((node.name, node.op_type, f"{why}: it runs in float, not as {DYNAMIC_KERNEL}"))
            else:
                plan.dynamic_recurrent.append(node)
        elif node.op_type in WEIGHTED:
            why = _weighted_why_not(graph, node, trainable)
            if why:
                plan.float_nodes.append((node.name, node.op_type, why))
                continue
            source = ensure_quantized(node.input(0))
            bn = None
            if node.op_type in ("Conv", "Gemm"):
                bn = _sole_consumer(graph, consumers, node.outputs[0], ("BatchNormalization",), config)
                bn = bn if _foldable_bn(graph, bn) else None
            if bn is not None:
                absorbed.add(id(bn))
            act = None if in_tail else quantize_output(bn if bn is not None else node)
            plan.layers.append(Layer(node, bn, act, source, float_output=in_tail))
        elif in_tail:
            plan.float_nodes.append((node.name, node.op_type, TAIL_REASON))
        elif node.op_type in ACTIVATION_QUANT and any(i in ints for i in node.inputs if i):
            plan.float_nodes.append((node.name, node.op_type, "it computes on integers (shape arithmetic)"))
        elif (x := _rescaled_input(graph, node, plan, consumers, config)) is not None:
            plan.rescaled[node.outputs[0]] = x
        elif node.op_type in ACTIVATION_QUANT:
            data = [i for i in node.inputs if i]
            if node.op_type == "AveragePool" or node.op_type == "GlobalAveragePool" or node.op_type == "Sigmoid":
                data = data[:1]
            constants = [i for i in data if i in graph.initializers]
            if constants and (node.op_type not in CONSTANT_OPERAND_QUANT or len(constants) == len(data)):
                plan.float_nodes.append((node.name, node.op_type, "it has a constant operand"))
                continue
            for i in data:
                ensure_quantized(i)
            act = quantize_output(node)
            plan.activation_ops.append(node)
            if node.op_type == "Add" and len(constants) == 1 and graph.initializers[constants[0]].size == 1:
                plan.addends[(act or node).outputs[0]] = float(graph.initializers[constants[0]].reshape(()))
        elif passes_through(node):
            src = plan.source.get(node.input(0))
            if src is None:
                plan.float_nodes.append((node.name, node.op_type, "its input is float"))
                continue
            for o in node.outputs[:1]:
                plan.source[o] = src
        else:
            plan.float_nodes.append((node.name, node.op_type, float_reason(node.op_type, config.recurrent)))
    return plan


# ---- materialise ----------------------------------------------------------------------------------------------
@dataclass
class QuantTensor:
    """The state arrays of one activation FakeQuant."""

    tensor: str
    scale: str
    zero_point: str
    span: str
    addend: float = 0.0  # the scalar an Add adds before this quantizer (`qparams.off_tie`)


def insert(graph: Graph, plan: Plan, config: QuantConfig) -> dict[str, QuantTensor]:
    """Rewrite the graph: FakeQuant on every marked tensor, WeightQuant/FoldedBias on every layer."""
    trainable, state = read_roles(graph)
    graph.other_opsets[DOMAIN] = 1
    producers = graph.producers()
    quant: dict[str, QuantTensor] = {}
    for t in plan.quantized:
        q = QuantTensor(t, graph.unique_name(f"{t}.qscale"), graph.unique_name(f"{t}.qzero"),
                        graph.unique_name(f"{t}.qspan"), plan.addends.get(t, 0.0))
        graph.initializers[q.scale] = np.ones((), np.float32)
        graph.initializers[q.zero_point] = np.zeros((), np.float32)
        graph.initializers[q.span] = np.array([np.inf, -np.inf], np.float32)
        # a constant operand's range is its values: only activations learn their step size
        lsq = config.scale_learning == "lsq" and t not in graph.initializers
        attrs = {"bits": config.activation_bits, "symmetric": int(config.symmetric_activations),
                 "observer": config.scale_update.replace("-", "_"), "momentum": float(config.observer_momentum),
                 "learn_scale": int(lsq), "addend": q.addend}
        producer = producers.get(t)
        if t in graph.initializers:  # a constant operand: the quantized ops read the quantized copy
            # its range is known now (the observer would only ever see these values), so a session rebuilt
            # from a checkpoint, which keeps activation scales only, quantizes it as the original did
            value = graph.initializers[t]
            lo, hi = float(np.min(value)), float(np.max(value))
            graph.initializers[q.span] = np.array([lo, hi], np.float32)
            scale, zero = activation_qparams(lo, hi, activation_grid(config.activation_bits,
                                                                     config.symmetric_activations), q.addend)
            graph.initializers[q.scale] = np.asarray(scale, np.float32).reshape(())
            graph.initializers[q.zero_point] = np.asarray(zero, np.float32).reshape(())
            new = graph.unique_name(f"{t}.q")
            for node in plan.activation_ops:
                node.inputs = [new if i == t else i for i in node.inputs]
            fq = Node("FakeQuant", [t, q.scale, q.zero_point, q.span], [new], f"{t}.fakequant", attrs, DOMAIN)
        elif producer is None:  # a graph input: consumers read the quantized copy
            new = graph.unique_name(f"{t}.q")
            graph.replace_uses(t, new)
            fq = Node("FakeQuant", [t, q.scale, q.zero_point, q.span], [new], f"{t}.fakequant", attrs, DOMAIN)
        else:  # the producer writes a new name; the FakeQuant writes the original one, consumers unchanged
            new = graph.unique_name(f"{t}.float")
            producer.outputs = [new if o == t else o for o in producer.outputs]
            fq = Node("FakeQuant", [new, q.scale, q.zero_point, q.span], [t], f"{t}.fakequant", attrs, DOMAIN)
        graph.nodes.append(fq)
        quant[t] = q
        if lsq:
            trainable.append(q.scale)
            state += [q.zero_point, q.span]
        else:
            state += [q.scale, q.zero_point, q.span]
    for layer in plan.layers:
        stored = _rewrite_layer(graph, layer, quant[layer.input_source].scale, config)
        if stored:  # trained by gradient with LSQ; else fixed (GPTQ's rounding is on its grid)
            (trainable if config.scale_learning == "lsq" else state).append(stored)
    for node in plan.dynamic_recurrent:
        _rewrite_dynamic_lstm(graph, node, config)
    graph.toposort()
    write_roles(graph, trainable, state)
    return quant


def weight_axes(node: Node) -> tuple[int, int]:
    """(output-channel axis of the weight, channel axis of the output) of a Conv/Gemm/MatMul."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm":
        return (0 if node.attrs.get("transB", 0) else 1), 1
    return 1, -1


def weight_quant_name(layer_name: str) -> str:
    """The name of the WeightQuant node that quantizes a layer's weight."""
    return f"{layer_name}.weightquant"


def _rewrite_layer(graph: Graph, layer: Layer, input_scale: str, config: QuantConfig) -> str | None:
    """Returns the name of the stored weight scale, if any: with LSQ a learned parameter, with GPTQ rounding
    (`weight_rounding` gptq) a fixed state array (a scale recomputed from the rounded weights would not be the
    one GPTQ rounded on). Both start where the observer would and are read through `ops.folded_step`."""
    node, bn = layer.node, layer.bn
    w = node.input(1)
    w_axis, out_axis = weight_axes(node)
    eps = float(bn.attrs.get("epsilon", 1e-5)) if bn is not None else 1e-5
    w_q, w_scale = graph.unique_name(f"{w}.wq"), graph.unique_name(f"{w}.wscale")
    wq_inputs = [w, bn.input(1), bn.input(4)] if bn is not None else [w, "", ""]
    bits = config.weight_bits_of(node.name)
    learned = None
    if config.stores_weight_scales:  # initialised as the observer would
        learned = graph.unique_name(f"{w}.lsq_scale" if config.scale_learning == "lsq" else f"{w}.step")
        graph.initializers[learned] = _initial_weight_scale(graph, w, bn, w_axis, eps, bits, config.per_channel)
        wq_inputs.append(learned)
    while wq_inputs and not wq_inputs[-1]:
        wq_inputs.pop()
    graph.nodes.append(Node("WeightQuant", wq_inputs, [w_q, w_scale], weight_quant_name(node.name),
                            {"bits": bits, "axis": w_axis, "per_channel": int(config.per_channel), "epsilon": eps},
                            DOMAIN))
    bias = node.input(2) if node.op_type in ("Conv", "Gemm") else ""
    node.inputs = [node.input(0), w_q]
    if not bias and bn is None:
        return learned
    if bn is not None:
        out = bn.outputs[0]
        bn_inputs = bn.inputs[1:5]
        momentum = float(bn.attrs.get("momentum", 0.9))
        graph.nodes.remove(bn)
    else:
        out = node.outputs[0]
        bn_inputs, momentum = ["", "", "", ""], 0.9
    acc = graph.unique_name(f"{node.outputs[0]}.acc")
    node.outputs = [acc]
    graph.nodes.append(Node("FoldedBias", [acc, bias, *bn_inputs, input_scale, w_scale], [out],
                            f"{node.name}.foldedbias", {"axis": out_axis, "epsilon": eps, "momentum": momentum},
                            DOMAIN))
    return learned


def _rewrite_dynamic_lstm(graph: Graph, node: Node, config: QuantConfig) -> None:
    """LSTM -> qatool.DynamicQuantizeLSTM reading W and R through WeightQuant (a scale per direction and gate row,
    or per direction; the observer's max|w| / qmax, recomputed every step) and their scales as inputs 8 and 9."""
    inputs = node.inputs + [""] * (8 - len(node.inputs))
    axis = [0, 1] if config.per_channel else [0]
    bits = config.weight_bits_of(node.name)
    scales = []
    for k, which in ((1, "W"), (2, "R")):
        w = inputs[k]
        w_q, w_scale = graph.unique_name(f"{w}.wq"), graph.unique_name(f"{w}.wscale")
        graph.nodes.append(Node("WeightQuant", [w], [w_q, w_scale], weight_quant_name(f"{node.name}.{which}"),
                                {"bits": bits, "axis": axis, "per_channel": 1}, DOMAIN))
        inputs[k] = w_q
        scales.append(w_scale)
    node.op_type, node.domain, node.inputs = DYNAMIC_KERNEL, DOMAIN, inputs + scales


def _initial_weight_scale(graph: Graph, w: str, bn: Node | None, axis: int, eps: float, bits: int,
                          per_channel: bool) -> np.ndarray:
    """The learned step size that starts where the observer would: max|w k| / qmax of the folded weight, divided
    by the fold magnitude that `folded_step` multiplies it by."""
    from .ops import bn_fold_factor, fold_magnitude, fold_weight
    from .qparams import weight_grid, weight_scales

    weight = graph.initializers[w].astype(np.float32)
    k = None
    if bn is not None:
        k = bn_fold_factor(graph.initializers[bn.input(1)].astype(np.float32),
                           graph.initializers[bn.input(4)].astype(np.float32), eps)
        weight = fold_weight(weight, k, axis)
    observed = weight_scales(weight, axis if per_channel else None, weight_grid(bits))
    return (observed / fold_magnitude(k, per_channel)).astype(np.float32)


def prepare(graph: Graph, config: QuantConfig) -> tuple[Plan, dict[str, QuantTensor]]:
    """Mark and insert, in place; returns the plan and the activation quantizers' state names."""
    plan = mark(graph, config)
    quant = insert(graph, plan, config)
    return plan, quant
