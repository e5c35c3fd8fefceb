"""qatool eval on real digits: report schema, accuracy, agreement, sizes, engine vs onnxruntime, errors, CLI."""

import json
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import qatool.cli  # noqa: F401  (before qatool.cli_eval, which takes the shared options from it)
from helpers import SAMPLE_DIR, ort_run
from qatool import api
from qatool.errors import DataError, ModelError, UsageError
from qatool.cli_eval import eval_command
from qatool.eval.evaluate import evaluate, format_table
from qatool.ir.io import load_graph, save_graph
from qatool.train.checkpoint import load_checkpoint
from qatool.train.config import TrainConfig
from qatool.data.images import ImageDataset
from qatool.data.preprocess import METADATA_KEY, Preprocess
from qatool.train.session import QatSession

SCHEMA = json.loads((SAMPLE_DIR.parent / "schemas" / "eval-report.schema.json").read_text())


@pytest.fixture(scope="module")
def qat_out(lenet, digits, tmp_path_factory):
    """A short QAT run of the sample LeNet: out/qat.onnx (checkpoint) and out/model_int8.onnx."""
    out = tmp_path_factory.mktemp("qat")
    api.train_quant(lenet, digits[0], out, train=TrainConfig(steps=3), echo=lambda s: None, quiet=True)
    return out


def test_report_is_schema_valid_with_accuracy_agreement_size_latency(lenet, digits, qat_out, tmp_path,
                                                                      monkeypatch):
    from qatool.eval import evaluate as evaluate_module

    timed = []

    def fake_latency_ms(run, x, runs, budget_s):  # a deterministic stand-in for the clock: ms from the batch
        out = run(x)
        assert len(out) == len(x)  # the model really runs on this batch
        timed.append((len(x), runs, budget_s))
        return 0.125 * len(x) + 1.0 / 3, runs

    monkeypatch.setattr(evaluate_module, "latency_ms", fake_latency_ms)
    int8 = qat_out / "model_int8.onnx"
    report = evaluate([lenet, int8], digits[1], json_path=tmp_path / "eval.json")
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    jsonschema.validate(on_disk, SCHEMA)
    jsonschema.validate(report, SCHEMA)
    assert on_disk == report
    assert report["images"] == 200 and report["classes"] == 10 and report["backend"] == "ort"
    assert report["threads"] is None and report["machine"]["cpu_count"] >= 1
    first, second = report["results"]
    assert first["model"] == str(lenet) and second["model"] == str(int8)
    assert first["agreement_top1"] is None
    assert 0 <= second["agreement_top1"] <= 1
    assert first["top1"] > 0.9, "the sample LeNet is a trained model"
    assert first["top1"] <= first["top5"]
    assert second["size_bytes"] < 0.3 * first["size_bytes"]
    for r in report["results"]:
        assert r["images"] == 200
        assert (r["latency_ms_batch1"], r["latency_ms_batch"], r["latency_batch_size"]) == (0.4583, 8.3333, 64)
    runs = (evaluate_module.LATENCY_RUNS_BATCH1, evaluate_module.LATENCY_RUNS_BATCH)
    budget = evaluate_module.LATENCY_BUDGET_S
    assert timed == [(1, runs[0], budget), (64, runs[1], budget)] * 2  # batch 1, then batch 64, for both models
    assert report["latency"] == {"runs_batch1": runs[0], "runs_batch": runs[1],
                                 "budget_s": evaluate_module.LATENCY_BUDGET_S}


def test_latency_is_the_median_of_warm_timed_runs_within_a_budget(monkeypatch):
    """One untimed warm-up run, then up to `runs` timed ones (at least one), fewer once the budget is spent;
    the median in ms. A fake clock that only the runs advance: no wall-clock time in the test."""
    import time

    from qatool.runtime.backends import latency_ms

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    durations: list[float] = []

    def run(x):
        clock[0] += durations.pop(0)

    durations[:] = [9.0, 0.005, 0.001, 0.003, 0.002, 0.009]  # the 9 s warm-up is not timed; the median, not the mean
    ms, n = latency_ms(run, None, 5, budget_s=2.0)
    assert n == 5 and ms == pytest.approx(3.0, abs=1e-9) and durations == []
    durations[:] = [0.0, 1.5, 1.0, 7.0]  # 2.5 s spent after two runs: the budget of 2 s stops the third
    ms, n = latency_ms(run, None, 5, budget_s=2.0)
    assert n == 2 and ms == pytest.approx(1250.0, abs=1e-6) and durations == [7.0]
    durations[:] = [0.0, 3.0]  # one run even when it alone exceeds the budget
    assert latency_ms(run, None, 5, budget_s=2.0) == (pytest.approx(3000.0), 1)


def test_engine_on_checkpoint_is_the_qat_simulation_and_agrees_with_int8(digits, qat_out):
    qat, int8 = qat_out / "qat.onnx", qat_out / "model_int8.onnx"
    report = evaluate([qat, int8], digits[1], backend=["engine", "ort"], latency=False)
    jsonschema.validate(report, SCHEMA)
    sim, deployed = report["results"]
    assert report["backend"] == "mixed" and (sim["backend"], deployed["backend"]) == ("engine", "ort")
    # what train-quant's report calls top1_qat: the session's model, eval mode, on the logits tensor
    session = QatSession.from_checkpoint(load_checkpoint(qat))
    images = ImageDataset.open(digits[1]).load(Preprocess.from_json(session.float_graph.metadata[METADATA_KEY]))
    x, labels = images.batch(np.arange(len(images)))
    logits = session.model.forward({session.input_name: x}, outputs=[session.logits])[0]
    assert sim["top1"] == np.mean(logits.argmax(1) == labels)
    # the int8 model's accuracy and agreement, from onnxruntime run here on the same inputs
    (deployed_logits,) = ort_run(int8, {session.input_name: x})
    assert deployed["top1"] == np.mean(deployed_logits.argmax(1) == labels)
    assert deployed["agreement_top1"] == np.mean(deployed_logits.argmax(1) == logits.argmax(1))
    assert deployed["agreement_top1"] >= 0.99
    assert sim["latency_ms_batch1"] is None and report["latency"] is None


def test_images_decoded_once_and_flags_override_metadata(lenet, digits, tmp_path, monkeypatch):
    other = load_graph(lenet)  # the same model, stored with another normalisation
    other.metadata[METADATA_KEY] = json.dumps({"size": [28, 28], "color": "gray", "mean": [0.5], "std": [0.5]})
    save_graph(other, tmp_path / "other.onnx")
    loads = []
    real_load = ImageDataset.load
    monkeypatch.setattr(ImageDataset, "load", lambda self, pre: loads.append(pre) or real_load(self, pre))

    report = evaluate([lenet, lenet, tmp_path / "other.onnx"], digits[1], latency=False)
    assert len(loads) == 1  # two preprocessings, one size and colour: decoded once, normalised per model
    assert [r["preprocess"]["mean"] for r in report["results"]] == [[0.1307], [0.1307], [0.5]]
    assert report["results"][1]["agreement_top1"] == 1.0
    assert report["results"][2]["top1"] != report["results"][0]["top1"]  # its own mean/std was applied

    loads.clear()
    report = evaluate([lenet, tmp_path / "other.onnx"], digits[1], latency=False,
                      preprocess_overrides={"mean": (0.25,), "std": None})
    assert len(loads) == 1
    assert [(r["preprocess"]["mean"], r["preprocess"]["std"]) for r in report["results"]] == [([0.25], [0.3081]),
                                                                                              ([0.25], [0.5])]


def _eleven_classes(digits, tmp_path):
    data = tmp_path / "eleven"
    shutil.copytree(digits[1], data)
    shutil.copytree(digits[1] / "9", data / "99")
    return data


@pytest.mark.parametrize("case, error, words", [
    ("missing data", DataError, ["data path not found"]),
    ("missing model", ModelError, ["model file not found", "nope.onnx"]),
    ("more classes than outputs", DataError, ["11 classes", "10 outputs"]),
    ("backend count", UsageError, ["--backend is given 2 times for 3 models"]),
    ("engine on int8", ModelError, ["quantized model", "--backend ort"]),
    ("report over a model", UsageError, ["is one of the models"]),
])
def test_errors_are_one_clear_qatool_error(lenet, digits, qat_out, tmp_path, case, error, words):
    int8 = qat_out / "model_int8.onnx"
    args = {
        "missing data": dict(models=[lenet], data=tmp_path / "no-such-dir"),
        "missing model": dict(models=[lenet, tmp_path / "nope.onnx"], data=digits[1]),
        "more classes than outputs": dict(models=[lenet], data=_eleven_classes(digits, tmp_path)),
        "backend count": dict(models=[lenet, lenet, int8], data=digits[1], backend=["ort", "engine"]),
        "engine on int8": dict(models=[int8], data=digits[1], backend="engine"),
        "report over a model": dict(models=[lenet, tmp_path / "x.onnx"], data=digits[1], json_path=tmp_path / "x.onnx"),
    }[case]
    with pytest.raises(error) as info:
        evaluate(latency=False, **args)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_table_has_one_row_per_model(lenet, digits, qat_out):
    report = evaluate([lenet, qat_out / "model_int8.onnx"], digits[1], latency=False)
    lines = format_table(report)
    header = lines[1].split()
    assert header[:6] == ["model", "backend", "top-1", "top-5", "agree", "size"]
    rows = [ln for ln in lines if ln.startswith(("lenet_bn.onnx", "model_int8.onnx"))]
    assert len(rows) == 2
    assert rows[0].split()[:5] == ["lenet_bn.onnx", "ort", f"{100 * report['results'][0]['top1']:.2f}%",
                                   f"{100 * report['results'][0]['top5']:.2f}%", "-"]
    assert rows[1].split()[-2:] == ["-", "-"]  # no latency measured
    assert "KB" in rows[1] and "MB" in rows[0]


def test_cli_prints_table_and_writes_json(lenet, digits, qat_out, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(eval_command, [str(lenet), str(qat_out / "qat.onnx"), "--data", str(digits[1]),
                                               "--backend", "ort", "--backend", "engine", "--batch-size", "32",
                                               "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["threads"] == 1 and report["batch_size"] == 32
    assert [r["backend"] for r in report["results"]] == ["ort", "engine"]
    assert report["results"][1]["latency_batch_size"] == 32
    lines = result.output.splitlines()
    assert any(ln.startswith("lenet_bn.onnx ") for ln in lines) and any(ln.startswith("qat.onnx ") for ln in lines)
    assert "ms b=32" in lines[1]
    assert lines[-1] == f"wrote {out}"


def test_cli_without_json_prints_only_the_table(lenet, digits, tmp_path):
    result = CliRunner().invoke(eval_command, [str(lenet), "--data", str(digits[1]), "--no-latency"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 5  # summary, header, rule, one row, note
    assert "wrote" not in result.output


# The CLI's error mapping lives in qatool.cli.main; run it in a real process.
MAIN = "import sys; from qatool.cli import main; main(sys.argv[1:])"


@pytest.mark.parametrize("case, code", [("missing data", 1), ("bad backend count", 2)])
def test_cli_errors_are_one_line(lenet, digits, tmp_path, case, code):
    args = {"missing data": [str(lenet), "--data", str(tmp_path / "nowhere")],
            "bad backend count": [str(lenet), str(lenet), str(lenet), "--data", str(digits[1]),
                                  "--backend", "ort", "--backend", "engine"]}[case]
    r = subprocess.run([sys.executable, "-c", MAIN, "eval", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qatool: error:"), r.stderr


def test_onnxruntime_run_errors_become_one_model_error_line():
    """A batch onnxruntime refuses (here: the wrong element type) is a ModelError naming the model, not
    onnxruntime's exception."""
    import numpy as np
    from onnx import TensorProto, helper

    from qatool.runtime.backends import ort_run, ort_session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    sess = ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    np.testing.assert_array_equal(ort_run(sess, np.float32([[-1, 0, 2]])), [[0, 0, 2]])
    with pytest.raises(ModelError, match=r"^onnxruntime failed to run tiny\.onnx: .*") as e:
        ort_run(sess, np.int64([[-1, 0, 2]]), "tiny.onnx")
    assert "\n" not in str(e.value)
