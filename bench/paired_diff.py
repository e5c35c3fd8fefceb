"""Is one any-model row really better than another? A paired bootstrap over the test split's items.

    .venv/bin/python bench/paired_diff.py lstmrec bench/.cache/any/runs/lstmrec/ort_w8a8.onnx \\
        bench/.cache/any/runs/lstmrec/qat_w8a8_s0/model_int8.onnx [more files ...]

Every file (or `float`, the shipped model) runs through the model's own pipeline on the test split (as
bench/any_model.py judges it). The first file is the reference A; for every other file B it prints the task measure
of both, B - A, and the 95 % interval of B - A over 10,000 resamples of the test items (pages for the detectors,
lines for the recognisers), the same items drawn for A and B. An interval that holds 0 means the split cannot tell
the two files apart. Recognisers also print the discordant items (read by one file only), the numbers McNemar's
test works on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import any_model as M  # noqa: E402

RESAMPLES = 10_000


def item_stats(b: M.Bench, pred: dict) -> np.ndarray:
    """Per test item: [read] for the recognisers, [true positives, true boxes, predicted boxes] for the
    detectors, so that the split's measure is a function of the items' sums (`measure`)."""
    rows = []
    for i, it in enumerate(b.items):
        if b.name in ("rec", "lstmrec"):
            one = {"texts": [pred["texts"][i]], **({"texts_b1": [pred["texts_b1"][i]]} if b.name == "rec" else {})}
        else:
            key = "regions" if b.name == "layout" else "boxes"
            one = {key: [pred[key][i]]}
        items, b.items = b.items, [it]
        try:
            s = b.score(one)
        finally:
            b.items = items
        rows.append([s["line_acc"]] if "line_acc" in s else [s["tp"], s["n_true"], s["n_pred"]])
    return np.asarray(rows, dtype=np.float64)


def measure(stats: np.ndarray) -> np.ndarray:
    """The split's measure from item stats summed over axis -2: line accuracy, or F1 (2 tp / (true + predicted))."""
    s = stats.sum(axis=-2)
    if s.shape[-1] == 1:
        return s[..., 0] / stats.shape[-2]
    return 2 * s[..., 0] / np.maximum(s[..., 1] + s[..., 2], 1)


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """B - A on the split, and the 2.5 / 97.5 % quantiles of B - A over resamples of the items."""
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = np.empty(RESAMPLES)
    for k in range(0, RESAMPLES, 500):
        idx = rng.integers(0, n, size=(min(500, RESAMPLES - k), n))
        diffs[k:k + len(idx)] = measure(b[idx]) - measure(a[idx])
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float(measure(b) - measure(a)), float(lo), float(hi)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=list(M.MEASURE))
    ap.add_argument("files", nargs="+", help="model files, or `float`; the first is the reference")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if len(a.files) < 2:
        ap.error("give a reference and at least one file to compare with it")
    b = M.Bench(a.model, a.threads, None)
    stats = {}
    for f in a.files:
        path = b.pipe.float_path if f == "float" else Path(f)
        if not Path(path).exists():
            ap.error(f"no such file: {f}")
        M.log(f"{a.model}: predicting with {f}")
        stats[f] = item_stats(b, b.predict(path))
    ref = a.files[0]
    name = M.MEASURE[a.model]
    print(f"{a.model}: {name} on {len(b.items)} test items; reference A = {ref}: {measure(stats[ref]):.4f}")
    for f in a.files[1:]:
        d, lo, hi = paired_interval(stats[ref], stats[f])
        verdict = "holds 0: not told apart" if lo <= 0 <= hi else "excludes 0"
        line = (f"  B = {f}: {measure(stats[f]):.4f}   B - A = {100 * d:+.2f} pp, 95 % interval "
                f"[{100 * lo:+.2f}, {100 * hi:+.2f}] pp ({verdict})")
        if stats[f].shape[1] == 1:
            only_b = int(((stats[f] > 0) & (stats[ref] == 0)).sum())
            only_a = int(((stats[ref] > 0) & (stats[f] == 0)).sum())
            line += f"; read by B only {only_b}, by A only {only_a}"
        print(line)


if __name__ == "__main__":
    main()
