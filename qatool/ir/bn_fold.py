"""Fold BatchNormalization (running statistics) into the Conv / ConvTranspose / Gemm that feeds it.

Maths, per output channel c, with s_c = gamma_c / sqrt(var_c + eps):

    BN(conv(x, W) + b) = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
                       = conv(x, W * s) + (b - mean) * s + beta

so W'[c] = W[c] * s_c along the weight's output-channel axis and b' = (b - mean) * s + beta. For Gemm,
y = alpha * A @ B + beta_g * C, the output axis of B is 1 (0 when transB=1) and C' = (beta_g * C - mean) * s + beta
with beta_g reset to 1.

Each fold is pattern (`match`) / check (`why_not`, returns the reason or None) / rewrite (`rewrite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph, Node

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class BnMatch:
    producer: Node
    bn: Node


def match(graph: Graph, bn: Node, producers: dict[str, Node]) -> BnMatch | None:
    """A BatchNormalization whose input comes from a Conv / ConvTranspose / Gemm."""
    if bn.op_type != "BatchNormalization":
        return None
    prod = producers.get(bn.input(0))
    if prod is None or prod.op_type not in FOLDABLE:
        return None
    return BnMatch(prod, bn)


def why_not(graph: Graph, m: BnMatch, consumers: dict[str, list[Node]]) -> str | None:
    """Why this BN cannot be folded, or None when it can."""
    bn, prod = m.bn, m.producer
    if len(consumers.get(prod.outputs[0], [])) != 1 or prod.outputs[0] in graph.output_names:
        return "the producer's output has other consumers"
    if len([o for o in bn.outputs if o]) > 1:
        return "the BN node returns its training statistics"
    if not all(bn.input(i) in graph.initializers for i in range(1, 5)):
        return "BN parameters are not constant initializers"
    if bn.attrs.get("spatial", 1) != 1:
        return "BN with spatial=0 normalises per activation"
    if bn.attrs.get("training_mode", 0):
        return "BN is in training mode"
    if prod.input(1) not in graph.initializers:
        return f"the {prod.op_type} weight is not a constant initializer"
    if prod.input(2) and prod.input(2) not in graph.initializers:
        return f"the {prod.op_type} bias is not a constant initializer"
    if prod.op_type == "ConvTranspose" and prod.attrs.get("group", 1) != 1:
        return "grouped ConvTranspose"
    if prod.op_type == "Gemm":
        n_out = _gemm_out_features(graph, prod)
        c = graph.initializers.get(prod.input(2)) if prod.input(2) else None
        if c is not None and c.size not in (1, n_out):
            return "the Gemm bias is not per output feature"
    return None


def _gemm_out_features(graph: Graph, gemm: Node) -> int:
    w = graph.initializers[gemm.input(1)]
    return w.shape[0] if gemm.attrs.get("transB", 0) else w.shape[1]


def fold_factors(graph: Graph, bn: Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(y) = y * s + t per channel."""
    gamma, beta, mean, var = (graph.initializers[bn.input(i)].astype(np.float64) for i in range(1, 5))
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def rewrite(graph: Graph, m: BnMatch) -> None:
    """Scale the producer's weight, write its new bias, and let the producer write the BN's output."""
    prod, bn = m.producer, m.bn
    s, t = fold_factors(graph, bn)
    w = graph.initializers[prod.input(1)].astype(np.float64)
    if prod.op_type == "Conv":
        axis = 0
    elif prod.op_type == "ConvTranspose":
        axis = 1
    else:
        axis = 0 if prod.attrs.get("transB", 0) else 1
    shape = [1] * w.ndim
    shape[axis] = -1
    dtype = graph.initializers[prod.input(1)].dtype
    new_w = (w * s.reshape(shape)).astype(dtype)
    if prod.input(2):
        b = graph.initializers[prod.input(2)].astype(np.float64)
        if prod.op_type == "Gemm":
            b = np.broadcast_to(b * float(prod.attrs.get("beta", 1.0)), s.shape)
            prod.attrs["beta"] = 1.0
        new_b = (b * s + t).astype(dtype)
    else:
        new_b = t.astype(dtype)
        if prod.op_type == "Gemm":
            prod.attrs["beta"] = 1.0
    w_name = graph.unique_name(f"{prod.name or prod.outputs[0]}_W_bnfolded")
    graph.initializers[w_name] = new_w
    b_name = graph.unique_name(f"{prod.name or prod.outputs[0]}_B_bnfolded")
    graph.initializers[b_name] = new_b
    inputs = list(prod.inputs) + [""] * (3 - len(prod.inputs))
    inputs[1], inputs[2] = w_name, b_name
    prod.inputs = inputs
    prod.outputs = [bn.outputs[0]]
    graph.nodes.remove(bn)


def fold_all(graph: Graph) -> tuple[list[str], list[tuple[str, str]]]:
    """Fold every foldable BN; returns (folded BN names, [(BN name, reason it stayed)])."""
    folded: list[str] = []
    kept: list[tuple[str, str]] = []
    for bn in [n for n in graph.nodes if n.op_type == "BatchNormalization"]:
        producers, consumers = graph.producers(), graph.consumers()
        m = match(graph, bn, producers)
        if m is None:
            kept.append((bn.name, "its input is not produced by a Conv, ConvTranspose or Gemm"))
            continue
        reason = why_not(graph, m, consumers)
        if reason:
            kept.append((bn.name, reason))
            continue
        rewrite(graph, m)
        folded.append(bn.name)
    graph.cleanup()
    return folded, kept
