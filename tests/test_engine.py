"""The engine's public API on whole graphs: eval == onnxruntime, gradients == finite differences, BN/Dropout."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qatool.engine
from helpers import assert_close_rel, ort_run
from qatool.errors import ModelError, UnsupportedOpError

F = onnx.TensorProto.FLOAT


def small_net(dropout=0.5, seed=0) -> onnx.ModelProto:
    """Conv -> BN -> Clip(0,6) -> residual Add -> GlobalAveragePool -> Flatten -> Dropout -> Gemm."""
    rng = np.random.default_rng(seed)
    arr = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    inits = [
        arr(rng.standard_normal((4, 2, 3, 3)) * 0.4, "w1"), arr(rng.standard_normal(4) * 0.1, "b1"),
        arr(rng.uniform(0.5, 1.5, 4), "g"), arr(rng.normal(0, 0.1, 4), "beta"),
        arr(rng.normal(0, 0.1, 4), "mean"), arr(rng.uniform(0.5, 1.5, 4), "var"),
        arr(rng.standard_normal((4, 4, 1, 1)) * 0.5, "w2"),
        arr(rng.standard_normal((3, 4)) * 0.5, "fc_w"), arr(rng.standard_normal(3) * 0.1, "fc_b"),
        arr(0.0, "zero"), arr(6.0, "six"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn1"], momentum=0.8,
                         name="bn1"),
        helper.make_node("Clip", ["bn1", "zero", "six"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="add"),
        helper.make_node("GlobalAveragePool", ["res"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Dropout", ["flat", "ratio"], ["drop"], name="dropout"),
        helper.make_node("Gemm", ["drop", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    inits.append(arr(dropout, "ratio"))
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", F, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("logits", F, ["N", 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


X = np.random.default_rng(1).standard_normal((3, 2, 5, 5)).astype(np.float32)


def test_eval_matches_onnxruntime():
    proto = small_net()
    model = qatool.engine.load(proto)
    assert sorted(model.params) == sorted(["w1", "b1", "g", "beta", "w2", "fc_w", "fc_b"])
    assert sorted(model.state) == ["mean", "var"]
    (got,) = model.forward({"x": X}, training=False)
    assert got.dtype == np.float32
    assert_close_rel(got, ort_run(proto, {"x": X})[0], 1e-5, "engine vs onnxruntime")


@pytest.mark.parametrize("training", [False, True])
def test_whole_graph_gradients_match_finite_differences(training):
    """d(sum(logits * G))/d(param) for every parameter, in float64, eval and training mode (Dropout off)."""
    model = qatool.engine.load(small_net(dropout=0.0), dtype=np.float64)
    x = X.astype(np.float64)
    G = np.random.default_rng(2).standard_normal((3, 3))
    state0 = {k: v.copy() for k, v in model.state.items()}

    def loss():
        for k, v in state0.items():  # training mode updates the running statistics: undo that
            model.state[k][...] = v
        return float(np.sum(model.forward({"x": x}, training=training, grad=True)[0] * G))

    loss()
    grads = model.backward([G])
    rng = np.random.default_rng(3)
    eps = 1e-6
    for name, p in model.params.items():
        for j in rng.choice(p.size, size=min(p.size, 8), replace=False):
            old = p.reshape(-1)[j]
            p.reshape(-1)[j] = old + eps
            up = loss()
            p.reshape(-1)[j] = old - eps
            down = loss()
            p.reshape(-1)[j] = old
            num = (up - down) / (2 * eps)
            assert abs(num - grads[name].reshape(-1)[j]) <= 1e-6 + 1e-5 * abs(num), (name, j)


def test_training_mode_updates_bn_running_statistics():
    model = qatool.engine.load(small_net())
    mean0, var0 = model.state["mean"].copy(), model.state["var"].copy()
    model.forward({"x": X}, training=True)
    c1 = _conv1(model, X)
    batch_mean = c1.mean(axis=(0, 2, 3))
    batch_var = c1.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(model.state["mean"], 0.8 * mean0 + 0.2 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.state["var"], 0.8 * var0 + 0.2 * batch_var, rtol=1e-4, atol=1e-6)
    # The graph handed to save() carries the updated statistics.
    assert model.to_graph().initializers["mean"] is model.state["mean"]


def _conv1(model, x):
    w, b = model.params["w1"].astype(np.float64), model.params["b1"].astype(np.float64)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def test_dropout_is_seeded_and_only_active_in_training():
    a = qatool.engine.load(small_net(), seed=7)
    b = qatool.engine.load(small_net(), seed=7)
    c = qatool.engine.load(small_net(), seed=8)
    ya = a.forward({"x": X}, training=True)[0]
    np.testing.assert_array_equal(ya, b.forward({"x": X}, training=True)[0])
    assert not np.array_equal(ya, c.forward({"x": X}, training=True)[0])
    e1, e2 = a.forward({"x": X})[0], a.forward({"x": X})[0]
    np.testing.assert_array_equal(e1, e2)


def test_params_are_live_arrays():
    model = qatool.engine.load(small_net())
    before = model.forward({"x": X})[0].copy()
    model.params["fc_b"] += 1.0
    np.testing.assert_allclose(model.forward({"x": X})[0], before + 1.0, rtol=1e-5, atol=1e-5)


def test_save_roundtrip(tmp_path):
    model = qatool.engine.load(small_net())
    model.params["fc_b"] += 0.5
    model.save(tmp_path / "m.onnx")
    again = qatool.engine.load(tmp_path / "m.onnx")
    np.testing.assert_allclose(again.forward({"x": X})[0], model.forward({"x": X})[0], rtol=1e-6)


def test_unsupported_op_is_named():
    graph = helper.make_graph([helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i", name="mystery")],
                              "g", [helper.make_tensor_value_info("x", F, [2, 2])],
                              [helper.make_tensor_value_info("y", F, [2])])
    with pytest.raises(UnsupportedOpError, match="'Einsum'.*'mystery'.*supported ops: .*Conv"):
        qatool.engine.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))


def test_missing_feed_and_backward_without_forward():
    model = qatool.engine.load(small_net())
    with pytest.raises(ModelError, match="missing input 'x'"):
        model.forward({})
    with pytest.raises(ModelError, match="forward"):
        model.backward([np.zeros((3, 3), np.float32)])


def test_constant_held_bn_statistics_train_in_place():
    """BN statistics held by Constant nodes (as Paddle exports them) become writable arrays of the engine's own:
    a training-mode forward updates them instead of refusing read-only views of the proto's buffer."""
    proto = small_net()
    g = proto.graph
    for name in ("mean", "var"):
        init = next(t for t in g.initializer if t.name == name)
        g.node.insert(0, helper.make_node("Constant", [], [name], value=init, name=f"const_{name}"))
        g.initializer.remove(init)
    model = qatool.engine.load(proto)
    before = model.state["mean"].copy()
    model.forward({"x": X}, training=True)
    assert not np.array_equal(model.state["mean"], before)


def test_model_copies_read_only_arrays():
    from qatool.convert import normalize
    from qatool.ir.graph import from_onnx

    graph = normalize(from_onnx(small_net()), for_training=True).graph
    frozen = {}
    for name in ("mean", "var", "w1"):
        arr = graph.initializers[name]
        arr.flags.writeable = False
        frozen[name] = arr
    model = qatool.engine.Model(graph)
    model.forward({"x": X}, training=True)
    assert not np.array_equal(model.state["mean"], frozen["mean"])
    assert all(model.graph.initializers[k].flags.writeable for k in frozen)


def _saved_arrays(model) -> list[str]:
    """(node, attribute) of every array an op holds beyond its configuration."""
    return [f"{s.op.node.name}.{k}" for s in model._steps for k, v in vars(s.op).items()
            if k not in s.op._static and isinstance(v, np.ndarray)]


def test_an_eval_forward_keeps_nothing_for_a_backward():
    model = qatool.engine.load(small_net())
    model.forward({"x": X}, training=True)
    assert _saved_arrays(model)  # training: what the backward needs
    model.forward({"x": X})
    assert _saved_arrays(model) == []
    with pytest.raises(ModelError, match="grad=True"):
        model.backward([np.zeros((3, 3), np.float32)])
    model.forward({"x": X}, grad=True)  # asked for: kept, and the backward runs
    assert set(model.backward([np.ones((3, 3), np.float32)])) == set(model.params)


def test_intermediates_are_freed_after_their_last_reader():
    """A chain of 24 elementwise ops on a 4 MB tensor peaks at a few tensors, not 24; training mode too for the
    ops no gradient flows through (here: all of them, the graph has no parameters)."""
    import tracemalloc

    n = 24
    nodes = [helper.make_node("Relu" if i % 2 else "Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes[0].input[0] = "x"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", F, [1024, 1024])],
                              [helper.make_tensor_value_info(f"t{n}", F, [1024, 1024])])
    model = qatool.engine.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    for training in (False, True):
        tracemalloc.start()
        model.forward({"x": x}, training=training)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * x.nbytes, (training, peak / x.nbytes)


def test_a_forward_asked_for_some_values_returns_those():
    model = qatool.engine.load(small_net())
    gap, logits = model.forward({"x": X}, outputs=["gap", "logits"])
    assert gap.shape == (3, 4, 1, 1) and logits.shape == (3, 3)


@pytest.fixture
def memory_budget():
    """The engine's global evaluation memory budget, restored after the test whatever happens in it."""
    from qatool.runtime import backends

    saved = dict(backends._budget)
    yield backends
    backends._budget.clear()
    backends._budget.update(saved)


def test_evaluation_batches_follow_the_memory_budget(lenet, digits, memory_budget):
    """The engine's evaluation batch comes from the intermediate bytes of one image and the budget (qatool
    --max-memory); the logits do not depend on it."""
    from qatool.data.images import ImageDataset
    from qatool.data.preprocess import resolve_preprocess

    model = qatool.engine.load(lenet)
    data = ImageDataset.open(digits[1]).load(resolve_preprocess(model.graph))
    x, _ = data.batch(np.arange(1))
    per_image = model.activation_bytes({model.input_names[0]: x})
    assert 0 < per_image < 1024**2
    assert model.activation_bytes({model.input_names[0]: np.repeat(x, 8, axis=0)}) >= 7 * per_image
    backends = memory_budget
    full = backends.engine_logits(model, data)
    backends.set_memory_budget(3 * per_image)
    assert backends.engine_batch_size(model, data) == 3
    np.testing.assert_allclose(backends.engine_logits(model, data), full, rtol=1e-5, atol=1e-6)


def test_max_memory_option(lenet, tmp_path, memory_budget):
    from click.testing import CliRunner

    from qatool.cli import cli

    backends = memory_budget

    res = CliRunner().invoke(cli, ["--max-memory", "lots", "convert", str(lenet), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code != 0 and "cannot read the size 'lots'" in str(res.exception)
    res = CliRunner().invoke(cli, ["--max-memory", "64MB", "convert", str(lenet), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 0 and backends._budget["bytes"] == 64 * 10**6


class _FakeLibc:
    """A C library that records mallopt calls (glibc's has gnu_get_libc_version; musl's has not)."""

    def __init__(self, glibc=True, accepts=True):
        self.calls = []
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"

        def mallopt(param, value):  # a function: the code sets argtypes / restype on it, as on a ctypes one
            self.calls.append((param, value))
            return 1 if accepts else 0

        self.mallopt = mallopt


@pytest.mark.parametrize("glibc, accepts, platform, active", [
    (True, True, "linux", True), (True, False, "linux", False), (False, True, "linux", False),
    (True, True, "darwin", False)])
def test_keep_freed_memory_turns_off_mmap_and_trimming_once(monkeypatch, glibc, accepts, platform, active):
    """On glibc: mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1), once; nothing elsewhere. (Whether the
    pages are then reused without faults is a property of the machine's allocator: bench/engine_speed.py's
    territory, not a unit test's.)"""
    from qatool.engine import allocator

    libc = _FakeLibc(glibc, accepts)
    monkeypatch.setattr(allocator, "_active", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(allocator.sys, "platform", platform)
    assert allocator.keep_freed_memory() is active
    expected = [(-4, 0), (-1, -1)] if accepts else [(-4, 0)]
    assert libc.calls == (expected if glibc and platform == "linux" else [])
    libc.calls.clear()
    assert allocator.keep_freed_memory() is active  # idempotent: once in effect, no second call
    assert libc.calls == ([] if active else (expected if glibc and platform == "linux" else []))


def _two_bn_model(shared: bool) -> onnx.ModelProto:
    """x -> Conv -> BN -> Conv -> BN. shared: every BN parameter and statistic behind an Identity of one of two
    initializers (ones, zeros), as PyTorch's exporter writes a fresh model after merging equal initializers."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["y1"]),
             helper.make_node("Conv", ["y1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["y"])]
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    if shared:
        inits += [numpy_helper.from_array(ones, "ones"), numpy_helper.from_array(zeros, "zeros")]
        nodes = [helper.make_node("Identity", ["ones" if n[0] in "gv" else "zeros"], [n])
                 for n in ("g1", "b1", "m1", "v1", "g2", "b2", "m2", "v2")] + nodes
    else:
        inits += [numpy_helper.from_array(ones if n[0] in "gv" else zeros, n)
                  for n in ("g1", "b1", "m1", "v1", "g2", "b2", "m2", "v2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_initializers_merged_by_the_exporter_train_as_separate_arrays():
    """A BN's running variance updated in place must not rewrite the scale or the statistics of another BN that
    shared its initializer (ResNet50 from torch.onnx.export trained with batch statistics 3 units off PyTorch's
    at the first BN, and diverged)."""
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 5)).astype(np.float32) * 3 + 1
    models = {shared: qatool.engine.load(_two_bn_model(shared)) for shared in (False, True)}
    for _ in range(2):  # the second forward sees the running statistics the first one wrote
        want, got = (models[s].forward({"x": x}, training=True)[0] for s in (False, True))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    sep, merged = models[False], models[True]
    for name in ("g1", "b1", "g2", "b2"):
        np.testing.assert_array_equal(merged.params[name], sep.params[name])
    for name in ("m1", "v1", "m2", "v2"):
        np.testing.assert_allclose(merged.state[name], sep.state[name], rtol=1e-6)
    assert not np.allclose(merged.state["v1"], merged.state["v2"])  # each BN has its own statistics
