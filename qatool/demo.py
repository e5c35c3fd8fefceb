"""`qatool demo` / `make demo`: the whole pipeline on the bundled sample model and real digits.

convert --for-training -> train-quant -> export-int8 -> eval, ending with the float vs int8 table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import api
from .errors import DataError
from .train.config import TrainConfig

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DEFAULT_MODEL = SAMPLES / "lenet_bn.onnx"
DEFAULT_DATA = SAMPLES / "data" / "mnist"


def run_demo(output_dir: str | Path, echo: Callable[[str], None] = print, steps: int = 200,
             model_path: Path = DEFAULT_MODEL, data_dir: Path = DEFAULT_DATA, quiet: bool = False) -> dict:
    from .eval.evaluate import format_table

    if not model_path.is_file() or not (data_dir / "val").is_dir():
        raise DataError(f"the demo needs the bundled sample model and data ({model_path}, {data_dir}); "
                        "run it from a clone of the qatool repository")
    out = Path(output_dir)
    train_path = out / "train.onnx"
    echo(f"== 1/4  qatool convert {model_path.name} -o {train_path} --for-training")
    for line in api.convert(model_path, train_path, for_training=True).summary_lines():
        echo("   " + line)
    echo(f"\n== 2/4  qatool train-quant {train_path} --train-data {data_dir / 'train'} --val-data {data_dir / 'val'} "
         f"-o {out / 'qat'} --steps {steps}")
    report = api.train_quant(train_path, data_dir / "train", out / "qat", val_data=data_dir / "val",
                             train=TrainConfig(steps=steps), quiet=quiet, echo=lambda s: echo("   " + s))
    int8_path = out / "model_int8.onnx"
    kept = Path(report["outputs"].get("best_checkpoint", out / "qat" / "qat.onnx"))  # what model_int8.onnx is of
    echo(f"\n== 3/4  qatool export-int8 {kept} -o {int8_path}")
    exported = api.export_int8(kept, int8_path)
    f, a = exported["fusion"], exported["agreement"]
    echo(f"   {f['fused']} of {f['expected']} quantized nodes run as onnxruntime integer kernels; "
         f"simulation vs int8 top-1 agreement {a['agreement_top1']:.4f} on {a['images']} images")
    echo(f"\n== 4/4  qatool eval {model_path.name} {int8_path.name} --data {data_dir / 'val'}")
    table = api.evaluate([model_path, int8_path], data_dir / "val", json_path=out / "eval.json")
    echo("\n".join(format_table(table)))
    echo(f"\nQAT ms/step {report['ms_per_step']:.1f}; files in {out}/")
    return {"train": report, "export": exported, "eval": table}
