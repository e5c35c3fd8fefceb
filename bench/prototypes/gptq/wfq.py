"""Weight-only 4-bit model, run in float: every weight qatool quantizes replaced by qatool's own fake-quant of it
(weight_scales + round to nearest: exactly the dequantized int4 weight the int8 export would hold). Activations
stay float. usage: wfq.py IN.onnx OUT.onnx"""
import sys
import numpy as np, onnx
from onnx import numpy_helper
from layers import quantized_layers
from qatool.quant.qparams import weight_scales, weight_grid, fake_quant

src, dst = sys.argv[1], sys.argv[2]
g = weight_grid(4)
m = onnx.load(src)
idx = {t.name: i for i, t in enumerate(m.graph.initializer)}
layers, _ = quantized_layers(src)
for L in layers:
    w = L["w"].astype(np.float32)
    wq = fake_quant(w, weight_scales(w, L["axis"], g), 0, g, L["axis"])[0].astype(np.float32)
    m.graph.initializer[idx[L["weight"]]].CopyFrom(numpy_helper.from_array(wq, L["weight"]))
onnx.save(m, dst)
print("wrote", dst, len(layers), "layers")
