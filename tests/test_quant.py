"""Fake quantization, observers, qparams and the QAT ops."""

import numpy as np
import pytest

from opcheck import make
from qatool.ops import Context
from qatool.quant.ops import bn_fold_factor, folded_bias
from qatool.quant.qparams import (BIAS_GRID, MIN_SCALE, activation_grid, activation_qparams, fake_quant, quantize,
                                  weight_grid, weight_scales)


def test_grids():
    assert (weight_grid(8).qmin, weight_grid(8).qmax) == (-127, 127)
    assert (weight_grid(4).qmin, weight_grid(4).qmax) == (-8, 7)  # full range at 3-4 bits
    assert (weight_grid(3).qmin, weight_grid(3).qmax) == (-4, 3)
    assert (weight_grid(2).qmin, weight_grid(2).qmax) == (-1, 1)
    assert (activation_grid(8, False).qmin, activation_grid(8, False).qmax) == (0, 255)
    assert (activation_grid(4, True).qmin, activation_grid(4, True).qmax) == (-8, 7)
    assert activation_grid(8, False).storage == np.uint8 and weight_grid(8).storage == np.int8


def test_fake_quant_rounds_half_to_even_and_clips():
    s = np.float32(0.5)
    x = np.array([0.25, 0.75, 1.25, -0.25, 100.0, -100.0, 0.0], np.float32)  # x/s = .5 1.5 2.5 -.5 ...
    y, mask = fake_quant(x, s, 3, activation_grid(4, False))  # grid [0, 15], zero point 3
    # rint(x/s): 0, 2, 2, -0 ; + 3 -> 3, 5, 5, 3 ; 200+3 clips to 15 ; -200+3 clips to 0
    np.testing.assert_array_equal(y, (np.array([3, 5, 5, 3, 15, 0, 3], np.float32) - 3) * s)
    np.testing.assert_array_equal(mask, [True, True, True, True, False, False, True])
    # identical to ONNX QuantizeLinear -> DequantizeLinear
    q = quantize(x, s, 3, activation_grid(4, False))
    np.testing.assert_array_equal(y, (q.astype(np.float32) - 3) * s)


def test_fake_quant_per_channel_and_input_untouched():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    w0 = w.copy()
    s = weight_scales(w, 0, weight_grid(8))
    np.testing.assert_allclose(s, np.abs(w).reshape(3, -1).max(1) / 127, rtol=1e-7)
    y, _ = fake_quant(w, s, 0, weight_grid(8), axis=0)
    np.testing.assert_array_equal(w, w0)
    assert np.abs(y - w).max() <= s.max() / 2 + 1e-7
    np.testing.assert_array_equal(np.abs(y).reshape(3, -1).max(1), s * 127)  # the extreme maps exactly


def test_activation_qparams_contain_zero_and_symmetric():
    s, z = activation_qparams(1.0, 3.0, activation_grid(8, False))  # stretched to [0, 3]
    assert z == 0 and s == np.float32(3.0) / np.float32(255)
    s, z = activation_qparams(-1.0, 3.0, activation_grid(8, False))
    assert s == np.float32(4.0) / np.float32(255) and z == 64  # rint(1 / (4/255)) = rint(63.75)
    s, z = activation_qparams(-2.0, 1.0, activation_grid(8, True))
    assert z == 0 and s == np.float32(2.0) / np.float32(127)
    s, z = activation_qparams(0.0, 0.0, activation_grid(8, False))
    assert s == MIN_SCALE and z == 0


def _fq_node(observer="moving_average", momentum=0.9, bits=8):
    x = np.zeros((2, 3), np.float32)
    op = make("qatool.FakeQuant", [x, None, None, None], {"bits": bits, "observer": observer, "momentum": momentum})
    return op


def _run_fq(op, x, state, training=True, frozen=False):
    return op.forward(Context(training=training, observers_frozen=frozen), x, *state)


def _fresh_state():
    return [np.ones((), np.float32), np.zeros((), np.float32), np.array([np.inf, -np.inf], np.float32)]


@pytest.mark.parametrize("observer", ["moving_average", "maximum"])
def test_observer_updates(observer):
    op = _fq_node(observer, momentum=0.5)
    state = _fresh_state()
    scale, zero, span = state
    x1 = np.array([[-1.0, 0.0, 2.0]], np.float32)
    x2 = np.array([[-3.0, 0.0, 1.0]], np.float32)
    _run_fq(op, x1, state)
    np.testing.assert_array_equal(span, [-1.0, 2.0])  # the first batch initialises the range
    _run_fq(op, x2, state)
    expected = [-2.0, 1.5] if observer == "moving_average" else [-3.0, 2.0]
    np.testing.assert_array_equal(span, expected)
    s, z = activation_qparams(*expected, activation_grid(8, False))
    assert scale == s and zero == z
    # eval mode and frozen observers leave the range alone
    _run_fq(op, x1 * 10, state, training=False)
    _run_fq(op, x1 * 10, state, training=True, frozen=True)
    np.testing.assert_array_equal(span, expected)


def test_fake_quant_op_straight_through_gradient():
    op = _fq_node(bits=4)
    state = _fresh_state()
    _run_fq(op, np.array([[0.0, 1.5]], np.float32), state)  # range [0, 1.5], scale 0.1
    op.needs_grad = [True, False, False, False]
    x = np.array([[-1.0, 0.2, 1.0, 1.6, 3.0]], np.float32)
    y = op.forward(Context(training=False), x, *state)
    np.testing.assert_allclose(y, [[0.0, 0.2, 1.0, 1.5, 1.5]], atol=1e-6)
    g = np.arange(1, 6, dtype=np.float32)[None]
    (dx, *_rest) = op.backward(g)
    np.testing.assert_array_equal(dx, [[0, 2, 3, 0, 0]])  # zero where clipped (beyond 1.5 + half a step)


def test_weight_quant_folds_bn_and_passes_gradient_through():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gamma = rng.uniform(0.5, 2, 4).astype(np.float32)
    var = rng.uniform(0.5, 2, 4).astype(np.float32)
    op = make("qatool.WeightQuant", [w, gamma, var], {"bits": 8, "axis": 0, "epsilon": 1e-5}, n_outputs=2)
    w_q, s = op.forward(Context(training=True), w, gamma, var)
    k = bn_fold_factor(gamma, var, 1e-5)
    w_fold = w * k[:, None, None, None]
    np.testing.assert_array_equal(s, weight_scales(w_fold, 0, weight_grid(8)))
    np.testing.assert_array_equal(w_q, (quantize(w_fold, s, 0, weight_grid(8), 0) * s[:, None, None, None]))
    g = rng.standard_normal(w.shape).astype(np.float32)
    dw, dgamma, dvar, dscale = op.backward(g)
    assert dscale is None  # no learned step size here
    np.testing.assert_allclose(dw, g * k[:, None, None, None], rtol=1e-6)
    # d/dgamma of w*gamma/sigma through the straight-through estimator
    np.testing.assert_allclose(dgamma, (g * w).sum(axis=(1, 2, 3)) / np.sqrt(var + 1e-5), rtol=1e-5)
    assert dvar is None


def _folded_bias_inputs(rng, c=3):
    y = rng.standard_normal((4, c, 2, 2))
    b = rng.standard_normal(c)
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c) * 0.1, rng.uniform(0.5, 2, c)
    return [y, b, gamma, beta, mean, var, np.array(0.05), rng.uniform(0.01, 0.02, c)]


def test_a_bias_beyond_the_int32_grid_saturates_at_its_own_end():
    """A dead channel (weight scale floored at MIN_SCALE) with an ordinary bias needs more than 2^31 steps: the
    int32 saturates at 2^31 - 1 (2^31 in float32, which a float32 cast once wrapped to -2^31) and at -2^31."""
    import warnings

    from qatool.quant.qparams import bias_integers

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, _ = bias_integers(np.float32([5.0, -5.0, 0.5]), np.float32(1e-3), np.float32([MIN_SCALE, MIN_SCALE, 1.0]))
    assert q.dtype == np.int32 and q.tolist() == [2**31 - 1, -2**31, 500]


def test_folded_bias_frozen_is_the_deployed_computation():
    rng = np.random.default_rng(2)
    inputs = [a.astype(np.float32) for a in _folded_bias_inputs(rng)]
    y, b, gamma, beta, mean, var, s_in, s_w = inputs
    op = make("qatool.FoldedBias", inputs, {"axis": 1, "epsilon": 1e-5})
    for ctx in (Context(training=False), Context(training=True, bn_frozen=True)):
        out = op.forward(ctx, *inputs)
        k = bn_fold_factor(gamma, var, 1e-5)
        bias_scale = s_in * s_w
        bias_q = quantize(folded_bias(b, k, beta, mean), bias_scale, 0, BIAS_GRID).astype(np.float32) * bias_scale
        np.testing.assert_array_equal(out, y + bias_q[None, :, None, None])


def test_folded_bias_batch_statistics_path_matches_finite_differences():
    """Before BN freezes (training mode): z = y/k + b, BN over the batch; every gradient, float64."""
    from opcheck import check_grad

    rng = np.random.default_rng(3)
    inputs = _folded_bias_inputs(rng)
    check_grad("qatool.FoldedBias", inputs, {"axis": 1, "epsilon": 1e-5, "momentum": 0.9}, wrt=[0, 1, 2, 3],
               training=True)


def test_folded_bias_batch_path_is_batch_norm_of_unfolded_output():
    rng = np.random.default_rng(4)
    inputs = [a.astype(np.float64) for a in _folded_bias_inputs(rng)]
    y, b, gamma, beta, mean, var, s_in, s_w = inputs
    op = make("qatool.FoldedBias", inputs, {"axis": 1, "epsilon": 1e-5, "momentum": 0.9})
    mean0, var0 = mean.copy(), var.copy()
    out = op.forward(Context(training=True), *inputs)
    k = gamma / np.sqrt(var0 + 1e-5)
    z = y / k[None, :, None, None] + b[None, :, None, None]
    mu, v = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    ref = gamma[None, :, None, None] * (z - mu[None, :, None, None]) / np.sqrt(v + 1e-5)[None, :, None, None] \
        + beta[None, :, None, None]
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean, 0.9 * mean0 + 0.1 * mu, rtol=1e-12)
    n = z.size // z.shape[1]
    np.testing.assert_allclose(var, 0.9 * var0 + 0.1 * v * n / (n - 1), rtol=1e-12)


def test_lsq_fake_quant_step_size_gradient():
    """LSQ: dy/ds = rint(x/s) - x/s inside the grid, (qmin - z) / (qmax - z) where clipped."""
    from qatool.quant.qparams import lsq_fake_quant

    grid = activation_grid(4, False)  # [0, 15]
    x = np.array([-1.0, 0.26, 0.74, 1.0, 5.0], np.float32)
    y, mask, dy_ds = lsq_fake_quant(x, np.float32(0.1), 2, grid)
    v = x / np.float32(0.1)
    np.testing.assert_allclose(y, [-0.2, 0.3, 0.7, 1.0, 1.3], atol=1e-6)
    np.testing.assert_array_equal(mask, [False, True, True, True, False])
    np.testing.assert_allclose(dy_ds, [0 - 2, np.rint(v[1]) - v[1], np.rint(v[2]) - v[2], np.rint(v[3]) - v[3],
                                       15 - 2], atol=1e-6)


def test_lsq_ops_return_scaled_step_size_gradients():
    from qatool.quant.qparams import lsq_fake_quant, lsq_grad_scale

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    op = make("qatool.FakeQuant", [x, x, x, x], {"bits": 4, "learn_scale": 1})
    scale, zero, span = np.float32(0.2), np.float32(8), np.array([-1.6, 1.4], np.float32)
    state = [np.asarray(scale), np.asarray(zero), span]
    y = op.forward(Context(training=True), x, *state)
    np.testing.assert_array_equal(span, np.array([-1.6, 1.4], np.float32))  # a learned scale is not overwritten by the observer
    g = rng.standard_normal(x.shape).astype(np.float32)
    dx, dscale, _, _ = op.backward(g)
    y_ref, mask, dy_ds = lsq_fake_quant(x, scale, zero, activation_grid(4, False))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, g * mask)
    np.testing.assert_allclose(dscale, (g * dy_ds).sum() * lsq_grad_scale(12, activation_grid(4, False)), rtol=1e-5)

    w = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    s_w = weight_scales(w, 0, weight_grid(4)) * np.float32(0.8)  # learned: smaller than max|w| / qmax
    wop = make("qatool.WeightQuant", [w, None, None, s_w], {"bits": 4, "axis": 0}, n_outputs=2)
    w_q, s_out = wop.forward(Context(training=True), w, None, None, s_w)
    np.testing.assert_array_equal(s_out, s_w)
    gw = rng.standard_normal(w.shape).astype(np.float32)
    dw, _, _, ds = wop.backward(gw)
    _, wmask, wdy = lsq_fake_quant(w, s_w, 0, weight_grid(4), 0)
    assert not wmask.all()  # the smaller step clips the largest weights: no gradient through them
    np.testing.assert_array_equal(dw, gw * wmask)
    np.testing.assert_allclose(ds, (gw * wdy).sum(axis=(1, 2, 3)) * lsq_grad_scale(8, weight_grid(4)), rtol=1e-5)


def test_lsq_weight_step_rides_with_the_bn_fold():
    """With a folded BN, the learned step is the unfolded weight's: the folded step is learned * |k| per channel,
    so when the BN statistics move (k changes) the integer codes stay put; the step's gradient is LSQ's on the
    folded step, divided by |k| (the learned step moves by the folded step's LSQ update over |k|)."""
    from qatool.quant.ops import bn_fold_factor
    from qatool.quant.qparams import lsq_fake_quant, lsq_grad_scale

    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    gamma = np.float32([1.5, -0.7, 2.0])  # a negative gamma flips the folded weight, not the step's sign
    var = np.float32([0.3, 2.0, 0.05])
    learned = weight_scales(w, 0, weight_grid(2)) * np.float32(0.6)
    wop = make("qatool.WeightQuant", [w, gamma, var, learned], {"bits": 2, "axis": 0}, n_outputs=2)
    w_q, s_out = wop.forward(Context(training=True), w, gamma, var, learned)
    k = bn_fold_factor(gamma, var, 1e-5)
    np.testing.assert_allclose(s_out, learned * np.abs(k), rtol=1e-6)
    folded = w * k.reshape(3, 1, 1, 1)
    ref, _, dy_ds = lsq_fake_quant(folded, s_out, 0, weight_grid(2), 0)
    np.testing.assert_array_equal(w_q, ref)
    codes = w_q / s_out.reshape(3, 1, 1, 1)
    assert set(np.unique(np.rint(codes))) == {-1.0, 0.0, 1.0}
    # the running variance quadruples: k halves, the folded weight and its step halve, the codes stay
    w_q2, s_out2 = wop.forward(Context(training=True), w, gamma, var * 4 + np.float32(3e-5), learned)
    np.testing.assert_allclose(s_out2, s_out / 2, rtol=1e-4)
    np.testing.assert_array_equal(np.rint(w_q2 / s_out2.reshape(3, 1, 1, 1)), np.rint(codes))
    wop.forward(Context(training=True), w, gamma, var, learned)
    g = rng.standard_normal(w.shape).astype(np.float32)
    _, _, _, ds = wop.backward(g)
    np.testing.assert_allclose(ds, (g * dy_ds).sum(axis=(1, 2, 3)) * lsq_grad_scale(18, weight_grid(2)) / np.abs(k),
                               rtol=1e-5)


def test_lsq_starts_where_the_observer_starts(lenet):
    """The initial learned steps give the folded weights the observer's scales: step 0 of an LSQ run computes
    what step 0 of a plain run computes."""
    from qatool.convert import normalize_proto
    from qatool.ir.io import load_proto
    from qatool.quant.config import QuantConfig
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    outs = []
    for learning in ("none", "lsq"):
        s = QatSession.create(graph, QuantConfig(weight_bits=2, scale_learning=learning))
        outs.append(s.model.forward({s.input_name: x}, training=False, outputs=[s.logits])[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_low_bit_weight_scales_are_chosen_by_error():
    """At <= 4 bits each channel's scale is the candidate of least squared error (never worse than max|w| / qmax,
    strictly better on heavy-tailed weights); at 8 bits it stays max|w| / qmax."""
    from qatool.quant.qparams import fake_quant, weight_grid, weight_scales

    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(16, 8, 3, 3)).astype(np.float32)  # heavy tails: clipping pays
    peak = np.abs(w).reshape(16, -1).max(1)
    np.testing.assert_array_equal(weight_scales(w, 0, weight_grid(8)), (peak / np.float32(127)).astype(np.float32))
    grid = weight_grid(4)
    chosen = weight_scales(w, 0, grid)
    by_max = (peak / np.float32(7)).astype(np.float32)
    err = lambda s: ((fake_quant(w, s, 0, grid, 0)[0] - w) ** 2).reshape(16, -1).sum(1)  # noqa: E731
    assert (err(chosen) <= err(by_max) * (1 + 1e-6)).all()
    assert err(chosen).sum() < 0.95 * err(by_max).sum()  # 0.90 here
    assert (chosen <= by_max).all() and (chosen >= 0.5 * by_max * (1 - 1e-6)).all()
    np.testing.assert_array_equal(weight_scales(w, 0, grid), chosen)  # deterministic: export == simulation
