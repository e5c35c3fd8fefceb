"""The output tail stays float: the last weighted layers keep a float output, what follows them is not quantized,
the int8 model still fuses every node meant to be int8 and agrees with the simulation on onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import ort_run
from qatool.convert import normalize_proto
from qatool.data.images import LoadedImages
from qatool.data.preprocess import Preprocess
from qatool.export.deploy import export_session
from qatool.quant.calibrate import calibrate_session
from qatool.quant.config import QuantConfig
from qatool.quant.prepare import TAIL_REASON, mark, output_tail
from qatool.train.session import QatSession

F = onnx.TensorProto.FLOAT


def _model(nodes, inits, outputs, seed):
    """`outputs`: {name: shape}."""
    gen = np.random.default_rng(seed)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info(name, F, shape) for name, shape in outputs.items()],
        initializer=[numpy_helper.from_array((gen.standard_normal(shape) * 0.5).astype(np.float32), k)
                     for k, shape in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def classifier(seed=0):
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (10 classes) -> Softmax."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1)]
    return _model(nodes, {"w": (8, 3, 3, 3), "b": (8,), "fc": (10, 8), "fcb": (10,)}, {"prob": ["N", 10]},
                  seed)


def two_heads(seed=0):
    """A trunk Conv read by a score head (Conv -> Sigmoid) and a box head (Conv -> Exp, a decode step)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="trunk", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "ws", "bs"], ["s"], name="score_head"),
             helper.make_node("Sigmoid", ["s"], ["scores"], name="sigmoid"),
             helper.make_node("Conv", ["r", "wb", "bb"], ["b0"], name="box_head"),
             helper.make_node("Exp", ["b0"], ["boxes"], name="decode")]
    inits = {"w": (8, 3, 3, 3), "b": (8,), "ws": (2, 8, 1, 1), "bs": (2,), "wb": (4, 8, 1, 1), "bb": (4,)}
    return _model(nodes, inits, {"scores": ["N", 2, 6, 6], "boxes": ["N", 4, 6, 6]}, seed)


def matmul_head(seed=0):
    """[N, 3, 6, 6] -> Reshape [N, 18, 6] -> MatMul (6 -> 12) -> Add bias -> Softmax: a recogniser's CTC head."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["seq"], name="to_seq"),
             helper.make_node("MatMul", ["seq", "m"], ["mm"], name="head"),
             helper.make_node("Add", ["mm", "mb"], ["logits"], name="head_bias"),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1)]
    proto = _model(nodes, {"w": (3, 3, 3, 3), "b": (3,), "m": (6, 12), "mb": (12,)},
                   {"prob": ["N", 18, 12]}, seed)
    proto.graph.initializer.append(numpy_helper.from_array(np.array([0, 18, 6], np.int64), "shape"))
    return proto


def _plan(proto, **quant):
    graph = normalize_proto(proto, for_training=True).graph
    return graph, mark(graph, QuantConfig(**quant))


def test_a_classifiers_logits_and_softmax_stay_float():
    graph, plan = _plan(classifier())
    layers = {layer.node.name: layer for layer in plan.layers}
    assert set(layers) == {"conv", "fc"}
    assert layers["fc"].float_output and not layers["conv"].float_output
    assert "logits" not in plan.quantized and "prob" not in plan.quantized
    assert ("softmax", "Softmax", TAIL_REASON) in plan.float_nodes
    assert "r" in plan.quantized  # the conv's output after its Relu: read by the pool, quantized as before
    assert plan.report()["float_output_layers"] == ["fc"]
    assert "1 with a float output" in plan.summary()


def test_quantize_tail_restores_the_quantized_tail():
    _, plan = _plan(classifier(), quantize_tail=True)
    assert not any(layer.float_output for layer in plan.layers)
    assert "logits" in plan.quantized
    assert all(why != TAIL_REASON for _, _, why in plan.float_nodes)


def test_each_head_of_a_detector_keeps_its_own_float_output():
    graph, plan = _plan(two_heads())
    tail = output_tail(graph)
    assert {"s", "scores", "b0", "boxes"} <= tail and "r" not in tail and "x" not in tail
    floats = {layer.node.name for layer in plan.layers if layer.float_output}
    assert floats == {"score_head", "box_head"}
    assert "r" in plan.quantized and not ({"s", "scores", "b0", "boxes"} & set(plan.quantized))
    assert {n for n, _, why in plan.float_nodes if why == TAIL_REASON} == {"sigmoid", "decode"}


def test_a_model_whose_graph_input_reaches_an_output_directly_keeps_that_path_float():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["y"], name="residual")]
    graph, plan = _plan(_model(nodes, {"w": (3, 3, 3, 3), "b": (3,)}, {"y": ["N", 3, 6, 6]}, 0))
    assert [layer.node.name for layer in plan.layers] == ["conv"] and plan.layers[0].float_output
    assert plan.quantized == ["x"]  # the conv's input only
    assert ("residual", "Add", TAIL_REASON) in plan.float_nodes


def _ptq(proto, out):
    graph = normalize_proto(proto, for_training=True).graph
    session = QatSession.create(graph, QuantConfig())
    gen = np.random.default_rng(0)
    images = LoadedImages(gen.integers(0, 256, (32, 6, 6, 3), dtype=np.uint8), np.zeros(32, np.int64),
                          Preprocess((6, 6), "rgb", (0.5,), (0.25,)))
    calibrate_session(session, images, max_images=32)
    x, _ = images.batch(np.arange(8))
    return session, export_session(session, out, images), x


@pytest.mark.parametrize("build, kernel", [(classifier, "QGemm"), (matmul_head, "MatMulIntegerToFloat")])
def test_a_float_output_layer_runs_as_an_integer_kernel_and_matches_the_simulation(tmp_path, build, kernel):
    session, result, x = _ptq(build(), tmp_path / "m.onnx")
    assert result.fusion.unfused == [] and result.fusion.kernels.get(kernel) == 1
    (deployed,) = ort_run(result.path, {"x": x})
    (simulated,) = session.model.forward({"x": x}, training=False)
    # no output quantizer: the two differ only by float rounding of the same integer products
    np.testing.assert_allclose(deployed, simulated, rtol=1e-4, atol=1e-6)


def test_float_output_convs_run_in_float_and_match_the_simulation(tmp_path):
    session, result, x = _ptq(two_heads(), tmp_path / "m.onnx")
    assert result.fusion.unfused == [] and result.fusion.kernels.get("QLinearConv") == 1  # the trunk only
    model = onnx.load(result.path)
    heads = [n for n in model.graph.node if n.op_type == "Conv" and n.name in ("score_head", "box_head")]
    assert len(heads) == 2
    got = ort_run(result.path, {"x": x})
    want = session.model.forward({"x": x}, training=False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
