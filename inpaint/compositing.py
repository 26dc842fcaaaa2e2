"""Pixels: clean up the mask, feather it, cut out the crops the model paints, and paste the
generated result over the original photo.

The model's output is always composited into the original, never the other way round: a pixel
farther than `blur` pixels (Euclidean) from the grown mask is copied from the input bit for bit.
Everything past thresholding works on the box around the mask only, so a small mask in a large
photo costs little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from .codec import flatten
from .geometry import Box, Plan, bounding_box, intersect

# What _by_distance's two ways cost, in ns, fitted to timings of 4096x4096 masks on this project's
# 2-core machine with 2 threads: scipy's transform per pixel of the tiles with their margins;
# _stamped per write, per scatter call and per pixel of the region (finding the edge, filling).
# Stamping pays on brush strokes (bench/RESULTS.md, "speed-ups").
_TRANSFORM_NS = 17
_STAMP_NS = {"write": 2.5, "call": 3000, "pixel": 2}
_REDUCING_GAP = 3.0  # resize_crop shrinks by a box filter first when shrinking this much or more
_FILL_BLUR = 16  # radius of the blur that softens the photo's edge colours carried into outpainting margins


@dataclass(frozen=True)
class Tiling:
    """How the pixel work is cut up to run side by side and skip what needs no work. No result
    depends on it: the tests vary it to cross every boundary on small images."""

    tile: int = 128  # side of the tiles the mask's distances and the blends work on
    per_reach: int = 6  # distance tiles are at least this many times as wide as the distance they look out to
    stamp_band: int = 512  # rows _stamped fills at a time
    strip: int = 256  # rows composite_over resizes at a time
    band: int = 256  # rows (or columns) of the photo resize_crop hands to Pillow at a time
    distances: str = "cheaper"  # "stamped", "transformed", or whichever the cost model says is cheaper


TILING = Tiling()


@dataclass(frozen=True)
class Feather:
    """Blend weights of the paste: `weight` (h, w) in [0, 1] over `box`; 0 everywhere outside it."""

    box: Box
    weight: np.ndarray

    def touched(self, size: tuple[int, int]) -> np.ndarray:
        """(H, W) bool of every pixel the paste changes: what the model must repaint."""
        full = np.zeros((size[1], size[0]), bool)
        left, top, right, bottom = self.box
        full[top:bottom, left:right] = self.weight > 0
        return full


def extend_canvas(image: np.ndarray, margins: tuple[int, int, int, int]) -> np.ndarray:
    """The photo ((H, W, 3 or 4) uint8) on a canvas grown by `margins` (left, top, right, bottom): the
    photo's pixels as they are, and opaque margins filled with its edge colours (transparency laid
    onto white, as the model sees it) carried outwards and blurred, so that the model never sees a
    hard border and `strength` below 1 starts from something plausible."""
    left, top, right, bottom = margins
    if not any(margins):
        return image
    height, width = image.shape[:2]
    pad = ((top, bottom), (left, right), (0, 0))
    canvas = np.pad(image, pad)
    fill = np.pad(flatten(image), pad, mode="edge")  # each margin pixel: the nearest photo pixel
    reach = _FILL_BLUR * 3
    # Each margin with `reach` pixels beside it is blurred on its own (the corners twice): a blur of the
    # whole canvas would cost as much again for a margin along a large photo.
    strips = [
        (slice(None), slice(0, left), slice(0, left + reach)),
        (slice(None), slice(left + width, None), slice(max(0, left + width - reach), None)),
        (slice(0, top), slice(None), slice(0, top + reach)),
        (slice(top + height, None), slice(None), slice(max(0, top + height - reach), None)),
    ]
    for margin, (rows, columns, around) in zip((left, right, top, bottom), strips):
        if not margin:
            continue
        if rows == slice(None):  # a left or right margin: blur it with the photo's columns beside it
            blurred = np.asarray(Image.fromarray(fill[:, around]).filter(ImageFilter.GaussianBlur(_FILL_BLUR)))
            offset = columns.start - around.start
            canvas[:, columns, :3] = blurred[:, offset : offset + margin]
        else:
            blurred = np.asarray(Image.fromarray(fill[around]).filter(ImageFilter.GaussianBlur(_FILL_BLUR)))
            offset = rows.start - around.start
            canvas[rows, :, :3] = blurred[offset : offset + margin]
    if canvas.shape[2] == 4:
        canvas[..., 3] = 255
    canvas[top : top + height, left : left + width] = image
    return canvas


def deep_canvas(canvas: np.ndarray, photo: np.ndarray, margins: tuple[int, int, int, int]) -> np.ndarray:
    """The 16-bit canvas the outputs of a 16-bit `photo` ((H, W, C) uint16) keep: the photo's samples, and
    the margins of `canvas` (extend_canvas of its 8-bit reduction) scaled to 16 bits. Before any painting."""
    if not any(margins):
        return photo
    left, top = margins[:2]
    deep = canvas.astype(np.uint16) * np.uint16(257)
    deep[top : top + photo.shape[0], left : left + photo.shape[1]] = photo
    return deep


def deepen(result: np.ndarray, original: np.ndarray, box: Box | None, rows: int = TILING.strip) -> np.ndarray:
    """A 16-bit output: `original` ((H, W, C) uint16) with the change that painting made to its 8-bit
    reduction (`result`, (H, W, C) uint8, against original // 257) added at 16 bits. A pixel the painting
    left as it was keeps its 16 bits, and the output reduced to 8 bits (// 257) is `result` exactly:
    original = 257 o + j with j in 0..256, so 257 r + j (never below 0; at most 65535 once capped) // 257 = r.
    Only `box` can differ (None: nowhere); it is worked in strips of `rows`, for bounded memory."""
    deep = original.copy()
    if box is None:
        return deep
    left, top, right, bottom = box
    for y in range(top, bottom, rows):
        end = min(y + rows, bottom)
        base = original[y:end, left:right].astype(np.int32)
        change = result[y:end, left:right].astype(np.int32) - base // 257
        deep[y:end, left:right] = np.minimum(base + change * 257, 65535)
    return deep


def prepare_mask(mask: np.ndarray, invert: bool = False, grow: int = 0, map=map, tiling: Tiling = TILING) -> np.ndarray:
    """(H, W) bool, True = repaint, from a (H, W) uint8 grey mask: thresholded at 50%, optionally
    inverted, then grown (or shrunk if grow < 0) by Euclidean distance, tile by tile (_by_distance)."""
    binary = mask >= 128
    if invert:
        binary = ~binary
    box = bounding_box(binary, max(grow, 0) + 1)
    if grow == 0 or box is None:
        return binary
    left, top, right, bottom = box
    region = binary[top:bottom, left:right]
    result = binary.copy()
    view = result[top:bottom, left:right]  # the tiles _by_distance leaves alone keep their pixels

    def grown(tile: tuple[slice, slice], squared: np.ndarray) -> None:
        view[tile] = squared <= grow * grow

    def kept(tile: tuple[slice, slice], squared: np.ndarray) -> None:
        view[tile] = squared > grow * grow

    if grow > 0:
        _by_distance(region, grow, grown, map, tiling)
    else:
        # Distance to the nearest unmasked pixel; the image border does not count as unmasked.
        _by_distance(~region, -grow, kept, map, tiling)
    return result


def feather_mask(binary: np.ndarray, radius: int, map=map, tiling: Tiling = TILING) -> Feather:
    """1 on the mask, easing (smoothstep) to 0 at `radius` pixels outside it, 0 beyond; tile by tile
    (_by_distance): the same weights as one distance transform of the box."""
    box = bounding_box(binary, radius + 1 if radius > 0 else 0)
    if box is None:
        return Feather((0, 0, 0, 0), np.zeros((0, 0), np.float32))
    left, top, right, bottom = box
    region = binary[top:bottom, left:right]
    weight = region.astype(np.float32)  # 1 on the mask, 0 off it; the ramp is filled in below
    if radius <= 0:
        return Feather(box, weight)
    # The weight of each squared distance up to radius**2 + 1 (the first past the ramp's end).
    eased = np.clip(1.0 - np.sqrt(np.arange(radius * radius + 2, dtype=np.float64)) / radius, 0.0, 1.0).astype(np.float32)
    weights = eased * eased * (3.0 - 2.0 * eased)  # smoothstep

    def ramp(tile: tuple[slice, slice], squared: np.ndarray) -> None:
        weight[tile] = np.take(weights, squared, mode="clip")  # faster than weights[squared]; far: 0

    _by_distance(region, radius, ramp, map, tiling)
    return Feather(box, weight)


def _by_distance(region: np.ndarray, reach: int, paint, map=map, tiling: Tiling = TILING) -> None:
    """paint(tile, squared) for each tile of `region` with True pixels within `reach` of it that is
    not all True: `squared` (integers) holds each of the tile's pixels' squared Euclidean distance
    to the nearest True pixel, exact up to reach**2, and over reach**2 farther. Every other tile is
    all True or has no True pixel within `reach`: a large mask's inside and its far outside need none.

    The distances come one of two ways, whichever costs less: stamped (_stamped) when the mask's
    edge is short for the disk of `reach` (the band a brush stroke's feather covers is a few percent
    of the tiles it crosses), else a distance transform of each tile and `reach` pixels of `region`
    around it (a True pixel within `reach` of the tile lies in that margin). The tiles are sorted
    out first, then go through `map` (an executor's map runs them side by side: scipy's transform
    releases Python's lock); `paint` writes to disjoint tiles.
    """
    height, width = region.shape
    side = max(tiling.tile, tiling.per_reach * reach)  # a wide margin costs less on a larger tile
    corners = [(y, x) for y in range(0, height, side) for x in range(0, width, side)]
    corners = [corner for corner in corners if _crossed(region, corner, side, reach)]
    budget = {"stamped": float("inf"), "transformed": -1.0}.get(
        tiling.distances, _TRANSFORM_NS * len(corners) * (side + 2 * reach) ** 2)
    squared = _stamped(region, reach, budget, map, tiling.stamp_band)

    def transform(corner: tuple[int, int]) -> None:
        y, x = corner
        tile = (slice(y, min(y + side, height)), slice(x, min(x + side, width)))
        if squared is not None:
            paint(tile, squared[tile])
            return
        y0, x0 = max(0, y - reach), max(0, x - reach)
        around = region[y0 : y + side + reach, x0 : x + side + reach]
        # The nearest True pixel of each pixel (scipy's feature transform), squared distances to it
        # worked out for the tile only, in integers.
        nearest = ndimage.distance_transform_edt(~around, return_distances=False, return_indices=True)
        inside = (slice(y - y0, tile[0].stop - y0), slice(x - x0, tile[1].stop - x0))
        down = nearest[0][inside] - np.arange(inside[0].start, inside[0].stop, dtype=nearest.dtype)[:, None]
        across = nearest[1][inside] - np.arange(inside[1].start, inside[1].stop, dtype=nearest.dtype)
        paint(tile, down * down + across * across)

    for _ in map(transform, corners):
        pass


def _stamped(region: np.ndarray, reach: int, budget: float, map=map, band_rows: int = TILING.stamp_band) -> np.ndarray | None:
    """(H, W) squared Euclidean distance of each pixel of `region` to the nearest True pixel, exact
    up to reach**2 and reach**2 + 1 farther; or None when stamping would take over `budget` ns.

    The nearest True pixel q of a False pixel p has a False neighbour: the step from q towards p
    along the axis p is farther along (either axis on a diagonal) comes nearer p, so it is not True.
    So the disk of `reach` is cut into four wedges, one per direction (diagonals go to the left and
    right ones), and each wedge is stamped around the True pixels whose neighbour that way is False,
    farthest offset first: the nearest one's offset is written last. Bands of rows go through
    `map`; each takes the pixels whose wedges reach it, then puts back 0 on True pixels.
    """
    height, width = region.shape
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1].reshape(2, -1)
    square = dy * dy + dx * dx
    wedge = np.select([dx >= abs(dy), -dx >= abs(dy), dy > 0], [0, 1, 2], 3)  # right, left, down, up
    order = np.argsort(-square, kind="stable")  # farthest first
    order = order[(square[order] <= reach * reach) & (square[order] > 0)]  # (True pixels get their 0 at the end)
    calls = len(order) * -(-height // band_rows)

    def cost(writes: float) -> float:
        return writes * _STAMP_NS["write"] + calls * _STAMP_NS["call"] + region.size * _STAMP_NS["pixel"]

    # First from every 8th row (the edge pixels beside it, and below it), a quarter of the disk each:
    # finding the edge exactly costs more than that whenever the transform is plainly cheaper.
    sample, below = region[::8], region[1::8]
    estimate = 8 * (np.count_nonzero(sample[:, 1:] != sample[:, :-1]) + np.count_nonzero(sample[: len(below)] != below))
    if cost(estimate * len(order) / 4) > budget:
        return None
    # (rows, columns) of the True pixels whose neighbour is False, on the right, left, below and
    # above (the image's border is not False), each found in an array one column or row short.
    rows, columns = np.divmod(np.flatnonzero(region[:, :-1] > region[:, 1:]), width - 1)
    edges = [(rows, columns)]
    rows, columns = np.divmod(np.flatnonzero(region[:, 1:] > region[:, :-1]), width - 1)
    edges.append((rows, columns + 1))
    edges.append(np.divmod(np.flatnonzero(region[:-1] > region[1:]), width))
    rows, columns = np.divmod(np.flatnonzero(region[1:] > region[:-1]), width)
    edges.append((rows + 1, columns))
    if cost(sum(len(edges[w][0]) for w in wedge[order])) > budget:
        return None
    padded = width + 2 * reach  # columns to spare on both sides: an offset never wraps to another row
    far = reach * reach + 1
    squared = np.empty((height, padded), np.uint16 if far < 2**16 else np.uint32)
    disk = list(zip(wedge[order].tolist(), dy[order].tolist(), dx[order].tolist(), square[order].tolist()))

    def stamp(top: int) -> None:
        bottom = min(top + band_rows, height)
        band = squared[top:bottom]
        band.fill(far)
        flat = band.reshape(-1)  # a view: the band's rows are contiguous
        starts = {}  # per wedge and vertical offset: where the pixels it takes into the band land
        for side, (rows, columns) in enumerate(edges):
            for step in range(-reach, reach + 1):
                first, last = np.searchsorted(rows, [top - step, bottom - step])
                starts[side, step] = (rows[first:last] - top + step) * padded + columns[first:last] + reach
        for side, step, across, value in disk:
            flat[starts[side, step] + across] = value
        np.copyto(band[:, reach : reach + width], 0, where=region[top:bottom])

    for _ in map(stamp, range(0, height, band_rows)):
        pass
    return squared[:, reach : reach + width]


def _crossed(region: np.ndarray, corner: tuple[int, int], side: int, reach: int) -> bool:
    """Whether the tile of `side` at `corner` is not all True and has True pixels within `reach` of it.
    (A quick test, run before the tiles are handed out.)"""
    y, x = corner
    if region[y : y + side, x : x + side].all():
        return False
    y0, x0 = max(0, y - reach), max(0, x - reach)
    return bool(region[y0 : y + side + reach, x0 : x + side + reach].any())


def resize_crop(image: np.ndarray, box: Box, size: tuple[int, int], map=map, tiling: Tiling = TILING) -> Image.Image:
    """What the model sees of `box` of `image` ((H, W, 3 or 4) uint8): RGB (transparency laid onto
    white), resized to `size` (W, H) with Lanczos, after a box-filter reduction when shrinking 3x or
    more (at most 1 level from a full Lanczos, and much faster for a large photo).

    The same pixels as Pillow's `resize(size, LANCZOS, reducing_gap=3.0)` of the crop, in Pillow's
    own steps: the hand-over to Pillow, the reduction and the first pass go through `map` in bands
    (of rows when Pillow resizes across first, else of columns), then the second pass runs once.
    """
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    factor_x = int(width / size[0] / _REDUCING_GAP) or 1
    factor_y = int(height / size[1] / _REDUCING_GAP) or 1
    reduced_width, reduced_height = -(-width // factor_x), -(-height // factor_y)
    # Pillow's choice: down first only when that shrinks the height by over twice what across shrinks the width.
    across_first = not (0 < reduced_height - size[1] and reduced_height - size[1] > (reduced_width - size[0]) * 2)
    step = factor_y if across_first else factor_x  # bands hold whole blocks of the reduction
    band = step * max(1, tiling.band // step)

    def first_pass(start: int) -> np.ndarray:
        if across_first:
            part = Image.fromarray(flatten(image[top + start : top + min(start + band, height), left:right]))
        else:
            part = Image.fromarray(flatten(image[top:bottom, left + start : left + min(start + band, width)]))
        if factor_x > 1 or factor_y > 1:
            part = part.reduce((factor_x, factor_y))
        if across_first:
            return np.asarray(part.resize((size[0], part.height), Image.Resampling.LANCZOS, box=(0, 0, width / factor_x, part.height)))
        return np.asarray(part.resize((part.width, size[1]), Image.Resampling.LANCZOS, box=(0, 0, part.width, height / factor_y)))

    parts = list(map(first_pass, range(0, height if across_first else width, band)))
    joined = Image.fromarray(np.concatenate(parts, axis=0 if across_first else 1))
    second = (0, 0, size[0], height / factor_y) if across_first else (0, 0, width / factor_x, size[1])
    return joined.resize(size, Image.Resampling.LANCZOS, box=second)


def composite_over(canvas: np.ndarray, output: Image.Image, feather: Feather, box: Box, map=map,
                   tiling: Tiling = TILING) -> None:
    """Blend the model's `output` (RGB, any size), resized to `box` with Lanczos, into `canvas`
    ((H, W, 3 or 4) uint8) at `box`, weighted by the feather; in place.

    Where the weight is 0 the canvas keeps its pixels exactly, where it is 1 it takes the resized
    output's exactly; only the ramp in between is blended. Colour channels only (alpha is kept).
    Only the part of the box the feather reaches is resized, in strips of rows that go through `map`
    (an executor's map runs them side by side: Pillow and numpy release Python's lock), and within
    a strip only the runs of tiles it reaches (a brush stroke's strip is mostly untouched). Each run
    takes Lanczos' two passes, across then down, over the output's rows its filter reaches; Pillow
    places the run's source pixels in float32, and each pass rounds to 8 bits, so within two levels
    of resizing the whole at once (one, in the tests at the default tiling; two found with strips
    of 3 rows and tiles of 4).
    (The two passes are asked for one at a time because Pillow 13 picks their order from the sizes
    it is given: one resize of a short strip ran down first, up to 19 levels off the whole's.)
    """
    region = intersect(box, feather.box)
    if region is None:
        return
    left, top, right, bottom = region
    scale_x = output.width / (box[2] - box[0])  # output pixels per canvas pixel
    scale_y = output.height / (box[3] - box[1])
    reach = 3.0 * max(1.0, scale_y) + 1  # Lanczos' support in output rows, and a row to spare

    def paste_strip(y: int) -> None:
        end = min(y + tiling.strip, bottom)
        weight = feather.weight[y - feather.box[1] : end - feather.box[1], left - feather.box[0] : right - feather.box[0]]
        spans: list[list[int]] = []  # runs of the strip's columns of tiles that the feather reaches
        for x in range(0, right - left, tiling.tile):
            if weight[:, x : x + tiling.tile].any():
                if spans and spans[-1][1] == x:
                    spans[-1][1] = min(x + tiling.tile, right - left)
                else:
                    spans.append([x, min(x + tiling.tile, right - left)])
        if not spans:
            return
        start, stop = (y - box[1]) * scale_y, (end - box[1]) * scale_y  # the strip in output rows
        first, last = max(0, math.floor(start - reach)), min(output.height, math.ceil(stop + reach))
        rows = output.crop((0, first, output.width, last))
        for a, b in spans:
            across = rows.resize(
                (b - a, rows.height), Image.Resampling.LANCZOS,
                box=((left + a - box[0]) * scale_x, 0, (left + b - box[0]) * scale_x, rows.height),
            )
            down = across.resize((b - a, end - y), Image.Resampling.LANCZOS, box=(0, start - first, b - a, stop - first))
            new = np.asarray(down)  # (h, b - a, 3)
            base = canvas[y:end, left + a : left + b, :3]  # a view: written in place
            for x in range(0, b - a, tiling.tile):
                tile = (slice(None), slice(x, x + tiling.tile))
                _blend(base[tile], new[tile], weight[:, a + x : a + x + tiling.tile])

    for _ in map(paste_strip, range(top, bottom, tiling.strip)):  # the strips write to disjoint rows
        pass


def _blend(base: np.ndarray, new: np.ndarray, weight: np.ndarray) -> None:
    """base (h, w, 3) uint8 <- new where weight is 1, a rounded mix where it is between 0 and 1; in place.

    A tile the ramp crosses is mixed whole: base + (new - base) * weight is base itself where the
    weight is 0 and new where it is 1 (exact in float32 for 8-bit values), and faster than picking
    out the ramp's pixels first (on a brush-strokes mask).
    """
    low, high = weight.min(), weight.max()
    if high <= 0:
        return
    if low >= 1:
        base[...] = new
        return
    colour = base.astype(np.float32)
    colour += (new - colour) * weight[..., None]
    base[...] = np.rint(colour, out=colour)


def ramp(start: int, stop: int, join: int | None, blend: int) -> np.ndarray:
    """(stop - start,) float32 weights along one axis of an outpainting tile, from `start` to `stop`:
    0 up to `blend` pixels before `join` (there the tiles before it painted, and its model sees that
    as context), easing (smoothstep) to 1 at `join`, 1 beyond; all 1 without a join."""
    if join is None:
        return np.ones(stop - start, np.float32)
    eased = np.clip((np.arange(start, stop) + 0.5 - (join - blend)) / blend, 0.0, 1.0)
    return (eased * eased * (3.0 - 2.0 * eased)).astype(np.float32)


def paint_tiles(canvas: np.ndarray, feather: Feather, touched: np.ndarray, plan: Plan, outputs: int, paint, map=map) -> list[np.ndarray]:
    """Outpainting tiles (geometry.plan_tiles), one after another, for `outputs` outputs at once:
    returns each output's painting, a canvas-sized layer to blend over `canvas` by the feather.

    `paint(index, crops, mask)` paints tile `index`: `crops` (one RGB image per output, at the working
    size) show what that output looks like so far, `mask` (L) says where to paint; it returns one
    image per output. A tile's painting is laid over its row's by `ramp` across (0 over the tile
    left of it, easing to 1 at its edge), and each row, once painted, over the rows above by `ramp`
    down. Each of the two is blending along one axis of something continuous, so no tile edge shows.
    """
    height, width = touched.shape
    layers = [canvas.copy() for _ in range(outputs)]
    rows: list[list[int]] = []  # tile indices, row by row (plan_tiles' order)
    for index, box in enumerate(plan.boxes):
        if rows and plan.boxes[rows[-1][0]][1] == box[1]:
            rows[-1].append(index)
        else:
            rows.append([index])
    for row in rows:
        top, bottom = plan.boxes[row[0]][1], plan.boxes[row[0]][3]
        down = np.broadcast_to(ramp(top, bottom, plan.joins[row[0]][1], plan.blend)[:, None], (bottom - top, width))
        painting = [layer[top:bottom].copy() for layer in layers]  # the row's painting, over what is there
        for index in row:
            left, right = plan.boxes[index][0], plan.boxes[index][2]
            weight = ramp(left, right, plan.joins[index][0], plan.blend) * touched[top:bottom, left:right]  # (h, w)
            crops = []
            for layer, row_painting in zip(layers, painting):
                seen = layer[top:bottom, left:right].copy()  # the rows above, with this row's painting so far
                _blend(seen[..., :3], row_painting[:, left:right, :3], down[:, left:right])
                crops.append(_shown(canvas, seen, feather, plan.boxes[index], plan.working_size, map))
            painted = paint(index, crops, crop_mask(weight * down[:, left:right] > 0, plan.working_size))
            local = (left, 0, right, bottom - top)  # the tile's box in the row's painting
            for row_painting, output in zip(painting, painted):
                composite_over(row_painting, output, Feather(local, weight), local, map)
        for layer, row_painting in zip(layers, painting):
            band = layer[top:bottom]
            _blend(band[..., :3], row_painting[..., :3], down)
    return layers


def crop_mask(touched: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The model's mask of one crop ((h, w) bool, True = repaint) at the working `size` (W, H)."""
    return Image.fromarray(touched.view(np.uint8) * np.uint8(255)).resize(size, Image.Resampling.NEAREST)


def _shown(canvas: np.ndarray, layer_box: np.ndarray, feather: Feather, box: Box, size: tuple[int, int], map=map) -> Image.Image:
    """What the model sees of `box`: `canvas` there with `layer_box` (the painting over that box)
    blended in by the feather, resized to the working `size` as resize_crop does."""
    left, top, right, bottom = box
    shown = canvas[top:bottom, left:right].copy()
    weight = np.zeros((bottom - top, right - left), np.float32)
    region = intersect(box, feather.box)
    if region is not None:
        x0, y0, x1, y1 = region
        weight[y0 - top : y1 - top, x0 - left : x1 - left] = feather.weight[
            y0 - feather.box[1] : y1 - feather.box[1], x0 - feather.box[0] : x1 - feather.box[0]]
    _blend(shown[..., :3], layer_box[..., :3], weight)
    return resize_crop(shown, (0, 0, right - left, bottom - top), size, map)


def blend_layer(canvas: np.ndarray, layer: np.ndarray, feather: Feather) -> None:
    """`layer` (a painting of the whole canvas, (H, W, 3 or 4) uint8) blended over `canvas` by the
    feather's weights, rounded; in place."""
    left, top, right, bottom = feather.box
    for y in range(top, bottom, TILING.strip):
        end = min(y + TILING.strip, bottom)
        _blend(canvas[y:end, left:right, :3], layer[y:end, left:right, :3], feather.weight[y - top : end - top])
