import itertools

import numpy as np
import pytest

from opcheck import check_forward, check_grad, run_engine

rng = None  # the test's own seeded generator, set for each test by conftest.py


def _f32(*shape):
    return np.asarray(rng.standard_normal(shape), dtype=np.float32)


M, K, N = 3, 5, 4


@pytest.mark.parametrize("transA,transB", list(itertools.product([0, 1], [0, 1])))
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.0)])
@pytest.mark.parametrize("c_shape", [None, (), (N,), (1, N), (M, 1), (M, N)])
def test_gemm(transA, transB, alpha, beta, c_shape):
    a = _f32(K, M) if transA else _f32(M, K)
    b = _f32(N, K) if transB else _f32(K, N)
    inputs = [a, b] if c_shape is None else [a, b, _f32(*c_shape)]
    attrs = {"transA": transA, "transB": transB, "alpha": alpha, "beta": beta}
    for opset in (13, 21):
        check_forward("Gemm", inputs, attrs, opset=opset)
    check_grad("Gemm", inputs, attrs)


def test_gemm_keeps_float32():
    a, b, c = _f32(M, K), _f32(K, N), _f32(N)
    (y,) = run_engine("Gemm", [a, b, c], {"alpha": 0.3, "beta": 0.7})
    assert y.dtype == np.float32


def test_gemm_old_opset_required_c():
    a, b, c = _f32(M, K), _f32(K, N), _f32(N)
    check_forward("Gemm", [a, b, c], {"transB": 0, "beta": 0.5}, opset=9)


@pytest.mark.parametrize("sa,sb", [
    ((K,), (K,)),
    ((K,), (K, N)),
    ((M, K), (K,)),
    ((M, K), (K, N)),
    ((2, M, K), (2, K, N)),
    ((2, M, K), (K, N)),          # x @ W
    ((M, K), (2, K, N)),          # W @ x batched
    ((2, 1, M, K), (3, K, N)),    # broadcast batch axes
    ((1, 3, M, K), (2, 1, K, N)),
    ((K,), (2, K, N)),
    ((2, 3, M, K), (K,)),
])
def test_matmul(sa, sb):
    a, b = _f32(*sa), _f32(*sb)
    for opset in (13, 21):
        check_forward("MatMul", [a, b], opset=opset)
    check_grad("MatMul", [a, b])


def test_matmul_keeps_float32():
    (y,) = run_engine("MatMul", [_f32(2, M, K), _f32(K, N)])
    assert y.dtype == np.float32
