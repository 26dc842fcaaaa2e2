"""Files in and out: decode an uploaded image or mask safely into arrays, encode the outputs.

Pixels travel through the package as numpy arrays: a photo is (H, W, 3) RGB or (H, W, 4) RGBA
uint8, a mask (H, W) uint8. Pillow reads every header first, so the size limits hold before a
single pixel is decoded. Still 8-bit PNGs, RGB or grey JPEGs and still WebPs then decode with
libpng, libjpeg-turbo and libwebp through imagecodecs, straight into an array and without holding
Python's lock (the photo and its mask decode side by side); Pillow decodes everything else. A
16-bit PNG or TIFF photo can come as uint16 instead (libpng, libtiff), and a PNG output in 16 bits.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
from isal import isal_zlib  # ISA-L's deflate: PNG outputs
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

log = logging.getLogger(__name__)

# Formats and modes (as Pillow names them from the header) that imagecodecs decodes to exactly
# the same pixels Pillow gives; the tests compare the two. MPO (cameras' and phones' multi-picture
# JPEG): the first picture, as Pillow's first frame.
_FAST_MODES = {"PNG": ("L", "LA", "RGB", "RGBA"), "JPEG": ("L", "RGB"), "MPO": ("L", "RGB"), "WEBP": ("RGB", "RGBA")}


# What an upload may be: the formats the error messages promise, and nothing that decodes a large
# picture before its size is known (ICO, ICNS), takes seconds per decode (JPEG 2000) or runs code (EPS).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF")  # Pillow's JPEG opener gives MPO files too
_ACCEPTED = "PNG, JPEG, WebP, GIF or TIFF"

# A PNG's chunks looked through for EXIF (an 8-bit 4096x4096 photo has a few hundred; a file of more is read by
# Pillow, which finds the EXIF itself).
_PNG_CHUNKS_WALKED = 1 << 16

# Blocks Pillow reads one by one in Python around a file's pixels: a PNG's chunks, a JPEG's segments and the
# stray bytes between them, a GIF's extension blocks and their sub-blocks, a TIFF's directory entries and the
# strips or tiles it lists. A photo has tens to thousands; a crafted file of millions held Pillow and the GIL,
# and took memory for each (docs/serving.md, Input files).
MAX_BLOCKS = 1 << 16

# The largest tile a TIFF may have, in pixels, unless its image is larger: libtiff decodes each tile whole, into
# a buffer of the tile's size, which the header sets apart from the image's (docs/serving.md, Input files).
# Encoders tile in 128 to 1024 pixels a side.
MAX_TILE_PIXELS = 1024 * 1024

# The largest ICC profile an output carries: Pillow's cap on a PNG's, so that every input format is held to
# the same; a photo's profile is a few hundred bytes to a few hundred KB.
MAX_PROFILE_BYTES = PngImagePlugin.MAX_TEXT_CHUNK


@dataclass(frozen=True)
class InputLimits:
    """Bounds on each uploaded file, all checked before a single pixel is decoded (config.Settings
    holds the deployment's values; the README's limits table lists them)."""

    max_pixels: int = 4096 * 4096
    max_bytes: int = 128 << 20  # a 4096x4096 16-bit RGB TIFF, uncompressed, is 96 MiB
    max_side: int = 8192
    max_aspect: float = 16.0  # longer side over shorter side
    max_jpeg_scans: int = 64  # a progressive JPEG has about 10; a "scan bomb" repeats one thousands of times


def _open(path: Path, name: str, limits: InputLimits) -> Image.Image:
    """Open lazily and check the file's size and the header's before a single pixel is decoded.

    Pillow refuses a header of over twice Image.MAX_IMAGE_PIXELS itself and only warns between once
    and twice; the service sets that limit to `limits.max_pixels`, and the check below refuses
    both. No warnings filter is changed here: photo and mask open in two threads at once, and
    warnings.catch_warnings is not thread-safe (it can leave one thread's filter in place for good)."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ValueError(
            f"{name} is a file of {size:,} bytes, over the limit of {limits.max_bytes:,} "
            "(INPAINT_MAX_UPLOAD_BYTES); upload a smaller or compressed image"
        )
    blocks = _blocks(path)
    if blocks > MAX_BLOCKS:
        raise ValueError(
            f"{name} holds over {MAX_BLOCKS:,} blocks (a PNG's chunks, a JPEG's segments, a GIF's extension blocks, "
            "a TIFF's tags and strips or tiles), where a photo has far fewer; save it again as PNG or JPEG without its "
            "metadata"
        )
    try:
        image = Image.open(path, formats=FORMATS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        _check_metadata(error, name)
        raise ValueError(f"{name} could not be read as an image ({_reason(error)}); upload a {_ACCEPTED} file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"{name} is too large: its header claims more than {limits.max_pixels:,} pixels; "
            f"upload an image of at most {limits.max_pixels:,} pixels"
        ) from None
    try:
        _check_header(image, path, name, limits)
    except ValueError:
        image.close()
        raise
    return image


def _blocks(path: Path, limit: int = MAX_BLOCKS) -> int:
    """The blocks of a PNG, JPEG, GIF or TIFF that Pillow reads one by one around the pixels, counted up to
    `limit` + 1 (at most that many steps, whatever the file); 0 for other formats. A file cut short counts what
    it has: Pillow names what is wrong with it."""
    with path.open("rb") as file:
        signature = file.read(8)
        file.seek(0)
        if signature == b"\x89PNG\r\n\x1a\n":
            return _png_blocks(file, limit)
        if signature[:2] == b"\xff\xd8":
            return _jpeg_blocks(file, limit)
        if signature[:6] in (b"GIF87a", b"GIF89a"):
            return _gif_blocks(file, limit)
        if signature[:4] in (b"II*\0", b"MM\0*", b"II+\0"):  # TIFF, either byte order; BigTIFF (Pillow reads no
            return _tiff_blocks(file, limit)                     # big-endian one)
    return 0


# A TIFF's layout by its version (TIFF 6.0: 42; BigTIFF: 43): where the header holds the first directory's
# offset, and the struct formats of that offset, of the directory's entry count and of an entry's value count
# (at byte 4 of each entry); then an entry's length.
_TIFF_LAYOUTS = {42: (4, "I", "H", "I", 12), 43: (8, "Q", "Q", "Q", 20)}
_TIFF_PIECES = (TiffImagePlugin.STRIPOFFSETS, TiffImagePlugin.STRIPBYTECOUNTS, TiffImagePlugin.TILEOFFSETS,
                TiffImagePlugin.TILEBYTECOUNTS)


def _tiff_blocks(file, limit: int) -> int:
    """The entries of a TIFF's first directory, which Pillow reads one by one when it opens the file (a
    BigTIFF counts them in 64 bits), and the strips or tiles that directory lists, which Pillow lays out one
    by one (a TIFF may list any number of them)."""
    header = file.read(16)  # byte order, version, then the first directory's offset (BigTIFF: after 4 bytes more)
    order = "<" if header[:2] == b"II" else ">"
    version = struct.unpack(order + "H", header[2:4])[0]
    offset_at, offset_format, count_format, entry_count_format, entry_size = _TIFF_LAYOUTS[version]
    if len(header) < offset_at + struct.calcsize(offset_format):
        return 0
    offset = struct.unpack_from(order + offset_format, header, offset_at)[0]
    if offset > os.fstat(file.fileno()).st_size:  # past the end (far past it, seek fails): Pillow names the damage
        return 0
    file.seek(offset)
    head = file.read(struct.calcsize(count_format))
    if len(head) < struct.calcsize(count_format):
        return 0
    entries = struct.unpack(order + count_format, head)[0]
    if entries > limit:
        return limit + 1
    table = file.read(entries * entry_size)
    pieces = 0
    for start in range(0, len(table) - entry_size + 1, entry_size):
        if struct.unpack_from(order + "H", table, start)[0] in _TIFF_PIECES:
            pieces = max(pieces, struct.unpack_from(order + entry_count_format, table, start + 4)[0])
    return min(entries + pieces, limit + 1)


def _png_chunks(file) -> Iterator[tuple[bytes, int, int]]:
    """Each chunk of a PNG file as its type, its length and where its data starts, until the file ends."""
    file.seek(8)  # after the signature: each chunk is its length, type, data and CRC
    while len(head := file.read(8)) == 8:
        length, kind = struct.unpack(">I4s", head)
        yield kind, length, file.tell()
        file.seek(length + 4, os.SEEK_CUR)


def _png_blocks(file, limit: int) -> int:
    """Chunks before IEND, but for IDATs of at least 1 KiB: Pillow reads the others after the pixels too, and
    each IDAT where it decodes them itself; encoders write IDATs of 8 KiB and more (the last excepted), and the
    byte limit bounds how many of those a file holds."""
    count = 0
    for kind, length, _ in _png_chunks(file):
        if kind == b"IEND":
            break
        count += kind != b"IDAT" or length < 1024
        if count > limit:
            break
    return count


def _jpeg_blocks(file, limit: int) -> int:
    """Markers before the first start of scan, fill bytes (FF) and stray bytes between them one each."""
    file.seek(2)  # after the start of image
    for count in range(limit + 1):
        byte = file.read(1)
        if byte != b"\xff":
            if not byte:
                return count
            continue  # a stray byte
        marker = file.read(1)
        if marker in (b"", b"\xda"):  # the end, or the start of scan: the pixels
            return count
        if marker == b"\xff":  # a fill byte before a marker
            file.seek(-1, os.SEEK_CUR)
        elif not (0xD0 <= marker[0] <= 0xD9 or marker[0] == 0x00):  # a segment (RSTn, SOI, EOI have no length)
            length = int.from_bytes(file.read(2), "big")
            if length < 2:  # the file ends, or the length is broken: Pillow names what is wrong
                return count
            file.seek(length - 2, os.SEEK_CUR)
    return limit + 1


def _gif_blocks(file, limit: int) -> int:
    """Extension blocks before the first image, and each of their data sub-blocks."""
    screen = file.read(13)  # signature and logical screen descriptor
    if len(screen) < 13:
        return 0
    if screen[10] & 0x80:  # a global colour table
        file.seek(3 << ((screen[10] & 7) + 1), os.SEEK_CUR)
    count = 0
    while count <= limit and file.read(1) == b"!":  # an extension (an image starts with ",")
        file.read(1)  # its label
        count += 1
        while count <= limit:
            size = file.read(1)
            if size in (b"", b"\0"):
                break
            file.seek(size[0], os.SEEK_CUR)
            count += 1
    return count


def _check_header(image: Image.Image, path: Path, name: str, limits: InputLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{name} is empty ({width}x{height}); upload a real image")
    _check_size(image.size, limits, f"{name} is", ("upload a smaller image",) * 2 + ("crop it closer to the region to repaint",))
    if image.format in ("JPEG", "MPO"):
        # Every scan starts with an SOS marker, and entropy-coded data never holds FF DA (0xFF is
        # stuffed as FF 00), so counting them counts the scans, embedded thumbnails included.
        scans = path.read_bytes().count(b"\xff\xda")
        if scans > limits.max_jpeg_scans:
            raise ValueError(
                f"{name} is a JPEG of {scans:,} scans, over the limit of {limits.max_jpeg_scans} "
                "(INPAINT_MAX_JPEG_SCANS); save it again as a baseline JPEG or a PNG"
            )
    if image.format == "TIFF":
        _check_tiles(image, name)


def _check_tiles(image: Image.Image, name: str) -> None:
    """A tiled TIFF's tiles are no larger than its image, or than MAX_TILE_PIXELS where that is more."""
    width, height = tile = [image.tag_v2.get(tag) for tag in (TiffImagePlugin.TILEWIDTH, TiffImagePlugin.TILELENGTH)]
    # None: in strips, which libtiff clips to the image. Pillow keeps the first of several values; libtiff reads
    # a tile size only as a whole number (a byte's is small), and refuses one of another type.
    if not all(isinstance(value, int) for value in tile):
        return
    if width * height > max(image.width * image.height, MAX_TILE_PIXELS):
        raise ValueError(
            f"{name} is a TIFF in tiles of {width}x{height} pixels, each decoded whole: larger than the image itself "
            f"({image.width}x{image.height}) and than {MAX_TILE_PIXELS:,} pixels; save it again without tiles, or as PNG"
        )


def _check_size(size: tuple[int, int], limits: InputLimits, subject: str, remedies: tuple[str, str, str]) -> None:
    """`size` (W, H) against the pixel, side and aspect limits; the error starts with `subject` and ends
    with the remedy for the limit it is over."""
    width, height = size
    if width * height > limits.max_pixels:
        raise ValueError(
            f"{subject} {width}x{height} = {width * height:,} pixels, over the limit of {limits.max_pixels:,} "
            f"(INPAINT_MAX_INPUT_PIXELS); {remedies[0]}"
        )
    if max(width, height) > limits.max_side:
        raise ValueError(
            f"{subject} {width}x{height}, a side over the limit of {limits.max_side:,} pixels "
            f"(INPAINT_MAX_INPUT_SIDE); {remedies[1]}"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ValueError(
            f"{subject} {width}x{height}, longer than {limits.max_aspect:g}:1 (INPAINT_MAX_INPUT_ASPECT); {remedies[2]}"
        )


def check_canvas(size: tuple[int, int], margins: tuple[int, int, int, int], limits: InputLimits) -> None:
    """An outpainting canvas, the photo of `size` (W, H) grown by `margins` (left, top, right, bottom),
    is held to the limits of an uploaded image."""
    canvas = size[0] + margins[0] + margins[2], size[1] + margins[1] + margins[3]
    subject = (
        f"the photo ({size[0]}x{size[1]}) with outpaint_left, outpaint_up, outpaint_right and outpaint_down "
        f"{margins} makes a canvas of"
    )
    smaller = "lower the outpaint margins or send a smaller photo"
    _check_size(canvas, limits, subject, (smaller, smaller, "lower the margins along its long side, or add some across it"))


def _check_metadata(error: Exception, name: str) -> None:
    """Raise the error to show when Pillow refused a PNG for its metadata: a text or ICC profile chunk that
    inflates past its cap (a zip bomb, or metadata far larger than any photo's), which no other format
    would cure. The pixels are never read, so the metadata has to go."""
    if "MAX_TEXT_CHUNK" in str(error) or "MAX_TEXT_MEMORY" in str(error):
        raise ValueError(
            f"{name} holds too much metadata: a PNG text or colour profile chunk that decompresses past "
            f"{PngImagePlugin.MAX_TEXT_CHUNK:,} bytes, or text chunks past {PngImagePlugin.MAX_TEXT_MEMORY:,} bytes "
            "in all; save the image again without its metadata"
        ) from None


def _reason(error: Exception) -> str:
    text = str(error).split(" '/")[0].split(" \"/")[0]  # drop temporary paths Pillow quotes
    return text or type(error).__name__


def _decode(path: Path, name: str, limits: InputLimits, deep: bool = False) -> tuple[np.ndarray | Image.Image, bytes | None]:
    """The upright pixels: an array from the fast decoders ((H, W), or (H, W, C) with C = 2, 3 or 4 for
    LA, RGB, RGBA; uint16 for a 16-bit PNG or TIFF when `deep`, else uint8), else a decoded Pillow image
    in 8 bits (first frame of an animation); and the ICC profile the file holds, if any."""
    image = _open(path, name, limits)
    profile = image.info.get("icc_profile")  # read with the header, as is every format's
    try:
        pixels = _decode_deep(image, path) if deep else None
        if pixels is None:
            pixels = _decode_fast(image, path)
        if pixels is not None:
            return pixels, profile
        image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to turn
    # A damaged TIFF can make Pillow seek to a strip offset of another type (TypeError), or read up to one far
    # past the file's end (MemoryError); a PNG's colour profile cut short after its pixels, read past its end
    # (IndexError). tests/test_hostile_inputs.py damages files of every format at random.
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError, IndexError) as error:
        _check_metadata(error, name)
        raise ValueError(
            f"{name} could not be decoded ({_reason(error)}); the file may be truncated or damaged, upload it again"
        ) from None
    return _to_8bit(image), profile


def _decode_fast(image: Image.Image, path: Path) -> np.ndarray | None:
    """libpng, libjpeg-turbo or libwebp (imagecodecs) straight into an array: faster than Pillow once
    Pillow's hand-over to numpy is counted (bench/RESULTS.md, "Pre/post").

    None, for Pillow to decode instead: another format or layout, an animation, a PNG with EXIF
    (Pillow applies its orientation), a JPEG that does not end in its end marker, or a file these
    decoders refuse (Pillow then reports the damage in its own words)."""
    if image.mode not in _FAST_MODES.get(image.format, ()):
        return None
    orientation = 1
    if image.format == "PNG":
        if not image.tile or image.tile[0].args != image.mode or getattr(image, "n_frames", 1) != 1:  # 16-bit, APNG
            return None
        data = path.read_bytes()
        if _png_has_exif(data):
            return None
        decode, failure = imagecodecs.png_decode, imagecodecs.PngError
    else:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)  # read with the header
        data = path.read_bytes()
        if image.format == "WEBP":
            if getattr(image, "n_frames", 1) != 1:  # animated: Pillow takes the first frame
                return None
            decode, failure = imagecodecs.webp_decode, imagecodecs.WebpError
        else:
            if not data.endswith(b"\xff\xd9"):  # truncated (libjpeg would pad it with grey), or trailing bytes
                return None
            decode, failure = imagecodecs.jpeg8_decode, imagecodecs.Jpeg8Error
    try:
        pixels = decode(data)
    except (failure, ValueError):
        return None
    channels = () if len(image.mode) == 1 else (len(image.mode),)
    if pixels.dtype != np.uint8 or pixels.shape != (image.height, image.width, *channels):
        return None
    image.close()
    return _orient(pixels, orientation)


def _decode_deep(image: Image.Image, path: Path) -> np.ndarray | None:
    """A 16-bit PNG's or TIFF's samples as they are, upright: uint16 (H, W), or (H, W, C) with C = 2, 3 or
    4, from libpng or libtiff (Pillow reads 16-bit colour as 8-bit). None, for the 8-bit decoders instead:
    another format or depth, or a layout read otherwise (below), or a file the library refuses."""
    if image.format == "PNG":
        return _decode_deep_png(image, path)
    if image.format == "TIFF":
        return _decode_deep_tiff(image, path)
    return None


def _decode_deep_png(image: Image.Image, path: Path) -> np.ndarray | None:
    """Not an APNG (Pillow takes its first frame); a transparent colour key (tRNS) is left out, as in 8 bits."""
    if not image.tile or not image.tile[0].args.endswith(";16B") or image.n_frames != 1:  # 16-bit samples, as
        return None                                                         # Pillow reads them (none: no pixels)
    data = path.read_bytes()  # only now: an 8-bit PNG is read once, by _decode_fast
    try:
        pixels = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, ValueError):
        return None
    if pixels.dtype != np.uint16 or pixels.shape[:2] != (image.height, image.width):
        return None
    if "transparency" in image.info and pixels.ndim == 3:  # libpng made the colour key an alpha channel (unless
        pixels = pixels[..., 0] if pixels.shape[2] == 2 else pixels[..., :3]  # it found the key damaged)
    # Pillow reads a PNG's EXIF only by decoding it all (damage or a metadata bomb there: _decode reports it).
    orientation = image.getexif().get(ExifTags.Base.Orientation) if _png_has_exif(data) else None  # None: as it is
    image.close()
    return _orient(pixels, orientation)


def _png_has_exif(data: bytes) -> bool:
    """Whether a PNG holds EXIF: an eXIf chunk, or ImageMagick's "Raw profile type exif" text. The bytes
    turn up by chance in a large file's compressed pixels (and Pillow then decoded it all to look), so a
    match is checked chunk by chunk; a file of more than _PNG_CHUNKS_WALKED chunks is taken to hold EXIF."""
    if b"eXIf" not in data and b"Raw profile type exif" not in data:
        return False
    walked = 0
    for kind, _, start in itertools.islice(_png_chunks(io.BytesIO(data)), _PNG_CHUNKS_WALKED):
        if kind == b"eXIf" or kind in (b"tEXt", b"zTXt", b"iTXt") and data.startswith(b"Raw profile type exif", start):
            return True
        walked += 1
    return walked == _PNG_CHUNKS_WALKED


def _decode_deep_tiff(image: Image.Image, path: Path) -> np.ndarray | None:
    """The first page, 16-bit grey or RGB, with or without unassociated alpha; premultiplied alpha and
    min-is-white go to the 8-bit decoders, which convert them, as do signed and float samples (libtiff
    gives them as another dtype)."""
    tags = image.tag_v2
    colour = {1: 1, 2: 3}.get(tags.get(TiffImagePlugin.PHOTOMETRIC_INTERPRETATION))  # min-is-black grey, RGB
    extra = tuple(tags.get(TiffImagePlugin.EXTRASAMPLES, ()))
    if colour is None or set(tags.get(TiffImagePlugin.BITSPERSAMPLE, ())) != {16} or extra not in ((), (2,)):
        return None
    try:
        pixels = imagecodecs.tiff_decode(path.read_bytes(), index=0)
    except (imagecodecs.TiffError, ValueError, IndexError):  # IndexError: libtiff read no directory where Pillow did
        return None
    if tags.get(TiffImagePlugin.PLANAR_CONFIGURATION) == 2 and pixels.ndim == 3:  # (C, H, W): one plane a sample
        pixels = np.ascontiguousarray(np.moveaxis(pixels, 0, 2))
    channels = colour + len(extra)
    # The stored size: Pillow's is turned already where libtiff will turn the pixels for it.
    stored = (tags.get(TiffImagePlugin.IMAGELENGTH), tags.get(TiffImagePlugin.IMAGEWIDTH))
    if pixels.dtype != np.uint16 or pixels.shape != (*stored, *((channels,) if channels > 1 else ())):
        return None
    orientation = image.getexif().get(ExifTags.Base.Orientation)  # a TIFF's tags, read with its header
    image.close()
    return _orient(pixels, orientation)


def reduce_to_8bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit samples scaled to 8 bits (65535 to 255, rounded down), as 16-bit grey always was."""
    return (pixels // 257).astype(np.uint8)


def _orient(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """Apply an EXIF orientation (2-8) the way ImageOps.exif_transpose does; 1, unknown or None: as is."""
    turned = {
        2: lambda a: a[:, ::-1],  # mirrored
        3: lambda a: a[::-1, ::-1],  # upside down
        4: lambda a: a[::-1],  # mirrored upside down
        5: lambda a: a.swapaxes(0, 1),  # transposed
        6: lambda a: np.rot90(a, -1),  # turned 90 degrees anticlockwise: turn it back clockwise
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transversed
        8: lambda a: np.rot90(a, 1),
    }.get(orientation)
    return pixels if turned is None else np.ascontiguousarray(turned(pixels))


def _to_8bit(image: Image.Image) -> Image.Image:
    """In a mode Pillow converts to RGB, RGBA and L: 16- and 32-bit grey scaled to 8-bit (not clipped),
    TIFF's premultiplied grey and alpha ("La") unpremultiplied, and TIFF's CIELab to RGB (Pillow
    converts neither to grey, nor "La" to anything but "LA")."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.int64)
        top = 65535 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255
        return Image.fromarray((np.clip(array, 0, top) * 255 // top).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        top = 255.0 if array.max(initial=0) > 1.0 else 1.0
        return Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8), "L")
    if image.mode in ("La", "LAB"):
        return image.convert("LA" if image.mode == "La" else "RGB")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)


@dataclass(frozen=True)
class Photo:
    """An uploaded photo, decoded."""

    pixels: np.ndarray  # (H, W, 3) RGB or (H, W, 4) RGBA, upright; uint8, or uint16 for a 16-bit PNG or TIFF
    icc_profile: bytes | None = None  # the file's colour profile, which its outputs carry; None: none, or not for RGB


def decode_photo(path: Path, limits: InputLimits, name: str = "image") -> Photo:
    """The uploaded photo, upright: (H, W, 3) RGB, or (H, W, 4) RGBA when it has transparency; uint8, or
    uint16 for a 16-bit PNG or TIFF, all 16 bits of each sample kept. Its pixels are as the file holds
    them, in its colour space: the ICC profile that says which comes along, for the outputs to carry."""
    decoded, profile = _decode(path, name, limits, deep=True)
    return Photo(_rgb(decoded), _carried_profile(profile, name))


def decode_image(path: Path, limits: InputLimits, name: str = "image") -> np.ndarray:
    """The photo's pixels alone, always in 8 bits (decode_photo keeps 16)."""
    return _rgb(_decode(path, name, limits)[0])


def _rgb(decoded: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(decoded, np.ndarray):
        if decoded.ndim == 3 and decoded.shape[2] in (3, 4):
            return decoded
        if decoded.dtype == np.uint16:  # grey, or grey and alpha: spread over RGB(A) as Pillow does
            grey = decoded if decoded.ndim == 2 else decoded[..., 0]
            alpha = () if decoded.ndim == 2 else (decoded[..., 1],)
            return np.stack((grey, grey, grey, *alpha), axis=2)
        decoded = Image.fromarray(decoded)  # grey, or grey and alpha: Pillow spreads it over RGB(A)
    return np.asarray(decoded.convert("RGBA" if _has_alpha(decoded) else "RGB"))


def _carried_profile(profile: bytes | None, name: str) -> bytes | None:
    """`profile` if the RGB outputs can carry it: an ICC profile of RGB data (its header's colour space,
    bytes 16-19, is "RGB "), of at most MAX_PROFILE_BYTES. A profile of other data (grey, CMYK, Lab: the
    pixels were converted to RGB, as if sRGB) or too large is left out, and the log says so."""
    if not profile:
        return None
    if profile[16:20] != b"RGB ":
        space = profile[16:20].decode("latin-1").strip()
        log.info("%s's ICC colour profile is for %r data, not RGB: the outputs carry none", name, space)
        return None
    if len(profile) > MAX_PROFILE_BYTES:
        log.info("%s's ICC colour profile is %s bytes, over %s: the outputs carry none", name, f"{len(profile):,}",
                 f"{MAX_PROFILE_BYTES:,}")
        return None
    return profile


def decode_mask(path: Path, limits: InputLimits, name: str = "mask") -> np.ndarray:
    """The uploaded mask as (H, W) uint8 grey (white = repaint); thresholding is the caller's.

    Colour is reduced to luminance (as Pillow's "L"); transparent pixels count as keep (black).
    """
    decoded, _ = _decode(path, name, limits)
    if isinstance(decoded, np.ndarray):
        if decoded.ndim == 2:
            return decoded
        decoded = Image.fromarray(decoded)
    if _has_alpha(decoded):
        rgba = decoded.convert("RGBA")
        decoded = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.asarray(decoded if decoded.mode == "L" else decoded.convert("L"))


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask of another size (W, H) than the image is resized to it with nearest neighbour, and logged."""
    height, width = mask.shape
    if (width, height) == tuple(size):
        return mask
    log.info("mask is %dx%d but the image is %dx%d: resizing the mask to the image (nearest neighbour)", width, height, *size)
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def flatten(pixels: np.ndarray) -> np.ndarray:
    """RGB for the model: transparent pixels carry undefined colour, so they are laid onto white."""
    if pixels.shape[2] == 3:
        return pixels
    rgba = Image.fromarray(pixels)
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


OUTPUT_FORMATS = ("png", "webp", "jpg")
_PNG_STRIP_ROWS = 256  # rows of a PNG output deflated at a time, each strip on its own thread


def encode_image(pixels: np.ndarray, path_stem: Path, output_format: str, quality: int, map=map,
                 strip_rows: int = _PNG_STRIP_ROWS, icc_profile: bytes | None = None) -> Path:
    """Write one output ((H, W, 3 or 4) uint8, or uint16 for a 16-bit PNG); PNG is lossless (bit-exact
    outside the mask), WebP and JPEG use `quality` and 8 bits. `icc_profile`: the photo's, to say what
    colours the pixels mean. A PNG's strips of `strip_rows` go through `map` (_write_png); the file does
    not depend on either."""
    if pixels.dtype == np.uint16 and output_format != "png":
        pixels = reduce_to_8bit(pixels)
    profile = {} if icc_profile is None else {"icc_profile": icc_profile}
    if output_format == "png":
        path = path_stem.with_suffix(".png")
        _write_png(np.ascontiguousarray(pixels), path, map, strip_rows, icc_profile)
    elif output_format == "webp":
        path = path_stem.with_suffix(".webp")
        Image.fromarray(pixels).save(path, format="WEBP", quality=quality, method=4, **profile)
    elif output_format == "jpg":
        path = path_stem.with_suffix(".jpg")
        Image.fromarray(pixels[..., :3]).save(path, format="JPEG", quality=quality, **profile)  # JPEG has no alpha
    else:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    return path


def _write_png(pixels: np.ndarray, path: Path, map=map, strip_rows: int = _PNG_STRIP_ROWS,
               icc_profile: bytes | None = None) -> None:
    """An RGB or RGBA PNG of 8 bits (uint8 `pixels`) or 16 (uint16), with `icc_profile` as its iCCP chunk,
    deflated in strips of rows side by side, as pigz does for gzip.

    Every row is filtered Up (less the row above, byte by byte; the first row less zeros). Each strip is deflated
    by its own ISA-L compressor at level 1 and ended with a sync flush, so the next strip carries on
    the one zlib stream at a byte boundary; each goes in its own IDAT chunk, and the stream's
    Adler-32 is put together from the strips'. Faster than fpng and Pillow, and smaller files
    (bench/RESULTS.md, "PNG writer"). `map` runs the strips: an executor's map side by side (ISA-L
    and numpy release Python's lock), the builtin one in turn.
    """
    height, width, channels = pixels.shape
    depth = 8 * pixels.dtype.itemsize
    # (H, row bytes): a 16-bit sample is two bytes, most significant first
    rows = (pixels if depth == 8 else pixels.astype(">u2")).view(np.uint8).reshape(height, -1)

    def deflate(start: int) -> tuple[bytes, int, int]:
        stop = min(start + strip_rows, height)
        filtered = np.empty((stop - start, 1 + rows.shape[1]), np.uint8)  # (rows, filter byte + row)
        filtered[:, 0] = 2  # Up
        filtered[0, 1:] = rows[start] - rows[start - 1] if start else rows[0]  # uint8: modulo 256
        np.subtract(rows[start + 1 : stop], rows[start : stop - 1], out=filtered[1:, 1:])
        compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)  # raw deflate: one zlib header for all
        flush = isal_zlib.Z_FINISH if stop == height else isal_zlib.Z_SYNC_FLUSH
        return compressor.compress(filtered) + compressor.flush(flush), isal_zlib.adler32(filtered), filtered.size

    strips = list(map(deflate, range(0, height, strip_rows)))
    checksum = 1  # the Adler-32 of nothing
    for _, adler, length in strips:
        checksum = _adler32_combine(checksum, adler, length)
    with path.open("wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        _write_chunk(file, b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 6 if channels == 4 else 2, 0, 0, 0))
        if icc_profile is not None:  # a name, compression method 0 (zlib), the profile; before the pixels
            _write_chunk(file, b"iCCP", b"ICC profile\0\0" + isal_zlib.compress(icc_profile))
        for index, (data, _, _) in enumerate(strips):
            if index == 0:
                data = b"\x78\x01" + data  # zlib header: deflate, 32 KiB window, fastest
            if index == len(strips) - 1:
                data += struct.pack(">I", checksum)
            _write_chunk(file, b"IDAT", data)
        _write_chunk(file, b"IEND", b"")


def _write_chunk(file, kind: bytes, data: bytes) -> None:
    file.write(struct.pack(">I", len(data)) + kind)
    file.write(data)
    file.write(struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind))))


def _adler32_combine(first: int, second: int, length: int) -> int:
    """The Adler-32 of A followed by B, from A's, B's and B's length (zlib's adler32_combine)."""
    base = 65521
    low = ((first & 0xFFFF) + (second & 0xFFFF) + base - 1) % base
    high = ((first >> 16) + (second >> 16) + (length % base) * ((first & 0xFFFF) - 1)) % base
    return (high << 16) | low
