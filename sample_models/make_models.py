"""Train and export the float sample models (development only: needs torch==2.13.0, qatool never imports it).

    python sample_models/make_data.py && python sample_models/make_models.py

Trains on sample_models/data/mnist/train, measures on .../val, and writes next to this file:

    lenet_bn.onnx            LeNet with BatchNorm and Dropout (as MNN's MNIST demo)
    mobilenetv2_small.onnx   a MobileNetV2-style net sized for 28x28 (inverted residuals, ReLU6 = Clip(0, 6))

Both are exported from eval mode with BatchNormalization and Dropout kept as nodes (not fused, not removed), so
qatool can train them: opset 17, input "input" [N, 1, 28, 28] float32 with a dynamic batch dimension, output
"logits" [N, 10] (no Softmax). Each file's metadata_props carries "qatool.preprocess" (what the input expects)
and "qatool.val_top1_float" (top-1 on the val folder, measured with onnxruntime on the exported file).

The module classes and `load_split` are imported by bench/engine_speed.py; importing this file trains nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "mnist"
SEED = 0
THREADS = 2
OPSET = 17
MEAN, STD = 0.1307, 0.3081
PREPROCESS = {"size": [28, 28], "color": "gray", "mean": [MEAN], "std": [STD], "layout": "NCHW"}


# ---- data --------------------------------------------------------------------------------------------------
def load_split(split: str, root: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """Read an image folder back: x float32 [N, 1, 28, 28] normalised as PREPROCESS says, y int64 [N].

    Class index = position of the folder name in the sorted list of class folders; files in sorted order.
    """
    from PIL import Image

    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / split / name).glob("*.png")):
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("L"), dtype=np.uint8))
            ys.append(label)
    if not xs:
        raise SystemExit(f"no images under {root / split}: run sample_models/make_data.py first")
    x = np.stack(xs).astype(np.float32)[:, None] / np.float32(255)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(ys, dtype=np.int64)


# ---- models ------------------------------------------------------------------------------------------------
class LeNetBN(nn.Module):
    """LeNet as in MNN's MNIST demo, with BatchNorm after each conv: 28x28x1 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.bn1 = nn.BatchNorm2d(20)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.bn2 = nn.BatchNorm2d(50)
        self.fc1 = nn.Linear(800, 500)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 20 x 12 x 12
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 50 x 4 x 4
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (BN, ReLU6), 3x3 depthwise (BN, ReLU6), 1x1 project (BN, linear)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style net for 28x28x1 inputs (28 -> 14 -> 7 spatially)."""

    BLOCKS = [(16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)]  # (in, out, stride), expand 6

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.blocks = nn.Sequential(*[InvertedResidual(i, o, s) for i, o, s in self.BLOCKS])
        self.head = conv_bn(64, 128, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)  # exported as GlobalAveragePool
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


# name -> (class, epochs, learning rate). Adam, batch 64, cosine decay of the learning rate to 0.
MODELS = {
    "lenet_bn": (LeNetBN, 6, 1e-3),
    "mobilenetv2_small": (MobileNetV2Small, 6, 3e-3),
}
BATCH = 64


# ---- training ----------------------------------------------------------------------------------------------
def accuracy_torch(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i : i + 500])) for i in range(0, len(x), 500)])
    return float((logits.argmax(1).numpy() == y).mean())


def train(name: str, xtr: np.ndarray, ytr: np.ndarray, xval: np.ndarray, yval: np.ndarray) -> nn.Module:
    cls, epochs, lr = MODELS[name]
    torch.manual_seed(SEED)
    model = cls()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(xtr) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = accuracy_torch(model, xval, yval)
        print(f"  {name} epoch {epoch + 1}/{epochs}: train loss {total / len(xt):.4f}, val top-1 {acc:.4f}"
              f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return model


# ---- export ------------------------------------------------------------------------------------------------
def _dropout_symbolic(g, input, p, train):
    """aten::dropout -> ONNX Dropout(input, ratio), even from eval mode.

    PyTorch's own symbolic drops Dropout entirely in eval mode; qatool needs the node to train with dropout.
    Without the training_mode input the node is the identity at inference (onnxruntime), so the exported
    model's outputs are exactly the eval-mode outputs.
    """
    from torch.onnx import symbolic_helper

    ratio = symbolic_helper._maybe_get_const(p, "f")
    return g.op("Dropout", input, g.op("Constant", value_t=torch.tensor(ratio, dtype=torch.float32)))


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.register_custom_op_symbolic("aten::dropout", _dropout_symbolic, OPSET)
    try:
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 1, 28, 28),),
            str(path),
            dynamo=False,  # the TorchScript exporter: the only route that keeps BatchNormalization unfused
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            export_params=True,
        )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::dropout", OPSET)


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def ort_logits(path_or_bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + 500]})[0] for i in range(0, len(x), 500)])


def finish(name: str, model: nn.Module, xval: np.ndarray, yval: np.ndarray) -> dict:
    """Export, check the ONNX file against PyTorch, measure val top-1 with onnxruntime, write the metadata."""
    import onnx

    path = HERE / f"{name}.onnx"
    export(model, path)
    proto = onnx.load(str(path))
    counts = op_counts(proto)
    print(f"  {name}: ONNX ops {counts}")
    want_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    want_do = sum(isinstance(m, nn.Dropout) for m in model.modules())
    if counts.get("BatchNormalization", 0) != want_bn or counts.get("Dropout", 0) != want_do:
        raise SystemExit(f"{name}: expected {want_bn} BatchNormalization and {want_do} Dropout nodes, got {counts}")

    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(xval[i : i + 500])) for i in range(0, len(xval), 500)]).numpy()
    got = ort_logits(str(path), xval)
    diff = float(np.abs(got - ref).max())
    print(f"  {name}: onnxruntime vs PyTorch eval logits on {len(xval)} val images: max abs diff {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"{name}: exported model does not reproduce PyTorch (max abs diff {diff})")
    top1 = float((got.argmax(1) == yval).mean())

    del proto.metadata_props[:]
    onnx.helper.set_model_props(
        proto, {"qatool.preprocess": json.dumps(PREPROCESS), "qatool.val_top1_float": f"{top1:.4f}"}
    )
    proto.producer_name = "qatool sample_models/make_models.py (PyTorch " + torch.__version__ + ")"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "file": path.name,
        "params": n_params,
        "bytes": path.stat().st_size,
        "val_top1_onnxruntime": top1,
        "max_abs_diff_vs_torch": diff,
        "ops": counts,
    }
    print(f"  {name}: {n_params} parameters, {info['bytes']} bytes, val top-1 (onnxruntime) {top1:.4f}")
    return info


def main(names: list[str]) -> None:
    if torch.__version__.split("+")[0] != "2.13.0":
        print(f"warning: made with torch 2.13.0, this is {torch.__version__}", file=sys.stderr)
    torch.set_num_threads(THREADS)
    xtr, ytr = load_split("train")
    xval, yval = load_split("val")
    print(f"train {xtr.shape}, val {xval.shape}")
    summary = {}
    for name in names:
        t0 = time.perf_counter()
        model = train(name, xtr, ytr, xval, yval)
        summary[name] = finish(name, model, xval, yval)
        summary[name]["train_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
