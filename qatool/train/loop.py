"""The QAT training loop: batches, loss, backward, optimiser, phases (BN / observer freeze), logging, saving.

Every random choice of step i (its batch, its augmentation, its Dropout masks) is drawn from generators seeded
by (seed, i), so a run stopped at step N and resumed gives exactly the run that never stopped.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DivergedError, QatoolError
from .config import TrainConfig
from ..data.images import batch_indices
from . import footprint
from .optim import learning_rate, make_optimizer, step_sizes, tensor_sizes
from .progress import Progress
from .session import QatSession


class TrainingInterrupted(QatoolError):
    exit_code = 130


class TrainingDiverged(QatoolError):
    pass


def _diverged(step: int, what: str, saved: bool) -> TrainingDiverged:
    kept = "the last checkpoint saved is kept" if saved else "no checkpoint was saved"
    return TrainingDiverged(f"training diverged at step {step} ({what}); {kept} — lower --lr or check the data")


@dataclass
class Phases:
    freeze_bn_after: int
    freeze_observers_after: int

    @classmethod
    def resolve(cls, total: int, freeze_bn_after: int | None, freeze_observers_after: int | None) -> Phases:
        """Defaults: BN freezes after half the steps, observers after three quarters."""
        bn = freeze_bn_after if freeze_bn_after is not None else total // 2
        obs = freeze_observers_after if freeze_observers_after is not None else (3 * total) // 4
        return cls(bn, obs)


@dataclass
class TrainResult:
    steps: int
    ms_per_step: float
    final_loss: float
    interrupted: bool = False


class _StopFlag:
    """Ctrl-C asks the loop to stop after the current step (so the checkpoint is consistent)."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(session: QatSession, data, cfg: TrainConfig, phases: Phases, start: int, total: int,
          optimizer_state: dict[str, np.ndarray] | None, save: Callable[[int, dict], None],
          metrics_path: Path | None = None, quiet: bool = False, objective=None,
          validate: Callable[[int], float] | None = None, validate_every: int | None = None,
          revise: Callable[[int, float], tuple[int, Phases, int] | None] | None = None,
          retreat=None) -> TrainResult:
    """Run steps [start, total). `save(step, optimizer_arrays)` writes a checkpoint at `step`. `objective`
    (qatool.train.objective: the tensors a step computes, their loss and its gradients; default: cross-entropy
    on the session's logits) is what the step trains. `validate(step)` (see qatool.eval.validation) runs
    every `validate_every` steps before the last one (the last step is measured by the export that follows).
    `revise(done, seconds)`, for a run whose length a time budget chose, is called once after the first
    REVISE_AFTER steps with their median time (the first one's warm-up left out) and may return the run's new
    (total, phases, validate_every). `retreat` (qatool.train.retreat.Retreat, watching `validate`): after a
    validation below the start, the best state so far comes back, the lr is scaled down and the optimizer starts
    afresh."""
    from .objective import LabelledClasses

    from .config import CLASSIFIER_RECIPE

    model = session.model
    objective = objective or LabelledClasses(session.logits)
    cfg = cfg.with_recipe(CLASSIFIER_RECIPE)  # what is left unset (the pipelines set their recipe's first)
    # --scale-lr: the LSQ step sizes get their own learning rate, scheduled as lr is; under Adam it is relative
    # (a step moves a step size by about that fraction of itself)
    multipliers = {k: cfg.scale_lr / cfg.lr for k in session.learned_scales} if cfg.scale_lr is not None else {}
    trained = {k: v for k, v in model.params.items() if k not in session.learned_scales}
    if cfg.update_scale == "tensor":
        multipliers.update(tensor_sizes(trained))
    elif cfg.update_scale == "step":
        multipliers.update(step_sizes(trained, session.weight_steps()))

    def fresh_optimizer():
        return make_optimizer(cfg.optimizer, model.params, cfg.lr, cfg.momentum, cfg.weight_decay, multipliers,
                              relative=session.learned_scales)

    opt = fresh_optimizer()
    if optimizer_state:
        opt.load_state_arrays({k.removeprefix("optim/"): v for k, v in optimizer_state.items()
                               if k.startswith("optim/")})

    def optim_arrays() -> dict:
        return {f"optim/{k}": v for k, v in opt.state_arrays().items()}

    saved = [start > 0]  # a resumed run continues from a saved checkpoint

    def diverged(at: int, what: str) -> TrainingDiverged:
        return _diverged(at, what, saved[0])

    def checkpoint(at: int) -> None:
        """Save, unless the parameters went non-finite: a diverged state never replaces a good checkpoint."""
        bad = next((k for k, v in model.params.items() if not np.isfinite(v).all()), None)
        if bad is not None:
            raise diverged(at, f"parameter {bad!r} is not finite")
        try:
            save(at, optim_arrays())
        except DivergedError as e:
            raise diverged(at, str(e)) from None
        saved[0] = True

    progress = Progress(total, start, enabled=None if not quiet else False)
    log = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    times: list[float] = []
    loss = float("nan")
    correct = seen = 0
    step = start
    if retreat is not None:
        retreat.begin(start)
    pending = data.prefetch(batch_indices(data.groups, cfg.batch_size, start, cfg.seed)) if start < total else None
    try:
        with _StopFlag() as stop:
            while step < total:
                if stop.requested:
                    checkpoint(step)
                    raise TrainingInterrupted(f"interrupted at step {step}; resume with --resume")
                t0 = time.perf_counter()
                session.set_phase(step, phases.freeze_bn_after, phases.freeze_observers_after)
                idx = batch_indices(data.groups, cfg.batch_size, step, cfg.seed)
                raw = pending.result()
                if step + 1 < total:  # decode the next batch while this one trains (streamed data sets)
                    pending = data.prefetch(batch_indices(data.groups, cfg.batch_size, step + 1, cfg.seed))
                x = data.to_input(raw, idx, np.random.default_rng([cfg.seed, step, 1]) if cfg.augment else None)
                y = data.labels_of(idx)
                model.ctx.rng = np.random.default_rng([cfg.seed, step, 2])
                lr = learning_rate(step, total, cfg.lr, cfg.schedule, cfg.warmup_steps, cfg.step_size,
                                   cfg.step_gamma) * (retreat.lr_scale if retreat is not None else 1.0)
                with np.errstate(over="ignore", invalid="ignore"):  # divergence is detected, not warned about
                    try:
                        outs = model.forward({session.input_name: x}, training=True, outputs=objective.tensors)
                    except DivergedError as e:
                        raise diverged(step, str(e)) from None
                    loss, grads, hits = objective(outs, x, y)
                    if not np.isfinite(loss):
                        raise diverged(step, f"loss {loss}")
                    opt.step(model.backward(grads), lr=lr)
                    collapsed = session.nonpositive_scale()
                    if collapsed:
                        raise diverged(step, f"learned step size {collapsed[0]!r} fell to {collapsed[1]:.3g}, "
                                              "not above zero: lower --scale-lr")
                times.append(time.perf_counter() - t0)
                running = None
                if hits is not None:  # the running training accuracy, where there are labels to count
                    correct += hits
                    seen += len(x)
                    running = correct / seen
                record = {"step": step + 1, "loss": round(loss, 6), "acc": None if running is None else
                          round(running, 6), "lr": lr, "ms": round(times[-1] * 1000, 2),
                          "bn_frozen": model.ctx.bn_frozen, "observers_frozen": model.ctx.observers_frozen}
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()  # a user may follow the run with tail -f
                progress.update(step, loss=loss, acc=running, lr=lr)
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                    checkpoint(step + 1)
                if validate and validate_every and (step + 1) % validate_every == 0 and step + 1 < total:
                    try:
                        validate(step + 1)
                    except DivergedError as e:
                        raise diverged(step + 1, str(e)) from None
                    if retreat is not None and retreat.after_validation(step + 1):
                        opt = fresh_optimizer()
                step += 1
                if revise and step - start == footprint.REVISE_AFTER and step < total:
                    revised = revise(step, float(np.median(times[1:])))
                    if revised is not None:
                        total, phases, validate_every = revised
                        progress.total = total
            checkpoint(total)
    except KeyboardInterrupt:  # a second Ctrl-C, possibly mid-step: nothing consistent to save
        raise TrainingInterrupted(f"interrupted twice at step {step}; stopped without saving") from None
    finally:
        progress.close()
        if log:
            log.close()
    # The first steps include warm-up costs (allocations, caches): the median is the fair figure.
    ms = float(np.median(times) * 1000) if times else 0.0
    return TrainResult(steps=total, ms_per_step=ms, final_loss=loss)
