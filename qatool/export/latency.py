"""Latency of the int8 model against the float model it came from, on onnxruntime CPU, measured the way a
benchmark on a shared machine must be: the sessions loaded first, then interleaved rounds (float, int8, int8,
float, ...) on the same random batch, in two passes that load the sessions in opposite orders, the median of each.
When int8 is the slower, onnxruntime's profiler says which of its ops cost most. `interleaved_ms` is the timing
itself, for any number of models (bench/int8_speed.py times three with it)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

ROUNDS = 6  # three in each loading order
INPUT_BUDGET_BYTES = 16 << 20  # the larger batch: at most this much input (27 images at 3 x 224 x 224), <= 32
MAX_BATCH = 32


@dataclass
class Latency:
    batches: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch -> (float ms, int8 ms)
    costliest: list[tuple[str, float]] = field(default_factory=list)  # int8 op types and their share of time
    costliest_nodes: list[tuple[str, float]] = field(default_factory=list)  # int8 nodes and their share
    rounds: int = ROUNDS  # rounds run per batch size (both loading orders)

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "batches": {str(b): {"float_ms": f, "int8_ms": q, "ratio": q / f}
                                              for b, (f, q) in self.batches.items()},
                "int8_costliest_ops": [{"op_type": t, "share": s} for t, s in self.costliest],
                "int8_costliest_nodes": [{"node": n, "share": s} for n, s in self.costliest_nodes]}


def latency_lines(d: dict) -> list[str]:
    parts = [f"batch {b}: float {v['float_ms']:.1f} ms, int8 {v['int8_ms']:.1f} ms ({v['ratio']:.2f}x)"
             for b, v in d["batches"].items()]
    lines = [f"latency on onnxruntime (median of {d['rounds']} interleaved rounds): " + "; ".join(parts)]
    if d["int8_costliest_ops"]:
        ops = ", ".join(f"{c['op_type']} {c['share']:.0%}" for c in d["int8_costliest_ops"])
        nodes = ", ".join(f"{c['node']} {c['share']:.0%}" for c in d.get("int8_costliest_nodes", []))
        lines.append(f"  the int8 model is SLOWER than float; its time goes to: {ops}; costliest nodes: {nodes}")
    return lines


def batch_sizes(input_shape: list[int]) -> tuple[int, int]:
    per_image = 4 * int(np.prod(input_shape[1:]))
    return 1, int(max(1, min(MAX_BATCH, INPUT_BUDGET_BYTES // max(per_image, 1))))


def _session(model, profile_prefix: str | None = None, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def interleaved_ms(models: dict, inputs: dict[int, np.ndarray], rounds: dict[int, int],
                   threads: int | None = None) -> dict[str, dict[int, float]]:
    """Median ms of every model (name -> ModelProto or path) on every input (batch -> array). Two passes of half
    the rounds each, the sessions loaded in the given order and then in the reverse one; every round runs each
    model once, starting with the next model each round. No fixed order may favour a model: on these machines
    one file loaded twice measured 1-3 % apart, the one loaded last the faster (bench/int8_speed.py)."""
    names = list(models)
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in inputs} for k in names}
    for order in (names, names[::-1]):
        sessions = {k: _session(models[k], threads=threads) for k in order}
        for batch, x in inputs.items():
            for s in sessions.values():  # warm up
                s.run(None, {s.get_inputs()[0].name: x})
            for r in range(rounds_run(rounds[batch]) // 2):
                for k in order[r % len(order):] + order[:r % len(order)]:
                    s = sessions[k]
                    t0 = time.perf_counter()
                    s.run(None, {s.get_inputs()[0].name: x})
                    times[k][batch].append(time.perf_counter() - t0)
        del sessions
    return {k: {b: float(np.median(t) * 1e3) for b, t in per.items()} for k, per in times.items()}


def rounds_run(rounds: int) -> int:
    """The rounds `interleaved_ms` runs for `rounds`: half in each loading order, rounded up."""
    return 2 * ((rounds + 1) // 2)


def measure(float_model: onnx.ModelProto | str, int8_model: onnx.ModelProto | str, input_shape: list[int],
            rounds: int = ROUNDS, fixed_batch: bool = False) -> Latency:
    """float vs int8 at batch 1 and at the larger batch of `batch_sizes`; `input_shape` with any batch dim.
    `fixed_batch`: the models take a batch of 1 only (one whose batch could not be freed): batch 1 alone."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal([b, *input_shape[1:]]).astype(np.float32)
              for b in dict.fromkeys((1,) if fixed_batch else batch_sizes(input_shape))}
    ms = interleaved_ms({"float": float_model, "int8": int8_model}, inputs, {b: rounds for b in inputs})
    result = Latency({b: (ms["float"][b], ms["int8"][b]) for b in inputs}, rounds=rounds_run(rounds))
    f_ms, q_ms = result.batches[max(result.batches)]
    if q_ms > f_ms:
        result.costliest, result.costliest_nodes = costliest_ops(int8_model, inputs[max(inputs)])
    return result


def costliest_ops(model, x: np.ndarray, top: int = 4) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """onnxruntime's profile of a few runs: the op types, and the nodes, with the largest shares of kernel time."""
    with tempfile.TemporaryDirectory() as tmp:
        s = _session(model, os.path.join(tmp, "profile"))
        for _ in range(3):
            s.run(None, {s.get_inputs()[0].name: x})
        with open(s.end_profiling()) as f:
            events = json.load(f)
    by_op: dict[str, float] = {}
    by_node: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            node = f"{e['name'][:-len('_kernel_time')]} ({op})"
            by_op[op] = by_op.get(op, 0.0) + float(e.get("dur", 0))
            by_node[node] = by_node.get(node, 0.0) + float(e.get("dur", 0))
    total = sum(by_op.values()) or 1.0
    return ([(op, t / total) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]],
            [(n, t / total) for n, t in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]])
