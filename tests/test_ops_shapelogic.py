import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import ort_run
from opcheck import check_forward, make, run_engine
from qatool.errors import ModelError

rng = None  # the test's own seeded generator, set for each test by conftest.py


def i64(*v):
    return np.array(v, dtype=np.int64)


def engine_out(op_type, inputs, attrs=None, opset=13):
    """The engine's single output, checked to be a real ndarray (never a Python or numpy scalar)."""
    out = run_engine(op_type, inputs, attrs, opset=opset)[0]
    assert type(out) is np.ndarray, f"{op_type} returned {type(out)}"
    return out


def _reaches(op: str) -> tuple[list, str]:
    """Nodes that feed `op` from the parameters w (2, 3) and v (2,) through differentiable ops (Cast, ReduceSum),
    and the op's output name."""
    B = TensorProto.BOOL
    if op in ("Shape", "Size", "NonZero"):
        return [helper.make_node(op, ["w"], ["o"])], "o"
    if op == "ConstantOfShape":  # a shape computed from a parameter: Cast(v) = [2, 3]
        return [helper.make_node("Cast", ["v"], ["vi"], to=TensorProto.INT64),
                helper.make_node(op, ["vi"], ["o"], value=numpy_helper.from_array(np.array([1.5], np.float32)))], "o"
    if op == "Range":  # start = sum(v) - 5 = 0, limit 3, delta 1
        return [helper.make_node("ReduceSum", ["v"], ["vs"], keepdims=0),
                helper.make_node("Sub", ["vs", "five"], ["start"]),
                helper.make_node(op, ["start", "three", "one"], ["o"])], "o"
    if op in ("Not", "And", "Or", "Xor"):
        nodes = [helper.make_node("Cast", ["w"], ["wb"], to=B)]
        return nodes + [helper.make_node(op, ["wb"] if op == "Not" else ["wb", "mask"], ["o"])], "o"
    assert op in CMP + ["Equal"], op
    return [helper.make_node(op, ["w", "quarter"], ["o"])], "o"


@pytest.mark.parametrize("op", ["Shape", "Size", "ConstantOfShape", "Range", "Equal", "Less", "LessOrEqual",
                                "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "NonZero"])
def test_no_gradient_flows_through_shape_logic(op):
    """In a model where a parameter reaches the op through differentiable ops and the op's output (cast to float,
    summed to a scalar r) scales the parameter again, y = w * r: the engine differentiates only the direct
    path, dy/dw = G * r, and never asks the op for a gradient (it has none). Constant has no inputs, so no
    gradient can reach it."""
    from qatool.engine.model import Model
    from qatool.ir.graph import from_onnx
    from qatool.ir.roles import write_roles

    F = TensorProto.FLOAT
    nodes, out = _reaches(op)
    nodes += [helper.make_node("Cast", [out], ["of"], to=F),
              helper.make_node("ReduceSum", ["of"], ["r"], keepdims=0),
              helper.make_node("Mul", ["w", "r"], ["y"])]
    w = np.array([[0.25, -1.0, 2.0], [0.0, 1.5, -0.5]], np.float32)
    consts = {"w": w, "v": np.array([2.0, 3.0], np.float32), "quarter": np.array(0.25, np.float32),
              "mask": np.array([True, False, True]),
              "five": np.array(5.0, np.float32), "three": np.array(3.0, np.float32), "one": np.array(1.0, np.float32)}
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", F, [2, 3])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    g = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    write_roles(g, ["w", "v"], [])
    model = Model(g, dtype=np.float64)
    # the engine treats the op as a constant: its step is off the gradient path (keeps nothing for a backward)
    step = next(st for st in model._steps if st.op.node.op_type == op)
    assert not step.on_grad_path and any(st.on_grad_path for st in model._steps if st.op.node.input(0) in ("w", "v"))
    (y,) = model.forward({}, training=True)
    (want,) = ort_run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), {})
    np.testing.assert_allclose(y, want, rtol=1e-6)
    r = float(y[0, 0] / w[0, 0])
    assert r != 0
    G = np.arange(6, dtype=np.float64).reshape(2, 3) - 2
    grads = model.backward([G])
    np.testing.assert_array_equal(grads["w"], G * r)
    np.testing.assert_array_equal(grads["v"], 0)


# ---- Shape / Size ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [13, 15, 21])
@pytest.mark.parametrize("shape", [(2, 3, 4), (5,), (), (0, 3)])
def test_shape(opset, shape):
    x = np.zeros(shape, np.float32)
    check_forward("Shape", [x], opset=opset)
    assert engine_out("Shape", [x], opset=opset).dtype == np.int64


@pytest.mark.parametrize("start,end", [(1, None), (-1, None), (0, -1), (-2, -1), (1, 10), (-10, 2), (3, 1),
                                       (5, None), (None, 2)])
def test_shape_start_end(start, end):
    x = np.zeros((2, 3, 4, 5), np.float32)
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    check_forward("Shape", [x], attrs, opset=15)
    check_forward("Shape", [x], attrs, opset=21)


@pytest.mark.parametrize("shape", [(2, 3, 4), (), (0, 5)])
def test_size(shape):
    x = np.zeros(shape, np.float32)
    check_forward("Size", [x], opset=13)
    check_forward("Size", [x], opset=21)
    out = engine_out("Size", [x])
    assert out.shape == () and out.dtype == np.int64


# ---- Constant / ConstantOfShape --------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [
    {"value": numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3))},
    {"value": numpy_helper.from_array(np.array(7, np.int64))},
    {"value": numpy_helper.from_array(np.array([True, False]))},
    {"value_float": 2.5},
    {"value_floats": [1.0, -2.0, 3.5]},
    {"value_int": -3},
    {"value_ints": [4, 5, 6]},
])
@pytest.mark.parametrize("opset", [13, 21])
def test_constant(attrs, opset):
    check_forward("Constant", [], attrs, opset=opset)
    engine_out("Constant", [], attrs, opset=opset)


def test_constant_from_ir_array():
    # The IR hands tensor attributes over as numpy arrays.
    v = np.arange(4, dtype=np.int32)
    np.testing.assert_array_equal(engine_out("Constant", [], {"value": v}), v)


@pytest.mark.parametrize("attrs", [{"value_string": "a"}, {"value_strings": ["a", "b"]},
                                   {"value": np.array(["a"], dtype=object)}, {}])
def test_constant_unsupported(attrs):
    with pytest.raises(ModelError):
        make("Constant", [], attrs)


@pytest.mark.parametrize("value", [None, np.array([3], np.int64), np.array([1.5], np.float32),
                                   np.array([True]), np.array([2], np.int32)])
@pytest.mark.parametrize("shape", [(2, 3), (4,), (), (2, 0)])
def test_constant_of_shape(value, shape):
    attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
    check_forward("ConstantOfShape", [i64(*shape)], attrs, opset=9)
    check_forward("ConstantOfShape", [i64(*shape)], attrs, opset=21)
    out = engine_out("ConstantOfShape", [i64(*shape)], attrs)
    assert out.shape == shape
    # The IR form of the attribute (an ndarray) gives the same result.
    if value is not None:
        np.testing.assert_array_equal(engine_out("ConstantOfShape", [i64(*shape)], {"value": value}), out)


def test_constant_of_shape_bad_value():
    with pytest.raises(ModelError):
        make("ConstantOfShape", [i64(2)], {"value": np.array([1.0, 2.0], np.float32)})


# ---- Range -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("start,limit,delta", [(0, 5, 1), (3, 9, 3), (10, 4, -2), (1, 10, 4), (5, 2, 1), (-3, 3, 2),
                                               (2, 2, 1)])
def test_range(dtype, start, limit, delta):
    inputs = [np.array(v, dtype) for v in (start, limit, delta)]
    check_forward("Range", inputs, opset=11)
    check_forward("Range", inputs, opset=21)
    assert engine_out("Range", inputs).dtype == dtype


def test_range_fractional():
    inputs = [np.array(v, np.float32) for v in (0.5, 2.3, 0.3)]
    check_forward("Range", inputs, opset=11)
    inputs = [np.array(v, np.float32) for v in (1.0, -1.0, -0.25)]
    check_forward("Range", inputs, opset=11)


def test_range_delta_zero():
    with pytest.raises(ModelError):
        run_engine("Range", [i64(0).reshape(()), i64(3).reshape(()), i64(0).reshape(())])


# ---- comparisons and logic -------------------------------------------------------------------------------------
CMP = ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]


@pytest.mark.parametrize("op", CMP)
@pytest.mark.parametrize("sa,sb", [((2, 3), (2, 3)), ((2, 3), (3,)), ((2, 1, 3), (4, 1)), ((), ())])
def test_compare_float(op, sa, sb):
    a = np.asarray(rng.integers(-2, 3, sa), np.float32)
    b = np.asarray(rng.integers(-2, 3, sb), np.float32)
    opset = 13
    check_forward(op, [a, b], opset=opset)
    check_forward(op, [a, b], opset=19 if op == "Equal" else 16)
    out = engine_out(op, [a, b], opset=opset)
    assert out.dtype == np.bool_ and out.shape == np.broadcast_shapes(sa, sb)


@pytest.mark.parametrize("op", CMP)
def test_compare_int(op):
    a = i64(1, 5, 3, -2)
    b = np.array(3, np.int64)
    check_forward(op, [a, b], opset=16)


def test_equal_bool():
    check_forward("Equal", [np.array([True, False, True]), np.array([True, True, False])], opset=13)


@pytest.mark.parametrize("op", ["And", "Or", "Xor"])
@pytest.mark.parametrize("sa,sb", [((2, 3), (2, 3)), ((2, 3), (3,)), ((), (2, 1))])
def test_logic(op, sa, sb):
    a = np.asarray(rng.random(sa) > 0.5)
    b = np.asarray(rng.random(sb) > 0.5)
    check_forward(op, [a, b], opset=13)
    assert engine_out(op, [a, b]).dtype == np.bool_


def test_logic_scalar_results_are_arrays():
    for op in ["And", "Or", "Xor", "Equal", "Less"]:
        out = engine_out(op, [np.array(True), np.array(False)])
        assert out.shape == ()
    assert engine_out("Not", [np.array(True)]).shape == ()


def test_not():
    check_forward("Not", [np.asarray(rng.random((3, 4)) > 0.5)], opset=13)
    check_forward("Not", [np.array(False)], opset=13)


# ---- NonZero ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [
    np.array([[0, 1.5, 0], [2, 0, -1]], np.float32),
    np.zeros((2, 3), np.float32),
    np.array([0, 3, 0, 4], np.int64),
    np.array([[[True, False], [False, True]]]),
    np.array(3.0, np.float32),
    np.array(0.0, np.float32),
])
@pytest.mark.parametrize("opset", [9, 13])
def test_nonzero(x, opset):
    check_forward("NonZero", [x], opset=opset)
    assert engine_out("NonZero", [x], opset=opset).dtype == np.int64


def test_cast_attribute_by_onnx_helper_dtype():
    # Cast lives in shape.py (it has a gradient); here only its shape-logic use: int64 shapes to float and back.
    x = i64(2, 3, 4)
    check_forward("Cast", [x], {"to": TensorProto.FLOAT}, opset=13)
    check_forward("Cast", [np.array([2.7, -1.5], np.float32)], {"to": TensorProto.INT64}, opset=13)
    assert helper.tensor_dtype_to_np_dtype(TensorProto.INT64) == engine_out(
        "Cast", [np.array(1.0, np.float32)], {"to": TensorProto.INT64}).dtype
