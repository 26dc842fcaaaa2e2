"""Sizes and boxes: plain geometry, no model."""

from unittest import mock

import numpy as np
import pytest
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


def test_the_automatic_working_sizes_are_listed_in_order():
    automatic = geometry.automatic_working_sizes()  # called in the test, so that a mutation run sees the mutant
    assert len(automatic) == 31 and automatic == sorted(set(automatic))
    assert {(512, 512), (576, 448), (448, 576), (1024, 64), (64, 1024)} <= set(automatic)
    assert all(width % 64 == height % 64 == 0 for width, height in automatic)


def test_the_automatic_working_sizes_are_those_a_sweep_of_aspects_finer_than_their_steps_gives():
    """Each side is a step function of the aspect; the closest two steps of either side are 0.8% apart, and the
    sweep's aspects 0.07%, so it meets every size between them."""
    swept = {fit_working_size(float(aspect)) for aspect in np.geomspace(1e-3, 1e3, 20_001)}
    assert geometry.automatic_working_sizes() == sorted(swept)


@given(st.floats(min_value=1e-3, max_value=1e3))
def test_every_aspect_gets_a_listed_automatic_working_size(aspect):
    assert fit_working_size(aspect) in geometry.automatic_working_sizes()


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


def test_boxes_intersect_only_where_they_share_pixels():
    assert geometry.intersect((0, 0, 10, 10), (5, 2, 20, 8)) == (5, 2, 10, 8)
    assert geometry.intersect((0, 0, 10, 10), (10, 0, 20, 10)) is None  # touching along x
    assert geometry.intersect((0, 0, 10, 10), (0, 10, 10, 20)) is None  # touching along y
    assert geometry.intersect((0, 0, 10, 10), (20, 2, 30, 8)) is None  # apart along x only
    assert geometry.intersect((0, 0, 10, 10), (2, 20, 8, 30)) is None  # apart along y only
    assert geometry.box_area((10, 20, 13, 27)) == 21


def test_overlapping_boxes_merge_and_touching_ones_do_not():
    merge = geometry._merge_overlapping
    touching = [(0, 0, 10, 10), (10, 0, 20, 10), (0, 10, 10, 20)]
    assert merge(touching) == merge(touching[::-1]) == sorted(touching)
    # the third bridges the first two; the union of all three then reaches the fourth
    assert merge([(0, 0, 10, 10), (20, 0, 30, 10), (5, 0, 25, 4), (28, 9, 40, 40)]) == [(0, 0, 40, 40)]
    assert merge([(28, 9, 40, 40), (5, 0, 25, 4), (20, 0, 30, 10), (0, 0, 10, 10)]) == [(0, 0, 40, 40)]
    assert merge([(50, 50, 60, 60), (0, 0, 10, 10), (5, 5, 15, 15)]) == [(0, 0, 15, 15), (50, 50, 60, 60)]


def test_regions_are_eight_connected_and_exact_by_default():
    binary = np.zeros((20, 20), bool)
    binary[5, 5] = binary[6, 6] = True  # touching at a corner: one region
    binary[5, 8] = True  # a pixel apart from it: another
    assert mask_regions(binary) == [(5, 5, 7, 7), (8, 5, 9, 6)]
    assert mask_regions(binary, limit=2) == [(5, 5, 7, 7), (8, 5, 9, 6)]  # at the limit, not over it
    assert mask_regions(binary, limit=1) is None
    assert mask_regions(binary, block=4) == [(5, 5, 9, 7)]  # cells of 4: the two in one cell


def test_padded_regions_merge_only_where_the_padding_overlaps():
    binary = np.zeros((400, 400), bool)
    binary[10, 10] = binary[10, 13] = True  # 2 pixels apart: with no padding, two regions
    binary[10, 150] = True  # 136 pixels further
    size = (400, 400)
    assert geometry._padded_regions(binary, 0, size) == [(10, 10, 11, 11), (13, 10, 14, 11), (150, 10, 151, 11)]
    assert geometry._padded_regions(binary, 1, size) == [(9, 9, 12, 12), (12, 9, 15, 12), (149, 9, 152, 12)]  # touching
    assert geometry._padded_regions(binary, 8, size) == [(2, 2, 22, 19), (142, 2, 159, 19)]


def test_four_regions_get_four_crops_and_the_largest_sets_the_working_aspect():
    binary = np.zeros((3000, 3000), bool)
    binary[100:140, 100:300] = True  # wide, the largest
    for left in (1500, 2000, 2500):  # small and tall, further right
        binary[2000:2060, left : left + 20] = True
    plan = plan_crops(binary, padding=8)
    assert len(plan.boxes) == MAX_CROPS
    assert plan.working_size == fit_working_size(216 / 56)


def test_how_much_a_plan_shrinks_its_crops():
    assert geometry.shrink(geometry.Plan([(0, 100, 200, 300)], (100, 100))) == 2.0
    assert geometry.shrink(geometry.Plan([(10, 100, 60, 400), (0, 0, 64, 64)], (50, 100))) == 3.0
    assert geometry.shrink(geometry.Plan([(0, 0, 256, 256)], (512, 512))) == 0.5


def test_outpainting_keeps_explicit_sides_and_tiles_only_beyond_the_shrink_limit():
    whole = np.ones((768, 768), bool)  # one crop of 768 at 512: shrunk exactly 1.5x, still one crop
    assert geometry.plan_outpaint(whole, 0).boxes == [(0, 0, 768, 768)]
    assert geometry.plan_outpaint(np.ones((832, 832), bool), 0).tiled  # 1.625x: tiles
    strip = np.zeros((600, 2000), bool)
    strip[500:] = True
    cases = [  # (mask, sides asked for, working size, tiled)
        (whole, {"width": 576}, (576, 576), False), (whole, {"height": 576}, (576, 576), False),
        (whole, {"width": 256}, (256, 256), True),  # 3x: tiles
        (strip, {"width": 512}, (512, 256), True), (strip, {"height": 256}, (512, 256), True),
        (strip, {"width": 320, "height": 192}, (320, 192), True),
    ]
    for binary, sides, working, tiled in cases:
        plan = geometry.plan_outpaint(binary, 16, **sides)
        assert (plan.working_size, plan.tiled) == (working, tiled)


# ------------------------------------------------------------------------------------ outpainting tiles
# Worked by hand from plan_tiles' contract: the region's box grown by the padding, tiles of the working
# size for its aspect (clamped to 1:2..2:1) with TILE_OVERLAP pixels shared, as few as cover the box,
# evenly spaced from its first pixel to its last; along a side shorter than a tile, one tile centred on
# the box and pushed inside the canvas.


def test_tiles_along_a_long_bottom_margin():
    binary = np.zeros((600, 2000), bool)
    binary[500:, 100:1900] = True
    plan = geometry.plan_tiles(binary, 40)
    # padded box (60, 460, 1940, 600): aspect 1880/140, clamped to 2 -> 704x384 at about 512x512 in area.
    # Columns: 1880 = 704 + 3 x (704 - 128 shared) at most -> 4 tiles, from 60 to 1940 - 704 = 1236.
    # Rows: 140 < 384 -> one tile centred on 460..600 (338), pushed inside the canvas: 600 - 384 = 216.
    assert plan.working_size == (704, 384)
    assert plan.boxes == [(60, 216, 764, 600), (452, 216, 1156, 600), (844, 216, 1548, 600), (1236, 216, 1940, 600)]
    assert plan.joins == [(None, None), (764, None), (1156, None), (1548, None)]
    assert plan.blend == 64 and plan.tiled and plan.batch == 1


def test_tiles_along_a_tall_right_margin():
    binary = np.zeros((2000, 600), bool)
    binary[100:1900, 500:] = True
    plan = geometry.plan_tiles(binary, 40)
    # the transpose of the case above: aspect 140/1880, clamped to 1/2 -> 384x704
    assert plan.working_size == (384, 704)
    assert plan.boxes == [(216, 60, 600, 764), (216, 452, 600, 1156), (216, 844, 600, 1548), (216, 1236, 600, 1940)]
    assert plan.joins == [(None, None), (None, 764), (None, 1156), (None, 1548)]


def test_tiles_around_a_photo_in_a_square_frame():
    binary = np.ones((1400, 1400), bool)
    binary[300:1100, 300:1100] = False  # the photo; the frame around it is painted
    plan = geometry.plan_tiles(binary, 0)
    # the box is the canvas, aspect 1 -> 512x512 tiles; 1400 = 512 + 3 x 384 at most -> 4 x 4, at 0, 296, 592, 888
    starts = [0, 296, 592, 888]
    assert plan.working_size == (512, 512)
    assert plan.boxes == [(x, y, x + 512, y + 512) for y in starts for x in starts]  # row by row
    assert plan.joins == [(x - 296 + 512 if x else None, y - 296 + 512 if y else None) for y in starts for x in starts]
    offset = np.zeros((1400, 1600), bool)
    offset[100:1300, 300:1500] = True  # square, away from the canvas' corner: square tiles too
    assert geometry.plan_tiles(offset, 0).working_size == (512, 512)


@pytest.mark.parametrize("side", ["width", "height"])
def test_tiles_keep_an_explicit_working_side(side):
    binary = np.zeros((600, 2000), bool)
    binary[500:, 100:1900] = True
    plan = geometry.plan_tiles(binary, 40, **{side: 512 if side == "width" else 256})
    # as the bottom margin above, at 512x256 (the other side follows the aspect, 2): 1880 = 512 + 4 x 384
    # at most -> 5 columns from 60 to 1428; one row centred on 460..600 and pushed inside: 600 - 256
    starts = [60, 402, 744, 1086, 1428]
    assert plan.working_size == (512, 256)
    assert plan.boxes == [(x, 344, x + 512, 600) for x in starts]
    assert plan.joins == [(None, None)] + [(x + 512, None) for x in starts[:-1]]


@pytest.mark.parametrize("transpose", [False, True])
def test_a_canvas_narrower_than_a_tile_works_at_its_own_side(transpose):
    binary = np.zeros((3000, 250), bool)
    binary[2000:] = True
    plan = geometry.plan_tiles(binary.T if transpose else binary, 0)
    # aspect 250/1000, clamped to 1/2 -> 384x704 tiles, but the canvas is 250 wide: tiles 250 wide, sharing
    # at most half of that (125, not 128) across; 1000 = 704 + 1 x 576 -> 2 rows, at 2000 and 2296; the
    # model works at 256 (250 in multiples of 64) across
    boxes, working, joins = [(0, 2000, 250, 2704), (0, 2296, 250, 3000)], (256, 704), [(None, None), (None, 2704)]
    if transpose:
        boxes, working, joins = [(b[1], b[0], b[3], b[2]) for b in boxes], working[::-1], [j[::-1] for j in joins]
    assert (plan.boxes, plan.working_size, plan.joins, plan.blend) == (boxes, working, joins, 62)
    # an explicit side is kept whatever the canvas (the other follows the aspect)
    if transpose:
        assert geometry.plan_tiles(binary.T, 0, height=384).working_size == (768, 384)
    else:
        assert geometry.plan_tiles(binary, 0, width=384).working_size == (384, 768)


@pytest.mark.parametrize("transpose", [False, True])
def test_tiles_grow_until_at_most_sixteen_are_needed(transpose):
    binary = np.ones((12000, 300), bool)
    plan = geometry.plan_tiles(binary.T if transpose else binary, 0)
    # 384x704 tiles (aspect 1/40 clamped to 1/2) on a 300-wide canvas: 300x704 tiles need 21 rows; 1.25x
    # larger (300x880, sharing 160 px, or 150 across: half the tile) 17; 1.5625x larger (300x1100, sharing
    # 200) 14, from 0 to 12000 - 1100. The model sees 300 / 1.5625 = 192 across, and 704 along.
    starts = [round(index * 10900 / 13) for index in range(14)]
    boxes, working = [(0, y, 300, y + 1100) for y in starts], (192, 704)
    joins = [(None, None)] + [(None, y + 1100) for y in starts[:-1]]
    if transpose:
        boxes, working, joins = [(b[1], b[0], b[3], b[2]) for b in boxes], working[::-1], [j[::-1] for j in joins]
    assert (plan.boxes, plan.working_size, plan.joins, plan.blend) == (boxes, working, joins, 75)


def test_tiles_over_a_large_square_canvas():
    plan = geometry.plan_tiles(np.ones((4000, 4000), bool), 0)
    # 512x512 tiles sharing 128 px need 11 x 11; grown 1.25x at a time, 1250x1250 (2.44x, sharing
    # round(312.5) = 312 px) need 4 x 4: from 0 to 2750
    starts = [0, 917, 1833, 2750]
    assert plan.boxes == [(x, y, x + 1250, y + 1250) for y in starts for x in starts]
    assert plan.working_size == (512, 512) and plan.blend == 156


def test_tiles_need_a_region():
    with pytest.raises(ValueError, match=r"^plan_tiles needs a region to cover$"):
        geometry.plan_tiles(np.zeros((100, 100), bool), 8)


@st.composite
def margins(draw):
    width, height = draw(st.integers(100, 3000)), draw(st.integers(100, 3000))
    binary = np.zeros((height, width), bool)
    rectangles = draw(st.integers(1, 3))
    for _ in range(rectangles):
        left, top = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        binary[top : top + draw(st.integers(1, 2000)), left : left + draw(st.integers(1, 2000))] = True
    return binary, draw(st.integers(0, 100)), rectangles


@settings(max_examples=150, deadline=None)
@given(margins())
def test_tiles_cover_the_region_evenly_and_overlap(case):
    binary, padding, rectangles = case
    height, width = binary.shape
    plan = geometry.plan_tiles(binary, padding)
    assert 1 <= len(plan.boxes) <= geometry.MAX_TILES
    (tile_width, tile_height), = {(box[2] - box[0], box[3] - box[1]) for box in plan.boxes}
    covered = np.zeros_like(binary)
    for left, top, right, bottom in plan.boxes:
        assert 0 <= left and 0 <= top and right <= width and bottom <= height
        assert binary[top:bottom, left:right].any()  # no tile without a pixel to paint
        covered[top:bottom, left:right] = True
    assert covered[binary].all()
    rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
    area = (max(0, cols[0] - padding), max(0, rows[0] - padding), min(width, cols[-1] + 1 + padding),
            min(height, rows[-1] + 1 + padding))
    for axis, tile in ((0, tile_width), (1, tile_height)):
        starts = sorted({box[axis] for box in plan.boxes})
        steps = np.diff(starts)
        first = starts[0]
        if area[axis + 2] - area[axis] > tile:  # tiles from the padded box's first pixel to its last
            first = area[axis]
            assert starts[0] == first and starts[-1] + tile == area[axis + 2]
        if steps.size and rectangles == 1:  # (with more, a column or row may hold nothing to paint: left out)
            assert steps.max() - steps.min() <= 1  # evenly spaced
            assert tile - steps.max() >= 2 * plan.blend  # neighbours share at least what they blend over
        for box, join in zip(plan.boxes, plan.joins):  # the far edge of the tiles before it along this axis
            if box[axis] == first:
                assert join[axis] is None
            else:  # (those may hold nothing to paint and be left out)
                assert box[axis] + 2 * plan.blend <= join[axis] < box[axis] + tile
