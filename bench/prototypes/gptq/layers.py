"""The layers qatool quantizes in a model (as `qatool calibrate` sees it): weight initializer, axis, input tensor."""
import numpy as np
from qatool.convert import normalize_proto
from qatool.ir.io import load_proto
from qatool.quant.config import QuantConfig
from qatool.quant.prepare import mark, weight_axes


def quantized_layers(path, weight_bits=4):
    g = normalize_proto(load_proto(path), for_training=True, free_batch=True).graph
    plan = mark(g, QuantConfig(weight_bits=weight_bits, activation_bits=8))
    out = []
    for L in plan.layers:
        n = L.node
        out.append(dict(name=n.name, op=n.op_type, weight=n.input(1), input=n.input(0), output=n.outputs[0],
                        axis=weight_axes(n)[0], bn=None if L.bn is None else L.bn.name, float_output=L.float_output,
                        attrs=dict(n.attrs), w=g.initializers[n.input(1)]))
    return out, g


if __name__ == "__main__":
    import sys, onnx
    from onnx import numpy_helper
    layers, g = quantized_layers(sys.argv[1])
    m = onnx.load(sys.argv[1])
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for L in layers:
        same = L["weight"] in inits and np.array_equal(inits[L["weight"]], L["w"])
        print(L["name"], L["op"], L["w"].shape, "axis", L["axis"], "bn", L["bn"], "tail" if L["float_output"] else "",
              {k: v for k, v in L["attrs"].items() if k in ("group", "pads", "strides", "dilations", "transB")},
              "in-file-identical" if same else "NOT IN FILE AS IS", L["input"])
