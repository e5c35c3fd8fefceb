"""The command line: each command parses its options, calls one library function, and maps errors to exit codes."""

from __future__ import annotations

import sys

import click

from . import __version__
from .cli_options import (BITS, DATA_HELP, export_summary, placement_lines, preprocess_overrides,
                          equalize_option, preprocessing_options, quantization_options, training_options,
                          weight_rounding_option)
from .errors import QatoolError
from .quant.calibrate import METHODS as CALIBRATION_METHODS
from .train.config import UPDATE_SCALES


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qatool")
@click.option("--debug", is_flag=True, help="Show the full Python traceback when something fails.")
@click.option("--max-memory", metavar="SIZE", help="Memory for the intermediate values of one evaluation batch "
              "of qatool's engine (e.g. 512MB, 2GB; default 1GB): evaluations pick their batch from it, so a "
              "lower value lowers the peak of validation, calibration and export checks.")
def cli(debug: bool, max_memory: str | None) -> None:
    """Quantization-aware training of ONNX models.

    \b
    Typical pipeline:
      qatool convert float.onnx -o train.onnx --for-training
      qatool train-quant train.onnx --train-data DIR --val-data DIR -o out/
      qatool export-int8 out/qat.onnx -o model_int8.onnx
      qatool eval float.onnx model_int8.onnx --data DIR
    """
    from .engine import keep_freed_memory

    keep_freed_memory()  # every step allocates the same large arrays: reuse them instead of re-mapping pages
    if max_memory:
        from .runtime.backends import set_memory_budget
        from .quant.mixed import parse_size

        set_memory_budget(parse_size(max_memory))  # a bad size: UsageError, one line


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the converted model.")
@click.option("--for-training", is_flag=True,
              help="Keep BatchNormalization and Dropout and record which initializers are trainable "
                   "(the input of train-quant). Without it: an inference model with BN folded, Dropout removed.")
def convert(model: str, output: str, for_training: bool) -> None:
    """Normalise any float ONNX MODEL: check it, upgrade it to opset >= 13, fold constants.

    Graph input and output names are kept, so feeds and outputs mean the same before and after.
    """
    from . import api

    result = api.convert(model, output, for_training=for_training)
    for line in result.summary_lines():
        click.echo(line)
    click.echo(f"wrote {output}")


@cli.command("train-quant")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--train-data", required=True, type=click.Path(),
              help=DATA_HELP)
@click.option("--val-data", type=click.Path(), help="Validation images, same forms as --train-data.")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for qat.onnx, model_int8.onnx, metrics.jsonl and report.json.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Class names, one per line, in output order.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or JSON settings (schemas/qat-config.schema.json); flags override the file.")
@preprocessing_options
@click.option("--augment/--no-augment", default=None, help="Random crop with padding and horizontal flip.")
@quantization_options
@click.option("--scale-update", type=click.Choice(["moving-average", "maximum"]),
              help="How activation ranges are observed (default moving-average).")
@click.option("--observer-momentum", type=click.FloatRange(0, 1, max_open=True),
              help="Momentum of the moving-average observer (default 0.9).")
@click.option("--freeze-bn-after", type=click.IntRange(0), help="Step after which BN uses running statistics "
              "(default: decided by checks on a few training batches: from the start when batch statistics raise the "
              "float model's loss, as for a model pretrained on other data, or blow up the quantized model's "
              "gradient; else half the steps).")
@click.option("--freeze-observers-after", type=click.IntRange(0),
              help="Step after which activation ranges stop updating (default: three quarters of the steps).")
@weight_rounding_option
@equalize_option
@click.option("--scale-learning", type=click.Choice(["none", "lsq"]),
              help="lsq: train the weight and activation step sizes by gradient (LSQ), initialised from the "
                   "observers; the export uses the learned scales.")
@training_options
@click.option("--scale-lr", type=click.FloatRange(0, min_open=True),
              help="Learning rate of the LSQ step sizes (--scale-learning lsq), same optimizer and schedule "
                   "(default: --lr). With adam it is relative: a step moves a step size by about that fraction "
                   "of itself.")
@click.option("--update-scale", type=click.Choice(UPDATE_SCALES),
              help="absolute (default): an optimizer step moves every parameter by about --lr (adam); tensor: each "
                   "parameter tensor's lr is also multiplied by its RMS at the start, so a step moves every tensor "
                   "by about the same fraction of its size; step: each quantized weight's lr is multiplied by its "
                   "quantization step at the start (median over channels; the other parameters take the median), "
                   "so --lr is the fraction of a step one update moves a weight by.")
@click.option("--init", "init", type=click.Choice(["observe", "calibrate"]),
              help="calibrate (default): activation ranges start from post-training calibration on the training "
                   "images, and the run measures that start's int8 accuracy; observe: from the first batches.")
@click.option("--init-method", type=click.Choice(CALIBRATION_METHODS),
              help="Calibration method for --init calibrate (default minmax; average for a run without labels).")
@click.option("--init-images", type=click.IntRange(1), help="Images calibrated on for --init calibrate (512).")
@click.option("--mixed-precision", metavar="SIZE_BUDGET",
              help="Weight-size budget (e.g. 120KB, 0.3MB, 30%% of the float weights): the most sensitive layers "
                   "keep the --weight-bits, the rest get --mixed-low-bits.")
@click.option("--mixed-low-bits", type=BITS, help="Bits of the less sensitive layers with --mixed-precision (4).")
@click.option("--save-every", type=click.IntRange(1), help="Also save a checkpoint every N steps.")
@click.option("--keep", type=click.Choice(["best", "last"]),
              help="best (default): model_int8.onnx is the validated checkpoint of best int8 top-1, the start "
                   "(post-training quantization) included, selected on --val-data; last: the final step.")
@click.option("--retreat/--no-retreat", default=None,
              help="When a validation scores below the start (post-training quantization), go back to the best "
                   "state validated so far and continue at a tenth of the lr (at most twice). Default: on for a "
                   "run without labels, off for a classifier with labels.")
@click.option("--validate-every", type=click.IntRange(1),
              help="Steps between int8 validations on --val-data (default: a quarter of the run).")
@click.option("--logits", metavar="TENSOR",
              help="The tensor holding the logits, when the model outputs probabilities that no "
                   "Softmax/LogSoftmax produces (found by itself otherwise).")
@click.option("--teacher", type=click.Path(dir_okay=False),
              help="Distillation QAT: a float ONNX model (run in eval mode) whose outputs the model learns from.")
@click.option("--distill-temperature", type=click.FloatRange(0, min_open=True), help="Softmax temperature (4).")
@click.option("--distill-alpha", type=click.FloatRange(0, 1),
              help="Weight of the distillation term (0.5); 1 - alpha weighs the cross-entropy.")
@click.option("--new-head", is_flag=True,
              help="Transfer learning: a fresh classifier for the data's classes (as `qatool finetune --new-head`), "
                   "trained alone in float for --float-steps, then QAT of the whole model.")
@click.option("--features", metavar="TENSOR", help="With --new-head: the tensor the new head reads.")
@click.option("--float-steps", type=click.IntRange(1),
              help="Float warm-up steps before QAT (default with --new-head: 100; the new head alone, or every "
                   "layer without --new-head unless --freeze-backbone). The warmed-up model is "
                   "OUTPUT_DIR/float_warmup.onnx.")
@click.option("--freeze-backbone", is_flag=True, help="The float warm-up trains the head only.")
@click.option("--map-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without labels: a probability map is measured by its IoU with float's, both thresholded here "
                   "(0.3, a DB text detector's own).")
@click.option("--metric", metavar="FILE.py:FUNCTION",
              help="Without labels: your own measure, a function (outputs, batch) -> score (higher is better; "
                   "outputs: {output name: array} of one batch, batch: its input), averaged over the validation "
                   "images; it chooses the checkpoint (--keep best) instead of the task measure.")
@click.option("--distill-features", type=click.Choice(["none", "tail-inputs"]),
              help="Without labels: also distil intermediate tensors: tail-inputs, the input of each last weighted "
                   "layer (the head convolutions' inputs, PaddleSlim ACT's rule), by normalised MSE (default none).")
@click.option("--pad-multiple", type=click.IntRange(min=1),
              help="Without labels, .npy folders: a height / width the model leaves free is padded (right / bottom, "
                   "with --pad-value, default 0) up to a multiple of this, so inputs of nearby sizes train in one "
                   "batch (default 1: every size apart).")
@click.option("--distill-outputs", metavar="NAME", multiple=True,
              help="Without labels: the graph outputs the model learns to reproduce (repeatable; default all).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from a qat.onnx checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_quant(model, train_data, val_data, output_dir, labels, config_file, size, color, mean, std, resize,
                pad_value, augment,
                bits, weight_bits, activation_bits, per_tensor, symmetric_activations, scale_update,
                observer_momentum, freeze_bn_after, freeze_observers_after, exclude, reduce_range, quantize_tail,
                recurrent, scale_learning, weight_rounding, equalize,
                optimizer, lr, scale_lr, update_scale, momentum, weight_decay, schedule, warmup_steps, steps, epochs,
                batch_size,
                seed, init, init_method, init_images, mixed_precision, mixed_low_bits, save_every, keep, retreat,
                validate_every, logits, teacher, distill_temperature, distill_alpha, new_head, features, float_steps,
                freeze_backbone, map_threshold, distill_features, pad_multiple, metric, distill_outputs, resume, quiet):
    """Quantization-aware training of MODEL on an image folder.

    MODEL is a float ONNX model (converted --for-training on the fly) or the output of
    `qatool convert --for-training`. Writes OUTPUT_DIR/qat.onnx (checkpoint), OUTPUT_DIR/model_int8.onnx
    (the deployable int8 model), metrics.jsonl and report.json.

    With --val-data the run measures its start (post-training quantization, same placement) and the int8
    accuracy at checkpoints, and writes the best of them (--keep). Classes follow the model's own class
    names when its metadata has them (Paddle's 'character', 'labels', 'classes', ...), else sorted folders.
    """
    from . import api
    from .quant.config import QuantConfig
    from .train.config import TrainConfig, load_config_file, split_config

    file_settings = load_config_file(config_file) if config_file else {}
    q_file, t_file, p_file = split_config(file_settings)
    q_flags = {"weight_bits": weight_bits or bits, "activation_bits": activation_bits or bits,
               "per_channel": False if per_tensor else None, "symmetric_activations": symmetric_activations,
               "scale_update": scale_update, "observer_momentum": observer_momentum,
               "freeze_bn_after": freeze_bn_after, "freeze_observers_after": freeze_observers_after,
               "exclude": list(exclude) or None, "reduce_range": reduce_range, "quantize_tail": quantize_tail,
               "recurrent": recurrent, "scale_learning": scale_learning, "weight_rounding": weight_rounding,
               "equalize": equalize}
    t_flags = {"optimizer": optimizer, "lr": lr, "scale_lr": scale_lr, "update_scale": update_scale,
               "momentum": momentum,
               "weight_decay": weight_decay, "schedule": schedule, "warmup_steps": warmup_steps, "steps": steps,
               "epochs": epochs, "batch_size": batch_size, "seed": seed, "save_every": save_every, "augment": augment,
               "teacher": teacher, "distill_temperature": distill_temperature, "distill_alpha": distill_alpha,
               "init": init, "init_method": init_method, "init_images": init_images,
               "mixed_precision": mixed_precision, "mixed_low_bits": mixed_low_bits, "keep": keep, "retreat": retreat,
               "validate_every": validate_every, "logits": logits, "map_threshold": map_threshold,
               "distill_features": distill_features, "pad_multiple": pad_multiple}
    quant = {**q_file, **{k: v for k, v in q_flags.items() if v is not None}}
    train = {**t_file, **{k: v for k, v in t_flags.items() if v is not None}}
    pre = {k: tuple(v) if isinstance(v, list) else v for k, v in p_file.items()}
    pre.update({k: v for k, v in preprocess_overrides(size, color, mean, std, resize, pad_value).items()
                if v is not None})
    api.train_quant(model, train_data, output_dir, val_data=val_data,
                    quant=QuantConfig(**quant) if (quant or not resume) else None, train=TrainConfig(**train),
                    preprocess=pre, labels=labels, resume=resume, quiet=quiet, echo=click.echo, new_head=new_head,
                    features=features, float_steps=float_steps, freeze_backbone=freeze_backbone,
                    distill_outputs=list(distill_outputs) or None, metric=metric)


@cli.command("finetune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--train-data", required=True, type=click.Path(),
              help="Labelled images: a folder with one sub-folder per class, or a list file of 'relative/path "
                   "label' lines.")
@click.option("--val-data", type=click.Path(), help="Validation images: float top-1 before and after training.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The fine-tuned for-training model (train-quant takes it); OUTPUT's .report.json, "
                   ".metrics.jsonl and, with --new-head, .labels.txt are written beside it.")
@click.option("--new-head", is_flag=True,
              help="Replace the classifier by a fresh Linear (Gemm) for the data's classes (initialised as "
                   "PyTorch's nn.Linear), cut at the classifier's input; a final Softmax is kept.")
@click.option("--features", metavar="TENSOR", help="With --new-head: the tensor the new head reads (default: the "
              "input of the final Gemm/MatMul, or of a 1x1 Conv after global pooling); (N, C) or (N, C, 1, 1).")
@click.option("--freeze-backbone", is_flag=True,
              help="Train only the new head (or --trainable); the rest runs in eval mode with no backward, so a "
                   "step costs little more than a forward.")
@click.option("--trainable", multiple=True, metavar="NAME",
              help="Initializer name or node-name prefix whose parameters train (repeatable); the rest is frozen "
                   "with --freeze-backbone.")
@click.option("--labels", type=click.Path(dir_okay=False),
              help="Class names, one per line: the model's output order (without --new-head), or the new head's.")
@preprocessing_options
@click.option("--augment/--no-augment", default=None, help="Random crop with padding and horizontal flip.")
@training_options
@click.option("--save-every", type=click.IntRange(1), help="Also write OUTPUT every N steps (for --resume).")
@click.option("--resume", type=click.Path(dir_okay=False),
              help="Continue a finetune run from its OUTPUT (same --steps); its head and frozen parameters are kept.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune(model, train_data, val_data, output, new_head, features, freeze_backbone, trainable, labels, size,
             color, mean, std, resize, pad_value, augment, optimizer, lr, momentum, weight_decay, schedule,
             warmup_steps, steps, epochs, batch_size, seed, save_every, resume, quiet):
    """Float training of MODEL on an image folder: transfer learning to your own classes.

    \b
    Examples:
      qatool finetune imagenet.onnx --train-data mine/train --val-data mine/val --new-head --freeze-backbone -o mine.onnx
      qatool train-quant mine.onnx --train-data mine/train --val-data mine/val -o out/
    """
    from . import api
    from .train.config import TrainConfig

    t_flags = {"optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
               "schedule": schedule, "warmup_steps": warmup_steps, "steps": steps, "epochs": epochs,
               "batch_size": batch_size, "seed": seed, "augment": augment, "save_every": save_every}
    api.finetune(model, train_data, output, val_data=val_data,
                 train=TrainConfig(**{k: v for k, v in t_flags.items() if v is not None}),
                 preprocess=preprocess_overrides(size, color, mean, std, resize, pad_value), labels=labels,
                 new_head=new_head,
                 features=features, freeze_backbone=freeze_backbone, trainable=list(trainable) or None,
                 resume=resume, quiet=quiet, echo=click.echo)


@cli.command("export-int8")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the int8 model.")
@click.option("--calib-data", type=click.Path(), help="Images to verify on (default: the checkpoint's val data).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime checks (fusion and agreement).")
@click.option("--no-int4", is_flag=True,
              help="Store weights of 4 bits or fewer one per byte instead of two (INT4 needs opset 21, onnxruntime "
                   ">= 1.20; without it the file keeps the model's opset).")
@preprocessing_options
def export_int8(checkpoint, output, calib_data, no_verify, no_int4, size, color, mean, std, resize,
                pad_value):
    """Write the deployable int8 model of a QAT CHECKPOINT (qat.onnx).

    BN folded, int8 per-channel weights, int32 biases, Q/DQ activations with the trained scales. Unless
    --no-verify: onnxruntime must fuse every quantized node into an integer kernel (else the command fails
    naming each node and the rule it broke), and the simulation and onnxruntime are compared on a batch.
    Weights of 4 bits or fewer are stored as INT4, two per byte; a Cast to int8 in front of each is folded
    when onnxruntime loads the model, so they still run in its int8 kernels.
    """
    from . import api

    r = api.export_int8(checkpoint, output, calib_data=calib_data, verify=not no_verify,
                        preprocess=preprocess_overrides(size, color, mean, std, resize, pad_value),
                        int4=not no_int4)
    click.echo(f"wrote {r['path']} ({r['size_bytes'] / 1024:.1f} KB)")
    for line in export_summary(r):
        click.echo(line)
    if "top1_int8" in r:
        click.echo(f"top-1: simulation {r['top1_qat']:.4f}, int8 onnxruntime {r['top1_int8']:.4f}")
    for line in placement_lines(r["dynamic_recurrent"], r["float_nodes"]):
        click.echo(line)


@cli.command()
@click.option("-o", "--output-dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's files.")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1), help="QAT steps.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(output_dir: str, steps: int, quiet: bool) -> None:
    """Run convert -> train-quant -> export-int8 -> eval on the bundled LeNet and real MNIST digits."""
    from .demo import run_demo

    run_demo(output_dir, echo=click.echo, steps=steps, quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    """Entry point: domain errors become one line on stderr and a non-zero exit; --debug shows tracebacks."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="qatool", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("qatool: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if debug:
            raise
        hint = " (see 'qatool --help')" if isinstance(e, click.UsageError) else ""
        click.echo(f"qatool: error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except QatoolError as e:
        if debug:
            raise
        click.echo(f"qatool: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("qatool: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug: still one line, with the way to see more
        if debug:
            raise
        click.echo(f"qatool: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(1)


from .cli_eval import eval_command  # noqa: E402  (after `cli` exists)
from .cli_report import report_command  # noqa: E402
from .cli_quant import calibrate_command, sensitivity_command  # noqa: E402

for _command in (eval_command, report_command, calibrate_command, sensitivity_command):
    cli.add_command(_command)

if __name__ == "__main__":
    main()
