"""Mixed precision without labels: sensitivity over every output of a model with several, label-free train-quant
and calibrate with --mixed-precision (GPTQ rounding for the layers it puts at 4 bits), and calibrate --config."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from qatool import api
from qatool.cli import cli
from qatool.quant.config import QuantConfig
from qatool.train.config import TrainConfig
from test_anymodel import _save, blob_images, map_model  # noqa: F401  (fixtures)
from test_errors import assert_clean_error, run_cli



def _heads(path, outputs):
    """A shared convolution and two heads: a Sigmoid map and a plain feature map; `outputs` the graph outputs."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="trunk"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["z"], pads=[1, 1, 1, 1], name="map_head"),
             helper.make_node("Sigmoid", ["z"], ["map"]),
             helper.make_node("Conv", ["r", "w3", "b3"], ["feat"], name="feat_head")]
    shapes = {"map": ["N", 1, 16, 16], "feat": ["N", 3, 16, 16]}
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                 [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs],
                 {"w1": rng.standard_normal((4, 1, 3, 3)) * 0.5, "b1": np.zeros(4),
                  "w2": np.abs(rng.standard_normal((1, 4, 3, 3))) * 0.3, "b2": np.full(1, -1.5),
                  "w3": rng.standard_normal((3, 4, 1, 1)), "b3": np.zeros(3)}, path)


def test_sensitivity_without_labels_measures_every_output(blob_images, tmp_path):  # noqa: F811
    """A model of two outputs is measured on both: each layer's SQNR is the mean of what the same layer costs each
    output (the first output alone, as before, ranked a detector's layers by one head)."""
    train, _ = blob_images
    measured = {}
    for outputs in (["map", "feat"], ["map"], ["feat"]):
        model = _heads(tmp_path / f"{'_'.join(outputs)}.onnx", outputs)
        report = api.sensitivity(model, train, QuantConfig(weight_bits=2), images=16, calibration_images=16)
        assert report["output"] == ", ".join(outputs)
        measured[report["output"]] = {r["node"]: r["sqnr_db"] for r in report["layers"]}
    both, alone = measured["map, feat"], (measured["map"], measured["feat"])
    assert set(both) == {"trunk", "map_head", "feat_head"}
    shared = set(both) & set(alone[0]) & set(alone[1])
    assert "trunk" in shared
    for node in shared:
        assert both[node] == pytest.approx((alone[0][node] + alone[1][node]) / 2, abs=2e-4), node
    assert abs(both["trunk"] - alone[0]["trunk"]) > 0.5  # the second output changes the measure


def test_label_free_train_quant_takes_mixed_precision(map_model, blob_images, tmp_path):  # noqa: F811
    """--mixed-precision was read only on the classifier path; without labels it was silently ignored. One of the
    two layers fits the budget at 8 bits, the other gets 4, and that layer's start is rounded by GPTQ (the
    label-free default at 4 bits) although --weight-bits is 8."""
    train, val = blob_images
    lines = []
    report = api.train_quant(map_model, train, tmp_path, val_data=val,
                             quant=QuantConfig(weight_bits=8, reduce_range=False),
                             train=TrainConfig(steps=2, batch_size=8, mixed_precision="19%"),
                             echo=lines.append, quiet=True)
    bits = report["config"]["quant"]["layer_weight_bits"]
    assert sorted(bits.values()) == [4, 8]
    assert report["config"]["quant"]["weight_rounding"] == "gptq"
    assert any(ln.startswith("mixed precision: 1 of 2 layers at 8 bits") for ln in lines)
    assert report["gptq"] is not None


def test_calibrate_mixed_precision_and_config(map_model, blob_images, tmp_path):  # noqa: F811
    train, val = blob_images
    runner = CliRunner()
    out = tmp_path / "mixed.onnx"
    r = runner.invoke(cli, ["calibrate", str(map_model), "--data", str(train), "--val-data", str(val), "-o", str(out),
                            "--no-reduce-range", "--mixed-precision", "19%"])
    assert r.exit_code == 0, r.output
    assert "mixed precision: 1 of 2 layers at 8 bits, the rest at 4" in r.output
    assert "weights rounded by gptq" in r.output
    assert out.exists()

    # the same plan from a config file (train-quant's form): its training settings are named and left alone
    report = api.calibrate(map_model, train, tmp_path / "api.onnx", quant=QuantConfig(reduce_range=False),
                           mixed_precision="19%", echo=lambda s: None)
    plan = report["quant"]["layer_weight_bits"]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"layer_weight_bits": plan, "steps": 5, "reduce_range": False}))
    out2 = tmp_path / "from_file.onnx"
    r = runner.invoke(cli, ["calibrate", str(map_model), "--data", str(train), "-o", str(out2), "--config",
                            str(config)])
    assert r.exit_code == 0, r.output
    assert f"{config}: training settings not used by calibrate: steps" in r.output
    assert "weights rounded by gptq" in r.output  # a layer at 4 bits: the label-free default rounding


def test_calibrate_bad_mixed_precision_is_one_line_before_any_work(capsys, map_model, blob_images,  # noqa: F811
                                                                    tmp_path):
    train, _ = blob_images
    out = tmp_path / "x.onnx"
    code, stdout, err = run_cli(capsys, "calibrate", map_model, "--data", train, "-o", out,
                                "--mixed-precision", "12 parsecs")
    assert_clean_error(code, err, 2, "unknown size unit 'parsecs'")
    assert not out.exists() and "measuring" not in stdout
    code, _, err = run_cli(capsys, "calibrate", map_model, "--data", train, "-o", out, "--config",
                           tmp_path / "missing.yaml")
    assert code != 0 and not out.exists() and len(err.strip().splitlines()) == 1
