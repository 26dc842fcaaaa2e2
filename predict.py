"""Cog adapter: typed inputs in, one call into the `inpaint` package, PNG files out."""

import logging
import sys
import tempfile
from typing import List, Optional

from cog import BaseRunner, Input, Path

from inpaint import inputs
from inpaint.schedulers import SCHEDULER_NAMES


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        """Find and verify the weights (COG_WEIGHTS, else ./weights, else download) and load the model."""
        from inpaint.config import Settings
        from inpaint.service import Inpainter

        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.inpainter = Inpainter.load(weights, Settings.from_env())

    def run(
        self,
        prompt: str = Input(description="What to paint into the masked region.", default=inputs.DEFAULT_PROMPT),
        negative_prompt: Optional[str] = Input(description="What the painted region should not show.", default=None),
        image: Path = Input(description="The photo to inpaint. The output has its size."),
        mask: Path = Input(description="Black-and-white mask of the photo: white is repainted, black is kept."),
        width: int = Input(
            description="Width the model works at; the result is brought back to the photo's own size.",
            choices=list(inputs.SIZE_CHOICES),
            default=inputs.DEFAULT_SIZE,
        ),
        height: int = Input(
            description="Height the model works at; the result is brought back to the photo's own size.",
            choices=list(inputs.SIZE_CHOICES),
            default=inputs.DEFAULT_SIZE,
        ),
        num_outputs: int = Input(
            description="Number of images to return.",
            ge=inputs.NUM_OUTPUTS_RANGE[0],
            le=inputs.NUM_OUTPUTS_RANGE[1],
            default=inputs.DEFAULT_NUM_OUTPUTS,
        ),
        num_inference_steps: int = Input(
            description="Number of denoising steps.",
            ge=inputs.STEPS_RANGE[0],
            le=inputs.STEPS_RANGE[1],
            default=inputs.DEFAULT_STEPS,
        ),
        guidance_scale: float = Input(
            description="Scale for classifier-free guidance.",
            ge=inputs.GUIDANCE_RANGE[0],
            le=inputs.GUIDANCE_RANGE[1],
            default=inputs.DEFAULT_GUIDANCE,
        ),
        scheduler: str = Input(
            description="Denoising scheduler.", choices=list(SCHEDULER_NAMES), default=inputs.DEFAULT_SCHEDULER
        ),
        seed: Optional[int] = Input(description="Random seed. Leave blank to randomize the seed.", default=None),
    ) -> List[Path]:
        request = inputs.check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
        )
        out_dir = Path(tempfile.mkdtemp(prefix="inpaint-"))
        prediction = self.inpainter.inpaint(Path(image), Path(mask), request, out_dir)
        for key, value in prediction.metrics.items():
            self.record_metric(key, value)
        return [Path(path) for path in prediction.paths]
