"""Per-layer sensitivity to quantization: quantize one layer at a time and measure what it costs.

For each layer that `mark` quantizes (Conv/Gemm/MatMul; `exclude` leaves some out), a QAT session is built in
which only that layer's node unit is quantized — its input, its weight (with its BatchNormalization folded), its
int32 bias and its output after a following Relu/Clip; every other node stays float (QuantConfig.exclude lists
them all). Its activation quantizers get min/max ranges calibrated once on the float model (one pass for all
layers: ranges come from float activations, so they do not depend on which layer is quantized). Then, in eval
mode (the deployed numerics), on the same images:

- sqnr_db: signal-to-quantization-noise ratio of the model output (the logits) against the float model's,
  10 * log10(sum f^2 / sum (f - q)^2), capped at SQNR_CAP_DB when the outputs are identical; a model of several
  outputs (a detector's heads) without labels is measured on all of them, each before its Softmax if it has one,
  and its SQNR is their mean in dB (the first output alone ranked a layout detector's layers by one head of 8);
- top1 and top1_drop (float top-1 minus this top-1), when the data's labels are the model's classes.

At 8-bit weights most layers barely move the output, so the default is 4-bit weights (8-bit activations): the
ranking then shows which layers need the bits. Layers are ranked by SQNR, lowest (most sensitive) first.
`qatool.quant.mixed.plan_mixed_precision` turns the ranking into per-layer bit widths for a size budget;
`qatool.api.sensitivity` is the `qatool sensitivity` command's pipeline (reading the model and the data, writing
the report).
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import ModelError, UsageError
from .calibrate import apply_ranges, calibration_indices, collect_ranges
from .config import QuantConfig
from .prepare import Layer, mark
from .qparams import activation_grid
from .quantized import QuantizedModel

DEFAULT_BITS = 4
DEFAULT_IMAGES = 1000
DEFAULT_CALIBRATION_IMAGES = 256
SQNR_CAP_DB = 200.0
BATCH_SIZE = 100


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 * log10(sum ref^2 / sum (ref - test)^2) in dB, in float64; SQNR_CAP_DB when they are equal."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return float(min(10.0 * np.log10(signal / noise), SQNR_CAP_DB))


def single_layer_config(graph, layer: Layer, base: QuantConfig) -> QuantConfig:
    """`base` with every node except the layer's own unit (the layer, its folded BN, its fused Relu/Clip) in
    `exclude`, so that only this layer is quantized."""
    keep = {n.name for n in (layer.node, layer.bn, layer.activation) if n is not None}
    kept_ops = {n.op_type for n in (layer.node, layer.bn, layer.activation) if n is not None}
    # exclude matches op types too: a node named like one of the kept op types would exclude the unit itself
    exclude = [n.name for n in graph.nodes if n.name not in keep and n.name not in kept_ops]
    settings = base.to_dict()
    settings.update(exclude=exclude, layer_weight_bits={})
    return QuantConfig(**settings)


def _logits(model, outputs: list[str], data, indices: np.ndarray) -> list[np.ndarray]:
    """The model's `outputs` on the items `indices`, each flattened per item and joined: [items, values] (items
    of several input shapes, a recogniser's widths, give outputs of several sizes: then one row of all values), in
    the order of `_order`."""
    from ..runtime.backends import engine_batch_size

    name = model.input_names[0]
    outs: list[list[np.ndarray]] = [[] for _ in outputs]
    batch = min(BATCH_SIZE, engine_batch_size(model, data, outputs))
    for chosen in _groups(data, indices):
        for start in range(0, len(chosen), batch):
            x, _ = data.batch(chosen[start:start + batch])
            for joined, value in zip(outs, model.forward({name: x}, training=False, outputs=outputs)):
                joined.append(value)
    return [_joined(o) for o in outs]


def _joined(outs: list[np.ndarray]) -> np.ndarray:
    if len({o.shape[1:] for o in outs}) == 1:
        return np.concatenate(outs).reshape(sum(len(o) for o in outs), -1)
    return np.concatenate([o.ravel() for o in outs])[None]


def compared_outputs(graph, labelled: bool) -> list[str]:
    """The tensors a layer's cost is measured on: the logits of a classifier with labels (`logits_tensor`),
    else every graph output, each before its Softmax if it has one."""
    from ..tasks.base import pre_softmax
    from ..tasks.heads import LOGITS_KEY, logits_tensor

    if labelled or graph.metadata.get(LOGITS_KEY) or len(graph.output_names) == 1:
        return [logits_tensor(graph)]
    return [pre_softmax(graph, o) or o for o in graph.output_names]


def outputs_sqnr_db(references: list[np.ndarray], tests: list[np.ndarray]) -> float:
    """The mean over the outputs of each one's SQNR in dB."""
    return float(np.mean([sqnr_db(r, t) for r, t in zip(references, tests)]))


def _groups(data, indices: np.ndarray) -> list[np.ndarray]:
    """`indices` split by the data's groups of one input shape (a batch never mixes two)."""
    return [g[np.isin(g, indices)] for g in data.groups if np.isin(g, indices).any()]


def _order(data, indices: np.ndarray) -> np.ndarray:
    return np.concatenate(_groups(data, indices))


def _top1(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None or logits.ndim != 2 or len(logits) != len(labels):  # not a classifier's output
        return None
    return float(np.mean(logits.argmax(axis=1) == labels))


def layer_sensitivity(float_graph, data, quant: QuantConfig | None = None, images: int | None = DEFAULT_IMAGES,
                      calibration_images: int | None = DEFAULT_CALIBRATION_IMAGES, labelled: bool = True,
                      seed: int = 0, echo=None) -> dict:
    """The sensitivity measurements on a float training graph (`normalize_proto(..., for_training=True).graph`)
    and loaded images (LoadedImages / StreamingImages, preprocessed for the model). `quant` gives the bits
    (default: 4-bit weights, 8-bit activations), per-channel / symmetric settings and the nodes to leave out
    (`exclude`). `images` / `calibration_images`: seeded random subsets measured on / calibrated on (None: all).
    Returns the report without the file names (see `qatool.api.sensitivity`)."""
    from ..engine.model import Model

    say = echo or (lambda s: None)
    quant = quant or QuantConfig(weight_bits=DEFAULT_BITS)
    layers = mark(float_graph, QuantConfig(exclude=list(quant.exclude))).layers
    if not layers:
        raise ModelError("no Conv, Gemm or MatMul of the model can be quantized (check --exclude, and that weights "
                         "are initializers)")
    outputs = compared_outputs(float_graph, labelled and getattr(data, "labels", None) is not None)
    eval_idx = calibration_indices(len(data), images, seed)
    labels = np.asarray(data.labels)[_order(data, eval_idx)] \
        if labelled and getattr(data, "labels", None) is not None else None
    float_model = Model(copy.deepcopy(float_graph))
    ref = _logits(float_model, outputs, data, eval_idx)
    del float_model
    float_top1 = _top1(ref[0], labels)

    configs = [(layer, single_layer_config(float_graph, layer, quant)) for layer in layers]
    tensors = list(dict.fromkeys(t for _, cfg in configs for t in mark(float_graph, cfg).quantized))
    grid = activation_grid(quant.activation_bits, quant.symmetric_activations)
    n_cal = len(calibration_indices(len(data), calibration_images, seed))
    say(f"calibrating {len(tensors)} activations (minmax) on {n_cal} images; measuring {len(layers)} layers at "
        f"W{quant.weight_bits}A{quant.activation_bits} on {len(eval_idx)} images")
    ranges = collect_ranges(float_graph, tensors, data, "minmax", calibration_images, grid, seed=seed)

    rows, skipped = [], []
    for k, (layer, cfg) in enumerate(configs, 1):
        node = layer.node
        quantized = QuantizedModel.create(float_graph, cfg)
        if [lyr.node.name for lyr in quantized.plan.layers] != [node.name]:
            skipped.append({"node": node.name, "reason": "the layer could not be quantized on its own"})
            continue
        apply_ranges(quantized, ranges)
        out = _logits(quantized.model, outputs, data, eval_idx)
        top1 = _top1(out[0], labels)
        row = {
            "node": node.name,
            "op_type": node.op_type,
            "params": int(float_graph.initializers[node.input(1)].size),
            "sqnr_db": round(outputs_sqnr_db(ref, out), 4),
            "top1": top1,
            "top1_drop": None if top1 is None else round(float_top1 - top1, 6),
        }
        rows.append(row)
        say(f"[{k}/{len(configs)}] {node.name} ({node.op_type}): SQNR {row['sqnr_db']:.1f} dB"
            + ("" if top1 is None else f", top-1 {top1:.4f}"))
    rows.sort(key=lambda r: r["sqnr_db"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    total_params = sum(r["params"] for r in rows)
    return {
        "images": int(len(eval_idx)),
        "calibration_images": int(n_cal),
        "calibration_method": "minmax",
        "bits": quant.weight_bits,
        "activation_bits": quant.activation_bits,
        "per_channel": quant.per_channel,
        "symmetric_activations": quant.symmetric_activations,
        "output": ", ".join(outputs),
        "float_top1": float_top1,
        "total_params": total_params,
        "float_weight_bytes": total_params * 4,
        "layers": rows,
        "skipped_layers": skipped,
    }


def format_table(report: dict) -> list[str]:
    """The ranked table, most sensitive first."""
    rows = report["layers"]
    width = max([len("node")] + [len(r["node"]) for r in rows])
    lines = [f"sensitivity at W{report['bits']}A{report['activation_bits']} on {report['images']} images "
             f"(float top-1 {_pct(report['float_top1'])}); lowest SQNR = most sensitive",
             f"{'rank':>4}  {'node':<{width}}  {'op':<6} {'params':>9} {'SQNR dB':>8} {'top-1':>7} {'drop pp':>7}"]
    for r in rows:
        drop = "" if r["top1_drop"] is None else f"{100 * r['top1_drop']:+.2f}"
        lines.append(f"{r['rank']:>4}  {r['node']:<{width}}  {r['op_type']:<6} {r['params']:>9} "
                     f"{r['sqnr_db']:>8.2f} {_pct(r['top1']):>7} {drop:>7}")
    for s in report.get("skipped_layers", []):
        lines.append(f"not measured: {s['node']}: {s['reason']}")
    return lines


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
