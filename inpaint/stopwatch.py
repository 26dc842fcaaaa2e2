"""One way to time the model's work: CUDA events on a GPU, wall time on the CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Stopwatch:
    """Seconds of named stages, added up per name.

    On the CPU each stage's wall time. On CUDA a pair of events around each stage on the current
    stream, read by `read()`: no synchronisation between stages, so the CPU queues each next stage
    while the GPU still runs the last one, as it would untimed.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def time(self, key: str) -> Iterator[None]:
        if self.device.type != "cuda":
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._events.append((key, start, end))

    def read(self) -> dict[str, float]:
        """The seconds so far, per stage (on CUDA this waits for the stages timed so far to end)."""
        for key, start, end in self._events:
            end.synchronize()
            self.seconds[key] = self.seconds.get(key, 0.0) + start.elapsed_time(end) / 1000
        self._events.clear()
        return dict(self.seconds)
