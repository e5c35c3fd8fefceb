"""Any model, no labels: train-quant on a probability-map model (image folder) and on a CTC sequence model (a .npy
folder of two input widths), judged against the float model; bad inputs get one clear line."""

import json

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from helpers import SAMPLE_DIR, ort_run
from qatool import api
from qatool.train.config import TrainConfig

SCHEMA = json.loads((SAMPLE_DIR.parent / "schemas" / "train-report.schema.json").read_text())
QUIET = dict(echo=lambda s: None, quiet=True)


def _save(nodes, inputs, outputs, inits, path, metadata=None):
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)
    return path


@pytest.fixture(scope="module")
def map_model(tmp_path_factory):
    """A tiny text-detector-like model: two convolutions and a Sigmoid map [N, 1, 16, 16] (bright blobs light up)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("map") / "map.onnx"
    w1 = rng.standard_normal((4, 1, 3, 3)) * 0.5
    w2 = np.abs(rng.standard_normal((1, 4, 3, 3))) * 0.3
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["z"], ["map"])]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                 [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, 16, 16])],
                 {"w1": w1, "b1": np.zeros(4), "w2": w2, "b2": np.full(1, -1.5)}, path)


@pytest.fixture(scope="module")
def blob_images(tmp_path_factory):
    """Flat folders of gray 16x16 images with a bright rectangle: data without labels."""
    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(1)
    for split, n in (("train", 48), ("val", 16)):
        (root / split).mkdir()
        for i in range(n):
            a = (rng.random((16, 16)) * 40).astype(np.uint8)
            y, x = rng.integers(0, 10, 2)
            a[y:y + rng.integers(3, 7), x:x + rng.integers(3, 7)] = 220
            Image.fromarray(a).save(root / split / f"{i:03d}.png")
    return root / "train", root / "val"


def test_probability_map_model_trains_without_labels(map_model, blob_images, tmp_path):
    train, val = blob_images
    report = api.train_quant(map_model, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=8, batch_size=8, lr=0.01), **QUIET)
    jsonschema.validate(report, SCHEMA)
    assert [t["kind"] for t in report["tasks"]] == ["probability_map"]
    assert report["tasks"][0]["loss"] == "nmse"
    v = report["val"]
    assert v["top1_int8"] is None and v["measure"] == "map: map_iou"
    assert [c["step"] for c in v["checkpoints"]] == [0, 2, 4, 6, 8]
    assert all("score" in c and "map" in c["measures"] for c in v["checkpoints"])
    m = v["measures"]
    assert 0.5 < m["int8"]["outputs"]["map"]["map_iou"] <= 1.0
    # the contract: the simulation computes what onnxruntime runs
    assert m["int8_vs_simulation"]["outputs"]["map"]["sqnr_db"] >= 30
    assert abs(v["score_int8"] - v["score_simulation"]) <= 0.002
    # keep best: the int8 model is never worse than the start on the validation images
    assert v["score_int8"] >= v["start_score"] - 1e-9
    on_disk = json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)  # standard JSON
    again = api.train_quant(map_model, train, tmp_path, val_data=val, train=TrainConfig(steps=3, batch_size=8),
                            **QUIET)  # a fresh run in the same folder: a fresh metrics log
    assert again["steps"] == 3 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert on_disk["val"]["measure"] == v["measure"]
    int8 = onnx.load(tmp_path / "model_int8.onnx")
    assert [i.name for i in int8.graph.input] == ["x"] and [o.name for o in int8.graph.output] == ["map"]
    x = np.random.default_rng(2).random((2, 1, 16, 16)).astype(np.float32)
    assert ort_run(int8, {"x": x})[0].shape == (2, 1, 16, 16)


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory):
    """A tiny CTC recogniser: Conv over [N, 1, 8, W], mean over the height, a MatMul to 5 classes per column and a
    Softmax over the last axis: [N, W, 5]; its metadata names the characters (index 0 is the blank)."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("ctc") / "ctc.onnx"
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2], keepdims=0),
             helper.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "fc"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, "W"])],
                 [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "W", 5])],
                 {"w": rng.standard_normal((6, 1, 3, 3)), "b": np.zeros(6), "fc": rng.standard_normal((6, 5)) * 2},
                 path, {"character": "a\nb\nc\nd"})


@pytest.fixture(scope="module")
def npy_inputs(tmp_path_factory):
    """Folders of .npy input tensors of two widths (12 and 16): batched by shape."""
    root = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(4)
    for split, n in (("train", 24), ("val", 10)):
        (root / split).mkdir()
        for i in range(n):
            np.save(root / split / f"{i:03d}.npy", rng.standard_normal((1, 8, 12 if i % 3 else 16)).astype(np.float32))
    return root / "train", root / "val"


def test_ctc_model_trains_on_tensor_folders_of_two_shapes(ctc_model, npy_inputs, tmp_path):
    train, val = npy_inputs
    lines = []
    report = api.train_quant(ctc_model, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=6, batch_size=4), echo=lines.append, quiet=True)
    jsonschema.validate(report, SCHEMA)
    [task] = report["tasks"]
    assert task["kind"] == "sequence" and task["loss_tensor"] == "logits" and task["loss"] == "kl"
    assert any("a CTC sequence of 5 classes" in ln and "4 characters" in ln for ln in lines)
    assert lines[0].startswith("label-free QAT: the model learns to reproduce its float model, because the model's "
                               "first output 'probs'")
    assert report["config"]["preprocess"] is None  # the tensors are used as they are
    out = report["val"]["measures"]["int8"]["outputs"]["probs"]
    assert out["primary"] == "seq_agreement" and 0 <= out["seq_agreement"] <= 1 and out["images"] == 10
    assert report["val"]["measures"]["int8_vs_simulation"]["outputs"]["probs"]["sqnr_db"] >= 30


def test_free_widths_padded_to_a_multiple_share_a_batch(ctc_model, npy_inputs, tmp_path):
    train, _ = npy_inputs  # widths 12 and 16: one size once padded to a multiple of 32
    lines = []
    report = api.train_quant(ctc_model, train, tmp_path, train=TrainConfig(steps=2, batch_size=24, pad_multiple=32),
                             echo=lines.append, quiet=True)
    assert report["config"]["train"]["pad_multiple"] == 32
    assert any("24 training input tensors (1 size, free sizes padded to a multiple of 32)" in ln for ln in lines)


def test_tail_inputs_are_distilled_as_features(ctc_model, npy_inputs, tmp_path):
    from qatool.convert import normalize_proto
    from qatool.ir.io import load_proto
    from qatool.quant.config import QuantConfig
    from qatool.train.objective import feature_tasks
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(ctc_model), for_training=True, free_batch=True).graph
    plan = QatSession.create(graph, QuantConfig(), 0).plan
    [feature] = feature_tasks(plan, graph, "tail-inputs")
    assert feature.loss_tensor == "t" and feature.kind == "tensor"  # the final MatMul's input
    assert feature_tasks(plan, graph, "none") == []
    train, val = npy_inputs
    lines = []
    report = api.train_quant(ctc_model, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=3, batch_size=4, distill_features="tail-inputs"),
                             echo=lines.append, quiet=True)
    assert "nmse on 1 input of the last weighted layers" in report["objective"]
    assert any(ln.startswith("feature t: the input of") for ln in lines)
    assert [t["output"] for t in report["tasks"]] == ["probs"]  # judged on the outputs only
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    plain = tmp_path / "plain"
    api.train_quant(ctc_model, train, plain, val_data=val, train=TrainConfig(steps=3, batch_size=4),
                    echo=lambda m: None, quiet=True)
    # the same first batch, teacher and start: the features add their loss to the outputs'
    assert first["loss"] > json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_bad_inputs_get_one_line_and_no_output(capsys, ctc_model, map_model, npy_inputs, tmp_path):
    from test_errors import assert_clean_error, run_cli

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    code, _, err = run_cli(capsys, "train-quant", map_model, "--train-data", empty, "-o", tmp_path / "o1")
    assert_clean_error(code, err, 1, "empty holds no images")
    train, _ = npy_inputs  # [1, 8, W] tensors for a model that takes [N, 1, 16, 16]
    code, _, err = run_cli(capsys, "train-quant", map_model, "--train-data", train, "-o", tmp_path / "o2")
    assert_clean_error(code, err, 1, "holds a tensor of shape [1, 8, ")
    assert "takes [N, 1, 16, 16]" in err
    code, _, err = run_cli(capsys, "train-quant", ctc_model, "--train-data", train, "-o", tmp_path / "o3",
                           "--distill-outputs", "nope")
    assert_clean_error(code, err, 2, "--distill-outputs nope: the model has no output of that name (its outputs: "
                                     "probs)")
    assert not any((tmp_path / o / f).exists() for o in ("o1", "o2", "o3") for f in ("qat.onnx", "model_int8.onnx"))


def test_a_model_exported_at_batch_one_trains_at_batch_eight_and_keeps_its_declared_shapes(blob_images, tmp_path):
    """A fixed batch of 1 (the input's shape and a Reshape constant) is freed at convert: teacher, validation
    and checks run at batch 8, and the int8 model declares [1, 1, 16, 16] again."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["z", "shape"], ["flat"]),
             helper.make_node("Sigmoid", ["flat"], ["s"]),
             helper.make_node("Reshape", ["s", "back"], ["map"])]
    path = _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
                 [helper.make_tensor_value_info("map", TensorProto.FLOAT, [1, 1, 16, 16])],
                 {"w1": rng.standard_normal((4, 1, 3, 3)) * 0.5, "b1": np.zeros(4),
                  "w2": np.abs(rng.standard_normal((1, 4, 3, 3))) * 0.3, "b2": np.full(1, -1.5)},
                 tmp_path / "b1.onnx")
    model = onnx.load(path)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([1, 256], np.int64), "shape"),
                                    numpy_helper.from_array(np.array([1, 1, 16, 16], np.int64), "back")])
    onnx.save(model, path)
    train, val = blob_images
    report = api.train_quant(path, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=4, batch_size=8),
                             **QUIET)
    assert report["val"]["measures"]["int8_vs_simulation"]["outputs"]["map"]["sqnr_db"] >= 30
    int8 = onnx.load(tmp_path / "out" / "model_int8.onnx")
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (int8.graph.input[0], int8.graph.output[0])]
    assert dims == [[1, 1, 16, 16], [1, 1, 16, 16]]
    x = np.random.default_rng(6).random((1, 1, 16, 16)).astype(np.float32)
    assert ort_run(int8, {"x": x})[0].shape == (1, 1, 16, 16)  # the user's pipeline calls it as before


def test_a_detectors_joined_boxes_and_scores_train_per_field(capsys, blob_images, tmp_path):
    """YOLOX's one output, small: box values beside Sigmoid scores in [N, anchors, 6]. Each field is normalised on
    its own (the loss and the checkpoint measure), the int8 model matches the simulation, and eval reports the
    fields' SQNR."""
    from test_errors import run_cli

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "wb", "bb"], ["box"]),
             helper.make_node("Conv", ["r", "ws", "bs"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["score"]),
             helper.make_node("Concat", ["box", "score"], ["joined"], axis=1),
             helper.make_node("Reshape", ["joined", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["rows"], perm=[0, 2, 1])]
    path = _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                 [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 256, 6])],
                 {"w1": rng.standard_normal((4, 1, 3, 3)) * 0.5, "b1": np.zeros(4),
                  "wb": rng.standard_normal((4, 4, 1, 1)) * 20, "bb": np.full(4, 30.0),
                  "ws": rng.standard_normal((2, 4, 1, 1)), "bs": np.full(2, -2.0)}, tmp_path / "det.onnx")
    model = onnx.load(path)
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 6, -1], np.int64), "shape"))
    onnx.save(model, path)
    train, val = blob_images
    report = api.train_quant(path, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=4, batch_size=8),
                             **QUIET)
    jsonschema.validate(report, SCHEMA)
    [task] = report["tasks"]
    assert task["kind"] == "rows" and task["loss"] == "nmse per field" and task["options"]["field_axis"] == 2
    v = report["val"]
    assert v["measure"] == "mean SQNR (dB)"
    rows = v["measures"]["int8"]["outputs"]["rows"]
    assert rows["primary"] == "field_sqnr_db" and len(rows["field_sqnr_dbs"]) == 6
    assert v["score_int8"] == pytest.approx(rows["field_sqnr_db"])
    assert v["measures"]["int8_vs_simulation"]["outputs"]["rows"]["worst_field_sqnr_db"] >= 30
    assert v["score_int8"] >= v["start_score"] - 1e-9
    code, out, err = run_cli(capsys, "eval", path, tmp_path / "out" / "model_int8.onnx", "--data", val,
                             "--no-latency")
    assert code == 0, err
    assert "rows" in out and "field_sqnr_db" in out


def test_calibrate_and_eval_without_labels(capsys, map_model, blob_images, tmp_path):
    """`calibrate` and `eval` take the same unlabelled data and print the task measures instead of top-1."""
    from test_errors import run_cli

    train, val = blob_images
    code, out, err = run_cli(capsys, "calibrate", map_model, "--data", train, "--val-data", val,
                             "-o", tmp_path / "ptq.onnx")
    assert code == 0, err
    assert "int8 (onnxruntime) against float on" in out and "map: map_iou" in out and "no top-1" not in out
    assert "calibrating (average)" in out  # without labels, the label-free recipe's method
    report = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", map_model, tmp_path / "ptq.onnx", "--data", val, "--json", report,
                             "--no-latency")
    assert code == 0, err
    assert "probability_map" in out and "ptq.onnx (ort" in out and "map_iou" in out
    data = json.loads(report.read_text())
    jsonschema.validate(data, json.loads((SAMPLE_DIR.parent / "schemas" / "eval-report.schema.json").read_text()))
    first, second = data["results"]
    assert first["outputs"] is None and second["measure"] == "map: map_iou"
    assert 0.5 < second["score"] <= 1 and second["outputs"]["map"]["images"] == 16


def test_the_default_batch_fits_the_step_memory_budget(map_model, blob_images, tmp_path):
    """Two probe steps (batch 1 and 2) measure what one image's training step holds; the default batch is the
    largest that fits the budget, at most 64 (8 for a label-free run), and the run says why."""
    from qatool.convert import normalize_proto
    from qatool.data import open_dataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from qatool.quant.config import QuantConfig
    from qatool.train.footprint import DEFAULT_BATCH, DISTILL_BATCH, choose_batch, step_time
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(map_model), for_training=True).graph
    session = QatSession.create(graph, QuantConfig())
    train, _ = blob_images
    data = open_dataset(train, labelled=False).load(resolve_preprocess(graph))
    state = {k: v.copy() for k, v in session.model.state.items()}
    free = choose_batch(session, data, ["map"])
    # the step keeps at least the 4 x 16 x 16 float32 values of the first convolution (and its Relu) per image
    assert free.batch_size == DEFAULT_BATCH and free.bytes_per_image >= 2 * 4 * 16 * 16 * 4
    tight = choose_batch(session, data, ["map"], budget=int(5.5 * free.bytes_per_image))
    assert tight.batch_size == 5 and "5 fit the" in tight.summary()
    assert all(np.array_equal(v, state[k]) for k, v in session.model.state.items())  # the probes left no trace
    timed = step_time(session, data, ["map"])
    assert timed.per_image >= 0 and timed.fixed >= 0 and timed.seconds(4) > 0
    assert all(np.array_equal(v, state[k]) for k, v in session.model.state.items())
    capped = choose_batch(session, data, ["map"], limit=DISTILL_BATCH)
    assert capped.batch_size == DISTILL_BATCH and "the label-free default, at most 8" in capped.summary()
    lines = []
    report = api.train_quant(map_model, train, tmp_path, train=TrainConfig(steps=1), echo=lines.append, quiet=True)
    # a label-free run: the largest batch that fits, at most DISTILL_BATCH (its length is bounded by time)
    assert report["batch_size"] == DISTILL_BATCH and report["config"]["batch"]["bytes_per_image"] > 0
    assert report["config"]["batch"]["limit"] == DISTILL_BATCH < DEFAULT_BATCH
    assert any(ln.startswith("batch 8 (the label-free default, at most 8") for ln in lines)


def test_a_users_metric_chooses_the_checkpoint(map_model, blob_images, tmp_path):
    """--metric FILE.py:FUNCTION: the image-weighted mean of the function's batch scores is each checkpoint's
    score, and it is what the report calls the measure."""
    metric = tmp_path / "mine.py"
    metric.write_text("import numpy as np\n\n"
                      "def lit(outputs, batch):\n"
                      "    assert batch.ndim == 4 and set(outputs) == {'map'}\n"
                      "    return float((outputs['map'] > 0.5).mean())\n")
    train, val = blob_images
    report = api.train_quant(map_model, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=4),
                             metric=f"{metric}:lit", **QUIET)
    v = report["val"]
    assert v["measure"] == "lit (mine.py)" and len(v["checkpoints"]) == 5
    int8 = onnx.load(tmp_path / "out" / "model_int8.onnx")
    x = np.concatenate([b for b, _ in _val_batches(val)])
    expected = float((ort_run(int8, {"x": x})[0] > 0.5).mean())
    assert v["score_int8"] == pytest.approx(expected, abs=1e-6)


def _val_batches(folder):
    from qatool.data import open_dataset
    from qatool.data.preprocess import Preprocess

    return open_dataset(folder, labelled=False).load(Preprocess((16, 16), "gray")).batches(64)


@pytest.mark.parametrize("spec,match", [
    ("missing.py:f", "--metric missing.py:f: no file missing.py"),
    ("{dir}/m.py:nope", "has no function 'nope'"),
    ("{dir}/m.py:boom", "raised ZeroDivisionError: division by zero"),
    ("{dir}/m.py:words", "returned str, not a number"),
    ("{dir}/m.py", "expected FILE.py:FUNCTION"),
])
def test_a_bad_metric_is_one_line(capsys, map_model, blob_images, tmp_path, spec, match):
    from test_errors import assert_clean_error, run_cli

    (tmp_path / "m.py").write_text("def boom(outputs, batch):\n    return 1 / 0\n\n"
                                   "def words(outputs, batch):\n    return 'good'\n")
    train, val = blob_images
    code, _, err = run_cli(capsys, "train-quant", map_model, "--train-data", train, "--val-data", val,
                           "-o", tmp_path / "o", "--steps", 1, "--metric", spec.format(dir=tmp_path))
    assert_clean_error(code, err, 2, match)
    assert not (tmp_path / "o" / "model_int8.onnx").exists() and not (tmp_path / "o" / "qat.onnx").exists()


def test_sensitivity_without_labels_on_tensors_of_two_shapes(capsys, ctc_model, npy_inputs):
    from test_errors import run_cli

    train, _ = npy_inputs
    code, out, err = run_cli(capsys, "sensitivity", ctc_model, "--data", train, "--bits", 4)
    assert code == 0, err
    assert "no labels of the model's classes: SQNR only" in out
    ranked = [ln.split()[1:3] for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert sorted(op for _, op in ranked) == ["Conv", "MatMul"]


def test_export_int8_of_a_label_free_checkpoint(capsys, ctc_model, npy_inputs, tmp_path):
    """export-int8 redoes the export of a run without labels, verified on the .npy folder the run recorded."""
    from test_errors import run_cli

    train, val = npy_inputs
    api.train_quant(ctc_model, train, tmp_path / "run", val_data=val,
                    train=TrainConfig(steps=2, batch_size=4, keep="last"), **QUIET)
    code, out, err = run_cli(capsys, "export-int8", tmp_path / "run" / "qat.onnx", "-o", tmp_path / "again.onnx")
    assert code == 0, err
    assert "int8 (onnxruntime) against float on" in out and "probs: seq_agreement" in out
    a = ort_run(onnx.load(tmp_path / "again.onnx"), {"x": np.load(next(val.glob("*.npy")))[None]})[0]
    b = ort_run(onnx.load(tmp_path / "run" / "model_int8.onnx"), {"x": np.load(next(val.glob("*.npy")))[None]})[0]
    np.testing.assert_array_equal(a, b)  # the last step's export, again


def test_the_run_says_which_path_it_took_and_why(lenet, digits, tmp_path):
    """A classifier with class folders keeps the classifier recipe; the same model on a flat folder of the same
    images trains without labels; each run says so first. Each recipe calibrates its start its own way (min/max
    with labels, the mean of 32-image ranges without), unless --init-method is given."""
    import shutil

    train, _ = digits
    said = []
    api.train_quant(lenet, train, tmp_path / "a", train=TrainConfig(steps=1), echo=said.append, quiet=True)
    assert said[0].startswith("classifier QAT with labels (cross-entropy, top-1), because") and "class sub-folders" \
        in said[0]
    assert any("activation ranges calibrated (minmax)" in s for s in said)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(train.rglob("*.png"))[:40]):
        shutil.copy(f, flat / f"{i}.png")
    said.clear()
    api.train_quant(lenet, flat, tmp_path / "b", train=TrainConfig(steps=1), echo=said.append, quiet=True)
    assert said[0] == f"label-free QAT: the model learns to reproduce its float model, because {flat} has no class " \
                      "sub-folders (no labels)"
    assert any("activation ranges calibrated (average)" in s for s in said)
    said.clear()
    report = api.train_quant(lenet, flat, tmp_path / "c", train=TrainConfig(steps=1, init_method="percentile"),
                             echo=said.append, quiet=True)
    assert any("activation ranges calibrated (percentile)" in s for s in said)
    assert report["config"]["train"]["init_method"] == "percentile"


@pytest.mark.parametrize("fixed, seconds_per_image, steps, said", [
    (0.0, 0.001, 800, "800 steps (a step at batch 10: ~0.0 s by the probe)"),
    (2.0, 0.1, 800, "800 steps (a step at batch 10: ~3.0 s by the probe)"),  # 800 x 3 s = the whole budget
    (0.0, 0.5, 480, "480 steps: a step at batch 10 takes ~5.0 s by the probe, and the default 800 would take ~67 min"),
    (1.0, 0.4, 480, "480 steps: a step at batch 10 takes ~5.0 s"),
    (0.0, 10.0, 200, "200 steps: a step at batch 10 takes ~100.0 s"),  # never fewer than MIN_DISTILL_STEPS
])
def test_a_label_free_runs_default_length_fits_its_time_budget(fixed, seconds_per_image, steps, said):
    from qatool.train.footprint import RUN_BUDGET_SECONDS, StepTime, distill_steps

    assert RUN_BUDGET_SECONDS == 40 * 60
    got, why = distill_steps(StepTime(fixed, seconds_per_image), 10)
    assert got == steps and why.startswith(said)


@pytest.mark.parametrize("seconds, steps, done, want", [
    (3.0, 800, 20, None),  # 800 x 3 s: the budget, as the probe said
    (3.2, 800, 20, None),  # 750 fit: within 10 % of the probe's length, which stands
    (11.2, 289, 20, 214),  # the layout detector: the probe said 8.3 s, its steps took 11.2 s
    (1.0, 400, 20, 800),  # faster than the probe: longer, at most DISTILL_STEPS
    (100.0, 400, 20, 200),  # never fewer than MIN_DISTILL_STEPS
])
def test_a_budgeted_runs_length_is_revised_from_its_own_first_steps(seconds, steps, done, want):
    from qatool.train.footprint import revised_steps

    got = revised_steps(seconds, 8.3, steps, done)
    if want is None:
        assert got is None
    else:
        assert got[0] == want
        assert got[1] == (f"{want} steps, not {steps}: the first {done} took ~{seconds:.1f} s each where the probe "
                          "said ~8.3 s (the budget is 40 min of steps; --steps overrides)")


@pytest.mark.parametrize("fixed, seconds_per_image, steps, said", [
    (0.0, 0.001, 2400, "2400 steps, the default at 4-bit weights and below (a step at batch 10: ~0.0 s"),
    (0.0, 0.5, 480, "480 steps: a step at batch 10 takes ~5.0 s by the probe, and the default 2400 at 4-bit "
                    "weights would take ~200 min"),  # a detector: the budget decides either way
])
def test_at_4_bit_weights_a_fast_run_takes_up_to_2400_steps(fixed, seconds_per_image, steps, said):
    from qatool.quant.config import QuantConfig
    from qatool.train.footprint import DISTILL_STEPS, StepTime, distill_steps, revised_steps, step_cap

    assert step_cap(QuantConfig(weight_bits=8)) == DISTILL_STEPS == 800
    assert step_cap(QuantConfig(weight_bits=4)) == step_cap(QuantConfig(layer_weight_bits={"conv1": 4})) == 2400
    got, why = distill_steps(StepTime(fixed, seconds_per_image), 10, 2400)
    assert got == steps and why.startswith(said)
    assert revised_steps(0.001, 0.5, 480, 20, 2400)[0] == 2400


def test_a_revised_length_never_ends_before_the_steps_already_done():
    from qatool.train import footprint

    assert footprint.revised_steps(1e9, 1.0, 900, 250)[0] == 250


def test_a_label_free_run_revises_its_length_from_its_first_steps(map_model, blob_images, tmp_path, monkeypatch):
    """The probe said 1 s a step, so 5 fit the (5 s) budget; the real steps take milliseconds, so after the first 3
    the run takes the 12 its budget allows, and its phases, schedule and record follow."""
    from qatool.train import footprint

    monkeypatch.setattr(footprint, "DISTILL_STEPS", 12)
    monkeypatch.setattr(footprint, "MIN_DISTILL_STEPS", 4)
    monkeypatch.setattr(footprint, "RUN_BUDGET_SECONDS", 5)
    monkeypatch.setattr(footprint, "REVISE_AFTER", 3)
    monkeypatch.setattr(footprint, "step_time", lambda *a: footprint.StepTime(1.0, 0.0))
    train, _ = blob_images
    lines = []
    report = api.train_quant(map_model, train, tmp_path, train=TrainConfig(batch_size=4), echo=lines.append,
                             quiet=True)
    assert any(ln.startswith("5 steps: a step at batch 4 takes ~1.0 s by the probe") for ln in lines)
    assert any(ln.startswith("12 steps, not 5: the first 3 took ~0.0 s each where the probe said ~1.0 s")
               for ln in lines)
    assert report["steps"] == 12 and report["config"]["train"]["steps"] == 12
    assert report["config"]["freeze_observers_after"] == 9  # three quarters of the revised length
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["observers_frozen"] and not records[8]["observers_frozen"]
    assert records[-1]["lr"] < records[3]["lr"] < records[0]["lr"]  # the cosine over the revised 12


def test_a_run_given_its_steps_is_not_revised(map_model, blob_images, tmp_path, monkeypatch):
    from qatool.train import footprint

    monkeypatch.setattr(footprint, "REVISE_AFTER", 2)
    train, _ = blob_images
    lines = []
    report = api.train_quant(map_model, train, tmp_path, train=TrainConfig(batch_size=4, steps=5),
                             echo=lines.append, quiet=True)
    assert report["steps"] == 5 and not any("steps, not" in ln for ln in lines)


def test_label_free_lsq_trains_under_adam_without_collapsing_a_step_size(map_model, blob_images, tmp_path):
    from qatool.quant.config import QuantConfig

    train, _ = blob_images
    report = api.train_quant(map_model, train, tmp_path, quant=QuantConfig(scale_learning="lsq"),
                             train=TrainConfig(steps=3, batch_size=4, scale_lr=0.05), echo=lambda s: None,
                             quiet=True)
    assert report["steps"] == 3 and report["config"]["train"]["optimizer"] == "adam"


def test_a_label_free_run_without_steps_takes_the_default_length(map_model, blob_images, tmp_path, monkeypatch):
    from qatool.train import footprint

    monkeypatch.setattr(footprint, "DISTILL_STEPS", 3)
    train, _ = blob_images
    lines = []
    report = api.train_quant(map_model, train, tmp_path, train=TrainConfig(batch_size=4), echo=lines.append,
                             quiet=True)
    assert report["steps"] == 3 and report["config"]["train"]["steps"] == 3
    assert any(ln.startswith("3 steps (a step at batch 4:") for ln in lines)
    assert report["config"]["train"]["lr"] == 1e-4 and report["config"]["train"]["optimizer"] == "adam"
