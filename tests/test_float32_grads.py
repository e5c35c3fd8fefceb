"""The float32 backward, the dtype training runs in, of the ops training uses most: equal to the float64 backward at
the same point (same float32 inputs, same output gradients), which check_grad ties to central differences.
A float32-only fault (an overflow, a cancellation, a dtype mix-up) shows here and nowhere else."""

import numpy as np
import pytest

from opcheck import check_grad, check_grad_float32

f32 = np.float32


def _fq_state(x, bits=8):
    """scale, zero point and span of x's range (an observed quantizer), unsigned grid."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / (2**bits - 1)
    return [np.array(scale, f32), np.array(round(-lo / scale), f32), np.array([lo, hi], f32)]


def _cases(rng):
    n = rng.standard_normal

    def away_from(x, points=(0.0,), gap=0.05):
        """Values at least `gap` from each kink (Relu's 0, Clip's bounds), so no input sits on one."""
        for p in points:
            near = np.abs(x - p) < gap
            x[near] = p + np.sign(x[near] - p + 1e-12) * gap
        return x

    x4 = n((2, 3, 7, 7)).astype(f32)
    fq_x = n((2, 3, 4, 5)).astype(f32)
    fb = [n((4, 3, 2, 2)), n(3), rng.uniform(0.5, 2, 3), n(3), n(3) * 0.1, rng.uniform(0.5, 2, 3), np.array(0.05),
          rng.uniform(0.01, 0.02, 3)]
    bn = [x4 * 1.5 + 0.3, n(3), n(3), n(3), rng.uniform(0.5, 1.5, 3)]
    w = n((4, 3, 3, 3))
    return {
        "Conv": ("Conv", [x4, n((4, 3, 3, 3)) * 0.3, n(4)], {"pads": [1, 1, 1, 1], "strides": [2, 2]}, None, False),
        "Conv depthwise": ("Conv", [x4, n((3, 1, 3, 3)), n(3)], {"pads": [1, 1, 1, 1], "group": 3}, None, False),
        "Gemm": ("Gemm", [n((5, 6)), n((4, 6)), n(4)], {"transB": 1}, None, False),
        "MatMul": ("MatMul", [n((2, 5, 6)), n((6, 4))], {}, None, False),
        "BatchNormalization eval": ("BatchNormalization", bn, {}, None, False),
        "BatchNormalization training": ("BatchNormalization", bn, {"training_mode": 1}, [0, 1, 2], False),
        "BatchNormalization training, mean 30x the spread": ("BatchNormalization", [x4 + 30, *bn[1:]],
                                                             {"training_mode": 1}, [0, 1, 2], False),
        "FoldedBias batch statistics": ("qatool.FoldedBias", fb, {"axis": 1, "epsilon": 1e-5}, [0, 1, 2, 3], True),
        "FoldedBias batch statistics, mean 30x the spread": ("qatool.FoldedBias", [fb[0] + 30, *fb[1:]],
                                                             {"axis": 1, "epsilon": 1e-5}, [0, 2, 3], True),
        "FoldedBias frozen": ("qatool.FoldedBias", fb, {"axis": 1, "epsilon": 1e-5}, [0], False),
        "FakeQuant": ("qatool.FakeQuant", [fq_x * 1.3, *_fq_state(fq_x)], {"bits": 8}, [0], False),
        "FakeQuant LSQ": ("qatool.FakeQuant", [fq_x, *_fq_state(fq_x, 4)], {"bits": 4, "learn_scale": 1}, [0, 1],
                          True),
        "WeightQuant folded": ("qatool.WeightQuant", [w, rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)],
                               {"bits": 8, "axis": 0}, [0, 1], True),
        "Add broadcast": ("Add", [n((2, 3, 4, 5)), n((3, 1, 1))], {}, None, False),
        "Mul broadcast": ("Mul", [n((2, 3, 4, 5)), n((3, 1, 5))], {}, None, False),
        "Relu": ("Relu", [away_from(n((3, 4, 5)))], {}, None, False),
        "Clip": ("Clip", [away_from(n((3, 4, 5)) * 2, (-1.0, 1.5)), np.array(-1.0), np.array(1.5)], {}, [0], False),
        "HardSigmoid": ("HardSigmoid", [away_from(n((3, 4, 5)) * 4, (-2.5, 2.5))], {"alpha": 0.2, "beta": 0.5}, None,
                        False),
        "MaxPool": ("MaxPool", [x4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, None, False),
        "AveragePool": ("AveragePool", [x4], {"kernel_shape": [3, 3], "strides": [2, 2]}, None, False),
        "GlobalAveragePool": ("GlobalAveragePool", [x4], {}, None, False),
        "Softmax": ("Softmax", [n((4, 10)) * 3], {"axis": -1}, None, False),
        "Softmax axis 1": ("Softmax", [n((2, 5, 3))], {"axis": 1}, None, False),
    }


CASES = list(_cases(np.random.default_rng(0)))  # names only; each test draws its own data


@pytest.mark.parametrize("case", CASES)
def test_float32_backward_equals_float64_at_the_same_point(case, rng):
    op_type, inputs, attrs, wrt, training = _cases(rng)[case]
    inputs = [np.asarray(x, f32) for x in inputs]  # the point: float32 values, exactly representable in both
    before = [x.copy() for x in inputs]
    if not op_type.startswith("qatool.FakeQuant") and not op_type.startswith("qatool.WeightQuant"):
        # the float64 gradient is the true one (the quantizers' straight-through estimators are checked against
        # their formulas in test_quant.py)
        check_grad(op_type, inputs, attrs, wrt=wrt, training=training, max_checks=20)
    check_grad_float32(op_type, inputs, attrs, wrt=wrt, training=training)
    for x, x0 in zip(inputs, before):
        np.testing.assert_array_equal(x, x0)


def test_the_harness_fails_on_a_wrong_gradient(monkeypatch, rng):
    """check_grad fails on a backward off by 0.1 %, check_grad_float32 on one off by 0.01 % only in float32."""
    from qatool.ops import REGISTRY

    relu = REGISTRY["Relu"]
    real = relu.backward
    x = (rng.standard_normal((3, 4)) + np.where(rng.random((3, 4)) < 0.5, 0.5, -0.5)).astype(f32)
    monkeypatch.setattr(relu, "backward", lambda self, g: tuple(d * g.dtype.type(1.001) for d in real(self, g)))
    with pytest.raises(AssertionError, match="analytic"):
        check_grad("Relu", [x])
    monkeypatch.setattr(relu, "backward", lambda self, g: tuple(
        d * g.dtype.type(1.0001 if g.dtype == np.float32 else 1.0) for d in real(self, g)))
    check_grad("Relu", [x])
    with pytest.raises(AssertionError, match="float32 gradient"):
        check_grad_float32("Relu", [x])
