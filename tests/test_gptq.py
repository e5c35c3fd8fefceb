"""GPTQ weight rounding (qatool.quant.gptq): the algorithm against round-to-nearest, the layers' columns against
the layers' outputs, and `calibrate --weight-rounding gptq` end to end (integers, onnxruntime, error vs float)."""

import numpy as np
import pytest

from qatool.ir.graph import Node
from qatool.quant.gptq import conv_columns, gptq_round, layer_columns, weight_rows
from qatool.quant.qparams import weight_grid, weight_scales


def _correlated(rng, n, k):
    """Inputs whose features are strongly correlated (as a layer's real inputs are)."""
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    base = rng.standard_normal((n, k // 4 + 1)) @ rng.standard_normal((k // 4 + 1, k))
    return (base + 0.3 * rng.standard_normal((n, k))) @ mix


def test_identity_hessian_is_round_to_nearest(rng):
    grid = weight_grid(4)
    w = rng.standard_normal((6, 20)).astype(np.float32)
    s = weight_scales(w, 0, grid)
    nearest = np.clip(np.rint(w / s[:, None]), grid.qmin, grid.qmax)
    for act_order in (False, True):
        q = gptq_round(w, np.eye(20), s, grid, damp=0.0, act_order=act_order)
        np.testing.assert_array_equal(q, nearest)
    # dampening only scales a diagonal H: still round-to-nearest
    np.testing.assert_array_equal(gptq_round(w, 3 * np.eye(20), s, grid), nearest)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_nearest_on_correlated_inputs(rng, act_order):
    grid = weight_grid(4)
    k, r = 48, 16
    both = _correlated(rng, 4000, k)
    X, held = both[:2000], both[2000:]  # the same distribution, other samples
    w = rng.standard_normal((r, k)).astype(np.float32)
    s = weight_scales(w, 0, grid)
    q = gptq_round(w, X.T @ X, s, grid, act_order=act_order)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    nearest = np.clip(np.rint(w / s[:, None]), grid.qmin, grid.qmax)

    def err(ints, x):
        return float(np.sum((x @ (ints * s[:, None] - w).T) ** 2))

    assert err(q, X) < 0.7 * err(nearest, X)
    assert err(q, held) < 0.7 * err(nearest, held)


@pytest.mark.parametrize("attrs", [
    {},
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
    {"group": 2, "pads": [1, 1, 1, 1]},
    {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]},
])
def test_conv_columns_reproduce_the_conv_output(rng, attrs):
    from tests.ortref import run_node

    g = attrs.get("group", 1)
    x = rng.standard_normal((2, 4, 7, 9)).astype(np.float32)
    w = rng.standard_normal((8, 4 // g, 3, 3)).astype(np.float32)
    want = run_node("Conv", [x, w], [np.float32], attrs)[0]
    X = conv_columns(x, w.shape, attrs)  # [G, K, N * P]
    rows = weight_rows(w, 0).reshape(g, 8 // g, -1)
    got = np.matmul(rows, X).reshape(8, 2, *want.shape[2:]).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmul_and_gemm_columns(rng):
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)  # MatMul [K, M]: rows = w^T (axis 1)
    X = layer_columns(Node("MatMul", ["x", "w"], ["y"], "m"), x, w.shape)
    np.testing.assert_allclose((weight_rows(w, 1) @ X[0]).T, (x @ w).reshape(-1, 3), rtol=1e-5, atol=1e-5)
    wt = np.ascontiguousarray(w.T)  # Gemm transB: [N, K], rows on axis 0
    X = layer_columns(Node("Gemm", ["x", "w"], ["y"], "g", {"transB": 1}), x[0], wt.shape)
    np.testing.assert_allclose((weight_rows(wt, 0) @ X[0]).T, x[0] @ w, rtol=1e-5, atol=1e-5)


# ---- end to end: calibrate --weight-rounding gptq on LeNet and the digits ----------------------------------------
@pytest.fixture(scope="module")
def lenet_w4(lenet, digits, tmp_path_factory):
    """{rounding: (int8 model path, calibrate report)} of LeNet at W4A8, nearest and GPTQ."""
    from qatool.api import calibrate
    from qatool.quant.config import QuantConfig

    out = {}
    for rounding in ("nearest", "gptq"):
        path = tmp_path_factory.mktemp("gptq") / f"lenet_w4a8_{rounding}.onnx"
        r = calibrate(lenet, digits[0], path, method="minmax", images=200, val_data=digits[1],
                      quant=QuantConfig(weight_bits=4, activation_bits=8, weight_rounding=rounding))
        out[rounding] = path, r
    return out


def test_calibrate_gptq_writes_gptqs_integers(lenet, digits, lenet_w4):
    """Each int4 weight of the exported model is GPTQ's integer for the folded float weight, the exported scale and
    H from the float model's inputs on the calibration subset; onnxruntime computes what the simulation does."""
    import onnx
    from onnx import numpy_helper

    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from qatool.quant.calibrate import calibration_indices
    from qatool.quant.config import QuantConfig
    from qatool.quant.gptq import GPTQ_IMAGES, collect_grams
    from qatool.quant.ops import bn_fold_factor
    from qatool.quant.prepare import mark, weight_axes
    from qatool.quant.qparams import channel_shape

    path, r = lenet_w4["gptq"]
    g = r["gptq"]
    assert g["layers"] == 4 and g["mismatches"] == 0 and g["rounded_to_nearest"] == [] and g["changed"] > 0.05
    assert lenet_w4["nearest"][1]["gptq"] is None
    fusion = r["export"]["fusion"]
    assert fusion["unfused"] == [] and fusion["fused"] == fusion["expected"]
    assert r["agreement_top1"] >= 0.99 and abs(r["top1_sim"] - r["top1_int8"]) <= 0.01
    assert r["export"]["agreement"]["max_abs_diff"] < 1e-3  # LeNet's logits stay float (the output tail)

    graph = normalize_proto(load_proto(lenet), for_training=True, free_batch=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))
    layers = mark(graph, QuantConfig(weight_bits=4)).layers
    grams = collect_grams(graph, layers, images, calibration_indices(len(images), GPTQ_IMAGES, 0))
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    grid = weight_grid(4)
    for layer in layers:
        w_name = layer.node.input(1)
        axis, _ = weight_axes(layer.node)
        w = graph.initializers[w_name].astype(np.float32)
        if layer.bn is not None:
            k = bn_fold_factor(*(graph.initializers[layer.bn.input(i)].astype(np.float32) for i in (1, 4)),
                               float(layer.bn.attrs.get("epsilon", 1e-5)))
            w = w * k.reshape(channel_shape(w.ndim, axis))
        q_int8 = inits.get(f"{w_name}_quantized_int4", inits.get(f"{w_name}_quantized"))  # packed as INT4
        scale = inits[f"{w_name}_scale"]
        assert q_int8.min() >= -8 and q_int8.max() <= 7
        q_int8 = q_int8.astype(np.int32)
        H = grams[layer.node.name]
        want = gptq_round(weight_rows(w, axis), H[0], scale, grid)
        np.testing.assert_array_equal(weight_rows(q_int8, axis), want, err_msg=layer.node.name)
        nearest = np.clip(np.rint(weight_rows(w, axis) / scale[:, None]), grid.qmin, grid.qmax)
        assert (weight_rows(q_int8, axis) != nearest).any()


def test_calibrate_gptq_output_is_closer_to_float_than_nearest(lenet, digits, lenet_w4):
    """On held-out images (the val split, not calibrated on) the int8 model's logits are closer to the float
    model's with GPTQ than with round-to-nearest, on onnxruntime."""
    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from tests.helpers import ort_run

    graph = normalize_proto(load_proto(lenet), for_training=True, free_batch=True).graph
    val = ImageDataset.open(digits[1]).load(resolve_preprocess(graph))
    x, _ = val.batch(np.arange(len(val)))
    import onnx
    name = onnx.load(lenet_w4["gptq"][0]).graph.input[0].name
    float_out = ort_run(str(lenet), {onnx.load(str(lenet)).graph.input[0].name: x})[0]
    err = {}
    for rounding, (path, _) in lenet_w4.items():
        out = ort_run(path, {name: x})[0]
        err[rounding] = float(np.mean((out - float_out) ** 2) / np.mean(float_out ** 2))
    assert err["gptq"] < err["nearest"], err


def test_train_quant_starts_from_gptq_and_its_checkpoint_keeps_the_scales(lenet, digits, tmp_path):
    """train-quant --weight-rounding gptq rounds its calibrated start; the fixed scales are state, saved with the
    checkpoint and restored from it; without --init calibrate the option is refused in one line."""
    from qatool.api import train_quant
    from qatool.errors import UsageError
    from qatool.quant.config import QuantConfig
    from qatool.train.checkpoint import load_checkpoint
    from qatool.train.config import TrainConfig
    from qatool.train.session import QatSession

    quant = QuantConfig(weight_bits=4, weight_rounding="gptq")
    train_quant(lenet, digits[0], tmp_path / "run", val_data=digits[1], quant=quant,
                train=TrainConfig(steps=2, batch_size=16, init_images=64), quiet=True)
    ckpt = load_checkpoint(tmp_path / "run" / "qat.onnx")
    assert ckpt.quant.weight_rounding == "gptq" and ckpt.info["gptq"]["layers"] == 4
    stored = {k: v for k, v in ckpt.arrays.items() if k.startswith("weight_scale/")}
    assert len(stored) == 4
    session = QatSession.from_checkpoint(ckpt)
    assert sorted(session.fixed_weight_scales) == sorted(k[len("weight_scale/"):] for k in stored)
    assert session.learned_scales == []  # fixed, not trained
    for k, v in stored.items():
        np.testing.assert_array_equal(session.model.state[k[len("weight_scale/"):]], v)
    with pytest.raises(UsageError, match="needs --init calibrate"):
        train_quant(lenet, digits[0], tmp_path / "run2", quant=quant, train=TrainConfig(steps=1, init="observe"),
                    quiet=True)
    with pytest.raises(Exception, match="weight_rounding must be one of"):
        QuantConfig(weight_rounding="best")


def test_cli_calibrate_weight_rounding(lenet, digits, tmp_path):
    from click.testing import CliRunner

    from qatool.cli_quant import calibrate_command

    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(calibrate_command, [str(lenet), "--data", str(digits[0]), "-o", str(out), "--images", "64",
                                               "--weight-bits", "4", "--weight-rounding", "gptq", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert "GPTQ rounded the weights of 4 layers on 64 inputs" in r.output and out.is_file()


@pytest.mark.parametrize("per_channel", [True, False])
def test_session_rounding_survives_the_simulation_and_the_export(lenet, digits, per_channel):
    """After round_session the simulation's weight integers (WeightQuant on its stored scale) are GPTQ's, and the
    int8 export holds the same integers (per channel and per tensor)."""
    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.export.int8 import qat_to_int8
    from qatool.ir.io import load_proto
    from qatool.quant.calibrate import calibrate_session
    from qatool.quant.config import QuantConfig
    from qatool.quant.gptq import round_session
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(lenet), for_training=True, free_batch=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))
    session = QatSession.create(graph, QuantConfig(weight_bits=3, per_channel=per_channel, weight_rounding="gptq"))
    assert len(session.fixed_weight_scales) == 4 and session.learned_scales == []
    calibrate_session(session, images, "minmax", 64)
    before = {k: v.copy() for k, v in session.model.params.items()}
    report = round_session(session, images, 64)
    assert report.layers == 4 and report.mismatches == 0 and report.changed > 0
    assert any(not np.array_equal(before[k], session.model.params[k]) for k in before)
    x, _ = images.batch(np.arange(8))
    session.model.forward({session.input_name: x}, training=False)  # runs on the stored scales
    g = qat_to_int8(session.model.to_graph())
    wq = {n.name: n for n in session.model.graph.nodes if n.op_type == "WeightQuant"}
    for node in wq.values():
        w_q, _ = session.model.forward({session.input_name: x}, training=False, outputs=list(node.outputs))
        scale = g.initializers[f"{node.input(0)}_scale"]
        axis = int(node.attrs["axis"])
        sim = np.rint(w_q / (scale.reshape([-1 if i == axis else 1 for i in range(w_q.ndim)]) if per_channel
                             else scale))
        np.testing.assert_array_equal(sim, g.initializers[f"{node.input(0)}_quantized"])


def test_sequential_rounds_the_first_layer_as_one_pass_and_later_layers_on_rounded_inputs(lenet, digits):
    """gptq-sequential: layer 1 sees the float input either way (same integers); later layers see the outputs of
    the already-rounded layers, so some of their integers differ from the one-pass rounding."""
    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from qatool.quant.config import QuantConfig
    from qatool.quant.gptq import round_session
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(lenet), for_training=True, free_batch=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))
    weights = {}
    for rounding in ("gptq", "gptq-sequential"):
        session = QatSession.create(graph, QuantConfig(weight_bits=4, weight_rounding=rounding))
        report = round_session(session, images, 64, sequential=rounding == "gptq-sequential")
        assert report.layers == 4 and report.mismatches == 0
        weights[rounding] = [session.model.params[n.input(0)].copy()
                             for layer in session.plan.layers
                             for n in session.model.graph.nodes if n.name == f"{layer.node.name}.weightquant"]
    one, seq = weights["gptq"], weights["gptq-sequential"]
    np.testing.assert_array_equal(one[0], seq[0])
    assert any(not np.array_equal(a, b) for a, b in zip(one[1:], seq[1:]))


# ---- the default: GPTQ at 4-bit weights without labels, nearest elsewhere -----------------------------------------
@pytest.mark.parametrize("given, bits, layer_bits, low_bit, want", [
    (None, 4, {}, "gptq", "gptq"),
    (None, 3, {}, "gptq", "gptq"),
    (None, 8, {}, "gptq", "nearest"),  # 8-bit weights: the recipe's rounding is for 4 bits and below
    (None, 8, {"conv1": 4}, "gptq", "gptq"),  # one 4-bit layer (mixed precision) is enough
    (None, 4, {}, "nearest", "nearest"),  # the classifier recipe
    ("nearest", 4, {}, "gptq", "nearest"),  # given, kept
    ("gptq-sequential", 8, {}, "nearest", "gptq-sequential"),
])
def test_an_unset_rounding_takes_the_recipes_low_bit_rounding(given, bits, layer_bits, low_bit, want):
    from qatool.quant.config import QuantConfig

    cfg = QuantConfig(weight_bits=bits, layer_weight_bits=layer_bits, weight_rounding=given)
    assert cfg.with_rounding(low_bit).weight_rounding == want
    assert cfg.rounding == (given or "nearest") and cfg.stores_weight_scales == (given not in (None, "nearest"))


def test_gptq_is_the_default_at_4_bits_without_labels_only(lenet, digits, tmp_path):
    """The same LeNet at W4A8: with class folders (a classifier with labels) its start rounds to nearest; on a
    flat folder of the same images (no labels) calibrate and train-quant round by GPTQ and say why; at 8 bits, or
    with --init observe, nearest. The resolved rounding is what report.json records."""
    import shutil

    from qatool import api
    from qatool.quant.config import QuantConfig
    from qatool.train.config import TrainConfig

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(digits[0].rglob("*.png"))[:40]):
        shutil.copy(f, flat / f"{i}.png")
    w4 = QuantConfig(weight_bits=4, activation_bits=8)
    said = []
    r = api.calibrate(lenet, flat, tmp_path / "free.onnx", images=40, quant=w4, echo=said.append, verify=False)
    assert r["gptq"] is not None and r["gptq"]["layers"] == 4
    assert "weights rounded by gptq: the default on this path at 4 bits and below (--weight-rounding nearest " \
           "turns it off)" in said
    said.clear()
    r = api.calibrate(lenet, digits[0], tmp_path / "labelled.onnx", images=40, quant=w4, echo=said.append,
                      verify=False)
    assert r["gptq"] is None and not any("rounded by gptq" in s for s in said)
    r = api.calibrate(lenet, flat, tmp_path / "w8.onnx", images=40, quant=QuantConfig(), verify=False)
    assert r["gptq"] is None

    report = api.train_quant(lenet, flat, tmp_path / "qat", train=TrainConfig(steps=1), quant=w4, quiet=True)
    assert report["config"]["quant"]["weight_rounding"] == "gptq" and report["gptq"]["layers"] == 4
    report = api.train_quant(lenet, flat, tmp_path / "observe", train=TrainConfig(steps=1, init="observe"),
                             quant=w4, quiet=True)
    assert report["config"]["quant"]["weight_rounding"] == "nearest" and report["gptq"] is None
    report = api.train_quant(lenet, digits[0], tmp_path / "cls", train=TrainConfig(steps=1), quant=w4, quiet=True)
    assert report["config"]["quant"]["weight_rounding"] == "nearest"


def test_grams_are_summed_in_chunks_and_batches_shrink_for_large_inputs(lenet, digits):
    """add_gram holds only `chunk` positions in float64 at a time and sums to X X^T; collect_grams gives the same
    H whatever its batch (a large input takes fewer a pass: all the layers' inputs of a pass are held at once)."""
    from qatool.convert import normalize_proto
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess
    from qatool.ir.io import load_proto
    from qatool.quant.config import QuantConfig
    from qatool.quant.gptq import GPTQ_BATCH, GPTQ_BATCH_ELEMENTS, add_gram, collect_grams, gptq_batch
    from qatool.quant.prepare import mark

    X = np.random.default_rng(0).standard_normal((2, 5, 23)).astype(np.float32)
    whole = np.matmul(X.astype(np.float64), np.swapaxes(X.astype(np.float64), 1, 2))
    np.testing.assert_allclose(add_gram(None, X, chunk=4), whole, rtol=1e-12)
    np.testing.assert_allclose(add_gram(whole.copy(), X, chunk=7), 2 * whole, rtol=1e-12)

    graph = normalize_proto(load_proto(lenet), for_training=True, free_batch=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))
    idx = np.arange(20)
    assert gptq_batch(images, idx) == GPTQ_BATCH  # 28x28 digits

    class _Large:  # the same items, said to be 800x608 pages
        groups, item_shape = images.groups, staticmethod(lambda i: (3, 800, 608))
    assert gptq_batch(_Large, idx) == max(1, GPTQ_BATCH_ELEMENTS // (3 * 800 * 608)) < GPTQ_BATCH

    layers = mark(graph, QuantConfig(weight_bits=4)).layers
    one, eight = (collect_grams(graph, layers, images, idx, batch) for batch in (1, 8))
    for name in one:
        np.testing.assert_allclose(one[name], eight[name], rtol=1e-5, atol=1e-6 * np.abs(eight[name]).max())
