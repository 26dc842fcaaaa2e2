"""One prediction end to end: decode the files, run the model at the working size, paste back, encode."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import codec, compositing, pipeline
from .config import Settings
from .inputs import InpaintRequest
from .weights import resolve_weights

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 75  # CLIP's 77 positions less the start and end tokens


@dataclass
class Prediction:
    paths: list[Path]
    metrics: dict[str, object] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 4)


class Inpainter:
    """The loaded model and the settings it runs under; `inpaint` serves one request."""

    def __init__(self, pipe, settings: Settings) -> None:
        self.pipe = pipe
        self.settings = settings

    @classmethod
    def load(cls, weights: str | None, settings: Settings) -> Inpainter:
        folder = resolve_weights(weights, settings.weights_dir, settings.weights_repo, settings.weights_revision)
        device, dtype = pipeline.pick_device(settings.device)
        log.info("loading %s on %s in %s", folder, device, str(dtype).removeprefix("torch."))
        return cls(pipeline.load_pipeline(folder, device, dtype), settings)

    def inpaint(self, image_path: Path, mask_path: Path, request: InpaintRequest, out_dir: Path) -> Prediction:
        timer = _Timer()
        log.info("seed %d", request.seed)
        with timer.stage("decode"):
            original = codec.decode_image(image_path, self.settings.max_input_pixels, "image")
            mask = codec.decode_mask(mask_path, original.size, self.settings.max_input_pixels, "mask")
        self._log_truncation("prompt", request.prompt)
        if request.negative_prompt:
            self._log_truncation("negative_prompt", request.negative_prompt)

        with timer.stage("mask"):
            alpha = compositing.feather_mask(mask, self.settings.mask_feather)  # (H, W) in [0, 1]
            model_mask = compositing.grow_mask(alpha)
        working = (request.width, request.height)
        with timer.stage("denoise"):
            generated = pipeline.generate(
                self.pipe,
                original.resize(working, Image.Resampling.LANCZOS),
                model_mask.resize(working, Image.Resampling.NEAREST),
                pipeline.Generation(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    num_outputs=request.num_outputs,
                    num_inference_steps=request.num_inference_steps,
                    guidance_scale=request.guidance_scale,
                    scheduler=request.scheduler,
                    seed=request.seed,
                ),
            )
        with timer.stage("composite"):
            results = [
                compositing.composite_over(original, image.resize(original.size, Image.Resampling.LANCZOS), alpha)
                for image in generated
            ]
        with timer.stage("encode"):
            paths = [codec.encode_png(image, out_dir / f"out-{index}.png") for index, image in enumerate(results)]

        metrics = {
            "seed": request.seed,
            "working_size": list(working),
            "image_size": list(original.size),
            "mask_coverage": round(float((alpha >= 1).mean()), 4),
            "timings": timer.seconds,
        }
        return Prediction(paths, metrics)

    def _log_truncation(self, name: str, text: str) -> None:
        tokens = pipeline.count_prompt_tokens(self.pipe, text)
        if tokens > MAX_PROMPT_TOKENS:
            log.warning(
                "%s is %d tokens; the model reads only the first %d, the rest is ignored",
                name,
                tokens,
                MAX_PROMPT_TOKENS,
            )
