"""Data-aware rounding of the quantized weights (GPTQ, Frantar et al. 2022): `QuantConfig.weight_rounding = "gptq"`.

Round-to-nearest makes each weight's error as small as it can be on its own; GPTQ makes the layer's OUTPUT error
small on calibration inputs. For a layer y = W x (W's rows are the output channels, its columns the inputs a row
reads) the output error of a rounded row w + d is d H d^T with H = X^T X (X: the layer's inputs, one row per
position). The columns are rounded one at a time; each column's rounding error is spread over the columns not yet
rounded, in proportion to H's inverse (through the upper Cholesky factor U of H^-1, H^-1 = U^T U):

    q_i = clip(rint(w_i / s), qmin, qmax);   e = (w_i - q_i s) / U_ii;   w_j -= e U_ij  for j > i

With act-order the columns go in descending order of diag(H) (the inputs with the most energy first), and H gets
1 % of its mean diagonal added (dampening) before inversion; a column whose input is always zero keeps RTN.

What is rounded is the weight qatool quantizes: the BN-folded weight w k (k = gamma / sqrt(var + eps) along the
output-channel axis), on the grid of the layer's stored scale s (`prepare` gives every WeightQuant a stored scale
input when weight_rounding is gptq: `folded_step`, the LSQ path). The scale is kept, not recomputed from the
rounded weights (weight_scales(q s) is usually not s), so the simulation, checkpoint and export all read the same
s and the deployed integers are GPTQ's q. The weight is written back as q s / k, whose fold rounds to q again.

H comes from the FLOAT model's inputs to each layer (eval mode, qatool's engine, a seeded subset of the
calibration inputs): all layers from one pass, or with "gptq-sequential" layer by layer in graph order, each from
the float model whose earlier layers already hold their rounded weights (one pass per layer, over the part of
the graph that computes the layer's input). Activations stay float while H is collected either way.

Columns of a layer (the same order as the weight's row reshape):
- Conv (2-D, group g): im2col of the padded input per group, (Cin/g) * kh * kw columns ordered (cin, kh, kw);
  each group's output channels have their own H;
- MatMul with a constant [K, M] weight: K columns, M rows (the weight transposed);
- Gemm: the weight's rows are the output features (transB) or its transpose.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Graph, Node
from .prepare import weight_quant_name
from .qparams import Grid, channel_shape

DAMP = 0.01  # of the mean diagonal of H, added to it before inversion
GPTQ_IMAGES = 128  # calibration inputs that H is collected on (default)
GPTQ_BATCH = 8  # inputs per forward pass, at most; fewer where one input is large (gptq_batch)
GPTQ_BATCH_ELEMENTS = 1 << 21  # input elements per forward pass: every layer's input of the batch is held at once
# positions per float64 block of a layer's Gram matrix: a whole 8-image im2col of a 3x3 conv at 400x304 was
# 2.2 GB in float64 on the layout detector
GRAM_CHUNK = 1 << 15


# ---- the algorithm ----------------------------------------------------------------------------------------------
def gptq_round(rows: np.ndarray, H: np.ndarray, scale: np.ndarray, grid: Grid, damp: float = DAMP,
               act_order: bool = True) -> np.ndarray:
    """The integers q [R, K] of the rows [R, K] (one output channel each) on the grid of `scale` [R] (or a
    scalar), minimising the output error q s - w over the inputs whose Gram matrix is H [K, K]. H = identity
    (independent inputs of equal energy) gives round-to-nearest exactly."""
    R, K = rows.shape
    W = rows.astype(np.float64)  # a copy: the error compensation writes into it
    s = np.broadcast_to(np.asarray(scale, np.float32).astype(np.float64).reshape(-1), (R,))[:, None]
    H = np.array(H, np.float64)
    diag = np.diagonal(H).copy()
    dead = diag <= 0
    H[dead, dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(K)
    W = W[:, perm]
    H = H[np.ix_(perm, perm)]
    H[np.arange(K), np.arange(K)] += damp * np.mean(np.diagonal(H))
    U = _upper_cholesky_of_inverse(H)
    Q = np.empty((R, K), np.float64)
    for i in range(K):
        q = np.clip(np.rint(W[:, i:i + 1] / s), grid.qmin, grid.qmax)
        Q[:, i:i + 1] = q
        if i + 1 < K:
            err = (W[:, i:i + 1] - q * s) / U[i, i]
            W[:, i + 1:] -= err * U[i, i + 1:][None, :]
    out = np.empty_like(Q)
    out[:, perm] = Q
    return out.astype(np.int32)


def _upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (H symmetric positive definite after dampening)."""
    Hinv = np.linalg.inv(H)
    Hinv = (Hinv + Hinv.T) / 2
    return np.linalg.cholesky(Hinv).T


# ---- a layer's rows and columns ---------------------------------------------------------------------------------
def weight_rows(w: np.ndarray, axis: int) -> np.ndarray:
    """The weight as [output channels, columns]: Conv axis 0 (columns (cin, kh, kw)), a [K, M] matrix axis 1."""
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved = (shape[axis], *(d for i, d in enumerate(shape) if i != axis))
    return np.moveaxis(rows.reshape(moved), 0, axis)


def why_not(node: Node, w_shape: tuple[int, ...]) -> str | None:
    """Why GPTQ cannot build this layer's columns (it is then rounded to nearest), or None."""
    if node.op_type == "Conv":
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "Conv with auto_pad"
        if len(w_shape) > 4:
            return "a Conv of more than 2 spatial dimensions"
    return None


def layer_columns(node: Node, x: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
    """The layer's inputs as columns [G, K, P]: group g's output channels compute w_g @ X[g] at P positions."""
    if node.op_type == "Conv":
        return conv_columns(x, w_shape, node.attrs)
    k = w_shape[1] if node.op_type == "Gemm" and node.attrs.get("transB", 0) else w_shape[0]
    return x.reshape(-1, k).T[None]


def conv_columns(x: np.ndarray, w_shape: tuple[int, ...], attrs: dict) -> np.ndarray:
    """im2col of a 1-D or 2-D Conv's input x [N, C, (H,) W] -> [G, (C/G) * prod(kernel), N * positions]."""
    if x.ndim == 3:  # 1-D: a height of 1
        x = x[:, :, None, :]
        w_shape = (*w_shape[:2], 1, w_shape[2])
        attrs = {k: ([1, *v] if k in ("strides", "dilations") else [0, v[0], 0, v[1]] if k == "pads" else v)
                 for k, v in attrs.items()}
    cout, cin_g, kh, kw = w_shape
    g = int(attrs.get("group", 1))
    sh, sw = (list(attrs.get("strides", [1, 1])) + [1, 1])[:2]
    dh, dw = (list(attrs.get("dilations", [1, 1])) + [1, 1])[:2]
    pt, pl, pb, pr = list(attrs.get("pads", [0, 0, 0, 0]))
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, c, hp, wp = xp.shape
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((c, kh, kw, n, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            cols[:, i, j] = patch.transpose(1, 0, 2, 3)
    return cols.reshape(g, cin_g * kh * kw, n * ho * wo)


def add_gram(H: np.ndarray | None, X: np.ndarray, chunk: int = GRAM_CHUNK) -> np.ndarray:
    """H + X X^T per group (float64), X [G, K, P]; summed over `chunk` positions at a time, so that only a
    chunk is ever held in float64 (H is added to in place)."""
    G, K, P = X.shape
    H = np.zeros((G, K, K)) if H is None else H
    for s in range(0, P, chunk):
        part = X[:, :, s:s + chunk].astype(np.float64)
        H += np.matmul(part, np.swapaxes(part, 1, 2))
    return H


# ---- a session's layers -----------------------------------------------------------------------------------------
@dataclass
class GptqReport:
    layers: int = 0
    rounded_to_nearest: list[tuple[str, str]] = field(default_factory=list)  # (layer, why)
    changed: float = 0.0  # share of the weights whose integer differs from round-to-nearest's
    images: int = 0
    seconds_collect: float = 0.0
    seconds_round: float = 0.0
    mismatches: int = 0  # weights whose fold did not round back to GPTQ's integer (expected 0)

    def summary(self) -> str:
        nearest = f"; {len(self.rounded_to_nearest)} rounded to nearest" if self.rounded_to_nearest else ""
        return (f"GPTQ rounded the weights of {self.layers} layers on {self.images} inputs "
                f"({100 * self.changed:.1f}% of the integers differ from round-to-nearest{nearest}); "
                f"inputs {self.seconds_collect:.1f} s, rounding {self.seconds_round:.1f} s")

    def to_dict(self) -> dict:
        return {"layers": self.layers, "rounded_to_nearest": [list(t) for t in self.rounded_to_nearest],
                "changed": self.changed, "images": self.images, "seconds_collect": round(self.seconds_collect, 2),
                "seconds_round": round(self.seconds_round, 2), "mismatches": self.mismatches}


def stored_weight_scale(qat_graph: Graph, node_name: str) -> tuple[Node, str]:
    """The layer's WeightQuant node and the name of its stored scale input (prepare names it)."""
    name = weight_quant_name(node_name)
    wq = next(n for n in qat_graph.nodes if n.op_type == "WeightQuant" and n.name == name)
    return wq, wq.input(3)


def gptq_batch(data, indices: np.ndarray) -> int:
    """Inputs per forward pass of `collect_grams`: GPTQ_BATCH, or fewer so that a pass reads at most
    GPTQ_BATCH_ELEMENTS input elements (the layout detector's 800x608 pages: 1 a pass, where 8 held 2.4 GB of
    layer inputs)."""
    largest = max((int(np.prod(data.item_shape(int(i)))) for i in indices), default=1)
    return int(max(1, min(GPTQ_BATCH, GPTQ_BATCH_ELEMENTS // max(largest, 1))))


def collect_grams(float_graph: Graph, layers: list, data, indices: np.ndarray,
                  batch_size: int | None = None) -> dict[str, np.ndarray]:
    """{layer name: H [G, K, K]} from the float model's inputs to each layer (`layers`: the plan's, looked up
    by node name) on the inputs `indices` of `data`, in eval mode on qatool's engine, `batch_size` inputs a pass
    (default `gptq_batch`); only the part of the graph that computes those inputs runs."""
    from ..engine.model import Model
    from ..ir.graph import ValueInfo
    from .calibrate import _batches

    g = copy.deepcopy(float_graph)
    by_name = {n.name: n for n in g.nodes}
    nodes = [by_name[layer.node.name] for layer in layers]
    shapes = {n.name: tuple(g.initializers[n.input(1)].shape) for n in nodes}
    inputs = list(dict.fromkeys(n.input(0) for n in nodes))
    g.outputs = [ValueInfo(t) for t in inputs]
    g.cleanup()
    model = Model(g)
    grams: dict[str, np.ndarray | None] = {n.name: None for n in nodes}
    name = model.input_names[0]
    for x in _batches(data, indices, batch_size or gptq_batch(data, indices)):
        values = dict(zip(inputs, model.forward({name: x}, training=False, outputs=inputs)))
        for n in nodes:  # a Conv's im2col one input at a time: a batch's at 800x608 is gigabytes
            x_n = values[n.input(0)]
            for part in np.split(x_n, len(x_n)) if n.op_type == "Conv" else [x_n]:
                grams[n.name] = add_gram(grams[n.name], layer_columns(n, part, shapes[n.name]))
    return grams


def round_session(session, data, max_images: int | None = GPTQ_IMAGES, seed: int = 0, damp: float = DAMP,
                  act_order: bool = True, batch_size: int | None = None, sequential: bool = False,
                  progress=None) -> GptqReport:
    """GPTQ-round every quantized layer's weight of a session whose WeightQuants have stored scales: the
    session's weights become q s / k (q GPTQ's integers), its scales stay. H comes from the float model's inputs
    to each layer on a seeded subset of `data`: all at once, or (`sequential`) layer by layer in graph order from
    the float model whose earlier layers already hold their rounded weights (one pass per layer).
    `progress(line)`, if given, is told of each layer of a sequential run (they take a pass each)."""
    from .calibrate import calibration_indices

    report = GptqReport()
    todo, skipped = [], []
    float_nodes = {n.name: n for n in session.float_graph.nodes}  # the plan's nodes now read the WeightQuant
    for layer in session.plan.layers:
        node = float_nodes[layer.node.name]
        why = why_not(node, tuple(session.float_graph.initializers[node.input(1)].shape))
        (skipped.append((layer.node.name, why)) if why else todo.append(layer))
    indices = calibration_indices(len(data), max_images, seed)
    report.images = len(indices)
    changed = total = 0
    work = copy.deepcopy(session.float_graph) if sequential else session.float_graph
    grams = {}
    for i, layer in enumerate(todo):
        t0 = time.time()
        if sequential:
            grams = collect_grams(work, [layer], data, indices, batch_size)
        elif i == 0:
            grams = collect_grams(work, todo, data, indices, batch_size)
        t1 = time.time()
        new, q, nearest, mismatches = _round_layer(session, layer, grams.pop(layer.node.name), damp, act_order)
        if sequential:
            work.initializers[float_nodes[layer.node.name].input(1)] = new.copy()
        changed += int((q != nearest).sum())
        total += q.size
        report.mismatches += mismatches
        report.seconds_collect += t1 - t0
        report.seconds_round += time.time() - t1
        if sequential and progress is not None:
            progress(f"  {i + 1}/{len(todo)} {layer.node.name}: {time.time() - t0:.1f} s")
    report.layers = len(todo)
    report.rounded_to_nearest = skipped
    report.changed = changed / max(total, 1)
    return report


def _round_layer(session, layer, H: np.ndarray, damp: float, act_order: bool):
    """Round one layer's weight in place (the session's parameter becomes q s / k); returns (the new unfolded
    weight, GPTQ's q and round-to-nearest's integers as rows, weights whose fold does not round back to q)."""
    from .ops import bn_fold_factor, fold_weight, folded_step
    from .qparams import quantize, weight_grid

    params, state = session.model.params, session.model.state
    wq, scale_name = stored_weight_scale(session.model.graph, layer.node.name)
    axis, per = int(wq.attrs["axis"]), bool(wq.attrs.get("per_channel", 1))
    grid = weight_grid(int(wq.attrs["bits"]))
    w_arr = params[wq.input(0)]
    w = w_arr.astype(np.float32)
    k = None
    if wq.input(1):
        k = bn_fold_factor(_value(session, wq.input(1)), _value(session, wq.input(2)),
                           float(wq.attrs.get("epsilon", 1e-5))).astype(np.float32)
        w = fold_weight(w, k, axis)
    stored = params[scale_name] if scale_name in params else state[scale_name]
    s = folded_step(stored.astype(np.float32), k, per)  # what WeightQuant and the export use
    rows = weight_rows(w, axis)
    s_rows = np.broadcast_to(s.reshape(-1), (rows.shape[0],))
    G = H.shape[0]
    R = rows.shape[0] // G
    q = np.concatenate([gptq_round(rows[g * R:(g + 1) * R], H[g], s_rows[g * R:(g + 1) * R], grid, damp,
                                   act_order) for g in range(G)])
    nearest = np.clip(np.rint(rows / s_rows[:, None]), grid.qmin, grid.qmax)
    new = from_rows((q * s_rows[:, None]).astype(np.float32), w.shape, axis)
    refolded = new
    if k is not None:  # unfold; a channel with k = 0 holds zeros whatever its weight: it keeps it
        kk = k.reshape(channel_shape(w.ndim, axis))
        new = np.where(kk != 0, new / np.where(kk != 0, kk, 1), w_arr).astype(np.float32)
        refolded = new * kk
    back = weight_rows(quantize(refolded, s, 0, grid, axis if per else None), axis)
    w_arr[...] = new
    return new, q, nearest, int((back != q).sum())


def _value(session, name: str) -> np.ndarray:
    m = session.model
    return next(d[name] for d in (m.params, m.state, m.constants) if name in d).astype(np.float32)
