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
    """1 on the mask, easing (smoothstep) to 0 at `radius` pixels outside it, 0 beyond."""
    box = bounding_box(binary, radius + 1 if radius > 0 else 0)
    if box is None:
        return Feather((0, 0, 0, 0), np.zeros((0, 0), np.float32))
    left, top, right, bottom = box
    region = binary[top:bottom, left:right]
    if radius <= 0:
        return Feather(box, region.astype(np.float32))
    distance = ndimage.distance_transform_edt(~region)  # to the nearest mask pixel
    ramp = np.clip(1.0 - distance / radius, 0.0, 1.0).astype(np.float32)
    return Feather(box, ramp * ramp * (3.0 - 2.0 * ramp))  # smoothstep: no visible edge at either end


def composite_over(canvas: np.ndarray, patch: Image.Image, feather: Feather, box: Box) -> None:
    """Blend `patch` (RGB, the size of `box`) into `canvas` ((H, W, 3 or 4) uint8) at `box`, weighted
    by the feather; in place.

    Where the weight is 0 the canvas keeps its pixels exactly; colour channels only (alpha is kept).
    """
    region = intersect(box, feather.box)
    if region is None:
        return
    left, top, right, bottom = region
    weight = feather.weight[top - feather.box[1] : bottom - feather.box[1], left - feather.box[0] : right - feather.box[0]]
    weight = weight[..., None]  # (h, w, 1)
    base = canvas[top:bottom, left:right, :3]  # a view: written in place
    new = np.asarray(patch.crop((left - box[0], top - box[1], right - box[0], bottom - box[1])), dtype=np.float32)
    colour = base.astype(np.float32)
    colour += (new - colour) * weight
    np.copyto(base, np.rint(colour, out=colour).astype(np.uint8), where=weight > 0)
