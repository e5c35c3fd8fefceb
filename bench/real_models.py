"""Real-model benchmark (issue 13): qatool's defaults on classifiers someone else trained, against onnxruntime PTQ.

    .venv/bin/python bench/real_models.py                                  # everything: 4 models, all rows, seeds 0 1 2
    .venv/bin/python bench/real_models.py --models textdir --steps 10 --seeds 0 --out /tmp/smoke.json   # smoke
    .venv/bin/python bench/real_models.py --rows float,qatool-w8a8 --render
    .venv/bin/python bench/real_models.py --no-run --render                # the Markdown table of --out again
    .venv/bin/python bench/real_models.py --resume                         # keep --out's rows, run only the rest
    .venv/bin/python bench/real_models.py --qatool /work/bench_tree/.venv/bin/qatool ...   # a frozen qatool
    .venv/bin/python bench/real_models.py --merge a.json b.json --out all.json --render    # two runs' rows, one file

The models and their data come from bench/real_data.py (built on first use into bench/.cache/real; see its
docstring: textdir = PaddleOCR's text-direction classifier, docori = RapidAI's PP-LCNet document orientation,
digits-shift = a BN-CNN trained here at batch 512 and fine-tuned on a shifted digits distribution, orinet =
occular-deskew's OriNet document orientation, single pass at 320x320 letterboxed, without its runtime's
4-rotation test-time augmentation). Each model has
three splits: train (fine-tuning and calibration), val (train-quant's --val-data: it validates the int8 model at
checkpoints and keeps the best, so val is used for SELECTION) and test (seen by no run). Every row's reported
accuracy (`top1`) is top-1 on TEST, measured here by onnxruntime (CPU, --threads intra-op threads) on the row's
float or quantized ONNX file, with the preprocessing real_data.py recorded for the model; the same file's top-1 on
val is kept beside it (`top1_val`):

- float: the float model as shipped; also `qatool eval` on it (qatool's own view, e.g. its class order);
- ort-ptq-w8a8 / ort-ptq-w4a8: onnxruntime.quantization.quantize_static (QDQ, per_channel=True, activations
  QUInt8, weights QInt8 / QInt4, MinMax) calibrated on 256 training images (a seeded random subset), after
  quant_pre_process; if quantize_static refuses the model (e.g. per-channel below opset 13) it is retried on
  `qatool convert`'s output; the row says which file was quantized (`ptq_input`);
- qatool-calibrate-w8a8 / -w4a8: `qatool calibrate MODEL --data TRAIN --val-data VAL -o OUT.onnx` (its defaults;
  --val-data only verifies there, it selects nothing);
- qatool-w8a8 / -w4a8 / -w4a4: `qatool train-quant MODEL --train-data TRAIN --val-data VAL -o OUTDIR --seed S`
  with only the data, preprocessing and bit flags (qatool's defaults otherwise: that is the point; -q only
  silences the progress bar), once per seed; the row keeps OUTDIR/report.json whole, lifts out its val figures
  (val_top1_int8 of the selected checkpoint, val_start_top1_int8 = the post-training-quantization start,
  val_checkpoints, int8_step = the step kept, bn_check, freeze_bn_after, peak_rss_mb, ms_per_step), and
  onnxruntime's top-1 of OUTDIR/model_int8.onnx on test (reported) and val measured here. The start (step 0) is
  not evaluated on test: train-quant does not save it separately.

qatool runs as `--qatool PATH` (default: the `qatool` next to sys.executable), so a frozen copy (a git worktree
with its own venv) can be measured while qatool/ changes; the commit and dirty files recorded are that copy's.

Class order: a row's top-1 maps output i to the model's own class names (real_data's spec: for docori the
`character` metadata, 0,90,180,270; for orinet orient_onnx.py's ANGLES, 0,90,180,270, as the file has no
metadata), which is what the model's own runtime assumes. The row also keeps the top-1
under the class names the output file's metadata declares (`qatool.classes`, `character`, ...) and under sorted
folder names (0,180,270,90 for docori), so a run that trained on sorted-folder labels shows as such. --labels is
passed to qatool only for a model whose file names no classes (orinet), as its user would have to: a file of the
spec's classes in output order (`labels_flags`); otherwise qatool's defaults decide the order.

Every qatool command runs as a subprocess (stdout+stderr into a log in its run folder, peak RSS from os.wait4's
rusage of that child, wall time; Linux keeps the forked harness's RSS high-water mark across exec, so a child
smaller than the harness shows the harness's figure: train-quant's own report.json `peak_rss_mb` is the one the
table uses). Results are written to --out after every row (a killed run keeps its rows),
with the settings, versions (onnxruntime, numpy, onnx, qatool's git commit and whether qatool/ had uncommitted
changes), the host's CPU, and each row's seed. `--steps N` overrides train-quant's steps for smoke runs only
(recorded in settings; the targets are not meaningful then).

Budget (smoke runs at 10 steps on this 2-core machine while other work shared it): ms per train-quant step with
one BLAS thread: textdir ~1,100, docori ~5,500, digits-shift ~70; each run adds ~45 s (textdir), ~70 s (docori),
~4 s (digits-shift) of loading, BN check, calibration, checkpoint validation and export; peak RSS 4.5-6.8 GB
(textdir), 6.3 GB (docori), 0.4 GB (digits-shift). A full run (all rows, seeds 0-2, 200 steps) is about 3.5 h,
docori most of it: longer than one 180-minute session, so run it per model (`--models docori`) and use --resume.
orinet (cheap rows only so far, one thread, machine shared): one evaluation (test + val, 800 images) ~13 s float,
~19 s ORT PTQ W4A8; qatool calibrate ~75 s, peak RSS 3.5 GB; train-quant not measured yet.
With OMP_NUM_THREADS=2 on a machine whose second core is busy, steps were 2-17x SLOWER than with 1 thread
(digits-shift 1,250 vs 70 ms): set OMP_NUM_THREADS=1 --threads 1 unless the machine is quiet.

Targets (--render), per model, on the means over seeds:
  W8A8 >= float - 0.2 pp and >= ORT PTQ W8A8;  W4A8 >= ORT PTQ W4A8 + 1 pp and >= float - 1.0 pp;
  every qatool train-quant run's agreement_top1 (simulation vs int8, from report.json) and every calibrate run's
  (from its log) >= 0.99 (issue 13) and >= 0.999 (issue 15).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402
from real_data import Spec, image_folder, load_files, load_folder, log, ort_session, top1_by_names  # noqa: E402

ROOT = real_data.ROOT
DEFAULT_OUT = ROOT / "bench" / "results" / "real_models.json"
QATOOL = [str(Path(sys.executable).parent / "qatool")]  # set from --qatool in main()
MODELS = ["textdir", "docori", "digits-shift", "orinet"]
ROWS = ["float", "ort-ptq-w8a8", "ort-ptq-w4a8", "qatool-calibrate-w8a8", "qatool-calibrate-w4a8",
        "qatool-w8a8", "qatool-w4a8", "qatool-w4a4"]
SEEDED = {"qatool-w8a8", "qatool-w4a8", "qatool-w4a4"}
CALIBRATE = ("qatool-calibrate-w8a8", "qatool-calibrate-w4a8")
BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
CALIB_IMAGES = 256
CLASS_NAME_KEYS = ("qatool.classes", "character", "labels", "classes", "class_names", "names")


# ---- evaluation ----------------------------------------------------------------------------------------------
class Val:
    """A model's test split (reported) and val split (train-quant's selection set), preprocessed once; the float
    model's test predictions for agreement."""

    def __init__(self, spec: Spec):
        self.spec = spec
        if not spec.test:
            raise SystemExit(f"{spec.name}: spec.json has no test split; run bench/real_data.py")
        self.x, self.names = load_folder(Path(spec.test), spec)
        self.val_x, self.val_names = load_folder(Path(spec.val), spec)
        self.float_pred: np.ndarray | None = None
        self.float_pred_val: np.ndarray | None = None
        self.last_pred_val: np.ndarray | None = None


def session_fallback(path: Path, threads: int):
    """ORT_ENABLE_ALL; ORT_ENABLE_BASIC if onnxruntime's own optimiser refuses the file (as qat_bench does)."""
    import onnxruntime as ort

    try:
        return ort_session(path, threads), "ORT_ENABLE_ALL", None
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).splitlines()[0][:300]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), "ORT_ENABLE_BASIC", first


def metadata_classes(path: Path) -> tuple[str | None, list[str] | None]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    for key in CLASS_NAME_KEYS:
        v = meta.get(key)
        if not v:
            continue
        v = v.strip()
        try:
            names = json.loads(v)
            if isinstance(names, list):
                return key, [str(n) for n in names]
        except ValueError:
            pass
        names = [n.strip() for n in (v.split("\n") if "\n" in v else v.split(","))]
        return key, [n for n in names if n]
    return None, None


def _logits(sess, x: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0].reshape(min(64, len(x) - i), -1)
                           for i in range(0, len(x), 64)])


def evaluate(path: Path, val: Val, threads: int) -> tuple[dict, np.ndarray]:
    """onnxruntime top-1 of one ONNX file on the test split (`top1`, under three class orders) and on val
    (`top1_val`); returns the test predictions too."""
    sess, level, refused = session_fallback(path, threads)
    t0 = time.perf_counter()
    logits = _logits(sess, val.x)
    logits_val = _logits(sess, val.val_x)
    spec = val.spec
    pred = logits.argmax(1)
    pred_val = logits_val.argmax(1)
    val.last_pred_val = pred_val
    r = {"top1": top1_by_names(logits, val.names, spec.classes), "split": "test",
         "top1_val": top1_by_names(logits_val, val.val_names, spec.classes),
         "images": {"test": len(val.names), "val": len(val.val_names)},
         "session_level": level, "eval_seconds": round(time.perf_counter() - t0, 2),
         "bytes": path.stat().st_size, "file": str(path)}
    if refused:
        r["ort_enable_all_refused"] = refused
    key, names = metadata_classes(path)
    r["metadata_classes"] = {"key": key, "names": names}
    if names and len(names) == logits.shape[1] and names != spec.classes:
        r["top1_metadata_order"] = top1_by_names(logits, val.names, names)
    if sorted(spec.classes) != spec.classes:
        r["top1_sorted_folder_order"] = top1_by_names(logits, val.names, sorted(spec.classes))
    if val.float_pred is not None:
        r["agreement_with_float"] = float(np.mean(pred == val.float_pred))
    if val.float_pred_val is not None:
        r["agreement_with_float_val"] = float(np.mean(pred_val == val.float_pred_val))
    return r, pred


# ---- subprocesses --------------------------------------------------------------------------------------------
def run_logged(cmd: list[str], log_path: Path, env: dict) -> dict:
    """Run cmd with stdout+stderr into log_path; wall time and the child's peak RSS (os.wait4 rusage)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as lf:
        lf.write("$ " + shlex.join(cmd) + "\n")
        lf.flush()
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out = {"cmd": shlex.join(cmd), "returncode": p.returncode, "wall_seconds": round(wall, 1),
           "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "log": str(log_path)}
    if p.returncode != 0:
        lines = [ln.rstrip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        err = [ln for ln in lines if ln.startswith("qatool: error") or "Error" in ln]
        out["error"] = (err or lines or ["(no output)"])[-1]
    return out


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, str(threads))
    return env


# ---- rows ----------------------------------------------------------------------------------------------------
def row_float(spec: Spec, val: Val, work: Path, args) -> dict:
    r, pred = evaluate(Path(spec.onnx), val, args.threads)
    val.float_pred, val.float_pred_val = pred, val.last_pred_val
    r.pop("agreement_with_float", None)
    r.pop("agreement_with_float_val", None)
    js = work / "qatool_eval_float.json"
    run = run_logged(QATOOL + ["eval", spec.onnx, "--data", spec.test, "--no-latency", "--json", str(js),
                               *spec.qatool_flags(), *labels_flags(spec, work)], work / "qatool_eval_float.log",
                     child_env(args.threads))
    r["qatool_eval"] = run
    if run["returncode"] == 0 and js.exists():
        rep = json.loads(js.read_text())
        r["qatool_eval"]["results"] = [{k: x.get(k) for k in ("model", "preprocess", "images", "top1")}
                                       for x in rep.get("results", [])]
    return r


def _convert(spec: Spec, work: Path, args) -> tuple[Path, dict]:
    out = work / "converted.onnx"
    run = run_logged(QATOOL + ["convert", spec.onnx, "-o", str(out)], work / "convert.log", child_env(args.threads))
    if run["returncode"] != 0:
        raise RuntimeError(f"qatool convert failed: {run.get('error')}")
    return out, run


def row_ort_ptq(spec: Spec, val: Val, work: Path, args, wb: int) -> dict:
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    files = [f for f, _ in image_folder(Path(spec.train))]
    rng = np.random.default_rng(0)
    chosen = [files[i] for i in sorted(rng.permutation(len(files))[:CALIB_IMAGES])]
    calib = load_files(chosen, spec)
    name = spec.input_name
    wtype = {8: QuantType.QInt8, 4: QuantType.QInt4}[wb]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    attempts = []
    candidates = [("float (as shipped)", Path(spec.onnx))]
    result = None
    t0 = time.perf_counter()
    i = 0
    while i < len(candidates):
        label, src = candidates[i]
        i += 1
        pre = work / f"ptq_pre_{i}.onnx"
        pre_note = None
        failures = []
        for kw in ({}, {"skip_symbolic_shape": True}):
            try:
                quant_pre_process(str(src), str(pre), **kw)
                pre_note = "quant_pre_process" + (f"({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else "")
                break
            except Exception as e:  # noqa: BLE001 (its errors have no common type)
                failures.append(f"quant_pre_process({', '.join(f'{k}={v}' for k, v in kw.items())}) failed: {_msg(e)}")
        if pre_note is None:
            shutil.copy(src, pre)
            pre_note = "none (raw file)"
        if failures:
            pre_note += "; " + "; ".join(failures)
        out = work / f"ort_ptq_w{wb}a8.onnx"
        try:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=wtype, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            r, _ = evaluate(out, val, args.threads)
            attempts.append({"input": label, "preprocess": pre_note, "ok": True})
            result = r
            result["ptq_input"] = {"label": label, "file": str(src), "preprocess": pre_note}
            break
        except Exception as e:  # noqa: BLE001
            attempts.append({"input": label, "preprocess": pre_note, "ok": False,
                             "error": _msg(e)})
            if label.startswith("float"):
                conv, run = _convert(spec, work, args)
                candidates.append(("qatool convert (no --for-training)", conv))
    if result is None:
        result = {"top1": None, "failed": True}
    result.update(weight_type=wtype.name, activation_type="QUInt8", calib_images=len(chosen),
                  attempts=attempts, wall_seconds=round(time.perf_counter() - t0, 1))
    return result


def _msg(e: BaseException) -> str:
    """An exception as one line: its type, its message's first line, and where it was raised when the message is
    empty (a bare assert)."""
    import traceback

    text = str(e).strip().splitlines()
    where = ""
    if not text:
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno} {tb[-1].line}"
    return f"{type(e).__name__}: {text[0][:300] if text else ''}{where}"


def bit_flags(bits: str) -> list[str]:
    wb, ab = BITS[bits]
    return ["--weight-bits", str(wb), "--activation-bits", str(ab)]


def labels_flags(spec: Spec, work: Path) -> list[str]:
    """--labels FILE for a model whose file names no classes and whose output order is not the sorted folder
    names: the order qatool cannot know (it stops such a run, saying so); nothing otherwise."""
    if metadata_classes(Path(spec.onnx))[1] is not None or spec.classes == sorted(spec.classes):
        return []
    path = work / "labels.txt"
    path.write_text("\n".join(spec.classes) + "\n")
    return ["--labels", str(path)]


def row_calibrate(spec: Spec, val: Val, work: Path, args, bits: str) -> dict:
    out = work / f"calibrate_{bits}.onnx"
    run = run_logged(QATOOL + ["calibrate", spec.onnx, "--data", spec.train, "--val-data", spec.val, "-o", str(out),
                               *spec.qatool_flags(), *bit_flags(bits), *labels_flags(spec, work)],
                     work / f"calibrate_{bits}.log",
                     child_env(args.threads))
    r = {"run": run}
    if run["returncode"] == 0 and out.exists():
        e, _ = evaluate(out, val, args.threads)
        r.update(e)
        r["agreement_top1"] = logged_agreement(Path(run["log"]))
    else:
        r["top1"] = None
    return r


def logged_agreement(log: Path) -> float | None:
    """The simulation-vs-onnxruntime top-1 agreement a qatool command printed (on its --val-data)."""
    m = re.search(r"simulation vs onnxruntime on \d+ inputs.*?top-1 agreement ([0-9.]+)",
                  log.read_text(errors="replace"))
    return float(m.group(1)) if m else None


def row_train_quant(spec: Spec, val: Val, work: Path, args, bits: str, seed: int) -> dict:
    outdir = work / f"train_{bits}_s{seed}"
    if outdir.exists():
        shutil.rmtree(outdir)
    cmd = QATOOL + ["train-quant", spec.onnx, "--train-data", spec.train, "--val-data", spec.val, "-o", str(outdir),
                    *spec.qatool_flags(), *bit_flags(bits), *labels_flags(spec, work), "--seed", str(seed), "-q"]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    run = run_logged(cmd, work / f"train_{bits}_s{seed}.log", child_env(args.threads))
    r = {"run": run}
    rep_path = outdir / "report.json"
    if rep_path.exists():
        rep = json.loads(rep_path.read_text())
        r["report"] = rep
        v = rep.get("val") or {}
        cfg = rep.get("config") or {}
        # report.json's figures are on val (the selection set): prefixed val_ here; agreement is on val too
        r.update({"val_" + k: v.get(k) for k in ("top1_float", "top1_qat", "top1_int8", "start_top1_int8",
                                                  "checkpoints", "best_step", "ended_below_start")})
        r["agreement_top1"] = v.get("agreement_top1")
        r["int8_step"] = v.get("int8_step")
        r["keep"] = v.get("keep")
        r["bn_check"] = cfg.get("bn_check")
        r["freeze_bn_after"] = cfg.get("freeze_bn_after")
        r["freeze_observers_after"] = cfg.get("freeze_observers_after")
        r["steps"] = rep.get("steps")
        r["ms_per_step"] = rep.get("ms_per_step")
        r["peak_rss_mb"] = rep.get("peak_rss_mb")
    int8 = outdir / "model_int8.onnx"
    if run["returncode"] == 0 and int8.exists():
        e, _ = evaluate(int8, val, args.threads)
        r["ort"] = e
        r["top1"] = e["top1"]          # test: reported
        r["top1_val"] = e["top1_val"]  # val: what the checkpoint was selected on (= report's val_top1_int8)
    else:
        r["top1"] = None
    return r


# ---- the run -------------------------------------------------------------------------------------------------
def versions() -> dict:
    import onnx
    import onnxruntime

    # the qatool that runs: its own interpreter says where its package is and what it links against
    py = Path(QATOOL[0]).parent / "python"
    probe = ("import json, os, numpy, onnx, onnxruntime, qatool; print(json.dumps({'dir': os.path.dirname("
             "os.path.dirname(qatool.__file__)), 'numpy': numpy.__version__, 'onnx': onnx.__version__, "
             "'onnxruntime': onnxruntime.__version__}))")
    try:
        # -I and cwd=/: the current directory must not shadow the installed qatool (python -c puts cwd first)
        info = json.loads(subprocess.run([str(py), "-I", "-c", probe], capture_output=True, text=True,
                                         timeout=120, cwd="/").stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        info = {"dir": None}  # unknown: never guess this checkout (a frozen copy may be what runs)

    def git(*a):
        if not info["dir"]:
            return ""
        try:
            return subprocess.run(["git", "-C", info["dir"], *a], capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return ""

    return {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "qatool": QATOOL[0], "qatool_tree": info["dir"],
            "qatool_env": {k: v for k, v in info.items() if k != "dir"},
            "qatool_commit": git("rev-parse", "HEAD").strip(),
            "qatool_dirty_files": [ln[3:] for ln in git("status", "--porcelain", "--", "qatool").splitlines()]}


def host() -> dict:
    model = ""
    try:
        for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if ln.startswith("Model name:"):
                model = ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def save(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def run(args) -> dict:
    specs = real_data.ensure(args.cache, args.models)
    done = set()
    if args.resume and args.out.exists():
        doc = json.loads(args.out.read_text())
        done = {(r["model"], r["row"], r.get("seed")) for r in doc["rows"] if r.get("top1") is not None}
    else:
        doc = {"rows": []}
    doc.setdefault("settings_history", [])
    if doc.get("settings"):
        doc["settings_history"].append(doc["settings"])
    doc["settings"] = {"models": args.models, "rows": args.rows, "seeds": args.seeds, "steps_override": args.steps,
                       "threads": args.threads, "calib_images_ort_ptq": CALIB_IMAGES, "cache": str(args.cache),
                       "qatool": " ".join(QATOOL), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "child_threads_env": {k: v for k, v in child_env(args.threads).items()
                                             if k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    doc["versions"] = versions()
    doc["host"] = host()
    doc.setdefault("models", {})
    for name in args.models:
        spec = specs[name]
        doc["models"][name] = {"onnx": spec.onnx, "train": spec.train, "val": spec.val, "test": spec.test,
                               "flags": " ".join(spec.qatool_flags()), "classes": spec.classes,
                               "counts": spec.counts, "float_top1_at_build": spec.float_top1}
        work = args.cache / "runs" / name
        work.mkdir(parents=True, exist_ok=True)
        val = Val(spec)
        if "float" not in args.rows:  # agreement needs the float predictions
            _, val.float_pred = evaluate(Path(spec.onnx), val, args.threads)
            val.float_pred_val = val.last_pred_val
        for row in args.rows:
            for seed in (args.seeds if row in SEEDED else [None]):
                key = (name, row, seed)
                if key in done and row != "float":
                    log(f"{name} {row} seed {seed}: kept from {args.out}")
                    continue
                log(f"{name} {row}" + (f" seed {seed}" if seed is not None else "") + " ...")
                t0 = time.perf_counter()
                try:
                    if row == "float":
                        r = row_float(spec, val, work, args)
                    elif row.startswith("ort-ptq-"):
                        r = row_ort_ptq(spec, val, work, args, BITS[row.split("-")[-1]][0])
                    elif row.startswith("qatool-calibrate-"):
                        r = row_calibrate(spec, val, work, args, row.split("-")[-1])
                    else:
                        r = row_train_quant(spec, val, work, args, row.split("-")[-1], seed)
                except Exception as e:  # noqa: BLE001: a failed row is recorded, the run goes on
                    r = {"top1": None, "failed": _msg(e)}
                r = {"model": name, "row": row, "seed": seed, "row_wall_seconds": round(time.perf_counter() - t0, 1),
                     **r}
                doc["rows"] = [x for x in doc["rows"] if (x["model"], x["row"], x.get("seed")) != key] + [r]
                doc["seeds_run"] = seeds_run(doc)
                save(doc, args.out)
                msg = f"{name} {row}" + (f" seed {seed}" if seed is not None else "") + f": top1 {r.get('top1')}"
                if "run" in r:
                    msg += f", {r['run']['wall_seconds']} s, peak RSS {r['run']['peak_rss_mb']} MB"
                    if r["run"].get("error"):
                        msg += f", FAILED: {r['run']['error']}"
                if r.get("top1_val") is not None:
                    msg += f" (val {r['top1_val']})"
                if r.get("ms_per_step") is not None:
                    msg += (f", {r['ms_per_step']:.0f} ms/step, agreement {r.get('agreement_top1')}, "
                            f"kept step {r.get('int8_step')}, val start {r.get('val_start_top1_int8')}")
                log(msg)
    doc["settings"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(doc, args.out)
    return doc


def seeds_run(doc: dict) -> dict:
    """{model: {row: [seeds with a row in the file]}} for the seeded rows: which seeds ran."""
    out: dict = {}
    for r in doc["rows"]:
        if r["row"] in SEEDED:
            out.setdefault(r["model"], {}).setdefault(r["row"], []).append(r.get("seed"))
    return {m: {k: sorted(v) for k, v in rows.items()} for m, rows in out.items()}


def merge(paths: list[Path]) -> dict:
    """Several result files (e.g. two harness processes that each wrote their own) as one document: rows
    concatenated (a later file's row replaces an earlier one with the same model/row/seed), each file's settings
    kept under `parts`."""
    doc: dict = {"rows": [], "models": {}, "parts": []}
    for p in paths:
        d = json.loads(Path(p).read_text())
        keys = {(r["model"], r["row"], r.get("seed")) for r in d["rows"]}
        doc["rows"] = [r for r in doc["rows"] if (r["model"], r["row"], r.get("seed")) not in keys] + d["rows"]
        doc["models"].update(d.get("models", {}))
        doc["parts"].append({"file": str(p), "settings": d.get("settings"),
                             "settings_history": d.get("settings_history", []), "versions": d.get("versions")})
        doc.setdefault("versions", d.get("versions"))
        doc.setdefault("host", d.get("host"))
        doc.setdefault("settings", d.get("settings"))
        doc.setdefault("notes", []).extend(d.get("notes", []))
    commits = {(pt["versions"] or {}).get("qatool_commit") for pt in doc["parts"]}
    doc["qatool_commits"] = sorted(c for c in commits if c)
    doc["seeds_run"] = seeds_run(doc)
    return doc


# ---- rendering -----------------------------------------------------------------------------------------------
def _pct(v):
    return "—" if v is None else f"{100 * v:.2f}"


def summarise(doc: dict) -> dict:
    out: dict[str, dict] = {}
    for r in doc["rows"]:
        m = out.setdefault(r["model"], {})
        m.setdefault(r["row"], []).append(r)
    return out


def render(doc: dict) -> str:
    s = summarise(doc)
    st = doc.get("settings", {})
    lines = []
    if st.get("steps_override") is not None:
        lines.append(f"**Smoke run: train-quant --steps {st['steps_override']}; the targets are not meaningful.**\n")
    cols = [("float", "float"), ("ort-ptq-w8a8", "ORT PTQ W8A8"), ("qatool-calibrate-w8a8", "qatool calibrate W8A8"),
            ("qatool-w8a8", "qatool W8A8"), ("ort-ptq-w4a8", "ORT PTQ W4A8"),
            ("qatool-calibrate-w4a8", "qatool calibrate W4A8"), ("qatool-w4a8", "qatool W4A8"),
            ("qatool-w4a4", "qatool W4A4")]
    commits = doc.get("qatool_commits") or [(doc.get("versions") or {}).get("qatool_commit")]
    lines.append(f"qatool commit {', '.join(str(c) for c in commits)}.\n")
    lines.append("Top-1 % on each model's held-out TEST split (onnxruntime on the row's ONNX file; qatool train-quant: "
                 "mean over seeds, min..max). train-quant selected its checkpoint (post-training start, every "
                 "quarter, the end) on the val split; the accuracy reported here is on test, which no run saw. "
                 "ORT PTQ and qatool calibrate calibrate on training images.\n")
    lines.append("| model | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    notes = []
    for model, rows in s.items():
        cells = []
        for key, _ in cols:
            rs = rows.get(key, [])
            vals = [r["top1"] for r in rs if r.get("top1") is not None]
            if not rs:
                cells.append("")
            elif not vals:
                cells.append("failed")
            elif key in SEEDED and len(vals) > 1:
                cells.append(f"{_pct(statistics.mean(vals))} ({_pct(min(vals))}..{_pct(max(vals))}, n={len(vals)})")
            else:
                cells.append(_pct(vals[0]) + (f" (n={len(vals)})" if key in SEEDED else ""))
            for r in rs:
                if r.get("failed") or (r.get("run") or {}).get("error"):
                    notes.append(f"- {model} {key} seed {r.get('seed')}: "
                                 f"{(r.get('run') or {}).get('error') or r.get('failed')}")
                o = r.get("ort", r)
                if "top1_metadata_order" in o:
                    notes.append(f"- {model} {key} seed {r.get('seed')}: the file's metadata "
                                 f"({o['metadata_classes']['key']}) orders the classes "
                                 f"{o['metadata_classes']['names']}; top-1 in that order "
                                 f"{_pct(o['top1_metadata_order'])}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:"] + sorted(set(notes))
    lines += ["", "Targets:", "", "| model | target | result | met |", "|---|---|---|---|"]

    def mean_of(rows, key):
        vals = [r["top1"] for r in rows.get(key, []) if r.get("top1") is not None]
        return statistics.mean(vals) if vals else None

    for model, rows in s.items():
        f = mean_of(rows, "float")
        w8, p8 = mean_of(rows, "qatool-w8a8"), mean_of(rows, "ort-ptq-w8a8")
        w4, p4 = mean_of(rows, "qatool-w4a8"), mean_of(rows, "ort-ptq-w4a8")
        checks = [("W8A8 >= float - 0.2 pp", w8, f, lambda a, b: a >= b - 0.002),
                  ("W8A8 >= ORT PTQ W8A8", w8, p8, lambda a, b: a >= b),
                  ("W4A8 >= ORT PTQ W4A8 + 1 pp", w4, p4, lambda a, b: a >= b + 0.01),
                  ("W4A8 >= float - 1.0 pp", w4, f, lambda a, b: a >= b - 0.01)]
        for what, a, b, ok in checks:
            if a is None or b is None:
                lines.append(f"| {model} | {what} | — | not measured |")
            else:
                lines.append(f"| {model} | {what} | {_pct(a)} vs {_pct(b)} | {'yes' if ok(a, b) else 'NO'} |")
        agr = [r.get("agreement_top1") for k in (*SEEDED, *CALIBRATE) for r in rows.get(k, [])]
        agr = [a for a in agr if a is not None]
        if agr:
            met = " / ".join("yes" if min(agr) >= t else "NO" for t in (0.99, 0.999))
            lines.append(f"| {model} | agreement >= 0.99 (issue 13) / >= 0.999 (issue 15), every train-quant and "
                         f"calibrate run | min {min(agr):.4f} (n={len(agr)}) | {met} |")
        else:
            lines.append(f"| {model} | agreement >= 0.99 / 0.999 | — | not measured |")
    lines += ["", "Float top-1 % (test / val): " + "; ".join(
        f"{m} {_pct(mean_of(rows, 'float'))} / {_pct(_mean_val(rows, 'float'))}" for m, rows in s.items()), ""]
    lines += ["train-quant runs (val = the selection split; test = reported; agreement = int8 vs simulation "
              "on val, from report.json; BN = the float BN check's decision):", "",
              "| model | row | seed | test top-1 | val top-1 (selected) | val start (PTQ) | step kept / steps | "
              "BN | agreement | ms/step | wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, rows in s.items():
        for k in ("qatool-w8a8", "qatool-w4a8", "qatool-w4a4"):
            for r in sorted(rows.get(k, []), key=lambda r: r.get("seed") or 0):
                run_ = r.get("run", {})
                err = run_.get("error") or r.get("failed")
                bn = r.get("bn_check")
                if "report" not in r:
                    bn_s = "— (no report.json)"
                elif bn is None:
                    bn_s = f"no check, freeze at {r.get('freeze_bn_after')}"
                else:
                    bn_s = (("frozen from start" if bn.get("freeze_from_start") else
                             f"train, freeze at {r.get('freeze_bn_after')}")
                            + f" (eval loss {bn.get('eval_loss', 0):.3f} vs train {bn.get('train_loss', 0):.3f})")
                ms = r.get("ms_per_step")
                lines.append(f"| {model} | {k} | {r.get('seed')} | "
                             + (f"FAILED: {err}" if err and r.get("top1") is None else _pct(r.get("top1")))
                             + f" | {_pct(r.get('val_top1_int8'))} | {_pct(r.get('val_start_top1_int8'))} | "
                             f"{r.get('int8_step')} / {r.get('steps')} | {bn_s} | {r.get('agreement_top1')} | "
                             f"{'—' if ms is None else f'{ms:.0f}'} | {run_.get('wall_seconds')} | "
                             f"{r.get('peak_rss_mb') or run_.get('peak_rss_mb')} |")
    if doc.get("notes"):
        lines += ["", "Run notes:"] + [f"- {n}" for n in doc["notes"]]
    sr = doc.get("seeds_run") or seeds_run(doc)
    lines += ["", "Seeds run: " + "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in rows.items())
                                           for m, rows in sr.items())]
    return "\n".join(lines)


def _mean_val(rows: dict, key: str):
    vals = [r.get("top1_val") for r in rows.get(key, []) if r.get("top1_val") is not None]
    return statistics.mean(vals) if vals else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train-quant seeds (default 0 1 2)")
    ap.add_argument("--steps", type=int, default=None, help="override train-quant's steps (smoke runs only)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads and the children's "
                    "OMP/OpenBLAS threads unless set in the environment (default 2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (written after every row)")
    ap.add_argument("--cache", type=Path, default=real_data.DEFAULT_CACHE, help="real_data.py's cache folder")
    ap.add_argument("--resume", action="store_true", help="keep --out's finished rows and run the others")
    ap.add_argument("--render", action="store_true", help="print the Markdown tables")
    ap.add_argument("--no-run", action="store_true", help="with --render: only render --out")
    ap.add_argument("--qatool", default=str(Path(sys.executable).parent / "qatool"),
                    help="the qatool executable to run (default: the one next to sys.executable)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="merge these result files into --out (no run)")
    args = ap.parse_args(argv)
    QATOOL[:] = [args.qatool]
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [r for r in args.rows.split(",") if r]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for r in args.rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; known: {', '.join(ROWS)}")
    if args.merge:
        doc = merge(args.merge)
        save(doc, args.out)
    elif args.no_run:
        doc = json.loads(args.out.read_text())
    else:
        doc = run(args)
    if args.render or args.no_run:
        print(render(doc))


if __name__ == "__main__":
    main()
