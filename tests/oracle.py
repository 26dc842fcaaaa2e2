"""A slow, plainly correct reference for the pixel work of compositing and geometry together.

Whole-image numpy, scipy and Pillow only: no tiles, threads, stamps, cells or cost models. Each step
is written from what the README promises, not from the fast code:
- threshold at 50% (128 of 255), then invert if asked;
- grow by `grow` pixels: a pixel joins when the nearest masked pixel is within `grow` (Euclidean);
  shrink (grow < 0): a pixel stays when the nearest unmasked one is farther than -grow (the image's
  border is not unmasked);
- feather by `blur`: weight 1 on the mask, smoothstep(1 - distance / blur) outside it, 0 from `blur` on;
- boxes: each 8-connected region of the touched pixels, grown by the padding (at least blur + 1) and
  clipped, merged while any two overlap; the whole image when they cover half of it or there are
  more than 4; a working size of multiples of 64 following the largest box's shape at about 512x512
  (or the width/height asked for), and every box grown around its centre to that shape;
- crop: the box, transparency laid onto white, resized to the working size with Lanczos (Pillow's
  reducing_gap=3);
- paste: the model's output resized to the box with Lanczos, across then down (Pillow picks the
  order of its two passes from the sizes; the paste always goes across first), and each pixel the
  weight reaches mixed as rint(photo + (painted - photo) x weight) in float32.
Documented tolerance: the paste may differ from this by 1 level where a pixel is painted (the fast
paste resizes strip by strip, within one level of one resize of the whole); everything else is
exact, and pixels the weight does not reach are the photo's, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

NATIVE_AREA = 512 * 512
MULTIPLE, SMALLEST, LARGEST = 64, 64, 1024


def squared_distance_to(true: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distance from every pixel to the nearest True pixel (a huge number without one)."""
    if not true.any():
        return np.full(true.shape, 1 << 40, np.int64)
    nearest = ndimage.distance_transform_edt(~true, return_distances=False, return_indices=True)
    rows, columns = np.indices(true.shape)
    return (nearest[0] - rows).astype(np.int64) ** 2 + (nearest[1] - columns).astype(np.int64) ** 2


def binary_mask(mask: np.ndarray, invert: bool, grow: int) -> np.ndarray:
    binary = mask >= 128
    if invert:
        binary = ~binary
    if grow > 0 and binary.any():
        return squared_distance_to(binary) <= grow * grow
    if grow < 0 and (~binary).any():
        return binary & (squared_distance_to(~binary) > grow * grow)
    return binary


def feather(binary: np.ndarray, blur: int) -> np.ndarray:
    if blur <= 0:
        return binary.astype(np.float32)
    eased = np.clip(1.0 - np.sqrt(squared_distance_to(binary)) / blur, 0.0, 1.0)
    weight = eased * eased * (3.0 - 2.0 * eased)
    return np.where(binary, 1.0, weight).astype(np.float32)


def _side(value: float) -> int:
    return int(min(LARGEST, max(SMALLEST, round(value / MULTIPLE) * MULTIPLE)))


def working_size(aspect: float, width: int | None, height: int | None) -> tuple[int, int]:
    """The sides asked for; a missing one follows the aspect; neither: about 512x512 in area."""
    if not width and not height:
        return _side(math.sqrt(NATIVE_AREA * aspect)), _side(math.sqrt(NATIVE_AREA / aspect))
    width = width or _side(height * aspect)
    return width, height or _side(width / aspect)


def _overlapping(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def merged(boxes: list) -> list:
    boxes = list(boxes)
    while True:
        pair = next(((i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if _overlapping(boxes[i], boxes[j])), None)
        if pair is None:
            return sorted(boxes)
        a, b = boxes[pair[0]], boxes[pair[1]]
        boxes = [box for k, box in enumerate(boxes) if k not in pair] + [
            (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
        ]


def _grown_to(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    length = min(length, limit)
    if high - low >= length:
        return low, high
    start = min(max(0, (low + high - length) // 2), limit - length)
    return start, start + length


def to_shape(box, aspect: float, width: int, height: int):
    left, top, right, bottom = box
    if (right - left) / (bottom - top) < aspect:
        left, right = _grown_to(left, right, math.ceil((bottom - top) * aspect), width)
    else:
        top, bottom = _grown_to(top, bottom, math.ceil((right - left) / aspect), height)
    return left, top, right, bottom


def plan(touched: np.ndarray, padding: int, width: int | None, height: int | None) -> tuple[list, tuple[int, int]]:
    rows, columns = touched.shape
    whole = (0, 0, columns, rows)
    area = rows * columns
    if touched.sum() >= area / 2:
        boxes = [whole]
    else:
        labels, _ = ndimage.label(touched, structure=np.ones((3, 3)))
        boxes = merged([
            (max(0, xs.start - padding), max(0, ys.start - padding), min(columns, xs.stop + padding), min(rows, ys.stop + padding))
            for ys, xs in ndimage.find_objects(labels)
        ]) or [whole]
    for _ in range(8):
        if len(boxes) > 4 or sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) >= area / 2:
            boxes = [whole]
        largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        size = working_size((largest[2] - largest[0]) / (largest[3] - largest[1]), width, height)
        shaped = [to_shape(box, size[0] / size[1], columns, rows) for box in boxes]
        if len(merged(shaped)) == len(shaped):
            return shaped, size
        boxes = merged(shaped)
    return [whole], working_size(columns / rows, width, height)


def crop(image: np.ndarray, box, size: tuple[int, int]) -> Image.Image:
    left, top, right, bottom = box
    part = Image.fromarray(image[top:bottom, left:right])
    if part.mode == "RGBA":
        part = Image.alpha_composite(Image.new("RGBA", part.size, (255, 255, 255, 255)), part)
    return part.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def paste(canvas: np.ndarray, painted: Image.Image, weight: np.ndarray, box) -> None:
    left, top, right, bottom = box
    across = painted.resize((right - left, painted.height), Image.Resampling.LANCZOS)  # across, then down, as
    new = np.asarray(across.resize((right - left, bottom - top), Image.Resampling.LANCZOS)).astype(np.float32)
    here = weight[top:bottom, left:right]
    base = canvas[top:bottom, left:right, :3]
    mixed = np.rint(base.astype(np.float32) + (new - base.astype(np.float32)) * here[..., None])
    base[here > 0] = mixed[here > 0].astype(np.uint8)


def inpaint(image: np.ndarray, mask: np.ndarray, painter, *, invert=False, grow=0, blur=8, padding=32,
            width=None, height=None, outputs=1) -> tuple[list[np.ndarray], list, np.ndarray]:
    """(the outputs, the boxes, the weight) for `painter(crop image, output index, region index)`."""
    if mask.shape != image.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
    binary = binary_mask(mask, invert, grow)
    if not binary.any():
        return [image.copy() for _ in range(outputs)], [], np.zeros(binary.shape, np.float32)
    weight = feather(binary, blur)
    boxes, size = plan(weight > 0, max(padding, blur + 1), width, height)
    results = [image.copy() for _ in range(outputs)]
    for region, box in enumerate(boxes):
        seen = crop(image, box, size)
        for index, result in enumerate(results):
            paste(result, painter(seen, index, region), weight, box)
    return results, boxes, weight
