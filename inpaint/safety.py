"""The safety checker: CompVis' StableDiffusionSafetyChecker (a CLIP ViT-L/14 vision tower), returning flags.

It never raises for content and never blacks out an image: it says which images it flags, and the
caller decides (service.py leaves flagged outputs out of the result).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger(__name__)

FOLDER = "safety_checker"  # inside the weights folder, beside unet/, vae/, ...


class AllOutputsFlagged(Exception):
    """Every output of a prediction was flagged; the message suggests what to change."""


class SafetyChecker:
    def __init__(self, model, processor, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self.device = device

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        # Its own warning promises black images; this project leaves flagged outputs out instead, and says so.
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)
        model = StableDiffusionSafetyChecker.from_pretrained(
            folder / FOLDER,
            variant="fp16",
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,  # a relative folder name reads like a hub repository id: never look it up
            device_map=device.type,  # straight to the device, no copy in CPU memory first
        )
        processor = CLIPImageProcessor.from_pretrained(
            folder / "feature_extractor",
            local_files_only=True,
        )
        return cls(model.eval(), processor, device)  # its warm-up is the fast path's (FastPath.warm_up)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """True for each image the checker flags as potentially NSFW."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values  # (N, 3, 224, 224)
        placeholders = torch.zeros(len(images))  # one per image: the checker blacks these out, not our images
        with torch.inference_mode():
            # float32 pixels: CLIP's patch embedding casts them to the model's own dtype (fp16 on a GPU)
            _, flagged = self.model(clip_input=pixels.to(self.device), images=placeholders)
        return [bool(flag) for flag in flagged]
