"""Each Integer* kernel of the eval-mode simulation (qatool.quant.integer_eval) against the onnxruntime kernel it
emulates, integer for integer: IntegerLayer = QLinearConv / QGemm / QLinearMatMul, IntegerAdd = QLinearAdd,
IntegerMul = QLinearMul, IntegerGlobalAveragePool = QLinearGlobalAveragePool (the last three and QGemm in domain
com.microsoft). The onnxruntime side runs one node on the integers (tests/ortref.py); the qatool side is the
Integer* op of a one-kernel model, given the same integers as its dequantized values, scales and zero points.
Random data, exact rounding ties (scale ratios of 1/2, so that odd sums land on k + 0.5) and saturation at both
ends of the uint8 grid. And `export.verify.compare`, the agreement figure the export reports, on inputs whose
agreement is known.

The kernels' arithmetic is onnxruntime 1.32's MLAS on x86 (the numerics the simulation was measured against);
the skip below states that assumption.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from ortref import run_node
from qatool.convert import normalize_proto
from qatool.export.verify import compare
from qatool.ops import Context
from qatool.quant.config import QuantConfig
from qatool.train.session import QatSession

f32, u8, i8, i32 = np.float32, np.uint8, np.int8, np.int32
F = onnx.TensorProto.FLOAT

ORT_VERSION = tuple(int(p) for p in ort.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(ORT_VERSION < (1, 32), reason="bit-exact against the kernels of onnxruntime >= 1.32, "
                                                           "the version the simulation was measured on")


def _vnni() -> bool:
    """Whether the CPU has VNNI: without it MLAS's u8 x s8 kernels add products in saturating int16 pairs
    (vpmaddubsw), so weights are kept to 7 bits there (what reduce-range export does)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx2" not in flags or "vnni" in flags


W_MAX = 127 if _vnni() else 63


# ---- one-kernel models ------------------------------------------------------------------------------------------
def _session(nodes, inits, inputs, y, y_shape):
    """The kernel's output `y` feeds a 1x1 Conv (rank 4) or a Gemm (rank 2) head, so it is quantized."""
    c = y_shape[1]
    if len(y_shape) == 4:
        head = helper.make_node("Conv", [y, "w_head"], ["out"], name="head")
        inits = {**inits, "w_head": np.ones((2, c, 1, 1))}
    else:
        head = helper.make_node("Gemm", [y, "w_head"], ["out"], transB=1, name="head")
        inits = {**inits, "w_head": np.ones((2, c))}
    graph = helper.make_graph(nodes + [head], "kernel", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                              [helper.make_tensor_value_info("out", F, ["N", 2] + ["H", "W"][:len(y_shape) - 2])],
                              [numpy_helper.from_array(np.asarray(v, f32), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return QatSession.create(normalize_proto(proto, for_training=True).graph, QuantConfig())


def _kernel(session, kind):
    ops = [s.op for s in session.model._eval_steps if s.op.node.op_type == kind
           and all(n.name != "head" for _, n in s.op.parts)]  # the kernel under test, not the head
    assert len(ops) == 1, [s.op.node.op_type for s in session.model._eval_steps]
    return ops[0]


def _names(operand):
    return operand.scale, operand.zero_point, operand.span


def _quantizer(env, names, scale, zero_point):
    """Set a quantizer's state: scale, zero point and an observed span."""
    s, z, span = names
    env[s], env[z], env[span] = np.asarray(scale, f32), np.asarray(zero_point, f32), np.array([-1.0, 1.0], f32)


def _run(op, env):
    """The op's eval forward, which must take the integer path; returns the output's integers."""
    taken = []
    real = op.integer
    op.integer = lambda ctx, e: taken.append(real(ctx, e)) or taken[-1]
    try:
        y = op.forward(Context(training=False), *[env[i] if i else None for i in op.node.inputs])
    finally:
        del op.integer
    assert taken and taken[0] is not None, "the integer kernel did not run"
    s, z = env[op.out[0]], env[op.out[1]]
    return (np.rint(y / s) + z).astype(np.int64)


def _deq(q, s, z):
    return ((q.astype(f32) - f32(z)) * f32(s)).astype(f32)


# ---- IntegerLayer: QLinearConv, QGemm, QLinearMatMul ------------------------------------------------------------
LAYER_CASES = {
    # name: (x scale, x zero point, weight scales, output scale, output zero point)
    "random": (0.037, 120, "random", 0.61, 93),
    "ties (M = 1/2)": (2.0**-4, 128, 2.0**-5, 2.0**-8, 128),
    "saturation": (0.05, 10, "random", 0.01, 128),
}


def _layer_values(rng, case, c_out):
    sx, zx, sw, sy, zy = LAYER_CASES[case]
    sw = rng.uniform(0.002, 0.02, c_out).astype(f32) if sw == "random" else np.full(c_out, sw, f32)
    return f32(sx), zx, sw, f32(sy), zy


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("kind", ["Conv", "Gemm", "MatMul"])
def test_integer_layer_is_onnxruntimes_kernel(kind, case, relu, rng):
    c_in, c_out = 5, 4
    if kind == "Conv":
        x_shape, w_shape = [2, c_in, 6, 6], (c_out, c_in, 3, 3)
        layer = helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1])
    elif kind == "Gemm":
        x_shape, w_shape = [6, c_in * 9], (c_out, c_in * 9)
        layer = helper.make_node("Gemm", ["x", "w", "b"], ["c"], transB=1)
    else:
        x_shape, w_shape = [6, c_in * 9], (c_in * 9, c_out)
        layer = helper.make_node("MatMul", ["x", "w"], ["c"])
    nodes = [layer, helper.make_node("Relu" if relu else "Identity", ["c"], ["y"])]
    inits = {"w": rng.standard_normal(w_shape)} | ({"b": np.zeros(c_out)} if kind != "MatMul" else {})
    y_shape = [x_shape[0], c_out] + x_shape[2:]
    session = _session(nodes, inits, [("x", x_shape)], "y", y_shape)
    op = _kernel(session, "IntegerLayer")

    sx, zx, sw, sy, zy = _layer_values(rng, case, c_out)
    if relu:
        zy = 0  # the Relu is redundant only on a grid starting at 0 (otherwise the export keeps it, and so no kernel)
    w_axis = 1 if kind == "MatMul" else 0
    x_q = rng.integers(0, 256, x_shape).astype(u8)
    w_q = rng.integers(-W_MAX, W_MAX + 1, w_shape).astype(i8)
    b_q = rng.integers(-3000, 3000, c_out).astype(i32)
    if case == "saturation":
        b_q[0], b_q[1] = 2**24, -2**24  # channel 0 saturates at 255, channel 1 at 0

    env = {}
    ln = op.parts[0][1]
    _quantizer(env, _names(op.operands[0]), sx, zx)
    _quantizer(env, op.out, sy, zy)
    env[ln.input(0)] = _deq(x_q, sx, zx)
    w_scale_shape = [-1 if i == w_axis else 1 for i in range(len(w_shape))]
    env[ln.input(1)] = (w_q.astype(f32) * sw.reshape(w_scale_shape)).astype(f32)
    env[op.node.attrs["weight_scale"]] = sw
    bias = next((n for _, n in op.parts if n.op_type == "FoldedBias"), None)
    if bias is not None:
        step = (sx * sw).astype(f32)
        env[bias.input(1)] = (b_q * step).astype(f32)
        assert (np.rint(env[bias.input(1)] / step) == b_q).all()  # the float bias holds exactly these integers
    got = _run(op, env)

    zeros = np.zeros(c_out, i8)
    a = [np.asarray(sx), np.asarray(zx, u8)]
    out = [np.asarray(sy), np.asarray(zy, u8)]
    if kind == "Conv":
        (want,) = run_node("QLinearConv", [x_q, *a, w_q, sw, zeros, *out, b_q], [u8],
                           {"pads": [1, 1, 1, 1], "strides": [1, 1]})
    elif kind == "Gemm":
        (want,) = run_node("QGemm", [x_q, *a, w_q, sw, zeros, b_q, *out], [u8], {"transB": 1},
                           domain="com.microsoft")
    else:
        (want,) = run_node("QLinearMatMul", [x_q, *a, w_q, sw, zeros, *out], [u8])
    np.testing.assert_array_equal(got, want)
    if case == "saturation":
        assert (want == 255).any() and (want == 0).any()
    if case.startswith("ties"):  # the data reach ties: the accumulator is odd, acc * 1/2 = k + 0.5
        acc = _reference_accumulator(kind, x_q.astype(np.int64) - zx, w_q.astype(np.int64))
        if bias is not None:
            acc += b_q.reshape((1, -1) + (1,) * (acc.ndim - 2)).astype(np.int64)
        assert (acc % 2 == 1).sum() > 10


def _reference_accumulator(kind, x, w):
    if kind == "Conv":
        n, c, h, wd = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n c h w 3 3
        return np.einsum("nchwij,ocij->nohw", cols, w)
    return x @ (w.T if kind == "Gemm" else w)


def test_integer_layer_requantizes_in_float32_as_onnxruntime_does(rng):
    """y = round(float32(acc) * M) with the product rounded to float32, M = float32(float32(s_x s_w) / s_y): for
    each channel an accumulator where that float32 product and the exact one round to different integers (found
    by search), reached as the bias of a Gemm whose input sits at its zero point."""
    c_in, c_out = 3, 16
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    session = _session(nodes, {"w": rng.standard_normal((c_out, c_in)), "b": np.zeros(c_out)},
                       [("x", ["N", c_in])], "y", [None, c_out])
    op = _kernel(session, "IntegerLayer")
    sx, zx, sy, zy = f32(0.031), 77, f32(0.57), 128
    acc = np.arange(-2**17, 2**17)
    sws, b_q = [], []
    while len(sws) < c_out:
        sw = f32(rng.uniform(0.002, 0.02))
        m = f32(f32(sx * sw) / sy)
        apart = (np.rint(acc.astype(f32) * m) != np.rint(acc * np.float64(m))) & (np.abs(acc * float(m)) < 120)
        if apart.any():
            sws.append(sw)
            b_q.append(rng.choice(acc[apart]))
    sw, b_q = np.array(sws, f32), np.array(b_q, i32)
    x_q = np.full((4, c_in), zx, u8)
    w_q = rng.integers(-W_MAX, W_MAX + 1, (c_out, c_in)).astype(i8)
    env = {}
    ln = op.parts[0][1]
    _quantizer(env, _names(op.operands[0]), sx, zx)
    _quantizer(env, op.out, sy, zy)
    env[ln.input(0)] = _deq(x_q, sx, zx)
    env[ln.input(1)] = (w_q.astype(f32) * sw[:, None]).astype(f32)
    env[op.node.attrs["weight_scale"]] = sw
    bias = next(n for _, n in op.parts if n.op_type == "FoldedBias")
    env[bias.input(1)] = (b_q * (sx * sw).astype(f32)).astype(f32)
    got = _run(op, env)
    (want,) = run_node("QGemm", [x_q, np.asarray(sx), np.asarray(zx, u8), w_q, sw, np.zeros(c_out, i8), b_q,
                                 np.asarray(sy), np.asarray(zy, u8)], [u8], {"transB": 1}, domain="com.microsoft")
    np.testing.assert_array_equal(got, want)
    exact = np.rint(b_q * (sx * sw).astype(f32).astype(np.float64) / np.float64(sy)) + zy
    assert (want != exact).any()  # the control: exact arithmetic would give other integers here


# ---- IntegerAdd / IntegerMul: QLinearAdd / QLinearMul -----------------------------------------------------------
BINARY_CASES = {  # (a scale, a zero point, b scale, b zero point, output scale, output zero point)
    "Add": {
        "random": (0.043, 131, 0.021, 77, 0.057, 104),
        "ties": (1.0, 128, 1.0, 128, 2.0, 128),  # (a + b) / 2: odd sums are half-way
        "saturation": (0.1, 128, 0.1, 128, 0.01, 128),
    },
    "Mul": {
        "random": (0.043, 131, 0.021, 77, 0.4, 104),
        "ties": (0.5, 128, 1.0, 128, 1.0, 128),  # a * b / 2: odd products are half-way
        "saturation": (0.1, 128, 0.1, 128, 0.5, 128),
    },
}


def _binary_against_onnxruntime(op, op_type: str, a_q, b_q, qparams) -> np.ndarray:
    """The IntegerAdd / IntegerMul `op` on uint8 operands a_q, b_q with `qparams` (sa, za, sb, zb, sc, zc),
    asserted equal to onnxruntime's QLinearAdd / QLinearMul on the same integers; returns onnxruntime's output."""
    sa, za, sb, zb, sc, zc = qparams
    env = {}
    p = op.parts[0][1]
    _quantizer(env, _names(op.operands[0]), sa, za)
    _quantizer(env, _names(op.operands[1]), sb, zb)
    _quantizer(env, op.out, sc, zc)
    env[p.input(0)], env[p.input(1)] = _deq(a_q, sa, za), _deq(b_q, sb, zb)
    got = _run(op, env)
    args = [a_q, np.asarray(sa, f32), np.asarray(za, u8), b_q, np.asarray(sb, f32), np.asarray(zb, u8),
            np.asarray(sc, f32), np.asarray(zc, u8)]
    (want,) = run_node("QLinear" + op_type, args, [u8], domain="com.microsoft")
    np.testing.assert_array_equal(got, want)
    return want


@pytest.mark.parametrize("shapes", [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 1, 1), (2, 3, 4, 5)),
                                    ((2, 3, 4, 5), (2, 3, 1, 1)), ((2, 3, 4, 5), (1, 3, 1, 5))])
@pytest.mark.parametrize("case", ["random", "ties", "saturation"])
@pytest.mark.parametrize("op_type", ["Add", "Mul"])
def test_integer_add_and_mul_are_onnxruntimes_kernels(op_type, case, shapes, rng):
    """Both operands full tensors, either one broadcast from (N, C, 1, 1) (onnxruntime then hands it to the
    kernel as the scalar of each span), and a broadcast along an inner axis."""
    a_shape, b_shape = shapes
    nodes = [helper.make_node(op_type, ["a", "b"], ["y"])]
    session = _session(nodes, {}, [("a", ["N", *a_shape[1:]]), ("b", ["N", *b_shape[1:]])], "y", [None, 3, 4, 5])
    op = _kernel(session, "Integer" + op_type)
    sa, za, sb, zb, sc, zc = BINARY_CASES[op_type][case]
    a_q = rng.integers(0, 256, a_shape).astype(u8)
    b_q = rng.integers(0, 256, b_shape).astype(u8)
    want = _binary_against_onnxruntime(op, op_type, a_q, b_q, (sa, za, sb, zb, sc, zc))
    if case == "saturation":
        assert (want == 255).any() and (want == 0).any()
    if case == "ties":  # the exact value lies half-way between two levels for many elements
        a, b = a_q.astype(np.int64) - za, b_q.astype(np.int64) - zb
        exact = (a * sa + b * sb) / sc if op_type == "Add" else a * b * (sa * sb / sc)
        assert (exact - np.floor(exact) == 0.5).sum() > 10


# scales and zero points (float32 values) where float32 rounding changes some outputs (found by search): against
# exact arithmetic, against the other order of QLinearAdd's multiply-adds, against its inner multiply-add split
# into two roundings
EVERY_PAIR = {"Add": ("Add", (0.047402896, 115, 0.04263414, 180, 0.030136924, 137)),
              "Add, one rounding in the inner multiply-add": ("Add", (0.039186217, 64, 0.017026225, 63, 0.07315895,
                                                                      135)),
              "Mul": ("Mul", (0.031818263, 158, 0.027603963, 171, 0.4625769, 61))}


@pytest.mark.parametrize("case", list(EVERY_PAIR))
def test_integer_add_and_mul_on_every_pair_of_integers(case):
    """All 256 x 256 pairs of uint8 operands, a broadcast against b (onnxruntime hands the operand constant along
    the inner axis to the kernel as its scalar: the order of the fused multiply-adds then changes), scales whose
    ratios are not dyadic, so float32 rounding of the intermediate values decides some of the outputs."""
    op_type, (sa, za, sb, zb, sc, zc) = EVERY_PAIR[case]
    nodes = [helper.make_node(op_type, ["a", "b"], ["y"])]
    session = _session(nodes, {}, [("a", ["N", 1, 256, 1]), ("b", ["N", 1, 1, 256])], "y", [None, 1, 256, 256])
    op = _kernel(session, "Integer" + op_type)
    a_q = np.arange(256, dtype=u8).reshape(1, 1, 256, 1)
    b_q = np.arange(256, dtype=u8).reshape(1, 1, 1, 256)
    want = _binary_against_onnxruntime(op, op_type, a_q, b_q, (sa, za, sb, zb, sc, zc))
    # the control: the data reach outputs that other arithmetic rounds otherwise
    if case.startswith("Add, one rounding"):  # b (here the broadcast a) * R_b + F rounded, then a * R_a added
        ra, rb = f32(f32(sa) / f32(sc)), f32(f32(sb) / f32(sc))
        fixed = f32(np.float64(zc) - f32(np.float64(zb) * np.float64(rb) + np.float64(f32(ra * f32(za)))))
        inner = (a_q.astype(f32) * ra) + fixed  # two float32 roundings: a product, then a sum
        other = (b_q.astype(np.float64) * np.float64(rb) + inner.astype(np.float64)).astype(f32)
    else:  # exact arithmetic
        a, b = a_q.astype(np.float64) - za, b_q.astype(np.float64) - zb
        f = np.float64
        other = (a * f(f32(sa)) + b * f(f32(sb))) / f(f32(sc)) + zc if op_type == "Add" else \
            a * b * f(f32(sa)) * f(f32(sb)) / f(f32(sc)) + zc
    assert (np.clip(np.rint(other), 0, 255) != want).any()


# ---- IntegerGlobalAveragePool: QLinearGlobalAveragePool --------------------------------------------------------
@pytest.mark.parametrize("case", ["random", "ties", "saturation"])
def test_integer_global_average_pool_is_onnxruntimes_kernel(case, rng):
    x_shape = (2, 3, 2, 2) if case == "ties" else (2, 3, 5, 7)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["y"])]
    session = _session(nodes, {}, [("x", ["N", *x_shape[1:]])], "y", [None, 3, 1, 1])
    op = _kernel(session, "IntegerGlobalAveragePool")
    sx, zx, sy, zy = {"random": (0.031, 117, 0.013, 89), "ties": (0.5, 3, 0.5, 200),
                      "saturation": (0.1, 128, 0.0005, 128)}[case]
    x_q = rng.integers(0, 256, x_shape).astype(u8)
    if case == "saturation":
        x_q[0, 0], x_q[0, 1] = 255, 0
    env = {}
    _quantizer(env, _names(op.operands[0]), sx, zx)
    _quantizer(env, op.out, sy, zy)
    env[op.parts[0][1].input(0)] = _deq(x_q, sx, zx)
    got = _run(op, env)
    (want,) = run_node("QLinearGlobalAveragePool", [x_q, np.asarray(sx, f32), np.asarray(zx, u8),
                                                    np.asarray(sy, f32), np.asarray(zy, u8)], [u8],
                       {"channels_last": 0}, domain="com.microsoft")
    np.testing.assert_array_equal(got, want)
    if case == "ties":  # sum / 4 with the sum = 2 mod 4: half-way
        acc = (x_q.astype(np.int64) - zx).sum(axis=(2, 3))
        assert (acc % 4 == 2).any()
    if case == "saturation":
        assert want[0, 0] == 255 and want[0, 1] == 0


# ---- compare(): the agreement figure of the export ----------------------------------------------------------------
def test_compare_counts_top1_agreement_and_the_largest_difference_in_steps():
    sim = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]], f32)
    dep = np.array([[0.1, 0.8, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]], f32)
    a = compare(sim, dep, 0.1)
    assert a.images == 4
    assert a.agreement_top1 == 0.75  # row 1: argmax 0 vs 1
    assert a.max_abs_diff == pytest.approx(0.3, abs=1e-7)
    assert a.max_diff_steps == pytest.approx(3.0, abs=1e-6)
    assert compare(sim, dep, None).max_diff_steps is None
    same = compare(sim, sim.copy(), 0.1)
    assert (same.agreement_top1, same.max_abs_diff, same.max_diff_steps) == (1.0, 0.0, 0.0)
    flipped = compare(sim, -sim, 0.5)
    assert flipped.agreement_top1 == 0.0 and flipped.max_abs_diff == pytest.approx(2.0, abs=1e-7)


def test_compare_takes_one_row_per_input_whatever_the_rank():
    sim = np.zeros((3, 2, 2, 2), f32)
    dep = np.zeros((3, 2, 2, 2), f32)
    sim[0, 1, 1, 1] = 1.0  # row 0: argmax at the last element of 8
    dep[0, 0, 0, 1] = 1.0  # argmax at index 1: disagree
    sim[1, 0, 0, 0] = dep[1, 0, 0, 0] = 2.0  # row 1 agrees
    a = compare(sim, dep, 0.25)
    assert a.images == 3 and a.agreement_top1 == pytest.approx(2 / 3)
    assert a.max_abs_diff == 1.0 and a.max_diff_steps == 4.0
    uint = compare(np.array([[3, 250]], np.uint8), np.array([[255, 2]], np.uint8), 1.0)  # no wrap-around
    assert uint.max_abs_diff == 252.0 and uint.agreement_top1 == 0.0
