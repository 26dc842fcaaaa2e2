"""How the benches time things, in one place: the package's Stopwatch (CUDA events on a GPU, wall time
on the CPU) around each call, and each stage's median over predictions."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inpaint.stopwatch import Stopwatch  # noqa: E402


def median_ms(function, device: torch.device, runs: int, warm_up: bool = True) -> tuple[float, object]:
    """Median ms of `runs` calls, each timed on its own, and the last result."""
    if warm_up:
        function()  # warm-up (and compile, or the CUDA graph's recording, at a new shape)
    times, value = [], None
    for _ in range(runs):
        watch = Stopwatch(device)
        with watch.time("run"):
            value = function()
        times.append(1000 * watch.read()["run"])
    return statistics.median(times), value


def median_stages(timings: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the predictions, in ms, from timings in seconds as pipeline.generate
    writes them (the server's metrics.timings too)."""
    stages = sorted({stage for timing in timings for stage in timing})
    return {stage: round(1000 * statistics.median(timing.get(stage, 0.0) for timing in timings), 1) for stage in stages}
