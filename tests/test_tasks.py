"""qatool.tasks: losses (finite differences), CTC decoding, meters on hand-made cases, the chooser on small graphs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import ort_run
from onnx import TensorProto, helper, numpy_helper

from qatool.errors import ModelError, UsageError
from qatool.ir.graph import from_onnx
from qatool.tasks import (ClassMap, Classes, ProbabilityMap, Rows, Sequence, Tensor, choose_tasks, ctc_characters,
                          ctc_greedy_decode, ctc_text, edit_distance, kl_divergence, pre_softmax)

RNG = np.random.default_rng(0)


# ---- losses ----------------------------------------------------------------------------------------------------
def numeric_grad(fn, s, h=1e-6):
    g = np.zeros_like(s)
    for i in np.ndindex(s.shape):
        up, down = s.copy(), s.copy()
        up[i] += h
        down[i] -= h
        g[i] = (fn(up) - fn(down)) / (2 * h)
    return g


CASES = [
    ("classes T=1", Classes("y"), (3, 5), None),
    ("classes T=4", Classes("y", temperature=4), (3, 5), None),
    ("classes [N,C,1,1]", Classes("y", temperature=2), (3, 5, 1, 1), None),
    ("classes + labels", Classes("y", temperature=3, alpha=0.3), (4, 5), np.array([0, 4, 2, 2])),
    ("sequence [N,T,C]", Sequence("y"), (2, 4, 6), None),
    ("sequence [T,N,C]", Sequence("y", batch_axis=1, temperature=2), (4, 2, 6), None),
    ("class map", ClassMap("y", temperature=1.5), (2, 3, 2, 2), None),
    ("probability map", ProbabilityMap("y"), (2, 1, 3, 3), None),
    ("tensor", Tensor("y"), (2, 3, 4), None),
    ("rows [N,A,K]", Rows("y"), (2, 5, 3), None),
    ("rows [N,K,A]", Rows("y", field_axis=1), (2, 3, 5), None),
    ("rows weighted", Rows("y", probabilities=[2, 3], confidence=[2]), (2, 5, 4), None),
]


@pytest.mark.parametrize("name,task,shape,labels", CASES, ids=[c[0] for c in CASES])
def test_loss_gradient_matches_finite_differences(name, task, shape, labels):
    s, t = RNG.normal(0, 2, shape), RNG.normal(0, 2, shape)
    if task.kind == "probability_map":
        s, t = 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-t))
    if task.kind == "rows" and task.probabilities:  # the teacher's scores in [0, 1]: weights of its boxes' rows
        t[..., task.probabilities] = 1 / (1 + np.exp(-t[..., task.probabilities]))
    loss, grad = task.loss(s, t, labels)
    assert grad.shape == s.shape and grad.dtype == np.float64 and loss > 0
    np.testing.assert_allclose(grad, numeric_grad(lambda x: task.loss(x, t, labels)[0], s), rtol=1e-5, atol=1e-9)
    assert task.loss(t, t, None)[0] == pytest.approx(0, abs=1e-12)
    loss32, grad32 = task.loss(s.astype(np.float32), t.astype(np.float32), labels)
    assert grad32.dtype == np.float32 and loss32 == pytest.approx(loss, rel=1e-4)


def test_kl_at_temperature_is_the_formula():
    s, t, temp = RNG.normal(0, 3, (4, 7)), RNG.normal(0, 3, (4, 7)), 4.0
    total = 0.0
    for row_s, row_t in zip(s, t):
        p = np.exp(row_t / temp) / np.exp(row_t / temp).sum()
        q = np.exp(row_s / temp) / np.exp(row_s / temp).sum()
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert Classes("y", temperature=temp).loss(s, t)[0] == pytest.approx(temp ** 2 * total / 4, rel=1e-12)
    # over another axis, mean over every other position: [N, C, H, W] per pixel
    m_s, m_t = RNG.normal(size=(2, 3, 2, 2)), RNG.normal(size=(2, 3, 2, 2))
    per_pixel = [kl_divergence(m_s[n, :, h, w][None], m_t[n, :, h, w][None], 2.0, 1)[0]
                 for n in range(2) for h in range(2) for w in range(2)]
    assert ClassMap("y", temperature=2.0).loss(m_s, m_t)[0] == pytest.approx(np.mean(per_pixel), rel=1e-12)


def test_classes_with_labels_is_todays_distillation_loss():
    from qatool.train.loss import distillation_loss

    s, t = RNG.normal(size=(6, 4)).astype(np.float32), RNG.normal(size=(6, 4)).astype(np.float32)
    y = RNG.integers(0, 4, 6)
    want_loss, want_grad = distillation_loss(s, t, y, 4.0, 0.5)
    loss, grad = Classes("y", temperature=4.0, alpha=0.5).loss(s, t, y)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert Classes("y", alpha=0.5).loss(s, t)[0] == pytest.approx(Classes("y").loss(s, t)[0])  # no labels: KL only


def test_normalised_mse_is_inverse_sqnr():
    t = np.ones((2, 1, 4, 4))
    s = t + 0.1
    loss, _ = ProbabilityMap("y", eps=0).loss(s, t)
    assert loss == pytest.approx(0.01)
    assert Tensor("y").loss(np.full((2, 3), 1e-3), np.zeros((2, 3)))[0] == pytest.approx(1.0)  # eps floor: 1e-6/elem


# ---- CTC -------------------------------------------------------------------------------------------------------
def onehot(seq, c=4):
    return np.eye(c)[seq]


def test_rows_loss_normalises_each_field_on_its_own():
    """The mean over fields of each field's normalised MSE: scaling one field (box pixels beside probabilities)
    leaves the loss as it was, where one NMSE over the tensor would be that field's alone."""
    from qatool.tasks.losses import normalised_mse

    s, t = RNG.normal(0, 1, (2, 7, 3)), RNG.normal(0, 1, (2, 7, 3))
    task = Rows("y")
    loss, _ = task.loss(s, t)
    assert loss == pytest.approx(np.mean([normalised_mse(s[..., k], t[..., k])[0] for k in range(3)]), rel=1e-12)
    big = np.array([1000.0, 1.0, 1.0])
    assert task.loss(s * big, t * big)[0] == pytest.approx(loss, rel=1e-5)  # up to the eps floor
    assert normalised_mse(s * big, t * big)[0] == pytest.approx(normalised_mse(s[..., 0], t[..., 0])[0], rel=1e-5)
    moved = Rows("y", field_axis=1).loss(np.swapaxes(s, 1, 2), np.swapaxes(t, 1, 2))[0]
    assert moved == pytest.approx(loss, rel=1e-12)


def test_rows_box_values_count_by_the_teachers_confidence():
    """YOLOX's rows [x, objectness, class]: objectness is sparse (a confidence), class is not (conditioned on an
    object, high on background too). An error in a background row's box value costs nothing, in a confident row's
    it does; a background row's scores always count."""
    from qatool.tasks.kinds import confidence_fields

    t = np.zeros((1, 10, 3))
    t[0, :, 0] = np.arange(10) + 1.0
    t[0, 0, 1] = 0.9  # one confident row
    t[0, :, 2] = 0.6
    assert confidence_fields(t, 2) == [1]
    task = Rows("y", probabilities=[1, 2], confidence=[1])
    background, confident, score = t.copy(), t.copy(), t.copy()
    background[0, 5, 0] += 3
    confident[0, 0, 0] += 3
    score[0, 5, 1] += 0.3  # a background row lights up
    assert task.loss(background, t)[0] == 0 and task.loss(confident, t)[0] > 0 and task.loss(score, t)[0] > 0
    m = task.meter()
    m.update(background, t)
    assert m.result()["field_sqnr_dbs"] == [100.0, 100.0, 100.0]
    m = task.meter()
    m.update(confident, t)
    assert m.result()["field_sqnr_dbs"][0] == pytest.approx(10 * np.log10(0.9 * 1 / (0.9 * 9)), abs=0.005)  # 2 places
    assert Rows("y", probabilities=[1, 2]).loss(background, t)[0] > 0  # without a confidence every row counts


def test_yolov8s_class_scores_are_all_confidences():
    """YOLOv8's [N, 4 + C, anchors]: no objectness; every class score is near zero away from objects, so a row's
    confidence is its best class score."""
    from qatool.tasks.base import rows_along
    from qatool.tasks.kinds import confidence_fields, field_weights

    v = np.zeros((2, 7, 50))
    v[:, :4] = RNG.uniform(0, 640, (2, 4, 50))  # box pixels
    v[:, 4:] = RNG.uniform(0, 0.02, (2, 3, 50))
    v[0, 5, 7] = 0.9  # one object of class 1
    assert confidence_fields(v, 1) == [4, 5, 6]
    w = field_weights(rows_along(v, 1), [4, 5, 6], [4, 5, 6])
    assert w[0, 7] == pytest.approx(0.9) and w[0, 8] <= 0.02 and (w[4:] == 1).all()


def test_rows_meter_reports_each_fields_sqnr():
    from qatool.tasks.judge import Judge, score_of

    f = np.ones((2, 4, 3)) * np.array([100.0, 1.0, 0.5])
    q = f + np.array([1.0, 0.1, 0.0])  # 40 dB, 20 dB and an exact field (capped at 100 dB)
    m = Rows("y").meter()
    m.update(q[:1], f[:1])
    m.update(q[1:], f[1:])
    r = m.result()
    assert r["field_sqnr_dbs"] == [40.0, 20.0, 100.0] and r["worst_field_sqnr_db"] == pytest.approx(20.0)
    assert r["primary"] == "field_sqnr_db" and r["field_sqnr_db"] == pytest.approx(160 / 3)
    assert r["sqnr_db"] == pytest.approx(40.0, abs=0.05)  # the whole tensor's SQNR: the large field's, nearly
    task = Rows("y")
    assert score_of([task], {"y": r}) == ("mean SQNR (dB)", pytest.approx(160 / 3))
    assert not Judge([task], None, None, 1).score_is_share and Judge([Classes("c")], None, None, 1).score_is_share


def test_ctc_greedy_decode():
    scores = np.stack([onehot([1, 1, 0, 1, 2, 2, 0, 0]), onehot([0] * 8), onehot([3] * 8),
                       onehot([0, 2, 0, 2, 2, 0, 1, 3])])
    assert ctc_greedy_decode(scores) == [(1, 1, 2), (), (3,), (2, 2, 1, 3)]
    assert ctc_greedy_decode(np.zeros((2, 0, 4))) == [(), ()]
    assert ctc_text((1, 1, 2, 3), ["a", "b", " "]) == "aab "


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance((1, 2), (1, 2)) == 0


def test_ctc_characters():
    assert ctc_characters("a\nb\nc\n", 4) == ["a", "b", "c"]
    assert ctc_characters("a\r\nb\r\nc", 5) == ["a", "b", "c", " "]  # Paddle's use_space_char
    assert ctc_characters("a\n \nb\n", 4) == ["a", " ", "b"]  # a space line is a character
    assert ctc_characters(json.dumps(["x", "y"]), 3) == ["x", "y"]
    with pytest.raises(ModelError, match="3 entries"):
        ctc_characters("a\nb\nc", 9)


# ---- meters ----------------------------------------------------------------------------------------------------
def test_probability_map_iou_and_pixel_agreement():
    f, q = np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4))
    f[..., :2, :] = 0.9  # top half
    q[..., :, :2] = 0.5  # left half: intersection 4, union 12
    m = ProbabilityMap("y").meter()
    m.update(q, f)
    m.update(np.full((2, 1, 4, 4), 0.1), np.full((2, 1, 4, 4), 0.2))  # both below 0.3: nothing to count
    r = m.result()
    assert r["primary"] == "map_iou" and r["map_iou"] == pytest.approx(1 / 3)
    assert r["pixel_agreement"] == pytest.approx((8 + 32) / 48) and r["images"] == 3


def test_sqnr_and_cosine():
    m = Tensor("y").meter()
    for _ in range(2):
        f = np.ones((3, 100))
        m.update(f + 0.1 * np.where(np.arange(100) % 2, 1, -1), f)  # noise power 0.01 of signal 1: 20 dB
    r = m.result()
    assert r["primary"] == "sqnr_db" and r["sqnr_db"] == pytest.approx(20.0)
    same = Tensor("y").meter()
    same.update(np.ones((2, 3)), np.ones((2, 3)))
    assert same.result()["sqnr_db"] == math.inf and same.result()["cosine"] == pytest.approx(1.0)
    cos = Tensor("y").meter()
    cos.update(np.array([[1.0, 2.0], [0.0, 1.0]]), np.array([[1.0, 2.0], [1.0, 0.0]]))  # per image: 1 and 0
    assert cos.result()["cosine"] == pytest.approx(0.5)


def test_class_map_miou():
    f = np.zeros((1, 2, 1, 4))
    q = np.zeros((1, 2, 1, 4))
    f[0, 1, 0, [2, 3]] = 1  # float argmax 0 0 1 1
    q[0, 1, 0, [1, 2, 3]] = 1  # int8 argmax 0 1 1 1: IoU 1/2 and 2/3
    m = ClassMap("y").meter()
    m.update(q, f)
    r = m.result()
    assert r["primary"] == "miou" and r["miou"] == pytest.approx(7 / 12) and r["pixel_agreement"] == pytest.approx(0.75)


def test_classes_meter():
    f = np.eye(3)[[0, 1, 2, 2]]
    q = np.eye(3)[[0, 1, 1, 2]]
    m = Classes("y").meter()
    m.update(q, f, np.array([0, 1, 2, 0]))
    r = m.result()
    assert (r["agreement"], r["top1_int8"], r["top1_float"]) == (0.75, 0.5, 0.75)


def test_sequence_meter_with_labels():
    chars = ["a", "b", "c"]
    f = np.stack([onehot([1, 0, 2, 2]), onehot([3, 3, 0, 1])])  # "ab", "ca"
    q = np.stack([onehot([1, 0, 2, 2]), onehot([3, 3, 3, 0])])  # "ab", "c"
    m = Sequence("y", batch_axis=1, characters=chars).meter()
    m.update(q.transpose(1, 0, 2), f.transpose(1, 0, 2), ["ab", "cb"])
    r = m.result()
    assert r["primary"] == "seq_agreement" and r["seq_agreement"] == 0.5 and r["char_agreement"] == 0.75
    assert (r["seq_acc_int8"], r["char_acc_int8"]) == (0.5, 0.75) and r["seq_acc_float"] == 0.5
    with pytest.raises(UsageError):
        Sequence("y").meter().update(f, f, ["ab", "ca"])


# ---- chooser ---------------------------------------------------------------------------------------------------
def run_and_choose(nodes, x_shape, outputs, inits, batch=3, labels_kind=None, metadata=None,
                   out_type=TensorProto.FLOAT):
    inits = [numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f" else np.int64), k)
             for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(o, out_type, None) for o in outputs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    values = ort_run(model, {"x": RNG.normal(size=x_shape).astype(np.float32)})
    g = from_onnx(model)
    tasks = choose_tasks(g, dict(zip(outputs, values)), batch, metadata or {}, labels_kind)
    for task in tasks:
        json.dumps(task.to_dict())
    return g, tasks


def w(*shape):
    return RNG.normal(0, 1, shape)


def test_choose_probability_map():
    _, [task] = run_and_choose([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                                helper.make_node("Sigmoid", ["c"], ["y"])], [3, 2, 8, 8], ["y"], {"W": w(1, 2, 3, 3)})
    assert isinstance(task, ProbabilityMap) and task.loss_tensor == "y" and "Sigmoid" in task.why
    # onnxruntime's Sigmoid of a large input is 1.0000001 (PP-OCRv4's text detector at 640 x 640): still a map
    g = from_onnx(helper.make_model(helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])))
    map_ = np.full((3, 1, 4, 4), np.float32(1.0000001))
    map_[:, :, 0] = 0
    [task] = choose_tasks(g, {"y": map_}, 3)
    assert isinstance(task, ProbabilityMap)
    [task] = choose_tasks(g, {"y": map_ * 1.01}, 3)  # clearly above 1: not probabilities
    assert not isinstance(task, ProbabilityMap)


@pytest.mark.parametrize("x_shape,batch_axis", [([3, 5, 4], 0), ([5, 3, 4], 1)])
def test_choose_ctc_sequence(x_shape, batch_axis):
    _, [task] = run_and_choose([helper.make_node("MatMul", ["x", "W"], ["logits"]),
                                helper.make_node("Softmax", ["logits"], ["y"], axis=-1)], x_shape, ["y"],
                               {"W": w(4, 7)}, metadata={"character": "a\nb\nc\nd\ne\n"})
    assert isinstance(task, Sequence) and task.batch_axis == batch_axis and task.loss_tensor == "logits"
    assert task.loss_axis == -1 and task.characters == ["a", "b", "c", "d", "e", " "]
    assert "CTC sequence of 7 classes" in task.why


def test_choose_time_major_logits_without_softmax_as_a_ctc_sequence():
    """PyTorch's CTC layout (ddddocr's CNN+LSTM recogniser): the only output, [T, N, C] logits, no Softmax."""
    _, [task] = run_and_choose([helper.make_node("MatMul", ["x", "W"], ["y"])], [5, 3, 4], ["y"], {"W": w(4, 7)})
    assert isinstance(task, Sequence) and task.batch_axis == 1 and task.loss_tensor == "y"
    assert "time-major, the model's only output, with no Softmax: logits" in task.why
    _, [task] = run_and_choose([helper.make_node("MatMul", ["x", "W"], ["y"])], [3, 5, 4], ["y"], {"W": w(4, 7)})
    assert isinstance(task, Tensor)  # batch first without a Softmax: a detector's raw [N, K, C] as well
    two = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["x", "W"], ["z"])]
    _, tasks = run_and_choose(two, [5, 3, 4], ["y", "z"], {"W": w(4, 7)})
    assert [type(t) for t in tasks] == [Tensor, Tensor]


def test_choose_class_map():
    _, [task] = run_and_choose([helper.make_node("Conv", ["x", "W"], ["c"]),
                                helper.make_node("Softmax", ["c"], ["y"], axis=1)], [3, 2, 4, 4], ["y"],
                               {"W": w(4, 2, 1, 1)})
    assert isinstance(task, ClassMap) and task.loss_tensor == "c" and task.loss_axis == 1


def test_choose_classifier_through_reshape():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["logits"]), helper.make_node("Softmax", ["logits"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    _, [task] = run_and_choose(nodes, [3, 6], ["y"], {"W": w(6, 5), "B": w(5), "shape": np.array([-1, 5])})
    assert isinstance(task, Classes) and task.loss_tensor == "logits" and task.loss_name == "kl"
    _, [task] = run_and_choose([helper.make_node("Gemm", ["x", "W"], ["logits"]),
                                helper.make_node("LogSoftmax", ["logits"], ["y"], axis=1)], [3, 6], ["y"],
                               {"W": w(6, 5)})
    assert isinstance(task, Classes) and task.loss_tensor == "logits"


def test_choose_logits_with_and_without_labels():
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"])]
    _, [task] = run_and_choose(nodes, [3, 6], ["y"], {"W": w(6, 5)}, labels_kind="classes")
    assert isinstance(task, Classes) and task.loss_tensor == "y"
    _, [task] = run_and_choose(nodes, [3, 6], ["y"], {"W": w(6, 5)})  # a model's only [N, C] output: logits
    assert isinstance(task, Classes) and "only output" in task.why
    two = nodes + [helper.make_node("Gemm", ["x", "W"], ["z"])]  # one of two [N, C] outputs: a plain tensor
    _, tasks = run_and_choose(two, [3, 6], ["y", "z"], {"W": w(6, 5)})
    assert [type(t) for t in tasks] == [Tensor, Tensor]
    probs = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
             helper.make_node("Div", ["e", "s"], ["y"])]
    with pytest.raises(UsageError, match="--logits"):
        run_and_choose(probs, [3, 6], ["y"], {"axes": np.array([1])}, labels_kind="classes")


def test_choose_detector_with_two_outputs():
    nodes = [helper.make_node("Conv", ["x", "Wb"], ["b"]), helper.make_node("Reshape", ["b", "s4"], ["b2"]),
             helper.make_node("Transpose", ["b2"], ["boxes"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["x", "Ws"], ["sc"]), helper.make_node("Reshape", ["sc", "s2"], ["sc2"]),
             helper.make_node("Softmax", ["sc2"], ["p"], axis=1),
             helper.make_node("Transpose", ["p"], ["scores"], perm=[0, 2, 1])]
    g, tasks = run_and_choose(nodes, [3, 2, 4, 4], ["boxes", "scores"],
                              {"Wb": w(4, 2, 1, 1), "Ws": w(2, 2, 1, 1), "s4": np.array([3, 4, 16]),
                               "s2": np.array([3, 2, 16])})
    assert [type(t) for t in tasks] == [Tensor, Tensor] and [t.batch_axis for t in tasks] == [0, 0]
    assert "detector" in tasks[1].why
    assert pre_softmax(g, "scores") == "sc2" and pre_softmax(g, "boxes") is None  # per output, not only the first


@pytest.mark.parametrize("fields_last", [True, False])
def test_choose_rows_of_boxes_joined_with_scores(fields_last):
    """YOLOX's (and YOLOv5's) one output [N, anchors, 4 + 1 + C], or YOLOv8's [N, 4 + C, anchors]: box values
    beside Sigmoid probabilities in one tensor are Rows; probabilities alone, or values alone, stay a Tensor."""
    nodes = [helper.make_node("Conv", ["x", "Wb"], ["box"]), helper.make_node("Conv", ["x", "Ws"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["score"]),
             helper.make_node("Concat", ["box", "score"], ["joined"], axis=1),
             helper.make_node("Reshape", ["joined", "shape"], ["y" if not fields_last else "r"])]
    if fields_last:
        nodes.append(helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1]))
    inits = {"Wb": w(4, 2, 1, 1) * 10, "Ws": w(2, 2, 1, 1), "shape": np.array([3, 6, 16])}
    _, [task] = run_and_choose(nodes, [3, 2, 4, 4], ["y"], inits)
    assert isinstance(task, Rows) and task.field_axis == (2 if fields_last else 1) and task.loss_tensor == "y"
    assert "2 in [0, 1] (fields 4, 5) and 4 not" in task.why and task.probabilities == [4, 5]
    scores_only = [helper.make_node("Conv", ["x", "Ws"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["s"]),
                   helper.make_node("Reshape", ["s", "shape"], ["y"])]
    _, [task] = run_and_choose(scores_only, [3, 2, 4, 4], ["y"], {"Ws": w(2, 2, 1, 1), "shape": np.array([3, 2, 16])})
    assert isinstance(task, Tensor)
    boxes_only = [helper.make_node("Conv", ["x", "Wb"], ["b"]), helper.make_node("Reshape", ["b", "shape"], ["y"])]
    _, [task] = run_and_choose(boxes_only, [3, 2, 4, 4], ["y"], {"Wb": w(4, 2, 1, 1) * 10,
                                                                  "shape": np.array([3, 4, 16])})
    assert isinstance(task, Tensor)


def test_choose_integer_output():
    _, [task] = run_and_choose([helper.make_node("ArgMax", ["x"], ["y"], axis=1)], [3, 4, 2, 2], ["y"], {},
                                out_type=TensorProto.INT64)
    assert isinstance(task, Tensor) and "measured only" in task.why


def test_sequences_decoded_with_characters_compare_the_lines_text():
    """With the model's characters, a margin's space at either end is not a different reading."""
    from qatool.tasks.kinds import SequenceMeter

    def scores(seq, t=6):  # one-hot [1, T, 4] scores over blank, a, b, space
        out = np.zeros((1, t, 4))
        out[0, np.arange(t), 0] = 1
        for i, c in enumerate(seq):
            out[0, i, 0], out[0, i, c] = 0, 1
        return out

    m = SequenceMeter(0, ["a", "b", " "])
    m.update(scores([3, 1, 0, 2]), scores([1, 0, 2, 3]))  # " ab" against "ab ": the same line
    m.update(scores([1, 3, 2]), scores([1, 2]))  # "a b" against "ab": not the same
    r = m.result()
    assert r["seq_agreement"] == 0.5 and r["char_agreement"] == pytest.approx((1 + 2 / 3) / 2)
    plain = SequenceMeter(0, None)  # without characters the class indices are compared as they are
    plain.update(scores([3, 1, 0, 2]), scores([1, 0, 2, 3]))
    assert plain.result()["seq_agreement"] == 0.0


def test_judge_measures_each_pair_in_one_pass():
    """measure_pairs calls every run once per batch and measures each (model, reference) pair: a model 10x
    noisier than another against float is 20 dB worse, and the two compared with each other agree."""
    from qatool.tasks.judge import Judge

    class Data:  # two batches of a [N, 1, 4, 4] input
        def batches(self, n):
            yield np.ones((2, 1, 4, 4)), None
            yield np.full((3, 1, 4, 4), 2.0), None

    calls = []

    def run(name, noise):
        def f(x):
            calls.append(name)
            return {"y": x + noise}
        return f

    task = Tensor("y")
    judge = Judge([task], run("float", 0.0), Data(), 8)
    m = judge.measure_pairs({"a": run("a", 0.1), "b": run("b", 0.01)}, [("a", "float"), ("b", "float"), ("a", "b")])
    assert calls.count("float") == calls.count("a") == calls.count("b") == 2
    sqnr = {p: r["outputs"]["y"]["sqnr_db"] for p, r in m.items()}
    assert sqnr[("b", "float")] - sqnr[("a", "float")] == pytest.approx(20.0, abs=1e-9)
    assert m[("a", "float")]["score_name"] == "mean SQNR (dB)" and m[("a", "b")]["outputs"]["y"]["images"] == 5
