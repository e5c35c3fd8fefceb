"""Scale benchmark (issue 14): one QAT training step of qatool against PyTorch FX QAT at real sizes.

    .venv/bin/python bench/scale_bench.py --render                 # the full run: writes bench/results/scale_bench.json
    .venv/bin/python bench/scale_bench.py --size 64x64 --batch 4 --steps 3 --models mobilenetv2,resnet18 \\
        --threads 1 --out /tmp/scale_smoke.json --render           # a smoke run (~25 s)
    .venv/bin/python bench/scale_bench.py --no-run --out bench/results/scale_bench.json   # the table again

What is measured. For each model -- torchvision's MobileNetV2 (width 1.0, inverted residuals, ReLU6), ResNet18
(BasicBlock) and ResNet50 (Bottleneck, stride on the 3x3 conv as torchvision's V1.5), all with BN and 1000
classes, written out below in plain PyTorch with torchvision's layer shapes and initialisation (the parameter
counts are checked against torchvision's: 3,504,872 / 11,689,512 / 25,557,032), random seeded weights -- on
224x224 RGB input at batch 32 by default:

1. qatool: the model is exported by torch.onnx.export (TorchScript exporter, opset 17, eval mode, input "input"
   with a dynamic batch axis, no constant folding so BatchNormalization stays; the export is refused if it has
   no BatchNormalization node), then `qatool train-quant MODEL.onnx --train-data LIST ...` runs as a subprocess
   on a list file of `relative/path label` lines (random RGB PNGs of the input size, 2 x batch of them, random
   labels below 1000: a list file takes any labels below the model's output count). Nothing runs before the
   first step that the peer does not do: `--init observe` (no calibration pass), `--freeze-bn-after STEPS` and
   `--freeze-observers-after STEPS` (no BN evidence check; BN trains with batch statistics and the activation
   observers move through the whole run, as in the PyTorch loop), no --val-data (no validation). SGD lr 1e-3
   momentum 0.9, constant schedule, 8-bit weights and activations (qatool's defaults). Read back:
   OUTDIR/metrics.jsonl's per-step "ms" (the step as qatool's loop times it: batch normalisation, forward,
   cross-entropy, backward, SGD update) and OUTDIR/report.json's "peak_rss_mb" (ru_maxrss of the qatool process
   at its end, i.e. including the int8 export and its onnxruntime checks after training). Also recorded: the
   child's ru_maxrss from os.wait4 (should equal report.json's), and the process's VmHWM from /proc polled every
   0.1 s, taken when metrics.jsonl first holds the last step ("peak through training": loading, graph building
   and the QAT steps, not the export).
2. PyTorch, in its own process (this script re-invoked with --torch-child, so the harness's memory and torch's
   import are not in the other side's figures): the same architecture and seed, train mode,
   `prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), ...)` (Conv+BN(+ReLU) fused into QAT modules,
   fake-quant of weights and activations), SGD lr 1e-3 momentum 0.9, cross-entropy on random labels, the same
   batch of the same number of uint8 images scaled to [0, 1] inside the timed step, `torch.set_num_threads
   (--threads)`. The step is timed from the batch's conversion to the end of `opt.step()`. Peak RSS is the
   process's ru_maxrss (torch's own import included: 222 MB here, recorded as "rss_after_import_mb", and the
   RSS before the first step as "rss_before_first_step_mb"). torchvision's MobileNetV2 has Dropout(0.2) before
   its classifier: PyTorch trains with it, while the eval-mode ONNX export has none (a 32 x 1280 mask: nothing
   in the step time).

ms/step on both sides is the median over the steps after the first. The exporter also runs in a child process
(torch), and so does the image writer, so the harness itself stays at ~15 MB: on Linux a child's ru_maxrss
starts from its parent's high-water mark (fork/vfork + exec), so a large harness would inflate the children's
figures. Every child gets OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = MKL_NUM_THREADS = --threads.

Targets (issue 14): qatool/PyTorch step-time ratio <= 0.8 on MobileNetV2 and <= 1.2 on ResNet18 and ResNet50;
qatool's peak RSS (report.json's peak_rss_mb) <= PyTorch's. The table says which are met.

Budget. Measured on this 2-core machine while other benchmarks kept it at a load of ~4, one thread, 3 steps:
at 64x64 batch 4 (MobileNetV2, ResNet18) the whole run takes 23 s; ResNet50 at 64x64 batch 2, 17 s; all three
at 224x224 batch 4, 87 s, and at batch 8, 111 s (ResNet50 alone 61 s of it: export 4 s, qatool 40 s of which
~30 s are start-up and the int8 export and checks after training, PyTorch 17 s). From batch 4 to batch 8 the
step time grows by about 95 / 150 / 475 ms per image for qatool (MobileNetV2 / ResNet18 / ResNet50) and 195 /
160 / 285 ms per image for PyTorch, so at batch 32 a step is ~3 / 5 / 15 s (qatool) and ~6 / 5 / 10 s (PyTorch)
on one loaded core, and the full run (224x224, batch 32, 6 steps, 3 models) takes ~6 minutes -- allow 15 on
a busy machine, less with 2 free cores. Peak memory grows by ~120 MB (qatool) and ~75-220 MB (PyTorch) per
image of the batch: at batch 32 about 4 GB for MobileNetV2 and ResNet18 and about 8 GB on each side for
ResNet50, so it needs ~9 GB free (the runs are sequential). Run it on an otherwise idle machine: step times of
a shared machine are not comparable across runs, and two threads on two cores that other work also uses are
worse than one (ResNet18 at 64x64 batch 4 under a load of 4: PyTorch 207 ms/step with one thread, 326 to 5,158
ms with two; qatool 126 against 259-317 ms). The JSON keeps every step's ms and the fastest step
("ms_per_step_min") of each side.

Smoke settings: `--size 64x64 --batch 4 --steps 3 --threads 1` (ResNet50: `--batch 2`). Not 32x32 at batch 2:
there qatool stops at its second step on ResNet50 and MobileNetV2 ("training diverged ... non-finite values";
BN with batch statistics over two values per channel where the last feature maps are 1x1, presumably; ResNet18
trains there), while PyTorch trains on.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale_bench.json"
DEFAULT_QATOOL = ROOT / ".venv" / "bin" / "qatool"
MODELS = ("mobilenetv2", "resnet18", "resnet50")
TITLES = {"mobilenetv2": "MobileNetV2 1.0", "resnet18": "ResNet18", "resnet50": "ResNet50"}
TORCHVISION_PARAMS = {"mobilenetv2": 3_504_872, "resnet18": 11_689_512, "resnet50": 25_557_032}
RATIO_TARGET = {"mobilenetv2": 0.8, "resnet18": 1.2, "resnet50": 1.2}
NUM_CLASSES = 1000
LR, MOMENTUM, SEED = 1e-3, 0.9, 0
DEFAULTS = {"size": "224x224", "batch": 32, "steps": 6, "models": ",".join(MODELS), "threads": 2}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- the architectures (torch is imported only in the children) ------------------------------------------------
def build_model(name: str):
    """torchvision's MobileNetV2 / ResNet18 / ResNet50 in plain PyTorch, seeded, with its initialisation."""
    import torch
    from torch import nn

    def make_divisible(v: float, divisor: int = 8) -> int:
        new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
        return new_v + divisor if new_v < 0.9 * v else new_v

    class ConvBNReLU6(nn.Sequential):
        def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
            super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand_ratio):
            super().__init__()
            hidden = int(round(cin * expand_ratio))
            self.use_res_connect = stride == 1 and cin == cout
            layers = [ConvBNReLU6(cin, hidden, kernel=1)] if expand_ratio != 1 else []
            layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes=NUM_CLASSES, width_mult=1.0, dropout=0.2):
            super().__init__()
            cin, last = make_divisible(32 * width_mult), make_divisible(1280 * max(1.0, width_mult))
            settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                        [6, 320, 1, 1]]
            features = [ConvBNReLU6(3, cin, stride=2)]
            for t, c, n, s in settings:
                cout = make_divisible(c * width_mult)
                for i in range(n):
                    features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            features.append(ConvBNReLU6(cin, last, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(torch.flatten(x, 1))

    def conv3x3(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)

    def conv1x1(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 1, stride, bias=False)

    # the residual add is written `out + identity` (not torchvision's in-place `+=`) and each ReLU is its own
    # module, so FX traces a plain add and fuses each Conv+BN+ReLU once; the layer shapes are torchvision's
    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1, self.bn1, self.relu1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(True)
            self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
            self.downsample, self.relu2 = downsample, nn.ReLU(True)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu2(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1, self.bn1, self.relu1 = conv1x1(cin, planes), nn.BatchNorm2d(planes), nn.ReLU(True)
            self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
            self.relu2 = nn.ReLU(True)
            self.conv3, self.bn3 = conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
            self.downsample, self.relu3 = downsample, nn.ReLU(True)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.relu2(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu3(out + identity)

    class ResNet(nn.Module):
        def __init__(self, block, layers, num_classes=NUM_CLASSES):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], 2)
            self.layer3 = self._make_layer(block, 256, layers[2], 2)
            self.layer4 = self._make_layer(block, 512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    builders = {"mobilenetv2": lambda: MobileNetV2(),
                "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
                "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3])}
    torch.manual_seed(SEED)
    model = builders[name]()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != TORCHVISION_PARAMS[name]:
        raise SystemExit(f"{name}: {n_params:,} parameters, torchvision's has {TORCHVISION_PARAMS[name]:,}")
    return model


# ---- small helpers ---------------------------------------------------------------------------------------------
def parse_size(value: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    h, w = (int(parts[0]), int(parts[-1]))
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"bad size {value!r}")
    return h, w


def maxrss_mb(usage) -> float:
    return round(usage.ru_maxrss / (1024**2 if sys.platform == "darwin" else 1024), 1)


def proc_status_mb(pid: int | str, key: str) -> float | None:
    """VmHWM / VmRSS of a process from /proc, in MB (None when unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


def load_avg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def median_after_first(ms: list[float]) -> float:
    return round(statistics.median(ms[1:] if len(ms) > 1 else ms), 2)


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def last_error_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no output)"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1]


def line_count(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def run_child(cmd: list[str], env: dict, log_path: Path, metrics: Path | None = None, steps: int = 0) -> dict:
    """Run `cmd` with stdout/stderr to files; reap it with os.wait4 for its rusage. While it runs, poll its
    /proc VmHWM; with `metrics`, note the VmHWM when that file first holds `steps` lines."""
    err_path = log_path.with_suffix(".err")
    t0 = time.perf_counter()
    with open(log_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        hwm_train = hwm_last = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            done = metrics is not None and hwm_train is None and line_count(metrics) >= steps
            hwm = proc_status_mb(proc.pid, "VmHWM")  # read after the line count: it covers the last step
            if hwm is not None:
                hwm_last = hwm
                if done:
                    hwm_train = hwm
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"returncode": proc.returncode, "wall_s": round(wall, 1), "wait4_maxrss_mb": maxrss_mb(usage),
            "vmhwm_train_mb": hwm_train, "vmhwm_last_polled_mb": hwm_last,
            "error": None if proc.returncode == 0 else last_error_line(err_path), "log": str(log_path),
            "stderr": str(err_path)}


# ---- children ------------------------------------------------------------------------------------------------
def data_child(args) -> None:
    """2 x batch random RGB PNGs of the input size and a list file of 'relative/path label' lines."""
    import numpy as np
    from PIL import Image

    h, w = parse_size(args.size)
    root = Path(args.data_child)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    n = 2 * args.batch
    labels = rng.integers(0, NUM_CLASSES, n)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(root / "img" / f"{i:05d}.png")
        lines.append(f"img/{i:05d}.png {int(labels[i])}")
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def export_child(args) -> None:
    import warnings

    import onnx
    import torch

    torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)
    name, path = args.export_child
    model = build_model(name).eval()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(model, (torch.zeros(1, 3, h, w),), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17,
                      training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, dynamo=False)
    m = onnx.load(path)
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    n_bn = ops.count("BatchNormalization")
    if n_bn == 0:
        raise SystemExit(f"error: the export of {name} folded BatchNormalization; the benchmark needs it kept")
    info = {"nodes": len(ops), "batchnorm_nodes": n_bn, "conv_nodes": ops.count("Conv"),
            "params": sum(p.numel() for p in model.parameters()), "bytes": os.path.getsize(path)}
    Path(args.child_out).write_text(json.dumps(info), encoding="utf-8")


def torch_child(args) -> None:
    import resource
    import warnings

    rss_start = proc_status_mb("self", "VmRSS")
    import torch
    import torch.nn.functional as F
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization.*deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    rss_import = proc_status_mb("self", "VmRSS")
    h, w = parse_size(args.size)
    name, batch, steps = args.torch_child, args.batch, args.steps
    model = build_model(name).train()
    prepared = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), example_inputs=(torch.zeros(1, 3, h, w),))
    prepared.train()
    n = 2 * batch  # as many uint8 images in memory as qatool holds
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    opt = torch.optim.SGD(prepared.parameters(), lr=LR, momentum=MOMENTUM)
    rss_prepared = proc_status_mb("self", "VmRSS")
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        lo = (step % 2) * batch
        x = images[lo:lo + batch].float().div_(255.0)
        out = prepared(x)
        loss = F.cross_entropy(out, labels[lo:lo + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(round(float(loss.detach()), 5))
    info = {"ms": [round(t, 2) for t in times], "ms_per_step": median_after_first(times),
            "ms_per_step_min": round(min(times), 2), "losses": losses,
            "peak_rss_mb": maxrss_mb(resource.getrusage(resource.RUSAGE_SELF)),
            "rss_at_start_mb": rss_start, "rss_after_import_mb": rss_import, "rss_before_first_step_mb": rss_prepared,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "qconfig_mapping": 'get_default_qat_qconfig_mapping("x86")'}
    Path(args.child_out).write_text(json.dumps(info), encoding="utf-8")


# ---- the harness ---------------------------------------------------------------------------------------------
def finish_run(res: dict, t_start: float, out_path: Path | None, work: Path, keep_work: bool) -> None:
    """A harness's last words, whatever happened: the wall time and its own peak RSS into `res`, `res` written to
    `out_path` (if any), the work folder removed unless the user gave it."""
    import resource

    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["harness_peak_rss_mb"] = maxrss_mb(resource.getrusage(resource.RUSAGE_SELF))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {out_path}")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)


def read_metrics(path: Path) -> list[float]:
    ms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ms.append(float(json.loads(line)["ms"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ms


def run_model(name: str, args, work: Path, data_list: Path, env: dict) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--size", args.size, "--batch", str(args.batch), "--steps", str(args.steps),
              "--threads", str(args.threads)]
    h, w = parse_size(args.size)
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)
    onnx_path, result = mdir / f"{name}.onnx", {"model": name}

    log(f"{name}: exporting to ONNX")
    info_path = mdir / "export.json"
    ex = run_child(me + ["--export-child", name, str(onnx_path), "--child-out", str(info_path)] + common,
                   env, mdir / "export.log")
    result["export"] = {**ex, **(json.loads(info_path.read_text()) if ex["returncode"] == 0 else {})}
    if ex["returncode"] != 0:
        log(f"{name}: export failed: {ex['error']}")
        return result
    log(f"{name}: exported in {ex['wall_s']} s: {result['export']['nodes']} nodes, "
        f"{result['export']['batchnorm_nodes']} BatchNormalization")

    out_dir = mdir / "qatool_out"
    steps = str(args.steps)
    cmd = [args.qatool, "train-quant", str(onnx_path), "--train-data", str(data_list), "--steps", steps,
           "--batch-size", str(args.batch), "--size", f"{h}x{w}", "--color", "rgb", "--init", "observe",
           "--freeze-bn-after", steps, "--freeze-observers-after", steps, "--optimizer", "sgd", "--lr", str(LR),
           "--momentum", str(MOMENTUM), "--schedule", "constant", "--seed", str(SEED), "-o", str(out_dir), "-q"]
    log(f"{name}: qatool train-quant, {args.steps} steps at batch {args.batch}, {h}x{w}")
    load0 = load_avg()
    q = run_child(cmd, env, mdir / "qatool.log", metrics=out_dir / "metrics.jsonl", steps=args.steps)
    q.update(command=" ".join(cmd), load_average_before=load0, load_average_after=load_avg())
    if q["returncode"] == 0:
        ms = read_metrics(out_dir / "metrics.jsonl")
        report = json.loads((out_dir / "report.json").read_text())
        q.update(ms=ms, ms_per_step=median_after_first(ms), ms_per_step_min=min(ms),
                 peak_rss_mb=report.get("peak_rss_mb"), report_ms_per_step=report.get("ms_per_step"),
                 final_loss=report.get("final_loss"),
                 quantized_layers=len(report.get("placement", {}).get("quantized_layers", [])),
                 folded_batchnorm=len(report.get("placement", {}).get("folded_batchnorm", [])))
        log(f"{name}: qatool {q['ms_per_step']:.1f} ms/step, peak RSS {q['peak_rss_mb']} MB "
            f"(through training {q['vmhwm_train_mb']} MB), {q['wall_s']} s in all")
    else:
        log(f"{name}: qatool failed: {q['error']}")
    result["qatool"] = q

    log(f"{name}: PyTorch FX QAT")
    tinfo = mdir / "torch.json"
    load0 = load_avg()
    t = run_child(me + ["--torch-child", name, "--child-out", str(tinfo)] + common, env, mdir / "torch.log")
    t.update(load_average_before=load0, load_average_after=load_avg())
    if t["returncode"] == 0:
        t.update(json.loads(tinfo.read_text()))
        log(f"{name}: PyTorch {t['ms_per_step']:.1f} ms/step, peak RSS {t['peak_rss_mb']} MB, {t['wall_s']} s in all")
    else:
        log(f"{name}: PyTorch failed: {t['error']}")
    result["torch"] = t
    return result


def verdicts(r: dict) -> dict:
    q, t = r.get("qatool", {}), r.get("torch", {})
    out = {"ratio": None, "ratio_target": RATIO_TARGET[r["model"]], "ratio_met": None, "rss_met": None,
           "rss_train_met": None}
    if q.get("ms_per_step") and t.get("ms_per_step"):
        out["ratio"] = round(q["ms_per_step"] / t["ms_per_step"], 3)
        out["ratio_met"] = out["ratio"] <= out["ratio_target"]
    if q.get("peak_rss_mb") and t.get("peak_rss_mb"):
        out["rss_met"] = q["peak_rss_mb"] <= t["peak_rss_mb"]
        if q.get("vmhwm_train_mb"):
            out["rss_train_met"] = q["vmhwm_train_mb"] <= t["peak_rss_mb"]
    return out


def _fmt(v, spec="{:,.0f}") -> str:
    return "—" if v is None else spec.format(v)


def _yes(v) -> str:
    return "—" if v is None else ("met" if v else "**missed**")


def render(res: dict) -> str:
    s = res["settings"]
    lines = [f"Scale benchmark (issue 14): {s['size']} RGB, batch {s['batch']}, {s['steps']} steps "
             f"(ms/step: median of steps 2..{s['steps']}), {s['threads']} thread(s); {res.get('when', '')}",
             "",
             "| model | qatool ms/step | PyTorch ms/step | ratio | target | ratio met | qatool peak RSS MB "
             "(report / wait4 / through training) | PyTorch peak RSS MB (after import) | RSS <= PyTorch |",
             "|---|--:|--:|--:|--:|---|--:|--:|---|"]
    summary = []
    for r in res["models"]:
        q, t, v = r.get("qatool", {}), r.get("torch", {}), verdicts(r)
        name = TITLES[r["model"]]
        rss_q = (f"{_fmt(q.get('peak_rss_mb'))} / {_fmt(q.get('wait4_maxrss_mb'))} / "
                 f"{_fmt(q.get('vmhwm_train_mb'))}")
        rss_t = f"{_fmt(t.get('peak_rss_mb'))} ({_fmt(t.get('rss_after_import_mb'))})"
        lines.append(f"| {name} | {_fmt(q.get('ms_per_step'), '{:,.1f}')} | {_fmt(t.get('ms_per_step'), '{:,.1f}')} "
                     f"| {_fmt(v['ratio'], '{:.2f}')} | <= {v['ratio_target']} | {_yes(v['ratio_met'])} "
                     f"| {rss_q} | {rss_t} | {_yes(v['rss_met'])} |")
        failed = [f"{side} failed: {d['error']}" for side, d in
                  (("export", r.get("export", {})), ("qatool", q), ("PyTorch", t)) if d.get("error")]
        if failed:
            summary.append(f"- {name}: " + "; ".join(failed))
            continue
        if v["ratio"] is not None:
            summary.append(f"- {name}: step ratio {v['ratio']:.2f} against <= {v['ratio_target']}: "
                           f"{'MET' if v['ratio_met'] else 'NOT met'}.")
        if v["rss_met"] is not None:
            extra = ""
            if v["rss_train_met"] and not v["rss_met"]:
                extra = (f" (through training alone, {q['vmhwm_train_mb']:,.0f} MB, it would be met: the end of the "
                         "run, the int8 export and its checks, sets the peak)")
            summary.append(f"- {name}: peak RSS {q['peak_rss_mb']:,.0f} MB against PyTorch's "
                           f"{t['peak_rss_mb']:,.0f} MB: {'MET' if v['rss_met'] else 'NOT met'}{extra}.")
    full = parse_size(s["size"]) == parse_size(DEFAULTS["size"]) and s["batch"] == DEFAULTS["batch"]
    lines += ["", *summary]
    if not full:
        lines.append("- (a smoke configuration, not issue 14's 224x224 batch 32: the verdicts above say nothing "
                     "about the targets)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=DEFAULTS["size"], help="input HxW (default 224x224)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size (default 32)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per run (default 6)")
    p.add_argument("--models", default=DEFAULTS["models"], help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                   help="torch threads and OMP/OpenBLAS/MKL threads of every child (default 2)")
    p.add_argument("--qatool", default=str(DEFAULT_QATOOL), help="the qatool executable (default .venv/bin/qatool)")
    p.add_argument("--out", help="results JSON (default: bench/results/scale_bench.json for the default "
                                 "configuration, none otherwise)")
    p.add_argument("--render", action="store_true", help="print the Markdown table")
    p.add_argument("--no-run", action="store_true", help="render the existing --out (implies --render)")
    p.add_argument("--workdir", help="keep the ONNX files, data and qatool outputs here (default: a temporary "
                                     "folder, deleted at the end)")
    # hidden: the children
    p.add_argument("--torch-child", help=argparse.SUPPRESS)
    p.add_argument("--export-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--data-child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.torch_child:
        torch_child(args)
        return 0
    if args.export_child:
        export_child(args)
        return 0
    if args.data_child:
        data_child(args)
        return 0

    if args.no_run:
        path = Path(args.out or RESULTS)
        if not path.exists():
            p.error(f"--no-run: {path} does not exist")
        print(render(json.loads(path.read_text(encoding="utf-8"))))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    parse_size(args.size)
    if shutil.which(args.qatool) is None:
        p.error(f"--qatool {args.qatool}: no such executable")
    is_default = all(str(getattr(args, k)) == str(v) for k, v in DEFAULTS.items())
    out_path = Path(args.out) if args.out else (RESULTS if is_default else None)
    env = child_env(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="scale_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {"benchmark": "scale_bench (issue 14)", "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "settings": {"size": args.size, "batch": args.batch, "steps": args.steps, "threads": args.threads,
                        "models": models, "qatool": args.qatool, "python": sys.version.split()[0],
                        "cpus": os.cpu_count()},
           "models": []}
    try:
        log(f"writing {2 * args.batch} random {args.size} images")
        d = run_child([sys.executable, str(Path(__file__).resolve()), "--data-child", str(work / "data"),
                       "--size", args.size, "--batch", str(args.batch)], env, work / "data.log")
        if d["returncode"] != 0:
            log(f"the image writer failed: {d['error']}")
            return 1
        for name in models:
            res["models"].append(run_model(name, args, work, work / "data" / "train.txt", env))
    finally:
        finish_run(res, t_start, out_path, work, keep_work=bool(args.workdir))
    log(f"done in {res['wall_s']} s")
    if args.render:
        print(render(res))
    ok = all(r.get("qatool", {}).get("returncode") == 0 and r.get("torch", {}).get("returncode") == 0
             for r in res["models"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
