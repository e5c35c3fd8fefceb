"""Typed quantization settings (never a string-keyed options dict)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace

from ..errors import ConfigError

SCALE_UPDATES = ("moving-average", "maximum")
SCALE_LEARNING = ("none", "lsq")
WEIGHT_ROUNDING = ("nearest", "gptq", "gptq-sequential")
RECURRENT = ("float", "dynamic")  # how an LSTM is exported (`quant.prepare`)
LOW_BITS = 4  # weights this narrow take the recipe's low-bit rounding (`QuantConfig.with_rounding`)


@functools.lru_cache(maxsize=1)
def cpu_lacks_vnni() -> bool:
    """True on an x86 CPU without VNNI (its u8 x s8 kernels add pairs of products in 16 bits, which can
    saturate with 8-bit weights); False elsewhere or when unknown."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "flags" in flags and not {"avx512_vnni", "avx_vnni"} & set(flags)


@dataclass
class QuantConfig:
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True  # weights per output channel (else per tensor)
    symmetric_activations: bool = False  # signed, zero point 0 (else asymmetric unsigned)
    scale_update: str = "moving-average"  # MNN's two methods: "moving-average" | "maximum"
    observer_momentum: float = 0.9  # of the moving-average observer
    freeze_bn_after: int | None = None  # step; None: half the run
    freeze_observers_after: int | None = None  # step; None: three quarters of the run
    exclude: list[str] = field(default_factory=list)  # node names or op types kept in float
    # 7-bit weights: on an x86 CPU without VNNI onnxruntime's u8 x s8 kernels add products in saturating 16-bit
    # pairs, which 8-bit weights overflow (a 3x3 conv on full-range inputs: outputs off by up to 200 levels; with
    # 7-bit weights, exact). None: on where this machine lacks VNNI (`cpu_lacks_vnni`), resolved when the config
    # is made, so that the int8 model computes on this machine what qatool simulated and checked
    reduce_range: bool | None = None
    layer_weight_bits: dict[str, int] = field(default_factory=dict)  # node name -> weight bits (mixed precision)
    scale_learning: str = "none"  # "lsq": step sizes trained by gradient, initialised from the observers
    quantize_tail: bool = False  # also quantize the output tail (after the last weighted layer); default float
    # "gptq": the start's weights rounded by GPTQ on calibration inputs (qatool.quant.gptq), on stored scales;
    # "gptq-sequential": each layer's inputs from the float model whose earlier layers are already rounded;
    # None: the run's recipe decides (`with_rounding`), nearest where nothing resolves it
    weight_rounding: str | None = None
    # "float": an LSTM/GRU/RNN runs in float between DequantizeLinear and QuantizeLinear; "dynamic": an LSTM runs
    # as onnxruntime's DynamicQuantizeLSTM (int8 weights, activations quantized inside the kernel), simulated so
    recurrent: str = "float"
    # True: before the start is calibrated, the float model's layers at LOW_BITS bits and below have their input
    # channels evened out, the difference absorbed upstream (qatool.quant.equalize); None: the recipe decides
    equalize: bool | None = None

    def __post_init__(self):
        if self.reduce_range is None:
            self.reduce_range = cpu_lacks_vnni()
        self.validate()

    def validate(self) -> None:
        for key in ("weight_bits", "activation_bits"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ConfigError(f"{key} must be an integer from 2 to 8, got {v!r}")
        if self.scale_update not in SCALE_UPDATES:
            raise ConfigError(f"scale_update must be one of {', '.join(SCALE_UPDATES)}, got {self.scale_update!r}")
        if self.scale_learning not in SCALE_LEARNING:
            raise ConfigError(f"scale_learning must be one of {', '.join(SCALE_LEARNING)}, got {self.scale_learning!r}")
        if self.weight_rounding is not None and self.weight_rounding not in WEIGHT_ROUNDING:
            raise ConfigError(f"weight_rounding must be one of {', '.join(WEIGHT_ROUNDING)}, "
                              f"got {self.weight_rounding!r}")
        if self.equalize is not None and not isinstance(self.equalize, bool):
            raise ConfigError(f"equalize must be true or false, got {self.equalize!r}")
        if self.recurrent not in RECURRENT:
            raise ConfigError(f"recurrent must be one of {', '.join(RECURRENT)}, got {self.recurrent!r}")
        if not 0.0 <= float(self.observer_momentum) < 1.0:
            raise ConfigError(f"observer_momentum must be in [0, 1), got {self.observer_momentum!r}")
        for name, bits in self.layer_weight_bits.items():
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ConfigError(f"layer_weight_bits[{name!r}] must be an integer from 2 to 8, got {bits!r}")
        for key in ("freeze_bn_after", "freeze_observers_after"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{key} must be a step number >= 0, got {v!r}")

    @property
    def stores_weight_scales(self) -> bool:
        """Whether each WeightQuant reads a stored scale (learned by LSQ, or fixed for GPTQ's rounding) instead
        of recomputing it from the weight every step."""
        return self.scale_learning == "lsq" or self.rounding != "nearest"

    @property
    def rounding(self) -> str:
        """The weight rounding in force: `weight_rounding`, nearest while unresolved."""
        return self.weight_rounding or "nearest"

    @property
    def has_low_bits(self) -> bool:
        """Whether any layer's weights have LOW_BITS bits or fewer (the global setting or a layer's own)."""
        return min([self.weight_bits, *self.layer_weight_bits.values()]) <= LOW_BITS

    def low_bits_planned(self, planned_bits: int | None) -> bool:
        """`has_low_bits`, or `planned_bits` (the low bits mixed precision is yet to give some layers) that few."""
        return self.has_low_bits or (planned_bits is not None and planned_bits <= LOW_BITS)

    def with_rounding(self, low_bit_rounding: str, low_bit_equalize: bool = False,
                      planned_bits: int | None = None) -> QuantConfig:
        """This config with its weight rounding and equalisation resolved: its own where set, else
        `low_bit_rounding` / `low_bit_equalize` when any layer's weights have LOW_BITS or fewer (or will have:
        `planned_bits`, the low bits mixed precision is yet to give some layers), else nearest and none (both were
        measured at 4 bits; an 8-bit step is 16 times finer)."""
        low = self.low_bits_planned(planned_bits)
        rounding = self.weight_rounding if self.weight_rounding is not None else \
            low_bit_rounding if low else "nearest"
        equalize = self.equalize if self.equalize is not None else low_bit_equalize and low
        return replace(self, weight_rounding=rounding, equalize=equalize)

    def weight_bits_of(self, node_name: str) -> int:
        """The weight bits of one layer: its own setting (mixed precision) or the global one; capped at 7 with
        reduce_range."""
        bits = self.layer_weight_bits.get(node_name, self.weight_bits)
        return min(bits, 7) if self.reduce_range else bits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown quantization setting(s): {', '.join(unknown)}")
        return cls(**d)
