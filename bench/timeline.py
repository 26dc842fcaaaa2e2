"""Where a prediction's GPU time goes: torch profiler timelines (busy time and idle gaps), the UNet's
CUDA graph replayed back to back, and the memory the kept graphs hold."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

import report


def timeline(function, activities, categories: tuple[str, ...]) -> tuple[float, float, list[float], list[tuple[str, float]]]:
    """One run of `function` under torch's profiler: from its trace's events of `categories`, the
    span from the first one's start to the last one's end, the time inside at least one of them
    (busy), the gaps between them, all in ms, and the events' total ms by name, largest first."""
    from torch.profiler import profile

    with profile(activities=activities, acc_events=True) as profiler:  # one cycle: nothing to clear
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = [event for event in json.loads(trace.read_text())["traceEvents"]
                  if event.get("ph") == "X" and event.get("cat") in categories]
    by_name: Counter[str] = Counter()
    for event in events:
        by_name[event.get("name", "?")] += event.get("dur", 0) / 1000
    heaviest = by_name.most_common()
    intervals = sorted((event["ts"], event["ts"] + event.get("dur", 0)) for event in events)
    if not intervals:
        return 0.0, 0.0, [], []
    busy, gaps = 0.0, []
    start, end = intervals[0]
    for begin, finish in intervals[1:]:
        if begin > end:
            busy += end - start
            gaps.append((begin - end) / 1000)
            start = begin
        end = max(end, finish)
    busy += end - start
    return (end - intervals[0][0]) / 1000, busy / 1000, gaps, heaviest


def gpu_busy(function, device: torch.device) -> str:
    """How much of one prediction's GPU span the GPU spent computing (kernels, copies), and its idle
    gaps: whether what lies outside the denoising loop's pace is GPU work or the GPU waiting. The
    heaviest kernels by name go to the progress log (stderr)."""
    if device.type != "cuda":
        return "GPU timeline: no CUDA"
    from torch.profiler import ProfilerActivity

    try:
        span, busy, gaps, heaviest = timeline(function, [ProfilerActivity.CUDA], ("kernel", "gpu_memcpy", "gpu_memset"))
    except Exception as error:  # a diagnostic: never the reason a run fails
        return f"GPU timeline: profiler failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    report.progress("heaviest GPU work by name (ms in one run): "
              + "; ".join(f"{name[:90]} {milliseconds:.1f}" for name, milliseconds in heaviest[:12]))
    idle = sorted(gaps, reverse=True)
    return (f"GPU timeline (one profiled run): busy {busy:.0f} of {span:.0f} ms; {sum(1 for gap in gaps if gap > 0.1)} "
            f"gaps over 0.1 ms, {sum(gap for gap in gaps if gap > 0.1):.0f} ms in all; largest "
            + ", ".join(f"{gap:.1f}" for gap in idle[:3]) + " ms")


def unet_replays(pipe, device: torch.device, calls: int = 51) -> str:
    """GPU ms of `calls` replays of the UNet's most recently used CUDA graph, back to back (a 50-step
    prediction calls the UNet 51 times): the denoising loop's floor with this UNet, apart from the
    scheduler's own kernels and the host."""
    from inpaint.fastpath import FastPart

    part = pipe.unet.forward
    if device.type != "cuda" or not isinstance(part, FastPart) or part.graphs is None:
        return "UNet replays: no CUDA graph"
    recorded = [entry for entry in part.graphs.graphs.values() if hasattr(entry, "graph")]
    if not recorded:
        return "UNet replays: no CUDA graph"
    from inpaint.stopwatch import Stopwatch

    graph = recorded[-1].graph
    graph.replay()
    watch = Stopwatch(device)
    with watch.time("replays"):
        for _ in range(calls):
            graph.replay()
    return f"{calls} UNet replays {1000 * watch.read()['replays']:.0f} ms"


def graph_memory(fast_path) -> tuple[str, float | None]:
    """The UNet's CUDA graphs kept (fastpath/graphs.py): a line, and the GiB their pools hold."""
    part = fast_path.parts.get("unet")
    if part is None or part.graphs is None or part.graphs.max_kept_bytes is None:
        return "none recorded", None
    graphs = part.graphs
    held = graphs.kept_bytes() / 2**30
    kept = sum(1 for entry in graphs.graphs.values() if hasattr(entry, "graph"))
    return f"{kept}, {held:.2f} GiB of their {graphs.max_kept_bytes / 2**30:.2f} GiB budget", round(held, 3)
