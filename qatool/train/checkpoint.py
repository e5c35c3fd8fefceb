"""QAT checkpoints: `qat.onnx` (a standard ONNX file) plus `qat.state.npz` (arrays, no pickle).

`qat.onnx` is the float training graph (BatchNormalization and Dropout kept) with the current weights and BN
statistics, and QuantizeLinear/DequantizeLinear pairs with the current scales: on every quantized activation,
and on every quantized weight (with the scale that the BN-folded weight's scale means for the raw weight, so
onnxruntime can run the file and Netron shows where quantization sits). Its metadata holds the quantization
and training settings and the step. `qat.state.npz` holds what resuming needs beyond that: the observers'
ranges, the optimiser's state and the step.

Loading strips the Q/DQ pairs (reading the activation scales), which gives back the float training graph;
`qatool.quant.prepare` then rebuilds the same QAT graph from it and the settings.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DivergedError, ModelError
from ..ir.graph import Graph, Node
from ..ir.io import load_graph, save_graph
from ..quant.config import QuantConfig
from ..quant.ops import bn_fold_factor, fold_weight, folded_step
from ..quant.prepare import QuantTensor, mark, weight_axes, weight_quant_name
from ..quant.qparams import activation_grid, weight_grid, weight_scales

CHECKPOINT_KEY = "qatool.checkpoint"


def state_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".state.npz")


@dataclass
class Checkpoint:
    float_graph: Graph
    quant: QuantConfig
    train: dict
    step: int
    activation_qparams: dict[str, tuple[np.float32, int]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # from the .state.npz, if present
    info: dict = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, float_graph: Graph, qat_graph: Graph, quant: dict[str, QuantTensor],
                    config: QuantConfig, train: dict, step: int, arrays: dict[str, np.ndarray],
                    info: dict | None = None) -> None:
    """Write qat.onnx and qat.state.npz atomically. `float_graph` gives the structure; the values come from the
    QAT graph (same initializer names for weights and BN statistics)."""
    g = copy.deepcopy(float_graph)
    for name in g.initializers:
        if name in qat_graph.initializers:
            g.initializers[name] = qat_graph.initializers[name]
    plan = mark(g, config)
    producers = g.producers()
    for t in plan.quantized:
        q = quant[t]
        grid = activation_grid(config.activation_bits, config.symmetric_activations)
        scale = np.asarray(qat_graph.initializers[q.scale], np.float32).reshape(())
        zero = np.asarray(qat_graph.initializers[q.zero_point]).astype(grid.storage).reshape(())
        _insert_qdq(g, t, producers.get(t), scale, zero, None)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowed fold is caught just below
        stored = {n.name: qat_graph.initializers[n.input(3)] for n in qat_graph.nodes
                  if n.op_type == "WeightQuant" and n.input(3)}
        for layer in plan.layers:
            _insert_weight_qdq(g, layer, config, stored.get(weight_quant_name(layer.node.name)))
    g.toposort()
    bad = g.nonfinite_initializer()  # finite parameters can still overflow once folded (w * gamma / sigma)
    if bad is not None:
        raise DivergedError(f"the checkpoint's {bad!r} is not finite")
    g.metadata[CHECKPOINT_KEY] = json.dumps({"step": step, "quant": config.to_dict(), "train": train,
                                             **(info or {})})
    arrays = dict(arrays)
    arrays["step"] = np.asarray(step, np.int64)
    for t in plan.quantized:
        arrays[f"span/{t}"] = np.asarray(qat_graph.initializers[quant[t].span])
    _save_npz_atomic(state_path(path), arrays)
    save_graph(g, path)


def _insert_qdq(g: Graph, t: str, producer: Node | None, scale, zero, axis: int | None) -> None:
    s_name, z_name = g.unique_name(f"{t}_scale"), g.unique_name(f"{t}_zero_point")
    g.initializers[s_name], g.initializers[z_name] = scale, zero
    q = g.unique_name(f"{t}_quantized")
    attrs = {"axis": axis} if axis is not None else {}
    if producer is None:  # a graph input or an initializer: consumers read the dequantized copy
        out = g.unique_name(f"{t}_dequantized")
        g.replace_uses(t, out)
        src = t
    else:
        src = g.unique_name(f"{t}_float")
        producer.outputs = [src if o == t else o for o in producer.outputs]
        out = t
    g.nodes.append(Node("QuantizeLinear", [src, s_name, z_name], [q], g.unique_name(f"{t}_QuantizeLinear"), attrs))
    g.nodes.append(Node("DequantizeLinear", [q, s_name, z_name], [out], g.unique_name(f"{t}_DequantizeLinear"),
                        dict(attrs)))


def _insert_weight_qdq(g: Graph, layer, config: QuantConfig, stored: np.ndarray | None = None) -> None:
    """`stored`: the layer's stored step size (LSQ, GPTQ), a step of the unfolded weight (`ops.folded_step`)."""
    w_name = layer.node.input(1)
    w = g.initializers[w_name]
    axis, _ = weight_axes(layer.node)
    grid = weight_grid(config.weight_bits_of(layer.node.name))
    per = axis if config.per_channel else None
    if layer.bn is not None:
        bn = layer.bn
        k = bn_fold_factor(g.initializers[bn.input(1)], g.initializers[bn.input(4)],
                           float(bn.attrs.get("epsilon", 1e-5)))
        scale = weight_scales(fold_weight(w, k, axis), per, grid) if stored is None \
            else folded_step(stored, k, per is not None)
        # fake-quantizing w*k with scale s is fake-quantizing w with scale s/k (up to float rounding)
        scale = (scale / (np.abs(k) if per is not None else 1)).astype(np.float32)
        scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    else:
        scale = weight_scales(w, per, grid) if stored is None else folded_step(stored, None, per is not None)
    _insert_qdq(g, w_name, None, scale, np.zeros(scale.shape, grid.storage), per)


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    from ..ir.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise ModelError(f"cannot write {path}: {e.strerror or e}") from e


def is_checkpoint(graph: Graph) -> bool:
    return CHECKPOINT_KEY in graph.metadata


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    graph = load_graph(path)
    if not is_checkpoint(graph):
        raise ModelError(f"{path} is not a qatool QAT checkpoint (no {CHECKPOINT_KEY} metadata)")
    meta = json.loads(graph.metadata.pop(CHECKPOINT_KEY))
    qparams = strip_qdq(graph)
    arrays: dict[str, np.ndarray] = {}
    sp = state_path(path)
    if sp.is_file():
        try:
            with np.load(sp, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the checkpoint state {sp}: {e}") from e
    info = {k: v for k, v in meta.items() if k not in ("step", "quant", "train")}
    return Checkpoint(graph, QuantConfig.from_dict(meta["quant"]), meta.get("train", {}), int(meta["step"]),
                      qparams, arrays, info)


def strip_qdq(graph: Graph) -> dict[str, tuple[np.float32, int]]:
    """Remove QuantizeLinear -> DequantizeLinear pairs; returns {tensor: (scale, zero point)} of activations."""
    producers, consumers = graph.producers(), graph.consumers()
    qparams: dict[str, tuple[np.float32, int]] = {}
    for dq in [n for n in graph.nodes if n.op_type == "DequantizeLinear"]:
        q = producers.get(dq.input(0))
        if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.outputs[0], [])) != 1:
            continue
        src, out = q.input(0), dq.outputs[0]
        graph.nodes.remove(q)
        graph.nodes.remove(dq)
        producer = producers.get(src)
        if producer is None:  # graph input or initializer
            graph.replace_uses(out, src)
            name = src
        else:
            producer.outputs = [out if o == src else o for o in producer.outputs]
            name = out
        if src not in graph.initializers:
            scale = graph.initializers[q.input(1)]
            zero = graph.initializers[q.input(2)] if q.input(2) else np.zeros((), np.uint8)
            qparams[name] = (np.float32(scale), int(zero))
    graph.cleanup()
    return qparams
