"""A CNN + bidirectional-LSTM CTC recogniser: its convolutions and head are quantized, the LSTM stays float between
DequantizeLinear and QuantizeLinear (onnxruntime has no QDQ kernel for it) with its weights trained in float, the
int8 model agrees with the simulation on onnxruntime, and label-free QAT trains the LSTM too. With
`recurrent: dynamic` the LSTM becomes onnxruntime's DynamicQuantizeLSTM, and the int8 model computes exactly what
the simulation computed, one input at a time."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from helpers import ort_run
from test_errors import assert_clean_error, run_cli

from qatool import api
from qatool.convert import normalize_proto
from qatool.errors import ConfigError
from qatool.quant.config import QuantConfig
from qatool.quant.prepare import DYNAMIC_REASON, float_reason, mark
from qatool.train.config import TrainConfig

F = onnx.TensorProto.FLOAT
T, HIDDEN, CLASSES = 6, 5, 12
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def cnn_lstm(seed=0, op="LSTM"):
    """[N, 3, 6, 6] -> Conv -> Relu -> columns as time steps [6, N, 24] -> bidirectional LSTM -> [6, N, 10] ->
    MatMul + bias (12 classes) -> Softmax: a CTC recogniser's [T, N, C] output, batch axis 1. `op`: a GRU or RNN
    in the LSTM's place."""
    gen = np.random.default_rng(seed)
    gates = GATES[op]

    def init(name, *shape, scale=0.5):
        return numpy_helper.from_array((gen.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["cols"], name="columns", perm=[3, 0, 1, 2]),
             helper.make_node("Reshape", ["cols", "seq_shape"], ["seq"], name="to_seq"),
             helper.make_node(op, ["seq", "lw", "lr", "lb"], ["y"], name="lstm", hidden_size=HIDDEN,
                              direction="bidirectional"),
             helper.make_node("Transpose", ["y"], ["yt"], name="join", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "out_shape"], ["feat"], name="to_feat"),
             helper.make_node("MatMul", ["feat", "m"], ["mm"], name="head"),
             helper.make_node("Add", ["mm", "mb"], ["logits"], name="head_bias"),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1)]
    inits = [init("w", 4, 3, 3, 3), init("b", 4), init("lw", 2, gates * HIDDEN, 24, scale=0.3),
             init("lr", 2, gates * HIDDEN, HIDDEN, scale=0.3), init("lb", 2, 2 * gates * HIDDEN, scale=0.1),
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


# ---- recurrent: dynamic ------------------------------------------------------------------------------------------
def test_dynamic_places_the_lstm_as_dynamicquantizelstm_and_says_so():
    graph = normalize_proto(cnn_lstm(), for_training=True).graph
    plan = mark(graph, QuantConfig(recurrent="dynamic"))
    assert [n.name for n in plan.dynamic_recurrent] == ["lstm"]
    assert all(name != "lstm" for name, _, _ in plan.float_nodes)
    assert {layer.node.name for layer in plan.layers} == {"conv", "head"}
    assert plan.report()["dynamic_recurrent"] == [
        {"node": "lstm", "op_type": "LSTM", "kernel": "DynamicQuantizeLSTM", "reason": DYNAMIC_REASON}]
    assert "1 LSTM as DynamicQuantizeLSTM" in plan.summary()
    excluded = mark(graph, QuantConfig(recurrent="dynamic", exclude=["lstm"]))
    assert not excluded.dynamic_recurrent and ("lstm", "LSTM", "excluded by --exclude") in excluded.float_nodes


def test_a_dynamic_lstm_ends_the_output_tail():
    """A model that ends with its LSTM: as a weighted layer the dynamic LSTM keeps the convolution before it
    int8 (in float mode the convolution is the last weighted layer, its output float)."""
    model = cnn_lstm()
    del model.graph.node[5:]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", F, [T, 2, "N", HIDDEN]))
    graph = normalize_proto(model, for_training=True).graph
    (conv,) = mark(graph, QuantConfig()).layers
    assert conv.float_output
    plan = mark(graph, QuantConfig(recurrent="dynamic"))
    assert not plan.layers[0].float_output and [n.name for n in plan.dynamic_recurrent] == ["lstm"]


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_dynamic_without_an_lstm_is_refused_in_one_line(op):
    graph = normalize_proto(cnn_lstm(op=op), for_training=True).graph
    with pytest.raises(ConfigError, match=f"no LSTM, and onnxruntime has no dynamically quantized {op} kernel"):
        mark(graph, QuantConfig(recurrent="dynamic"))
    plan = mark(graph, QuantConfig())  # float: it stays float, as before
    assert ("lstm", op, float_reason(op)) in plan.float_nodes
    assert f"no dynamically quantized {op} kernel" in float_reason(op, "dynamic")  # beside an LSTM, it says so


def test_cli_dynamic_on_a_model_without_lstm(capsys, tmp_path, lenet):
    data = _lines(tmp_path / "lines")
    code, _, err = run_cli(capsys, "calibrate", lenet, "--data", data, "-o", tmp_path / "int8.onnx",
                           "--recurrent", "dynamic")
    assert_clean_error(code, err, 1, "--recurrent dynamic: the model has no LSTM")
    assert not (tmp_path / "int8.onnx").exists()
    model = tmp_path / "crnn_gru.onnx"
    onnx.save(cnn_lstm(op="GRU"), model)
    code, _, err = run_cli(capsys, "train-quant", model, "--train-data", data, "-o", tmp_path / "out",
                           "--recurrent", "dynamic", "--steps", "1", "-q")
    assert_clean_error(code, err, 1, "no dynamically quantized GRU kernel")


def _dynamic_lstm_nodes(path):
    return [n for n in onnx.load(path).graph.node if n.op_type == "DynamicQuantizeLSTM"]


def test_calibrate_dynamic_exports_dynamicquantizelstm_that_computes_the_simulation(capsys, tmp_path):
    from qatool.cli import main

    model = tmp_path / "crnn.onnx"
    onnx.save(cnn_lstm(), model)
    data = _lines(tmp_path / "lines")
    report = api.calibrate(model, data, tmp_path / "int8.onnx", quant=QuantConfig(recurrent="dynamic"))
    (node,) = _dynamic_lstm_nodes(tmp_path / "int8.onnx")
    assert node.domain == "com.microsoft" and node.name == "lstm" and len(node.input) == 12
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "int8.onnx").graph.initializer}
    w, w_scale = inits[node.input[1]], inits[node.input[8]]
    assert w.dtype == np.int8 and w.shape == (2, 24, 4 * HIDDEN) and w_scale.shape == (2, 4 * HIDDEN)
    fusion = report["export"]["fusion"]
    assert fusion["unfused"] == [] and fusion["kernels"]["DynamicQuantizeLSTM"] == 1
    assert fusion["kernels"]["QLinearConv"] == 1 and fusion["float_between_qdq"] == []
    assert report["placement"]["dynamic_recurrent"][0]["node"] == "lstm"
    same = report["export"]["measures"]["int8_vs_simulation"]["outputs"]["prob"]
    assert same["seq_agreement"] == 1.0 and same["sqnr_db"] >= 100 and same["images"] == 12
    assert any("one input at a time" in note for note in report["export"]["notes"])
    # onnxruntime given a batch quantizes over all of it: close to, not equal to, one input at a time
    x = np.stack([np.load(data / f"{i:02d}.npy") for i in range(4)])
    alone = np.concatenate([ort_run(tmp_path / "int8.onnx", {"x": x[i:i + 1]})[0] for i in range(4)], axis=1)
    (batched,) = ort_run(tmp_path / "int8.onnx", {"x": x})
    assert 0 < np.abs(batched - alone).max() < 0.05
    main_code = None
    try:
        main(["calibrate", str(model), "--data", str(data), "-o", str(tmp_path / "cli.onnx"), "--recurrent", "dynamic"])
    except SystemExit as e:
        main_code = e.code
    out = capsys.readouterr().out
    assert main_code in (None, 0), out
    assert "int8: lstm (LSTM): onnxruntime's DynamicQuantizeLSTM" in out and "DynamicQuantizeLSTM 1" in out


def test_train_quant_dynamic_trains_the_lstm_and_exports_it(tmp_path):
    model = tmp_path / "crnn.onnx"
    onnx.save(cnn_lstm(), model)
    data = _lines(tmp_path / "lines")
    report = api.train_quant(model, data, tmp_path / "out", val_data=data, quant=QuantConfig(recurrent="dynamic"),
                             train=TrainConfig(steps=4, batch_size=4, lr=1e-2), quiet=True, echo=lambda s: None)
    assert report["steps"] == 4 and report["placement"]["dynamic_recurrent"][0]["node"] == "lstm"
    trained = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "out" / "qat.onnx").graph.initializer}
    before = {i.name: numpy_helper.to_array(i) for i in cnn_lstm().graph.initializer}
    for name in ("lw", "lr", "lb"):
        assert not np.allclose(trained[name], before[name]), name
    assert len(_dynamic_lstm_nodes(tmp_path / "out" / "model_int8.onnx")) == 1
    same = report["export"]["measures"]["int8_vs_simulation"]["outputs"]["prob"]
    assert same["seq_agreement"] == 1.0 and same["sqnr_db"] >= 100
    again = api.export_int8(tmp_path / "out" / "qat.onnx", tmp_path / "again.onnx")
    assert len(_dynamic_lstm_nodes(tmp_path / "again.onnx")) == 1
    assert again["dynamic_recurrent"][0]["node"] == "lstm"
    assert again["measures"]["int8_vs_simulation"]["outputs"]["prob"]["sqnr_db"] >= 100
    # the LSTM's own output: onnxruntime, one input at a time, equals the simulation bit for bit
    from qatool.train.checkpoint import load_checkpoint
    from qatool.train.session import QatSession

    session = QatSession.from_checkpoint(load_checkpoint(tmp_path / "out" / "qat.onnx"))
    x = np.stack([np.load(data / f"{i:02d}.npy") for i in range(4)])
    (simulated,) = session.model.forward({session.input_name: x}, outputs=["y"])
    exported = onnx.load(tmp_path / "again.onnx")
    exported.graph.output.append(helper.make_empty_tensor_value_info("y"))
    # graph optimisations off: with "y" a graph output, onnxruntime's optimiser moves the QuantizeLinear that
    # follows Transpose -> Reshape in front of them and returns "y" quantized (the model's own output is unchanged)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(exported.SerializeToString(), so, providers=["CPUExecutionProvider"])
    deployed = np.concatenate([sess.run(["y"], {"x": x[i:i + 1]})[0] for i in range(4)], axis=2)
    np.testing.assert_array_equal(simulated, deployed)


def test_config_file_key(tmp_path):
    from qatool.train.config import load_config_file, split_config

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("recurrent: dynamic\n")
    bad.write_text("recurrent: sideways\n")
    quant, _, _ = split_config(load_config_file(good))
    assert QuantConfig(**quant).recurrent == "dynamic"
    with pytest.raises(ConfigError, match="recurrent"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="recurrent must be one of float, dynamic"):
        QuantConfig(recurrent="sideways")
