import numpy as np
import pytest
from onnx import TensorProto

from opcheck import check_forward, check_grad, make, run_engine, run_ort
from qatool.errors import ModelError
from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py
I64_MAX, I64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def i64(*v):
    return np.array(v, dtype=np.int64)


def shares_memory(op_type, inputs, attrs=None, opset=13, n_outputs=1):
    out = run_engine(op_type, inputs, attrs, n_outputs=n_outputs, opset=opset)
    return all(np.shares_memory(o, inputs[0]) for o in out if o.size)  # an empty view owns no memory


# ---- reshapes --------------------------------------------------------------------------------------------------
def test_identity():
    x = rand(2, 3)
    check_forward("Identity", [x], opset=13)
    check_forward("Identity", [x], opset=21)
    check_grad("Identity", [x])
    assert shares_memory("Identity", [x])


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten(axis):
    x = rand(2, 3, 1, 5)
    check_forward("Flatten", [x], {"axis": axis}, opset=13)
    check_grad("Flatten", [x], {"axis": axis}, wrt=[0])
    assert shares_memory("Flatten", [x], {"axis": axis})


def test_flatten_default_axis():
    check_forward("Flatten", [rand(2, 3, 4)], opset=21)


@pytest.mark.parametrize("shape,opset", [
    ([0, -1], 13), ([-1], 13), ([3, 0, 1, 2, 2], 13), ([2, 3, 2, 2], 13), ([4, -1, 3], 14),
    ([0, 0, 4], 14), ([0, 3, 4], 21)])
def test_reshape(shape, opset):
    x = rand(2, 3, 4) if len(shape) != 5 else rand(2, 3, 4).reshape(3, 2, 4)
    check_forward("Reshape", [x, i64(*shape)], opset=opset, const=[1])
    check_grad("Reshape", [x, i64(*shape)], wrt=[0], opset=opset)
    assert shares_memory("Reshape", [x, i64(*shape)], opset=opset)


def test_reshape_allowzero():
    x = np.zeros((0, 3), np.float32)
    check_forward("Reshape", [x, i64(3, 0)], {"allowzero": 1}, opset=14, const=[1])
    x = rand(2, 3)
    check_forward("Reshape", [x, i64(0, 3)], {"allowzero": 0}, opset=14, const=[1])
    with pytest.raises(ValueError):
        run_engine("Reshape", [x, i64(0, 3)], {"allowzero": 1}, opset=14)


@pytest.mark.parametrize("perm", [None, [0, 2, 1, 3], [3, 1, 0, 2], [1, 0, 2, 3]])
def test_transpose(perm):
    x = rand(2, 3, 4, 5)
    attrs = {} if perm is None else {"perm": perm}
    check_forward("Transpose", [x], attrs, opset=13)
    check_grad("Transpose", [x], attrs, wrt=[0])
    assert shares_memory("Transpose", [x], attrs)


def test_transpose_opset21():
    check_forward("Transpose", [rand(2, 3, 4)], {"perm": [2, 0, 1]}, opset=21)


@pytest.mark.parametrize("axes,opset", [([1], 11), ([-1, 1], 11), ([1, 3], 13), ([-2], 13), ([0, 1, 3], 21)])
def test_squeeze(axes, opset):
    x = rand(1, 1, 3, 1) if opset != 11 or axes != [-1, 1] else rand(2, 1, 3, 1)
    if opset < 13:
        inputs, attrs, const = [x], {"axes": axes}, []
    else:
        inputs, attrs, const = [x, i64(*axes)], {}, [1]
    if axes == [-2]:
        x = rand(2, 1, 3)
        inputs = [x, i64(-2)]
    check_forward("Squeeze", inputs, attrs, opset=opset, const=const)
    check_grad("Squeeze", inputs, attrs, wrt=[0], opset=opset)
    assert shares_memory("Squeeze", inputs, attrs, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_all(opset):
    x = rand(1, 3, 1, 2, 1)
    check_forward("Squeeze", [x], opset=opset)
    check_grad("Squeeze", [x], wrt=[0], opset=opset)


def test_squeeze_to_scalar():
    x = rand(1, 1)
    out = run_engine("Squeeze", [x], opset=13)[0]
    assert isinstance(out, np.ndarray) and out.shape == ()
    check_forward("Squeeze", [x], opset=13)


@pytest.mark.parametrize("axes,opset", [([0], 11), ([-1, 1], 11), ([1, 4], 13), ([-1], 13), ([0, -2], 13),
                                        ([3, 0], 21)])
def test_unsqueeze(axes, opset):
    x = rand(2, 3, 4)
    if opset < 13:
        inputs, attrs, const = [x], {"axes": axes}, []
    else:
        inputs, attrs, const = [x, i64(*axes)], {}, [1]
    check_forward("Unsqueeze", inputs, attrs, opset=opset, const=const)
    check_grad("Unsqueeze", inputs, attrs, wrt=[0], opset=opset)
    assert shares_memory("Unsqueeze", inputs, attrs, opset=opset)


def test_unsqueeze_scalar():
    x = np.array(1.5, np.float32)
    check_forward("Unsqueeze", [x, i64(0)], opset=13, const=[1])


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(mode):
    x = rand(2, 12, 3, 2)
    check_forward("DepthToSpace", [x], {"blocksize": 2, "mode": mode}, opset=13)
    check_grad("DepthToSpace", [x], {"blocksize": 2, "mode": mode}, wrt=[0])
    x = rand(1, 9, 2, 3)
    check_forward("DepthToSpace", [x], {"blocksize": 3, "mode": mode}, opset=11)


def test_depth_to_space_default_mode():
    check_forward("DepthToSpace", [rand(1, 8, 2, 3)], {"blocksize": 2}, opset=13)


@pytest.mark.parametrize("b", [2, 3])
def test_space_to_depth(b):
    x = rand(2, 3, 2 * b, 3 * b)
    check_forward("SpaceToDepth", [x], {"blocksize": b}, opset=13)
    check_grad("SpaceToDepth", [x], {"blocksize": b}, wrt=[0])


# ---- concat / split --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_concat(axis):
    shapes = [[2, 3, 4] for _ in range(3)]
    for s, n in zip(shapes, (1, 2, 3)):
        s[axis] = n
    xs = [rand(*s) for s in shapes]
    check_forward("Concat", xs, {"axis": axis}, opset=13)
    check_forward("Concat", xs[:2], {"axis": axis}, opset=11)
    check_grad("Concat", xs, {"axis": axis}, wrt=[0, 1, 2])


def test_concat_ints_and_single():
    check_forward("Concat", [i64(1, 2), i64(3), i64()], {"axis": 0}, opset=13)
    check_forward("Concat", [rand(2, 3)], {"axis": 1}, opset=13)


@pytest.mark.parametrize("axis,split", [(0, [1, 2]), (1, [2, 1, 1]), (-1, [5]), (-1, [2, 0, 3])])
def test_split_input(axis, split):
    x = rand(3, 4, 5)
    n = len(split)
    check_forward("Split", [x, i64(*split)], {"axis": axis}, n_outputs=n, opset=13, const=[1])
    check_forward("Split", [x, i64(*split)], {"axis": axis}, n_outputs=n, opset=18, const=[1])
    check_grad("Split", [x, i64(*split)], {"axis": axis}, wrt=[0], n_outputs=n)
    assert shares_memory("Split", [x, i64(*split)], {"axis": axis}, n_outputs=n)


@pytest.mark.parametrize("axis,n", [(0, 3), (1, 2), (-1, 4)])
def test_split_equal(axis, n):
    x = rand(6, 4, 8)
    check_forward("Split", [x], {"axis": axis}, n_outputs=n, opset=13)
    check_forward("Split", [x], {"axis": axis}, n_outputs=n, opset=11)
    check_grad("Split", [x], {"axis": axis}, wrt=[0], n_outputs=n, opset=13)


def test_split_attribute_opset11():
    x = rand(2, 7)
    check_forward("Split", [x], {"axis": 1, "split": [3, 4]}, n_outputs=2, opset=11)
    check_grad("Split", [x], {"axis": 1, "split": [3, 4]}, wrt=[0], n_outputs=2, opset=11)


@pytest.mark.parametrize("dim,n", [(7, 4), (5, 3), (6, 3), (5, 2), (4, 1)])
def test_split_num_outputs(dim, n):
    x = rand(2, dim)
    check_forward("Split", [x], {"axis": 1, "num_outputs": n}, n_outputs=n, opset=18)
    check_grad("Split", [x], {"axis": 1, "num_outputs": n}, wrt=[0], n_outputs=n, opset=18)


def test_split_errors():
    with pytest.raises(ModelError):
        run_engine("Split", [rand(2, 5)], {"axis": 1, "num_outputs": 4}, n_outputs=4, opset=18)
    with pytest.raises(ModelError):
        run_engine("Split", [rand(2, 5)], {"axis": 1}, n_outputs=2, opset=13)
    with pytest.raises(ModelError):
        run_engine("Split", [rand(2, 5), i64(2, 2)], {"axis": 1}, n_outputs=2, opset=13)


def test_split_backward_with_unused_output():
    x = rand(2, 6)
    op = make("Split", [x, i64(1, 2, 3)], {"axis": 1}, n_outputs=3, opset=13)
    op.forward(Context(), x, i64(1, 2, 3))
    g1 = rand(2, 2)
    gx, gs = op.backward(None, g1, None)
    assert gs is None and gx.shape == x.shape and gx.dtype == np.float32
    np.testing.assert_array_equal(gx[:, 1:3], g1)
    assert not gx[:, :1].any() and not gx[:, 3:].any()


# ---- slice -----------------------------------------------------------------------------------------------------
SLICES = [
    # starts, ends, axes, steps
    ([1], [3], None, None),
    ([0, 1], [2, -1], [0, 2], None),
    ([-3], [I64_MAX], [1], None),
    ([I64_MIN], [2], [-1], [1]),
    ([10], [-10], [2], [-1]),
    ([-1], [I64_MIN], [2], [-2]),
    ([4, 0], [0, 3], [2, 0], [-1, 2]),
    ([1, -1, 0], [I64_MAX, I64_MIN, 5], [0, 1, 2], [2, -1, 3]),
    ([5], [10], [2], [1]),   # empty result
    ([0], [5], [-2], [-1]),  # empty with negative step
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICES)
def test_slice(starts, ends, axes, steps):
    x = rand(3, 4, 5)
    inputs = [x, i64(*starts), i64(*ends), None if axes is None else i64(*axes),
              None if steps is None else i64(*steps)]
    while inputs[-1] is None:
        inputs.pop()
    check_forward("Slice", inputs, opset=13, const=[1, 2, 3, 4])
    check_forward("Slice", inputs, opset=10, const=[1, 2, 3, 4])
    check_grad("Slice", inputs, wrt=[0])
    assert shares_memory("Slice", inputs)


def test_slice_axes_omitted_steps_given():
    x = rand(4, 5)
    check_forward("Slice", [x, i64(3, 1), i64(0, 5), None, i64(-1, 2)], opset=13, const=[1, 2, 4])


def test_slice_attributes_opset9():
    x = rand(3, 4, 5)
    attrs = {"starts": [1, -4], "ends": [I64_MAX, 3], "axes": [0, 2]}
    check_forward("Slice", [x], attrs, opset=9)
    check_grad("Slice", [x], attrs, wrt=[0], opset=9)
    check_forward("Slice", [x], {"starts": [0, 1], "ends": [2, 3]}, opset=9)


# ---- pad -------------------------------------------------------------------------------------------------------
PADS = [[0, 1, 1, 0, 2, 1], [1, 2, 0, 1, 0, 2], [0, 0, 0, 0, 0, 0], [0, -1, 2, 1, 1, -2], [2, 1, 0, 0, 0, 2]]


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("pads", PADS)
def test_pad(mode, pads):
    x = rand(3, 4, 5)
    inputs = [x, i64(*pads)]
    check_forward("Pad", inputs, {"mode": mode}, opset=13, const=[1])
    check_forward("Pad", inputs, {"mode": mode}, opset=11, const=[1])
    check_grad("Pad", inputs, {"mode": mode}, wrt=[0], opset=13)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_opset19(mode):
    x = rand(2, 3, 4)
    for pads in ([1, 2, 0, 0, 2, 3], [0, -1, 1, 1, 1, -2]):
        check_forward("Pad", [x, i64(*pads)], {"mode": mode}, opset=19, const=[1])
        check_grad("Pad", [x, i64(*pads)], {"mode": mode}, wrt=[0], opset=19)


def test_pad_wrap_large():
    # wrap pads larger than the dimension repeat a source position: the gradient must accumulate.
    x = rand(2, 3)
    check_forward("Pad", [x, i64(0, 4, 1, 5)], {"mode": "wrap"}, opset=19, const=[1])
    check_grad("Pad", [x, i64(0, 4, 1, 5)], {"mode": "wrap"}, wrt=[0], opset=19)


def test_pad_constant_value():
    x = rand(2, 3)
    cv = np.array(1.5, np.float32)
    check_forward("Pad", [x, i64(1, 0, 2, 1), cv], opset=13, const=[1, 2])
    check_forward("Pad", [x, i64(1, 0, 2, 1), cv], opset=11, const=[1, 2])
    check_grad("Pad", [x, i64(1, 0, 2, 1), cv], wrt=[0])
    xi = np.arange(6, dtype=np.int64).reshape(2, 3)
    check_forward("Pad", [xi, i64(1, 1, 1, 1), np.array(-7, np.int64)], opset=13, const=[1, 2])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("axes,pads", [([1], [1, 2]), ([-1, 0], [2, 1, 0, 1]), ([2, -2], [-1, 1, 2, 0])])
def test_pad_axes_opset18(mode, axes, pads):
    x = rand(2, 3, 4)
    opset = 19 if mode == "wrap" else 18
    inputs = [x, i64(*pads), np.array(0.5, np.float32), i64(*axes)]
    check_forward("Pad", inputs, {"mode": mode}, opset=opset, const=[1, 2, 3])
    check_forward("Pad", [x, i64(*pads), None, i64(*axes)], {"mode": mode}, opset=21, const=[1, 3])
    check_grad("Pad", inputs, {"mode": mode}, wrt=[0], opset=opset)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_attributes_opset2(mode):
    x = rand(2, 3, 4)
    attrs = {"mode": mode, "pads": [0, 1, 2, 1, 0, 1], "value": 2.5}
    if mode != "constant":
        del attrs["value"]
    check_forward("Pad", [x], attrs, opset=2)
    check_grad("Pad", [x], attrs, wrt=[0], opset=2)


def test_pad_nchw_reflect_backward_matches_dense():
    # The gradient of reflect padding is the transpose of the padding as a linear map.
    x = rand(1, 2, 4, 5).astype(np.float64)
    op = make("Pad", [x, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}, opset=13)
    y = op.forward(Context(), x, i64(0, 0, 1, 2, 0, 0, 2, 1))
    g = rng.standard_normal(y.shape)
    gx = op.backward(g)[0]
    # Dense Jacobian by basis vectors.
    dense = np.zeros(x.size)
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = 1
        dense[j] = np.sum(op.forward(Context(), e.reshape(x.shape), i64(0, 0, 1, 2, 0, 0, 2, 1)) * g)
    np.testing.assert_allclose(gx.reshape(-1), dense, rtol=1e-12, atol=1e-12)


# ---- broadcasting and repetition -------------------------------------------------------------------------------
@pytest.mark.parametrize("xs,shape", [((3, 1), (2, 1, 4)), ((2, 3), (1, 1)), ((1,), (3,)), ((2, 1, 3), (2, 4, 1)),
                                      ((3, 4), (3, 4)), ((), (2, 3))])
def test_expand(xs, shape):
    x = np.asarray(rng.standard_normal(xs), np.float32)
    check_forward("Expand", [x, i64(*shape)], opset=13, const=[1])
    check_forward("Expand", [x, i64(*shape)], opset=8, const=[1])
    check_grad("Expand", [x, i64(*shape)], wrt=[0])


@pytest.mark.parametrize("xs,reps", [((2, 3), (1, 1)), ((2, 3), (2, 3)), ((1, 2, 3), (3, 1, 2)), ((4,), (3,))])
def test_tile(xs, reps):
    x = rand(*xs)
    check_forward("Tile", [x, i64(*reps)], opset=13, const=[1])
    check_forward("Tile", [x, i64(*reps)], opset=6, const=[1])
    check_grad("Tile", [x, i64(*reps)], wrt=[0])


# ---- gathers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis,idx", [
    (0, np.array([2, 0, -1, 0], np.int64)),
    (1, np.array([[1, -4], [3, 3]], np.int64)),
    (-1, np.array([4, -5, 0], np.int64)),
    (1, np.array(-1, np.int64)),
    (0, np.array([1, 1, 1], np.int32)),
    (2, np.zeros((0,), np.int64)),
])
def test_gather(axis, idx):
    x = rand(3, 4, 5)
    check_forward("Gather", [x, idx], {"axis": axis}, opset=13)
    check_forward("Gather", [x, idx], {"axis": axis}, opset=11)
    check_grad("Gather", [x, idx], {"axis": axis}, wrt=[0])


def test_gather_scalar_from_vector():
    # Gathering one element of a 1-D shape tensor gives a 0-d array (the classic Shape -> Gather pattern).
    x = i64(2, 3, 4)
    out = run_engine("Gather", [x, np.array(-1, np.int64)], {"axis": 0}, opset=13)[0]
    assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.int64
    check_forward("Gather", [x, np.array(1, np.int64)], {"axis": 0}, opset=13)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(axis):
    x = rand(3, 4)
    shape = [3, 4]
    shape[axis] = 5
    dim = x.shape[axis]
    idx = rng.integers(-dim, dim, size=shape).astype(np.int64)
    check_forward("GatherElements", [x, idx], {"axis": axis}, opset=13)
    check_forward("GatherElements", [x, idx], {"axis": axis}, opset=11)
    check_grad("GatherElements", [x, idx], {"axis": axis}, wrt=[0])


def test_gather_elements_3d_smaller_index():
    x = rand(2, 3, 4)
    idx = rng.integers(0, 3, size=(2, 5, 2)).astype(np.int64)
    check_forward("GatherElements", [x, idx], {"axis": 1}, opset=13)
    check_grad("GatherElements", [x, idx], {"axis": 1}, wrt=[0])


# ---- where / trilu / cast --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sc,sx,sy", [((2, 3), (2, 3), (2, 3)), ((3,), (2, 3), ()), ((2, 1), (1, 3), (2, 3)),
                                      ((), (2, 3), (3,))])
def test_where(sc, sx, sy):
    c = rng.random(sc) > 0.5
    x = np.asarray(rng.standard_normal(sx), np.float32)
    y = np.asarray(rng.standard_normal(sy), np.float32)
    check_forward("Where", [np.asarray(c), x, y], opset=13)
    check_forward("Where", [np.asarray(c), x, y], opset=16)
    check_grad("Where", [np.asarray(c), x, y], wrt=[1, 2])


def test_where_ints_and_scalar():
    c = np.array(True)
    out = run_engine("Where", [c, np.array(3, np.int64), np.array(4, np.int64)], opset=16)[0]
    assert isinstance(out, np.ndarray) and out.shape == () and out == 3
    check_forward("Where", [np.array([True, False]), i64(1, 2), i64(5)], opset=16)


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [None, 0, 1, -2, 5])
def test_trilu(upper, k):
    x = rand(2, 3, 4)
    inputs = [x] if k is None else [x, np.array(k, np.int64)]
    check_forward("Trilu", inputs, {"upper": upper}, opset=14, const=[1])
    check_grad("Trilu", inputs, {"upper": upper}, wrt=[0], opset=14)


CASTS = [
    (np.float32, TensorProto.INT64), (np.float32, TensorProto.INT32), (np.float32, TensorProto.FLOAT16),
    (np.float32, TensorProto.BOOL), (np.float32, TensorProto.DOUBLE), (np.float32, TensorProto.FLOAT),
    (np.int64, TensorProto.FLOAT), (np.int64, TensorProto.INT32), (np.bool_, TensorProto.FLOAT),
    (np.bool_, TensorProto.INT64), (np.float16, TensorProto.FLOAT), (np.int32, TensorProto.UINT8),
]


@pytest.mark.parametrize("src,to", CASTS)
@pytest.mark.parametrize("opset", [13, 19, 21])
def test_cast(src, to, opset):
    x = (rng.standard_normal((3, 4)) * 5)
    x[0, 0] = 0
    x = x.astype(src) if src != np.int32 else np.abs(x).astype(np.int32)
    check_forward("Cast", [x], {"to": to}, opset=opset)


def test_cast_bfloat16_and_float8():
    x = (rng.standard_normal((3, 4)) * 100).astype(np.float32)
    x[0, :2] = [1e6, -1e6]  # out of float8 range: saturated to +-448
    # onnxruntime hands float8 outputs to numpy as their uint8 bit patterns.
    expected = run_ort("Cast", [x], {"to": TensorProto.FLOAT8E4M3FN}, opset=19)[0]
    got = run_engine("Cast", [x], {"to": TensorProto.FLOAT8E4M3FN}, opset=19)[0]
    assert got.dtype.name == "float8_e4m3fn" and expected.dtype == np.uint8
    np.testing.assert_array_equal(got.view(np.uint8), expected)
    assert got.astype(np.float32)[0, 0] == 448 and got.astype(np.float32)[0, 1] == -448
    # onnxruntime cannot hand bfloat16 to numpy: compare Cast(bfloat16) -> Cast(float) with two engine casts.
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16),
         helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    h = run_engine("Cast", [x], {"to": TensorProto.BFLOAT16}, opset=13)[0]
    assert h.dtype.name == "bfloat16"
    got = run_engine("Cast", [h], {"to": TensorProto.FLOAT}, opset=13)[0]
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, x)  # bfloat16 really rounded


def test_cast_keeps_view_when_same_dtype():
    x = rand(2, 3)
    assert shares_memory("Cast", [x], {"to": TensorProto.FLOAT})


def test_cast_grad():
    check_grad("Cast", [rand(2, 3)], {"to": TensorProto.DOUBLE}, wrt=[0])
    x = rand(2, 3)
    op = make("Cast", [x], {"to": TensorProto.FLOAT16})
    y = op.forward(Context(), x)
    assert y.dtype == np.float16
    g = op.backward(np.ones_like(y))[0]
    assert g.dtype == np.float32 and g.shape == x.shape
    op = make("Cast", [x], {"to": TensorProto.INT64})
    op.forward(Context(), x)
    assert op.backward(np.ones((2, 3), np.int64)) == (None,)
    xi = i64(1, 2)
    op = make("Cast", [xi], {"to": TensorProto.FLOAT})
    op.forward(Context(), xi)
    assert op.backward(np.ones(2, np.float32)) == (None,)


def test_cast_to_string_rejected():
    with pytest.raises(ModelError, match="string"):
        make("Cast", [rand(2)], {"to": TensorProto.STRING})


@pytest.mark.parametrize("opset", [15, 19, 21])
def test_castlike(opset):
    x = (rand(3, 4) * 5)
    check_forward("CastLike", [x, np.zeros(1, np.int64)], opset=opset)
    check_forward("CastLike", [x, np.zeros(1, np.float16)], opset=opset)
    check_forward("CastLike", [i64(1, 2), np.zeros((), np.float32)], opset=opset)
    check_grad("CastLike", [x, np.zeros(1, np.float64)], wrt=[0], opset=opset)
    op = make("CastLike", [x, np.zeros(1, np.float16)])
    op.forward(Context(), x, np.zeros(1, np.float16))
    g, gt = op.backward(np.ones((3, 4), np.float16))
    assert g.dtype == np.float32 and gt is None
