"""Fake quantization, observers, qparams and the QAT ops.

Every reference here is independent of qatool's own quantization functions: onnxruntime's QuantizeLinear /
DequantizeLinear kernels run on the same values (tests/ortref.py), onnxruntime's quantizer's choice of scale and
zero point (`compute_scale_zp`), and the papers' formulas written out in the test (max|w| / qmax, BatchNorm
folding w * gamma / sqrt(var + eps), LSQ's step-size gradient and its scale 1 / sqrt(N * Qp)).
"""

import numpy as np
import pytest
from onnxruntime.quantization.quant_utils import compute_scale_zp

from opcheck import make
from ortref import quantize_dequantize
from qatool.ops import Context
from qatool.quant.qparams import (MIN_SCALE, activation_grid, activation_qparams, fake_quant, lsq_fake_quant,
                                  lsq_grad_scale, quantize, weight_grid, weight_scales)

f32 = np.float32


def test_grids():
    assert (weight_grid(8).qmin, weight_grid(8).qmax) == (-127, 127)
    assert (weight_grid(4).qmin, weight_grid(4).qmax) == (-8, 7)  # full range at 3-4 bits
    assert (weight_grid(3).qmin, weight_grid(3).qmax) == (-4, 3)
    assert (weight_grid(2).qmin, weight_grid(2).qmax) == (-1, 1)
    assert (activation_grid(8, False).qmin, activation_grid(8, False).qmax) == (0, 255)
    assert (activation_grid(4, True).qmin, activation_grid(4, True).qmax) == (-8, 7)
    assert activation_grid(8, False).storage == np.uint8 and weight_grid(8).storage == np.int8


# ---- quantize / fake_quant against onnxruntime's QuantizeLinear -> DequantizeLinear ------------------------------
def _values(rng, scale, zero_point, grid, n):
    """Rows (one per channel of `scale`, shape (C, 1)) of random values across the grid and beyond it, exact
    rounding ties and values far outside (saturation). With a power-of-two scale, (k + 0.5) * s is exact and
    x / s is exactly k + 0.5 for every level k of the grid and a few past it, on both sides of zero."""
    z = f32(zero_point)
    x = (rng.random((len(scale), n)) * 1.4 - 0.2) * (grid.qmax - grid.qmin) + (grid.qmin - z)
    k = np.arange(grid.qmin - 3, grid.qmax + 3) - z + 0.5
    far = np.array([1e4, -1e4])
    levels = np.concatenate([x, np.broadcast_to(k, (len(scale), len(k))), np.broadcast_to(far, (len(scale), 2))],
                            axis=1)
    return (levels * scale).astype(f32)


GRIDS = {  # name: (grid, per-channel axis or None, zero point)
    "uint8 activations, zero point 37": (activation_grid(8, False), None, 37),
    "uint4 activations, zero point 3": (activation_grid(4, False), None, 3),
    "int8 symmetric activations": (activation_grid(8, True), None, 0),
    "int8 weights per channel": (weight_grid(8), 0, 0),
    "int8 weights per tensor": (weight_grid(8), None, 0),
    "int4 weights per channel": (weight_grid(4), 0, 0),
    "int3 weights per channel": (weight_grid(3), 0, 0),
    "ternary weights per channel": (weight_grid(2), 0, 0),
}


@pytest.mark.parametrize("power_of_two", [True, False])
@pytest.mark.parametrize("name", list(GRIDS))
def test_quantize_and_fake_quant_are_onnxruntimes_quantize_dequantize(name, power_of_two, rng):
    """quantize == QuantizeLinear and fake_quant == DequantizeLinear(QuantizeLinear) bit for bit, on random values,
    rounding ties (half to even, both signs) and values far outside the grid (saturation)."""
    grid, axis, zp = GRIDS[name]
    channels, n = 3, 40
    if power_of_two:
        scale = f32(2.0**-5) if axis is None else f32([2.0**-3, 2.0**-6, 2.0**-9])
    else:
        scale = f32(rng.uniform(0.01, 0.1)) if axis is None else rng.uniform(0.01, 0.1, channels).astype(f32)
    s = np.broadcast_to(np.asarray(scale, f32), (channels,))[:, None]
    x = _values(rng, s, zp, grid, n)
    if power_of_two:  # the ties really are ties
        v = x[:, n:-2] / s
        assert np.all(v - np.floor(v) == 0.5)
    zero = zp if axis is None else np.full(channels, zp)
    want_q, want_y = quantize_dequantize(x, scale, zero, grid.qmin, grid.qmax, axis)

    q = quantize(x, scale, zp, grid, axis)
    assert q.dtype == want_q.dtype
    np.testing.assert_array_equal(q, want_q)
    y, mask = fake_quant(x, scale, zp, grid, axis)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, want_y)
    # the straight-through mask: True where x / s rounds inside the grid (onnxruntime's value is then unsaturated)
    v = np.rint(x / s) + zp
    np.testing.assert_array_equal(mask, (v >= grid.qmin) & (v <= grid.qmax))
    assert (want_q[~mask] == np.where(v[~mask] < grid.qmin, grid.qmin, grid.qmax)).all()
    assert (~mask).sum() >= 2 * channels and mask.sum() >= n * channels // 2


def test_fake_quant_rounds_half_to_even_and_clips():
    s = f32(0.5)
    x = np.array([0.25, 0.75, 1.25, -0.25, 100.0, -100.0, 0.0], f32)  # x/s = .5 1.5 2.5 -.5 ...
    y, mask = fake_quant(x, s, 3, activation_grid(4, False))  # grid [0, 15], zero point 3
    # rint(x/s): 0, 2, 2, -0 ; + 3 -> 3, 5, 5, 3 ; 200+3 clips to 15 ; -200+3 clips to 0
    np.testing.assert_array_equal(y, (np.array([3, 5, 5, 3, 15, 0, 3], f32) - 3) * s)
    np.testing.assert_array_equal(mask, [True, True, True, True, False, False, True])
    # the same as onnxruntime's QuantizeLinear -> DequantizeLinear
    q, want = quantize_dequantize(x, s, 3, 0, 15)
    np.testing.assert_array_equal(q, [3, 5, 5, 3, 15, 0, 3])
    np.testing.assert_array_equal(y, want)


def test_fake_quant_per_channel_and_input_untouched(rng):
    w = rng.standard_normal((3, 2, 2, 2)).astype(f32)
    w0 = w.copy()
    s = weight_scales(w, 0, weight_grid(8))
    np.testing.assert_array_equal(s, np.abs(w).reshape(3, -1).max(1) / f32(127))
    y, _ = fake_quant(w, s, 0, weight_grid(8), axis=0)
    np.testing.assert_array_equal(w, w0)
    assert np.abs(y - w).max() <= s.max() / 2 + 1e-7
    np.testing.assert_array_equal(np.abs(y).reshape(3, -1).max(1), s * 127)  # the extreme maps exactly


# ---- scales and zero points against onnxruntime's quantizer -------------------------------------------------------
def test_activation_qparams_contain_zero_and_symmetric():
    s, z = activation_qparams(1.0, 3.0, activation_grid(8, False))  # stretched to [0, 3]
    assert z == 0 and s == f32(3.0) / f32(255)
    s, z = activation_qparams(-1.0, 3.0, activation_grid(8, False))
    assert s == f32(4.0) / f32(255) and z == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    s, z = activation_qparams(-1.0, 15.0, activation_grid(8, False))
    assert s == f32(16.0) / f32(255) and z == 16  # round(15.9375): rounded, not truncated
    s, z = activation_qparams(-0.25, 15.75, activation_grid(8, False))
    assert s == f32(16.0) / f32(255) and z == 4  # round(3.984375)
    s, z = activation_qparams(-15.75, 0.25, activation_grid(8, False))
    assert z == 251  # round(251.015625): not rounded up either
    s, z = activation_qparams(-2.0, 1.0, activation_grid(8, True))
    assert z == 0 and s == f32(2.0) / f32(127)
    s, z = activation_qparams(0.0, 0.0, activation_grid(8, False))
    assert s == MIN_SCALE and z == 0


@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, False), (8, True)])
def test_activation_qparams_are_what_onnxruntimes_quantizer_chooses(bits, symmetric, rng):
    """Scale and zero point of a range [lo, hi] are onnxruntime's (quant_utils.compute_scale_zp: scale =
    (hi - lo) / (qmax - qmin), zero point round(qmin - lo / scale)), on 300 ranges whose ends and width are exact in
    float32 (multiples of 2^-10), so both compute the same scale. Symmetric: onnxruntime's symmetric int8 range
    [-127, 127] (scale max|x| / 127, zero point 0)."""
    grid = activation_grid(bits, symmetric)
    if symmetric:
        qmin, qmax = np.int8(-127), np.int8(127)
    else:
        qmin, qmax = np.uint8(grid.qmin), np.uint8(grid.qmax)
    ends = np.sort(rng.integers(-8 * 1024, 8 * 1024, (300, 2)), axis=1) / 1024
    ends = np.concatenate([ends, [[-1.0, 3.0], [0.5, 2.0], [-2.0, -0.5], [-1.0, 15.0]]])
    fractions = []
    for lo, hi in ends:
        s, z = activation_qparams(lo, hi, grid)
        want_z, want_s = compute_scale_zp(f32(lo), f32(hi), qmin, qmax, symmetric=symmetric)
        assert (s, z) == (want_s, int(want_z)), (lo, hi)
        assert np.asarray(s).dtype == np.float32
        if not symmetric:  # the formula written out, in float64
            assert z == int(np.clip(np.round(grid.qmin - min(lo, 0.0) / float(s)), grid.qmin, grid.qmax))
            fractions.append((-min(lo, 0.0) / float(s)) % 1.0)
    if not symmetric:  # the data reach both sides of every rounding direction
        assert sum(f > 0.5 for f in fractions) > 50 and sum(0 < f < 0.5 for f in fractions) > 50


def test_weight_scales_are_max_abs_over_qmax(rng):
    """8 bits: scale = max|w| / 127 per output channel (per tensor without an axis), what onnxruntime's quantizer
    computes for symmetric int8 weights on [-127, 127]."""
    w = (rng.standard_normal((5, 3, 2, 2)) * rng.uniform(0.01, 3, (5, 1, 1, 1))).astype(f32)
    peak = np.abs(w).reshape(5, -1).max(1)
    s = weight_scales(w, 0, weight_grid(8))
    np.testing.assert_array_equal(s, peak / f32(127))
    for c in range(5):
        _, want = compute_scale_zp(-peak[c], peak[c], np.int8(-127), np.int8(127), symmetric=True)
        assert s[c] == want
    assert weight_scales(w, None, weight_grid(8)) == peak.max() / f32(127)
    wt = np.ascontiguousarray(w.reshape(5, -1).T)  # a MatMul weight: output channels on axis 1
    np.testing.assert_array_equal(weight_scales(wt, 1, weight_grid(8)), peak / f32(127))


# ---- the QAT ops ----------------------------------------------------------------------------------------------
def _fq_node(observer="moving_average", momentum=0.9, bits=8):
    x = np.zeros((2, 3), f32)
    op = make("qatool.FakeQuant", [x, None, None, None], {"bits": bits, "observer": observer, "momentum": momentum})
    return op


def _run_fq(op, x, state, training=True, frozen=False):
    return op.forward(Context(training=training, observers_frozen=frozen), x, *state)


def _fresh_state():
    return [np.ones((), f32), np.zeros((), f32), np.array([np.inf, -np.inf], f32)]


@pytest.mark.parametrize("observer", ["moving_average", "maximum"])
def test_observer_updates(observer):
    op = _fq_node(observer, momentum=0.5)
    state = _fresh_state()
    scale, zero, span = state
    x1 = np.array([[-1.0, 0.0, 2.0]], f32)
    x2 = np.array([[-3.0, 0.0, 1.0]], f32)
    _run_fq(op, x1, state)
    np.testing.assert_array_equal(span, [-1.0, 2.0])  # the first batch initialises the range
    _run_fq(op, x2, state)
    expected = [-2.0, 1.5] if observer == "moving_average" else [-3.0, 2.0]
    np.testing.assert_array_equal(span, expected)
    want_z, want_s = compute_scale_zp(f32(expected[0]), f32(expected[1]), np.uint8(0), np.uint8(255))
    assert scale == want_s and zero == want_z
    # eval mode and frozen observers leave the range alone
    _run_fq(op, x1 * 10, state, training=False)
    _run_fq(op, x1 * 10, state, training=True, frozen=True)
    np.testing.assert_array_equal(span, expected)


def test_fake_quant_op_is_onnxruntimes_quantize_dequantize_with_the_observed_qparams(rng):
    """The op in training mode observes the batch, then quantizes it with onnxruntime's scale and zero point."""
    op = _fq_node(bits=8)
    state = _fresh_state()
    x = (rng.standard_normal((4, 50)) * 2 + 0.7).astype(f32)
    y = _run_fq(op, x, state)
    want_z, want_s = compute_scale_zp(x.min(), x.max(), np.uint8(0), np.uint8(255))
    assert state[0] == want_s and state[1] == want_z and 0 < want_z < 255
    np.testing.assert_array_equal(y, quantize_dequantize(x, want_s, want_z, 0, 255)[1])
    x2 = (rng.standard_normal((4, 50)) * 3).astype(f32)  # eval mode: the stored qparams, saturating beyond them
    np.testing.assert_array_equal(_run_fq(op, x2, state, training=False),
                                  quantize_dequantize(x2, want_s, want_z, 0, 255)[1])


def test_fake_quant_op_straight_through_gradient():
    op = _fq_node(bits=4)
    state = _fresh_state()
    _run_fq(op, np.array([[0.0, 1.5]], f32), state)  # range [0, 1.5], scale 0.1
    op.needs_grad = [True, False, False, False]
    x = np.array([[-1.0, 0.2, 1.0, 1.6, 3.0]], f32)
    y = op.forward(Context(training=False), x, *state)
    np.testing.assert_allclose(y, [[0.0, 0.2, 1.0, 1.5, 1.5]], atol=1e-6)
    g = np.arange(1, 6, dtype=f32)[None]
    (dx, *_rest) = op.backward(g)
    np.testing.assert_array_equal(dx, [[0, 2, 3, 0, 0]])  # zero where clipped (beyond 1.5 + half a step)


def test_fake_quant_keeps_its_straight_through_mask_at_a_bit_per_value(rng):
    """Training keeps only the clip mask, packed a bit per value (not a byte-per-value bool, not the input), and
    backward passes the gradient exactly where the value was inside the grid."""
    op = _fq_node(bits=8)
    state = _fresh_state()
    _run_fq(op, rng.standard_normal((3, 7, 11)).astype(f32), state)  # observe a range
    x = (rng.standard_normal((3, 7, 11)) * 2).astype(f32)  # wider: some values clipped; 231 values, not 8k
    op.needs_grad = [True, False, False, False]
    y = _run_fq(op, x, state, frozen=True)
    saved = [k for k, v in vars(op).items() if isinstance(v, np.ndarray)]
    assert saved == [] and op.mask.bits.nbytes == -(-x.size // 8)
    g = rng.standard_normal(x.shape).astype(f32)
    dx = op.backward(g)[0]
    s, z = state[0], state[1]
    inside = (np.rint(x / s) + z >= 0) & (np.rint(x / s) + z <= 255)
    assert 0 < inside.sum() < x.size
    np.testing.assert_array_equal(dx, g * inside)
    assert dx.dtype == f32 and y.dtype == f32


def _fold(w, gamma, var, eps=1e-5, axis=0):
    """BatchNorm folded into the weight, as written in the papers: w * gamma / sqrt(var + eps), per channel."""
    k = gamma / np.sqrt(var + f32(eps))
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * k.reshape(shape), k


def test_weight_quant_folds_bn_and_passes_gradient_through(rng):
    """Variances down to 1e-4, so a fold without eps (1e-5) is 5 % off on that channel."""
    w = rng.standard_normal((4, 3, 3, 3)).astype(f32)
    gamma = rng.uniform(0.5, 2, 4).astype(f32)
    var = np.array([1e-4, 1e-3, 0.5, 2.0], f32)
    op = make("qatool.WeightQuant", [w, gamma, var], {"bits": 8, "axis": 0, "epsilon": 1e-5}, n_outputs=2)
    w_q, s = op.forward(Context(training=True), w, gamma, var)
    w_fold, k = _fold(w, gamma, var)
    want_s = np.abs(w_fold).reshape(4, -1).max(1) / f32(127)
    np.testing.assert_array_equal(s, want_s)
    q, want = quantize_dequantize(w_fold, want_s, np.zeros(4), -127, 127, axis=0)
    np.testing.assert_array_equal(w_q, want)
    assert (np.abs(q).reshape(4, -1).max(1) == 127).all()
    g = rng.standard_normal(w.shape).astype(f32)
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
        q, _ = bias_integers(f32([5.0, -5.0, 0.5]), f32(1e-3), f32([MIN_SCALE, MIN_SCALE, 1.0]))
    assert q.dtype == np.int32 and q.tolist() == [2**31 - 1, -2**31, 500]


def test_bias_integers_are_the_bias_over_input_scale_times_weight_scale(rng):
    from qatool.quant.qparams import bias_integers

    b = rng.standard_normal(6).astype(f32)
    s_in, s_w = f32(0.037), rng.uniform(1e-3, 1e-2, 6).astype(f32)
    b[0] = f32(2.5) * (s_in * s_w[0])  # a tie: 2.5 steps -> 2
    q, scale = bias_integers(b, s_in, s_w)
    np.testing.assert_array_equal(scale, (s_in * s_w).astype(f32))
    np.testing.assert_array_equal(q, np.rint(b / (s_in * s_w)).astype(np.int32))
    assert q[0] == 2


def test_folded_bias_frozen_is_the_deployed_computation(rng):
    """Eval mode, or BN frozen: out = y + the folded bias (b - mean) * gamma / sqrt(var + eps) + beta, on the
    int32 grid of step s_in * s_w (written out here)."""
    inputs = [a.astype(f32) for a in _folded_bias_inputs(rng)]
    inputs[5][0] = f32(2e-4)  # a tiny variance: eps matters
    y, b, gamma, beta, mean, var, s_in, s_w = inputs
    op = make("qatool.FoldedBias", inputs, {"axis": 1, "epsilon": 1e-5})
    bias = (b - mean) * (gamma / np.sqrt(var + f32(1e-5))) + beta
    step = (s_in * s_w).astype(f32)
    bias_q = np.rint(bias / step) * step
    for ctx in (Context(training=False), Context(training=True, bn_frozen=True)):
        out = op.forward(ctx, *inputs)
        np.testing.assert_array_equal(out, y + bias_q[None, :, None, None])


def test_folded_bias_batch_statistics_path_matches_finite_differences(rng):
    """Before BN freezes (training mode): z = y/k + b, BN over the batch; every gradient, float64."""
    from opcheck import check_grad

    inputs = _folded_bias_inputs(rng)
    before = [x.copy() for x in inputs]
    check_grad("qatool.FoldedBias", inputs, {"axis": 1, "epsilon": 1e-5, "momentum": 0.9}, wrt=[0, 1, 2, 3],
               training=True)
    for x, x0 in zip(inputs, before):  # the running statistics moved in the harness's copies, not here
        np.testing.assert_array_equal(x, x0)


def test_folded_bias_batch_path_is_batch_norm_of_unfolded_output(rng):
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


# ---- LSQ (Esser et al. 2020) --------------------------------------------------------------------------------------
def _lsq_dy_ds(x, s, z, qmin, qmax):
    """LSQ's step-size gradient of the quantizer output, as the paper writes it (with a zero point): -v + round(v)
    where qmin <= round(v) + z <= qmax (v = x / s), qmin - z below the grid, qmax - z above it."""
    v = x / s
    r = np.rint(v) + z
    return np.where(r < qmin, f32(qmin - z), np.where(r > qmax, f32(qmax - z), np.rint(v) - v))


def test_lsq_grad_scale_is_one_over_sqrt_n_qp():
    for n, grid in ((12, activation_grid(4, False)), (8, weight_grid(4)), (18, weight_grid(2)),
                    (3 * 224 * 224, activation_grid(8, False))):
        assert lsq_grad_scale(n, grid) == pytest.approx(1.0 / np.sqrt(n * grid.qmax), rel=1e-12)
    assert lsq_grad_scale(12, activation_grid(4, False)) == pytest.approx(1 / np.sqrt(180), rel=1e-12)


def test_lsq_fake_quant_step_size_gradient():
    """LSQ: dy/ds = rint(x/s) - x/s inside the grid, (qmin - z) / (qmax - z) where clipped."""
    grid = activation_grid(4, False)  # [0, 15]
    x = np.array([-1.0, 0.26, 0.74, 1.0, 5.0], f32)
    y, mask, dy_ds = lsq_fake_quant(x, f32(0.1), 2, grid)
    v = x / f32(0.1)
    np.testing.assert_allclose(y, [-0.2, 0.3, 0.7, 1.0, 1.3], atol=1e-6)
    np.testing.assert_array_equal(y, quantize_dequantize(x, f32(0.1), 2, 0, 15)[1])
    np.testing.assert_array_equal(mask, [False, True, True, True, False])
    np.testing.assert_allclose(dy_ds, [0 - 2, np.rint(v[1]) - v[1], np.rint(v[2]) - v[2], np.rint(v[3]) - v[3],
                                       15 - 2], atol=1e-6)


def test_lsq_ops_return_scaled_step_size_gradients(rng):
    x = rng.standard_normal((2, 3, 4)).astype(f32)
    op = make("qatool.FakeQuant", [x, x, x, x], {"bits": 4, "learn_scale": 1})
    scale, zero, span = f32(0.2), f32(8), np.array([-1.6, 1.4], f32)
    state = [np.asarray(scale), np.asarray(zero), span]
    y = op.forward(Context(training=True), x, *state)
    np.testing.assert_array_equal(span, np.array([-1.6, 1.4], f32))  # a learned scale: the observer leaves it
    g = rng.standard_normal(x.shape).astype(f32)
    dx, dscale, _, _ = op.backward(g)
    q, y_ref = quantize_dequantize(x, scale, 8, 0, 15)
    np.testing.assert_array_equal(y, y_ref)
    inside = np.rint(x / scale) + 8
    mask = (inside >= 0) & (inside <= 15)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(dx, g * mask)
    # N = 12 features per sample, Qp = 15
    np.testing.assert_allclose(dscale, (g * _lsq_dy_ds(x, scale, 8, 0, 15)).sum() / np.sqrt(12 * 15), rtol=1e-5)

    w = rng.standard_normal((3, 2, 2, 2)).astype(f32)
    s_w = (np.abs(w).reshape(3, -1).max(1) / f32(7) * f32(0.8)).astype(f32)  # learned: smaller than max|w| / qmax
    wop = make("qatool.WeightQuant", [w, None, None, s_w], {"bits": 4, "axis": 0}, n_outputs=2)
    w_q, s_out = wop.forward(Context(training=True), w, None, None, s_w)
    np.testing.assert_array_equal(s_out, s_w)
    np.testing.assert_array_equal(w_q, quantize_dequantize(w, s_w, np.zeros(3), -8, 7, axis=0)[1])
    gw = rng.standard_normal(w.shape).astype(f32)
    dw, _, _, ds = wop.backward(gw)
    r = np.rint(w / s_w[:, None, None, None])
    wmask = (r >= -8) & (r <= 7)
    assert not wmask.all()  # the smaller step clips the largest weights: no gradient through them
    np.testing.assert_array_equal(dw, gw * wmask)
    wdy = _lsq_dy_ds(w, s_w[:, None, None, None], 0, -8, 7)
    # N = 8 weights per channel, Qp = 7
    np.testing.assert_allclose(ds, (gw * wdy).sum(axis=(1, 2, 3)) / np.sqrt(8 * 7), rtol=1e-5)


def test_lsq_weight_step_rides_with_the_bn_fold(rng):
    """With a folded BN, the learned step is the unfolded weight's: the folded step is learned * |k| per channel,
    so when the BN statistics move (k changes) the integer codes stay put; the step's gradient is LSQ's on the
    folded step, divided by |k| (the learned step moves by the folded step's LSQ update over |k|)."""
    w = rng.standard_normal((3, 2, 3, 3)).astype(f32)
    gamma = f32([1.5, -0.7, 2.0])  # a negative gamma flips the folded weight, not the step's sign
    var = f32([0.3, 2.0, 0.05])
    learned = (np.abs(w).reshape(3, -1).max(1) / f32(1) * f32(0.6)).astype(f32)
    wop = make("qatool.WeightQuant", [w, gamma, var, learned], {"bits": 2, "axis": 0}, n_outputs=2)
    w_q, s_out = wop.forward(Context(training=True), w, gamma, var, learned)
    folded, k = _fold(w, gamma, var)
    np.testing.assert_allclose(s_out, learned * np.abs(k), rtol=1e-6)
    np.testing.assert_array_equal(w_q, quantize_dequantize(folded, s_out, np.zeros(3), -1, 1, axis=0)[1])
    codes = w_q / s_out.reshape(3, 1, 1, 1)
    assert set(np.unique(np.rint(codes))) == {-1.0, 0.0, 1.0}
    # the running variance quadruples: k halves, the folded weight and its step halve, the codes stay
    w_q2, s_out2 = wop.forward(Context(training=True), w, gamma, var * 4 + f32(3e-5), learned)
    np.testing.assert_allclose(s_out2, s_out / 2, rtol=1e-4)
    np.testing.assert_array_equal(np.rint(w_q2 / s_out2.reshape(3, 1, 1, 1)), np.rint(codes))
    wop.forward(Context(training=True), w, gamma, var, learned)
    g = rng.standard_normal(w.shape).astype(f32)
    _, _, _, ds = wop.backward(g)
    dy_ds = _lsq_dy_ds(folded, s_out.reshape(3, 1, 1, 1), 0, -1, 1)
    # N = 18 weights per channel, Qp = 1
    np.testing.assert_allclose(ds, (g * dy_ds).sum(axis=(1, 2, 3)) / np.sqrt(18 * 1) / np.abs(k), rtol=1e-5)


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
