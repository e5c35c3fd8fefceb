"""Transfer learning: a new classifier for the user's classes on a pretrained model, and float training in the
same loop as QAT (MNN's Finetune demo: cut at the last pooling output, append a fresh Linear, train it alone).

The cut point (`find_features`)
    The input of the final classifier: walk back from the logits (`heads.logits_tensor`, through a Softmax)
    through Flatten/Reshape/Squeeze/Identity/Dropout to the Gemm or MatMul that makes them, or to a 1x1 Conv
    whose input comes from a global pooling; the classifier's input is the features. `--features TENSOR` names
    it instead; it must be 2-D (N, C) or 4-D (N, C, 1, 1)-like (a 4-D tensor is flattened).

The new head (`replace_head`)
    Everything after the features is dropped, a Flatten is added for a 4-D tensor, then a Gemm
    (transB = 1, as PyTorch exports nn.Linear) with one output per class, initialised as PyTorch's nn.Linear:
    weight and bias uniform in +-1/sqrt(C). A Softmax follows when the original model ended in one. The graph
    output keeps its name; the class names go into the metadata (`qatool.classes`), and other class-name keys
    (which named the old classes) are removed.

A frozen backbone (`FloatSession.frozen`)
    Only the chosen parameters train; every other initializer becomes a constant of the training graph, so the
    engine runs no backward through the backbone (a step is a forward and the head's backward). The backbone
    runs in eval mode: the training copy is the inference form of the graph (BN folded, Dropout removed), and
    the trained parameters are written back into the for-training graph afterwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..engine.model import Model
from ..errors import UsageError
from ..ir.graph import Graph, Node
from ..ir.roles import read_roles, write_roles
from ..tasks.base import LOSS_HEADS
from ..tasks.heads import CLASS_NAME_KEYS, LOGITS_KEY, logits_tensor, store_class_names

PASS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")
POOLS = ("GlobalAveragePool", "GlobalMaxPool", "AveragePool", "ReduceMean")
HEAD = "new_head"


def find_features(graph: Graph) -> str:
    """The classifier's input tensor (see the module notes); UsageError naming the candidates if there is none."""
    producers = graph.producers()
    t = logits_tensor(graph)
    seen = []
    while (node := producers.get(t)) is not None:
        seen.append(f"{t} ({node.op_type})")
        if node.op_type in ("Gemm", "MatMul") and node.input(1) in graph.initializers:
            return node.input(0)
        if node.op_type == "Conv" and node.input(1) in graph.initializers \
                and graph.initializers[node.input(1)].shape[2:] in ((1, 1), (1,)):
            src = producers.get(node.input(0))
            if src is not None and src.op_type in POOLS:
                return node.input(0)
        if node.op_type not in PASS:
            break
        t = node.input(0)
    raise UsageError("no classifier found (a Gemm/MatMul, or a 1x1 Conv after global pooling, making the logits); "
                     f"the tensors before the output: {', '.join(seen) or 'none'}; name the features with "
                     "--features TENSOR")


def feature_shape(graph: Graph, features: str, sample: np.ndarray) -> tuple[int, ...]:
    """The shape of `features` on one sample batch, checked to be (N, C) or (N, C, 1...)."""
    values = set(graph.input_names) | {o for n in graph.nodes for o in n.outputs if o}
    if features not in values:
        raise UsageError(f"--features {features}: the model has no tensor of that name")
    shape = Model(copy.deepcopy(graph)).forward({graph.input_names[0]: sample}, outputs=[features])[0].shape
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
        return shape
    raise UsageError(f"--features {features} has shape {shape}: it must be (N, C) or (N, C, 1, 1) (a pooled "
                     "feature vector)")


def replace_head(graph: Graph, features: str, channels: int, classes: list[str], seed: int = 0) -> list[str]:
    """Cut after `features`, append the new head; returns the new parameters' names. In place."""
    out = graph.output_names[0]
    final = _final_softmax(graph)
    n = len(classes)
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(channels)
    w, b = graph.unique_name(f"{HEAD}.weight"), graph.unique_name(f"{HEAD}.bias")
    graph.initializers[w] = rng.uniform(-bound, bound, (n, channels)).astype(np.float32)
    graph.initializers[b] = rng.uniform(-bound, bound, n).astype(np.float32)
    for node in graph.nodes:  # the old head no longer writes the output (cleanup drops it)
        node.outputs = [graph.unique_name(f"{o}_old") if o == out else o for o in node.outputs]
    flat = graph.unique_name(f"{features}_flat")  # (N, C, 1, 1) -> (N, C); a no-op on (N, C)
    logits = graph.unique_name(f"{HEAD}_logits") if final else out
    graph.nodes += [Node("Flatten", [features], [flat], graph.unique_name(f"{HEAD}_Flatten"), {"axis": 1}),
                    Node("Gemm", [flat, w, b], [logits], graph.unique_name(HEAD), {"transB": 1})]
    if final:
        graph.nodes.append(Node(final.op_type, [logits], [out], graph.unique_name(f"{HEAD}_{final.op_type}"),
                                {"axis": 1}))
    graph.outputs[0].shape = [graph.outputs[0].shape[0] if graph.outputs[0].shape else "N", n]
    graph.value_info.pop(out, None)
    graph.cleanup()
    graph.toposort()
    for key in (*CLASS_NAME_KEYS, LOGITS_KEY):  # they named the old head's classes and tensors
        graph.metadata.pop(key, None)
    store_class_names(graph, classes)
    trainable, state = read_roles(graph)
    write_roles(graph, [t for t in trainable if t in graph.initializers] + [w, b], state)
    return [w, b]


def _final_softmax(graph: Graph) -> Node | None:
    """The Softmax/LogSoftmax the output is made by (through shape-only ops), if any."""
    producers = graph.producers()
    t = graph.output_names[0]
    while (node := producers.get(t)) is not None:
        if node.op_type in LOSS_HEADS:
            return node
        if node.op_type not in PASS:
            return None
        t = node.input(0)
    return None


def trainable_names(graph: Graph, names: list[str]) -> list[str]:
    """--trainable NAME...: initializer names, or node-name prefixes whose nodes' parameters train."""
    trainable, _ = read_roles(graph)
    chosen: list[str] = []
    for name in names:
        if name in graph.initializers:
            hits = [name]
        else:
            hits = [i for n in graph.nodes if n.name.startswith(name) for i in n.inputs if i in trainable]
        if not hits:
            raise UsageError(f"--trainable {name}: no initializer of that name and no node whose name starts with it")
        chosen += [h for h in hits if h not in chosen]
    return chosen


@dataclass
class FloatSession:
    """What the training loop needs (`loop.train`), for float training: the model, its logits, no quantizers."""

    model: Model
    logits: str
    float_graph: Graph

    @classmethod
    def full(cls, graph: Graph, seed: int = 0) -> FloatSession:
        g = copy.deepcopy(graph)
        return cls(Model(g, seed=seed), logits_tensor(g), graph)

    @classmethod
    def frozen(cls, graph: Graph, trainable: list[str], seed: int = 0) -> FloatSession:
        """Only `trainable` trains; the rest runs in eval mode (the inference form: BN folded, no Dropout)."""
        from ..convert import normalize

        infer = normalize(graph, for_training=False).graph
        missing = [t for t in trainable if t not in infer.initializers]
        if missing:
            raise UsageError(f"cannot train {missing[0]!r} with a frozen backbone: it is folded away in the "
                             "inference form (a BatchNormalization parameter); train it with the whole model")
        write_roles(infer, list(trainable), [])
        return cls(Model(infer, seed=seed), logits_tensor(infer), graph)

    @property
    def input_name(self) -> str:
        return self.model.input_names[0]

    learned_scales: tuple = ()

    def nonpositive_scale(self):
        return None

    def set_phase(self, step: int, freeze_bn_after: int, freeze_observers_after: int) -> None:
        self.model.ctx.bn_frozen = step >= freeze_bn_after

    def trained_graph(self) -> Graph:
        """The for-training graph with the trained parameters (and, training the whole model, BN statistics)."""
        g = copy.deepcopy(self.float_graph)
        for k, v in {**self.model.params, **self.model.state}.items():
            if k in g.initializers:
                g.initializers[k] = v.copy()
        return g
