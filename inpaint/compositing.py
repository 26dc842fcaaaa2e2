"""Pixels: feather the mask and paste the generated result over the original photo.

The model's output is always composited into the original, never the other way round: a pixel
farther than `radius` pixels (Euclidean) from the mask is copied from the input bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def mask_box(mask: Image.Image, margin: int = 0) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the mask's white pixels grown by `margin`, clipped to the image; None if empty."""
    box = mask.getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    width, height = mask.size
    return max(0, left - margin), max(0, top - margin), min(width, right + margin), min(height, bottom + margin)


def feather_mask(mask: Image.Image, radius: int) -> np.ndarray:
    """Blend weights in [0, 1] (H, W): 1 on the mask, easing to 0 at `radius` pixels outside it, 0 beyond."""
    binary = np.asarray(mask) >= 128  # (H, W) bool
    alpha = binary.astype(np.float32)
    if radius <= 0:
        return alpha
    box = mask_box(mask, radius + 1)
    if box is None:
        return alpha
    left, top, right, bottom = box
    # Distance of every pixel near the mask to the nearest mask pixel; only the box around the mask is computed.
    distance = ndimage.distance_transform_edt(~binary[top:bottom, left:right])
    ramp = np.clip(1.0 - distance / radius, 0.0, 1.0)
    alpha[top:bottom, left:right] = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no visible edge at either end
    return alpha


def grow_mask(alpha: np.ndarray) -> Image.Image:
    """The binary mask of every pixel the composite will touch (alpha > 0): what the model must repaint."""
    return Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L")


def composite_over(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    """original where alpha == 0, generated where alpha == 1, a blend between; all three at the same size."""
    if generated.size != original.size:
        raise ValueError(f"generated image is {generated.size}, original is {original.size}")
    result = np.array(original)  # (H, W, 3) uint8, a copy
    rows, cols = np.nonzero(alpha)
    if rows.size == 0:
        return original.copy()
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    weight = alpha[top:bottom, left:right, None]  # (h, w, 1)
    base = result[top:bottom, left:right].astype(np.float32)
    new = np.asarray(generated)[top:bottom, left:right].astype(np.float32)
    blended = np.rint(base + (new - base) * weight).astype(np.uint8)
    result[top:bottom, left:right] = np.where(weight > 0, blended, result[top:bottom, left:right])
    return Image.fromarray(result, "RGB")
