"""The `qatool calibrate` and `qatool sensitivity` commands (registered on the main group with
`cli.add_command(calibrate_command)` / `cli.add_command(sensitivity_command)`)."""

from __future__ import annotations

import click

from .cli_options import (BITS, DATA_HELP, export_summary, placement_lines, preprocess_overrides,
                          equalize_option, preprocessing_options, quantization_options, weight_rounding_option)
from .quant.calibrate import DEFAULT_BINS, DEFAULT_IMAGES, DEFAULT_PERCENTILE, METHODS
from .quant.sensitivity import DEFAULT_BITS, DEFAULT_CALIBRATION_IMAGES
from .quant.sensitivity import DEFAULT_IMAGES as SENSITIVITY_IMAGES

def _quant_config(weight_bits, activation_bits, per_tensor, symmetric_activations, exclude, reduce_range=None,
                  quantize_tail=None, weight_rounding=None, recurrent=None, equalize=None, file_settings=None):
    """The QuantConfig of the flags given, over `file_settings` (a --config file's quantization settings)."""
    from .quant.config import QuantConfig

    settings = {"weight_bits": weight_bits, "activation_bits": activation_bits,
                "per_channel": False if per_tensor else None, "symmetric_activations": symmetric_activations,
                "exclude": list(exclude) or None, "reduce_range": reduce_range, "quantize_tail": quantize_tail,
                "weight_rounding": weight_rounding, "recurrent": recurrent, "equalize": equalize}
    return QuantConfig(**{**(file_settings or {}), **{k: v for k, v in settings.items() if v is not None}})


def _calibrate_file(config_file, echo) -> tuple[dict, dict, dict]:
    """A --config file's (quantization, mixed precision, preprocessing) settings for calibrate; the training
    settings it may also hold (it can be train-quant's file) are named and left alone."""
    from .train.config import load_config_file, split_config

    if not config_file:
        return {}, {}, {}
    quant, train, pre = split_config(load_config_file(config_file))
    mixed = {k: train.pop(k) for k in ("mixed_precision", "mixed_low_bits") if k in train}
    if train:
        echo(f"{config_file}: training settings not used by calibrate: {', '.join(sorted(train))}")
    return quant, mixed, {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}


@click.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="Calibration data. " + DATA_HELP)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the int8 model.")
@click.option("--val-data", type=click.Path(),
              help="Images to verify on and report top-1 for (default: --data).")
@click.option("--method", type=click.Choice(METHODS),
              help="Default: minmax for a classifier with labels, average for any other model or data without "
                   "labels (as train-quant calibrates its start). minmax: observed range; average: the mean of the ranges of groups of 32 images (what a "
                   "moving-average observer settles at); percentile: leave out the --percentile tails; entropy: "
                   "the range of least KL divergence (TensorRT's calibration).")
@click.option("--images", type=click.IntRange(1), default=DEFAULT_IMAGES, show_default=True,
              help="Calibrate on this many images (a seeded random subset of --data).")
@click.option("--percentile", type=click.FloatRange(50, 100, min_open=True), default=DEFAULT_PERCENTILE,
              show_default=True, help="With --method percentile: the share of values kept, in % ((100 - P) / 2 % "
              "is cut at each end).")
@click.option("--bins", type=click.IntRange(16), default=DEFAULT_BINS, show_default=True,
              help="Histogram bins of --method percentile/entropy. Entropy may cut a range down to "
                   "(levels / bins) of its width: fewer bins clip less.")
@click.option("--labels", type=click.Path(dir_okay=False),
              help="Class names, one per line, in output order (default: the model's own, else sorted folders).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or JSON settings (schemas/qat-config.schema.json, train-quant's file: its quantization, "
                   "mixed-precision and preprocessing settings, e.g. layer_weight_bits); flags override the file.")
@quantization_options
@weight_rounding_option
@equalize_option
@click.option("--mixed-precision", metavar="SIZE_BUDGET",
              help="Weight-size budget (e.g. 120KB, 0.3MB, 30%% of the float weights): the layers that lose the "
                   "most at --mixed-low-bits (measured on --data, against the labels or the float model) keep "
                   "the --weight-bits, the rest get --mixed-low-bits.")
@click.option("--mixed-low-bits", type=BITS, help="Bits of the less sensitive layers with --mixed-precision (4).")
@preprocessing_options
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime checks (fusion, agreement, top-1).")
def calibrate_command(model, data, output, val_data, method, images, percentile, bins, labels, config_file, bits,
                      weight_bits, activation_bits, per_tensor, symmetric_activations, exclude, reduce_range,
                      quantize_tail, recurrent, weight_rounding, equalize, mixed_precision, mixed_low_bits, size,
                      color, mean, std, resize, pad_value, no_verify) -> None:
    """Post-training quantization of a float MODEL: calibrate activation ranges on --data, write the int8 model.

    The ranges are observed on the float model (BN folded, eval mode) and the model goes through the same
    int8 export as train-quant: per-channel int8 weights, int32 biases, Q/DQ activations. Unless --no-verify,
    onnxruntime loads the model, the nodes that did not become integer kernels are listed with the rule they
    broke, and the int8 and simulated models are measured against float: top-1 with labels, else each output's
    SQNR and its task measure (CTC sequences, maps, classes).

    \b
    Examples:
      qatool calibrate float.onnx --data train/ -o model_int8.onnx
      qatool calibrate float.onnx --data train/ --val-data val/ --method entropy -o model_int8.onnx
    """
    from .api import calibrate

    q_file, mixed, p_file = _calibrate_file(config_file, click.echo)
    quant = _quant_config(weight_bits or bits, activation_bits or bits, per_tensor, symmetric_activations, exclude,
                          reduce_range, quantize_tail, weight_rounding, recurrent, equalize, q_file)
    pre = {**p_file, **{k: v for k, v in preprocess_overrides(size, color, mean, std, resize, pad_value).items()
                        if v is not None}}
    r = calibrate(model, data, output, method=method, quant=quant, images=images, preprocess=pre,
                  verify=not no_verify, val_data=val_data, percentile=percentile, bins=bins, echo=click.echo,
                  labels=labels, mixed_precision=mixed_precision or mixed.get("mixed_precision"),
                  mixed_low_bits=mixed_low_bits or mixed.get("mixed_low_bits", 4))
    click.echo(f"wrote {output} ({r['size_bytes'] / 1024:.1f} KB)")
    export = r["export"]
    for line in export_summary(export):
        click.echo(line)
    if r["top1_int8"] is not None:
        click.echo(f"top-1 on {val_data or data}: float {r['top1_float']:.4f}, int8 simulation {r['top1_sim']:.4f}, "
                   f"int8 onnxruntime {r['top1_int8']:.4f}")
    elif not no_verify and not r.get("tasks"):
        click.echo("no top-1: the data's classes are not the model's outputs")
    for line in placement_lines(r["placement"]["dynamic_recurrent"], r["placement"]["float_nodes"]):
        click.echo(line)


@click.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help=DATA_HELP)
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the ranked report as JSON (schemas/sensitivity.schema.json).")
@click.option("--bits", type=BITS, default=DEFAULT_BITS, show_default=True,
              help="Weight bits of the layer under test (at 8 bits most layers barely matter).")
@click.option("--activation-bits", type=BITS, default=8, show_default=True,
              help="Bits of the layer's input and output.")
@click.option("--images", type=click.IntRange(1), default=SENSITIVITY_IMAGES, show_default=True,
              help="Measure on this many images (a seeded random subset of --data).")
@click.option("--calibration-images", type=click.IntRange(1), default=DEFAULT_CALIBRATION_IMAGES,
              show_default=True, help="Calibrate the activation ranges (min/max) on this many images.")
@click.option("--per-tensor", is_flag=True, default=None, help="One weight scale per tensor instead of per channel.")
@click.option("--symmetric-activations", is_flag=True, default=None,
              help="Signed activations with zero point 0 instead of asymmetric unsigned.")
@click.option("--exclude", multiple=True, help="Node name or op type to leave out (repeatable).")
@preprocessing_options
def sensitivity_command(model, data, json_path, bits, activation_bits, images, calibration_images, per_tensor,
                        symmetric_activations, exclude, size, color, mean, std, resize, pad_value) -> None:
    """Quantize one layer of MODEL at a time and rank the layers by how much that hurts.

    For each Conv/Gemm/MatMul, only that layer (input, weights, bias, output) is quantized, its ranges
    calibrated on the float model, and the model's output compared with the float output on --data:
    SQNR in dB (lowest = most sensitive), top-1 and its drop. Prints the ranked table.
    """
    from .api import sensitivity
    from .quant.sensitivity import format_table

    quant = _quant_config(bits, activation_bits, per_tensor, symmetric_activations, exclude)
    report = sensitivity(model, data, quant=quant, images=images, calibration_images=calibration_images,
                         preprocess=preprocess_overrides(size, color, mean, std, resize, pad_value),
                         json_path=json_path,
                         echo=click.echo)
    for line in format_table(report):
        click.echo(line)
    if json_path:
        click.echo(f"wrote {json_path}")
