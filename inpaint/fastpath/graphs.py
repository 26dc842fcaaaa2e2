"""A part's call replayed as a CUDA graph, one graph per GraphKey.

At 512x512 one UNet call is many small kernels, and launching them one by one from Python takes
longer than running them on an H100: the CPU, not the GPU, sets the pace (bench/RESULTS.md, "Fast
path parts", CUDA graphs). A CUDA graph records those launches once and replays them with one call:
the same kernels on the same memory, so the same numbers.

The first call at a new key runs eagerly (its result is that call's result) and then records the
graph, which costs no GPU work; every later call at that key copies its inputs into the graph's own
buffers and replays it. A key whose recording fails runs eagerly for a while and is then tried again.
The graphs kept are bounded by the GPU memory their pools hold, measured as each is recorded.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .keys import GraphKey, ShapeKey

log = logging.getLogger(__name__)

# Largest batch x height x width of latents that gets a graph: at 1024x1024 x4 (batch 8 at 128x128)
# the GPU is busy long enough that launches no longer matter. 2 x 128 x 128 covers one output at up
# to 1024x1024 and four at 512x512.
MAX_POSITIONS = 2 * 128 * 128
# The GPU memory the kept graphs may hold together, as a fraction of the GPU's, least recently used
# dropped first. Each graph holds a private pool for the UNet's intermediates, measured when it is
# recorded (bench/RESULTS.md, "Fast path parts", CUDA graphs: about half a GiB at 512x512 x1). If each
# of the 31 automatic working sizes (about 512x512 in area) holds that much, a fifth of an 80 GB GPU
# keeps them all; a 16 GB GPU keeps a few, beside the 1024x1024 x4 peak ("fits a 16 GB GPU").
KEPT_MEMORY_FRACTION = 1 / 5
# Calls a key whose recording failed runs eagerly before it is recorded again (two 50-step
# predictions): a failure from a passing cause (memory held by a neighbour, say) is not for good.
RETRY_AFTER_CALLS = 100


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    bytes: int = 0  # the GPU memory its pool holds


@dataclass
class _Failed:
    calls_left: int


class Graphs:
    """The CUDA graphs of one part's calls, least recently used dropped first to keep their memory under
    `max_kept_bytes` (None: KEPT_MEMORY_FRACTION of the GPU's). Safe to call from several threads (one
    records or replays at a time)."""

    def __init__(self, max_positions: int = MAX_POSITIONS, max_kept_bytes: int | None = None,
                 retry_after_calls: int = RETRY_AFTER_CALLS) -> None:
        self.max_positions = max_positions
        self.max_kept_bytes = max_kept_bytes
        self.retry_after_calls = retry_after_calls
        self.graphs: OrderedDict[GraphKey, _Graph | _Failed] = OrderedDict()
        self._lock = threading.Lock()

    def replayable(self, key: ShapeKey) -> bool:
        """Whether calls of `key` may get a graph: CUDA tensors only, no autograd, not inside another
        capture, and no larger than max_positions."""
        return (
            all(device.startswith("cuda") for *_, device in key.inputs)
            and not torch.is_grad_enabled()
            and key.positions() <= self.max_positions
            and not torch.cuda.is_current_stream_capturing()
        )

    def kept_bytes(self) -> int:
        """The GPU memory the kept graphs hold together."""
        return held_bytes(self.graphs)

    def run(self, key: GraphKey, call: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, bool]:
        """`call(*inputs)`, replayed from the graph of `key`, or computed and then recorded; and False
        when its recording failed just now (that call's output is still returned)."""
        with self._lock:
            entry = self.graphs.get(key)
            if entry is None:
                return self._record(key, call, inputs)
            self.graphs.move_to_end(key)
            if isinstance(entry, _Failed):
                entry.calls_left -= 1
                if entry.calls_left <= 0:
                    del self.graphs[key]  # recorded again at the next call
                return call(*inputs), True
            for kept, value in zip(entry.inputs, inputs):
                kept.copy_(value)
            entry.graph.replay()
            return entry.output.clone(), True  # the next replay overwrites entry.output; schedulers may keep this

    def _record(self, key: GraphKey, call, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, bool]:
        """Run this call eagerly on a side stream (its result is returned), then record the graph."""
        device = torch.device(key.shape.device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            output = call(*inputs)
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        output.record_stream(current)  # made on the side stream, used and freed on the current one
        for stale in [other for other in self.graphs if other.shape == key.shape]:  # the same call, recorded from the other part
            del self.graphs[stale]
        if self.max_kept_bytes is None:
            self.max_kept_bytes = int(torch.cuda.get_device_properties(device).total_memory * KEPT_MEMORY_FRACTION)
        try:
            entry = _Graph(torch.cuda.CUDAGraph(), tuple(value.clone() for value in inputs), output)
            with torch.cuda.graph(entry.graph, capture_error_mode="thread_local"):
                entry.output = call(*entry.inputs)
            entry.bytes = pool_bytes(entry.graph)
            if entry.bytes > self.max_kept_bytes:
                raise MemoryError(f"its pool holds {entry.bytes / 2**30:.2f} GiB, over the "
                                  f"{self.max_kept_bytes / 2**30:.2f} GiB all graphs may hold")
        except Exception as error:  # a kernel that cannot be recorded: that key runs eagerly for a while
            if key.compiled:  # the caller goes back to the uncompiled part, whose graph is recorded next call
                log.warning("CUDA graph of the compiled %s not recorded (%s: %s); that shape goes back to the "
                            "uncompiled part for the next %d calls, then the compiled one is tried again", key.shape,
                            type(error).__name__, error, RETRY_AFTER_CALLS)
            else:
                log.warning("CUDA graph at %s not recorded (%s: %s); that shape runs eagerly for the next %d calls, "
                            "then recording is tried again", key.shape, type(error).__name__, error, self.retry_after_calls)
                self.graphs[key] = _Failed(self.retry_after_calls)
            return output, False
        make_room(self.graphs, entry.bytes, self.max_kept_bytes)
        self.graphs[key] = entry
        log.info("CUDA graph recorded for %s %s (%.2f GiB; %d kept, %.2f GiB)", "compiled" if key.compiled else "eager",
                 key.shape, entry.bytes / 2**30, len(self.graphs), self.kept_bytes() / 2**30)
        return output, True

    def clear(self) -> None:
        """Drop every recorded graph and the memory it holds (after an out-of-memory error, say)."""
        with self._lock:
            self.graphs.clear()


def pool_bytes(graph: torch.cuda.CUDAGraph) -> int:
    """The GPU memory a recorded graph's private pool holds: the allocator's segments of that pool (as
    torch's own cudagraph_trees finds them)."""
    pool = tuple(graph.pool())
    return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot(include_traces=False)
               if tuple(segment["segment_pool_id"]) == pool)


def held_bytes(graphs: OrderedDict[GraphKey, _Graph | _Failed]) -> int:
    """The GPU memory these graphs' pools hold (a key that runs eagerly holds no graph and counts 0)."""
    return sum(entry.bytes for entry in graphs.values() if isinstance(entry, _Graph))


def make_room(graphs: OrderedDict[GraphKey, _Graph | _Failed], size: int, limit: int) -> None:
    """Drop the least recently used graphs until one of `size` bytes more fits under `limit`."""
    while graphs and held_bytes(graphs) + size > limit:
        graphs.popitem(last=False)
