"""Does the int8 model qatool exported hold exactly GPTQ's integers and scales? usage: check_int8.py INT8.onnx Q.npz"""
import sys, numpy as np, onnx
from onnx import numpy_helper
m = onnx.load(sys.argv[1])
z = np.load(sys.argv[2])
inits = {t.name: t for t in m.graph.initializer}
dq = {n.input[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
bad_q = bad_s = n_ch = n_layers = 0
maxrel = 0.0
for k in z.files:
    if k.endswith("|scale"):
        continue
    qn = [n for n in inits if n in (k + "_quantized", k + "_quantized_int4")]
    assert len(qn) == 1, (k, qn)
    node = dq[k + "_quantized"]  # int4 storage: Cast(int4 -> int8) -> DequantizeLinear
    q = numpy_helper.to_array(inits[qn[0]]).astype(np.int8)
    s = numpy_helper.to_array(inits[node.input[1]])
    q0, s0 = z[k], z[k + "|scale"]
    axis = 0 if q.shape == q0.shape and q.ndim == 4 else 1
    rows = (lambda a: a.reshape(a.shape[0], -1)) if q.ndim == 4 else (lambda a: a.T)
    bad_q += int((rows(q) != rows(q0)).any(1).sum())
    bad_s += int((s != s0).sum())
    maxrel = max(maxrel, float(np.abs(s / s0 - 1).max()))
    n_ch += s.size
    n_layers += 1
print(f"{n_layers} layers, {n_ch} channels: integers differ in {bad_q} channels, scales differ in {bad_s} "
      f"(max rel {maxrel:.2g})")
