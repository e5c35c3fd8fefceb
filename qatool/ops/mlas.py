"""onnxruntime's own arithmetic where its CPU kernels do not compute plain float32, reproduced bit for bit.

The kernels are MLAS's on x86-64 with AVX2/FMA3 (what onnxruntime dispatches on this repository's machines,
AVX-512 ones included); tests/test_dynamic_lstm.py checks each function against onnxruntime 1.32 itself.

- `logistic(x)`: MlasComputeLogistic (MlasComputeLogisticF32KernelFma3, constants of logistic.cpp, Eigen's
  rational approximation): x clamped to [-18, 18], p = x * P(x^2), q = Q(x^2), each polynomial by fused
  multiply-adds, then p / q + 0.5 floored at 0.
- `tanh(x)`: MlasComputeTanh (MlasComputeTanhF32KernelFma3, tanh.cpp): x clamped to [-9, 9], x * P(x^2) / Q(x^2),
  the polynomials by fused multiply-adds. (onnxruntime's newer sources replace it by another rational
  approximation, constants _nc0.._dc2, 1 from |x| >= 5; an onnxruntime that ships it fails the bit-for-bit test,
  and this function must follow it.)
- `dynamic_qparams` / `dynamic_codes`: how a kernel quantizes a float input it is handed at run time
  (GetQuantizationParameter and MlasQuantizeLinear in core/util/qmath.h, used by DynamicQuantizeLSTM's GEMMs):
  uint8, asymmetric, over the range [min(x, 0), max(x, 0)] of all the values quantized together;
  scale = (max - min) / 255 in float32 (1 when max = min = 0), zero point z = round_half_even(clip(-min / scale,
  0, 255)), q = clip(round_half_even(x / scale), -z, 255 - z) + z (a division, not a multiplication by 1 / scale).
- `integer_product`: the exact int32 accumulation of an integer GEMM (a VNNI kernel's; x86 CPUs without VNNI
  can saturate u8 x s8 pairs, `quant.config.cpu_lacks_vnni`: there weights default to 7 bits).

A fused multiply-add is emulated in float64: the product of two float32 values is exact there, the sum is
rounded to 53 bits and then to 24; the two roundings differ from the single one only when the first lands on a
float32 tie (about once in 2^29 operations; none in the 3 million inputs of the tests).

float32 only: an array of another dtype (float64 in the gradient checks) gets the exact function.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
F32_EXACT = 2.0**24  # integers up to this magnitude are exact in float32: a float32 GEMM of them is exact below it
UINT8_LEVELS = 255

_LOGISTIC_P = [f32(v) for v in (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                                8.51377133304701e-03, 2.48287947061529e-01)]
_LOGISTIC_Q = [f32(v) for v in (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                                1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01)]
_TANH_P = [f32(v) for v in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                            5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                            4.89352455891786e-03)]
_TANH_Q = [f32(v) for v in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                            4.89352518554385e-03)]


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (see the module docstring)."""
    return np.add(np.multiply(a, b, dtype=np.float64), c, dtype=np.float64).astype(f32)


def _polynomial(coefficients: list, x2: np.ndarray) -> np.ndarray:
    """c0 x2^n + ... + cn by Horner's rule in fused multiply-adds, highest power first."""
    p = _fma(x2, coefficients[0], coefficients[1])
    for c in coefficients[2:]:
        p = _fma(p, x2, c)
    return p


def logistic(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) as onnxruntime computes it (a new array)."""
    if x.dtype != f32:
        return 0.5 * np.tanh(0.5 * x) + 0.5
    v = np.clip(x, f32(-18), f32(18))
    v2 = v * v
    y = v * _polynomial(_LOGISTIC_P, v2)
    y /= _polynomial(_LOGISTIC_Q, v2)
    y += f32(0.5)
    return np.maximum(y, f32(0), out=y)


def tanh(x: np.ndarray) -> np.ndarray:
    """tanh(x) as onnxruntime computes it (a new array)."""
    if x.dtype != f32:
        return np.tanh(x)
    v = np.clip(x, f32(-9), f32(9))
    v2 = v * v
    y = v * _polynomial(_TANH_P, v2)
    y /= _polynomial(_TANH_Q, v2)
    return y


def dynamic_qparams(x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of each group of values quantized together: the groups are what remains after
    reducing `axis` (kept as length-1 axes, so both broadcast against x). Values that must not take part can be
    set to 0 beforehand: the range always contains 0."""
    t = x.dtype.type
    lo = np.minimum(x.min(axis=axis, keepdims=True), t(0))
    hi = np.maximum(x.max(axis=axis, keepdims=True), t(0))
    span = hi - lo
    scale = np.where(span > 0, span / t(UINT8_LEVELS), t(1)).astype(x.dtype, copy=False)
    zero = np.rint(np.clip(-lo / scale, t(0), t(UINT8_LEVELS)))
    return scale, zero


def dynamic_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The uint8 integers minus their zero point, q - z, as x's dtype (what an integer GEMM multiplies)."""
    q = np.divide(x, scale)
    np.rint(q, out=q)
    return np.clip(q, -zero, UINT8_LEVELS - zero, out=q)


def integer_product(a: np.ndarray, b: np.ndarray, bound: float) -> np.ndarray:
    """a @ b of integer-valued float arrays, exactly, in a's dtype; `bound` bounds |a_ik b_kj| (float32 sums are
    exact while K * bound stays below 2^24, else the product runs in float64)."""
    if a.dtype != f32 or a.shape[-1] * bound < F32_EXACT:
        return np.matmul(a, b)
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(f32)
