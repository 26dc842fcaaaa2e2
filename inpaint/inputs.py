"""The request: every input's bounds and defaults, and the one function that validates them.

predict.py builds its Cog `Input`s from these constants, so the HTTP schema, the in-process checks
and the error messages all come from the same numbers.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from .schedulers import SCHEDULER_NAMES

DEFAULT_PROMPT = "a vision of paradise. unreal engine"
SIZE_CHOICES = tuple(range(64, 1024 + 1, 64))  # working width/height, pixels
DEFAULT_SIZE = 512
NUM_OUTPUTS_RANGE = (1, 4)
DEFAULT_NUM_OUTPUTS = 1
STEPS_RANGE = (1, 500)
DEFAULT_STEPS = 50
GUIDANCE_RANGE = (1.0, 20.0)
DEFAULT_GUIDANCE = 7.5
DEFAULT_SCHEDULER = "DPMSolverMultistep"
# torch.Generator.manual_seed accepts exactly this range.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class InpaintRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int


def _as_int(name: str, value: object) -> int:
    """Accept ints and whole-number floats (Cog's server passes `3.0` for an integer field)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


def check_inputs(
    *,
    prompt: str | None = DEFAULT_PROMPT,
    negative_prompt: str | None = None,
    width: object = DEFAULT_SIZE,
    height: object = DEFAULT_SIZE,
    num_outputs: object = DEFAULT_NUM_OUTPUTS,
    num_inference_steps: object = DEFAULT_STEPS,
    guidance_scale: object = DEFAULT_GUIDANCE,
    scheduler: str = DEFAULT_SCHEDULER,
    seed: object = None,
) -> InpaintRequest:
    """Validate and normalise the inputs; raise ValueError naming the input, its value and what is accepted."""
    prompt = "" if prompt is None else prompt
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be text, got {type(negative_prompt).__name__}")

    sizes = {}
    for name, value in (("width", width), ("height", height)):
        size = _as_int(name, value)
        if size not in SIZE_CHOICES:
            raise ValueError(
                f"{name} must be a multiple of 64 from {SIZE_CHOICES[0]} to {SIZE_CHOICES[-1]}, got {size}"
            )
        sizes[name] = size

    num_outputs = _as_int("num_outputs", num_outputs)
    _check_range("num_outputs", num_outputs, NUM_OUTPUTS_RANGE)
    num_inference_steps = _as_int("num_inference_steps", num_inference_steps)
    _check_range("num_inference_steps", num_inference_steps, STEPS_RANGE)

    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    guidance_scale = float(guidance_scale)
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    _check_range("guidance_scale", guidance_scale, GUIDANCE_RANGE)

    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got {scheduler!r}")

    if seed is None:
        seed = secrets.randbits(32)
    else:
        seed = _as_int("seed", seed)
        _check_range("seed", seed, SEED_RANGE)

    return InpaintRequest(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        width=sizes["width"],
        height=sizes["height"],
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        seed=seed,
    )
