"""The service's pixel work (mask clean-up, feather, boxes, crops, paste, batch) against the plain
reference in oracle.py, on random photos, masks and settings. The model is replaced by a painter
whose output depends on the crop it is given, the output and the region, so a crop shifted against
its paste, a region given another's painting, or an output given another's, all show."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import oracle
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from inpaint import pipeline
from inpaint.inputs import check_inputs


def painter(seen: Image.Image, index: int, region: int) -> Image.Image:
    """The crop inverted and tinted by output and region: a different picture for each."""
    pixels = 255 - np.asarray(seen).astype(np.int16)
    pixels[..., index % 3] += 40 * (index + 1)
    pixels[..., (region + 1) % 3] += 25 * (region + 1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture
def painting(monkeypatch):
    """The service with the model replaced by `painter` (the differential tests cover the model)."""

    def generate(pipe, crops, masks, job, timings=None, stop=None, **speed_ups):
        return [[painter(crop, index, region) for index in range(job.num_outputs)] for region, crop in enumerate(crops)]

    monkeypatch.setattr(pipeline, "generate", generate)


@st.composite
def scenes(draw):
    width = draw(st.integers(24, 220))
    height = draw(st.integers(max(24, width // 8), min(220, width * 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    photo = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    mask = Image.new("L", (width, height), 0)
    drawing = ImageDraw.Draw(mask)
    for _ in range(draw(st.integers(1, 5))):
        x0, x1 = sorted(draw(st.tuples(st.integers(0, width - 1), st.integers(0, width - 1))))
        y0, y1 = sorted(draw(st.tuples(st.integers(0, height - 1), st.integers(0, height - 1))))
        shape = drawing.ellipse if draw(st.booleans()) else drawing.rectangle
        shape((x0, y0, x1, y1), fill=draw(st.sampled_from([255, 200, 128, 127])))
    if draw(st.booleans()):  # a mask of another size: resized to the photo (nearest)
        mask = mask.resize((max(8, width // 2), max(8, height // 2)), Image.Resampling.BILINEAR)
    options = {
        "invert": draw(st.booleans()),
        "grow": draw(st.integers(-6, 6)),
        "blur": draw(st.integers(0, 12)),
        "padding": draw(st.integers(0, 48)),
        "width": draw(st.sampled_from([None, 64, 128])),
        "height": draw(st.sampled_from([None, 64, 192])),
        "outputs": draw(st.integers(1, 3)),
    }
    return photo, np.asarray(mask), options


def _run_service(inpainter, photo: np.ndarray, mask: np.ndarray, options: dict, folder: Path):
    Image.fromarray(photo).save(folder / "photo.png")
    Image.fromarray(mask).save(folder / "mask.png")
    request = check_inputs(
        invert_mask=options["invert"], mask_grow=options["grow"], mask_blur=options["blur"],
        mask_padding=options["padding"], width=options["width"], height=options["height"],
        num_outputs=options["outputs"], num_inference_steps=1, seed=0, disable_safety_checker=True,
    )
    out = folder / "out"
    out.mkdir()
    prediction = inpainter.inpaint(folder / "photo.png", folder / "mask.png", request, out)
    return [np.asarray(Image.open(path)) for path in prediction.paths], prediction.metrics


@settings(max_examples=int(os.environ.get("ORACLE_EXAMPLES", "40")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scene=scenes())
def test_the_service_paints_what_the_reference_paints(inpainter, painting, tmp_path_factory, scene):
    photo, mask, options = scene
    ours, metrics = _run_service(inpainter, photo, mask, options, tmp_path_factory.mktemp("scene"))
    expected, boxes, weight = oracle.inpaint(photo, mask, painter, **options)
    assert metrics.get("crop_boxes", []) == [list(box) for box in boxes]
    assert len(ours) == len(expected) == options["outputs"]
    for mine, theirs in zip(ours, expected):
        untouched = weight == 0
        assert np.array_equal(mine[untouched], photo[untouched])  # bit for bit past the feather
        difference = np.abs(mine.astype(np.int16) - theirs.astype(np.int16))
        where = np.argwhere(difference > 1)
        note(f"{options} {photo.shape} {mask.shape} boxes {boxes} off by 2+ at {where[:5].tolist()} weights {weight[tuple(where[:5, :2].T)].tolist()}")
        assert difference.max(initial=0) <= 1  # the documented tolerance of the paste
        assert (difference > 0).mean() < 0.02


def test_each_output_holds_its_own_painting_of_each_region(inpainter, painting, tmp_path):
    """Three regions, three outputs: output i holds region r as painted for output i, exactly."""
    photo = (np.random.default_rng(1).random((300, 400, 3)) * 255).astype(np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    for left, top in ((10, 10), (300, 20), (150, 220)):
        mask[top : top + 40, left : left + 50] = 255
    options = {"invert": False, "grow": 0, "blur": 0, "padding": 8, "width": None, "height": None, "outputs": 3}
    ours, metrics = _run_service(inpainter, photo, mask, options, tmp_path)
    expected, boxes, _ = oracle.inpaint(photo, mask, painter, **options)
    assert len(boxes) == 3 and metrics["crop_boxes"] == [list(box) for box in boxes]
    for index in range(3):
        for left, top in ((10, 10), (300, 20), (150, 220)):
            inside = (slice(top, top + 40), slice(left, left + 50))
            assert np.abs(ours[index][inside].astype(int) - expected[index][inside].astype(int)).max() <= 1
    assert not np.array_equal(ours[0], ours[1])


@pytest.mark.parametrize("option, values", [
    ("grow", (0, 5)), ("padding", (8, 40)), ("blur", (0, 10)), ("invert", (False, True)),
])
def test_each_mask_input_changes_what_is_painted(inpainter, painting, tmp_path, option, values):
    """mask_grow moves the edge of the changed area by that many pixels, mask_padding the crop box,
    mask_blur the band, invert_mask the side: each shown against the reference."""
    photo = (np.random.default_rng(2).random((200, 240, 3)) * 255).astype(np.uint8)
    mask = np.zeros((200, 240), np.uint8)
    mask[60:120, 80:150] = 255
    base = {"invert": False, "grow": 0, "blur": 0, "padding": 8, "width": None, "height": None, "outputs": 1}
    changed = []
    for value in values:
        options = {**base, option: value}
        folder = tmp_path / f"{option}-{value}"
        folder.mkdir()
        (ours,), metrics = _run_service(inpainter, photo, mask, options, folder)
        (theirs,), boxes, _ = oracle.inpaint(photo, mask, painter, **options)
        assert metrics["crop_boxes"] == [list(box) for box in boxes]
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
        changed.append(np.any(ours != photo, axis=-1))
    if option == "grow":
        rows, columns = np.nonzero(changed[1])
        assert (rows.min(), rows.max(), columns.min(), columns.max()) == (60 - 5, 119 + 5, 80 - 5, 149 + 5)
    else:
        assert not np.array_equal(changed[0], changed[1]) or option == "padding"


def test_safety_flags_attach_to_the_output_whose_region_was_flagged(inpainter, monkeypatch, tmp_path):
    """Two regions, three outputs; the checker flags only region 1 of output 1: output 1 alone is left out."""
    from inpaint.service import Inpainter

    def generate(pipe, crops, masks, job, timings=None, stop=None, **speed_ups):  # each (region, output) painted its own solid colour
        return [[Image.new("RGB", crop.size, (10 * index, 10 * region, 200)) for index in range(job.num_outputs)]
                for region, crop in enumerate(crops)]

    class Checker:
        def flags(self, images):
            return [image.getpixel((0, 0)) == (10, 10, 200) for image in images]

    monkeypatch.setattr(pipeline, "generate", generate)
    served = Inpainter(inpainter.pipe, inpainter.settings, Checker())
    photo = (np.random.default_rng(3).random((300, 400, 3)) * 255).astype(np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[10:50, 10:60] = mask[230:270, 320:370] = 255
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    request = check_inputs(num_outputs=3, num_inference_steps=1, seed=0, mask_blur=0, mask_padding=8)
    prediction = served.inpaint(tmp_path / "photo.png", tmp_path / "mask.png", request, tmp_path)
    assert len(prediction.metrics["crop_boxes"]) == 2
    assert prediction.metrics["nsfw_flagged_indices"] == [1] and prediction.metrics["nsfw_flagged"] == 1
    kept = [np.asarray(Image.open(path)) for path in prediction.paths]
    assert [tuple(image[30, 35]) for image in kept] == [(0, 0, 200), (20, 0, 200)]  # outputs 0 and 2, region 0
    assert [tuple(image[250, 345]) for image in kept] == [(0, 10, 200), (20, 10, 200)]  # and their region 1
