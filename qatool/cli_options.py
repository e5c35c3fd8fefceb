"""Options shared by several commands (kept apart from cli.py so command modules can import them)."""

from __future__ import annotations

import click

DATA_HELP = ("Images with labels: a folder with one sub-folder per class, or a list file of 'relative/path label' "
             "lines. Without labels (the float model is the reference): any other folder of images, flat or "
             "nested, or a folder of .npy input tensors ([C,H,W] or [1,C,H,W], already preprocessed).")


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected HxW (e.g. 224x224), got {value!r}", param_hint="--size") from None
    if h < 1 or w < 1:
        raise click.BadParameter(f"sizes must be positive, got {value!r}", param_hint="--size")
    return h, w


def _parse_floats(value: str | None, flag: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected 1 or 3 numbers, got {value!r}", param_hint=flag) from None
    if len(vals) not in (1, 3):
        raise click.BadParameter(f"expected 1 or 3 numbers, got {value!r}", param_hint=flag)
    return vals


def preprocessing_options(f):
    """--size/--color/--mean/--std/--resize/--pad-value, shared by every command that reads images."""
    for opt in reversed([
        click.option("--size", help="Input size HxW (default: the model's metadata, else its input shape)."),
        click.option("--color", type=click.Choice(["gray", "rgb", "bgr"]), help="Colour of the input tensor."),
        click.option("--mean", help="Mean(s) subtracted after scaling pixels to [0, 1]: one value or three."),
        click.option("--std", help="Standard deviation(s) divided by: one value or three."),
        click.option("--resize", type=click.Choice(["stretch", "pad", "letterbox"]),
                     help="stretch (default): resize to HxW; pad: fill the height, keep the aspect ratio, pad on the "
                          "right (PaddleOCR's recogniser); letterbox: keep the aspect ratio, centre, pad around "
                          "(YOLO)."),
        click.option("--pad-value", type=float,
                     help="What padded pixels hold, in the normalised space (default 0: PaddleOCR's; YOLO's grey "
                          "is 0.447 with mean 0, std 1)."),
    ]):
        f = opt(f)
    return f


def preprocess_overrides(size, color, mean, std, resize=None, pad_value=None) -> dict:
    return {"size": _parse_size(size), "color": color, "mean": _parse_floats(mean, "--mean"),
            "std": _parse_floats(std, "--std"), "resize": resize, "pad_value": pad_value}


BITS = click.IntRange(2, 8)


def quantization_options(f):
    """--bits/--weight-bits/--activation-bits/--per-tensor/--symmetric-activations/--exclude/--reduce-range/
    --quantize-tail/--recurrent."""
    for opt in reversed([
        click.option("--bits", type=BITS, help="Bits of weights and activations (2..8; default 8)."),
        click.option("--weight-bits", type=BITS, help="Bits of the weights (overrides --bits)."),
        click.option("--activation-bits", type=BITS, help="Bits of the activations (overrides --bits)."),
        click.option("--per-tensor", is_flag=True, default=None,
                     help="One weight scale per tensor instead of per channel."),
        click.option("--symmetric-activations", is_flag=True, default=None,
                     help="Signed activations with zero point 0 instead of asymmetric unsigned."),
        click.option("--exclude", multiple=True, help="Node name or op type to keep in float (repeatable)."),
        click.option("--reduce-range/--no-reduce-range", default=None,
                     help="7-bit weights. Default: on where this x86 CPU has no VNNI (onnxruntime's u8 x s8 kernels "
                          "there add products in saturating 16-bit pairs, which 8-bit weights overflow), else off."),
        click.option("--quantize-tail", is_flag=True, default=None,
                     help="Also quantize the output tail: the outputs of the last weighted layers (logits, head maps) "
                          "and what follows them (softmax, decoding). By default they stay float: one 8-bit scale "
                          "over a whole output rounds class logits to the step of their joint range."),
        click.option("--recurrent", type=click.Choice(["float", "dynamic"]),
                     help="How an LSTM runs in the int8 model. float (default): in float, between DequantizeLinear "
                          "and QuantizeLinear. dynamic: as onnxruntime's DynamicQuantizeLSTM, int8 weights per "
                          "direction and gate row, its input and hidden state quantized to uint8 inside the kernel "
                          "(simulated bit for bit, one input at a time). GRU and RNN have no such kernel. On ddddocr's "
                          "CNN+LSTM recogniser: 0.33x float latency against 0.49x, accuracy not told apart."),
    ]):
        f = opt(f)
    return f


def weight_rounding_option(f):
    """--weight-rounding (calibrate and train-quant's calibrated start)."""
    return click.option(
        "--weight-rounding", type=click.Choice(["nearest", "gptq", "gptq-sequential"]),
        help="How the start's weights are rounded. Default: gptq for a model or data without labels at 4-bit "
             "weights and below, else nearest. gptq: column by column so that each layer's "
             "output on calibration inputs changes least (GPTQ, Frantar et al. 2022), on per-channel scales that "
             "are then kept fixed (not recomputed from the weights); worth it at 4 bits and below. gptq-sequential: "
             "each layer's inputs from the float model whose earlier layers are already rounded (one pass over "
             "the inputs per layer).")(f)


def equalize_option(f):
    """--equalize/--no-equalize (calibrate and train-quant's calibrated start)."""
    return click.option(
        "--equalize/--no-equalize", default=None,
        help="Before calibrating, even out the input channels of each layer at 4-bit weights and below: a channel "
             "whose weights are far larger than the rest is divided down and the layer, BatchNorm or constant "
             "upstream multiplies it back (cross-layer equalisation; the float model computes the same). Default: "
             "on without labels, off for a classifier with labels.")(f)


def training_options(f):
    """The optimiser, schedule and length of a training run (train-quant and finetune)."""
    for opt in reversed([
        click.option("--optimizer", type=click.Choice(["sgd", "adam"]),
                     help="Default: sgd (momentum 0.9) for a classifier with labels; adam without labels."),
        click.option("--lr", type=click.FloatRange(0, min_open=True),
                     help="Learning rate (default: 1e-3 for a classifier with labels; 1e-4 without labels, with "
                          "adam)."),
        click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), help="SGD momentum (default 0.9)."),
        click.option("--weight-decay", type=click.FloatRange(0), help="L2 weight decay (default 0)."),
        click.option("--schedule", type=click.Choice(["constant", "cosine", "step"]),
                     help="LR schedule (default cosine: lr falls to 0 by the last step, so the final weights settle; "
                          "with constant, low-bit accuracy can swing by points from one step to the next)."),
        click.option("--warmup-steps", type=click.IntRange(0), help="Linear LR warm-up steps (default 0)."),
        click.option("--steps", type=click.IntRange(0),
                     help="Training steps (default 200 for a classifier with labels; without labels 800, or as many "
                          "as take ~40 min at the step time the probe steps measure, at least 200)."),
        click.option("--epochs", type=click.FloatRange(0, min_open=True),
                     help="Training length in epochs instead of steps."),
        click.option("--batch-size", type=click.IntRange(1),
                     help="Default: the largest batch whose training step fits 6 GB, at most 64 (measured on two "
                          "probe steps)."),
        click.option("--seed", type=click.IntRange(0), help="Seed of every random choice (default 0)."),
    ]):
        f = opt(f)
    return f


def placement_lines(dynamic: list[dict], float_nodes: list[dict]) -> list[str]:
    """One line per node the placement runs as a dynamically quantized kernel or leaves float, and why."""
    return [f"int8: {n['node']} ({n['op_type']}): {n['reason']}" for n in dynamic] + \
        [f"float: {n['node']} ({n['op_type']}): {n['reason']}" for n in float_nodes]


def export_summary(export: dict) -> list[str]:
    """The lines that describe a verified int8 export (fusion on onnxruntime, simulation vs onnxruntime)."""
    lines = []
    if export.get("fusion"):
        from .export.verify import fusion_lines

        lines += fusion_lines(export["fusion"])
    if export.get("latency"):
        from .export.latency import latency_lines

        lines += latency_lines(export["latency"])
    if export.get("agreement"):
        a = export["agreement"]
        steps = f"{a['max_diff_steps']:.1f}" if a["max_diff_steps"] is not None else "n/a"
        source = f" ({export['verified_on']})" if export.get("verified_on") else ""
        lines.append(f"simulation vs onnxruntime on {a['images']} inputs{source}: top-1 agreement "
                     f"{a['agreement_top1']:.4f}, largest difference {steps} quantization steps")
    if export.get("measures"):
        from .tasks.judge import describe

        m = export["measures"]
        source = f" on {export['verified_on']}" if export.get("verified_on") else ""
        lines.append(f"int8 (onnxruntime) against float{source}: {describe(m['int8'])}")
        lines.append(f"simulation against float: {describe(m['simulation'])}; int8 against the simulation: "
                     f"{describe(m['int8_vs_simulation'])}")
    return lines + [f"note: {note}" for note in export.get("notes", [])]
