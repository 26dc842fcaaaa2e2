"""The compositing code is plain image code: tested without the model."""

from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter
from scipy import ndimage

from inpaint import codec, compositing, geometry
from inpaint.compositing import TILING, Tiling, composite_over, feather_mask, prepare_mask
from inpaint.geometry import bounding_box


@st.composite
def scenes(draw):
    width = draw(st.integers(8, 96))
    height = draw(st.integers(8, 96))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(draw(st.integers(0, 3))):
        x0, x1 = sorted(draw(st.tuples(st.integers(0, width - 1), st.integers(0, width - 1))))
        y0, y1 = sorted(draw(st.tuples(st.integers(0, height - 1), st.integers(0, height - 1))))
        mask[y0 : y1 + 1, x0 : x1 + 1] = draw(st.integers(0, 255))
    return mask, draw(st.integers(0, 12)), draw(st.integers(-6, 6)), draw(st.integers(0, 2**16))


def _tiles(side: int, distances: str = "cheaper") -> Tiling:
    """Tiles of `side` for the distance transforms and the blend, whatever the distance; the distances
    "stamped" (in bands of 7 rows), "transformed" or whichever is cheaper (as in production)."""
    return Tiling(tile=side, per_reach=1, stamp_band=7 if distances == "stamped" else TILING.stamp_band,
                  distances=distances)


_DISTANCES = st.sampled_from(["stamped", "transformed", "cheaper"])


@settings(max_examples=150, deadline=None)
@given(scenes(), st.sampled_from([5, 128]), _DISTANCES)
def test_pixels_farther_than_blur_from_the_grown_mask_are_bit_identical(scene, tile, distances):
    _check_scene(scene, _tiles(tile, distances))  # many tiles, and one


def _check_scene(scene, tiling=TILING):
    mask, blur, grow, seed = scene
    rng = np.random.default_rng(seed)
    height, width = mask.shape
    shape = (height, width, 3)
    original = rng.integers(0, 256, shape, dtype=np.uint8)
    generated = rng.integers(0, 256, shape, dtype=np.uint8)
    binary = prepare_mask(mask, grow=grow, tiling=tiling)
    feather = feather_mask(binary, blur, tiling=tiling)
    result = original.copy()
    composite_over(result, Image.fromarray(generated), feather, (0, 0, width, height), tiling=tiling)
    far = ndimage.distance_transform_edt(~binary) > blur if binary.any() else np.ones(binary.shape, bool)
    assert np.array_equal(result[far], original[far])
    assert np.array_equal(result[binary], generated[binary])  # the mask itself is fully repainted
    assert ((feather.weight >= 0) & (feather.weight <= 1)).all()
    if binary.any():
        near = ndimage.distance_transform_edt(~binary) < blur  # the ramp reaches 0 at exactly `blur`
        assert np.array_equal(feather.touched((width, height)), near | binary)


def test_threshold_is_50_percent_and_invert_flips():
    mask = np.array([[0, 127, 128, 255]], np.uint8)
    assert prepare_mask(mask).tolist() == [[False, False, True, True]]
    assert prepare_mask(mask, invert=True).tolist() == [[True, True, False, False]]


def _disc_mask(radius=10, size=41):
    yy, xx = np.mgrid[:size, :size]
    return np.where((xx - 20) ** 2 + (yy - 20) ** 2 <= radius**2, 255, 0).astype(np.uint8)


@pytest.mark.parametrize("grow", [3, 7])
def test_grow_dilates_by_euclidean_distance(grow):
    mask = _disc_mask()
    base = prepare_mask(mask)
    grown = prepare_mask(mask, grow=grow)
    distance = ndimage.distance_transform_edt(~base)
    assert np.array_equal(grown, distance <= grow)


def test_negative_grow_erodes_but_not_from_the_image_border():
    mask = np.zeros((20, 30), np.uint8)
    mask[:, :15] = 255  # touches the left, top and bottom edges
    shrunk = prepare_mask(mask, grow=-4)
    assert shrunk[:, :11].all() and not shrunk[:, 11:].any()


def test_feather_eases_monotonically_away_from_the_mask():
    binary = np.zeros((8, 64), bool)
    binary[:, :20] = True
    feather = feather_mask(binary, 8)
    assert feather.box == (0, 0, 29, 8)
    alpha = feather.weight[4]
    assert alpha[19] == 1.0 and alpha[28] == 0.0
    assert all(alpha[i] >= alpha[i + 1] for i in range(19, 28))
    assert 0 < alpha[24] < 1


def test_composite_inside_a_box_keeps_alpha_and_everything_else():
    canvas = np.zeros((10, 12, 4), np.uint8)
    canvas[..., 3] = 77
    binary = np.zeros((10, 12), bool)
    binary[2:4, 3:5] = True
    patch = Image.new("RGB", (6, 6), (200, 200, 200))
    composite_over(canvas, patch, feather_mask(binary, 0), (2, 1, 8, 7))
    result = canvas
    assert (result[2:4, 3:5, :3] == 200).all()
    assert result[..., :3].sum() == 200 * 3 * 4
    assert (result[..., 3] == 77).all()


def test_empty_mask_feathers_to_nothing():
    feather = feather_mask(np.zeros((5, 5), bool), 4)
    assert not feather.touched((5, 5)).any()


def _feather_in_one_transform(binary: np.ndarray, radius: int) -> np.ndarray:
    """The definition feather_mask's tiles must reproduce: one distance transform of the whole box."""
    left, top, right, bottom = bounding_box(binary, radius + 1)
    distance = ndimage.distance_transform_edt(~binary[top:bottom, left:right])
    ramp = np.clip(1.0 - distance / radius, 0.0, 1.0).astype(np.float32)
    return ramp * ramp * (3.0 - 2.0 * ramp)


@settings(max_examples=150, deadline=None)
@given(scenes(), st.sampled_from([5, 16, 128]), _DISTANCES)
def test_tiled_feather_is_exactly_the_one_transform_feather(scene, tile, distances):
    mask, blur, grow, _ = scene
    binary = prepare_mask(mask, grow=grow)
    if not binary.any() or blur == 0:
        return
    feather = feather_mask(binary, blur, tiling=_tiles(tile, distances))
    assert feather.box == bounding_box(binary, blur + 1)
    assert np.array_equal(feather.weight, _feather_in_one_transform(binary, blur))


@pytest.mark.parametrize("distances", ["stamped", "transformed"])
def test_tiled_feather_on_a_large_mask(distances):
    yy, xx = np.mgrid[:700, :900]
    binary = ((xx - 450) / 400.0) ** 2 + ((yy - 350) / 300.0) ** 2 <= 1
    binary[100:140, 200:700] = False  # a hole, so inside tiles are not all full
    binary[600:, 300:] = np.random.default_rng(0).random((100, 600)) < 0.5  # speckle: a long edge
    with ThreadPoolExecutor(3) as pool:
        feather = feather_mask(binary, 24, pool.map, _tiles(TILING.tile, distances))
    assert np.array_equal(feather.weight, _feather_in_one_transform(binary, 24))


def test_distances_are_stamped_for_a_thin_band_and_transformed_for_a_speckled_mask():
    """The cost model: a brush stroke's short edge is stamped; a mask of noise is transformed, and so
    is one of lines on the rows the first estimate does not look at (every 8th row and the next)."""
    stroke = np.zeros((600, 600), bool)
    stroke[200:260, 50:550] = True
    speckle = np.random.default_rng(0).random((600, 600)) < 0.5
    lines = np.zeros((600, 600), bool)
    lines[3::8] = True
    stamping = compositing._stamped
    for region, blur, stamped in ((stroke, 8, True), (speckle, 8, False), (lines, 16, False)):
        returned = []
        with mock.patch.object(compositing, "_stamped", lambda *args: returned.append(stamping(*args)) or returned[-1]):
            feather = feather_mask(region, blur)
        assert len(returned) == 1 and (returned[0] is not None) == stamped
        assert np.array_equal(feather.weight, _feather_in_one_transform(region, blur))


@pytest.mark.parametrize("forced", ["stamped", "transformed"])
def test_a_forced_way_to_the_distances_is_taken_whatever_the_cost_model_says(forced):
    """Tiling.distances forces one way: the tests that compare the two ways must really run both."""
    stroke = np.zeros((600, 600), bool)
    stroke[200:260, 50:550] = True  # the cost model stamps this one...
    speckle = np.random.default_rng(0).random((600, 600)) < 0.5  # ...and transforms this one
    stamping = compositing._stamped
    for region in (stroke, speckle):
        returned = []
        with mock.patch.object(compositing, "_stamped", lambda *args: returned.append(stamping(*args)) or returned[-1]):
            feather_mask(region, 8, tiling=Tiling(distances=forced))
        assert len(returned) == 1 and (returned[0] is not None) == (forced == "stamped")


@settings(max_examples=150, deadline=None)
@given(
    st.integers(16, 200), st.integers(16, 200), st.integers(8, 96), st.integers(8, 96), st.sampled_from([3, 7, 256]),
    st.sampled_from([4, 16, 128]), st.integers(0, 2**16),
)
def test_pasting_in_strips_is_within_one_level_of_pasting_the_whole_resize(
    width, height, out_width, out_height, strip, tile, seed
):
    """composite_over resizes the model's output across, then down in strips, each from its own
    source rows, and only the runs of tiles the feather reaches: within two levels (each pass rounds)
    of the same two passes over the whole, which is Pillow's own resize when upscaling (shrinking
    the height, Pillow may run down first)."""
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, 256, (height + 20, width + 30, 3), dtype=np.uint8)
    box = (13, 7, 13 + width, 7 + height)
    binary = np.zeros(canvas.shape[:2], bool)
    binary[box[1] + height // 4 : box[3] - height // 4, box[0] + 2 : box[0] + 2 + width // 3] = True
    binary[box[1] : box[1] + height // 3, box[2] - width // 5 : box[2] - 1] = True  # untouched columns between
    feather = feather_mask(binary, 5)
    output = Image.fromarray(rng.integers(0, 256, (out_height, out_width, 3), dtype=np.uint8))
    whole = output.resize((width, out_height), Image.Resampling.LANCZOS).resize((width, height), Image.Resampling.LANCZOS)
    if out_width <= width and out_height <= height:
        assert np.array_equal(np.asarray(whole), np.asarray(output.resize((width, height), Image.Resampling.LANCZOS)))
    expected = canvas.copy()
    composite_over(expected, whole, feather, box)
    result = canvas.copy()
    composite_over(result, output, feather, box, tiling=Tiling(tile=tile, strip=strip))
    difference = np.abs(result.astype(int) - expected)
    assert difference.max() <= 2
    if out_width <= width and out_height <= height:
        assert (difference > 0).mean() < 0.01
    untouched = ~feather.touched((canvas.shape[1], canvas.shape[0]))
    assert np.array_equal(result[untouched], canvas[untouched])


def test_an_executors_map_gives_the_same_bytes_as_one_thread():
    yy, xx = np.mgrid[:700, :900]
    binary = ((xx - 450) / 400.0) ** 2 + ((yy - 350) / 300.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    output = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    serial, parallel = canvas.copy(), canvas.copy()
    tiling = Tiling(tile=32, strip=64)
    feather = feather_mask(binary, 16, tiling=tiling)
    composite_over(serial, output, feather, (0, 0, 900, 700), tiling=tiling)
    with ThreadPoolExecutor(4) as pool:
        assert np.array_equal(feather_mask(binary, 16, pool.map, tiling).weight, feather.weight)
        composite_over(parallel, output, feather, (0, 0, 900, 700), pool.map, tiling)
    assert np.array_equal(parallel, serial)


@settings(max_examples=120, deadline=None)
@given(
    st.integers(1, 300), st.integers(1, 300), st.integers(1, 120), st.integers(1, 120), st.sampled_from([1, 5, 16, 256]),
    st.booleans(), st.integers(0, 2**16),
)
@example(299, 97, 32, 32, 16, False, 0)  # wide, reduced 3x across with a remainder: across first
@example(97, 299, 32, 32, 16, True, 1)  # tall, reduced 3x down: down first, bands of columns
@example(40, 30, 120, 90, 5, False, 2)  # growing
@example(100, 68, 10, 20, 16, False, 3)  # Pillow's order turns on the reduced width rounded up (34, not 33.3)
@example(40, 60, 30, 40, 16, False, 4)  # the height shrinks by exactly twice the width's: across first
@example(30, 41, 40, 40, 16, False, 5)  # the height shrinks by one row while the width grows: down first
def test_resize_crop_is_pillows_resize_of_the_crop(width, height, out_width, out_height, band, alpha, seed):
    """Bands of rows or columns, reduced and resized apart, then joined: exactly Pillow's resize of
    the whole crop with reducing_gap=3.0 (wide, tall, shrinking and growing crops alike)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height + 9, width + 5, 4 if alpha else 3), dtype=np.uint8)
    box = (3, 4, 3 + width, 4 + height)
    crop = Image.fromarray(codec.flatten(image[box[1] : box[3], box[0] : box[2]]))
    expected = crop.resize((out_width, out_height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    result = compositing.resize_crop(image, box, (out_width, out_height), tiling=Tiling(band=band))
    assert result.mode == "RGB" and result.size == (out_width, out_height)
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def _grown_in_one_transform(mask: np.ndarray, grow: int) -> np.ndarray:
    """The definition prepare_mask's tiles must reproduce: one distance transform of the whole image
    (the image border counts as neither mask nor background)."""
    binary = mask >= 128
    if grow == 0 or not binary.any():
        return binary
    if grow > 0:
        return ndimage.distance_transform_edt(~binary) <= grow
    return ndimage.distance_transform_edt(binary) > -grow


@settings(max_examples=150, deadline=None)
@given(scenes(), st.integers(-14, 14), st.sampled_from([5, 16, 128]), _DISTANCES)
def test_tiled_grow_is_exactly_the_one_transform_grow(scene, grow, tile, distances):
    mask = scene[0]
    with ThreadPoolExecutor(3) as pool:
        grown = prepare_mask(mask, grow=grow, map=pool.map, tiling=_tiles(tile, distances))
    assert np.array_equal(grown, _grown_in_one_transform(mask, grow))


# ------------------------------------------------------------------------------------ outpainting tiles


def test_the_ramp_eases_over_the_blend_before_a_join():
    assert compositing.ramp(10, 20, None, 4).tolist() == [1.0] * 10
    assert compositing.ramp(10, 20, None, 4).dtype == np.float32
    weights = compositing.ramp(0, 8, 6, 4)  # pixel centres 2.5, 3.5, 4.5, 5.5 lie in the blend (2..6)
    assert weights.dtype == np.float32
    # smoothstep e^2 (3 - 2e) of e = 0.125, 0.375, 0.625, 0.875
    assert weights.tolist() == [0.0, 0.0, 0.04296875, 0.31640625, 0.68359375, 0.95703125, 1.0, 1.0]
    assert compositing.ramp(100, 108, 106, 4).tolist() == weights.tolist()  # the same wherever it lies


@pytest.mark.parametrize("channels", [3, 4])
def test_each_tile_is_shown_the_painting_so_far_and_asked_to_paint_only_its_share(channels):
    """Two tiles side by side on a grey canvas (RGB, or RGBA as an outpainted photo with transparency
    makes it), painted red then blue by a painter that records what it is shown and asked; a photo
    (not to be painted) in the second tile, a feather a little inside the canvas."""
    height, width = 200, 1000
    canvas = np.full((height, width, channels), 128, np.uint8)
    canvas[..., 3:] = 255  # opaque (extend_canvas makes the margins so)
    touched = np.ones((height, width), bool)
    touched[50:150, 800:900] = False  # the photo
    feather = compositing.Feather((10, 5, width - 10, height - 5), touched[5:-5, 10:-10].astype(np.float32))
    plan = geometry.plan_tiles(touched, 0)
    # 704x200 tiles at 0 and 296 (plan_tiles' tests), blending over 50 px before the first one's edge, 704
    assert (plan.boxes, plan.joins, plan.blend) == ([(0, 0, 704, 200), (296, 0, 1000, 200)], [(None, None), (704, None)], 50)
    shown, asked = [], []

    def paint(index, crops, mask):
        shown.append(np.asarray(crops[0].resize((704, 200), Image.Resampling.NEAREST)))
        asked.append(np.asarray(mask.resize((704, 200), Image.Resampling.NEAREST)) > 0)
        return [Image.new("RGB", plan.working_size, ((255, 0, 0), (0, 0, 255))[index])]

    (layer,) = compositing.paint_tiles(canvas, feather, touched, plan, 1, paint)
    red, blue, grey = [255, 0, 0, 255][:channels], [0, 0, 255, 255][:channels], [128, 128, 128, 255][:channels]
    # The first tile: the canvas as it is, all of it to paint.
    assert (shown[0] == grey[:3]).all() and asked[0].all()
    # The second: the first's red where that was painted and the feather shows it (x 296..704), the
    # canvas beyond it; it paints from 50 px before that edge on, and never the photo.
    # (the crops are resized for the model, so a few pixels at each edge are a mix)
    def near(part, colour):
        return (np.abs(part.astype(int) - colour) <= 2).all()

    shown_red, shown_grey = red[:3], grey[:3]  # the model is shown RGB
    assert near(shown[1][10:190, : 704 - 296 - 4], shown_red) and near(shown[1][:2], shown_grey)
    assert near(shown[1][:, 704 - 296 + 4 :], shown_grey)
    expected = np.zeros((height, 704), bool)
    expected[:, 654 - 296 :] = True
    expected[50:150, 800 - 296 : 900 - 296] = False
    assert (asked[1] == expected).all()
    # The painting: red, easing into blue over 654..704, blue beyond; the photo's pixels as they were.
    assert (layer[:, :654] == red).all() and (layer[:, 704:800] == blue).all() and (layer[:, 900:] == blue).all()
    assert (np.diff(layer[100, 654:704, 2].astype(int)) >= 0).all() and (layer[50:150, 800:900] == grey).all()


def _photo(height: int, width: int, channels: int, seed: int = 7) -> np.ndarray:
    """Gradients with noise (so a wrong fill or blend shows), and random alpha when RGBA."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    photo = (np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1) % 200 + rng.integers(0, 50, (height, width, 3))).astype(np.uint8)
    if channels == 4:
        photo = np.concatenate([photo, rng.integers(0, 256, (height, width, 1), dtype=np.uint8)], -1)
    return photo


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("margins", [(40, 0, 0, 24), (0, 20, 48, 0), (8, 8, 8, 8)])
def test_the_outpainting_fill_is_the_photos_edge_carried_out_and_blurred(channels, margins):
    """extend_canvas against its plain definition: the photo laid onto white (Pillow's alpha_composite),
    its edge pixels carried outwards (numpy's edge padding), the whole canvas blurred by Pillow's
    Gaussian of the same radius. The code blurs each margin apart, with three radii of the photo beside
    it: as far as Pillow's blur reaches, so the margins are the same bytes. The photo is itself, and
    the margins are opaque."""
    photo = _photo(60, 80, channels)
    left, top, right, bottom = margins
    canvas = compositing.extend_canvas(photo, margins)
    assert canvas.shape == (60 + top + bottom, 80 + left + right, channels)
    flat = Image.fromarray(photo)
    if channels == 4:
        flat = Image.alpha_composite(Image.new("RGBA", flat.size, "white"), flat)
    padded = np.pad(np.asarray(flat.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    expected = np.asarray(Image.fromarray(padded).filter(ImageFilter.GaussianBlur(compositing._FILL_BLUR)))
    margin = np.ones(canvas.shape[:2], bool)
    margin[top : top + 60, left : left + 80] = False
    assert np.array_equal(canvas[top : top + 60, left : left + 80], photo)
    assert np.array_equal(canvas[..., :3][margin], expected[margin])
    if channels == 4:
        assert (canvas[..., 3][margin] == 255).all()


def test_the_models_mask_of_a_crop_is_0_or_255_resized_nearest():
    touched = np.zeros((30, 50), bool)
    touched[5:20, 10:33] = True
    mask = compositing.crop_mask(touched, (100, 60))
    assert mask.mode == "L" and mask.size == (100, 60)
    pixels = np.asarray(mask)
    assert set(np.unique(pixels)) == {0, 255}
    assert np.array_equal(pixels == 255, np.repeat(np.repeat(touched, 2, axis=0), 2, axis=1))  # nearest, 2x


@pytest.mark.parametrize("channels", [3, 4])
def test_a_layer_blends_in_by_the_feather_over_several_strips_and_keeps_alpha(channels):
    """blend_layer against the oracle's mix, rint(canvas + (layer - canvas) x weight) in float32, on a
    feather box that starts below the top and spans more than one strip of rows."""
    canvas = _photo(600, 90, channels, seed=1)
    layer = _photo(600, 90, channels, seed=2)
    box = (10, 30, 70, 30 + 2 * TILING.strip + 17)
    rng = np.random.default_rng(3)
    weight = rng.random((box[3] - box[1], box[2] - box[0])).astype(np.float32)
    weight[:40] = 0
    weight[-40:] = 1
    expected = canvas.copy()
    base = canvas[box[1] : box[3], box[0] : box[2], :3].astype(np.float32)
    new = layer[box[1] : box[3], box[0] : box[2], :3].astype(np.float32)
    expected[box[1] : box[3], box[0] : box[2], :3] = np.rint(base + (new - base) * weight[..., None])
    compositing.blend_layer(canvas, layer, compositing.Feather(box, weight))
    assert np.array_equal(canvas, expected)


def test_a_tile_is_shown_the_canvas_with_the_painting_blended_in_and_resized_as_pillow_does():
    """_shown against its definition: the canvas over the box, the layer mixed in by the feather where
    the feather overlaps the box (the oracle's rint mix), then Pillow's resize of exactly that box."""
    canvas = _photo(120, 150, 3, seed=4)
    layer_box_pixels = _photo(70, 90, 3, seed=5)
    box = (40, 30, 130, 100)  # 90 x 70
    feather_box = (20, 50, 100, 120)  # overlaps the box's lower left
    weight = np.random.default_rng(6).random((70, 80)).astype(np.float32)
    shown = compositing._shown(canvas, layer_box_pixels, compositing.Feather(feather_box, weight), box, (64, 48))
    expected = canvas[30:100, 40:130].copy()
    here = np.zeros((70, 90), np.float32)
    here[20:70, 0:60] = weight[0:50, 20:80]  # rows 50-100 and columns 40-100 of the canvas
    base = expected.astype(np.float32)
    expected = np.rint(base + (layer_box_pixels.astype(np.float32) - base) * here[..., None]).astype(np.uint8)
    resized = Image.fromarray(expected).resize((64, 48), Image.Resampling.LANCZOS, reducing_gap=3.0)
    assert shown.size == (64, 48) and np.array_equal(np.asarray(shown), np.asarray(resized))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([3, 4]), st.sampled_from([1, 3, 256]), st.integers(0, 2**16))
def test_a_16bit_output_keeps_what_the_painting_left_and_reduces_to_the_8bit_output(width, height, channels, rows, seed):
    """deepen: a pixel the 8-bit painting left as it was keeps all 16 bits; every pixel, reduced to 8 bits,
    is the 8-bit output's. Extreme samples included (0, 65535, and 257 o + 256, which rounds to o at 8 bits)."""
    rng = np.random.default_rng(seed)
    original = rng.choice(np.array([0, 1, 256, 257, 513, 65279, 65534, 65535, 40000], np.uint16), (height, width, channels))
    original[rng.random((height, width)) < 0.5] = rng.integers(0, 65536, (channels,), dtype=np.uint16)
    result = codec.reduce_to_8bit(original)
    x0, x1 = sorted(rng.integers(0, width + 1, 2))
    y0, y1 = sorted(rng.integers(0, height + 1, 2))
    painted = rng.random((y1 - y0, x1 - x0)) < 0.7  # the painting changes some pixels of its box, not all
    result[y0:y1, x0:x1][painted] = rng.integers(0, 256, (int(painted.sum()), channels), dtype=np.uint8)
    deep = compositing.deepen(result, original, (x0, y0, x1, y1), rows)
    assert deep.dtype == np.uint16 and np.array_equal(codec.reduce_to_8bit(deep), result)
    left = (result == codec.reduce_to_8bit(original)).all(axis=2)
    assert np.array_equal(deep[left], original[left])
    assert np.array_equal(compositing.deepen(codec.reduce_to_8bit(original), original, None), original)


def test_the_16bit_canvas_is_the_photo_within_its_margins_filled_at_16_bits():
    photo = np.random.default_rng(0).integers(0, 65536, (6, 5, 4), dtype=np.uint16)
    margins = (2, 1, 6, 4)
    canvas = compositing.extend_canvas(codec.reduce_to_8bit(photo), margins)
    deep = compositing.deep_canvas(canvas, photo, margins)
    assert deep.dtype == np.uint16 and deep.shape == (11, 13, 4) and np.array_equal(deep[1:7, 2:7], photo)
    filled = np.ones(deep.shape[:2], bool)
    filled[1:7, 2:7] = False
    assert np.array_equal(deep[filled], canvas[filled].astype(np.uint16) * 257)
    assert compositing.deep_canvas(canvas, photo, (0, 0, 0, 0)) is photo
