"""Channel equalisation (qatool.quant.equalize): which groups it finds, that the equalised float model computes
what the original does, and that the 4-bit quantized error it measures falls."""

import numpy as np
import pytest

from qatool.engine.model import Model
from qatool.ir.graph import Graph, Node, ValueInfo
from qatool.quant.equalize import equalize, find_groups


class _Arrays:
    """The duck type of a data set the statistics read: groups of one input shape, batches by index."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.groups = [np.arange(len(x))]

    def __len__(self):
        return len(self.x)

    def batch(self, index):
        return self.x[index], None

    def item_shape(self, i):
        return self.x.shape[1:]


def _conv(rng, cout, cin, k=1, outlier: int | None = None) -> np.ndarray:
    w = rng.normal(0, 0.1, (cout, cin, k, k)).astype(np.float32)
    if outlier is not None:  # one input channel's column far larger than the rest (PP-OCRv4 rec's Conv.27) ...
        w[:, outlier] *= 30
    return w


OUTLIER = 1 / 30  # ... because the layer upstream makes that channel 30 times smaller than the rest


def _graph(nodes, inits, out="y", shape=(None, 4, 6, 6)) -> Graph:
    return Graph(nodes, [ValueInfo("x", shape=list(shape))], [ValueInfo(out)], inits, opset=13)


def _run(g: Graph, x: np.ndarray) -> list[np.ndarray]:
    return Model(g).forward({"x": x}, training=False)


def _check_same_and_flatter(g, x, layer="c2", bits=4, flatter=2.0):
    """Equalise at 4 bits; the function is kept, `layer`'s columns are evened out (the spread of its rows falls
    `flatter` times), the measured error falls."""
    before = g.initializers[next(n for n in g.nodes if n.name == layer).input(1)].copy()
    out, report = equalize(g, {n.name: bits for n in g.nodes if n.op_type in ("Conv", "MatMul")}, 8, False,
                           _Arrays(x), np.arange(len(x)))
    assert report.changed and not report.undone, report.to_dict()
    for a, b in zip(_run(g, x), _run(out, x)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    after = out.initializers[next(n for n in out.nodes if n.name == layer).input(1)]

    def spread(w):  # how far the largest column of each row stands above the row's typical column
        w = w.T if w.ndim == 2 else w  # a MatMul's [K, M] weight: its rows are the columns of W^T
        cols = np.abs(w).reshape(w.shape[0], w.shape[1], -1).max(axis=2)
        return float(np.median(cols.max(axis=1) / np.median(cols, axis=1)))

    assert spread(after) < spread(before) / flatter, report.to_dict()
    assert all(c["error_after"] < c["error_before"] for c in report.changed)
    return out, report


def test_conv_relu_conv_moves_the_outlier_column_into_the_first_conv(rng):
    x = rng.normal(0, 1, (16, 4, 6, 6)).astype(np.float32)
    inits = {"w1": _conv(rng, 8, 4, 3), "b1": rng.normal(0, 0.1, 8).astype(np.float32),
             "w2": _conv(rng, 16, 8, outlier=3), "b2": np.zeros(16, np.float32)}
    inits["w1"][3] *= OUTLIER
    inits["b1"][3] *= OUTLIER
    g = _graph([Node("Conv", ["x", "w1", "b1"], ["h"], "c1", {"pads": [1, 1, 1, 1]}),
                Node("Relu", ["h"], ["r"], "relu"),
                Node("Conv", ["r", "w2", "b2"], ["y"], "c2")], inits)
    out, report = _check_same_and_flatter(g, x)
    assert report.changed[0]["absorber"] == "c1" and report.changed[0]["consumers"] == ["c2"]
    # the first conv's output channel 3 carries the scale (weights and bias)
    t = out.initializers["w1"][3] / inits["w1"][3]
    assert np.allclose(t, t.flat[0]) and t.flat[0] > 1
    np.testing.assert_allclose(out.initializers["b1"][3], inits["b1"][3] * t.flat[0], rtol=1e-5)


def test_batchnorm_absorbs_through_relu_and_maxpool(rng):
    """Conv -> BatchNormalization -> Relu -> MaxPool -> Conv: BN's gamma and beta take the scale (the first conv's
    weight, folded with BN when quantized, is per output channel: its integers do not change)."""
    x = rng.normal(0, 1, (16, 4, 6, 6)).astype(np.float32)
    inits = {"w1": _conv(rng, 8, 4), "g": rng.uniform(0.5, 1.5, 8).astype(np.float32),
             "b": rng.normal(0, 0.1, 8).astype(np.float32), "m": rng.normal(0, 0.1, 8).astype(np.float32),
             "v": rng.uniform(0.5, 1.5, 8).astype(np.float32), "w2": _conv(rng, 16, 8, k=3, outlier=2)}
    inits["g"][2] *= OUTLIER
    inits["b"][2] *= OUTLIER
    g = _graph([Node("Conv", ["x", "w1"], ["h"], "c1"),
                Node("BatchNormalization", ["h", "g", "b", "m", "v"], ["n"], "bn"),
                Node("Relu", ["n"], ["r"], "relu"), Node("MaxPool", ["r"], ["p"], "pool", {"kernel_shape": [2, 2]}),
                Node("Conv", ["p", "w2"], ["y"], "c2", {"pads": [1, 1, 1, 1]})], inits)
    out, report = _check_same_and_flatter(g, x)
    assert report.changed[0]["absorber"] == "bn"
    np.testing.assert_array_equal(out.initializers["w1"], inits["w1"])
    np.testing.assert_allclose(out.initializers["b"] / inits["b"], out.initializers["g"] / inits["g"], rtol=1e-5)


def test_a_squeeze_excitation_gate_is_equalised_on_both_of_its_readers(rng):
    """x * gate(x): the scale passes the gate's Mul; the squeeze conv that reads x (through the global pool) takes
    it too, so the gate itself does not change."""
    x = rng.normal(0, 1, (16, 4, 6, 6)).astype(np.float32)
    inits = {"w1": _conv(rng, 8, 4), "wsq": _conv(rng, 2, 8), "wex": _conv(rng, 8, 2),
             "w2": _conv(rng, 16, 8, outlier=1)}
    inits["w1"][1] *= OUTLIER
    inits["wsq"][:, 1] /= OUTLIER  # the squeeze reads the small channel at the same weight as the others
    g = _graph([Node("Conv", ["x", "w1"], ["h"], "c1"), Node("Relu", ["h"], ["m"], "relu1"),
                Node("GlobalAveragePool", ["m"], ["p"], "gap"), Node("Conv", ["p", "wsq"], ["q"], "squeeze"),
                Node("Relu", ["q"], ["qr"], "relu"), Node("Conv", ["qr", "wex"], ["e"], "expand"),
                Node("Sigmoid", ["e"], ["gate"], "gate"), Node("Mul", ["m", "gate"], ["r"], "scale"),
                Node("Conv", ["r", "w2"], ["y"], "c2")], inits)
    groups = find_groups(g, {"c1", "squeeze", "expand", "c2"})
    mine = next(gr for gr in groups if gr.absorber.name == "c1")
    assert sorted(c.name for c in mine.consumers) == ["c2", "squeeze"]
    _check_same_and_flatter(g, x)


def test_a_matmul_absorbs_for_the_next_matmul(rng):
    """[N, T, C] -> MatMul -> Relu -> x 0.5 -> MatMul [C, M] (a transformer's MLP): the first MatMul's output columns
    take the scale; the Mul by a constant on the way carries it and keeps its constant."""
    x = rng.normal(0, 1, (16, 5, 8)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (12, 6)).astype(np.float32)
    w2[4] *= 30
    inits = {"w1": rng.normal(0, 0.3, (8, 12)).astype(np.float32), "half": np.array(0.5, np.float32), "w2": w2}
    inits["w1"][:, 4] *= OUTLIER
    g = _graph([Node("MatMul", ["x", "w1"], ["h"], "c1"), Node("Relu", ["h"], ["r"], "relu"),
                Node("Mul", ["r", "half"], ["m"], "mul"), Node("MatMul", ["m", "w2"], ["y"], "c2")], inits,
               shape=(None, 5, 8))
    out, report = _check_same_and_flatter(g, x)
    assert report.changed[0]["absorber"] == "c1" and float(out.initializers["half"]) == 0.5


@pytest.mark.parametrize("case", ["residual", "output", "sigmoid", "affine"])
def test_what_the_scale_cannot_pass_leaves_the_group_alone(rng, case):
    """A residual Add (the other branch does not carry the scale), a graph output, a nonlinearity that does not
    commute with a positive scale, or an Add of a constant (its constant would become one value per channel,
    quantized per tensor) between absorber and consumer: no group."""
    inits = {"w1": _conv(rng, 4, 4), "w2": _conv(rng, 4, 4, outlier=0), "c": np.array([0.3], np.float32)}
    mid = {"residual": Node("Add", ["h", "x"], ["r"], "add"), "output": Node("Relu", ["h"], ["r"], "relu"),
           "sigmoid": Node("Sigmoid", ["h"], ["r"], "sig"), "affine": Node("Add", ["h", "c"], ["r"], "add")}[case]
    g = _graph([Node("Conv", ["x", "w1"], ["h"], "c1"), mid, Node("Conv", ["r", "w2"], ["y"], "c2")], inits)
    if case == "output":
        g.outputs.append(ValueInfo("r"))
    assert find_groups(g, {"c1", "c2"}) == []


def test_8_bit_layers_are_not_equalised(rng):
    x = rng.normal(0, 1, (8, 4, 6, 6)).astype(np.float32)
    inits = {"w1": _conv(rng, 8, 4), "w2": _conv(rng, 16, 8, outlier=3)}
    g = _graph([Node("Conv", ["x", "w1"], ["h"], "c1"), Node("Relu", ["h"], ["r"], "relu"),
                Node("Conv", ["r", "w2"], ["y"], "c2")], inits)
    out, report = equalize(g, {"c1": 8, "c2": 8}, 8, False, _Arrays(x), np.arange(8))
    assert out is g and report.groups == 0


def test_a_change_that_moves_the_float_outputs_is_left_out(rng, monkeypatch):
    """The check after the change compares the float outputs; where they move (here: a tolerance below zero makes
    any difference count), the original graph is returned and the report says so."""
    from qatool.quant import equalize as eq

    monkeypatch.setattr(eq, "CHECK_TOLERANCE", -1.0)
    x = rng.normal(0, 1, (16, 4, 6, 6)).astype(np.float32)
    inits = {"w1": _conv(rng, 8, 4), "w2": _conv(rng, 16, 8, outlier=3)}
    inits["w1"][3] *= OUTLIER
    g = _graph([Node("Conv", ["x", "w1"], ["h"], "c1"), Node("Relu", ["h"], ["r"], "relu"),
                Node("Conv", ["r", "w2"], ["y"], "c2")], inits)
    out, report = equalize(g, {"c1": 4, "c2": 4}, 8, False, _Arrays(x), np.arange(16))
    assert out is g and report.undone == ["c1"] and not report.changed
    assert report.summary().startswith("channel equalisation left out")


def test_calibrate_and_train_quant_equalise_when_asked(lenet, digits, tmp_path):
    """--equalize on LeNet at W4A8: calibrate says what it equalised and its int8 model is what the simulation
    computes; train-quant records it in report.json (valid against its schema); neither does it unasked on a
    classifier with labels."""
    from click.testing import CliRunner

    from qatool import api
    from qatool.cli_quant import calibrate_command
    from qatool.quant.config import QuantConfig
    from qatool.train.config import TrainConfig

    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(calibrate_command, [str(lenet), "--data", str(digits[0]), "-o", str(out), "--images", "64",
                                               "--weight-bits", "4", "--equalize", "--val-data", str(digits[1])])
    assert r.exit_code == 0, r.output
    assert "channel equalisation: " in r.output and out.is_file()
    report = api.calibrate(lenet, digits[0], tmp_path / "e.onnx", images=64, val_data=digits[1],
                           quant=QuantConfig(weight_bits=4, equalize=True))
    assert report["equalize"]["groups"] >= 1 and report["export"]["agreement"]["agreement_top1"] >= 0.99
    assert report["top1_int8"] >= report["top1_float"] - 0.05
    assert api.calibrate(lenet, digits[0], tmp_path / "n.onnx", images=64, verify=False,
                         quant=QuantConfig(weight_bits=4))["equalize"] is None
    report = api.train_quant(lenet, digits[0], tmp_path / "qat", train=TrainConfig(steps=1), quiet=True,
                             quant=QuantConfig(weight_bits=4, equalize=True))
    assert report["equalize"]["groups"] >= 1 and report["config"]["quant"]["equalize"] is True
