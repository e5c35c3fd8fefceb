"""Write the int8 model of a QAT session and verify it on onnxruntime (shared by export-int8 and train-quant)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import ModelError, QatoolError
from ..quant.config import cpu_lacks_vnni
from ..quant.prepare import DYNAMIC_KERNEL
from ..runtime.backends import engine_logits, ort_logits, ort_run, ort_run_all, ort_session
from ..ir.graph import to_onnx
from ..ir.io import save_proto
from .int8 import session_int8
from .latency import Latency
from .latency import measure as measure_latency
from .pack import pack_int4_weights
from .verify import Agreement, FusionReport, check_fusion, compare, output_scale


class FusionError(QatoolError):
    """Some nodes meant to be int8 did not become onnxruntime integer kernels."""


def export_notes(session) -> list[str]:
    """What the user should know about how onnxruntime runs this export."""
    notes = []
    eight_bit = [layer.node.name for layer in session.plan.layers] + [n.name for n in session.plan.dynamic_recurrent]
    if any(session.config.weight_bits_of(name) == 8 for name in eight_bit) and cpu_lacks_vnni():
        notes.append("this x86 CPU has no VNNI: onnxruntime's u8 x s8 kernels can saturate with 8-bit weights, so "
                     "here the int8 model may not compute what was simulated; --reduce-range (7-bit weights, the "
                     "default on such a CPU) avoids it")
    if session.plan.dynamic_recurrent:
        notes.append(f"{DYNAMIC_KERNEL} quantizes its input and hidden state over the whole batch it is given: the "
                     "int8 model computes what qatool trained and checked when it runs one input at a time (at a "
                     "batch of N, and with several threads, its results move by about a quantization step)")
    bits = session.config.activation_bits
    if bits < 8 and session.quant:
        notes.append(f"onnxruntime has no kernels for activations below 8 bits: these {bits}-bit activations are "
                     f"stored in 8 bits and held on their grid by integer Clips, so they save no time over 8-bit "
                     f"activations (the grid is for a target that computes in {bits} bits)")
    return notes


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    fusion: FusionReport | None = None
    agreement: Agreement | None = None
    data_source: str = ""
    notes: list[str] = field(default_factory=list)
    simulated: np.ndarray | None = field(default=None, repr=False)
    deployed: np.ndarray | None = field(default=None, repr=False)
    latency: Latency | None = None
    # with a judge (any model): {"int8": ..., "simulation": ..., "int8_vs_simulation": ...} (qatool.tasks.judge)
    measures: dict | None = None
    # the int8 model with a free batch, when the file declares the float model's fixed batch of 1 (for timing)
    runnable: onnx.ModelProto | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes,
                "fusion": self.fusion.to_dict() if self.fusion else None,
                "agreement": self.agreement.to_dict() if self.agreement else None,
                "measures": self.measures,
                "latency": self.latency.to_dict() if self.latency else None,
                "verified_on": self.data_source, "notes": self.notes}


def meant_int8(session) -> list[tuple[str, str]]:
    """The nodes that should run as integer kernels: a Conv with a float output (the output tail) has none in
    onnxruntime (QLinearConv writes integers), it runs in float on its dequantized input and weights."""
    return [(layer.node.name, layer.node.op_type) for layer in session.plan.layers
            if not (layer.float_output and layer.node.op_type == "Conv")] + \
        [(n.name, n.op_type) for n in session.plan.activation_ops] + \
        [(n.name, "LSTM") for n in session.plan.dynamic_recurrent]


def export_session(session, out_path: str | os.PathLike, data=None, verify: bool = True,
                   strict: bool = True, data_source: str = "", int4: bool = True, judge=None) -> ExportResult:
    """Export, then (if `verify`) check fusion and simulation-vs-onnxruntime agreement on `data` (random inputs
    when None). With `strict`, unfused nodes raise FusionError and nothing is written. With `int4`, weights of
    4 bits or fewer are stored two to a byte (`pack.pack_int4_weights`: opset 21). `time_export` then times it
    against the float model. With a `judge` (qatool.tasks.judge: any model), every output of the int8 model and
    of the simulation is measured against the float model on the judge's data, and the int8 model against the
    simulation (`ExportResult.measures`), instead of the first output's top-1 agreement."""
    out = Path(out_path)
    runnable = to_onnx(session_int8(session))
    if int4:
        runnable = pack_int4_weights(runnable)
    try:
        onnx.checker.check_model(runnable)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"internal: the int8 model fails onnx.checker: {str(e).splitlines()[0]}") from e
    model = declared_form(runnable, session.float_graph)
    if not verify:
        save_proto(model, out)
        return ExportResult(out, out.stat().st_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        save_proto(model, tmp)
        fusion = check_fusion(tmp, meant_int8(session), {n: why for n, _, why in session.plan.float_nodes})
        if strict and fusion.unfused:
            lines = "; ".join(f"{n} ({t}): {why}" for n, t, why in fusion.unfused)
            raise FusionError(f"{len(fusion.unfused)} of {fusion.expected} nodes meant to be int8 did not fuse "
                              f"into integer kernels: {lines} (use --no-verify to write the model anyway)")
        sess = ort_session(runnable)
        free = runnable if model is not runnable else None
        if judge is not None:
            measures = judged(session, sess, judge)
            os.replace(tmp, out)
            return ExportResult(out, out.stat().st_size, fusion, None, data_source, export_notes(session),
                                measures=measures, runnable=free)
        if data is None:
            simulated, deployed, data_source = _random_run(session, sess)
        else:
            simulated = engine_logits(session.model, data)  # the graph output: what onnxruntime returns
            deployed = ort_logits(sess, data, what="the int8 model")
        agreement = compare(simulated, deployed, output_scale(model))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return ExportResult(out, out.stat().st_size, fusion, agreement, data_source, export_notes(session), simulated,
                        deployed, runnable=free)


def declared_form(model: onnx.ModelProto, float_graph) -> onnx.ModelProto:
    """`model` with the input/output shapes the float model's file declared, when convert freed its fixed batch
    of 1 (`convert.BATCH_KEY`): the user's pipeline calls the int8 model exactly as it called the float one.
    Otherwise `model` itself."""
    import json

    from ..convert import BATCH_KEY
    from ..ir.batch import restore_declared_shapes

    declared = float_graph.metadata.get(BATCH_KEY)
    if not declared:
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    restore_declared_shapes(fixed, json.loads(declared))
    return fixed


def judged(session, sess, judge) -> dict:
    """The int8 model (onnxruntime) and the simulation (engine, eval mode) measured against the float model, and
    the int8 model against the simulation: one pass over the judge's data."""
    names = [o.name for o in sess.get_outputs()]
    model = session.model

    def int8(x):
        return dict(zip(names, ort_run_all(sess, x, "the int8 model")))

    def simulation(x):
        return dict(zip(model.output_names, model.forward({session.input_name: x}, training=False)))

    m = judge.measure_pairs({"int8": int8, "simulation": simulation},
                            [("int8", "float"), ("simulation", "float"), ("int8", "simulation")])
    return {"int8": m[("int8", "float")], "simulation": m[("simulation", "float")],
            "int8_vs_simulation": m[("int8", "simulation")]}


def time_export(session, result: ExportResult, input_shape: list[int] | None = None) -> ExportResult:
    """Time the written int8 model against the session's float model (`latency.measure`) on inputs of
    `input_shape` (default: the model's, its free dims from the preprocessing); in place."""
    int8 = result.runnable if result.runnable is not None else result.path
    result.latency = measure_latency(_float_model(session), int8, input_shape or _input_shape(session),
                                     fixed_batch=session.model.fixed_batch is not None)
    return result


def _float_model(session) -> onnx.ModelProto:
    """The float model a user would deploy instead: the session's float graph for inference (BN folded)."""
    from ..convert import normalize

    return to_onnx(normalize(session.float_graph, for_training=False).graph)


def _input_shape(session) -> list[int]:
    """The model's image input (N, C, H, W), its dynamic dims taken from the preprocessing it carries."""
    from ..errors import QatoolError
    from ..data.preprocess import resolve_preprocess

    shape = list(session.model.graph.inputs[0].shape or [])
    if len(shape) == 4 and not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        try:
            pre = resolve_preprocess(session.float_graph)
            shape[1:] = [pre.channels, *pre.size]
        except QatoolError:
            pass
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def _random_run(session, sess) -> tuple[np.ndarray, np.ndarray, str]:
    shape = _input_shape(session)
    shape[0] = 16
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    simulated = session.model.forward({session.input_name: x})[0]
    deployed = ort_run(sess, x, "the int8 model")
    return simulated, deployed, "random inputs: no data given"
