"""Retreat: when a validation finds the int8 model worse than the run's start, go back and go slower.

The start is post-training quantization with the run's own placement (qatool.eval.validation): a QAT step
that leaves the int8 model below it has made things worse than no training at all. Keep-best already keeps
the start as the int8 model in that case, but the rest of the run is then wasted. Instead the run goes back to
the state of the best validation so far (weights, BatchNorm statistics, observer ranges; the optimizer's
moments start afresh) and continues at a tenth of its learning rate, at most `limit` times.

Measured (docs/benchmarks.md section 8, session 15): on ddddocr's CNN + BiLSTM recogniser, Adam 1e-4 took the
validation agreement with float from the start's 87.0 % to 45.7 % at step 200 and never back above 53 %
(session 14: 1e-5 held it at ~90 %, 1e-9, observers alone, raised it to 92.3 %). With retreat each of three
seeds went back twice (to step 0, then at 1e-5 and 1e-6) and ended above its start: 95.0 / 90.3 / 90.7 % on
validation (starts 87.0 / 88.3 / 89.0 %), 91.3 / 91.0 / 91.7 % of the test strings read as float reads them. On
PP-OCRv4 rec every validation lay above the start, so nothing changes there.

"Below the start" means below it by more than the validation's noise margin (Validator.margin: one standard
error of a share over the validation inputs, one image for a classifier, none for a score in dB), the margin
keep-best already uses. Without it a dip of 4 lines in 300 (PP-OCRv4 rec with `--update-scale tensor`, session
17: 0.840 against a start of 0.853, where one standard error is 2.0 points) sent a run back to a tenth of its lr;
the falls retreat is for are tens of points (lstmrec: 0.43-0.46 against starts of 0.87-0.89).

The best state is a copy in memory, taken when a validation becomes the kept one (Validator.best). The retreats
are recorded beside the validations (Validator.retreats, which every checkpoint and report.json's `val` carry):
a resumed run takes its lr scale from them, and can go back only to a best it validated itself.
"""

from __future__ import annotations

import numpy as np

RETREAT_FACTOR = 0.1
RETREAT_LIMIT = 2


class Retreat:
    """Watches a Validator (qatool.eval.validation) for the loop: `lr_scale` multiplies the scheduled lr;
    `after_validation(step)` returns True when it has restored the best state (the loop then starts a fresh
    optimizer)."""

    def __init__(self, validator, model, events: list[dict] | None = None, echo=None,
                 factor: float = RETREAT_FACTOR, limit: int = RETREAT_LIMIT):
        self.validator = validator
        self.model = model
        self.events = events if events is not None else []
        self.echo = echo or (lambda s: None)
        self.factor = factor
        self.limit = limit
        self.saved: tuple[int, dict[str, np.ndarray]] | None = None

    @property
    def lr_scale(self) -> float:
        return self.factor ** len(self.events)

    def begin(self, step: int) -> None:
        """The loop starts at `step`: keep its state if it is the best validated (a fresh run's start)."""
        self._keep_if_best(step)

    def after_validation(self, step: int) -> bool:
        """The validation at `step` is recorded: keep a new best, or go back to the best when below the start."""
        self._keep_if_best(step)
        v = self.validator
        start, last = v.start, v.history[-1]
        if start is None or last["step"] != step or not last[v.key] < start - v.margin(start) \
                or self.saved is None or len(self.events) >= self.limit:
            return False
        best_step, arrays = self.saved
        for name, value in arrays.items():
            self._live()[name][...] = value
        self.events.append({"step": step, "score": last[v.key], "start": start, "back_to": best_step,
                            "lr_scale": self.factor ** (len(self.events) + 1)})
        self.echo(f"step {step}: {v.key} {last[v.key]:.4g} is below the start's {start:.4g}; back to step "
                  f"{best_step}'s state, lr x{self.lr_scale:g} from here")
        return True

    def _live(self) -> dict[str, np.ndarray]:
        return {**self.model.params, **self.model.state}

    def _keep_if_best(self, step: int) -> None:
        best = self.validator.best
        if best is not None and best["step"] == step:
            self.saved = (step, {k: v.copy() for k, v in self._live().items()})
