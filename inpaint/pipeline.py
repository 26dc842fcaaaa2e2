"""The model: build the diffusers components from a weights folder and run one inpainting at the working size."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from . import tracing
from .schedulers import make_scheduler
from .stopwatch import Stopwatch
from .weights import VARIANT

if TYPE_CHECKING:
    from .fastpath import FastPath

log = logging.getLogger(__name__)


class _Stages:
    """The seconds of the text encoder and the VAE's encode and decode in one prediction (a Stopwatch),
    and each stage's first start and last end on the host clock (for the tracing spans)."""

    def __init__(self, device: torch.device) -> None:
        self.watch = Stopwatch(device)
        self.wall_ns: dict[str, tuple[int, int]] = {}

    def time(self, key: str, call):
        started = time.time_ns()
        with tracing.span(key), self.watch.time(key):
            result = call()
        self.wall_ns[key] = (self.wall_ns.get(key, (started,))[0], time.time_ns())
        return result

    def denoise_span(self) -> None:
        """The denoising loop's span: from the end of the last stage before it to the VAE decode."""
        before = [self.wall_ns[key][1] for key in ("text_encode", "vae_encode") if key in self.wall_ns]
        if before and "vae_decode" in self.wall_ns:
            tracing.record("denoise", max(before), self.wall_ns["vae_decode"][0])


_stages: ContextVar[_Stages | None] = ContextVar("stages", default=None)  # the running prediction's


def _timed(method, key: str):
    """Wrap a module method so its time adds up under `key` while a prediction runs (see _Stages)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        stages = _stages.get()
        if stages is None:
            return method(*args, **kwargs)
        return stages.time(key, lambda: method(*args, **kwargs))

    return wrapper


def pick_device(requested: str = "") -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when present, else the CPU in fp32 (fp16 on a CPU is many times slower)."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.float16 if device.type == "cuda" else torch.float32


class _ShortLog(logging.Filter):
    """diffusers logs the whole part of a prompt that CLIP's 77 tokens leave out; keep such lines short."""

    LIMIT = 300

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > self.LIMIT:
            record.msg, record.args = f"{message[: self.LIMIT]}... ({len(message):,} characters in all)", None
        return True


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype, fast: FastPath | None = None) -> StableDiffusionInpaintPipeline:
    """Load the checkpoint from a local folder: safetensors only, no network, no safety checker here.

    The weights go straight to `device` (device_map), never through a copy in CPU memory first.
    `fast`, if given, is installed on the pipeline (inpaint/fastpath: nothing unless it is enabled).
    """
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        folder,
        variant=VARIANT,
        dtype=dtype,
        use_safetensors=True,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        device_map=device.type,
    )
    diffusers_log = logging.getLogger(StableDiffusionInpaintPipeline.__module__)
    if not any(isinstance(existing, _ShortLog) for existing in diffusers_log.filters):
        diffusers_log.addFilter(_ShortLog())
    if fast is not None:
        fast.install(pipe)
    for name in ("encode", "decode"):
        setattr(pipe.vae, name, _timed(getattr(pipe.vae, name), f"vae_{name}"))
    pipe.text_encoder.forward = _timed(pipe.text_encoder.forward, "text_encode")
    return pipe


def release_memory(device: torch.device, fast: FastPath | None = None) -> None:
    """Hand cached GPU memory back after a failed or cancelled run, so the next prediction starts clean
    (recorded CUDA graphs too: each holds memory for its shape, and is recorded again when next needed)."""
    import gc

    if fast is not None:
        fast.release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# What the CUDA runtime says (cudaGetErrorString) for its sticky errors: after one, every later call in
# the process fails the same way, so only a new process recovers (CUDA Runtime API, cudaError).
FATAL_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "misaligned address",
    "hardware stack error",
    "invalid program counter",
    "operation not supported on global/shared address space",
    "the launch timed out and was terminated",
    "uncorrectable ECC error encountered",
)


def fatal_device_error(error: BaseException) -> str | None:
    """The CUDA error that left the GPU unusable for this process, if `error` is one; else None."""
    text = str(error)
    return next((reason for reason in FATAL_CUDA_ERRORS if reason in text), None)


@dataclass(frozen=True)
class Generation:
    prompt: str
    negative_prompt: str | None
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    strength: float
    scheduler: str
    seed: int


class EmptyPrompt:
    """The text embedding of the empty negative prompt, made once per batch size: a request without a
    negative prompt then runs the text encoder for its prompt alone. diffusers' own encode_prompt makes it
    from the same tokens through the same call, so it is the tensor diffusers makes each time
    (tests/test_differential.py compares the pixels and the UNet's inputs)."""

    def __init__(self) -> None:
        self._embeds: dict[int, torch.Tensor] = {}

    def embeds(self, pipe: StableDiffusionInpaintPipeline, count: int) -> torch.Tensor:
        """For `count` prompts; call under torch.inference_mode, as diffusers' call runs."""
        embeds = self._embeds.get(count)
        if embeds is None:  # two predictions making it at once make the same tensor
            embeds = pipe.encode_prompt([""] * count, pipe._execution_device, 1, False)[0]
            self._embeds[count] = embeds
        return embeds


def _calling(stop: Callable[[], None]):
    """A diffusers step-end callback that calls `stop` and changes nothing."""

    def callback(pipe, step, timestep, callback_kwargs):
        stop()
        return callback_kwargs

    return callback


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    """Tokens of the prompt without start/end tokens, as the text encoder would see them untruncated."""
    return len(tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids)


def generate(
    pipe: StableDiffusionInpaintPipeline,
    images: list[Image.Image],
    masks: list[Image.Image],
    job: Generation,
    *,
    timings: dict[str, float] | None = None,
    stop: Callable[[], None] | None = None,
    fast: FastPath | None = None,
    empty_prompt: EmptyPrompt | None = None,
) -> list[list[Image.Image]]:
    """Inpaint each image (RGB) where its mask (L, 255 = repaint) is white, all in one batch.

    All images share one working size. Returns, for each image, `job.num_outputs` results.
    `timings`, if given, receives the seconds of text_encode, vae_encode, vae_decode and denoise (the rest).
    `stop`, if given, is called after each denoising step; it raises to end the run there (a cancellation).
    `fast`, the fast path installed on `pipe` if any, takes up its compiled parts that are ready.
    `empty_prompt`, if given, holds the empty negative prompt's embedding, used when there is no negative prompt.
    """
    width, height = images[0].size
    count = len(images)
    # A pipeline per prediction shares the loaded modules but owns its scheduler, so no request
    # changes state another one sees.
    run = StableDiffusionInpaintPipeline(
        **{**pipe.components, "scheduler": make_scheduler(job.scheduler, pipe.scheduler.config)},
        requires_safety_checker=False,
    )
    run.set_progress_bar_config(desc="denoising", mininterval=1.0, ascii=True)
    generator = torch.Generator("cpu").manual_seed(job.seed)  # CPU noise: the same seed gives the same image anywhere
    stages = _Stages(pipe.device)
    token = _stages.set(stages)
    start = time.perf_counter()
    try:
        # The compiled parts ready by now are taken up for the whole prediction; the worker waits.
        with torch.inference_mode(), fast.prediction() if fast is not None else nullcontext():
            if job.negative_prompt:
                negative = {"negative_prompt": [job.negative_prompt] * count}
            elif empty_prompt is not None:  # unused without guidance (guidance_scale 1), as diffusers' own
                negative = {"negative_prompt_embeds": empty_prompt.embeds(run, count)}
            else:
                negative = {}
            result = run(
                prompt=[job.prompt] * count,
                **negative,
                image=images,
                mask_image=masks,
                height=height,
                width=width,
                strength=job.strength,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=job.num_outputs,
                generator=generator,
                output_type="pil",
                **({"callback_on_step_end": _calling(stop)} if stop else {}),
            )
        stages.denoise_span()
    finally:
        _stages.reset(token)
    if timings is not None:
        stage_seconds = stages.watch.read()
        timings.update(stage_seconds)
        timings["denoise"] = time.perf_counter() - start - sum(stage_seconds.values())
    # diffusers tiles the images through the batch: entry b belongs to image b % count.
    return [result.images[index::count] for index in range(count)]
