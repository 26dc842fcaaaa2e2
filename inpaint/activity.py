"""The predictions in progress in run(), kept in a file that script/probe reads: whether Cog's server has
lost its prediction slots, and whether a stopping container has finished its predictions.

Cog's server (coglet 0.23.1) loses a prediction slot for good when a request's `id` holds a NUL or is
over 255 bytes: it cannot make the prediction's output folder ("File name too long"), and the request
never reaches run(). Once every slot is lost, /health-check says BUSY for good and every request gets
409 (docs/serving.md). The model cannot refuse such ids, but it can tell that state from a busy one:
BUSY while no run() is in progress, for far longer than a request takes to reach run(). So each run()
counts itself in and out here, and the probes fail then, so that the orchestrator restarts the
container.

On SIGTERM the same server drops an async prediction that is still running, with no final webhook
(docs/serving.md). The same record tells a preStop hook (`script/probe drain`) when none is left to drop.
Standard library only: the probe imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE_NAME = "inpaint-activity.json"  # in the temporary folder (TMPDIR), which the server and its probes share
LOST_AFTER_SECONDS = 60.0  # BUSY with no run() in progress this long: the slots are lost
# Draining: no run() in progress this long, and the last prediction's output and final webhook, which Cog's
# server sends once run() has returned, are out (tests/test_deploy.py checks it through the server).
QUIET_SECONDS = 2.0
SERVING = {"READY", "BUSY"}  # setup done, predictions served (BUSY: every slot in use)


def activity_file() -> Path:
    return Path(tempfile.gettempdir()) / FILE_NAME


class Activity:
    """This process's predictions in progress, written to `file` (atomically) as each starts and ends."""

    def __init__(self, file: Path | None = None) -> None:
        self.file = file or activity_file()
        self._lock = threading.Lock()
        self._running = 0
        self._write()
        weakref.finalize(self, self.file.unlink, missing_ok=True)  # removed when the process exits: nothing left behind

    @contextmanager
    def prediction(self) -> Iterator[None]:
        """Around one run()."""
        self._count(1)
        try:
            yield
        finally:
            self._count(-1)

    def _count(self, step: int) -> None:
        with self._lock:  # one writer at a time: the last file written holds the last count
            self._running += step
            self._write()

    def _write(self) -> None:
        record = {"running": self._running, "changed": time.time()}
        partial = self.file.with_name(f".{self.file.name}.{os.getpid()}")
        partial.write_text(json.dumps(record))
        os.replace(partial, self.file)  # a probe reads the old record or the new one, never half of one


def _read(file: Path) -> tuple[int, float] | None:
    """(predictions in run(), when that count last changed), or None for no record or one that cannot be read."""
    try:
        record = json.loads(file.read_text())
        return int(record["running"]), float(record["changed"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def slots_lost(status: str, file: Path, lost_after: float = LOST_AFTER_SECONDS, now: float | None = None) -> str:
    """Why Cog's server looks to have lost its prediction slots, or "" when it does not: it says BUSY, and
    `file` records no run() in progress for `lost_after` seconds. No record (a server without this module),
    or one that cannot be read: "", no judgement."""
    if status != "BUSY":
        return ""
    record = _read(file)
    if record is None:
        return ""
    running, changed = record
    idle = (time.time() if now is None else now) - changed
    if running > 0 or idle < lost_after:
        return ""
    return (f"status BUSY, but no prediction has been in run() for {idle:.0f} s: Cog's server has lost its "
            "prediction slots (coglet 0.23.1, a request id over 255 bytes or with a NUL; docs/serving.md), "
            "and only a restart frees them")


def in_progress(status: str, file: Path, quiet: float = QUIET_SECONDS, now: float | None = None) -> str:
    """What a server about to be stopped has yet to finish, or "" when nothing: a prediction in run(), or one
    that ended under `quiet` seconds ago (its output and final webhook may still be on their way; a request
    let in just now may not have reached run() yet). Nothing while the server is not serving (STARTING, or
    one that only a restart mends), nor with no record that can be read: there is nothing to wait for."""
    record = _read(file)
    if status not in SERVING or record is None:
        return ""
    running, changed = record
    if running > 0:
        return f"{running} prediction{'s' if running > 1 else ''} in run()"
    idle = (time.time() if now is None else now) - changed
    if idle < quiet:
        return (f"no prediction in run() for only {max(idle, 0.0):.1f} s: the last one's output and webhook may be "
                "on their way")
    return ""
