"""Distillation QAT: the loss and its gradient, the teacher, an end-to-end run."""

import json

import numpy as np
import onnx
import pytest

from qatool import api
from qatool.train.config import TrainConfig
from qatool.train.loss import distillation_loss, softmax_cross_entropy
from qatool.train.teacher import Teacher


@pytest.mark.parametrize("alpha,t", [(0.0, 1.0), (0.5, 4.0), (1.0, 2.0)])
def test_distillation_loss_gradient_matches_finite_differences(alpha, t):
    rng = np.random.default_rng(0)
    s, te = rng.standard_normal((5, 7)), rng.standard_normal((5, 7)) * 2
    y = rng.integers(0, 7, 5)
    loss, grad = distillation_loss(s, te, y, t, alpha)
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (4, 6)]:
        sp, sm = s.copy(), s.copy()
        sp[i, j] += eps
        sm[i, j] -= eps
        num = (distillation_loss(sp, te, y, t, alpha)[0] - distillation_loss(sm, te, y, t, alpha)[0]) / (2 * eps)
        assert abs(num - grad[i, j]) < 1e-7 + 1e-6 * abs(num)
    if alpha == 0.0:
        assert loss == pytest.approx(softmax_cross_entropy(s, y)[0])
    # the KL term vanishes when the student equals the teacher
    assert distillation_loss(te, te, y, t, 1.0)[0] == pytest.approx(0.0, abs=1e-12)


def test_teacher_cuts_a_final_softmax(tmp_path):
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.eye(3, dtype=np.float32) * 2, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"])],
                          "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, ["N", 3])], initializer=[w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), tmp_path / "t.onnx")
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(Teacher(tmp_path / "t.onnx")(x)[0], x * 2)


def test_distillation_run(lenet, digits, tmp_path):
    train, val = digits
    report = api.train_quant(lenet, train, tmp_path, val_data=val,
                             train=TrainConfig(steps=6, teacher=str(lenet), distill_alpha=0.7), echo=lambda s: None,
                             quiet=True)
    assert report["config"]["train"]["teacher"] == str(lenet)
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert report["val"]["agreement_top1"] >= 0.99
