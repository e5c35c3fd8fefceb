"""Beyond the anchors, each against the plain method in the same run (qatool only; onnxruntime deploys):

- LSQ learned step sizes vs moving-average observers, at W4A4 and W2A8: LSQ at the run's lr (the default) and
  with the step sizes at their own learning rate (--scale-lr);
- distillation (teacher = the float model) vs plain cross-entropy, at W4A4;
- QAT initialised from calibrated ranges (--init calibrate) vs from the first batches, at W4A4 (first seed only);
- mixed precision (4/2-bit weights, A8) vs uniform 3-bit weights, at the same packed weight size (the mixed plan's
  budget is the uniform model's size; both sizes are printed).

Every row of one model and seed has the same data, steps, batch, lr and seed; the plain rows are shared (the
W4A4 moving-average run is also the plain-loss and the observe-init row). Seed variance is large on the
MobileNet-style model, so every comparison runs with each seed of --seeds; the table shows each seed and the
mean. Deployed accuracy = onnxruntime on the model_int8.onnx that train-quant writes. Writes
bench/results/beyond_bench.json and prints the table; docs/benchmarks.md quotes it.

    python bench/beyond_bench.py [--models lenet_bn,mobilenetv2_small] [--seeds 0,1] [--steps 200]
                                 [--scale-lr 0.01] [--comparisons "step sizes"] [--out FILE]
                                 [--render bench/results/beyond_bench.json] [--merge A.json B.json --out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from qatool import api
from qatool.quant.config import QuantConfig
from qatool.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_models" / "data" / "mnist"
LR, BATCH = 1e-3, 64


def layer_params(model: Path) -> dict[str, int]:
    """Weights per Conv/Gemm/MatMul node of the float model (by node name)."""
    import onnx

    graph = onnx.load(model).graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    return {n.name: sizes[n.input[1]] for n in graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in sizes}


def packed_weight_bytes(params: dict[str, int], quant: dict, layers: list[str]) -> int:
    """Bytes of the quantized layers' weights packed at each layer's bit width (the size --mixed-precision's
    budget counts; the int8 file may store sub-8-bit weights less densely)."""
    bits = {n: quant["layer_weight_bits"].get(n, quant["weight_bits"]) for n in layers}
    if quant.get("reduce_range"):
        bits = {n: min(b, 7) for n, b in bits.items()}
    return int(round(sum(params[n] * b / 8 for n, b in bits.items())))


def run(model: Path, quant: QuantConfig, train: TrainConfig, params: dict[str, int]) -> dict:
    """One train-quant run; a run that fails (training or export) is a row too, with its error and no top-1."""
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            r = api.train_quant(model, DATA / "train", tmp, val_data=DATA / "val", quant=quant, train=train,
                                quiet=True, echo=lambda s: None)
        except Exception as e:  # noqa: BLE001 - the benchmark reports it and goes on
            metrics = Path(tmp) / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            last = json.loads(lines[-1]) if lines else {}
            return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][-300:]}"
                             + (f" (after training step {last['step']}, loss {last['loss']})" if last else ""),
                    "top1_int8": None, "top1_float": None, "packed_weight_bytes": None, "ms_per_step": None,
                    "final_loss": last.get("loss"), "seconds": round(time.perf_counter() - t0, 1)}
        q = r["config"]["quant"]
        return {"top1_float": r["val"]["top1_float"], "top1_int8": r["val"]["top1_int8"],
                "top1_qat": r["val"]["top1_qat"], "agreement": r["val"]["agreement_top1"],
                "final_loss": r["final_loss"], "ms_per_step": r["ms_per_step"],
                "packed_weight_bytes": packed_weight_bytes(params, q, r["placement"]["quantized_layers"]),
                "int8_file_bytes": (Path(tmp) / "model_int8.onnx").stat().st_size,
                "layer_weight_bits": q["layer_weight_bits"], "seconds": round(time.perf_counter() - t0, 1),
                "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


def comparisons(model: Path, params: dict[str, int], seed: int, steps: int, scale_lr: float, first_seed: bool):
    """(comparison, method, QuantConfig, TrainConfig, shared-with) for one model and seed; the first method of
    each comparison is the plain one. `shared-with` names an earlier (comparison, method) with the same settings,
    whose result is reused instead of training again."""
    # the plain method of these comparisons: observed ranges (the default until the calibrated start became it) and
    # the last step (the val images are what is reported, so no checkpoint is selected on them)
    base = TrainConfig(steps=steps, batch_size=BATCH, lr=LR, seed=seed, init="observe", keep="last")

    def train(**kw) -> TrainConfig:
        return TrainConfig(**{**base.to_dict(), **kw})

    lsq = dict(scale_learning="lsq")
    out = []
    for wb, ab in ((4, 4), (2, 8)):
        q = dict(weight_bits=wb, activation_bits=ab)
        what = f"W{wb}A{ab} step sizes"
        out += [(what, "moving-average", QuantConfig(**q), base, None),
                (what, "lsq", QuantConfig(**q, **lsq), base, None),
                (what, f"lsq, scale-lr {scale_lr:g}", QuantConfig(**q, **lsq), train(scale_lr=scale_lr), None)]
    w4a4 = QuantConfig(weight_bits=4, activation_bits=4)
    plain = ("W4A4 step sizes", "moving-average")
    out += [("W4A4 loss", "plain", w4a4, base, plain),
            ("W4A4 loss", "distillation", w4a4, train(teacher=str(model)), None)]
    if first_seed:  # not one of the comparisons: one seed keeps the run under an hour
        out += [("W4A4 init", "observe", w4a4, base, plain),
                ("W4A4 init", "calibrate", w4a4, train(init="calibrate"), None)]
    uniform3 = int(round(sum(params.values()) * 3 / 8))
    what = "weights at uniform W3's size"
    out += [(what, "uniform W3A8", QuantConfig(weight_bits=3, activation_bits=8), base, None),
            (what, "mixed W4/W2 A8", QuantConfig(weight_bits=4, activation_bits=8),
             train(mixed_precision=str(uniform3), mixed_low_bits=2), None)]
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (model, comparison, method): int8 top-1 of each seed, the mean, and the mean's difference
    from the comparison's plain (first) method."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["comparison"], r["method"]), []).append(r)
    plain: dict[tuple, float] = {}
    out = []
    for (model, what, method), rs in groups.items():
        ok = [r for r in rs if r["top1_int8"] is not None]
        mean = float(np.mean([r["top1_int8"] for r in ok])) if len(ok) == len(rs) else None
        key = (model, what)
        plain.setdefault(key, mean)
        out.append({"model": model, "comparison": what, "method": method,
                    "top1_int8": {str(r["seed"]): r["top1_int8"] for r in rs},
                    "mean_top1_int8": None if mean is None else round(mean, 4),
                    "vs_plain_pp": None if mean is None or plain[key] is None else round((mean - plain[key]) * 100, 2),
                    "errors": {str(r["seed"]): r["error"] for r in rs if "error" in r},
                    "packed_weight_bytes": sorted({r["packed_weight_bytes"] for r in ok}),
                    "top1_float": ok[0]["top1_float"] if ok else None})
    return out


def render(result: dict) -> None:
    seeds = result["seeds"]
    head = (f"{'model':<19}{'comparison':<29}{'method':<24}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds)
            + f"{'mean':>9}{'vs plain':>10}{'float':>8}  packed weight B")
    print(head)
    def pct(v, width, digits=1):
        return f"{'failed' if v is None else format(v * 100, f'.{digits}f') + '%':>{width}}"

    for s in result["summary"]:
        cells = "".join(pct(s["top1_int8"][str(k)], 9) if str(k) in s["top1_int8"] else f"{'-':>9}" for k in seeds)
        sizes = "/".join(f"{b:,}" for b in s["packed_weight_bytes"])
        vs = "" if s["vs_plain_pp"] is None else f"{s['vs_plain_pp']:+.2f}"
        print(f"{s['model']:<19}{s['comparison']:<29}{s['method']:<24}{cells}{pct(s['mean_top1_int8'], 9, 2)}"
              f"{vs:>10}{pct(s['top1_float'], 8)}  {sizes}")
        for seed, err in s.get("errors", {}).items():
            print(f"    seed {seed} failed: {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet_bn,mobilenetv2_small")
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds (default 0,1)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--scale-lr", type=float, default=0.01,
                    help="learning rate of the LSQ step sizes in the 'lsq, scale-lr' rows (default 0.01)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "beyond_bench.json"))
    ap.add_argument("--comparisons", default="",
                    help="only the comparisons whose name contains one of these comma-separated words "
                         "(e.g. 'step sizes'); default all")
    ap.add_argument("--render", metavar="JSON", help="print the table of an earlier run and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine earlier runs (e.g. one process per seed) into --out, print the table and exit")
    args = ap.parse_args()
    if args.render:
        render(json.loads(Path(args.render).read_text()))
        return
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        merged = {**parts[0], "seeds": sorted({s for part in parts for s in part["seeds"]}),
                  "seconds": round(sum(part["seconds"] for part in parts), 1), "merged_from": args.merge,
                  "summary": summarize(rows), "rows": rows}
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
        render(merged)
        return
    wanted = [w.strip() for w in args.comparisons.split(",") if w.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []
    t_start = time.perf_counter()
    for name in args.models.split(","):
        model = ROOT / "sample_models" / f"{name}.onnx"
        params = layer_params(model)
        for seed in seeds:
            done: dict[tuple, dict] = {}
            for what, method, quant, train, shared in comparisons(model, params, seed, args.steps, args.scale_lr,
                                                                  seed == seeds[0]):
                if wanted and not any(w in what for w in wanted):
                    continue
                if shared is not None:
                    result = {**done[shared], "shared_with": " / ".join(shared)}
                else:
                    print(f"{name} seed {seed} {what}: {method} ...", flush=True)
                    result = run(model, quant, train, params)
                    if result["top1_int8"] is None:
                        print(f"  failed: {result['error']}", flush=True)
                    else:
                        print(f"  int8 top-1 {result['top1_int8']:.4f} (float {result['top1_float']:.4f}), "
                              f"{result['ms_per_step']:.1f} ms/step, {result['seconds']:.0f} s, packed weights "
                              f"{result['packed_weight_bytes']:,} B", flush=True)
                done[(what, method)] = result
                rows.append({"model": name, "seed": seed, "comparison": what, "method": method, **result})
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    out = {"benchmark": "beyond_bench", "steps": args.steps, "batch": BATCH, "lr": LR, "optimizer": "sgd",
           "momentum": 0.9, "scale_lr": args.scale_lr, "seeds": seeds, "commit": commit,
           "seconds": round(time.perf_counter() - t_start, 1), "comparisons": wanted or "all",
           "machine": {"python": platform.python_version(), "numpy": np.__version__,
                       "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
           "summary": summarize(rows), "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print()
    render(out)
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
