"""Typed training settings, and the config file (YAML or JSON) that can hold them and the quantization ones."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError
from ..quant.calibrate import METHODS as CALIBRATION_METHODS
from ..quant.config import QuantConfig
from .optim import OPTIMIZERS, SCHEDULES

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "qat-config.schema.json"
DEFAULT_STEPS = 200


class Recipe(NamedTuple):
    """What a run takes by default where its config leaves it unset: the optimizer, its lr, how the start's
    activation ranges are calibrated (`qatool.quant.calibrate.METHODS`), and whether it retreats."""

    optimizer: str | None
    lr: float | None
    init_method: str | None = None
    retreat: bool | None = None  # qatool.train.retreat: back to the best state, lr x0.1, below the start
    update_scale: str = "absolute"  # UPDATE_SCALES: a step of lr, of lr x each tensor's RMS, or x its quantization step
    # the calibrated start's weight rounding at quant.config.LOW_BITS bits and below (QuantConfig.with_rounding)
    low_bit_rounding: str = "nearest"
    # ... and whether the float model's channels are equalised first (QuantConfig.equalize, qatool.quant.equalize)
    low_bit_equalize: bool = False
    # ... and the (update scale, lr) a run at those bits takes where its config sets neither (`with_recipe`)
    low_bit_update: tuple[str, float] | None = None


# A classifier trained with labels: SGD (momentum 0.9) at 1e-3 from min/max ranges (docs/benchmarks.md sections 2
# and 4). Without labels, reproducing the float model: Adam — on PP-OCRv4's recogniser SGD 1e-3 fell to 14 % of
# the lines float reads (SGD 1e-4: 43 %); with its logits kept float (the output tail) and the default 800 steps
# (qatool.train.footprint.DISTILL_STEPS) at batch <= 8, Adam 1e-4 read 92.67 / 93.67 / 92.33 % of the test lines
# where 3e-5 read 93.00 / 90.67 / 89.00 (session 14). Its start is calibrated by `average` (the mean of 32-image
# ranges): as post-training quantization it read 83.3 % of rec's test lines where min/max read 74.3 %, layout F1
# 0.618 where min/max gave 0.288. It retreats when a validation falls below the start (qatool.train.retreat): on
# ddddocr's CNN+LSTM recogniser Adam 1e-4 took the int8 model far below it. With both, and keep-best's
# standard-error margin, rec reads 95.00 / 94.67 / 96.00 % (float 93.67 %; docs/benchmarks.md section 8, session
# 15). At 4-bit weights and below its start is rounded by GPTQ (qatool.quant.gptq): post-training W4A8 it read
# 62.3 % of rec's test lines where rounding to nearest read 0 %, ddddocr's recogniser 88.7 % (nearest 86.6 %), its
# YOLOX detector F1 0.916 (0.860), det hmean 0.998 (0.988) (session 17); QAT from it read 88.8 % on the recogniser
# where QAT from nearest read 86.9 % (session 18). Classifiers keep min/max, no retreat and nearest: their
# benchmark rows were measured so.
# At 4-bit weights and below, without labels, each quantized weight's Adam step is 5e-3 of its quantization step
# (`update_scale` step): a 4-bit step is 16 times an 8-bit one, and PP-OCRv4 rec's weights are ~7 times the other
# benchmark models', so one absolute lr cannot fit them all. On rec at W4A8, seed 1, it read 93.33 % of the test
# lines where Adam 1e-4 read 87.67 % (float 93.67 %; session 21); on the other models 5e-3 of their median 4-bit
# step is 1-3e-4, about the absolute default, but a tensor's step can be 24 times the median: ddddocr's recogniser
# read 88.67 / 87.40 / 88.87 % (mean 88.31; float 89.80) where Adam 1e-4 read 88.80 / 89.27 / 88.87 (sessions 18-23);
# the layout detector F1 0.9189 / 0.9171 / 0.8976 (mean 0.9112) where Adam 1e-4 read 0.9020 on seed 0 (float
# 0.9029; sessions 24-25), the YOLOX detector 0.9199 / 0.9233 / 0.9186 (mean 0.9206) where Adam 1e-4 read
# 0.9215 / 0.9152 / 0.9168 (float 0.9173; sessions 24-25).
CLASSIFIER_RECIPE = Recipe("sgd", 1e-3, "minmax", False)
DISTILL_RECIPE = Recipe("adam", 1e-4, "average", True, low_bit_rounding="gptq", low_bit_update=("step", 5e-3))
# absolute: every parameter's step is about lr (Adam) or lr times its gradient (SGD); tensor: each parameter
# tensor's lr is also multiplied by that tensor's RMS at the start of the run, so one step moves every tensor by
# about the same fraction of its size, whatever the size; step: each quantized weight's lr is multiplied by its
# quantization step at the start (the median over its channels; other parameters take the median of those), so lr
# is the fraction of a step one update moves a weight by, at any bit width and weight size
UPDATE_SCALES = ("absolute", "tensor", "step")


@dataclass
class TrainConfig:
    steps: int | None = None  # default: `epochs` if given, else DEFAULT_STEPS (label-free: footprint.distill_steps)
    epochs: float | None = None
    batch_size: int | None = None  # None: the largest that fits the step's memory budget, at most 64 (footprint)
    optimizer: str | None = None  # None: the recipe's (CLASSIFIER_RECIPE with labels, DISTILL_RECIPE without)
    lr: float | None = None
    scale_lr: float | None = None  # lr of the LSQ step sizes (same optimizer and schedule); None: lr
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # lr falls to 0 by the last step: at 2 bits a constant lr makes the last step a lottery
    warmup_steps: int = 0
    step_size: int | None = None
    step_gamma: float = 0.1
    seed: int = 0
    augment: bool = False
    save_every: int | None = None
    teacher: str | None = None  # a float ONNX model: distillation QAT
    distill_temperature: float = 4.0
    distill_alpha: float = 0.5
    init: str = "calibrate"  # activation ranges from post-training calibration (the measured start); "observe"
    init_method: str | None = None  # None: the recipe's (minmax for a classifier with labels, else average)
    retreat: bool | None = None  # None: the recipe's (off for a classifier with labels, on without)
    update_scale: str | None = None  # UPDATE_SCALES; None: the recipe's (absolute)
    init_images: int = 512
    mixed_precision: str | None = None  # a weight-size budget: per-layer bits from the layers' sensitivity
    mixed_low_bits: int = 4
    keep: str = "best"  # the int8 model: the best validated checkpoint (start included), or "last"
    validate_every: int | None = None  # steps between int8 validations; None: a quarter of the run
    logits: str | None = None  # the logits tensor, when the output is probabilities no Softmax produces
    map_threshold: float = 0.3  # without labels: a probability map's IoU with float's, both thresholded here
    distill_features: str = "none"  # without labels: also distil intermediate tensors ("tail-inputs")
    # .npy folders: a free height / width padded up to a multiple of this (1: every size as it is). Not the
    # default: on PP-OCRv4 rec, 32 read 90.3 % of the test lines (seed 0, 35 min) where sizes kept apart read 92.3 %
    # (8-13 min): the padded lines are not what the model's pipeline feeds it one line at a time
    pad_multiple: int = 1

    def __post_init__(self):
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.scale_lr is not None and not self.scale_lr > 0:
            raise ConfigError(f"scale_lr must be > 0, got {self.scale_lr}")
        if self.init not in ("observe", "calibrate"):
            raise ConfigError(f"init must be observe or calibrate, got {self.init!r}")
        if self.init_method is not None and self.init_method not in CALIBRATION_METHODS:
            raise ConfigError(f"init_method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.init_method!r}")
        if self.update_scale is not None and self.update_scale not in UPDATE_SCALES:
            raise ConfigError(f"update_scale must be one of {', '.join(UPDATE_SCALES)}, got {self.update_scale!r}")
        if self.mixed_precision is not None:
            from ..quant.mixed import check_size

            check_size(self.mixed_precision)
        if self.keep not in ("best", "last"):
            raise ConfigError(f"keep must be best or last, got {self.keep!r}")
        if self.validate_every is not None and self.validate_every < 1:
            raise ConfigError(f"validate_every must be >= 1, got {self.validate_every}")
        if not 0.0 < self.map_threshold < 1.0:
            raise ConfigError(f"map_threshold must be in (0, 1), got {self.map_threshold}")
        if self.distill_features not in ("none", "tail-inputs"):
            raise ConfigError(f"distill_features must be none or tail-inputs, got {self.distill_features!r}")
        if self.pad_multiple < 1:
            raise ConfigError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")

    def with_recipe(self, recipe: Recipe, low_bits: bool = False) -> TrainConfig:
        """This config with the recipe's optimizer, lr, calibration method, retreat and update scale where it leaves
        them unset. With `low_bits` (weights of LOW_BITS or fewer) the recipe's `low_bit_update` is the update
        scale and lr where the config sets neither; an lr given alone is absolute, and an update scale given alone
        takes the lr the recipe has for it (`low_bit_update`'s for its scale, at any bits)."""
        from dataclasses import replace

        low = recipe.low_bit_update
        scale = self.update_scale or (low[0] if low and low_bits and self.lr is None else recipe.update_scale)
        lr = self.lr if self.lr is not None else low[1] if low and scale == low[0] else recipe.lr
        return replace(self, optimizer=self.optimizer or recipe.optimizer, lr=lr,
                       init_method=self.init_method or recipe.init_method,
                       retreat=self.retreat if self.retreat is not None else recipe.retreat,
                       update_scale=scale)

    def total_steps(self, n_images: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, round(self.epochs * n_images / self.batch_size))
        return DEFAULT_STEPS

    def validation_interval(self, total: int) -> int:
        return self.validate_every or max(1, total // 4)

    def to_dict(self) -> dict:
        return asdict(self)


PREPROCESS_KEYS = ("size", "color", "mean", "std", "resize", "pad_value")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file and validate it against schemas/qat-config.schema.json."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not text") from e
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"config file {p} does not parse: {str(e).splitlines()[0]}") from e
    if data is None:
        data = {}
    validate_config(data, str(p))
    return data


def validate_config(data, where: str = "config") -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "/".join(str(x) for x in e.absolute_path) or "(top level)"
        raise ConfigError(f"{where}: key {path}: {e.message}")


def _as_integers(data: dict) -> dict:
    """Integral floats (JSON's 3.0) as ints where the schema asks for integers: JSON Schema counts 3.0 as an
    integer, and the typed settings take Python ints."""
    props = json.loads(SCHEMA_PATH.read_text()).get("properties", {})

    def integer(spec: dict) -> bool:
        t = spec.get("type")
        return t == "integer" or (isinstance(t, list) and "integer" in t)

    def fix(v, spec: dict):
        if isinstance(v, float) and v.is_integer() and integer(spec):
            return int(v)
        if isinstance(v, list) and isinstance(spec.get("items"), dict):
            return [fix(x, spec["items"]) for x in v]
        return v

    return {k: fix(v, props.get(k, {})) for k, v in data.items()}


def split_config(data: dict) -> tuple[dict, dict, dict]:
    """(quantization, training, preprocessing) settings from one flat config mapping."""
    data = _as_integers(data)
    qkeys = {f.name for f in fields(QuantConfig)}
    tkeys = {f.name for f in fields(TrainConfig)}
    quant = {k: v for k, v in data.items() if k in qkeys}
    train = {k: v for k, v in data.items() if k in tkeys}
    pre = {k: v for k, v in data.items() if k in PREPROCESS_KEYS}
    return quant, train, pre
