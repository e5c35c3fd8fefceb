"""A default training batch that fits: measured from what one image's training step holds.

A classifier at 224x224 trains at batch 64 in a few GB; a text detector at 640x640 holds ~0.6 GB per image
(forward values kept for backward, gradients), so batch 64 would need ~40 GB. The step's working set grows
linearly with the batch, so two probe steps (forward and backward, at batch 1 and 2, after a first one that
makes the first-use allocations, observers held and the state put back) give the bytes per image as the difference of their peaks (numpy reports its allocations to
tracemalloc), and the default batch is the largest that fits the budget, at most DEFAULT_BATCH.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass

import numpy as np

DEFAULT_BATCH = 64
TRAIN_BUDGET = 6 * 1024**3  # the working set of one training step (the process also holds data, teacher, ...)


@dataclass
class BatchChoice:
    batch_size: int
    bytes_per_image: int
    budget: int

    def summary(self) -> str:
        per = self.bytes_per_image / 1024**2
        if self.batch_size >= DEFAULT_BATCH:
            return f"batch {self.batch_size} (one image's training step holds {per:,.0f} MB)"
        return (f"batch {self.batch_size}: one image's training step holds {per:,.0f} MB, and {self.batch_size} fit "
                f"the {self.budget / 1024**3:.0f} GB budget of a step (the default {DEFAULT_BATCH} would not; "
                "--batch-size overrides)")

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "bytes_per_image": self.bytes_per_image, "budget": self.budget}


def _step_peak(model, input_name: str, x: np.ndarray, tensors: list[str]) -> int:
    """Peak bytes numpy allocated during one training-mode forward and backward of `x`."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        outs = model.forward({input_name: x}, training=True, outputs=tensors)
        model.backward([np.ones_like(o) for o in outs])
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def choose_batch(session, data, tensors: list[str], budget: int = TRAIN_BUDGET) -> BatchChoice:
    """The default training batch of `session` on `data`, asking the model for `tensors` (the objective's)."""
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
    return BatchChoice(int(max(1, min(DEFAULT_BATCH, budget // per_image))), per_image, budget)
