"""`convert` on the real architectures of onnx's light models and on hand-made graphs."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qatool.engine
from helpers import LIGHT_DIR, LIGHT_MODELS, assert_close_rel, ort_run, randomize_weights
from qatool import api
from qatool.convert import normalize_proto
from qatool.ir.graph import to_onnx
from qatool.ir.io import load_proto


def _feed(graph, seed=0):
    rng = np.random.default_rng(seed)
    (inp,) = graph.inputs
    return {inp.name: rng.standard_normal(inp.static_shape()).astype(np.float32)}


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_engine_matches_onnxruntime(name, tmp_path):
    """convert --for-training, random weights: engine eval outputs == onnxruntime's; inference convert too."""
    src = load_proto(LIGHT_DIR / f"light_{name}.onnx")
    result = normalize_proto(src, for_training=True)
    graph = result.graph
    assert graph.opset >= 13
    assert "ConstantOfShape" not in graph.op_counts(), "weights made by ConstantOfShape should be folded"
    assert result.trainable, "trainable parameters were not found"
    randomize_weights(graph)
    feeds = _feed(graph)
    expected = ort_run(to_onnx(graph), feeds)
    model = qatool.engine.Model(graph)
    got = model.forward(feeds, training=False)
    for g, e in zip(got, expected):
        assert_close_rel(g, e, 1e-4, f"{name} engine vs onnxruntime")
    # The inference form (BN folded, Dropout removed) computes the same thing.
    inference = normalize_proto(to_onnx(graph), for_training=False).graph
    assert "Dropout" not in inference.op_counts()
    for g, e in zip(ort_run(to_onnx(inference), feeds), expected):
        assert_close_rel(g, e, 1e-4, f"{name} inference convert vs training form")


@pytest.mark.parametrize("for_training", [False, True])
def test_convert_preserves_outputs_and_names(for_training, tmp_path):
    src_path = LIGHT_DIR / "light_squeezenet.onnx"
    out = tmp_path / "out.onnx"
    api.convert(src_path, out, for_training=for_training)
    before, after = onnx.load(src_path), onnx.load(out)
    onnx.checker.check_model(after)
    data_inputs = [i.name for i in before.graph.input if i.name not in {t.name for t in before.graph.initializer}]
    assert [i.name for i in after.graph.input] == data_inputs
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    feeds = {data_inputs[0]: np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    for g, e in zip(ort_run(after, feeds), ort_run(before, feeds)):
        assert_close_rel(g, e, 1e-4, "converted vs original")
    ops = {n.op_type for n in after.graph.node}
    assert ("Dropout" in ops) == for_training
    meta = {p.key for p in after.metadata_props}
    assert ("qatool.trainable" in meta) == for_training


def _conv_bn_model(consumers_of_conv=1):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    bn = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
          [(rng.uniform(0.5, 2, 4), "g"), (rng.standard_normal(4), "beta"), (rng.standard_normal(4), "m"),
           (rng.uniform(0.5, 2, 4), "v")]]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["y"], epsilon=1e-3),
             helper.make_node("Dropout", ["y"], ["z"])]
    outputs = [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4, 5, 5])]
    if consumers_of_conv > 1:
        outputs.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2, 4, 5, 5]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 5, 5])],
                              outputs, initializer=[w, b, *bn])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_bn_fold_count_and_numerics():
    model = _conv_bn_model()
    result = normalize_proto(model, for_training=False)
    assert result.folded_bn and not result.kept_bn
    assert result.graph.op_counts() == {"Conv": 1}
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 5, 5)).astype(np.float32)}
    for g, e in zip(ort_run(to_onnx(result.graph), feeds), ort_run(model, feeds)):
        assert_close_rel(g, e, 1e-5, "folded")


def test_bn_fold_refused_when_conv_output_is_shared():
    result = normalize_proto(_conv_bn_model(consumers_of_conv=2), for_training=False)
    assert not result.folded_bn
    assert result.kept_bn and "other consumers" in result.kept_bn[0][1]
    assert result.graph.op_counts()["BatchNormalization"] == 1


def test_constant_subgraph_folds_static_reshape():
    """Shape -> Gather -> Concat -> Reshape on static dims folds to a constant shape; the engine runs it."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["i1"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Constant", [], ["i2"], value=numpy_helper.from_array(np.array(2, np.int64))),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["d2"], axis=0),
        helper.make_node("Mul", ["d1", "d2"], ["p"]),
        helper.make_node("Unsqueeze", ["p", "ax"], ["pu"]),
        helper.make_node("Concat", ["neg1", "pu"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "neg1")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 12])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    result = normalize_proto(model, for_training=True)
    assert result.graph.op_counts() == {"Reshape": 1}
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)}
    got = qatool.engine.Model(result.graph).forward(feeds)[0]
    np.testing.assert_array_equal(got, feeds["x"].reshape(5, 12))


@pytest.mark.parametrize("name", ["lenet_bn", "mobilenetv2_small"])
def test_sample_models_engine_matches_onnxruntime_on_real_digits(name, digits):
    """The sample models (trained weights, real images): engine eval == onnxruntime on the original file."""
    from helpers import SAMPLE_DIR
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess

    path = SAMPLE_DIR / f"{name}.onnx"
    model = qatool.engine.load(path)
    images = ImageDataset.open(digits[1]).load(resolve_preprocess(model.graph))
    x, _ = images.batch(np.arange(len(images)))
    (expected,) = ort_run(str(path), {model.input_names[0]: x})
    assert_close_rel(model.forward({model.input_names[0]: x})[0], expected, 1e-4, name)
    inference = normalize_proto(load_proto(path), for_training=False).graph
    assert {"BatchNormalization", "Dropout"}.isdisjoint(inference.op_counts())
    assert_close_rel(ort_run(to_onnx(inference), {model.input_names[0]: x})[0], expected, 1e-4, f"{name} folded")
