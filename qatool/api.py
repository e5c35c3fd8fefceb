"""The pipeline functions that the CLI and users' scripts call."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .convert import ConvertResult, normalize_proto
from .errors import DataError, ModelError, UsageError
from .ir.graph import to_onnx
from .ir.io import load_proto, save_proto
from .quant.calibrate import DEFAULT_BINS, DEFAULT_PERCENTILE
from .quant.calibrate import DEFAULT_IMAGES as CALIBRATION_IMAGES
from .quant.sensitivity import DEFAULT_CALIBRATION_IMAGES as SENSITIVITY_CALIBRATION_IMAGES
from .quant.sensitivity import DEFAULT_IMAGES as SENSITIVITY_IMAGES


def _refuse_overwrite(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise UsageError(f"the output {output_path} is the input file; choose another output path")


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, for_training: bool = False) -> ConvertResult:
    """Normalise a float ONNX model (see `qatool.convert`) and write it to `output_path` atomically."""
    _refuse_overwrite(input_path, output_path)
    result = normalize_proto(load_proto(input_path), for_training, free_batch=True)
    model = to_onnx(result.graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:  # a bug of ours, but say it plainly
        raise ModelError(f"internal: the converted model fails onnx.checker: {str(e).splitlines()[0]}") from e
    save_proto(model, output_path)
    return result


# ---- train-quant ------------------------------------------------------------------------------------------------
def _model_signature(graph) -> str:
    """A fingerprint of a float training graph's structure (op types, names, parameter shapes)."""
    import hashlib

    h = hashlib.sha256()
    for n in graph.nodes:
        h.update(f"{n.op_type}|{n.name}|{','.join(n.inputs)}|{','.join(n.outputs)};".encode())
    for k in sorted(graph.initializers):
        h.update(f"{k}:{graph.initializers[k].shape};".encode())
    return h.hexdigest()[:16]


def check_classes(dataset, n_outputs: int | None, model_path) -> None:
    """An image folder must have one class per model output; a list file's labels must be outputs."""
    if dataset.labels_fit(n_outputs):
        return
    what = f"{dataset.num_classes} class folders" if dataset.source.is_dir() else \
        f"labels up to {dataset.num_classes - 1}"
    raise DataError(f"{dataset.source} has {what} but the model {Path(model_path).name} has {n_outputs} outputs")


def _training_model(model_path, resume, quant):
    """The float training graph, the checkpoint to resume (or None) and the quantization settings."""
    from .quant.config import QuantConfig
    from .train.checkpoint import load_checkpoint

    float_graph = normalize_proto(load_proto(model_path), for_training=True, free_batch=True).graph
    if resume is None:
        return float_graph, None, quant or QuantConfig()
    ckpt = load_checkpoint(resume)
    if ckpt.info.get("model_signature") != _model_signature(float_graph):
        raise UsageError(f"--resume {resume} is a checkpoint of another model than {model_path}")
    if quant is not None and quant.to_dict() != ckpt.quant.to_dict():
        raise UsageError("the quantization settings differ from the checkpoint's; resume with the same settings")
    return float_graph, ckpt, ckpt.quant


def _open_data(train_data, val_data, class_names, n_outputs, model_path):
    """The training and validation sets (listed, not yet decoded)."""
    from .data.images import ImageDataset

    train_set = ImageDataset.open(train_data, class_names)
    check_classes(train_set, n_outputs, model_path)
    val_set = ImageDataset.open(val_data, class_names or train_set.classes) if val_data is not None else None
    return train_set, val_set


def _load_data(train_set, val_set, pre, echo):
    echo(f"loading {len(train_set)} training images from {train_set.source}")
    train_images = train_set.load(pre)
    val_images = None
    if val_set is not None:
        val_images = val_set.load(pre)
        echo(f"loaded {len(val_images)} validation images from {val_set.source}")
    return train_images, val_images


def _resolve_batch(train_cfg, session, data, tensors, ckpt, echo, limit: int | None = None):
    """The training config with its batch: --batch-size, else a resumed run's, else the largest that fits the
    step's memory budget (qatool.train.footprint), at most `limit` (default 64). Returns (config, the choice's
    record or None)."""
    from dataclasses import replace

    from .train.footprint import DEFAULT_BATCH, choose_batch

    fixed = session.model.fixed_batch
    if fixed is not None:  # convert could not free the batch of 1: the engine trains one image at a time
        if (train_cfg.batch_size or 1) > 1:
            raise UsageError(f"--batch-size {train_cfg.batch_size}: the model's batch of 1 could not be freed "
                             f"({fixed}); it trains at batch 1 only")
        echo(f"batch 1: the model's batch of 1 could not be freed ({fixed}), so it trains one image at a time")
        return replace(train_cfg, batch_size=1), None
    if train_cfg.batch_size is not None:
        return train_cfg, None
    if ckpt is not None and ckpt.train.get("batch_size"):
        return replace(train_cfg, batch_size=int(ckpt.train["batch_size"])), None
    choice = choose_batch(session, data, tensors, limit=limit or DEFAULT_BATCH)
    echo(choice.summary())
    return replace(train_cfg, batch_size=choice.batch_size), choice.to_dict()


def _resolve_length(train_cfg, session, data, tensors, ckpt, echo):
    """A label-free run's steps: --steps / --epochs, else a resumed run's, else DISTILL_STEPS (LOW_BIT_DISTILL_STEPS
    at 4-bit weights and below) or as many as fit the run's time budget at the probe's step time
    (qatool.train.footprint.distill_steps). Returns (config, the probe's seconds a step where the budget chose the
    length, else None: the run revises it from its first steps)."""
    from dataclasses import replace

    from .train.footprint import distill_steps, step_cap, step_time

    if train_cfg.steps is not None or train_cfg.epochs is not None:
        return train_cfg, None
    if ckpt is not None and ckpt.train.get("steps"):
        return replace(train_cfg, steps=int(ckpt.train["steps"])), None
    probe = step_time(session, data, tensors)
    steps, why = distill_steps(probe, train_cfg.batch_size, step_cap(session.config))
    echo(why)
    return replace(train_cfg, steps=steps), probe.seconds(train_cfg.batch_size)


def _mixed_precision(float_graph, images, quant_cfg, size_budget: str, low: int, seed: int, echo,
                     labelled: bool = True):
    """Per-layer weight bits from the layers' sensitivity (on `images`: against their labels when `labelled`,
    else against the float model's outputs), within the weight-size budget `size_budget` (--mixed-precision)."""
    from .quant.config import QuantConfig
    from .quant.mixed import mixed_precision_config, parse_size, plan_mixed_precision, weight_sizes
    from .quant.sensitivity import layer_sensitivity

    probe = QuantConfig(**{**quant_cfg.to_dict(), "weight_bits": low, "layer_weight_bits": {}})
    echo(f"measuring each layer's sensitivity at {low}-bit weights for --mixed-precision {size_budget}")
    sens = layer_sensitivity(float_graph, images, probe, images=256, calibration_images=256, labelled=labelled,
                             seed=seed)
    budget = parse_size(size_budget, sens["float_weight_bytes"])
    plan = plan_mixed_precision(sens, budget, low, quant_cfg.weight_bits)
    sizes = weight_sizes(sens, plan)
    high = [n for n, b in plan.items() if b == quant_cfg.weight_bits]
    echo(f"mixed precision: {len(high)} of {len(plan)} layers at {quant_cfg.weight_bits} bits, the rest at {low}; "
         f"weights {sizes['effective']:,} bytes packed (budget {budget:,}), {sizes['container']:,} in the int8 file")
    return mixed_precision_config(quant_cfg, plan)


def train_quant(model_path, train_data, out_dir, val_data=None, quant=None, train=None, preprocess=None,
                labels=None, resume=None, quiet: bool = False, echo=print, new_head: bool = False,
                features: str | None = None, float_steps: int | None = None, freeze_backbone: bool = False,
                distill_outputs: list[str] | None = None, metric: str | None = None) -> dict:
    """QAT of a float (or convert --for-training) model on an image folder; writes qat.onnx, model_int8.onnx,
    metrics.jsonl and report.json into `out_dir` and returns the report.

    A classifier whose data has labels trains with cross-entropy and is judged by top-1; any other model, or any
    data without labels (a plain folder of images, a folder of `.npy` input tensors), trains to reproduce the
    float model and is judged against it by what each output is for (`_train_quant_any`; `distill_outputs`
    names the outputs to train on, default all; `metric` a user's measure FILE.py:FUNCTION that chooses the
    checkpoint, see qatool.tasks.metric).

    `quant` / `train` are QuantConfig / TrainConfig; `preprocess` a dict of size/color/mean/std overrides;
    `labels` a file of class names, one per line, in output order (default: the model's own class names when
    its metadata has them and the folders carry them, else sorted folder names); `resume` a qat.onnx to
    continue from. With validation data the run measures the int8 accuracy before the first step (post-training
    quantization) and at checkpoints, and by default writes the best of them (see qatool.eval.validation).

    Transfer learning in one command: `new_head` replaces the classifier by one for the data's classes (see
    `finetune`), whose float warm-up of `float_steps` steps (default DEFAULT_HEAD_STEPS) trains the head alone;
    `float_steps` without `new_head` is a float warm-up of the whole model (of the head only with
    `freeze_backbone`). The warmed-up model is OUT_DIR/float_warmup.onnx, and QAT then trains every layer.

    The stages, each its own function: prepare (`_output_folder`, `_float_warmup`, `_training_model`, then
    `_prepare_classifier` or `_prepare_any`), measure the start (`_measure_start_classifier` /
    `_measure_start_any`), train (`_run_training`), choose the kept checkpoint and export it
    (`_export_and_choose`, `_echo_export`), report (`_classifier_val` / `_any_val`, `_write_report`).
    """
    from .runtime.backends import top1
    from .tasks.choose import recipe_reason
    from .train.config import CLASSIFIER_RECIPE, DISTILL_RECIPE, Recipe, TrainConfig

    out = _output_folder(out_dir)
    train_cfg = train or TrainConfig()
    model_path, labels = _float_warmup(model_path, train_data, out, val_data, train_cfg, preprocess, labels,
                                       resume, new_head, features, float_steps, freeze_backbone, quiet, echo)
    float_graph, ckpt, quant_cfg = _training_model(model_path, resume, quant)
    if ckpt is not None:  # a resumed run keeps its optimizer, lr and start unless they are given again
        train_cfg = train_cfg.with_recipe(Recipe(ckpt.train.get("optimizer"), ckpt.train.get("lr"),
                                                 ckpt.train.get("init_method"), ckpt.train.get("retreat"),
                                                 ckpt.train.get("update_scale")))
    if train_cfg.scale_lr is not None and quant_cfg.scale_learning != "lsq":
        raise UsageError("--scale-lr sets the learning rate of learned step sizes: it needs --scale-learning lsq")
    if quant_cfg.rounding != "nearest" and ckpt is None and train_cfg.init != "calibrate":
        raise UsageError(f"--weight-rounding {quant_cfg.rounding} rounds the calibrated start's weights: it "
                         "needs --init calibrate")
    mixed_low = train_cfg.mixed_low_bits if train_cfg.mixed_precision and ckpt is None else None
    low_bits = quant_cfg.low_bits_planned(mixed_low)
    labelled, why = recipe_reason(float_graph, train_data)
    if not labelled or distill_outputs or metric:
        option = "--metric" if metric else "--distill-outputs"
        echo(f"label-free QAT: the model learns to reproduce its float model, because "
             f"{why if not labelled else option + ' is given'}")
        if train_cfg.teacher or labels or train_cfg.logits:
            raise UsageError("--teacher, --labels and --logits belong to a classifier trained with labels; without "
                             "labels the float model itself is the teacher")
        return _train_quant_any(model_path, float_graph, ckpt,
                                _with_rounding(quant_cfg, DISTILL_RECIPE, train_cfg.init, echo, mixed_low),
                                _with_low_bit_update(train_cfg, DISTILL_RECIPE, low_bits, echo),
                                train_data, out, val_data, preprocess, quiet, echo, distill_outputs, metric)
    echo(f"classifier QAT with labels (cross-entropy, top-1), because {why}")
    run = _prepare_classifier(model_path, float_graph, ckpt,
                              _with_rounding(quant_cfg, CLASSIFIER_RECIPE, train_cfg.init, echo, mixed_low),
                              train_cfg.with_recipe(CLASSIFIER_RECIPE),
                              train_data, val_data, preprocess, labels, out, quiet, echo)
    start_chance = _measure_start_classifier(run)
    result = _run_training(run, start_chance)
    exported, kept_step, kept_session = _export_and_choose(
        run, run.val_set, str(val_data) if val_data else "", None,
        lambda e: (top1(e.deployed, run.val_set.labels),))
    _echo_export(run, exported, kept_session)
    val = _classifier_val(run, exported, kept_step, start_chance)
    return _write_report(run, result, exported, kept_step, val,
                         {"classes": run.classes, "logits": run.session.logits})


def _train_quant_any(model_path, float_graph, ckpt, quant_cfg, train_cfg, train_data, out, val_data, preprocess,
                     quiet, echo, distill_outputs, metric=None) -> dict:
    """Label-free QAT of any model: the float model (onnxruntime) is the teacher of every chosen output's task
    (qatool.tasks), and the judge of the int8 model at the start, at checkpoints and at the end (by the user's
    `metric` when given)."""
    from .runtime.backends import eval_batch_size
    from .tasks.judge import Judge

    run = _prepare_any(model_path, float_graph, ckpt, quant_cfg, train_cfg, train_data, val_data, preprocess,
                       distill_outputs, metric, out, quiet, echo)
    _measure_start_any(run)
    result = _run_training(run)
    verify_on = run.val_set if run.val_set is not None else run.train_set
    final_judge = run.judge or Judge(run.tasks, run.float_model, run.train_set, eval_batch_size(run.train_set))
    exported, kept_step, kept_session = _export_and_choose(
        run, verify_on, str(val_data or train_data), final_judge,
        lambda e: (e.measures["int8"]["score"], e.measures["int8"]["outputs"]))
    _echo_export(run, exported, kept_session, [1, *verify_on.item_shape(int(verify_on.groups[0][0]))])
    val = _any_val(run, exported, kept_step, len(verify_on))
    return _write_report(run, result, exported, kept_step, val,
                         {"tasks": [t.to_dict() for t in run.tasks], "objective": run.objective.describe()})


# ---- train-quant's stages ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One train-quant run, as its stages fill it in: what `_prepare_*` made, then the schedule (`_schedule`) and
    the validator (`_validator`)."""

    model_path: object
    out: Path
    float_graph: object
    ckpt: object  # the checkpoint resumed, or None
    quant_cfg: object
    train_cfg: object
    session: object  # the QatSession
    objective: object
    train_set: object  # loaded training data
    val_set: object  # loaded validation data, or None
    pre: object  # the preprocessing, or None for `.npy` tensors
    batch_choice: dict | None
    skipped: int  # unreadable images left out
    quiet: bool
    echo: object
    val_data: object = None  # the validation data's path, or None
    classes: list[str] | None = None  # a classifier's
    tasks: list = field(default_factory=list)  # label-free: the output tasks, their float model and judge
    float_model: object = None
    judge: object = None
    bn_check: dict | None = None
    plan: dict = field(default_factory=dict)
    total: int = 0
    start: int = 0
    info: dict = field(default_factory=dict)  # what the checkpoints record of the run
    phases: object = None
    freeze_bn: int | None = None  # --freeze-bn-after, or the path's default (None: half the steps)
    validator: object = None
    probe_seconds: float | None = None  # where the time budget chose the length: the probe's seconds a step

    @property
    def qat_path(self) -> Path:
        return self.out / "qat.onnx"

    @property
    def int8_path(self) -> Path:
        return self.out / "model_int8.onnx"

    def save(self, step: int, arrays: dict, path=None) -> None:
        self.session.save(path or self.qat_path, self.train_cfg.to_dict(), step, arrays, self.info)


def _output_folder(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {out}: {e.strerror or e}") from e
    return out


def _float_warmup(model_path, train_data, out, val_data, train_cfg, preprocess, labels, resume, new_head, features,
                  float_steps, freeze_backbone, quiet, echo):
    """(the model QAT starts from, its --labels): with `new_head` / `float_steps`, the float warm-up's output
    OUT/float_warmup.onnx (which names its classes), else the model and labels as given."""
    if (new_head or float_steps or freeze_backbone or features) and resume is not None:
        raise UsageError("--resume continues a QAT run: the warm-up options (--new-head, --float-steps, "
                         "--freeze-backbone, --features) belong to its first run")
    if new_head or float_steps:
        from dataclasses import replace

        warm = out / "float_warmup.onnx"
        steps = float_steps if float_steps is not None else DEFAULT_HEAD_STEPS
        echo(f"float warm-up: {steps} steps of {'the new head' if new_head or freeze_backbone else 'all layers'}")
        finetune(model_path, train_data, warm, val_data=val_data,
                 train=replace(train_cfg, steps=steps, epochs=None), preprocess=preprocess, labels=labels,
                 new_head=new_head, features=features, freeze_backbone=bool(new_head or freeze_backbone),
                 quiet=quiet, echo=echo)
        return warm, None  # the warmed-up model names its classes
    if freeze_backbone or features:
        raise UsageError("--freeze-backbone and --features shape a float warm-up: give --new-head or --float-steps")
    return model_path, labels


def _qat_session(float_graph, ckpt, quant_cfg, seed):
    """The QAT session, resumed from `ckpt` or new: made before any data is read, so that a model the engine
    cannot run fails first."""
    from .train.session import QatSession

    return QatSession.from_checkpoint(ckpt, seed) if ckpt else QatSession.create(float_graph, quant_cfg, seed)


def _prepare_classifier(model_path, float_graph, ckpt, quant_cfg, train_cfg, train_data, val_data, preprocess,
                        labels, out, quiet, echo) -> _Run:
    """A labelled classifier's run: its preprocessing and logits, the QAT session, the objective (cross-entropy,
    Hinton's mix with --teacher), the images read in the model's class order, the batch and mixed precision."""
    from .data.preprocess import METADATA_KEY, resolve_preprocess
    from .tasks.heads import check_logits, folder_class_names, set_logits, store_class_names
    from .train.objective import LabelledClasses
    from .train.session import QatSession
    from .train.teacher import Teacher

    pre = resolve_preprocess(float_graph, preprocess)
    float_graph.metadata[METADATA_KEY] = pre.to_json()
    if train_cfg.logits:
        set_logits(float_graph, train_cfg.logits)
    session = _qat_session(float_graph, ckpt, quant_cfg, train_cfg.seed)
    teacher = Teacher(train_cfg.teacher) if train_cfg.teacher else None  # also before any image is read
    objective = LabelledClasses(session.logits, teacher, train_cfg.distill_temperature, train_cfg.distill_alpha)
    train_set, val_set = _open_data(train_data, val_data, folder_class_names(float_graph, train_data, labels, echo),
                                    float_graph.output_classes(), model_path)
    classes = train_set.classes
    for g in (float_graph, session.float_graph, session.model.graph):  # every output names its classes, in order
        g.metadata[METADATA_KEY] = pre.to_json()
        store_class_names(g, classes)
    train_images, val_images = _load_data(train_set, val_set, pre, echo)
    probe = session.model.forward({session.input_name: train_images.batch(np.arange(min(8, len(train_images))))[0]},
                                  outputs=[session.logits])[0]
    check_logits(probe, float_graph, session.logits)
    train_cfg, batch_choice = _resolve_batch(train_cfg, session, train_images, [session.logits], ckpt, echo)
    if ckpt is None and train_cfg.mixed_precision:  # (a resumed run's settings already hold the per-layer bits)
        quant_cfg = _mixed_precision(float_graph, train_images, quant_cfg, train_cfg.mixed_precision,
                                     train_cfg.mixed_low_bits, train_cfg.seed, echo)
        session = QatSession.create(float_graph, quant_cfg, train_cfg.seed)
    skipped = len(train_images.skipped) + (len(val_images.skipped) if val_images else 0)
    if skipped:
        echo(f"skipped {skipped} unreadable images")
    return _Run(model_path, out, float_graph, ckpt, quant_cfg, train_cfg, session, objective, train_images,
                val_images, pre, batch_choice, skipped, quiet, echo, val_data=val_data, classes=classes)


def _prepare_any(model_path, float_graph, ckpt, quant_cfg, train_cfg, train_data, val_data, preprocess,
                 distill_outputs, metric, out, quiet, echo) -> _Run:
    """A label-free run: the QAT session, the data (images or `.npy` tensors), the float model, each output's
    task and the features distilled, the objective, the batch and length, and the judge of the validation data."""
    from .data import TensorSet
    from .data.unlabelled import data_kind, load_unlabelled, unlabelled_preprocess
    from .runtime.backends import FloatModel, eval_batch_size
    from .tasks.choose import choose_output_tasks
    from .tasks.judge import Judge
    from .tasks.metric import UserMetric
    from .train.footprint import DISTILL_BATCH
    from .train.objective import Distillation, feature_tasks
    from .train.session import QatSession
    from .train.teacher import Teacher

    user_metric = UserMetric(metric) if metric else None  # a bad --metric fails before anything runs
    if user_metric is not None and val_data is None:
        raise UsageError("--metric chooses among the checkpoints measured on --val-data: give --val-data")
    pre = unlabelled_preprocess(float_graph, train_data, val_data, preprocess)
    session = _qat_session(float_graph, ckpt, quant_cfg, train_cfg.seed)
    train_set, val_set = load_unlabelled(float_graph, train_data, val_data, pre, train_cfg.pad_multiple,
                                         (preprocess or {}).get("pad_value") or 0.0)
    kind = train_set.describe() if isinstance(train_set, TensorSet) else data_kind(train_set)
    echo(f"{len(train_set)} training {kind} from {train_data} (no labels: the float model is the "
         f"teacher)" + (f"; {len(val_set)} validation from {val_data}" if val_set is not None else ""))
    float_model = FloatModel(float_graph)
    tasks = choose_output_tasks(float_graph, float_model, train_set, distill_outputs, echo,
                                map_threshold=train_cfg.map_threshold)
    if ckpt is None and train_cfg.mixed_precision:  # (a resumed run's settings already hold the per-layer bits)
        quant_cfg = _mixed_precision(float_graph, train_set, quant_cfg, train_cfg.mixed_precision,
                                     train_cfg.mixed_low_bits, train_cfg.seed, echo, labelled=False)
        session = QatSession.create(float_graph, quant_cfg, train_cfg.seed)
    features = feature_tasks(session.plan, float_graph, train_cfg.distill_features)
    for t in features:
        echo(f"feature {t.output}: {t.why}; loss: {t.loss_name}")
    objective = Distillation(tasks, Teacher(float_graph, [t.loss_tensor for t in tasks + features]), features)
    train_cfg, batch_choice = _resolve_batch(train_cfg, session, train_set, objective.tensors, ckpt, echo,
                                             limit=DISTILL_BATCH)
    train_cfg, probe_seconds = _resolve_length(train_cfg, session, train_set, objective.tensors, ckpt, echo)
    judge = Judge(tasks, float_model, val_set, eval_batch_size(val_set), user_metric) if val_set is not None \
        else None
    return _Run(model_path, out, float_graph, ckpt, quant_cfg, train_cfg, session, objective, train_set, val_set,
                pre, batch_choice, len(getattr(train_set, "skipped", [])), quiet, echo, val_data=val_data,
                tasks=tasks, float_model=float_model, judge=judge, probe_seconds=probe_seconds)


def _schedule(run: _Run, top1_float: float | None) -> None:
    """The placement's summary, the steps (the resumed one to the last) and what each checkpoint records."""
    run.plan = run.session.plan.report()
    run.echo(f"quantized {run.session.plan.summary()}")
    run.total = run.train_cfg.total_steps(len(run.train_set))
    run.start = run.ckpt.step if run.ckpt else 0
    if run.start > run.total:
        raise UsageError(f"the checkpoint is at step {run.start}, beyond --steps {run.total}")
    run.info = {"model_signature": _model_signature(run.float_graph), "top1_float": top1_float,
                "val_data": str(Path(run.val_data).resolve()) if run.val_data else None}


def _calibrated_start(run: _Run, what: str) -> bool:
    """A fresh run's activation ranges calibrated on the training data (train --init calibrate); True if so."""
    from .quant.calibrate import calibrate_session

    cfg = run.train_cfg
    if run.ckpt is not None or cfg.init != "calibrate":
        return False
    run.session, equalized = _equalized(run.session, run.train_set, cfg.seed, run.echo)
    if equalized is not None:
        run.info["equalize"] = equalized
    calibrate_session(run.session, run.train_set, cfg.init_method, cfg.init_images, seed=cfg.seed)
    run.echo(f"activation ranges calibrated ({cfg.init_method}) on {min(cfg.init_images, len(run.train_set))} "
             f"training {what}")
    gptq = _rounded(run.session, run.train_set, cfg.seed, run.echo, cfg.init_images)
    if gptq is not None:
        run.info["gptq"] = gptq
    return True


def _with_low_bit_update(train_cfg, recipe, low_bits: bool, say):
    """`train_cfg` with the recipe's settings where it leaves them unset, saying so when the recipe's low-bit
    update scale and lr are taken."""
    resolved = train_cfg.with_recipe(recipe, low_bits)
    if low_bits and train_cfg.lr is None and (resolved.update_scale, resolved.lr) == recipe.low_bit_update:
        from .quant.config import LOW_BITS

        say(f"lr {resolved.lr:g} x each weight's quantization step (--update-scale {resolved.update_scale}): the "
            f"default on this path at {LOW_BITS} bits and below (--lr alone sets an absolute lr)")
    return resolved


def _with_rounding(quant_cfg, recipe, init: str, say, mixed_low_bits: int | None = None):
    """`quant_cfg` with the recipe's low-bit weight rounding and channel equalisation where it leaves them unset
    (said when they are on). Both belong to the calibrated start: an observed start (`init` observe) rounds to
    nearest and is not equalised. `mixed_low_bits`: the bits --mixed-precision will give the less sensitive
    layers, when it will."""
    from .quant.config import LOW_BITS, cpu_lacks_vnni

    calibrated = init == "calibrate"
    resolved = quant_cfg.with_rounding(recipe.low_bit_rounding if calibrated else "nearest",
                                       recipe.low_bit_equalize and calibrated, mixed_low_bits)
    if quant_cfg.weight_rounding is None and resolved.rounding != "nearest":
        say(f"weights rounded by {resolved.rounding}: the default on this path at {LOW_BITS} bits and below "
            "(--weight-rounding nearest turns it off)")
    if resolved.reduce_range and cpu_lacks_vnni() and max([resolved.weight_bits,
                                                            *resolved.layer_weight_bits.values()]) == 8:
        say("7-bit weights (reduce range): this x86 CPU has no VNNI, and onnxruntime's u8 x s8 kernels here "
            "saturate with 8-bit weights (--no-reduce-range keeps 8 bits)")
    if quant_cfg.equalize is None and resolved.equalize:
        say(f"channels equalised before the start is calibrated: the default on this path at {LOW_BITS} bits and "
            "below (--no-equalize turns it off)")
    return resolved


def _equalized(session, calib, seed: int, say):
    """With QuantConfig.equalize: the session made again from its float model with the low-bit layers' input
    channels equalised (qatool.quant.equalize) on a seeded subset of `calib`, and the report's dict; else the
    session as it is and None."""
    from .quant.calibrate import calibration_indices
    from .quant.equalize import EQUALIZE_IMAGES, equalize
    from .train.session import QatSession

    cfg = session.config
    if not cfg.equalize:
        return session, None
    bits = {layer.node.name: cfg.weight_bits_of(layer.node.name) for layer in session.plan.layers}
    graph, report = equalize(session.float_graph, bits, cfg.activation_bits, cfg.symmetric_activations, calib,
                             calibration_indices(len(calib), EQUALIZE_IMAGES, seed), seed=seed)
    say(report.summary())
    if graph is not session.float_graph:
        session = QatSession.create(graph, cfg, seed)
    return session, report.to_dict()


def _rounded(session, calib, seed: int, say, images: int | None) -> dict | None:
    """With weight_rounding gptq: the session's weights rounded by GPTQ (qatool.quant.gptq) on a seeded subset
    of min(GPTQ_IMAGES, `images`) inputs of `calib`, said and returned as the report's dict; else None."""
    from .quant.gptq import GPTQ_IMAGES, round_session

    rounding = session.config.rounding
    if rounding == "nearest":
        return None
    n = min(GPTQ_IMAGES, images or len(calib), len(calib))
    sequential = rounding == "gptq-sequential"
    say(f"rounding the weights with GPTQ{' layer by layer' if sequential else ''} on {n} inputs ...")
    report = round_session(session, calib, n, seed=seed, sequential=sequential, progress=say)
    say(report.summary())
    for name, why in report.rounded_to_nearest:
        say(f"  {name}: rounded to nearest ({why})")
    if report.mismatches:
        say(f"  warning: {report.mismatches} weights do not fold back to GPTQ's integers")
    return report.to_dict()


def _validator(run: _Run, **judged):
    """The validator of the int8 model at checkpoints (qatool.eval.validation), continuing a resumed run's
    history, which every checkpoint records."""
    from .eval.validation import Validator

    run.validator = Validator(run.session, run.val_set, lambda path, step: run.save(step, {}, path), run.qat_path,
                              run.train_cfg.keep, list(run.ckpt.info.get("validations", [])) if run.ckpt else [],
                              retreats=list(run.ckpt.info.get("retreats", [])) if run.ckpt else [], **judged)
    run.info["validations"] = run.validator.history
    run.info["retreats"] = run.validator.retreats
    return run.validator


def _measure_start_classifier(run: _Run) -> bool:
    """Float top-1, BatchNorm's phase from evidence (qatool.train.recipe), the calibrated start and its int8
    top-1: QAT's floor. Returns whether that start is at chance while the float model is not (the run warns)."""
    from .eval.validation import start_at_chance
    from .runtime.backends import float_outputs, top1
    from .tasks.heads import check_class_order
    from .train.loop import Phases
    from .train.recipe import bn_evidence, gradient_evidence, has_batchnorm

    ckpt, cfg, quant_cfg, echo, val_images = run.ckpt, run.train_cfg, run.quant_cfg, run.echo, run.val_set
    # float accuracy before QAT: onnxruntime on the inference form of the float model
    top1_float = ckpt.info.get("top1_float") if ckpt else None
    if val_images is not None and top1_float is None:
        float_out = float_outputs(run.float_graph, val_images)
        top1_float = top1(float_out, val_images.labels)
        echo(f"float val top-1 (onnxruntime): {top1_float:.4f}")
        check_class_order(top1_float, float_out, val_images.labels, run.classes,
                          f"the validation images {run.val_data}")
    _schedule(run, top1_float)
    # BatchNormalization's phase, from evidence unless --freeze-bn-after says (qatool.train.recipe)
    bn_check = ckpt.info.get("bn_check") if ckpt else None
    if ckpt is None and quant_cfg.freeze_bn_after is None and has_batchnorm(run.float_graph):
        evidence = bn_evidence(run.float_graph, run.train_set, cfg.batch_size, cfg.seed)
        echo(evidence.summary())
        bn_check = evidence.to_dict()
    run.info["bn_check"] = run.bn_check = bn_check
    if _calibrated_start(run, "images") and bn_check and not bn_check["freeze_from_start"]:
        grad_check = gradient_evidence(run.session, run.train_set, cfg.batch_size, cfg.seed)  # the quantized start's
        echo(grad_check.summary())
        bn_check["gradient"] = grad_check.to_dict()
        bn_check["freeze_from_start"] = grad_check.freeze_from_start
    freeze_bn = quant_cfg.freeze_bn_after
    if freeze_bn is None and bn_check and bn_check["freeze_from_start"]:
        freeze_bn = 0
    run.phases = Phases.resolve(run.total, freeze_bn, quant_cfg.freeze_observers_after)

    # a safe start and a safe end: int8 accuracy before the first step and at checkpoints (qatool.eval.validation)
    start_chance = False  # the quantized start (measured now, or by the run resumed) is at chance: say so
    if val_images is not None:
        validator = _validator(run)
        if ckpt is None and cfg.init == "calibrate":
            acc = validator(0)
            echo(f"start: int8 val top-1 {acc:.4f} before any QAT step (post-training quantization, same placement)")
        start_chance = validator.start is not None and start_at_chance(validator.start, top1_float, len(run.classes))
        if start_chance and ckpt is None:
            echo(f"warning: the quantized start is at chance ({validator.start:.4f} for {len(run.classes)} classes, "
                 f"float {top1_float:.4f}): at W{quant_cfg.weight_bits}A{quant_cfg.activation_bits} this model's "
                 "signal does not survive quantization, and QAT from chance did not recover on the models measured "
                 "(five times the steps, learned step sizes, batch statistics: docs/benchmarks.md section 4); "
                 "try more bits first, activations first (--activation-bits 8)")
    echo(f"{_qat_steps(run)}; BN freezes at step {run.phases.freeze_bn_after}, observers at "
         f"{run.phases.freeze_observers_after}")
    if run.objective.teacher is not None:
        echo(run.objective.describe())
    return start_chance


def _measure_start_any(run: _Run) -> None:
    """The calibrated start, BatchNorm frozen from the start, and the start's int8 outputs against float."""
    from .tasks.judge import describe
    from .train.loop import Phases

    _schedule(run, None)
    _calibrated_start(run, "inputs")
    # the float model, in eval mode, is the target: BN's batch statistics could only move the student away
    # from it, so BN uses its running statistics throughout unless --freeze-bn-after says otherwise
    quant_cfg, cfg = run.quant_cfg, run.train_cfg
    freeze_bn = quant_cfg.freeze_bn_after if quant_cfg.freeze_bn_after is not None else 0
    run.freeze_bn = freeze_bn
    run.phases = phases = Phases.resolve(run.total, freeze_bn, quant_cfg.freeze_observers_after)
    if run.judge is not None:
        validator = _validator(run, judge=run.judge, key="score")
        if run.ckpt is None and cfg.init == "calibrate":
            validator(0)
            first = validator.history[0]
            run.echo(f"start (post-training quantization, same placement), int8 against float: "
                     f"{describe({'outputs': first['measures']})}")
    bn = "frozen from the start" if phases.freeze_bn_after == 0 else f"freezes at step {phases.freeze_bn_after}"
    run.echo(f"{_qat_steps(run)}; {run.objective.describe()}; BN {bn}, observers freeze at "
             f"{phases.freeze_observers_after}")


def _qat_steps(run: _Run) -> str:
    """The run's steps, batch, optimizer and lr, as the run announces them."""
    cfg = run.train_cfg
    per_tensor = {"tensor": " x each tensor's RMS",
                  "step": " x each weight's quantization step"}.get(cfg.update_scale, "")
    scale_lr = f" (step sizes {cfg.scale_lr})" if cfg.scale_lr is not None else ""
    return (f"QAT: steps {run.start}..{run.total}, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr}{per_tensor}"
            f"{scale_lr}")


def _run_training(run: _Run, start_chance: bool = False):
    """The QAT steps from the run's start to its last (qatool.train.loop), validating at checkpoints; returns the
    loop's result."""
    from .train.loop import TrainingDiverged, train as run_train
    from .train.retreat import Retreat

    cfg = run.train_cfg
    metrics = run.out / "metrics.jsonl"
    if run.ckpt is None:  # a fresh run in a used folder starts a fresh log
        metrics.unlink(missing_ok=True)
    retreat = None
    if cfg.retreat and run.validator is not None:
        retreat = Retreat(run.validator, run.session.model, run.validator.retreats, run.echo)
    try:
        return run_train(run.session, run.train_set, cfg, run.phases, run.start, run.total,
                         run.ckpt.arrays if run.ckpt else None, run.save, metrics, run.quiet, run.objective,
                         run.validator, cfg.validation_interval(run.total),
                         _length_reviser(run) if run.probe_seconds is not None and run.start == 0 else None,
                         retreat)
    except TrainingDiverged as e:
        if start_chance:
            raise TrainingDiverged(f"{e}; its quantized start was at chance: more bits, activations first "
                                   "(--activation-bits 8), are the likelier cure") from None
        raise


def _length_reviser(run: _Run):
    """`revise(done, seconds)` for the loop of a run whose length the time budget chose from the probe: the length
    its own first steps' time gives (qatool.train.footprint.revised_steps), with the phases and validations
    that follow from it; the run's config records it."""
    from dataclasses import replace

    from .train.footprint import revised_steps, step_cap
    from .train.loop import Phases

    def revise(done: int, seconds: float):
        revised = revised_steps(seconds, run.probe_seconds, run.total, done, step_cap(run.session.config))
        if revised is None:
            return None
        run.total, why = revised
        run.echo(why)
        run.train_cfg = replace(run.train_cfg, steps=run.total)
        run.phases = Phases.resolve(run.total, run.freeze_bn, run.quant_cfg.freeze_observers_after)
        return run.total, run.phases, run.train_cfg.validation_interval(run.total)

    return revise


def _export_and_choose(run: _Run, verify_on, source: str, judge, score):
    """Export the last step's int8 model (verified on `verify_on`) and record its `score(exported)` with the
    validator; when the kept checkpoint is an earlier one (--keep best), its int8 model replaces the last's.
    Returns (the export, the kept step, the kept session)."""
    from .eval.validation import best_path
    from .export.deploy import export_session
    from .train.checkpoint import load_checkpoint
    from .train.session import QatSession

    exported = export_session(run.session, run.int8_path, verify_on, verify=True, strict=False, data_source=source,
                              judge=judge)
    kept_step, kept_session = run.total, run.session
    if run.validator is not None:  # the export measured the last step; an earlier best replaces it
        run.validator.record(run.total, *score(exported))
        kept_step = run.validator.kept_step(run.total)
        if kept_step != run.total:
            kept_session = QatSession.from_checkpoint(load_checkpoint(best_path(run.qat_path)), run.train_cfg.seed)
            exported = export_session(kept_session, run.int8_path, verify_on, verify=True, strict=False,
                                      data_source=source, judge=judge)
    return exported, kept_step, kept_session


def _echo_export(run: _Run, exported, kept_session, input_shape=None) -> None:
    """Time the int8 model against float (on inputs of `input_shape`, default the model's) and say what fused,
    how fast it runs and what the export noted."""
    from .export.deploy import time_export
    from .export.latency import latency_lines
    from .export.verify import fusion_lines

    time_export(kept_session, exported, input_shape)
    for line in fusion_lines(exported.fusion.to_dict()) + latency_lines(exported.latency.to_dict()):
        run.echo(line)
    for note in exported.notes:
        run.echo(f"note: {note}")


def _classifier_val(run: _Run, exported, kept_step: int, start_chance: bool) -> dict:
    """The report's "val" of a classifier (top-1 of float, simulation and int8 on the validation images), and
    what it says of them."""
    from .eval.validation import FAR_BELOW_FLOAT
    from .runtime.backends import top1

    top1_float, val_images, validator, echo = run.info["top1_float"], run.val_set, run.validator, run.echo
    val = {"top1_float": top1_float, "top1_qat": None, "top1_int8": None, "agreement_top1": None}
    if val_images is None:
        return val
    keep_best, bits = run.train_cfg.keep == "best", f"W{run.quant_cfg.weight_bits}A{run.quant_cfg.activation_bits}"
    val.update(top1_qat=top1(exported.simulated, val_images.labels),
               top1_int8=top1(exported.deployed, val_images.labels),
               agreement_top1=exported.agreement.agreement_top1, images=len(val_images),
               max_diff_steps=exported.agreement.max_diff_steps, **validator.summary(),
               int8_step=kept_step, ended_below_start=validator.ended_below_start())
    val["far_below_float"] = val["top1_int8"] < top1_float - FAR_BELOW_FLOAT
    val["start_at_chance"] = start_chance
    selected = (f"; the int8 model is step {kept_step}'s, the best of {len(validator.history)} validated "
                "checkpoints, selected on these validation images" if keep_best else "")
    echo(f"val top-1: float {top1_float:.4f}, QAT simulation {val['top1_qat']:.4f}, "
         f"int8 onnxruntime {val['top1_int8']:.4f}; agreement {val['agreement_top1']:.4f}{selected}")
    if validator.ended_below_start():
        echo(f"warning: QAT ended below its start: int8 val top-1 {validator.history[-1]['top1_int8']:.4f} at "
             f"step {run.total} against {validator.start:.4f} before training (post-training quantization)"
             + (f"; model_int8.onnx is step {kept_step}'s" if keep_best else
                "; --keep best would have written the better one"))
    if val["far_below_float"]:
        echo(f"warning: the int8 model is {100 * (top1_float - val['top1_int8']):.1f} points below float on the "
             f"validation images ({val['top1_int8']:.4f} against {top1_float:.4f}): {bits} loses too much on this "
             "model; try more bits (activations first: --activation-bits 8), `qatool sensitivity` to find the "
             "layers that lose most (then --exclude them), or more steps")
    return val


def _any_val(run: _Run, exported, kept_step: int, images: int) -> dict:
    """The report's "val" of a label-free run (every output of the int8 model and of the simulation against the
    float model, on `images` inputs), and what it says of them."""
    from .tasks.judge import describe

    m, validator, echo = exported.measures, run.validator, run.echo
    echo(f"int8 (onnxruntime) against float: {describe(m['int8'])}")
    echo(f"simulation against float: {describe(m['simulation'])}; int8 against the simulation: "
         f"{describe(m['int8_vs_simulation'])}")
    val = {"top1_float": None, "top1_qat": None, "top1_int8": None, "agreement_top1": None,
           "measure": m["int8"]["score_name"], "score_int8": m["int8"]["score"],
           "score_simulation": m["simulation"]["score"], "measures": m,
           "images": images, "int8_step": kept_step}
    if validator is None:
        return val
    keep_best = run.train_cfg.keep == "best"
    val.update(**validator.summary(), ended_below_start=validator.ended_below_start())
    selected = (f"; the int8 model is step {kept_step}'s, the best of {len(validator.history)} validated "
                f"checkpoints by {val['measure']}, selected on these validation inputs" if keep_best else "")
    echo(f"{val['measure']}: int8 {val['score_int8']:.4f}, simulation {val['score_simulation']:.4f} "
         f"(start {validator.start if validator.start is not None else float('nan'):.4f}){selected}")
    if validator.ended_below_start():
        echo(f"warning: QAT ended below its start by {val['measure']}"
             + (f"; model_int8.onnx is step {kept_step}'s" if keep_best else ""))
    return val


def _write_report(run: _Run, result, exported, kept_step: int, val: dict, own: dict) -> dict:
    """report.json (schemas/train-report.schema.json): the run, `own` (a classifier's classes and logits, a
    label-free run's tasks and objective), the config, `val`, the placement, the export and the files written."""
    import json

    from .eval.validation import best_path
    from .ir.io import atomic_write_bytes, report_json

    cfg = run.train_cfg
    report = {
        "model": str(run.model_path), "steps": result.steps, "batch_size": cfg.batch_size,
        "ms_per_step": round(result.ms_per_step, 3), "final_loss": result.final_loss,
        "skipped_images": run.skipped, **own,
        "config": {"quant": run.quant_cfg.to_dict(), "train": cfg.to_dict(),
                   "preprocess": json.loads(run.pre.to_json()) if run.pre is not None else None,
                   "freeze_bn_after": run.phases.freeze_bn_after,
                   "freeze_observers_after": run.phases.freeze_observers_after, "bn_check": run.bn_check,
                   "batch": run.batch_choice},
        "val": val, "placement": run.plan, "export": exported.to_dict(),
        "outputs": {"checkpoint": str(run.qat_path), "int8_model": str(run.int8_path),
                    "metrics": str(run.out / "metrics.jsonl"),
                    **({"best_checkpoint": str(best_path(run.qat_path))} if kept_step != run.total else {})},
        "gptq": run.info.get("gptq"), "equalize": run.info.get("equalize"), "peak_rss_mb": peak_rss_mb(),
    }
    atomic_write_bytes(run.out / "report.json", report_json(report))
    memory = f" (peak memory {report['peak_rss_mb']:,.0f} MB)" if report["peak_rss_mb"] else ""
    run.echo(f"wrote {run.qat_path}, {run.int8_path}, {run.out / 'report.json'}{memory}")
    return report


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return round(peak / (1024**2 if sys.platform == "darwin" else 1024), 1)


# ---- finetune ---------------------------------------------------------------------------------------------------
DEFAULT_HEAD_STEPS = 100  # train-quant --new-head: float steps of the new head before QAT


FINETUNE_KEY = "qatool.finetune"  # a finetune output's run: step, total steps, head and trained parameters


def finetune(model_path, train_data, output, val_data=None, train=None, preprocess=None, labels=None,
             new_head: bool = False, features: str | None = None, freeze_backbone: bool = False,
             trainable: list[str] | None = None, resume=None, quiet: bool = False, echo=print) -> dict:
    """Float training of a model (transfer learning with `new_head`: a fresh classifier for the data's classes;
    with `freeze_backbone` only it, or `trainable`, trains). Writes `output` (a for-training model that
    train-quant takes as it is) with its optimiser state beside it (OUTPUT.state.npz), OUTPUT's .metrics.jsonl
    and .report.json, and with a new head its .labels.txt; returns the report. `resume`: a finetune output to
    continue from (its head, frozen parameters and step; give the same steps). See qatool.train.transfer.

    The stages: check the options (`_check_finetune_options`), open the model or the run resumed
    (`_finetune_graph`), load the data (`_finetune_data`), build the float session with its head and trained
    parameters (`_finetune_session`), train, report (`_finetune_report`)."""
    import json

    from .runtime.backends import engine_logits, top1
    from .train.checkpoint import _save_npz_atomic, state_path
    from .ir.io import save_graph
    from .train.config import CLASSIFIER_RECIPE, TrainConfig
    from .train.loop import Phases, train as run_train

    out = Path(output)
    _check_finetune_options(model_path, out, new_head, features, freeze_backbone, trainable)
    train_cfg = (train or TrainConfig()).with_recipe(CLASSIFIER_RECIPE)
    graph, run_info = _finetune_graph(model_path, resume)
    if run_info:  # the head, its features and what trains are in the file already
        new_head, features, labels = False, run_info["features"], None
        freeze_backbone, trainable = run_info["frozen_backbone"], run_info["trainable"]
    classes, train_images, val_images = _finetune_data(graph, model_path, train_data, val_data, preprocess,
                                                       labels, new_head, echo)
    session, chosen, features = _finetune_session(graph, train_images, classes, new_head, features,
                                                  freeze_backbone, trainable, train_cfg.seed, echo)
    train_cfg, _ = _resolve_batch(train_cfg, session, train_images, [session.logits], None, echo)

    def val_top1() -> float | None:
        if val_images is None:
            return None
        return top1(engine_logits(session.model, val_images, session.logits), val_images.labels)

    start_top1 = val_top1()
    if start_top1 is not None:
        echo(f"float val top-1 before training: {start_top1:.4f}")
    total = train_cfg.total_steps(len(train_images))
    phases = Phases(total, total)  # float training: BN learns from batch statistics throughout, no observers
    metrics = out.with_suffix(".metrics.jsonl")
    start, optim_state = 0, None
    if resume is not None:
        start = int(run_info["step"])
        if run_info["total"] != total:
            raise UsageError(f"--resume: the run was for {run_info['total']} steps, not {total}: give the same "
                             "--steps (the learning-rate schedule spans the whole run)")
        state_file = state_path(resume)
        optim_state = dict(np.load(state_file)) if state_file.exists() else None
        echo(f"resuming at step {start} of {total}")
    else:
        metrics.unlink(missing_ok=True)
    info = {"features": features, "new_head": bool(new_head or run_info.get("new_head")),
            "frozen_backbone": bool(freeze_backbone), "trainable": chosen or None, "total": total,
            "classes": classes}

    def save(step: int, arrays: dict) -> None:
        g = session.trained_graph()
        g.metadata[FINETUNE_KEY] = json.dumps({**info, "step": step})
        _save_npz_atomic(state_path(out), arrays)
        save_graph(g, out)  # atomic: a partial model is never left behind

    echo(f"training {'the head' if freeze_backbone else 'all layers'} in float: {total} steps, batch "
         f"{train_cfg.batch_size}, {train_cfg.optimizer} lr {train_cfg.lr}")
    result = run_train(session, train_images, train_cfg, phases, start, total, optim_state, save, metrics, quiet)
    final_top1 = val_top1()
    report = _finetune_report(model_path, out, info, result, train_cfg, start_top1, final_top1,
                              len(val_images) if val_images is not None else 0)
    if final_top1 is not None:
        echo(f"float val top-1: {final_top1:.4f} (start {start_top1:.4f}); {result.ms_per_step:.0f} ms/step")
    echo(f"wrote {out} (a for-training model: train-quant takes it as it is)")
    return report


def _check_finetune_options(model_path, out: Path, new_head, features, freeze_backbone, trainable) -> None:
    _refuse_overwrite(model_path, out)
    if freeze_backbone and not (new_head or trainable):
        raise UsageError("--freeze-backbone trains only the new head or the --trainable parameters: give --new-head "
                         "or --trainable")
    if features and not new_head:
        raise UsageError("--features chooses where the new head goes: it needs --new-head")


def _finetune_graph(model_path, resume):
    """(the for-training graph, the resumed run's record or {}): `resume` is a finetune output, which carries
    its head, trained parameters and step in FINETUNE_KEY."""
    import json

    if resume is None:
        return normalize_proto(load_proto(model_path), for_training=True).graph, {}
    graph = normalize_proto(load_proto(resume), for_training=True).graph
    if FINETUNE_KEY not in graph.metadata:
        raise UsageError(f"--resume {resume} is not a finetune output (no {FINETUNE_KEY} metadata)")
    return graph, json.loads(graph.metadata[FINETUNE_KEY])


def _finetune_data(graph, model_path, train_data, val_data, preprocess, labels, new_head, echo):
    """(class names, training images, validation images or None), with the preprocessing stored in `graph`. A
    new head takes the data's classes (or `labels`'); otherwise they must match the model's outputs."""
    from .data.preprocess import METADATA_KEY, resolve_preprocess
    from .tasks.heads import folder_class_names

    pre = resolve_preprocess(graph, preprocess)
    graph.metadata[METADATA_KEY] = pre.to_json()
    names = None if new_head else folder_class_names(graph, train_data, labels, echo)
    if new_head and labels:
        names = [ln.strip() for ln in Path(labels).read_text().splitlines() if ln.strip()]
    train_set, val_set = _open_data(train_data, val_data, names, None if new_head else graph.output_classes(),
                                    model_path)
    if train_set.num_classes < 2:
        raise DataError(f"{train_set.source} has {train_set.num_classes} class: a classifier needs at least two")
    train_images, val_images = _load_data(train_set, val_set, pre, echo)
    return train_set.classes, train_images, val_images


def _finetune_session(graph, train_images, classes, new_head, features, freeze_backbone, trainable, seed, echo):
    """(the FloatSession, the names of the parameters that train when not all do, the new head's features):
    with `new_head` a fresh Gemm for `classes` replaces the classifier at `features` (found when not given);
    otherwise the class names are stored in the model."""
    from .tasks.heads import check_logits, store_class_names
    from .train.transfer import FloatSession, feature_shape, find_features, replace_head, trainable_names

    sample = train_images.batch(np.arange(min(2, len(train_images))))[0]
    head: list[str] = []
    if new_head:
        features = features or find_features(graph)
        shape = feature_shape(graph, features, sample)
        head = replace_head(graph, features, int(np.prod(shape[1:])), classes, seed)
        echo(f"new head: {features} {tuple(shape[1:])} -> Gemm {int(np.prod(shape[1:]))} x {len(classes)} "
             f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
    else:
        store_class_names(graph, classes)
    chosen = trainable_names(graph, trainable) if trainable else head
    if freeze_backbone:
        session = FloatSession.frozen(graph, chosen, seed)
        echo(f"frozen backbone: {len(chosen)} parameter tensors train "
             f"({sum(graph.initializers[k].size for k in chosen):,} values); the rest runs in eval mode")
    else:
        session = FloatSession.full(graph, seed)
    check_logits(session.model.forward({session.input_name: sample}, outputs=[session.logits])[0], graph,
                 session.logits)
    return session, chosen, features


def _finetune_report(model_path, out: Path, info: dict, result, train_cfg, start_top1, final_top1,
                     val_count: int) -> dict:
    """Writes OUTPUT's .report.json (and with a new head its .labels.txt) and returns the report."""
    import json

    from .ir.io import atomic_write_bytes

    report = {"model": str(model_path), "output": str(out), "classes": info["classes"], "new_head": info["new_head"],
              "features": info["features"], "frozen_backbone": info["frozen_backbone"],
              "trainable": info["trainable"], "steps": result.steps, "ms_per_step": result.ms_per_step,
              "final_loss": result.final_loss,
              "val": {"top1_float_start": start_top1, "top1_float": final_top1, "images": val_count},
              "config": {"train": train_cfg.to_dict()}, "peak_rss_mb": peak_rss_mb()}
    atomic_write_bytes(out.with_suffix(".report.json"), json.dumps(report, indent=2).encode())
    if info["new_head"]:
        atomic_write_bytes(out.with_suffix(".labels.txt"), ("\n".join(info["classes"]) + "\n").encode())
    return report


# ---- export-int8 ------------------------------------------------------------------------------------------------
def export_int8(qat_path, output_path, calib_data=None, verify: bool = True, preprocess=None,
                int4: bool = True) -> dict:
    """The int8 model of a QAT checkpoint; verified on onnxruntime unless `verify` is False (see
    `qatool.export.deploy`). The verification batch comes from `calib_data`, else the validation data the
    checkpoint recorded, else random inputs; data without labels (or a model that is not a classifier) is
    judged against the float model by what each output is for. `int4=False` keeps weights of 4 bits or fewer
    one per byte (an opset-13 file for onnxruntime older than 1.20)."""
    from .data.images import ImageDataset
    from .data.preprocess import resolve_preprocess
    from .export.deploy import export_session, time_export
    from .runtime.backends import eval_batch_size, top1
    from .tasks.judge import Judge
    from .data.unlabelled import load_unlabelled, unlabelled_preprocess
    from .runtime.backends import FloatModel
    from .tasks.choose import choose_output_tasks, is_labelled_classifier
    from .train.checkpoint import load_checkpoint
    from .tasks.heads import folder_class_names
    from .train.session import QatSession

    _refuse_overwrite(qat_path, output_path)
    ckpt = load_checkpoint(qat_path)
    session = QatSession.from_checkpoint(ckpt)
    data, source, judge, shape = None, "", None, None
    if verify:
        source = calib_data or ckpt.info.get("val_data")
        if source and not Path(source).exists() and not calib_data:
            source = None  # the recorded folder is gone: fall back to random inputs
        if source and is_labelled_classifier(ckpt.float_graph, source):
            pre = resolve_preprocess(ckpt.float_graph, preprocess)
            dataset = ImageDataset.open(source, folder_class_names(ckpt.float_graph, source))
            data = dataset.load(pre)
        elif source:  # any model, data without labels: judged against the float model, output by output
            data, _ = load_unlabelled(ckpt.float_graph, source, None,
                                      unlabelled_preprocess(ckpt.float_graph, source, None, preprocess))
            float_model = FloatModel(ckpt.float_graph)
            judge = Judge(choose_output_tasks(ckpt.float_graph, float_model, data, echo=lambda s: None),
                          float_model, data, eval_batch_size(data))
            shape = [1, *data.item_shape(int(data.groups[0][0]))]
    result = export_session(session, output_path, data, verify=verify, strict=True, data_source=str(source or ""),
                            int4=int4, judge=judge)
    if verify:
        time_export(session, result, shape)
    report = result.to_dict()
    placement = session.plan.report()
    report["float_nodes"], report["dynamic_recurrent"] = placement["float_nodes"], placement["dynamic_recurrent"]
    if data is not None and data.labels is not None:
        report["top1_qat"] = top1(result.simulated, data.labels)
        report["top1_int8"] = top1(result.deployed, data.labels)
    return report


# ---- calibrate ---------------------------------------------------------------------------------------------------
def calibrate(model_path, data, output, method: str | None = None, quant=None,
              images: int | None = CALIBRATION_IMAGES, preprocess: dict | None = None, verify: bool = True,
              val_data=None, percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS,
              seed: int = 0, echo=None, labels=None, mixed_precision: str | None = None,
              mixed_low_bits: int = 4) -> dict:
    """Post-training quantization of a float ONNX model through the same int8 export as train-quant.
    `labels`: a file of class names in output order (default: the model's own, else sorted folder names); a
    float model at chance whose predictions fit another class order stops the run (as in train-quant).
    `mixed_precision`: a weight-size budget (as train-quant's --mixed-precision): the layers' sensitivity at
    `mixed_low_bits`, measured on `data`, decides which keep the weight bits of `quant` within it.

    Calibrates on `images` images of `data` (image folder or list file; a seeded random subset), writes the
    int8 model to `output` atomically and, if `verify`, checks on onnxruntime which quantized nodes fuse into
    integer kernels (report["export"]["fusion"]) and compares simulation and onnxruntime on `val_data`
    (default: `data`). Top-1 of the float model, the simulation and the int8 model are reported when the
    data's labels fit the model's outputs. `method` None: the recipe's, as train-quant calibrates its start
    (minmax for a classifier with labels, average without). Returns the report dict.
    """
    from .quant.calibrate import METHODS
    from .quant.config import QuantConfig
    from .quant.mixed import check_size
    from .tasks.choose import is_labelled_classifier
    from .train.config import CLASSIFIER_RECIPE, DISTILL_RECIPE

    say = echo or (lambda s: None)
    _refuse_overwrite(model_path, output)
    if method is not None and method not in METHODS:
        raise UsageError(f"the calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    quant = quant or QuantConfig()
    mixed, mixed_low = None, None
    if mixed_precision is not None:
        check_size(mixed_precision)
        mixed, mixed_low = (mixed_precision, mixed_low_bits), mixed_low_bits
    float_graph = normalize_proto(load_proto(model_path), for_training=True, free_batch=True).graph
    if not is_labelled_classifier(float_graph, data):
        return _calibrate_any(model_path, float_graph, data, output, method or DISTILL_RECIPE.init_method,
                              _with_rounding(quant, DISTILL_RECIPE, "calibrate", say, mixed_low),
                              images, preprocess, verify, val_data, percentile, bins, seed, say, mixed)
    return _calibrate_classifier(model_path, float_graph, data, output, method or CLASSIFIER_RECIPE.init_method,
                                 _with_rounding(quant, CLASSIFIER_RECIPE, "calibrate", say, mixed_low),
                                 images, preprocess, verify, val_data, percentile, bins, seed, say, labels, mixed)


def _calibrate_classifier(model_path, float_graph, data, output, method, quant, images, preprocess, verify,
                          val_data, percentile, bins, seed, say, labels, mixed: tuple[str, int] | None) -> dict:
    """`calibrate` of a classifier whose data has labels (class folders or a list file): top-1 of the float
    model, the simulation and the int8 model on `val_data` (default `data`) when the labels fit the outputs."""
    from .data.images import ImageDataset
    from .data.preprocess import METADATA_KEY, resolve_preprocess
    from .runtime.backends import float_outputs, top1
    from .tasks.heads import check_class_order, folder_class_names, store_class_names
    from .train.session import QatSession

    pre = resolve_preprocess(float_graph, preprocess)
    float_graph.metadata[METADATA_KEY] = pre.to_json()
    session = QatSession.create(float_graph, quant)  # a model the engine cannot run fails before any image is read

    class_names = folder_class_names(float_graph, data, labels, echo=say)
    calib_set = ImageDataset.open(data, class_names)
    calib_images = calib_set.load(pre)
    if mixed:
        quant = _mixed_precision(float_graph, calib_images, quant, *mixed, seed, say)
        session = QatSession.create(float_graph, quant)
    eval_images, eval_set = calib_images, calib_set
    if val_data is not None:
        eval_set = ImageDataset.open(val_data, class_names or calib_set.classes)
        eval_images = eval_set.load(pre)
    skipped = len(calib_images.skipped) + (len(eval_images.skipped) if val_data is not None else 0)
    if skipped:
        say(f"skipped {skipped} unreadable images")
    session, n_calib, plan, ranges, start = _calibrated(session, calib_images, method, images, percentile, bins,
                                                        seed, f"images of {data}", say)
    store_class_names(session.model.graph, calib_set.classes)  # the int8 model names its classes
    _echo_clipped(ranges, method, say)

    labelled = eval_set.labels_fit(float_graph.output_classes()) and len(float_graph.outputs[0].shape or [0, 0]) == 2
    top1_float = None
    if verify and labelled:
        out = float_outputs(float_graph, eval_images)
        top1_float = top1(out, eval_images.labels)
        check_class_order(top1_float, out, eval_images.labels, eval_set.classes, f"the images {val_data or data}")
    # like train-quant, not export-int8: nodes that do not fuse are reported (report["export"]["fusion"]), not
    # fatal — with --symmetric-activations no Conv+Relu can fuse (the Relu is not redundant on a signed grid)
    exported = _export_calibrated(session, output, eval_images, verify, str(val_data or data), None, None)
    report = _calibration_report(model_path, data, val_data, method, n_calib, percentile, bins, quant, pre, plan,
                                 ranges, exported, start, eval_images, verify)
    report["top1_float"] = top1_float
    if verify:
        report["agreement_top1"] = exported.agreement.agreement_top1
        if labelled:
            report["top1_sim"] = top1(exported.simulated, eval_images.labels)
            report["top1_int8"] = top1(exported.deployed, eval_images.labels)
    return report


def _echo_clipped(ranges, method: str, say) -> None:
    """How many ranges a clipping method narrowed, and a note for each that keeps little of what it saw."""
    from .quant.calibrate import HEAVY_CLIP

    if method == "minmax":
        return
    say(f"{sum(r.clipped for r in ranges.values())} of {len(ranges)} ranges clipped inside the observed min/max")
    for t, r in ranges.items():
        kept = r.kept_fraction()
        if kept < HEAVY_CLIP:
            say(f"  note: {t} keeps {100 * kept:.0f}% of its observed range [{r.min:.4g}, {r.max:.4g}] "
                f"-> [{r.lo:.4g}, {r.hi:.4g}]")


def _calibrate_any(model_path, float_graph, data, output, method, quant, images, preprocess, verify, val_data,
                   percentile, bins, seed, say, mixed: tuple[str, int] | None = None) -> dict:
    """`calibrate` of any model on data without labels: the int8 model is judged against the float model by
    what each output is for (qatool.tasks), on `val_data` (default `data`); `mixed` (size budget, low bits):
    mixed precision by the layers' sensitivity against the float model's outputs on `data`."""
    from .data.unlabelled import data_kind, load_unlabelled, unlabelled_preprocess
    from .runtime.backends import FloatModel, eval_batch_size
    from .tasks.choose import choose_output_tasks
    from .tasks.judge import Judge
    from .train.session import QatSession

    pre = unlabelled_preprocess(float_graph, data, val_data, preprocess)
    session = QatSession.create(float_graph, quant)  # a model the engine cannot run fails before any image is read
    calib, held = load_unlabelled(float_graph, data, val_data, pre)
    if mixed:
        quant = _mixed_precision(float_graph, calib, quant, *mixed, seed, say, labelled=False)
        session = QatSession.create(float_graph, quant)
    evaluated = held if held is not None else calib
    judge = None
    if verify:
        float_model = FloatModel(float_graph)
        tasks = choose_output_tasks(float_graph, float_model, calib, echo=say)
        judge = Judge(tasks, float_model, evaluated, eval_batch_size(evaluated))
    session, n_calib, plan, ranges, start = _calibrated(session, calib, method, images, percentile, bins, seed,
                                                        f"{data_kind(calib)} of {data} (no labels)", say)
    shape = [1, *evaluated.item_shape(int(evaluated.groups[0][0]))] if verify else None
    exported = _export_calibrated(session, output, evaluated, verify, str(val_data or data), judge, shape)
    return _calibration_report(model_path, data, val_data, method, n_calib, percentile, bins, quant, pre, plan,
                               ranges, exported, {"tasks": [t.to_dict() for t in judge.tasks] if judge else None,
                                                  **start},
                               evaluated, verify)


def _calibrated(session, calib, method, images, percentile, bins, seed, what: str, say):
    """Equalise the session's low-bit layers if the config says so (a new session), calibrate its activation
    ranges on (a seeded subset of `images` of) `calib`, saying what is quantized and on what (`what`), then round
    its weights by GPTQ if the config says so. Returns (the session, images calibrated on, the placement's
    report, the ranges, {"gptq": GPTQ's report or None, "equalize": the equalisation's or None})."""
    from .quant.calibrate import calibrate_session

    n_calib = min(len(calib), images) if images else len(calib)
    plan = session.plan.report()
    say(f"quantizing {session.plan.summary()}")
    session, equalized = _equalized(session, calib, seed, say)
    say(f"calibrating ({method}) on {n_calib} {what}")
    ranges = calibrate_session(session, calib, method, images, percentile, bins, seed=seed)
    return session, n_calib, plan, ranges, {"gptq": _rounded(session, calib, seed, say, images),
                                            "equalize": equalized}


def _export_calibrated(session, output, evaluated, verify: bool, source: str, judge, input_shape):
    """The int8 model written to `output`; with `verify`, checked on `evaluated` (fusion and agreement, by `judge`
    for any model) and timed against float on inputs of `input_shape` (default the model's)."""
    from .export.deploy import export_session, time_export

    exported = export_session(session, output, evaluated if verify else None, verify=verify, strict=False,
                              data_source=source if verify else "", judge=judge)
    if verify:
        time_export(session, exported, input_shape)
    return exported


def _calibration_report(model_path, data, val_data, method, n_calib, percentile, bins, quant, pre, plan, ranges,
                        exported, own: dict, evaluated, verify: bool) -> dict:
    """The calibrate report (`own`: a label-free run's tasks), its top-1 and agreement fields left empty."""
    import json

    return {
        "model": str(model_path), "data": str(data), "val_data": str(val_data) if val_data is not None else None,
        "method": method, "calibration_images": n_calib,
        "percentile": float(percentile) if method == "percentile" else None,
        "bins": bins if method != "minmax" else None, "quant": quant.to_dict(),
        "preprocess": json.loads(pre.to_json()) if pre is not None else None, "placement": plan,
        "ranges": {t: r.to_dict() for t, r in ranges.items()},
        "clipped_ranges": sum(r.clipped for r in ranges.values()), "export": exported.to_dict(),
        "size_bytes": exported.size_bytes, **own,
        "top1_float": None, "top1_sim": None, "top1_int8": None, "agreement_top1": None,
        "images": len(evaluated) if verify else None,
    }


# ---- sensitivity ------------------------------------------------------------------------------------------------
def sensitivity(model_path, data, quant=None, images: int | None = SENSITIVITY_IMAGES,
                calibration_images: int | None = SENSITIVITY_CALIBRATION_IMAGES, preprocess: dict | None = None,
                json_path=None, seed: int = 0, echo=None) -> dict:
    """`qatool sensitivity`: per-layer sensitivity of a float ONNX model on an image folder or list file.

    Returns the report (schemas/sensitivity.schema.json) and writes it atomically to `json_path` when given.
    `preprocess`: size/color/mean/std overrides of the model's metadata.
    """
    import json

    from . import __version__
    from .data.images import ImageDataset
    from .data.preprocess import resolve_preprocess
    from .data.unlabelled import load_unlabelled, unlabelled_preprocess
    from .ir.io import atomic_write_bytes
    from .quant.sensitivity import layer_sensitivity
    from .tasks.choose import is_labelled_classifier

    if json_path is not None and Path(json_path).resolve() == Path(model_path).resolve():
        raise UsageError(f"--json {json_path} is the model; choose another file for the report")
    float_graph = normalize_proto(load_proto(model_path), for_training=True, free_batch=True).graph
    if is_labelled_classifier(float_graph, data):
        dataset = ImageDataset.open(data)
        loaded = dataset.load(resolve_preprocess(float_graph, preprocess))
        labelled = dataset.labels_fit(float_graph.output_classes())
    else:
        loaded, _ = load_unlabelled(float_graph, data, None, unlabelled_preprocess(float_graph, data, None,
                                                                                   preprocess))
        labelled = False
    if not labelled and echo:
        echo(f"{data} has no labels of the model's classes: SQNR only")
    body = layer_sensitivity(float_graph, loaded, quant, images, calibration_images, labelled, seed, echo)
    report = {"qatool_version": __version__, "model": str(model_path), "data": str(data), **body}
    if json_path is not None:
        atomic_write_bytes(json_path, (json.dumps(report, indent=2) + "\n").encode())
    return report


# ---- eval -------------------------------------------------------------------------------------------------------
def evaluate(models, data, **options) -> dict:
    """Side-by-side accuracy, agreement, size and latency (see `qatool.eval.evaluate.evaluate`)."""
    from .eval.evaluate import evaluate as _evaluate

    return _evaluate(models, data, **options)
