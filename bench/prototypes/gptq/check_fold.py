"""Check folded.onnx (qatool convert, BN folded) against the original: ORT outputs, and that the weights qatool
quantizes at calibrate time (original model: WeightQuant folds BN in float32) equal the folded file's weights."""
import numpy as np, onnx
from onnx import numpy_helper
from layers import quantized_layers
from evalrec import FLOAT, session, lines
from qatool.quant.ops import bn_fold_factor
from qatool.quant.qparams import weight_scales, weight_grid, channel_shape

items = lines("val", 30)
a, b = session(FLOAT), session("folded.onnx")
worst = 0.0
for p, _ in items:
    x = np.load(p)[None]
    ya, yb = a.run(None, {"x": x})[0], b.run(None, {"x": x})[0]
    worst = max(worst, float(np.abs(ya - yb).max()))
print(f"ORT max |orig - folded| over 30 val lines (softmax probs): {worst:.3g}")

orig, g = quantized_layers(FLOAT)
fold, _ = quantized_layers("folded.onnx")
grid = weight_grid(4)
for lo, lf in zip(orig, fold):
    assert lo["name"] == lf["name"] and lo["axis"] == lf["axis"]
    w = lo["w"].astype(np.float32)
    if lo["bn"] is not None:
        bn = [n for n in g.nodes if n.name == lo["bn"]][0]
        k = bn_fold_factor(g.initializers[bn.input(1)].astype(np.float32), g.initializers[bn.input(4)].astype(np.float32),
                           float(bn.attrs.get("epsilon", 1e-5)))
        w = w * k.reshape(channel_shape(w.ndim, lo["axis"]))
    d = np.abs(w - lf["w"]).max() / np.abs(w).max()
    so, sf = weight_scales(w, lo["axis"], grid), weight_scales(lf["w"], lf["axis"], grid)
    if lo["bn"] is not None or d > 0:
        print(lo["name"], "bn" if lo["bn"] else "", f"max rel weight diff {d:.2g}",
              f"scales differ in {int((so != sf).sum())}/{so.size} channels, max rel {np.abs(so/sf-1).max():.2g}")
