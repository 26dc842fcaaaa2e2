"""Sizes and boxes only: where the model works (crops around the mask) and at what working size.

A box is (left, top, right, bottom) in pixels of the input image, right/bottom exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]

NATIVE_AREA = 512 * 512  # the area SD2-inpainting was trained at
SIDE_MULTIPLE = 64  # working sides are multiples of this (VAE factor 8 x UNet depth 8)
SIDE_RANGE = (64, 1024)  # smallest and largest working side
WHOLE_IMAGE_FRACTION = 0.5  # crops covering at least this much of the image: use the whole image
MAX_CROPS = 4  # more separate regions than this: use the whole image
_CELL = 8  # side of the cells plan_crops labels the mask's regions on, at most (see _padded_regions)
_MAX_REGIONS = 64  # more regions than this on those cells: label larger ones
# Outpainting: a single crop shrunk more than this on a side (a margin along a long edge) is painted
# as tiles instead, near the photo's own resolution; at most MAX_TILES of them, each seeing its painted
# neighbours over TILE_OVERLAP working pixels, half as context and half blended.
MAX_SHRINK = 1.5
MAX_TILES = 16
TILE_OVERLAP = 128
TILE_ASPECT = 2.0  # tiles are at most this elongated, so that each sees some of the photo


@dataclass(frozen=True)
class Plan:
    boxes: list[Box]  # regions of the input the model repaints, one batch entry each
    working_size: tuple[int, int]  # (width, height) every box is resized to for the model
    # Tiles instead of a batch: the boxes are painted one after another, each after the ones before it.
    # Per box, the right edge of the tile column before it and the bottom edge of the tile row above it
    # (None in the first column or row): up to there, earlier tiles have painted its pixels.
    joins: list[tuple[int | None, int | None]] | None = None
    blend: int = 0  # canvas pixels over which a tile blends into the earlier ones, before a join

    @property
    def tiled(self) -> bool:
        return self.joins is not None

    @property
    def batch(self) -> int:
        """Crops painted in one call of the model: every box at once, or one tile at a time."""
        return 1 if self.tiled else len(self.boxes)


def bounding_box(binary: np.ndarray, margin: int = 0) -> Box | None:
    """Box of the True pixels of (H, W) `binary`, grown by margin and clipped to it; None if there are none."""
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(binary[rows[0] : rows[-1] + 1].any(axis=0))
    height, width = binary.shape
    return (
        max(0, int(cols[0]) - margin),
        max(0, int(rows[0]) - margin),
        min(width, int(cols[-1]) + 1 + margin),
        min(height, int(rows[-1]) + 1 + margin),
    )


def intersect(a: Box, b: Box) -> Box | None:
    box = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return box if box[0] < box[2] and box[1] < box[3] else None


def box_area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _round_side(value: float) -> int:
    low, high = SIDE_RANGE
    return int(min(high, max(low, round(value / SIDE_MULTIPLE) * SIDE_MULTIPLE)))


def fit_working_size(aspect: float, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """(width, height), multiples of 64, for a region of `aspect` = width / height.

    Explicit sides are kept; a missing one follows the aspect; with neither, the area is about
    512x512, the model's native area.
    """
    if width and height:
        return width, height
    if width:
        return width, _round_side(width / aspect)
    if height:
        return _round_side(height * aspect), height
    return _round_side(math.sqrt(NATIVE_AREA * aspect)), _round_side(math.sqrt(NATIVE_AREA / aspect))


def automatic_working_sizes() -> list[tuple[int, int]]:
    """Every (width, height) fit_working_size gives without explicit sides, in order: the shapes a
    compiled-parts artifact is built for (script/bake-compiled). Each side is a step function of the
    aspect, so evaluating just either side of each step, and at 1, finds them all."""
    low, high = SIDE_RANGE
    aspects = {1.0}
    for step in range(low // SIDE_MULTIPLE, high // SIDE_MULTIPLE + 1):
        side = (step - 0.5) * SIDE_MULTIPLE  # where round() moves from step - 1 to step
        for aspect in (side * side / NATIVE_AREA, NATIVE_AREA / (side * side)):
            aspects.update((aspect * (1 - 1e-9), aspect * (1 + 1e-9)))
    return sorted({fit_working_size(aspect) for aspect in aspects})


def _pad(box: Box, padding: int, size: tuple[int, int]) -> Box:
    left, top, right, bottom = box
    return max(0, left - padding), max(0, top - padding), min(size[0], right + padding), min(size[1], bottom + padding)


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _merge_overlapping(boxes: list[Box]) -> list[Box]:
    """Boxes merged into their unions until none overlaps another, sorted (the same boxes whatever the order given).

    One pass does it: a box is kept only once it overlaps none of those kept, and a kept box is only
    ever taken out (folded into a newer one), so those kept never overlap one another."""
    kept: list[Box] = []
    for box in boxes:
        index = 0
        while index < len(kept):  # fold every kept box that overlaps this one into it, then look again
            if _overlap(kept[index], box):
                box = _union(box, kept.pop(index))
                index = 0
            else:
                index += 1
        kept.append(box)
    return sorted(kept)


def _expand_1d(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """Grow [low, high) to `length` around its centre, shifted to stay inside [0, limit)."""
    length = min(length, limit)
    if high - low >= length:
        return low, high
    start = (low + high - length) // 2
    start = min(max(0, start), limit - length)
    return start, start + length


def fit_box_to_aspect(box: Box, aspect: float, size: tuple[int, int]) -> Box:
    """Grow the box's short side so that width / height == aspect (as far as the image allows)."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if width / height < aspect:
        left, right = _expand_1d(left, right, math.ceil(height * aspect), size[0])
    else:
        top, bottom = _expand_1d(top, bottom, math.ceil(width / aspect), size[1])
    return left, top, right, bottom


def mask_regions(binary: np.ndarray, block: int = 1, limit: int | None = None) -> list[Box] | None:
    """Exact bounding boxes of the mask's connected regions (8-connected); only the box around the mask is labelled.

    With `block` > 1, the regions of its cells instead: block x block squares of pixels holding any of
    the mask, connected when they touch. Such a region holds one or more of the mask's own, each
    within 2 * block - 1 pixels of another in it on either axis; its box is still the exact box of
    its pixels, and there are block^2 fewer cells than pixels to label. None when there are more
    than `limit` regions (before a box is worked out).
    """
    box = bounding_box(binary)
    if box is None:
        return []
    left, top, right, bottom = box
    region = binary[top:bottom, left:right]
    if block > 1:
        rows, cols = -(-region.shape[0] // block), -(-region.shape[1] // block)
        padded = np.zeros((rows * block, cols * block), bool)
        padded[: region.shape[0], : region.shape[1]] = region
        # Rows of cells first (an OR of whole rows), then across: faster than any(axis=(1, 3)).
        cells = padded.reshape(rows, block, -1).any(axis=1).reshape(rows, cols, block).any(axis=2)  # (rows, cols)
    else:
        padded, cells = region, region
    labels, count = ndimage.label(cells, structure=np.ones((3, 3), bool))
    if limit is not None and count > limit:
        return None
    boxes = []
    for number, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
        if block == 1:
            boxes.append((left + xs.start, top + ys.start, left + xs.stop, top + ys.stop))
            continue
        mine = labels[ys, xs] == number  # this region's cells, in its box of cells
        pixels = padded[ys.start * block : ys.stop * block, xs.start * block : xs.stop * block]
        # Its extreme pixels lie in its first and last rows and columns of cells: look there only.
        first_row = np.flatnonzero(pixels[:block, np.repeat(mine[0], block)].any(axis=1))[0]
        last_row = np.flatnonzero(pixels[-block:, np.repeat(mine[-1], block)].any(axis=1))[-1]
        first_col = np.flatnonzero(pixels[np.repeat(mine[:, 0], block), :block].any(axis=0))[0]
        last_col = np.flatnonzero(pixels[np.repeat(mine[:, -1], block), -block:].any(axis=0))[-1]
        boxes.append((
            left + xs.start * block + int(first_col),
            top + ys.start * block + int(first_row),
            left + (xs.stop - 1) * block + int(last_col) + 1,
            top + (ys.stop - 1) * block + int(last_row) + 1,
        ))
    return boxes


def _padded_regions(binary: np.ndarray, padding: int, size: tuple[int, int], cell: int = _CELL) -> list[Box]:
    """The regions' boxes grown by `padding` and merged where they overlap.

    Cells of side up to `padding` change nothing: regions in touching cells lie within 2 * padding - 1
    pixels of each other, so their padded boxes overlap and would merge anyway. A mask of more than
    _MAX_REGIONS regions even then (dots, noise) is labelled on ever larger cells until it has no
    more: the merge is quadratic in the count (a mask of dots a few pixels apart would take a long
    time to plan), and larger cells only merge more, so the crops still hold every region's padded box.
    """
    block = max(1, min(padding, cell))
    while (regions := mask_regions(binary, block, _MAX_REGIONS)) is None:
        block *= 2
    return _merge_overlapping([_pad(box, padding, size) for box in regions])


def plan_crops(
    binary: np.ndarray, padding: int, width: int | None = None, height: int | None = None, cell: int = _CELL
) -> Plan:
    """Where the model works: crops around the mask's regions, or the whole image.

    `binary` (H, W) is True where pixels will change. Each region's box is grown by `padding` pixels
    of context; overlapping boxes merge; all boxes share one working size so they run as one
    batch, and each box is grown to that working size's aspect so nothing is stretched. The regions
    are labelled on cells of up to `cell` pixels a side (_padded_regions), which changes no plan.
    """
    size = (binary.shape[1], binary.shape[0])
    whole: Box = (0, 0, size[0], size[1])
    if np.count_nonzero(binary) >= WHOLE_IMAGE_FRACTION * box_area(whole):
        # The regions' boxes hold at least the mask's pixels, so they would cover this much too: the
        # whole image, without labelling the regions (costly for a large mask).
        boxes = [whole]
    else:
        boxes = _padded_regions(binary, padding, size, cell) or [whole]
    while True:  # each round that merges has fewer boxes, so one box at the latest returns
        if len(boxes) > MAX_CROPS or sum(map(box_area, boxes)) >= WHOLE_IMAGE_FRACTION * box_area(whole):
            boxes = [whole]
        largest = max(boxes, key=box_area)
        working = fit_working_size((largest[2] - largest[0]) / (largest[3] - largest[1]), width, height)
        fitted = [fit_box_to_aspect(box, working[0] / working[1], size) for box in boxes]
        merged = _merge_overlapping(fitted)
        if len(merged) == len(fitted):
            return Plan(fitted, working)
        boxes = merged


def shrink(plan: Plan) -> float:
    """How much the plan's largest crop is shrunk for the model, on its more shrunk side (below 1: enlarged)."""
    width, height = plan.working_size
    return max(max((box[2] - box[0]) / width, (box[3] - box[1]) / height) for box in plan.boxes)


def _tile_starts(low: int, high: int, tile: int, overlap: int, limit: int) -> list[int]:
    """Starts of tiles of `tile` pixels covering [low, high) of [0, limit), evenly spaced, neighbours
    sharing at least `overlap` pixels."""
    if high - low <= tile:
        return [_expand_1d(low, high, tile, limit)[0]]
    count = math.ceil((high - low - tile) / (tile - overlap)) + 1
    return [low + round(index * (high - low - tile) / (count - 1)) for index in range(count)]


def plan_tiles(binary: np.ndarray, padding: int, width: int | None = None, height: int | None = None) -> Plan:
    """Overlapping tiles over the True pixels of (H, W) `binary` and `padding` pixels of context around them,
    in rows, each tile after the one left of it and the row above it; tiles holding no True pixel are left out.

    Tiles are the working size (its aspect following the region's, within TILE_ASPECT), shown to the
    model at its own resolution, or shrunk as far as it takes to need at most MAX_TILES of them.
    """
    size = (binary.shape[1], binary.shape[0])
    area = bounding_box(binary, padding)
    if area is None:
        raise ValueError("plan_tiles needs a region to cover")
    aspect = min(max((area[2] - area[0]) / (area[3] - area[1]), 1 / TILE_ASPECT), TILE_ASPECT)
    working = fit_working_size(aspect, width, height)
    scale = 1.0
    while True:
        tile = min(size[0], math.ceil(working[0] * scale)), min(size[1], math.ceil(working[1] * scale))
        overlap = [min(round(TILE_OVERLAP * scale), side // 2) for side in tile]
        columns = _tile_starts(area[0], area[2], tile[0], overlap[0], size[0])
        rows = _tile_starts(area[1], area[3], tile[1], overlap[1], size[1])
        boxes, joins = [], []
        for row, y in enumerate(rows):
            for column, x in enumerate(columns):
                if binary[y : y + tile[1], x : x + tile[0]].any():
                    boxes.append((x, y, x + tile[0], y + tile[1]))
                    joins.append((
                        columns[column - 1] + tile[0] if column else None,
                        rows[row - 1] + tile[1] if row else None,
                    ))
        if len(boxes) <= MAX_TILES:
            break
        scale *= 1.25
    # A canvas narrower than a tile: the tile spans that side, and the model works at that side's scale
    # (unless the side was asked for).
    if tile[0] < working[0] * scale and not width:
        working = _round_side(tile[0] / scale), working[1]
    if tile[1] < working[1] * scale and not height:
        working = working[0], _round_side(tile[1] / scale)
    return Plan(boxes, working, joins, min(overlap) // 2)


def plan_outpaint(binary: np.ndarray, padding: int, width: int | None = None, height: int | None = None) -> Plan:
    """Where the model works on a canvas with outpainting margins: the crops of plan_crops, or tiles
    (plan_tiles) when a crop would be shrunk more than MAX_SHRINK: a margin along a long edge."""
    plan = plan_crops(binary, padding, width, height)
    return plan if shrink(plan) <= MAX_SHRINK else plan_tiles(binary, padding, width, height)
