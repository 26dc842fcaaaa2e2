"""Pixels: clean up the mask, feather it, and paste the generated result over the original photo.

The model's output is always composited into the original, never the other way round: a pixel
farther than `blur` pixels (Euclidean) from the grown mask is copied from the input bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from .geometry import Box


def _bounds(binary: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """Row and column slices around the True pixels, grown by margin and clipped; None if there are none."""
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(binary.any(axis=0))
    height, width = binary.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )


def prepare_mask(mask: Image.Image, invert: bool = False, grow: int = 0) -> np.ndarray:
    """(H, W) bool, True = repaint: thresholded at 50%, optionally inverted, then grown (or shrunk if grow < 0)."""
    binary = np.asarray(mask.convert("L")) >= 128
    if invert:
        binary = ~binary
    if grow > 0:
        region = _bounds(binary, grow + 1)
        if region is not None:
            grown = binary.copy()
            grown[region] = ndimage.distance_transform_edt(~binary[region]) <= grow
            binary = grown
    elif grow < 0:
        region = _bounds(binary, 1)
        if region is not None:
            # Distance to the nearest unmasked pixel; the image border does not count as unmasked.
            shrunk = binary.copy()
            shrunk[region] = ndimage.distance_transform_edt(binary[region]) > -grow
            binary = shrunk
    return binary


def feather_mask(binary: np.ndarray, radius: int) -> np.ndarray:
    """Blend weights (H, W) in [0, 1]: 1 on the mask, easing to 0 at `radius` pixels outside it, 0 beyond."""
    alpha = binary.astype(np.float32)
    region = _bounds(binary, radius + 1) if radius > 0 else None
    if region is None:
        return alpha
    # Distance of each pixel near the mask to the nearest mask pixel; only the box around the mask is computed.
    distance = ndimage.distance_transform_edt(~binary[region])
    ramp = np.clip(1.0 - distance / radius, 0.0, 1.0)
    alpha[region] = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no visible edge at either end
    return alpha


def composite_over(original: np.ndarray, patch: np.ndarray, alpha: np.ndarray, box: Box) -> None:
    """Blend `patch` (h, w, 3) into `original` (H, W, C) inside `box`, weighted by `alpha` (H, W); in place.

    Where alpha is 0 the original is left exactly as it was; colour channels only (alpha kept).
    """
    left, top, right, bottom = box
    weight = alpha[top:bottom, left:right, None]  # (h, w, 1)
    touched = weight[..., 0] > 0
    if not touched.any():
        return
    base = original[top:bottom, left:right, :3]
    blended = np.rint(base + (patch.astype(np.float32) - base) * weight).astype(np.uint8)
    base[touched] = blended[touched]
