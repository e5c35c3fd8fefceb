"""The `qatool report` command (registered on the main group with `cli.add_command(report_command)`)."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="The HTML file to write (default: OUTDIR/report.html).")
@click.option("--sensitivity", type=click.Path(dir_okay=False),
              help="A per-layer sensitivity JSON to include (default: OUTDIR/sensitivity.json when it exists).")
@click.option("--png", is_flag=True,
              help="Also write the charts as loss.png, accuracy.png and (with sensitivity) sensitivity.png, "
                   "beside the HTML file.")
def report_command(outdir: str, output: str | None, sensitivity: str | None, png: bool) -> None:
    """One self-contained HTML page of the train-quant run in OUTDIR.

    Draws the loss, the running accuracy and the learning rate over the steps (with the spans where BN and the
    activation observers were frozen), summarises report.json (float, QAT-simulation and int8 top-1, agreement,
    speed, bits, which layers are quantized, which nodes stay float and why, onnxruntime's integer kernels) and
    ranks the layers by their quantization SQNR when a sensitivity file is there. Inline SVG only: no scripts,
    no external files; it opens offline and prints.

    \b
    Examples:
      qatool report out/
      qatool report out/ -o run1.html --png
    """
    from .eval.html_report import file_size_text, write_report

    for path in write_report(outdir, output=output, sensitivity=sensitivity, png=png):
        click.echo(f"wrote {path} ({file_size_text(path)})")
