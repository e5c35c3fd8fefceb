"""A one-line progress bar on stderr: step, loss, running accuracy, lr, it/s and ETA; silent when not a TTY."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        self.last_draw = 0.0

    def update(self, step: int, **fields: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and step + 1 < self.total:
            return
        self.last_draw = now
        done = step + 1 - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        width = 24
        filled = int(width * (step + 1) / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items() if v is not None)
        self.stream.write(f"\r[{bar}] {step + 1}/{self.total}  {info}  {rate:.1f} it/s  ETA {eta:.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
