import numpy as np
import pytest

from opcheck import check_forward, check_grad, make
from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py


def _r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# (x shape, w shape, with bias, attrs)
CONV_CASES = {
    "basic_pads_stride": ((2, 3, 7, 6), (4, 3, 3, 3), True, {"pads": [1, 1, 1, 1]}),
    "nonsquare_asym_pads": ((2, 3, 7, 6), (4, 3, 3, 2), True, {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    "stride2_odd": ((1, 2, 9, 7), (3, 2, 3, 3), True, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "stride2_odd_nopad": ((1, 2, 9, 7), (3, 2, 2, 3), False, {"strides": [2, 2]}),
    "dilations": ((1, 2, 9, 8), (3, 2, 3, 2), True, {"dilations": [2, 3], "pads": [2, 1, 0, 2]}),
    "dilation_stride": ((2, 2, 10, 9), (2, 2, 3, 3), True, {"dilations": [2, 2], "strides": [2, 3]}),
    "same_upper": ((1, 2, 7, 6), (3, 2, 4, 3), True, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "same_lower": ((1, 2, 7, 6), (3, 2, 4, 3), True, {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "same_upper_s1": ((1, 2, 5, 6), (3, 2, 2, 3), True, {"auto_pad": "SAME_UPPER"}),
    "same_lower_s1": ((1, 2, 5, 6), (3, 2, 2, 3), True, {"auto_pad": "SAME_LOWER"}),
    "same_kernel_lt_stride": ((1, 2, 9, 8), (3, 2, 1, 2), True, {"auto_pad": "SAME_UPPER", "strides": [5, 3]}),
    "valid": ((1, 2, 7, 6), (3, 2, 3, 2), True, {"auto_pad": "VALID", "strides": [2, 1]}),
    "kernel_shape_attr": ((1, 2, 6, 6), (3, 2, 3, 3), True, {"kernel_shape": [3, 3], "pads": [0, 1, 0, 1]}),
    "group2": ((2, 4, 6, 5), (6, 2, 3, 3), True, {"group": 2, "pads": [1, 1, 1, 1]}),
    "group2_stride": ((1, 4, 7, 6), (4, 2, 3, 2), False, {"group": 2, "strides": [2, 2], "pads": [0, 1, 1, 0]}),
    "depthwise": ((2, 4, 6, 5), (4, 1, 3, 3), True, {"group": 4, "pads": [1, 1, 1, 1]}),
    "depthwise_stride2": ((2, 3, 7, 8), (3, 1, 3, 3), True, {"group": 3, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "depthwise_mult2": ((1, 3, 6, 5), (6, 1, 3, 2), True, {"group": 3, "pads": [1, 0, 1, 1]}),
    "depthwise_asym": ((2, 3, 7, 6), (3, 1, 3, 2), True, {"group": 3, "pads": [0, 1, 2, 0]}),
    "depthwise_same_s2": ((1, 3, 9, 7), (3, 1, 3, 3), True, {"group": 3, "auto_pad": "SAME_UPPER",
                                                             "strides": [2, 2]}),
    "depthwise_dil_s21": ((1, 2, 9, 8), (2, 1, 2, 3), False, {"group": 2, "dilations": [2, 2],
                                                              "strides": [2, 1], "pads": [1, 1, 0, 2]}),
    "depthwise_s3_odd": ((1, 2, 10, 11), (2, 1, 3, 3), True, {"group": 2, "strides": [3, 2], "pads": [1, 1, 1, 1]}),
    # output rows cut into several column blocks by the banded GEMMs (the last one narrower)
    "depthwise_wide": ((1, 3, 4, 70), (3, 1, 3, 3), True, {"group": 3, "pads": [1, 1, 1, 1]}),
    "depthwise_wide_s2": ((1, 2, 5, 71), (2, 1, 3, 3), True, {"group": 2, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "depthwise_dil_nobias": ((1, 3, 8, 7), (3, 1, 3, 3), False, {"group": 3, "dilations": [2, 1],
                                                               "pads": [2, 1, 2, 1]}),
    # stride 1: dX is computed as a conv of dY with the flipped kernel, unless a pad is wider than the kernel
    "depthwise_pad_beyond_kernel": ((1, 2, 5, 6), (2, 1, 3, 3), True, {"group": 2, "pads": [3, 1, 2, 3]}),
    "wide_rows": ((1, 2, 4, 23), (3, 2, 3, 3), True, {"pads": [1, 1, 0, 1]}),
    # dense stride 1: dX is a conv of dY with the flipped, transposed kernel; pads wider than the kernel crop dY
    "pad_beyond_kernel": ((1, 2, 5, 6), (3, 2, 3, 3), True, {"pads": [3, 1, 2, 4]}),
    # (where M * input pixels <= C * output pixels; otherwise the dcol path, as most cases above)
    "group3_dilated_s1": ((2, 6, 7, 8), (6, 2, 2, 3), False, {"group": 3, "dilations": [2, 1], "pads": [1, 2, 1, 1]}),
    "per_image_group1_s1_asym": ((1, 3, 18, 17), (3, 3, 3, 2), True, {"pads": [1, 1, 1, 0]}),
    # output of >= 256 pixels, group 1: one GEMM per image (the other cases use one GEMM per group)
    "per_image": ((2, 2, 17, 16), (3, 2, 3, 3), True, {"pads": [1, 1, 1, 1]}),
    "per_image_nobias_dil": ((1, 2, 20, 19), (2, 2, 2, 3), False, {"dilations": [1, 2], "pads": [0, 1, 1, 0]}),
    "per_image_1d": ((2, 2, 300), (2, 2, 5), True, {"pads": [2, 2]}),
    "per_image_wide": ((1, 2, 6, 50), (2, 2, 3, 3), True, {"pads": [1, 0, 1, 1]}),
    "no_bias": ((2, 3, 5, 5), (2, 3, 3, 3), False, {}),
    "pointwise": ((2, 5, 4, 3), (3, 5, 1, 1), True, {}),
    "pointwise_group": ((2, 4, 4, 3), (6, 2, 1, 1), True, {"group": 2}),
    "pointwise_nobias": ((2, 5, 3, 3), (4, 5, 1, 1), False, {}),
    "pointwise_big_weight": ((2, 12, 2, 2), (16, 12, 1, 1), True, {}),  # dW by one GEMM over (n, pixels)
    "pointwise_big_weight_group": ((2, 12, 1, 2), (16, 6, 1, 1), True, {"group": 2}),
    "pointwise_stride2": ((1, 3, 5, 7), (4, 3, 1, 1), True, {"strides": [2, 2]}),
    "pointwise_pad": ((1, 3, 3, 4), (2, 3, 1, 1), True, {"pads": [1, 0, 0, 1]}),
    "conv1d": ((2, 3, 11), (4, 3, 3), True, {"strides": [2], "pads": [1, 2]}),
    "conv1d_same_group": ((2, 4, 10), (4, 2, 4), False, {"auto_pad": "SAME_LOWER", "group": 2}),
    "conv1d_dil": ((1, 2, 12), (3, 2, 3), True, {"dilations": [3], "pads": [0, 2]}),
    "conv1d_s1_pad_beyond": ((2, 3, 9), (2, 3, 2), True, {"pads": [2, 3]}),
    "conv1d_depthwise": ((2, 3, 13), (3, 1, 3), True, {"group": 3, "strides": [2], "pads": [1, 1]}),
    "conv3d": ((1, 2, 5, 4, 6), (3, 2, 2, 3, 2), True, {"pads": [1, 0, 1, 0, 1, 1], "strides": [1, 2, 2]}),
    "conv3d_depthwise": ((1, 2, 4, 5, 4), (2, 1, 3, 3, 3), True, {"group": 2, "pads": [1, 1, 1, 1, 1, 1]}),
}


def _conv_inputs(xs, ws, bias, n_out=None):
    x, w = _r(*xs), _r(*ws)
    return [x, w, _r(n_out or ws[0])] if bias else [x, w]


def _convt_inputs(xs, ws, bias, attrs):
    return _conv_inputs(xs, ws, bias, ws[1] * attrs.get("group", 1))


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_forward(name):
    xs, ws, bias, attrs = CONV_CASES[name]
    check_forward("Conv", _conv_inputs(xs, ws, bias), attrs)


@pytest.mark.parametrize("opset", [11, 22])
def test_conv_forward_opsets(opset):
    xs, ws, bias, attrs = CONV_CASES["nonsquare_asym_pads"]
    check_forward("Conv", _conv_inputs(xs, ws, bias), attrs, opset=opset)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_grad(name):
    xs, ws, bias, attrs = CONV_CASES[name]
    check_grad("Conv", _conv_inputs(xs, ws, bias), attrs, max_checks=25)


@pytest.mark.parametrize("name", ["basic_pads_stride", "depthwise", "depthwise_wide", "pointwise", "conv1d",
                                  "per_image"])
def test_conv_skips_input_grad(name):
    """needs_grad[0] False (the image of a first layer): no dx, and dw/db are unchanged."""
    xs, ws, bias, attrs = CONV_CASES[name]
    inputs = _conv_inputs(xs, ws, bias)
    gy = None
    grads = []
    for needs in ([True] * len(inputs), [False] + [True] * (len(inputs) - 1)):
        op = make("Conv", inputs, attrs)
        op.needs_grad = needs
        y = op.forward(Context(), *inputs)
        gy = _r(*y.shape) if gy is None else gy
        grads.append(op.backward(gy))
    assert grads[1][0] is None and grads[0][0] is not None
    for a, b in zip(grads[0][1:], grads[1][1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["basic_pads_stride", "depthwise", "depthwise_wide", "group2", "per_image",
                                  "pointwise"])
def test_conv_training_mode_same_grads(name):
    """Training keeps the im2col matrix from forward, eval rebuilds it in backward: same gradients."""
    xs, ws, bias, attrs = CONV_CASES[name]
    inputs = _conv_inputs(xs, ws, bias)
    grads, gy = [], None
    for training in (True, False):
        op = make("Conv", inputs, attrs)
        y = op.forward(Context(training=training), *inputs)
        gy = _r(*y.shape) if gy is None else gy
        grads.append(op.backward(gy))
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,kept", [("stride2_odd_nopad", "col"), ("depthwise", "xb"),
                                       ("depthwise_stride2", "xb")])
def test_conv_training_keeps_its_input_once(name, kept):
    """What dW needs is kept once: the im2col matrix (dense, where it is small) or the banded path's padded
    input, and then not the input as well; a conv whose weight needs no gradient keeps neither."""
    xs, ws, bias, attrs = CONV_CASES[name]
    inputs = _conv_inputs(xs, ws, bias)
    full = make("Conv", inputs, attrs)
    y = full.forward(Context(training=True), *inputs)
    assert (full.col if kept == "col" else full.banded.xb) is not None
    assert full.x is None
    gy = _r(*y.shape)
    grads = full.backward(gy)
    frozen = make("Conv", inputs, attrs)
    frozen.needs_grad = [True, False, True]
    frozen.forward(Context(training=True), *inputs)
    assert frozen.x is None and getattr(frozen, "col", None) is None
    assert frozen.banded is None or frozen.banded.xb is None
    dx, dw, db = frozen.backward(gy)
    assert dw is None
    np.testing.assert_array_equal(dx, grads[0])
    np.testing.assert_array_equal(db, grads[2])


@pytest.mark.parametrize("name", ["basic_pads_stride", "depthwise", "depthwise_wide", "pointwise", "per_image",
                                  "conv3d_depthwise"])
def test_conv_dtype_float32(name):
    xs, ws, bias, attrs = CONV_CASES[name]
    inputs = _conv_inputs(xs, ws, bias)
    op = make("Conv", inputs, attrs)
    y = op.forward(Context(training=True), *inputs)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in op.backward(_r(*y.shape)))


# (x shape, w shape, with bias, attrs)
CONVT_CASES = {
    "basic": ((2, 3, 4, 5), (3, 2, 3, 3), True, {}),
    "stride_pads": ((2, 3, 4, 5), (3, 2, 3, 2), True, {"strides": [2, 2], "pads": [1, 0, 0, 1]}),
    "output_padding": ((1, 3, 4, 3), (3, 2, 3, 3), True, {"strides": [2, 3], "pads": [1, 1, 1, 1],
                                                          "output_padding": [1, 2]}),
    "dilations": ((1, 2, 4, 5), (2, 3, 2, 3), True, {"dilations": [2, 2], "strides": [1, 2]}),
    "group2": ((1, 4, 4, 5), (4, 2, 3, 2), True, {"group": 2, "strides": [2, 1]}),
    "depthwise": ((2, 3, 4, 4), (3, 1, 3, 3), False, {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "no_bias": ((1, 2, 3, 3), (2, 3, 2, 2), False, {"strides": [2, 2]}),
    "output_shape": ((1, 2, 4, 5), (2, 3, 3, 3), True, {"strides": [2, 2], "output_shape": [8, 10]}),
    "output_shape_odd": ((1, 2, 4, 5), (2, 3, 3, 3), True, {"strides": [2, 2], "output_shape": [7, 9]}),
    "output_shape_padding": ((1, 2, 4, 5), (2, 3, 3, 3), True, {"strides": [2, 2], "output_shape": [9, 11],
                                                                "output_padding": [1, 1]}),
    "output_shape_same_upper": ((1, 2, 4, 5), (2, 3, 3, 3), True, {"strides": [2, 2], "output_shape": [7, 9],
                                                                   "auto_pad": "SAME_UPPER"}),
    "output_shape_larger": ((1, 2, 4, 5), (2, 3, 3, 3), True, {"strides": [2, 2], "output_shape": [10, 12]}),
    "output_shape_same_lower": ((1, 2, 4, 5), (2, 3, 3, 3), True, {"strides": [2, 2], "output_shape": [8, 10],
                                                                   "auto_pad": "SAME_LOWER"}),
    "same_upper": ((1, 2, 4, 5), (2, 3, 3, 4), True, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower": ((1, 2, 4, 5), (2, 3, 3, 4), True, {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "valid": ((1, 2, 4, 5), (2, 3, 3, 2), True, {"strides": [2, 1], "auto_pad": "VALID"}),
    "pointwise": ((2, 3, 4, 5), (3, 4, 1, 1), True, {}),
    "convt1d": ((2, 3, 5), (3, 2, 3), True, {"strides": [2], "pads": [1, 0], "output_padding": [1]}),
    "convt3d": ((1, 2, 3, 2, 3), (2, 2, 2, 3, 2), True, {"strides": [2, 1, 2], "pads": [0, 1, 0, 0, 1, 1]}),
}


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_convtranspose_forward(name):
    xs, ws, bias, attrs = CONVT_CASES[name]
    check_forward("ConvTranspose", _convt_inputs(xs, ws, bias, attrs), attrs)


@pytest.mark.parametrize("opset", [11, 22])
def test_convtranspose_forward_opsets(opset):
    xs, ws, bias, attrs = CONVT_CASES["output_padding"]
    check_forward("ConvTranspose", _convt_inputs(xs, ws, bias, attrs), attrs, opset=opset)


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_convtranspose_grad(name):
    xs, ws, bias, attrs = CONVT_CASES[name]
    check_grad("ConvTranspose", _convt_inputs(xs, ws, bias, attrs), attrs, max_checks=25)


@pytest.mark.parametrize("op_type,ws,attrs", [
    ("Conv", (4, 3, 3, 3), {"kernel_shape": [3, 2]}),
    ("Conv", (4, 2, 3, 3), {"group": 2}),  # 3 input channels not divisible by 2
    ("Conv", (4, 3, 7, 7), {}),  # kernel larger than the input
    ("ConvTranspose", (3, 2, 3, 3), {"kernel_shape": [2, 2]}),
])
def test_conv_errors(op_type, ws, attrs):
    from qatool.errors import ModelError

    x, w = _r(1, 3, 5, 5), _r(*ws)
    with pytest.raises(ModelError):
        make(op_type, [x, w], attrs).forward(Context(), x, w)


def test_convtranspose_float32_and_skipped_grads():
    xs, ws, bias, attrs = CONVT_CASES["output_padding"]
    inputs = _convt_inputs(xs, ws, bias, attrs)
    full = make("ConvTranspose", inputs, attrs)
    y = full.forward(Context(training=True), *inputs)
    gy = _r(*y.shape)
    grads = full.backward(gy)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    part = make("ConvTranspose", inputs, attrs)
    part.needs_grad = [False, True, False]
    part.forward(Context(training=True), *inputs)
    dx, dw, db = part.backward(gy)
    assert dx is None and db is None
    np.testing.assert_array_equal(dw, grads[1])
