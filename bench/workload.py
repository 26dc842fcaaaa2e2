"""What every model measurement runs: the weights (tiny, or full-size random ones built from the real
configs), the example photo and mask at a size, the request, our pipeline as the service loads it, and
diffusers' reference; and how two outputs are compared (PSNR)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the inpaint package, for a module run from bench/

from fullsize import build_full_size  # noqa: E402

CACHE = ROOT / ".cache"


def weights(tiny: bool, device: torch.device) -> Path:
    """The tiny random checkpoint (written once), or full-size random weights built from the real configs."""
    if not tiny:
        return build_full_size(CACHE / "full-size-weights", device=device)
    folder = CACHE / "tiny-weights"
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(folder)], check=True)
    return folder


def inputs(size: int, height: int | None = None):
    width, height = size, height or size
    image = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width // 5, height // 6, width * 4 // 5, height * 2 // 3), fill=255)
    return image, mask


def job(count: int, steps: int):
    """The request every GPU measurement makes: the same prompt, guidance, scheduler and seed."""
    from inpaint.pipeline import Generation

    return Generation("a cat wearing round sunglasses, photo", None, count, steps, 7.5, 1.0, "DPMSolverMultistep", 42)


def load_ours(folder: Path, device: torch.device, dtype: torch.dtype, fast: bool = True, **options):
    """Our pipeline as the service loads it, and its fast path (installed, and warmed up on a GPU);
    `options` are FastPath's (compile, cuda_graphs, cache_dir)."""
    from inpaint import pipeline as ours
    from inpaint.fastpath import FastPath

    path = FastPath(fast and device.type == "cuda", **options)
    pipe = ours.load_pipeline(folder, device, dtype, path)
    path.warm_up(pipe)
    return pipe, path


def load_reference(folder: Path, device: torch.device, dtype: torch.dtype):
    """diffusers' own StableDiffusionInpaintPipeline on `folder`, fp16 on a GPU, DPMSolverMultistep, no checker."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline

    reference = StableDiffusionInpaintPipeline.from_pretrained(
        folder, variant="fp16", dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
