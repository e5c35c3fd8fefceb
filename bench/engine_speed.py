"""Engine speed benchmark: one training step of qatool's numpy engine against PyTorch CPU, per sample model.

    .venv/bin/python bench/engine_speed.py                  # the table, and bench/results/engine_speed.json
    .venv/bin/python bench/engine_speed.py --op-profile     # also: where the engine's step time goes, per op

One step = forward in training mode (BatchNorm on batch statistics, Dropout on), softmax cross-entropy on the
logits (mean over the batch), backward, SGD with momentum 0.9 updating every parameter in place. Batch 64 of
real digits from sample_models/data/mnist/val (1x28x28, preprocessed as the models' metadata says). The engine
side uses qatool's own loss and optimiser (qatool.train.loss, qatool.train.optim.SGD); PyTorch its F.cross_entropy
and torch.optim.SGD.

Both sides start from the same weights: the PyTorch module is rebuilt from the class in
sample_models/make_models.py and filled with the ONNX file's initializers by name (the exporter keeps the
state_dict names). PyTorch runs with torch.set_num_threads(2); numpy's BLAS threads are left as they are.
After warm-up the two steps are timed interleaved (qatool, torch, qatool, ...) and the median is reported.

Before timing, the script checks the engine: eval-mode logits equal onnxruntime's on the same batch, training
mode gradients equal PyTorch's (with Dropout's ratio set to 0 on both sides so the step is deterministic), and
20 engine steps lower the loss. A failed check stops the script with a non-zero exit.

PyTorch is a development-only dependency (pip install torch==2.13.0); qatool never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
RESULTS = Path(__file__).resolve().parent / "results" / "engine_speed.json"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SAMPLES))

THREADS = 2
LR = 0.01
MOMENTUM = 0.9
MODELS = ["lenet_bn", "mobilenetv2_small"]


# ---- the training step's pieces for the engine: qatool's own loss and optimiser -----------------------------
from qatool.train.loss import softmax_cross_entropy  # noqa: E402
from qatool.train.optim import SGD  # noqa: E402  (PyTorch's formulation: v = m*v + g; p -= lr*v, in place)


# ---- the two sides ------------------------------------------------------------------------------------------
from torch_twins import onnx_weights, torch_module  # noqa: E402  (the PyTorch twins of the sample models)


def load_engine(source):
    """qatool.engine.load, checking that every parameter and state array can be updated in place."""
    import qatool.engine

    m = qatool.engine.load(source)
    for d in (m.params, m.state):
        for k, v in d.items():
            if not v.flags.writeable:
                raise SystemExit(f"the engine holds {k!r} as a read-only array: in-place updates would fail")
    return m


class EngineStep:
    def __init__(self, model, x: np.ndarray, y: np.ndarray):
        self.model, self.x, self.y = model, x, y
        self.opt = SGD(model.params, LR, momentum=MOMENTUM)

    def __call__(self) -> float:
        logits = self.model.forward({"input": self.x}, training=True)[0]
        loss, dlogits = softmax_cross_entropy(logits, self.y)
        grads = self.model.backward([dlogits])
        self.opt.step(grads)
        return loss


class TorchStep:
    def __init__(self, module, x: np.ndarray, y: np.ndarray):
        import torch

        self.torch = torch
        self.module = module.train()
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)

    def __call__(self) -> float:
        F = self.torch.nn.functional
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.module(self.x), self.y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


# ---- checks -------------------------------------------------------------------------------------------------
def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def without_dropout(path: Path):
    """The ONNX model with every Dropout ratio set to 0 (so a training-mode step is deterministic)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Dropout":
            continue
        if len(node.input) > 1 and node.input[1]:
            src = node.input[1]
            if src in inits:
                inits[src].CopyFrom(numpy_helper.from_array(np.array(0.0, dtype=np.float32), src))
            else:
                const = producers[src]
                del const.attribute[:]
                const.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(
                    np.array(0.0, dtype=np.float32))))
        else:
            node.attribute.append(onnx.helper.make_attribute("ratio", 0.0))
    return proto


def check(name: str, path: Path, x: np.ndarray, y: np.ndarray) -> dict:
    import torch

    out: dict = {}
    # 1. eval-mode logits: engine == onnxruntime
    m = load_engine(str(path))
    ref = ort_logits(path, x)
    got = m.forward({"input": x}, training=False)[0]
    out["eval_max_abs_diff_vs_onnxruntime"] = float(np.abs(got - ref).max())

    # 2. training-mode gradients (BN on batch statistics, Dropout ratio 0): engine == PyTorch autograd
    m0 = load_engine(without_dropout(path))
    weights = onnx_weights(path)
    t0 = torch_module(name, weights).train()
    for mod in t0.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    logits = m0.forward({"input": x}, training=True)[0]
    loss_e, dlogits = softmax_cross_entropy(logits, y)
    grads = m0.backward([dlogits])
    loss_t = torch.nn.functional.cross_entropy(t0(torch.from_numpy(x)), torch.from_numpy(y))
    loss_t.backward()
    loss_t = float(loss_t.detach())
    tgrads = {k: p.grad.numpy() for k, p in t0.named_parameters()}
    # measured against the model's largest gradient, not each tensor's: a conv bias followed by training-mode
    # BatchNorm has a true gradient of 0, and both sides then hold only float32 rounding noise
    scale = max(float(np.abs(g).max()) for g in tgrads.values())
    worst, worst_key = 0.0, ""
    for k, g in tgrads.items():
        if k not in grads:
            raise SystemExit(f"{name}: engine has no parameter {k!r} (it has {sorted(grads)[:5]}...)")
        rel = float(np.abs(grads[k] - g).max()) / scale
        if rel > worst:
            worst, worst_key = rel, k
    out["train_loss_engine_vs_torch"] = [loss_e, loss_t]
    out["grad_max_abs_diff_over_largest_grad"] = worst
    out["grad_worst_param"] = worst_key

    # 3. 20 engine steps on this batch lower the (eval-mode) loss
    m1 = load_engine(str(path))
    before = softmax_cross_entropy(m1.forward({"input": x}, training=False)[0], y)[0]
    step = EngineStep(m1, x, y)
    for _ in range(20):
        step()
    after = softmax_cross_entropy(m1.forward({"input": x}, training=False)[0], y)[0]
    out["eval_loss_before_after_20_steps"] = [before, after]

    print(f"{name}: eval logits vs onnxruntime max abs diff {out['eval_max_abs_diff_vs_onnxruntime']:.2e}; "
          f"train loss engine {loss_e:.6f} / torch {loss_t:.6f}; grads vs torch max abs diff / largest grad "
          f"{worst:.2e} ({worst_key}); eval loss {before:.4f} -> {after:.4f} after 20 engine steps", flush=True)
    problems = []
    if out["eval_max_abs_diff_vs_onnxruntime"] >= 1e-3:
        problems.append("eval logits differ from onnxruntime")
    if abs(loss_e - loss_t) > 1e-4 * max(1.0, abs(loss_t)):
        problems.append("training-mode loss differs from PyTorch")
    if worst > 1e-3:
        problems.append("gradients differ from PyTorch")
    if not after < before:
        problems.append("20 engine steps did not lower the loss")
    if problems:
        raise SystemExit(f"{name}: check failed: {'; '.join(problems)}")
    return out


# ---- timing -------------------------------------------------------------------------------------------------
def bench(name: str, path: Path, x: np.ndarray, y: np.ndarray, steps: int, warmup: int) -> dict:
    e_step = EngineStep(load_engine(str(path)), x, y)
    t_step = TorchStep(torch_module(name, onnx_weights(path)), x, y)
    for _ in range(warmup):
        e_step()
        t_step()
    te, tt = [], []
    for _ in range(steps):
        t = time.perf_counter()
        e_step()
        te.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        t_step()
        tt.append((time.perf_counter() - t) * 1e3)
    qe, qt = statistics.median(te), statistics.median(tt)
    return {
        "qatool_ms_per_step": round(qe, 2),
        "torch_ms_per_step": round(qt, 2),
        "ratio_qatool_over_torch": round(qe / qt, 3),
        "qatool_ms_min_max": [round(min(te), 2), round(max(te), 2)],
        "torch_ms_min_max": [round(min(tt), 2), round(max(tt), 2)],
    }


def op_profile(name: str, path: Path, x: np.ndarray, y: np.ndarray, steps: int) -> list[dict]:
    """Where an engine step's time goes: per op type (Conv split by kind) and per node, forward and backward.

    Wraps the op instances' methods in the compiled model (read-only use of the engine; nothing in qatool is
    changed). Each figure is the median over `steps` steps of that entry's time within one step, so a step
    slowed down by another process on the machine does not skew it; shares are of the median step.
    """
    m = load_engine(str(path))
    cur: dict[tuple[str, str], float] = {}
    cur_node: dict[tuple[str, str], float] = {}
    shapes: dict[str, tuple] = {}

    def label(op) -> str:
        """The op type, and for Conv its kind: depthwise / 1x1 / KxK, so the profile says which convs cost."""
        node = op.node
        if node.op_type != "Conv" or node.inputs[1] not in m.params:
            return node.op_type
        w = m.params[node.inputs[1]]
        k = "x".join(str(d) for d in w.shape[2:])
        group = int(node.attrs.get("group", 1))
        if group > 1 and w.shape[1] == 1:
            return f"Conv dw {k}"
        return f"Conv {k}" + (f" g{group}" if group > 1 else "")

    def wrap(op, kind):
        fn = getattr(op, kind)
        key = (label(op), kind)
        node_key = (op.node.name, kind)

        def timed(*args):
            if kind == "forward" and len(args) > 1 and hasattr(args[1], "shape"):
                shapes[op.node.name] = (key[0], tuple(args[1].shape))
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                dt = time.perf_counter() - t
                cur[key] = cur.get(key, 0.0) + dt
                cur_node[node_key] = cur_node.get(node_key, 0.0) + dt

        setattr(op, kind, timed)

    for s in m._steps:
        wrap(s.op, "forward")
        wrap(s.op, "backward")
    step = EngineStep(m, x, y)
    step()
    per_key: dict[tuple[str, str], list[float]] = {}
    per_node: dict[tuple[str, str], list[float]] = {}
    whole = []
    for _ in range(steps):
        cur.clear()
        cur_node.clear()
        t = time.perf_counter()
        step()
        whole.append(time.perf_counter() - t)
        for d, acc in ((cur, per_key), (cur_node, per_node)):
            for k, v in d.items():
                acc.setdefault(k, []).append(v)
    med = statistics.median(whole)
    rows = sorted(({"op": k[0], "pass": k[1], "ms_per_step": round(statistics.median(v) * 1e3, 2),
                    "share": round(statistics.median(v) / med, 3)} for k, v in per_key.items()),
                  key=lambda r: -r["ms_per_step"])
    covered = sum(r["ms_per_step"] for r in rows) / 1e3
    print(f"\n{name}: engine step, median of {steps}: {med * 1e3:.1f} ms; per op type (ops cover {covered / med:.0%}):")
    for r in rows:
        if r["share"] >= 0.005:
            print(f"  {r['op']:<20} {r['pass']:<9} {r['ms_per_step']:8.2f} ms  {r['share']:6.1%}")
    print("  slowest nodes:")
    node_rows = sorted(((statistics.median(v), k) for k, v in per_node.items()), reverse=True)[:8]
    for v, (node, kind) in node_rows:
        op, shape = shapes.get(node, ("?", ()))
        print(f"    {node:<46} {op:<12} {kind:<9} input {str(list(shape)):<18} {v * 1e3:8.2f} ms  {v / med:6.1%}")
    return rows


# ---- main ---------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    import onnx
    import onnxruntime
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy_blas_threads": "left as they are (OMP_NUM_THREADS=%s, OPENBLAS_NUM_THREADS=%s)"
        % (os.environ.get("OMP_NUM_THREADS", "unset"), os.environ.get("OPENBLAS_NUM_THREADS", "unset")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--op-profile", action="store_true", help="also time the engine's step per op type")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/engine_speed.json")
    args = ap.parse_args(argv)

    import torch

    import make_models

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    xval, yval = make_models.load_split("val")
    idx = np.random.default_rng(0).permutation(len(xval))[: args.batch]
    x, y = np.ascontiguousarray(xval[idx]), yval[idx]

    info = machine_info()
    results: dict = {}
    for name in args.models:
        path = SAMPLES / f"{name}.onnx"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run sample_models/make_models.py")
        checks = check(name, path, x, y)
        results[name] = {**bench(name, path, x, y, args.steps, args.warmup), "checks": checks}
        if args.op_profile:
            results[name]["engine_op_profile"] = op_profile(name, path, x, y, args.steps)

    print(f"\nOne training step, batch {args.batch}x1x28x28, median of {args.steps} (torch threads {THREADS}; "
          f"{info['cpu']}, {info['cores']} cores)")
    print(f"{'model':<20} {'qatool ms/step':>15} {'torch ms/step':>14} {'qatool/torch':>13}")
    for name, r in results.items():
        print(f"{name:<20} {r['qatool_ms_per_step']:>15.1f} {r['torch_ms_per_step']:>14.1f} "
              f"{r['ratio_qatool_over_torch']:>13.2f}")

    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "benchmark": "engine_speed",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "step": "forward(training) + softmax cross-entropy + backward + SGD momentum 0.9 (lr %g)" % LR,
            "batch": args.batch,
            "input": "real digits from sample_models/data/mnist/val, 1x28x28 float32",
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "statistic": "median ms per step, qatool and torch steps interleaved",
            "machine": {**info, "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "models": results,
        }
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
