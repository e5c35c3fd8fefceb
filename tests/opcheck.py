"""Test harness for ops: forward against onnxruntime, backward against central finite differences.

    check_forward("Conv", [x, w, b], {"strides": [2, 2]})          # engine op == onnxruntime, float32
    check_grad("Conv", [x, w, b], {"strides": [2, 2]})             # analytic == numeric, float64

Inputs listed in `const` (indices) become initializers in the onnxruntime model (needed where onnxruntime wants
a constant, e.g. Reshape's shape) and are not differentiated.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from qatool.ir.graph import Node
from qatool.ops import Context, make_op


def _names(inputs: Sequence[np.ndarray | None]) -> list[str]:
    return [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]


def run_ort(op_type: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any] | None = None,
            n_outputs: int = 1, opset: int = 17, const: Sequence[int] = ()) -> list[np.ndarray]:
    """Run one node on onnxruntime (CPU) and return its outputs."""
    attrs = attrs or {}
    names = _names(inputs)
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, **attrs)
    graph_inputs, inits, feeds = [], [], {}
    for i, (name, x) in enumerate(zip(names, inputs)):
        if x is None:
            continue
        if i in const:
            inits.append(numpy_helper.from_array(np.asarray(x), name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.asarray(x).dtype), list(np.shape(x))))
            feeds[name] = np.asarray(x)
    graph = helper.make_graph([node], "t", graph_inputs,
                              [helper.make_empty_tensor_value_info(o) for o in outs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def make(op_type: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any] | None = None,
         n_outputs: int = 1, opset: int = 17):
    """The engine's Op for a one-node graph with these inputs."""
    node = Node(op_type, _names(inputs), [f"out{i}" for i in range(n_outputs)], name=f"test_{op_type}",
                attrs=dict(attrs or {}))
    return make_op(node, opset)


def run_engine(op_type, inputs, attrs=None, n_outputs=1, opset=17, training=False, seed=0):
    op = make(op_type, inputs, attrs, n_outputs, opset)
    out = op.forward(Context(training=training, rng=np.random.default_rng(seed)), *inputs)
    return list(out) if isinstance(out, tuple) else [out]


def check_forward(op_type, inputs, attrs=None, n_outputs=1, opset=17, const=(), rtol=1e-5, atol=1e-5):
    """Engine forward (eval mode) equals onnxruntime's."""
    expected = run_ort(op_type, inputs, attrs, n_outputs, opset, const)
    got = run_engine(op_type, inputs, attrs, n_outputs, opset)
    assert len(got) >= len(expected)
    for e, g in zip(expected, got):
        g = np.asarray(g)
        assert g.shape == e.shape, f"{op_type}: shape {g.shape} != onnxruntime {e.shape}"
        assert g.dtype == e.dtype, f"{op_type}: dtype {g.dtype} != onnxruntime {e.dtype}"
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"{op_type} {attrs}")
    return got


def _as_dtype(inputs, dtype):
    """Fresh copies of the inputs, float ones in `dtype` (the caller's arrays are never handed to an op)."""
    return [None if x is None else (np.array(x, dtype=dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                                    else np.array(x)) for x in inputs]


def analytic_grad(op_type, inputs, gs, attrs=None, wrt: Sequence[int] = (), n_outputs=1, opset=17,
                  training=False, seed=0):
    """(outputs, input gradients) of one forward and backward of the op on copies of `inputs` (stateful ops such
    as BatchNormalization in training mode update their running statistics in those copies, not in the
    caller's arrays), output gradients `gs` cast to each output's dtype."""
    xs = list(inputs)
    op = make(op_type, xs, attrs, n_outputs, opset)
    op.needs_grad = [i in wrt for i in range(len(xs))]
    outs = op.forward(Context(training=training, rng=np.random.default_rng(seed)), *xs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gs = [None if g is None else np.asarray(g).astype(np.asarray(o).dtype) for g, o in zip(gs, outs)]
    grads = op.backward(*gs)
    return outs, (list(grads) if isinstance(grads, (tuple, list)) else [grads])


def _float_inputs(inputs, wrt):
    if wrt is None:
        return [i for i, x in enumerate(inputs) if x is not None and np.issubdtype(np.asarray(x).dtype, np.floating)]
    return list(wrt)


def check_grad(op_type, inputs, attrs=None, wrt: Sequence[int] | None = None, n_outputs=1, opset=17,
               training=False, eps=1e-6, rtol=1e-5, atol=1e-6, max_checks=60, seed=0):
    """Analytic gradients of sum(out_k * G_k) w.r.t. the float inputs in `wrt` equal central differences (float64).

    Up to `max_checks` randomly chosen elements of each input are checked numerically. Every forward (the
    analytic one and each numeric one) runs on fresh copies of the inputs, so all gradients are taken at the
    same point even for ops that update state arrays in place, and the caller's arrays are left untouched.
    """
    rng = np.random.default_rng(seed)
    base = _as_dtype(inputs, np.float64)
    wrt = _float_inputs(base, wrt)

    def fwd(xs):
        # A fresh op and generator each time, so a random op (Dropout) draws the same mask on every call.
        return run_engine(op_type, xs, attrs, n_outputs, opset, training=training, seed=seed)

    outs = fwd(_as_dtype(base, np.float64))
    gs = [rng.standard_normal(np.shape(o)) if np.asarray(o).dtype == np.float64 else None for o in outs]
    _, analytic = analytic_grad(op_type, _as_dtype(base, np.float64), gs, attrs, wrt, n_outputs, opset, training,
                                seed)

    def loss(xs):
        return sum(float(np.sum(o * g)) for o, g in zip(fwd(xs), gs) if g is not None)

    for i in wrt:
        a = analytic[i]
        assert a is not None, f"{op_type}: no gradient for input {i}"
        assert a.shape == base[i].shape, f"{op_type}: grad shape {a.shape} != input shape {base[i].shape}"
        flat = base[i].size
        idx = rng.choice(flat, size=min(flat, max_checks), replace=False)
        for j in idx:
            xs_p, xs_m = _as_dtype(base, np.float64), _as_dtype(base, np.float64)
            xs_p[i].reshape(-1)[j] += eps
            xs_m[i].reshape(-1)[j] -= eps
            num = (loss(xs_p) - loss(xs_m)) / (2 * eps)
            ana = a.reshape(-1)[j]
            assert abs(num - ana) <= atol + rtol * abs(num), (
                f"{op_type} {attrs}: d/d input{i}[{j}] analytic {ana} != numeric {num}")
    return analytic


def check_grad_float32(op_type, inputs, attrs=None, wrt: Sequence[int] | None = None, n_outputs=1, opset=17,
                       training=False, rtol=1e-5, seed=0):
    """The float32 backward (the dtype training runs in) equals the float64 one at the same point: the same
    inputs (float32 values), the same output gradients. Every element, |g32 - g64| <= rtol * max|g64| (float32
    rounding of sums, relative to the gradient's scale). Pair it with `check_grad`, which checks the float64
    backward against finite differences."""
    base32 = _as_dtype(inputs, np.float32)
    wrt = _float_inputs(base32, wrt)
    rng = np.random.default_rng(seed)
    outs64 = run_engine(op_type, _as_dtype(base32, np.float64), attrs, n_outputs, opset, training=training, seed=seed)
    gs = [rng.standard_normal(np.shape(o)).astype(np.float32).astype(np.float64)
          if np.asarray(o).dtype == np.float64 else None for o in outs64]
    outs32, g32 = analytic_grad(op_type, _as_dtype(base32, np.float32), gs, attrs, wrt, n_outputs, opset, training,
                                seed)
    outs64, g64 = analytic_grad(op_type, _as_dtype(base32, np.float64), gs, attrs, wrt, n_outputs, opset, training,
                                seed)
    for o32, o64 in zip(outs32, outs64):
        if np.asarray(o64).dtype == np.float64:
            assert np.asarray(o32).dtype == np.float32, f"{op_type}: float32 forward gave {np.asarray(o32).dtype}"
    for i in wrt:
        a32, a64 = g32[i], g64[i]
        assert a32 is not None and a64 is not None, f"{op_type}: no gradient for input {i}"
        assert a32.dtype == np.float32, f"{op_type}: float32 gradient of input {i} is {a32.dtype}"
        assert a32.shape == a64.shape == base32[i].shape
        scale = max(float(np.abs(a64).max()), 1e-30)
        err = float(np.abs(a32.astype(np.float64) - a64).max())
        assert err <= rtol * scale, (
            f"{op_type} {attrs}: float32 gradient of input {i} off by {err / scale:.1e} of its scale")
    return g32
