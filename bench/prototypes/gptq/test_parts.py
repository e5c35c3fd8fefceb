"""Sanity checks: im2col/MatMul columns reproduce each layer's output (ORT) minus bias; GPTQ with H = I is RTN."""
import numpy as np, onnx
from onnx import numpy_helper
from layers import quantized_layers
from gptq import ort_with_outputs, columns, as_rows, gptq_rows, FOLDED, GRID
from evalrec import lines
from qatool.quant.qparams import weight_scales, fake_quant

model = onnx.load(FOLDED)
layers, g = quantized_layers(FOLDED)
inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
nodes = {n.name: n for n in model.graph.node}
names = sorted({L["input"] for L in layers} | {L["output"] for L in layers})
s = ort_with_outputs(model, names)
p = lines("val", 1)[0][0]
outs = dict(zip(names, s.run(names, {"x": np.load(p)[None]})))
worst = 0
for L in layers:
    X = columns(outs[L["input"]], L)  # [G, K, P]
    rows = as_rows(L["w"], L)
    G = X.shape[0]
    R = rows.shape[0] // G
    Y = np.einsum("grk,gkp->grp", rows.reshape(G, R, -1), X).reshape(rows.shape[0], -1)  # [Cout, P]
    n = nodes[L["name"]]
    y = outs[L["output"]]
    if L["op"] == "Conv":
        ref = y[0].reshape(y.shape[1], -1)
        if len(n.input) > 2 and n.input[2]:
            ref = ref - inits[n.input[2]][:, None]
    else:
        ref = y.reshape(-1, y.shape[-1]).T
    e = np.abs(Y - ref).max() / np.abs(ref).max()
    worst = max(worst, e)
    if e > 1e-4:
        print("MISMATCH", L["name"], e)
print("columns reproduce all layer outputs, worst rel err", worst)
# GPTQ with identity H == RTN at the same scale
w = layers[12]["w"]
sc = weight_scales(w, 0, GRID)
rows = as_rows(w, layers[12])
q = gptq_rows(rows[None], np.eye(rows.shape[1])[None], sc[None])[0]
rtn = np.rint(as_rows(fake_quant(w, sc, 0, GRID, 0)[0], layers[12]) / sc[:, None])
print("GPTQ(H=I) == RTN:", np.array_equal(q, rtn))
