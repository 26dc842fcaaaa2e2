"""Several predictions in one process, as Cog's async `run()` with `@cog.concurrent` runs them.

Each prediction runs in its own thread, so the pixel work of one (decode, mask, crops, composite,
encode) overlaps the model work of another. The model's work takes turns: one request at a time on
the device (`DeviceQueue`), the oldest waiting request first, so a request that has started is not
overtaken by newer ones between its turns (an outpainting's tiles, the safety check), no request
waits for more than the requests older than it, and the GPU memory one request needs is all it
gets. A cancelled request stops at its next check (before its turn, between denoising steps,
between stages) and its thread ends before `run()` reports the cancellation, so nothing of it keeps
the device busy.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

WAIT_CHECK_SECONDS = 0.05  # how often a request waiting for its turn looks whether it was cancelled
OUTPUT_GRACE_SECONDS = 30.0  # an output folder outlives its run() by this much (OutputFolders)


class Cancelled(Exception):
    """The request was cancelled; raised in its own thread at its next check."""


class CancelToken:
    """One request's: set by its coroutine when Cog cancels it, read by its thread. `age` (when it was
    made) ranks the request in the DeviceQueue."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.age = time.monotonic_ns()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the prediction was cancelled")


class DeviceQueue:
    """The model's turn: one holder at a time; of those waiting, the oldest request (CancelToken.age) goes
    first, and among equals the first to ask. A cancelled waiter leaves the line."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._line: list[tuple[int, int]] = []  # (age, ask) of each waiter
        self._asks = 0
        self._held = False

    def acquire(self, token: CancelToken) -> None:
        """Wait for the turn; raises Cancelled (and leaves the line) if `token` is cancelled meanwhile."""
        with self._changed:
            self._asks += 1
            place = (token.age, self._asks)
            self._line.append(place)
            try:
                while self._held or min(self._line) != place:
                    token.check()
                    self._changed.wait(WAIT_CHECK_SECONDS)
            except BaseException:
                self._line.remove(place)
                self._changed.notify_all()
                raise
            self._line.remove(place)
            self._held = True

    def release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    @contextmanager
    def turn(self, token: CancelToken) -> Iterator[None]:
        self.acquire(token)
        try:
            yield
        finally:
            self.release()

    @property
    def waiting(self) -> int:
        """Requests in line for a turn, not counting the one holding it."""
        with self._changed:
            return len(self._line)


async def run_cancellable(call: Callable[[CancelToken], T]) -> T:
    """`call(token)` in a thread of the event loop's executor, with this context (Cog's metric scope and
    log routing are context variables). If the awaiting task is cancelled, the token is set and the
    thread is awaited to its end before the cancellation goes on."""
    token = CancelToken()
    work = asyncio.ensure_future(asyncio.to_thread(call, token))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        token.cancel()
        try:
            await work
        except BaseException:  # Cancelled, or whatever it failed with on the way out: the cancellation wins
            pass
        raise


class OutputFolders:
    """A fresh folder per prediction for its files, removed `grace_seconds` after its `run()` returned.

    Cog's server reads a returned Path after `run()` returns: the worker sends the path, and the server
    reads the file as that message arrives, before the prediction's end (coglet, orchestrator.rs,
    SlotResponse::FileOutput), so within moments. With one prediction at a time the next `run()` could
    remove the last one's folder; with several, a folder whose prediction has returned cannot be told
    read or not from here, so it is given a grace period. (Returning open files instead leaves a copy of
    every output in the server's own folder, never removed.) Expired folders go whenever one is made."""

    def __init__(self, grace_seconds: float = OUTPUT_GRACE_SECONDS) -> None:
        self.grace_seconds = grace_seconds
        self._lock = threading.Lock()
        self._returned: deque[tuple[float, Path]] = deque()
        # Those still in their grace go when the process exits (or this object does): nothing reads them then.
        weakref.finalize(self, _remove_all, self._returned)

    @contextmanager
    def folder(self) -> Iterator[Path]:
        self._remove_expired()
        path = Path(tempfile.mkdtemp(prefix="inpaint-"))
        try:
            yield path
        finally:
            with self._lock:
                self._returned.append((time.monotonic(), path))

    def _remove_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = []
            while self._returned and now - self._returned[0][0] >= self.grace_seconds:
                expired.append(self._returned.popleft()[1])
        for path in expired:
            shutil.rmtree(path, ignore_errors=True)


def _remove_all(returned: deque[tuple[float, Path]]) -> None:
    for _, path in returned:
        shutil.rmtree(path, ignore_errors=True)
