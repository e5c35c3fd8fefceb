"""Transfer learning (`qatool finetune`): the cut point, the new head, a frozen backbone, float training in the
training loop, and the errors of bad input; end to end on the sample LeNet re-headed to classify even vs odd."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from helpers import SAMPLE_DIR, ort_run
from qatool import api
from qatool.cli import cli
from qatool.convert import normalize_proto
from qatool.errors import DataError, UsageError
from qatool.ir.graph import to_onnx
from qatool.ir.io import load_proto
from qatool.train.config import TrainConfig
from qatool.train.transfer import find_features, replace_head

F = onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def even_odd(tmp_path_factory):
    """The bundled digits regrouped into two classes, even and odd (train 100 per digit, val 40 per digit)."""
    root = tmp_path_factory.mktemp("even_odd")
    data = SAMPLE_DIR / "data" / "mnist"
    for split, n in (("train", 100), ("val", 40)):
        for digit in range(10):
            dst = root / split / ("even" if digit % 2 == 0 else "odd")
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted((data / split / str(digit)).glob("*.png"))[:n]:
                shutil.copy(f, dst / f"{digit}_{f.name}")
    return root / "train", root / "val"


def _conv_head_model(softmax: bool = True) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> 1x1 Conv (the classifier) -> Flatten [-> Softmax]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (8, 1, 3, 3)), ("wc", (5, 8, 1, 1)), ("bc", (5,)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["pool"], name="pool"),
             helper.make_node("Conv", ["pool", "wc", "bc"], ["cls"], name="classifier"),
             helper.make_node("Flatten", ["cls"], ["logits" if softmax else "y"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", F, ["N", 5])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_the_cut_point_is_the_classifiers_input(lenet):
    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    gemm = next(n for n in reversed(graph.nodes) if n.op_type == "Gemm")
    assert find_features(graph) == gemm.input(0)
    conv_head = normalize_proto(_conv_head_model(), for_training=True).graph
    assert find_features(conv_head) == "pool"  # a 1x1 Conv after global pooling, through Flatten and Softmax


def test_the_new_head_keeps_the_softmax_and_names_its_classes():
    graph = normalize_proto(_conv_head_model(), for_training=True).graph
    graph.metadata["labels"] = "a\nb\nc\nd\ne"  # the old classes' names must not survive
    params = replace_head(graph, "pool", 8, ["cat", "dog", "fox"], seed=0)
    ops = [n.op_type for n in graph.nodes]
    assert ops[-3:] == ["Flatten", "Gemm", "Softmax"] and ops.count("Conv") == 1  # the old classifier is gone
    assert graph.output_names == ["y"] and graph.outputs[0].shape[1] == 3
    assert graph.metadata["qatool.classes"].splitlines() == ["cat", "dog", "fox"] and "labels" not in graph.metadata
    w, b = (graph.initializers[p] for p in params)
    assert w.shape == (3, 8) and b.shape == (3,) and np.abs(w).max() <= 1 / np.sqrt(8)  # nn.Linear's init
    trainable = json.loads(graph.metadata["qatool.trainable"])
    assert set(params) <= set(trainable)
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    (y,) = ort_run(to_onnx(graph), {"x": x})
    assert y.shape == (4, 3) and np.allclose(y.sum(1), 1, atol=1e-5)


def test_frozen_backbone_trains_only_the_head_then_train_quant_takes_the_model(lenet, even_odd, tmp_path):
    train, val = even_odd
    out = tmp_path / "even_odd.onnx"
    report = api.finetune(lenet, train, out, val_data=val, train=TrainConfig(steps=150), new_head=True,
                          freeze_backbone=True, quiet=True, echo=lambda s: None)
    start, end = report["val"]["top1_float_start"], report["val"]["top1_float"]
    assert end > 0.9 and end > start + 0.1  # the fresh head starts near chance
    assert report["classes"] == ["even", "odd"] and report["frozen_backbone"]
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(lenet).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    shared = [k for k in before if k in after]
    assert shared and all(np.array_equal(before[k], after[k]) for k in shared)  # backbone, BN statistics unchanged
    assert (tmp_path / "even_odd.labels.txt").read_text().split() == ["even", "odd"]
    assert json.loads((tmp_path / "even_odd.report.json").read_text())["val"]["top1_float"] == report["val"]["top1_float"]
    assert len((tmp_path / "even_odd.metrics.jsonl").read_text().splitlines()) == 150
    q = api.train_quant(out, train, tmp_path / "q", val_data=val, train=TrainConfig(steps=4), quiet=True,
                        echo=lambda s: None)
    assert q["classes"] == ["even", "odd"] and q["val"]["top1_int8"] > 0.85
    assert q["export"]["fusion"]["unfused"] == []


def test_training_all_layers_moves_the_backbone(lenet, even_odd, tmp_path):
    train, val = even_odd
    out = tmp_path / "all.onnx"
    report = api.finetune(lenet, train, out, val_data=val, train=TrainConfig(steps=20), new_head=True,
                          quiet=True, echo=lambda s: None)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(lenet).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert any(not np.array_equal(before[k], after[k]) for k in before if k in after)
    assert not report["frozen_backbone"]


def test_trainable_names_choose_what_trains(lenet, digits, tmp_path):
    """Without a new head: the model's own classifier alone (by node-name prefix), the rest frozen."""
    train, val = digits
    out = tmp_path / "fc.onnx"
    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    last = next(n for n in reversed(graph.nodes) if n.op_type == "Gemm")
    report = api.finetune(lenet, train, out, val_data=val, train=TrainConfig(steps=5), freeze_backbone=True,
                          trainable=[last.name], quiet=True, echo=lambda s: None)
    assert report["trainable"] == [i for i in last.inputs[1:] if i]


@pytest.mark.parametrize("args, message", [
    (["--freeze-backbone"], "--new-head or --trainable"),
    (["--new-head", "--features", "no_such_tensor"], "no tensor of that name"),
    (["--features", "x"], "needs --new-head"),
])
def test_bad_options_get_one_line_and_no_output(lenet, digits, tmp_path, args, message):
    train, _ = digits
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(cli, ["finetune", str(lenet), "--train-data", str(train), "-o", str(out), "--steps", "1",
                                   "-q", *args])
    assert res.exit_code != 0 and isinstance(res.exception, UsageError) and message in str(res.exception)
    assert not out.exists()


def test_features_of_the_wrong_shape_and_a_model_without_classifier(lenet, digits, tmp_path):
    train, _ = digits
    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    conv_out = next(n for n in graph.nodes if n.op_type == "Conv").outputs[0]
    with pytest.raises(UsageError, match=r"must be \(N, C\)"):
        api.finetune(lenet, train, tmp_path / "o.onnx", train=TrainConfig(steps=1), new_head=True,
                     features=conv_out, quiet=True, echo=lambda s: None)
    no_head = _conv_head_model(softmax=False)
    no_head.graph.node[3].op_type = "Sigmoid"  # the "classifier" is no classifier now
    del no_head.graph.node[3].input[1:]
    with pytest.raises(UsageError, match="no classifier found.*--features"):
        find_features(normalize_proto(no_head, for_training=True).graph)


def test_data_with_a_single_class_is_refused(lenet, digits, tmp_path):
    train, _ = digits
    one = tmp_path / "one"
    shutil.copytree(train / "3", one / "3")
    with pytest.raises(DataError, match="at least two"):
        api.finetune(lenet, one, tmp_path / "o.onnx", train=TrainConfig(steps=1), new_head=True, quiet=True,
                     echo=lambda s: None)
    assert not (tmp_path / "o.onnx").exists()


def test_train_quant_re_heads_warms_up_then_quantizes_in_one_command(lenet, even_odd, tmp_path):
    train, val = even_odd
    said = []
    report = api.train_quant(lenet, train, tmp_path / "out", val_data=val, train=TrainConfig(steps=6),
                             new_head=True, float_steps=120, quiet=True, echo=said.append)
    assert any(s.startswith("float warm-up: 120 steps of the new head") for s in said)
    assert (tmp_path / "out" / "float_warmup.onnx").exists()
    assert report["classes"] == ["even", "odd"] and report["val"]["top1_int8"] > 0.85
    int8 = onnx.load(tmp_path / "out" / "model_int8.onnx")
    assert int8.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2


def test_train_quant_warm_up_options_need_a_warm_up(lenet, digits, tmp_path):
    train, _ = digits
    with pytest.raises(UsageError, match="--new-head or --float-steps"):
        api.train_quant(lenet, train, tmp_path / "o", train=TrainConfig(steps=1), freeze_backbone=True, quiet=True,
                        echo=lambda s: None)


def test_a_finetune_run_resumes_where_it_stopped(lenet, even_odd, tmp_path, monkeypatch):
    """A run stopped right after its step-10 save (--save-every 10), then resumed: the same parameters as one
    run of 20 steps, bit for bit (same batches, learning rates and optimiser state)."""
    import qatool.ir.io as io

    train, _ = even_odd
    cfg = dict(steps=20, save_every=10, batch_size=16)
    whole = tmp_path / "whole.onnx"
    api.finetune(lenet, train, whole, train=TrainConfig(**cfg), new_head=True, freeze_backbone=True, quiet=True,
                 echo=lambda s: None)
    real_save = io.save_graph

    def save_then_stop(graph, path):
        real_save(graph, path)
        if json.loads(graph.metadata["qatool.finetune"])["step"] == 10:
            raise RuntimeError("stopped")

    monkeypatch.setattr(io, "save_graph", save_then_stop)
    half = tmp_path / "half.onnx"
    with pytest.raises(RuntimeError, match="stopped"):
        api.finetune(lenet, train, half, train=TrainConfig(**cfg), new_head=True, freeze_backbone=True, quiet=True,
                     echo=lambda s: None)
    monkeypatch.setattr(io, "save_graph", real_save)
    said = []
    api.finetune(lenet, train, tmp_path / "resumed.onnx", train=TrainConfig(**cfg), resume=half, quiet=True,
                 echo=said.append)
    assert "resuming at step 10 of 20" in said
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(whole).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "resumed.onnx").graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="the same --steps"):
        api.finetune(lenet, train, tmp_path / "r2.onnx", train=TrainConfig(steps=30), resume=half, quiet=True,
                     echo=lambda s: None)
