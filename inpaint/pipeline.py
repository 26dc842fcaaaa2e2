"""The model: build the diffusers components from a weights folder and run one inpainting at the working size."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from .schedulers import make_scheduler
from .weights import VARIANT

log = logging.getLogger(__name__)


def pick_device(requested: str = "") -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when present, else the CPU in fp32 (fp16 on a CPU is ~20x slower)."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusionInpaintPipeline:
    """Load the checkpoint from a local folder: safetensors only, no network, no safety checker here."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        folder,
        variant=VARIANT,
        dtype=dtype,
        use_safetensors=True,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.to(device)
    optimize(pipe, device)
    return pipe


def optimize(pipe: StableDiffusionInpaintPipeline, device: torch.device) -> None:
    """Every GPU speed-up lives behind this one switch; on the CPU it does nothing."""
    if device.type != "cuda":
        return
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Generation:
    prompt: str
    negative_prompt: str | None
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int


def count_prompt_tokens(pipe: StableDiffusionInpaintPipeline, prompt: str) -> int:
    """Tokens of the prompt without start/end tokens, as the text encoder would see them untruncated."""
    return len(pipe.tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids)


def generate(
    pipe: StableDiffusionInpaintPipeline, image: Image.Image, mask: Image.Image, job: Generation
) -> list[Image.Image]:
    """Inpaint `image` (RGB) where `mask` (L, 255 = repaint) is white; both already at the working size."""
    width, height = image.size
    # A pipeline per prediction shares the loaded modules but owns its scheduler, so no request
    # changes state another one sees.
    run = StableDiffusionInpaintPipeline(
        **{**pipe.components, "scheduler": make_scheduler(job.scheduler, pipe.scheduler.config)},
        requires_safety_checker=False,
    )
    run.set_progress_bar_config(desc="denoising", mininterval=1.0, ascii=True)
    generator = torch.Generator("cpu").manual_seed(job.seed)  # CPU noise: the same seed gives the same image anywhere
    with torch.inference_mode():
        result = run(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            image=image,
            mask_image=mask,
            height=height,
            width=width,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            num_images_per_prompt=job.num_outputs,
            generator=generator,
            output_type="pil",
        )
    return list(result.images)
