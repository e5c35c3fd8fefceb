"""Transfer-learning benchmark (issue 16): a model pretrained elsewhere, re-headed to a new class count, trained
with a frozen backbone against training all layers at the same steps, then quantized.

    .venv/bin/python bench/transfer_bench.py                        # digits-shift and docori
    .venv/bin/python bench/transfer_bench.py --models digits-shift --render
    .venv/bin/python bench/transfer_bench.py --no-run --render

Models (from bench/real_data.py's cache, bench/.cache/real): digits-shift (the BN-CNN trained here at batch 512
on MNIST, 10 classes) re-headed to even / odd on the shifted digits; docori (RapidAI's PP-LCNet, 4 orientations)
re-headed to 2 classes, upright-or-upside-down (0, 180) / sideways (90, 270). The new class folders are made of
symlinks to the model's own train / val / test images.

For each model and each of frozen / all layers: `qatool finetune MODEL --new-head [--freeze-backbone]
--steps S` (its median ms per step from OUT.report.json), then `qatool train-quant OUT.onnx --steps Q` with
qatool's defaults otherwise (its fusion report and agreement from report.json). Reported: top-1 on TEST (no run
saw it) of the float model after finetune and of the int8 model, by onnxruntime. Targets (--render): frozen
within 1 pp of all layers in float and int8; a frozen step <= 0.5 x an all-layers step; every int8 model
fused and verified.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402

ROOT = real_data.ROOT
DEFAULT_OUT = ROOT / "bench" / "results" / "transfer_bench.json"
GROUPS = {"digits-shift": {"even": [str(d) for d in range(0, 10, 2)], "odd": [str(d) for d in range(1, 10, 2)]},
          "docori": {"upright_or_flipped": ["0", "180"], "sideways": ["90", "270"]}}
STEPS = {"digits-shift": (200, 100), "docori": (60, 40)}  # (finetune steps, train-quant steps)
BATCH = {"digits-shift": 64, "docori": 32}


def regroup(spec, work: Path) -> dict[str, Path]:
    """train/val/test folders of the new classes, symlinks to the model's own images."""
    out = {}
    for split in ("train", "val", "test"):
        src = Path(getattr(spec, split))
        dst = work / "data" / split
        for cls, members in GROUPS[spec.name].items():
            (dst / cls).mkdir(parents=True, exist_ok=True)
            for m in members:
                for f in sorted((src / m).iterdir()):
                    link = dst / cls / f"{m}_{f.name}"
                    if not link.exists():
                        link.symlink_to(f.resolve())
        out[split] = dst
    return out


def top1(model: Path, folder: Path, spec, threads: int) -> float:
    x, names = real_data.load_folder(folder, spec)
    classes = sorted(GROUPS[spec.name])  # the new head's classes: sorted folder names
    logits = real_data.ort_predict(real_data.ort_session(model, threads), x)
    return float(np.mean(np.asarray(classes)[logits.argmax(1)] == np.asarray(names)))


def run_one(spec, data: dict[str, Path], work: Path, frozen: bool, args) -> dict:
    s_ft, s_q = STEPS[spec.name] if args.steps is None else (args.steps, args.steps)
    tag = "frozen" if frozen else "all"
    ft = work / f"{tag}.onnx"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    cmd = [args.qatool, "finetune", spec.onnx, "--train-data", str(data["train"]), "--val-data", str(data["val"]),
           "-o", str(ft), "--new-head", "--steps", str(s_ft), "--batch-size", str(BATCH[spec.name]), "-q",
           *spec.qatool_flags(), *(["--freeze-backbone"] if frozen else [])]
    real_data.log(" ".join(cmd[1:4]) + f" ... {tag}")
    subprocess.run(cmd, check=True, env=env, stdout=open(work / f"{tag}_finetune.log", "w"), stderr=subprocess.STDOUT)
    ft_report = json.loads(ft.with_suffix(".report.json").read_text())
    q_dir = work / f"{tag}_q"
    subprocess.run([args.qatool, "train-quant", str(ft), "--train-data", str(data["train"]), "--val-data",
                    str(data["val"]), "-o", str(q_dir), "--steps", str(s_q), "--batch-size", str(BATCH[spec.name]),
                    "-q", *spec.qatool_flags()], check=True, env=env, stdout=open(work / f"{tag}_q.log", "w"),
                   stderr=subprocess.STDOUT)
    q_report = json.loads((q_dir / "report.json").read_text())
    fusion = q_report["export"]["fusion"]
    return {"finetune_steps": s_ft, "qat_steps": s_q, "ms_per_step": ft_report["ms_per_step"],
            "val_float": ft_report["val"]["top1_float"], "test_float": top1(ft, data["test"], spec, args.threads),
            "test_int8": top1(q_dir / "model_int8.onnx", data["test"], spec, args.threads),
            "val_int8": q_report["val"]["top1_int8"], "agreement": q_report["val"]["agreement_top1"],
            "fused": f"{fusion['fused']}/{fusion['expected']}", "unfused": len(fusion["unfused"])}


def run(args) -> dict:
    doc = json.loads(args.out.read_text()) if args.out.exists() and args.resume else {"models": {}}
    doc["settings"] = {"threads": args.threads, "steps": STEPS, "batch": BATCH}
    for name in args.models:
        spec = real_data.load_spec(args.cache, name)
        work = args.cache / "runs" / "transfer" / name
        data = regroup(spec, work)
        doc["models"][name] = {tag: run_one(spec, data, work, tag == "frozen", args) for tag in ("frozen", "all")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
    return doc


def render(doc: dict) -> str:
    lines = ["| model | backbone | finetune steps | ms/step | test float | test int8 | val int8 | agreement | fused |",
             "|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for name, m in doc["models"].items():
        for tag in ("frozen", "all"):
            r = m[tag]
            lines.append(f"| {name} | {tag} | {r['finetune_steps']} | {r['ms_per_step']:.0f} | "
                         f"{100 * r['test_float']:.2f} | {100 * r['test_int8']:.2f} | {100 * r['val_int8']:.2f} | "
                         f"{r['agreement']:.4f} | {r['fused']} |")
        f, a = m["frozen"], m["all"]
        checks += [(name, "frozen float within 1 pp of all layers", f"{100 * (f['test_float'] - a['test_float']):+.2f} pp",
                    f["test_float"] >= a["test_float"] - 0.01),
                   (name, "frozen int8 within 1 pp of all layers", f"{100 * (f['test_int8'] - a['test_int8']):+.2f} pp",
                    f["test_int8"] >= a["test_int8"] - 0.01),
                   (name, "frozen step <= 0.5 x all-layers step", f"{f['ms_per_step'] / a['ms_per_step']:.2f}x",
                    f["ms_per_step"] <= 0.5 * a["ms_per_step"]),
                   (name, "int8 fused and verified", f"{f['fused']}, {a['fused']}", f["unfused"] == a["unfused"] == 0)]
    lines += ["", "| model | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {n} | {t} | {v} | {'yes' if ok else '**no**'} |" for n, t, v, ok in checks]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-shift,docori", type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, help="override both step counts (smoke runs)")
    p.add_argument("--cache", type=Path, default=real_data.DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--qatool", default=str(Path(sys.executable).parent / "qatool"))
    p.add_argument("--resume", action="store_true", help="keep --out's other models")
    p.add_argument("--render", action="store_true")
    p.add_argument("--no-run", action="store_true")
    args = p.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.no_run else run(args)
    if args.render:
        print(render(doc))


if __name__ == "__main__":
    main()
