"""The `qatool eval` command (registered on the main group with `cli.add_command(eval_command)`)."""

from __future__ import annotations

import click

from .cli_options import DATA_HELP, preprocess_overrides, preprocessing_options
from .eval.evaluate import BACKENDS, DEFAULT_BATCH_SIZE


@click.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help=DATA_HELP)
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="ort: onnxruntime CPU (any ONNX model, float or int8; the default). engine: qatool's own "
                   "executor in eval mode (a qat.onnx checkpoint runs its fake-quant simulation). Give it once "
                   "for all models, or once per model in the models' order.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the report as JSON (schemas/eval-report.schema.json).")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Batch of the evaluation pass and of the batch-N latency.")
@click.option("--threads", type=click.IntRange(1),
              help="onnxruntime intra-op threads (default: onnxruntime's own, one per physical core). "
                   "The engine uses numpy's BLAS threads (OMP_NUM_THREADS).")
@click.option("--labels", type=click.Path(dir_okay=False),
              help="Class names, one per line, in output order (as given to train-quant).")
@preprocessing_options
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Measure the warm median latency at batch 1 and at --batch-size.")
def eval_command(models, data, backends, json_path, batch_size, threads, labels, size, color, mean, std, resize,
                 pad_value,
                 latency) -> None:
    """Accuracy, agreement, size and latency of one or more MODELs on the images of --data.

    Each model is preprocessed as its metadata says unless --size/--color/--mean/--std are given. The first
    model is the reference: the others' agreement is the share of images where they predict its class.

    \b
    Examples:
      qatool eval float.onnx out/model_int8.onnx --data val/
      qatool eval out/qat.onnx out/model_int8.onnx --data val/ --backend engine --backend ort
    """
    from .eval.evaluate import evaluate, format_table

    report = evaluate(models, data, backend=list(backends) or "ort", batch_size=batch_size,
                      preprocess_overrides=preprocess_overrides(size, color, mean, std, resize, pad_value),
                      threads=threads,
                      labels=labels, latency=latency, json_path=json_path)
    for line in format_table(report):
        click.echo(line)
    if json_path:
        click.echo(f"wrote {json_path}")
