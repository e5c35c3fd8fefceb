"""The recipe's evidence-based choices and its safe start and end, on real digits.

A "pretrained elsewhere" stand-in: the sample LeNet with its BatchNormalizations re-parametrised so that
eval mode computes exactly what it did (running statistics moved, scale and shift compensating), while the
batch statistics of any batch are far from the running ones, as for a model trained on other data.
"""

import json

import numpy as np
import onnx
import pytest

from helpers import ort_run
from qatool import api
from qatool.convert import normalize
from qatool.ir.io import load_graph, save_graph
from qatool.quant.config import QuantConfig
from qatool.train.config import TrainConfig
from qatool.data.images import ImageDataset
from qatool.data.preprocess import resolve_preprocess
from qatool.train.recipe import bn_evidence


def _elsewhere(lenet, path, factor: float = 3.0):
    g = load_graph(lenet)
    for bn in [n for n in g.nodes if n.op_type == "BatchNormalization"]:
        gamma, beta, mean, var = (g.initializers[bn.input(i)] for i in range(1, 5))
        eps = float(bn.attrs.get("epsilon", 1e-5))
        s = np.sqrt(var + eps)
        # running sigma x factor and mean + 2 sigma; gamma' (x - m') / s' + beta' is then the eval output it was
        g.initializers[bn.input(1)] = (gamma * factor).astype(np.float32)
        g.initializers[bn.input(2)] = (beta + gamma * 2.0).astype(np.float32)
        g.initializers[bn.input(3)] = (mean + 2.0 * s).astype(np.float32)
        g.initializers[bn.input(4)] = ((var + eps) * factor**2 - eps).astype(np.float32)
    save_graph(g, path)
    return path


@pytest.fixture(scope="module")
def elsewhere(lenet, tmp_path_factory):
    return _elsewhere(lenet, tmp_path_factory.mktemp("elsewhere") / "lenet_elsewhere.onnx")


def _images(model, folder):
    g = normalize(load_graph(model), for_training=True).graph
    return g, ImageDataset.open(folder).load(resolve_preprocess(g))


def test_the_stand_in_computes_what_lenet_computes(lenet, elsewhere):
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    a, b = ort_run(str(lenet), {"input": x})[0], ort_run(str(elsewhere), {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bn_evidence_freezes_only_a_model_whose_batch_statistics_mislead(lenet, elsewhere, digits):
    train, _ = digits
    g, images = _images(lenet, train)
    own = bn_evidence(g, images, batch_size=32)
    assert not own.freeze_from_start, own.summary()
    assert own.train_loss < 1.25 * own.eval_loss + 0.05
    g2, images2 = _images(elsewhere, train)
    before = {k: v.copy() for k, v in g2.initializers.items()}
    other = bn_evidence(g2, images2, batch_size=32)
    assert other.freeze_from_start, other.summary()
    assert abs(other.eval_loss - own.eval_loss) < 1e-3  # eval mode is unchanged by the re-parametrisation
    assert all(np.array_equal(before[k], g2.initializers[k]) for k in before), "the probe changed the graph"


def test_train_quant_freezes_bn_from_the_start_on_evidence(elsewhere, digits, tmp_path):
    train, val = digits
    said = []
    report = api.train_quant(elsewhere, train, tmp_path, val_data=val, train=TrainConfig(steps=8, batch_size=32),
                             echo=said.append, quiet=True)
    assert report["config"]["bn_check"]["freeze_from_start"]
    assert report["config"]["freeze_bn_after"] == 0
    assert any("running statistics from the first step" in s for s in said)
    assert all(json.loads(ln)["bn_frozen"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert report["val"]["top1_int8"] >= report["val"]["top1_float"] - 0.02


def test_an_explicit_freeze_step_skips_the_check(elsewhere, digits, tmp_path):
    train, val = digits
    report = api.train_quant(elsewhere, train, tmp_path, val_data=val, quant=QuantConfig(freeze_bn_after=4),
                             train=TrainConfig(steps=6, batch_size=32), echo=lambda s: None, quiet=True)
    assert report["config"]["bn_check"] is None and report["config"]["freeze_bn_after"] == 4


def _ort_top1(path, folder):
    g = load_graph(path)
    data = ImageDataset.open(folder).load(resolve_preprocess(g))
    x, y = data.batch(np.arange(len(data)))
    out = ort_run(str(path), {onnx.load(path).graph.input[0].name: x})[0]
    return float(np.mean(out.argmax(1) == y))


def test_start_and_checkpoints_are_measured_and_the_best_is_kept(lenet, digits, tmp_path):
    """A learning rate that wrecks the model: the run says it ended below its start, and the int8 model written
    is the best validated one, which is the start (post-training quantization)."""
    train, val = digits
    said = []
    report = api.train_quant(lenet, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=8, lr=1.0, schedule="constant", validate_every=2),
                             echo=said.append, quiet=True)
    v = report["val"]
    steps = [c["step"] for c in v["checkpoints"]]
    assert steps == [0, 2, 4, 6, 8]
    assert v["start_top1_int8"] == v["checkpoints"][0]["top1_int8"] > 0.9
    assert v["ended_below_start"] and any("QAT ended below its start" in s for s in said)
    assert not v["far_below_float"] and not any("points below float" in s for s in said)  # the start was kept
    # the kept step: the latest within one validation image of the highest accuracy
    one = 1 / 200 + 1e-9
    highest = max(c["top1_int8"] for c in v["checkpoints"])
    assert v["int8_step"] == v["best_step"] == max(c["step"] for c in v["checkpoints"]
                                                   if c["top1_int8"] >= highest - one)
    assert v["top1_int8"] == pytest.approx(v["best_top1_int8"])
    assert _ort_top1(tmp_path / "model_int8.onnx", val) == pytest.approx(v["best_top1_int8"])
    assert (tmp_path / "qat_best.onnx").is_file() and report["outputs"]["best_checkpoint"]
    assert any("selected on these validation images" in s for s in said)


def test_a_later_checkpoint_one_image_worse_is_kept_a_worse_one_is_not(tmp_path):
    from qatool.eval.validation import Validator

    saved = []
    v = Validator(session=None, data=[0] * 500, save_best=lambda path, step: saved.append(step),
                  qat_path=tmp_path / "qat.onnx")
    for step, right in ((0, 491), (50, 485), (100, 490), (150, 488), (200, 489)):
        v.record(step, right / 500)
    assert v.kept_step(200) == 100 and saved == [0, 100]  # 490 is one image from 491; 488 and 489 are not
    v.record(250, 492 / 500)
    assert v.kept_step(250) == 250


@pytest.mark.parametrize("share, kept", [(True, 800), (False, 200)])
def test_without_labels_a_later_checkpoint_within_one_standard_error_is_kept(tmp_path, share, kept):
    """PP-OCRv4 rec's validation agreement over 300 lines (session 15, seed 1): step 800's 93.7 % lies within one
    standard error (1.3 points at 94.3 %) of step 200's 94.3 %, so a share keeps step 800 (on the test lines 94.7 %
    against step 200's 88.0 %); step 400's 91.3 % does not. A score of another scale (dB, a user's metric) keeps
    the highest."""
    from types import SimpleNamespace

    from qatool.eval.validation import Validator

    saved = []
    v = Validator(session=None, data=[0] * 300, save_best=lambda path, step: saved.append(step),
                  qat_path=tmp_path / "qat.onnx", judge=SimpleNamespace(score_is_share=share), key="score")
    for step, right in ((0, 251), (200, 283), (400, 274), (600, 280), (800, 281)):
        v.record(step, right / 300)
    assert v.kept_step(800) == kept
    assert saved == ([0, 200, 600, 800] if share else [0, 200])


def test_keep_last_writes_the_final_step(lenet, digits, tmp_path):
    train, val = digits
    report = api.train_quant(lenet, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=8, validate_every=4, keep="last"),
                             echo=lambda s: None, quiet=True)
    v = report["val"]
    assert v["int8_step"] == 8 and v["top1_int8"] == pytest.approx(v["checkpoints"][-1]["top1_int8"])


def test_an_int8_model_far_below_float_is_warned_about(lenet, digits, tmp_path):
    """The learning rate that wrecks the model, with the last step kept: the run says how far below float the int8
    model is and what to try."""
    train, val = digits
    said = []
    report = api.train_quant(lenet, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=8, lr=1.0, schedule="constant", validate_every=4, keep="last"),
                             echo=said.append, quiet=True)
    v = report["val"]
    assert v["top1_int8"] < v["top1_float"] - 0.05 and v["far_below_float"]
    warning = [s for s in said if "points below float" in s]
    assert len(warning) == 1 and "--activation-bits 8" in warning[0] and "qatool sensitivity" in warning[0]


def test_a_quantized_start_at_chance_is_warned_about(lenet, digits, tmp_path):
    """Symmetric 2-bit activations leave LeNet's ReLU outputs two levels: post-training quantization is at chance
    (10 classes) and the run says so before training, and in the report."""
    train, val = digits
    said = []
    report = api.train_quant(lenet, train, tmp_path, val_data=val,
                             quant=QuantConfig(weight_bits=2, activation_bits=2, symmetric_activations=True),
                             train=TrainConfig(steps=2, validate_every=2), echo=said.append, quiet=True)
    v = report["val"]
    assert v["start_top1_int8"] <= 0.19 < v["top1_float"] and v["start_at_chance"]
    warning = [s for s in said if "quantized start is at chance" in s]
    assert len(warning) == 1 and "W2A2" in warning[0] and "--activation-bits 8" in warning[0]
    assert said.index(warning[0]) < next(i for i, s in enumerate(said) if s.startswith("QAT: steps"))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the validation of an overflowed state stops cleanly
@pytest.mark.parametrize("symmetric, at_chance", [(True, True), (False, False)])
def test_a_divergence_from_a_chance_start_names_more_bits(lenet, digits, tmp_path, symmetric, at_chance):
    """A learning rate that overflows the model: the error says to lower it, and, when the quantized start was
    at chance (symmetric 2-bit activations), that more bits are the likelier cure."""
    from qatool.train.loop import TrainingDiverged

    train, val = digits
    with pytest.raises(TrainingDiverged, match="lower --lr") as e:
        api.train_quant(lenet, train, tmp_path, val_data=val,
                        quant=QuantConfig(weight_bits=2, activation_bits=2, symmetric_activations=symmetric),
                        train=TrainConfig(steps=6, lr=1e4, schedule="constant", validate_every=3),
                        echo=lambda s: None, quiet=True)
    assert ("start was at chance" in str(e.value) and "--activation-bits 8" in str(e.value)) == at_chance


def test_a_start_above_chance_gets_no_such_warning(lenet, digits, tmp_path):
    train, val = digits
    said = []
    report = api.train_quant(lenet, train, tmp_path, val_data=val, train=TrainConfig(steps=2, validate_every=2),
                             echo=said.append, quiet=True)
    assert report["val"]["start_at_chance"] is False and not any("at chance" in s for s in said)


def _calibrated_session(model, folder, quant):
    from qatool.quant.calibrate import calibrate_session
    from qatool.train.session import QatSession

    g, images = _images(model, folder)
    session = QatSession.create(g, quant)
    calibrate_session(session, images, max_images=128)
    return session, images


@pytest.mark.parametrize("name", ["lenet_bn", "mobilenetv2_small"])
def test_gradient_check_keeps_batch_statistics_where_they_help(name, digits):
    """The sample models at W4A4: batch statistics repair what 4-bit ranges broke (MobileNet: gradient norm ~1 with
    them, ~80 without), so BN keeps its schedule; the probe leaves the session as it was."""
    from helpers import SAMPLE_DIR
    from qatool.train.recipe import gradient_evidence

    train, _ = digits
    session, images = _calibrated_session(SAMPLE_DIR / f"{name}.onnx", train, QuantConfig(weight_bits=4, activation_bits=4))
    state = {k: v.copy() for k, v in session.model.state.items()}
    params = {k: v.copy() for k, v in session.model.params.items()}
    evidence = gradient_evidence(session, images, batch_size=32)
    assert not evidence.freeze_from_start, evidence.summary()
    assert all(np.array_equal(state[k], session.model.state[k]) for k in state)
    assert all(np.array_equal(params[k], session.model.params[k]) for k in params)
    assert not session.model.ctx.bn_frozen and not session.model.ctx.observers_frozen


def test_gradient_check_freezes_bn_where_batch_statistics_amplify(lenet, digits, tmp_path):
    """Running deviations 100x the batch ones at each of LeNet's BNs: in training mode each BN multiplies the
    gradient by up to 100 (eval mode computes what LeNet computes); at 30x the ratio was 98, at the threshold."""
    from qatool.train.recipe import GRAD_RATIO, gradient_evidence

    train, _ = digits
    model = _elsewhere(lenet, tmp_path / "amplifying.onnx", factor=100.0)
    session, images = _calibrated_session(model, train, QuantConfig())
    evidence = gradient_evidence(session, images, batch_size=32)
    assert evidence.freeze_from_start and evidence.batch_stats_norm > GRAD_RATIO * evidence.running_stats_norm


def test_a_run_of_no_steps_measures_its_start_once_and_writes_it(lenet, digits, tmp_path):
    train, val = digits
    report = api.train_quant(lenet, train, tmp_path, val_data=val, train=TrainConfig(steps=0),
                             echo=lambda s: None, quiet=True)
    v = report["val"]
    assert [c["step"] for c in v["checkpoints"]] == [0] and v["int8_step"] == 0
    assert v["top1_int8"] == pytest.approx(v["start_top1_int8"]) and not v["ended_below_start"]
