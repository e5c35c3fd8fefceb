"""`qatool convert`: normalise any float ONNX model into the form the engine and the later steps expect.

Steps, in order:
1. `onnx.checker`, then the opset upgraded to at least 13 with onnx's version converter;
2. shape inference (used to fold shape logic whose dims are static);
3. unique names for unnamed or clashing nodes;
4. constant folding: `Constant` nodes become initializers, and any deterministic node whose inputs are all
   constant is evaluated with the engine's own op and replaced by its result (so weights written as
   `ConstantOfShape` or `Transpose(W)` become plain initializers, and `Shape -> Gather/Slice` chains on static
   dims fold away);
4b. Identity removed (so a layer's consumers are seen through it); a per-channel scale and a bias written as a
   separate Mul and Add after a Conv or MatMul become the layer's weight scale and bias (`ir/bias_add.py`; a
   MatMul with a bias becomes a Gemm), as onnxruntime's integer kernels take them and as quantizing the layer's
   output needs (one scale per tensor before a per-channel Mul amplifies the rounding of some channels);
4c. (commands only) a model exported with a fixed batch of 1 gets a free batch (`ir/batch.py`), checked on
   onnxruntime at batch 2 and 3 against the model run one image at a time; the declared shapes are kept in the
   metadata (BATCH_KEY) so the int8 model declares them again, and a user's pipeline calls it as it called the
   float one. A batch that cannot be freed is recorded with its reason (`ir.batch.FIXED_BATCH_KEY`): the engine
   then runs the model one image at a time and trains it at batch 1;
5. for inference: BatchNormalization folded into the preceding Conv/ConvTranspose/Gemm, Dropout removed;
   for training: BN and Dropout kept; HardSwish, HardSigmoid and Div by a constant rewritten into elementwise
   forms whose pieces run as integer kernels once quantized (`ir/integer_forms.py`); and the roles of the
   initializers (trainable / state) recorded in the model's metadata.
Graph input and output names never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import ModelError, QatoolError
from .ir import bn_fold
from .ir import integer_forms
from .ir.bias_add import fold_bias_adds
from .ir.graph import Graph, Node, from_onnx, to_onnx
from .ir.roles import infer_roles, write_roles

MIN_OPSET = 13
# Ops whose result is random or depends on the mode: never folded.
_NOT_FOLDABLE = {"Dropout", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike",
                 "Multinomial", "BatchNormalization"}
# Nodes that are the identity at inference time.
_INFERENCE_NOOPS = {"Dropout", "Identity"}


@dataclass
class ConvertResult:
    graph: Graph
    opset_from: int
    ops_before: dict[str, int]
    folded_constants: int = 0
    folded_bias_adds: list[str] = field(default_factory=list)
    batch: object = None  # ir.batch.BatchResult when an input declared a batch of 1
    integer_forms: dict[str, int] = field(default_factory=dict)  # op_type -> nodes rewritten
    folded_bn: list[str] = field(default_factory=list)
    kept_bn: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    state: list[str] = field(default_factory=list)

    @property
    def n_parameters(self) -> int:
        return int(sum(v.size for v in self.graph.initializers.values() if np.issubdtype(v.dtype, np.floating)))

    @property
    def n_trainable(self) -> int:
        return int(sum(self.graph.initializers[k].size for k in self.trainable))

    def summary_lines(self) -> list[str]:
        g = self.graph
        ops = ", ".join(f"{k} {v}" for k, v in g.op_counts().items())
        lines = [
            f"opset {self.opset_from} -> {g.opset}; {len(g.nodes)} nodes: {ops}",
            f"parameters: {self.n_parameters:,} floats; trainable: {self.n_trainable:,} in {len(self.trainable)} "
            f"tensors; state: {len(self.state)} tensors",
        ]
        if self.folded_constants:
            lines.append(f"folded {self.folded_constants} constant nodes into initializers")
        if self.batch is not None:
            b = self.batch
            lines.append(f"the input declares a batch of 1: freed ({len(b.rewritten) + len(b.added)} nodes rewritten "
                         "or added; onnxruntime at batch 2 and 3 equals the images run one at a time); the int8 "
                         "model declares the original shapes" if b.freed else
                         f"the input declares a batch of 1 that could not be freed ({b.reason}): onnxruntime "
                         "takes it at batch 1 only")
        if self.folded_bias_adds:
            lines.append(f"folded {len(self.folded_bias_adds)} per-channel scale Muls and bias Adds into the "
                         "Conv/MatMul before them (a MatMul with a bias becomes a Gemm)")
        if self.integer_forms:
            done = ", ".join(f"{k} {v}" for k, v in self.integer_forms.items())
            lines.append(f"rewrote into forms onnxruntime runs as integer kernels when quantized: {done}")
        if self.folded_bn:
            lines.append(f"folded {len(self.folded_bn)} BatchNormalization into the preceding Conv/Gemm")
        for name, why in self.kept_bn:
            lines.append(f"kept BatchNormalization {name!r}: {why}")
        if self.removed:
            lines.append(f"removed {len(self.removed)} Dropout/Identity nodes")
        return lines


def normalize_proto(model: onnx.ModelProto, for_training: bool, free_batch: bool = False) -> ConvertResult:
    """Normalise a ModelProto (see the module docstring); step 4c only with `free_batch` (it runs the model on
    onnxruntime: the commands do it once, on the user's file)."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError, or the C++ side's own errors (e.g. invalid UTF-8 in a name)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"the model fails onnx.checker: {first}") from e
    opset_from = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
    if opset_from < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:  # the converter raises bare RuntimeError/ValueError/C++ errors
            raise ModelError(f"cannot upgrade the model from opset {opset_from} to {MIN_OPSET}: {e}") from e
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is an aid for folding, not a requirement
        pass
    graph = from_onnx(model)
    ops_before = graph.op_counts()
    result = ConvertResult(graph, opset_from, ops_before)
    _name_nodes(graph)
    graph.toposort()
    result.folded_constants = fold_constants(graph)
    graph.cleanup()
    result.removed = remove_inference_noops(graph, ("Identity",))  # a no-op in training too; Dropout is not
    result.folded_bias_adds = fold_bias_adds(graph, lambda t: _rank(graph, t))
    if free_batch:
        result.batch = free_fixed_batch(graph)
    if for_training:
        result.integer_forms = integer_forms.rewrite_all(graph)
        result.trainable, result.state = infer_roles(graph)
        write_roles(graph, result.trainable, result.state)
    else:
        result.folded_bn, result.kept_bn = bn_fold.fold_all(graph)
        result.removed += remove_inference_noops(graph)
        graph.metadata.pop("qatool.trainable", None)
        graph.metadata.pop("qatool.state", None)
        result.trainable, result.state = infer_roles(graph)
    graph.toposort()
    return result


def normalize(graph: Graph, for_training: bool, free_batch: bool = False) -> ConvertResult:
    return normalize_proto(to_onnx(graph), for_training, free_batch)


# ---- passes -------------------------------------------------------------------------------------------------------
BATCH_KEY = "qatool.declared_shapes"  # the input/output shapes a model declared before its batch was freed


def free_fixed_batch(graph: Graph):
    """Free the batch of a graph whose input declares a batch of 1, in place, when `ir.batch.free_batch` can and
    onnxruntime confirms it (batch 2 and 3 equal the images run one at a time); the BatchResult, or None when no
    input declares a batch of 1. When it cannot, the graph records why (`FIXED_BATCH_KEY`): the engine then runs it
    one image at a time, and training takes batch 1."""
    import json

    from .ir.batch import FIXED_BATCH_KEY, free_batch

    graph.metadata.pop(FIXED_BATCH_KEY, None)
    if not any(v.shape and len(v.shape) >= 2 and v.shape[0] == 1 for v in graph.inputs):
        return None
    result = free_batch(graph)
    if result.freed and result.verify(to_onnx(graph)):
        declared = result.declared
        graph.__dict__.update(result.graph.__dict__)
        graph.metadata[BATCH_KEY] = json.dumps(declared)
    else:
        graph.metadata[FIXED_BATCH_KEY] = result.reason or "not proven per image"
    return result



def _name_nodes(graph: Graph) -> None:
    """Give every node a unique, non-empty name."""
    seen: set[str] = set()
    for i, n in enumerate(graph.nodes):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            n.name = name
        seen.add(n.name)


def _static_shape(graph: Graph, value: str) -> tuple[int, ...] | None:
    if value in graph.initializers:
        return graph.initializers[value].shape
    for v in graph.inputs:
        if v.name == value:
            return v.static_shape()
    info = graph.value_info.get(value)
    return info.static_shape() if info else None


def _known_dims(graph: Graph, value: str) -> list[int | None] | None:
    """The dims of a value as ints where known (None where dynamic), or None when even the rank is unknown."""
    info = next((v for v in graph.inputs if v.name == value), None) or graph.value_info.get(value)
    if info is None or info.shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else None for d in info.shape]


def _rank(graph: Graph, value: str) -> int | None:
    """The rank of a value when known: from shape inference, or from the Flatten/Reshape that writes it (shape
    inference ran before constant folding, so a Reshape whose shape was computed is only known now)."""
    dims = _known_dims(graph, value)
    if dims is not None:
        return len(dims)
    producer = graph.producers().get(value)
    if producer is not None and producer.op_type == "Flatten":
        return 2
    if producer is not None and producer.op_type == "Reshape" and producer.input(1) in graph.initializers:
        return int(graph.initializers[producer.input(1)].size)
    return None


def _fold_shape_read(graph: Graph, node: Node, producers: dict[str, Node]) -> np.ndarray | None:
    """Value of Gather/Slice reading only static dims of a Shape whose other dims may be dynamic."""
    shape_node = producers.get(node.input(0))
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.attrs.get("start", 0) != 0 \
            or "end" in shape_node.attrs:
        return None
    dims = _known_dims(graph, shape_node.input(0))
    if dims is None or not all(i in graph.initializers for i in node.inputs[1:] if i):
        return None
    positions = np.arange(len(dims))
    from .ops import Context, make_op

    picked = make_op(node, graph.opset).forward(Context(), positions, *[graph.initializers.get(i) if i else None
                                                                        for i in node.inputs[1:]])
    picked = np.asarray(picked)
    if any(dims[int(p)] is None for p in picked.reshape(-1)):
        return None
    return np.asarray([dims[int(p)] for p in picked.reshape(-1)], dtype=np.int64).reshape(picked.shape)


def fold_constants(graph: Graph) -> int:
    """Evaluate every deterministic node whose inputs are all constant; returns how many were folded."""
    folded = 0
    kept: list[Node] = []
    producers = graph.producers()
    outputs = set(graph.output_names)
    for node in graph.nodes:
        values = None
        if node.op_type not in _NOT_FOLDABLE and not node.domain and not outputs.intersection(node.outputs):
            values = _constant_value(graph, node, producers)
        if values is None:
            kept.append(node)
            continue
        for name, v in zip(node.outputs, values):
            if name:
                graph.initializers[name] = np.asarray(v)
        folded += 1
    graph.nodes = kept
    return folded


def _constant_value(graph: Graph, node: Node, producers: dict[str, Node]) -> list[np.ndarray] | None:
    """The outputs of a node when they are known before running the graph, else None."""
    from .ops import Context, make_op

    if node.op_type == "Shape":
        shape = _static_shape(graph, node.input(0))
        if shape is not None:
            start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
            return [np.asarray(shape, dtype=np.int64)[start:end]]
    if node.op_type in ("Gather", "Slice"):
        v = _fold_shape_read(graph, node, producers)
        if v is not None:
            return [v]
    if not all(i in graph.initializers for i in node.inputs if i):
        return None
    try:
        out = make_op(node, graph.opset).forward(Context(), *[graph.initializers[i] if i else None
                                                               for i in node.inputs])
    except QatoolError:
        raise
    except Exception as e:
        raise ModelError(f"cannot evaluate constant node {node.name!r} ({node.op_type}): {e}") from e
    return list(out) if isinstance(out, tuple) else [out]


def remove_inference_noops(graph: Graph, op_types=tuple(_INFERENCE_NOOPS)) -> list[str]:
    """Remove Dropout and Identity (or only `op_types` of them): their consumers read the node's input instead."""
    removed = []
    outputs = set(graph.output_names)
    consumers = graph.consumers()
    for node in [n for n in graph.nodes if n.op_type in op_types]:
        src, dst = node.input(0), node.outputs[0]
        if any(o in consumers or o in outputs for o in node.outputs[1:] if o):
            continue  # Dropout's mask is read by something
        if dst in outputs:
            producer = graph.producers().get(src)
            # The graph output keeps its name: rename the producer's output instead, if that is possible.
            if producer is None or src in outputs:
                continue
            producer.outputs = [dst if o == src else o for o in producer.outputs]
            graph.replace_uses(src, dst)
        else:
            graph.replace_uses(dst, src)
        graph.nodes.remove(node)
        removed.append(node.name)
    graph.cleanup()
    return removed
