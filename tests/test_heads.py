"""A classifier's head: the logits behind a final Softmax, probabilities refused, class names from the metadata,
and a class order that does not fit the model's outputs stopped before any training."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qatool import api
from qatool.errors import DataError, UsageError
from qatool.ir.graph import from_onnx
from qatool.ir.io import load_graph, save_graph
from qatool.train.config import TrainConfig
from qatool.tasks.heads import (check_class_order, folder_class_names, logits_tensor, looks_like_probabilities,
                                matched_order, model_class_names, parse_class_names)

F = onnx.TensorProto.FLOAT
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # sorted: not this order


def _head(ops: list[str]) -> onnx.ModelProto:
    """x (N, 4) -> Gemm -> the given chain of ops -> y."""
    w = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["t0"], name="fc")]
    for i, op in enumerate(ops):
        ins = [f"t{i}", "shape"] if op == "Reshape" else [f"t{i}"]
        nodes.append(helper.make_node(op, ins, [f"t{i + 1}"], name=f"{op.lower()}{i}", **(
            {"axis": 1} if op in ("Softmax", "LogSoftmax") else {})))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", F, ["N", 4])],
                              [helper.make_tensor_value_info("y", F, ["N", 3])], initializer=[w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("ops, expected", [
    ([], "y"),
    (["Softmax"], "t0"),
    (["Softmax", "Reshape", "Identity"], "t0"),  # Paddle's text-direction classifier
    (["Identity", "Softmax"], "t1"),  # PP-LCNet: Add -> Identity -> Softmax
    (["LogSoftmax", "Flatten"], "t0"),
    (["Relu", "Reshape"], "y"),  # no softmax behind the shape ops: the output itself
])
def test_logits_are_found_behind_softmax_and_shape_only_ops(ops, expected):
    assert logits_tensor(from_onnx(_head(ops))) == expected


def test_metadata_names_the_logits():
    g = from_onnx(_head(["Softmax"]))
    g.metadata["qatool.logits"] = "y"
    assert logits_tensor(g) == "y"


def test_probabilities_are_recognised():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 5)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert looks_like_probabilities(probs)
    assert not looks_like_probabilities(logits)
    assert not looks_like_probabilities(np.abs(logits))


@pytest.mark.parametrize("text, names", [
    ("0\n90\n180\n270", ["0", "90", "180", "270"]),
    ('["cat", "dog"]', ["cat", "dog"]),
    ('{"1": "dog", "0": "cat"}', ["cat", "dog"]),
    ("cat, dog, bird", ["cat", "dog", "bird"]),
    ("just one", None),
    ("", None),
])
def test_class_names_parse_from_metadata(text, names):
    assert parse_class_names(text) == names


def _folders(root, names):
    for n in names:
        (root / n).mkdir(parents=True)
    return root


def test_folders_follow_the_models_class_names(tmp_path):
    g = from_onnx(_head([]))
    g.metadata["character"] = "0\n90\n180\n270"
    root = _folders(tmp_path / "d", ["0", "180", "270", "90"])
    said = []
    assert folder_class_names(g, root, echo=said.append) == ["0", "90", "180", "270"]
    assert "character" in said[0]
    assert model_class_names(g) == ("character", ["0", "90", "180", "270"])
    other = _folders(tmp_path / "e", ["a", "b", "c", "d"])  # other names: sorted folders, with a note
    assert folder_class_names(g, other, echo=said.append) is None
    assert "--labels" in said[-1]
    labels = tmp_path / "labels.txt"
    labels.write_text("d\nc\nb\na\n")
    assert folder_class_names(g, other, labels) == ["d", "c", "b", "a"]


def test_class_order_check_stops_a_permuted_order_not_an_untrained_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    perm = np.array([0, 2, 3, 1])  # label i is predicted as output perm[i]
    logits = np.eye(4)[perm[labels]] * 8.0
    fitted, mapping = matched_order(labels, logits.argmax(1), 4)
    assert fitted == 1.0 and mapping == {0: 0, 1: 2, 2: 3, 3: 1}
    with pytest.raises(DataError, match=r"fit 0, 90, 180, 270"):
        check_class_order(float(np.mean(logits.argmax(1) == labels)), logits, labels, ["0", "180", "270", "90"],
                          "val")
    untrained = np.eye(4)[rng.integers(0, 4, 400)] * 8.0  # confident, at chance, and no order fits it
    check_class_order(float(np.mean(untrained.argmax(1) == labels)), untrained, labels, list("abcd"), "val")


# ---- end to end on the sample LeNet with its classes named in its metadata ------------------------------------------
@pytest.fixture(scope="module")
def word_digits(digits, tmp_path_factory):
    """The digits with class folders named by words: sorted, they are not in the model's output order."""
    root = tmp_path_factory.mktemp("words")
    out = []
    for split in digits:
        for i, w in enumerate(WORDS):
            shutil.copytree(split / str(i), root / split.name / w)
        out.append(root / split.name)
    return out


def _named_lenet(lenet, tmp_path, softmax_head: bool):
    g = load_graph(lenet)
    g.metadata["labels"] = json.dumps(WORDS)
    path = tmp_path / "named.onnx"
    if softmax_head:  # ... -> logits -> Softmax -> Reshape -> Identity, as Paddle exports it
        proto = onnx.load(lenet)
        out = proto.graph.output[0].name
        last = next(n for n in proto.graph.node if out in n.output)
        last.output[0] = "logits_raw"
        proto.graph.initializer.append(numpy_helper.from_array(np.array([-1, 10], np.int64), "head_shape"))
        proto.graph.node.extend([
            helper.make_node("Softmax", ["logits_raw"], ["probs"], axis=1, name="softmax"),
            helper.make_node("Reshape", ["probs", "head_shape"], ["probs2"], name="reshape"),
            helper.make_node("Identity", ["probs2"], [out], name="identity")])
        g = from_onnx(proto)
        g.metadata["labels"] = json.dumps(WORDS)
    save_graph(g, path)
    return path


def test_train_quant_reads_the_class_order_from_the_metadata_and_trains_on_logits(lenet, word_digits, tmp_path):
    train, val = word_digits
    model = _named_lenet(lenet, tmp_path, softmax_head=True)
    said = []
    report = api.train_quant(model, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=6),
                             echo=said.append, quiet=True)
    assert any("class order from the model's metadata ('labels')" in s for s in said)
    assert report["classes"] == WORDS
    assert report["logits"] == "logits_raw"
    assert report["val"]["top1_float"] > 0.9 and report["val"]["top1_int8"] > 0.9
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < 0.5, "cross-entropy on logits of a trained model (on probabilities it would be ~1.5)"
    int8 = onnx.load(tmp_path / "out" / "model_int8.onnx")
    meta = {p.key: p.value for p in int8.metadata_props}
    assert meta["qatool.classes"].splitlines() == WORDS


def test_train_quant_stops_on_a_class_order_that_does_not_fit(lenet, word_digits, tmp_path):
    train, val = word_digits  # no names in the model: folders sort as eight, five, four, ...
    with pytest.raises(DataError, match="another order.*--labels"):
        api.train_quant(lenet, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=2),
                        echo=lambda s: None, quiet=True)
    assert not (tmp_path / "out" / "model_int8.onnx").exists()


def test_calibrate_stops_on_a_class_order_that_does_not_fit_and_takes_labels(lenet, word_digits, tmp_path):
    from qatool.api import calibrate

    train, val = word_digits
    out = tmp_path / "int8.onnx"
    with pytest.raises(DataError, match="another order.*--labels"):
        calibrate(lenet, train, out, images=64, val_data=val, echo=lambda s: None)
    assert not out.exists()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(WORDS) + "\n")
    report = calibrate(lenet, train, out, images=64, val_data=val, echo=lambda s: None, labels=labels)
    assert report["top1_float"] > 0.9 and report["top1_int8"] > 0.9
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["qatool.classes"].splitlines() == WORDS


def test_probabilities_without_softmax_ask_for_logits(lenet, digits, tmp_path):
    """A softmax written out as Exp / ReduceSum / Div: the output is probabilities, no Softmax is found."""
    proto = onnx.load(lenet)
    out = proto.graph.output[0].name
    last = next(n for n in proto.graph.node if out in n.output)
    last.output[0] = "scores"
    proto.graph.node.extend([
        helper.make_node("Exp", ["scores"], ["e"], name="exp"),
        helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1, name="sum"),
        helper.make_node("Div", ["e", "s"], [out], name="div")])
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    path = tmp_path / "probs.onnx"
    onnx.save(proto, path)
    train, val = digits
    with pytest.raises(UsageError, match="looks like probabilities.*--logits"):
        api.train_quant(path, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=2),
                        echo=lambda s: None, quiet=True)
    report = api.train_quant(path, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=2, logits="scores"),
                             echo=lambda s: None, quiet=True)
    assert report["logits"] == "scores"
    with pytest.raises(UsageError, match="no tensor of that name"):
        api.train_quant(path, train, tmp_path / "out2", val_data=val, train=TrainConfig(steps=2, logits="nope"),
                        echo=lambda s: None, quiet=True)


def test_eval_and_calibrate_read_the_class_order_from_the_metadata(lenet, word_digits, tmp_path):
    """eval, calibrate and export-int8 open image folders in the model's own class order too."""
    from qatool.api import calibrate

    train, val = word_digits
    model = _named_lenet(lenet, tmp_path, softmax_head=False)
    table = api.evaluate([model], val, latency=False)
    assert table["results"][0]["top1"] > 0.9
    report = calibrate(model, train, tmp_path / "ptq.onnx", val_data=val, images=64)
    assert report["top1_float"] > 0.9 and report["top1_int8"] > 0.9
    meta = {p.key: p.value for p in onnx.load(tmp_path / "ptq.onnx").metadata_props}
    assert meta["qatool.classes"].splitlines() == WORDS
    out = api.train_quant(model, train, tmp_path / "qat", val_data=val, train=TrainConfig(steps=2, keep="last"),
                          echo=lambda s: None, quiet=True)
    exported = api.export_int8(tmp_path / "qat" / "qat.onnx", tmp_path / "again.onnx", calib_data=val)
    assert exported["top1_int8"] == pytest.approx(out["val"]["top1_int8"]) and exported["top1_int8"] > 0.9
