"""What a QAT training forward keeps for backward (issue 24): fake-quantized inputs kept as their grid codes.

A Conv or Mul whose input is a fake-quant output keeps that input's integer codes (a byte per value at 8 bits,
`ops.base.GridCodes`) instead of the float tensor, the im2col matrix or the padded copy; backward expands them
to the same floats (bit for bit but for the sign of zeros), so gradients do not change.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qatool.ops.conv as conv_ops
import qatool.ops.elementwise as elementwise_ops
from opcheck import make
from qatool.convert import normalize_proto
from qatool.ops import Context
from qatool.ops.base import GridCodes, keep_compact
from qatool.quant.config import QuantConfig
from qatool.train.recipe import _probing
from qatool.train.session import QatSession

f32 = np.float32


@pytest.mark.parametrize("bits,symmetric,dtype", [(8, 0, f32), (8, 1, f32), (4, 0, f32), (8, 0, np.float64)])
def test_grid_codes_give_back_the_fake_quant_output(bits, symmetric, dtype, rng):
    x = np.zeros((2, 3), f32)
    op = make("qatool.FakeQuant", [x, None, None, None], {"bits": bits, "symmetric": symmetric})
    state = [np.ones((), dtype), np.zeros((), dtype), np.array([np.inf, -np.inf], dtype)]
    ctx = Context(training=True)
    for scale in (1e-3, 0.37, 40.0):
        x = (rng.standard_normal((4, 5, 6)) * scale + scale / 3).astype(dtype)
        state[2][...] = [np.inf, -np.inf]  # a fresh range each time
        y = op.forward(ctx, x, *state)
        kept = keep_compact(ctx, y)
        assert isinstance(kept, GridCodes) and kept.codes.itemsize == 1
        back = kept.expand()
        assert back.dtype == y.dtype
        np.testing.assert_array_equal(back, y)  # the same values (a -0.0 of y comes back as +0.0)
        same_bits = back.view(np.uint8).reshape(back.size, -1) == y.view(np.uint8).reshape(y.size, -1)
        assert (same_bits.all(axis=1) | (y.reshape(-1) == 0)).all()  # bit for bit but for the sign of zeros
        for c in (1 / 6, 3.0, -0.37, 1e-9):  # a Mul by a constant: its output is on the grid too
            mul = make("Mul", [y, np.array(c, dtype)])
            mul.needs_grad = [True, False]
            y2 = mul.forward(ctx, y, np.array(c, dtype))
            kept2 = keep_compact(ctx, y2)
            assert isinstance(kept2, GridCodes) and kept2.factors == (dtype(c),)
            np.testing.assert_array_equal(kept2.expand(), y2)
        zero = make("Mul", [y, np.array(0, dtype)])
        assert not isinstance(keep_compact(ctx, zero.forward(ctx, y, np.array(0, dtype))), GridCodes)
    assert not isinstance(keep_compact(ctx, y.copy()), GridCodes)  # a copy: not noted as a grid
    assert keep_compact(Context(training=True, grad=False), y) is y  # no backward: nothing to compact


def _qat_net():
    """stem 3x3 conv, depthwise 3x3 (banded path), hard-swish as x * hardsigmoid(x) (two Muls), 1x1 conv."""
    r = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array((r.standard_normal(shape) * 0.3).astype(f32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Add", ["c2", "three"], ["a3"]),
        helper.make_node("Clip", ["a3", "zero", "six"], ["cl"]),
        helper.make_node("Mul", ["cl", "sixth"], ["hs"]),
        helper.make_node("Mul", ["c2", "hs"], ["sw"]),
        helper.make_node("Conv", ["sw", "w3", "b3"], ["y"]),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 8, 1, 3, 3), init("b2", 8), init("w3", 4, 8, 1, 1),
             init("b3", 4)] + [numpy_helper.from_array(np.array(v, f32), k)
                               for k, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1 / 6))]
    graph = helper.make_graph(nodes, "qat_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 20, 18])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 9])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return normalize_proto(model, for_training=True, free_batch=True).graph


def _step(session, x):
    model = session.model
    with np.errstate(all="ignore"), _probing(model) as restore:
        out = model.forward({session.input_name: x}, training=True)
        kept = {st.op.node.name: _held_bytes(st.op) for st in model._steps if st.on_grad_path}
        grads = model.backward([np.ones_like(o) for o in out])
        restore()
    return out, grads, kept


def _held_bytes(op) -> int:
    """Bytes of the arrays an op holds beyond its configuration (into GridCodes, BitMask and helper objects)."""
    seen, total = set(), 0
    todo = [v for k, v in vars(op).items() if k not in op._static]
    while todo:
        v = todo.pop()
        if isinstance(v, np.ndarray):
            if id(v) not in seen and v.base is None:
                seen.add(id(v))
                total += v.nbytes
        elif isinstance(v, (tuple, list)):
            todo.extend(v)
        elif type(v).__module__.startswith("qatool") and hasattr(v, "__dict__"):
            todo.extend(vars(v).values())
    return total


def test_fake_quantized_inputs_are_kept_as_codes_and_gradients_do_not_change(monkeypatch, rng):
    session = QatSession.create(_qat_net(), QuantConfig(), 0)
    model = session.model
    x = rng.standard_normal((2, 3, 20, 18)).astype(f32)
    _step(session, x[:1])  # observers take their first batch
    out, grads, kept = _step(session, x)
    convs = [st for st in model._steps if st.op.op_type == "Conv"]
    muls = [st for st in model._steps if st.op.op_type == "Mul"]
    # per image: the 2nd and 3rd conv and the x * h Mul keep their fake-quantized input at a byte per value;
    # the stem's input is the image (its fake-quant has no gradient path, but the codes still apply), the
    # Mul by 1/6 keeps nothing of its input
    _, _, kept1 = _step(session, x[:1])
    per_image = {k: kept[k] - kept1[k] for k in kept}
    sizes = {"stem": 3 * 20 * 18, "conv": 8 * 10 * 9, "mul": 8 * 10 * 9}
    assert per_image[convs[0].op.node.name] == sizes["stem"]
    assert per_image[convs[1].op.node.name] == sizes["conv"]
    assert per_image[convs[2].op.node.name] == sizes["conv"]
    # (x * h keeps both operands as codes: h = fake-quant(clip(x + 3)) * (1/6) is a grid times a constant)
    assert sorted(per_image[st.op.node.name] for st in muls) == [0, 2 * sizes["mul"]]
    # the same outputs and gradients, bit for bit, as keeping the floats
    identity = lambda ctx, v: v  # noqa: E731
    monkeypatch.setattr(conv_ops, "keep_compact", identity)
    monkeypatch.setattr(elementwise_ops, "keep_compact", identity)
    out_f, grads_f, kept_f = _step(session, x)
    assert sum(kept_f.values()) > sum(kept.values())
    for a, b in zip(out, out_f):
        np.testing.assert_array_equal(a, b)
    assert grads.keys() == grads_f.keys()
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads_f[k], err_msg=k)
