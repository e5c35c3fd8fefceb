"""A default training batch that fits: measured from what one image's training step holds.

A classifier at 224x224 trains at batch 64 in a few GB; a text detector at 640x640 holds ~0.6 GB per image
(forward values kept for backward, gradients), so batch 64 would need ~40 GB. The step's working set grows
linearly with the batch, so two probe steps (forward and backward, at batch 1 and 2, after a first one that
makes the first-use allocations, observers held and the state put back) give the bytes per image as the
difference of their peaks (numpy reports its allocations to tracemalloc), and the default batch is the largest
that fits the budget, at most DEFAULT_BATCH. `step_time` times untraced steps at batch 1 and 2 on inputs of the
median size (tracing slows a step several times over): a label-free run's default length is what fits its time
budget (`distill_steps`).
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

DEFAULT_BATCH = 64
# A label-free run's default batch is at most DISTILL_BATCH: its length is bounded by time (RUN_BUDGET_SECONDS), and
# the teacher's dense targets train well in small batches, so more, smaller steps win. Measured on PP-OCRv4's
# recogniser (docs/benchmarks.md section 8): the memory budget alone gave batch 57, whose steps took 16-35 s on
# the wide lines (200 steps: ~50 min), where the 800 steps of its measured recipe took 8-13 min at batches of 1-13.
DISTILL_BATCH = 8
TRAIN_BUDGET = 6 * 1024**3  # the working set of one training step (the process also holds data, teacher, ...)
# A label-free run's default length: DISTILL_STEPS, or fewer where a step is slow, so that the steps take about
# RUN_BUDGET_SECONDS at the probe's step time (never fewer than MIN_DISTILL_STEPS). PP-OCRv4's recogniser (batch 13,
# ~0.4 s a step) reads 88 % of the test lines as float does after 200 steps of Adam 1e-5 and 92 % after 800 of
# 3e-5 (docs/benchmarks.md section 8); a 640x640 detector at ~6 s a step gets ~400.
DISTILL_STEPS = 800
# At 4-bit weights and below (quant.config.LOW_BITS) a fast model keeps learning past 800 steps: PP-OCRv4's
# recogniser at W4A8 read 83.33 % of the test lines after 800 steps and 89.67 % after 2400, its SQNR rising at every
# checkpoint; ddddocr's CNN+LSTM recogniser read 88.80 and 88.40 % (docs/benchmarks.md section 8, session 19). The
# detectors' steps are slow enough that the time budget sets their length either way.
LOW_BIT_DISTILL_STEPS = 2400
MIN_DISTILL_STEPS = 200
RUN_BUDGET_SECONDS = 40 * 60
# The probe misses what a real step adds (the teacher's forward, the observers' updates, a loaded machine): on the
# PicoDet layout detector it said 8.3 s a step where the run took 11.2 s, and the 40-minute budget became 55 minutes
# of steps (docs/benchmarks.md section 8). So a run whose length the budget chose times its own first
# REVISE_AFTER steps and revises its length once, where the two differ by more than REVISE_TOLERANCE.
REVISE_AFTER = 20
REVISE_TOLERANCE = 0.1


@dataclass
class BatchChoice:
    batch_size: int
    bytes_per_image: int
    budget: int
    limit: int = DEFAULT_BATCH  # the largest default batch (DISTILL_BATCH for a label-free run)

    def summary(self) -> str:
        per = self.bytes_per_image / 1024**2
        if self.batch_size >= self.limit and self.limit < DEFAULT_BATCH:
            return (f"batch {self.batch_size} (the label-free default, at most {self.limit}: a run's length is bounded "
                    f"by time, so more, smaller steps; one image's training step holds {per:,.0f} MB; --batch-size "
                    "overrides)")
        if self.batch_size >= self.limit:
            return f"batch {self.batch_size} (one image's training step holds {per:,.0f} MB)"
        return (f"batch {self.batch_size}: one image's training step holds {per:,.0f} MB, and {self.batch_size} fit "
                f"the {self.budget / 1024**3:.0f} GB budget of a step (the default {self.limit} would not; "
                "--batch-size overrides)")

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "bytes_per_image": self.bytes_per_image, "budget": self.budget,
                "limit": self.limit}


@dataclass
class StepTime:
    """A training step's time, linear in the batch: fixed + per_image * batch (measured on median-sized inputs)."""

    fixed: float
    per_image: float

    def seconds(self, batch: int) -> float:
        return self.fixed + self.per_image * batch


def step_cap(config) -> int:
    """The most steps a label-free run takes by default: LOW_BIT_DISTILL_STEPS where any layer's weights have
    quant.config.LOW_BITS bits or fewer (`config` a QuantConfig), else DISTILL_STEPS."""
    return LOW_BIT_DISTILL_STEPS if config.has_low_bits else DISTILL_STEPS


def _budgeted(seconds: float, cap: int) -> int:
    """The steps of `seconds` each that fit the run's time budget, within [MIN_DISTILL_STEPS, cap]."""
    fit = int(RUN_BUDGET_SECONDS / seconds) if seconds > 0 else cap
    return min(cap, max(MIN_DISTILL_STEPS, fit))


def distill_steps(step_time: StepTime, batch: int, cap: int = DISTILL_STEPS) -> tuple[int, str]:
    """(the default steps of a label-free run at `batch`, at most `cap` (`step_cap`), the sentence that says
    why)."""
    step = step_time.seconds(batch)
    steps = _budgeted(step, cap)
    low = cap == LOW_BIT_DISTILL_STEPS
    if steps == cap:
        return cap, (f"{cap} steps{', the default at 4-bit weights and below' if low else ''} (a step at batch "
                     f"{batch}: ~{step:.1f} s by the probe)")
    return steps, (f"{steps} steps: a step at batch {batch} takes ~{step:.1f} s by the probe, and the default "
                   f"{cap}{' at 4-bit weights' if low else ''} would take ~{cap * step / 60:.0f} min (the budget is "
                   f"{RUN_BUDGET_SECONDS // 60} min; --steps overrides)")


def revised_steps(seconds: float, probe_seconds: float, steps: int, done: int,
                  cap: int = DISTILL_STEPS) -> tuple[int, str] | None:
    """(the length of a budgeted run whose first `done` steps took `seconds` each, the sentence that says why), or
    None where its length `steps` (from the probe's `probe_seconds` a step, at most `cap`) stands."""
    revised = max(done, _budgeted(seconds, cap))
    if abs(revised - steps) <= REVISE_TOLERANCE * steps:
        return None
    return revised, (f"{revised} steps, not {steps}: the first {done} took ~{seconds:.1f} s each where the probe "
                     f"said ~{probe_seconds:.1f} s (the budget is {RUN_BUDGET_SECONDS // 60} min of steps; --steps "
                     "overrides)")


def _step(model, input_name: str, x: np.ndarray, tensors: list[str]) -> float:
    """Seconds of one training-mode forward and backward of `x`."""
    t0 = time.perf_counter()
    outs = model.forward({input_name: x}, training=True, outputs=tensors)
    model.backward([np.ones_like(o) for o in outs])
    return time.perf_counter() - t0


def _step_peak(model, input_name: str, x: np.ndarray, tensors: list[str]) -> int:
    """Peak bytes numpy allocated during one training-mode forward and backward of `x` (tracing slows the step
    several times over: `_step` times it)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        _step(model, input_name, x, tensors)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def choose_batch(session, data, tensors: list[str], budget: int = TRAIN_BUDGET,
                 limit: int = DEFAULT_BATCH) -> BatchChoice:
    """The default training batch of `session` on `data`, asking the model for `tensors` (the objective's): the
    largest that fits `budget`, at most `limit`."""
    from .recipe import _probing

    group = max(data.groups, key=lambda g: int(np.prod(data.item_shape(int(g[0])))))  # the largest inputs
    x2, _ = data.batch(group[:2] if len(group) > 1 else np.repeat(group[:1], 2))
    model = session.model
    with np.errstate(all="ignore"), _probing(model) as restore:
        _step_peak(model, session.input_name, x2[:1], tensors)  # first-use allocations (caches) out of the way
        restore()
        one = _step_peak(model, session.input_name, x2[:1], tensors)
        restore()
        two = _step_peak(model, session.input_name, x2, tensors)
        restore()
    per_image = max(two - one, 1)
    return BatchChoice(int(max(1, min(limit, budget // per_image))), per_image, budget, limit)


def step_time(session, data, tensors: list[str]) -> StepTime:
    """An untraced training step's time on inputs of the median size, from steps at batch 1 and 2 (a step's
    per-op overhead does not grow with the batch); observers held and the state put back, like choose_batch."""
    from .recipe import _probing

    groups = sorted(data.groups, key=lambda g: int(np.prod(data.item_shape(int(g[0])))))
    group = groups[len(groups) // 2]
    x2, _ = data.batch(group[:2] if len(group) > 1 else np.repeat(group[:1], 2))
    fixed = session.model.fixed_batch is not None  # a batch of 1 convert could not free
    times = []
    with np.errstate(all="ignore"), _probing(session.model) as restore:
        # the first step at each input shape pays its first-use costs: not timed
        for x in (x2[:1], x2[:1]) if fixed else (x2[:1], x2[:1], x2, x2):
            times.append(_step(session.model, session.input_name, x, tensors))
            restore()
    if fixed:  # it trains at batch 1 only: the step's time is all there is
        return StepTime(times[1], 0.0)
    one, two = times[1], times[3]
    per_image = max(two - one, 0.0)
    return StepTime(max(one - per_image, 0.0), per_image)
