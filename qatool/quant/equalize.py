"""Channel equalisation before low-bit weights (`QuantConfig.equalize`): a layer whose weight columns (its input
channels) differ widely in size gets them evened out, the difference moved into the layer upstream.

Per output channel, a weight row is quantized on one step, set by its largest entry. When one input channel's
column is far larger than the rest (PP-OCRv4's recogniser: in a 480x120 squeeze-excitation conv 414 of 480 rows
peak in input channel 43), that column sets every row's step and at 4 bits the other columns round to a few
levels. Dividing column j by t_j and multiplying the input's channel j by t_j leaves the float model's function
unchanged when the multiplication is absorbed upstream (Nagel et al. 2019, cross-layer equalisation; Xiao et al.
2022, SmoothQuant, for the balance with the activations):

    absorber -> [ops that commute with a positive per-channel scale] -> consumer layers

- absorber: a Conv (output channel j of its weight and bias x t_j), a BatchNormalization (gamma_j, beta_j), a
  MatMul or Gemm with a constant weight. Its weights are quantized per output channel, so the scale costs them
  nothing; what it changes is the range of the tensors in between, quantized per tensor;
- in between: Relu, LeakyRelu, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Identity, Dropout, a Mul
  or Div by a constant, a Mul by a gate (a tensor the scale does not reach, as a squeeze-excitation's);
- consumers: Conv (group 1), MatMul and Gemm with a constant weight: input channel j / t_j.

Every tensor between the absorber and the consumers must be read only by such ops (a residual Add, a Sigmoid or a
graph output ends the search: that group is left alone). The float model is run afterwards on the same inputs and
compared with the original: if any output moves, nothing is changed (`same_function`).

t_j = w_j^alpha / x_j^(1 - alpha), w_j the largest |weight| of column j over the consumers (each consumer's
columns divided by their median: a consumer with an outlier column speaks for it, one with even columns does not
hold it back), x_j the largest |input| of channel j on calibration inputs, alpha chosen per
group among ALPHAS by the consumers' output error once quantized (weights per row at their bits, rounded to
nearest; the input per tensor on the activation grid) on those inputs; no change when none beats the unequalised
error by MARGIN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Graph, Node, ValueInfo
from .qparams import activation_grid, activation_qparams, fake_quant, weight_grid, weight_scales

PASS = ("Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout")
ALPHAS = (0.25, 0.5, 0.75)
MARGIN = 0.9  # the chosen alpha's error must be below this fraction of the unequalised one
EQUALIZE_IMAGES = 16  # calibration inputs the statistics come from
SAMPLE_COLUMNS = 4096  # input positions per consumer the error is measured on
T_LIMIT = 32.0  # t_j kept within [1/T_LIMIT, T_LIMIT] of its geometric mean
CHECK_TOLERANCE = 1e-3  # of the outputs' largest magnitude: the float model must not move more


@dataclass
class Group:
    """One equalisable set: the absorber, the consumers whose input channels it balances, and the channel axis
    of the tensors in between (1, or -1 into a MatMul)."""

    absorber: Node
    consumers: list[Node]
    axis: int
    channels: int


@dataclass
class EqualizeReport:
    groups: int = 0  # equalisable groups found
    changed: list[dict] = field(default_factory=list)  # per equalised group: absorber, consumers, alpha, errors
    undone: list[str] = field(default_factory=list)  # absorbers of a change undone: it moved the float outputs

    def summary(self) -> str:
        if self.undone:
            return (f"channel equalisation left out: equalising {len(self.undone)} of {self.groups} groups moved the "
                    "float model's outputs (the model is quantized as it was)")
        if not self.changed:
            return f"channel equalisation: {self.groups} groups found, none improved by it"
        gain = np.mean([c["error_after"] / max(c["error_before"], 1e-30) for c in self.changed])
        return (f"channel equalisation: {len(self.changed)} of {self.groups} groups equalised (their layers' "
                f"quantized output error x{gain:.2f} on average)")

    def to_dict(self) -> dict:
        return {"groups": self.groups, "changed": self.changed, "undone": self.undone}


# ---- the graph: which groups exist ------------------------------------------------------------------------------
def _constant(graph: Graph, name: str) -> bool:
    return bool(name) and name in graph.initializers


def _consumer_axis(graph: Graph, node: Node, layers: set[str]) -> int | None:
    """The channel axis a quantized layer reads its input's channels on (1: Conv of group 1; -1: a MatMul or
    Gemm with a constant weight), or None when it cannot take an equalisation."""
    if node.name not in layers:
        return None
    if node.op_type == "Conv" and int(node.attrs.get("group", 1)) == 1 and _constant(graph, node.input(1)):
        return 1
    if node.op_type == "MatMul" and _constant(graph, node.input(1)) and graph.initializers[node.input(1)].ndim == 2:
        return -1
    if node.op_type == "Gemm" and _constant(graph, node.input(1)) and not node.attrs.get("transA", 0):
        return -1
    return None


def _absorber_axis(graph: Graph, node: Node) -> int | None:
    """The channel axis of an absorber's output (1, -1), or None when the node cannot take a per-channel scale
    exactly: a Conv (its weight and bias), a BatchNormalization (gamma and beta), a MatMul or Gemm with a constant
    weight. (A Mul by a constant could take it too, but its constant, one value per channel, is then quantized per
    tensor, and an 8-bit output quantizer appears where a scalar rescale needed none: on PP-OCRv4's recogniser at
    W4A8 that cost 2.6 dB of output SQNR where the layers' own error said it would gain.)"""
    op = node.op_type
    if op == "Conv" and _constant(graph, node.input(1)):
        return 1
    if op == "BatchNormalization" and all(_constant(graph, node.input(i)) for i in (1, 2)):
        return 1
    if op in ("MatMul", "Gemm") and _constant(graph, node.input(1)) and graph.initializers[node.input(1)].ndim == 2:
        return -1
    return None


def _find_absorber(graph: Graph, producers: dict, tensor: str, depth: int = 32) -> Node | None:
    """The nearest node upstream of `tensor`, through ops that commute with a per-channel scale, that can take
    one; None if the way meets anything else."""
    node = producers.get(tensor)
    if node is None or depth == 0:
        return None
    if _absorber_axis(graph, node) is not None:
        return node
    data = [i for i in node.inputs if i and not _constant(graph, i)]
    if node.op_type in PASS or (node.op_type in ("Mul", "Div") and len(data) == 1 and node.input(0) == data[0]):
        return _find_absorber(graph, producers, node.input(0), depth - 1)
    if node.op_type == "Mul" and len(data) == 2:  # a gate: the scale comes through one side
        for t in data:
            found = _find_absorber(graph, producers, t, depth - 1)
            if found is not None:
                return found
    return None


def _group_of(graph: Graph, absorber: Node, consumers_of: dict, layers: set[str]) -> Group | None:
    """The group downstream of `absorber`'s output, or None when a tensor on the way is read by anything that
    would not carry the scale or take it."""
    outputs = set(graph.output_names)
    scaled, todo = {absorber.outputs[0]}, [absorber.outputs[0]]
    consumers, axes = [], set()
    while todo:
        t = todo.pop()
        if t in outputs:
            return None
        for c in consumers_of.get(t, []):
            if c.inputs.count(t) != 1:
                return None
            idx = c.inputs.index(t)
            data = [i for i in c.inputs if i and not _constant(graph, i)]
            axis = _consumer_axis(graph, c, layers) if idx == 0 else None
            if axis is not None:
                if c not in consumers:
                    consumers.append(c)
                axes.add(axis)
                continue
            carries = (c.op_type in PASS and idx == 0) or (
                c.op_type == "Mul" and (len(data) == 1 or not any(i in scaled for i in data if i != t))) or (
                c.op_type == "Div" and idx == 0 and len(data) == 1)
            if not carries:
                return None
            if c.outputs[0] not in scaled:
                scaled.add(c.outputs[0])
                todo.append(c.outputs[0])
    if not consumers or axes != {_absorber_axis(graph, absorber)}:
        return None
    channels = {_consumer_weight(graph, c).shape[0] for c in consumers}
    if len(channels) != 1:
        return None
    return Group(absorber, consumers, axes.pop(), channels.pop())


def find_groups(graph: Graph, layers: set[str]) -> list[Group]:
    """The equalisable groups whose consumers are among `layers` (node names), one per absorber."""
    producers, consumers_of = graph.producers(), graph.consumers()
    uses: dict[str, int] = {}
    for n in graph.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    groups, seen = [], set()
    for node in graph.nodes:
        if _consumer_axis(graph, node, layers) is None:
            continue
        absorber = _find_absorber(graph, producers, node.input(0))
        if absorber is None or absorber.name in seen:
            continue
        seen.add(absorber.name)
        group = _group_of(graph, absorber, consumers_of, layers)
        # a weight shared with another node would change there too
        if group is not None and all(uses.get(c.input(1), 0) == 1 for c in group.consumers) and (
                absorber.op_type not in ("Conv", "MatMul", "Gemm") or uses.get(absorber.input(1), 0) == 1):
            groups.append(group)
    return groups


# ---- weights as [columns = input channels] ----------------------------------------------------------------------
def _consumer_weight(graph: Graph, node: Node) -> np.ndarray:
    """The consumer's weight with its input channels on axis 0: Conv [Cout, Cin, k...] -> [Cin, Cout, k...];
    MatMul [K, M] as it is; Gemm [K, M] (or its transpose with transB)."""
    w = graph.initializers[node.input(1)]
    if node.op_type == "Conv":
        return np.swapaxes(w, 0, 1)
    if node.op_type == "Gemm" and node.attrs.get("transB", 0):
        return w.T
    return w


def _consumer_rows(graph: Graph, node: Node) -> np.ndarray:
    """The weight as [output channels, columns], columns ordered as `_columns` orders the inputs."""
    w = graph.initializers[node.input(1)].astype(np.float32)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return _consumer_weight(graph, node).astype(np.float32).T


def _columns(node: Node, x: np.ndarray, w_shape: tuple[int, ...], rng, limit: int) -> np.ndarray:
    """Up to `limit` of the layer's input columns [K, P] at random output positions (a Conv's patches, ordered
    (cin, kh, kw); a MatMul's rows of the last axis)."""
    if node.op_type != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        pick = rng.choice(len(flat), min(limit, len(flat)), replace=False)
        return flat[pick].T
    if x.ndim == 3:
        x = x[:, :, None, :]
    kernel = w_shape[2:] if len(w_shape) == 4 else (1, *w_shape[2:])
    attrs = node.attrs
    spatial = 2 if len(w_shape) == 4 else 1
    strides = (list(attrs.get("strides", [1] * spatial)) + [1])[:spatial]
    dil = (list(attrs.get("dilations", [1] * spatial)) + [1])[:spatial]
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if spatial == 1:
        strides, dil, pads = [1, *strides], [1, *dil], [0, pads[0], 0, pads[1]]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, hp, wp = xp.shape
    kh, kw = kernel
    ho = (hp - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (wp - dil[1] * (kw - 1) - 1) // strides[1] + 1
    total = n * ho * wo
    pick = rng.choice(total, min(limit, total), replace=False)
    b, rest = np.divmod(pick, ho * wo)
    oh, ow = np.divmod(rest, wo)
    ih = oh[:, None] * strides[0] + np.arange(kh)[None, :] * dil[0]  # [P, kh]
    iw = ow[:, None] * strides[1] + np.arange(kw)[None, :] * dil[1]  # [P, kw]
    patches = xp[b[:, None, None, None], np.arange(c)[None, :, None, None], ih[:, None, :, None],
                 iw[:, None, None, :]]  # [P, C, kh, kw]
    return patches.reshape(len(pick), -1).T


# ---- statistics and the choice of t -----------------------------------------------------------------------------
@dataclass
class _Sample:
    columns: list[np.ndarray]  # per consumer: [K, P]
    channel_max: np.ndarray  # [C]: the largest |input| per channel over the consumers


def collect(graph: Graph, groups: list[Group], data, indices: np.ndarray, batch_size: int = 4,
            seed: int = 0) -> list[_Sample]:
    """Per group, the consumers' input columns and per-channel maxima on the inputs `indices` of `data` (the
    float model in eval mode on qatool's engine)."""
    from ..engine.model import Model
    from .calibrate import _batches

    g = copy.deepcopy(graph)
    tensors = list(dict.fromkeys(c.input(0) for grp in groups for c in grp.consumers))
    g.outputs = [ValueInfo(t) for t in tensors]
    g.cleanup()
    model = Model(g)
    rng = np.random.default_rng(seed)
    batches = max(1, -(-len(indices) // batch_size))
    cols: list[list[list[np.ndarray]]] = [[[] for _ in grp.consumers] for grp in groups]
    maxima = [np.zeros(grp.channels, np.float32) for grp in groups]
    for x in _batches(data, indices, batch_size):
        values = dict(zip(tensors, model.forward({model.input_names[0]: x}, training=False, outputs=tensors)))
        for gi, grp in enumerate(groups):
            for ci, c in enumerate(grp.consumers):
                v = values[c.input(0)]
                axis = grp.axis % v.ndim
                other = tuple(i for i in range(v.ndim) if i != axis)
                maxima[gi] = np.maximum(maxima[gi], np.abs(v).max(axis=other))
                w_shape = graph.initializers[c.input(1)].shape
                cols[gi][ci].append(_columns(c, v, w_shape, rng, -(-SAMPLE_COLUMNS // batches)))
    return [_Sample([np.concatenate(c, axis=1) for c in cs], m) for cs, m in zip(cols, maxima)]


def _error(rows: list[np.ndarray], cols: list[np.ndarray], repeats: list[int], t: np.ndarray,
           weight_bits: list[int], act_bits: int, symmetric: bool) -> float:
    """The consumers' relative output error, summed: weights per row rounded to nearest at their bits (scales
    as the export computes them), inputs per tensor on the activation grid (their sample's min/max)."""
    agrid = activation_grid(act_bits, symmetric)
    total = 0.0
    for W, X, r, bits in zip(rows, cols, repeats, weight_bits):
        ref = W @ X
        tt = np.repeat(t, r)[:, None]
        xs = X * tt
        scale, zero = activation_qparams(min(float(xs.min()), 0.0), max(float(xs.max()), 0.0), agrid)
        xq = fake_quant(xs, scale, zero, agrid, want_mask=False)[0]
        wt = W / tt.T
        grid = weight_grid(bits)
        wq = fake_quant(wt, weight_scales(wt, 0, grid), 0, grid, axis=0, want_mask=False)[0]
        # the float model computes W (X t) / t = W X: the error is what quantization adds
        total += float(np.sum((wq @ xq - ref) ** 2) / max(float(np.sum(ref ** 2)), 1e-30))
    return total


def choose(graph: Graph, group: Group, sample: _Sample, weight_bits: list[int], act_bits: int,
           symmetric: bool) -> tuple[np.ndarray | None, dict]:
    """The group's t (None: leave it) and what was measured."""
    rows = [_consumer_rows(graph, c) for c in group.consumers]
    repeats = [r.shape[1] // group.channels for r in rows]
    w = np.zeros(group.channels, np.float32)
    for c in group.consumers:
        wc = np.abs(_consumer_weight(graph, c)).reshape(group.channels, -1).max(axis=1)
        w = np.maximum(w, wc / max(float(np.median(wc)), 1e-30))
    x = sample.channel_max / max(float(sample.channel_max.max()), 1e-30)
    live = (w > 0) & (x > 0)
    one = np.ones(group.channels, np.float32)
    before = _error(rows, sample.columns, repeats, one, weight_bits, act_bits, symmetric)
    best, best_err, best_alpha = None, before, None
    for alpha in ALPHAS if live.any() else ():
        t = np.ones(group.channels, np.float64)
        t[live] = w[live] ** alpha / x[live] ** (1 - alpha)
        t[live] /= np.exp(np.mean(np.log(t[live])))
        t = np.clip(t, 1 / T_LIMIT, T_LIMIT).astype(np.float32)
        err = _error(rows, sample.columns, repeats, t, weight_bits, act_bits, symmetric)
        if err < best_err:
            best, best_err, best_alpha = t, err, alpha
    if best is not None and best_err > MARGIN * before:
        best = None
    return best, {"absorber": group.absorber.name, "consumers": [c.name for c in group.consumers],
                  "alpha": best_alpha if best is not None else None, "error_before": before,
                  "error_after": best_err if best is not None else before}


# ---- the change -------------------------------------------------------------------------------------------------
def _set(graph: Graph, node: Node, idx: int, value: np.ndarray, uses: dict) -> None:
    """Give input `idx` of `node` the constant `value`: in place when only this node reads it, else as a new
    initializer (a shared constant, hard-swish's + 3, stays as the others read it)."""
    name = node.inputs[idx]
    dtype = graph.initializers[name].dtype
    if uses.get(name, 0) > 1:
        uses[name] -= 1
        name = node.inputs[idx] = f"{name}_eq_{node.name}"
        uses[name] = 1
    graph.initializers[name] = np.asarray(value).astype(dtype)


def apply(graph: Graph, group: Group, t: np.ndarray, uses: dict) -> None:
    """Scale the group's channels by t in `graph` (the group's nodes are `graph`'s): the absorber's output
    channel j x t_j, the consumers' input channel j / t_j."""
    a, init = group.absorber, graph.initializers
    if a.op_type == "Conv":
        w = init[a.input(1)]
        _set(graph, a, 1, w * t.reshape(-1, *[1] * (w.ndim - 1)), uses)
        if a.input(2):
            _set(graph, a, 2, init[a.input(2)] * t, uses)
    elif a.op_type == "BatchNormalization":
        _set(graph, a, 1, init[a.input(1)] * t, uses)
        _set(graph, a, 2, init[a.input(2)] * t, uses)
    elif a.op_type in ("MatMul", "Gemm"):
        trans = a.op_type == "Gemm" and a.attrs.get("transB", 0)
        _set(graph, a, 1, init[a.input(1)] * (t[:, None] if trans else t[None, :]), uses)
        if a.op_type == "Gemm" and a.input(2):
            _set(graph, a, 2, np.broadcast_to(init[a.input(2)], t.shape) * t, uses)
    for c in group.consumers:
        w = init[c.input(1)]
        if c.op_type == "Conv":
            new = w / t.reshape(1, -1, *[1] * (w.ndim - 2))
        elif c.op_type == "Gemm" and c.attrs.get("transB", 0):
            new = w / t[None, :]
        else:
            new = w / t[:, None]
        _set(graph, c, 1, new, uses)


def equalize(graph: Graph, layer_bits: dict[str, int], act_bits: int, symmetric: bool, data,
             indices: np.ndarray, seed: int = 0) -> tuple[Graph, EqualizeReport]:
    """An equalised copy of the float `graph` (the same function) for the quantized layers `layer_bits` (node
    name -> weight bits; only groups with a layer at quant.config.LOW_BITS bits or fewer are considered), from
    statistics on the inputs `indices` of `data`. The copy is run beside `graph` on a batch of those inputs: if
    any output moves by more than CHECK_TOLERANCE of its largest value, `graph` itself is returned (`undone`)."""
    from .config import LOW_BITS

    report = EqualizeReport()
    low = {n for n, b in layer_bits.items() if b <= LOW_BITS}
    groups = [g for g in find_groups(graph, set(layer_bits)) if any(c.name in low for c in g.consumers)]
    report.groups = len(groups)
    if not groups:
        return graph, report
    samples = collect(graph, groups, data, indices, seed=seed)
    out = copy.deepcopy(graph)
    by_name = {n.name: n for n in out.nodes}
    uses: dict[str, int] = {}
    for n in out.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    for grp, s in zip(groups, samples):
        t, measured = choose(graph, grp, s, [layer_bits[c.name] for c in grp.consumers], act_bits, symmetric)
        if t is None:
            continue
        mine = Group(by_name[grp.absorber.name], [by_name[c.name] for c in grp.consumers], grp.axis, grp.channels)
        apply(out, mine, t, uses)
        report.changed.append(measured)
    if report.changed and not same_function(graph, out, data, indices):
        report.undone, report.changed = [m["absorber"] for m in report.changed], []
        return graph, report
    return out, report


def same_function(graph: Graph, other: Graph, data, indices: np.ndarray) -> bool:
    """Whether `other` computes what `graph` computes on (up to 4 of) the inputs `indices` of `data`: every output
    within CHECK_TOLERANCE of its largest magnitude."""
    from ..engine.model import Model
    from .calibrate import _batches

    x = next(_batches(data, indices[:4], 4))
    outs = [Model(g).forward({g.input_names[0]: x}, training=False) for g in (graph, other)]
    return all(np.abs(a - b).max(initial=0.0) <= CHECK_TOLERANCE * max(float(np.abs(a).max(initial=0.0)), 1e-12)
               for a, b in zip(*outs))
