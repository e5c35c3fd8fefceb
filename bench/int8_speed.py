"""Int8 speed benchmark (issue 15): is qatool's int8 model faster than the float model it came from, and than
onnxruntime's own `quantize_static` model of the same float model?

    .venv/bin/python bench/int8_speed.py                          # the real-model benchmark's models
    .venv/bin/python bench/int8_speed.py --models docori --render
    .venv/bin/python bench/int8_speed.py --no-run --render        # the Markdown table of --out again

For each model of bench/real_models.py (its cache, bench/.cache/real, built by bench/real_data.py) three ONNX files
are compared:
- float: the model as its authors shipped it;
- qatool int8: the W8A8 model of real_models.py's train-quant run with seed 0 (runs/MODEL/train_w8a8_s0/
  model_int8.onnx), else its `qatool calibrate` W8A8 model, else (`--make`) a fresh `qatool calibrate` with the
  --qatool given; the placement (what is quantized) is the same for both, only the scales differ;
- onnxruntime int8: real_models.py's quantize_static W8A8 (QDQ, per-channel, MinMax) model of the same float model
  (runs/MODEL/ort_ptq_w8a8.onnx).
The sample models (lenet_bn, mobilenetv2_small) are measured the same way, with qat_bench.py's quantize_static
W8A8 model and a fresh `qatool calibrate` W8A8 model, both calibrated on the sample training digits.

Per file, from onnxruntime's optimised graph (ORT_ENABLE_EXTENDED, as `optimized_model_filepath` writes it):
the integer kernels (QLinear*, QGemm, MatMulIntegerToFloat) and every float op left between a DequantizeLinear and
a QuantizeLinear. Latency: onnxruntime CPU with --threads intra-op threads, batch 1 and batch 64 (random inputs
of the model's size), in two passes of half the ROUNDS each: the sessions are loaded, then every round times
every model once in turn (interleaved, so a burst of load on this shared machine hits all of them; each round
starts with the next model, so no model always runs right after the same other one); the second pass loads the
sessions in the reverse order (the session loaded last tends to run a few per cent faster here). Median per model
over both passes. quantize_static's model is timed twice, in two sessions: the difference of one file against
itself is this run's noise, shown beside the comparison. Where qatool's optimised graph is quantize_static's op
for op (the same kernels, the same weight and bias types), the two latencies can only differ by noise; the JSON
and the table say so. Targets (--render): integer kernels >= quantize_static's; int8 latency <= quantize_static's
at batch 64; int8 <= 0.8 x float at batch 64 wherever quantize_static's is below float.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402

from qatool.export.latency import interleaved_ms  # noqa: E402

ROOT = real_data.ROOT
DEFAULT_OUT = ROOT / "bench" / "results" / "int8_speed.json"
SAMPLE_MODELS = ["lenet_bn", "mobilenetv2_small"]
MODELS = ["textdir", "docori", "digits-shift", "orinet", *SAMPLE_MODELS]
ROUNDS = {1: 60, 64: 16}
INTEGER = ("QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger")


def optimised(path: Path) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def graph_counts(path: Path) -> dict:
    m = optimised(path)
    producers = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    kernels: dict[str, int] = {}
    between: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type.startswith("QLinear") or n.op_type in INTEGER:
            kernels[n.op_type] = kernels.get(n.op_type, 0) + 1
        elif n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            reads = any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)
            feeds = any(u.op_type == "QuantizeLinear" for o in n.output for u in consumers.get(o, []))
            if reads and feeds:
                between[n.op_type] = between.get(n.op_type, 0) + 1
    initializers = {i.name: i.data_type for i in m.graph.initializer}
    ops = [[n.op_type, n.domain, [initializers.get(i, 0) for i in n.input]] for n in m.graph.node]
    return {"ops": ops, "integer_kernels": sum(kernels.values()), "kernels": kernels, "float_between_qdq": between,
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in m.graph.node),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in m.graph.node)}


def latency(paths: dict[str, Path], shape: list[int], threads: int) -> dict[str, dict[int, float]]:
    """Median ms per model and batch: qatool's own interleaved timing (both loading orders, rotating rounds)."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal([b, *shape[1:]]).astype(np.float32) for b in ROUNDS}
    return interleaved_ms(paths, inputs, ROUNDS, threads)


def files(spec, runs: Path, args) -> dict[str, Path]:
    work = runs / spec.name
    qatool = next((p for p in (work / "train_w8a8_s0" / "model_int8.onnx", work / "calibrate_w8a8.onnx")
                   if p.exists()), None)
    if qatool is None or args.make:
        qatool = work / "speed_calibrate_w8a8.onnx"
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([args.qatool, "calibrate", spec.onnx, "--data", spec.train, "-o", str(qatool), "--no-verify",
                        *spec.qatool_flags()], check=True, stdout=subprocess.DEVNULL)
    ort_ptq = work / "ort_ptq_w8a8.onnx"
    if not ort_ptq.exists():
        raise SystemExit(f"{ort_ptq} is missing: run bench/real_models.py --models {spec.name} --rows ort-ptq-w8a8")
    return {"float": Path(spec.onnx), "qatool": qatool, "ort": ort_ptq}


def sample_files(name: str, work: Path, args) -> tuple[dict[str, Path], list[int]]:
    """A sample model (sample_models/NAME.onnx): qat_bench.py's quantize_static W8A8 model and a fresh
    `qatool calibrate` W8A8 model, both calibrated on the sample training digits."""
    import qat_bench

    work.mkdir(parents=True, exist_ok=True)
    pre = qat_bench.preprocess_of(qat_bench.SAMPLES / f"{name}.onnx")
    ort_ptq = Path(qat_bench.run_ort_ptq(name, 8, 8, qat_bench.Data(pre), work)["path"])
    qatool = work / f"{name}_calibrate_w8a8.onnx"
    subprocess.run([args.qatool, "calibrate", str(qat_bench.SAMPLES / f"{name}.onnx"), "--data",
                    str(qat_bench.TRAIN_DIR), "-o", str(qatool), "--no-verify"], check=True, stdout=subprocess.DEVNULL)
    return {"float": qat_bench.SAMPLES / f"{name}.onnx", "qatool": qatool, "ort": ort_ptq}, \
        [1, pre.channels, *pre.size]


def run(args) -> dict:
    doc = {"settings": {"threads": args.threads, "rounds": ROUNDS}, "models": {},
           "versions": {"onnxruntime": ort.__version__}}
    runs = args.cache / "runs"
    for name in args.models:
        if name in SAMPLE_MODELS:
            paths, shape = sample_files(name, runs / "samples", args)
        else:
            spec = real_data.load_spec(args.cache, name)
            paths = files(spec, runs, args)
            shape = [1, 1 if spec.color == "gray" else 3, *spec.hw]
        real_data.log(f"{name}: {', '.join(f'{k} {p}' for k, p in paths.items())}")
        entry = {k: {"file": str(p), **graph_counts(p)} for k, p in paths.items()}
        ops = {k: e.pop("ops") for k, e in entry.items()}
        entry["qatool"]["same_graph_as_ort"] = ops["qatool"] == ops["ort"]
        # quantize_static's model is timed a second time in its own session: the spread of one file against itself
        # is the noise floor of this run's comparisons
        timed = latency({**paths, "ort_again": paths["ort"]}, shape, args.threads)
        entry["ort"]["latency_again_ms"] = {str(b): v for b, v in timed.pop("ort_again").items()}
        for k, ms in timed.items():
            entry[k]["latency_ms"] = {str(b): v for b, v in ms.items()}
        doc["models"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
    return doc


def render(doc: dict) -> str:
    lines = [f"onnxruntime {doc['versions']['onnxruntime']}, {doc['settings']['threads']} thread(s), medians of "
             f"{doc['settings']['rounds']} interleaved rounds (batch: rounds)", "",
             "| model | file | integer kernels | float ops between Q/DQ | Q / DQ | batch 1 ms | batch 64 ms | "
             "× float (64) |", "|---|---|---|---|---|---|---|---|"]
    checks = []
    for name, e in doc["models"].items():
        f64 = e["float"]["latency_ms"]["64"]
        for k in ("float", "qatool", "ort"):
            r = e[k]
            between = ", ".join(f"{t} {n}" for t, n in r["float_between_qdq"].items()) or "none"
            lines.append(f"| {name} | {k} | {r['integer_kernels'] if k != 'float' else '–'} | "
                         f"{between if k != 'float' else '–'} | {r['quantize_linear']} / {r['dequantize_linear']} | "
                         f"{r['latency_ms']['1']:.2f} | {r['latency_ms']['64']:.1f} | {r['latency_ms']['64'] / f64:.2f} |")
        q, o = e["qatool"], e["ort"]
        checks.append((name, "integer kernels >= quantize_static's", f"{q['integer_kernels']} vs {o['integer_kernels']}",
                       q["integer_kernels"] >= o["integer_kernels"]))
        checks.append((name, "int8 latency <= quantize_static's (batch 64)",
                       f"{q['latency_ms']['64']:.1f} vs {o['latency_ms']['64']:.1f} ms"
                       + (" (the same optimised graph op for op)" if q.get("same_graph_as_ort") else "")
                       + (f"; quantize_static's file timed again: {o['latency_again_ms']['64']:.1f} ms"
                          if "latency_again_ms" in o else ""),
                       q["latency_ms"]["64"] <= o["latency_ms"]["64"]))
        if o["latency_ms"]["64"] < f64:
            checks.append((name, "int8 <= 0.8 x float (batch 64; quantize_static's is below float)",
                           f"{q['latency_ms']['64'] / f64:.2f}x", q["latency_ms"]["64"] <= 0.8 * f64))
        else:
            checks.append((name, "int8 <= 0.8 x float (batch 64)",
                           f"{q['latency_ms']['64'] / f64:.2f}x (not binding: quantize_static's is "
                           f"{o['latency_ms']['64'] / f64:.2f}x)", True))
    lines += ["", "| model | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {n} | {t} | {m} | {'yes' if ok else '**no**'} |" for n, t, m, ok in checks]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1: the machine "
                   "is shared; 2 threads on a busy second core measure the other process)")
    p.add_argument("--cache", type=Path, default=real_data.DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--qatool", default=str(Path(sys.executable).parent / "qatool"))
    p.add_argument("--make", action="store_true", help="always make qatool's int8 model with `qatool calibrate`")
    p.add_argument("--render", action="store_true")
    p.add_argument("--no-run", action="store_true")
    args = p.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.no_run else run(args)
    if args.render:
        print(render(doc))


if __name__ == "__main__":
    main()
