"""Post-training calibration: activation ranges observed on the FLOAT model, written into a QAT session.

What is observed
    The float training graph runs through the engine in eval mode (BatchNormalization with its running
    statistics, Dropout off) and returns every tensor the QAT session quantizes (the keys of `session.quant`;
    each exists under the same name in the float graph). This is what onnxruntime's calibrators do: ranges come
    from float activations, not from a model that is already partly quantized.

Methods (per tensor)
    minmax      the smallest and largest value over the calibration images (one pass).
    average     the mean, over groups of AVERAGE_GROUP (32) images, of each group's smallest and largest value
                (one pass): what a moving-average observer settles at when it trains at batch 32 (MNN's and
                TensorFlow's QAT observers; onnxruntime's MinMax calibrator with `moving_average`). A value
                that only a few images reach widens one group's range, not the whole range. The groups are
                consecutive images of the seeded subset, whatever the engine's batch (a divisor of 32).
                Observed min/max are kept too (TensorRange.min/max).
    percentile  from a histogram of the values: the range that keeps p% of them, leaving out (100 - p) / 2 %
                at each end (default p = 99.99: 0.005% below `lo`, 0.005% above `hi`); with symmetric
                activations the range [-t, t], t the p-th percentile of |x|. Both as onnxruntime's percentile
                calibrator (whose default p is 99.999). Exact zeros count (a ReLU output is mostly zeros).
    entropy     the clipping range that minimises KL(P || Q) between the histogram P (the clipped mass added to
                the edge bins) and its quantized version Q (the window merged into as many groups as the grid
                has levels, each group's count spread over its non-empty bins), as in TensorRT's and
                onnxruntime's entropy calibrators. The candidates shrink the observed range about zero at a
                fixed ratio, so the zero point stays what min/max gives and only the scale shrinks: for a ReLU
                output that is TensorRT's one-sided search, for symmetric activations onnxruntime's symmetric
                one. Every candidate's KL is computed at once from cumulative sums (no Python loop).
    Percentile and entropy ranges are clamped to the observed [min, max]. The entropy search leaves exact
    zeros out (every grid holds 0 exactly; a ReLU's zeros would be one huge bin that no merged group can
    represent, pulling the search to the narrowest windows).

    Caveat, measured: the KL search scores how well the merged histogram reproduces the fine one, and a
    histogram with spikes (on the bundled digits, the constant background gives every first-layer channel one
    value shared by most pixels) is reproduced best by windows narrow enough that each spike has a group of
    its own, whatever is clipped. With 2048 bins it clips LeNet's and the MobileNet's first activations to
    ~13% of their range (top-1 0.49 / 0.35 instead of 0.98 / 0.97); with `bins=512` (two bins per level,
    so the window keeps at least half the range) it matches min/max. On smooth activations (natural images)
    the method behaves as in TensorRT. `qatool.api.calibrate` names every range cut to less than half.

Memory
    No activation is kept. Histograms (`bins` = 2048 by default) need a fixed range, so percentile and
    entropy make two passes over the same images: the first finds each tensor's min/max, the second fills a
    histogram over [min(lo, 0), max(hi, 0)] whose bin edges include 0 (so every candidate range of the
    entropy search starts and ends on a bin edge and contains 0). Two exact passes were chosen over
    onnxruntime's re-binning of a growing histogram, which approximates the counts of merged bins.

Writing the ranges into a session (`apply_ranges`)
    For each quantized tensor: its observer's span = [lo, hi], and its scale / zero point from
    `activation_qparams(lo, hi, grid)` with the session's activation grid — what the observer itself would
    compute from that span. In eval mode the QAT graph then computes the deployed numerics (BN folded), so
    post-training quantization is `calibrate_session` followed by `qatool.export.deploy.export_session`.

Starting QAT from calibrated ranges
    The observers treat a calibrated span as their history: in training mode the moving-average observer
    continues from it (span = m * span + (1 - m) * batch range, so after k steps the calibration still weighs
    m^k: 0.9^20 ~ 0.12), the `maximum` observer only widens it (a percentile/entropy clip is undone by the
    first batch that exceeds it), and a frozen observer keeps it unchanged. With learned step sizes (LSQ) the
    observer never runs once a span is set: the calibrated scale is the step size's starting value.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError, ModelError, UsageError
from ..ir.graph import Graph
from .qparams import Grid, activation_grid, activation_qparams

METHODS = ("minmax", "average", "percentile", "entropy")
DEFAULT_IMAGES = 512
DEFAULT_PERCENTILE = 99.99
DEFAULT_BINS = 2048
DEFAULT_BATCH_SIZE = 64
AVERAGE_GROUP = 32  # images per observed range that --method average averages
HEAVY_CLIP = 0.5  # `qatool.api.calibrate` names the tensors whose range keeps less than this share of the observed one


@dataclass
class TensorRange:
    """The calibrated range [lo, hi] of one tensor and the [min, max] observed."""

    lo: float
    hi: float
    min: float
    max: float

    @property
    def clipped(self) -> bool:
        """The calibrated range leaves out some observed values."""
        return self.lo > self.min or self.hi < self.max

    def kept_fraction(self) -> float:
        """Width of [lo, hi] over the width of [min, max] (both stretched to contain 0, as the grid is)."""
        full = max(self.max, 0.0) - min(self.min, 0.0)
        return 1.0 if full == 0 else (max(self.hi, 0.0) - min(self.lo, 0.0)) / full

    def to_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "min": self.min, "max": self.max}


# ---- choosing the images ----------------------------------------------------------------------------------------
def calibration_indices(n: int, max_images: int | None, seed: int = 0) -> np.ndarray:
    """The images to calibrate on: all of them, or a seeded random subset of `max_images` (sorted: an image
    folder lists its classes one after the other, so the first N images would be a few classes only)."""
    if n < 1:
        raise DataError("no images to calibrate on")
    if max_images is None or max_images >= n:
        return np.arange(n)
    if max_images < 1:
        raise UsageError(f"the number of calibration images must be at least 1, got {max_images}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_images])


def _batches(data, indices: np.ndarray, batch_size: int):
    """The inputs of `indices`, in batches that each hold one group of the set (one input shape)."""
    for group in data.groups:
        chosen = group[np.isin(group, indices)]
        for start in range(0, len(chosen), batch_size):
            x, _ = data.batch(chosen[start:start + batch_size])
            yield x


def _observe(model, tensors: list[str], data, indices: np.ndarray, batch_size: int):
    """Yield, per batch, its number of images and the float values of `tensors` (eval mode)."""
    name = model.input_names[0]
    for x in _batches(data, indices, batch_size):
        yield len(x), model.forward({name: x}, training=False, outputs=tensors)


# ---- histogram maths ----------------------------------------------------------------------------------------------
@dataclass
class _Histogram:
    """Counts of values over bins of width `width`; bin `zero_bin` starts at 0 (edges: (k - zero_bin) * width).

    Exact zeros (a ReLU's output is mostly zeros) are counted apart in `zeros`: every grid represents 0
    exactly, so they carry no quantization error. The entropy search leaves them out (in the histogram they
    are one huge bin that the merged groups of Q cannot represent, which pushes the search to windows so
    narrow that each group is one bin); the percentiles count them.
    """

    counts: np.ndarray
    zero_bin: int
    width: float
    zeros: int = 0

    @classmethod
    def for_range(cls, lo: float, hi: float, bins: int, symmetric: bool) -> _Histogram | None:
        """Bins over [min(lo, 0), max(hi, 0)] with 0 on a bin edge; symmetric: [-m, m], m = max|x|."""
        neg, pos = max(-lo, 0.0), max(hi, 0.0)
        if symmetric:
            neg = pos = max(neg, pos)
            bins -= bins % 2  # zero in the middle
        if neg + pos == 0.0:
            return None
        zero_bin = int(round(bins * neg / (neg + pos)))
        if neg > 0:
            zero_bin = max(zero_bin, 1)
        if pos > 0:
            zero_bin = min(zero_bin, bins - 1)
        width = max(neg / zero_bin if zero_bin else 0.0, pos / (bins - zero_bin) if zero_bin < bins else 0.0)
        return cls(np.zeros(bins, np.float64), zero_bin, width)

    def add(self, x: np.ndarray) -> None:
        idx = np.multiply(x.reshape(-1), np.float32(1.0 / self.width), dtype=np.float32)
        np.floor(idx, out=idx)
        idx += np.float32(self.zero_bin)
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx.astype(np.intp), minlength=self.counts.size)
        zeros = int(np.count_nonzero(x == 0))
        self.counts[min(self.zero_bin, self.counts.size - 1)] -= zeros
        self.zeros += zeros

    def edge(self, k) -> float:
        return float((k - self.zero_bin) * self.width)

    def percentile_range(self, p: float, symmetric: bool) -> tuple[float, float]:
        h = self.counts.copy()
        h[min(self.zero_bin, h.size - 1)] += self.zeros
        total = h.sum()
        if symmetric:
            z = self.zero_bin
            folded = h[z:] + h[:z][::-1]  # |x|: symmetric bins, z = bins / 2
            c = np.concatenate([[0.0], np.cumsum(folded)])
            t = int(np.searchsorted(c, p * total, side="left")) * self.width
            return -t, t
        c = np.concatenate([[0.0], np.cumsum(h)])
        tail = (1.0 - p) / 2.0  # cut at each end
        k_lo = int(np.searchsorted(c, tail * total, side="right")) - 1
        k_hi = int(np.searchsorted(c, (1.0 - tail) * total, side="left"))
        return self.edge(max(k_lo, 0)), self.edge(min(k_hi, h.size))

    def entropy_range(self, levels: int) -> tuple[float, float]:
        s, e = entropy_window(self.counts, self.zero_bin, levels)
        return self.edge(s), self.edge(e)


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def entropy_window(hist: np.ndarray, zero_bin: int, levels: int, eps: float = 1e-6) -> tuple[int, int]:
    """The bins [s, e) of the window of least KL divergence (TensorRT's entropy calibration, vectorised).

    Candidates: every window length i from `levels` to the number of bins B, placed about bin edge `zero_bin`
    at the histogram's own ratio (s = zero_bin - round(i * zero_bin / B), e = s + i). For each:
      P = hist[s:e] with the mass left of s added to bin s and the mass right of e to bin e - 1;
      Q = hist[s:e] (without the clipped mass) merged into `levels` groups of consecutive bins, each group's
          count spread evenly over the bins where P is non-zero;
      KL(P || Q) of the normalised distributions; a bin where P > 0 but Q = 0 (an edge group that holds only
      clipped mass) gets probability `eps` in Q.
    With N = sum(P), M = sum(Q), S_g / T_g the mass of Q / P in group g and c_g its non-empty bins:
      KL = sum_j P_j log P_j / N - log N - sum_g T_g (log(S_g / c_g) - log M) / N,
    so every candidate needs only cumulative sums: one (candidates x levels) array, no loop over candidates.
    Among equal divergences the widest window wins (a histogram of few distinct values is represented
    exactly by many windows). Returns (0, B) when the histogram has fewer bins than `levels`.
    """
    h = np.asarray(hist, np.float64)
    bins = h.size
    if bins < max(levels, 2) or h.sum() <= 0:
        return 0, bins
    n_total = h.sum()
    csum = np.concatenate([[0.0], np.cumsum(h)])
    alog = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    nz = np.concatenate([[0], np.cumsum(h > 0)])
    length = np.arange(max(levels, 2), bins + 1)
    s = zero_bin - np.rint(length * zero_bin / bins).astype(np.int64)
    e = s + length
    left, right = csum[s], n_total - csum[e]
    p_first, p_last = h[s] + left, h[e - 1] + right
    plogp = alog[e - 1] - alog[s + 1] + _xlogx(p_first) + _xlogx(p_last)
    k = np.arange(levels + 1)
    bounds = s[:, None] + (k[None, :] * length[:, None]) // levels  # (candidates, levels + 1)
    group_sum = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]
    nonzero = (nz[bounds[:, 1:]] - nz[bounds[:, :-1]]).astype(np.float64)
    nonzero[:, 0] += (p_first > 0).astype(np.float64) - (h[s] > 0)
    nonzero[:, -1] += (p_last > 0).astype(np.float64) - (h[e - 1] > 0)
    p_mass = group_sum.copy()
    p_mass[:, 0] += left
    p_mass[:, -1] += right
    q_mass = csum[e] - csum[s]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(group_sum > 0, np.log(np.where(group_sum > 0, group_sum, 1.0) / np.maximum(nonzero, 1.0))
                         - np.log(np.maximum(q_mass, 1e-300))[:, None], np.log(eps))
        cross = np.where(p_mass > 0, p_mass * log_q, 0.0).sum(axis=1) / n_total
        kl = plogp / n_total - np.log(n_total) - cross
    kl = np.where(q_mass > 0, kl, np.inf)
    best = np.min(kl)
    if not np.isfinite(best):
        return 0, bins
    pick = int(np.nonzero(kl <= best + 1e-9)[0][-1])
    return int(s[pick]), int(e[pick])


# ---- collecting ranges ----------------------------------------------------------------------------------------
def collect_ranges(float_graph: Graph, tensors: list[str], data, method: str = "minmax",
                   max_images: int | None = DEFAULT_IMAGES, grid: Grid | None = None,
                   percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS,
                   batch_size: int | None = None, seed: int = 0) -> dict[str, TensorRange]:
    """Calibrated ranges of `tensors` of the float graph (run in eval mode on a copy) over `max_images` images
    of `data` (LoadedImages or StreamingImages; a seeded random subset when there are more).

    `grid` is the activation grid the ranges are for (default 8-bit asymmetric): a signed grid means
    symmetric activations (percentile of |x|, symmetric entropy windows), and its number of levels is the
    number of groups of the entropy search. `batch_size` None: at most DEFAULT_BATCH_SIZE, fewer for large inputs
    or when the observed tensors of a batch would exceed the memory budget (`qatool.runtime.backends.engine_batch_size`).
    """
    from ..engine.model import Model
    from ..runtime.backends import engine_batch_size

    if method not in METHODS:
        raise UsageError(f"the calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 50.0 < float(percentile) <= 100.0:
        raise UsageError(f"the percentile must be in (50, 100], got {percentile}")
    grid = grid or activation_grid(8, False)
    levels = grid.qmax - grid.qmin + 1
    if method in ("percentile", "entropy") and bins < levels:
        raise ConfigError(f"the histogram needs at least as many bins as the grid has levels ({levels}), got {bins}")
    tensors = list(dict.fromkeys(tensors))
    # a constant operand (hard-swish's + 3) has the range of its values, whatever the method
    constants = {t: _constant_range(float_graph.initializers[t]) for t in tensors if t in float_graph.initializers}
    tensors = [t for t in tensors if t not in constants]
    if not tensors:
        return constants
    model = Model(copy.deepcopy(float_graph))
    known = set(model.input_names) | {o for n in model.graph.nodes for o in n.outputs if o}
    missing = [t for t in tensors if t not in known]
    if missing:
        raise ModelError(f"internal: tensors {missing[:3]} to calibrate are not in the float model")
    indices = calibration_indices(len(data), max_images, seed)
    batch_size = batch_size or min(DEFAULT_BATCH_SIZE, engine_batch_size(model, data, tensors))
    if method == "average":
        batch_size = _divisor_at_most(AVERAGE_GROUP, batch_size)

    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    averaged = _GroupAverage(tensors) if method == "average" else None
    for n, values in _observe(model, tensors, data, indices, batch_size):
        mins, maxs = [], []
        for t, v in zip(tensors, values):
            vmin, vmax = float(v.min()), float(v.max())
            if not (np.isfinite(vmin) and np.isfinite(vmax)):
                raise DataError(f"the float model's tensor {t!r} holds non-finite values on the calibration data")
            lo[t], hi[t] = min(lo[t], vmin), max(hi[t], vmax)
            mins.append(vmin)
            maxs.append(vmax)
        if averaged is not None:
            averaged.add(mins, maxs, n)
    ranges = {t: TensorRange(lo[t], hi[t], lo[t], hi[t]) for t in tensors}
    if averaged is not None:
        for t, (a, b) in averaged.ranges().items():
            ranges[t].lo, ranges[t].hi = a, b
    ranges.update(constants)
    if method in ("minmax", "average"):
        return ranges

    symmetric = grid.signed
    hists = {t: _Histogram.for_range(lo[t], hi[t], bins, symmetric) for t in tensors}
    live = [t for t in tensors if hists[t] is not None]  # all-zero tensors keep [0, 0]
    if live:
        for _, values in _observe(model, live, data, indices, batch_size):
            for t, v in zip(live, values):
                hists[t].add(v)
    p = float(percentile) / 100.0
    for t in live:
        hist = hists[t]
        a, b = hist.percentile_range(p, symmetric) if method == "percentile" else hist.entropy_range(levels)
        r = ranges[t]
        r.lo, r.hi = min(max(a, r.min), r.max), max(min(b, r.max), r.min)
    return ranges


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of `n` that is at most `limit` (at least 1)."""
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


class _GroupAverage:
    """Per tensor, the mean over groups of AVERAGE_GROUP consecutive images of each group's [min, max], each
    group weighted by its images. A group closes once it holds AVERAGE_GROUP images or more (a shape's last,
    short batch carries into the next group); the last group may hold fewer."""

    def __init__(self, tensors: list[str]):
        self.tensors = tensors
        self.sum_lo = np.zeros(len(tensors))
        self.sum_hi = np.zeros(len(tensors))
        self.weight = 0
        self._open()

    def _open(self) -> None:
        self.lo = np.full(len(self.tensors), np.inf)
        self.hi = np.full(len(self.tensors), -np.inf)
        self.count = 0

    def _close(self) -> None:
        if self.count:
            self.sum_lo += self.count * self.lo
            self.sum_hi += self.count * self.hi
            self.weight += self.count
        self._open()

    def add(self, mins: list[float], maxs: list[float], images: int) -> None:
        np.minimum(self.lo, mins, out=self.lo)
        np.maximum(self.hi, maxs, out=self.hi)
        self.count += images
        if self.count >= AVERAGE_GROUP:
            self._close()

    def ranges(self) -> dict[str, tuple[float, float]]:
        self._close()
        lo, hi = self.sum_lo / self.weight, self.sum_hi / self.weight
        return {t: (float(a), float(b)) for t, a, b in zip(self.tensors, lo, hi)}


def _constant_range(value: np.ndarray) -> TensorRange:
    lo, hi = float(np.min(value)), float(np.max(value))
    return TensorRange(lo, hi, lo, hi)


def apply_ranges(session, ranges: dict[str, TensorRange | tuple[float, float]]) -> None:
    """Write calibrated ranges into the session's activation quantizers: span = [lo, hi] and the scale / zero
    point the observer computes from that span (in place: the engine's live state arrays)."""
    cfg = session.config
    grid = activation_grid(cfg.activation_bits, cfg.symmetric_activations)
    inits = session.model.graph.initializers
    missing = [t for t in session.quant if t not in ranges]
    if missing:
        raise ModelError(f"internal: no calibrated range for {missing[:3]}")
    for t, q in session.quant.items():
        r = ranges[t]
        lo, hi = (r.lo, r.hi) if isinstance(r, TensorRange) else r
        span = np.array([lo, hi], np.float32)
        inits[q.span][...] = span
        scale, zero = activation_qparams(float(span[0]), float(span[1]), grid, q.addend)
        inits[q.scale][...] = scale
        inits[q.zero_point][...] = zero


def calibrate_session(session, data, method: str = "minmax", max_images: int | None = DEFAULT_IMAGES,
                      percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS,
                      batch_size: int | None = None, seed: int = 0) -> dict[str, TensorRange]:
    """Calibrate every activation quantizer of a QAT session on the float model and write the ranges into it.

    `data`: LoadedImages or StreamingImages (preprocessed as the model expects); `max_images`: a seeded random
    subset of that many images (None: all). Returns tensor -> TensorRange (lo, hi, min, max).

    Afterwards, in eval mode the session computes the post-training-quantized model (export it with
    `export_session`); in training mode its observers continue from these ranges (see the module notes).
    """
    cfg = session.config
    grid = activation_grid(cfg.activation_bits, cfg.symmetric_activations)
    ranges = collect_ranges(session.float_graph, list(session.quant), data, method, max_images, grid, percentile,
                            bins, batch_size, seed)
    apply_ranges(session, ranges)
    return ranges
