"""Graphs as real exporters write them: engine forward == onnxruntime, whole-graph gradients == finite differences.

PaddlePaddle's hard-swish as Add/Clip/Mul/Div, a squeeze-and-excite block (GlobalAveragePool -> Conv -> Relu ->
Conv -> HardSigmoid -> Mul), a dynamic Reshape fed by Shape/Slice/Concat, PyTorch's ReLU6 as Clip, a residual
Add, a Softmax head; and older opsets' forms (BatchNormalization with `spatial`, Dropout with `ratio` as an
attribute, Upsample) that convert upgrades.
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qatool.engine
from helpers import assert_close_rel, ort_run

F = onnx.TensorProto.FLOAT
rng = None  # the test's own seeded generator, set for each test by conftest.py


def _init(gen, name, shape, scale=0.3):
    return numpy_helper.from_array((gen.standard_normal(shape) * scale).astype(np.float32), name)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def exporter_zoo(seed: int = 0) -> onnx.ModelProto:
    """The same weights on every call (its own generator): tests that build it compare like with like."""
    gen = np.random.default_rng(seed)
    c = 6
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Clip", ["c0", "zero", "six"], ["r0"], name="relu6"),  # PyTorch ReLU6
        # PaddlePaddle hard-swish: x * clip(x + 3, 0, 6) / 6
        helper.make_node("Add", ["r0", "three"], ["hs_a"], name="hs_add"),
        helper.make_node("Clip", ["hs_a", "zero", "six"], ["hs_c"], name="hs_clip"),
        helper.make_node("Mul", ["r0", "hs_c"], ["hs_m"], name="hs_mul"),
        helper.make_node("Div", ["hs_m", "six"], ["hs"], name="hs_div"),
        # squeeze-and-excite
        helper.make_node("GlobalAveragePool", ["hs"], ["se_p"], name="se_pool"),
        helper.make_node("Conv", ["se_p", "w_se1", "b_se1"], ["se_1"], name="se_fc1"),
        helper.make_node("Relu", ["se_1"], ["se_r"], name="se_relu"),
        helper.make_node("Conv", ["se_r", "w_se2", "b_se2"], ["se_2"], name="se_fc2"),
        helper.make_node("HardSigmoid", ["se_2"], ["se_g"], alpha=0.2, beta=0.5, name="se_gate"),
        helper.make_node("Mul", ["hs", "se_g"], ["se"], name="se_scale"),
        helper.make_node("Add", ["se", "r0"], ["res"], name="residual"),
        helper.make_node("HardSwish", ["res"], ["hsw"], name="hardswish"),
        # dynamic reshape: Shape -> Slice(batch) -> Concat(-1) -> Reshape
        helper.make_node("Shape", ["hsw"], ["shp"], name="shape"),
        helper.make_node("Slice", ["shp", "s0", "s1"], ["batch"], name="slice"),
        helper.make_node("Concat", ["batch", "minus1"], ["new_shape"], axis=0, name="concat"),
        helper.make_node("Reshape", ["hsw", "new_shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1, name="softmax"),
    ]
    inits = [_init(gen, "w0", (c, 3, 3, 3)), _init(gen, "b0", (c,), 0.1), _const("zero", 0.0), _const("six", 6.0),
             _const("three", 3.0), _init(gen, "w_se1", (2, c, 1, 1)), _init(gen, "b_se1", (2,), 0.1),
             _init(gen, "w_se2", (c, 2, 1, 1)), _init(gen, "b_se2", (c,), 0.1), _const("s0", [0], np.int64),
             _const("s1", [1], np.int64), _const("minus1", [-1], np.int64), _init(gen, "w_fc", (4, c * 5 * 5), 0.1),
             _init(gen, "b_fc", (4,), 0.1)]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("x", F, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("prob", F, ["N", 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def old_opset_model(seed: int = 1) -> onnx.ModelProto:
    """Opset 7: BatchNormalization with spatial, Dropout with a ratio attribute, Upsample with scales."""
    gen = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["bn"], spatial=1, epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"], ratio=0.3),
        helper.make_node("Upsample", ["d"], ["u"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"),
        helper.make_node("Conv", ["u", "w2"], ["y"]),
    ]
    inits = [_init(gen, "w", (4, 2, 3, 3)), _init(gen, "b", (4,), 0.1), _const("g", gen.uniform(0.5, 1.5, 4)),
             _init(gen, "beta", (4,), 0.1), _init(gen, "m", (4,), 0.1), _const("v", gen.uniform(0.5, 1.5, 4)),
             _init(gen, "w2", (3, 4, 1, 1))]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", F, [2, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", F, [2, 3, 8, 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)


@pytest.mark.parametrize("make", [exporter_zoo, old_opset_model])
def test_engine_equals_onnxruntime(make):
    proto = make()
    shape = [d.dim_value or 3 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = rng.standard_normal(shape).astype(np.float32)
    (expected,) = ort_run(proto, {"x": x})
    model = qatool.engine.load(proto)
    assert_close_rel(model.forward({"x": x})[0], expected, 1e-5, make.__name__)


@pytest.mark.parametrize("make", [exporter_zoo, old_opset_model])
def test_whole_graph_gradients(make):
    """Every parameter's gradient of sum(out * G) against central differences, float64, eval mode."""
    model = qatool.engine.load(make(), dtype=np.float64)
    shape = [d if isinstance(d, int) else 3 for d in model.graph.inputs[0].shape]
    x = rng.standard_normal(shape)
    out = model.forward({"x": x}, grad=True)[0]
    G = rng.standard_normal(out.shape)
    grads = model.backward([G])
    assert set(grads) == set(model.params) and len(grads) >= 5
    eps = 1e-6
    for name, p in model.params.items():
        for j in rng.choice(p.size, size=min(p.size, 5), replace=False):
            old = p.reshape(-1)[j]
            p.reshape(-1)[j] = old + eps
            up = float(np.sum(model.forward({"x": x})[0] * G))
            p.reshape(-1)[j] = old - eps
            down = float(np.sum(model.forward({"x": x})[0] * G))
            p.reshape(-1)[j] = old
            num = (up - down) / (2 * eps)
            assert abs(num - grads[name].reshape(-1)[j]) <= 1e-6 + 1e-5 * abs(num), (name, j)
