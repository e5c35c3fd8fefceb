"""A QAT session: the float training graph, its quantized twin on the engine (qatool.quant.quantized), and the
quantizer state.

Made from a float training graph and a QuantConfig (`QatSession.create`) or from a checkpoint
(`QatSession.from_checkpoint`); saved as a checkpoint (`save`); its int8 model is
`qatool.export.int8.session_int8(session)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph
from ..quant.config import QuantConfig
from ..quant.qparams import activation_grid
from ..quant.quantized import QuantizedModel
from ..tasks.heads import logits_tensor
from .checkpoint import Checkpoint, save_checkpoint


@dataclass
class QatSession(QuantizedModel):
    logits: str  # the tensor the loss is taken on (qatool.tasks.heads.logits_tensor of the QAT graph)

    @classmethod
    def create(cls, float_graph: Graph, config: QuantConfig, seed: int = 0) -> QatSession:
        q = QuantizedModel.create(float_graph, config, seed)
        return cls(q.float_graph, q.config, q.model, q.plan, q.quant, logits_tensor(q.model.graph))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, seed: int = 0) -> QatSession:
        session = cls.create(ckpt.float_graph, ckpt.quant, seed)
        inits = session.model.graph.initializers
        for t, q in session.quant.items():
            span = ckpt.arrays.get(f"span/{t}")
            if t in ckpt.activation_qparams:
                scale, zero = ckpt.activation_qparams[t]
                inits[q.scale][...] = scale
                inits[q.zero_point][...] = zero
                if span is None:  # no state file: the range that this scale and zero point represent
                    grid = activation_grid(ckpt.quant.activation_bits, ckpt.quant.symmetric_activations)
                    span = np.array([(grid.qmin - zero) * scale, (grid.qmax - zero) * scale], np.float32)
            if span is not None:
                inits[q.span][...] = span
        for key, value in ckpt.arrays.items():  # arrays of the QAT graph only (LSQ's and GPTQ's step sizes)
            if key.startswith("param/") and key[6:] in session.model.params:
                session.model.params[key[6:]][...] = value
            elif key.startswith("weight_scale/") and key[13:] in session.model.state:
                session.model.state[key[13:]][...] = value
        return session

    @property
    def input_name(self) -> str:
        return self.model.input_names[0]

    @property
    def learned_scales(self) -> list[str]:
        """The LSQ step sizes (weight and activation scales trained by gradient): the trained parameters of the
        QAT graph that the float model does not have. Empty without scale_learning lsq."""
        return [k for k in self.model.params if k not in self.float_graph.initializers]

    @property
    def fixed_weight_scales(self) -> list[str]:
        """The stored weight step sizes that are not trained (GPTQ rounding without LSQ): state to checkpoint."""
        return [n.input(3) for n in self.model.graph.nodes
                if n.op_type == "WeightQuant" and n.input(3) and n.input(3) in self.model.state]

    def weight_steps(self) -> dict[str, float]:
        """{weight parameter: the median over its channels of its quantization step} as the weight's quantizer
        computes it from the parameter now (qatool.quant.qparams.weight_scales at the layer's bits; BatchNorm
        scales a channel's weights and its step alike, so the raw parameter's step is the folded one's divided
        by the same factor)."""
        from ..quant.ops import WeightQuant, weight_axis
        from ..quant.qparams import weight_grid, weight_scales

        steps = {}
        for n in self.model.graph.nodes:
            w = self.model.params.get(n.input(0)) if n.op_type == "WeightQuant" else None
            if w is None:
                continue
            attrs = {**WeightQuant.attrs, **n.attrs}
            axis = weight_axis(attrs["axis"]) if attrs["per_channel"] else None
            steps[n.input(0)] = float(np.median(weight_scales(w, axis, weight_grid(int(attrs["bits"])))))
        return steps

    def nonpositive_scale(self) -> tuple[str, float] | None:
        """The first learned step size that an update pushed to zero or below, with its smallest value: the
        quantizer is then meaningless (the simulation would floor it to MIN_SCALE and output zeros)."""
        for k in self.learned_scales:
            low = float(self.model.params[k].min())
            if not low > 0:
                return k, low
        return None

    def set_phase(self, step: int, freeze_bn_after: int, freeze_observers_after: int) -> None:
        self.model.ctx.bn_frozen = step >= freeze_bn_after
        self.model.ctx.observers_frozen = step >= freeze_observers_after

    def save(self, path: str | os.PathLike, train: dict, step: int, arrays: dict[str, np.ndarray],
             info: dict | None = None) -> None:
        own = {f"param/{k}": self.model.params[k] for k in self.learned_scales}
        own.update({f"weight_scale/{k}": self.model.state[k] for k in self.fixed_weight_scales})
        save_checkpoint(path, self.float_graph, self.model.to_graph(), self.quant, self.config, train, step,
                        {**arrays, **own}, info)
