"""Every bad input: one line on stderr, a non-zero exit, no traceback, no partial output, nothing lost."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qatool.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_clean_error(code, err, expected_code, match):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qatool: error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.fixture
def lenet_bytes(lenet):
    return lenet.read_bytes()


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    (b"this is not a model", "not a readable ONNX model"),
    (b"", "not an ONNX model"),
    ("truncated", "not a readable ONNX model"),
])
def test_bad_model_files(capsys, tmp_path, lenet_bytes, content, match):
    src = tmp_path / "m.onnx"
    if content == "truncated":
        src.write_bytes(lenet_bytes[: len(lenet_bytes) // 3])
    elif content is not None:
        src.write_bytes(content)
    for args in (["convert", src, "-o", tmp_path / "o.onnx"],
                 ["train-quant", src, "--train-data", tmp_path, "-o", tmp_path / "out"],
                 ["export-int8", src, "-o", tmp_path / "o.onnx"],
                 ["eval", src, "--data", tmp_path]):
        code, _, err = run_cli(capsys, *args)
        assert_clean_error(code, err, 1, match)
        assert not (tmp_path / "o.onnx").exists()


def test_external_data_outside_the_model_folder_is_refused(capsys, tmp_path):
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=key, value=value)
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])], initializer=[w])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with open(model_dir / "m.onnx", "wb") as f:
        f.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    code, _, err = run_cli(capsys, "convert", model_dir / "m.onnx", "-o", tmp_path / "o.onnx")
    assert_clean_error(code, err, 1, "outside the model's folder")


def test_unsupported_op_is_named(capsys, tmp_path):
    graph = helper.make_graph([helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i", name="odd")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "train-quant", tmp_path / "m.onnx", "--train-data", tmp_path, "-o", tmp_path / "o")
    assert_clean_error(code, err, 1, "'Einsum' (node 'odd')")


def test_not_an_image_model_and_dynamic_size(capsys, tmp_path, digits):
    train, _ = digits
    vec = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 10])],
                            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])])
    onnx.save(helper.make_model(vec, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), tmp_path / "v.onnx")
    code, _, err = run_cli(capsys, "train-quant", tmp_path / "v.onnx", "--train-data", train, "-o", tmp_path / "o")
    assert_clean_error(code, err, 2, "not one image tensor")
    dyn = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, "H", "W"])],
                            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, "H", "W"])])
    onnx.save(helper.make_model(dyn, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), tmp_path / "d.onnx")
    code, _, err = run_cli(capsys, "train-quant", tmp_path / "d.onnx", "--train-data", train, "-o", tmp_path / "o")
    assert_clean_error(code, err, 2, "give --size")


@pytest.mark.parametrize("args,expected,match", [
    (["--bits", "9"], 2, "9 is not in the range 2<=x<=8"),
    (["--weight-bits", "1"], 2, "1 is not in the range"),
    (["--size", "abc"], 2, "expected HxW"),
    (["--mean", "0.1,0.2"], 2, "expected 1 or 3 numbers"),
])
def test_bad_flags_are_usage_errors(capsys, lenet, digits, tmp_path, args, expected, match):
    train, _ = digits
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", train, "-o", tmp_path / "o", *args)
    assert_clean_error(code, err, expected, match)


def test_bad_config_file_names_the_key(capsys, lenet, digits, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("activation_bits: 12\n")
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", tmp_path / "o",
                           "--config", cfg)
    assert_clean_error(code, err, 1, "key activation_bits")


def test_unwritable_output_folder(capsys, lenet, digits, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", blocker / "out")
    assert_clean_error(code, err, 2, "cannot create the output folder")


def test_an_input_is_never_overwritten(capsys, lenet, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(lenet.read_bytes())
    code, _, err = run_cli(capsys, "convert", src, "-o", src)
    assert_clean_error(code, err, 2, "is the input file")
    assert src.read_bytes() == lenet.read_bytes()


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails midway (ENOSPC) leaves neither the target nor a temporary file."""
    import errno

    from qatool.errors import ModelError
    from qatool.ir import io

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(ModelError, match="No space left"):
        io.save_proto(onnx.ModelProto(), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_update_that_overflows_once_folded_is_never_saved(capsys, lenet, digits, tmp_path):
    """lr 1e38: the weights stay finite (~1e36) but their BN-folded scales overflow; the checkpoint that would
    hold them is not written."""
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", tmp_path / "o",
                           "--lr", "1e38", "--steps", "5", "--save-every", "1", "-q")
    assert_clean_error(code, err, 1, "is not finite")
    assert "no checkpoint was saved" in err and not (tmp_path / "o" / "qat.onnx").exists()


def test_divergence_stops_and_keeps_the_last_checkpoint(capsys, lenet, digits, tmp_path):
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", tmp_path / "o",
                           "--lr", "1e9", "--steps", "40", "--save-every", "1", "-q")
    assert_clean_error(code, err, 1, "diverged")
    assert "the last checkpoint saved is kept" in err
    ckpt = onnx.load(tmp_path / "o" / "qat.onnx")
    for t in ckpt.graph.initializer:
        assert np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all(), t.name
    assert not (tmp_path / "o" / "model_int8.onnx").exists()


def test_resume_with_other_settings_is_refused(capsys, lenet, digits, tmp_path):
    out = tmp_path / "o"
    assert run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", out, "--steps", "1", "-q")[0] == 0
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", out, "--steps", "2",
                           "--bits", "4", "--resume", out / "qat.onnx")
    assert_clean_error(code, err, 2, "differ from the checkpoint")


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(capsys, lenet, digits, tmp_path, monkeypatch):
    """A real SIGINT, sent to this process right after step 3 (from the progress hook, so at a known step rather
    than after polling the clock): the loop finishes the step, saves a checkpoint at step 3 and the CLI exits
    130 with one line; resuming from it completes the run."""
    import qatool.train.loop as loop

    class CtrlCAfterStep3(loop.Progress):
        def update(self, step, **fields):
            super().update(step, **fields)
            if step + 1 == 3:
                os.kill(os.getpid(), signal.SIGINT)
            if step + 1 == 6:  # a Ctrl-C the loop ignored fails the test here rather than running 100000 steps
                raise AssertionError("still training 3 steps after Ctrl-C")

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(loop, "Progress", CtrlCAfterStep3)
        code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", out, "--steps",
                               "100000", "-q")
    assert_clean_error(code, err, 130, "interrupted at step 3; resume with --resume")
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    ckpt = onnx.load(out / "qat.onnx")
    step = int(__import__("json").loads({p.key: p.value for p in ckpt.metadata_props}["qatool.checkpoint"])["step"])
    assert step == 3
    code, _, err = run_cli(capsys, "train-quant", lenet, "--train-data", digits[0], "-o", out, "--steps", "5",
                           "--resume", out / "qat.onnx", "-q")
    assert code == 0, err
    assert (out / "model_int8.onnx").exists()
    assert (out / "metrics.jsonl").read_text().count("\n") == 5


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qatool", "--debug", "convert", str(tmp_path / "missing.onnx"), "-o",
                        str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr
