"""Judging a model by what its outputs are for: each output's task measures it against the float model's output
on the same inputs (and against labels when there are any), streamed batch by batch.

`Judge.measure(run)` takes any runner (onnxruntime on the int8 model, the engine's simulation, ...) and returns
every output's measures and one score that chooses checkpoints: the headline measure of the first output whose
task decodes something (top-1 agreement, sequence agreement, map IoU, pixel agreement: `measures_share`), else
the mean of the outputs' SQNR in dB (a joined output's: the mean of its fields' SQNR). A user's own metric
(`UserMetric`) replaces that score when given.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Run = Callable[[np.ndarray], dict]  # input batch -> {output name: array}


def score_of(tasks, results: dict) -> tuple[str, float]:
    """(name, value) of the measure that chooses checkpoints (see the module notes)."""
    for t in tasks:
        r = results[t.output]
        if t.measures_share:
            return f"{t.output}: {r['primary']}", float(r[r["primary"]])
    sqnr = [min(float(r[r["primary"]]), 100.0) for r in (results[t.output] for t in tasks)]
    return "mean SQNR (dB)", float(np.mean(sqnr))


class Judge:
    """Measures runs of a model against its float model on `data`, output by output."""

    def __init__(self, tasks, float_run: Run, data, batch_size: int, metric=None):
        self.tasks, self.float_run, self.data, self.batch_size = list(tasks), float_run, data, batch_size
        self.metric = metric

    @property
    def score_is_share(self) -> bool:
        """The score is a share of the inputs in [0, 1] (a decoding task's agreement or IoU), not a user's metric or
        a mean SQNR in dB."""
        return self.metric is None and any(t.measures_share for t in self.tasks)

    def measure(self, run: Run) -> dict:
        """`run` against the float model: {"score", "score_name", "outputs": {output: measures}}."""
        return self.measure_pairs({"model": run}, [("model", "float")])[("model", "float")]

    def measure_pairs(self, runs: dict[str, Run], pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """Each (model, reference) pair of `runs` (plus "float", the float model) measured as `measure` does, in
        one pass: every run is called once per batch. The user's metric scores the models measured against
        float."""
        runs = {"float": self.float_run, **runs}
        meters = {p: [t.meter() for t in self.tasks] for p in pairs}
        users = {p: self.metric.start() for p in pairs if self.metric is not None and p[1] == "float"}
        for x, labels in self.data.batches(self.batch_size):
            outs = {name: run(x) for name, run in runs.items()}
            for (a, b), ms in meters.items():
                for t, m in zip(self.tasks, ms):
                    m.update(outs[a][t.output], outs[b][t.output], labels)
            for (a, _), user in users.items():
                user.update(outs[a], x, labels)
        measured = {}
        for p, ms in meters.items():
            results = {t.output: m.result() for t, m in zip(self.tasks, ms)}
            name, value = score_of(self.tasks, results)
            if p in users:
                name, value = self.metric.name, users[p].result()
            measured[p] = {"score": value, "score_name": name, "outputs": results}
        return measured


def describe(results: dict) -> str:
    """One line of a measurement: the score, then each output's headline measure and SQNR."""
    parts = []
    for out, r in results["outputs"].items():
        head = r["primary"]
        main = f"{head} {r[head]:.4f}" if head != "sqnr_db" else ""
        parts.append(f"{out}: {main}{', ' if main else ''}SQNR {r['sqnr_db']:.1f} dB")
    return "; ".join(parts)
