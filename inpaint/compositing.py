"""Pixels: clean up the mask, feather it, and paste the generated result over the original photo.

The model's output is always composited into the original, never the other way round: a pixel
farther than `blur` pixels (Euclidean) from the grown mask is copied from the input bit for bit.
Everything past thresholding works on the box around the mask only, so a small mask in a large
photo costs little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .geometry import Box, bounding_box, intersect


_FEATHER_TILE = 128  # side of the tiles feather_mask transforms one at a time


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


def prepare_mask(mask: np.ndarray, invert: bool = False, grow: int = 0) -> np.ndarray:
    """(H, W) bool, True = repaint, from a (H, W) uint8 grey mask: thresholded at 50%, optionally
    inverted, then grown (or shrunk if grow < 0)."""
    binary = mask >= 128
    if invert:
        binary = ~binary
    box = bounding_box(binary, max(grow, 0) + 1)
    if grow == 0 or box is None:
        return binary
    left, top, right, bottom = box
    region = binary[top:bottom, left:right]
    result = binary.copy()
    if grow > 0:
        result[top:bottom, left:right] = ndimage.distance_transform_edt(~region) <= grow
    else:
        # Distance to the nearest unmasked pixel; the image border does not count as unmasked.
        result[top:bottom, left:right] = ndimage.distance_transform_edt(region) > -grow
    return result


def feather_mask(binary: np.ndarray, radius: int) -> Feather:
    """1 on the mask, easing (smoothstep) to 0 at `radius` pixels outside it, 0 beyond.

    The distance transform runs tile by tile, and only on tiles the ramp crosses (a large mask's
    inside and the far outside need none), each with `radius` + 1 pixels of the mask around it: a
    mask pixel within `radius` of the tile lies in that margin, so every distance under `radius` is
    exact, and those at or over it give 0 either way. The same weights as one transform of the box.
    """
    box = bounding_box(binary, radius + 1 if radius > 0 else 0)
    if box is None:
        return Feather((0, 0, 0, 0), np.zeros((0, 0), np.float32))
    left, top, right, bottom = box
    region = binary[top:bottom, left:right]
    weight = region.astype(np.float32)  # 1 on the mask, 0 off it; the ramp is filled in below
    if radius <= 0:
        return Feather(box, weight)
    reach = radius + 1
    height, width = region.shape
    for y in range(0, height, _FEATHER_TILE):
        for x in range(0, width, _FEATHER_TILE):
            tile = region[y : y + _FEATHER_TILE, x : x + _FEATHER_TILE]
            if tile.all():
                continue  # inside the mask: 1
            y0, x0 = max(0, y - reach), max(0, x - reach)
            around = region[y0 : y + _FEATHER_TILE + reach, x0 : x + _FEATHER_TILE + reach]
            if not around.any():
                continue  # no mask within reach: 0
            distance = ndimage.distance_transform_edt(~around)  # to the nearest mask pixel
            distance = distance[y - y0 : y - y0 + tile.shape[0], x - x0 : x - x0 + tile.shape[1]]
            ramp = np.clip(1.0 - distance / radius, 0.0, 1.0).astype(np.float32)
            weight[y : y + tile.shape[0], x : x + tile.shape[1]] = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep
    return Feather(box, weight)


def composite_over(canvas: np.ndarray, patch: Image.Image, feather: Feather, box: Box) -> None:
    """Blend `patch` (RGB, the size of `box`) into `canvas` ((H, W, 3 or 4) uint8) at `box`, weighted
    by the feather; in place.

    Where the weight is 0 the canvas keeps its pixels exactly, where it is 1 it takes the patch's
    exactly; only the ramp in between is blended. Colour channels only (alpha is kept). Tile by
    tile, so a large mask's inside is a plain copy and the far outside is not touched at all.
    """
    region = intersect(box, feather.box)
    if region is None:
        return
    left, top, right, bottom = region
    weight = feather.weight[top - feather.box[1] : bottom - feather.box[1], left - feather.box[0] : right - feather.box[0]]
    base = canvas[top:bottom, left:right, :3]  # a view: written in place
    new = np.asarray(patch.crop((left - box[0], top - box[1], right - box[0], bottom - box[1])))  # (h, w, 3) uint8
    height, width = weight.shape
    for y in range(0, height, _FEATHER_TILE):
        for x in range(0, width, _FEATHER_TILE):
            tile = (slice(y, y + _FEATHER_TILE), slice(x, x + _FEATHER_TILE))
            _blend(base[tile], new[tile], weight[tile])


def _blend(base: np.ndarray, new: np.ndarray, weight: np.ndarray) -> None:
    """base (h, w, 3) uint8 <- new where weight is 1, a rounded mix where it is between 0 and 1; in place."""
    low, high = weight.min(), weight.max()
    if high <= 0:
        return
    if low >= 1:
        base[...] = new
        return
    np.copyto(base, new, where=(weight >= 1)[..., None])
    ramp = np.nonzero((weight > 0) & (weight < 1))
    colour = base[ramp].astype(np.float32)  # (n, 3)
    colour += (new[ramp] - colour) * weight[ramp][:, None]
    base[ramp] = np.rint(colour).astype(np.uint8)
