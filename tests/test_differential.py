"""This container against diffusers' own StableDiffusionInpaintPipeline, in fp32 on the CPU with the
tiny weights: the same inputs and seed paint the same pixels, byte for byte, and the UNet sees the
same inputs at every step. Each case comes with a control: the same case with that one input
changed paints differently, so a dropped or altered input cannot pass.

The photo is the working size and the mask covers most of it, so the model works on the whole photo
with no resize, and mask_blur=0 leaves no feather: inside the mask, the output is the model's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from published import REPLICATE_SCHEDULERS

from inpaint.inputs import check_inputs

SIZE = 128
SCHEDULERS = REPLICATE_SCHEDULERS


@dataclasses.dataclass(frozen=True)
class Case:
    prompt: str = "a red barn in the snow"
    negative_prompt: str | None = None
    guidance_scale: float = 7.5
    num_inference_steps: int = 3
    scheduler: str = "DPMSolverMultistep"
    strength: float = 1.0
    seed: int = 7
    num_outputs: int = 1


# (case, the control: the same case with the input under test changed)
CASES = {
    **{f"scheduler {name}": (Case(scheduler=name), Case(scheduler="DDIM" if name != "DDIM" else "PNDM")) for name in SCHEDULERS},
    "prompt": (Case(prompt="a lighthouse at dusk"), Case(prompt="")),
    "negative_prompt": (Case(negative_prompt="blurry, dark"), Case()),
    "guidance_scale": (Case(guidance_scale=3.0), Case(guidance_scale=1.0)),
    "num_inference_steps": (Case(num_inference_steps=5), Case(num_inference_steps=4)),
    "strength": (Case(strength=0.6, num_inference_steps=5), Case(strength=1.0, num_inference_steps=5)),
    "seed": (Case(seed=123456789), Case(seed=123456790)),
    "num_outputs": (Case(num_outputs=2), Case(num_outputs=2, seed=8)),
}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A textured photo at the working size and a mask over most of it (so the crop is the whole photo)."""
    folder = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(0)
    photo = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(folder / "photo.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, SIZE - 9, SIZE - 17), fill=255)
    mask.save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png", np.asarray(mask) > 127


@pytest.fixture(scope="module")
def reference(tiny_weights):
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        tiny_weights, variant="fp16", dtype=torch.float32, use_safetensors=True, local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetInputs:
    """Records what the UNet is called with, step by step."""

    def __init__(self, unet) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        values = [*args, *(kwargs[name] for name in ("sample", "timestep", "encoder_hidden_states") if name in kwargs)]
        self.calls.append(tuple(torch.as_tensor(value).detach().clone() for value in values[:3]))

    def close(self) -> None:
        self.handle.remove()


def paint_with_diffusers(pipe, photo: Path, mask: Path, case: Case) -> list[np.ndarray]:
    pipe.scheduler = SCHEDULERS[case.scheduler].from_config(pipe.scheduler.config)
    images = pipe(
        prompt=case.prompt, negative_prompt=case.negative_prompt, image=Image.open(photo).convert("RGB"),
        mask_image=Image.open(mask).convert("L"), height=SIZE, width=SIZE, strength=case.strength,
        num_inference_steps=case.num_inference_steps, guidance_scale=case.guidance_scale,
        num_images_per_prompt=case.num_outputs, generator=torch.Generator("cpu").manual_seed(case.seed),
    ).images
    return [np.asarray(image) for image in images]


def paint_with_this_container(inpainter, photo: Path, mask: Path, case: Case, out: Path) -> list[np.ndarray]:
    request = check_inputs(**dataclasses.asdict(case), width=SIZE, height=SIZE, mask_blur=0, disable_safety_checker=True)
    out.mkdir()
    prediction = inpainter.inpaint(photo, mask, request, out)
    assert prediction.metrics["crop_boxes"] == [[0, 0, SIZE, SIZE]]  # the whole photo, no resize
    return [np.asarray(Image.open(path)) for path in prediction.paths]


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_inputs_paint_the_same_pixels_as_diffusers(name, inpainter, reference, scene, tmp_path):
    case, control = CASES[name]
    photo, mask, inside = scene
    ours_unet, theirs_unet = UNetInputs(inpainter.pipe.unet), UNetInputs(reference.unet)
    try:
        ours = paint_with_this_container(inpainter, photo, mask, case, tmp_path / "ours")
        theirs = paint_with_diffusers(reference, photo, mask, case)
    finally:
        ours_unet.close()
        theirs_unet.close()
    assert len(ours) == len(theirs) == case.num_outputs
    for mine, expected in zip(ours, theirs):
        assert np.array_equal(mine[inside], expected[inside])
    assert len(ours_unet.calls) == len(theirs_unet.calls) > 0
    for step, (mine, expected) in enumerate(zip(ours_unet.calls, theirs_unet.calls)):
        assert all(torch.equal(a, b) for a, b in zip(mine, expected)), f"UNet inputs differ at step {step}"
    changed = paint_with_diffusers(reference, photo, mask, control)
    assert any(not np.array_equal(a[inside], b[inside]) for a, b in zip(changed, theirs)), f"{name}: the control paints the same"


def test_a_batch_of_regions_hands_each_region_the_images_painted_from_it(inpainter, monkeypatch):
    """Two crops with different masks, two outputs each, in one diffusers batch: every image handed
    back for crop c was denoised with crop c's mask, as the UNet saw it (its mask channel)."""
    from inpaint import pipeline

    crops = [Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)) for seed in (1, 2)]
    masks = [Image.new("L", (64, 64), 0) for _ in crops]
    ImageDraw.Draw(masks[0]).rectangle((0, 0, 31, 63), fill=255)  # left half
    ImageDraw.Draw(masks[1]).rectangle((32, 0, 63, 63), fill=255)  # right half
    raw, seen = [], UNetInputs(inpainter.pipe.unet)
    original = diffusers.StableDiffusionInpaintPipeline.__call__

    def keeping(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        raw.extend(result.images)
        return result

    monkeypatch.setattr(diffusers.StableDiffusionInpaintPipeline, "__call__", keeping)
    try:
        job = pipeline.Generation("a red barn", None, 2, 2, 7.5, 1.0, "DDIM", 3)
        grouped = pipeline.generate(inpainter.pipe, crops, masks, job)
    finally:
        seen.close()
    sample = seen.calls[0][0]  # (2 x entries, 9, h, w): the unconditional half, then the conditional one
    entries = sample.shape[0] // 2
    left_masked = [bool(sample[entry, 4, :, :4].mean() > sample[entry, 4, :, -4:].mean()) for entry in range(entries)]
    assert sorted(left_masked) == [False, False, True, True]
    for crop, images in enumerate(grouped):
        assert len(images) == 2
        for image in images:
            entry = next(index for index, candidate in enumerate(raw) if candidate is image)
            assert left_masked[entry] == (crop == 0), f"crop {crop} was handed the image of batch entry {entry}"


def test_the_empty_negative_prompt_is_encoded_once_and_is_what_diffusers_makes(inpainter, monkeypatch):
    """Without a negative prompt the text encoder runs for the empty one once per batch size, and then for
    the prompt alone; the UNet sees what it sees when diffusers encodes the empty prompt itself, for a
    batch of two regions with two outputs each."""
    from inpaint import pipeline

    crops = [Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)) for seed in (1, 2)]
    masks = [Image.new("L", (64, 64), 255)] * 2
    job = pipeline.Generation("a red barn", None, 2, 2, 7.5, 1.0, "DDIM", 3)
    encoded = []
    forward = inpainter.pipe.text_encoder.forward
    monkeypatch.setattr(inpainter.pipe.text_encoder, "forward", lambda ids, **kwargs: encoded.append(len(ids)) or forward(ids, **kwargs))
    runs = []
    for empty_prompt in (None, pipeline.EmptyPrompt()):
        seen = UNetInputs(inpainter.pipe.unet)
        try:
            images = pipeline.generate(inpainter.pipe, crops, masks, job, empty_prompt=empty_prompt)
            if empty_prompt is not None:
                again = pipeline.generate(inpainter.pipe, crops, masks, job, empty_prompt=empty_prompt)
        finally:
            seen.close()
        runs.append((images, seen.calls[:2]))
    assert encoded == [2, 2] + [2, 2] + [2]  # diffusers alone; with the cache, then the cache again
    (theirs, their_inputs), (ours, our_inputs) = runs
    assert all(torch.equal(a, b) for mine, expected in zip(our_inputs, their_inputs) for a, b in zip(mine, expected))
    assert [[image.tobytes() for image in images] for images in ours] == [[image.tobytes() for image in images] for images in theirs]
    assert [[image.tobytes() for image in images] for images in again] == [[image.tobytes() for image in images] for images in ours]
