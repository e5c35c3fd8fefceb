import math

import numpy as np
import pytest

from opcheck import check_forward, check_grad, make, run_engine

from qatool.ops import Context
from qatool.ops.activations import erf

rng = None  # the test's own seeded generator, set for each test by conftest.py


def away(shape, lo=0.05, scale=2.0, points=(0.0,)):
    """Random float32 values at least `lo` away from every kink in `points` (gradient checks avoid kinks)."""
    x = rng.standard_normal(shape) * scale
    for p in points:
        d = x - p
        x = np.where(np.abs(d) < lo, p + np.sign(d + 1e-12) * (lo + np.abs(d)), x)
    return x.astype(np.float32)


# ---- Relu family -------------------------------------------------------------------------------------------------
def test_relu():
    x = away((2, 3, 5))
    check_forward("Relu", [x])
    check_grad("Relu", [x])


def test_relu_int():
    x = rng.integers(-5, 5, (3, 4)).astype(np.int32)
    check_forward("Relu", [x], opset=14)


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.2}, {"alpha": 1.5}])
def test_leaky_relu(attrs):
    x = away((2, 3, 5))
    check_forward("LeakyRelu", [x], attrs)
    check_grad("LeakyRelu", [x], attrs)


@pytest.mark.parametrize("xs,ss", [((2, 3, 4, 5), (3, 1, 1)), ((2, 3, 4, 5), (1,)), ((2, 3, 4), (4,)),
                                   ((2, 3, 4), (2, 3, 4)), ((3, 4), ())])
def test_prelu(xs, ss):
    x = away(xs)
    slope = np.asarray(rng.uniform(0.05, 0.5, ss), dtype=np.float32)
    check_forward("PRelu", [x, slope])
    check_forward("PRelu", [x, slope], const=[1])
    check_grad("PRelu", [x, slope])


# ---- Clip --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [{"min": 0.0, "max": 6.0}, {"min": -0.5}, {"max": 0.7}, {}])
def test_clip_opset6_attributes(attrs):
    x = away((2, 3, 5), points=(-0.5, 0.0, 0.7, 6.0), scale=4.0)
    check_forward("Clip", [x], attrs, opset=6)
    check_grad("Clip", [x], attrs, opset=6)


F32 = np.float32


@pytest.mark.parametrize("opset", [13, 11])
@pytest.mark.parametrize("lo,hi", [(F32(0), F32(6)), (F32(-0.5), None), (None, F32(0.7)), (None, None),
                                   (F32(1.0), F32(-1.0))])
def test_clip_inputs(opset, lo, hi):
    x = away((2, 3, 5), points=(-1.0, -0.5, 0.0, 0.7, 1.0, 6.0), scale=4.0)
    inputs = [x, lo, hi]
    while inputs[-1] is None:
        inputs.pop()
    const = [i for i in (1, 2) if i < len(inputs) and inputs[i] is not None]
    check_forward("Clip", inputs, opset=opset, const=const)
    if lo is None or hi is None or lo < hi:
        check_grad("Clip", inputs, opset=opset, wrt=[0])


def test_clip_int64():
    x = rng.integers(-10, 10, (4, 5)).astype(np.int64)
    check_forward("Clip", [x, np.array(-3, np.int64), np.array(4, np.int64)], opset=13, const=[1, 2])
    check_forward("Clip", [x, np.array(-3, np.int64)], opset=13, const=[1])


def test_clip_backward_zero_at_bounds():
    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0], np.float32)
    op = make("Clip", [x, F32(0), F32(6)], opset=13)
    op.forward(Context(), x, F32(0), F32(6))
    g = op.backward(np.ones(5, np.float32))[0]
    np.testing.assert_array_equal(g, [0, 0, 1, 0, 0])
    assert g.dtype == np.float32


@pytest.mark.parametrize("op_type,bounds", [("Relu", []), ("Clip", [0.0, 6.0]), ("Clip", [None, 1.0])])
def test_relu_clip_keep_a_bit_per_value(op_type, bounds):
    """The gradient mask is all Relu/Clip keep for backward, packed a bit per value (a byte-per-value bool or the
    float output would be 8 or 32 times as much)."""
    x = (rng.standard_normal((2, 3, 37)) * 4).astype(np.float32)  # 222 values: the last byte is partly padding
    ins = [x] + [None if b is None else F32(b) for b in bounds]
    op = make(op_type, ins, opset=13)
    y = op.forward(Context(training=True), *ins)
    assert [k for k, v in vars(op).items() if isinstance(v, np.ndarray)] == []
    assert op.mask.bits.nbytes == -(-x.size // 8)
    g = rng.standard_normal(x.shape).astype(np.float32)
    lo, hi = (bounds + [None, None])[:2] if bounds else (0.0, None)
    inside = np.ones(x.shape, bool)
    if lo is not None:
        inside &= y > lo
    if hi is not None:
        inside &= y < hi
    np.testing.assert_array_equal(op.backward(g)[0], g * inside)


@pytest.mark.parametrize("op_type,attrs,kept", [("LeakyRelu", {"alpha": 0.1}, []), ("HardSigmoid", {}, []),
                                                ("HardSwish", {}, ["x"]), ("Elu", {}, ["e"]), ("Selu", {}, ["e"])])
def test_activations_keep_one_array_at_most(op_type, attrs, kept):
    """What backward needs and no more: a sign or range mask packed a bit per value (not the input or the
    output), HardSwish its input only (h is recomputed), Elu/Selu the exponential term and a sign bit."""
    x = (rng.standard_normal((2, 3, 11)) * 4).astype(np.float32)
    op = make(op_type, [x], attrs)
    y = op.forward(Context(training=True), x)
    assert [k for k, v in vars(op).items() if isinstance(v, np.ndarray)] == kept
    dx = op.backward(rng.standard_normal(x.shape).astype(np.float32))[0]
    assert dx.shape == x.shape and dx.dtype == y.dtype == np.float32  # values: the check_grad tests above/below


# ---- smooth activations ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Softplus", "Erf"])
def test_smooth(op):
    x = (rng.standard_normal((3, 4, 5)) * 3).astype(np.float32)
    check_forward(op, [x])
    check_grad(op, [x])


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Softplus", "Erf", "Elu", "Selu"])
def test_smooth_extremes(op):
    x = np.array([-100, -30, -10, -1e-3, 0, 1e-3, 10, 30, 100], np.float32)
    got = check_forward(op, [x], rtol=1e-6, atol=1e-7)[0]
    assert np.isfinite(got).all()


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.1, "beta": 0.6}])
def test_hard_sigmoid(attrs):
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    x = away((3, 4, 5), points=(-beta / alpha, (1 - beta) / alpha), scale=4.0)
    check_forward("HardSigmoid", [x], attrs)
    check_grad("HardSigmoid", [x], attrs)


def test_hard_swish():
    x = away((3, 4, 5), points=(-3.0, 3.0), scale=3.0)
    check_forward("HardSwish", [x], opset=14)
    check_grad("HardSwish", [x], opset=14)


@pytest.mark.parametrize("op,attrs", [("Elu", {}), ("Elu", {"alpha": 0.5}), ("Selu", {}),
                                      ("Selu", {"alpha": 1.5, "gamma": 2.0})])
def test_elu_selu(op, attrs):
    x = away((3, 4, 5))
    check_forward(op, [x], attrs)
    check_grad(op, [x], attrs)


# ---- erf / gelu --------------------------------------------------------------------------------------------------
def test_erf_accuracy():
    x = np.linspace(-7, 7, 20001)
    ref = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x) - ref).max() < 1e-15
    x32 = x.astype(np.float32)
    ref32 = np.array([math.erf(v) for v in x32.astype(np.float64)])
    e32 = erf(x32)
    assert e32.dtype == np.float32
    assert np.abs(e32 - ref32).max() < 5e-7
    special = erf(np.array([np.inf, -np.inf, np.nan, 0.0]))
    np.testing.assert_array_equal(special[[0, 1, 3]], [1, -1, 0])
    assert np.isnan(special[2])


@pytest.mark.parametrize("attrs", [{}, {"approximate": "none"}, {"approximate": "tanh"}])
def test_gelu(attrs):
    x = (rng.standard_normal((3, 4, 5)) * 2).astype(np.float32)
    check_forward("Gelu", [x], attrs, opset=20)
    check_grad("Gelu", [x], attrs, opset=20)


def test_erf_gelu_blocks(monkeypatch):
    """Erf/Gelu work in cache-sized blocks: small blocks with a remainder give the same results."""
    import qatool.ops.activations as act

    monkeypatch.setattr(act, "_CHUNK", 7)
    x = (rng.standard_normal((3, 4, 5)) * 2).astype(np.float32)
    check_forward("Erf", [x])
    for attrs in ({}, {"approximate": "tanh"}):
        check_forward("Gelu", [x], attrs, opset=20)
        check_grad("Gelu", [x], attrs, opset=20)


# ---- softmax -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset,attrs", [(13, {}), (13, {"axis": 1}), (13, {"axis": 0}), (13, {"axis": -2}),
                                         (11, {}), (11, {"axis": 0}), (11, {"axis": 2}), (11, {"axis": -1})])
def test_softmax(op, opset, attrs):
    x = (rng.standard_normal((2, 3, 4, 5)) * 3).astype(np.float32)
    check_forward(op, [x], attrs, opset=opset)
    check_grad(op, [x], attrs, opset=opset, max_checks=30)


def test_softmax_opsets_differ():
    """Opset 11 normalises over everything after axis 1; opset 13 over axis 1 only: the forms must differ."""
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    a = run_engine("Softmax", [x], {"axis": 1}, opset=11)[0]
    b = run_engine("Softmax", [x], {"axis": 1}, opset=13)[0]
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 1, rtol=1e-5)
    np.testing.assert_allclose(b.sum(axis=1), 1, rtol=1e-5)
    assert not np.allclose(a, b)


def test_softmax_large_values():
    x = np.array([[1000, 1001, 999], [-1000, -1000, -1000]], np.float32)
    check_forward("Softmax", [x], opset=13)
    check_forward("LogSoftmax", [x], opset=13)


# ---- dtype -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,attrs,opset", [("LeakyRelu", {"alpha": 0.1}, 17), ("HardSigmoid", {}, 17),
                                            ("HardSwish", {}, 17), ("Elu", {}, 17), ("Selu", {}, 17),
                                            ("Gelu", {}, 20), ("Gelu", {"approximate": "tanh"}, 20),
                                            ("Sigmoid", {}, 17), ("Softplus", {}, 17), ("Erf", {}, 17),
                                            ("Softmax", {}, 17), ("LogSoftmax", {}, 11)])
def test_float32_stays_float32(op, attrs, opset):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    o = make(op, [x], attrs, opset=opset)
    y = o.forward(Context(), x)
    assert y.dtype == np.float32
    assert o.backward(np.ones_like(y))[0].dtype == np.float32
