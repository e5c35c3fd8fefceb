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


def check_grad(op_type, inputs, attrs=None, wrt: Sequence[int] | None = None, n_outputs=1, opset=17,
               training=False, eps=1e-6, rtol=1e-5, atol=1e-6, max_checks=60, seed=0):
    """Analytic gradients of sum(out_k * G_k) w.r.t. the float inputs in `wrt` equal central differences (float64).

    Up to `max_checks` randomly chosen elements of each input are checked numerically.
    """
    rng = np.random.default_rng(seed)
    inputs = [None if x is None else (np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating)
                                      else np.asarray(x)) for x in inputs]
    if wrt is None:
        wrt = [i for i, x in enumerate(inputs) if x is not None and x.dtype == np.float64]

    def fwd(xs):
        # A fresh op and generator each time, so a random op (Dropout) draws the same mask on every call.
        out = run_engine(op_type, xs, attrs, n_outputs, opset, training=training, seed=seed)
        return out

    op = make(op_type, inputs, attrs, n_outputs, opset)
    op.needs_grad = [i in wrt for i in range(len(inputs))]
    outs = op.forward(Context(training=training, rng=np.random.default_rng(seed)), *inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gs = [rng.standard_normal(np.shape(o)) if np.asarray(o).dtype == np.float64 else None for o in outs]
    analytic = op.backward(*gs)
    analytic = list(analytic) if isinstance(analytic, (tuple, list)) else [analytic]

    def loss(xs):
        return sum(float(np.sum(o * g)) for o, g in zip(fwd(xs), gs) if g is not None)

    for i in wrt:
        a = analytic[i]
        assert a is not None, f"{op_type}: no gradient for input {i}"
        assert a.shape == inputs[i].shape, f"{op_type}: grad shape {a.shape} != input shape {inputs[i].shape}"
        flat = inputs[i].size
        idx = rng.choice(flat, size=min(flat, max_checks), replace=False)
        for j in idx:
            xs_p = [x.copy() if x is not None else None for x in inputs]
            xs_m = [x.copy() if x is not None else None for x in inputs]
            xs_p[i].reshape(-1)[j] += eps
            xs_m[i].reshape(-1)[j] -= eps
            num = (loss(xs_p) - loss(xs_m)) / (2 * eps)
            ana = a.reshape(-1)[j]
            assert abs(num - ana) <= atol + rtol * abs(num), (
                f"{op_type} {attrs}: d/d input{i}[{j}] analytic {ana} != numeric {num}")
    return analytic
