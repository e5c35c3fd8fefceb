"""Eval-mode simulation of onnxruntime's integer kernels: the same integers, not just the same grid.

The fake-quant simulation rounds where the int8 model rounds, but it computes the values it rounds in float
(a float32 convolution of dequantized inputs, divided by the output scale), while onnxruntime's kernels
compute them in integers and a float32 requantization of their own. The two differ only near rounding ties:
measured on PaddleOCR's text-direction model, 1 output in 10^6 of its convolutions and 1 in 10^4 of its
residual Adds, given the same inputs. Through 50 layers those single steps grow, and simulation and int8 model
disagreed on 0.2-0.6 % of the images.

So, for eval-mode forwards only, the engine runs each chain that onnxruntime turns into one integer kernel as
one step that computes what that kernel computes (MLAS on x86; each formula below was measured against
onnxruntime on this machine and is tested against it, tests/test_integer_eval.py):

- Conv / Gemm / MatMul -> QLinearConv / QGemm / QLinearMatMul (with the FoldedBias, a redundant Relu/Clip and
  the output FakeQuant): acc = sum((x_q - z_x) * w_q) + bias_q exactly (int32);
  y_q = saturate(round_half_even(float32(acc) * M_c) + z_y) with M_c = float32(float32(s_x * s_w[c]) / s_y).
- Add -> QLinearAdd: in float32 with fused multiply-adds, R_a = s_a / s_c, R_b = s_b / s_c,
  F = z_c - fma(R_a, z_a, R_b * z_b), v = fma(a_q, R_a, fma(b_q, R_b, F)), y_q = saturate(round(v)); the
  operand that is constant along the innermost axis (a broadcast one) takes b's place.
- Mul -> QLinearMul: v = float32((a_q - z_a) * (b_q - z_b)) * R + z_c (two float32 roundings),
  R = float32(float32(s_a * s_b) / s_c).
- GlobalAveragePool -> QLinearGlobalAveragePool: acc = sum(x_q) - z_x * HW,
  v = float32(acc) * float32(s_x / float32(s_y * HW)), y_q = saturate(round(v) + z_y).

Unsigned (uint8) activations only, the default: with int8 (symmetric) activations onnxruntime 1.32 on x86 fuses
some of these ops and runs others in float between their DequantizeLinear and QuantizeLinear (a Conv followed
by a Relu, a residual Add), and its int8 requantization rounds otherwise; there the simulation keeps its float
path, which is exact wherever onnxruntime computes in float.

The integers are read back from the simulation's own dequantized values (round(x / s) recovers them exactly),
so nothing upstream changes. A chain whose state does not match what the export will write (an unobserved
quantizer, a Relu/Clip the export keeps) runs its parts as before. Training forwards and backward never use
these steps: the fake-quant gradient is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph, Node
from ..ops.base import Op, make_op, register, register_eval_rewrite
from .prepare import DOMAIN, FUSED_ACTIVATIONS, WEIGHTED, passes_through, weight_axes
from .qparams import MIN_SCALE, activation_grid, activation_range, bias_integers, channel_shape, grid_inside

f32 = np.float32
F32_EXACT = 2.0**24  # integers up to this magnitude are exact in float32: a float32 GEMM of them is exact below it


@dataclass(frozen=True)
class Operand:
    """A tensor as an integer kernel reads it: the FakeQuant it came from (its scale, zero point and span
    inputs) and the positive constants the export multiplies into the DequantizeLinear's scale (`rescale`s)."""

    scale: str
    zero_point: str
    span: str
    multipliers: tuple[float, ...] = ()
    signed: bool = False  # symmetric activations: int8


def resolve_operand(graph: Graph, producers: dict[str, Node], tensor: str) -> Operand | None:
    """The quantizer whose integers `tensor` holds in the int8 model, as the export writes it: a FakeQuant,
    then any rescaling Muls by a positive scalar (folded into the DequantizeLinear's scale), then any
    pass-through ops (requantized with that scale). None when the int8 model reads something else."""
    multipliers: list[float] = []
    seen_rescale = False
    while True:
        p = producers.get(tensor)
        if p is None:
            return None
        if p.domain == DOMAIN and p.op_type == "FakeQuant":
            return Operand(p.input(1), p.input(2), p.input(3), tuple(reversed(multipliers)),
                           bool(p.attrs.get("symmetric", 0)))
        if passes_through(p) and not seen_rescale:
            tensor = p.input(0)
            continue
        c = _rescale_constant(graph, p)
        if c is None:
            return None
        multipliers.append(c[1])
        tensor = c[0]
        seen_rescale = True


def _rescale_constant(graph: Graph, node: Node) -> tuple[str, float] | None:
    """(x, c) of a Mul(x, c) by a positive scalar constant, else None (`export.int8._fold_rescales`)."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    for i, j in ((0, 1), (1, 0)):
        c = graph.initializers.get(node.input(j))
        if c is not None and node.input(i) not in graph.initializers and c.size == 1 and float(c.reshape(())) > 0:
            return node.input(i), float(c.reshape(()))
    return None


# ---- the formulas ---------------------------------------------------------------------------------------------
def _fma32(x: np.ndarray, y, z) -> np.ndarray:
    """float32 fused multiply-add, broadcasting: x * y exactly (x holds 8-bit integers, y a float32), plus z,
    rounded once (the float64 sum is exact unless x * y and z lie more than about 2^22 apart in magnitude; then
    the second rounding can differ from one only at a tie)."""
    return np.add(np.multiply(x, np.float64(y), dtype=np.float64), z, dtype=np.float64).astype(f32)


def requantize_accumulator(acc: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """MLAS's requantization before rounding: float32(acc) * M, in float32 (acc: exact integers)."""
    return acc.astype(f32, copy=False) * multiplier.astype(f32, copy=False)


def qlinear_add(a_q, za: float, sa, b_q, zb: float, sb, sc, zc: float) -> np.ndarray:
    """QLinearAdd's value before rounding (MLAS AVX2 kernel), a_q and b_q the stored integers: b enters first,
    and may be the smaller, broadcast operand."""
    ra, rb = f32(f32(sa) / f32(sc)), f32(f32(sb) / f32(sc))
    fixed = f32(f32(zc) - _fma32(f32(za), ra, rb * f32(zb)))
    inner = _fma32(b_q, rb, fixed)  # in b's own shape
    return _fma32(a_q, ra, inner)


def qlinear_mul(a, sa, b, sb, sc, zc: float) -> np.ndarray:
    """QLinearMul's value before rounding (MLAS SSE2 kernel), a and b the integers minus their zero points: their
    product is exact in float32 (|a b| < 2^16), then two float32 roundings."""
    r = f32(f32(f32(sa) * f32(sb)) / f32(sc))
    v = np.multiply(a, b, dtype=f32)
    v *= r
    v += f32(zc)
    return v


def qlinear_global_average_pool(x_q: np.ndarray, zx: float, sx, sy) -> np.ndarray:
    """QLinearGlobalAveragePool's value before rounding and adding the output zero point (MLAS), NC...: the
    spatial axes are reduced, kept as size 1."""
    axes = tuple(range(2, x_q.ndim))
    size = int(np.prod([x_q.shape[a] for a in axes]))
    acc = np.asarray(x_q, np.float64).sum(axis=axes, keepdims=True) - zx * size
    scale = f32(f32(sx) / f32(f32(sy) * f32(size)))
    return acc.astype(f32) * scale


def broadcast_first(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """Whether onnxruntime's broadcasting hands the first operand to the kernel as the scalar of each span: it is
    constant along the innermost axis where the output varies, and the second operand is not."""
    out = np.broadcast_shapes(a_shape, b_shape)
    a = (1,) * (len(out) - len(a_shape)) + tuple(a_shape)
    b = (1,) * (len(out) - len(b_shape)) + tuple(b_shape)
    for k in range(len(out) - 1, -1, -1):
        if out[k] != 1:
            return a[k] == 1 and b[k] != 1
    return False


# ---- the rewrite ----------------------------------------------------------------------------------------------
ELEMENTWISE = ("Add", "Mul", "GlobalAveragePool")


@register_eval_rewrite
def integer_eval_nodes(graph: Graph) -> list[Node] | None:
    """The graph's nodes (topologically sorted) with every integer-kernel chain replaced by one Integer* node,
    or None when there is none."""
    producers, consumers = graph.producers(), graph.consumers()
    outputs = set(graph.output_names)
    fused: dict[int, Node] = {}  # id of a chain's last node -> the node that replaces the chain
    dropped: set[int] = set()
    for fq in graph.nodes:
        if fq.domain != DOMAIN or fq.op_type != "FakeQuant" or fq.input(0) in graph.initializers:
            continue
        chain = _chain_ending_at(graph, producers, consumers, outputs, fq)
        if chain is None:
            continue
        fused[id(fq)] = chain
        dropped.update(id(n) for n in chain.attrs["parts"][:-1])
    if not fused:
        return None
    return [fused.get(id(n), n) for n in graph.nodes if id(n) not in dropped]


def _chain_ending_at(graph, producers, consumers, outputs, fq: Node) -> Node | None:
    parts = [fq]

    def step_back(tensor: str) -> Node | None:
        """The producer of `tensor` when only the chain reads it."""
        if tensor in outputs or len(consumers.get(tensor, [])) != 1:
            return None
        return producers.get(tensor)

    p = step_back(fq.input(0))
    act = None
    if p is not None and p.domain in ("", "ai.onnx") and p.op_type in FUSED_ACTIVATIONS:
        act, p = p, step_back(p.input(0))
        parts.insert(0, act)
    if p is None:
        return None
    bias = None
    if p.domain == DOMAIN and p.op_type == "FoldedBias":
        bias, p = p, step_back(p.input(0))
        parts.insert(0, bias)
        if p is None:
            return None
    if p.domain in ("", "ai.onnx") and p.op_type in WEIGHTED:
        wq = producers.get(p.input(1))
        x = resolve_operand(graph, producers, p.input(0))
        if wq is None or wq.op_type != "WeightQuant" or x is None or x.multipliers:
            return None
        kind, operands, extra = "IntegerLayer", [x], {"weight_scale": wq.outputs[1]}
    elif bias is None and p.domain in ("", "ai.onnx") and p.op_type in ELEMENTWISE:
        data = p.inputs[:1] if p.op_type == "GlobalAveragePool" else p.inputs
        operands = [resolve_operand(graph, producers, t) for t in data]
        if len(operands) != (1 if p.op_type == "GlobalAveragePool" else 2) or any(o is None for o in operands):
            return None
        kind, extra = "Integer" + p.op_type, {}
    else:
        return None
    if fq.attrs.get("symmetric", 0) or any(o.signed for o in operands):
        return None  # int8 activations: see the module notes
    parts.insert(0, p)
    internal = {o for n in parts for o in n.outputs if o}
    inputs = list(dict.fromkeys(i for n in parts for i in n.inputs if i and i not in internal))
    state = [name for o in operands for name in (o.scale, o.zero_point, o.span)] + list(extra.values())
    inputs += [s for s in dict.fromkeys(state) if s not in inputs]
    return Node(kind, inputs, [fq.outputs[0]], fq.name, {"parts": parts, "operands": operands, **extra}, DOMAIN)


# ---- the ops --------------------------------------------------------------------------------------------------
class _Chain(Op):
    """Runs the integer kernel's arithmetic, or (`integer` returning None) the chain's own ops in turn."""

    differentiable = False

    def __init__(self, node: Node, opset: int = 13):
        super().__init__(node, opset)
        self.parts = [(make_op(n, opset), n) for n in node.attrs["parts"]]
        for op, _ in self.parts:
            op.keep_attributes()
        self.operands: list[Operand] = node.attrs["operands"]
        fq = node.attrs["parts"][-1]
        self.out = (fq.input(1), fq.input(2), fq.input(3))
        self.grid = activation_grid(int(fq.attrs.get("bits", 8)), bool(fq.attrs.get("symmetric", 0)))

    def forward(self, ctx, *xs):
        env = {"": None, **dict(zip(self.node.inputs, xs))}
        if not ctx.training and all(_observed(env[o.span]) for o in self.operands) and _observed(env[self.out[2]]) \
                and not self.activation_kept(env):
            y = self.integer(ctx, env)
            if y is not None:
                return y
        for op, n in self.parts:
            r = op.forward(ctx, *[env[i] for i in n.inputs])
            for name, v in zip(n.outputs, r if isinstance(r, tuple) else (r,)):
                if name:
                    env[name] = v
            op.release()
        return env[self.node.outputs[0]]

    def integer(self, ctx, env) -> np.ndarray | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def out_scale(self, env) -> np.float32:
        return _scale(env[self.out[0]])

    def out_zero(self, env) -> float:
        return _number(env[self.out[1]])

    def scale_of(self, env, o: Operand) -> np.float32:
        """The scale of the DequantizeLinear the export writes for the operand."""
        s = _scale(env[o.scale])
        for c in o.multipliers:
            s = f32(s * f32(c))
        return s

    def integers(self, env, tensor: str, o: Operand) -> np.ndarray:
        """The operand's integers minus its zero point, read back from its dequantized values."""
        return np.rint(env[tensor] / self.scale_of(env, o))

    def output(self, env, v: np.ndarray, zero_added: bool = False) -> np.ndarray:
        """Round `v` half to even, saturate to the output grid, dequantize as the FakeQuant does. `v` includes
        the output zero point when `zero_added`."""
        s, z = self.out_scale(env), f32(self.out_zero(env))
        q = np.rint(v)
        if zero_added:
            q -= z
        np.clip(q, f32(self.grid.qmin) - z, f32(self.grid.qmax) - z, out=q)
        q *= s
        return q

    def activation_kept(self, env) -> bool:
        """Whether the export keeps the chain's Relu/Clip (its output grid reaches outside the activation's
        range): then onnxruntime runs no integer kernel here."""
        act = next((n for _, n in self.parts if n.domain in ("", "ai.onnx") and n.op_type in FUSED_ACTIVATIONS),
                   None)
        if act is None:
            return False
        return not grid_inside(self.grid, self.out_scale(env), self.out_zero(env), *activation_range(act, env))


def _scale(s) -> np.float32:
    return f32(np.maximum(np.asarray(s, f32).reshape(()), MIN_SCALE))


def _number(a) -> float:
    """A zero point (a scalar array) as a Python float."""
    return float(np.asarray(a).reshape(()))


def _observed(span) -> bool:
    return bool(span[0] <= span[1])


@register("qatool.IntegerLayer")
class IntegerLayer(_Chain):
    """Conv / Gemm / MatMul with its WeightQuant, FoldedBias, redundant Relu/Clip and output FakeQuant."""

    def integer(self, ctx, env):
        (layer, ln), bias = self.parts[0], next(((op, n) for op, n in self.parts if n.op_type == "FoldedBias"), None)
        s_x = self.scale_of(env, self.operands[0])
        x_int = np.rint(env[ln.input(0)] / s_x)
        w, s_w = env[ln.input(1)], np.asarray(env[self.node.attrs["weight_scale"]], f32).reshape(-1)
        w_axis, out_axis = weight_axes(ln)
        w_int = np.rint(w / (s_w.reshape(channel_shape(w.ndim, w_axis)) if s_w.size > 1 else s_w.reshape(())))
        bias_int = None
        if bias is not None:
            op, n = bias
            b = op.deployed_bias(*[env[i] for i in n.inputs[1:6]])
            if b is not None:
                bias_int = bias_integers(b, env[n.input(6)], env[n.input(7)])[0].astype(np.float64)
        # float32 sums of integers are exact while every partial sum stays below 2^24: bound them
        others = tuple(i for i in range(w.ndim) if i != w_axis)
        bound = max(float(x_int.max(initial=0)), -float(x_int.min(initial=0))) * \
            float(np.abs(w_int).sum(axis=others).max(initial=0))
        bound += 0.0 if bias_int is None else float(np.abs(bias_int).max(initial=0))
        dt = f32 if bound < F32_EXACT else np.float64
        acc = layer.forward(ctx, x_int.astype(dt, copy=False), w_int.astype(dt, copy=False))
        layer.release()
        shape = channel_shape(acc.ndim, out_axis)
        if bias_int is not None:
            acc += bias_int.astype(dt).reshape(shape)
        m = (f32(s_x) * s_w).astype(f32) / self.out_scale(env)
        m = m.astype(f32).reshape(shape if m.size > 1 else ())
        return self.output(env, requantize_accumulator(acc, m))

@register("qatool.IntegerAdd")
class IntegerAdd(_Chain):
    def integer(self, ctx, env):
        (a, oa), (b, ob) = zip(self.parts[0][1].inputs, self.operands)
        if broadcast_first(np.shape(env[a]), np.shape(env[b])):
            (a, oa), (b, ob) = (b, ob), (a, oa)
        za, zb = _number(env[oa.zero_point]), _number(env[ob.zero_point])
        a_q, b_q = self.integers(env, a, oa) + f32(za), self.integers(env, b, ob) + f32(zb)
        v = qlinear_add(a_q, za, self.scale_of(env, oa), b_q, zb, self.scale_of(env, ob), self.out_scale(env),
                        self.out_zero(env))
        return self.output(env, v, zero_added=True)


@register("qatool.IntegerMul")
class IntegerMul(_Chain):
    def integer(self, ctx, env):
        (a, oa), (b, ob) = zip(self.parts[0][1].inputs, self.operands)
        v = qlinear_mul(self.integers(env, a, oa), self.scale_of(env, oa), self.integers(env, b, ob),
                        self.scale_of(env, ob), self.out_scale(env), self.out_zero(env))
        return self.output(env, v, zero_added=True)


@register("qatool.IntegerGlobalAveragePool")
class IntegerGlobalAveragePool(_Chain):
    def integer(self, ctx, env):
        o = self.operands[0]
        z = _number(env[o.zero_point])
        x_q = self.integers(env, self.parts[0][1].input(0), o) + z
        return self.output(env, qlinear_global_average_pool(x_q, z, self.scale_of(env, o), self.out_scale(env)))
