"""Which threads of a running process hold the GIL, sampled from outside it by py-spy (`record --gil`).

A stage made of many small eager kernels spends its host time launching them from Python, and a
thread that needs the GIL for each launch waits whenever another thread runs Python: on the CPU,
bench/candidates.py's "beside a busy Python thread" row shows how much that costs. This tells, for
Cog's server worker during predictions, whether any thread other than the prediction's takes the GIL.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

RATE = 100  # samples a second: py-spy's default


def py_spy() -> str | None:
    """The py-spy executable: on PATH, beside this interpreter, or in a `pip install --target` folder on sys.path."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found:
        return found
    for entry in sys.path:
        candidate = Path(entry or ".") / "bin" / "py-spy"
        if candidate.is_file():
            return str(candidate)
    return None


def children(pid: int) -> list[int]:
    """The process ids of `pid`'s children, as the kernel lists them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def worker(server_pid: int) -> int | None:
    """Cog's worker process under its HTTP server (coglet runs the model in a child of its own), if any."""
    for child in children(server_pid):
        try:
            if b"coglet" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def thread_name(frame: str) -> str:
    """`thread (8690): asyncio_0` -> `asyncio_0`; a thread without a Python name keeps its id."""
    head = frame.split(";", 1)[0]
    return head.split("): ", 1)[1] if "): " in head else head


class GilSampler:
    """`with GilSampler(pid) as sampler: ...`: py-spy samples `pid` for the block's duration; then
    `samples` holds, per thread name, the samples in which that thread held the GIL, and `seconds`
    how long it sampled (`error` says why not, when py-spy is missing or cannot attach)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: Counter[str] = Counter()
        self.seconds = 0.0
        self.error: str | None = None
        self._process: subprocess.Popen | None = None
        self._folder: tempfile.TemporaryDirectory | None = None  # py-spy's output, removed once read

    def __enter__(self) -> GilSampler:
        executable = py_spy()
        if executable is None or self.pid is None:
            self.error = "py-spy is not installed" if executable is None else "no process to sample"
            return self
        self._folder = tempfile.TemporaryDirectory(prefix="gil-")
        self._started = time.monotonic()
        self._process = subprocess.Popen(
            [executable, "record", "--pid", str(self.pid), "--gil", "--threads", "--nonblocking", "--rate", str(RATE),
             "--format", "raw", "--output", str(self._output())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def _output(self) -> Path:
        return Path(self._folder.name) / "gil.txt"

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        try:
            self._read()
        finally:
            self._folder.cleanup()

    def _read(self) -> None:
        """End py-spy and count, per thread, the samples in which it held the GIL."""
        self.seconds = time.monotonic() - self._started
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then ends
        try:
            _, stderr = self._process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, stderr = self._process.communicate()
        output = self._output()
        if not output.is_file():
            lines = [line for line in stderr.splitlines() if line.strip()]
            self.error = f"py-spy wrote nothing (code {self._process.returncode}): {lines[-1] if lines else 'no message'}"
            return
        for line in output.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                self.samples[thread_name(stack)] += int(count)

    def figures(self) -> dict[str, object]:
        """{"seconds", "held": the share of samples in which any thread held the GIL, "by_thread": each
        holder's share of those} or {"error"}."""
        if self.error:
            return {"error": self.error}
        total = sum(self.samples.values())
        expected = max(1.0, RATE * self.seconds)
        return {"seconds": round(self.seconds, 1), "held": round(min(1.0, total / expected), 3),
                "by_thread": {name: round(count / total, 3) for name, count in self.samples.most_common()} if total else {}}

    def text(self) -> str:
        figures = self.figures()
        if "error" in figures:
            return f"GIL holders not sampled ({figures['error']})"
        holders = ", ".join(f"{name} {100 * share:.0f}%" for name, share in figures["by_thread"].items()) or "none"
        return (f"the GIL was held in {100 * figures['held']:.0f}% of py-spy's samples over {figures['seconds']:.0f} s, "
                f"by: {holders}")
