import numpy as np
import pytest

from opcheck import check_forward, check_grad, make, run_engine

from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py

OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
       "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"]
# opset where axes became an input
AXES_INPUT = {op: 13 if op == "ReduceSum" else 18 for op in OPS}
AXES = [None, [1], [0, 2], [-1], [2, 0, -3]]


def data(op, shape=(2, 3, 4)):
    x = rng.standard_normal(shape)
    if op == "ReduceLogSum":
        x = np.abs(x) + 0.1  # log of a positive sum
    if op == "ReduceProd":
        x = np.sign(x) * (np.abs(x) * 0.5 + 0.75)  # magnitudes near 1 keep the product tame
    return x.astype(np.float32)


def run_both_forms(op, x, axes, keepdims, grad=True, **extra):
    """Forward (and gradient) with axes as attribute (old opset) and as input (new opset)."""
    new = AXES_INPUT[op]
    attrs = {"keepdims": keepdims}
    old_attrs = dict(attrs, **({"axes": axes} if axes is not None else {}))
    check_forward(op, [x], old_attrs, opset=new - 1 if op == "ReduceSum" else 13)
    inputs = [x] if axes is None else [x, np.array(axes, np.int64)]
    new_attrs = dict(attrs, **extra)
    check_forward(op, inputs, new_attrs, opset=new, const=[1] if axes is not None else [])
    if grad:
        check_grad(op, [x], old_attrs, opset=new - 1 if op == "ReduceSum" else 13, max_checks=24)
        check_grad(op, inputs, new_attrs, opset=new, max_checks=24)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("keepdims", [1, 0])
def test_reduce(op, axes, keepdims):
    run_both_forms(op, data(op), axes, keepdims)


@pytest.mark.parametrize("op", OPS)
def test_reduce_latest_opset(op):
    x = data(op, (3, 5))
    check_forward(op, [x, np.array([1], np.int64)], {"keepdims": 0}, opset=20, const=[1])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("noop", [0, 1])
@pytest.mark.parametrize("empty_input", [True, False])
def test_reduce_empty_axes(op, noop, empty_input):
    """Empty or omitted axes reduce everything, or are an identity with noop_with_empty_axes=1."""
    x = data(op)
    inputs = [x, np.array([], np.int64)] if empty_input else [x]
    attrs = {"noop_with_empty_axes": noop}
    opset = AXES_INPUT[op]
    got = check_forward(op, inputs, attrs, opset=opset, const=[1] if empty_input else [])[0]
    assert got.shape == ((2, 3, 4) if noop else (1, 1, 1))
    check_grad(op, inputs, attrs, opset=opset, max_checks=24)


def test_reduce_sum_axes_forms_differ_by_opset():
    """ReduceSum reads axes from the attribute at opset 12 and from the input at 13; ReduceMean still from the
    attribute at 17."""
    x = data("ReduceSum")
    a = run_engine("ReduceSum", [x], {"axes": [1]}, opset=12)[0]
    b = run_engine("ReduceSum", [x, np.array([1], np.int64)], {}, opset=13)[0]
    np.testing.assert_allclose(a, b)
    assert a.shape == (2, 1, 4)
    c = run_engine("ReduceMean", [x], {"axes": [2]}, opset=17)[0]
    assert c.shape == (2, 3, 1)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_reduce_extremum_ties_share_gradient(op):
    x = np.array([[1.0, 3.0, 3.0], [2.0, -1.0, -1.0]], np.float32)
    o = make(op, [x], {"axes": [1]}, opset=13)
    o.forward(Context(), x)
    g = o.backward(np.ones((2, 1), np.float32))[0]
    expected = [[0, 0.5, 0.5], [1, 0, 0]] if op == "ReduceMax" else [[1, 0, 0], [0, 0.5, 0.5]]
    np.testing.assert_array_equal(g, expected)


@pytest.mark.parametrize("zeros", [0, 1, 2])
def test_reduce_prod_with_zeros(zeros):
    x = rng.uniform(0.5, 1.5, (3, 4))
    x[1, :zeros] = 0
    if zeros == 1:
        x[2, 3] = 0
    check_forward("ReduceProd", [x.astype(np.float32)], {"axes": [1]}, opset=13)
    check_grad("ReduceProd", [x], {"axes": [1]}, opset=13)


def test_reduce_logsumexp_large_values():
    x = np.array([[1000.0, 1000.0, 990.0], [-1000.0, -1001.0, -1002.0]], np.float32)
    check_forward("ReduceLogSumExp", [x], {"axes": [1]}, opset=13)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceMean", "ReduceSumSquare",
                                "ReduceL1"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_reduce_int(op, dtype):
    x = rng.integers(-9, 9, (3, 4)).astype(dtype)
    check_forward(op, [x], {"axes": [1]}, opset=12, atol=0, rtol=0)
    check_forward(op, [x], {"keepdims": 0}, opset=12, atol=0, rtol=0)


def test_reduce_l2_zero_slice_gradient():
    x = np.zeros((2, 3))
    x[1] = [1.0, -2.0, 0.5]
    check_forward("ReduceL2", [x.astype(np.float32)], {"axes": [1]}, opset=13)
    o = make("ReduceL2", [x], {"axes": [1]}, opset=13)
    o.forward(Context(), x)
    g = o.backward(np.ones((2, 1)))[0]
    assert np.all(np.isfinite(g)) and not g[0].any()


# ---- ArgMax / ArgMin ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("last", [0, 1])
def test_arg(op, axis, keepdims, last):
    x = rng.integers(-2, 3, (3, 4, 5)).astype(np.float32)  # many ties
    attrs = {"axis": axis, "keepdims": keepdims, "select_last_index": last}
    out = check_forward(op, [x], attrs, atol=0, rtol=0)[0]
    assert out.dtype == np.int64


def test_arg_defaults():
    x = rng.standard_normal((4, 3)).astype(np.float32)
    for op in ("ArgMax", "ArgMin"):
        out = check_forward(op, [x], atol=0, rtol=0)[0]
        assert out.shape == (1, 3)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_reduce_extremum_bool_opset20(op):
    x = np.array([[True, False, True], [False, False, False]])
    out = check_forward(op, [x, np.array([1], np.int64)], {"keepdims": 0}, opset=20, const=[1])[0]
    assert out.dtype == np.bool_
