"""Cog adapter: typed inputs in, one call into the `inpaint` package, image files out."""

import functools
from typing import List, Optional

import cog
from cog import BaseRunner, Input, Path

from inpaint import inputs, startup
from inpaint.activity import Activity
from inpaint.concurrency import OutputFolders, run_cancellable
from inpaint.urlinputs import Downloads


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        """Find and verify the weights (COG_WEIGHTS, else ./weights, else download) and load the model."""
        self.inpainter = startup.load(weights)  # imports torch and diffusers while the weights are read
        self.outputs = OutputFolders()
        limits = self.inpainter.settings
        self.downloads = Downloads(limits.max_upload_bytes, limits.max_download_seconds,
                                   networks=limits.url_networks).install()  # URL inputs
        self.activity = Activity()  # predictions in run(), for the probes (script/probe)

    def healthcheck(self) -> bool:
        """Cog's server asks this for /health-check: False (UNHEALTHY) once the GPU has failed for good."""
        return self.inpainter.healthy()

    # Every argument of Input() is a literal: Cog's CLI reads this signature without running it
    # (static schema generation, its default since replicate/cog#2950, April 2026) and resolves
    # nothing imported; the tests check these values against inpaint.inputs, which validates the
    # same inputs again. Several predictions run at once (inpaint/concurrency.py); COG_MAX_CONCURRENCY
    # overrides max. Why 3: bench/RESULTS.md, "Load through Cog's server" (docs/serving.md).
    @cog.concurrent(max=3)
    async def run(
        self,
        prompt: str = Input(
            description="What to paint into the masked region.", default="a vision of paradise. unreal engine", max_length=2000
        ),
        negative_prompt: Optional[str] = Input(
            description="What the painted region should not show.", default=None, max_length=2000
        ),
        image: Path = Input(description="The photo to inpaint. The output has its size, plus any outpaint_* margins."),
        mask: Optional[Path] = Input(
            description="Mask of the photo: white is repainted, black is kept. Without one, the photo's transparent pixels are repainted (none, when outpainting an opaque photo).",
            default=None,
        ),
        invert_mask: bool = Input(description="Repaint the black part of the mask instead.", default=False),
        mask_grow: int = Input(
            description="Grow the mask by this many pixels (negative shrinks it) before feathering.", ge=-64, le=64, default=0
        ),
        mask_blur: int = Input(
            description="Feather width in pixels: the result blends into the photo over this band outside the mask; pixels farther away are untouched.",
            ge=0,
            le=64,
            default=8,
        ),
        mask_padding: int = Input(
            description="Pixels of context around each masked region that the model sees when it works on a crop of a large photo.",
            ge=0,
            le=512,
            default=32,
        ),
        width: Optional[int] = Input(
            description="Width the model works at. Default: automatic (about 512x512 in area, following the masked region's shape). The result always comes back at the photo's own size.",
            choices=[64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024],
            default=None,
        ),
        height: Optional[int] = Input(
            description="Height the model works at. Default: automatic, as for width.",
            choices=[64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024],
            default=None,
        ),
        num_outputs: int = Input(description="Number of images to return.", ge=1, le=4, default=1),
        num_inference_steps: int = Input(description="Number of denoising steps.", ge=1, le=500, default=50),
        guidance_scale: float = Input(description="Scale for classifier-free guidance.", ge=1.0, le=20.0, default=7.5),
        strength: float = Input(
            description="1 paints the masked region from scratch; below 1 it starts from the original content, noised to this level (0 keeps it).",
            ge=0.0,
            le=1.0,
            default=1.0,
        ),
        scheduler: str = Input(
            description="Denoising scheduler.",
            choices=["DDIM", "K_EULER", "DPMSolverMultistep", "K_EULER_ANCESTRAL", "PNDM", "KLMS"],
            default="DPMSolverMultistep",
        ),
        seed: Optional[int] = Input(description="Random seed. Leave blank to randomize the seed.", default=None),
        output_format: str = Input(
            description="File format of the outputs; only png is lossless.", choices=["png", "webp", "jpg"], default="png"
        ),
        output_quality: int = Input(description="Quality of webp and jpg outputs.", ge=1, le=100, default=90),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
        outpaint_left: int = Input(
            description="Outpainting: pixels of new canvas to paint left of the photo. The photo itself stays as it is.",
            ge=0,
            le=2048,
            default=0,
        ),
        outpaint_right: int = Input(description="Outpainting: pixels of new canvas right of the photo.", ge=0, le=2048, default=0),
        outpaint_up: int = Input(description="Outpainting: pixels of new canvas above the photo.", ge=0, le=2048, default=0),
        outpaint_down: int = Input(description="Outpainting: pixels of new canvas below the photo.", ge=0, le=2048, default=0),
    ) -> List[Path]:
        # Every input but the two files goes, by name, to the one function that validates them all.
        settings = {name: value for name, value in locals().items() if name not in ("self", "image", "mask")}
        request = inputs.check_inputs(**settings)
        # Each call below runs in a thread of its own, the cancel token its last argument; the first fetches
        # the inputs given as URLs or data URIs.
        with self.activity.prediction(), self.downloads.prediction() as fetched, self.outputs.folder() as folder:
            image, mask = await run_cancellable(functools.partial(fetched.fetch, {"image": image, "mask": mask}))
            inpaint = functools.partial(self.inpainter.inpaint, Path(image), Path(mask) if mask else None, request, folder)
            prediction = await run_cancellable(inpaint)
        for key, value in prediction.metrics.items():
            self.record_metric(key, value)
        return [Path(path) for path in prediction.paths]
