"""A model whose batch of 1 cannot be freed: convert records why, the engine runs it one image at a time (as
onnxruntime does), training takes batch 1 and says so, and calibrate still writes a working int8 model."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import ort_run
from qatool import api
from qatool.convert import BATCH_KEY, normalize_proto
from qatool.engine.model import Model
from qatool.errors import ModelError, UsageError
from qatool.ir.batch import FIXED_BATCH_KEY, _session, ort_run_per_image
from qatool.runtime.backends import engine_batch_size
from qatool.train.config import TrainConfig

RNG = np.random.default_rng(0)


def _softmax_over_the_image():
    """Conv -> Reshape([-1]) -> Softmax over every value -> Reshape([1, 2, 4, 4]) -> Conv: at batch N the Softmax
    would normalise over all images together, so the batch of 1 cannot be freed."""
    inits = [numpy_helper.from_array((RNG.standard_normal((2, 3, 1, 1)) * 0.5).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b"),
             numpy_helper.from_array((RNG.standard_normal((2, 2, 1, 1)) * 0.5).astype(np.float32), "w2"),
             numpy_helper.from_array(np.asarray([-1], np.int64), "all"),
             numpy_helper.from_array(np.asarray([1, 2, 4, 4], np.int64), "back")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "all"], ["v"], name="to_vector"),
             helper.make_node("Softmax", ["v"], ["p"], axis=0, name="softmax_all"),
             helper.make_node("Reshape", ["p", "back"], ["m"], name="back"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """(the model's path, a folder of .npy inputs [3, 4, 4])."""
    root = tmp_path_factory.mktemp("fixed")
    path = root / "fixed.onnx"
    onnx.save(_softmax_over_the_image(), path)
    (root / "data").mkdir()
    for i in range(12):
        np.save(root / "data" / f"{i:03d}.npy", RNG.standard_normal((3, 4, 4)).astype(np.float32))
    return path, root / "data"


def test_convert_records_why_the_batch_stays_fixed():
    r = normalize_proto(_softmax_over_the_image(), for_training=True, free_batch=True)
    assert not r.batch.freed
    why = r.graph.metadata[FIXED_BATCH_KEY]
    assert "softmax_all" in why and "\n" not in why
    assert BATCH_KEY not in r.graph.metadata and r.graph.inputs[0].shape[0] == 1
    assert any("could not be freed" in line for line in r.summary_lines())
    # A model convert frees carries no such record.
    from test_batch import _time_major_recogniser

    assert FIXED_BATCH_KEY not in normalize_proto(_time_major_recogniser(), True, free_batch=True).graph.metadata


def test_engine_runs_a_fixed_batch_one_image_at_a_time():
    model = _softmax_over_the_image()
    graph = normalize_proto(model, for_training=True, free_batch=True).graph
    engine = Model(graph)
    assert engine.fixed_batch is not None
    x = RNG.standard_normal((3, 3, 4, 4)).astype(np.float32)
    got = engine.forward({"x": x})[0]
    want = ort_run_per_image(_session(model), {"x": x})[0]
    assert got.shape == (3, 2, 4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # intermediate values too (calibration asks for them): joined on their batch axis
    v, = engine.forward({"x": x}, outputs=["p"])
    assert v.shape == (3, 32)  # [32] per image, no axis of size 1: stacked on a new axis 0
    with pytest.raises(ModelError, match="could not be freed .*softmax_all.*one image at a time, not 2"):
        engine.forward({"x": x[:2]}, training=True)
    engine.forward({"x": x[:1]}, training=True)  # batch 1 trains
    assert engine.backward([np.ones((1, 2, 4, 4), np.float32)])

    class Data:
        def batch(self, index):
            return x[index], None

        def input_bytes(self):
            return x[0].nbytes

    assert engine_batch_size(engine, Data()) == 1


def test_calibrate_a_fixed_batch_model_image_by_image(fixed, tmp_path):
    path, data = fixed
    lines = []
    report = api.calibrate(path, data, tmp_path / "int8.onnx", images=12, echo=lines.append)
    int8 = onnx.load(tmp_path / "int8.onnx")
    onnx.checker.check_model(int8)
    assert [d.dim_value for d in int8.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 4, 4]
    fusion = report["export"]["fusion"]
    assert fusion["unfused"] == [] and fusion["fused"] == fusion["expected"] >= 1, fusion
    x = np.load(data / "000.npy")[None]
    got = ort_run(int8, {"x": x})[0]
    want = ort_run(onnx.load(path), {"x": x})[0]
    assert got.shape == want.shape and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9


def test_train_quant_a_fixed_batch_model_at_batch_1(fixed, tmp_path):
    path, data = fixed
    lines = []
    report = api.train_quant(path, data, tmp_path, val_data=data, train=TrainConfig(steps=2, lr=1e-3),
                             echo=lines.append, quiet=True)
    assert report["batch_size"] == 1
    assert any(line.startswith("batch 1: the model's batch of 1 could not be freed") for line in lines), lines
    with pytest.raises(UsageError, match="--batch-size 4: the model's batch of 1 could not be freed"):
        api.train_quant(path, data, tmp_path / "b4", train=TrainConfig(steps=2, batch_size=4), echo=lambda s: None,
                        quiet=True)


def test_step_time_probes_a_fixed_batch_at_batch_1_only():
    """The label-free run's length probe steps at batch 1 only (batch 2 would be refused)."""
    from types import SimpleNamespace

    from qatool.train.footprint import step_time

    engine = Model(normalize_proto(_softmax_over_the_image(), for_training=True, free_batch=True).graph)
    x = RNG.standard_normal((4, 3, 4, 4)).astype(np.float32)

    class Data:
        groups = [np.arange(4)]

        def item_shape(self, i):
            return x.shape[1:]

        def batch(self, index):
            return x[index], None

    probe = step_time(SimpleNamespace(model=engine, input_name="x"), Data(), ["y"])
    assert probe.per_image == 0.0 and probe.fixed > 0
