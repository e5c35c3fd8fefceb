"""`free_batch`: models exported with a fixed batch of 1 run at any batch, image by image equal."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import LIGHT_DIR, ort_run, randomize_weights
from qatool.convert import normalize_proto
from qatool.ir.batch import (batch_mismatch, check_free_batch, free_batch, ort_run_per_image,
                             restore_declared_shapes, _session)
from qatool.ir.graph import from_onnx, to_onnx
from qatool.ir.io import load_proto

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _w(name, *shape):
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def _freed_and_checked(model, n=3):
    """free_batch on the model; then onnxruntime at batch n == per-image runs, and declared shapes restorable."""
    result = free_batch(from_onnx(model))
    assert result.freed, result.reason
    freed = to_onnx(result.graph)
    onnx.checker.check_model(freed)
    onnx.shape_inference.infer_shapes(freed, strict_mode=True)  # no stale shape left to contradict
    assert batch_mismatch(model, freed, sizes=(2, n)) is None
    # The same, spelled out: batch n against the original model image by image.
    name = model.graph.input[0].name
    x = RNG.standard_normal([n, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]])
    x = x.astype(np.float32)
    got = ort_run(freed, {name: x})
    want = ort_run_per_image(_session(model), {name: x}, axes=result.batch_axes)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # Declared shapes come back exactly, and the restored model still runs (at batch 1) as the original.
    restored = to_onnx(result.graph)
    restore_declared_shapes(restored, result.declared)
    for a, b in ((restored.graph.input, model.graph.input), (restored.graph.output, model.graph.output)):
        assert [(v.name, v.type.tensor_type.shape) for v in a] == [(v.name, v.type.tensor_type.shape) for v in b]
    for g, w in zip(ort_run(restored, {name: x[:1]}), ort_run(model, {name: x[:1]})):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    return result


def test_classifier_reshape_1_minus_1_and_shared_shape():
    """Conv -> Reshape([1,-1]) -> Gemm; the shape initializer is also read by a constant Reshape (kept as is)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flatten"),
             helper.make_node("Reshape", ["bias_grid", "shape"], ["bias_flat"], name="const_reshape"),
             helper.make_node("Add", ["flat", "bias_flat"], ["feat"], name="add"),
             helper.make_node("Gemm", ["feat", "fc", "fcb"], ["y"], transB=1, name="fc")]
    model = _model(nodes, [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, 5])],
                   [_w("w", 4, 3, 3, 3), _i64("shape", [1, -1]), _w("bias_grid", 4, 36), _w("fc", 5, 144),
                    _w("fcb", 5)])
    graph = from_onnx(model)
    result = _freed_and_checked(model)
    assert result.rewritten == ["flatten"]
    assert result.declared == {"inputs": {"x": [1, 3, 6, 6]}, "outputs": {"y": [1, 5]}}
    assert result.batch_axes == {"y": 0}
    g = result.graph
    flat = next(n for n in g.nodes if n.name == "flatten")
    const = next(n for n in g.nodes if n.name == "const_reshape")
    assert g.initializers[flat.inputs[1]].tolist() == [0, -1]
    assert g.initializers[const.inputs[1]].tolist() == [1, -1]  # the shared initializer was copied, not edited
    assert graph.initializers["shape"].tolist() == [1, -1]  # and the input graph is untouched
    assert g.inputs[0].shape[0] == "N" and g.outputs[0].shape[0] == "N"


def test_yolo_like_head_two_scales():
    """YOLOv5's Detect: Conv -> Reshape([1,3,6,h,w]) -> Transpose -> Sigmoid -> Split(xy, wh, rest) on axis 4,
    xy + grid[1,3,h,w,2], wh * anchors -> Concat -> Reshape([1,-1,6]) per scale, Concat of the scales."""
    nodes, inits = [], [_w("w0", 18, 3, 1, 1), _w("w1", 18, 3, 1, 1), _i64("flat6", [1, -1, 6]),
                        _i64("split", [2, 2, 2])]
    for k, (stride, hw) in enumerate(((2, 4), (4, 2))):
        nodes += [helper.make_node("Conv", ["x", f"w{k}"], [f"c{k}"], strides=[stride, stride], name=f"conv{k}"),
                  helper.make_node("Reshape", [f"c{k}", f"s{k}"], [f"r{k}"], name=f"reshape5d_{k}"),
                  helper.make_node("Transpose", [f"r{k}"], [f"t{k}"], perm=[0, 1, 3, 4, 2], name=f"transpose{k}"),
                  helper.make_node("Sigmoid", [f"t{k}"], [f"p{k}"], name=f"sigmoid{k}"),
                  helper.make_node("Split", [f"p{k}", "split"], [f"xy{k}", f"wh{k}", f"cf{k}"], axis=4,
                                   name=f"split{k}"),
                  helper.make_node("Add", [f"xy{k}", f"grid{k}"], [f"bxy{k}"], name=f"grid_add{k}"),
                  helper.make_node("Mul", [f"wh{k}", f"anchors{k}"], [f"bwh{k}"], name=f"anchor_mul{k}"),
                  helper.make_node("Concat", [f"bxy{k}", f"bwh{k}", f"cf{k}"], [f"box{k}"], axis=4,
                                   name=f"cat{k}"),
                  helper.make_node("Reshape", [f"box{k}", "flat6"], [f"o{k}"], name=f"reshape3d_{k}")]
        inits += [_i64(f"s{k}", [1, 3, 6, hw, hw]), _w(f"grid{k}", 1, 3, hw, hw, 2), _w(f"anchors{k}", 1, 3, 1, 1, 2)]
    nodes.append(helper.make_node("Concat", ["o0", "o1"], ["y"], axis=1, name="concat"))
    model = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 60, 6])], inits)
    result = _freed_and_checked(model)
    assert sorted(result.rewritten) == ["reshape3d_0", "reshape3d_1", "reshape5d_0", "reshape5d_1"]
    g = result.graph
    for n in g.nodes:
        if n.op_type == "Reshape":
            assert g.initializers[n.inputs[1]][0] == 0, n.name  # copy the batch from the input


def test_yolov8_like_dfl_head():
    """YOLOv8: Reshape([1,4,16,A]) -> Transpose -> Softmax(axis 1) -> 1x1 Conv -> Reshape([1,4,A]), boxes from
    constant anchors [1,2,A], Concat with class scores on axis 1."""
    a = 16
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="head"),
             helper.make_node("Reshape", ["c", "s144"], ["flat"], name="flat"),
             helper.make_node("Split", ["flat", "split"], ["box", "cls"], axis=1, name="split"),
             helper.make_node("Reshape", ["box", "dfl_shape"], ["d4"], name="dfl_reshape"),
             helper.make_node("Transpose", ["d4"], ["dt"], perm=[0, 2, 1, 3], name="dfl_t"),
             helper.make_node("Softmax", ["dt"], ["ds"], axis=1, name="dfl_softmax"),
             helper.make_node("Conv", ["ds", "proj"], ["dc"], name="dfl_conv"),
             helper.make_node("Reshape", ["dc", "ltrb_shape"], ["ltrb"], name="dfl_out"),
             helper.make_node("Slice", ["ltrb", "zero", "two", "one"], ["lt"], name="lt"),
             helper.make_node("Slice", ["ltrb", "two", "four", "one"], ["rb"], name="rb"),
             helper.make_node("Sub", ["anchors", "lt"], ["x1y1"], name="x1y1"),
             helper.make_node("Add", ["anchors", "rb"], ["x2y2"], name="x2y2"),
             helper.make_node("Concat", ["x1y1", "x2y2"], ["xyxy"], axis=1, name="xyxy"),
             helper.make_node("Mul", ["xyxy", "strides"], ["boxes"], name="scale"),
             helper.make_node("Sigmoid", ["cls"], ["scores"], name="scores"),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="out")]
    proj = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "proj")
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 7, a])],
                   [_w("w", 67, 3, 1, 1), _i64("s144", [1, 67, -1]), _i64("split", [64, 3]),
                    _i64("dfl_shape", [1, 4, 16, a]), proj, _i64("ltrb_shape", [1, 4, a]), _i64("zero", [0]),
                    _i64("one", [1]), _i64("two", [2]), _i64("four", [4]), _w("anchors", 1, 2, a),
                    _w("strides", 1, a)])
    result = _freed_and_checked(model)
    assert sorted(result.rewritten) == ["dfl_out", "dfl_reshape", "flat"]


def test_expand_of_constant_and_of_batched_value():
    """A class token Expand(cls, [1,1,8]) concatenated to the tokens, and Expand(gate [1,8,1,1], [1,8,2,2])."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[4, 4], name="patch"),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=1, name="pool"),
             helper.make_node("Sigmoid", ["m"], ["gate"], name="sig"),
             helper.make_node("Expand", ["gate", "gate_shape"], ["gate_x"], name="expand_gate"),
             helper.make_node("Mul", ["c", "gate_x"], ["cg"], name="mul"),
             helper.make_node("Reshape", ["cg", "tok_shape"], ["tok"], name="tokens"),
             helper.make_node("Transpose", ["tok"], ["tokt"], perm=[0, 2, 1], name="tok_t"),
             helper.make_node("Expand", ["cls", "cls_shape"], ["cls_x"], name="expand_cls"),
             helper.make_node("Concat", ["cls_x", "tokt"], ["seq"], axis=1, name="concat"),
             helper.make_node("Add", ["seq", "pos"], ["y"], name="pos_add")]
    model = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 5, 8])],
                   [_w("w", 8, 3, 4, 4), _i64("gate_shape", [1, 8, 2, 2]), _i64("tok_shape", [1, 8, 4]),
                    _w("cls", 1, 8), _i64("cls_shape", [1, 1, 8]), _w("pos", 1, 5, 8)])
    result = _freed_and_checked(model)
    assert "concat" in result.rewritten and "tokens" in result.rewritten
    assert "expand_gate" not in result.rewritten  # broadcasting already follows the batch
    assert any(n.startswith("cls_x_batched") for n in result.added)


def test_cnn_lstm_recogniser_sequence_output():
    """CNN -> [T, N, C] -> LSTM (zero h0, non-zero c0 of batch 1) -> Reshape([T*1, H]) -> Gemm -> [T, 1, K]."""
    t, hid, k = 8, 5, 7
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Squeeze", ["c", "ax2"], ["sq"], name="squeeze_h"),
             helper.make_node("Transpose", ["sq"], ["seq"], perm=[2, 0, 1], name="to_tnc"),
             helper.make_node("LSTM", ["seq", "W", "R", "B", "", "h0", "c0"], ["Y"], hidden_size=hid, name="lstm"),
             helper.make_node("Squeeze", ["Y", "ax1"], ["ys"], name="squeeze_dir"),
             helper.make_node("Reshape", ["ys", "rows"], ["rows2d"], name="merge_t_n"),
             helper.make_node("Gemm", ["rows2d", "fc", "fcb"], ["logits"], transB=1, name="fc"),
             helper.make_node("Reshape", ["logits", "tnk"], ["y"], name="split_t_n")]
    model = _model(nodes, [_vi("x", [1, 1, 4, t])], [_vi("y", [t, 1, k])],
                   [_w("w", 4, 1, 4, 1), _i64("ax2", [2]), _i64("ax1", [1]), _w("W", 1, 4 * hid, 4),
                    _w("R", 1, 4 * hid, hid), _w("B", 1, 8 * hid),
                    numpy_helper.from_array(np.zeros((1, 1, hid), np.float32), "h0"), _w("c0", 1, 1, hid),
                    _i64("rows", [t, hid]), _w("fc", k, hid), _w("fcb", k), _i64("tnk", [t, 1, k])])
    result = _freed_and_checked(model)
    assert result.batch_axes == {"y": 1}
    assert result.graph.outputs[0].shape == [t, "N", k]
    lstm = next(n for n in result.graph.nodes if n.name == "lstm")
    assert lstm.inputs[5] == ""  # the zero initial state became the default one
    assert lstm.inputs[6] != "c0"  # the non-zero one is expanded to the batch


def test_slice_split_resize_sizes_and_runtime_shapes():
    """Slice 0:1 on axis 0, Split [1] on axis 0, Resize with sizes [1,...], and shapes read with Shape (unfolded)."""
    nodes = [helper.make_node("Slice", ["x", "zero", "one", "zero"], ["a"], name="slice_b"),
             helper.make_node("Split", ["a", "one"], ["b"], axis=0, name="split_b"),
             helper.make_node("Resize", ["b", "", "", "sizes"], ["c"], mode="nearest", name="resize"),
             helper.make_node("Shape", ["c"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "zero_s"], ["n"], axis=0, name="gather"),
             helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["flat_shape"], axis=0, name="cat_shape"),
             helper.make_node("Reshape", ["c", "flat_shape"], ["flat"], name="flatten"),
             helper.make_node("Concat", ["n1", "d256"], ["zshape"], axis=0, name="cat_zshape"),
             helper.make_node("ConstantOfShape", ["zshape"], ["z"], name="zeros",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["flat", "z"], ["y"], name="add")]
    model = _model(nodes, [_vi("x", [1, 4, 4, 4])], [_vi("y", [1, 256])],
                   [_i64("zero", [0]), _i64("one", [1]), _i64("sizes", [1, 4, 8, 8]),
                    numpy_helper.from_array(np.array(0, np.int64), "zero_s"), _i64("minus1", [-1]),
                    _i64("d256", [256])])
    result = _freed_and_checked(model)
    assert sorted(result.rewritten) == ["resize", "slice_b", "split_b"]
    g = result.graph
    sl = next(n for n in g.nodes if n.name == "slice_b")
    assert g.initializers[sl.inputs[1]].tolist() == [0] and g.initializers[sl.inputs[3]].tolist() == [0]
    assert g.initializers[sl.inputs[2]].tolist() == [np.iinfo(np.int64).max]


def _flatten_all_softmax():
    """Softmax over the whole flattened tensor: at batch N it would normalise over every image together."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "all"], ["v"], name="to_vector"),
             helper.make_node("Softmax", ["v"], ["p"], axis=0, name="softmax_all"),
             helper.make_node("Reshape", ["p", "back"], ["y"], name="back")]
    return _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 2, 4, 4])],
                  [_w("w", 2, 3, 1, 1), _i64("all", [-1]), _i64("back", [1, 2, 4, 4])])


def _gram_matrix():
    """Style-transfer Gram matrix: Reshape [C, H*W] then X @ X^T; batch 1 merged into the channels."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "chw"], ["f"], name="to_c_hw"),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["f", "ft"], ["gram"], name="gram"),
             helper.make_node("Reshape", ["gram", "out"], ["y"], name="back")]
    return _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 2, 2])],
                  [_w("w", 2, 3, 1, 1), _i64("chw", [2, 16]), _i64("out", [1, 2, 2])])


def _first_image():
    """x[0]: Gather index 0 on the batch axis, the output has no batch axis at all."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Gather", ["r", "i0"], ["y"], axis=0, name="first")]
    return _model(nodes, [_vi("x", [1, 3, 4])], [_vi("y", [3, 4])],
                  [numpy_helper.from_array(np.array(0, np.int64), "i0")])


@pytest.mark.parametrize("build, why", [(_flatten_all_softmax, "softmax_all"), (_gram_matrix, "gram"),
                                        (_first_image, "first")])
def test_genuinely_batch_bound_models_are_refused(build, why):
    model = build()
    graph = from_onnx(model)
    before = to_onnx(graph).SerializeToString()
    result = free_batch(graph)
    assert not result.freed and result.graph is None
    assert why in result.reason and "\n" not in result.reason, result.reason
    assert to_onnx(graph).SerializeToString() == before  # left alone
    # Such a model still runs at batch N image by image.
    x = RNG.standard_normal((3, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]))
    x = x.astype(np.float32)
    per_image = ort_run_per_image(_session(model), {"x": x})
    assert per_image[0].shape[0] == 3 or build is _first_image


def test_verification_reports_a_wrong_rewrite():
    """A hand-"freed" model mixing images is caught with a one-line reason; verify() then un-frees."""
    model = _flatten_all_softmax()
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    bad.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for t in bad.graph.initializer:
        if t.name == "back":
            t.CopyFrom(numpy_helper.from_array(np.array([-1, 2, 4, 4], np.int64), "back"))
    why = batch_mismatch(model, bad)
    assert why is not None and "relative error" in why and "\n" not in why
    assert not check_free_batch(model, bad)
    # Batch still baked in: onnxruntime refuses batch 2, and the reason says so.
    stuck = onnx.ModelProto()
    stuck.CopyFrom(model)
    stuck.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert "fails at batch 2" in batch_mismatch(model, stuck)
    ok = free_batch(from_onnx(_first_image_ok()))
    assert ok.freed and ok.verify(_first_image_ok())
    ok.graph = from_onnx(bad)
    assert not ok.verify(model) and not ok.freed and ok.reason.startswith("verification failed")


def _first_image_ok():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return _model(nodes, [_vi("x", [1, 3, 4])], [_vi("y", [1, 3, 4])], [])


def test_already_free_model_is_unchanged():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc")]
    model = _model(nodes, [_vi("x", ["batch", 3, 4, 4])], [_vi("y", ["batch", 5])],
                   [_w("w", 2, 3, 1, 1), _i64("shape", [0, -1]), _w("fc", 5, 32)])
    graph = from_onnx(model)
    result = free_batch(graph)
    assert result.freed and result.rewritten == [] and result.added == []
    assert "already" in result.note
    assert to_onnx(result.graph).SerializeToString() == to_onnx(graph).SerializeToString()
    assert check_free_batch(model, to_onnx(result.graph))


def test_no_batch_input():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [5])], [_vi("y", [5])], [])
    result = free_batch(from_onnx(model))
    assert not result.freed and "no input" in result.reason


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "inception_v1"])
def test_light_models_free_and_verify(name):
    """onnx's real-architecture light models (declared batch 1) after convert: freed and equal per image."""
    graph = normalize_proto(load_proto(LIGHT_DIR / f"light_{name}.onnx"), for_training=False).graph
    randomize_weights(graph)
    original = to_onnx(graph)
    result = free_batch(graph)
    assert result.freed, result.reason
    assert batch_mismatch(original, result.graph, sizes=(2,)) is None
    restored = to_onnx(result.graph)
    restore_declared_shapes(restored, result.declared)
    assert [v.type.tensor_type.shape for v in restored.graph.input] == [v.type.tensor_type.shape
                                                                         for v in original.graph.input]


def _time_major_recogniser(shared_target=False):
    """ddddocr's captcha recogniser in small: a free width W, Conv -> Transpose to [W', 1, C, H] -> Reshape to
    [W', 1, C*H] whose target is built from Shape() of the tensor with a hard-coded batch 1 in the middle
    (convert folds PyTorch's x.size(1) into that constant) -> bi-LSTM with zero states ConstantOfShape([2, N, H])
    -> Reshape [T*N, 2H] from Shape() (T * N) -> Gemm -> Reshape [T, N, -1]. The output declares [1, seqlen],
    as the exporter wrote it, but the model returns [T, 1, K]. `shared_target`: a second Reshape reads the same
    target (so the pass cannot edit the Concat building it)."""
    hid, k = 2, 5

    def i64_scalar(name, v):
        return numpy_helper.from_array(np.array(v, np.int64), name)

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[1, 2], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[3, 0, 1, 2], name="to_wnch"),
             helper.make_node("Shape", ["t"], ["t_shape"], name="t_shape"),
             helper.make_node("Gather", ["t_shape", "i0"], ["t_w"], axis=0, name="t_w"),
             helper.make_node("Unsqueeze", ["t_w", "ax0"], ["t_w1"], name="t_w1"),
             helper.make_node("Concat", ["t_w1", "one", "ch"], ["seq_shape"], axis=0, name="seq_shape"),
             helper.make_node("Reshape", ["t", "seq_shape"], ["seq"], name="to_seq"),
             *([helper.make_node("Reshape", ["t", "seq_shape"], ["seq_b"], name="to_seq_b"),
                helper.make_node("Add", ["seq", "seq_b"], ["seq_sum"], name="seq_sum")] if shared_target else []),
             helper.make_node("Shape", ["seq"], ["seq_dims"], name="seq_dims"),
             helper.make_node("Gather", ["seq_dims", "i1"], ["n"], axis=0, name="n"),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="n1"),
             helper.make_node("Concat", ["two", "n1", "hid"], ["state_shape"], axis=0, name="state_shape"),
             helper.make_node("ConstantOfShape", ["state_shape"], ["h0"], name="h0"),
             helper.make_node("ConstantOfShape", ["state_shape"], ["c0"], name="c0"),
             helper.make_node("LSTM", ["seq_sum" if shared_target else "seq", "W", "R", "B", "", "h0", "c0"], ["Y"],
                              hidden_size=hid, direction="bidirectional", name="lstm"),
             helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3], name="y_t"),
             helper.make_node("Reshape", ["Yt", "zz_1"], ["feat"], name="merge_dirs"),
             helper.make_node("Shape", ["feat"], ["f_shape"], name="f_shape"),
             helper.make_node("Gather", ["f_shape", "i0"], ["f_t"], axis=0, name="f_t"),
             helper.make_node("Gather", ["f_shape", "i1"], ["f_n"], axis=0, name="f_n"),
             helper.make_node("Gather", ["f_shape", "i2"], ["f_c"], axis=0, name="f_c"),
             helper.make_node("Mul", ["f_t", "f_n"], ["f_tn"], name="f_tn"),
             helper.make_node("Unsqueeze", ["f_tn", "ax0"], ["f_tn1"], name="f_tn1"),
             helper.make_node("Unsqueeze", ["f_c", "ax0"], ["f_c1"], name="f_c1"),
             helper.make_node("Concat", ["f_tn1", "f_c1"], ["rows_shape"], axis=0, name="rows_shape"),
             helper.make_node("Reshape", ["feat", "rows_shape"], ["rows"], name="to_rows"),
             helper.make_node("Gemm", ["rows", "fc", "fcb"], ["logits"], transB=1, name="fc"),
             helper.make_node("Unsqueeze", ["f_t", "ax0"], ["f_t1"], name="f_t1"),
             helper.make_node("Unsqueeze", ["f_n", "ax0"], ["f_n1"], name="f_n1"),
             helper.make_node("Concat", ["f_t1", "f_n1", "minus1"], ["out_shape"], axis=0, name="out_shape"),
             helper.make_node("Reshape", ["logits", "out_shape"], ["y"], name="to_tnk")]
    inits = [_w("w", 3, 1, 4, 1), i64_scalar("i0", 0), i64_scalar("i1", 1), i64_scalar("i2", 2), _i64("ax0", [0]),
             _i64("one", [1]), _i64("ch", [3]), _i64("two", [2]), _i64("hid", [hid]),
             _w("W", 2, 4 * hid, 3), _w("R", 2, 4 * hid, hid), _w("B", 2, 8 * hid), _i64("zz_1", [0, 0, -1]),
             _w("fc", k, 2 * hid), _w("fcb", k), _i64("minus1", [-1])]
    return _model(nodes, [_vi("x", [1, 1, 4, "W"])], [_vi("y", [1, "seqlen"])], inits)


@pytest.mark.parametrize("shared_target", [False, True])
def test_time_major_reshape_from_shape_with_free_width_and_a_hard_coded_batch(shared_target):
    """The batch 1 baked into a run-time Reshape target next to a free width is found symbolically: the width is a
    symbol, the Reshape is proven to keep images apart for every width, the 1 becomes 0 (copy the batch): in the
    Concat's constant part, or (target read twice) in a new target cut around it."""
    model = _time_major_recogniser(shared_target)
    result = free_batch(from_onnx(model))
    assert result.freed, result.reason
    assert result.batch_axes == {"y": 1}
    g = result.graph
    if shared_target:
        assert sorted(result.rewritten) == ["to_seq", "to_seq_b"]
        for name in ("to_seq", "to_seq_b"):
            cat = g.producers()[next(n for n in g.nodes if n.name == name).inputs[1]]
            assert cat.op_type == "Concat" and g.initializers[cat.inputs[1]].tolist() == [0]
    else:
        assert result.rewritten == ["seq_shape"] and result.added == []  # the Concat's constant part holding the 1
        cat = next(n for n in g.nodes if n.name == "seq_shape")
        assert g.initializers[cat.inputs[1]].tolist() == [0]
    # What the model returns wins over what it declared ([1, seqlen]).
    assert g.outputs[0].shape == [None, "N", 5]
    assert "declares [1, 'seqlen']" in result.note
    freed = to_onnx(g)
    onnx.checker.check_model(freed)
    assert batch_mismatch(model, freed, sizes=(2, 3)) is None  # at width 32
    for width in (8, 20):  # and at other widths, against the images one at a time
        x = RNG.standard_normal((3, 1, 4, width)).astype(np.float32)
        got = ort_run(freed, {"x": x})[0]
        want = ort_run_per_image(_session(model), {"x": x}, axes=result.batch_axes)[0]
        assert got.shape == ((width + 1) // 2, 3, 5)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    restored = to_onnx(g)
    restore_declared_shapes(restored, result.declared)
    assert [d.dim_param or d.dim_value for d in restored.graph.output[0].type.tensor_type.shape.dim] == [1, "seqlen"]


def test_time_major_recogniser_through_convert():
    """convert (folding the shape reads it can) frees it and records the declared shapes, not a fixed batch."""
    from qatool.convert import BATCH_KEY
    from qatool.ir.batch import FIXED_BATCH_KEY

    r = normalize_proto(_time_major_recogniser(), for_training=True, free_batch=True)
    assert r.batch.freed, r.batch.reason
    assert BATCH_KEY in r.graph.metadata and FIXED_BATCH_KEY not in r.graph.metadata
    assert r.graph.inputs[0].shape == ["N", 1, 4, "W"]


def test_run_time_target_merging_the_batch_behind_a_free_width_is_refused():
    """A run-time target [1, W*3] (Shape read, batch 1 first) of [W, 1, 3]: per image the batch can only merge
    between the free width and the channels, and an output cannot hold it so: refused, not guessed."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1], name="t"),
             helper.make_node("Shape", ["t"], ["s"], name="s"),
             helper.make_node("Gather", ["s", "i0"], ["w"], axis=0, name="w"),
             helper.make_node("Mul", ["w", "c3"], ["wc"], name="wc"),
             helper.make_node("Unsqueeze", ["wc", "ax0"], ["wc1"], name="wc1"),
             helper.make_node("Concat", ["one", "wc1"], ["shape"], axis=0, name="shape"),
             helper.make_node("Reshape", ["t", "shape"], ["y"], name="flat")]
    model = _model(nodes, [_vi("x", [1, 3, "W"])], [_vi("y", [1, "K"])],
                   [numpy_helper.from_array(np.array(0, np.int64), "i0"),
                    numpy_helper.from_array(np.array(3, np.int64), "c3"), _i64("ax0", [0]), _i64("one", [1])])
    result = free_batch(from_onnx(model))
    assert not result.freed and "merged" in result.reason, result.reason


def test_shape_arithmetic_of_a_freed_recogniser_is_never_quantized():
    """Freed, the recogniser computes its shapes at run time (Shape -> Gather -> Mul -> Concat): the placement
    leaves those integer Mul/Concat float (a QuantizeLinear of an int64 would not even load) and quantizes the
    convolution and the Gemm."""
    from qatool.quant.config import QuantConfig
    from qatool.quant.prepare import integer_tensors, mark

    graph = normalize_proto(_time_major_recogniser(), for_training=True, free_batch=True).graph
    plan = mark(graph, QuantConfig())
    ints = integer_tensors(graph)
    assert {"f_tn", "seq_shape", "rows_shape", "state_shape"} <= ints
    assert not ints & set(plan.quantized)
    why = {name: reason for name, _, reason in plan.float_nodes}
    assert why["f_tn"] == why["rows_shape"] == "it computes on integers (shape arithmetic)"
    assert {layer.node.name for layer in plan.layers} == {"conv", "fc"}
