import numpy as np
import pytest

from opcheck import check_forward, check_grad, make, run_engine

from qatool.ops import Context

rng = None  # the test's own seeded generator, set for each test by conftest.py

SHAPES = [((2, 3, 4), (2, 3, 4)),  # same
          ((2, 3, 4), (4,)),  # trailing, rank mismatch
          ((2, 1, 4), (1, 3, 1)),  # middle 1s on both sides
          ((1, 3, 1), (2, 1, 5)),
          ((3, 1), (2, 1, 5)),  # rank mismatch, both expand
          ((3, 1), ()),  # scalar
          ((), (2, 3))]  # scalar first


def arr(shape, lo=None):
    """float32 array of `shape`; with lo, magnitudes >= lo (away from 0 for divisions)."""
    x = np.asarray(rng.standard_normal(shape), dtype=np.float32)
    if lo is not None:
        x = np.asarray(np.sign(x) * (np.abs(x) + lo), dtype=np.float32)
    return x


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("sa,sb", SHAPES)
def test_binary_broadcast(op, sa, sb):
    a, b = arr(sa), arr(sb, lo=0.5)
    check_forward(op, [a, b])
    check_grad(op, [a, b])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"])
@pytest.mark.parametrize("sb", [(), (1,), (4,)])
def test_float32_constant_second_input_stays_float32(op, sb):
    a = np.abs(arr((2, 3, 4))) + np.float32(0.5)
    b = np.asarray(np.full(sb, 1.5), dtype=np.float32)
    out = check_forward(op, [a, b], const=[1])[0]  # onnxruntime says float32 too
    assert out.dtype == np.float32
    o = make(op, [a, b])
    o.needs_grad = [True, True]
    y = o.forward(Context(), a, b)
    grads = o.backward(np.ones_like(y))
    assert all(g.dtype == np.float32 for g in grads)


@pytest.mark.parametrize("wrt", [[0], [1]])
def test_mul_keeps_only_the_operand_the_other_gradient_needs(wrt):
    """A Mul by a constant keeps the constant, not its tensor input (dL/da = g * b needs only b)."""
    a, b = arr((2, 3, 4)), arr((4,))
    check_grad("Mul", [a, b], wrt=wrt)
    op = make("Mul", [a, b])
    op.needs_grad = [i in wrt for i in range(2)]
    op.forward(Context(training=True), a, b)
    assert [k for k, v in vars(op).items() if isinstance(v, np.ndarray)] == (["b"] if wrt == [0] else ["a"])


@pytest.mark.parametrize("op_type", ["Div", "Pow"])
def test_div_pow_keep_their_output_only_for_the_exponent_or_divisor_gradient(op_type):
    a, b = np.abs(arr((2, 3, 4))) + np.float32(0.5), np.abs(arr((4,))) + np.float32(0.5)
    for wrt in ([0], [1], [0, 1]):
        check_grad(op_type, [a, b], wrt=wrt)
        op = make(op_type, [a, b])
        op.needs_grad = [i in wrt for i in range(2)]
        op.forward(Context(training=True), a, b)
        assert (op.y is not None) == (1 in wrt)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_binary_int(op, dtype):
    a = np.array([[7, -7, 7, -7, 0, 9], [1, -1, 100, -100, 5, -6]], dtype)
    b = np.array([2, 2, -2, -2, 3, -4], dtype)
    got = check_forward(op, [a, b], atol=0, rtol=0)[0]
    if op == "Div":  # truncation toward zero, like C
        np.testing.assert_array_equal(got[0], [3, -3, -3, 3, 0, -2])


def test_int64_div_exact_for_large_values():
    a = np.array([2**62 + 1, -(2**62) - 3, 2**53 + 1], np.int64)
    b = np.array([3, 7, -1], np.int64)
    check_forward("Div", [a, b], atol=0, rtol=0)


# ---- variadic ----------------------------------------------------------------------------------------------------
VARIADIC = [[(2, 3, 4)], [(2, 3, 4), (2, 3, 4)], [(2, 3, 4), (3, 1)], [(1, 3, 1), (2, 1, 4), ()],
            [(4,), (2, 3, 4), (3, 4)]]


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
@pytest.mark.parametrize("shapes", VARIADIC)
def test_variadic(op, shapes):
    xs = [arr(s) for s in shapes]  # continuous random values: no ties
    check_forward(op, xs)
    check_grad(op, xs)


@pytest.mark.parametrize("op", ["Max", "Min"])  # onnxruntime has no integer Sum
def test_variadic_int(op):
    xs = [rng.integers(-9, 9, s).astype(np.int64) for s in [(2, 3), (3,), (1, 3)]]
    check_forward(op, xs, atol=0, rtol=0)


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("n", [2, 3])
def test_extremum_ties_go_to_first(op, n):
    xs = [np.array([1.0, 2.0, 3.0], np.float32) for _ in range(n)]
    xs[-1] = np.array([1.0, 5.0 if op == "Max" else -5.0, 3.0], np.float32)
    o = make(op, xs)
    o.forward(Context(), *xs)
    grads = o.backward(np.ones(3, np.float32))
    np.testing.assert_array_equal(grads[0], [1, 0, 1])
    for g in grads[1:-1]:
        np.testing.assert_array_equal(g, [0, 0, 0])
    np.testing.assert_array_equal(grads[-1], [0, 1, 0])


def test_extremum_broadcast_tie_gradient_counts_once():
    a = np.array([[1.0, 2.0], [2.0, 0.0]], np.float32)
    b = np.array([2.0], np.float32)
    o = make("Max", [a, b])
    o.forward(Context(), a, b)
    ga, gb = o.backward(np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(ga, [[0, 1], [1, 0]])  # ties at 2.0 go to a
    np.testing.assert_array_equal(gb, [2])


# ---- Pow ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("e", [2.0, 0.5, 1.0, 3.0, -1.5, 0.0])
def test_pow_scalar_exponent(e):
    a = np.abs(arr((2, 3, 4), lo=0.3))
    b = np.array(e, np.float32)
    check_forward("Pow", [a, b])
    check_forward("Pow", [a, b], const=[1])
    check_grad("Pow", [a, b])


def test_pow_negative_base_integer_exponent():
    a = arr((3, 4), lo=0.3)
    for e in (np.array(3.0, np.float32), np.array([2.0], np.float32)):
        check_forward("Pow", [a, e])
        check_grad("Pow", [a, e], wrt=[0])


@pytest.mark.parametrize("sa,sb", [((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3,), (2, 3)), ((), (2,))])
def test_pow_tensor_exponent(sa, sb):
    a = np.abs(arr(sa, lo=0.3))
    b = arr(sb)
    check_forward("Pow", [a, b])
    check_grad("Pow", [a, b])


@pytest.mark.parametrize("eb", [np.int64, np.int32])
def test_pow_float_base_int_exponent(eb):
    a = arr((2, 3), lo=0.3)
    b = np.array([[2, 3, -1]], eb)
    out = check_forward("Pow", [a, b])[0]
    assert out.dtype == np.float32
    check_grad("Pow", [a, b])  # base only: an integer exponent has no gradient


def test_pow_int_base():
    a = np.array([2, 3, -2, 5], np.int64)
    check_forward("Pow", [a, np.array([2, 0, 3, 1], np.int64)], atol=0, rtol=0)
    check_forward("Pow", [a, np.array([2, -1, 3, -2], np.int64)], atol=0, rtol=0)
    check_forward("Pow", [a, np.array([0.5, 1.5, 2.0, 0.3], np.float32)], atol=0, rtol=0)


# ---- unary -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_unary_positive(op):
    x = np.abs(arr((2, 3, 5), lo=0.2))
    check_forward(op, [x])
    check_grad(op, [x])


@pytest.mark.parametrize("op", ["Neg", "Exp", "Abs"])
def test_unary(op):
    x = arr((2, 3, 5), lo=0.05)
    check_forward(op, [x])
    check_grad(op, [x])


def test_reciprocal_negative():
    x = arr((4, 5), lo=0.2)
    check_forward("Reciprocal", [x])
    check_grad("Reciprocal", [x])


@pytest.mark.parametrize("op", ["Neg", "Abs"])
def test_unary_int(op):
    x = rng.integers(-9, 9, (3, 4)).astype(np.int64)
    check_forward(op, [x], atol=0, rtol=0)


@pytest.mark.parametrize("op", ["Floor", "Ceil", "Round"])
def test_rounding(op):
    x = np.concatenate([arr((20,)) * 3, np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0, -3.0], np.float32)])
    check_forward(op, [x], atol=0, rtol=0)
    y = (np.floor(arr((3, 4)) * 3) + np.float32(0.3)).astype(np.float32)  # away from integers and halves
    g = check_grad(op, [y])[0]
    assert not g.any()


@pytest.mark.parametrize("op", ["Floor", "Ceil", "Round"])
def test_rounding_is_a_constant_for_the_engine(op):
    """y = w * op(w): the gradient is G * op(w) (the rounding's derivative is 0 almost everywhere), and the
    engine keeps the rounding step off the gradient path (nothing saved for a backward)."""
    from onnx import TensorProto, helper, numpy_helper

    from qatool.engine.model import Model
    from qatool.ir.graph import from_onnx
    from qatool.ir.roles import write_roles

    w = np.array([[0.3, -1.7, 2.5], [1.2, -0.4, 4.9]], np.float32)
    graph = helper.make_graph([helper.make_node(op, ["w"], ["r"]), helper.make_node("Mul", ["w", "r"], ["y"])], "g",
                              [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    g = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    write_roles(g, ["w"], [])
    model = Model(g, dtype=np.float64)
    on_path = {st.op.node.op_type: st.on_grad_path for st in model._steps}
    assert on_path == {op: False, "Mul": True}
    (y,) = model.forward({}, training=True)
    rounded = {"Floor": np.floor, "Ceil": np.ceil, "Round": np.round}[op](w.astype(np.float64))
    np.testing.assert_array_equal(y, w * rounded)
    G = np.arange(6, dtype=np.float64).reshape(2, 3) + 1
    np.testing.assert_array_equal(model.backward([G])["w"], G * rounded)


def test_sum_single_input_is_not_aliased():
    x = arr((2, 3))
    (y,) = run_engine("Sum", [x])
    y += 1
    assert not np.shares_memory(x, y)
