"""The Cog Predictor in-process: setup with the tiny weights through the real loading code, then run."""

import asyncio
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageOps
from scipy import ndimage

from conftest import PREDICT_DEFAULTS, make_mask, make_photo
from inpaint.concurrency import OutputFolders
from inpaint.schedulers import SCHEDULER_NAMES
from predict import Predictor

@pytest.fixture(scope="module")
def predictor(tiny_weights):
    runner = Predictor()
    runner.setup(weights=str(tiny_weights))
    runner.outputs = OutputFolders(grace_seconds=0)  # nothing reads the files later here: each run removes the last's
    return runner


def run(predictor, image, mask, **overrides):
    return asyncio.run(predictor.run(image=image, mask=mask, **{**PREDICT_DEFAULTS, **overrides}))


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_are_pngs_at_the_input_size(predictor, photo, mask):
    outputs = run(predictor, photo, mask)
    assert len(outputs) == 1
    with Image.open(outputs[0]) as image:
        assert image.format == "PNG" and image.size == (200, 120) and image.mode == "RGB"


def test_odd_sizes_come_back_at_their_own_size(predictor, tmp_path):
    for size in [(13, 9), (451, 300), (97, 211)]:
        image = make_photo(tmp_path / f"p{size}.png", size)
        mask = make_mask(tmp_path / f"m{size}.png", size)
        with Image.open(run(predictor, image, mask, width=128, height=64)[0]) as result:
            assert result.size == size


def test_num_outputs(predictor, photo, mask):
    outputs = run(predictor, photo, mask, num_outputs=3)
    assert len(outputs) == 3
    assert len({digest(path) for path in outputs}) == 3  # different images


def test_same_seed_same_bytes_other_seed_other_bytes(predictor, photo, mask):
    first = digest(run(predictor, photo, mask, seed=7)[0])
    assert digest(run(predictor, photo, mask, seed=7)[0]) == first
    assert digest(run(predictor, photo, mask, seed=8)[0]) != first


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs(predictor, photo, mask, scheduler):
    outputs = run(predictor, photo, mask, scheduler=scheduler, negative_prompt="blurry")
    assert Image.open(outputs[0]).size == (200, 120)


def test_pixels_away_from_the_mask_are_untouched(predictor, photo, mask):
    output = np.asarray(Image.open(run(predictor, photo, mask, width=128, height=128)[0]))
    original = np.asarray(Image.open(photo).convert("RGB"))
    binary = np.asarray(Image.open(mask)) >= 128
    far = ndimage.distance_transform_edt(~binary) > 8  # the default feather width
    assert np.array_equal(output[far], original[far])
    assert not np.array_equal(output[binary], original[binary])


def test_mask_of_another_size_is_resized(predictor, tmp_path, photo):
    small_mask = make_mask(tmp_path / "small.png", (50, 30))
    assert Image.open(run(predictor, photo, small_mask)[0]).size == (200, 120)


def test_long_prompt_is_truncated_and_logged(predictor, photo, mask, caplog):
    with caplog.at_level("WARNING"):
        run(predictor, photo, mask, prompt="a red fox in the snow " * 40)
    assert "prompt is" in caplog.text and "only the first 75" in caplog.text


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really")
    return path


def test_bad_input_names_it(predictor, broken, mask):
    with pytest.raises(ValueError, match="^image could not be read"):
        run(predictor, broken, mask)
    with pytest.raises(ValueError, match="num_outputs must be between 1 and 4"):
        run(predictor, broken, mask, num_outputs=5)


def test_a_broken_photo_is_reported_before_a_broken_mask(predictor, broken, photo):
    # Both files are broken: the photo's error comes first.
    with pytest.raises(ValueError, match="^image could not be read"):
        run(predictor, broken, broken)
    with pytest.raises(ValueError, match="^mask could not be read"):
        run(predictor, photo, broken)


def test_a_one_pixel_mask_is_painted_not_taken_for_empty(predictor, tmp_path, photo, caplog):
    # 1 pixel of 200x120 rounds to a mask_coverage of 0.0; the pixel is repainted all the same.
    dot = Image.new("L", (200, 120), 0)
    dot.putpixel((100, 60), 255)
    dot.save(tmp_path / "dot.png")
    with caplog.at_level("INFO"):
        (output,) = run(predictor, photo, tmp_path / "dot.png")
    assert "mask is empty" not in caplog.text
    assert _changed(output, np.asarray(Image.open(photo).convert("RGB")))[60, 100]


def _changed(output_path, original: np.ndarray) -> np.ndarray:
    return (np.asarray(Image.open(output_path).convert("RGB")) != original).any(axis=2)


@st.composite
def scenes(draw):
    width = draw(st.integers(8, 300))
    height = draw(st.integers(max(8, -(-width // 16)), min(300, width * 16)))  # within the 16:1 input limit
    boxes = [
        sorted(draw(st.tuples(st.integers(0, width - 1), st.integers(0, width - 1))))
        + sorted(draw(st.tuples(st.integers(0, height - 1), st.integers(0, height - 1))))
        for _ in range(draw(st.integers(1, 3)))
    ]
    return (width, height), boxes, draw(st.integers(0, 16)), draw(st.integers(-4, 8))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenes())
def test_property_size_kept_and_pixels_beyond_the_band_bit_identical(predictor, scene):
    size, boxes, blur, grow = scene
    folder = Path(tempfile.mkdtemp())
    photo = make_photo(folder / "p.png", size)
    mask_image = Image.new("L", size, 0)
    for x0, x1, y0, y1 in boxes:
        ImageDraw.Draw(mask_image).rectangle((x0, y0, x1, y1), fill=255)
    mask_image.save(folder / "m.png")
    (output,) = run(predictor, photo, folder / "m.png", width=64, height=64, mask_blur=blur, mask_grow=grow)
    assert Image.open(output).size == size
    binary = np.asarray(mask_image) >= 128
    grown = ndimage.distance_transform_edt(~binary) <= grow if grow > 0 else binary
    if grow < 0:
        grown = ndimage.binary_dilation(binary, iterations=1)  # erosion only shrinks: the band stays inside this
    far = ndimage.distance_transform_edt(~grown) > blur if grown.any() else np.ones(binary.shape, bool)
    original = np.asarray(Image.open(photo).convert("RGB"))
    assert not _changed(output, original)[far].any()


def test_exif_rotated_jpeg_with_an_upright_mask(predictor, tmp_path):
    upright = Image.open(make_photo(tmp_path / "u.png", (90, 160))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # undone by the orientation tag
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).convert("RGB"))
    assert shown.shape[:2] == (160, 90)
    mask_image = Image.new("L", (90, 160), 0)
    ImageDraw.Draw(mask_image).rectangle((10, 100, 40, 140), fill=255)  # drawn on the upright photo
    mask_image.save(tmp_path / "m.png")
    (output,) = run(predictor, tmp_path / "phone.jpg", tmp_path / "m.png", mask_blur=4)
    changed = _changed(output, shown)
    assert changed.any()
    allowed = ndimage.distance_transform_edt(~(np.asarray(mask_image) >= 128)) <= 4
    assert not changed[~allowed].any()


def test_rgba_input_keeps_alpha_and_its_transparent_pixels_are_the_mask(predictor, tmp_path):
    image = Image.open(make_photo(tmp_path / "p.png")).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (50, 30, 90, 70))  # a transparent hole to fill
    image.putalpha(alpha)
    image.save(tmp_path / "hole.png")
    (output,) = run(predictor, tmp_path / "hole.png", None, mask_blur=0)
    result = Image.open(output)
    assert result.mode == "RGBA" and result.size == image.size
    result_alpha = np.asarray(result.getchannel("A"))
    assert (result_alpha[30:70, 50:90] == 255).all()  # the filled hole is opaque
    outside = np.asarray(alpha) == 255
    assert np.array_equal(np.asarray(result)[outside], np.asarray(image)[outside])


def test_rgba_input_with_a_mask_keeps_its_alpha(predictor, tmp_path, mask):
    image = Image.open(make_photo(tmp_path / "p.png")).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    image.save(tmp_path / "alpha.png")
    for fmt in ("png", "webp"):
        (output,) = run(predictor, tmp_path / "alpha.png", mask, output_format=fmt)
        assert Image.open(output).mode == "RGBA"
    result = np.asarray(Image.open(run(predictor, tmp_path / "alpha.png", mask)[0]))
    assert np.array_equal(result[..., 3], np.asarray(image)[..., 3])


def test_no_mask_and_no_transparency_is_a_clear_error(predictor, photo):
    with pytest.raises(ValueError, match="^mask is missing"):
        run(predictor, photo, None)


def test_empty_mask_returns_the_input_unchanged_without_the_model(predictor, tmp_path, photo, caplog):
    Image.new("L", (200, 120), 0).save(tmp_path / "black.png")
    with caplog.at_level("INFO"):
        outputs = run(predictor, photo, tmp_path / "black.png", num_outputs=2)
    assert len(outputs) == 2
    original = np.asarray(Image.open(photo).convert("RGB"))
    assert all(np.array_equal(np.asarray(Image.open(path)), original) for path in outputs)
    assert "mask is empty: returning the image unchanged" in caplog.text
    assert "denoising" not in caplog.text


def test_inverted_black_mask_repaints_everything(predictor, tmp_path, photo):
    Image.new("L", (200, 120), 0).save(tmp_path / "black.png")
    (output,) = run(predictor, photo, tmp_path / "black.png", invert_mask=True)
    assert _changed(output, np.asarray(Image.open(photo).convert("RGB"))).mean() > 0.9


@pytest.mark.parametrize("fmt, suffix", [("png", ".png"), ("webp", ".webp"), ("jpg", ".jpg")])
def test_output_formats(predictor, photo, mask, fmt, suffix):
    (output,) = run(predictor, photo, mask, output_format=fmt, output_quality=50)
    assert output.suffix == suffix and Image.open(output).size == (200, 120)


def test_strength_below_one_runs_and_zero_keeps_the_photo(predictor, photo, mask):
    original = np.asarray(Image.open(photo).convert("RGB"))
    assert _changed(run(predictor, photo, mask, strength=0.5, num_inference_steps=4)[0], original).any()
    assert not _changed(run(predictor, photo, mask, strength=0.0)[0], original).any()
    with pytest.raises(ValueError, match="strength x num_inference_steps must be at least 1"):
        run(predictor, photo, mask, strength=0.3, num_inference_steps=2)


def test_outpaint_margins_reach_the_canvas(predictor, photo):
    [path] = run(predictor, photo, None, outpaint_left=16, outpaint_down=8)
    assert Image.open(path).size == (200 + 16, 120 + 8)
