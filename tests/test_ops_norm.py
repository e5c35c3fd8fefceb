import numpy as np
import pytest

from opcheck import check_forward, check_grad, make, run_engine, run_ort
from qatool.errors import ModelError
from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py


def _f32(*shape):
    return np.asarray(rng.standard_normal(shape), dtype=np.float32)


def _bn_inputs(shape, param_shape=None, shift=0.0):
    c = shape[1]
    ps = param_shape or (c,)
    x = _f32(*shape) * np.float32(1.5) + np.float32(shift)
    scale = _f32(*ps)
    bias = _f32(*ps)
    mean = _f32(*ps)
    var = rng.uniform(0.5, 1.5, ps).astype(np.float32)
    return [x, scale, bias, mean, var]


BN_SHAPES = [(3, 4), (2, 3, 5), (2, 3, 4, 5), (2, 2, 3, 2, 3)]


# ---- BatchNormalization, eval mode --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("opset", [9, 15])
def test_bn_eval_forward(shape, opset):
    inputs = _bn_inputs(shape)
    check_forward("BatchNormalization", inputs, {"epsilon": 1e-3}, opset=opset)
    check_forward("BatchNormalization", inputs, {}, opset=opset)


@pytest.mark.parametrize("spatial", [1, 0])
def test_bn_eval_forward_opset7_spatial(spatial):
    shape = (2, 3, 4, 5)
    inputs = _bn_inputs(shape, None if spatial else shape[1:])
    check_forward("BatchNormalization", inputs, {"spatial": spatial}, opset=7)


def test_bn_eval_ignores_training_mode_attr_outside_training():
    # ctx.training False: the running statistics normalise even if the node says training_mode=1
    x, s, b, m, v = _bn_inputs((2, 3, 4, 5))
    y, rm, rv = run_engine("BatchNormalization", [x, s, b, m, v], {"training_mode": 1}, n_outputs=3, opset=15)
    (ref,) = run_ort("BatchNormalization", [x, s, b, m, v], {}, opset=15)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rm, m)
    np.testing.assert_array_equal(rv, v)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4, 5)])
def test_bn_eval_grad(shape):
    inputs = _bn_inputs(shape)
    check_grad("BatchNormalization", inputs, {}, opset=15)  # x, scale, bias, mean, var


def test_bn_eval_grad_opset7_per_activation():
    shape = (3, 2, 3)
    check_grad("BatchNormalization", _bn_inputs(shape, shape[1:]), {"spatial": 0}, opset=7)


# ---- BatchNormalization, training mode ----------------------------------------------------------------------
def _bn_train_reference(x, scale, bias, mean, var, eps, momentum, axes):
    mu = x.mean(axis=axes, keepdims=True)
    vb = x.var(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(vb + eps) * scale + bias
    n = np.prod([x.shape[a] for a in axes])
    rm = mean * momentum + mu.squeeze(axes) * (1 - momentum)
    rv = var * momentum + vb.squeeze(axes) * n / (n - 1) * (1 - momentum)
    return y, rm, rv


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("shift", [0.0, 30.0])  # one-pass statistics; centred two-pass when |mean| >> std
def test_bn_train_forward_and_running_update(shape, shift):
    x, s, b, m, v = _bn_inputs(shape, shift=shift)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    x64 = x.astype(np.float64)
    y_ref, rm_ref, rv_ref = _bn_train_reference(x64, s.reshape(bshape), b.reshape(bshape), m.astype(np.float64),
                                                v.astype(np.float64), 1e-5, 0.8, axes)
    m0, v0 = m.copy(), v.copy()
    op = make("BatchNormalization", [x, s, b, m, v], {"momentum": 0.8}, opset=15)
    y = op.forward(Context(training=True), x, s, b, m, v)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    # running statistics updated in place, in the input arrays themselves
    assert not np.array_equal(m, m0) and not np.array_equal(v, v0)
    assert m.dtype == np.float32 and v.dtype == np.float32
    np.testing.assert_allclose(m, rm_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, rv_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0.0, 30.0])
def test_bn_train_matches_onnxruntime_training_mode(shift):
    x, s, b, m, v = _bn_inputs((4, 3, 5, 2), shift=shift)
    y_ort, rm_ort, rv_ort = run_ort("BatchNormalization", [x, s, b, m, v], {"training_mode": 1}, n_outputs=3,
                                    opset=15)
    m0, v0 = m.copy(), v.copy()
    y, rm, rv = run_engine("BatchNormalization", [x, s, b, m, v], {"training_mode": 1}, n_outputs=3, opset=15,
                           training=True)
    np.testing.assert_allclose(y, y_ort, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, rm_ort, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rm, m)  # the returned running stats are the updated state
    # onnxruntime updates with the biased batch variance; we deliberately use the unbiased one (PyTorch)
    n = 4 * 5 * 2
    batch_var_ort = (rv_ort - v0 * np.float32(0.9)) / np.float32(0.1)
    np.testing.assert_allclose(rv, v0 * 0.9 + batch_var_ort * n / (n - 1) * 0.1, rtol=1e-4, atol=1e-5)


def test_bn_train_opset9_saved_outputs_match_onnxruntime():
    x, s, b, m, v = _bn_inputs((4, 3, 5))
    expected = run_ort("BatchNormalization", [x, s, b, m.copy(), v.copy()], {}, n_outputs=5, opset=9)
    got = run_engine("BatchNormalization", [x, s, b, m, v], {}, n_outputs=5, opset=9, training=True)
    for i in (0, 1, 3, 4):  # Y, running mean, saved mean, saved inverse std
        np.testing.assert_allclose(got[i], expected[i], rtol=1e-5, atol=1e-5)


def test_bn_train_per_activation_opset7():
    shape = (5, 3, 2)
    x, s, b, m, v = _bn_inputs(shape, shape[1:])
    y = run_engine("BatchNormalization", [x, s, b, m, v], {"spatial": 0}, opset=7, training=True)[0]
    mu, vb = x.mean(axis=0), x.var(axis=0)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(vb + 1e-5) * s + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4), (2, 3, 3, 4)])
@pytest.mark.parametrize("shift", [0.0, 10.0])
def test_bn_train_grad(shape, shift):
    check_grad("BatchNormalization", _bn_inputs(shape, shift=shift), {}, wrt=[0, 1, 2], opset=15, training=True)


def test_bn_train_grad_through_running_outputs():
    # opset 15 training_mode=1: Y, running_mean, running_var all carry gradient
    check_grad("BatchNormalization", _bn_inputs((3, 2, 4)), {"training_mode": 1}, wrt=[0, 1, 2, 3, 4],
               n_outputs=3, opset=15, training=True)
    # opset 9: Y, running_mean, running_var, saved_mean, saved inverse std
    check_grad("BatchNormalization", _bn_inputs((3, 2, 4), shift=10.0), {}, wrt=[0, 1, 2, 3, 4], n_outputs=5,
               opset=9, training=True)


def test_bn_train_needs_writable_state():
    x, s, b, m, v = _bn_inputs((2, 3, 4))
    m.flags.writeable = False
    with pytest.raises(ModelError, match="writable"):
        run_engine("BatchNormalization", [x, s, b, m, v], {}, training=True)


# ---- Dropout -------------------------------------------------------------------------------------------------
def test_dropout_eval_identity():
    x = _f32(3, 4, 5)
    op = make("Dropout", [x], n_outputs=2, opset=13)
    y, mask = op.forward(Context(training=False), x)
    assert y is x
    assert mask.dtype == np.bool_ and mask.all()
    g = _f32(3, 4, 5)
    assert op.backward(g, None)[0] is g
    # same as onnxruntime's inference
    check_forward("Dropout", [x, np.array(0.3, np.float32)], n_outputs=2, opset=13, const=[1])
    # opset 10/11: onnxruntime returns an all-False mask in inference, onnx's reference (and the spec's
    # "identity" intent) an all-True one; we keep all-True and compare Y only there
    check_forward("Dropout", [x], {"ratio": 0.3}, opset=10)


def test_dropout_training_mask_statistics_and_scale():
    x = np.abs(_f32(200, 100)) + np.float32(0.5)
    ratio = 0.3
    y, mask = run_engine("Dropout", [x, np.array(ratio, np.float32)], n_outputs=2, opset=13, training=True, seed=1)
    assert y.dtype == np.float32 and mask.dtype == np.bool_
    kept = mask.mean()
    sigma = np.sqrt(ratio * (1 - ratio) / x.size)
    assert abs(kept - (1 - ratio)) < 5 * sigma
    np.testing.assert_allclose(y[mask], x[mask] / np.float32(1 - ratio), rtol=1e-6)
    assert (y[~mask] == 0).all()
    assert ((y != 0) == mask).all()


def test_dropout_training_seeded():
    x = _f32(20, 30)
    r = np.array(0.5, np.float32)
    a = run_engine("Dropout", [x, r], n_outputs=2, opset=13, training=True, seed=7)
    b = run_engine("Dropout", [x, r], n_outputs=2, opset=13, training=True, seed=7)
    c = run_engine("Dropout", [x, r], n_outputs=2, opset=13, training=True, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_dropout_training_mode_input_and_old_opset():
    x = _f32(10, 10)
    r = np.array(0.5, np.float32)
    (y,) = run_engine("Dropout", [x, r, np.array(False)], opset=13, training=True)
    assert y is x
    (y,) = run_engine("Dropout", [x, r, np.array(True)], opset=13, training=True)
    assert (y == 0).any()
    (y,) = run_engine("Dropout", [x], opset=13, training=True)  # default ratio 0.5
    assert 20 < (y == 0).sum() < 80
    (y,) = run_engine("Dropout", [x], {"ratio": 0.2}, opset=10, training=True)
    kept = y != 0
    assert (x != 0).all() and 5 <= (~kept).sum() < 40
    np.testing.assert_allclose(y[kept], x[kept] / np.float32(0.8), rtol=1e-6)  # kept values scaled by 1 / (1 - ratio)
    y, mask = run_engine("Dropout", [x, np.array(0.25, np.float32), np.array(True)], n_outputs=2, opset=13,
                         training=True)
    assert mask.dtype == bool and 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(y[~mask], 0)
    np.testing.assert_allclose(y[mask], x[mask] / np.float32(0.75), rtol=1e-6)


def test_dropout_grad():
    x = _f32(4, 5, 6)
    check_grad("Dropout", [x, np.array(0.4)], wrt=[0], opset=13, training=True)
    check_grad("Dropout", [x], {"ratio": 0.25}, opset=10, training=True)
    check_grad("Dropout", [x], opset=13, training=False)


def test_dropout_keeps_its_mask_a_bit_per_value():
    """Training keeps the keep-mask packed (a bit per value), not the scaled float mask; backward is g * mask /
    (1 - ratio), the same values as multiplying by the scaled mask."""
    x = _f32(3, 5, 7)
    r = np.array(0.3, np.float32)
    op = make("Dropout", [x, r], n_outputs=2, opset=13)
    y, mask = op.forward(Context(training=True, rng=np.random.default_rng(3)), x, r)
    assert [k for k, v in vars(op).items() if isinstance(v, np.ndarray)] == []
    assert op.m[0].bits.nbytes == -(-x.size // 8)
    g = _f32(*x.shape)
    scaled = np.multiply(mask, np.float32(1 / 0.7), dtype=np.float32)
    np.testing.assert_array_equal(op.backward(g)[0], g * scaled)
    np.testing.assert_array_equal(y, x * scaled)


# ---- InstanceNormalization, LayerNormalization ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 3)])
def test_instance_norm(shape):
    c = shape[1]
    x, s, b = _f32(*shape) + np.float32(2), _f32(c), _f32(c)
    for opset in (13, 22):
        check_forward("InstanceNormalization", [x, s, b], {"epsilon": 1e-3}, opset=opset)
    check_grad("InstanceNormalization", [x, s, b])


@pytest.mark.parametrize("shape,axis,pshape", [
    ((3, 6), -1, (6,)),
    ((2, 3, 4), -1, (4,)),
    ((2, 3, 4), 1, (3, 4)),
    ((2, 3, 4), -2, (1, 4)),   # scale broadcast to the normalised shape
    ((2, 3, 4, 5), 2, (4, 5)),
])
def test_layer_norm(shape, axis, pshape):
    x, s, b = _f32(*shape) + np.float32(1), _f32(*pshape), _f32(*pshape)
    check_forward("LayerNormalization", [x, s, b], {"axis": axis}, n_outputs=3, opset=17)
    check_forward("LayerNormalization", [x, s], {"axis": axis, "epsilon": 1e-3}, opset=17)
    check_grad("LayerNormalization", [x, s, b], {"axis": axis}, opset=17)
    check_grad("LayerNormalization", [x, s, b], {"axis": axis}, n_outputs=3, opset=17)
