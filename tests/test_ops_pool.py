import numpy as np
import pytest

from opcheck import check_forward, check_grad, make, run_ort
from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py


def _distinct(*shape):
    """Values with well separated entries (max pooling gradients have no kinks within ±eps)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.01 - n * 0.005).astype(np.float32)


def _r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# (x shape, attrs)
MAXPOOL_CASES = {
    "2x2_s2": ((2, 3, 8, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "2x2_s2_odd": ((2, 3, 7, 9), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "2x2_s2_odd_ceil": ((1, 2, 7, 9), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "3x3_s2_p1": ((2, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "3x3_s2_p1_ceil": ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                      "ceil_mode": 1}),
    "ceil_drop_last": ((1, 1, 5, 5), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                      "ceil_mode": 1}),
    "3x2_s1_asym": ((1, 2, 6, 7), {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}),
    "stride_1_3": ((1, 2, 6, 10), {"kernel_shape": [2, 3], "strides": [1, 3]}),
    "dilations": ((1, 2, 9, 8), {"kernel_shape": [2, 3], "dilations": [2, 2], "pads": [1, 1, 1, 0]}),
    "dilations_ceil": ((1, 2, 9, 8), {"kernel_shape": [2, 2], "dilations": [2, 1], "strides": [2, 2],
                                      "ceil_mode": 1}),
    "same_upper": ((1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower": ((1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "same_upper_even": ((1, 2, 6, 6), {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower_even": ((1, 2, 6, 6), {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}),
    "same_upper_dil": ((1, 2, 9, 8), {"kernel_shape": [2, 3], "strides": [2, 2], "dilations": [2, 2],
                                      "auto_pad": "SAME_UPPER"}),
    "same_lower_dil": ((1, 2, 7, 7), {"kernel_shape": [3, 3], "dilations": [2, 1], "auto_pad": "SAME_LOWER"}),
    "valid": ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    "pool1d": ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    "pool3d": ((1, 2, 5, 4, 5), {"kernel_shape": [2, 2, 3], "strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 1]}),
}


@pytest.mark.parametrize("name", list(MAXPOOL_CASES))
def test_maxpool_forward(name):
    xs, attrs = MAXPOOL_CASES[name]
    check_forward("MaxPool", [_r(*xs)], attrs)


@pytest.mark.parametrize("name", list(MAXPOOL_CASES))
@pytest.mark.parametrize("storage_order", [0, 1])
def test_maxpool_indices(name, storage_order):
    xs, attrs = MAXPOOL_CASES[name]
    attrs = dict(attrs, storage_order=storage_order)
    check_forward("MaxPool", [_r(*xs)], attrs, n_outputs=2)


def test_maxpool_indices_ties_first():
    """Ties (a constant block, and ReLU-like zeros) go to the first maximum in row-major window order."""
    x = np.zeros((1, 2, 6, 7), np.float32)
    x[0, 1, :3] = 1.0
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    check_forward("MaxPool", [x], attrs, n_outputs=2)
    check_forward("MaxPool", [np.maximum(_r(1, 2, 6, 7), 0)], attrs, n_outputs=2)


@pytest.mark.parametrize("opset", [11, 13, 22])
def test_maxpool_opsets(opset):
    xs, attrs = MAXPOOL_CASES["3x3_s2_p1_ceil"]
    check_forward("MaxPool", [_r(*xs)], attrs, n_outputs=2, opset=opset)


def test_maxpool_int8():
    x = rng.integers(-128, 127, size=(1, 2, 7, 7), dtype=np.int8)
    check_forward("MaxPool", [x], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})


@pytest.mark.parametrize("name", list(MAXPOOL_CASES))
def test_maxpool_grad(name):
    xs, attrs = MAXPOOL_CASES[name]
    check_grad("MaxPool", [_distinct(*xs)], attrs, max_checks=40)


def test_maxpool_grad_ties_first():
    """With tied maxima the whole gradient goes to the first one (as the Indices output points to)."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    op = make("MaxPool", [x], {"kernel_shape": [2, 2], "strides": [2, 2]})
    op.forward(Context(), x)
    dx = op.backward(np.ones((1, 1, 2, 2), np.float32))[0]
    expected = np.zeros((4, 4), np.float32)
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_indices_match_gradient():
    """The gradient lands exactly where onnxruntime's Indices point, overlapping windows accumulating."""
    x = _r(2, 3, 9, 8)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    _, ind = run_ort("MaxPool", [x], attrs, n_outputs=2)
    op = make("MaxPool", [x], attrs)
    y = op.forward(Context(), x)
    g = _r(*y.shape)
    dx = op.backward(g)[0]
    expected = np.zeros(x.size, np.float32)
    np.add.at(expected, ind.reshape(-1), g.reshape(-1))
    np.testing.assert_allclose(dx.reshape(-1), expected, rtol=1e-6, atol=1e-6)


AVGPOOL_CASES = {
    "2x2_s2": ((2, 3, 8, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "3x3_s2_p1": ((2, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "3x3_s2_p1_incl": ((2, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                      "count_include_pad": 1}),
    "asym_pads": ((1, 2, 6, 7), {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}),
    "asym_pads_incl": ((1, 2, 6, 7), {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "count_include_pad": 1}),
    "ceil": ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    "ceil_pads": ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1],
                                 "ceil_mode": 1}),
    "ceil_pads_incl": ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1],
                                      "ceil_mode": 1, "count_include_pad": 1}),
    "ceil_drop_last_incl": ((1, 1, 5, 5), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                           "ceil_mode": 1, "count_include_pad": 1}),
    "same_upper": ((1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower": ((1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "same_upper_incl": ((1, 2, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER",
                                       "count_include_pad": 1}),
    "valid": ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    "pool1d": ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "count_include_pad": 1}),
    "pool3d": ((1, 2, 5, 4, 5), {"kernel_shape": [2, 2, 3], "strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 1]}),
}

AVGPOOL_DILATION_CASES = {
    "dilations": ((1, 2, 9, 8), {"kernel_shape": [2, 3], "dilations": [2, 2], "pads": [1, 1, 1, 0]}),
    "dilations_incl": ((1, 2, 9, 8), {"kernel_shape": [2, 3], "dilations": [2, 2], "pads": [1, 1, 1, 0],
                                      "count_include_pad": 1}),
    "dilations_ceil": ((1, 2, 9, 8), {"kernel_shape": [2, 2], "dilations": [2, 1], "strides": [2, 2],
                                      "ceil_mode": 1}),
    "dilations_ceil_incl": ((1, 2, 9, 8), {"kernel_shape": [2, 2], "dilations": [2, 1], "strides": [2, 2],
                                           "pads": [1, 0, 1, 1], "ceil_mode": 1, "count_include_pad": 1}),
    # onnxruntime sizes SAME padding with the undilated kernel (smaller output than the spec's formula)
    "same_upper_dil": ((1, 2, 9, 8), {"kernel_shape": [2, 3], "strides": [2, 2], "dilations": [2, 2],
                                      "auto_pad": "SAME_UPPER"}),
    "same_lower_dil_incl": ((1, 2, 7, 7), {"kernel_shape": [3, 3], "dilations": [2, 1], "auto_pad": "SAME_LOWER",
                                           "count_include_pad": 1}),
}


@pytest.mark.parametrize("name", list(AVGPOOL_CASES))
def test_avgpool_forward(name):
    xs, attrs = AVGPOOL_CASES[name]
    check_forward("AveragePool", [_r(*xs)], attrs)


@pytest.mark.parametrize("name", list(AVGPOOL_DILATION_CASES))
def test_avgpool_dilations_opset19(name):
    xs, attrs = AVGPOOL_DILATION_CASES[name]
    check_forward("AveragePool", [_r(*xs)], attrs, opset=19)


@pytest.mark.parametrize("opset", [11, 13, 19, 22])
def test_avgpool_opsets(opset):
    xs, attrs = AVGPOOL_CASES["ceil_pads_incl"]
    check_forward("AveragePool", [_r(*xs)], attrs, opset=opset)


@pytest.mark.parametrize("name", list(AVGPOOL_CASES) + list(AVGPOOL_DILATION_CASES))
def test_avgpool_grad(name):
    xs, attrs = {**AVGPOOL_CASES, **AVGPOOL_DILATION_CASES}[name]
    check_grad("AveragePool", [_r(*xs)], attrs, max_checks=40, opset=19)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 7), (1, 2, 3, 4, 2), (2, 3, 1, 1)])
def test_global_pools(shape):
    x = _distinct(*shape)
    for op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        check_forward(op_type, [x])
        check_grad(op_type, [x], max_checks=40)


def test_global_maxpool_ties_first():
    x = np.zeros((1, 1, 2, 2), np.float32)
    op = make("GlobalMaxPool", [x])
    op.forward(Context(), x)
    dx = op.backward(np.ones((1, 1, 1, 1), np.float32))[0]
    np.testing.assert_array_equal(dx.reshape(-1), [1, 0, 0, 0])


LRN_CASES = {
    "size3": ((2, 5, 4, 3), {"size": 3}),
    "size5_default": ((2, 7, 3, 2), {"size": 5}),
    "size1": ((1, 3, 2, 2), {"size": 1, "alpha": 0.5}),
    "size_gt_channels": ((1, 3, 4, 4), {"size": 7, "alpha": 0.3, "beta": 0.9, "bias": 0.5}),
}
# forms onnxruntime refuses (even size, rank other than 4): checked against onnx's reference implementation
LRN_SPEC_ONLY = {
    "size4_even": ((1, 6, 3, 3), {"size": 4, "alpha": 0.01, "beta": 0.5, "bias": 2.0}),
    "rank3": ((2, 6, 5), {"size": 3, "alpha": 0.2}),
}


@pytest.mark.parametrize("name", list(LRN_CASES))
def test_lrn_forward(name):
    xs, attrs = LRN_CASES[name]
    check_forward("LRN", [_r(*xs) * 3], attrs)


@pytest.mark.parametrize("name", list(LRN_SPEC_ONLY))
def test_lrn_forward_spec(name):
    """Against the spec's formula written out channel by channel (onnx.reference's LRN loops over the batch
    axis instead of the channels, so it cannot serve)."""
    from opcheck import run_engine

    xs, attrs = LRN_SPEC_ONLY[name]
    x = (_r(*xs) * 3).astype(np.float64)
    size, alpha, beta, bias = attrs["size"], attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    c = x.shape[1]
    sq = np.zeros_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c - 1, ch + -(-(size - 1) // 2))
        sq[:, ch] = (x[:, lo:hi + 1] ** 2).sum(axis=1)
    expected = x / (bias + alpha / size * sq) ** beta
    np.testing.assert_allclose(run_engine("LRN", [x], attrs)[0], expected, rtol=1e-12)


@pytest.mark.parametrize("name", list(LRN_CASES) + list(LRN_SPEC_ONLY))
def test_lrn_grad(name):
    xs, attrs = {**LRN_CASES, **LRN_SPEC_ONLY}[name]
    check_grad("LRN", [_r(*xs) * 3], attrs, max_checks=40)


def test_pool_dtype_float32():
    x = _r(2, 3, 7, 7)
    for op_type, attrs in [("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
                           ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
                           ("GlobalAveragePool", {}), ("GlobalMaxPool", {}), ("LRN", {"size": 3})]:
        op = make(op_type, [x], attrs)
        y = op.forward(Context(), x)
        assert y.dtype == np.float32, op_type
        assert op.backward(np.ones_like(y))[0].dtype == np.float32, op_type
