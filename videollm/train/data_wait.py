"""How much of training time goes to waiting for data, logged with the loss as `data_wait_fraction`.

Video batches are expensive to produce (decoding, resizing, sometimes a decode subprocess per sample), and a run that
is input-bound looks just like a slow one in the loss curve. The Trainer's logs say samples/s but not why; timm and
torchtitan print a data-loading time per step for that reason, and transformers has no such number, so this mixin adds
it: the wall time the training loop spent blocked on the next batch, over the wall time it trained since the last log
(evaluations and checkpoint saves left out). Near 0 the accelerator is the bottleneck; near 1 more DataLoader workers
(or a feature cache) will help.

Host-side timing: on a GPU the loop runs ahead of the device until something synchronises, so a fetch that overlaps
queued GPU work counts as waiting only if the queue ran dry meanwhile, which is the waiting that matters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

DATA_WAIT_KEY = "data_wait_fraction"


class DataWaitMixin:
    """Trainer mixin: times every fetch of the training loop and logs `data_wait_fraction` with each loss entry.

    Put it before `transformers.Trainer` (or a TRL trainer) in the bases. `data_wait_clock` is the time source (seconds).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_wait_clock: Callable[[], float] = time.perf_counter
        self._data_wait_seconds = 0.0
        self._data_wait_since: float | None = None

    def get_batch_samples(self, epoch_iterator, num_batches: int, device) -> tuple[list, Any]:
        started = self.data_wait_clock()
        if self._data_wait_since is None:  # the first fetch of the run starts the clock
            self._data_wait_since = started
        try:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        finally:
            self._data_wait_seconds += self.data_wait_clock() - started

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        started = self.data_wait_clock()
        try:
            return super()._maybe_log_save_evaluate(*args, **kwargs)
        finally:
            # Evaluation and checkpoint saves (after the log entry, if one is written here) are not training time: left
            # in, an evaluation at every log would shrink the next share by the evaluation's length.
            if self._data_wait_since is not None:
                self._data_wait_since += self.data_wait_clock() - max(started, self._data_wait_since)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._data_wait_since is not None:
            now = self.data_wait_clock()
            elapsed = now - self._data_wait_since
            logs[DATA_WAIT_KEY] = round(min(self._data_wait_seconds / elapsed, 1.0), 4) if elapsed > 0 else 0.0
            self._data_wait_seconds, self._data_wait_since = 0.0, now
        super().log(logs, start_time)
