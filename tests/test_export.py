"""The int8 export: fused on onnxruntime, bit-identical weights, simulation == deployment, size."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from helpers import SAMPLE_DIR
from ortref import quantize_linear
from qatool import api
from qatool.convert import normalize_proto
from qatool.runtime.backends import ort_session
from qatool.export.deploy import export_session
from qatool.export.verify import check_fusion
from qatool.ir.io import load_proto
from qatool.ops import Context, make_op
from qatool.quant.config import QuantConfig
from qatool.quant.qparams import weight_grid
from qatool.train.checkpoint import load_checkpoint
from qatool.train.config import TrainConfig
from qatool.data.preprocess import resolve_preprocess
from qatool.train.session import QatSession

VAL = SAMPLE_DIR / "data" / "mnist" / "val"
QUIET = dict(echo=lambda s: None, quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """Short QAT runs of both sample models (W8A8), validated on the whole bundled val set."""
    train, _ = digits
    out = {}
    for name in ("lenet_bn", "mobilenetv2_small"):
        d = tmp_path_factory.mktemp(name)
        report = api.train_quant(SAMPLE_DIR / f"{name}.onnx", train, d, val_data=VAL,
                                 train=TrainConfig(steps=8, batch_size=32), **QUIET)
        out[name] = (d, report)
    return out


@pytest.mark.parametrize("name", ["lenet_bn", "mobilenetv2_small"])
def test_every_conv_and_gemm_runs_as_an_integer_kernel(trained, name):
    d, report = trained[name]
    fusion = report["export"]["fusion"]
    assert fusion["unfused"] == [] and fusion["fused"] == fusion["expected"] > 0
    model = onnx.load(d / "model_int8.onnx")
    n_conv_gemm = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    assert fusion["kernels"].get("QLinearConv", 0) + fusion["kernels"].get("QGemm", 0) == n_conv_gemm


@pytest.mark.parametrize("name", ["lenet_bn", "mobilenetv2_small"])
def test_simulation_equals_onnxruntime_on_the_val_set(trained, name):
    _, report = trained[name]
    v = report["val"]
    assert v["images"] == 1000
    assert v["agreement_top1"] >= 0.999
    assert abs(v["top1_qat"] - v["top1_int8"]) <= 0.001


def test_relu6_clips_are_dropped_at_8_bits(trained):
    """The ReLU6 Clips of MobileNet are redundant once the uint8 grid spans [0, 6] (to within rounding of the
    scale: 255 * float32(6/255) is a hair above 6), so none is left in the exported graph."""
    d, _ = trained["mobilenetv2_small"]
    assert "Clip" in {n.op_type for n in onnx.load(SAMPLE_DIR / "mobilenetv2_small.onnx").graph.node}
    assert not [n.name for n in onnx.load(d / "model_int8.onnx").graph.node if n.op_type == "Clip"]


@pytest.fixture(scope="module")
def trained_w4a4(tmp_path_factory, digits):
    """Short W4A4 runs that export their last step (keep last): after 8 steps on 400 images the best-validated
    checkpoint can be the one at the BN freeze, whose 4-bit activations sit near rounding ties (agreement 0.995 on
    MobileNet); these tests check the export of the trained model."""
    train, _ = digits
    out = {}
    for name in ("lenet_bn", "mobilenetv2_small"):
        d = tmp_path_factory.mktemp(f"{name}_w4a4")
        out[name] = (d, api.train_quant(SAMPLE_DIR / f"{name}.onnx", train, d, val_data=VAL,
                                        quant=QuantConfig(weight_bits=4, activation_bits=4),
                                        train=TrainConfig(steps=8, batch_size=32, keep="last"), **QUIET))
    return out


@pytest.mark.parametrize("name", ["lenet_bn", "mobilenetv2_small"])
def test_4_bit_models_fuse_and_agree(trained_w4a4, name):
    """Below 8 bits every Conv/Gemm still runs as an integer kernel: each activation is clipped to its grid by
    an integer (uint8) Clip after its QuantizeLinear, and the ReLU6 Clips in front are dropped."""
    d, report = trained_w4a4[name]
    fusion = report["export"]["fusion"]
    assert fusion["unfused"] == [] and fusion["fused"] == fusion["expected"] > 0
    v = report["val"]
    assert v["agreement_top1"] >= 0.999 and abs(v["top1_qat"] - v["top1_int8"]) <= 0.001
    model = onnx.load(d / "model_int8.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips and all(inits[n.input[1]].dtype == np.uint8 and (inits[n.input[1]], inits[n.input[2]]) == (0, 15)
                         for n in clips)


def test_4_bit_activations_saturate_where_the_simulation_clips(trained_w4a4, tmp_path):
    """Shrink the first layer's activation scale 4x so that many of its outputs lie beyond the 4-bit grid: the
    simulation saturates them at code 15, and onnxruntime must too (a uint8 container alone runs on to 255)."""
    d, _ = trained_w4a4["lenet_bn"]
    session = QatSession.from_checkpoint(load_checkpoint(d / "qat.onnx"))
    graph = session.model.graph
    first = next(n for n in graph.nodes if n.op_type == "FakeQuant" and n.input(0) != session.input_name)
    graph.initializers[first.input(1)] *= np.float32(0.25)  # the live observer state: both sides see it
    s = graph.initializers[first.input(1)].item()
    export_session(session, tmp_path / "m.onnx", verify=False)
    t = first.outputs[0]
    x = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    simulated = session.model.forward({session.input_name: x}, outputs=[t])[0]
    model = onnx.load(tmp_path / "m.onnx")
    model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    deployed = ort_session(model).run([t], {session.input_name: x})[0]
    assert np.mean(np.isclose(simulated, 15 * s)) > 0.01 and simulated.max() <= 15 * s * 1.0001
    assert np.abs(simulated - deployed).max() <= s * 1.001  # at most one step, where rounding ties fall apart


def test_low_bit_weights_are_stored_as_int4_and_still_fuse(trained_w4a4, tmp_path):
    """4-bit weights: INT4 initializers (two per byte) widened by a Cast that onnxruntime folds at load; the
    file shrinks and the model computes the same as with int8 storage."""
    d, report = trained_w4a4["mobilenetv2_small"]
    packed = onnx.load(d / "model_int8.onnx")
    source = report["outputs"].get("best_checkpoint", d / "qat.onnx")  # the checkpoint model_int8.onnx is of
    int4 = [t for t in packed.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == sum(n.op_type in ("Conv", "Gemm") for n in packed.graph.node)
    assert not [t for t in packed.graph.initializer
                if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")]
    plain = api.export_int8(source, tmp_path / "int8.onnx", int4=False)
    assert plain["fusion"]["unfused"] == []
    assert report["export"]["size_bytes"] < 0.8 * plain["size_bytes"]
    assert not packed.graph.value_info  # the opset converter's inferred types are dropped: they only weigh
    clips = [n for n in packed.graph.node if n.op_type == "Clip"]  # every 4-bit activation shares one [0, 15]
    assert len(clips) > 1 and len({(n.input[1], n.input[2]) for n in clips}) == 1
    x = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
    name = packed.graph.input[0].name
    np.testing.assert_array_equal(ort_session(packed).run(None, {name: x})[0],
                                  ort_session(str(tmp_path / "int8.onnx")).run(None, {name: x})[0])


def test_int8_weights_are_the_simulated_ones(trained):
    """Each DequantizeLinear(int8 weight) equals the WeightQuant output the simulation computed."""
    d, report = trained["mobilenetv2_small"]
    source = report["outputs"].get("best_checkpoint", d / "qat.onnx")  # the checkpoint model_int8.onnx is of
    session = QatSession.from_checkpoint(load_checkpoint(source))
    graph = session.model.graph
    sim, folded = {}, {}
    for node in graph.nodes:
        if node.op_type == "WeightQuant":
            inputs = [graph.initializers[i] for i in node.inputs]
            sim[node.inputs[0]] = make_op(node).forward(Context(), *inputs)[0]
            w, axis = inputs[0], int(node.attrs.get("axis", 0))
            if len(inputs) >= 3:  # BatchNorm folded as written in the papers: w * gamma / sqrt(var + eps)
                gamma, var = inputs[1], inputs[2]
                k = gamma / np.sqrt(var + np.float32(node.attrs.get("epsilon", 1e-5)))
                w = w * k.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
            folded[node.inputs[0]] = np.moveaxis(w, axis, 0)
    model = onnx.load(d / "model_int8.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8:
            base = n.input[0].removesuffix("_quantized")
            q, s = inits[n.input[0]], inits[n.input[1]]
            qmax = weight_grid(min(8, 7 if session.config.reduce_range else 8)).qmax  # 7-bit: reduce range
            assert np.abs(q).max() <= qmax  # narrow range
            deq = q.astype(np.float32) * s.reshape((-1,) + (1,) * (q.ndim - 1))
            np.testing.assert_array_equal(deq, sim[base], err_msg=base)
            # independently of qatool: scale max|w| / qmax of the folded weight, integers onnxruntime's QuantizeLinear
            w = folded[base]
            want_s = np.abs(w).reshape(len(w), -1).max(1) / np.float32(qmax)
            np.testing.assert_array_equal(s.reshape(-1), want_s, err_msg=base)
            dq_axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            np.testing.assert_array_equal(np.moveaxis(q, dq_axis, 0),
                                          quantize_linear(w, want_s, np.zeros(len(w), np.int8), axis=0), err_msg=base)
            checked += 1
    assert checked == len(sim) > 0


def test_sizes(trained):
    d, _ = trained["lenet_bn"]
    assert (d / "model_int8.onnx").stat().st_size <= 0.27 * (SAMPLE_DIR / "lenet_bn.onnx").stat().st_size
    assert not onnx.load(d / "model_int8.onnx").graph.value_info  # onnxruntime infers intermediate types


def test_export_int8_command_reproduces_train_quants_model(trained, tmp_path):
    d, _ = trained["lenet_bn"]
    report = api.export_int8(d / "qat.onnx", tmp_path / "again.onnx")
    assert report["agreement"]["images"] == 1000  # verified on the val data the checkpoint recorded
    assert report["agreement"]["agreement_top1"] >= 0.999
    assert (tmp_path / "again.onnx").read_bytes() == (d / "model_int8.onnx").read_bytes()


def test_unfused_node_is_named_with_its_rule(trained, tmp_path):
    """Let the first Conv read the float graph input (no DequantizeLinear): the check names it and the rule."""
    d, _ = trained["lenet_bn"]
    model = onnx.load(d / "model_int8.onnx")
    g = model.graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    conv.input[0] = g.input[0].name
    onnx.save(model, tmp_path / "broken.onnx")
    report = check_fusion(tmp_path / "broken.onnx", [(conv.name, "Conv")])
    assert report.fused == 0
    assert report.unfused == [(conv.name, "Conv", f"input {g.input[0].name!r} is not produced by a DequantizeLinear")]


def test_export_refuses_to_overwrite_its_input(trained):
    from qatool.errors import UsageError

    d, _ = trained["lenet_bn"]
    with pytest.raises(UsageError):
        api.export_int8(d / "qat.onnx", d / "qat.onnx")


def test_export_without_data_uses_random_inputs(trained, tmp_path):
    d, _ = trained["lenet_bn"]
    session = QatSession.from_checkpoint(load_checkpoint(d / "qat.onnx"))
    result = export_session(session, tmp_path / "r.onnx", None)
    assert result.data_source.startswith("random") and result.agreement.images == 16


def test_metadata_keeps_preprocessing_and_float_nodes(trained):
    d, _ = trained["lenet_bn"]
    meta = {p.key: p.value for p in onnx.load(d / "model_int8.onnx").metadata_props}
    assert "qatool.preprocess" in meta and "qatool.float_nodes" in meta
    from qatool.ir.io import load_graph

    pre = resolve_preprocess(load_graph(d / "model_int8.onnx"))
    assert pre.size == (28, 28) and pre.color == "gray"


def test_vnni_note(monkeypatch, trained):
    from qatool.export import deploy

    d, _ = trained["lenet_bn"]
    session = QatSession.from_checkpoint(load_checkpoint(d / "qat.onnx"))
    session.config = replace(session.config, reduce_range=False)  # 8-bit weights, asked for
    monkeypatch.setattr(deploy, "cpu_lacks_vnni", lambda: True)
    assert "--reduce-range" in deploy.export_notes(session)[0]
    monkeypatch.setattr(deploy, "cpu_lacks_vnni", lambda: False)
    assert deploy.export_notes(session) == []
    session.config = replace(session.config, reduce_range=True)  # 7-bit weights: nothing saturates
    monkeypatch.setattr(deploy, "cpu_lacks_vnni", lambda: True)
    assert deploy.export_notes(session) == []


def test_activations_below_8_bits_are_noted_as_no_faster(lenet):
    from qatool.export import deploy

    graph = normalize_proto(load_proto(lenet), for_training=True).graph
    for bits, noted in ((4, True), (8, False)):
        session = QatSession.create(graph, QuantConfig(weight_bits=4, activation_bits=bits))
        notes = [n for n in deploy.export_notes(session) if "below 8 bits" in n]
        assert bool(notes) == noted and (not notes or "4-bit activations" in notes[0])
