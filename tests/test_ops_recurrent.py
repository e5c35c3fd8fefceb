"""LSTM, GRU and RNN: forward against onnxruntime (float32), backward against finite differences (float64).

onnxruntime refuses layout 1, so a layout-1 forward is checked against onnxruntime's layout-0 run on the
transposed tensors."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from opcheck import analytic_grad, check_forward, check_grad, check_grad_float32, make, run_engine, run_ort

from qatool.errors import ModelError
from qatool.ir.graph import Node
from qatool.ops import Context, make_op

rng = None  # the test's own seeded generator, set for each test by conftest.py

S, B, I, H = 4, 3, 5, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
N_OUT = {"LSTM": 3, "GRU": 2, "RNN": 2}
DIRECTIONS = ["forward", "reverse", "bidirectional"]


def _f32(*shape, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)


def _inputs(op, direction="forward", layout=0, bias=True, lens=None, h0=False, c0=False, peep=False, scale=0.5):
    """The node's inputs in ONNX order (trailing absent ones dropped), time-major or batch-major by `layout`."""
    d, g = (2 if direction == "bidirectional" else 1), GATES[op]
    x = _f32(B, S, I) if layout else _f32(S, B, I)
    state = (lambda: _f32(B, d, H)) if layout else (lambda: _f32(d, B, H))
    xs = [x, _f32(d, g * H, I, scale=scale), _f32(d, g * H, H, scale=scale), _f32(d, 2 * g * H) if bias else None,
          None if lens is None else np.array(lens, np.int32), state() if h0 else None]
    if op == "LSTM":
        xs += [state() if c0 else None, _f32(d, 3 * H) if peep else None]
    while xs[-1] is None:
        xs.pop()
    return xs


def _to_layout0(xs):
    """Batch-major X / initial states -> time-major (for onnxruntime, which only runs layout 0)."""
    return [x if x is None or k not in (0, 5, 6) else np.ascontiguousarray(x.transpose(1, 0, 2))
            for k, x in enumerate(xs)]


def _check_forward(op, xs, attrs, n_outputs=None):
    n = n_outputs or N_OUT[op]
    if not attrs.get("layout", 0):
        return check_forward(op, xs, attrs, n_outputs=n)
    expected = run_ort(op, _to_layout0(xs), {**attrs, "layout": 0}, n)
    expected = [expected[0].transpose(2, 0, 1, 3)] + [e.transpose(1, 0, 2) for e in expected[1:]]
    got = run_engine(op, xs, attrs, n)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"{op} {attrs}")
    return got


def _check(op, xs, attrs, max_checks=20, **kw):
    _check_forward(op, xs, attrs)
    check_grad(op, xs, attrs, n_outputs=N_OUT[op], max_checks=max_checks, **kw)


# ---- every op x direction x layout x optional inputs ----------------------------------------------------------
VARIANTS = {
    "bare": {},                                                                   # X, W, R only
    "bias_init": {"lens": [S] * B, "h0": True, "c0": True, "peep": True},         # every length full
    "lens": {"lens": [2, 0, S]},                                                  # a length 0, one partial, one full
    "all": {"lens": [3, 0, 1], "h0": True, "c0": True, "peep": True},             # every length short
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("op", list(GATES))
def test_recurrent(op, direction, layout, variant):
    v = VARIANTS[variant]
    xs = _inputs(op, direction, layout, bias=variant != "bare", **v)
    attrs = {"hidden_size": H, "direction": direction}
    if layout:
        attrs["layout"] = 1
    _check(op, xs, attrs)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lens", [None, [3, 0, 1]])
def test_gru_linear_before_reset(direction, lens):
    xs = _inputs("GRU", direction, lens=lens, h0=True)
    _check("GRU", xs, {"hidden_size": H, "direction": direction, "linear_before_reset": 1})


@pytest.mark.parametrize("op,extra", [("LSTM", {}), ("LSTM", {"input_forget": 1}), ("GRU", {}),
                                      ("GRU", {"linear_before_reset": 1}), ("RNN", {})])
def test_clip(op, extra):
    """A small clip so that many gate inputs sit outside it: the gradient there is 0."""
    xs = _inputs(op, "bidirectional", lens=[S, 2, 3], h0=True, c0=True, peep=True, scale=1.0)
    _check(op, xs, {"hidden_size": H, "direction": "bidirectional", "clip": 0.8, **extra})


@pytest.mark.parametrize("peep", [False, True])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_input_forget(direction, peep):
    xs = _inputs("LSTM", direction, lens=[1, S, 3], h0=True, c0=True, peep=peep)
    _check("LSTM", xs, {"hidden_size": H, "direction": direction, "input_forget": 1})


# ---- activations ----------------------------------------------------------------------------------------------
# onnxruntime hands activation_alpha / beta in order to the activations that take them; defaults fill in after.
ACTIVATIONS = [
    ("LSTM", ["Sigmoid", "Relu", "Tanh"], None, None),
    ("LSTM", ["HardSigmoid", "Affine", "ScaledTanh"], [0.3, 0.8, 1.2], [0.4, 0.1, 0.7]),
    ("LSTM", ["HardSigmoid", "LeakyRelu", "Elu"], None, None),                        # every default
    ("LSTM", ["Sigmoid", "LeakyRelu", "Elu"], [0.2, -0.5], None),                     # alphas <= 0: slope from x
    ("LSTM", ["sigmoid", "softsign", "softplus"], None, None),                        # case-insensitive
    ("LSTM", ["ThresholdedRelu", "Tanh", "Softsign", "Sigmoid", "Elu", "Tanh"], [0.1, 0.7], None),
    ("GRU", ["HardSigmoid", "LeakyRelu", "Sigmoid", "Softsign"], [0.3], None),
    ("GRU", ["Sigmoid", "ScaledTanh", "Softplus", "Affine"], [1.5, 0.5], [0.6, 0.1]),
    ("GRU", ["Relu", "Tanh"], None, None),
    ("RNN", ["Relu", "LeakyRelu"], None, None),
    ("RNN", ["ThresholdedRelu", "Elu"], [0.2, -0.4], None),
    ("RNN", ["Sigmoid", "HardSigmoid"], [0.3], [0.45]),
    ("RNN", ["Softplus", "ScaledTanh"], [0.9], [1.1]),
]


@pytest.mark.parametrize("op,acts,alpha,beta", ACTIVATIONS)
def test_activations(op, acts, alpha, beta):
    n = {"LSTM": 3, "GRU": 2, "RNN": 1}[op]
    direction = "bidirectional" if len(acts) == 2 * n else "forward"
    attrs = {"hidden_size": H, "direction": direction, "activations": acts}
    if alpha is not None:
        attrs["activation_alpha"] = alpha
    if beta is not None:
        attrs["activation_beta"] = beta
    # small weights: unbounded activations (Relu, Affine, Softplus...) as gates can grow the state fast
    xs = _inputs(op, direction, lens=[S, 2, 3], h0=True, c0=True, peep=True, scale=0.3)
    _check(op, xs, attrs)


def test_rnn_two_default_activations_for_one_direction():
    """The RNN schema's default is (Tanh, Tanh); with one direction onnxruntime uses the first."""
    xs = _inputs("RNN", h0=True)
    got = _check_forward("RNN", xs, {"hidden_size": H, "activations": ["Relu", "Relu"]})
    relu = run_engine("RNN", xs, {"hidden_size": H, "activations": ["Relu"]}, 2)
    np.testing.assert_array_equal(got[0], relu[0])


# ---- attributes and outputs -------------------------------------------------------------------------------------
def test_hidden_size_from_r():
    xs = _inputs("LSTM", "bidirectional", lens=[1, 2, 3], h0=True, c0=True, peep=True)
    want = run_engine("LSTM", xs, {"hidden_size": H, "direction": "bidirectional"}, 3)
    got = run_engine("LSTM", xs, {"direction": "bidirectional"}, 3)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def _node(op, xs, outputs, attrs):
    return Node(op, [f"in{i}" if x is not None else "" for i, x in enumerate(xs)], outputs, name=f"test_{op}",
                attrs=attrs)


def _ort_outputs(op, xs, outputs, attrs):
    """onnxruntime's values of the node's named outputs (names "" left out of the node)."""
    names = [f"in{i}" if x is not None else "" for i, x in enumerate(xs)]
    node = helper.make_node(op, names, outputs, **attrs)
    graph = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape))
         for n, x in zip(names, xs) if n],
        [helper.make_empty_tensor_value_info(o) for o in outputs if o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {n: x for n, x in zip(names, xs) if n})


@pytest.mark.parametrize("op,outputs", [
    ("LSTM", ["", "yh"]), ("LSTM", ["", "", "yc"]), ("LSTM", ["y"]), ("LSTM", ["", "yh", "yc"]),
    ("GRU", ["", "yh"]), ("GRU", ["y"]), ("RNN", ["", "yh"]),
])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_output_subsets(op, outputs, direction):
    """Any subset of outputs: the same values as onnxruntime's (whose kernels take other paths without Y), and a
    backward given None for the outputs nobody reads equals one given zeros."""
    attrs = {"hidden_size": H, "direction": direction}
    xs = _inputs(op, direction, lens=[S, 0, 2], h0=True, c0=True, peep=True)
    expected = _ort_outputs(op, xs, outputs, attrs)
    out = make_op(_node(op, xs, outputs, attrs)).forward(Context(), *xs)
    got = [o for o, name in zip(out, outputs) if name]
    assert all(o is None for o, name in zip(out, outputs) if not name)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)

    x64 = [x.astype(np.float64) if x is not None and x.dtype == np.float32 else x for x in xs]
    full = run_engine(op, x64, attrs, N_OUT[op])
    gs = [rng.standard_normal(f.shape) if k < len(outputs) and outputs[k] else None for k, f in enumerate(full)]
    wrt = [k for k, x in enumerate(x64) if x is not None and x.dtype == np.float64]
    op_node = make_op(_node(op, x64, outputs, attrs))
    op_node.needs_grad = [k in wrt for k in range(len(x64))]
    op_node.forward(Context(), *x64)
    with_none = op_node.backward(*gs[:len(outputs)])
    _, with_zeros = analytic_grad(op, x64, [np.zeros(f.shape) if g is None else g for g, f in zip(gs, full)], attrs,
                                  wrt, N_OUT[op])
    for k in wrt:
        np.testing.assert_allclose(with_none[k], with_zeros[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", list(GATES))
def test_keeps_float32(op):
    xs = _inputs(op, "bidirectional", lens=[1, S, 2], h0=True, c0=True, peep=True)
    attrs = {"hidden_size": H, "direction": "bidirectional", "clip": 2.0}
    for y in run_engine(op, xs, attrs, N_OUT[op]):
        assert y.dtype == np.float32
    check_grad_float32(op, xs, attrs, n_outputs=N_OUT[op])


def test_in_a_model():
    """Through the engine: a graph whose LSTM leaves Y out; its W, R, B are trainable (the roles inferred from the
    ops that read them) and get float32 gradients."""
    from qatool.engine.model import Model
    from qatool.ir.graph import from_onnx
    from qatool.ir.roles import read_roles

    w, r, b = _f32(2, 4 * H, I, scale=0.5), _f32(2, 4 * H, H, scale=0.5), _f32(2, 8 * H)
    node = helper.make_node("LSTM", ["x", "w", "r", "b"], ["", "yh"], hidden_size=H, direction="bidirectional")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [S, B, I])],
                              [helper.make_tensor_value_info("yh", onnx.TensorProto.FLOAT, [2, B, H])],
                              [onnx.numpy_helper.from_array(v, n) for n, v in (("w", w), ("r", r), ("b", b))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = _f32(S, B, I)
    g = from_onnx(model)
    assert read_roles(g) == (["w", "r", "b"], [])
    m = Model(g)
    (yh,) = m.forward({"x": x}, training=True)
    np.testing.assert_allclose(yh, _ort_outputs("LSTM", [x, w, r, b], ["", "yh"],
                                                {"hidden_size": H, "direction": "bidirectional"})[0],
                               rtol=1e-5, atol=1e-5)
    grads = m.backward([np.ones_like(yh)])
    for name in ("w", "r", "b"):
        assert grads[name].dtype == np.float32 and np.abs(grads[name]).sum() > 0
    (yh_eval,) = m.forward({"x": x})  # eval mode: nothing kept for a backward
    np.testing.assert_array_equal(yh_eval, yh)


# ---- what the engine refuses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,attrs,words", [
    ("LSTM", {"activations": ["Sigmoid", "Gelu", "Tanh"]}, ["LSTM", "test_LSTM", "activation", "Gelu"]),
    ("GRU", {"activations": ["Sigmoid", "Tanh", "Tanh"]}, ["GRU", "test_GRU", "activations", "3 entries"]),
    ("RNN", {"activations": ["relu"]}, ["RNN", "test_RNN", "activation", "relu"]),
    ("LSTM", {"layout": 2}, ["LSTM", "test_LSTM", "layout", "2"]),
    ("GRU", {"clip": 0.0}, ["GRU", "test_GRU", "clip"]),
    ("RNN", {"direction": "sideways"}, ["RNN", "test_RNN", "direction", "sideways"]),
    ("LSTM", {"output_sequence": 1}, ["LSTM", "test_LSTM", "output_sequence"]),
    ("GRU", {"input_forget": 1}, ["GRU", "test_GRU", "input_forget"]),
    ("RNN", {"linear_before_reset": 1}, ["RNN", "test_RNN", "linear_before_reset"]),
])
def test_unsupported_attribute(op, attrs, words):
    xs = _inputs(op)
    with pytest.raises(ModelError) as info:
        make(op, xs, {"hidden_size": H, **attrs}, N_OUT[op])
    msg = str(info.value)
    assert all(w in msg for w in words), msg
    assert msg.count(". ") == 0 and msg.endswith("."), msg  # one sentence


def test_bad_shapes_name_the_node():
    xs = _inputs("LSTM")
    xs[2] = xs[2][:, :, :3]
    with pytest.raises(ModelError, match="LSTM node 'test_LSTM': input R has shape"):
        run_engine("LSTM", xs, {"hidden_size": H}, 3)
