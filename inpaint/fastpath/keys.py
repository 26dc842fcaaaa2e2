"""The shape key: what a CUDA graph or a compiled part is made for, one name for both."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

Layout = tuple[tuple[int, ...], tuple[int, ...], str, str]  # shape, strides, dtype, device


@dataclass(frozen=True)
class ShapeKey:
    """Each tensor input's shape, strides, dtype and device, and whether the call runs in inference mode.

    A compiled part is specialised to exactly this (it refuses other inputs), and a CUDA graph replays
    exactly this, so the two are keyed alike: a graph recorded from the compiled part is keyed apart
    (GraphKey) from one recorded from the eager part."""

    inputs: tuple[Layout, ...]
    inference: bool

    @classmethod
    def of(cls, *tensors: torch.Tensor) -> ShapeKey:
        return cls(tuple((tuple(value.shape), tuple(value.stride()), str(value.dtype), str(value.device))
                         for value in tensors), torch.is_inference_mode_enabled())

    @property
    def shape(self) -> tuple[int, ...]:
        """The first input's shape: the latents' (the UNet and the VAE decoder) or the images' (the encoder)."""
        return self.inputs[0][0]

    @property
    def device(self) -> str:
        return self.inputs[0][3]

    def positions(self) -> int:
        """batch x height x width of the first input: what a CUDA graph's memory grows with."""
        return self.shape[0] * self.shape[-2] * self.shape[-1]

    def example(self) -> tuple[torch.Tensor, ...]:
        """Random inputs of this kind (made under the mode the caller set); whole numbers (the UNet's
        timestep) are 500."""
        inputs = []
        for shape, stride, dtype, device in self.inputs:
            value = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
            inputs.append(value.normal_() if value.is_floating_point() else value.fill_(500))
        return tuple(inputs)

    def to_json(self) -> str:
        return json.dumps([[list(map(list, layout[:2])) + list(layout[2:]) for layout in self.inputs], self.inference])

    @classmethod
    def from_json(cls, text: str) -> ShapeKey:
        """The key `to_json` wrote; ValueError for any other text (a shipped manifest's keys are read with this)."""
        try:
            inputs, inference = json.loads(text)
            key = cls(tuple((tuple(shape), tuple(stride), dtype, device) for shape, stride, dtype, device in inputs),
                      inference)
        except (TypeError, ValueError, RecursionError):
            raise ValueError(f"not a shape key: {text!r:.200}") from None
        if not key.inputs or len(key.shape) != 4 or not isinstance(inference, bool) or not all(  # (B, C, H, W) first
                len(shape) == len(stride) and all(type(n) is int and n >= 0 for n in (*shape, *stride))
                and isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype)
                and isinstance(device, str) for shape, stride, dtype, device in key.inputs):
            raise ValueError(f"not a shape key: {text!r:.200}")
        return key

    def __str__(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass(frozen=True)
class GraphKey:
    """A CUDA graph's key: the call's ShapeKey, and whether it was recorded from the compiled part."""

    shape: ShapeKey
    compiled: bool
