"""The compositing code is plain image code: tested without the model."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from inpaint.compositing import composite_over, feather_mask, grow_mask, mask_box


@st.composite
def scenes(draw):
    width = draw(st.integers(8, 96))
    height = draw(st.integers(8, 96))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(draw(st.integers(0, 3))):
        x0, x1 = sorted(draw(st.tuples(st.integers(0, width - 1), st.integers(0, width - 1))))
        y0, y1 = sorted(draw(st.tuples(st.integers(0, height - 1), st.integers(0, height - 1))))
        mask[y0 : y1 + 1, x0 : x1 + 1] = 255
    radius = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**16))
    return Image.fromarray(mask, "L"), radius, seed


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_pixels_farther_than_the_radius_are_bit_identical_and_the_mask_is_fully_generated(scene):
    mask, radius, seed = scene
    rng = np.random.default_rng(seed)
    shape = (mask.height, mask.width, 3)
    original = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB")
    generated = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB")
    alpha = feather_mask(mask, radius)
    result = np.asarray(composite_over(original, generated, alpha))
    binary = np.asarray(mask) >= 128
    assert result.shape == shape
    if binary.any():
        distance = ndimage.distance_transform_edt(~binary)
        far = distance > radius
    else:
        far = np.ones(binary.shape, bool)
    assert np.array_equal(result[far], np.asarray(original)[far])
    assert np.array_equal(result[binary], np.asarray(generated)[binary])
    assert ((alpha >= 0) & (alpha <= 1)).all()


def test_feather_eases_monotonically_away_from_the_mask():
    mask = Image.new("L", (64, 8), 0)
    mask.paste(255, (0, 0, 20, 8))
    alpha = feather_mask(mask, 8)[4]
    assert alpha[19] == 1.0 and alpha[28] == 0.0
    assert all(alpha[i] >= alpha[i + 1] for i in range(19, 30))
    assert 0 < alpha[24] < 1


def test_grow_mask_covers_every_touched_pixel():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (10, 10, 20, 20))
    alpha = feather_mask(mask, 4)
    grown = np.asarray(grow_mask(alpha))
    assert np.array_equal(grown > 0, alpha > 0)


def test_mask_box():
    mask = Image.new("L", (50, 40), 0)
    assert mask_box(mask) is None
    mask.paste(255, (10, 5, 20, 15))
    assert mask_box(mask) == (10, 5, 20, 15)
    assert mask_box(mask, 8) == (2, 0, 28, 23)
