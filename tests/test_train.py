"""train-quant end to end on real digits: outputs, reports, learning, exact resume, config validation."""

import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from helpers import SAMPLE_DIR
from qatool import api
from qatool.errors import ConfigError, UsageError
from qatool.ir.io import load_graph, save_graph
from qatool.quant.config import QuantConfig
from qatool.train.config import TrainConfig, load_config_file
from qatool.train.loop import TrainingDiverged, TrainingInterrupted

SCHEMAS = SAMPLE_DIR.parent / "schemas"


def test_train_quant_writes_checkpoint_int8_model_and_valid_report(lenet, digits, tmp_path):
    import resource

    train, val = digits
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = api.train_quant(lenet, train, tmp_path, val_data=val, train=TrainConfig(steps=12), echo=lambda s: None)
    after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    jsonschema.validate(report, json.loads((SCHEMAS / "train-report.schema.json").read_text()))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["val"] == report["val"] and on_disk["steps"] == 12
    # this process's peak resident memory in MB (ru_maxrss: KiB on Linux, bytes on macOS), taken during the run
    per_mb = 1024**2 if sys.platform == "darwin" else 1024
    assert before_kb / per_mb - 0.05 <= report["peak_rss_mb"] <= after_kb / per_mb + 0.05
    assert [c["step"] for c in report["val"]["checkpoints"]] == [0, 3, 6, 9, 12]  # start, each quarter, end
    v = report["val"]
    assert v["top1_float"] > 0.9, "the sample LeNet is a trained model"
    assert v["agreement_top1"] >= 0.99
    assert abs(v["top1_qat"] - v["top1_int8"]) <= 0.01
    for name in ("qat.onnx", "qat.state.npz", "model_int8.onnx", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[-1])["step"] == 12
    onnx.checker.check_model(onnx.load(tmp_path / "model_int8.onnx"))
    ckpt = onnx.load(tmp_path / "qat.onnx")
    ops = {n.op_type for n in ckpt.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "BatchNormalization", "Dropout"} <= ops


def test_loss_falls_and_accuracy_rises_from_scratch(lenet, digits, tmp_path):
    """QAT from random weights on real digits: the loss falls and validation accuracy rises far above chance."""
    graph = load_graph(lenet)
    rng = np.random.default_rng(0)
    for name, arr in graph.initializers.items():
        if arr.ndim >= 2:  # conv / linear weights: fresh He initialisation
            fan_in = arr[0].size if arr.ndim == 4 else arr.shape[1]
            graph.initializers[name] = (rng.standard_normal(arr.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    save_graph(graph, tmp_path / "scratch.onnx")
    train, val = digits
    report = api.train_quant(tmp_path / "scratch.onnx", train, tmp_path / "out", val_data=val,
                             train=TrainConfig(steps=80, lr=0.02, batch_size=32), echo=lambda s: None)
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert report["val"]["top1_float"] < 0.3  # random weights: near chance
    assert report["val"]["top1_qat"] > 0.6
    assert report["val"]["top1_int8"] > 0.6


def _state(out_dir):
    model = onnx.load(out_dir / "qat.onnx")
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    with np.load(out_dir / "qat.state.npz", allow_pickle=False) as npz:
        arrays.update({f"npz:{k}": npz[k] for k in npz.files})
    return arrays


class _CtrlCDuringStep:
    """Stands in for the loop's Ctrl-C flag: the key is pressed during step `at - 1`, so the loop saves a
    checkpoint at step `at` and stops, as a real interruption does (deterministically here)."""

    def __init__(self, at: int):
        self.at, self.checks = at, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks > self.at


@pytest.mark.parametrize("optimizer,scale_learning,schedule", [
    ("sgd", "none", "cosine"), ("adam", "none", "cosine"), ("sgd", "lsq", "cosine"), ("sgd", "none", "step"),
    ("sgd", "none", "constant")])
def test_interrupted_then_resumed_equals_one_run(lenet, digits, tmp_path, monkeypatch, optimizer, scale_learning,
                                                 schedule):
    """7 steps stopped by Ctrl-C at step 4, then resumed, equal 7 steps in one run, bit for bit (the phases change
    after the interruption; the lr schedule spans the 7 steps in both)."""
    import qatool.train.loop as loop

    train, _ = digits
    quant = QuantConfig(freeze_bn_after=5, freeze_observers_after=6, scale_learning=scale_learning)
    cfg = TrainConfig(steps=7, optimizer=optimizer, schedule=schedule)
    quiet = dict(echo=lambda s: None, quiet=True)
    api.train_quant(lenet, train, tmp_path / "one", quant=quant, train=cfg, **quiet)
    with monkeypatch.context() as m:
        m.setattr(loop, "_StopFlag", lambda: _CtrlCDuringStep(4))
        with pytest.raises(TrainingInterrupted, match="interrupted at step 4"):
            api.train_quant(lenet, train, tmp_path / "two", quant=quant, train=cfg, **quiet)
    api.train_quant(lenet, train, tmp_path / "two", train=cfg, resume=tmp_path / "two" / "qat.onnx", **quiet)
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)
    assert (tmp_path / "one" / "model_int8.onnx").read_bytes() == (tmp_path / "two" / "model_int8.onnx").read_bytes()


def test_resume_refuses_another_model(lenet, mobilenet, digits, tmp_path):
    train, _ = digits
    api.train_quant(lenet, train, tmp_path, train=TrainConfig(steps=1), echo=lambda s: None, quiet=True)
    with pytest.raises(UsageError, match="another model"):
        api.train_quant(mobilenet, train, tmp_path / "b", train=TrainConfig(steps=2), resume=tmp_path / "qat.onnx",
                        echo=lambda s: None, quiet=True)


@pytest.mark.parametrize("text,key", [
    ("weight_bits: 9\n", "weight_bits"),
    ("exclude: [1]\n", "exclude/0"),
    ("lr: -1\n", "lr"),
    ("colour: gray\n", "(top level)"),
    ('{"scale_update": "ema"}', "scale_update"),
])
def test_config_schema_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / ("c.json" if text.startswith("{") else "c.yaml")
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"key {key}")) as e:
        load_config_file(path)
    if key == "(top level)":
        assert "colour" in str(e.value)


def test_config_file_is_used_and_flags_override(lenet, digits, tmp_path):
    train, _ = digits
    cfg = tmp_path / "qat.yaml"
    cfg.write_text("weight_bits: 4\nactivation_bits: 6\nsteps: 2\nbatch_size: 16\n")
    r = subprocess.run([sys.executable, "-m", "qatool", "train-quant", str(lenet), "--train-data", str(train),
                        "-o", str(tmp_path / "out"), "--config", str(cfg), "--activation-bits", "8", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["quant"]["weight_bits"] == 4
    assert report["config"]["quant"]["activation_bits"] == 8
    assert report["steps"] == 2 and report["batch_size"] == 16


def test_cli_bad_bits_is_one_line_usage_error(lenet, digits, tmp_path):
    train, _ = digits
    r = subprocess.run([sys.executable, "-m", "qatool", "train-quant", str(lenet), "--train-data", str(train),
                        "-o", str(tmp_path), "--bits", "9"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("qatool: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_class_folders_must_match_model_outputs(lenet, digits, tmp_path):
    import shutil

    from qatool.errors import DataError

    train, _ = digits
    for cls in ("0", "1", "2"):
        shutil.copytree(train / cls, tmp_path / "three" / cls)
    with pytest.raises(DataError, match="3 class folders but the model lenet_bn.onnx has 10 outputs"):
        api.train_quant(lenet, tmp_path / "three", tmp_path / "out", train=TrainConfig(steps=1), **{"echo": print})
    assert not (tmp_path / "out" / "qat.onnx").exists()


def test_init_calibrate_and_mixed_precision(lenet, digits, tmp_path):
    """--init calibrate sets the ranges before the first step; --mixed-precision picks per-layer bits within the
    budget; a resumed run keeps them."""
    train, val = digits
    cfg = TrainConfig(steps=3, init="calibrate", init_images=64, mixed_precision="15%", mixed_low_bits=4)
    lines = []
    report = api.train_quant(lenet, train, tmp_path, val_data=val, train=cfg, echo=lines.append, quiet=True)
    bits = report["config"]["quant"]["layer_weight_bits"]
    assert set(bits.values()) <= {4, 8} and 4 in bits.values()
    assert any("calibrated (minmax)" in ln for ln in lines)
    assert any(ln.startswith("mixed precision:") for ln in lines)
    # a 4-bit layer's weights are stored as INT4 with values in [-8, 7]; the 8-bit ones reach 127 in int8
    model = onnx.load(tmp_path / "model_int8.onnx")
    inits = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in model.graph.initializer}
    low = [v for k, (d, v) in inits.items() if d == onnx.TensorProto.INT4]
    high = [v for k, (d, v) in inits.items() if d == onnx.TensorProto.INT8 and k.endswith("_quantized")]
    assert low and high and all(-8 <= w.min() and w.max() <= 7 for w in low)
    assert max(int(np.abs(w).max()) for w in low) <= 8 < min(int(np.abs(w).max()) for w in high)
    resumed = api.train_quant(lenet, train, tmp_path, train=TrainConfig(steps=4), resume=tmp_path / "qat.onnx",
                              echo=lambda s: None, quiet=True)
    assert resumed["config"]["quant"]["layer_weight_bits"] == bits


def test_optimizers_give_multiplied_parameters_their_own_learning_rate():
    from qatool.train.optim import SGD, Adam

    g = {"a": np.float32([1.0, -2.0]), "s": np.float32([0.5])}
    sgd = SGD({"a": np.zeros(2, np.float32), "s": np.ones(1, np.float32)}, lr=0.01, lr_multipliers={"s": 30.0})
    sgd.step(g)
    sgd.step(g)  # momentum 0.9: the second update is lr * (0.9 g + g)
    np.testing.assert_allclose(sgd.params["a"], -0.01 * 2.9 * g["a"], rtol=1e-6)
    np.testing.assert_allclose(sgd.params["s"], 1 - 0.3 * 2.9 * g["s"], rtol=1e-6)
    adam = Adam({"a": np.zeros(2, np.float32), "s": np.ones(1, np.float32)}, lr=0.01, lr_multipliers={"s": 30.0})
    adam.step(g)  # Adam's first step moves each parameter by lr * sign(g)
    np.testing.assert_allclose(adam.params["a"], [-0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(adam.params["s"], [1 - 0.3], rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown parameters: t"):
        SGD({"a": np.zeros(2, np.float32)}, lr=0.01, lr_multipliers={"t": 2.0})


def test_adam_moves_a_relative_parameter_by_lr_times_its_size():
    """A step size of 2e-6 under Adam at lr 3e-5 (the label-free default): an absolute step of ~lr would take it
    below zero at once; a relative one moves it by 3e-5 of itself."""
    from qatool.train.optim import Adam

    params = {"w": np.float32([0.5]), "s": np.float32([2e-6, 0.1])}
    adam = Adam(params, lr=3e-5, relative=["s"])
    adam.step({"w": np.float32([1.0]), "s": np.float32([1.0, -1.0])})
    np.testing.assert_allclose(params["w"], [0.5 - 3e-5], rtol=1e-6)
    np.testing.assert_allclose(params["s"], [2e-6 * (1 - 3e-5), 0.1 * (1 + 3e-5)], rtol=1e-6)


def test_scale_lr_is_the_learning_rate_of_the_lsq_step_sizes_only(lenet, digits):
    """One SGD step: with lr 1e-3 and scale_lr 0.1 the step sizes move as in a run with lr 0.1, the weights as in
    a run with lr 1e-3 (same batch, so the same gradients)."""
    from qatool.convert import normalize_proto
    from qatool.ir.io import load_proto
    from qatool.data.images import ImageDataset
    from qatool.train.loop import Phases, train
    from qatool.data.preprocess import resolve_preprocess
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))
    quant = QuantConfig(weight_bits=4, activation_bits=4, scale_learning="lsq")
    assert QatSession.create(graph, QuantConfig()).learned_scales == []

    def one_step(**cfg):
        session = QatSession.create(graph, quant)
        before = {k: v.copy() for k, v in session.model.params.items()}
        train(session, images, TrainConfig(steps=1, batch_size=16, **cfg), Phases(1, 1), 0, 1, None,
              lambda step, arrays: None, quiet=True)
        return session.learned_scales, before, session.model.params

    scales, init, fast = one_step(lr=0.1)
    scales_b, init_b, mixed = one_step(lr=1e-3, scale_lr=0.1)
    _, _, slow = one_step(lr=1e-3)
    assert scales == scales_b
    assert any(k.endswith(".lsq_scale") for k in scales) and any(".qscale" in k for k in scales)
    for k in init:
        np.testing.assert_array_equal(init[k], init_b[k], err_msg=k)
        if k in scales:  # step sizes: lr 0.1
            np.testing.assert_allclose(mixed[k], fast[k], rtol=1e-6, atol=0, err_msg=k)
            assert not np.array_equal(mixed[k], slow[k]), k  # and not as at lr 1e-3
        else:  # everything else: lr 1e-3
            np.testing.assert_array_equal(mixed[k], slow[k], err_msg=k)


def test_tensor_sizes_are_each_tensors_rms_and_a_zero_tensor_takes_the_median():
    from qatool.train.optim import tensor_sizes

    sizes = tensor_sizes({"w": np.float32([3.0, -4.0]), "v": np.float32([[0.1, 0.1], [-0.1, 0.1]]),
                          "u": np.float32([2.0]), "b": np.zeros(3, np.float32)})
    assert sizes["w"] == pytest.approx(np.sqrt(12.5)) and sizes["v"] == pytest.approx(0.1)
    assert sizes["u"] == pytest.approx(2.0) and sizes["b"] == pytest.approx(2.0)   # median of 3.54, 0.1, 2


def test_update_scale_tensor_moves_each_tensor_by_lr_times_its_rms(lenet, digits):
    """Adam's first step moves every element by about lr * sign(g) (absolute); with update_scale tensor, by that
    times the RMS its tensor had at the start (same batch, so the same gradients)."""
    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from qatool.train.loop import Phases, train
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))

    def moved(scale):
        session = QatSession.create(graph, QuantConfig())
        before = {k: v.copy() for k, v in session.model.params.items()}
        train(session, images, TrainConfig(steps=1, batch_size=16, optimizer="adam", lr=1e-3, update_scale=scale),
              Phases(1, 1), 0, 1, None, lambda step, arrays: None, quiet=True)
        return before, {k: np.abs(session.model.params[k] - before[k]) for k in before}

    before, step = moved("tensor")
    _, plain = moved("absolute")
    trained = [k for k in step if plain[k].any()]     # a parameter with no gradient (a bias before BN) stays
    assert len(trained) >= 4
    for k in trained:
        rms = np.sqrt(np.mean(before[k].astype(np.float64) ** 2))
        hit = plain[k] > 0.5e-3      # ~lr; not where |g| is near Adam's eps (a unit no image reached)
        assert hit.mean() > 0.5, k
        np.testing.assert_allclose(step[k][hit] / plain[k][hit], rms, rtol=1e-3, err_msg=k)


def test_update_scale_step_moves_each_weight_by_lr_times_its_quantization_step(lenet, digits):
    """With update_scale step, Adam's first step moves a quantized weight by about lr times its quantization step
    (max|w| / qmax of each channel at these bits, the median over channels) and every other parameter by lr times
    the median of those steps."""
    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from qatool.train.loop import Phases, train
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))

    def moved(scale):
        session = QatSession.create(graph, QuantConfig(weight_bits=6))
        before = {k: v.copy() for k, v in session.model.params.items()}
        # lr 1: a step-scaled move (~1e-3) stays far above float32's rounding of the weights it is added to
        train(session, images, TrainConfig(steps=1, batch_size=16, optimizer="adam", lr=1.0, update_scale=scale),
              Phases(1, 1), 0, 1, None, lambda step, arrays: None, quiet=True)
        return session, before, {k: np.abs(session.model.params[k] - before[k]) for k in before}

    session, before, step = moved("step")
    _, _, plain = moved("absolute")
    expected = {}
    for n in session.model.graph.nodes:
        if n.op_type == "WeightQuant" and n.input(0) in before:
            assert n.attrs["bits"] == 6
            w = before[n.input(0)]
            per_channel = np.abs(w).reshape(w.shape[0], -1).max(axis=1) if n.attrs.get("axis", 0) == 0 else \
                np.abs(w).max(axis=0)
            expected[n.input(0)] = np.median(per_channel) / 31
    assert len(expected) >= 3
    median = np.median(list(expected.values()))
    trained = [k for k in step if plain[k].any()]
    assert set(expected) <= set(trained) and set(trained) - set(expected)  # weights, and biases too
    for k in trained:
        hit = plain[k] > 0.5  # ~lr; not where |g| is near Adam's eps
        assert hit.mean() > 0.5, k
        np.testing.assert_allclose(step[k][hit] / plain[k][hit], expected.get(k, median), rtol=1e-3, err_msg=k)


def test_scale_lr_flag(lenet, digits, tmp_path):
    from click.testing import CliRunner

    from qatool.cli import cli

    train, _ = digits
    args = ["train-quant", str(lenet), "--train-data", str(train), "--steps", "1", "--batch-size", "8", "-q",
            "--scale-lr", "0.05"]
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a")])
    assert isinstance(res.exception, UsageError) and "needs --scale-learning lsq" in str(res.exception)
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "b"), "--scale-learning", "lsq"])
    assert res.exit_code == 0, res.output
    assert "sgd lr 0.001 (step sizes 0.05)" in res.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["config"]["train"]["scale_lr"] == 0.05


def test_update_scale_flag(lenet, digits, tmp_path):
    from click.testing import CliRunner

    from qatool.cli import cli

    res = CliRunner().invoke(cli, ["train-quant", str(lenet), "--train-data", str(digits[0]), "--steps", "1",
                                   "--batch-size", "8", "-q", "--update-scale", "tensor", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "sgd lr 0.001 x each tensor's RMS" in res.output
    assert json.loads((tmp_path / "report.json").read_text())["config"]["train"]["update_scale"] == "tensor"
    res = CliRunner().invoke(cli, ["train-quant", str(lenet), "--train-data", str(digits[0]), "--steps", "1",
                                   "--batch-size", "8", "-q", "--update-scale", "tensor", "--distill-outputs",
                                   "logits", "-o", str(tmp_path / "free")])     # the label-free path says so too
    assert res.exit_code == 0, res.output
    assert "adam lr 0.0001 x each tensor's RMS; distillation" in res.output
    res = CliRunner().invoke(cli, ["train-quant", str(lenet), "--train-data", str(digits[0]), "--update-scale",
                                   "layer", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "'layer' is not one of 'absolute', 'tensor'" in res.output


def test_a_step_size_pushed_below_zero_stops_training_with_advice(lenet, digits, tmp_path):
    """An LSQ step size that an update drives to zero or below would be floored silently and the quantizer would
    output zeros (loss at chance, then an export onnxruntime refuses): training stops and says what to lower."""
    train, _ = digits
    cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, scale_lr=1e4)
    quant = QuantConfig(weight_bits=4, activation_bits=4, scale_learning="lsq")
    with pytest.raises(TrainingDiverged, match=r"learned step size '.+' fell to -.+ lower --scale-lr"):
        api.train_quant(lenet, train, tmp_path, quant=quant, train=cfg, echo=lambda s: None, quiet=True)
    assert not (tmp_path / "model_int8.onnx").exists()


def test_demo_re_exports_the_checkpoint_train_quant_deployed(tmp_path):
    """The demo's export-int8 step starts from the checkpoint model_int8.onnx was made of (the best validated one),
    so its int8 model has the accuracy train-quant reported."""
    from qatool.demo import run_demo

    result = run_demo(tmp_path, echo=lambda s: None, steps=8, quiet=True)
    int8 = next(r for r in result["eval"]["results"] if r["model"].endswith("model_int8.onnx"))
    assert int8["top1"] == pytest.approx(result["train"]["val"]["top1_int8"])
