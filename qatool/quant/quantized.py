"""A float graph's quantized twin on the engine: `prepare` applied to a copy, and the engine Model that runs it.

This is all that post-training measurements need (calibrated ranges written in with `calibrate.apply_ranges`,
the per-layer sensitivity); `qatool.train.session.QatSession` extends it with what training adds (its logits,
checkpoints, learned step sizes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..engine.model import Model
from ..errors import ModelError
from ..ir.graph import Graph
from .config import QuantConfig
from .prepare import Plan, QuantTensor, prepare


@dataclass
class QuantizedModel:
    float_graph: Graph
    config: QuantConfig
    model: Model
    plan: Plan
    quant: dict[str, QuantTensor]

    @classmethod
    def create(cls, float_graph: Graph, config: QuantConfig, seed: int = 0) -> QuantizedModel:
        """The quantized twin of `float_graph` (left unchanged); ModelError when no layer can be quantized."""
        qat = copy.deepcopy(float_graph)
        plan, quant = prepare(qat, config)
        model = Model(qat, seed=seed)  # first: names any op the engine cannot run
        if not plan.layers:
            raise ModelError("no Conv, Gemm or MatMul of the model can be quantized "
                             "(check --exclude, and that weights are initializers)")
        return cls(float_graph, config, model, plan, quant)
