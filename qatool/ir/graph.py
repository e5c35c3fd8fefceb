"""A small, mutable graph IR over ONNX.

Protos appear only in `from_onnx` / `to_onnx`; every pass in between edits plain Python objects: rewire node
inputs/outputs, then call `cleanup()` and `toposort()` (the onnx-graphsurgeon habit).

Conventions
- A value is named by a string; an omitted optional input is the empty string "".
- Initializers are numpy arrays keyed by name.
- Attributes are plain Python values: int, float, str, list of those, or np.ndarray for tensor attributes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError


@dataclass
class ValueInfo:
    """Type and shape of a named value. `shape` entries are ints, symbolic names (str) or None (unknown)."""

    name: str
    elem_type: int = onnx.TensorProto.FLOAT
    shape: list[int | str | None] | None = None

    @property
    def dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.elem_type)

    def static_shape(self) -> tuple[int, ...] | None:
        """The shape as ints when every dimension is known, else None."""
        if self.shape is None or any(not isinstance(d, int) for d in self.shape):
            return None
        return tuple(self.shape)


@dataclass
class Node:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    name: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""

    def input(self, i: int) -> str:
        """Name of input i, or "" when it is omitted."""
        return self.inputs[i] if i < len(self.inputs) else ""


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    value_info: dict[str, ValueInfo] = field(default_factory=dict)
    opset: int = 13
    other_opsets: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "graph"
    producer_name: str = ""

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]

    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def nonfinite_initializer(self) -> str | None:
        """The first float initializer holding an inf or NaN, if any."""
        return next((k for k, v in self.initializers.items()
                     if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()), None)

    def output_classes(self) -> int | None:
        """The class count of a classifier's [N, classes] first output, or None when its shape does not say."""
        shape = self.outputs[0].shape
        if shape and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            return shape[1]
        return None

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        return dict(sorted(counts.items()))

    # ---- edits ---------------------------------------------------------------------------------------------
    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer of `old` (and the graph outputs) read `new` instead."""
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        for v in self.outputs:
            if v.name == old:
                raise ModelError(f"internal: cannot rewire graph output {old!r}")

    def toposort(self) -> None:
        """Order nodes so every node comes after the producers of its inputs (stable for already-sorted graphs)."""
        available = set(self.initializers) | set(self.input_names) | {""}
        pending = list(self.nodes)
        ordered: list[Node] = []
        while pending:
            progressed = False
            rest = []
            for n in pending:
                if all(i in available for i in n.inputs):
                    ordered.append(n)
                    available.update(n.outputs)
                    progressed = True
                else:
                    rest.append(n)
            if not progressed:
                missing = sorted({i for n in rest for i in n.inputs if i not in available})
                raise ModelError(
                    f"graph has a cycle or reads undefined values: {', '.join(missing[:5])}"
                    f" (needed by node {rest[0].name!r})"
                )
            pending = rest
        self.nodes = ordered

    def cleanup(self) -> None:
        """Remove nodes and initializers that no graph output depends on."""
        needed = set(self.output_names)
        producers = self.producers()
        stack = list(needed)
        while stack:
            name = stack.pop()
            node = producers.get(name)
            if node is None:
                continue
            for i in node.inputs:
                if i and i not in needed:
                    needed.add(i)
                    stack.append(i)
        self.nodes = [n for n in self.nodes if any(o in needed for o in n.outputs)]
        self.initializers = {k: v for k, v in self.initializers.items() if k in needed}
        self.value_info = {k: v for k, v in self.value_info.items() if k in needed}

    def unique_name(self, base: str) -> str:
        """A value/node name not used anywhere in the graph."""
        used = self._used_names()
        if base not in used:
            return base
        for k in itertools.count(1):
            cand = f"{base}_{k}"
            if cand not in used:
                return cand
        raise AssertionError  # unreachable

    def _used_names(self) -> set[str]:
        used = set(self.initializers) | set(self.input_names) | set(self.output_names)
        for n in self.nodes:
            used.update(n.outputs)
            used.add(n.name)
        return used


# ---- ONNX boundary ---------------------------------------------------------------------------------------------
def _shape_of(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    if not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _value_info(vi: onnx.ValueInfoProto) -> ValueInfo:
    return ValueInfo(vi.name, vi.type.tensor_type.elem_type, _shape_of(vi.type))


def _attr_value(a: onnx.AttributeProto) -> Any:
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, onnx.TensorProto):  # a copy: to_array may return a read-only view of the proto's buffer
        return np.array(numpy_helper.to_array(v))
    if isinstance(v, list):
        return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v]
    if isinstance(v, onnx.GraphProto):
        raise ModelError(f"attribute {a.name!r} holds a subgraph (If/Loop/Scan); control flow is not supported")
    return v


def from_onnx(model: onnx.ModelProto) -> Graph:
    """Build a Graph from a ModelProto (external data must already be loaded)."""
    try:
        graph = _from_onnx(model)
        for text in _texts(graph):
            if not isinstance(text, str):  # protobuf hands back bytes for invalid UTF-8
                raise UnicodeError("not valid UTF-8")
            text.encode("utf-8")
        return graph
    except UnicodeError as e:
        raise ModelError(f"the model holds text that is not valid UTF-8 ({e})") from e


def _texts(graph: Graph):
    """Every name and string the graph holds."""
    yield from (graph.producer_name, graph.name, *graph.metadata, *graph.metadata.values(), *graph.initializers)
    for v in (*graph.inputs, *graph.outputs, *graph.value_info.values()):
        yield v.name
    for n in graph.nodes:
        yield from (n.op_type, n.name, n.domain, *n.inputs, *n.outputs, *n.attrs)
        for value in n.attrs.values():
            if isinstance(value, (str, bytes)):
                yield value
            elif isinstance(value, list):
                yield from (x for x in value if isinstance(x, (str, bytes)))


def _from_onnx(model: onnx.ModelProto) -> Graph:
    g = model.graph
    opset = 1
    other: dict[str, int] = {}
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
        else:
            other[imp.domain] = imp.version
    # copies: to_array may return read-only views of the proto buffer, and the engine updates arrays in place
    inits = {t.name: np.array(numpy_helper.to_array(t)) for t in g.initializer}
    nodes = [
        Node(
            op_type=n.op_type,
            inputs=list(n.input),
            outputs=list(n.output),
            name=n.name,
            attrs={a.name: _attr_value(a) for a in n.attribute},
            domain=n.domain if n.domain != "ai.onnx" else "",
        )
        for n in g.node
    ]
    return Graph(
        nodes=nodes,
        # Models of IR version < 4 also list their initializers as inputs; only data inputs are kept here.
        inputs=[_value_info(v) for v in g.input if v.name not in inits],
        outputs=[_value_info(v) for v in g.output],
        initializers=inits,
        value_info={v.name: _value_info(v) for v in g.value_info},
        opset=opset,
        other_opsets=other,
        metadata={p.key: p.value for p in model.metadata_props},
        name=g.name or "graph",
        producer_name=model.producer_name,
    )


def _make_attr(key: str, value: Any) -> onnx.AttributeProto:
    if isinstance(value, np.ndarray):
        return helper.make_attribute(key, numpy_helper.from_array(value))
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return helper.make_attribute(key, [], attr_type=onnx.AttributeProto.INTS)
    return helper.make_attribute(key, value)


def _make_value_info(v: ValueInfo) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(v.name, v.elem_type, v.shape)


def to_onnx(graph: Graph) -> onnx.ModelProto:
    nodes = []
    for n in graph.nodes:
        proto = helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name or None, domain=n.domain or None)
        proto.attribute.extend(_make_attr(k, v) for k, v in n.attrs.items())
        nodes.append(proto)
    inits = [numpy_helper.from_array(np.asarray(v), name=k) for k, v in graph.initializers.items()]
    g = helper.make_graph(
        nodes,
        graph.name,
        [_make_value_info(v) for v in graph.inputs],
        [_make_value_info(v) for v in graph.outputs],
        initializer=inits,
        value_info=[_make_value_info(v) for v in graph.value_info.values()],
    )
    opsets = [helper.make_opsetid("", graph.opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in sorted(graph.other_opsets.items())]
    model = helper.make_model(g, opset_imports=opsets, producer_name=graph.producer_name or "qatool")
    # The lowest IR version that carries these opsets: what every onnxruntime new enough for the opset reads.
    model.ir_version = max(7, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    for k, v in graph.metadata.items():
        model.metadata_props.add(key=k, value=v)
    return model
