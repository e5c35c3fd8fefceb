"""qatool.DynamicQuantizeLSTM against onnxruntime's com.microsoft DynamicQuantizeLSTM, bit for bit, one sequence per
run (the op's semantics: each sequence is its own batch of one); MLAS's logistic / tanh / dynamic quantization
against onnxruntime's own kernels; the straight-through backward against finite differences of the function it
differentiates (the quantization errors held fixed)."""

from unittest import mock

import numpy as np
import pytest

from opcheck import analytic_grad, check_grad, run_engine
from ortref import run_node

from qatool.ops import REGISTRY, mlas
from qatool.ops.recurrent import LSTM, DynamicQuantizeLSTM
from qatool.quant.config import cpu_lacks_vnni
from qatool.quant.qparams import fake_quant, quantize, weight_grid, weight_scales

# What qatool exports on this CPU: 8-bit weights, or 7 where the CPU has no VNNI (QuantConfig.reduce_range), since
# there MLAS's u8 x s8 GEMM adds products in saturating 16-bit pairs that 8-bit weights overflow
WEIGHT_BITS = 7 if cpu_lacks_vnni() else 8

rng = None  # the test's own seeded generator, set for each test by conftest.py

S, B, I, H = 5, 3, 6, 4
OP = "qatool.DynamicQuantizeLSTM"


def _f32(*shape, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)


def _lstm_inputs(direction="forward", bias=True, lens=None, h0=False, c0=False, peep=False, s=S, b=B, i=I, h=H,
                 scale=0.5):
    """An LSTM's eight inputs (None where absent) with float weights."""
    d = 2 if direction == "bidirectional" else 1
    return [_f32(s, b, i, scale=2.0), _f32(d, 4 * h, i, scale=scale), _f32(d, 4 * h, h, scale=scale),
            _f32(d, 8 * h, scale=0.3) if bias else None, None if lens is None else np.array(lens, np.int32),
            _f32(d, b, h) if h0 else None, _f32(d, b, h) if c0 else None, _f32(d, 3 * h, scale=0.5) if peep else None]


def _quantized(xs, per_channel=True, bits=WEIGHT_BITS):
    """The op's ten inputs (W and R fake-quantized as WeightQuant does) and onnxruntime's twelve."""
    grid = weight_grid(bits)
    axes = (0, 1) if per_channel else (0,)
    ours, theirs = list(xs), list(xs)
    scales = []
    for k in (1, 2):
        s = weight_scales(xs[k], axes, grid)
        ours[k] = fake_quant(xs[k], s, 0, grid, axes)[0]
        theirs[k] = np.ascontiguousarray(quantize(xs[k], s, 0, grid, axes).transpose(0, 2, 1))  # [D, K, 4H] int8
        scales.append(s)
    ours += scales
    theirs += [scales[0], np.zeros(scales[0].shape, np.int8), scales[1], np.zeros(scales[1].shape, np.int8)]
    return ours, theirs


def _ort_per_sequence(theirs, attrs):
    """onnxruntime's Y, Y_h, Y_c, each sequence run as a batch of one, joined on the batch axes."""
    n = theirs[0].shape[1]
    runs = []
    for j in range(n):
        one = list(theirs)
        one[0] = theirs[0][:, j:j + 1]
        if one[4] is not None:
            one[4] = theirs[4][j:j + 1]
        for k in (5, 6):
            if one[k] is not None:
                one[k] = theirs[k][:, j:j + 1]
        runs.append(run_node("DynamicQuantizeLSTM", one, [np.float32] * 3, attrs, domain="com.microsoft"))
    return [np.concatenate([r[k] for r in runs], axis=2 if k == 0 else 1) for k in range(3)]


def _check_exact(xs, attrs, per_channel=True, bits=WEIGHT_BITS):
    ours, theirs = _quantized(xs, per_channel, bits)
    expected = _ort_per_sequence(theirs, attrs)
    got = run_engine(OP, ours, attrs, 3)
    for e, g in zip(expected, got):
        assert g.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_array_equal(g, e, err_msg=f"{attrs}")
    return got


DIRECTIONS = ["forward", "reverse", "bidirectional"]
VARIANTS = {
    "bare": {"bias": False},
    "bias": {},
    "init_peep": {"h0": True, "c0": True, "peep": True},
    "lens": {"lens": [2, S, 4]},
    "all": {"lens": [3, 1, S], "h0": True, "c0": True, "peep": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forward_equals_onnxruntime_bit_for_bit(direction, variant):
    xs = _lstm_inputs(direction, **VARIANTS[variant])
    _check_exact(xs, {"hidden_size": H, "direction": direction})


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_larger_layer_bit_for_bit(direction):
    """Where a float-rounding difference anywhere would flip some step's quantization of h: 40 steps of 64 units,
    weights as a trained LSTM's (1 / sqrt(fan-in))."""
    xs = _lstm_inputs(direction, lens=[40, 23], h0=True, c0=True, s=40, b=2, i=48, h=64, scale=1 / 8)
    _check_exact(xs, {"hidden_size": 64, "direction": direction})


@pytest.mark.parametrize("attrs", [
    {"clip": 0.7},
    {"input_forget": 1},
    {"activations": ["HardSigmoid", "Tanh", "Softsign"]},
])
def test_attributes(attrs):
    xs = _lstm_inputs("bidirectional", lens=[S, 2, 4], h0=True, c0=True, peep=True)
    acts = attrs.get("activations")
    if acts:
        attrs = {**attrs, "activations": acts * 2}
    _check_exact(xs, {"hidden_size": H, "direction": "bidirectional", **attrs})


@pytest.mark.parametrize("per_channel,bits", [(False, WEIGHT_BITS), (True, 4)])
def test_per_direction_scales_and_low_bit_weights(per_channel, bits):
    xs = _lstm_inputs("bidirectional", h0=True)
    _check_exact(xs, {"hidden_size": H, "direction": "bidirectional"}, per_channel, bits)


def test_a_sequence_does_not_depend_on_the_others():
    xs = _lstm_inputs("bidirectional", lens=[S, 3, 4], h0=True, c0=True)
    ours, _ = _quantized(xs)
    attrs = {"hidden_size": H, "direction": "bidirectional"}
    full = run_engine(OP, ours, attrs, 3)
    alone = list(ours)
    alone[0], alone[4], alone[5], alone[6] = ours[0][:, 1:2], ours[4][1:2], ours[5][:, 1:2], ours[6][:, 1:2]
    one = run_engine(OP, alone, attrs, 3)
    np.testing.assert_array_equal(one[0][:, :, 0], full[0][:, :, 1])
    np.testing.assert_array_equal(one[1][:, 0], full[1][:, 1])


def test_a_sequence_of_length_zero_gives_zeros():
    xs = _lstm_inputs("forward", lens=[0, S, 2], h0=True, c0=True)
    ours, _ = _quantized(xs)
    y, yh, yc = run_engine(OP, ours, {"hidden_size": H}, 3)
    assert np.isfinite(y).all()
    assert not y[:, :, 0].any() and not yh[:, 0].any() and not yc[:, 0].any()


# ---- MLAS's functions against onnxruntime's own kernels -----------------------------------------------------------
def test_logistic_and_tanh_equal_onnxruntime_bit_for_bit():
    x = np.concatenate([rng.standard_normal(200_000) * 4, rng.uniform(-30, 30, 100_000),
                        [0.0, -0.0, 9.0, -9.0, 18.0, -18.0, 40.0, -40.0, 1e-30, -1e-30, np.inf, -np.inf]]
                       ).astype(np.float32)
    for op, fn in (("Sigmoid", mlas.logistic), ("Tanh", mlas.tanh)):
        (expected,) = run_node(op, [x], [np.float32])
        np.testing.assert_array_equal(fn(x), expected, err_msg=op)


def test_dynamic_quantization_equals_onnxruntimes():
    """DynamicQuantizeLinear takes the same range, scale and zero point (an all-zero input: scale 1 there, 0 here,
    the same integers)."""
    for x in (_f32(7, 33, scale=3.0), np.abs(_f32(50)), -np.abs(_f32(50)), np.zeros(5, np.float32)):
        q, s, z = run_node("DynamicQuantizeLinear", [x], [np.uint8, np.float32, np.uint8])
        scale, zero = mlas.dynamic_qparams(x, axis=None)
        codes = mlas.dynamic_codes(x, scale, zero)
        np.testing.assert_array_equal(codes + zero, q.astype(np.float32))
        assert float(zero.reshape(())) == int(z)
        if x.any():
            assert scale.reshape(()) == s


# ---- backward ----------------------------------------------------------------------------------------------------
class _Recorder(DynamicQuantizeLSTM):
    """Keeps the quantization errors of one forward: of X, and of h_{t-1} at every step."""

    errors: dict = {}

    def _project(self, xt, w, b, dtype):
        G = super()._project(xt, w, b, dtype)
        self.errors["x"] = self.x_hat - xt
        return G

    def _recur(self, hp, RT, out, s):
        super()._recur(hp, RT, out, s)
        self.errors[s] = self.h_hat[:, s] - hp


class _Frozen(DynamicQuantizeLSTM):
    """The function the straight-through backward differentiates: the float LSTM whose products read x and h_{t-1}
    plus the recorded quantization errors (constants), and the weights as they are."""

    errors: dict = {}

    def _project(self, xt, w, b, dtype):
        self.x_hat = xt + self.errors["x"]
        return LSTM._project(self, self.x_hat, w, b, dtype)

    def _recurrent_weights(self, r):
        self.h_hat = np.empty((self.D, self.S, self.B, self.H), r.dtype)
        return LSTM._recurrent_weights(self, r)

    def _recur(self, hp, RT, out, s):
        self.h_hat[:, s] = hp + self.errors[s]
        LSTM._recur(self, self.h_hat[:, s], RT, out, s)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backward_is_straight_through(direction):
    """At a point, the op's gradients are the exact gradients of `_Frozen` there (whose own backward, the same
    code, finite differences check): d(quantized)/d(value) = 1, and dW, dR take the quantized operands."""
    attrs = {"hidden_size": H, "direction": direction}
    xs = _lstm_inputs(direction, lens=[S, 2, 4], h0=True, c0=True, peep=True)
    ours = [None if v is None or v.dtype != np.float32 else v.astype(np.float64) for v in _quantized(xs, bits=8)[0]]
    ours[4] = xs[4]
    wrt = [0, 1, 2, 3, 5, 6, 7]
    gs = [rng.standard_normal(o.shape) for o in run_engine(OP, ours, attrs, 3)]
    with mock.patch.dict(REGISTRY, {"test.Recorder": _Recorder, "test.Frozen": _Frozen}):
        _Recorder.errors = {}
        run_engine("test.Recorder", ours, attrs, 3)
        _Frozen.errors = _Recorder.errors
        # the same function value at this point (up to W's float32 rounding: W is not exactly code x scale)
        for got, want in zip(run_engine("test.Frozen", ours, attrs, 3), run_engine(OP, ours, attrs, 3)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        check_grad("test.Frozen", ours, attrs, wrt=wrt, n_outputs=3, max_checks=15)
        _, frozen = analytic_grad("test.Frozen", ours, gs, attrs, wrt, 3)
    _, straight = analytic_grad(OP, ours, gs, attrs, wrt, 3)
    assert len(straight) == 10 and straight[8] is None and straight[9] is None  # the scales get none
    for k in wrt:
        np.testing.assert_allclose(straight[k], frozen[k], rtol=1e-5, atol=1e-7, err_msg=f"input {k}")


def test_backward_float32_matches_float64():
    from opcheck import check_grad_float32

    xs = _lstm_inputs("bidirectional", lens=[S, 2, 4], h0=True, c0=True)
    ours, _ = _quantized(xs)
    check_grad_float32(OP, ours, {"hidden_size": H, "direction": "bidirectional"}, wrt=[0, 1, 2, 3, 5, 6],
                       n_outputs=3, rtol=1e-4)
