"""The request: every input's bounds and defaults, and the one function that validates them.

predict.py spells the same numbers out as literals in its Cog `Input`s (Cog's CLI reads them
without running Python); a test checks that the two agree, so the HTTP schema, the in-process checks
and the error messages say the same.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from .codec import OUTPUT_FORMATS
from .schedulers import SCHEDULER_NAMES

DEFAULT_PROMPT = "a vision of paradise. unreal engine"
# Characters of prompt and negative_prompt: far above the 77 tokens CLIP reads (the rest is dropped, and
# logged), far below what holds the tokenizer for a minute (a 10 MB prompt did).
PROMPT_MAX_CHARS = 2000
SIZE_CHOICES = tuple(range(64, 1024 + 1, 64))  # working width/height, pixels
DEFAULT_SIZE = None  # automatic: the working size follows the masked region's aspect at about 512x512
NUM_OUTPUTS_RANGE = (1, 4)
DEFAULT_NUM_OUTPUTS = 1
STEPS_RANGE = (1, 500)
DEFAULT_STEPS = 50
GUIDANCE_RANGE = (1.0, 20.0)
DEFAULT_GUIDANCE = 7.5
DEFAULT_SCHEDULER = "DPMSolverMultistep"
# torch.Generator.manual_seed accepts exactly this range.
SEED_RANGE = (-(2**63), 2**64 - 1)
MASK_GROW_RANGE = (-64, 64)  # pixels of dilation (negative erodes)
DEFAULT_MASK_GROW = 0
MASK_BLUR_RANGE = (0, 64)  # feather width, pixels
DEFAULT_MASK_BLUR = 8
MASK_PADDING_RANGE = (0, 512)  # context around each masked region, pixels
DEFAULT_MASK_PADDING = 32
STRENGTH_RANGE = (0.0, 1.0)
DEFAULT_STRENGTH = 1.0
DEFAULT_OUTPUT_FORMAT = "png"
OUTPUT_QUALITY_RANGE = (1, 100)
DEFAULT_OUTPUT_QUALITY = 90
OUTPAINT_RANGE = (0, 2048)  # pixels added to one side of the photo; the canvas is bounded by the input limits too
OUTPAINT_SIDES = ("outpaint_left", "outpaint_up", "outpaint_right", "outpaint_down")  # box order: left, top, right, bottom


@dataclass(frozen=True)
class InpaintRequest:
    prompt: str
    negative_prompt: str | None
    width: int | None  # None: automatic
    height: int | None
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    invert_mask: bool = False
    mask_grow: int = DEFAULT_MASK_GROW
    mask_blur: int = DEFAULT_MASK_BLUR
    mask_padding: int = DEFAULT_MASK_PADDING
    strength: float = DEFAULT_STRENGTH
    output_format: str = DEFAULT_OUTPUT_FORMAT
    output_quality: int = DEFAULT_OUTPUT_QUALITY
    disable_safety_checker: bool = False
    outpaint_left: int = 0
    outpaint_right: int = 0
    outpaint_up: int = 0
    outpaint_down: int = 0

    @property
    def margins(self) -> tuple[int, int, int, int]:
        """The outpainting margins in box order (left, top, right, bottom); all 0 without outpainting."""
        return self.outpaint_left, self.outpaint_up, self.outpaint_right, self.outpaint_down


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


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _as_float(name: str, value: object, bounds: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    _check_range(name, value, bounds)
    return value


def _as_int_in(name: str, value: object, bounds: tuple[int, int]) -> int:
    number = _as_int(name, value)
    _check_range(name, number, bounds)
    return number


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
    invert_mask: object = False,
    mask_grow: object = DEFAULT_MASK_GROW,
    mask_blur: object = DEFAULT_MASK_BLUR,
    mask_padding: object = DEFAULT_MASK_PADDING,
    strength: object = DEFAULT_STRENGTH,
    output_format: str = DEFAULT_OUTPUT_FORMAT,
    output_quality: object = DEFAULT_OUTPUT_QUALITY,
    disable_safety_checker: object = False,
    outpaint_left: object = 0,
    outpaint_right: object = 0,
    outpaint_up: object = 0,
    outpaint_down: object = 0,
) -> InpaintRequest:
    """Validate and normalise the inputs; raise ValueError naming the input, its value and what is accepted."""
    prompt = "" if prompt is None else prompt
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is None and name == "negative_prompt":
            continue
        if not isinstance(text, str):
            raise ValueError(f"{name} must be text, got {type(text).__name__}")
        if len(text) > PROMPT_MAX_CHARS:
            raise ValueError(
                f"{name} is {len(text):,} characters, over the limit of {PROMPT_MAX_CHARS:,}; shorten it "
                "(the model reads only the first 77 tokens, about 300 characters)"
            )

    sizes = {}
    for name, value in (("width", width), ("height", height)):
        if value is None:
            sizes[name] = None
            continue
        size = _as_int(name, value)
        if size not in SIZE_CHOICES:
            raise ValueError(
                f"{name} must be a multiple of 64 from {SIZE_CHOICES[0]} to {SIZE_CHOICES[-1]}, got {size}"
            )
        sizes[name] = size

    num_outputs = _as_int_in("num_outputs", num_outputs, NUM_OUTPUTS_RANGE)
    num_inference_steps = _as_int_in("num_inference_steps", num_inference_steps, STEPS_RANGE)
    guidance_scale = _as_float("guidance_scale", guidance_scale, GUIDANCE_RANGE)
    strength = _as_float("strength", strength, STRENGTH_RANGE)
    if 0 < strength and int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength x num_inference_steps must be at least 1 (the steps actually run), got "
            f"{strength} x {num_inference_steps}; raise strength or num_inference_steps"
        )
    invert_mask = _as_bool("invert_mask", invert_mask)
    disable_safety_checker = _as_bool("disable_safety_checker", disable_safety_checker)
    mask_grow = _as_int_in("mask_grow", mask_grow, MASK_GROW_RANGE)
    mask_blur = _as_int_in("mask_blur", mask_blur, MASK_BLUR_RANGE)
    mask_padding = _as_int_in("mask_padding", mask_padding, MASK_PADDING_RANGE)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    output_quality = _as_int_in("output_quality", output_quality, OUTPUT_QUALITY_RANGE)
    margins = {
        name: _as_int_in(name, value, OUTPAINT_RANGE)
        for name, value in zip(OUTPAINT_SIDES, (outpaint_left, outpaint_up, outpaint_right, outpaint_down))
    }

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
        invert_mask=invert_mask,
        mask_grow=mask_grow,
        mask_blur=mask_blur,
        mask_padding=mask_padding,
        strength=strength,
        output_format=output_format,
        output_quality=output_quality,
        disable_safety_checker=disable_safety_checker,
        **margins,
    )
