"""The UNet's forward pass replayed as a CUDA graph, one graph per working shape.

At 512x512 one UNet call is many small kernels, and launching them one by one from Python takes
longer than running them on an H100: the CPU, not the GPU, sets the pace (bench/RESULTS.md, "Fast
path parts", CUDA graphs). A CUDA graph records those launches
once and replays them with one call: the same kernels on the same memory, so the same numbers.

The first call at a new shape runs eagerly (its result is that step's result) and then records the
graph, which costs no GPU work; every later call at that shape copies its inputs into the graph's
own buffers and replays it. Only the denoising loop's plain call is replayed (no extra keyword
inputs, no autograd); anything else, and any shape larger than `max_positions` latent positions,
runs eagerly, as does everything on the CPU. A shape whose recording fails runs eagerly from then on
and says so once in the log.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Largest batch x height x width of latents that gets a graph: a graph keeps its own memory for the
# UNet's intermediates, and at 1024x1024 x4 (batch 8 at 128x128) the GPU is busy long enough that
# launches no longer matter. 2 x 128 x 128 covers one output at up to 1024x1024 and four at 512x512.
MAX_POSITIONS = 2 * 128 * 128
# Latent positions the kept graphs may add up to, least recently used dropped first. A graph's memory
# grows with its positions (measured on an H100: 0.5 GiB held beyond the allocations at 512x512 x1,
# 2x64x64 positions): this keeps eight graphs of the automatic working sizes (about 512x512 in area,
# a few aspect ratios), or two at 1024x1024 x1, rather than one per size ever seen.
MAX_KEPT_POSITIONS = 8 * 2 * 64 * 64

_live: weakref.WeakSet[GraphedForward] = weakref.WeakSet()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    output: torch.Tensor


class GraphedForward:
    """Stands in for `unet.forward` (install with `use_cuda_graphs`); same arguments, same results."""

    def __init__(self, forward, max_positions: int = MAX_POSITIONS, max_kept_positions: int = MAX_KEPT_POSITIONS) -> None:
        self.eager = forward
        self.max_positions = max_positions
        self.max_kept_positions = max_kept_positions
        self.graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()  # None: recording failed, run eagerly
        _live.add(self)

    def __call__(self, sample, timestep, encoder_hidden_states, *args: Any, return_dict: bool = True, **kwargs: Any):
        if args or not plain_kwargs(kwargs) or not self._replayable(sample, timestep, encoder_hidden_states):
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timestep = timestep.to(sample.device)
        tag = getattr(self.eager, "tag", None)  # a compiled UNet under us (inpaint/compiled.py) records apart
        key = (
            tuple(sample.shape), sample.stride(), sample.dtype, sample.device,
            tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype,
            tuple(timestep.shape), timestep.dtype, torch.is_inference_mode_enabled(),
            tag(sample, timestep, encoder_hidden_states) if tag else None,
        )
        if key in self.graphs:
            self.graphs.move_to_end(key)
            entry = self.graphs[key]
            if entry is None:
                output = self.eager(sample, timestep, encoder_hidden_states, return_dict=False)[0]
            else:
                entry.sample.copy_(sample)
                entry.timestep.copy_(timestep)
                entry.encoder_hidden_states.copy_(encoder_hidden_states)
                entry.graph.replay()
                output = entry.output.clone()  # the next replay overwrites entry.output; schedulers may keep this
        else:
            output = self._record(key, sample, timestep, encoder_hidden_states)
        return (output,) if not return_dict else unet_output(output)

    def _replayable(self, sample, timestep, encoder_hidden_states) -> bool:
        return (
            isinstance(sample, torch.Tensor)
            and sample.is_cuda
            and isinstance(encoder_hidden_states, torch.Tensor)
            and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
            and _positions(sample.shape) <= min(self.max_positions, self.max_kept_positions)
            and isinstance(timestep, torch.Tensor)
            and timestep.numel() == 1
        )

    def _record(self, key: tuple, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        """Run this step eagerly on a side stream (its result is returned), then record the graph."""
        side = torch.cuda.Stream(sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):
            output = self.eager(sample, timestep, encoder_hidden_states, return_dict=False)[0]
        current = torch.cuda.current_stream(sample.device)
        current.wait_stream(side)
        output.record_stream(current)  # made on the side stream, used and freed on the current one
        for stale in [other for other in self.graphs if other[:-1] == key[:-1]]:  # the same shape, recorded uncompiled
            del self.graphs[stale]
        make_room(self.graphs, _positions(sample.shape), self.max_kept_positions)
        try:
            entry = _Graph(torch.cuda.CUDAGraph(), sample.clone(), timestep.clone(), encoder_hidden_states.clone(), output)
            with torch.cuda.graph(entry.graph, capture_error_mode="thread_local"):
                entry.output = self.eager(entry.sample, entry.timestep, entry.encoder_hidden_states, return_dict=False)[0]
        except Exception as error:  # a kernel that cannot be recorded: this shape runs eagerly
            reject = getattr(self.eager, "reject", None)
            if key[-1] and reject is not None:  # the compiled UNet's: back to the uncompiled one, recorded next call
                log.warning("CUDA graph of the compiled UNet at %s not recorded (%s: %s); that shape goes back to "
                            "the uncompiled UNet", key[0], type(error).__name__, error)
                reject(sample, timestep, encoder_hidden_states)
                return output
            log.warning("CUDA graph of the UNet at %s not recorded (%s: %s); that shape runs eagerly",
                        key[0], type(error).__name__, error)
            entry = None
        self.graphs[key] = entry
        if entry is not None:
            log.info("CUDA graph of the UNet recorded for latents %s", "x".join(map(str, key[0])))
        return output

    def clear(self) -> None:
        self.graphs.clear()


def make_room(graphs: OrderedDict[tuple, _Graph | None], positions: int, limit: int) -> None:
    """Drop the least recently used graphs until one of `positions` more fits under `limit`
    (keys start with the latents' shape; a shape that runs eagerly holds no graph and counts 0)."""
    def kept() -> int:
        return sum(_positions(key[0]) for key, entry in graphs.items() if entry is not None)

    while graphs and kept() + positions > limit:
        graphs.popitem(last=False)


def _positions(shape) -> int:
    """Latent positions of a (batch, channels, height, width) shape: what a graph's memory grows with."""
    return shape[0] * shape[-2] * shape[-1]


def plain_kwargs(kwargs: dict[str, Any]) -> bool:
    """True when the extra keyword inputs are all empty, as in the denoising loop of SD2 inpainting."""
    return all(value is None or (isinstance(value, dict) and not value) for value in kwargs.values())


def unet_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def use_cuda_graphs(unet: torch.nn.Module, **limits: int) -> GraphedForward:
    """Route `unet(...)` through a GraphedForward (the module, its config and weights stay as they are)."""
    graphed = GraphedForward(unet.forward, **limits)
    unet.forward = graphed
    return graphed


def release() -> None:
    """Drop every recorded graph and the memory it holds (after an out-of-memory error, say)."""
    for graphed in list(_live):
        graphed.clear()
