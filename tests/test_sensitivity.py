"""Per-layer sensitivity on real digits, mixed-precision planning, size parsing, the sensitivity command."""

import json
import math

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import SAMPLE_DIR
from qatool.convert import normalize_proto
from qatool.errors import ConfigError, UsageError
from qatool.ir.io import load_proto
from qatool.cli_quant import sensitivity_command
from qatool.quant.config import QuantConfig
from qatool.quant.mixed import FLOAT_BITS, mixed_precision_config, parse_size, plan_mixed_precision, weight_sizes
from qatool.quant.prepare import mark
from qatool.quant.qparams import weight_grid
from qatool.api import sensitivity
from qatool.quant.sensitivity import layer_sensitivity, single_layer_config, sqnr_db
from qatool.data.images import ImageDataset
from qatool.data.preprocess import resolve_preprocess
from qatool.train.session import QatSession

SCHEMA = json.loads((SAMPLE_DIR.parent / "schemas" / "sensitivity.schema.json").read_text())
LENET_LAYERS = {"/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"}


def test_sensitivity_ranks_every_layer_and_writes_schema_valid_json(lenet, digits, tmp_path):
    _, val_dir = digits
    path = tmp_path / "sens.json"
    report = sensitivity(lenet, val_dir, images=120, calibration_images=100, json_path=path)
    jsonschema.validate(report, SCHEMA)
    assert json.loads(path.read_text()) == report
    assert report["bits"] == 4 and report["activation_bits"] == 8 and report["images"] == 120
    layers = report["layers"]
    assert {r["node"] for r in layers} == LENET_LAYERS
    sqnrs = [r["sqnr_db"] for r in layers]
    assert sqnrs == sorted(sqnrs) and all(math.isfinite(s) and 0 < s < 200 for s in sqnrs)
    assert [r["rank"] for r in layers] == [1, 2, 3, 4]
    assert report["float_top1"] > 0.9
    for r in layers:
        assert r["top1_drop"] == pytest.approx(report["float_top1"] - r["top1"], abs=1e-6)
    assert {r["node"]: r["params"] for r in layers}["/fc1/Gemm"] == 800 * 500


def test_sqnr_is_higher_at_8_bits_than_at_2(lenet, digits):
    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    images = ImageDataset.open(digits[1]).load(resolve_preprocess(graph))
    only_conv1 = ["/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"]
    sqnr = {}
    for bits in (2, 8):
        r = layer_sensitivity(graph, images, QuantConfig(weight_bits=bits, exclude=only_conv1), images=100,
                              calibration_images=100)
        assert [row["node"] for row in r["layers"]] == ["/conv1/Conv"]
        sqnr[bits] = r["layers"][0]["sqnr_db"]
    assert math.isfinite(sqnr[2]) and sqnr[8] > sqnr[2] + 20


def test_one_layer_session_quantizes_exactly_that_layer_unit(lenet):
    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    layer = mark(graph, QuantConfig()).layers[1]  # conv2 -> BN -> Relu
    session = QatSession.create(graph, single_layer_config(graph, layer, QuantConfig(weight_bits=4)))
    (only,) = session.plan.layers
    assert only.node.name == "/conv2/Conv" and only.bn is not None and only.activation is not None
    assert set(session.quant) == {layer.node.input(0), layer.activation.outputs[0]}
    assert len(session.plan.float_nodes) == len(graph.nodes) - 3


def test_sqnr_db():
    ref = np.array([1.0, 1.0])
    assert sqnr_db(ref, np.array([1.1, 0.9])) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == 200.0


REPORT = {"layers": [  # ranked: most sensitive first
    {"node": "a", "params": 1000, "sqnr_db": 5.0},
    {"node": "b", "params": 8000, "sqnr_db": 9.0},
    {"node": "c", "params": 2000, "sqnr_db": 12.0},
    {"node": "d", "params": 4000, "sqnr_db": 20.0},
]}  # all at 4 bits: 7500 bytes; all at 8 bits: 15000


def test_plan_mixed_precision_raises_the_most_sensitive_within_budget():
    assert plan_mixed_precision(REPORT, 15000) == {"a": 8, "b": 8, "c": 8, "d": 8}
    assert plan_mixed_precision(REPORT, 7500) == {"a": 4, "b": 4, "c": 4, "d": 4}
    # a (+500) fits, b (+4000) does not, c (+1000) still does
    plan = plan_mixed_precision(REPORT, 9000)
    assert plan == {"a": 8, "b": 4, "c": 8, "d": 4}
    sizes = weight_sizes(REPORT, plan)
    assert sizes["effective"] == 9000 <= 9000 and sizes["container"] == 1000 + 4000 + 2000 + 2000 and sizes["float"] == 60000
    # the order is the SQNR ranking, whatever the list order
    shuffled = {"layers": list(reversed(REPORT["layers"]))}
    assert plan_mixed_precision(shuffled, 9000) == plan
    # high bits "float": 4 bytes per weight
    plan = plan_mixed_precision(REPORT, 7500 + 3500, high_bits=FLOAT_BITS)
    assert plan == {"a": FLOAT_BITS, "b": 4, "c": 4, "d": 4}
    cfg = mixed_precision_config(QuantConfig(), plan)
    assert cfg.exclude == ["a"] and cfg.layer_weight_bits == {"b": 4, "c": 4, "d": 4}
    assert cfg.weight_bits_of("c") == 4


def test_plan_mixed_precision_errors():
    with pytest.raises(ConfigError, match="smallest possible") as e:
        plan_mixed_precision(REPORT, 7499)
    assert "7,500 bytes" in str(e.value)
    with pytest.raises(ConfigError, match="high_bits"):
        plan_mixed_precision(REPORT, 9000, low_bits=8, high_bits=4)
    with pytest.raises(ConfigError, match="low_bits"):
        plan_mixed_precision(REPORT, 9000, low_bits=1)
    with pytest.raises(ConfigError, match="no layers"):
        plan_mixed_precision({"layers": []}, 9000)


@pytest.mark.parametrize("text,expected", [
    ("50000", 50000), ("50000B", 50000), ("120KB", 120000), ("120kb", 120000), ("120 KiB", 122880),
    ("0.3MB", 300000), ("1.5MiB", 1572864), ("1e5", 100000), ("25%", 25000), ("100%", 100000),
])
def test_parse_size(text, expected):
    assert parse_size(text, float_weight_bytes=100000) == expected


@pytest.mark.parametrize("text,match", [
    ("", "cannot read"), ("abc", "cannot read"), ("-5KB", "cannot read"), ("12XB", "unknown size unit"),
    ("150%", r"\(0, 100\]"), ("0", "less than one byte"), ("0.1", "less than one byte"),
])
def test_parse_size_errors(text, match):
    with pytest.raises(UsageError, match=match):
        parse_size(text, float_weight_bytes=100000)


def test_parse_size_percentage_needs_the_float_size():
    with pytest.raises(UsageError, match="percentage"):
        parse_size("25%")


def test_sensitivity_command(lenet, digits, tmp_path):
    _, val_dir = digits
    path = tmp_path / "s.json"
    runner = CliRunner()
    res = runner.invoke(sensitivity_command, [str(lenet), "--data", str(val_dir), "--json", str(path), "--images", "60",
                                              "--calibration-images", "60", "--bits", "3",
                                              "--exclude", "Gemm"])
    assert res.exit_code == 0, res.output
    report = json.loads(path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["bits"] == 3 and {r["node"] for r in report["layers"]} == {"/conv1/Conv", "/conv2/Conv"}
    assert "sensitivity at W3A8 on 60 images" in res.output and "/conv2/Conv" in res.output
    res = runner.invoke(sensitivity_command, [str(lenet), "--data", str(val_dir), "--bits", "9"])
    assert res.exit_code == 2
    res = runner.invoke(sensitivity_command, [str(lenet), "--data", str(val_dir), "--json", str(lenet)])
    assert isinstance(res.exception, UsageError)


def test_a_mixed_precision_plan_exports_each_layer_at_its_bits(lenet, digits, tmp_path):
    import onnx
    from onnx import numpy_helper

    from qatool.export.deploy import export_session
    from qatool.quant.calibrate import calibrate_session

    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    images = ImageDataset.open(digits[1]).load(resolve_preprocess(graph))
    plan = {"/conv1/Conv": 8, "/conv2/Conv": 4, "/fc1/Gemm": 3, "/fc2/Gemm": 8}
    session = QatSession.create(graph, mixed_precision_config(QuantConfig(), plan))
    calibrate_session(session, images, max_images=64)
    export_session(session, tmp_path / "mixed.onnx", images)
    model = onnx.load(tmp_path / "mixed.onnx")
    weights = {n.input[1]: n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for tensor, node in weights.items():
        src = producers[tensor].input[0]  # the integer weights its DequantizeLinear reads,
        if src in producers:  # through a Cast from INT4 when they fit in 4 bits
            assert producers[src].op_type == "Cast" and plan[node] <= 4, node
            src = producers[src].input[0]
        t = inits[src]
        assert t.data_type == (onnx.TensorProto.INT4 if plan[node] <= 4 else onnx.TensorProto.INT8), node
        q = numpy_helper.to_array(t).astype(int)
        grid = weight_grid(session.config.weight_bits_of(node))  # each layer on its own grid (8 bits: 7 with
        # reduce range, the default on a CPU without VNNI), and reaching its edge
        assert grid.qmin <= q.min() and q.max() <= grid.qmax, node
        assert max(q.max(), -q.min()) >= grid.qmax, node
