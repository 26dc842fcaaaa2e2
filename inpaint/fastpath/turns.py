"""Turns between predictions and the compile worker's work in this process: predictions first.

A prediction's eager stages launch many small kernels from Python, and each launch takes the GIL
back when it returns. The worker's work in this process (loading a compiled part, checking it against
the eager part, sealing the cache) is Python that holds the GIL for long stretches, and beside it a
prediction's stages ran many times slower (bench/RESULTS.md, "A prediction beside the worker's loads").
So each piece of that work takes a turn. It waits until no prediction has held a turn or waited for one
for GRACE seconds; a prediction that arrives during the work waits for that one piece. If predictions
keep the worker waiting for PATIENCE seconds, it takes the next turn, between two predictions. Under
steady traffic, what it loads is still taken up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Quiet seconds before the worker starts a piece of work: longer than the hand-over from one request to
# the next in the service's DeviceQueue, so that a queued prediction is not overtaken at that moment.
GRACE = 0.25
# Seconds predictions may keep the worker waiting before it takes the next turn.
PATIENCE = 10.0
# How often a prediction waiting for its turn calls its check (a cancelled request leaves the line).
CHECK_SECONDS = 0.05


class Turns:
    """One holder at a time: a prediction (`prediction()`) or a piece of the worker's work (`worker()`)."""

    def __init__(self, grace: float = GRACE, patience: float = PATIENCE) -> None:
        self.grace = grace
        self.patience = patience
        self._state = threading.Condition()
        self._holder: str | None = None  # "prediction" or "worker"
        self._owner: int | None = None  # the thread that holds a prediction's turn
        self._waiting = 0  # predictions waiting for a turn
        self._worker_next = False  # the worker has waited its patience: it has the next turn
        self._released = float("-inf")  # when the last prediction's turn ended (time.monotonic)

    @contextmanager
    def prediction(self, check: Callable[[], None] | None = None) -> Iterator[None]:
        """Around one prediction: its turn, once no one holds one and the worker is not due. Within a turn
        its thread holds already (a request's whole turn on the device, around each of its generations),
        nothing more. `check`, if given, is called while it waits; what it raises (a cancellation) ends the wait."""
        if not self._take_prediction_turn(check):
            yield
            return
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def worker(self) -> Iterator[None]:
        """Around one piece of the worker's work: its turn, once predictions have been quiet for `grace`
        seconds, or the next turn after `patience` seconds of waiting."""
        self._take_worker_turn()
        try:
            yield
        finally:
            self._release()

    def _take_prediction_turn(self, check: Callable[[], None] | None) -> bool:
        """Wait for a prediction's turn and take it; False, taking nothing, when this thread holds one."""
        with self._state:
            if self._holder == "prediction" and self._owner == threading.get_ident():
                return False
            self._waiting += 1
            try:
                while not (self._holder is None and not self._worker_next):
                    if check is not None:
                        check()
                    self._state.wait(CHECK_SECONDS if check is not None else None)
            finally:
                self._waiting -= 1
                self._state.notify_all()  # one fewer waiting: the worker may be quiet now
            self._holder, self._owner = "prediction", threading.get_ident()
        return True

    def _take_worker_turn(self) -> None:
        with self._state:
            deadline = time.monotonic() + self.patience
            while True:
                now = time.monotonic()
                quiet = self._holder is None and self._waiting == 0
                if quiet and now - self._released >= self.grace:
                    break
                if now >= deadline:
                    self._worker_next = True
                    try:
                        self._state.wait_for(lambda: self._holder is None)
                    finally:
                        self._worker_next = False
                    break
                wake = self._released + self.grace if quiet else deadline
                self._state.wait(max(0.0, min(wake, deadline) - now))
            self._holder = "worker"

    def between(self) -> None:
        """Wait until no turn is held (the prediction running now has ended), without taking one."""
        with self._state:
            self._state.wait_for(lambda: self._holder is None)

    def _release(self) -> None:
        with self._state:
            if self._holder == "prediction":  # the worker's own pieces follow each other without a grace
                self._released = time.monotonic()
            self._holder, self._owner = None, None
            self._state.notify_all()
