"""Measure an ONNX recogniser on npy lines: line accuracy vs truth, agreement with float, output SQNR vs float.

usage: evalrec.py MODEL [MODEL ...] --split val|test [--n 300]
Float outputs are cached in /tmp/gptq/float_<split>_<n>.npz.
"""
import argparse, json, os, sys, time
import numpy as np
import onnx
import onnxruntime as ort

FLOAT = "/work/main/.venv/lib/python3.11/site-packages/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
REC = "/work/main/bench/.cache/any/rec"


def chars():
    m = onnx.load(FLOAT, load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def decode(prob, ch):
    idx = prob.argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            out.append(ch[i])
        prev = i
    return "".join(out).strip()


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def lines(split, n):
    truth = json.load(open(f"{REC}/{split}/truth.json"))["items"]
    out = []
    for it in truth:
        stem = os.path.splitext(os.path.basename(it["file"]))[0]
        out.append((f"{REC}/{split}_npy/{stem}.npy", it["text"].strip()))
    out.sort()
    return out[:n]


def run(path, items):
    s = session(path)
    name = s.get_inputs()[0].name
    return [s.run(None, {name: np.load(p)[None]})[0][0] for p, _ in items]


def float_outputs(split, n, items):
    cache = f"/tmp/gptq/float_{split}_{n}.npz"
    if os.path.exists(cache):
        z = np.load(cache)
        return [z[f"a{i}"] for i in range(len(items))]
    outs = run(FLOAT, items)
    np.savez(cache, **{f"a{i}": o for i, o in enumerate(outs)})
    return outs


def measure(outs, ref, items, ch):
    sig = noise = 0.0
    per = []
    acc = agree = 0
    for o, r, (_, text) in zip(outs, ref, items):
        d = float(((o.astype(np.float64) - r) ** 2).sum())
        s = float((r.astype(np.float64) ** 2).sum())
        sig += s
        noise += d
        per.append(10 * np.log10(s / max(d, 1e-30)))
        t, tf = decode(o, ch), decode(r, ch)
        acc += t == text
        agree += t == tf
    n = len(items)
    return {"sqnr_db": 10 * np.log10(sig / max(noise, 1e-30)), "sqnr_db_mean_line": float(np.mean(per)),
            "line_acc": acc / n, "agree_float": agree / n, "n": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    ch = chars()
    items = lines(a.split, a.n)
    ref = float_outputs(a.split, a.n, items)
    res = {"float": measure(ref, ref, items, ch)}
    for m in a.models:
        t = time.time()
        res[m] = measure(run(m, items), ref, items, ch)
        res[m]["seconds"] = round(time.time() - t, 1)
    for k, v in res.items():
        print(f"{a.split} {k}: " + ", ".join(f"{x}={y:.4g}" if isinstance(y, float) else f"{x}={y}" for x, y in v.items()))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
