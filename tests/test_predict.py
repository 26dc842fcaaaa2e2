"""The Cog Predictor in-process: setup with the tiny weights through the real loading code, then run."""

import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import make_mask, make_photo
from inpaint import inputs
from inpaint.schedulers import SCHEDULER_NAMES
from predict import Predictor

DEFAULTS = dict(
    prompt=inputs.DEFAULT_PROMPT,
    negative_prompt=None,
    width=64,
    height=64,
    num_outputs=1,
    num_inference_steps=2,
    guidance_scale=inputs.DEFAULT_GUIDANCE,
    scheduler=inputs.DEFAULT_SCHEDULER,
    seed=1,
)


@pytest.fixture(scope="module")
def predictor(tiny_weights):
    runner = Predictor()
    runner.setup(weights=str(tiny_weights))
    return runner


def run(predictor, image, mask, **overrides):
    return predictor.run(image=image, mask=mask, **{**DEFAULTS, **overrides})


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


def test_bad_input_names_it(predictor, tmp_path, mask):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="^image could not be read"):
        run(predictor, broken, mask)
    with pytest.raises(ValueError, match="num_outputs must be between 1 and 4"):
        run(predictor, broken, mask, num_outputs=5)
