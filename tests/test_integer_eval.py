"""The eval-mode simulation computes onnxruntime's integers, not just its grid (qatool.quant.integer_eval).

Every quantized tensor of the int8 model is exposed as a graph output and compared, integer for integer, with
the simulation's; the float simulation (the fake-quant path training uses) is the control: on the same inputs
it must differ somewhere, or the data would not reach the rounding ties the integer kernels decide.
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qatool.convert import normalize_proto
from qatool.runtime.backends import ort_session
from qatool.export.deploy import export_session
from qatool.export.verify import optimized_graph
from qatool.quant.calibrate import calibrate_session
from qatool.quant.config import QuantConfig
from qatool.quant.integer_eval import broadcast_first
from qatool.quant.qparams import MIN_SCALE
from qatool.data.images import LoadedImages
from qatool.data.preprocess import Preprocess
from qatool.train.session import QatSession
from test_exporter_patterns import exporter_zoo

F = onnx.TensorProto.FLOAT


def _w(gen, name, shape, scale=0.3):
    return numpy_helper.from_array((gen.standard_normal(shape) * scale).astype(np.float32), name)


def residual_block(seed: int = 0) -> onnx.ModelProto:
    """Conv+BN+Relu, a depthwise Conv+Relu, a 1x1 Conv, a residual Add, an Add and a Mul whose first operand
    is broadcast from (N, C, 1, 1), GlobalAveragePool, a MatMul and a Gemm head: each kernel of the rewrite,
    at 24x24."""
    gen = np.random.default_rng(seed)
    c = 8
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("BatchNormalization", ["c0", "g", "beta", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "wd", "bd"], ["d"], pads=[1, 1, 1, 1], group=c, name="depthwise"),
        helper.make_node("Relu", ["d"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wp", "bp"], ["p"], name="pointwise"),
        helper.make_node("Add", ["p", "r0"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["pool"], name="pool"),
        helper.make_node("Sigmoid", ["pool"], ["gate"], name="gate"),
        helper.make_node("Add", ["pool", "res"], ["shift"], name="shift"),
        helper.make_node("Mul", ["gate", "shift"], ["scaled"], name="scale"),
        helper.make_node("GlobalAveragePool", ["scaled"], ["pool2"], name="pool2"),
        helper.make_node("Flatten", ["pool2"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "wm"], ["hidden"], name="matmul"),
        helper.make_node("Relu", ["hidden"], ["hr"], name="hidden_relu"),
        helper.make_node("Gemm", ["hr", "wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    inits = [_w(gen, "w0", (c, 3, 3, 3)), numpy_helper.from_array(gen.uniform(0.5, 1.5, c).astype(np.float32), "g"),
             _w(gen, "beta", (c,), 0.1), _w(gen, "m", (c,), 0.1),
             numpy_helper.from_array(gen.uniform(0.5, 1.5, c).astype(np.float32), "v"),
             _w(gen, "wd", (c, 1, 3, 3)), _w(gen, "bd", (c,), 0.1), _w(gen, "wp", (c, c, 1, 1)),
             _w(gen, "bp", (c,), 0.1),
             _w(gen, "wm", (c, 16)), _w(gen, "wf", (4, 16)), _w(gen, "bf", (4,), 0.1)]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", F, ["N", 3, 24, 24])],
                              [helper.make_tensor_value_info("logits", F, ["N", 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _images(n, size, seed):
    """Random images, the same for the same seed (calibration 1, export checks 2, inputs 3)."""
    gen = np.random.default_rng(seed)
    return LoadedImages(gen.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.zeros(n, np.int64),
                        Preprocess((size, size), "rgb", (0.5,), (0.25,)))


def _calibrated(proto, size, tmp_path, config=None):
    session = QatSession.create(normalize_proto(proto, for_training=True).graph, config or QuantConfig())
    calibrate_session(session, _images(64, size, 1), max_images=64)
    out = tmp_path / "int8.onnx"
    export_session(session, out, _images(16, size, 2), strict=False)
    return session, onnx.load(out)


def _quantized_tensors(session, model):
    """FakeQuant output -> (scale, zero point) for every activation the int8 model quantizes with a Q node."""
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    inits = session.model.graph.initializers
    return {n.outputs[0]: (np.float32(np.maximum(inits[n.input(1)], MIN_SCALE).reshape(-1)[0]),
                           float(inits[n.input(2)].reshape(-1)[0]))
            for n in session.model.graph.nodes
            if n.op_type == "FakeQuant" and f"{n.outputs[0]}_quantized" in q_outputs}


def _compare(session, model, x):
    """(integers that differ: integer eval vs onnxruntime, float eval vs onnxruntime, integers compared)."""
    tensors = _quantized_tensors(session, model)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for t in tensors:
        exposed.graph.output.append(helper.make_value_info(f"{t}_quantized", onnx.TypeProto()))
    sess = ort_session(exposed)
    deployed = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    names = list(tensors)
    integer = session.model.forward({session.input_name: x}, outputs=names)
    fake = session.model.forward({session.input_name: x}, outputs=names, grad=True)  # the training ops, eval mode
    off_int = off_float = total = 0
    for t, yi, yf in zip(names, integer, fake):
        s, z = tensors[t]
        want = deployed[f"{t}_quantized"].astype(np.float64)
        off_int += int(np.sum(np.rint(yi / s) + z != want))
        off_float += int(np.sum(np.rint(yf / s) + z != want))
        total += want.size
    return off_int, off_float, total


@pytest.mark.parametrize("which", ["zoo", "block"])
def test_every_quantized_tensor_holds_onnxruntimes_integers(which, tmp_path):
    proto, size, n = (exporter_zoo(), 5, 2048) if which == "zoo" else (residual_block(), 24, 1024)
    session, model = _calibrated(proto, size, tmp_path)
    steps = {s.op.node.op_type for s in session.model._eval_steps}
    assert {"IntegerLayer", "IntegerAdd", "IntegerMul", "IntegerGlobalAveragePool"} <= steps
    x = _images(n, size, 3).batches(n).__next__()[0]
    off_int, off_float, total = _compare(session, model, x)
    assert total > 10**6
    assert off_int == 0
    assert off_float > 0  # the control: these inputs reach ties where float and integer arithmetic round apart


def test_a_tensor_inside_a_chain_can_still_be_asked_for(tmp_path):
    session, _ = _calibrated(residual_block(), 24, tmp_path)
    x = _images(4, 24, 3).batches(4).__next__()[0]
    acc = next(n.outputs[0] for n in session.model.graph.nodes if n.op_type == "Conv")
    got = session.model.forward({session.input_name: x}, outputs=[acc])[0]  # runs the training ops' steps
    want = session.model.forward({session.input_name: x}, outputs=[acc], grad=True)[0]
    assert got.shape == want.shape and np.array_equal(got, want)


def test_a_relu_the_export_keeps_runs_as_the_float_ops(tmp_path):
    """A Relu whose output grid reaches below zero (zero point above 0) is not redundant: the export keeps it,
    onnxruntime runs no integer kernel there, and the chain computes what its own ops compute."""
    session, _ = _calibrated(residual_block(), 24, tmp_path)
    fq = next(n for n in session.model.graph.nodes if n.op_type == "FakeQuant" and n.outputs[0] == "r0")
    session.model.state[fq.input(2)][...] = 10.0
    x = _images(8, 24, 3).batches(8).__next__()[0]
    got = session.model.forward({session.input_name: x}, outputs=["r0"])[0]
    want = session.model.forward({session.input_name: x}, outputs=["r0"], grad=True)[0]
    assert np.array_equal(got, want)
    export_session(session, tmp_path / "kept.onnx", verify=False)
    assert "relu0" in {n.name for n in onnx.load(tmp_path / "kept.onnx").graph.node}


def test_signed_activations_keep_the_float_path(tmp_path):
    """With int8 activations onnxruntime (x86) fuses some ops and runs others in float: nothing is rewritten."""
    session, _ = _calibrated(residual_block(), 24, tmp_path, QuantConfig(symmetric_activations=True))
    assert session.model._eval_steps is session.model._steps
    kernels = {n.op_type for n in optimized_graph(tmp_path / "int8.onnx").graph.node}
    assert "QLinearConv" in kernels and "Add" in kernels  # the measured mix this rule rests on


def test_float64_models_keep_the_graphs_own_ops(tmp_path):
    from qatool.engine import Model

    session, _ = _calibrated(residual_block(), 24, tmp_path)
    assert session.model._eval_steps is not session.model._steps
    m64 = Model(session.model.graph, dtype=np.float64)  # gradient checks: the rewrite reproduces float32 kernels
    assert m64._eval_steps is m64._steps


@pytest.mark.parametrize("a, b, first", [((2, 8, 6, 6), (2, 8, 6, 6), False), ((2, 8, 1, 1), (2, 8, 6, 6), True),
                                         ((2, 8, 6, 6), (2, 8, 1, 1), False), ((), (2, 8, 6, 6), True),
                                         ((1, 8, 6, 6), (2, 8, 6, 6), False), ((2, 8, 1, 1), (1, 8, 1, 1), False)])
def test_which_operand_onnxruntime_broadcasts(a, b, first):
    assert broadcast_first(a, b) is first
