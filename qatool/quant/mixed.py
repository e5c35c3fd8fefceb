"""Mixed precision: per-layer weight bits chosen from a sensitivity report to meet a weight-size budget.

Sizes here are *effective* (bit-packed) weight sizes: sum over the quantized layers of params * bits / 8 bytes
(a float layer counts 4 bytes per weight). Biases (int32 whatever the weight bits) and weights of layers that
are not quantized are left out. The exported file stores weights of 5 to 8 bits one per byte and weights of 4
bits or fewer two per byte (INT4, `qatool.export.pack`): `weight_sizes` reports both the effective size and the
size in the file.
"""

from __future__ import annotations

import re

from ..errors import ConfigError, UsageError
from .config import QuantConfig

FLOAT_BITS = 32  # a layer "at 32 bits" is kept in float
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_size(text: str, float_weight_bytes: int | None = None) -> int:
    """A size in bytes: "50000", "50000B", "120KB" (x 1000), "120KiB" (x 1024), "0.3MB", "1.5MiB", "1GB", or
    "25%" (of `float_weight_bytes`, the float weights' size). Raises UsageError saying what is accepted."""
    accepted = "a size such as 50000, 120KB, 120KiB, 0.3MB or 25% (KB = 1000 bytes, KiB = 1024)"
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"cannot read the size {text!r}: expected {accepted}")
    number, exponent, unit = m.group(1), m.group(2), m.group(3).lower()
    value = float(number) * (10.0 ** int(exponent) if exponent else 1.0)
    if unit == "%":
        if float_weight_bytes is None:
            raise UsageError(f"the size {text!r} is a percentage, but the float weights' size is not known here")
        if not 0 < value <= 100:
            raise UsageError(f"a size percentage must be in (0, 100], got {text!r}")
        size = value / 100.0 * float_weight_bytes
    elif unit in _UNITS:
        size = value * _UNITS[unit]
    else:
        raise UsageError(f"unknown size unit {m.group(3)!r} in {text!r}: expected {accepted}")
    size = int(round(size))
    if size < 1:
        raise UsageError(f"the size {text!r} is less than one byte")
    return size


def check_size(text: str) -> None:
    """Raise UsageError now if `text` is not a size `parse_size` reads (a percentage is checked for its form and
    range only: the float weights' size is known after the sensitivity measurement)."""
    parse_size(text, 10**15)


def _layers(report: dict) -> list[dict]:
    layers = report.get("layers") if isinstance(report, dict) else None
    if not layers:
        raise ConfigError("the sensitivity report lists no layers")
    for r in layers:
        if not isinstance(r, dict) or not {"node", "params", "sqnr_db"} <= set(r):
            raise ConfigError("the sensitivity report's layers need node, params and sqnr_db "
                              "(schemas/sensitivity.schema.json)")
    return layers


def _check_bits(name: str, bits: int, allow_float: bool) -> None:
    ok = isinstance(bits, int) and not isinstance(bits, bool) and (2 <= bits <= 8 or (allow_float and
                                                                                       bits == FLOAT_BITS))
    if not ok:
        more = f" or {FLOAT_BITS} (float)" if allow_float else ""
        raise ConfigError(f"{name} must be an integer from 2 to 8{more}, got {bits!r}")


def plan_mixed_precision(sensitivity_report: dict, size_budget_bytes: int, low_bits: int = 4,
                         high_bits: int = 8) -> dict[str, int]:
    """Weight bits per layer (node name -> bits; FLOAT_BITS = keep the layer in float) within a budget.

    Greedy, most sensitive first: every layer starts at `low_bits`; then, in the order of the report's ranking
    (lowest SQNR first), each layer is raised to `high_bits` if the effective weight size
    sum(params * bits / 8) stays within `size_budget_bytes`; a layer that does not fit stays low and the next
    (smaller) ones are still tried. Raises ConfigError when even every layer at `low_bits` exceeds the budget,
    saying the smallest possible size. The budget is the effective (bit-packed) size, not the int8 file's
    (see the module notes and `weight_sizes`).
    """
    layers = _layers(sensitivity_report)
    _check_bits("low_bits", low_bits, False)
    _check_bits("high_bits", high_bits, True)
    if high_bits <= low_bits:
        raise ConfigError(f"high_bits ({high_bits}) must be more than low_bits ({low_bits})")
    if isinstance(size_budget_bytes, bool) or not isinstance(size_budget_bytes, (int, float)) or \
            not size_budget_bytes > 0:
        raise ConfigError(f"the size budget must be a positive number of bytes, got {size_budget_bytes!r}")
    budget_bits = size_budget_bytes * 8
    total_bits = sum(int(r["params"]) * low_bits for r in layers)
    if total_bits > budget_bits:
        smallest = total_bits / 8
        raise ConfigError(f"the size budget of {size_budget_bytes:,.0f} bytes is too small: with every layer at "
                          f"{low_bits} bits the weights take {smallest:,.0f} bytes, the smallest possible at "
                          f"{low_bits} bits")
    plan = {r["node"]: low_bits for r in layers}
    for r in sorted(layers, key=lambda r: float(r["sqnr_db"])):
        extra = int(r["params"]) * (high_bits - low_bits)
        if total_bits + extra <= budget_bits:
            plan[r["node"]] = high_bits
            total_bits += extra
    return plan


def weight_sizes(sensitivity_report: dict, plan: dict[str, int]) -> dict:
    """Sizes of the planned layers' weights in bytes: `effective` (bit-packed, what the budget counts),
    `container` (as the exported file stores them: half a byte per weight of up to 4 bits, one of up to 8, four
    when float) and
    `float` (all of them float32)."""
    params = {r["node"]: int(r["params"]) for r in _layers(sensitivity_report)}
    unknown = sorted(set(plan) - set(params))
    if unknown:
        raise ConfigError(f"layers not in the sensitivity report: {', '.join(unknown[:5])}")
    effective = sum(params[n] * b / 8 for n, b in plan.items())
    container = sum(params[n] * 4 if b == FLOAT_BITS else (params[n] + 1) // 2 if b <= 4 else params[n]
                    for n, b in plan.items())
    return {"effective": int(round(effective)), "container": container,
            "float": sum(params[n] * 4 for n in plan)}


def mixed_precision_config(base: QuantConfig, plan: dict[str, int]) -> QuantConfig:
    """`base` with the plan applied: per-layer weight bits (`layer_weight_bits`), float layers in `exclude`."""
    settings = base.to_dict()
    settings["layer_weight_bits"] = {**base.layer_weight_bits,
                                     **{n: b for n, b in plan.items() if b != FLOAT_BITS}}
    settings["exclude"] = list(base.exclude) + [n for n, b in plan.items() if b == FLOAT_BITS and
                                                n not in base.exclude]
    return QuantConfig(**settings)
