"""Outpainting: the outpaint_* margins grow the canvas; the photo stays bit-exact beyond the feather band.

In-process on the tiny weights (which paint noise, so "painted" means "not the fill"), through the
real server, and the tiles' blending as a property of the public geometry and compositing functions.
"""

import hashlib
import io
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from cogserver import data_uri, decode_data_uri
from conftest import make_mask, make_photo
from inpaint import compositing, geometry
from inpaint.inputs import OUTPAINT_SIDES, check_inputs

SIDES = dict(zip(OUTPAINT_SIDES, range(4)))  # input name -> its index in a box (left, top, right, bottom)


def request(**overrides):
    return check_inputs(**{"seed": 1, "num_inference_steps": 2, **overrides})


def margins_of(**sides) -> tuple[int, int, int, int]:
    box = [0, 0, 0, 0]
    for name, value in sides.items():
        box[SIDES[name]] = value
    return tuple(box)


def outputs(result) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in result.paths]


def beyond(new: np.ndarray, blur: int) -> np.ndarray:
    """(H, W) bool: pixels farther than `blur` (Euclidean) from every True pixel of `new`."""
    return ndimage.distance_transform_edt(~new) > blur


def new_area(canvas_size, margins) -> np.ndarray:
    left, top, right, bottom = margins
    new = np.ones((canvas_size[1], canvas_size[0]), bool)
    new[top : canvas_size[1] - bottom, left : canvas_size[0] - right] = False
    return new


@pytest.mark.parametrize(
    "sides",
    [
        {"outpaint_left": 40},
        {"outpaint_right": 33},
        {"outpaint_up": 25},
        {"outpaint_down": 48},
        {"outpaint_left": 20, "outpaint_right": 30},
        {"outpaint_up": 16, "outpaint_down": 40},
        {"outpaint_right": 64, "outpaint_down": 32},
        {"outpaint_left": 12, "outpaint_up": 22, "outpaint_right": 32, "outpaint_down": 42},
    ],
)
def test_the_canvas_is_the_photo_plus_the_margins_and_the_photo_is_kept_beyond_the_band(inpainter, tmp_path, sides):
    photo_path = make_photo(tmp_path / "p.png", (160, 96))
    photo = np.asarray(Image.open(photo_path))
    margins = margins_of(**sides)
    result = inpainter.inpaint(photo_path, None, request(**sides), tmp_path)
    [out] = outputs(result)
    size = (160 + margins[0] + margins[2], 96 + margins[1] + margins[3])
    assert out.shape == (size[1], size[0], 3)
    assert result.metrics["canvas_size"] == list(size) and result.metrics["image_size"] == [160, 96]
    left, top = margins[:2]
    kept = out[top : top + 96, left : left + 160]
    far = beyond(new_area(size, margins), 8)[top : top + 96, left : left + 160]  # mask_blur's default
    assert far.any() and (kept[far] == photo[far]).all()
    assert (kept != photo).any(axis=2)[~far].any(), "the seam is not feathered into the photo"
    # The new area is painted, not left as the fill the model started from.
    fill = compositing.extend_canvas(photo, margins)
    new = new_area(size, margins)
    assert np.abs(out[new].astype(int) - fill[new]).mean() > 10
    for box in result.metrics["crop_boxes"]:  # canvas coordinates
        assert 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]


def test_the_model_sees_the_photo_beside_the_margin_as_context(inpainter, tmp_path):
    photo_path = make_photo(tmp_path / "p.png", (400, 300))
    result = inpainter.inpaint(photo_path, None, request(outpaint_right=64, mask_padding=100, mask_blur=4), tmp_path)
    [box] = result.metrics["crop_boxes"]
    # The feather band and mask_padding of the photo beside it: the crop starts at least that far into the photo.
    assert box[0] <= 400 - 100 and box[2] == 464
    narrow = inpainter.inpaint(photo_path, None, request(outpaint_right=64, mask_padding=10, mask_blur=4), tmp_path)
    assert narrow.metrics["crop_boxes"][0][0] > box[0]


def test_margins_with_a_mask_paint_both_and_keep_the_rest(inpainter, tmp_path):
    photo_path = make_photo(tmp_path / "p.png", (200, 120))
    mask_path = make_mask(tmp_path / "m.png", (200, 120), box=(20, 30, 59, 69))  # inclusive: [20, 60) x [30, 70)
    photo = np.asarray(Image.open(photo_path))
    result = inpainter.inpaint(photo_path, mask_path, request(outpaint_right=40, mask_blur=4), tmp_path)
    [out] = outputs(result)
    assert out.shape == (120, 240, 3)
    new = new_area((240, 120), (0, 0, 40, 0))
    new[30:70, 20:60] = True
    far = beyond(new, 4)[:, :200]
    assert (out[:, :200][far] == photo[far]).all()
    assert (out[30:70, 20:60] != photo[30:70, 20:60]).any(axis=2).mean() > 0.9  # the masked region is repainted
    # invert_mask: everything but that region, and the margin, is repainted; the region itself is kept.
    inverted = inpainter.inpaint(photo_path, mask_path, request(outpaint_right=40, mask_blur=4, invert_mask=True), tmp_path)
    [out] = outputs(inverted)
    assert (out[36:64, 26:54] == photo[36:64, 26:54]).all()
    assert (out[:, 100:200] != photo[:, 100:200]).any(axis=2).mean() > 0.9


def test_mask_grow_grows_the_photo_mask_but_not_the_margin(inpainter, tmp_path):
    photo_path = make_photo(tmp_path / "p.png", (200, 120))
    photo = np.asarray(Image.open(photo_path))
    mask_path = make_mask(tmp_path / "m.png", (200, 120), box=(40, 40, 60, 60))
    result = inpainter.inpaint(photo_path, mask_path, request(outpaint_left=32, mask_blur=0, mask_grow=10), tmp_path)
    [out] = outputs(result)
    kept = out[:, 32:]
    changed = (kept != photo).any(axis=2)
    assert not changed[:, 0].any(), "the margin's edge was grown into the photo"
    assert changed[32:68, 32:68].mean() > 0.9  # the mask grown by 10 on each side


def test_an_alpha_photo_without_a_mask_paints_its_transparent_pixels_and_the_margins(inpainter, tmp_path):
    rgba = np.asarray(Image.open(make_photo(tmp_path / "p.png", (160, 96))).convert("RGBA")).copy()
    rgba[30:60, 40:80, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    result = inpainter.inpaint(tmp_path / "alpha.png", None, request(outpaint_up=24, mask_blur=2), tmp_path)
    [out] = outputs(result)
    assert out.shape == (120, 160, 4)
    assert (out[:24, :, 3] == 255).all() and (out[24 + 30 : 24 + 60, 40:80, 3] == 255).all()
    new = new_area((160, 120), (0, 24, 0, 0))
    new[24 + 30 : 24 + 60, 40:80] = True
    far = beyond(new, 2)[24:]
    assert (out[24:][far] == rgba[far]).all()


def test_strength_below_one_starts_from_the_fill_and_zero_returns_it(inpainter, tmp_path):
    photo_path = make_photo(tmp_path / "p.png", (160, 96))
    photo = np.asarray(Image.open(photo_path))
    fill = compositing.extend_canvas(photo, (0, 0, 48, 0))
    [kept] = outputs(inpainter.inpaint(photo_path, None, request(outpaint_right=48, strength=0.0), tmp_path))
    assert (kept == fill).all()
    [half] = outputs(inpainter.inpaint(photo_path, None, request(outpaint_right=48, strength=0.5), tmp_path))
    assert half.shape == fill.shape and (half[:, 170:] != fill[:, 170:]).any()


def test_no_mask_and_no_margins_on_an_opaque_photo_is_still_an_error(inpainter, tmp_path):
    with pytest.raises(ValueError) as error:
        inpainter.inpaint(make_photo(tmp_path / "p.png"), None, request(), tmp_path)
    assert str(error.value) == (
        "mask is missing: give a mask (white = repaint, black = keep), or an image whose transparent pixels "
        "mark the region to repaint, or outpaint_* margins"
    )


def test_without_a_mask_alpha_below_128_is_repainted_and_the_log_says_what_is(inpainter, tmp_path, caplog):
    """Half-transparent counts from alpha 127 down; strength 0 returns the canvas, after the mask is read."""
    rgba = np.asarray(Image.open(make_photo(tmp_path / "p.png", (160, 96))).convert("RGBA")).copy()
    rgba[10:40, 10:50, 3] = 127  # 1,200 pixels repainted
    rgba[50:80, 90:130, 3] = 128  # 1,200 kept
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with caplog.at_level("INFO", logger="inpaint.service"):
        result = inpainter.inpaint(tmp_path / "alpha.png", None, request(strength=0.0), tmp_path)
        assert result.metrics["mask_coverage"] == round(1200 / (160 * 96), 4)
        assert "no mask given: repainting the image's transparent pixels" in caplog.messages
        caplog.clear()
        result = inpainter.inpaint(make_photo(tmp_path / "p.png", (160, 96)), None,
                                   request(strength=0.0, outpaint_up=24), tmp_path)
        assert result.metrics["mask_coverage"] == round(24 / 120, 4)  # the margin alone
        assert "no mask given: painting the outpainting margins only" in caplog.messages


@pytest.mark.parametrize(
    "sides, words",
    [
        ({"outpaint_left": 2048, "outpaint_right": 2048, "outpaint_up": 2048, "outpaint_down": 2048}, "INPAINT_MAX_INPUT_PIXELS"),
        ({"outpaint_right": 2048}, "INPAINT_MAX_INPUT_ASPECT"),
    ],
)
def test_a_canvas_over_the_limits_is_a_clear_error_naming_the_inputs(inpainter, tmp_path, sides, words):
    photo_path = make_photo(tmp_path / "p.png", (200, 120))
    with pytest.raises(ValueError) as error:
        inpainter.inpaint(photo_path, make_mask(tmp_path / "m.png", (200, 120)), request(**sides), tmp_path)
    message = str(error.value)
    assert all(name in message for name in OUTPAINT_SIDES) and words in message and "lower the" in message


def test_a_mask_of_another_size_is_fitted_to_the_photo_before_the_canvas_is_checked(inpainter, tmp_path):
    photo_path = make_photo(tmp_path / "p.png", (200, 120))
    mask_path = make_mask(tmp_path / "m.png", (4000, 3000))  # its canvas would be over the pixel limit; the photo's is not
    result = inpainter.inpaint(photo_path, mask_path, request(outpaint_up=2048, width=64, height=64), tmp_path)
    assert result.metrics["canvas_size"] == [200, 2168]


def test_margins_are_bounded_inputs():
    for bad in (-1, 2049, 1.5, True):
        with pytest.raises(ValueError, match="outpaint_down"):
            check_inputs(outpaint_down=bad)
    assert check_inputs(outpaint_left=2048.0).margins == (2048, 0, 0, 0)


# ------------------------------------------------------------------------------------------ thin strips


@pytest.fixture(scope="module")
def strip(inpainter, tmp_path_factory):
    """A margin along the whole long edge of a wide photo: too long for one crop at the photo's resolution."""
    folder = tmp_path_factory.mktemp("strip")
    photo_path = make_photo(folder / "wide.png", (1600, 120))
    for name in "abc":
        (folder / name).mkdir()
    first = inpainter.inpaint(photo_path, None, request(outpaint_down=160, num_outputs=2), folder / "a")
    return photo_path, first, folder


def test_a_margin_along_a_long_edge_is_painted_in_overlapping_tiles(strip):
    photo_path, result, _ = strip
    metrics = result.metrics
    boxes = metrics["crop_boxes"]
    assert metrics["tiled"] and len(boxes) >= 3
    width, height = metrics["working_size"]
    for box in boxes:  # each tile near the photo's resolution, not the strip squeezed into one crop
        assert (box[2] - box[0]) / width <= geometry.MAX_SHRINK and (box[3] - box[1]) / height <= geometry.MAX_SHRINK
    for before, after in zip(boxes, boxes[1:]):
        assert after[0] < before[2], "neighbouring tiles do not overlap"
    covered = np.zeros((280, 1600), bool)
    for left, top, right, bottom in boxes:
        covered[top:bottom, left:right] = True
    assert covered[120:].all()  # the whole margin, corners included
    out = outputs(result)
    assert [image.shape for image in out] == [(280, 1600, 3)] * 2 and (out[0] != out[1]).any()
    photo = np.asarray(Image.open(photo_path))
    assert (out[0][: 120 - 8] == photo[: 120 - 8]).all()


def test_tile_edges_are_no_sharper_than_the_painting_inside_the_tiles(strip):
    """Across the columns where one tile's painting gives way to the next, neighbouring pixels differ no
    more than neighbouring columns do elsewhere in the margin (the tiny model paints correlated noise)."""
    _, result, _ = strip
    out = outputs(result)[0][120:].astype(np.int32)
    steps = np.abs(np.diff(out, axis=1)).mean(axis=(0, 2))  # per column boundary, mean over the margin's rows
    seams = {box[0] - 1 for box in result.metrics["crop_boxes"][1:]}  # a hard edge would be at a tile's left side
    ordinary = np.median(steps)
    for column in seams:
        assert steps[column] <= 2 * ordinary + 2, (column, steps[column], ordinary)


def test_same_seed_same_bytes_when_tiled(strip, inpainter):
    photo_path, first, folder = strip
    again = inpainter.inpaint(photo_path, None, request(outpaint_down=160, num_outputs=2), folder / "b")
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert list(map(digest, first.paths)) == list(map(digest, again.paths))
    other = inpainter.inpaint(photo_path, None, request(outpaint_down=160, seed=2), folder / "c")
    assert digest(other.paths[0]) != digest(first.paths[0])


def test_a_tiled_prediction_logs_its_tiles_and_times_its_pixel_work_apart_from_the_model(inpainter, tmp_path, caplog,
                                                                                           monkeypatch):
    """The log names the tiles; each of the model's stages sums its time over the tiles; "composite"
    holds the crops and pastes between the model's calls, not the model's own time again: the stages
    add up to no more than the prediction took."""
    from inpaint import pipeline

    calls, generate = [], pipeline.generate

    def timed(pipe, crops, masks, job, *, timings, **kwargs):  # each tile's own model stages, as generate timed them
        try:
            return generate(pipe, crops, masks, job, timings=timings, **kwargs)
        finally:
            calls.append(dict(timings))

    monkeypatch.setattr(pipeline, "generate", timed)
    photo_path = make_photo(tmp_path / "wide.png", (1600, 120))
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="inpaint.service"):
        result = inpainter.inpaint(photo_path, None, request(outpaint_down=160), tmp_path)
    took = time.perf_counter() - start
    boxes, (width, height) = result.metrics["crop_boxes"], result.metrics["working_size"]
    assert result.metrics["tiled"] and len(boxes) >= 3
    assert f"working at {width}x{height} on {len(boxes)} tile(s), one after another: {boxes}" in caplog.messages
    timings = result.metrics["timings"]
    assert set(timings) == {"decode", "prepare", "queue", "text_encode", "vae_encode", "denoise", "vae_decode", "safety",
                            "composite", "encode"}
    assert timings["composite"] > 0 and timings["denoise"] > 0
    assert sum(timings.values()) <= took + 0.001 * len(timings), (timings, took)  # each rounded to 0.1 ms
    assert len(calls) == len(boxes)
    for stage in ("text_encode", "vae_encode", "denoise", "vae_decode"):
        assert timings[stage] == round(sum(call.get(stage, 0.0) for call in calls), 4), (stage, calls)
    # each tile its own seed, the next one up: from the largest seed the next ones wrap round to 0
    (tmp_path / "top").mkdir()
    top = inpainter.inpaint(photo_path, None, request(outpaint_down=160, seed=2**64 - 1), tmp_path / "top")
    assert top.metrics["seed"] == 2**64 - 1 and len(top.paths) == 1


def test_safety_flags_attach_to_the_output_whose_tile_was_flagged(inpainter, monkeypatch, tmp_path):
    """Three outputs painted in tiles; the checker flags tile 1 of output 1 only: output 1 alone is left
    out, and each output returned holds its own tiles' painting."""
    from inpaint import pipeline
    from inpaint.service import Inpainter

    def generate(pipe, crops, masks, job, timings=None, stop=None, **speed_ups):  # tiles: one crop per output, each tile its own seed
        tile = job.seed - 5
        return [[Image.new("RGB", crop.size, (10 * output, 10 * tile, 200))] for output, crop in enumerate(crops)]

    class Checker:
        def flags(self, images):
            return [image.getpixel((0, 0)) == (10, 10, 200) for image in images]

    monkeypatch.setattr(pipeline, "generate", generate)
    served = Inpainter(inpainter.pipe, inpainter.settings, Checker())
    photo_path = make_photo(tmp_path / "wide.png", (1600, 120))
    prediction = served.inpaint(photo_path, None, request(outpaint_down=160, num_outputs=3, seed=5), tmp_path)
    boxes = prediction.metrics["crop_boxes"]
    assert prediction.metrics["tiled"] and len(boxes) >= 2
    assert prediction.metrics["nsfw_flagged_indices"] == [1]
    kept = outputs(prediction)
    for image, output in zip(kept, (0, 2)):
        for tile, box in enumerate(boxes):  # one row of tiles: the columns this tile alone paints
            start = boxes[tile - 1][2] if tile else box[0]
            stop = boxes[tile + 1][0] if tile + 1 < len(boxes) else box[2]
            assert start < stop and tuple(image[-10, (start + stop) // 2]) == (10 * output, 10 * tile, 200)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    photo=st.tuples(st.integers(64, 900), st.integers(64, 900)),
    margins=st.tuples(*[st.sampled_from([0, 0, 24, 130, 400])] * 4).filter(any),
    padding=st.integers(9, 80),
    blur=st.integers(0, 8),
)
def test_property_tiles_cover_the_new_area_and_blend_without_a_hard_edge(photo, margins, padding, blur):
    """Whatever each tile paints (here: flat colours, unlike in turn), the painting covers every new pixel
    through, and where tiles meet the colour changes no faster than the tiles' smoothstep ramps allow."""
    size = (photo[0] + margins[0] + margins[2], photo[1] + margins[1] + margins[3])
    binary = new_area(size, margins)
    feather = compositing.feather_mask(binary, blur)
    touched = feather.touched(size)
    plan = geometry.plan_tiles(touched, padding)
    canvas = np.full((size[1], size[0], 3), 127, np.uint8)
    asked = []

    def paint(index, crops, mask):  # tile `index`: red 0 or 255 in turn, and green 200 (the canvas has 127)
        asked.append(index)
        return [Image.new("RGB", plan.working_size, (255 * (index % 2), 200, 0))]

    [layer] = compositing.paint_tiles(canvas, feather, touched, plan, 1, paint)
    assert asked == list(range(len(plan.boxes))) and len(asked) <= geometry.MAX_TILES
    compositing.blend_layer(canvas, layer, feather)
    full = np.zeros(touched.shape, bool)
    left, top, right, bottom = feather.box
    full[top:bottom, left:right] = feather.weight >= 1
    assert (canvas[..., 1][full] == 200).all()  # every new pixel painted through, none of the canvas left
    values = canvas[..., 0].astype(int)
    slope = 255 * 1.5 / plan.blend + 2  # smoothstep's steepest step, and rounding
    across = np.abs(np.diff(values, axis=1))[full[:, 1:] & full[:, :-1]]
    down = np.abs(np.diff(values, axis=0))[full[1:] & full[:-1]]
    assert full.any() and across.max(initial=0) <= slope and down.max(initial=0) <= slope


# ------------------------------------------------------------------------------------------ the real server


def test_outpainting_through_the_real_server(server, tmp_path):
    image = make_photo(tmp_path / "photo.png", (120, 80))
    body = {"image": data_uri(image), "num_inference_steps": 2, "seed": 3, "outpaint_left": 24, "outpaint_down": 16}
    status, response = server.predict(body)
    assert status == 200 and response["status"] == "succeeded", response.get("error")
    with Image.open(io.BytesIO(decode_data_uri(response["output"][0]))) as out:
        assert out.size == (144, 96)
    assert response["metrics"]["canvas_size"] == [144, 96]
    status, response = server.predict({**body, "outpaint_right": 2048})
    assert response["status"] == "failed" and "outpaint_right" in response["error"] and "INPAINT_MAX_INPUT_ASPECT" in response["error"]
    status, response = server.predict({**body, "outpaint_up": 4096})
    assert status == 422 or response["status"] == "failed"
    status, response = server.predict(body)
    assert response["status"] == "succeeded"  # the server keeps serving
