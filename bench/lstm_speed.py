"""LSTM speed benchmark: a QAT training step of a CNN + bi-LSTM recogniser, qatool against PyTorch FX QAT.

    .venv/bin/python bench/lstm_speed.py --render          # the full run: writes bench/results/lstm_speed.json
    .venv/bin/python bench/lstm_speed.py --smoke --render  # a smoke run (batch 4, 3 steps, 1 thread, one repeat)
    .venv/bin/python bench/lstm_speed.py --no-run          # the table of bench/results/lstm_speed.json again

The issue target: "a step of a CNN+LSTM recogniser at batch 32 within 2x of PyTorch's for the same architecture,
measured side by side".

The model: ddddocr 1.6.1's `common.onnx` (DdddOcr(beta=True)'s recogniser, 13.5 M parameters, opset 12), input
[1, 1, 64, W] grey / 255, output time-major logits [ceil(W/8), 1, 8210] (CTC):

    Conv 3x3/2 1->24, SiLU                                   (every SiLU is the graph's Sigmoid + Mul: x * sigmoid(x))
    2 x residual [Conv 3x3 24->24, SiLU, Conv 1x1 24->24] + x
    Conv 3x3/2 24->96, SiLU, Conv 1x1 96->48
    3 x residual [Conv 3x3 48->192, SiLU, Conv 1x1 192->48] + x
    Conv 3x3/2 48->192, SiLU, Conv 1x1 192->64
    3 x residual [Conv 3x3 64->256, SiLU, Conv 1x1 256->64] + x
    [N, 64, 8, W/8] -> Transpose(3, 0, 1, 2) -> Reshape [W/8, N, 512]
    LSTM bidirectional, hidden 512, zero initial states -> [T, 2, N, 512] -> [T, N, 1024]
    Gemm 1024 -> 8210 -> [T, N, 8210]

21 Conv (all with bias, no BatchNormalization), 11 Sigmoid + Mul, 8 Add, 1 LSTM, 1 Gemm, plus the shape
arithmetic. Every run first checks that the PyTorch twin below (nn.Conv2d, x * torch.sigmoid(x), nn.LSTM
(bidirectional), nn.Linear), filled with the ONNX file's weights (LSTM gates reordered from ONNX's i, o, f, c to
PyTorch's i, f, g, o; ONNX's bias is Wb then Rb), gives onnxruntime's output: on the benchmark's first batch, in
eval mode, onnxruntime run image by image (the file declares batch 1). The max abs difference is recorded.

What is timed, at batch 32 and width 160 (20 time steps) by default, `--threads` 2:

1. qatool: `qatool train-quant common.onnx --train-data DIR --batch-size B --steps S --seed 0 --init observe
   --freeze-observers-after S --optimizer adam --lr 3e-5 --schedule constant -q -o OUT` as a subprocess, on a
   folder of S x B .npy tensors [1, 64, W]. With no labels this is qatool's label-free distillation: the float
   model on onnxruntime is the teacher, the loss is KL(softmax(teacher) || softmax(student)) over the 8210 classes,
   the mean over the T x N positions. Options skip what the peer does not do: no calibration pass (--init
   observe), observers move through the whole run, no --val-data; adam lr 3e-5 is qatool's label-free default and
   the peer's optimizer; the model has no BN, so no BN check runs. qatool places 22 quantized layers (21 Conv,
   the Gemm with a float output: the output tail stays float) and 53 activation quantizers; the LSTM stays float
   (between DQ and Q), its weights trained. Read back: OUT/metrics.jsonl's per-step "ms" (qatool's loop: the
   batch, the student's forward, the teacher's onnxruntime forward, the loss, backward, Adam) and OUT/report.json's
   "peak_rss_mb" (the whole process, the int8 export and its checks after training included), the VmHWM polled
   from /proc when the last step is in metrics.jsonl ("through training") and the child's ru_maxrss.
2. PyTorch, in its own process (this script with --torch-child): the twin with the same weights,
   `prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"))`: the 21 Conv become QAT convs (per-channel
   weight fake-quant), every Sigmoid / Mul / Add output and the input get activation fake-quant (54 in all, qatool
   53), nn.LSTM gets no QAT module and stays float (FX's x86 config offers it only dynamic quantization; its input
   is fake-quantized, as qatool quantizes the LSTM's input), nn.Linear becomes a QAT Linear with weight
   fake-quant and (unlike qatool's float tail) a fake-quantized output. Adam lr 3e-5. The step, timed from the
   batch to the end of `opt.step()`: the teacher -- a float copy of the twin, eval mode, under no_grad, as qatool
   runs its float model -- then the student's forward, the same KL as qatool's, backward, Adam. The teacher's
   forward is timed on its own too, so the JSON also has PyTorch's step without it ("student only": what a
   plain QAT step with a fixed target costs). Peak RSS is the process's ru_maxrss (torch's import included).

Both sides get the same S x B tensors, OMP/OpenBLAS/MKL_NUM_THREADS = --threads and torch.set_num_threads
(--threads) (qatool's teacher session uses onnxruntime's default threads: one per core). ms/step is the median
over the steps after the first. The runs alternate, qatool then PyTorch, --repeats times (default 2), so that the
load of a shared machine falls on both sides alike; the ratio is the median over every step after the first of
all of qatool's runs over the same of PyTorch's, and its spread is the range of the per-run-pair ratios.

The data: lines of the any-model benchmark's lstmrec training split (bench/.cache/any/lstmrec/train_npy, real
captcha images, already [1, 64, W] in [0, 1]) stretched (bilinear) to width W, so every batch is full; random
uniform [0, 1) tensors when that cache is missing. The JSON says which.

3. Separately, the LSTM alone (the model's LSTM as a one-node ONNX model, its weights, zero initial states), eval
   forward on the CNN features of the benchmark's first batch (onnxruntime's float features of the model, input
   [T, N, 512]): qatool's engine (float32 numpy), onnxruntime float LSTM and onnxruntime's DynamicQuantizeLSTM
   (`onnxruntime.quantization.quantize_dynamic(op_types_to_quantize=["LSTM"])`: int8 weights, activations
   quantized per call), at batch B and at batch 1, same threads; median of interleaved rounds. Each one's error
   against onnxruntime's float output: SQNR in dB and max abs difference. Whether DynamicQuantizeLSTM is worth
   offering is its latency against the float LSTM's at its SQNR.

Budget and noise. On this 2-core machine, idle, the default run takes ~2 minutes: a qatool run ~36 s (10 steps of
~1.5 s; the rest is start-up and the int8 export and its checks after training), a PyTorch run ~19 s, the LSTM
part ~15 s. qatool's whole-run peak RSS (~4.2 GB) is set after training by the int8 export's checks on the
training tensors and grows with their number (2.2 GB at 96 tensors, 4.2 GB at 320); through training it is
~1.25 GB. Run it on an idle machine: with two other one-thread jobs on the two cores, 2-thread steps swung from
4.5 to 18 s (qatool) and 4.9 to 12.5 s (PyTorch) and the pair ratios from 0.69 to 1.65; `--threads 1` is the
steadier choice on a shared machine (there, with one other job: ratio 0.99, pairs 0.94 and 1.07).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# the child-process helpers are scale_bench's (bench/ is this script's folder, so on sys.path)
from scale_bench import (child_env, finish_run, load_avg, log, maxrss_mb, median_after_first, proc_status_mb,
                         read_metrics, run_child)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lstm_speed.json"
DEFAULT_QATOOL = ROOT / ".venv" / "bin" / "qatool"
CACHE_LINES = ROOT / "bench" / ".cache" / "any" / "lstmrec" / "train_npy"
HEIGHT, HIDDEN, CLASSES, FEATURES = 64, 512, 8210, 512
LR, SEED = 3e-5, 0
RATIO_TARGET = 2.0
DEFAULTS = {"batch": 32, "width": 160, "steps": 10, "threads": 2, "repeats": 2}
SMOKE = {"batch": 4, "width": 160, "steps": 3, "threads": 1, "repeats": 1}
LSTM_ROUNDS, LSTM_ROUNDS_SMOKE = 10, 3


def model_path() -> Path:
    """ddddocr 1.6.1's common.onnx, from the installed package (ddddocr is imported by path, not executed)."""
    import importlib.util

    spec = importlib.util.find_spec("ddddocr")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: ddddocr is not installed (make venv installs it --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "common.onnx"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist")
    return path


# ---- the PyTorch twin (torch is imported only in the children) ------------------------------------------------
def build_twin(onnx_file: Path):
    """The recogniser in plain PyTorch, filled with the ONNX file's weights (by node order, shapes checked)."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn

    class SiLU(nn.Module):  # the graph's Sigmoid + Mul, written as such (FX quantizes both outputs, as qatool)
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Residual(nn.Module):
        def __init__(self, c, hidden):
            super().__init__()
            self.conv1, self.act, self.conv2 = nn.Conv2d(c, hidden, 3, 1, 1), SiLU(), nn.Conv2d(hidden, c, 1)

        def forward(self, x):
            return x + self.conv2(self.act(self.conv1(x)))

    class Recogniser(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(1, 24, 3, 2, 1), SiLU(), Residual(24, 24), Residual(24, 24)]
            for cin, hidden, c in ((24, 96, 48), (48, 192, 64)):
                layers += [nn.Conv2d(cin, hidden, 3, 2, 1), SiLU(), nn.Conv2d(hidden, c, 1)]
                layers += [Residual(c, 4 * c) for _ in range(3)]
            self.cnn = nn.Sequential(*layers)
            self.lstm = nn.LSTM(FEATURES, HIDDEN, bidirectional=True)
            self.fc = nn.Linear(2 * HIDDEN, CLASSES)

        def forward(self, x):
            f = self.cnn(x).permute(3, 0, 1, 2).flatten(2)  # [N, C, H, W'] -> [W', N, C*H], the graph's Reshape_69
            y, _ = self.lstm(f)  # [T, N, 2*H]: forward and backward halves side by side, as the graph's Transpose
            return self.fc(y)

    graph = onnx.load(str(onnx_file)).graph
    w = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}
    model = Recogniser()

    def put(param, value):
        if tuple(param.shape) != tuple(value.shape):
            raise SystemExit(f"error: the twin's {tuple(param.shape)} against the ONNX file's {value.shape}")
        param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    convs = [n for n in graph.node if n.op_type == "Conv"]
    mods = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    lstm = [n for n in graph.node if n.op_type == "LSTM"]
    gemm = [n for n in graph.node if n.op_type == "Gemm"]
    if len(convs) != len(mods) or len(lstm) != 1 or len(gemm) != 1:
        raise SystemExit(f"error: the ONNX file has {len(convs)} Conv, {len(lstm)} LSTM, {len(gemm)} Gemm; the twin "
                         f"{len(mods)}, 1, 1")
    h = HIDDEN
    order = np.r_[0:h, 2 * h:3 * h, 3 * h:4 * h, h:2 * h]  # ONNX i, o, f, c -> PyTorch i, f, g(c), o
    with torch.no_grad():
        for node, mod in zip(convs, mods):
            put(mod.weight, w[node.input[1]])
            put(mod.bias, w[node.input[2]])
        wx, r, b = (w[i] for i in lstm[0].input[1:4])
        for d, suffix in enumerate(("", "_reverse")):
            put(getattr(model.lstm, "weight_ih_l0" + suffix), wx[d][order])
            put(getattr(model.lstm, "weight_hh_l0" + suffix), r[d][order])
            put(getattr(model.lstm, "bias_ih_l0" + suffix), b[d][:4 * h][order])
            put(getattr(model.lstm, "bias_hh_l0" + suffix), b[d][4 * h:][order])
        put(model.fc.weight, w[gemm[0].input[1]])
        put(model.fc.bias, w[gemm[0].input[2]])
    return model


def architecture(onnx_file: Path) -> dict:
    """What the ONNX file holds, counted from the graph."""
    import collections

    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_file))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    lstm = next(n for n in m.graph.node if n.op_type == "LSTM")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lstm.attribute}
    trained = sum(int(np.prod(weights[i].shape)) for n in m.graph.node if n.op_type in ("Conv", "LSTM", "Gemm")
                  for i in n.input if i in weights)
    return {"file": str(onnx_file), "bytes": onnx_file.stat().st_size, "opset": m.opset_import[0].version,
            "ops": dict(ops.most_common()), "weights": trained,
            "lstm": {"direction": attrs.get("direction", b"forward").decode(), "hidden_size": attrs["hidden_size"],
                     "input_size": int(weights[lstm.input[1]].shape[-1])},
            "classes": int(weights[next(n for n in m.graph.node if n.op_type == "Gemm").input[1]].shape[0])}





def sqnr_db(ref, x) -> float:
    import numpy as np

    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    noise = float(np.sum((ref - x) ** 2))
    return float("inf") if noise == 0 else round(10 * np.log10(float(np.sum(ref**2)) / noise), 2)


def load_batch(data: Path, lo: int, n: int):
    import numpy as np

    files = sorted(data.glob("*.npy"))[lo:lo + n]
    return np.stack([np.load(f) for f in files]).astype(np.float32)  # [n, 1, 64, W]


# ---- children ------------------------------------------------------------------------------------------------
def data_child(args) -> None:
    """steps x batch .npy tensors [1, 64, W]: the lstmrec lines stretched to W, or random."""
    import numpy as np
    from PIL import Image

    root = Path(args.data_child)
    root.mkdir(parents=True, exist_ok=True)
    n = args.steps * args.batch
    lines = sorted(CACHE_LINES.glob("*.npy")) if CACHE_LINES.is_dir() else []
    rng = np.random.default_rng(SEED)
    for i in range(n):
        if lines:
            a = np.load(lines[i % len(lines)])[0]
            a = np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((args.width, HEIGHT), Image.BILINEAR))
            a = np.clip(a, 0.0, 1.0)[None]
        else:
            a = rng.random((1, HEIGHT, args.width), dtype=np.float32)
        np.save(root / f"{i:05d}.npy", a.astype(np.float32))
    info = {"tensors": n, "shape": [1, HEIGHT, args.width],
            "source": (f"{CACHE_LINES.relative_to(ROOT)}: the first {min(n, len(lines))} of {len(lines)} real "
                       f"captcha lines, stretched (bilinear) to width {args.width}"
                       + (" (cycled)" if n > len(lines) else "")) if lines else
                      "random uniform [0, 1) (the lstmrec cache is missing)"}
    Path(args.child_out).write_text(json.dumps(info), encoding="utf-8")


def check_child(args) -> None:
    """The twin's eval forward against onnxruntime's on the first batch (image by image: batch 1 declared)."""
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    path = model_path()
    x = load_batch(Path(args.data), 0, args.batch)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the file declares its output [1, seqlen]: ort warns at every run
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ref = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))], axis=1)
    model = build_twin(path).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    params = sum(p.numel() for p in model.parameters())
    info = {"images": len(x), "onnxruntime_shape": list(ref.shape), "twin_shape": list(out.shape),
            "max_abs_diff": float(np.abs(ref - out).max()) if ref.shape == out.shape else None,
            "max_abs_output": float(np.abs(ref).max()), "sqnr_db": sqnr_db(ref, out) if ref.shape == out.shape
            else None, "argmax_agreement": float(np.mean(ref.argmax(-1) == out.argmax(-1)))
            if ref.shape == out.shape else None, "twin_params": params, "architecture": architecture(path)}
    Path(args.child_out).write_text(json.dumps(info), encoding="utf-8")


def torch_child(args) -> None:
    import copy
    import resource
    import warnings

    rss_start = proc_status_mb("self", "VmRSS")
    import torch
    import torch.nn.functional as F
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rss_import = proc_status_mb("self", "VmRSS")
    batch, steps = args.batch, args.steps
    float_model = build_twin(model_path())
    teacher = copy.deepcopy(float_model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    prepared = prepare_qat_fx(float_model.train(), get_default_qat_qconfig_mapping("x86"),
                              example_inputs=(torch.zeros(1, 1, HEIGHT, args.width),))
    prepared.train()
    fake_quants = sum(1 for n, _ in prepared.named_children() if n.startswith("activation_post_process_"))
    qat_modules = sorted({type(m).__module__ + "." + type(m).__name__ for m in prepared.modules()
                          if "qat" in type(m).__module__})
    images = torch.from_numpy(load_batch(Path(args.data), 0, steps * batch))  # as many tensors as qatool holds
    opt = torch.optim.Adam(prepared.parameters(), lr=LR)
    rss_prepared = proc_status_mb("self", "VmRSS")
    times, teacher_times, losses = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        x = images[step * batch:(step + 1) * batch]
        with torch.no_grad():
            target = F.log_softmax(teacher(x), dim=-1)
        t1 = time.perf_counter()
        out = prepared(x)
        # qatool's kl: KL(softmax(teacher) || softmax(student)) over the classes, the mean over the T x N positions
        loss = F.kl_div(F.log_softmax(out, dim=-1), target, reduction="none", log_target=True).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        times.append((t2 - t0) * 1e3)
        teacher_times.append((t1 - t0) * 1e3)
        losses.append(round(float(loss.detach()), 6))
    student = [t - s for t, s in zip(times, teacher_times)]
    info = {"ms": [round(t, 2) for t in times], "ms_per_step": median_after_first(times),
            "ms_per_step_min": round(min(times), 2), "teacher_ms": [round(t, 2) for t in teacher_times],
            "teacher_ms_median": median_after_first(teacher_times),
            "student_ms": [round(t, 2) for t in student], "student_ms_per_step": median_after_first(student),
            "losses": losses, "peak_rss_mb": maxrss_mb(resource.getrusage(resource.RUSAGE_SELF)),
            "rss_at_start_mb": rss_start, "rss_after_import_mb": rss_import, "rss_before_first_step_mb": rss_prepared,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "activation_fake_quants": fake_quants,
            "qat_modules": qat_modules, "lstm_module": type(prepared.lstm).__name__,
            "qconfig_mapping": 'get_default_qat_qconfig_mapping("x86")', "optimizer": f"Adam lr {LR}"}
    Path(args.child_out).write_text(json.dumps(info), encoding="utf-8")


def lstm_child(args) -> None:
    """The LSTM alone: qatool's engine, onnxruntime float and onnxruntime DynamicQuantizeLSTM, eval forward."""
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qatool.engine.model import load as qatool_load

    warnings.filterwarnings("ignore")
    work = Path(args.lstm_child)
    work.mkdir(parents=True, exist_ok=True)
    path = model_path()
    src = onnx.load(str(path))
    node = next(n for n in src.graph.node if n.op_type == "LSTM")
    w = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    feat_name = node.input[0]

    # the LSTM's input: onnxruntime's float CNN features of the first batch (image by image: batch 1 declared)
    cut = onnx.load(str(path))
    cut.graph.output.append(helper.make_tensor_value_info(feat_name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(cut.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = load_batch(Path(args.data), 0, args.batch)
    feats = np.concatenate([sess.run([feat_name], {sess.get_inputs()[0].name: x[i:i + 1]})[0]
                            for i in range(len(x))], axis=1).astype(np.float32)  # [T, N, 512]
    del sess

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    one = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="LSTM",
                           direction=attrs["direction"].decode(), hidden_size=attrs["hidden_size"])
    graph = helper.make_graph(
        [one], "lstm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", feats.shape[-1]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 2, "N", attrs["hidden_size"]])],
        [numpy_helper.from_array(w[node.input[i]].astype(np.float32), k) for i, k in ((1, "W"), (2, "R"), (3, "B"))])
    lstm_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    lstm_model.ir_version = src.ir_version
    onnx.checker.check_model(lstm_model)
    f_float, f_dyn = work / "lstm_float.onnx", work / "lstm_dynamic.onnx"
    onnx.save(lstm_model, str(f_float))
    f_dyn_pc = work / "lstm_dynamic_per_channel.onnx"
    quantize_dynamic(str(f_float), str(f_dyn), op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8)
    quantize_dynamic(str(f_float), str(f_dyn_pc), op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8,
                     per_channel=True)
    dyn_ops = sorted({n.op_type for n in onnx.load(str(f_dyn)).graph.node})

    def session(p):
        s = ort.SessionOptions()
        s.log_severity_level = 3
        s.intra_op_num_threads = args.threads
        return ort.InferenceSession(str(p), s, providers=["CPUExecutionProvider"])

    s_float, s_dyn, s_dyn_pc = session(f_float), session(f_dyn), session(f_dyn_pc)
    engine = qatool_load(str(f_float))
    runners = {"qatool_engine": lambda a: engine.forward({"X": a})[0],
               "ort_float": lambda a: s_float.run(["Y"], {"X": a})[0],
               "ort_dynamic_quantize_lstm": lambda a: s_dyn.run(["Y"], {"X": a})[0],
               "ort_dynamic_quantize_lstm_per_channel": lambda a: s_dyn_pc.run(["Y"], {"X": a})[0]}
    rounds = args.lstm_rounds
    out = {"input": f"onnxruntime's float CNN features of the first batch, [T, N, {feats.shape[-1]}] = "
                    f"{list(feats.shape)}", "rounds": rounds, "threads": args.threads,
           "dynamic_model_ops": dyn_ops, "bytes": {"float": f_float.stat().st_size, "dynamic": f_dyn.stat().st_size},
           "batches": {}}
    for n in sorted({args.batch, 1}, reverse=True):
        a = np.ascontiguousarray(feats[:, :n])
        ys = {k: r(a) for k, r in runners.items()}  # a warm-up run each, and the outputs compared
        ms = {k: [] for k in runners}
        for _ in range(rounds):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r(a)
                ms[k].append((time.perf_counter() - t0) * 1e3)
        ref = ys["ort_float"]
        row = {}
        for k in runners:
            row[k] = {"ms": round(statistics.median(ms[k]), 3), "ms_min": round(min(ms[k]), 3),
                      "ms_all": [round(t, 3) for t in ms[k]]}
            if k != "ort_float":
                row[k].update(sqnr_db=sqnr_db(ref, ys[k]), max_abs_diff=float(np.abs(ref - ys[k]).max()))
        for k in runners:
            if k != "ort_float":
                row[k]["speedup_vs_ort_float"] = round(row["ort_float"]["ms"] / row[k]["ms"], 3)
        row["max_abs_output"] = float(np.abs(ref).max())
        out["batches"][str(n)] = row

    # the whole model with only its LSTM as DynamicQuantizeLSTM (all else float): what the int8 LSTM costs the
    # logits, image by image (the file declares batch 1), and its batch-1 latency against the float model's
    def greedy(logits):  # CTC greedy decoding per image: argmax, merge repeats, drop the blank (class 0)
        seqs = []
        for j in range(logits.shape[1]):
            best = logits[:, j].argmax(-1)
            seqs.append([int(c) for k, c in enumerate(best) if c != 0 and (k == 0 or c != best[k - 1])])
        return seqs

    s_f = session(path)
    name = s_f.get_inputs()[0].name
    ref = np.concatenate([s_f.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))], axis=1)
    out["whole_model_lstm_dynamic"] = {}
    for variant, per_channel in (("per_direction", False), ("per_channel", True)):
        f_whole = work / f"common_lstm_dynamic_{variant}.onnx"
        quantize_dynamic(str(path), str(f_whole), op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8,
                         per_channel=per_channel)
        s_q = session(f_whole)
        got = np.concatenate([s_q.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))], axis=1)
        ms = {"float": [], "lstm_dynamic": []}
        one = x[:1]
        for s_ in (s_f, s_q):
            s_.run(None, {name: one})
        for _ in range(rounds):
            for s_, k in ((s_f, "float"), (s_q, "lstm_dynamic")):
                t0 = time.perf_counter()
                s_.run(None, {name: one})
                ms[k].append((time.perf_counter() - t0) * 1e3)
        out["whole_model_lstm_dynamic"][variant] = {
            "images": len(x), "logits_sqnr_db": sqnr_db(ref, got),
            "argmax_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
            "greedy_sequence_agreement": float(np.mean([a == b for a, b in zip(greedy(ref), greedy(got))])),
            "batch1_ms_float": round(statistics.median(ms["float"]), 3),
            "batch1_ms_lstm_dynamic": round(statistics.median(ms["lstm_dynamic"]), 3),
            "bytes_float": path.stat().st_size, "bytes_lstm_dynamic": f_whole.stat().st_size}
    Path(args.child_out).write_text(json.dumps(out), encoding="utf-8")


# ---- the harness ---------------------------------------------------------------------------------------------
def run_qatool(args, work: Path, data: Path, env: dict, r: int) -> dict:
    out_dir = work / f"qatool_out_{r}"
    shutil.rmtree(out_dir, ignore_errors=True)  # qatool appends to an existing metrics.jsonl
    steps = str(args.steps)
    cmd = [args.qatool, "train-quant", str(model_path()), "--train-data", str(data), "-o", str(out_dir),
           "--batch-size", str(args.batch), "--steps", steps, "--seed", str(SEED), "--init", "observe",
           "--freeze-observers-after", steps, "--optimizer", "adam", "--lr", str(LR), "--schedule", "constant", "-q"]
    log(f"run {r + 1}: qatool train-quant, {args.steps} steps at batch {args.batch}, width {args.width}")
    load0 = load_avg()
    q = run_child(cmd, env, work / f"qatool_{r}.log", metrics=out_dir / "metrics.jsonl", steps=args.steps)
    q.update(command=" ".join(cmd), load_average_before=load0, load_average_after=load_avg())
    if q["returncode"] == 0:
        ms = read_metrics(out_dir / "metrics.jsonl")
        report = json.loads((out_dir / "report.json").read_text())
        placement = report.get("placement", {})
        counts = {k: (len(v) if isinstance(v, (list, dict)) else v) for k, v in placement.items()}
        q.update(ms=ms, ms_per_step=median_after_first(ms), ms_per_step_min=min(ms),
                 peak_rss_mb=report.get("peak_rss_mb"), report_ms_per_step=report.get("ms_per_step"),
                 final_loss=report.get("final_loss"), objective=report.get("objective"), placement_counts=counts)
        log(f"run {r + 1}: qatool {q['ms_per_step']:.1f} ms/step, peak RSS {q['peak_rss_mb']} MB "
            f"(through training {q['vmhwm_train_mb']} MB), {q['wall_s']} s in all")
    else:
        log(f"run {r + 1}: qatool failed: {q['error']}")
    if not args.workdir:
        shutil.rmtree(out_dir, ignore_errors=True)
    return q


def run_torch(args, work: Path, data: Path, env: dict, r: int) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    info_path = work / f"torch_{r}.json"
    log(f"run {r + 1}: PyTorch FX QAT")
    load0 = load_avg()
    t = run_child(me + ["--torch-child", "--data", str(data), "--child-out", str(info_path)] + common_args(args),
                  env, work / f"torch_{r}.log")
    t.update(load_average_before=load0, load_average_after=load_avg())
    if t["returncode"] == 0:
        t.update(json.loads(info_path.read_text()))
        log(f"run {r + 1}: PyTorch {t['ms_per_step']:.1f} ms/step (teacher {t['teacher_ms_median']:.1f} ms of it), "
            f"peak RSS {t['peak_rss_mb']} MB, {t['wall_s']} s in all")
    else:
        log(f"run {r + 1}: PyTorch failed: {t['error']}")
    return t


def common_args(args) -> list[str]:
    return ["--batch", str(args.batch), "--width", str(args.width), "--steps", str(args.steps),
            "--threads", str(args.threads)]


def summarise(res: dict) -> dict:
    """Pooled medians, per-pair ratios, RSS: what the table says."""
    runs = res["runs"]
    q_ok = [r["qatool"] for r in runs if r.get("qatool", {}).get("returncode") == 0]
    t_ok = [r["torch"] for r in runs if r.get("torch", {}).get("returncode") == 0]
    s: dict = {"ratio_target": RATIO_TARGET}
    if not q_ok or not t_ok:
        return s
    q_steps = [m for q in q_ok for m in q["ms"][1:]]
    t_steps = [m for t in t_ok for m in t["ms"][1:]]
    st_steps = [m for t in t_ok for m in t["student_ms"][1:]]
    te_steps = [m for t in t_ok for m in t["teacher_ms"][1:]]
    s["qatool_ms"] = round(statistics.median(q_steps), 1)
    s["qatool_ms_range"] = [round(min(q["ms_per_step"] for q in q_ok), 1),
                            round(max(q["ms_per_step"] for q in q_ok), 1)]
    s["torch_ms"] = round(statistics.median(t_steps), 1)
    s["torch_ms_range"] = [round(min(t["ms_per_step"] for t in t_ok), 1),
                           round(max(t["ms_per_step"] for t in t_ok), 1)]
    s["torch_student_ms"] = round(statistics.median(st_steps), 1)
    s["torch_teacher_ms"] = round(statistics.median(te_steps), 1)
    s["ratio"] = round(s["qatool_ms"] / s["torch_ms"], 3)
    s["ratio_vs_student_only"] = round(s["qatool_ms"] / s["torch_student_ms"], 3)
    pairs = [(r["qatool"], r["torch"]) for r in runs
             if r.get("qatool", {}).get("returncode") == 0 and r.get("torch", {}).get("returncode") == 0]
    s["pair_ratios"] = [round(q["ms_per_step"] / t["ms_per_step"], 3) for q, t in pairs]
    s["pair_ratios_student_only"] = [round(q["ms_per_step"] / t["student_ms_per_step"], 3) for q, t in pairs]
    s["ratio_met"] = s["ratio"] <= RATIO_TARGET
    s["qatool_peak_rss_mb"] = max(q["peak_rss_mb"] for q in q_ok)
    s["qatool_rss_through_training_mb"] = max((q["vmhwm_train_mb"] or 0) for q in q_ok) or None
    s["torch_peak_rss_mb"] = max(t["peak_rss_mb"] for t in t_ok)
    return s


def _fmt(v, spec="{:,.0f}") -> str:
    return "—" if v is None else spec.format(v)


def render(res: dict) -> str:
    st, s, chk = res["settings"], res.get("summary", {}), res.get("check", {})
    lines = [f"LSTM speed benchmark: ddddocr 1.6.1 common.onnx (CNN + bi-LSTM 512 + Gemm 8210), batch {st['batch']}, "
             f"width {st['width']} ({-(-st['width'] // 8)} time steps), {st['steps']} steps per run (ms/step: steps "
             f"2..{st['steps']}), {st['threads']} thread(s), {st['repeats']} interleaved run(s) per side; "
             f"{res.get('when', '')}", ""]
    if chk:
        lines.append(f"Twin check (PyTorch eval vs onnxruntime, {chk.get('images')} images): max abs diff "
                     f"{_fmt(chk.get('max_abs_diff'), '{:.2e}')} (outputs up to "
                     f"{_fmt(chk.get('max_abs_output'), '{:.1f}')}), "
                     f"SQNR {_fmt(chk.get('sqnr_db'), '{:.1f}')} dB, argmax agreement "
                     f"{_fmt(chk.get('argmax_agreement'), '{:.4f}')}. Data: {res.get('data', {}).get('source', '?')}.")
        lines.append("")
    lines += ["| run | side | ms/step (median) | min | steps' ms | peak RSS MB | load before |",
              "|--:|---|--:|--:|---|--:|---|"]
    for i, r in enumerate(res["runs"]):
        q, t = r.get("qatool", {}), r.get("torch", {})
        if q:
            lines.append(f"| {i + 1} | qatool | {_fmt(q.get('ms_per_step'), '{:,.1f}')} | "
                         f"{_fmt(q.get('ms_per_step_min'), '{:,.1f}')} | "
                         f"{', '.join(f'{m:.0f}' for m in q.get('ms', [])) or q.get('error')} | "
                         f"{_fmt(q.get('peak_rss_mb'))} (training {_fmt(q.get('vmhwm_train_mb'))}) | "
                         f"{q.get('load_average_before')} |")
        if t:
            lines.append(f"| {i + 1} | PyTorch (teacher {_fmt(t.get('teacher_ms_median'), '{:,.0f}')}) | "
                         f"{_fmt(t.get('ms_per_step'), '{:,.1f}')} | {_fmt(t.get('ms_per_step_min'), '{:,.1f}')} | "
                         f"{', '.join(f'{m:.0f}' for m in t.get('ms', [])) or t.get('error')} | "
                         f"{_fmt(t.get('peak_rss_mb'))} | {t.get('load_average_before')} |")
    if s.get("ratio") is not None:
        lines += ["",
                  f"- qatool {s['qatool_ms']:,.1f} ms/step (run medians {s['qatool_ms_range'][0]:,.1f}..."
                  f"{s['qatool_ms_range'][1]:,.1f}); PyTorch FX QAT with its float teacher forward "
                  f"{s['torch_ms']:,.1f} ms/step (run medians {s['torch_ms_range'][0]:,.1f}..."
                  f"{s['torch_ms_range'][1]:,.1f}; "
                  f"the teacher {s['torch_teacher_ms']:,.1f} ms of it, the student's step alone "
                  f"{s['torch_student_ms']:,.1f} ms).",
                  f"- ratio qatool / PyTorch (same work: teacher forward + QAT step) **{s['ratio']:.2f}** "
                  f"(per run pair "
                  f"{', '.join(f'{v:.2f}' for v in s['pair_ratios'])}) against <= {RATIO_TARGET:g}: "
                  f"{'MET' if s['ratio_met'] else 'NOT met'}; against PyTorch's student step alone "
                  f"{s['ratio_vs_student_only']:.2f} (per pair "
                  f"{', '.join(f'{v:.2f}' for v in s['pair_ratios_student_only'])}).",
                  f"- peak RSS: qatool {s['qatool_peak_rss_mb']:,.0f} MB (whole run; through training "
                  f"{_fmt(s.get('qatool_rss_through_training_mb'))} MB), PyTorch {s['torch_peak_rss_mb']:,.0f} MB."]
    ls = res.get("lstm_alone")
    if ls and ls.get("batches"):
        lines += ["", f"The LSTM alone (bidirectional, hidden 512, input {ls['input']}), eval forward, median of "
                      f"{ls['rounds']} interleaved rounds, {ls['threads']} thread(s):", "",
                  "| batch | runtime | ms | onnxruntime float's ms / this | SQNR vs float dB | max abs diff |",
                  "|--:|---|--:|--:|--:|--:|"]
        names = {"qatool_engine": "qatool engine (numpy float32)", "ort_float": "onnxruntime LSTM (float)",
                 "ort_dynamic_quantize_lstm": "onnxruntime DynamicQuantizeLSTM (int8 weights, a scale per direction)",
                 "ort_dynamic_quantize_lstm_per_channel": "onnxruntime DynamicQuantizeLSTM, per_channel=True"}
        for n, row in ls["batches"].items():
            for k, title in names.items():
                v = row[k]
                lines.append(f"| {n} | {title} | {v['ms']:,.2f} | "
                             f"{_fmt(v.get('speedup_vs_ort_float'), '{:.2f}')} | "
                             f"{_fmt(v.get('sqnr_db'), '{:.1f}')} | {_fmt(v.get('max_abs_diff'), '{:.2e}')} |")
        lines.append("")
        for variant, w in ls.get("whole_model_lstm_dynamic", {}).items():
            lines += [f"- The whole model with its LSTM as DynamicQuantizeLSTM ({variant.replace('_', ' ')} weight "
                      f"scales; everything else float), on {w['images']} lines: logits SQNR {w['logits_sqnr_db']:.1f} "
                      f"dB against float, per-position argmax agreement {w['argmax_agreement']:.4f}, greedy-decoded "
                      f"sequences equal {w['greedy_sequence_agreement']:.3f}; batch-1 latency "
                      f"{w['batch1_ms_float']:.1f} ms float, {w['batch1_ms_lstm_dynamic']:.1f} ms with it; file "
                      f"{w['bytes_float'] / 1e6:.1f} MB -> {w['bytes_lstm_dynamic'] / 1e6:.1f} MB."]
    if st.get("smoke") or st["batch"] != DEFAULTS["batch"]:
        lines.append("- (a smoke configuration, not the issue's batch 32: the verdict says nothing about the target)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, help=f"batch size (default {DEFAULTS['batch']})")
    p.add_argument("--width", type=int, help=f"input width (default {DEFAULTS['width']}: 20 time steps)")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--threads", type=int, help="torch threads and OMP/OpenBLAS/MKL threads of every child "
                                               f"(default {DEFAULTS['threads']})")
    p.add_argument("--repeats", type=int, help=f"interleaved runs per side (default {DEFAULTS['repeats']})")
    p.add_argument("--smoke", action="store_true", help="quick check: batch 4, 3 steps, 1 thread, one run per side, "
                                                        f"{LSTM_ROUNDS_SMOKE} LSTM rounds (explicit options win)")
    p.add_argument("--no-lstm", action="store_true", help="skip the LSTM-alone measurement")
    p.add_argument("--lstm-rounds", type=int, help=f"LSTM-alone rounds (default {LSTM_ROUNDS})")
    p.add_argument("--qatool", default=str(DEFAULT_QATOOL), help="the qatool executable (default .venv/bin/qatool)")
    p.add_argument("--out", help="results JSON (default: bench/results/lstm_speed.json for the default "
                                 "configuration, none otherwise)")
    p.add_argument("--render", action="store_true", help="print the Markdown table")
    p.add_argument("--no-run", action="store_true", help="render the existing --out (implies --render)")
    p.add_argument("--workdir", help="keep the data, logs and qatool outputs here (default: a temporary folder, "
                                     "deleted at the end)")
    # hidden: the children
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-child", help=argparse.SUPPRESS)
    p.add_argument("--lstm-child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lstm_rounds is None:
        args.lstm_rounds = LSTM_ROUNDS_SMOKE if args.smoke else LSTM_ROUNDS

    if args.torch_child:
        torch_child(args)
        return 0
    if args.check_child:
        check_child(args)
        return 0
    if args.data_child:
        data_child(args)
        return 0
    if args.lstm_child:
        lstm_child(args)
        return 0

    if args.no_run:
        path = Path(args.out or RESULTS)
        if not path.exists():
            p.error(f"--no-run: {path} does not exist")
        print(render(json.loads(path.read_text(encoding="utf-8"))))
        return 0

    if shutil.which(args.qatool) is None:
        p.error(f"--qatool {args.qatool}: no such executable")
    if min(args.batch, args.width, args.steps, args.threads, args.repeats) < 1:
        p.error("--batch, --width, --steps, --threads and --repeats must be at least 1")
    model_path()
    is_default = not args.smoke and all(getattr(args, k) == v for k, v in DEFAULTS.items())
    out_path = Path(args.out) if args.out else (RESULTS if is_default else None)
    env = child_env(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lstm_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    t_start = time.perf_counter()
    res = {"benchmark": "lstm_speed (CNN+LSTM recogniser, QAT step within 2x of PyTorch)",
           "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "settings": {"batch": args.batch, "width": args.width, "steps": args.steps, "threads": args.threads,
                        "repeats": args.repeats, "smoke": args.smoke, "qatool": args.qatool,
                        "python": sys.version.split()[0], "cpus": os.cpu_count(), "lstm_rounds": args.lstm_rounds},
           "runs": []}
    rc = 0
    try:
        data = work / "data"
        log(f"writing {args.steps * args.batch} tensors [1, {HEIGHT}, {args.width}]")
        d = run_child(me + ["--data-child", str(data), "--child-out", str(work / "data.json")] + common_args(args),
                      env, work / "data.log")
        if d["returncode"] != 0:
            log(f"the data writer failed: {d['error']}")
            return 1
        res["data"] = json.loads((work / "data.json").read_text())
        log(f"data: {res['data']['source']}")

        log("checking the PyTorch twin against onnxruntime")
        c = run_child(me + ["--check-child", "--data", str(data), "--child-out", str(work / "check.json")]
                      + common_args(args), env, work / "check.log")
        if c["returncode"] != 0:
            log(f"the twin check failed: {c['error']}")
            return 1
        res["check"] = json.loads((work / "check.json").read_text())
        chk = res["check"]
        log(f"twin vs onnxruntime on {chk['images']} images: max abs diff {chk['max_abs_diff']:.2e} "
            f"(outputs up to {chk['max_abs_output']:.1f}), SQNR {chk['sqnr_db']} dB")
        if chk["max_abs_diff"] is None or chk["max_abs_diff"] > 1e-3 * max(1.0, chk["max_abs_output"]):
            log("error: the PyTorch twin does not compute what the ONNX model computes")
            return 1

        for r in range(args.repeats):
            res["runs"].append({"qatool": run_qatool(args, work, data, env, r)})
            res["runs"][-1]["torch"] = run_torch(args, work, data, env, r)
        res["summary"] = summarise(res)

        if not args.no_lstm:
            log(f"the LSTM alone: qatool engine, onnxruntime float, DynamicQuantizeLSTM ({args.lstm_rounds} rounds)")
            lp = work / "lstm.json"
            lc = run_child(me + ["--lstm-child", str(work / "lstm"), "--data", str(data), "--child-out", str(lp),
                                 "--lstm-rounds", str(args.lstm_rounds)] + common_args(args), env, work / "lstm.log")
            if lc["returncode"] == 0:
                res["lstm_alone"] = json.loads(lp.read_text())
            else:
                res["lstm_alone"] = {"error": lc["error"]}
                log(f"the LSTM-alone measurement failed: {lc['error']}")
                rc = 1
    finally:
        finish_run(res, t_start, out_path, work, keep_work=bool(args.workdir))
    log(f"done in {res['wall_s']} s")
    if args.render:
        print(render(res))
    ok = all(r.get("qatool", {}).get("returncode") == 0 and r.get("torch", {}).get("returncode") == 0
             for r in res["runs"])
    return rc if ok else 1


if __name__ == "__main__":
    sys.exit(main())
