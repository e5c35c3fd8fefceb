"""Beyond the anchors, each against the plain method in the same run (qatool only; onnxruntime deploys):

- LSQ learned step sizes vs moving-average observers, at W4A4 and W2A8;
- distillation (teacher = the float model) vs plain cross-entropy, at W4A4;
- QAT initialised from calibrated ranges (--init calibrate) vs from the first batches, at W4A4;
- mixed precision (8/4-bit weights within a budget) vs uniform bits of about the same packed size.

Same data, steps, batch, lr and seed for every row. Writes bench/results/beyond_bench.json and prints a table;
docs/benchmarks.md quotes it.

    python bench/beyond_bench.py [--models lenet_bn,mobilenetv2_small] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from qatool import api
from qatool.quant.config import QuantConfig
from qatool.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_models" / "data" / "mnist"


def run(model: Path, quant: QuantConfig, train: TrainConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = api.train_quant(model, DATA / "train", tmp, val_data=DATA / "val", quant=quant, train=train, quiet=True,
                            echo=lambda s: None)
        weights = _packed_weight_bytes(Path(tmp) / "model_int8.onnx", r["config"]["quant"])
        return {"top1_float": r["val"]["top1_float"], "top1_int8": r["val"]["top1_int8"],
                "top1_qat": r["val"]["top1_qat"], "agreement": r["val"]["agreement_top1"],
                "ms_per_step": r["ms_per_step"], "packed_weight_bytes": weights,
                "layer_weight_bits": r["config"]["quant"]["layer_weight_bits"],
                "seconds": round(time.perf_counter() - t0, 1)}


def _packed_weight_bytes(int8_path: Path, quant: dict) -> int:
    """Bytes of the int8 weights if each were packed at its layer's bit width."""
    import onnx
    from onnx import numpy_helper

    total = 0
    for t in onnx.load(int8_path).graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.int8 and t.name.endswith("_quantized"):
            levels = int(np.abs(arr).max())  # a narrow b-bit grid reaches 2^(b-1) - 1
            bits = int(np.ceil(np.log2(levels + 1))) + 1
            total += arr.size * bits // 8
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet_bn,mobilenetv2_small")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        model = ROOT / "sample_models" / f"{name}.onnx"
        base = TrainConfig(steps=args.steps, batch_size=64, lr=1e-3, seed=0)

        def add(what, method, quant, train=base):
            print(f"{name} {what}: {method} ...", flush=True)
            result = run(model, quant, train)
            rows.append({"model": name, "comparison": what, "method": method, **result})
            print(f"  int8 top-1 {result['top1_int8']:.4f} (float {result['top1_float']:.4f}), "
                  f"{result['ms_per_step']:.1f} ms/step, packed weights {result['packed_weight_bytes']:,} B", flush=True)

        for wb, ab in ((4, 4), (2, 8)):
            q = dict(weight_bits=wb, activation_bits=ab)
            add(f"W{wb}A{ab} scales", "moving-average", QuantConfig(**q))
            add(f"W{wb}A{ab} scales", "lsq", QuantConfig(**q, scale_learning="lsq"))
        w4a4 = QuantConfig(weight_bits=4, activation_bits=4)
        add("W4A4 loss", "plain", w4a4)
        add("W4A4 loss", "distillation", w4a4, TrainConfig(**{**base.to_dict(), "teacher": str(model)}))
        add("W4A4 init", "observe", w4a4)
        add("W4A4 init", "calibrate", w4a4, TrainConfig(**{**base.to_dict(), "init": "calibrate"}))
        # mixed 8/4 within 18% of the float weight size vs uniform 6-bit weights (packed: 6/32 ~ 18.75%)
        add("weights ~18% of float", "uniform W6A8", QuantConfig(weight_bits=6, activation_bits=8))
        add("weights ~18% of float", "mixed W8/W4 A8", QuantConfig(weight_bits=8, activation_bits=8),
            TrainConfig(**{**base.to_dict(), "mixed_precision": "18%", "mixed_low_bits": 4}))
    out = {"benchmark": "beyond_bench", "steps": args.steps, "batch": 64, "lr": 1e-3,
           "machine": {"python": platform.python_version(), "numpy": np.__version__}, "rows": rows}
    path = ROOT / "bench" / "results" / "beyond_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'model':<20}{'comparison':<24}{'method':<18}{'int8 top-1':>11}{'float':>8}{'weights B':>11}")
    for r in rows:
        print(f"{r['model']:<20}{r['comparison']:<24}{r['method']:<18}{r['top1_int8']:>11.4f}{r['top1_float']:>8.4f}"
              f"{r['packed_weight_bytes']:>11,}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
