"""GPTQ weight rounding (qatool.quant.gptq): the algorithm against round-to-nearest, the layers' columns against
the layers' outputs, and `calibrate --weight-rounding gptq` end to end (integers, onnxruntime, error vs float)."""

import numpy as np
import pytest

from qatool.ir.graph import Node
from qatool.quant.gptq import conv_columns, gptq_round, layer_columns, weight_rows
from qatool.quant.qparams import weight_grid, weight_scales


def _correlated(rng, n, k):
    """Inputs whose features are strongly correlated (as a layer's real inputs are)."""
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    base = rng.standard_normal((n, k // 4 + 1)) @ rng.standard_normal((k // 4 + 1, k))
    return (base + 0.3 * rng.standard_normal((n, k))) @ mix


def test_identity_hessian_is_round_to_nearest(rng):
    grid = weight_grid(4)
    w = rng.standard_normal((6, 20)).astype(np.float32)
    s = weight_scales(w, 0, grid)
    nearest = np.clip(np.rint(w / s[:, None]), grid.qmin, grid.qmax)
    for act_order in (False, True):
        q = gptq_round(w, np.eye(20), s, grid, damp=0.0, act_order=act_order)
        np.testing.assert_array_equal(q, nearest)
    # dampening only scales a diagonal H: still round-to-nearest
    np.testing.assert_array_equal(gptq_round(w, 3 * np.eye(20), s, grid), nearest)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_nearest_on_correlated_inputs(rng, act_order):
    grid = weight_grid(4)
    k, r = 48, 16
    both = _correlated(rng, 4000, k)
    X, held = both[:2000], both[2000:]  # the same distribution, other samples
    w = rng.standard_normal((r, k)).astype(np.float32)
    s = weight_scales(w, 0, grid)
    q = gptq_round(w, X.T @ X, s, grid, act_order=act_order)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    nearest = np.clip(np.rint(w / s[:, None]), grid.qmin, grid.qmax)

    def err(ints, x):
        return float(np.sum((x @ (ints * s[:, None] - w).T) ** 2))

    assert err(q, X) < 0.7 * err(nearest, X)
    assert err(q, held) < 0.7 * err(nearest, held)


@pytest.mark.parametrize("attrs", [
    {},
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
    {"group": 2, "pads": [1, 1, 1, 1]},
    {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]},
])
def test_conv_columns_reproduce_the_conv_output(rng, attrs):
    from tests.ortref import run_node

    g = attrs.get("group", 1)
    x = rng.standard_normal((2, 4, 7, 9)).astype(np.float32)
    w = rng.standard_normal((8, 4 // g, 3, 3)).astype(np.float32)
    want = run_node("Conv", [x, w], [np.float32], attrs)[0]
    X = conv_columns(x, w.shape, attrs)  # [G, K, N * P]
    rows = weight_rows(w, 0).reshape(g, 8 // g, -1)
    got = np.matmul(rows, X).reshape(8, 2, *want.shape[2:]).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmul_and_gemm_columns(rng):
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)  # MatMul [K, M]: rows = w^T (axis 1)
    X = layer_columns(Node("MatMul", ["x", "w"], ["y"], "m"), x, w.shape)
    np.testing.assert_allclose((weight_rows(w, 1) @ X[0]).T, (x @ w).reshape(-1, 3), rtol=1e-5, atol=1e-5)
    wt = np.ascontiguousarray(w.T)  # Gemm transB: [N, K], rows on axis 0
    X = layer_columns(Node("Gemm", ["x", "w"], ["y"], "g", {"transB": 1}), x[0], wt.shape)
    np.testing.assert_allclose((weight_rows(wt, 0) @ X[0]).T, x[0] @ w, rtol=1e-5, atol=1e-5)
