"""Retreat (qatool.train.retreat): a validation below the start sends the run back to the best state so far, at a
tenth of the lr, at most twice; a label-free run does it by default, a classifier with labels does not."""

import json

import numpy as np
import pytest

from qatool import api
from qatool.quant.config import QuantConfig
from qatool.train.config import CLASSIFIER_RECIPE, DISTILL_RECIPE, TrainConfig
from qatool.train.retreat import Retreat
from test_anymodel import blob_images, map_model  # noqa: F401  (fixtures)


class _Validator:
    key = "score"

    def __init__(self):
        self.history, self.best = [], None

    @property
    def start(self):
        return self.history[0]["score"] if self.history and self.history[0]["step"] == 0 else None

    def margin(self, highest):
        return 0.0

    def record(self, step, score):
        self.history.append({"step": step, "score": score})
        if self.best is None or score >= self.best["score"]:
            self.best = self.history[-1]


class _Model:
    def __init__(self):
        self.params = {"w": np.zeros(3, np.float32)}
        self.state = {"span": np.array([0.0, 1.0], np.float32)}


def test_below_the_start_restores_the_best_state_and_scales_the_lr():
    v, m, said = _Validator(), _Model(), []
    r = Retreat(v, m, echo=said.append)
    v.record(0, 0.80)
    r.begin(0)
    m.params["w"] += 1.0
    v.record(10, 0.85)  # a new best: its state is kept
    assert not r.after_validation(10) and r.lr_scale == 1.0
    m.params["w"] += 1.0
    m.state["span"][...] = [-5, 5]
    v.record(20, 0.82)  # below the best but above the start: carry on
    assert not r.after_validation(20)
    w_live = m.params["w"]
    v.record(30, 0.50)
    assert r.after_validation(30)
    assert m.params["w"] is w_live  # restored in place: the engine and the optimizer hold these arrays
    np.testing.assert_array_equal(w_live, [1.0, 1.0, 1.0])  # step 10's weights
    np.testing.assert_array_equal(m.state["span"], [0.0, 1.0])  # and step 10's observer range
    assert r.lr_scale == pytest.approx(0.1)
    assert r.events == [{"step": 30, "score": 0.5, "start": 0.8, "back_to": 10, "lr_scale": pytest.approx(0.1)}]
    assert said == ["step 30: score 0.5 is below the start's 0.8; back to step 10's state, lr x0.1 from here"]
    v.record(40, 0.10)
    assert r.after_validation(40) and r.lr_scale == pytest.approx(0.01)
    v.record(50, 0.10)
    assert not r.after_validation(50) and r.lr_scale == pytest.approx(0.01)  # at most RETREAT_LIMIT times


def test_the_state_restored_includes_observer_ranges():
    v, m = _Validator(), _Model()
    r = Retreat(v, m)
    v.record(0, 0.9)
    r.begin(0)
    m.state["span"][...] = [-7, 7]
    m.params["w"] -= 3
    v.record(5, 0.2)
    assert r.after_validation(5)
    np.testing.assert_array_equal(m.state["span"], [0.0, 1.0])
    np.testing.assert_array_equal(m.params["w"], [0.0, 0.0, 0.0])


class _ShareValidator(_Validator):
    """A share over 300 inputs: its margin is one standard error (qatool.eval.validation.Validator.margin)."""

    def margin(self, highest):
        return float(np.sqrt(highest * (1 - highest) / 300))


def test_a_dip_within_the_noise_margin_is_not_a_retreat():
    """PP-OCRv4 rec, session 17: 0.840 against a start of 0.853 over 300 lines is 4 lines, inside one standard
    error (2.0 points): carry on. A fall beyond it still goes back."""
    v, m = _ShareValidator(), _Model()
    r = Retreat(v, m)
    v.record(0, 0.853)
    r.begin(0)
    v.record(200, 0.840)
    assert not r.after_validation(200) and r.events == []
    v.record(400, 0.80)  # 2.6 standard errors below
    assert r.after_validation(400) and r.events[0]["back_to"] == 0


def test_a_resumed_run_takes_its_lr_scale_from_the_recorded_retreats():
    v, m = _Validator(), _Model()
    r = Retreat(v, m, events=[{"step": 4, "lr_scale": 0.1}])
    assert r.lr_scale == pytest.approx(0.1)
    v.record(0, 0.9)
    v.record(8, 0.1)
    r.begin(8)  # its best (step 0) was validated before the resume: nothing in memory to go back to
    assert not r.after_validation(8)


def test_the_recipes():
    assert DISTILL_RECIPE.retreat is True and CLASSIFIER_RECIPE.retreat is False
    assert TrainConfig().with_recipe(DISTILL_RECIPE).retreat is True
    assert TrainConfig(retreat=False).with_recipe(DISTILL_RECIPE).retreat is False


def _update(cfg, recipe, low_bits):
    resolved = cfg.with_recipe(recipe, low_bits)
    return resolved.update_scale, resolved.lr


def test_the_update_scale_and_lr_at_low_bits():
    """Without labels at 4 bits and below: lr 5e-3 of each weight's quantization step; an lr given alone is
    absolute; an update scale given alone takes the recipe's lr for it. Classifiers and 8 bits: unchanged."""
    assert _update(TrainConfig(), DISTILL_RECIPE, True) == ("step", 5e-3)
    assert _update(TrainConfig(), DISTILL_RECIPE, False) == ("absolute", 1e-4)
    assert _update(TrainConfig(lr=1e-3), DISTILL_RECIPE, True) == ("absolute", 1e-3)
    assert _update(TrainConfig(update_scale="absolute"), DISTILL_RECIPE, True) == ("absolute", 1e-4)
    assert _update(TrainConfig(update_scale="step"), DISTILL_RECIPE, False) == ("step", 5e-3)
    assert _update(TrainConfig(update_scale="tensor"), DISTILL_RECIPE, True) == ("tensor", 1e-4)
    assert _update(TrainConfig(update_scale="step", lr=1e-2), DISTILL_RECIPE, True) == ("step", 1e-2)
    assert _update(TrainConfig(), CLASSIFIER_RECIPE, True) == ("absolute", 1e-3)


def test_a_label_free_run_at_4_bits_says_its_lr(map_model, blob_images, tmp_path):  # noqa: F811
    train, _ = blob_images
    lines = []
    report = api.train_quant(map_model, train, tmp_path, quant=QuantConfig(weight_bits=4),
                             train=TrainConfig(steps=1, batch_size=8), echo=lines.append, quiet=True)
    assert report["config"]["train"]["update_scale"] == "step" and report["config"]["train"]["lr"] == 5e-3
    assert any(ln.startswith("lr 0.005 x each weight's quantization step (--update-scale step): the default")
               for ln in lines)
    assert any("adam lr 0.005 x each weight's quantization step" in ln for ln in lines)


def test_a_label_free_run_with_a_ruinous_lr_retreats(map_model, blob_images, tmp_path):  # noqa: F811
    """Adam at lr 1 wrecks the map model at once: the first validation is below the start, the run goes back to the
    start's state at lr x0.1, and the lr the log records follows."""
    train, val = blob_images
    lines = []
    report = api.train_quant(map_model, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=8, batch_size=4, lr=1.0, schedule="constant", validate_every=2),
                             echo=lines.append, quiet=True)
    retreats = report["val"]["retreats"]
    assert retreats and retreats[0]["step"] == 2 and retreats[0]["back_to"] == 0
    assert retreats[0]["score"] < retreats[0]["start"]
    assert any(ln.startswith("step 2: ") and "below the start" in ln for ln in lines)
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == [1.0, 1.0] and lrs[2] == pytest.approx(0.1)
    assert report["config"]["train"]["retreat"] is True
    off = api.train_quant(map_model, train, tmp_path / "off", val_data=val,
                          train=TrainConfig(steps=8, batch_size=4, lr=1.0, schedule="constant", validate_every=2,
                                            retreat=False), echo=lambda s: None, quiet=True)
    assert off["val"]["retreats"] == []


def test_a_classifier_retreats_when_asked_and_reports_it(lenet, digits, tmp_path):
    """--retreat on a classifier with labels (off by default there): the retreats are recorded beside the
    validations, in report.json's `val` as in a label-free run's."""
    train, val = digits
    cfg = TrainConfig(steps=8, lr=1.0, schedule="constant", validate_every=2, retreat=True)
    report = api.train_quant(lenet, train, tmp_path, val_data=val, train=cfg, echo=lambda s: None, quiet=True)
    retreats = report["val"]["retreats"]
    assert retreats and retreats[0]["back_to"] == 0 and retreats[0]["score"] < retreats[0]["start"]
    plain = api.train_quant(lenet, train, tmp_path / "plain", val_data=val,
                            train=TrainConfig(steps=2, validate_every=1), echo=lambda s: None, quiet=True)
    assert plain["val"]["retreats"] == [] and plain["config"]["train"]["retreat"] is False
