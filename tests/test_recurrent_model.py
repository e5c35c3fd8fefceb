"""A CNN + bidirectional-LSTM CTC recogniser: its convolutions and head are quantized, the LSTM stays float between
DequantizeLinear and QuantizeLinear (onnxruntime has no QDQ kernel for it) with its weights trained in float, the
int8 model agrees with the simulation on onnxruntime, and label-free QAT trains the LSTM too."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from helpers import ort_run
from qatool import api
from qatool.convert import normalize_proto
from qatool.quant.config import QuantConfig
from qatool.quant.prepare import float_reason, mark
from qatool.train.config import TrainConfig

F = onnx.TensorProto.FLOAT
T, HIDDEN, CLASSES = 6, 5, 12


def cnn_lstm(seed=0):
    """[N, 3, 6, 6] -> Conv -> Relu -> columns as time steps [6, N, 24] -> bidirectional LSTM -> [6, N, 10] ->
    MatMul + bias (12 classes) -> Softmax: a CTC recogniser's [T, N, C] output, batch axis 1."""
    gen = np.random.default_rng(seed)

    def init(name, *shape, scale=0.5):
        return numpy_helper.from_array((gen.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["cols"], name="columns", perm=[3, 0, 1, 2]),
             helper.make_node("Reshape", ["cols", "seq_shape"], ["seq"], name="to_seq"),
             helper.make_node("LSTM", ["seq", "lw", "lr", "lb"], ["y"], name="lstm", hidden_size=HIDDEN,
                              direction="bidirectional"),
             helper.make_node("Transpose", ["y"], ["yt"], name="join", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "out_shape"], ["feat"], name="to_feat"),
             helper.make_node("MatMul", ["feat", "m"], ["mm"], name="head"),
             helper.make_node("Add", ["mm", "mb"], ["logits"], name="head_bias"),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1)]
    inits = [init("w", 4, 3, 3, 3), init("b", 4), init("lw", 2, 4 * HIDDEN, 24, scale=0.3),
             init("lr", 2, 4 * HIDDEN, HIDDEN, scale=0.3), init("lb", 2, 8 * HIDDEN, scale=0.1),
             init("m", 2 * HIDDEN, CLASSES), init("mb", CLASSES),
             numpy_helper.from_array(np.array([T, -1, 24], np.int64), "seq_shape"),
             numpy_helper.from_array(np.array([0, 0, 2 * HIDDEN], np.int64), "out_shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 3, 6, T])],
                              [helper.make_tensor_value_info("prob", F, [T, "N", CLASSES])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_the_lstm_stays_float_and_says_why_while_the_convolution_and_head_are_quantized():
    graph = normalize_proto(cnn_lstm(), for_training=True).graph
    plan = mark(graph, QuantConfig())
    assert {layer.node.name for layer in plan.layers} == {"conv", "head"}
    assert ("lstm", "LSTM", float_reason("LSTM")) in plan.float_nodes
    assert "QDQ kernel for a recurrent op" in float_reason("LSTM")
    assert "seq" in plan.source and "feat" in plan.quantized  # the LSTM reads a quantized tensor; the head too


def _lines(folder, n=12, seed=1):
    folder.mkdir()
    gen = np.random.default_rng(seed)
    for i in range(n):
        np.save(folder / f"{i:02d}.npy", gen.standard_normal((3, 6, T)).astype(np.float32))
    return folder


def test_the_int8_model_runs_the_lstm_in_float_and_matches_the_simulation(tmp_path):
    model = tmp_path / "crnn.onnx"
    onnx.save(cnn_lstm(), model)
    data = _lines(tmp_path / "lines")
    report = api.calibrate(model, data, tmp_path / "int8.onnx")
    fusion = report["export"]["fusion"]
    assert fusion["unfused"] == []
    assert {"node": "lstm", "op_type": "LSTM", "reason": float_reason("LSTM")} in fusion["float_between_qdq"]
    assert fusion["kernels"].get("QLinearConv") == 1 and fusion["kernels"].get("MatMulIntegerToFloat") == 1
    same = report["export"]["measures"]["int8_vs_simulation"]["outputs"]["prob"]
    assert same["sqnr_db"] >= 30 and same["images"] == 12
    (got,) = ort_run(tmp_path / "int8.onnx", {"x": np.load(data / "00.npy")[None]})
    assert got.shape == (T, 1, CLASSES)


def test_label_free_qat_trains_the_lstm_weights(tmp_path):
    model = tmp_path / "crnn.onnx"
    onnx.save(cnn_lstm(), model)
    data = _lines(tmp_path / "lines")
    report = api.train_quant(model, data, tmp_path / "out", val_data=data,
                             train=TrainConfig(steps=4, batch_size=4, lr=1e-2), quiet=True, echo=lambda s: None)
    assert report["steps"] == 4
    trained = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "out" / "qat.onnx").graph.initializer}
    before = {i.name: numpy_helper.to_array(i) for i in cnn_lstm().graph.initializer}
    for name in ("lw", "lr", "lb"):
        assert not np.allclose(trained[name], before[name]), name
    (got,) = ort_run(tmp_path / "out" / "model_int8.onnx", {"x": np.load(data / "00.npy")[None]})
    assert got.shape == (T, 1, CLASSES)


def test_export_int8_checks_a_time_major_output_on_random_inputs(tmp_path):
    """Without data the export's check runs random inputs; the [T, N, C] output is compared as a whole."""
    model = tmp_path / "crnn.onnx"
    onnx.save(cnn_lstm(), model)
    data = _lines(tmp_path / "lines")
    api.train_quant(model, data, tmp_path / "out", train=TrainConfig(steps=2, batch_size=4), quiet=True,
                    echo=lambda s: None)
    report = api.export_int8(tmp_path / "out" / "qat.onnx", tmp_path / "again.onnx")
    assert report["agreement"]["max_abs_diff"] < 1e-3
