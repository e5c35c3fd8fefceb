"""`qatool report`: one self-contained HTML page of a train-quant run, and optional PNG charts.

The page reads OUTDIR/report.json and OUTDIR/metrics.jsonl (and a per-layer sensitivity JSON when there is one)
and draws, as inline SVG with no script and no external asset:

- the training loss (raw, faint, and a moving average), the running training accuracy with the validation top-1
  of the float, simulated and int8 models as reference lines, and the learning rate, each with the spans where
  BatchNormalization and the activation observers were frozen shaded;
- the summary of report.json: accuracies, agreement, speed, bits, placement of quantization and onnxruntime's
  integer kernels;
- the per-layer sensitivity: SQNR per layer as ranked horizontal bars.

Charts are described once (`LineChart`, `BarChart`, in data coordinates) and drawn twice: as SVG for the page and,
with `png=True`, with Pillow's ImageDraw. Long runs are downsampled (at most `MAX_POINTS` points per line, keeping
each bucket's minimum and maximum for the noisy raw loss), so a 100k-step run gives a page of the same size as a
1k-step one.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from ..ir.io import atomic_write_bytes

MAX_POINTS = 1000          # points per polyline, at most
MAX_BAR_ROWS = 80          # sensitivity rows drawn as bars; the table lists every layer
SMOOTHING_FRACTION = 1 / 25  # moving-average window of the loss, as a fraction of the steps

# Okabe-Ito colours: distinguishable with colour-blindness, and still apart in grey print.
BLUE, GREEN, ORANGE, VERMILION, PURPLE, SKY, YELLOW, GREY = (
    "#0072B2", "#009E73", "#E69F00", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#6b6b6b")
INK, MUTED, GRID = "#222222", "#666666", "#e3e3e3"
BN_SPAN, OBSERVER_SPAN = ("#E69F00", 0.13), ("#56B4E9", 0.16)  # colour, opacity


# ---- reading the run -----------------------------------------------------------------------------------------
@dataclass
class Metrics:
    """metrics.jsonl as arrays, one entry per step (in step order, a resumed run's repeated steps dropped)."""

    step: np.ndarray
    loss: np.ndarray
    acc: np.ndarray       # running training accuracy (fraction); NaN where missing
    lr: np.ndarray        # NaN where missing
    ms: np.ndarray        # NaN where missing
    bn_frozen: np.ndarray
    observers_frozen: np.ndarray
    bad_lines: int = 0    # unreadable lines skipped (e.g. the last one of a run that was killed mid-write)

    def __len__(self) -> int:
        return len(self.step)


def _float(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _json_objects(lines: list[str]) -> tuple[list[dict], int]:
    """Parse JSON lines into objects; returns (objects, lines that are not one JSON object). Fast path: all the
    lines in one parse, or all but the last (a run killed while writing leaves a partial last line)."""

    def bulk(chunk):
        try:
            objs = json.loads("[" + ",".join(chunk) + "]")
        except ValueError:
            return None
        ok = len(objs) == len(chunk) and all(isinstance(o, dict) for o in objs)
        return objs if ok else None

    objs = bulk(lines)
    if objs is not None:
        return objs, 0
    head = bulk(lines[:-1])
    if head is not None:
        last = bulk(lines[-1:])
        return (head + last, 0) if last is not None else (head, 1)
    objs, bad = [], 0
    for line in lines:
        one = bulk([line])
        if one is None:
            bad += 1
        else:
            objs.extend(one)
    return objs, bad


def _column(objs: list[dict], key: str) -> np.ndarray:
    """A numeric field as float64, NaN where it is missing or not a number."""
    return np.asarray([v if type(v) in (float, int) else math.nan for v in (o.get(key) for o in objs)],
                      dtype=np.float64)


def _flags(objs: list[dict], key: str, step: np.ndarray, after: int | None) -> np.ndarray:
    """A boolean field; where a record lacks it: whether the step is past `after`."""
    raw = np.asarray([1 if v is True else 0 if v is False else -1 for v in (o.get(key) for o in objs)], dtype=np.int8)
    derived = step > after if after is not None else np.zeros(len(step), dtype=bool)
    return np.where(raw < 0, derived, raw == 1)


def read_metrics(path: Path, freeze_bn_after: int | None = None, freeze_observers_after: int | None = None) -> Metrics:
    """Read metrics.jsonl, skipping unreadable lines. When a step number goes back (a resumed run appends the
    steps after its checkpoint again; a new run in the same folder starts at 1), the later records replace the
    earlier ones from that step on. Records without the frozen flags take them from the freeze steps given."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    objs, bad = _json_objects([ln for ln in text.splitlines() if ln.strip()])
    steps = [o.get("step") for o in objs]
    ok = np.asarray([type(s) is int for s in steps], dtype=bool)
    loss = _column(objs, "loss")
    ok &= np.isfinite(loss)
    bad += int((~ok).sum())
    objs = [o for o, keep in zip(objs, ok) if keep]
    step = np.asarray([o["step"] for o in objs], dtype=np.int64)
    # a record survives only if every later record has a larger step (later records win)
    later_min = np.minimum.accumulate(step[::-1])[::-1]
    survive = np.ones(len(step), dtype=bool)
    survive[:-1] = step[:-1] < later_min[1:]
    objs = [o for o, keep in zip(objs, survive) if keep]
    step = step[survive]
    return Metrics(step, loss[ok][survive], _column(objs, "acc"), _column(objs, "lr"), _column(objs, "ms"),
                   _flags(objs, "bn_frozen", step, freeze_bn_after),
                   _flags(objs, "observers_frozen", step, freeze_observers_after), bad)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{what} {path} is not valid JSON ({e})") from e


def read_report(path: Path) -> dict:
    report = _read_json(path, "the train report")
    if not isinstance(report, dict):
        raise DataError(f"the train report {path} is not a JSON object")
    return report


def read_sensitivity(path: Path) -> dict:
    """A sensitivity JSON: {"model", "bits", "float_top1", "layers": [{"node", "op_type", "params", "sqnr_db",
    "top1", "top1_drop"}, ...]} with the layers ranked, most sensitive first."""
    data = _read_json(path, "the sensitivity file")
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, dict) and isinstance(x.get("node"), str) for x in layers):
        raise DataError(f"the sensitivity file {path} has no 'layers' list of objects with a 'node' name")
    return data


# ---- numbers: smoothing, downsampling, scales, ticks ---------------------------------------------------------
def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; near the ends the window shrinks to the values that exist."""
    n = len(y)
    if window <= 1 or n < 3:
        return y.astype(np.float64)
    half = window // 2
    c = np.concatenate([[0.0], np.cumsum(y, dtype=np.float64)])
    i = np.arange(n)
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, n)
    return (c[hi] - c[lo]) / (hi - lo)


def downsample_minmax(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points: per bucket of consecutive points, its minimum and maximum in x order, so
    spikes survive (the shape a noisy line has at the plot's resolution)."""
    n = len(y)
    if n <= max_points:
        return x, y
    edges = np.linspace(0, n, max_points // 2 + 1).astype(np.int64)
    keep = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = y[a:b]
        i, j = a + int(np.argmin(seg)), a + int(np.argmax(seg))
        keep.extend((i, j) if i < j else (j, i) if j < i else (i,))
    idx = np.asarray(keep)
    return x[idx], y[idx]


def downsample_pick(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` evenly spaced points, the first and last included (for lines that are smooth)."""
    n = len(y)
    if n <= max_points:
        return x, y
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return x[idx], y[idx]


def bucket_band(x: np.ndarray, y: np.ndarray, buckets: int = MAX_POINTS // 2, q: tuple[float, float] = (10, 90)
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bucket of consecutive points: its middle x and the q[0]-th and q[1]-th percentiles of y (the band
    where most of a noisy line's values are)."""
    edges = np.linspace(0, len(y), min(buckets, len(y)) + 1).astype(np.int64)
    xs, lo, hi = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            xs.append(x[a:b].mean())
            p_lo, p_hi = np.percentile(y[a:b], q)
            lo.append(p_lo)
            hi.append(p_hi)
    return np.asarray(xs), np.asarray(lo), np.asarray(hi)


def nice_step(span: float, max_ticks: int = 6) -> float:
    """The tick spacing 1, 2 or 5 times a power of ten that gives at most `max_ticks` ticks over `span`."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(max_ticks - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10.0 * mag


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0


def ticks_within(lo: float, hi: float, max_ticks: int = 6, integer: bool = False) -> list[float]:
    """Nice tick values inside [lo, hi]."""
    step = nice_step(hi - lo, max_ticks)
    if integer:
        step = max(step, 1.0)
    d = _decimals(step) + 1
    first = math.ceil(lo / step - 1e-9)
    out = []
    k = first
    while k * step <= hi + step * 1e-9:
        out.append(round(k * step, d))
        k += 1
    return out


def nice_domain(lo: float, hi: float, max_ticks: int = 6) -> tuple[float, float, list[float]]:
    """[lo, hi] widened to tick values, with the ticks. An empty range is widened around its value."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = (lo - pad, hi + pad) if lo < 0 else (max(0.0, lo - pad), hi + pad)
    step = nice_step(hi - lo, max_ticks)
    d = _decimals(step) + 1
    lo2, hi2 = round(math.floor(lo / step + 1e-9) * step, d), round(math.ceil(hi / step - 1e-9) * step, d)
    return lo2, hi2, ticks_within(lo2, hi2, max_ticks)


def format_number(v: float, step: float) -> str:
    """A tick label with as many decimals as the tick spacing needs; tiny values in short scientific form."""
    if v == 0:
        return "0"
    d = _decimals(step)
    if d > 4:
        mantissa, exp = f"{v:.{max(0, d - _decimals(abs(v)))}e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.{d}f}"


def format_steps(v: float) -> str:
    """Step counts: 500, 2000, 25k, 1.5M."""
    v = round(v)
    if abs(v) >= 1_000_000:
        return f"{v / 1e6:g}M"
    if abs(v) >= 10_000:
        return f"{v / 1e3:g}k"
    return str(v)


@dataclass
class LinearScale:
    """Maps a data interval onto a pixel interval (reversed ranges flip the axis, as for y)."""

    domain: tuple[float, float]
    range: tuple[float, float]

    def __call__(self, v):
        (d0, d1), (r0, r1) = self.domain, self.range
        span = (d1 - d0) or 1.0
        return r0 + (np.asarray(v, dtype=np.float64) - d0) * (r1 - r0) / span


def ref_label_positions(ys: list[float], gap: float, lo: float, hi: float, above: float = 5,
                        below: float = 14) -> list[float]:
    """Baselines of the labels of horizontal lines at pixel heights `ys`: just above its line where there is
    room, else just below it (lines close together get one label above, one below), else pushed apart."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = [0.0] * len(ys)
    prev = -math.inf
    for i in order:
        for cand in (ys[i] - above, ys[i] + below):
            if cand >= prev + gap and lo <= cand <= hi:
                break
        else:
            cand = max(prev + gap, ys[i] - above)
        out[i] = prev = cand
    return spread_labels(out, gap, lo, hi)


def spread_labels(ys: list[float], gap: float, lo: float, hi: float) -> list[float]:
    """Label positions (pixels, ascending y downwards) moved apart by at least `gap`, kept within [lo, hi]."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [min(max(ys[i], lo), hi) for i in order]
    for k in range(1, len(pos)):
        pos[k] = max(pos[k], pos[k - 1] + gap)
    overflow = pos[-1] - hi if pos else 0
    if overflow > 0:
        pos = [p - overflow for p in pos]
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
    out = [0.0] * len(ys)
    for i, p in zip(order, pos):
        out[i] = p
    return out


# ---- chart descriptions (data coordinates) -------------------------------------------------------------------
@dataclass
class Series:
    label: str
    x: np.ndarray
    y: np.ndarray
    color: str
    width: float = 2.0
    opacity: float = 1.0


@dataclass
class Band:
    label: str
    x: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    color: str
    opacity: float


@dataclass
class Span:
    label: str
    start: float
    end: float
    color: str
    opacity: float


@dataclass
class RefLine:
    label: str
    y: float
    color: str


@dataclass
class LineChart:
    key: str                      # unique on the page (SVG ids) and the PNG's file name
    title: str
    y_label: str
    x_domain: tuple[float, float]
    y_domain: tuple[float, float]
    y_ticks: list[float]
    series: list[Series]
    spans: list[Span] = field(default_factory=list)
    refs: list[RefLine] = field(default_factory=list)
    y_suffix: str = ""
    x_label: str = "training step"
    bands: list[Band] = field(default_factory=list)
    note: str = ""                # said under the chart

    def x_ticks(self, max_ticks: int = 8) -> list[float]:
        return ticks_within(*self.x_domain, max_ticks=max_ticks, integer=True)

    def y_tick_label(self, v: float) -> str:
        step = self.y_ticks[1] - self.y_ticks[0] if len(self.y_ticks) > 1 else (abs(v) or 1.0)
        return format_number(v, step) + self.y_suffix


@dataclass
class Bar:
    label: str
    value: float | None   # None: nothing measured (drawn as "n/a")
    color: str
    note: str             # printed right of the bar
    tip: str              # full text for the tooltip


@dataclass
class BarChart:
    key: str
    title: str
    x_label: str
    x_domain: tuple[float, float]
    x_ticks: list[float]
    bars: list[Bar]
    legend: list[tuple[str, str]]   # (colour, label)
    more: int = 0                   # rows left out of the chart


def frozen_spans(steps: np.ndarray, flags: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) in steps of each run of frozen steps; step k covers (k - 1, k]."""
    if not len(steps):
        return []
    d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    return [(float(steps[a] - 1), float(steps[b])) for a, b in zip(starts, ends)]


def _x_domain(m: Metrics) -> tuple[float, float]:
    first, last = int(m.step[0]), int(m.step[-1])
    lo = 0.0 if first <= 1 else float(first - 1)
    return lo, float(max(last, lo + 1))


def _phase_spans(m: Metrics) -> list[Span]:
    spans = [Span("BN frozen", a, b, *BN_SPAN) for a, b in frozen_spans(m.step, m.bn_frozen)]
    spans += [Span("observers frozen", a, b, *OBSERVER_SPAN) for a, b in frozen_spans(m.step, m.observers_frozen)]
    return spans


def smoothing_window(n: int) -> int:
    w = int(round(n * SMOOTHING_FRACTION))
    return w + 1 if w % 2 == 0 and w > 1 else max(w, 1)


def loss_chart(m: Metrics) -> LineChart:
    x = m.step.astype(np.float64)
    window = smoothing_window(len(m))
    smooth = moving_average(m.loss, window)
    series, bands = [], []
    note = "Softmax cross-entropy of each training batch (faint) and its moving average."
    if window <= 1:
        note = "Softmax cross-entropy of each training batch."
    if len(m) > MAX_POINTS:  # too many steps to see each: the band where most are, hairlines to the extremes
        per = int(math.ceil(len(m) / (MAX_POINTS // 2)))
        bands.append(Band(f"middle 80% of each {format_steps(per)} steps", *bucket_band(x, m.loss), BLUE, 0.28))
        series.append(Series("min–max", *downsample_minmax(x, m.loss), BLUE, 0.7, 0.12))
        note = (f"Softmax cross-entropy of the training batches: the band holds the middle 80% of the losses of "
                f"each {format_steps(per)} steps, the hairlines reach their lowest and highest; the line is the "
                f"moving average.")
    elif window > 1:
        series.append(Series("loss, each step", *downsample_minmax(x, m.loss), BLUE, 1.0, 0.3))
    if window > 1:
        series.append(Series(f"moving average over {format_steps(window)} steps", *downsample_pick(x, smooth), BLUE,
                             2.2))
    else:
        series.append(Series("loss, each step", x, m.loss, BLUE, 2.0))
    # big early values or spikes must not flatten the rest: the raw line may leave the plot at the top
    top = max(float(smooth.max()), float(np.percentile(m.loss, 99.5)))
    lo, hi, ticks = nice_domain(0.0, top * 1.04)
    return LineChart("loss", "Training loss", "loss", _x_domain(m), (lo, hi), ticks, series, _phase_spans(m),
                     bands=bands, note=note)


def _val_refs(report: dict) -> list[RefLine]:
    """The validation top-1 of float, simulation and int8 as reference lines; equal values share one line."""
    val = report.get("val") or {}
    digits = accuracy_digits(report)
    named = [("float", val.get("top1_float"), GREY), ("QAT simulation", val.get("top1_qat"), PURPLE),
             ("int8", val.get("top1_int8"), VERMILION)]
    groups: list[tuple[float, list[str], str]] = []
    for name, v, color in named:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for g in groups:
            if round(g[0] * 100, digits) == round(v * 100, digits):
                g[1].append(name)
                break
        else:
            groups.append((float(v), [name], color))
    return [RefLine(f"{' = '.join(names)} val top-1 {v * 100:.{digits}f}%", v * 100, color)
            for v, names, color in groups]


def accuracy_chart(m: Metrics, report: dict) -> LineChart:
    x = m.step.astype(np.float64)
    ok = np.isfinite(m.acc)
    acc = m.acc[ok] * 100
    refs = _val_refs(report)
    values = np.concatenate([acc, [r.y for r in refs]])
    if not len(values):
        values = np.asarray([0.0, 100.0])
    lo, hi, ticks = nice_domain(float(values.min()), float(values.max()))
    if hi > 100 >= values.max():
        hi = 100.0
        ticks = [t for t in ticks if t <= 100]
    series = [Series("running training accuracy", *downsample_pick(x[ok], acc), GREEN, 2.2)]
    return LineChart("accuracy", "Accuracy", "top-1", _x_domain(m), (lo, hi), ticks,
                     series, _phase_spans(m), refs, y_suffix="%")


def lr_chart(m: Metrics) -> LineChart | None:
    ok = np.isfinite(m.lr)
    if not ok.any():
        return None
    x = m.step.astype(np.float64)[ok]
    lr = m.lr[ok]
    lo, hi, ticks = nice_domain(min(0.0, float(lr.min())), float(lr.max()), max_ticks=4)
    return LineChart("lr", "Learning rate", "lr", _x_domain(m), (lo, hi), ticks,
                     [Series("learning rate", *downsample_pick(x, lr), PURPLE, 2.0)], _phase_spans(m))


def minus(text: str) -> str:
    """A signed number with a typographic minus sign."""
    return text.replace("-", "\u2212")


def sqnr_color(db: float | None) -> str:
    if db is None:
        return GREY
    return VERMILION if db < 20 else ORANGE if db < 30 else GREEN


SQNR_LEGEND = [(VERMILION, "< 20 dB: sensitive"), (ORANGE, "20–30 dB"), (GREEN, "≥ 30 dB")]


def sensitivity_chart(sens: dict) -> BarChart:
    layers = sens["layers"]
    finite = [v for v in (_float(x.get("sqnr_db")) for x in layers) if math.isfinite(v)]
    top = max(finite, default=40.0)
    low = min(min(finite, default=0.0), 0.0)
    lo, hi, ticks = nice_domain(low, top * 1.08 if top > 0 else 1.0)
    bars = []
    for rank, layer in enumerate(layers[:MAX_BAR_ROWS], 1):
        db = _float(layer.get("sqnr_db"))
        value = None if math.isnan(db) else (hi if db == math.inf else lo if db == -math.inf else db)
        note = "n/a" if value is None else ("∞ dB" if math.isinf(db) else f"{db:.1f} dB")
        drop = _float(layer.get("top1_drop"))
        if math.isfinite(drop):
            note += f" · top-1 {minus(f'{-drop * 100:+.1f}')} pt"
        op = layer.get("op_type") or ""
        tip = f"{rank}. {layer['node']}" + (f" ({op})" if op else "") + f": {note}"
        bars.append(Bar(f"{rank}. {layer['node']}", value, sqnr_color(value), note, tip))
    bits = sens.get("bits")
    title = "SQNR per layer" + (f" at {bits} bits" if bits is not None else "") + ", most sensitive first"
    return BarChart("sensitivity", title, "SQNR (dB), higher is better", (lo, hi), ticks, bars, SQNR_LEGEND,
                    max(0, len(layers) - MAX_BAR_ROWS))


# ---- SVG -----------------------------------------------------------------------------------------------------
_XML_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(text) -> str:
    """Text for HTML or SVG content and attribute values (quotes too); characters XML forbids are dropped."""
    return html.escape(_XML_BAD.sub("", str(text)), quote=True)


def truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(1, n - 1)] + "…"


def text_width(text: str, size: float) -> float:
    """Approximate width of sans-serif text in the SVG (no font metrics there)."""
    return len(text) * size * 0.6


@dataclass
class Frame:
    """A chart's pixel box and the plot area inside its margins."""

    width: float
    height: float
    left: float
    right: float
    top: float
    bottom: float

    @property
    def x0(self):
        return self.left

    @property
    def x1(self):
        return self.width - self.right

    @property
    def y0(self):
        return self.top

    @property
    def y1(self):
        return self.height - self.bottom


def svg_points(xs, ys) -> str:
    """Pixel coordinates as an SVG points list, to a tenth of a pixel (enough, and short)."""
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(np.asarray(xs).tolist(), np.asarray(ys).tolist()))


def svg_polyline(xs, ys, color: str, width: float, opacity: float = 1.0, clip: str = "") -> str:
    extra = (f' stroke-opacity="{opacity:g}"' if opacity < 1 else "") + (f' clip-path="url(#{clip})"' if clip else "")
    return (f'<polyline points="{svg_points(xs, ys)}" fill="none" stroke="{color}" stroke-width="{width:g}" '
            f'stroke-linejoin="round" stroke-linecap="round"{extra}/>')


def svg_band(xs, lo, hi, color: str, opacity: float, clip: str = "") -> str:
    """The area between two lines over the same xs."""
    pts = svg_points(np.concatenate([xs, xs[::-1]]), np.concatenate([hi, lo[::-1]]))
    extra = f' clip-path="url(#{clip})"' if clip else ""
    return f'<polygon points="{pts}" fill="{color}" fill-opacity="{opacity:g}"{extra}/>'


def svg_text(x, y, text, size=12, anchor="start", color=INK, weight="", extra="") -> str:
    w = f' font-weight="{weight}"' if weight else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}"{w}{extra}>'
            f'{esc(text)}</text>')


def span_rows(chart: LineChart) -> list[list[Span]]:
    """The spans grouped by label, one labelled strip above the plot per group (BN first)."""
    rows: dict[str, list[Span]] = {}
    for sp in chart.spans:
        rows.setdefault(sp.label, []).append(sp)
    return list(rows.values())


STRIP_OPACITY = 0.55  # of the labelled strips above the plot; the plot itself is shaded at the span's opacity


def svg_left_margin(chart: LineChart) -> float:
    """Room for the y tick labels and the axis title."""
    return max(54, max((text_width(chart.y_tick_label(t), 11) for t in chart.y_ticks), default=20) + 34)


def svg_line_chart(chart: LineChart, width: int = 760, height: int = 280, left: float | None = None) -> str:
    """`left`: the plot's left edge, to align the x axes of charts drawn one under the other."""
    strips = span_rows(chart)
    strip_h, strip_top = 15, 26
    f = Frame(width, height, left=left or svg_left_margin(chart), right=18,
              top=strip_top + len(strips) * (strip_h + 2) + 6, bottom=40)
    sx = LinearScale(chart.x_domain, (f.x0, f.x1))
    sy = LinearScale(chart.y_domain, (f.y1, f.y0))
    clip = f"clip-{chart.key}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-labelledby="t-{chart.key}" '
           f'font-family="system-ui, -apple-system, \'Segoe UI\', Roboto, Helvetica, Arial, sans-serif">',
           f'<title id="t-{chart.key}">{esc(chart.title)}</title>',
           f'<defs><clipPath id="{clip}"><rect x="{f.x0}" y="{f.y0 - 3}" width="{f.x1 - f.x0 + 3}" '
           f'height="{f.y1 - f.y0 + 6}"/></clipPath></defs>']  # lines on the plot's edges stay whole
    # frozen spans under everything, each labelled in a strip above the plot
    for row, spans in enumerate(strips):
        top = strip_top + row * (strip_h + 2)
        for sp in spans:
            a, b = float(sx(sp.start)), float(sx(sp.end))
            tip = f"<title>{esc(sp.label)}: steps {format_steps(sp.start + 1)}–{format_steps(sp.end)}</title>"
            out.append(f'<rect x="{a:.1f}" y="{f.y0}" width="{max(b - a, 0.5):.1f}" height="{f.y1 - f.y0}" '
                       f'fill="{sp.color}" fill-opacity="{sp.opacity:g}">{tip}</rect>')
            out.append(f'<line x1="{a:.1f}" x2="{a:.1f}" y1="{top}" y2="{f.y1}" stroke="{sp.color}" '
                       f'stroke-width="1.2"/>')
            out.append(f'<rect x="{a:.1f}" y="{top}" width="{max(b - a, 0.5):.1f}" height="{strip_h}" '
                       f'fill="{sp.color}" fill-opacity="{STRIP_OPACITY}">{tip}</rect>')
            inside = text_width(sp.label, 11) + 10 <= b - a
            out.append(svg_text(a + 5 if inside else a - 5, top + strip_h - 4, sp.label, 11,
                                "start" if inside else "end", INK if inside else MUTED))
    # grid and y ticks
    for t in chart.y_ticks:
        y = float(sy(t))
        out.append(f'<line x1="{f.x0}" x2="{f.x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(svg_text(f.x0 - 7, y + 4, chart.y_tick_label(t), 11, "end", MUTED))
    for t in chart.x_ticks():
        x = float(sx(t))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.y1}" y2="{f.y1 + 5}" stroke="{MUTED}"/>')
        out.append(svg_text(x, f.y1 + 18, format_steps(t), 11, "middle", MUTED))
    out.append(f'<path d="M{f.x0},{f.y0} V{f.y1} H{f.x1}" fill="none" stroke="{MUTED}"/>')
    out.append(svg_text((f.x0 + f.x1) / 2, height - 6, chart.x_label, 11, "middle", MUTED))
    out.append(svg_text(14, (f.y0 + f.y1) / 2, chart.y_label, 11, "middle", MUTED,
                        extra=f' transform="rotate(-90 14 {(f.y0 + f.y1) / 2:.1f})"'))
    # reference lines, then the series on top
    label_ys = ref_label_positions([float(sy(r.y)) for r in chart.refs], 14, f.y0 + 12, f.y1 - 4)
    for r, ly in zip(chart.refs, label_ys):
        y = float(sy(r.y))
        out.append(f'<line x1="{f.x0}" x2="{f.x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{r.color}" '
                   f'stroke-width="1.5" stroke-dasharray="6 4"/>')
    for b in chart.bands:
        out.append(svg_band(sx(b.x), sy(b.lo), sy(b.hi), b.color, b.opacity, clip))
    for s in chart.series:
        out.append(svg_polyline(sx(s.x), sy(s.y), s.color, s.width, s.opacity, clip))
    for r, ly in zip(chart.refs, label_ys):
        w = text_width(r.label, 11) * 1.08 + 8  # bold
        out.append(f'<rect x="{f.x1 - 2 - w:.1f}" y="{ly - 11:.1f}" width="{w:.1f}" height="15" rx="3" fill="#fff" '
                   f'fill-opacity="0.85"/>')
        out.append(svg_text(f.x1 - 6, ly, r.label, 11, "end", r.color, "600"))
    # legend in the top margin
    x = f.x0
    for b in chart.bands:
        out.append(f'<rect x="{x}" y="7" width="22" height="12" fill="{b.color}" fill-opacity="{b.opacity:g}"/>')
        out.append(svg_text(x + 27, 17, b.label, 12, color=INK))
        x += 27 + text_width(b.label, 12) + 18
    for s in chart.series:
        out.append(f'<line x1="{x}" x2="{x + 22}" y1="13" y2="13" stroke="{s.color}" stroke-width="2.5" '
                   f'stroke-opacity="{max(s.opacity, 0.35):g}"/>')
        out.append(svg_text(x + 27, 17, s.label, 12, color=INK))
        x += 27 + text_width(s.label, 12) + 18
    out.append("</svg>")
    return "\n".join(out)


def _bar_layout(chart: BarChart, label_chars: int = 34) -> tuple[int, int]:
    """(label column characters, label column width in SVG pixels)."""
    longest = max((len(b.label) for b in chart.bars), default=4)
    chars = min(longest, label_chars)
    return chars, int(min(text_width("x" * chars, 12) + 14, 280))


def svg_bar_chart(chart: BarChart, width: int = 760) -> str:
    row = 22
    chars, label_w = _bar_layout(chart)
    note_w = max((text_width(b.note, 11) for b in chart.bars), default=40) + 12
    f = Frame(width, 36 + row * len(chart.bars) + 44, left=label_w, right=max(note_w, 60), top=36, bottom=44)
    sx = LinearScale(chart.x_domain, (f.x0, f.x1))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {f.height}" '
           f'width="{width}" height="{f.height}" role="img" aria-labelledby="t-{chart.key}" '
           f'font-family="system-ui, -apple-system, \'Segoe UI\', Roboto, Helvetica, Arial, sans-serif">',
           f'<title id="t-{chart.key}">{esc(chart.title)}</title>']
    for t in chart.x_ticks:
        x = float(sx(t))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.y0}" y2="{f.y1}" stroke="{GRID}"/>')
        out.append(svg_text(x, f.y1 + 16, format_number(t, chart.x_ticks[1] - chart.x_ticks[0]
                                                        if len(chart.x_ticks) > 1 else 1), 11, "middle", MUTED))
    zero = float(sx(max(chart.x_domain[0], 0.0)))
    for i, b in enumerate(chart.bars):
        y = f.y0 + i * row
        out.append(f'<g><title>{esc(b.tip)}</title>')
        out.append(svg_text(f.x0 - 8, y + row / 2 + 4, truncate(b.label, chars), 12, "end", INK))
        if b.value is not None:
            x = float(sx(b.value))
            a, w = min(zero, x), abs(x - zero)
            out.append(f'<rect class="bar" x="{a:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row - 6}" '
                       f'rx="2" fill="{b.color}"/>')
            out.append(svg_text(max(x, zero) + 6, y + row / 2 + 4, b.note, 11, color=MUTED))
        else:
            out.append(svg_text(zero + 6, y + row / 2 + 4, b.note, 11, color=MUTED))
        out.append("</g>")
    out.append(f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="{f.y0}" y2="{f.y1}" stroke="{MUTED}"/>')
    out.append(svg_text((f.x0 + f.x1) / 2, f.height - 8, chart.x_label, 11, "middle", MUTED))
    x = f.x0
    for color, label in chart.legend:
        out.append(f'<rect x="{x}" y="10" width="14" height="12" rx="2" fill="{color}"/>')
        out.append(svg_text(x + 19, 20, label, 12))
        x += 19 + text_width(label, 12) + 18
    out.append("</svg>")
    return "\n".join(out)


# ---- PNG (Pillow) --------------------------------------------------------------------------------------------
SUPERSAMPLE = 2  # drawn at twice the size, then scaled down: smooth lines without antialiasing support


@functools.lru_cache(maxsize=None)
def png_font(size: int, bold: bool = False):
    from PIL import ImageFont

    names = ("DejaVuSans-Bold.ttf", "Arial Bold.ttf") if bold else ("DejaVuSans.ttf", "Arial.ttf")
    for name in (*names, "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _rgba(color: str, opacity: float = 1.0) -> tuple[int, int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), int(round(255 * opacity))


class PngCanvas:
    """An RGB image with alpha-blended drawing, coordinates in final pixels (scaled by SUPERSAMPLE inside)."""

    def __init__(self, width: int, height: int):
        from PIL import Image, ImageDraw

        self.size = (width, height)
        self.k = SUPERSAMPLE
        self.image = Image.new("RGB", (width * self.k, height * self.k), "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")

    def _p(self, v: float) -> float:
        return v * self.k

    def line(self, points, color, width=1.0, opacity=1.0):
        pts = [(self._p(x), self._p(y)) for x, y in points]
        if len(pts) >= 2:
            self.draw.line(pts, fill=_rgba(color, opacity), width=max(1, round(width * self.k)), joint="curve")

    def dashed_hline(self, x0, x1, y, color, width=1.5, dash=6, gap=4):
        x = x0
        while x < x1:
            self.line([(x, y), (min(x + dash, x1), y)], color, width)
            x += dash + gap

    def rect(self, x0, y0, x1, y1, color, opacity=1.0):
        self.draw.rectangle([self._p(x0), self._p(y0), self._p(x1), self._p(y1)], fill=_rgba(color, opacity))

    def polygon(self, points, color, opacity=1.0):
        self.draw.polygon([(self._p(x), self._p(y)) for x, y in points], fill=_rgba(color, opacity))

    def text_width(self, text, size, bold=False) -> float:
        return png_font(size * self.k, bold).getlength(text) / self.k

    def text(self, x, y, text, size=12, anchor="ls", color=INK, bold=False):
        """Pillow anchors: first letter l/m/r (left, middle, right), second s (baseline) or m (middle)."""
        self.draw.text((self._p(x), self._p(y)), text, font=png_font(size * self.k, bold), fill=_rgba(color),
                       anchor=anchor)

    def vertical_text(self, x, y, text, size=12, color=MUTED):
        """Text rotated by 90 degrees, centred on (x, y)."""
        from PIL import Image, ImageDraw

        font = png_font(size * self.k)
        w = int(font.getlength(text)) + 4
        h = int(size * self.k * 1.4)
        tile = Image.new("RGBA", (w, h), (255, 255, 255, 0))
        ImageDraw.Draw(tile).text((w / 2, h / 2), text, font=font, fill=_rgba(color), anchor="mm")
        tile = tile.rotate(90, expand=True)
        self.image.paste(tile, (int(self._p(x) - tile.width / 2), int(self._p(y) - tile.height / 2)), tile)

    def png_bytes(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        self.image.resize(self.size, Image.LANCZOS).save(buf, "PNG", optimize=True)
        return buf.getvalue()


def png_line_chart(chart: LineChart, width: int = 1000, height: int = 440) -> bytes:
    c = PngCanvas(width, height)
    strips = span_rows(chart)
    strip_h, strip_top = 20, 66
    tick_w = max((c.text_width(chart.y_tick_label(t), 14) for t in chart.y_ticks), default=20)
    f = Frame(width, height, left=max(64, tick_w + 42), right=24, top=strip_top + len(strips) * (strip_h + 3) + 8,
              bottom=56)
    sx = LinearScale(chart.x_domain, (f.x0, f.x1))
    sy = LinearScale(chart.y_domain, (f.y1, f.y0))
    c.text(f.x0, 26, chart.title, 18, bold=True)
    for row, spans in enumerate(strips):
        top = strip_top + row * (strip_h + 3)
        for sp in spans:
            a, b = float(sx(sp.start)), float(sx(sp.end))
            c.rect(a, f.y0, b, f.y1, sp.color, sp.opacity)
            c.line([(a, top), (a, f.y1)], sp.color, 1.5)
            c.rect(a, top, b, top + strip_h, sp.color, STRIP_OPACITY)
            inside = c.text_width(sp.label, 14) + 14 <= b - a
            c.text(a + 7 if inside else a - 7, top + strip_h / 2, sp.label, 14, "lm" if inside else "rm",
                   INK if inside else MUTED)
    for t in chart.y_ticks:
        y = float(sy(t))
        c.line([(f.x0, y), (f.x1, y)], GRID, 1)
        c.text(f.x0 - 9, y, chart.y_tick_label(t), 14, "rm", MUTED)
    for t in chart.x_ticks():
        x = float(sx(t))
        c.line([(x, f.y1), (x, f.y1 + 6)], MUTED, 1)
        c.text(x, f.y1 + 10, format_steps(t), 14, "mt", MUTED)
    c.line([(f.x0, f.y0), (f.x0, f.y1), (f.x1, f.y1)], MUTED, 1.2)
    c.text((f.x0 + f.x1) / 2, height - 8, chart.x_label, 14, "ms", MUTED)
    c.vertical_text(18, (f.y0 + f.y1) / 2, chart.y_label, 14)
    for r in chart.refs:
        c.dashed_hline(f.x0, f.x1, float(sy(r.y)), r.color, 2)
    # bands and series, clipped to the plot area by clamping (the raw loss may run above the top)
    for b in chart.bands:
        xs = np.concatenate([sx(b.x), sx(b.x[::-1])]).tolist()
        ys = np.clip(np.concatenate([sy(b.hi), sy(b.lo[::-1])]), f.y0, f.y1).tolist()
        c.polygon(list(zip(xs, ys)), b.color, b.opacity)
    for s in chart.series:
        xs, ys = sx(s.x), np.clip(sy(s.y), f.y0 - 2, f.y1 + 2)
        c.line(list(zip(xs.tolist(), ys.tolist())), s.color, s.width * 1.2, s.opacity)
    label_ys = ref_label_positions([float(sy(r.y)) for r in chart.refs], 18, f.y0 + 16, f.y1 - 4, 6, 19)
    for r, ly in zip(chart.refs, label_ys):
        w = c.text_width(r.label, 14, bold=True) + 10
        c.rect(f.x1 - 3 - w, ly - 15, f.x1 - 3, ly + 4, "#ffffff", 0.85)
        c.text(f.x1 - 8, ly, r.label, 14, "rs", r.color, bold=True)
    x = f.x0
    for b in chart.bands:
        c.rect(x, 41, x + 26, 55, b.color, b.opacity)
        c.text(x + 32, 48, b.label, 14, "lm")
        x += 32 + c.text_width(b.label, 14) + 22
    for s in chart.series:
        c.line([(x, 48), (x + 26, 48)], s.color, 3, max(s.opacity, 0.35))
        c.text(x + 32, 48, s.label, 14, "lm")
        x += 32 + c.text_width(s.label, 14) + 22
    return c.png_bytes()


def png_bar_chart(chart: BarChart, width: int = 1000) -> bytes:
    row = 28
    chars, _ = _bar_layout(chart, 40)
    probe = PngCanvas(1, 1)
    label_w = max((probe.text_width(truncate(b.label, chars), 14) for b in chart.bars), default=40) + 18
    note_w = max((probe.text_width(b.note, 13) for b in chart.bars), default=40) + 16
    f = Frame(width, 80 + row * len(chart.bars) + 58, left=min(label_w, width * 0.4), right=max(note_w, 60),
              top=80, bottom=58)
    c = PngCanvas(width, int(f.height))
    sx = LinearScale(chart.x_domain, (f.x0, f.x1))
    c.text(16, 28, chart.title, 18, bold=True)
    for t in chart.x_ticks:
        x = float(sx(t))
        c.line([(x, f.y0), (x, f.y1)], GRID, 1)
        step = chart.x_ticks[1] - chart.x_ticks[0] if len(chart.x_ticks) > 1 else 1
        c.text(x, f.y1 + 8, format_number(t, step), 14, "mt", MUTED)
    zero = float(sx(max(chart.x_domain[0], 0.0)))
    for i, b in enumerate(chart.bars):
        y = f.y0 + i * row
        c.text(f.x0 - 10, y + row / 2, truncate(b.label, chars), 14, "rm")
        end = zero
        if b.value is not None:
            end = float(sx(b.value))
            c.rect(min(zero, end), y + 4, max(zero, end, min(zero, end) + 1), y + row - 4, b.color)
        c.text(max(end, zero) + 7, y + row / 2, b.note, 13, "lm", MUTED)
    c.line([(zero, f.y0), (zero, f.y1)], MUTED, 1.2)
    c.text((f.x0 + f.x1) / 2, f.height - 10, chart.x_label, 14, "ms", MUTED)
    x = 16
    for color, label in chart.legend:
        c.rect(x, 46, x + 16, 60, color)
        c.text(x + 22, 53, label, 14, "lm")
        x += 22 + c.text_width(label, 14) + 22
    return c.png_bytes()


# ---- the HTML page -------------------------------------------------------------------------------------------
CSS = """
:root { --ink: #222; --muted: #666; --line: #ddd; --good: #007a58; --warn: #a86200; --bad: #c0392b; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 820px; margin: 0 auto; padding: 28px 20px 40px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h1 .model { color: var(--muted); font-weight: 400; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 10px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; border-top: 4px solid var(--c, #999); }
.card .k { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .d { font-size: 13px; color: var(--muted); }
.verdict { font-size: 16px; padding: 10px 14px; border-radius: 8px; background: #f4f7f6;
  border-left: 5px solid var(--c); }
.good { --c: var(--good); } .warn { --c: var(--warn); } .bad { --c: var(--bad); }
.delta.good { color: var(--good); } .delta.warn { color: var(--warn); } .delta.bad { color: var(--bad); }
figure { margin: 14px 0 22px; break-inside: avoid; page-break-inside: avoid; }
figure h3 { margin: 0 0 2px; }
figcaption { color: var(--muted); font-size: 13px; }
svg.chart { display: block; width: 100%; height: auto; max-width: 760px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; margin: 6px 0 14px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, 'SFMono-Regular', Menlo, Consolas, monospace; font-size: 13px;
  word-break: break-all; }
.pill { display: inline-block; padding: 1px 8px; margin: 2px 4px 2px 0; border-radius: 10px; background: #eef3f8;
  border: 1px solid #d5e0ec; font-size: 13px; }
.note { color: var(--muted); font-size: 14px; }
.alert { color: var(--bad); }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
@media (max-width: 600px) { .cards { grid-template-columns: repeat(2, 1fr); } }
@media print {
  body { font-size: 12px; } main { max-width: none; padding: 0; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2 { break-after: avoid; page-break-after: avoid; }
  table, .cards { break-inside: avoid; }
}
"""


def accuracy_digits(report: dict) -> int:
    """Decimals of a percentage: one for up to 2000 validation images (a step of 0.05 % or more), else two."""
    images = (report.get("val") or {}).get("images")
    return 2 if isinstance(images, int) and images > 2000 else 1


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _pct(v, digits: int) -> str:
    v = _num(v)
    return "—" if v is None else f"{v * 100:.{digits}f}%"


def _grade(drop_pt: float) -> str:
    return "good" if drop_pt <= 0.5 else "warn" if drop_pt <= 2.0 else "bad"


def _card(key: str, value: str, detail: str = "", color: str = "") -> str:
    """A headline number; `detail` is HTML."""
    style = f' style="--c:{color}"' if color else ""
    d = f'<div class="d">{detail}</div>' if detail else ""
    return (f'<div class="card"{style}><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
            f'{d}</div>')


def _delta(v, ref, digits: int) -> str:
    v, ref = _num(v), _num(ref)
    if v is None or ref is None:
        return ""
    pt = (v - ref) * 100
    return f'<span class="delta {_grade(-pt)}">{minus(f"{pt:+.{digits}f}")} pt vs float</span>'


def bits_text(quant: dict) -> str:
    w, a = quant.get("weight_bits"), quant.get("activation_bits")
    if w is None and a is None:
        return "—"
    return f"W{w}/A{a}" if w != a else f"{w}-bit"


def bits_detail(quant: dict) -> str:
    text = ("per-channel" if quant.get("per_channel", True) else "per-tensor") + " weights"
    mixed = quant.get("layer_weight_bits") or {}
    if mixed:
        text += f"; {len(mixed)} layer{'s' if len(mixed) != 1 else ''} at other weight bits"
    return text


def cards_html(report: dict, m: Metrics) -> str:
    val = report.get("val") or {}
    digits = accuracy_digits(report)
    quant = (report.get("config") or {}).get("quant") or {}
    images = val.get("images")
    on = f"on {images} val images" if isinstance(images, int) else "validation"
    agree = _num(val.get("agreement_top1"))
    ms = _num(report.get("ms_per_step"))
    steps = report.get("steps", len(m))
    cards = [
        _card("float top-1", _pct(val.get("top1_float"), digits), esc(f"onnxruntime, before QAT, {on}"),
              color=GREY),
        _card("QAT simulation", _pct(val.get("top1_qat"), digits), _delta(val.get("top1_qat"),
                                                                          val.get("top1_float"), digits), color=PURPLE),
        _card("int8 top-1", _pct(val.get("top1_int8"), digits), _delta(val.get("top1_int8"),
                                                                       val.get("top1_float"), digits), color=VERMILION),
        _card("agreement", _pct(agree, digits), "same class: simulation vs int8",
              color=GREEN if agree is None or agree >= 0.99 else ORANGE),
        _card("training", f"{format_steps(steps) if isinstance(steps, int) else steps} steps",
              esc(f"{ms:.1f} ms per step (median)" if ms is not None else ""), color=BLUE),
        _card("bits", bits_text(quant), esc(bits_detail(quant)), color=SKY),
    ]
    return '<section class="cards">' + "".join(cards) + "</section>"


def verdict_html(report: dict) -> str:
    val = report.get("val") or {}
    digits = accuracy_digits(report)
    f, i8, agree = _num(val.get("top1_float")), _num(val.get("top1_int8")), _num(val.get("agreement_top1"))
    if i8 is None:
        return ('<p class="verdict warn">No validation data was given to train-quant, so there are no accuracies '
                'to compare; pass <code>--val-data</code> next time.</p>')
    text = f"The int8 model reaches <b>{i8 * 100:.{digits}f}%</b> top-1"
    cls = "good"
    if f is not None:
        pt = (i8 - f) * 100
        cls = _grade(-pt)
        how = "the same as" if abs(pt) < 10 ** -digits / 2 else (
            f"{abs(pt):.{digits}f} points {'below' if pt < 0 else 'above'}")
        text += f", {how} the float model ({f * 100:.{digits}f}%)"
    if agree is not None:
        text += f"; it predicts the class the QAT simulation predicts on {agree * 100:.{digits}f}% of the images"
        if agree < 0.99:
            cls = "bad" if agree < 0.95 else "warn"
    return f'<p class="verdict {cls}">{text}.</p>'


def _phase_caption(report: dict, m: Metrics) -> str:
    cfg = report.get("config") or {}
    parts = []
    for key, what, flags in (("freeze_bn_after", "BatchNormalization switched to its running statistics",
                              m.bn_frozen), ("freeze_observers_after", "the activation ranges stopped moving",
                                             m.observers_frozen)):
        at = cfg.get(key)
        if flags.any():
            first = int(m.step[np.argmax(flags)])
            parts.append(f"{what} after step {format_steps(first - 1)}")
        elif isinstance(at, int):
            parts.append(f"{what} after step {format_steps(at)} (not reached in these steps)")
    return ("Shaded: " + "; ".join(parts) + ".") if parts else ""


def training_html(report: dict, m: Metrics, charts: list[LineChart]) -> str:
    out = ['<section id="training"><h2>Training</h2>']
    if not len(m):
        out.append('<p class="note">metrics.jsonl holds no complete step, so there are no curves to draw.</p>')
    notes = {
        "loss": " ".join(c.note for c in charts if c.key == "loss") + " " + _phase_caption(report, m),
        "accuracy": "Running accuracy on the training batches since the run (or its resume) started; dashed: the "
                    "validation top-1 after training, of the float model, the QAT simulation and the int8 model "
                    "in onnxruntime.",
        "lr": f"Schedule: {((report.get('config') or {}).get('train') or {}).get('schedule', '?')}.",
    }
    left = max((svg_left_margin(c) for c in charts), default=None)
    for chart in charts:
        svg = svg_line_chart(chart, height=180 if chart.key == "lr" else 280, left=left)
        out.append(f'<figure id="fig-{chart.key}"><h3>{esc(chart.title)}</h3>{svg}'
                   f'<figcaption>{esc(notes.get(chart.key, ""))}</figcaption></figure>')
    if m.bad_lines:
        out.append(f'<p class="note">{m.bad_lines} unreadable line{"s" if m.bad_lines > 1 else ""} of metrics.jsonl '
                   f'skipped (a run stopped while writing leaves a partial last line).</p>')
    steps = report.get("steps")
    if len(m) and isinstance(steps, int) and int(m.step[-1]) != steps:
        out.append(f'<p class="note">metrics.jsonl ends at step {int(m.step[-1])}, report.json says {steps} '
                   f'steps.</p>')
    out.append("</section>")
    return "\n".join(out)


def sensitivity_html(sens: dict | None, source: Path | None) -> str:
    out = ['<section id="sensitivity"><h2>Per-layer sensitivity</h2>']
    if sens is None:
        out.append('<p class="note">No sensitivity analysis in this folder (<code>sensitivity.json</code>); '
                   'give one with <code>--sensitivity FILE</code>.</p></section>')
        return "\n".join(out)
    layers = sens["layers"]
    if not layers:
        out.append('<p class="note">The sensitivity file lists no layers.</p></section>')
        return "\n".join(out)
    chart = sensitivity_chart(sens)
    ft = _num(sens.get("float_top1"))
    cap = (f"Signal-to-quantization-noise ratio of each layer, from <code>{esc(source.name if source else '')}</code>"
           f"{', float top-1 ' + f'{ft * 100:.1f}%' if ft is not None else ''}. Low SQNR (short, red bars) marks "
           "the layers that lose most to quantization: candidates for more bits or for <code>--exclude</code>.")
    out.append(f'<figure id="fig-sensitivity"><h3>{esc(chart.title)}</h3>{svg_bar_chart(chart)}'
               f'<figcaption>{cap}</figcaption></figure>')
    if chart.more:
        out.append(f'<p class="note">The chart shows the {MAX_BAR_ROWS} most sensitive layers; the table lists all '
                   f'{len(layers)}.</p>')
    rows = []
    for rank, layer in enumerate(layers, 1):
        db = _float(layer.get("sqnr_db"))
        top1, drop = _num(layer.get("top1")), _num(layer.get("top1_drop"))
        params = layer.get("params")
        rows.append(f'<tr><td class="n">{rank}</td><td><code>{esc(layer["node"])}</code></td>'
                    f'<td>{esc(layer.get("op_type") or "")}</td>'
                    f'<td class="n">{f"{params:,}" if isinstance(params, int) else "—"}</td>'
                    f'<td class="n">{"—" if math.isnan(db) else "∞" if math.isinf(db) else f"{db:.1f}"}</td>'
                    f'<td class="n">{"—" if top1 is None else f"{top1 * 100:.1f}%"}</td>'
                    f'<td class="n">{"—" if drop is None else minus(f"{-drop * 100:+.1f}")}</td></tr>')
    out.append('<table><thead><tr><th class="n">#</th><th>node</th><th>op</th><th class="n">params</th>'
               '<th class="n">SQNR dB</th><th class="n">top-1</th><th class="n">Δ pt</th></tr></thead><tbody>'
               + "".join(rows) + "</tbody></table></section>")
    return "\n".join(out)


def placement_html(report: dict) -> str:
    plan = report.get("placement") or {}
    export = report.get("export") or {}
    fusion = export.get("fusion") or {}
    out = ['<section id="placement"><h2>Quantization</h2>']
    layers = plan.get("quantized_layers") or []
    bn = plan.get("folded_batchnorm") or []
    acts = plan.get("quantized_activations")
    out.append(f"<p>{len(layers)} quantized layer{'s' if len(layers) != 1 else ''}"
               + (f", {len(bn)} BatchNormalization folded into them" if bn else "")
               + (f", {acts} activation quantizers" if isinstance(acts, int) else "") + ".</p>")
    if layers:
        out.append("<p>" + "".join(f'<span class="pill"><code>{esc(n)}</code></span>' for n in layers) + "</p>")
    for d in plan.get("dynamic_recurrent") or []:
        if isinstance(d, dict):
            out.append(f'<p><code>{esc(d.get("node", ""))}</code> ({esc(d.get("op_type", ""))}) runs as '
                       f'{esc(d.get("reason", ""))}.</p>')
    floats = plan.get("float_nodes") or []
    if floats:
        out.append(f"<h3>{len(floats)} node{'s' if len(floats) != 1 else ''} kept in float</h3><table><thead><tr>"
                   "<th>node</th><th>op</th><th>why</th></tr></thead><tbody>")
        out.extend(f'<tr><td><code>{esc(fn.get("node", ""))}</code></td><td>{esc(fn.get("op_type", ""))}</td>'
                   f'<td>{esc(fn.get("reason", ""))}</td></tr>' for fn in floats if isinstance(fn, dict))
        out.append("</tbody></table>")
    else:
        out.append('<p class="note">No node stays in float.</p>')
    if fusion:
        fused, expected = fusion.get("fused"), fusion.get("expected")
        cls = "" if fused == expected else ' class="alert"'
        kernels = fusion.get("kernels") or {}
        out.append(f"<h3>onnxruntime integer kernels</h3><p{cls}>{esc(fused)} of {esc(expected)} quantized nodes run "
                   "as integer kernels" + (": " + ", ".join(f"{esc(k)} × {esc(v)}" for k, v in sorted(kernels.items()))
                                           if kernels else "") + ".</p>")
        unfused = fusion.get("unfused") or []
        if unfused:
            out.append("<table><thead><tr><th>not fused</th><th>op</th><th>why</th></tr></thead><tbody>")
            out.extend(f'<tr><td><code>{esc(u.get("node", ""))}</code></td><td>{esc(u.get("op_type", ""))}</td>'
                       f'<td>{esc(u.get("reason", ""))}</td></tr>' for u in unfused if isinstance(u, dict))
            out.append("</tbody></table>")
    agreement = export.get("agreement") or {}
    steps = _num(agreement.get("max_diff_steps"))
    if steps is not None:
        out.append(f'<p class="note">Largest difference between the simulation\'s and onnxruntime\'s outputs: '
                   f'{steps:.1f} quantization steps.</p>')
    out.append("</section>")
    return "\n".join(out)


def _setting_rows(report: dict) -> list[tuple[str, str]]:
    cfg = report.get("config") or {}
    q, t, p = cfg.get("quant") or {}, cfg.get("train") or {}, cfg.get("preprocess") or {}
    rows = [("model", report.get("model")), ("steps", report.get("steps")), ("batch size", report.get("batch_size"))]
    if t:
        opt = f"{t.get('optimizer')}, lr {t.get('lr')}, {t.get('schedule')} schedule"
        if t.get("warmup_steps"):
            opt += f", {t['warmup_steps']} warm-up steps"
        if t.get("weight_decay"):
            opt += f", weight decay {t['weight_decay']}"
        rows += [("optimizer", opt), ("seed", t.get("seed")), ("augment", "yes" if t.get("augment") else "no")]
    if q:
        w = f"{q.get('weight_bits')} bits, {'per channel' if q.get('per_channel', True) else 'per tensor'}, symmetric"
        if q.get("reduce_range"):
            w += ", reduce range (7-bit)"
        a = f"{q.get('activation_bits')} bits, {'symmetric' if q.get('symmetric_activations') else 'asymmetric'}" \
            f", {q.get('scale_update')} observer"
        rows += [("weights", w), ("activations", a)]
        if q.get("layer_weight_bits"):
            rows.append(("per-layer weight bits", ", ".join(f"{k}: {v}" for k, v in q["layer_weight_bits"].items())))
        if q.get("exclude"):
            rows.append(("excluded", ", ".join(map(str, q["exclude"]))))
    rows += [("BN frozen after step", cfg.get("freeze_bn_after")),
             ("observers frozen after step", cfg.get("freeze_observers_after"))]
    if p:
        size = p.get("size")
        rows.append(("preprocessing", f"{'x'.join(map(str, size)) if isinstance(size, list) else size}, "
                                      f"{p.get('color')}, mean {p.get('mean')}, std {p.get('std')}"))
    if report.get("final_loss") is not None:
        rows.append(("final loss", f"{report['final_loss']:.4g}" if _num(report["final_loss"]) is not None
                     else report["final_loss"]))
    if report.get("skipped_images"):
        rows.append(("unreadable images skipped", report["skipped_images"]))
    return [(k, "—" if v is None else str(v)) for k, v in rows]


def settings_html(report: dict) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _setting_rows(report))
    return f'<section id="settings"><h2>Run settings</h2><table><tbody>{rows}</tbody></table></section>'


def render_html(outdir: Path, report: dict, m: Metrics, sens: dict | None, sens_path: Path | None,
                charts: list[LineChart]) -> str:
    from .. import __version__

    model = Path(str(report.get("model") or "")).name or "model"
    try:
        when = datetime.fromtimestamp((outdir / "report.json").stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    except OSError:
        when = ""
    quant = (report.get("config") or {}).get("quant") or {}
    sub = " · ".join(x for x in (str(outdir), bits_text(quant), f"written {when}" if when else "") if x)
    body = [f'<header><h1>QAT report <span class="model">{esc(model)}</span></h1><p class="sub">{esc(sub)}</p>'
            "</header>", cards_html(report, m), verdict_html(report), training_html(report, m, charts),
            sensitivity_html(sens, sens_path), placement_html(report), settings_html(report),
            f"<footer>qatool {esc(__version__)} · from report.json and metrics.jsonl"
            f"{' and ' + esc(sens_path.name) if sens_path and sens is not None else ''} · "
            "self-contained: no scripts, no external files</footer>"]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            f"<title>QAT report: {esc(model)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


# ---- the entry point -----------------------------------------------------------------------------------------
def _locate(outdir, output, sensitivity) -> tuple[Path, Path, Path | None]:
    out = Path(outdir)
    if not out.exists():
        raise UsageError(f"no such folder: {out} (give the OUTDIR of a train-quant run)")
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder (give the OUTDIR of a train-quant run)")
    for name in ("report.json", "metrics.jsonl"):
        if not (out / name).is_file():
            raise DataError(f"{out} has no {name}: is it the OUTDIR of a finished train-quant run?")
    html_path = Path(output) if output is not None else out / "report.html"
    if html_path.is_dir():
        raise UsageError(f"the output {html_path} is a folder; give a file name such as report.html")
    protected = {(out / n).resolve() for n in ("report.json", "metrics.jsonl", "qat.onnx", "model_int8.onnx")}
    if html_path.resolve() in protected:
        raise UsageError(f"the output {html_path} would overwrite the run's own {html_path.name}")
    if sensitivity is not None:
        sens_path = Path(sensitivity)
        if not sens_path.is_file():
            raise UsageError(f"sensitivity file not found: {sens_path}")
    else:
        sens_path = out / "sensitivity.json"
        sens_path = sens_path if sens_path.is_file() else None
    return out, html_path, sens_path


def build_charts(report: dict, m: Metrics) -> list[LineChart]:
    if not len(m):
        return []
    charts = [loss_chart(m), accuracy_chart(m, report)]
    lr = lr_chart(m)
    return charts + ([lr] if lr is not None else [])


def write_report(outdir, output=None, sensitivity=None, png: bool = False) -> list[Path]:
    """Write the HTML report of the train-quant run in `outdir` (default `outdir/report.html`) and, with `png`,
    loss.png, accuracy.png and (with a sensitivity file) sensitivity.png beside it. `sensitivity` is a
    sensitivity JSON; by default `outdir/sensitivity.json` when it exists. Returns the paths written."""
    out, html_path, sens_path = _locate(outdir, output, sensitivity)
    report = read_report(out / "report.json")
    cfg = report.get("config") if isinstance(report.get("config"), dict) else {}
    m = read_metrics(out / "metrics.jsonl", cfg.get("freeze_bn_after"), cfg.get("freeze_observers_after"))
    sens = read_sensitivity(sens_path) if sens_path is not None else None
    charts = build_charts(report, m)
    page = render_html(out, report, m, sens, sens_path, charts)
    atomic_write_bytes(html_path, page.encode("utf-8"))
    written = [html_path]
    if png:
        folder = html_path.parent
        for chart in charts:
            if chart.key in ("loss", "accuracy"):
                atomic_write_bytes(folder / f"{chart.key}.png", png_line_chart(chart))
                written.append(folder / f"{chart.key}.png")
        if sens is not None and sens["layers"]:
            atomic_write_bytes(folder / "sensitivity.png", png_bar_chart(sensitivity_chart(sens)))
            written.append(folder / "sensitivity.png")
    return written


def file_size_text(path: Path) -> str:
    n = os.path.getsize(path)
    return f"{n / 1024:.1f} KB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MB"
