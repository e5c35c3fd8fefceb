"""QAT benchmark: qatool against PyTorch FX QAT and onnxruntime's static PTQ, in one run, on the sample models.

    .venv/bin/python bench/qat_bench.py                      # everything; writes bench/results/qat_bench.json
    .venv/bin/python bench/qat_bench.py --quick              # 20 steps: a smoke run (writes nothing unless --out;
                                                             # nor do --steps, --models, --bits)
    .venv/bin/python bench/qat_bench.py --models lenet_bn --bits W8A8
    .venv/bin/python bench/qat_bench.py --render bench/results/qat_bench.json   # the Markdown tables again

For each sample model and each bit width (W8A8, W4A4, W2A8) it runs, with the same float weights, data,
steps, batch and threads:

1. qatool: `api.train_quant` (its defaults: SGD momentum 0.9, lr 1e-3 with cosine decay, batch 64, BN frozen after
   half the steps, activation observers after three quarters), then onnxruntime on the model_int8.onnx it writes;
2. PyTorch FX QAT: `prepare_qat_fx` (Conv+BN(+ReLU) fused into ConvBn QAT modules) with per-channel symmetric
   narrow-range weight fake-quant and moving-average min/max activation fake-quant, the same batches in the same
   order (qatool's `batch_indices`), the same lr at every step (qatool's `learning_rate`), BN frozen
   (`freeze_bn_stats`) and activation observers disabled (`disable_observer`) at the same steps, then `convert_fx`
   and the converted model on the x86 engine;
3. onnxruntime `quantize_static` (QDQ, per channel, MinMax calibration on the first 256 training images that
   qatool's batches visit) of the float model after `quant_pre_process`, where a type of those bits exists.

QAT runs once per seed (0, 1, 2: batch order and Dropout masks), since at 2 bits one run's randomness moves the
accuracy by points; accuracies are the means (each run kept). It reports top-1 on sample_models/data/mnist/val
(1000 images), ms per training step (median over the run
without its first 5 steps, timed the same way on both sides), warm onnxruntime latency at batch 64 and 1
(blocks of runs interleaved across the models, median) and file sizes, then checks the targets and says plainly which are missed.

PyTorch is a development-only dependency (pip install torch==2.13.0); qatool never imports it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SAMPLES = ROOT / "sample_models"
TRAIN_DIR = SAMPLES / "data" / "mnist" / "train"
VAL_DIR = SAMPLES / "data" / "mnist" / "val"
RESULTS = BENCH / "results" / "qat_bench.json"
for p in (ROOT, BENCH, SAMPLES):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from torch_twins import onnx_weights, torch_module  # noqa: E402

MODELS = ["lenet_bn", "mobilenetv2_small"]
BITS = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A8": (2, 8)}
THREADS = 2
BATCH = 64
LR = 1e-3
MOMENTUM = 0.9
SCHEDULE = "cosine"  # qatool's default lr schedule, given to both QAT methods step by step
SEEDS = (0, 1, 2)  # accuracy is the mean over these runs: at 2 bits one run's randomness moves it by points
STEPS = 200
QUICK_STEPS = 20
CALIB_IMAGES = 256
SKIP_STEPS = 5  # the first steps of a run (allocations, caches) are left out of ms/step
LAT_RUNS = {64: 60, 1: 200}  # timed runs per model at batch 64 and batch 1, in blocks interleaved across models
LAT_BLOCK = {64: 20, 1: 50}  # consecutive timed runs per visit
LAT_SKIP = {64: 3, 1: 10}  # untimed runs at the start of each visit


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- data: exactly what qatool trains on --------------------------------------------------------------------
def preprocess_of(model_path: Path):
    """The preprocessing qatool takes from the model's metadata (the sample models: gray 28x28, mean/std)."""
    from qatool.convert import normalize_proto
    from qatool.ir.io import load_proto
    from qatool.data.preprocess import resolve_preprocess

    return resolve_preprocess(normalize_proto(load_proto(model_path), for_training=True).graph, None)


class Data:
    """The training and validation images as qatool loads them (ImageDataset order, uint8), and their labels."""

    def __init__(self, pre):
        from qatool.data.images import ImageDataset

        self.pre = pre
        self.train = ImageDataset.open(TRAIN_DIR).load(self.pre)
        self.val = ImageDataset.open(VAL_DIR).load(self.pre)
        self.xval = np.concatenate([x for x, _ in self.val.batches(500)])
        self.yval = np.asarray(self.val.labels)

    def uint8(self, idx: np.ndarray) -> np.ndarray:
        d = self.train
        return d.uint8_batch(idx) if hasattr(d, "uint8_batch") else d.images[idx]

    def batch(self, step: int, seed: int = SEEDS[0]) -> tuple[np.ndarray, np.ndarray]:
        """Training batch `step`: qatool's batch_indices over the training set, preprocessed as qatool does."""
        from qatool.data.images import batch_indices

        idx = batch_indices(len(self.train), BATCH, step, seed)
        return self.pre.normalize(self.uint8(idx)), np.asarray(self.train.labels)[idx]

    def calibration(self, n: int) -> np.ndarray:
        """The first n training images qatool's batches visit (a class-mixed sample, unlike the folder order)."""
        xs, k = [], 0
        while sum(len(x) for x in xs) < n:
            xs.append(self.batch(k)[0])
            k += 1
        return np.concatenate(xs)[:n]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels))


def median_ms(times_s: list[float]) -> float:
    kept = times_s[SKIP_STEPS:] if len(times_s) > 2 * SKIP_STEPS else times_s
    return round(statistics.median(kept) * 1e3, 2)


def min_ms(times_s: list[float]) -> float:
    """The fastest step: a hint of the step time on an idle machine when other work shares the CPU."""
    return round(min(times_s) * 1e3, 2)


def load_avg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---- 1. qatool ----------------------------------------------------------------------------------------------
def run_qatool(name: str, wb: int, ab: int, steps: int, out_dir: Path, seed: int) -> dict:
    from qatool import api
    from qatool.quant.config import QuantConfig
    from qatool.train.config import TrainConfig

    load0, t0 = load_avg(), time.perf_counter()
    report = api.train_quant(SAMPLES / f"{name}.onnx", TRAIN_DIR, out_dir, val_data=VAL_DIR,
                             quant=QuantConfig(weight_bits=wb, activation_bits=ab),
                             # keep="last": the peer deploys its final model, and the val images are what this
                             # benchmark reports on, so picking qatool's best checkpoint on them would flatter it
                             train=TrainConfig(steps=steps, batch_size=BATCH, lr=LR, momentum=MOMENTUM,
                                               schedule=SCHEDULE, seed=seed, keep="last"),
                             quiet=True, echo=lambda s: log(f"    qatool: {s}"))
    wall = time.perf_counter() - t0
    step_ms = [json.loads(line)["ms"] / 1e3 for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    val, export = report["val"], report["export"]
    fusion = export.get("fusion") or {}
    return {
        "top1_int8": val["top1_int8"],
        "top1_qat_simulation": val["top1_qat"],
        "top1_float": val["top1_float"],
        "agreement_simulation_vs_int8": val["agreement_top1"],
        "max_diff_steps_simulation_vs_int8": val.get("max_diff_steps"),
        "ms_per_step": median_ms(step_ms),
        "ms_per_step_min": min_ms(step_ms),
        "ms_per_step_report": report["ms_per_step"],
        "final_loss": report["final_loss"],
        "fused": f"{fusion.get('fused')}/{fusion.get('expected')}",
        "int8_kernels": fusion.get("kernels"),
        "int8_bytes": export["size_bytes"],
        "int8_path": export["path"],
        "freeze_bn_after": report["config"]["freeze_bn_after"],
        "freeze_observers_after": report["config"]["freeze_observers_after"],
        "wall_s": round(wall, 1),
        "load_average_before": load0,
        "load_average_after": load_avg(),
    }


# ---- 2. PyTorch FX QAT --------------------------------------------------------------------------------------
def qconfig_mapping(wb: int, ab: int):
    import torch
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig, QConfigMapping)

    qmax_w = 2 ** (wb - 1) - 1
    # averaging_constant: 0.1 = qatool's observer momentum 0.9; weights 1.0 = the scale follows the current
    # (BN-folded) weight every step, as qatool's does
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** ab - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine, averaging_constant=0.1)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-qmax_w,
                                    quant_max=qmax_w, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                    ch_axis=0, averaging_constant=1.0)
    return QConfigMapping().set_global(QConfig(activation=act, weight=weight))


def disable_activation_observers(model) -> None:
    """qatool's "observers" are the activation ranges; its weight scales keep following the weights."""
    from torch.ao.quantization import FakeQuantizeBase, disable_observer

    for mod_name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizeBase) and not mod_name.endswith("weight_fake_quant"):
            disable_observer(mod)


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + 250])) for i in range(0, len(x), 250)]).numpy()


def torch_bytes(model) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def run_torch(name: str, wb: int, ab: int, steps: int, data: Data, bn_at: int, obs_at: int,
              seed: int) -> tuple[dict, object]:
    import warnings

    import torch
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.nn.functional as F
    from torch.ao.quantization import disable_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    from qatool.train.optim import learning_rate

    # torch.ao.quantization's FX API warns on every call that it is deprecated in favour of torchao's pt2e flow
    warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization.*deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"(?s)torch\.quantize_per_tensor, torch\.quantize_per_channel and other")
    torch.manual_seed(seed)  # Dropout masks (PyTorch's generator: not the same masks as qatool's)
    module = torch_module(name, onnx_weights(SAMPLES / f"{name}.onnx")).train()
    model = prepare_qat_fx(module, qconfig_mapping(wb, ab), example_inputs=(torch.zeros(1, 1, 28, 28),))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    load0, t_run = load_avg(), time.perf_counter()
    times, losses, loss = [], [], float("nan")
    for step in range(steps):
        t0 = time.perf_counter()
        if step == bn_at:
            model.apply(nniqat.freeze_bn_stats)
        if step == max(obs_at, 1):  # as in qatool, an observer frozen before any batch still takes the first one
            disable_activation_observers(model)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, LR, SCHEDULE)
        x, y = data.batch(step, seed)
        out = model(torch.from_numpy(x))
        loss_t = F.cross_entropy(out, torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        loss = float(loss_t.detach())
        losses.append(round(loss, 5))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"    torch: step {step + 1}/{steps} loss {loss:.4f} ({statistics.median(times) * 1e3:.0f} ms/step)")
    wall = time.perf_counter() - t_run
    model.apply(disable_observer)
    model.eval()
    top1_fq = top1(torch_logits(model, data.xval), data.yval)
    converted = convert_fx(copy.deepcopy(model))
    top1_int8 = top1(torch_logits(converted, data.xval), data.yval)  # the x86 (fbgemm/onednn) quantized kernels
    return {
        "top1_int8_converted": top1_int8,
        "top1_fake_quant": top1_fq,
        "ms_per_step": median_ms(times),
        "ms_per_step_min": min_ms(times),
        "final_loss": loss,
        "losses": losses,  # every step's, to set beside qatool's metrics.jsonl
        "int8_state_dict_bytes": torch_bytes(converted),
        "quantized_engine": torch.backends.quantized.engine,
        "wall_s": round(wall, 1),
        "load_average_before": load0,
        "load_average_after": load_avg(),
    }, converted


# ---- 3. onnxruntime static PTQ ------------------------------------------------------------------------------
ORT_NOT_SUPPORTED = "not supported: onnxruntime.quantization has no 2-bit QuantType"


def ort_types(wb: int, ab: int):
    from onnxruntime.quantization import QuantType

    types = {8: (QuantType.QInt8, QuantType.QUInt8), 4: (QuantType.QInt4, QuantType.QUInt4)}
    if wb not in types or ab not in types:
        return None
    return types[wb][0], types[ab][1]


def ort_session(path, level=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_session_fallback(path) -> tuple[object, str]:
    """ORT_ENABLE_ALL; if onnxruntime's own optimiser breaks the model (it does for 4-bit QDQ around MaxPool:
    the DropQDQ rewrite hands MaxPool a uint4 tensor), ORT_ENABLE_BASIC."""
    import onnxruntime as ort

    try:
        return ort_session(path), "ORT_ENABLE_ALL"
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).splitlines()[0]
        log(f"    ort: ORT_ENABLE_ALL refuses {Path(path).name} ({first[:160]}); using ORT_ENABLE_BASIC")
        return ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), "ORT_ENABLE_BASIC"


def run_ort_ptq(name: str, wb: int, ab: int, data: Data, work: Path) -> dict:
    import logging

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = ort_types(wb, ab)
    if types is None:
        return {"supported": False, "note": ORT_NOT_SUPPORTED}
    pre = work / f"{name}_ptq_pre.onnx"
    if not pre.exists():
        quant_pre_process(str(SAMPLES / f"{name}.onnx"), str(pre))  # shape inference + BN folding, Dropout removed
    calib = data.calibration(CALIB_IMAGES)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + BATCH]} for i in range(0, len(calib), BATCH)])

        def get_next(self):
            return next(self.it, None)

    out = work / f"{name}_ptq_W{wb}A{ab}.onnx"
    t0 = time.perf_counter()
    logging.getLogger().setLevel(logging.ERROR)  # its "int4 needs opset 21: using com.microsoft Q/DQ" notice
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=types[0], activation_type=types[1], calibrate_method=CalibrationMethod.MinMax)
    sess, level = ort_session_fallback(out)
    logits = sess.run(None, {"input": data.xval})[0]
    return {
        "supported": True,
        "weight_type": types[0].name,
        "activation_type": types[1].name,
        "top1": top1(logits, data.yval),
        "bytes": out.stat().st_size,
        "path": str(out),
        "session_level": level,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---- latency ------------------------------------------------------------------------------------------------
def latency(runners: dict[str, object], x64: np.ndarray, x1: np.ndarray) -> dict[str, dict]:
    """Warm latency, median (and fastest) per runner. Rounds visit every runner in turn, so a burst of other work
    on the machine hits all of them alike; each visit starts with untimed runs, because the previous runner's
    idle threads may still be spinning (onnxruntime's and OpenMP's workers spin before they sleep), then times a
    block of consecutive runs. (Blocks of 5 after one untimed run gave medians 2-4x the fastest run on this
    machine; blocks of 20 after 3 untimed runs bring the medians much closer to it.)"""
    out: dict[str, dict] = {k: {} for k in runners}
    for n, x in ((64, x64), (1, x1)):
        runs, block, skip = LAT_RUNS[n], LAT_BLOCK[n], LAT_SKIP[n]
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(runs // block):
            for k, run in runners.items():
                for _ in range(skip):
                    run(x)
                for _ in range(block):
                    t0 = time.perf_counter()
                    run(x)
                    times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            out[k][f"ms_batch{n}"] = round(statistics.median(v) * 1e3, 3)
            out[k][f"ms_batch{n}_min"] = round(min(v) * 1e3, 3)
    return out


def ort_runner(sess):
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def torch_runner(model):
    import torch

    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(x))

    return run


# ---- targets ------------------------------------------------------------------------------------------------
def over_seeds(runs: list[dict], accuracies: tuple[str, ...], seeds: list[int]) -> dict:
    """The first seed's run, with each accuracy replaced by its mean over the seeds (each seed's value kept
    beside it) and ms per step by the median of the runs' medians."""
    out = dict(runs[0])
    for key in accuracies:
        out[f"{key}_per_seed"] = dict(zip(map(str, seeds), (r[key] for r in runs)))
        out[key] = round(statistics.mean(r[key] for r in runs), 5)
    for key in ("ms_per_step", "ms_per_step_min"):
        out[f"{key}_per_seed"] = [r[key] for r in runs]
        out[key] = round(statistics.median(r[key] for r in runs), 2)
    return out


def pp(a: float, b: float) -> float:
    return round((a - b) * 100, 2)


def _seed_differences(a: dict, a_key: str, b: dict, b_key: str) -> str:
    """'; per seed +0.1 / -0.2': the paired differences (pp) behind a mean over seeds (empty for one seed)."""
    sa, sb = a.get(f"{a_key}_per_seed"), b.get(f"{b_key}_per_seed")
    if not sa or not sb or len(sa) < 2:
        return ""
    return "; per seed " + " / ".join(f"{pp(sa[k], sb[k]):+.1f}" for k in sa if k in sb)


def check_targets(rows: list[dict], lat: dict) -> list[dict]:
    t: list[dict] = []

    def add(target, model, bits, met, detail):
        t.append({"target": target, "model": model, "bits": bits, "met": met, "detail": detail})

    for r in rows:
        m, b, q, pt, o = r["model"], r["bits"], r["qatool"], r["torch"], r["ort_ptq"]
        qi = q["top1_int8"]
        add("int8 top-1 >= PyTorch QAT (converted)", m, b, qi >= pt["top1_int8_converted"] - 1e-9,
            f"qatool {qi:.1%} vs PyTorch {pt['top1_int8_converted']:.1%} ({pp(qi, pt['top1_int8_converted']):+.1f} pp"
            f"{_seed_differences(q, 'top1_int8', pt, 'top1_int8_converted')})")
        if o.get("supported"):
            add("int8 top-1 >= onnxruntime PTQ", m, b, qi >= o["top1"] - 1e-9,
                f"qatool {qi:.1%} vs PTQ {o['top1']:.1%} ({pp(qi, o['top1']):+.1f} pp)")
        ratio = r["step_ratio_qatool_over_torch"]
        add("training step qatool/PyTorch <= 2.0", m, b, ratio <= 2.0,
            f"{q['ms_per_step']:.1f} / {pt['ms_per_step']:.1f} ms = {ratio:.2f}")
        add("training step parity (qatool/PyTorch <= 1.0, the goal)", m, b, ratio <= 1.0, f"ratio {ratio:.2f}")
        drop = pp(r["float_top1"], qi)
        if b == "W8A8":
            add("W8A8 int8 within 0.2 pp of float", m, b, drop <= 0.2 + 1e-9,
                f"float {r['float_top1']:.1%}, int8 {qi:.1%}: drop {drop:+.1f} pp")
        if b == "W4A4":
            add("W4A4 int8 within 1.5 pp of float", m, b, drop <= 1.5 + 1e-9,
                f"float {r['float_top1']:.1%}, int8 {qi:.1%}: drop {drop:+.1f} pp")
        if o.get("supported"):
            add("int8 size <= quantize_static QDQ", m, b, q["int8_bytes"] <= o["bytes"],
                f"{q['int8_bytes']:,} vs {o['bytes']:,} bytes")
        lm = lat.get(m, {})
        qk, ok, fk = f"qatool {b}", f"ort-ptq {b}", "float (onnxruntime)"
        if qk in lm and ok in lm:
            a, c = lm[qk]["ms_batch64"], lm[ok]["ms_batch64"]
            add("latency at batch 64 <= quantize_static's", m, b, a <= c, f"{a:.2f} vs {c:.2f} ms")
        if m.startswith("mobilenet") and qk in lm and fk in lm:
            a, f = lm[qk]["ms_batch64"], lm[fk]["ms_batch64"]
            add("int8 latency <= 0.8 x float at batch 64 (MobileNetV2-style)", m, b, a <= 0.8 * f,
                f"{a:.2f} vs {f:.2f} ms float ({a / f:.2f}x)")
    return t


# ---- report -------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "—" if v is None else f"{v * 100:.1f} %"


def seeds_note(settings: dict) -> str:
    seeds = settings.get("seeds", [settings.get("seed", 0)])
    if len(seeds) == 1:
        return f"Seed {seeds[0]}."
    return (f"Seeds {', '.join(map(str, seeds))}: QAT accuracies are the mean of the {len(seeds)} runs (each run in "
            "brackets), ms/step the median of the runs' medians; latency and size are the first seed's models.")


def _per_seed(run: dict, key: str) -> str:
    values = run.get(f"{key}_per_seed")
    return f" ({' / '.join(f'{v * 100:.1f}' for v in values.values())})" if values and len(values) > 1 else ""


def render_markdown(doc: dict) -> str:
    rows, lat = doc["rows"], doc["latency"]
    s = doc["settings"]
    lines = [f"Steps {s['steps']}, batch {s['batch']}, SGD momentum {s['momentum']}, lr {s['lr']} "
             f"({s.get('schedule', 'constant')}); "
             f"val = {s['val_images']} images. {seeds_note(s)}", ""]
    lines += ["### Accuracy (top-1 on the val images)", "",
              "| model | bits | float | qatool int8 (onnxruntime) | qatool QAT simulation | PyTorch QAT int8 "
              "(converted, deployed) | PyTorch QAT fake-quant | onnxruntime PTQ (quantize_static) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, t, o = r["qatool"], r["torch"], r["ort_ptq"]
        ptq = _pct(o["top1"]) if o.get("supported") else "not supported (no 2-bit type)"
        lines.append(f"| {r['model']} | {r['bits']} | {_pct(r['float_top1'])} | "
                     f"**{_pct(q['top1_int8'])}**{_per_seed(q, 'top1_int8')} | "
                     f"{_pct(q['top1_qat_simulation'])} | {_pct(t['top1_int8_converted'])}"
                     f"{_per_seed(t, 'top1_int8_converted')} | {_pct(t['top1_fake_quant'])} | {ptq} |")
    lines += ["", "### Training step (ms, median over the run without its first 5 steps)", "",
              "| model | bits | qatool ms/step | PyTorch FX QAT ms/step | qatool / PyTorch | fastest step: qatool; "
              "PyTorch (ratio) | 1-min load average before → after: qatool; PyTorch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        q, t = r["qatool"], r["torch"]
        la = lambda v: "—" if not v else f"{v[0]:.1f}"  # noqa: E731
        fast = f"{q['ms_per_step_min']:.1f}; {t['ms_per_step_min']:.1f} ({q['ms_per_step_min'] / t['ms_per_step_min']:.2f})"
        lines.append(f"| {r['model']} | {r['bits']} | {q['ms_per_step']:.1f} | {t['ms_per_step']:.1f} | "
                     f"{r['step_ratio_qatool_over_torch']:.2f} | {fast} | "
                     f"{la(q['load_average_before'])} → {la(q.get('load_average_after'))}; "
                     f"{la(t['load_average_before'])} → {la(t.get('load_average_after'))} |")
    lines += ["", "### Latency (onnxruntime CPU, warm, median ms) and size", "",
              "| model | model file | batch 64 ms (fastest) | batch 1 ms (fastest) | vs float at batch 64 | size |",
              "|---|---|---|---|---|---|"]
    for m, entries in lat.items():
        f64 = entries.get("float (onnxruntime)", {}).get("ms_batch64")
        for k, v in entries.items():
            if "PyTorch" in k:
                continue
            ratio = f"{v['ms_batch64'] / f64:.2f}x" if f64 else "—"
            lines.append(f"| {m} | {k} | {v['ms_batch64']:.2f} ({v.get('ms_batch64_min', float('nan')):.2f}) | "
                         f"{v['ms_batch1']:.3f} ({v.get('ms_batch1_min', float('nan')):.3f}) | {ratio} | {v['bytes']:,} B |")
    torch_rows = [(m, k, v) for m, e in lat.items() for k, v in e.items() if "PyTorch" in k]
    if torch_rows:
        lines += ["", "For reference, the same runs on PyTorch's own CPU runtime (2 threads; size = serialized "
                  "state_dict):", "", "| model | model | batch 64 ms | batch 1 ms | size |", "|---|---|---|---|---|"]
        for m, k, v in torch_rows:
            lines.append(f"| {m} | {k} | {v['ms_batch64']:.2f} | {v['ms_batch1']:.3f} | {v['bytes']:,} B |")
    lines += ["", "### Targets", "", "| | target | model | bits | measured |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        lines.append(f"| {'✅' if t['met'] else '❌'} | {t['target']} | {t['model']} | {t['bits']} | {t['detail']} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    from engine_speed import machine_info  # the same machine facts as the engine benchmark

    info = machine_info()
    info.pop("load_average_at_start", None)
    import torch

    info["torch_quantized_engine"] = torch.backends.quantized.engine
    info["onnxruntime_threads"] = THREADS
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        info["cpu_vnni"] = "avx512_vnni" in flags or "avx_vnni" in flags
    except (OSError, StopIteration):
        info["cpu_vnni"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    ap.add_argument("--seeds", nargs="+", type=int,
                    help=f"training seeds (batch order, Dropout; default {' '.join(map(str, SEEDS))}, "
                         f"{SEEDS[0]} with --quick); accuracies are their mean")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps: a smoke run")
    ap.add_argument("--steps", type=int, help=f"training steps (default {STEPS}, {QUICK_STEPS} with --quick)")
    ap.add_argument("--out", type=Path, help="where to write the JSON (default: bench/results/qat_bench.json for a "
                    "complete run; nothing for --quick, --steps, --models or --bits unless given)")
    ap.add_argument("--keep", type=Path, help="keep the trained and quantized models in this folder")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only print the Markdown tables of a saved result")
    args = ap.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        doc["targets"] = check_targets(doc["rows"], doc["latency"])  # the saved measurements, today's checks
        print(render_markdown(doc))
        return 0

    import torch

    torch.set_num_threads(THREADS)
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    args.seeds = args.seeds or ([SEEDS[0]] if args.quick else list(SEEDS))
    complete = not args.quick and not args.steps and set(args.models) == set(MODELS) and set(args.bits) == set(BITS) \
        and len(args.seeds) >= len(SEEDS)
    out_json = args.out or (RESULTS if complete else None)  # a partial run never overwrites the full results
    info = machine()
    log(f"qat_bench: models {args.models}, bits {args.bits}, {steps} steps, batch {BATCH}; "
        f"{info['cpu']}, {info['cores']} cores, load {load_avg()}")
    t_all = time.perf_counter()
    tmp = None
    if args.keep:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qat_bench_")
        work = Path(tmp.name)

    datasets: dict[str, Data] = {}  # by preprocessing (both sample models share one)
    rows: list[dict] = []
    lat: dict[str, dict] = {}
    for name in args.models:
        float_path = SAMPLES / f"{name}.onnx"
        pre = preprocess_of(float_path)
        if pre.to_json() not in datasets:
            datasets[pre.to_json()] = Data(pre)
        data = datasets[pre.to_json()]
        log(f"data: {len(data.train)} training images, {len(data.val)} val images ({data.pre.to_json()})")
        float_sess = ort_session(float_path)
        float_top1 = top1(float_sess.run(None, {"input": data.xval})[0], data.yval)
        log(f"\n{name}: float top-1 (onnxruntime) {float_top1:.4f}")
        runners = {"float (onnxruntime)": ort_runner(float_sess)}
        sizes = {"float (onnxruntime)": float_path.stat().st_size}
        float_twin = torch_module(name, onnx_weights(float_path)).eval()
        torch_runners = {"float (PyTorch)": torch_runner(float_twin)}
        torch_sizes = {"float (PyTorch)": torch_bytes(float_twin)}
        for bits in args.bits:
            wb, ab = BITS[bits]
            qs, ts, converted = [], [], None
            for seed in args.seeds:
                log(f"  {name} {bits} seed {seed}: qatool QAT ...")
                q = run_qatool(name, wb, ab, steps, work / name / bits / f"seed{seed}", seed)
                log(f"  {name} {bits} seed {seed}: qatool int8 {q['top1_int8']:.4f} (simulation "
                    f"{q['top1_qat_simulation']:.4f}), {q['ms_per_step']:.1f} ms/step, {q['wall_s']:.0f} s")
                log(f"  {name} {bits} seed {seed}: PyTorch FX QAT ...")
                t, conv = run_torch(name, wb, ab, steps, data, q["freeze_bn_after"], q["freeze_observers_after"], seed)
                log(f"  {name} {bits} seed {seed}: PyTorch int8 {t['top1_int8_converted']:.4f} (fake-quant "
                    f"{t['top1_fake_quant']:.4f}), {t['ms_per_step']:.1f} ms/step, {t['wall_s']:.0f} s")
                qs.append(q)
                ts.append(t)
                converted = converted or conv  # latency of the first seed's models
            q = over_seeds(qs, ("top1_int8", "top1_qat_simulation"), args.seeds)
            t = over_seeds(ts, ("top1_int8_converted", "top1_fake_quant"), args.seeds)
            log(f"  {name} {bits}: onnxruntime quantize_static ...")
            o = run_ort_ptq(name, wb, ab, data, work)
            log(f"  {name} {bits}: PTQ " + (f"{o['top1']:.4f}, {o['bytes']:,} bytes" if o["supported"] else o["note"]))
            ratio = round(q["ms_per_step"] / t["ms_per_step"], 3)
            rows.append({"model": name, "bits": bits, "weight_bits": wb, "activation_bits": ab,
                         "float_top1": float_top1, "qatool": q, "torch": t, "ort_ptq": o,
                         "step_ratio_qatool_over_torch": ratio})
            runners[f"qatool {bits}"] = ort_runner(ort_session(q["int8_path"]))
            sizes[f"qatool {bits}"] = q["int8_bytes"]
            if o["supported"]:
                runners[f"ort-ptq {bits}"] = ort_runner(ort_session_fallback(o["path"])[0])
                sizes[f"ort-ptq {bits}"] = o["bytes"]
            torch_runners[f"PyTorch QAT int8 {bits}"] = torch_runner(converted)
            torch_sizes[f"PyTorch QAT int8 {bits}"] = t["int8_state_dict_bytes"]
        log(f"  {name}: latency ({len(runners)} onnxruntime sessions, {len(torch_runners)} PyTorch models) ...")
        x64, x1 = np.ascontiguousarray(data.xval[:64]), np.ascontiguousarray(data.xval[:1])
        timed = latency({**runners, **torch_runners}, x64, x1)
        lat[name] = {k: {**v, "bytes": {**sizes, **torch_sizes}[k]} for k, v in timed.items()}
        for k, v in lat[name].items():
            log(f"    {k:<26} batch 64 {v['ms_batch64']:8.2f} ms   batch 1 {v['ms_batch1']:7.3f} ms   {v['bytes']:>10,} B")

    for r in rows:  # paths into a work folder mean nothing to a reader of the results
        r["qatool"].pop("int8_path", None)
        r["ort_ptq"].pop("path", None)
    doc = {
        "benchmark": "qat_bench",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "make bench  (.venv/bin/python bench/qat_bench.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
                   + ")",
        "settings": {"steps": steps, "batch": BATCH, "optimizer": "SGD", "momentum": MOMENTUM, "lr": LR,
                     "schedule": SCHEDULE, "seeds": args.seeds, "threads": THREADS, "val_images": len(data.val),
                     "train_images": len(data.train), "calibration_images": CALIB_IMAGES,
                     "ms_per_step": f"median over steps {SKIP_STEPS + 1}..{steps} (all steps if fewer than "
                                    f"{2 * SKIP_STEPS + 1})",
                     "latency": f"warm, median of {LAT_RUNS[64]} (batch 64) / {LAT_RUNS[1]} (batch 1) runs, in "
                                   f"blocks of {LAT_BLOCK[64]} / {LAT_BLOCK[1]} consecutive runs (each after "
                                   f"{LAT_SKIP[64]} / {LAT_SKIP[1]} untimed ones) interleaved across the models; "
                                   "inputs are the first val images"},
        "machine": info,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "rows": rows,
        "latency": lat,
    }
    doc["targets"] = check_targets(rows, lat)
    md = render_markdown(doc)
    log("\n" + md)
    missed = [t for t in doc["targets"] if not t["met"]]
    log(f"targets: {len(doc['targets']) - len(missed)} met, {len(missed)} missed"
        + "".join(f"\n  MISSED: {t['target']} — {t['model']} {t['bits']}: {t['detail']}" for t in missed))
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {out_json}")
    log(f"total {time.perf_counter() - t_all:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
