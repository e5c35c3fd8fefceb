"""Which initializers are trainable parameters, which are state (BN running statistics), which are constants.

`convert --for-training` records the roles in the model's metadata (keys below) so that later commands and
users can read them from the file; for a model without them the roles are inferred from how the initializers
are used.
"""

from __future__ import annotations

import json

import numpy as np

from .graph import Graph

TRAINABLE_KEY = "qatool.trainable"
STATE_KEY = "qatool.state"

# op_type -> input positions that are trainable parameters (weight, bias)
_PARAM_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "PRelu": (1,),
    "LSTM": (1, 2, 3, 7),  # W, R, B, P (peepholes)
    "GRU": (1, 2, 3),
    "RNN": (1, 2, 3),
}
_STATE_INPUTS = {"BatchNormalization": (3, 4)}


def infer_roles(graph: Graph) -> tuple[list[str], list[str]]:
    """(trainable, state) initializer names, from the ops that consume them, in graph order."""
    trainable: list[str] = []
    state: list[str] = []
    for node in graph.nodes:
        for table, out in ((_PARAM_INPUTS, trainable), (_STATE_INPUTS, state)):
            for i in table.get(node.op_type, ()):
                name = node.input(i)
                arr = graph.initializers.get(name)
                if arr is not None and np.issubdtype(arr.dtype, np.floating) and name not in out:
                    out.append(name)
    state_set = set(state)
    return [t for t in trainable if t not in state_set], state


def read_roles(graph: Graph) -> tuple[list[str], list[str]]:
    """Roles recorded in the metadata when present (and still valid), else inferred."""
    if TRAINABLE_KEY in graph.metadata and STATE_KEY in graph.metadata:
        trainable = [n for n in json.loads(graph.metadata[TRAINABLE_KEY]) if n in graph.initializers]
        state = [n for n in json.loads(graph.metadata[STATE_KEY]) if n in graph.initializers]
        return trainable, state
    return infer_roles(graph)


def write_roles(graph: Graph, trainable: list[str], state: list[str]) -> None:
    graph.metadata[TRAINABLE_KEY] = json.dumps(trainable)
    graph.metadata[STATE_KEY] = json.dumps(state)
