"""Rewrites that expose integer kernels to onnxruntime (bias Adds folded into their layer, HardSwish /
HardSigmoid / Div in elementwise form, constant operands quantized, Mul-by-scalar as a rescaled DequantizeLinear,
Add outputs kept off rounding ties): each keeps the float model's outputs, and the quantized zoo of exporter
patterns runs every Add and Mul as an integer kernel with no float op left between a DequantizeLinear and a
QuantizeLinear, agreeing with the simulation."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import assert_close_rel, ort_run
from qatool.convert import normalize_proto
from qatool.engine.model import Model
from qatool.export.deploy import export_session
from qatool.export.verify import optimized_graph
from qatool.quant.calibrate import calibrate_session
from qatool.quant.config import QuantConfig
from qatool.quant.qparams import activation_grid, activation_qparams, off_tie
from qatool.data.images import LoadedImages
from qatool.data.preprocess import Preprocess
from qatool.train.session import QatSession
from test_exporter_patterns import exporter_zoo

F = onnx.TensorProto.FLOAT
rng = None  # the test's own seeded generator, set for each test by conftest.py


def _model(nodes, inits, x_shape, y_shape, y="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info(y, F, y_shape)],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k)
                                           for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _same_outputs(proto, converted, x):
    (want,) = ort_run(proto, {"x": x})
    (got,) = ort_run(onnx.load_from_string(converted.SerializeToString()), {"x": x}) if isinstance(
        converted, onnx.ModelProto) else (Model(converted).forward({"x": x})[0],)
    assert_close_rel(got, want, 1e-5)


def test_bias_adds_fold_into_conv_and_matmul_becomes_gemm():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "b"], ["cb"], name="conv_bias"),  # Paddle's (1, C, 1, 1) bias
             helper.make_node("Relu", ["cb"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "wm"], ["m"], name="fc"),
             helper.make_node("Add", ["bm", "m"], ["y"], name="fc_bias")]  # constant first
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), "b": rng.standard_normal((1, 4, 1, 1)),
             "wm": rng.standard_normal((4 * 3 * 3, 5)), "bm": rng.standard_normal(5)}
    proto = _model(nodes, inits, [2, 3, 5, 5], [2, 5])
    for for_training in (True, False):
        result = normalize_proto(proto, for_training=for_training)
        ops = result.graph.op_counts()
        assert result.folded_bias_adds == ["conv_bias", "fc_bias"]
        assert "Add" not in ops and "MatMul" not in ops and ops["Gemm"] == 1
        assert result.graph.output_names == ["y"]
        _same_outputs(proto, result.graph, rng.standard_normal((2, 3, 5, 5)).astype(np.float32))


def test_scale_muls_fold_into_conv_weights_before_the_bias():
    """Paddle's spelled-out BatchNormalization, Conv -> Mul(scale) -> Add(shift), becomes one Conv whose weight
    and bias carry the scale: the output is unchanged and the shared weight is not touched."""
    nodes = [helper.make_node("Conv", ["x", "w", "b0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["cs"], name="bn_scale"),
             helper.make_node("Add", ["cs", "b"], ["cb"], name="bn_shift"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="shared_weight", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["cb", "c2"], ["y"]),
             helper.make_node("MatMul", ["y", "wm"], ["m"], name="fc"),  # rank 4: scaled, not a Gemm
             helper.make_node("Mul", ["m", "sm"], ["z"], name="fc_scale")]
    w = rng.standard_normal((4, 3, 3, 3))
    inits = {"w": w, "b0": rng.standard_normal(4), "s": rng.uniform(-30, 30, (1, 4, 1, 1)),
             "b": rng.standard_normal((1, 4, 1, 1)), "wm": rng.standard_normal((5, 6)), "sm": rng.standard_normal(6)}
    proto = _model(nodes, inits, [2, 3, 5, 5], [2, 4, 5, 6], y="z")
    result = normalize_proto(proto, for_training=True)
    assert result.folded_bias_adds == ["bn_scale", "fc_scale", "bn_shift"]
    ops = result.graph.op_counts()
    assert ops["Conv"] == 2 and ops["Add"] == 1 and "Mul" not in ops and ops["MatMul"] == 1
    np.testing.assert_array_equal(result.graph.initializers["w"], w.astype(np.float32))
    _same_outputs(proto, result.graph, rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    # the scale of another consumer's output, or one that broadcasts along the width, stays a Mul
    for inits["s"] in (rng.standard_normal(5),):
        kept = normalize_proto(_model(nodes, inits, [2, 3, 5, 5], [2, 4, 5, 6], y="z"), for_training=True)
        assert "bn_scale" not in kept.folded_bias_adds and kept.graph.op_counts()["Mul"] == 1


@pytest.mark.parametrize("why, bias_shape, shared", [
    ("broadcasts along the width, not the channels", (5,), False),
    ("the conv output has another consumer", (1, 4, 1, 1), True),
])
def test_bias_add_is_left_alone_where_it_is_not_a_bias(why, bias_shape, shared):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["a"])]
    nodes.append(helper.make_node("Mul", ["a", "c"] if shared else ["a", "a"], ["y"]))
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), "b": rng.standard_normal(bias_shape)}
    proto = _model(nodes, inits, [2, 3, 5, 5], [2, 4, 5, 5])
    result = normalize_proto(proto, for_training=True)
    assert result.folded_bias_adds == [] and result.graph.op_counts()["Add"] == 1, why
    _same_outputs(proto, result.graph, rng.standard_normal((2, 3, 5, 5)).astype(np.float32))


def test_training_form_of_the_exporter_zoo_keeps_its_outputs():
    """HardSwish, HardSigmoid and the Paddle hard-swish's Div become Mul/Add/Clip; the outputs stay ONNX's."""
    proto = exporter_zoo()
    result = normalize_proto(proto, for_training=True)
    ops = result.graph.op_counts()
    assert not {"HardSwish", "HardSigmoid", "Div"} & set(ops)
    assert result.integer_forms == {"HardSwish": 1, "HardSigmoid": 2, "Div": 1, "Mul": 1}  # the / 6 moved
    _same_outputs(proto, result.graph, rng.standard_normal((4, 3, 5, 5)).astype(np.float32))
    inference = normalize_proto(proto, for_training=False).graph.op_counts()  # a float deployment keeps its ops
    assert inference["HardSwish"] == 1 and inference["HardSigmoid"] == 1


def test_a_scalar_moves_only_onto_a_factor_the_product_alone_reads():
    nodes = [helper.make_node("Mul", ["x", "x"], ["p"]), helper.make_node("Mul", ["p", "c"], ["y"])]
    proto = _model(nodes, {"c": 0.5}, [2, 3], [2, 3])  # x is read twice by the product: nothing to move onto
    assert normalize_proto(proto, for_training=True).integer_forms == {}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["x", "r"], ["p"]),
             helper.make_node("Mul", ["p", "c"], ["y"])]
    proto = _model(nodes, {"c": 0.5}, [2, 3], [2, 3])
    result = normalize_proto(proto, for_training=True)
    assert result.integer_forms == {"Mul": 1}
    scale = next(n for n in result.graph.nodes if n.op_type == "Mul" and "c" in n.inputs)
    assert scale.inputs == ["r", "c"] and result.graph.output_names == ["y"]
    _same_outputs(proto, result.graph, rng.standard_normal((2, 3)).astype(np.float32))


def test_div_by_a_constant_with_zeros_stays_a_div():
    nodes = [helper.make_node("Div", ["x", "c"], ["y"])]
    proto = _model(nodes, {"c": [1.0, 0.0, 2.0]}, [2, 3], [2, 3])
    assert normalize_proto(proto, for_training=True).graph.op_counts() == {"Div": 1}


def test_off_tie_moves_a_constant_off_half_a_step_and_only_then():
    grid = activation_grid(8, False)
    s, z = activation_qparams(0.0, 6.0, grid, addend=3.0)  # hard-swish: 3 / (6 / 255) = 127.5
    t = 3.0 / float(s)
    assert z == 0 and abs(t - np.floor(t) - 0.5) > 0.2
    assert 255 * float(s) <= 6.0  # narrowed: the Clip at 6 stays redundant
    assert activation_qparams(0.0, 6.0, grid)[0] == np.float32(6.0 / 255)
    assert off_tie(np.float32(6.0 / 255), 2.0) == np.float32(6.0 / 255)  # 85.0: a level, no tie
    assert off_tie(np.float32(0.1), 0.04) == np.float32(0.1)  # below one step: nothing to move


def _ptq(proto, out):
    """Calibrated on random images, exported and verified (strict: every node meant to be int8 must fuse)."""
    graph = normalize_proto(proto, for_training=True).graph
    session = QatSession.create(graph, QuantConfig())
    gen = np.random.default_rng(0)  # the same calibration images for every model, whichever test builds it
    images = LoadedImages(gen.integers(0, 256, (64, 5, 5, 3), dtype=np.uint8), np.zeros(64, np.int64),
                          Preprocess((5, 5), "rgb", (0.5,), (0.25,)))
    calibrate_session(session, images, max_images=64)
    return session, export_session(session, out, images)


@pytest.fixture(scope="module")
def zoo_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "zoo_int8.onnx"
    session, result = _ptq(exporter_zoo(), out)
    return session, result, onnx.load(out)


def test_fusion_report_names_float_ops_between_dequantize_and_quantize(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Tanh", ["c1"], ["t"], name="tanh"),
             helper.make_node("Conv", ["t", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Conv", ["c2", "w3", "b3"], ["y"], name="head")]  # the float-output tail
    inits = {"w1": rng.standard_normal((4, 3, 1, 1)), "b1": np.zeros(4), "w2": rng.standard_normal((2, 4, 1, 1)),
             "b2": np.zeros(2), "w3": rng.standard_normal((2, 2, 1, 1)), "b3": np.zeros(2)}
    _, result = _ptq(_model(nodes, inits, ["N", 3, 5, 5], ["N", 2, 5, 5]), tmp_path / "m.onnx")
    assert result.fusion.float_between == [("tanh", "Tanh", "onnxruntime has no integer kernel for Tanh")]
    from qatool.export.verify import fusion_lines

    lines = fusion_lines(result.fusion.to_dict())
    assert lines[0].startswith("onnxruntime's optimised graph: 2 integer kernels (QLinearConv 2); 2 of 2")
    assert "1 float ops between DequantizeLinear and QuantizeLinear" in lines[1] and "Tanh x1" in lines[1]


def test_zoo_runs_every_add_and_mul_as_an_integer_kernel(zoo_int8):
    session, result, model = zoo_int8
    kernels = result.fusion.kernels
    # Adds: hard-swish's + 3, the residual, the two HardSigmoids' + beta; Muls: hard-swish's x * clip, the SE
    # scale, HardSwish's x * gate. The HardSigmoids' * alpha and hard-swish's / 6 (moved onto the clip) are
    # rescaled DequantizeLinears.
    assert kernels["QLinearAdd"] == 4 and kernels["QLinearMul"] == 3
    assert kernels["QLinearConv"] == 3 and kernels["QGemm"] == 1 and kernels["QLinearGlobalAveragePool"] == 1
    assert len(session.plan.rescaled) == 3 and result.fusion.unfused == [] and result.fusion.float_between == []
    opt = optimized_graph(result.path)
    producers = {o: n for n in opt.graph.node for o in n.output}
    users = {}
    for n in opt.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    between = [n.op_type for n in opt.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
               and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)
               and any(u.op_type == "QuantizeLinear" for u in users.get(n.output[0], []))]
    assert between == []


def test_zoo_simulation_agrees_with_onnxruntime(zoo_int8):
    _, result, _ = zoo_int8
    assert result.agreement.agreement_top1 == 1.0
    assert result.agreement.max_abs_diff < 0.02  # Softmax output: a few steps at most


def test_constant_operands_are_stored_as_integers(zoo_int8):
    """The + 3 of hard-swish is an integer initializer read by a DequantizeLinear, no QuantizeLinear at run time."""
    _, _, model = zoo_int8
    inits = {t.name for t in model.graph.initializer}
    quantize_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantize_inputs & inits
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("three")]
    assert dq and all(n.input[0] in inits for n in dq)


def test_learned_step_sizes_leave_constant_operands_to_their_values():
    """With LSQ the activations' step sizes are trained; a constant operand (hard-swish's + 3) keeps the scale of
    its own values: it is state, not a parameter, and a training step runs (a scalar once failed in LSQ's
    per-sample count)."""
    graph = normalize_proto(exporter_zoo(), for_training=True).graph
    session = QatSession.create(graph, QuantConfig(weight_bits=4, activation_bits=4, scale_learning="lsq"))
    model = session.model
    three = session.quant["three"]
    assert three.scale in model.state and three.scale not in model.params
    learned = [q.scale for t, q in session.quant.items() if t not in graph.initializers]
    assert learned and all(s in model.params for s in learned)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    out = model.forward({"x": x}, training=True, outputs=[session.logits])[0]
    grads = model.backward([np.ones_like(out)])
    assert all(np.isfinite(g).all() for g in grads.values()) and any(s in grads for s in learned)


def test_latency_is_measured_against_the_float_model_and_a_slower_int8_is_explained(zoo_int8, monkeypatch):
    """The timing logic on a fake clock that only the sessions' runs advance (float 2 ms a run, int8 1 ms, then
    20 ms): no wall-clock time in the test. The real sessions still run (and the profiler profiles them)."""
    import types

    from qatool.export import latency
    from qatool.export.deploy import _float_model, time_export

    session, result, _ = zoo_int8
    clock = [0.0]
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    cost_ms = {"float": 2.0, "int8": 1.0}
    loads, runs = [], []
    real_session = latency._session

    class Timed:
        def __init__(self, s, kind):
            self.s, self.kind = s, kind

        def __getattr__(self, name):
            return getattr(self.s, name)

        def run(self, *args):
            runs.append(self.kind)
            out = self.s.run(*args)
            clock[0] += cost_ms[self.kind] / 1e3
            return out

    def session_of(model, profile_prefix=None, threads=None):
        s = real_session(model, profile_prefix, threads)
        if profile_prefix is not None:  # the profiler's own session
            return s
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
        kind = "int8" if any(n.op_type == "QuantizeLinear" for n in proto.graph.node) else "float"
        loads.append(kind)
        return Timed(s, kind)

    monkeypatch.setattr(latency, "_session", session_of)
    time_export(session, result)
    d = result.latency.to_dict()
    assert set(d["batches"]) == {"1", "32"}  # 5 x 5 images: the larger batch is the cap
    for v in d["batches"].values():
        assert v["float_ms"] == pytest.approx(2.0, rel=1e-6) and v["int8_ms"] == pytest.approx(1.0, rel=1e-6)
        assert v["ratio"] == pytest.approx(0.5, rel=1e-6)
    assert d["int8_costliest_ops"] == []  # int8 is the faster: no profile
    lines = latency.latency_lines(d)
    assert lines == ["latency on onnxruntime (median of 6 interleaved rounds): batch 1: float 2.0 ms, int8 1.0 ms "
                     "(0.50x); batch 32: float 2.0 ms, int8 1.0 ms (0.50x)"]
    # when int8 is slower, the profile names where its time goes
    cost_ms["int8"] = 20.0
    loads.clear()
    runs.clear()
    slow = latency.measure(_float_model(session), str(result.path), [1, 3, 5, 5])
    for f, q in slow.batches.values():
        assert f == pytest.approx(2.0, rel=1e-6) and q == pytest.approx(20.0, rel=1e-6)
    assert loads == ["float", "int8", "int8", "float"]  # loaded in both orders: neither is always loaded last
    assert slow.costliest and abs(sum(share for _, share in slow.costliest) - 1.0) < 0.5
    assert "SLOWER" in latency.latency_lines(slow.to_dict())[-1] and "costliest nodes: " in latency.latency_lines(
        slow.to_dict())[-1]
    assert len(slow.costliest_nodes) >= 1 and "(" in slow.costliest_nodes[0][0]
    assert runs.count("int8") == runs.count("float") == 2 * (6 + 2)  # two batch sizes: 6 timed rounds and a
    # warm-up in each loading order; an odd number of rounds runs one more (half in each order), and the summary
    # says how many ran
    runs.clear()
    odd = latency.measure(_float_model(session), str(result.path), [1, 3, 5, 5], rounds=3)
    assert runs.count("int8") == 2 * (4 + 2) and odd.to_dict()["rounds"] == 4
    assert "median of 4 interleaved rounds" in latency.latency_lines(odd.to_dict())[0]


@pytest.mark.parametrize("mode, resize_in_integers", [("nearest", True), ("linear", False)])
def test_leaky_relu_and_nearest_resize_run_on_integers(tmp_path, mode, resize_in_integers):
    """LeakyRelu -> QLinearLeakyRelu; a nearest Resize keeps its input's scale and onnxruntime runs it on the
    integers; a linear one is left float (its integer form rounds interpolated halves)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("LeakyRelu", ["c1"], ["l"], alpha=0.1, name="leaky"),
             helper.make_node("Resize", ["l", "", "scales"], ["u"], mode=mode, name="up"),
             helper.make_node("Conv", ["u", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    inits = {"w1": rng.standard_normal((4, 3, 1, 1)), "b1": np.zeros(4), "w2": rng.standard_normal((2, 4, 3, 3)),
             "b2": np.zeros(2), "scales": [1.0, 1.0, 2.0, 2.0]}
    session, result = _ptq(_model(nodes, inits, ["N", 3, 5, 5], ["N", 2]), tmp_path / "m.onnx")
    assert result.fusion.unfused == [] and result.fusion.kernels["QLinearLeakyRelu"] == 1
    assert result.agreement.agreement_top1 == 1.0
    float_nodes = [n for n, _, _ in session.plan.float_nodes]
    assert ("up" in float_nodes) != resize_in_integers
    if resize_in_integers:
        assert result.fusion.float_between == []
        opt = optimized_graph(result.path)
        resize = next(n for n in opt.graph.node if n.op_type == "Resize")
        producers = {o: n for n in opt.graph.node for o in n.output}
        assert producers[resize.input[0]].op_type != "DequantizeLinear"  # it reads the integers


def test_a_session_rebuilt_from_its_checkpoint_exports_the_same_model(zoo_int8, tmp_path):
    """qat.onnx keeps the activations' scales; the constant operands' quantizers are rebuilt from their values."""
    from qatool.train.checkpoint import load_checkpoint, save_checkpoint

    session, result, _ = zoo_int8
    arrays = {f"span/{t}": session.model.graph.initializers[q.span] for t, q in session.quant.items()}
    save_checkpoint(tmp_path / "qat.onnx", session.float_graph, session.model.graph, session.quant, session.config,
                    {}, 0, arrays)
    again = QatSession.from_checkpoint(load_checkpoint(tmp_path / "qat.onnx"))
    x = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(again.model.forward({"x": x})[0], session.model.forward({"x": x})[0])
    for t, q in session.quant.items():
        np.testing.assert_array_equal(again.model.graph.initializers[again.quant[t].scale],
                                      session.model.graph.initializers[q.scale], err_msg=t)
