"""The model: build the diffusers components from a weights folder and run one inpainting at the working size."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from . import compiled, cudagraphs, tracing
from .schedulers import make_scheduler
from .weights import VARIANT

log = logging.getLogger(__name__)

class _Stages:
    """The seconds of the text encoder and the VAE's encode and decode in one prediction.

    On the CPU each call's wall time. On CUDA a pair of events around each call, read once the
    prediction is over: no synchronisation between the stages, so the CPU queues each next stage
    while the GPU still runs the last one (as it would untimed).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.wall_ns: dict[str, tuple[int, int]] = {}  # each stage's first start and last end, host clock (spans)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def time(self, key: str, device: torch.device, call):
        started = time.time_ns()
        with tracing.span(key):
            result = self._time(key, device, call)
        self.wall_ns[key] = (self.wall_ns.get(key, (started,))[0], time.time_ns())
        return result

    def _time(self, key: str, device: torch.device, call):
        if device.type != "cuda":
            start = time.perf_counter()
            result = call()
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            return result
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        result = call()
        end.record(stream)
        self._events.append((key, start, end))
        return result

    def denoise_span(self) -> None:
        """The denoising loop's span: from the end of the last stage before it to the VAE decode."""
        before = [self.wall_ns[key][1] for key in ("text_encode", "vae_encode") if key in self.wall_ns]
        if before and "vae_decode" in self.wall_ns:
            tracing.record("denoise", max(before), self.wall_ns["vae_decode"][0])

    def read(self) -> dict[str, float]:
        for key, start, end in self._events:
            end.synchronize()  # done already: the pipeline's output has come back to the CPU
            self.seconds[key] = self.seconds.get(key, 0.0) + start.elapsed_time(end) / 1000
        self._events.clear()
        return self.seconds


_stages: ContextVar[_Stages | None] = ContextVar("stages", default=None)  # the running prediction's


def _timed(method, key: str, device: torch.device):
    """Wrap a module method so its time adds up under `key` while a prediction runs (see _Stages)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        stages = _stages.get()
        if stages is None:
            return method(*args, **kwargs)
        return stages.time(key, device, lambda: method(*args, **kwargs))

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


def load_pipeline(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    fast: bool = True,
    compile: str = "off",
    cuda_graphs: bool = True,
    compile_cache: Path | None = None,
    compile_key: str = "",
) -> StableDiffusionInpaintPipeline:
    """Load the checkpoint from a local folder: safetensors only, no network, no safety checker here.

    The weights go straight to `device` (device_map), never through a copy in CPU memory first.
    `compile` is a mode of config.COMPILE_MODES; with "setup" this returns once the 512x512 UNet and
    VAE are compiled (or loaded from `compile_cache`) and the compiled UNet's CUDA graph is recorded.
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
    optimize(pipe, device, fast, compile, cuda_graphs, compile_cache, compile_key)
    for name in ("encode", "decode"):
        setattr(pipe.vae, name, _timed(getattr(pipe.vae, name), f"vae_{name}", device))
    pipe.text_encoder.forward = _timed(pipe.text_encoder.forward, "text_encode", device)
    if device.type == "cuda" and fast:
        warm_up(pipe)  # its first calls ask the compile worker for the 512x512 UNet and VAE
        workers = compiled_parts(pipe)
        if compile == "setup" and workers:
            start = time.perf_counter()
            for worker in workers:
                worker.wait()
            log.info("setup waited %.1f s for the compiled UNet and VAE", time.perf_counter() - start)
            warm_up(pipe)  # records the compiled UNet's CUDA graph
    return pipe


def _compiled_modules(pipe: StableDiffusionInpaintPipeline) -> tuple[torch.nn.Module, ...]:
    """The modules the fast path compiles (inpaint/compiled.py), the UNet first."""
    return pipe.unet, pipe.vae.decoder, pipe.vae.encoder


def compiled_parts(pipe: StableDiffusionInpaintPipeline) -> list[compiled.CompiledForward]:
    """The compiled parts' stand-ins (empty when nothing is compiled)."""
    return [worker for worker in map(compiled.of, _compiled_modules(pipe)) if worker is not None]


def warm_up(pipe: StableDiffusionInpaintPipeline, size: int = 512) -> float:
    """One short inpainting, so that setup pays for what the first prediction would otherwise pay:
    CUDA kernels loaded on first use, cuBLAS/cuDNN handles and the CUDA graph of the 512x512 UNet call
    (its first calls also ask the compile worker for the UNet and VAE at that shape).
    Returns its seconds."""
    start = time.perf_counter()
    image = Image.new("RGB", (size, size), (127, 127, 127))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    generate(pipe, [image], [mask], Generation("warm-up", None, 1, 2, 7.5, 1.0, "DPMSolverMultistep", 0))
    seconds = time.perf_counter() - start
    log.info("warm-up inpainting at %dx%d: %.1f s", size, size, seconds)
    return seconds


def optimize(
    pipe: StableDiffusionInpaintPipeline,
    device: torch.device,
    fast: bool = True,
    compile: str = "off",
    cuda_graphs: bool = True,
    compile_cache: Path | None = None,
    compile_key: str = "",
) -> None:
    """Every GPU speed-up lives behind this one switch; on the CPU, or with fast=False, it does nothing.

    None of these changes what is computed beyond fp16 rounding (the bench checks agreement with
    plain diffusers): fp16 weights loaded straight to the GPU (load_pipeline), SDPA attention
    (diffusers' default), the UNet and the VAE's encoder and decoder compiled in the background
    (inpaint/compiled.py; each prediction takes them up once they are ready and checked against the
    eager ones), the UNet's call replayed as a CUDA graph (inpaint/cudagraphs.py: the same kernels,
    launched at once instead of one by one from Python), a channels_last UNet, and a VAE that
    decodes a batch one image at a time (a lower peak memory: 4 outputs at 1024x1024 in 16 GB).
    Each choice rests on bench/RESULTS.md, "Fast path parts" (H100): CUDA graphs pay at every size;
    channels_last pays in the UNet at 512x512 and costs a little at 1024x1024, so the UNet keeps it
    (512x512 is the model's own size); it costs the VAE at every size, so the VAE stays contiguous;
    fused QKV projections measured no change and are not used.
    """
    if device.type != "cuda" or not fast:
        return
    apply_fast_path(pipe, compile, cuda_graphs, compile_cache, compile_key)


def apply_fast_path(
    pipe: StableDiffusionInpaintPipeline,
    compile: str = "off",
    cuda_graphs: bool = True,
    compile_cache: Path | None = None,
    compile_key: str = "",
) -> None:
    """The fast path's changes themselves, on whatever device the pipeline is (the tests run them on
    the CPU, where `optimize` leaves them out; the CUDA graphs pass CPU calls straight through)."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.enable_slicing()
    if compile != "off":  # the modules stay themselves (config, components); their forward is routed
        compiled.use_compiled(pipe.unet, compile_cache, secret=compile_key)
        for part in ("decoder", "encoder"):
            compiled.use_compiled(getattr(pipe.vae, part), compile_cache, part=f"vae.{part}", config=pipe.vae.config,
                                  secret=compile_key)
    if cuda_graphs:
        cudagraphs.use_cuda_graphs(pipe.unet)


def release_memory(device: torch.device) -> None:
    """Hand cached GPU memory back after a failed or cancelled run, so the next prediction starts clean
    (recorded CUDA graphs too: each holds memory for its shape, and is recorded again when next needed)."""
    import gc

    cudagraphs.release()
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
    timings: dict[str, float] | None = None,
    stop: Callable[[], None] | None = None,
) -> list[list[Image.Image]]:
    """Inpaint each image (RGB) where its mask (L, 255 = repaint) is white, all in one batch.

    All images share one working size. Returns, for each image, `job.num_outputs` results.
    `timings`, if given, receives the seconds of text_encode, vae_encode, vae_decode and denoise (the rest).
    `stop`, if given, is called after each denoising step; it raises to end the run there (a cancellation).
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
    stages = _Stages()
    token = _stages.set(stages)
    start = time.perf_counter()
    try:
        # The compiled parts ready by now are taken up for the whole prediction; the worker waits.
        with torch.inference_mode(), compiled.prediction(*_compiled_modules(pipe)):
            result = run(
                prompt=[job.prompt] * count,
                negative_prompt=[job.negative_prompt] * count if job.negative_prompt else None,
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
        stage_seconds = stages.read()
        timings.update(stage_seconds)
        timings["denoise"] = time.perf_counter() - start - sum(stage_seconds.values())
    # diffusers tiles the images through the batch: entry b belongs to image b % count.
    return [result.images[index::count] for index in range(count)]
