"""Fuzzing (hypothesis): mutated models, config files and images end in success or a clean error — never a
traceback or an internal error, never a partial output."""

import io
import os
import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import SAMPLE_DIR
from qatool.cli import main
from qatool.errors import ConfigError
from qatool.quant.config import QuantConfig
from qatool.train.config import TrainConfig, split_config, validate_config
from qatool.data.images import decode_image
from qatool.data.preprocess import Preprocess

LENET = (SAMPLE_DIR / "lenet_bn.onnx").read_bytes()
FUZZ = settings(max_examples=int(os.environ.get("QATOOL_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _convert(tmp_path, capsys, data: bytes) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), "-o", str(out)])
        raise SystemExit(0)
    err = capsys.readouterr().err
    if e.value.code == 0:
        onnx.checker.check_model(onnx.load(out))
    else:
        assert e.value.code in (1, 2)
        assert err.startswith("qatool: error:") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert src.read_bytes() == data  # the input is never touched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(LENET) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.one_of(st.none(), st.integers(0, len(LENET))))
def test_byte_mutated_models(tmp_path, capsys, flips, cut):
    data = bytearray(LENET)
    for pos, value in flips:
        data[pos] = value
    if cut is not None:
        data = data[:cut]
    _convert(tmp_path, capsys, bytes(data))


MUTATIONS = ["drop_node", "rename_op", "drop_initializer", "bad_attribute", "swap_inputs", "bad_dims",
             "dangling_input", "duplicate_output"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10_000)), min_size=1, max_size=3))
def test_structurally_mutated_models(tmp_path, capsys, mutations):
    model = onnx.load_from_string(LENET)
    g = model.graph
    for kind, k in mutations:
        node = g.node[k % len(g.node)]
        if kind == "drop_node":
            g.node.remove(node)
        elif kind == "rename_op":
            node.op_type = ["Conv", "Mystery", "Relu", "Gemm", ""][k % 5]
        elif kind == "drop_initializer" and g.initializer:
            g.initializer.remove(g.initializer[k % len(g.initializer)])
        elif kind == "bad_attribute" and node.attribute:
            a = node.attribute[k % len(node.attribute)]
            if a.ints:
                a.ints[0] = (k % 7) - 3
            elif a.type == onnx.AttributeProto.INT:
                a.i = (k % 7) - 3
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = float("nan") if k % 2 else -1.0
        elif kind == "swap_inputs" and len(node.input) > 1:
            node.input[0], node.input[1] = node.input[1], node.input[0]
        elif kind == "bad_dims" and g.initializer:
            t = g.initializer[k % len(g.initializer)]
            if t.dims:
                t.dims[0] = t.dims[0] + 1 + k % 3
        elif kind == "dangling_input":
            node.input.append(f"nowhere_{k}")
        elif kind == "duplicate_output" and len(g.node) > 1:
            g.node[(k + 1) % len(g.node)].output[0] = node.output[0]
        if not g.node:
            break
    _convert(tmp_path, capsys, model.SerializeToString())


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=False) |
                           st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=6)
KEYS = ["weight_bits", "activation_bits", "per_channel", "scale_update", "observer_momentum", "freeze_bn_after",
        "exclude", "steps", "epochs", "batch_size", "optimizer", "lr", "momentum", "schedule", "seed", "size",
        "color", "mean", "std", "unknown"]


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6))
def test_config_files(tmp_path, data):
    """A config either validates and builds typed settings, or fails with a ConfigError naming a key."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    try:
        validate_config(data, str(path))
    except ConfigError as e:
        assert "key " in str(e)
        return
    quant, train, pre = split_config(data)
    QuantConfig(**quant)
    TrainConfig(**train)


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 9), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png_bytes(0)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, len(PNG))), st.sampled_from(["gray", "rgb", "bgr"]))
def test_mutated_images(tmp_path, flips, cut, color):
    data = bytearray(PNG)
    for pos, value in flips:
        data[pos] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path / "x.png"
    path.write_bytes(bytes(data))
    pre = Preprocess(size=(8, 8), color=color)
    decoded = decode_image(path, pre)
    assert decoded is None or (decoded[0].shape == (8, 8, pre.channels) and decoded[0].dtype == np.uint8
                               and decoded[1] == (0, 0, 8, 8))
