"""The command line: each command parses its options, calls one library function, and maps errors to exit codes."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import QatoolError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qatool")
@click.option("--debug", is_flag=True, help="Show the full Python traceback when something fails.")
def cli(debug: bool) -> None:
    """Quantization-aware training of ONNX models.

    \b
    Typical pipeline:
      qatool convert float.onnx -o train.onnx --for-training
      qatool train-quant train.onnx --train-data DIR --val-data DIR -o out/
      qatool export-int8 out/qat.onnx -o model_int8.onnx
      qatool eval float.onnx model_int8.onnx --data DIR
    """


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


@cli.command()
@click.option("-o", "--output-dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's files.")
def demo(output_dir: str) -> None:
    """Run the pipeline on the bundled sample model and digits."""
    from .demo import run_demo

    run_demo(output_dir, echo=click.echo)


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


if __name__ == "__main__":
    main()
