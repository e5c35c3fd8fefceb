"""Free the batch dimension of models exported with a fixed batch of 1.

Exporters often write the batch of 1 into the graph: the input declares [1, C, H, W], and constants carry the
1 on: Reshape shapes such as [1, -1, 85] or [1, 3, 85, 20, 20], Slice ends of 1 on axis 0, a Concat of a
batch-1 constant (a class token), LSTM initial states of batch 1, Resize sizes, a Squeeze without axes.
onnxruntime then refuses any other batch. `free_batch` rewrites such a graph so that it runs at any batch N and
computes, for each image, what the batch-1 model computes for it.

How: a forward pass over the graph tracks, for every value, where the batch sits: on which axis (and, after a
Reshape or Flatten that merges it with neighbouring dims, as the middle factor of `outer * N * inner`), or that
the value does not depend on the batch at all, or (for small int64 shape tensors) which element is N. Every op
the pass knows has a rule that either proves the op keeps images apart (rewriting a batch-baking constant when
needed) or refuses. Whatever the pass does not know or cannot prove it refuses, with a one-line reason, and the
graph is left alone. `check_free_batch` then checks the result on onnxruntime: at batch N every output must
equal the per-image outputs stacked on the output's batch axis.

Shapes at batch 1 come from ONNX shape inference, run with the batch inputs at 1 and without the declared output
shapes (an exporter's declaration can be wrong: ddddocr's recogniser declares [1, seqlen] and returns
[T, 1, 8210]; the freed graph declares what it computes, `declared` keeps what the file said). A model whose
inputs are all static fills the values inference leaves unknown from one onnxruntime run at batch 1.

Other free dims (a text line's width) stay symbols: every dim inference leaves free is a symbol (its dim_param, or
one of its own), and shape values are tracked as products of symbols and N (`_M`). So a PyTorch export's
x.view(x.size(0), 1, x.size(2) * x.size(3)) on a [W', 1, C, H] tensor is the target [W', 1, C*H] with W' the same
symbol as the input's dim 0, and the pass proves the batch lands in dim 1 for every width; a later
[x.size(0) * x.size(1), C] is [W' * N, C]: the batch merged behind the time steps, as a Gemm may take it. The other
way, concrete shapes from one onnxruntime run at some width, was not taken: a proof at width 160 is a proof for
width 160 only (the products that place the batch can agree there by chance), a run-time dim would look like a
constant, and a rewritten target would bake that width in; it also needs a width the model accepts (a multiple of
its stride, the data's own) before any data is known. Symbols need no run, no guess, and hold for every width;
what they cannot prove (a sum of free dims, a merge the outputs cannot hold) is refused, and `check_free_batch`
still confirms the result on onnxruntime at batch 2 and 3.

A graph whose batch cannot be freed keeps its batch of 1: onnxruntime and the engine then run it one image at a
time (`ort_run_per_image`, `FIXED_BATCH_KEY`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper

from .graph import Graph, Node, ValueInfo, from_onnx, to_onnx

__all__ = ["BatchResult", "free_batch", "check_free_batch", "batch_mismatch", "restore_declared_shapes",
           "ort_run_per_image", "FIXED_BATCH_KEY", "PER_INPUT_KEY", "one_image_inputs"]

# Metadata of a model whose input declares a batch of 1 that could not be freed: the one-line reason. The engine
# then runs it one image at a time (`engine.model.Model`), as onnxruntime does (`ort_run_per_image`).
FIXED_BATCH_KEY = "qatool.fixed_batch"
# Metadata of a model whose numerics hold per input although its batch is free (an int8 model with onnxruntime's
# DynamicQuantizeLSTM, which quantizes over the whole batch it is given): why. `ort_run_per_image` runs it one
# image at a time, as the engine simulates it.
PER_INPUT_KEY = "qatool.per_input"

_INT64_MAX = int(np.iinfo(np.int64).max)


# ---- result ----------------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """What `free_batch` did.

    freed: the graph runs at any batch (rewritten, or already free); `graph` is then the freed graph.
    declared: {"inputs": {name: shape}, "outputs": {name: shape}}, the shapes the model declared (for
        `restore_declared_shapes` on the final int8 model).
    rewritten: names of existing nodes whose inputs were changed; added: names of nodes inserted.
    batch_axes: {output name: axis holding the batch} (0, or 1 for [T, N, C] sequence outputs).
    reason: one line, when not freed (or when the verification failed).
    note: remarks when freed (e.g. the inputs already declared a free batch).
    """

    freed: bool
    declared: dict[str, dict[str, list | None]]
    rewritten: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    batch_axes: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    note: str = ""
    graph: Graph | None = None

    def verify(self, original: onnx.ModelProto | Graph, sizes: Sequence[int] = (2, 3), seed: int = 0) -> bool:
        """Check the freed graph against `original` on onnxruntime (see `batch_mismatch`). On failure the result
        becomes not freed, `reason` says why and `graph` is dropped: the caller keeps its original graph."""
        if not self.freed or self.graph is None:
            return False
        why = batch_mismatch(original, self.graph, sizes, seed)
        if why is None:
            return True
        self.freed, self.reason, self.graph = False, f"verification failed: {why}", None
        return False


class _Refuse(Exception):
    """The analysis cannot prove a node keeps images apart; the message is the one-line reason."""


@dataclass(frozen=True)
class _M:
    """A dim (or a shape value) not known statically: `coef` times a product of symbols. Each dim shape inference
    leaves free is a symbol: its dim_param, else one of its own per value and axis; "N" is the batch size. Products
    and exact quotients of such dims stay exact, so the pass proves a Reshape keeps images apart for every value of
    the free dims. Ints and the bare batch are never wrapped: `_mono` gives an int, "N" or an _M."""

    coef: int
    syms: tuple

    def __str__(self) -> str:
        return "*".join(([str(self.coef)] if self.coef != 1 else []) + [s.lstrip("$") for s in self.syms])

    __repr__ = __str__


def _mono(coef: int, syms: tuple):
    if coef == 0 or not syms:
        return coef
    if syms == ("N",) and coef == 1:
        return "N"
    return _M(coef, tuple(sorted(syms)))


def _as_mono(e) -> tuple[int, tuple] | None:
    if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
        return int(e), ()
    if e == "N":
        return 1, ("N",)
    if isinstance(e, _M):
        return e.coef, e.syms
    return None  # "D", "X": not a product of known factors


def _mul(a, b):
    """a * b for ints, "N" and _M (None when either is "D"/"X")."""
    ma, mb = _as_mono(a), _as_mono(b)
    if ma is None or mb is None:
        return None
    return _mono(ma[0] * mb[0], ma[1] + mb[1])


def _div(a, b):
    """a / b when it is exact (b's factors are among a's), else None."""
    ma, mb = _as_mono(a), _as_mono(b)
    if ma is None or mb is None or mb[0] == 0 or ma[0] % mb[0]:
        return None
    rest = list(ma[1])
    for s in mb[1]:
        if s not in rest:
            return None
        rest.remove(s)
    return _mono(ma[0] // mb[0], tuple(rest))


def _has_n(e) -> bool:
    return e == "N" or (isinstance(e, _M) and "N" in e.syms)


def _tangled(e) -> bool:
    """Depends on the batch other than as the bare batch size ("X", or N times something)."""
    return e == "X" or (_has_n(e) and e != "N")


def _drop_n(e):
    """e / N when N is a factor of e exactly once, else None."""
    m = _as_mono(e)
    if m is None or m[1].count("N") != 1:
        return None
    return _div(e, "N")


@dataclass(frozen=True)
class _B:
    """A value carrying the batch: dim `axis` holds outer * N * inner elements (row-major, N in the middle; outer and
    inner are ints or _M)."""

    axis: int
    outer: Any = 1
    inner: Any = 1

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1

    def at(self, axis: int) -> "_B":
        return _B(axis, self.outer, self.inner)


@dataclass(frozen=True)
class _S:
    """A small int tensor (rank 0 or 1) holding shape arithmetic: each element an int, "N" (the batch), an _M (a
    product of free dims, possibly with N: then the element is that multiple of the batch size), "D" (not known
    statically but independent of the batch) or "X" (depends on the batch in a way not tracked)."""

    elems: tuple
    scalar: bool = False

    @property
    def dependent(self) -> bool:
        return any(e == "X" or _has_n(e) for e in self.elems)


def _dependent(s) -> bool:
    return isinstance(s, _B) or (isinstance(s, _S) and s.dependent)


# ---- op tables ---------------------------------------------------------------------------------------------------
_UNARY = {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
          "Softsign", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf",
          "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN",
          "IsInf", "Identity", "Cast", "CastLike", "Mish", "Gelu", "ThresholdedRelu", "Shrink", "Dropout",
          "BitwiseNot", "Swish"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less",
              "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "PRelu", "BitShift", "BitwiseAnd",
              "BitwiseOr", "BitwiseXor", "Clip"}
# Ops that treat dim 0 as independent samples (any merge of the batch into dim 0 is fine).
_PER_SAMPLE = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
               "GlobalLpPool", "LRN", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
               "DepthToSpace", "SpaceToDepth"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _prod(xs):
    """The product of dims (ints and _M); None when one is "D"/"X"."""
    out = 1
    for x in xs:
        out = _mul(out, x)
        if out is None:
            return None
    return out


# ---- shapes at batch 1 -------------------------------------------------------------------------------------------
def _infer_shapes(graph: Graph, batched: Sequence[str] = ()) -> dict[str, list]:
    """name -> dims (ints, str or None) at batch 1 for every value shape inference knows. The inputs named in
    `batched` go in with dim 0 set to 1; the graph outputs go in without their declared shapes (an exporter's
    declaration can be wrong: ddddocr's recogniser declares [1, seqlen] and returns [T, 1, 8210])."""
    inputs = [ValueInfo(v.name, v.elem_type, [1, *v.shape[1:]]) if v.name in batched and v.shape else v
              for v in graph.inputs]
    outputs = [ValueInfo(v.name, v.elem_type, None) for v in graph.outputs]
    # Large initializers go in as typed inputs (shape inference needs their shapes, not their values).
    light = Graph(graph.nodes, inputs, outputs,
                  {k: v for k, v in graph.initializers.items() if v.size <= 64 or v.dtype.kind in "iub"},
                  dict(graph.value_info), graph.opset, graph.other_opsets, name=graph.name)
    light.inputs += [ValueInfo(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                     for k, v in graph.initializers.items() if k not in light.initializers]
    model = to_onnx(light)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an aid, not a requirement
        pass
    from .graph import _shape_of

    shapes: dict[str, list] = {}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        dims = _shape_of(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    for k, v in graph.initializers.items():
        shapes[k] = list(v.shape)
    return shapes


def _symbolic(name: str, dims: list | None) -> list | None:
    """dims with every dim shape inference left free as an _M symbol: its dim_param (one name, one value, as shape
    inference promises), else a symbol of this value and axis alone."""
    if dims is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else
            _M(1, (f"${d}" if isinstance(d, str) and d else f"${name}[{k}]",)) for k, d in enumerate(dims)]


def _shapes_from_ort(graph: Graph, names: list[str]) -> dict[str, list]:
    """Static shapes of `names` from one onnxruntime run at batch 1 with random inputs ({} when impossible)."""
    feeds = {}
    for v in graph.inputs:
        if v.shape is None or any(not isinstance(d, int) for d in v.shape[1:]):
            return {}
        shape = [1, *v.shape[1:]] if _is_batch_input(v) else list(v.shape)
        feeds[v.name] = _random(v.elem_type, shape, np.random.default_rng(0))
    model = to_onnx(graph)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.ValueInfoProto(name=n) for n in names if n not in have)
    try:
        sess = _session(model)
        outs = sess.run(None, feeds)
    except Exception:
        return {}
    return {o.name: list(np.shape(a)) for o, a in zip(sess.get_outputs(), outs)}


# ---- the analysis ------------------------------------------------------------------------------------------------
class _Analysis:
    def __init__(self, graph: Graph, batched_inputs: list[str], shapes: dict[str, list],
                 forced: dict[str, int]):
        self.g = graph
        self.shapes = dict(shapes)  # the Reshapes the pass follows add what they learn
        self.forced = forced  # node name -> which of its candidate batch placements to take
        self.choices: list[tuple[str, int]] = []  # (node name, number of candidates) where there was a choice
        self.state: dict[str, Any] = {name: _B(0) for name in batched_inputs}
        self.consumers = graph.consumers()
        self.outputs = set(graph.output_names)
        self.rewritten: list[str] = []
        self.added: list[str] = []
        self._batch_dims: dict[tuple[str, int], str] = {}

    # -- helpers --
    @staticmethod
    def _static_dims(dims) -> bool:
        return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)

    def st(self, name: str):
        return self.state.get(name) if name else None

    def dims(self, name: str) -> list | None:
        if name in self.g.initializers:
            return list(self.g.initializers[name].shape)
        return self.shapes.get(name)

    def rank(self, node: Node, name: str) -> int:
        d = self.dims(name)
        if d is None:
            raise _Refuse(f"node {node.name!r} ({node.op_type}): rank of {name!r} unknown")
        return len(d)

    def static(self, node: Node, name: str) -> list:
        """The dims of `name` at batch 1: ints, and _M for dims left free (a free width)."""
        d = self.dims(name)
        if d is None or any(x is None for x in d):
            raise _Refuse(f"node {node.name!r} ({node.op_type}): shape of {name!r} at batch 1 unknown")
        return list(d)

    def learn(self, name: str, dims: list) -> None:
        """Record the dims a followed node computes where shape inference did not know them."""
        have = self.shapes.get(name)
        if have is None or len(have) != len(dims):
            self.shapes[name] = list(dims)
        else:
            self.shapes[name] = [a if isinstance(a, int) else b for a, b in zip(have, dims)]

    def const(self, name: str) -> np.ndarray | None:
        return self.g.initializers.get(name) if name else None

    def elems(self, name: str) -> _S | None:
        """A shape-like int tensor as elements, or None when its values are not known."""
        s = self.st(name)
        if isinstance(s, _S):
            return s
        c = self.const(name)
        if c is not None and c.dtype.kind in "iu" and c.ndim <= 1:
            return _S(tuple(int(x) for x in c.reshape(-1)), scalar=c.ndim == 0)
        return None

    def int_list(self, node: Node, name: str, what: str) -> list[int]:
        c = self.const(name)
        if c is None:
            e = self.elems(name)
            if e is not None and all(isinstance(x, int) for x in e.elems):
                return list(e.elems)
            raise _Refuse(f"node {node.name!r} ({node.op_type}): {what} is computed at run time")
        return [int(x) for x in np.asarray(c).reshape(-1)]

    def axes_of(self, node: Node, index: int, attr: str = "axes") -> list[int] | None:
        if node.input(index):
            return self.int_list(node, node.input(index), "axes")
        v = node.attrs.get(attr)
        return None if v is None else [int(a) for a in v]

    def refuse(self, node: Node, why: str):
        raise _Refuse(f"node {node.name!r} ({node.op_type}): {why}")

    def followed_shape(self, node: Node, why: str, can: bool = True) -> _S:
        """The shape value `node` computes from shape values (`shape_op`); refused with `why` when the pass cannot
        follow it (or `can` is False)."""
        r = self.shape_op(node) if can else None
        if r is None:
            self.refuse(node, why)
        return r

    def only_first_batched(self, node: Node, ins) -> _B:
        s = ins[0] if ins else None
        if not isinstance(s, _B):
            self.refuse(node, "the batch reaches an input this op cannot take it on")
        if any(_dependent(x) for x in ins[1:]):
            self.refuse(node, "the batch reaches a parameter input")
        return s

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.consumers or name in self.outputs)

    def mark(self, node: Node) -> None:
        if node.name not in self.rewritten:
            self.rewritten.append(node.name)

    def set_const(self, node: Node, index: int, value: np.ndarray) -> None:
        """Give input `index` of `node` a new constant value; an initializer read elsewhere is copied."""
        name = node.input(index)
        shared = name not in self.g.initializers or len(self.consumers.get(name, [])) > 1 or name in self.outputs
        if name and not shared:
            self.g.initializers[name] = value
        else:
            new = self.g.unique_name(f"{name or node.name}_freebatch")
            self.g.initializers[new] = value
            while len(node.inputs) <= index:
                node.inputs.append("")
            node.inputs[index] = new
        self.mark(node)

    def set_elems(self, node: Node, index: int, n: int, new: dict[int, int]) -> None:
        """Give positions `new` of input `index` of `node` (a 1-D int shape of `n` elements) new values. A constant
        is rewritten (`set_const`); a Concat read only here gets the constant parts holding those positions
        rewritten; any other computed shape is cut around them with Slice and joined to the new values (Concat)."""
        name = node.input(index)
        c = self.const(name)
        if c is not None:
            v = np.array(c, dtype=np.int64).reshape(-1)
            for k, e in new.items():
                v[k] = e
            self.set_const(node, index, v)
            return
        producer = self.g.producers().get(name)
        if producer is not None and producer.op_type == "Concat" and not producer.domain \
                and len(self.consumers.get(name, [])) == 1 and name not in self.outputs:
            plan: dict[int, dict[int, int]] | None = {}
            pos = 0
            for i, part in enumerate(producer.inputs):
                e = self.elems(part)
                if e is None:
                    plan = None
                    break
                for k, value in new.items():
                    if pos <= k < pos + len(e.elems):
                        plan.setdefault(i, {})[k - pos] = value
                pos += len(e.elems)
            if plan is not None and pos == n and all(self.const(producer.input(i)) is not None for i in plan):
                for i, sub in plan.items():
                    v = np.array(self.const(producer.input(i)), dtype=np.int64)
                    flat = v.reshape(-1)
                    for k, value in sub.items():
                        flat[k] = value
                    self.set_const(producer, i, flat.reshape(v.shape))
                return
        parts, start = [], 0
        for k in sorted(new) + [n]:
            if k > start:
                parts.append(self.add_node("Slice", [name, self.add_init(f"{name}_from", [start]),
                                                     self.add_init(f"{name}_to", [k])], f"{name}_kept"))
            if k < n:
                parts.append(self.add_init(f"{name}_freebatch", [new[k]]))
            start = k + 1
        node.inputs[index] = self.add_node("Concat", parts, f"{name}_freebatch", axis=0)
        self.mark(node)

    def add_node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.g.unique_name(base)
        name = self.g.unique_name(base + "_node")
        self.g.nodes.append(Node(op, inputs, [out], name=name, attrs=attrs))
        self.added.append(name)
        return out

    def add_init(self, base: str, value) -> str:
        name = self.g.unique_name(base)
        self.g.initializers[name] = np.asarray(value, dtype=np.int64)
        return name

    def batch_dim(self, ref: str, axis: int) -> str:
        """A 1-D int64 value [N]: the batch size read off dim `axis` of `ref` at run time."""
        key = (ref, axis)
        if key not in self._batch_dims:
            shp = self.add_node("Shape", [ref], f"{ref}_shape")
            starts = self.add_init(f"{ref}_batch_start", [axis])
            ends = self.add_init(f"{ref}_batch_end", [axis + 1])
            self._batch_dims[key] = self.add_node("Slice", [shp, starts, ends], f"{ref}_batch")
        return self._batch_dims[key]

    def dynamic_shape(self, dims: list[int], pos: int, ref: str, ref_axis: int) -> str:
        """dims with dims[pos] replaced by the run-time batch size of ref's axis ref_axis (a 1-D int64 value)."""
        if not all(isinstance(d, int) for k, d in enumerate(dims) if k != pos):
            raise _Refuse(f"a shape with dims not known statically ({dims}) would need the batch written in")
        parts = []
        if pos > 0:
            parts.append(self.add_init(f"{ref}_dims_before", dims[:pos]))
        parts.append(self.batch_dim(ref, ref_axis))
        if pos + 1 < len(dims):
            parts.append(self.add_init(f"{ref}_dims_after", dims[pos + 1:]))
        if len(parts) == 1:
            return parts[0]
        return self.add_node("Concat", parts, f"{ref}_batched_shape", axis=0)

    def expand_to_batch(self, node: Node, index: int, axis: int, ref: str, ref_axis: int) -> None:
        """Input `index` of `node` (batch-independent, size 1 on `axis`) expanded to the batch of ref."""
        name = node.input(index)
        dims = self.static(node, name)
        if axis >= len(dims) or dims[axis] != 1:
            self.refuse(node, f"input {name!r} has size {dims[axis] if axis < len(dims) else '?'} on the batch "
                              "axis but does not depend on the input")
        shape = self.dynamic_shape(dims, axis, ref, ref_axis)
        node.inputs[index] = self.add_node("Expand", [name, shape], f"{name}_batched")
        self.mark(node)

    # -- the pass --
    def run(self) -> None:
        if self.g.opset < 13:
            raise _Refuse(f"opset {self.g.opset} < 13 (run convert first)")
        for node in list(self.g.nodes):
            try:
                self.step(node)
            except _Refuse:
                raise
            except Exception as e:  # a malformed node (missing attribute, odd constant): not provable, so refused
                raise _Refuse(f"node {node.name!r} ({node.op_type}): cannot analyse ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e

    def step(self, node: Node) -> None:
        ins = [self.st(i) for i in node.inputs]
        if node.domain:
            if any(_dependent(s) for s in ins):
                self.refuse(node, f"custom-domain op {node.domain!r}")
            outs = [None] * len(node.outputs)
        elif not any(_dependent(s) for s in ins):
            outs = self.shape_logic(node) or [None] * len(node.outputs)
        else:
            outs = self.visit(node, ins)
        if not isinstance(outs, list):
            outs = [outs] * len(node.outputs)
        for o, s in zip(node.outputs, outs):
            if o:
                self.state[o] = s

    def shape_logic(self, node: Node) -> list | None:
        """Shape arithmetic on batch-independent values (kept as _S so a later N can join it)."""
        try:
            if node.op_type == "Shape":
                return [self.op_Shape(node, [self.st(node.input(0))])]
            if node.op_type in ("Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity",
                                "Add", "Sub", "Mul", "Div"):
                if all(self.elems(i) is not None for i in node.inputs[:1]):
                    return [self.shape_op(node)]
        except _Refuse:
            return None
        return None

    def shape_op(self, node: Node) -> _S | None:
        """Elements of a shape-arithmetic node whose first input is a known small int tensor, else None."""
        op = node.op_type
        a = self.elems(node.input(0))
        if a is None:
            return None
        if op in ("Identity",):
            return a
        if op == "Cast":
            return a if node.attrs.get("to") in _INT_TYPES else None
        if op == "Gather":
            idx = self.const(node.input(1))
            if idx is None or a.scalar or node.attrs.get("axis", 0) != 0 or idx.ndim > 1:
                return None
            picked = tuple(a.elems[int(i)] for i in idx.reshape(-1))
            return _S(picked, scalar=idx.ndim == 0)
        if op == "Slice":
            starts, ends = self.const(node.input(1)), self.const(node.input(2))
            axes, steps = self.const(node.input(3)), self.const(node.input(4))
            if starts is None or ends is None or (node.input(3) and axes is None) or (
                    node.input(4) and steps is None) or a.scalar:
                return None
            if axes is not None and [int(x) for x in axes.reshape(-1)] not in ([0], [-1]):
                return None
            step = int(steps.reshape(-1)[0]) if steps is not None else 1
            sl = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step)
            return _S(tuple(a.elems[sl]))
        if op == "Concat":
            parts = [self.elems(i) for i in node.inputs]
            if any(p is None or p.scalar for p in parts):
                return None
            return _S(tuple(e for p in parts for e in p.elems))
        if op == "Unsqueeze":
            return _S(a.elems) if a.scalar else None
        if op == "Squeeze":
            return _S(a.elems, scalar=True) if not a.scalar and len(a.elems) == 1 else None
        if op in ("Add", "Sub", "Mul", "Div"):
            b = self.elems(node.input(1))
            if b is None:
                return None
            n = max(len(a.elems), len(b.elems))
            if len(a.elems) not in (1, n) or len(b.elems) not in (1, n):
                return None
            ea = a.elems * n if len(a.elems) == 1 else a.elems
            eb = b.elems * n if len(b.elems) == 1 else b.elems
            return _S(tuple(_arith(op, x, y) for x, y in zip(ea, eb)), scalar=a.scalar and b.scalar)
        return None

    def visit(self, node: Node, ins: list) -> list | Any:
        op = node.op_type
        if op in _UNARY:
            s = ins[0]
            if any(_dependent(x) for x in ins[1:]):
                self.refuse(node, "the batch reaches a parameter input")
            if isinstance(s, _S):
                return self.followed_shape(node, "computes with the batch size", op in ("Identity", "Cast"))
            return [s] * len(node.outputs)
        if op in _BROADCAST:
            return self.broadcast(node, ins)
        if op in _PER_SAMPLE:
            s = self.only_first_batched(node, ins)
            if s.axis != 0:
                self.refuse(node, f"the batch sits on axis {s.axis}, not on the sample axis 0")
            if any(self.used(o) for o in node.outputs[1:]):
                self.refuse(node, "an output other than the first is used")
            if op == "BatchNormalization" and node.attrs.get("training_mode", 0):
                self.refuse(node, "training mode: statistics over the batch")
            return [s] + [None] * (len(node.outputs) - 1)
        if op in _REDUCE:
            return self.op_Reduce(node, ins)
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            self.refuse(node, "op not known to keep the images of a batch apart")
        return handler(node, ins)

    # -- elementwise --
    def broadcast(self, node: Node, ins: list):
        if any(isinstance(s, _S) and s.dependent for s in ins):
            return self.followed_shape(node, "computes with the batch size",
                                       _is_arith(node.op_type) and not any(isinstance(s, _B) for s in ins))
        present = [(i, s) for i, s in zip(node.inputs, ins) if i]
        ranks = {i: self.rank(node, i) for i, _ in present}
        out_rank = max(ranks.values())
        batch: _B | None = None
        for name, s in present:
            if isinstance(s, _B):
                b = s.at(s.axis + out_rank - ranks[name])
                if batch is not None and b != batch:
                    self.refuse(node, "combines values whose batch sits on different axes")
                batch = b
        assert batch is not None
        for name, s in present:
            if isinstance(s, _B):
                continue
            pos = batch.axis - (out_rank - ranks[name])
            if pos < 0:
                continue
            d = (self.dims(name) or [None] * ranks[name])[pos]
            if d != 1:
                self.refuse(node, f"input {name!r} has size {d} on the batch axis {batch.axis}")
        return batch

    # -- shape and layout ops --
    def op_Shape(self, node: Node, ins: list) -> _S:
        s = ins[0]
        dims = self.dims(node.input(0))
        if dims is None:
            self.refuse(node, f"rank of {node.input(0)!r} unknown")
        elems = [d if (isinstance(d, int) and d >= 0) or isinstance(d, _M) else "D" for d in dims]
        if isinstance(s, _B):
            elems[s.axis] = _mul(_mul(s.outer, "N"), s.inner)
        r = len(dims)
        start = _norm(int(node.attrs.get("start", 0)), r)
        end = _norm(int(node.attrs.get("end", r)), r)
        return _S(tuple(elems[max(0, start):min(r, end)]))

    def op_Size(self, node, ins):
        self.refuse(node, "counts the elements of the whole batch")

    def op_Reshape(self, node: Node, ins: list) -> _B:
        x = ins[0]
        if not isinstance(x, _B) or isinstance(ins[1], _B):
            self.refuse(node, "the batch reaches the target shape as data")
        allowzero = int(node.attrs.get("allowzero", 0))
        s = self.static(node, node.input(0))
        shape = self.elems(node.input(1))
        if shape is None:
            self.refuse(node, "the target shape is computed at run time")
        if any(e in ("D", "X") for e in shape.elems):
            self.refuse(node, "the target shape depends on dims not known statically")
        # The input per image, row-major: `before` elements, then the batch, then `p_after` elements (at batch 1 the
        # batch axis holds outer * inner, whatever shape inference wrote there).
        s = list(s)
        s[x.axis] = _mul(x.outer, x.inner)
        before = _mul(x.outer, _prod(s[:x.axis]))
        p_after = _mul(x.inner, _prod(s[x.axis + 1:]))
        total = _mul(before, p_after)
        with_n = [k for k, e in enumerate(shape.elems) if _has_n(e)]
        if len(with_n) > 1:
            self.refuse(node, "the run-time target shape reads the batch size into several dims")
        # Resolve the target at batch 1 (N -> 1).
        resolved: list = []
        for k, e in enumerate(shape.elems):
            if k in with_n:
                m = _drop_n(e)
                if m is None:
                    self.refuse(node, "the run-time target shape multiplies the batch size by itself")
                resolved.append(m)
            elif e == 0 and not allowzero:
                if k >= len(s):
                    self.refuse(node, "copies a dim the input does not have")
                resolved.append(s[k])
            elif e == -1:
                resolved.append(None)
            elif isinstance(e, int) and e < 0:
                self.refuse(node, f"target dim {e}")
            else:
                resolved.append(e)
        if resolved.count(None) > 1:
            self.refuse(node, "more than one -1 in the target shape")
        if None in resolved:
            rest = _div(total, _prod([d for d in resolved if d is not None]))
            if rest is None:
                self.refuse(node, "target shape does not fit the input")
            resolved[resolved.index(None)] = rest
        o = resolved
        if _prod(o) != total:
            self.refuse(node, f"target shape {o} does not fit the input {s}")

        def place(j: int) -> _B | None:
            """The batch in dim j of the output: [prod(o[:j]), outer, N, inner, prod(o[j+1:])] must lay the input's
            [before, N, p_after] out again."""
            inner = _div(p_after, _prod(o[j + 1:]))
            outer = None if inner is None else _div(o[j], inner)
            if outer is None or _mul(_prod(o[:j]), outer) != before:
                return None
            return _B(j, outer, inner)

        if with_n:  # a run-time shape that reads the batch: it must put the batch where the input has it
            out = place(with_n[0])
            if out is None:
                self.refuse(node, "the run-time target shape moves the batch")
        else:
            # Several placements can fit (dims of size 1, or a merge into either neighbour). Preferred: the batch
            # alone in a dim (on the input's axis first), then merged, leftmost first; free_batch backtracks to the
            # next one when a later node refuses the choice.
            cands = [c for c in (place(j) for j in range(len(o))) if c is not None]
            if not cands:
                self.refuse(node, "the batch cannot be found in the target shape")
            cands.sort(key=lambda c: (not c.plain, c.axis != x.axis if c.plain else 0, c.axis))
            if len(cands) > 1:
                self.choices.append((node.name, len(cands)))
            out = cands[min(self.forced.get(node.name, 0), len(cands) - 1)]
        j = out.axis
        for k, e in enumerate(shape.elems):
            if k != j and e == 0 and not allowzero and k == x.axis:
                self.refuse(node, "copies the batch axis into a dim that does not hold the batch")
        orig_j = shape.elems[j]
        # Does the target already follow the batch?  (it reads N, or -1 at j, or 0 copying a plain batch axis j)
        already = bool(with_n) or orig_j == -1 or (orig_j == 0 and not allowzero and x.plain and x.axis == j
                                                   and out.plain)
        if not already:
            # Keep the exporter's entries, the 1 of the batch aside: 0 (copy the input's batch dim) where that
            # is it, else -1 (any other -1 then written out).
            use_zero = out.plain and x.plain and x.axis == j and not allowzero
            new = {j: 0 if use_zero else -1}
            if not use_zero:
                for k, e in enumerate(shape.elems):
                    if e == -1 and k != j:
                        if not isinstance(o[k], int):
                            self.refuse(node, f"the target's other -1 stands for {o[k]}, not known statically")
                        new[k] = o[k]
            self.set_elems(node, 1, len(shape.elems), new)
        self.learn(node.outputs[0], o)
        return out

    def op_Flatten(self, node: Node, ins: list) -> _B:
        x = self.only_first_batched(node, ins)
        s = self.static(node, node.input(0))
        k = _norm(int(node.attrs.get("axis", 1)), len(s))
        if x.axis < k:
            return _B(0, _mul(x.outer, _prod(s[:x.axis])), _mul(x.inner, _prod(s[x.axis + 1:k])))
        return _B(1, _mul(x.outer, _prod(s[k:x.axis])), _mul(x.inner, _prod(s[x.axis + 1:])))

    def op_Transpose(self, node: Node, ins: list) -> _B:
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        perm = [int(p) for p in node.attrs.get("perm", list(range(r))[::-1])]
        return x.at(perm.index(x.axis))

    def op_Unsqueeze(self, node: Node, ins: list):
        if isinstance(ins[0], _S):
            return self.followed_shape(node, "computes with the batch size")
        x = self.only_first_batched(node, ins)
        axes = self.axes_of(node, 1)
        if axes is None:
            self.refuse(node, "no axes")
        r = self.rank(node, node.input(0)) + len(axes)
        axes = sorted(_norm(a, r) for a in axes)
        kept = [d for d in range(r) if d not in axes]
        return x.at(kept[x.axis])

    def op_Squeeze(self, node: Node, ins: list):
        if isinstance(ins[0], _S):
            return self.followed_shape(node, "computes with the batch size")
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        axes = self.axes_of(node, 1)
        if axes is None:  # squeezes every dim of size 1: at batch 1 that includes a plain batch axis
            s = self.static(node, node.input(0))
            if not all(isinstance(d, int) for d in s):
                self.refuse(node, "squeezes every dim of size 1, and some dims are not known statically")
            if s[x.axis] == 1:
                self.refuse(node, "squeezes every dim of size 1, the batch axis included")
            axes = [d for d in range(r) if s[d] == 1]
        axes = [_norm(a, r) for a in axes]
        if x.axis in axes:
            self.refuse(node, "removes the batch axis")
        return x.at(x.axis - sum(a < x.axis for a in axes))

    def op_Concat(self, node: Node, ins: list):
        if any(isinstance(s, _S) for s in ins) and not any(isinstance(s, _B) for s in ins):
            return self.followed_shape(node, "builds a shape from the batch size it cannot follow")
        present = [(k, i, s) for k, (i, s) in enumerate(zip(node.inputs, ins)) if i]
        r = self.rank(node, present[0][1])
        axis = _norm(int(node.attrs["axis"]), r)
        batched = [(k, i, s) for k, i, s in present if isinstance(s, _B)]
        b = batched[0][2]
        if any(s != b for _, _, s in batched) or any(isinstance(s, _S) for _, _, s in present):
            self.refuse(node, "joins values whose batch sits on different axes")
        if axis == b.axis:
            self.refuse(node, "concatenates along the batch axis")
        for k, i, s in present:
            if not isinstance(s, _B):
                if not b.plain:
                    self.refuse(node, "joins a constant to a value whose batch is merged with another dim")
                self.expand_to_batch(node, k, b.axis, batched[0][1], b.axis)
        return b

    def op_Split(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        axis = _norm(int(node.attrs.get("axis", 0)), r)
        if axis != x.axis:
            return [x] * len(node.outputs)
        if len(node.outputs) == 1 and x.plain:
            if node.input(1) or "split" in node.attrs:
                node.inputs = node.inputs[:1]
                node.attrs.pop("split", None)
                self.mark(node)
            return [x]
        self.refuse(node, "splits the batch axis into parts")

    def op_Slice(self, node: Node, ins: list):
        if isinstance(ins[0], _S):
            return self.followed_shape(node, "slices a shape holding the batch size in a way it cannot follow")
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        if node.input(3):
            axes = [_norm(a, r) for a in self.int_list(node, node.input(3), "axes")]
        else:
            n = self.dims(node.input(1))
            if n is None or len(n) != 1 or not isinstance(n[0], int):
                self.refuse(node, "number of sliced axes unknown")
            axes = list(range(n[0]))
        if x.axis not in axes:
            return x
        if not x.plain:
            self.refuse(node, "slices an axis holding the batch merged with another dim")
        k = axes.index(x.axis)
        starts = self.int_list(node, node.input(1), "starts")
        ends = self.int_list(node, node.input(2), "ends")
        steps = self.int_list(node, node.input(4), "steps") if node.input(4) else [1] * len(axes)
        if len(range(1)[slice(starts[k], ends[k], steps[k])]) != 1:
            self.refuse(node, "takes no image at batch 1")
        # At batch 1 the slice keeps the one image: per image it is the identity on that axis.
        if (starts[k], steps[k]) != (0, 1) or ends[k] < _INT64_MAX:
            starts[k], ends[k], steps[k] = 0, _INT64_MAX, 1
            self.set_const(node, 1, np.asarray(starts, dtype=np.int64))
            self.set_const(node, 2, np.asarray(ends, dtype=np.int64))
            if node.input(4):
                self.set_const(node, 4, np.asarray(steps, dtype=np.int64))
        return x

    def op_Gather(self, node: Node, ins: list):
        data, idx = ins[0], ins[1]
        if isinstance(data, _S):
            return self.followed_shape(node, "picks from a shape holding the batch size in a way it cannot follow",
                                       not _dependent(idx))
        r = self.rank(node, node.input(0))
        axis = _norm(int(node.attrs.get("axis", 0)), r)
        if isinstance(data, _B) and not _dependent(idx):
            if axis == data.axis:
                self.refuse(node, "picks along the batch axis")
            ri = self.rank(node, node.input(1))
            return data.at(data.axis - 1 + ri) if axis < data.axis else data
        if isinstance(idx, _B) and not _dependent(data):
            return idx.at(axis + idx.axis)
        self.refuse(node, "the batch reaches both data and indices")

    def op_Expand(self, node: Node, ins: list):
        x = ins[0]
        shape = self.elems(node.input(1))
        if shape is None or shape.scalar:
            self.refuse(node, "the target shape is computed at run time")
        rx = self.rank(node, node.input(0))
        out_rank = max(rx, len(shape.elems))
        off = out_rank - len(shape.elems)
        if isinstance(x, _B):
            if isinstance(ins[1], _S) and ins[1].dependent and any(_tangled(e) for e in shape.elems):
                self.refuse(node, "the target shape depends on the batch in a way it cannot follow")
            ax = x.axis + out_rank - rx
            pos = ax - off
            if pos >= 0 and shape.elems[pos] not in (1, "N"):
                self.refuse(node, f"expands the batch axis to {shape.elems[pos]}")
            if "N" in shape.elems and shape.elems.index("N") != pos:
                self.refuse(node, "the target shape puts the batch elsewhere")
            return x.at(ax)
        if any(_tangled(e) for e in shape.elems) or shape.elems.count("N") != 1:
            self.refuse(node, "the target shape depends on the batch in a way it cannot follow")
        pos = shape.elems.index("N") + off
        d = self.dims(node.input(0))
        xp = pos - (out_rank - rx)
        if xp >= 0 and (d is None or d[xp] != 1):
            self.refuse(node, "expands a dim that is not 1 to the batch size")
        return _B(pos)

    def op_Tile(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        reps = self.int_list(node, node.input(1), "repeats")
        if reps[x.axis] != 1:
            self.refuse(node, "repeats along the batch axis")
        return x

    def op_ConstantOfShape(self, node: Node, ins: list):
        shape = ins[0]
        if not isinstance(shape, _S) or any(_tangled(e) for e in shape.elems) or shape.elems.count("N") != 1:
            self.refuse(node, "the shape depends on the batch in a way it cannot follow")
        return _B(shape.elems.index("N"))

    def op_Range(self, node, ins):
        self.refuse(node, "a range whose bounds depend on the batch size")

    def op_Pad(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        pads = self.int_list(node, node.input(1), "pads") if node.input(1) else list(node.attrs.get("pads", []))
        axes = [_norm(a, r) for a in self.int_list(node, node.input(3), "axes")] if node.input(3) \
            else list(range(r))
        if x.axis in axes:
            k = axes.index(x.axis)
            if pads[k] or pads[k + len(axes)]:
                self.refuse(node, "pads the batch axis")
        return x

    def op_Resize(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        if not x.plain:
            self.refuse(node, "resizes a value whose batch is merged with another dim")
        if node.input(3):  # sizes
            sizes = self.elems(node.input(3))
            if sizes is None:
                self.refuse(node, "sizes computed at run time")
            if "axes" in node.attrs:
                axes = [_norm(a, self.rank(node, node.input(0))) for a in node.attrs["axes"]]
                if x.axis not in axes:
                    return x
                pos = axes.index(x.axis)
            else:
                pos = x.axis
            e = sizes.elems[pos]
            others = [v for k, v in enumerate(sizes.elems) if k != pos]
            if e == "N" and not any(v == "X" or _has_n(v) for v in others):
                return x
            if e != 1 or not all(isinstance(v, int) for v in sizes.elems) or "axes" in node.attrs:
                self.refuse(node, "sizes on the batch axis it cannot rewrite")
            node.inputs[3] = self.dynamic_shape(list(sizes.elems), pos, node.input(0), x.axis)
            self.mark(node)
            return x
        if node.input(2):
            scales = self.const(node.input(2))
            if scales is None:
                self.refuse(node, "scales computed at run time")
            axes = [_norm(a, self.rank(node, node.input(0))) for a in node.attrs.get("axes", [])] or \
                list(range(scales.size))
            if x.axis in axes and float(scales.reshape(-1)[axes.index(x.axis)]) != 1.0:
                self.refuse(node, "scales the batch axis")
        return x

    def op_GridSample(self, node: Node, ins: list):
        a, b = ins[0], ins[1]
        if not (isinstance(a, _B) and isinstance(b, _B) and a.axis == 0 and b.axis == 0 and a == b):
            self.refuse(node, "input and grid must both carry the batch on axis 0")
        return a

    # -- reductions and normalisations --
    def op_Reduce(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        axes = self.axes_of(node, 1)
        if not axes:
            if axes is not None and node.attrs.get("noop_with_empty_axes", 0):
                return x
            self.refuse(node, "reduces over every axis, the batch included")
        axes = [_norm(a, r) for a in axes]
        if x.axis in axes:
            self.refuse(node, "reduces over the batch axis")
        if node.attrs.get("keepdims", 1):
            return x
        return x.at(x.axis - sum(a < x.axis for a in axes))

    def op_ArgMax(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        axis = _norm(int(node.attrs.get("axis", 0)), r)
        if axis == x.axis:
            self.refuse(node, "reduces over the batch axis")
        return x if node.attrs.get("keepdims", 1) or axis > x.axis else x.at(x.axis - 1)

    op_ArgMin = op_ArgMax

    def op_Softmax(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        axis = _norm(int(node.attrs.get("axis", -1)), r)
        if axis == x.axis:
            self.refuse(node, "normalises over the batch axis")
        return x

    op_LogSoftmax = op_Hardmax = op_Softmax

    def op_LpNormalization(self, node: Node, ins: list):
        return self.op_Softmax(node, ins)

    def op_LayerNormalization(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        r = self.rank(node, node.input(0))
        axis = _norm(int(node.attrs.get("axis", -1)), r)
        if x.axis >= axis:
            self.refuse(node, "normalises over the batch axis")
        return [x] * len(node.outputs)

    def op_CumSum(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        axis = _norm(self.int_list(node, node.input(1), "axis")[0], self.rank(node, node.input(0)))
        if axis == x.axis:
            self.refuse(node, "accumulates along the batch axis")
        return x

    def op_TopK(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        axis = _norm(int(node.attrs.get("axis", -1)), self.rank(node, node.input(0)))
        if axis == x.axis:
            self.refuse(node, "sorts along the batch axis")
        return [x, x]

    def op_QuantizeLinear(self, node: Node, ins: list):
        x = self.only_first_batched(node, ins)
        scale = self.dims(node.input(1))
        r = self.rank(node, node.input(0))
        if scale and _prod(scale) > 1 and _norm(int(node.attrs.get("axis", 1)), r) == x.axis:
            self.refuse(node, "per-channel quantization along the batch axis")
        return x

    op_DequantizeLinear = op_QuantizeLinear

    # -- linear algebra --
    def op_Gemm(self, node: Node, ins: list):
        a = ins[0]
        if not isinstance(a, _B) or any(_dependent(s) for s in ins[1:]):
            self.refuse(node, "the batch reaches B or C")
        want = 1 if node.attrs.get("transA", 0) else 0
        if a.axis != want:
            self.refuse(node, "the batch sits on the contracted axis")
        if node.input(2):
            c = self.dims(node.input(2))
            if c is None or (len(c) == 2 and c[0] != 1):
                self.refuse(node, "C is not a per-column bias")
        return a.at(0)

    def op_MatMul(self, node: Node, ins: list):
        a, b = ins[0], ins[1]
        ra, rb = self.rank(node, node.input(0)), self.rank(node, node.input(1))
        if ra < 2 or rb < 2:
            self.refuse(node, "1-D operand")
        r = max(ra, rb)
        outs = []
        for s, rk, contracted, kept, out_axis in ((a, ra, ra - 1, ra - 2, r - 2), (b, rb, rb - 2, rb - 1, r - 1)):
            if not isinstance(s, _B):
                continue
            if s.axis == contracted:
                self.refuse(node, "the batch sits on the contracted axis")
            outs.append(s.at(out_axis) if s.axis == kept else s.at(s.axis + r - rk))
        if len(outs) == 2 and (outs[0] != outs[1] or outs[0].axis >= r - 2):
            self.refuse(node, "multiplies two values carrying the batch across images")
        out = outs[0]
        if out.axis < r - 2:  # a broadcast batch dim: the other operand must not have its own size there
            for name, s, rk in ((node.input(0), a, ra), (node.input(1), b, rb)):
                if not isinstance(s, _B):
                    pos = out.axis - (r - rk)
                    if pos >= 0 and (self.dims(name) or [None] * rk)[pos] != 1:
                        self.refuse(node, f"operand {name!r} has its own size on the batch axis")
        return out

    # -- recurrent --
    def op_LSTM(self, node: Node, ins: list):
        layout = int(node.attrs.get("layout", 0))
        x = ins[0]
        xaxis, state_axis, y_axis = (1, 1, 2) if layout == 0 else (0, 0, 0)
        if not isinstance(x, _B) or not x.plain or x.axis != xaxis:
            self.refuse(node, f"the batch must be on axis {xaxis} of X")
        if any(_dependent(s) for s in ins[1:4]):
            self.refuse(node, "the batch reaches the weights")
        n_states = 2 if node.op_type == "LSTM" else 1
        if node.input(4):  # sequence_lens: [batch]
            s = ins[4]
            if isinstance(s, _B):
                if not (s.plain and s.axis == 0):
                    self.refuse(node, "sequence_lens carries the batch oddly")
            else:
                lens = self.const(node.input(4))
                t = self.static(node, node.input(0))[1 - xaxis]
                if lens is not None and lens.size == 1 and int(lens.reshape(-1)[0]) == t:
                    node.inputs[4] = ""  # every sequence is full length: the default
                    self.mark(node)
                else:
                    self.refuse(node, "sequence_lens fixed for a batch of 1")
        for k in range(5, 5 + n_states):
            if not node.input(k):
                continue
            s = ins[k]
            if isinstance(s, _B):
                if not (s.plain and s.axis == state_axis):
                    self.refuse(node, "an initial state carries the batch on the wrong axis")
                continue
            c = self.const(node.input(k))
            if c is not None and not np.any(c):
                node.inputs[k] = ""  # zeros: the default initial state
                self.mark(node)
            else:
                self.expand_to_batch(node, k, state_axis, node.input(0), xaxis)
        if node.op_type == "LSTM" and _dependent(ins[7] if len(ins) > 7 else None):
            self.refuse(node, "the batch reaches the peepholes")
        while node.inputs and not node.inputs[-1]:
            node.inputs.pop()
        return [_B(y_axis)] + [_B(state_axis)] * (len(node.outputs) - 1)

    op_GRU = op_RNN = op_LSTM


def _is_arith(op: str) -> bool:
    return op in ("Add", "Sub", "Mul", "Div")


def _arith(op: str, x, y):
    """x op y on shape elements: ints, "N" and products of free dims (_M) stay exact where the result is a product
    (Mul, exact Div, adding 0); any other sum or quotient is "D", or "X" when it involves the batch."""
    if isinstance(x, int) and isinstance(y, int):
        if op == "Add":
            return x + y
        if op == "Sub":
            return x - y
        if op == "Mul":
            return x * y
        return x // y if y else "X"
    dep = "X" in (x, y) or _has_n(x) or _has_n(y)
    if op == "Mul":
        r = _mul(x, y)
    elif op == "Div":
        r = _div(x, y)
    elif op in ("Add", "Sub") and y == 0:
        r = x if x not in ("D", "X") else None
    elif op == "Add" and x == 0:
        r = y if y not in ("D", "X") else None
    else:
        r = None
    return r if r is not None else ("X" if dep else "D")


# ---- the pass as a function ------------------------------------------------------------------------------------
def _copy_graph(g: Graph) -> Graph:
    """A copy safe to edit: new nodes/value infos/dicts; initializer arrays shared (edits replace, never mutate)."""
    return Graph(
        nodes=[Node(n.op_type, list(n.inputs), list(n.outputs), n.name, dict(n.attrs), n.domain) for n in g.nodes],
        inputs=[ValueInfo(v.name, v.elem_type, None if v.shape is None else list(v.shape)) for v in g.inputs],
        outputs=[ValueInfo(v.name, v.elem_type, None if v.shape is None else list(v.shape)) for v in g.outputs],
        initializers=dict(g.initializers),
        value_info={k: ValueInfo(v.name, v.elem_type, None if v.shape is None else list(v.shape))
                    for k, v in g.value_info.items()},
        opset=g.opset, other_opsets=dict(g.other_opsets), metadata=dict(g.metadata), name=g.name,
        producer_name=g.producer_name,
    )


def _batch_symbol(graph: Graph) -> str:
    """The symbolic batch dim: the one an input already uses on dim 0, else a name no other dim uses."""
    for v in graph.inputs:
        if v.shape and isinstance(v.shape[0], str) and v.shape[0]:
            return v.shape[0]
    used = {d for v in (*graph.inputs, *graph.outputs, *graph.value_info.values()) for d in (v.shape or [])
            if isinstance(d, str)}
    for cand in ("N", "batch", "batch_size"):
        if cand not in used:
            return cand
    k = 1
    while f"N_{k}" in used:
        k += 1
    return f"N_{k}"


def one_image_inputs(graph: Graph) -> list[str]:
    """The inputs that declare a fixed batch of 1 (rank >= 2, dim 0 of 1): fed one image at a time."""
    return [v.name for v in graph.inputs if v.shape and len(v.shape) >= 2 and v.shape[0] == 1]


def _is_batch_input(v: ValueInfo) -> bool:
    """Rank >= 2 with dim 0 declared 1 or free (symbolic, unknown, or the -1 / 0 some exporters write)."""
    return bool(v.shape) and len(v.shape) >= 2 and (not isinstance(v.shape[0], int) or v.shape[0] <= 1)


_MAX_ATTEMPTS = 32


def _analyse(an: _Analysis) -> dict[str, int]:
    """Run the pass; the batch axis of every output, or _Refuse."""
    an.run()
    axes: dict[str, int] = {}
    for v in an.g.outputs:
        s = an.st(v.name)
        if not isinstance(s, _B):
            raise _Refuse(f"output {v.name!r} does not carry the batch"
                          + (" (it depends on the batch size)" if _dependent(s) else
                             " (it does not depend on the input)"))
        if not s.plain:
            raise _Refuse(f"output {v.name!r} holds the batch merged with another dim")
        axes[v.name] = s.axis
    return axes


def _next_choice(choices: list[tuple[str, int]], forced: dict[str, int]) -> bool:
    """Advance `forced` to the next combination of placements (the last choice first); False when none is left."""
    for k in range(len(choices) - 1, -1, -1):
        name, n = choices[k]
        if forced.get(name, 0) + 1 < n:
            forced[name] = forced.get(name, 0) + 1
            for later, _ in choices[k + 1:]:
                forced.pop(later, None)
            return True
    return False


def free_batch(graph: Graph, inplace: bool = False) -> BatchResult:
    """Rewrite a (convert-normalised) graph whose inputs declare a batch of 1 so that it runs at any batch.

    Inputs of rank >= 2 whose dim 0 is 1 (or already symbolic) carry the batch. The graph is not modified
    unless `inplace` and the result is freed; `result.graph` is the freed graph (None when not freed).
    """
    declared = {"inputs": {v.name: None if v.shape is None else list(v.shape) for v in graph.inputs},
                "outputs": {v.name: None if v.shape is None else list(v.shape) for v in graph.outputs}}
    result = BatchResult(freed=False, declared=declared)
    batched = [v for v in graph.inputs if _is_batch_input(v)]
    if not batched:
        result.reason = "no input declares a batch (rank >= 2 with dim 0 of 1)"
        return result
    already_free = all(v.shape[0] != 1 for v in batched)
    shapes = _infer_shapes(graph, [v.name for v in batched])
    missing = [o for n in graph.nodes for o in n.outputs if o and not _Analysis._static_dims(shapes.get(o))]
    if missing:
        shapes.update(_shapes_from_ort(graph, missing))
    shapes = {k: _symbolic(k, d) for k, d in shapes.items()}
    forced: dict[str, int] = {}
    first: _Refuse | None = None
    axes: dict[str, int] | None = None
    for _ in range(_MAX_ATTEMPTS):
        work = _copy_graph(graph)
        an = _Analysis(work, [v.name for v in batched], shapes, forced)
        try:
            axes = _analyse(an)
            break
        except _Refuse as e:
            first = first or e
            if not _next_choice(an.choices, forced):
                break
    if axes is None:
        if already_free:
            result.freed, result.graph = True, graph
            result.note = f"the inputs already declare a free batch; not proven per image: {first}"
        else:
            result.reason = str(first)
        return result
    sym = _batch_symbol(graph)
    for v in work.inputs:
        if v.name in {b.name for b in batched} and v.shape[0] == 1:
            v.shape[0] = sym
    notes = []
    for v in work.outputs:
        ax, dims = axes[v.name], an.dims(v.name)
        if dims is not None and (v.shape is None or len(v.shape) != len(dims) or any(
                isinstance(a, int) and isinstance(b, int) and a != b
                for k, (a, b) in enumerate(zip(v.shape, dims)) if k != ax)):
            # What the graph computes wins over what the exporter declared (kept in `declared` all the same).
            computed = [sym if k == ax else (d if isinstance(d, int) else None) for k, d in enumerate(dims)]
            notes.append(f"output {v.name!r} declares {v.shape} but computes {computed}")
            v.shape = computed
        elif v.shape is not None and ax < len(v.shape) and not isinstance(v.shape[ax], str):
            v.shape[ax] = sym
    for name, vi in list(work.value_info.items()):
        s = an.st(name)
        if isinstance(s, _B) and vi.shape is not None and s.axis < len(vi.shape):
            vi.shape[s.axis] = sym if s.plain else None
    work.cleanup()
    work.toposort()
    result.freed, result.rewritten, result.added, result.batch_axes = True, an.rewritten, an.added, axes
    if already_free and not an.rewritten and not an.added:
        notes.insert(0, "the inputs already declare a free batch")
    result.note = "; ".join(notes)
    if inplace:
        graph.__dict__.update(work.__dict__)
        work = graph
    result.graph = work
    return result


def restore_declared_shapes(model: Graph | onnx.ModelProto, declared: dict) -> int:
    """Put the declared input/output shapes back (by name), leaving the internals free. Returns how many."""
    count = 0
    if isinstance(model, Graph):
        for v in (*model.inputs, *model.outputs):
            for part in ("inputs", "outputs"):
                if v.name in declared.get(part, {}):
                    shape = declared[part][v.name]
                    v.shape = None if shape is None else list(shape)
                    count += 1
                    break
        return count
    for part, protos in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        for vi in protos:
            if vi.name not in declared.get(part, {}):
                continue
            shape = declared[part][vi.name]
            tt = vi.type.tensor_type
            tt.ClearField("shape")
            if shape is not None:
                tt.shape.SetInParent()
                for d in shape:
                    dim = tt.shape.dim.add()
                    if isinstance(d, int):
                        dim.dim_value = d
                    elif isinstance(d, str):
                        dim.dim_param = d
            count += 1
    return count


# ---- onnxruntime -------------------------------------------------------------------------------------------------
def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _random(elem_type: int, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _as_proto(m: onnx.ModelProto | Graph) -> onnx.ModelProto:
    return to_onnx(m) if isinstance(m, Graph) else m


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> float | None:
    """None when equal within rel (relative to want's scale), else the relative error."""
    if np.issubdtype(want.dtype, np.floating):
        g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
        nan = np.isnan(w)
        if not np.array_equal(nan, np.isnan(g)):
            return float("inf")
        g, w = g[~nan], w[~nan]
        if not w.size:
            return None
        if not np.array_equal(np.isinf(g), np.isinf(w)) or not np.array_equal(g[np.isinf(g)], w[np.isinf(w)]):
            return float("inf")
        fin = np.isfinite(w)
        # Relative to the output's largest magnitude, floored at 1e-2: outputs that are all nearly zero (a
        # saturated sigmoid map at 1e-8) differ by float32 noise of their own size between two runs.
        scale = max(float(np.abs(w[fin]).max()) if fin.any() else 0.0, 1e-2)
        err = float(np.abs(g[fin] - w[fin]).max()) / scale if fin.any() else 0.0
        return None if err <= rel else err
    return None if np.array_equal(got, want) else float("inf")


def batch_mismatch(original: onnx.ModelProto | Graph, freed: onnx.ModelProto | Graph, sizes: Sequence[int] = (2, 3),
                   seed: int = 0, rel: float = 1e-4) -> str | None:
    """None when the freed model at each batch N in `sizes` gives the per-image outputs of the original model
    (run at batch 1, image by image) stacked on each output's batch axis; else a one-line reason.

    Random inputs (standard normal; ints in {0, 1}); inputs of rank >= 2 with dim 0 of 1 or symbolic carry the
    batch, the others are fed whole; symbolic dims other than the batch are set to 32. An output's batch axis
    is the one axis whose size differs between the freed model's outputs at N=1 and N=2.
    """
    original, freed = _as_proto(original), _as_proto(freed)
    g = from_onnx(original)
    sizes = sorted({int(n) for n in sizes})
    n_max = max([2, *sizes])
    rng = np.random.default_rng(seed)
    fixed, per_image = {}, {}
    for v in g.inputs:
        dims = [d if isinstance(d, int) and d > 0 else 32 for d in (v.shape or [])]
        if _is_batch_input(v):
            per_image[v.name] = _random(v.elem_type, [n_max, *dims[1:]], rng)
        else:
            fixed[v.name] = _random(v.elem_type, dims, rng)
    try:
        orig = _session(original)
    except Exception as e:
        return f"onnxruntime cannot load the original model: {_first_line(e)}"
    try:
        free = _session(freed)
    except Exception as e:
        return f"onnxruntime cannot load the freed model: {_first_line(e)}"

    def feeds(lo, hi):
        return {**fixed, **{k: a[lo:hi] for k, a in per_image.items()}}

    names = [o.name for o in orig.get_outputs()]
    try:
        ref = [orig.run(None, feeds(i, i + 1)) for i in range(n_max)]
    except Exception as e:
        return f"the original model fails at batch 1: {_first_line(e)}"
    got: dict[int, list[np.ndarray]] = {}
    for n in sorted({1, 2, *sizes}):
        try:
            got[n] = free.run(None, feeds(0, n))
        except Exception as e:
            return f"the freed model fails at batch {n}: {_first_line(e)}"
    for k, name in enumerate(names):
        s1, s2 = np.shape(got[1][k]), np.shape(got[2][k])
        if len(s1) != len(s2):
            return f"output {name!r} changes rank with the batch"
        diff = [a for a in range(len(s1)) if s1[a] != s2[a]]
        if len(diff) != 1 or s2[diff[0]] != 2 * s1[diff[0]]:
            return f"output {name!r}: no single batch axis (shapes {list(s1)} at N=1, {list(s2)} at N=2)"
        axis = diff[0]
        for n in [1, *sizes]:
            want = np.concatenate([ref[i][k] for i in range(n)], axis=axis)
            have = got[n][k]
            if np.shape(have) != want.shape:
                return f"output {name!r} at batch {n}: shape {list(np.shape(have))} != per image {list(want.shape)}"
            err = _close(have, want, rel)
            if err is not None:
                return f"output {name!r} at batch {n}: relative error {err:.1e} > {rel:.0e} against per image"
    return None


def check_free_batch(original: onnx.ModelProto | Graph, freed: onnx.ModelProto | Graph,
                     sizes: Sequence[int] = (2, 3)) -> bool:
    """True when `batch_mismatch` finds nothing."""
    return batch_mismatch(original, freed, sizes) is None


def ort_run_per_image(session, feeds: dict[str, np.ndarray], axes: dict[str, int] | Sequence[int] | None = None,
                      output_names: list[str] | None = None) -> list[np.ndarray]:
    """Run a batch-1 session image by image and join the outputs along their batch axis.

    Inputs whose declared dim 0 is 1 are cut into single images when fed more than one (every input with a batch,
    when the model's metadata has `PER_INPUT_KEY`); the others are fed whole. `axes` (per output name, or a list
    in output order; `BatchResult.batch_axes` fits) gives each output's batch axis; without it the first of axes
    0 and 1 of size 1 in the per-image output is taken (an output with neither gets a new axis 0).
    """
    names = output_names or [o.name for o in session.get_outputs()]
    per_input = PER_INPUT_KEY in session.get_modelmeta().custom_metadata_map
    cut: list[str] = []
    n = None
    for i in session.get_inputs():
        a = feeds.get(i.name)
        if a is None or not i.shape or (i.shape[0] != 1 and not per_input) or np.ndim(a) == 0 \
                or np.shape(a)[0] == 1:
            continue
        if n is not None and np.shape(a)[0] != n:
            raise ValueError(f"inputs disagree on the batch size: {n} and {np.shape(a)[0]} ({i.name!r})")
        n = np.shape(a)[0]
        cut.append(i.name)
    if not cut:
        return session.run(names, feeds)
    runs = [session.run(names, {k: (v[j:j + 1] if k in cut else v) for k, v in feeds.items()}) for j in range(n)]
    out = []
    for k, name in enumerate(names):
        parts = [r[k] for r in runs]
        if isinstance(axes, dict):
            ax = axes.get(name)
        elif axes is not None:
            ax = axes[k]
        else:
            ax = next((a for a in (0, 1) if np.ndim(parts[0]) > a and np.shape(parts[0])[a] == 1), None)
        out.append(np.stack(parts) if ax is None else np.concatenate(parts, axis=ax))
    return out
