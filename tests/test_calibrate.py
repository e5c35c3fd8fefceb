"""Post-training calibration on real digits: the int8 model, the ranges of each method, QAT from calibrated
ranges, the KL search against a plain loop, the calibrate command."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qatool.convert import normalize_proto
from qatool.errors import DataError, UsageError
from qatool.export.deploy import export_session
from qatool.ir.io import load_proto
from qatool.api import calibrate
from qatool.quant.calibrate import (AVERAGE_GROUP, calibrate_session, calibration_indices, collect_ranges,
                                    entropy_window)
from qatool.cli_quant import calibrate_command
from qatool.quant.config import QuantConfig
from qatool.quant.qparams import activation_grid, activation_qparams
from qatool.train.config import TrainConfig
from qatool.data.images import ImageDataset
from qatool.train.loop import Phases, train
from qatool.data.preprocess import resolve_preprocess
from qatool.train.session import QatSession


@pytest.fixture(scope="module")
def lenet_setup(lenet, digits):
    """(float training graph, its quantized tensors, the digits' training images)."""
    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    images = ImageDataset.open(digits[0]).load(resolve_preprocess(graph))
    tensors = list(QatSession.create(graph, QuantConfig()).quant)
    return graph, tensors, images


def test_minmax_ptq_is_a_fused_int8_model_close_to_float(lenet, digits, tmp_path):
    train_dir, val_dir = digits
    out = tmp_path / "int8.onnx"
    r = calibrate(lenet, train_dir, out, method="minmax", images=200, val_data=val_dir)
    onnx.checker.check_model(onnx.load(out))
    fusion = r["export"]["fusion"]
    assert fusion["unfused"] == [] and fusion["fused"] == fusion["expected"] == 4
    model = onnx.load(out)
    n_conv_gemm = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    assert fusion["kernels"].get("QLinearConv", 0) + fusion["kernels"].get("QGemm", 0) == n_conv_gemm == 4
    assert r["top1_float"] > 0.9
    assert r["top1_int8"] >= r["top1_float"] - 0.03
    assert r["agreement_top1"] >= 0.99 and abs(r["top1_sim"] - r["top1_int8"]) <= 0.01
    assert r["calibration_images"] == 200 and r["images"] == 200
    assert all(v["lo"] == v["min"] and v["hi"] == v["max"] for v in r["ranges"].values())


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_and_entropy_ranges_lie_within_min_max(lenet_setup, symmetric):
    graph, tensors, images = lenet_setup
    grid = activation_grid(8, symmetric)
    minmax = collect_ranges(graph, tensors, images, "minmax", 160, grid)
    for method in ("percentile", "entropy"):
        ranges = collect_ranges(graph, tensors, images, method, 160, grid)
        for t, r in ranges.items():
            assert (r.min, r.max) == (minmax[t].min, minmax[t].max), t
            assert r.min <= r.lo <= r.hi <= r.max, (method, t, r)
        if method == "entropy":  # real activations have long tails: some range is clipped below its max
            assert any(r.hi < r.max for r in ranges.values())
    # the 100th percentile is the observed range itself
    full = collect_ranges(graph, tensors, images, "percentile", 160, grid, percentile=100.0)
    assert all((r.lo, r.hi) == (r.min, r.max) for r in full.values())


def test_average_ranges_are_the_mean_of_32_image_groups_whatever_the_batch(lenet_setup):
    """--method average: the mean over consecutive groups of 32 chosen images of each group's own min / max
    (weighted by the group's images: 150 images are four groups of 32 and one of 22), the same at any engine
    batch; the observed min / max are kept beside it."""
    graph, tensors, images = lenet_setup
    chosen = calibration_indices(len(images), 150, seed=3)
    groups = [chosen[i:i + AVERAGE_GROUP] for i in range(0, len(chosen), AVERAGE_GROUP)]
    assert [len(g) for g in groups] == [32, 32, 32, 32, 22]
    per_group = [collect_ranges(graph, tensors, replace(images, images=images.images[g], labels=None), "minmax", None)
                 for g in groups]
    weights = np.array([len(g) for g in groups], float)
    minmax = collect_ranges(graph, tensors, images, "minmax", 150, seed=3)
    for batch in (8, 32, 64):
        ranges = collect_ranges(graph, tensors, images, "average", 150, seed=3, batch_size=batch)
        for t, r in ranges.items():
            want_lo = np.dot(weights, [g[t].lo for g in per_group]) / weights.sum()
            want_hi = np.dot(weights, [g[t].hi for g in per_group]) / weights.sum()
            assert r.lo == pytest.approx(want_lo, rel=1e-6, abs=1e-7), (batch, t)
            assert r.hi == pytest.approx(want_hi, rel=1e-6, abs=1e-7), (batch, t)
            # the observed min / max, to float32 rounding: BLAS may sum a layer's products in another order at
            # another batch (seen on an AMD EPYC: 8.764533996 at batch 8 against 8.764533043 at the default)
            assert (r.min, r.max) == (pytest.approx(minmax[t].min, rel=1e-6, abs=1e-7),
                                      pytest.approx(minmax[t].max, rel=1e-6, abs=1e-7)), (batch, t)
            assert r.min <= r.lo <= r.hi <= r.max
    # a tail that only some images reach is averaged down: some range is narrower than the observed one
    assert any(r.hi < r.max for r in ranges.values())


def _kl_loop(h, zero_bin, levels, eps=1e-6):
    """TensorRT's entropy calibration written plainly, one candidate window at a time."""
    bins, total = h.size, h.sum()
    kls = []
    for length in range(levels, bins + 1):
        s = zero_bin - int(np.rint(length * zero_bin / bins))
        e = s + length
        p = h[s:e].astype(float)
        p[0] += h[:s].sum()
        p[-1] += h[e:].sum()
        q = np.zeros(length)
        cuts = [(k * length) // levels for k in range(levels + 1)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            nonzero = p[a:b] > 0
            if nonzero.any():
                q[a:b] = np.where(nonzero, h[s + a:s + b].sum() / nonzero.sum(), 0)
        if q.sum() == 0:
            kls.append(np.inf)
            continue
        pn, qn = p / total, q / q.sum()
        qn = np.where((pn > 0) & (qn == 0), eps, qn)
        m = pn > 0
        kls.append(float(np.sum(pn[m] * np.log(pn[m] / qn[m]))))
    kls = np.array(kls)
    length = levels + int(np.nonzero(kls <= kls.min() + 1e-9)[0][-1])
    s = zero_bin - int(np.rint(length * zero_bin / bins))
    return s, s + length


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_kl_search_equals_the_plain_loop(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.standard_normal(4000) * (seed + 1), rng.standard_normal(15) * 12])
    h = np.histogram(values, bins=160)[0].astype(float)
    if seed % 2:
        h[:30] = 0  # empty stretches, as after a ReLU
    zero_bin = int(rng.integers(0, 160))
    assert entropy_window(h, zero_bin, 16) == _kl_loop(h, zero_bin, 16)


def test_calibrated_session_starts_qat_from_the_calibrated_ranges(lenet_setup, tmp_path):
    graph, _, images = lenet_setup
    session = QatSession.create(graph, QuantConfig())
    ranges = calibrate_session(session, images, "percentile", max_images=128)
    inits = session.model.graph.initializers
    grid = activation_grid(8, False)
    for t, q in session.quant.items():
        np.testing.assert_array_equal(inits[q.span], np.float32([ranges[t].lo, ranges[t].hi]))
        scale, zero = activation_qparams(float(inits[q.span][0]), float(inits[q.span][1]), grid)
        assert inits[q.scale] == scale and inits[q.zero_point] == zero
    # the moving-average observer continues from the calibrated range
    x, _ = images.batch(np.arange(16))
    q_in = session.quant[session.input_name]
    before = inits[q_in.span].copy()
    session.set_phase(0, freeze_bn_after=0, freeze_observers_after=10)
    session.model.forward({session.input_name: x}, training=True, outputs=[session.logits])
    m = np.float32(0.9)
    expected = before * m + np.float32([x.min(), x.max()]) * (np.float32(1) - m)
    np.testing.assert_allclose(inits[q_in.span], expected, rtol=1e-6)
    # a short QAT run from there still exports a fused int8 model
    result = train(session, images, TrainConfig(steps=3, batch_size=16), Phases(1, 2), 0, 3, None,
                   lambda step, arrays: None, quiet=True)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    exported = export_session(session, tmp_path / "int8.onnx", None)
    assert exported.fusion.unfused == []


def test_calibrate_command(lenet, digits, tmp_path):
    _, val_dir = digits
    out = tmp_path / "int8.onnx"
    res = CliRunner().invoke(calibrate_command, [str(lenet), "--data", str(val_dir), "-o", str(out), "--images", "64",
                                                 "--method", "entropy"])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    assert "calibrating (entropy) on 64 images" in res.output
    assert "4 of 4 quantized nodes fused" in res.output and "integer kernels (QGemm" in res.output
    assert "top-1 on" in res.output and "int8 onnxruntime" in res.output


def test_calibrate_errors(lenet, digits, tmp_path):
    _, val_dir = digits
    runner = CliRunner()
    res = runner.invoke(calibrate_command, [str(lenet), "--data", str(val_dir), "-o", str(tmp_path / "x.onnx"),
                                            "--method", "kl"])
    assert res.exit_code == 2 and "kl" in res.output
    res = runner.invoke(calibrate_command, [str(lenet), "--data", str(tmp_path / "nowhere"),
                                            "-o", str(tmp_path / "x.onnx")])
    assert isinstance(res.exception, DataError) and "not found" in str(res.exception)
    with pytest.raises(UsageError, match="is the input file"):
        calibrate(lenet, val_dir, lenet)
    with pytest.raises(UsageError, match="method"):
        calibrate(lenet, val_dir, tmp_path / "x.onnx", method="kl")
    assert not (tmp_path / "x.onnx").exists()


def test_unlabelled_images_calibrate_without_top1(lenet, digits, tmp_path):
    """A folder whose classes are not the model's outputs (here: one folder of images) still calibrates."""
    import shutil

    _, val_dir = digits
    folder = tmp_path / "images" / "all"
    folder.mkdir(parents=True)
    for f in sorted(val_dir.rglob("*.png"))[::10]:
        shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
    r = calibrate(lenet, tmp_path / "images", tmp_path / "int8.onnx", method="percentile")
    assert r["top1_float"] is None and r["top1_int8"] is None
    assert r["agreement_top1"] >= 0.95 and r["export"]["fusion"]["unfused"] == []
