"""Sizes and boxes: plain geometry, no model."""

from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from inpaint import geometry
from inpaint.geometry import MAX_CROPS, fit_box_to_aspect, fit_working_size, mask_regions, plan_crops


def test_working_size_is_about_512_squared_in_multiples_of_64():
    assert fit_working_size(1.0) == (512, 512)
    width, height = fit_working_size(16 / 9)
    assert width % 64 == 0 and height % 64 == 0 and abs(width / height - 16 / 9) < 0.2
    assert 0.8 < width * height / 512**2 < 1.25
    assert fit_working_size(100.0) == (1024, 64)  # clamped to 64..1024


def test_explicit_sides_are_kept():
    assert fit_working_size(2.0, 768, 256) == (768, 256)
    assert fit_working_size(2.0, width=512) == (512, 256)
    assert fit_working_size(2.0, height=256) == (512, 256)


def test_fit_box_to_aspect_grows_the_short_side_inside_the_image():
    assert fit_box_to_aspect((100, 100, 200, 150), 1.0, (1000, 1000)) == (100, 75, 200, 175)
    assert fit_box_to_aspect((0, 0, 100, 50), 1.0, (1000, 1000)) == (0, 0, 100, 100)  # shifted, not clipped
    assert fit_box_to_aspect((0, 0, 100, 50), 1.0, (1000, 60)) == (0, 0, 100, 60)  # the image is too short


def test_small_mask_in_a_large_image_gets_a_crop():
    binary = np.zeros((3000, 4000), bool)
    binary[1000:1100, 2000:2050] = True
    plan = plan_crops(binary, padding=32)
    (box,) = plan.boxes
    left, top, right, bottom = box
    assert left <= 2000 - 32 and top <= 1000 - 32 and right >= 2050 + 32 and bottom >= 1100 + 32
    assert (right - left) * (bottom - top) < 0.01 * 4000 * 3000
    assert abs((right - left) / (bottom - top) - plan.working_size[0] / plan.working_size[1]) < 0.02


def test_large_mask_uses_the_whole_image():
    binary = np.zeros((300, 400), bool)
    binary[20:280, 20:380] = True
    plan = plan_crops(binary, padding=32)
    assert plan.boxes == [(0, 0, 400, 300)]


def test_a_mask_covering_half_the_image_takes_it_whole_without_labelling_regions():
    binary = np.zeros((300, 400), bool)
    binary[:, :200] = True  # exactly half
    with mock.patch.object(geometry, "mask_regions", side_effect=AssertionError("labelled")):
        assert plan_crops(binary, padding=0).boxes == [(0, 0, 400, 300)]
    binary[0, 0] = False  # just under half: the regions are labelled, and their padded boxes decide
    assert plan_crops(binary, padding=0).boxes == [(0, 0, 400, 300)]


def test_distant_regions_get_one_crop_each_with_one_working_size():
    binary = np.zeros((2000, 3000), bool)
    binary[100:150, 100:180] = True
    binary[1700:1800, 2700:2760] = True
    plan = plan_crops(binary, padding=32)
    assert len(plan.boxes) == 2


def test_too_many_regions_use_the_whole_image():
    binary = np.zeros((2000, 2000), bool)
    for index in range(MAX_CROPS + 1):
        binary[index * 350 + 10 : index * 350 + 20, 10:20] = True
    assert plan_crops(binary, padding=16).boxes == [(0, 0, 2000, 2000)]


@st.composite
def masks(draw):
    width, height = draw(st.integers(8, 600)), draw(st.integers(8, 600))
    binary = np.zeros((height, width), bool)
    for _ in range(draw(st.integers(1, 6))):
        x, y = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        binary[y : y + draw(st.integers(1, 80)), x : x + draw(st.integers(1, 80))] = True
    return binary, draw(st.integers(0, 64)), draw(st.sampled_from([None, 256, 512]))


@settings(max_examples=200, deadline=None)
@given(masks())
def test_crop_boxes_stay_inside_the_image_cover_the_padded_mask_and_do_not_overlap(case):
    binary, padding, width = case
    height, image_width = binary.shape
    plan = plan_crops(binary, padding, width=width)
    covered = np.zeros_like(binary)
    for left, top, right, bottom in plan.boxes:
        assert 0 <= left < right <= image_width and 0 <= top < bottom <= height
        assert not covered[top:bottom, left:right].any()  # boxes never overlap
        covered[top:bottom, left:right] = True
    for left, top, right, bottom in mask_regions(binary):
        padded = (max(0, left - padding), max(0, top - padding), min(image_width, right + padding), min(height, bottom + padding))
        assert covered[padded[1] : padded[3], padded[0] : padded[2]].all()
    assert all(side % 64 == 0 and 64 <= side <= 1024 for side in plan.working_size)
    if width:
        assert plan.working_size[0] == width


@settings(max_examples=200, deadline=None)
@given(masks())
def test_labelling_cells_gives_the_plan_of_labelling_pixels(case):
    """Cells of side up to the padding merge only regions whose padded boxes overlap anyway."""
    binary, padding, width = case
    plan = plan_crops(binary, padding, width=width)
    assert plan_crops(binary, padding, width=width, cell=1) == plan


@settings(max_examples=100, deadline=None)
@given(masks(), st.sampled_from([2, 3, 8, 16]))
def test_cells_give_the_exact_box_of_each_regions_pixels(case, block):
    binary = case[0]
    exact = mask_regions(binary)
    boxes = mask_regions(binary, block)
    for box in boxes:  # the union of the exact boxes it holds
        inside = [e for e in exact if e[0] >= box[0] and e[1] >= box[1] and e[2] <= box[2] and e[3] <= box[3]]
        assert inside and (min(e[0] for e in inside), min(e[1] for e in inside)) == box[:2]
        assert (max(e[2] for e in inside), max(e[3] for e in inside)) == box[2:]
    assert all(any(e[0] >= b[0] and e[1] >= b[1] and e[2] <= b[2] and e[3] <= b[3] for b in boxes) for e in exact)


def test_a_mask_of_many_dots_is_planned_at_once():
    """29,241 dots 3 pixels apart with 1 pixel of padding: the pairwise merge took 35 s on them."""
    binary = np.zeros((512, 512), bool)
    binary[::3, ::3] = True
    assert mask_regions(binary, limit=64) is None
    plan = plan_crops(binary, padding=1)
    assert plan.boxes == [(0, 0, 512, 512)]
    binary[:] = False
    binary[100:160:3, 100:160:3] = True  # a patch of 400 dots, 100 to 157: one crop around them and their padding
    (box,) = plan_crops(binary, padding=1).boxes
    assert box[0] <= 99 and box[1] <= 99 and box[2] >= 159 and box[3] >= 159 and box[2] - box[0] < 100
