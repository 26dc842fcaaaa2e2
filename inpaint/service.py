"""One prediction end to end: decode the files, crop around the mask, run the model, paste back, encode."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import codec, compositing, geometry, pipeline, tracing
from .concurrency import CancelToken, DeviceQueue
from .config import Settings
from .fastpath import FastPath
from .inputs import InpaintRequest
from .safety import AllOutputsFlagged, SafetyChecker
from .stopwatch import Stopwatch
from .weights import COMPILED, release_view, resolve_weights

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 75  # CLIP's 77 positions less the start and end tokens
_PIXEL_WORKERS = min(8, os.cpu_count() or 1)  # threads for the pixel work of a large photo


@dataclass
class Prediction:
    paths: list[Path]
    metrics: dict[str, object] = field(default_factory=dict)


class _Timer(Stopwatch):
    """A request's stages on the host clock (the model's own stages come from pipeline.generate), each a span."""

    @contextmanager
    def stage(self, name: str):
        with tracing.span(name), self.time(name):
            yield

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.seconds.items()}


def _size(pixels: np.ndarray) -> tuple[int, int]:
    """(width, height) of an (H, W, ...) array, the order Pillow and the geometry use."""
    return pixels.shape[1], pixels.shape[0]


@dataclass(frozen=True)
class _Regions:
    """Where a prediction paints, from the mask alone; `plan` None: nothing to paint (an empty mask, or strength 0)."""

    coverage: float  # the fraction of the photo's pixels the mask asks to repaint, rounded
    empty: bool  # the mask asks for no pixel at all
    feather: compositing.Feather | None = None
    touched: np.ndarray | None = None  # (H, W) bool
    plan: geometry.Plan | None = None


class GPUOutOfMemory(RuntimeError):
    """The model ran out of GPU memory; the message says what to lower."""


class DeviceFailed(RuntimeError):
    """The GPU failed in a way this process cannot recover from; the container must be restarted."""


class Inpainter:
    """The loaded model and the settings it runs under; `inpaint` serves one request, and several may run at
    once in their own threads (inpaint/concurrency.py): the model's work takes turns in `device`."""

    def __init__(self, pipe, settings: Settings, safety: SafetyChecker | None = None, fast: FastPath | None = None) -> None:
        self.pipe = pipe
        self.fast = fast  # the GPU fast path installed on pipe (None: plain diffusers)
        self.empty_prompt = pipeline.EmptyPrompt()
        self.settings = settings
        self.safety = safety
        self.device = DeviceQueue()
        self.fault: str | None = None  # the CUDA error that made the GPU unusable, once one has
        # The prompts' lengths are counted outside the model's turn, on a tokenizer of their own: a tokenizer
        # call sets its padding and truncation on the shared Rust tokenizer, so counting on the model's
        # while another request encodes its prompt there unpadded that request's tokens (reproduced).
        self._counter = copy.deepcopy(pipe.tokenizer)
        self._counting = threading.Lock()
        self.limits = codec.InputLimits(
            settings.max_input_pixels, settings.max_upload_bytes, settings.max_input_side, settings.max_input_aspect,
            settings.max_jpeg_scans,
        )
        # Tiles of the mask's distances, bands and strips of the resizes and the paste, strips of a PNG
        # output, side by side (scipy, Pillow, numpy and ISA-L release the GIL).
        self._workers = ThreadPoolExecutor(max_workers=_PIXEL_WORKERS, thread_name_prefix="pixels")

    @classmethod
    def load(cls, weights: str | Future[Path] | None, settings: Settings, *, from_image: bool | None = None) -> Inpainter:
        """The model ready to paint. `weights` as resolve_weights takes it, or the future of
        resolve_weights_ahead, started earlier (the "weights" stage is then only the wait for it).
        `from_image`: the weights are the image's own folder (COG_WEIGHTS unset), so compiled parts
        shipped there are trusted without a pin; by default, when `weights` is None."""
        timer = _Timer()
        with timer.stage("weights"):
            folder = weights.result() if isinstance(weights, Future) else resolve_weights(weights, settings)
        try:
            shipped_trusted = weights is None if from_image is None else from_image
            safety, pipe, fast = cls._load_models(folder, settings, timer, shipped_trusted)
        finally:
            release_view(folder)  # the loaders have read the configs; the weights are loaded
        log.info("setup: %s", ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timer.seconds.items()))
        return cls(pipe, settings, safety, fast)

    @staticmethod
    def _load_models(folder: Path, settings: Settings, timer: _Timer,
                     shipped_trusted: bool) -> tuple[SafetyChecker | None, object, FastPath]:
        Image.MAX_IMAGE_PIXELS = settings.max_input_pixels  # Pillow's own bomb guard, at the same limit
        device, dtype = pipeline.pick_device(settings.device)
        log.info("loading %s on %s in %s", folder, device, str(dtype).removeprefix("torch."))
        safety = None
        if settings.safety_checker:
            with timer.stage("safety checker"):
                safety = SafetyChecker.load(folder, device, dtype)
        else:
            log.warning(
                "the safety checker is off for this deployment (INPAINT_SAFETY_CHECKER=0): no output is "
                "checked, and the disable_safety_checker input has no effect"
            )
        artifact = folder / COMPILED if (folder / COMPILED).is_dir() else None
        fast = FastPath.for_device(device, settings, artifact, shipped_trusted)
        with timer.stage("model"):
            pipe = pipeline.load_pipeline(folder, device, dtype, fast)
            fast.warm_up(pipe, safety)  # nothing on the CPU
        return safety, pipe, fast

    def _mask_from_alpha(self, image: np.ndarray, outpainting: bool) -> np.ndarray:
        if image.shape[2] == 4:
            log.info("no mask given: repainting the image's transparent pixels")
            return np.where(image[..., 3] < 128, 255, 0).astype(np.uint8)
        if outpainting:
            log.info("no mask given: painting the outpainting margins only")
            return np.zeros(image.shape[:2], np.uint8)
        raise ValueError(
            "mask is missing: give a mask (white = repaint, black = keep), "
            "or an image whose transparent pixels mark the region to repaint, or outpaint_* margins"
        )

    def healthy(self) -> bool:
        """False once the GPU has failed beyond recovery: Cog's server then reports UNHEALTHY."""
        return self.fault is None

    def inpaint(
        self, image_path: Path, mask_path: Path | None, request: InpaintRequest, out_dir: Path,
        token: CancelToken | None = None,
    ) -> Prediction:
        """One request's outputs in `out_dir`. `token`, if given, is checked between stages and denoising
        steps; a cancelled request raises concurrency.Cancelled there."""
        self._check_device()
        token = token or CancelToken()
        timer = _Timer()
        log.info("seed %d", request.seed)
        # One after the other: decoding the photo in a thread beside the mask work gained too little to keep
        # (bench/RESULTS.md, "speed-ups").
        with timer.stage("decode"):
            photo = codec.decode_photo(image_path, self.limits, "image")
            mask = None if mask_path is None else codec.decode_mask(mask_path, self.limits, "mask")
            image, deep = photo.pixels, None  # deep: a 16-bit photo's samples, which a PNG output keeps
            if image.dtype == np.uint16:  # the model sees its 8-bit reduction
                if request.output_format == "png":
                    deep = image
                    log.info("the image is 16-bit: the output PNG keeps its 16 bits wherever the painting leaves a pixel as it was")
                else:
                    log.info("the image is 16-bit, and a %s output holds 8: ask for png to keep 16", request.output_format)
                image = codec.reduce_to_8bit(image)
        self._log_truncation("prompt", request.prompt)
        if request.negative_prompt:
            self._log_truncation("negative_prompt", request.negative_prompt)
        with timer.stage("prepare"):
            if mask is None:
                mask = self._mask_from_alpha(image, any(request.margins))
            mask = codec.fit_mask(mask, _size(image))
            regions = self._regions(mask, request)
            canvas = compositing.extend_canvas(image, request.margins)  # the photo itself without margins
            if deep is not None:
                deep = compositing.deep_canvas(canvas, deep, request.margins)  # before painting reuses canvas
        token.check()
        metrics: dict[str, object] = {
            "seed": request.seed,
            "image_size": list(_size(image)),
            "canvas_size": list(_size(canvas)),
            "mask_coverage": regions.coverage,
        }
        if regions.plan is None:
            reason = "the mask is empty" if regions.empty else "strength is 0"
            log.info("%s: returning the image unchanged without running the model", reason)
            results = [canvas] * request.num_outputs
        else:
            results = self._paint(canvas, regions, mask_path is None, request, timer, metrics, token)

        if deep is not None:
            with timer.stage("composite"):
                box = None if regions.feather is None else regions.feather.box
                results = [compositing.deepen(result, deep, box) for result in results]
        token.check()
        with timer.stage("encode"):
            paths = [
                codec.encode_image(
                    result, out_dir / f"out-{index}", request.output_format, request.output_quality, self._workers.map,
                    icc_profile=photo.icc_profile,
                )
                for index, result in enumerate(results)
            ]
        metrics["timings"] = timer.rounded()
        return Prediction(paths, metrics)

    def _regions(self, mask: np.ndarray, request: InpaintRequest) -> _Regions:
        """What the mask (and the outpainting margins) alone decide: the pixels to repaint, the
        feathered paste, the crops; all on the canvas, which is the photo grown by the margins."""
        binary = compositing.prepare_mask(mask, request.invert_mask, request.mask_grow, self._workers.map)  # (H, W) bool
        outpainting = any(request.margins)
        if outpainting:
            codec.check_canvas(_size(mask), request.margins, self.limits)
            left, top, right, bottom = request.margins
            binary = np.pad(binary, ((top, bottom), (left, right)), constant_values=True)  # the margins: always painted
        count = np.count_nonzero(binary)  # faster than mean()
        coverage = round(count / binary.size, 4)
        if not count or request.strength == 0:
            return _Regions(coverage, not count)
        feather = compositing.feather_mask(binary, request.mask_blur, self._workers.map)
        touched = feather.touched(_size(binary))  # (H, W) bool: every pixel the paste changes
        # Context around each region; at least the feather band, so the whole band lies inside a crop.
        padding = max(request.mask_padding, request.mask_blur + 1)
        plan = (geometry.plan_outpaint if outpainting else geometry.plan_crops)(touched, padding, request.width, request.height)
        self._check_limits(plan, request)
        return _Regions(coverage, False, feather, touched, plan)

    def _paint(
        self,
        canvas: np.ndarray,
        regions: _Regions,
        mask_from_alpha: bool,
        request: InpaintRequest,
        timer: _Timer,
        metrics: dict[str, object],
        token: CancelToken,
    ) -> list[np.ndarray]:
        """The outputs: the model's work on each region pasted over `canvas` (which the last output reuses)."""
        feather, plan = regions.feather, regions.plan
        metrics["working_size"] = list(plan.working_size)
        metrics["crop_boxes"] = [list(box) for box in plan.boxes]
        metrics["tiled"] = plan.tiled
        log.info(
            "working at %dx%d on %d %s: %s", *plan.working_size, len(plan.boxes),
            "tile(s), one after another" if plan.tiled else "region(s)", metrics["crop_boxes"],
        )
        job = pipeline.Generation(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_outputs=request.num_outputs,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            strength=request.strength,
            scheduler=request.scheduler,
            seed=request.seed,
        )
        if plan.tiled:
            layers, generated = self._paint_tiles(canvas, regions, job, timer, token)
            with self._turn(token, timer):
                kept = self._check_safety(generated, request, timer, metrics)
        else:
            with timer.stage("prepare"):
                crops = [compositing.resize_crop(canvas, box, plan.working_size, self._workers.map) for box in plan.boxes]
                crop_masks = [compositing.crop_mask(regions.touched[top:bottom, left:right], plan.working_size)
                              for left, top, right, bottom in plan.boxes]
            with self._turn(token, timer):  # one turn for the model and the checker, so nothing waits between them
                generated = self._generate(crops, crop_masks, job, plan, timer, token)
                kept = self._check_safety(generated, request, timer, metrics)

        results = []
        with timer.stage("composite"):
            for position, output in enumerate(kept):
                last = position == len(kept) - 1
                result = canvas if last and canvas.flags.writeable else canvas.copy()  # no copy for the last one
                if plan.tiled:
                    compositing.blend_layer(result, layers[output], feather)
                else:
                    for box, outputs in zip(plan.boxes, generated):
                        compositing.composite_over(result, outputs[output], feather, box, self._workers.map)
                if mask_from_alpha and result.shape[2] == 4:
                    # The repainted region was transparent: make it as opaque as it is painted.
                    left, top, right, bottom = feather.box
                    alpha = result[top:bottom, left:right, 3]  # a view
                    alpha[...] = np.maximum(alpha, np.rint(feather.weight * 255).astype(np.uint8))
                results.append(result)
        return results

    def _paint_tiles(
        self, canvas: np.ndarray, regions: _Regions, job: pipeline.Generation, timer: _Timer, token: CancelToken
    ) -> tuple[list[np.ndarray], list[list[Image.Image]]]:
        """Outpainting tiles, one after another, every output's at once (compositing.paint_tiles):
        each output's painting of the canvas, and per tile each output's painting of it."""
        generated: list[list[Image.Image]] = []
        model_seconds = 0.0

        def paint(index: int, crops: list[Image.Image], mask: Image.Image) -> list[Image.Image]:
            nonlocal model_seconds
            start = time.perf_counter()
            # Each output is its own image in the batch; each tile its own seed, so the tiles do not repeat.
            tile_job = dataclasses.replace(job, num_outputs=1, seed=(job.seed + index) % 2**64 if index else job.seed)
            with self._turn(token, timer):
                painted = self._generate(crops, [mask] * len(crops), tile_job, regions.plan, timer, token)
            generated.append([images[0] for images in painted])
            model_seconds += time.perf_counter() - start
            return generated[-1]

        start = time.perf_counter()
        layers = compositing.paint_tiles(canvas, regions.feather, regions.touched, regions.plan, job.num_outputs,
                                         paint, self._workers.map)
        # The pixel work between the model's calls (crops, pastes): the model's stages are timed apart.
        timer.seconds["composite"] = timer.seconds.get("composite", 0.0) + time.perf_counter() - start - model_seconds
        return layers, generated

    def _generate(
        self, crops: list[Image.Image], masks: list[Image.Image], job: pipeline.Generation, plan: geometry.Plan,
        timer: _Timer,
        token: CancelToken,
    ) -> list[list[Image.Image]]:
        model_seconds: dict[str, float] = {}
        try:
            generated = pipeline.generate(self.pipe, crops, masks, job, timings=model_seconds, stop=token.check,
                                          fast=self.fast, empty_prompt=self.empty_prompt)
        except torch.OutOfMemoryError:
            pipeline.release_memory(self.pipe.device, self.fast)
            raise GPUOutOfMemory(
                f"the GPU ran out of memory painting {len(crops) * job.num_outputs // plan.batch} output(s) x "
                f"{plan.batch} region(s) at {plan.working_size[0]}x{plan.working_size[1]}; lower num_outputs or "
                "width/height and try again"
            ) from None
        except BaseException as error:  # cancelled, or any other failure: leave no memory behind for the next one
            if pipeline.fatal_device_error(error) is None:  # after a sticky CUDA error every CUDA call fails
                pipeline.release_memory(self.pipe.device, self.fast)
            raise
        for stage, seconds in model_seconds.items():
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + seconds
        return generated

    @contextmanager
    def _turn(self, token: CancelToken, timer: _Timer):
        """The model's turn on the device, and the fast path's (its compile worker's work in this process waits
        for it); the wait is timed as the "queue" stage. Everything that runs on the GPU runs in a turn, so a
        sticky CUDA error is noted here."""
        held = ExitStack()
        with timer.stage("queue"):
            self.device.acquire(token)
            try:
                held.enter_context(self.fast.turn(token.check) if self.fast is not None else nullcontext())
            except BaseException:
                self.device.release()
                raise
        try:
            yield
        except BaseException as error:
            reason = pipeline.fatal_device_error(error)
            if reason is not None and self.fault is None:
                self.fault = reason
                log.error("the GPU failed beyond recovery (%s): this container now reports UNHEALTHY", reason)
            raise
        finally:
            held.close()
            self.device.release()

    def _check_device(self) -> None:
        if self.fault is not None:
            raise DeviceFailed(
                f"this container's GPU failed beyond recovery earlier ({self.fault}) and it reports UNHEALTHY; "
                "send the request to another replica, or restart the container"
            )

    def _check_limits(self, plan: geometry.Plan, request: InpaintRequest) -> None:
        width, height = plan.working_size
        if width * height > self.settings.max_working_pixels:
            raise ValueError(
                f"width x height = {width}x{height} = {width * height:,} pixels is over this deployment's limit of "
                f"{self.settings.max_working_pixels:,}; lower width and height"
            )
        batch = request.num_outputs * plan.batch * width * height
        if batch > self.settings.max_batch_pixels:
            raise ValueError(
                f"num_outputs x regions x working size = {request.num_outputs} x {plan.batch} x {width}x{height} "
                f"= {batch:,} pixels is over this deployment's limit of {self.settings.max_batch_pixels:,}; "
                "lower num_outputs, or width and height"
            )

    def _check_safety(
        self, generated: list[list[Image.Image]], request: InpaintRequest, timer: _Timer, metrics: dict[str, object]
    ) -> list[int]:
        """Indices of the outputs to return: those the checker did not flag (all when it is off). Called in
        the request's turn on the device."""
        outputs = list(range(request.num_outputs))
        if self.safety is None or request.disable_safety_checker:
            return outputs
        with timer.stage("safety"):
            # What the model painted is checked: every crop of an output; one flagged crop flags the output.
            crop_flags = self.safety.flags([crops[output] for output in outputs for crops in generated])
        per_output = len(generated)
        flagged = [output for output in outputs if any(crop_flags[output * per_output : (output + 1) * per_output])]
        metrics["nsfw_flagged"] = len(flagged)
        metrics["nsfw_flagged_indices"] = flagged
        if len(flagged) == len(outputs):
            raise AllOutputsFlagged(
                f"the safety checker flagged all {len(outputs)} output(s) as potentially NSFW, so none is returned; "
                "try another prompt or seed"
            )
        if flagged:
            log.warning(
                "the safety checker flagged output(s) %s of %d as potentially NSFW; they are left out",
                flagged,
                len(outputs),
            )
        return [output for output in outputs if output not in flagged]

    def _log_truncation(self, name: str, text: str) -> None:
        with self._counting:
            tokens = pipeline.count_prompt_tokens(self._counter, text)
        if tokens > MAX_PROMPT_TOKENS:
            log.warning(
                "%s is %d tokens; the model reads only the first %d, the rest is ignored",
                name,
                tokens,
                MAX_PROMPT_TOKENS,
            )
