"""Decoding uploads safely, and encoding outputs."""

import io
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import imagecodecs
import numpy as np
import pytest
import tifffile
from conftest import make_photo
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile, ImageOps

from inpaint import codec
from inpaint.codec import InputLimits, decode_image, decode_mask, decode_photo, encode_image, fit_mask, flatten

LIMIT = InputLimits()


def test_undecodable_file_names_the_input(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not an image")
    with pytest.raises(ValueError, match="^image could not be read as an image") as error:
        decode_image(path, LIMIT)
    assert str(tmp_path) not in str(error.value)  # no temporary paths in messages


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="^mask could not be read"):
        decode_mask(path, LIMIT)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_file_is_reported_as_damaged(tmp_path, fmt):
    data = make_photo(tmp_path / f"p.{fmt}").read_bytes()
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="^image could not be (decoded|read)"):
        decode_image(path, LIMIT)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_oversized_header_is_rejected_before_decoding(tmp_path, monkeypatch):
    """Under Pillow's own bomb limit (as it ships), and under the one setup sets (the service's pixel limit:
    a global, so which one holds depends on whether a model was loaded in this process before)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024 * 1024 * 1024 // 4 // 3)  # PIL/Image.py's own value
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(50000, 50000))
    with pytest.raises(ValueError, match="^image is too large|over the limit"):
        decode_image(path, LIMIT)
    path.write_bytes(_png_header_only(5000, 5000))
    with pytest.raises(ValueError, match="image is 5000x5000 = 25,000,000 pixels, over the limit"):
        decode_image(path, LIMIT)
    path.write_bytes(_png_header_only(10000, 10000))  # over Pillow's warning limit, under its error limit
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match="image is 10000x10000 = 100,000,000 pixels, over the limit"):
        decode_image(path, LIMIT)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", LIMIT.max_pixels)  # as Inpainter.load sets it
    with pytest.raises(ValueError, match=f"^image is too large: its header claims more than {LIMIT.max_pixels:,} pixels; "
                                         f"upload an image of at most {LIMIT.max_pixels:,} pixels$"):
        decode_image(path, LIMIT)  # over twice the limit: Pillow refuses it itself
    path.write_bytes(_png_header_only(5000, 5000))  # between once and twice: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match="image is 5000x5000 = 25,000,000 pixels, over the limit"):
        decode_image(path, LIMIT)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "1"])
def test_every_mode_decodes_to_rgb_or_rgba(tmp_path, mode):
    source = make_photo(tmp_path / "p.png")
    image = Image.open(source)
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)  # 16-bit grayscale
    else:
        converted = image.convert(mode)
    path = tmp_path / ("p.jpg" if mode == "CMYK" else "p.tiff" if mode == "I" else "p.png")
    converted.save(path)
    decoded = decode_image(path, LIMIT)
    assert decoded.dtype == np.uint8 and decoded.shape == (120, 200, 4 if mode in ("RGBA", "LA") else 3)
    assert flatten(decoded).shape == (120, 200, 3)
    if mode == "I;16":  # scaled, not clipped to white
        assert abs(int(decoded.mean()) - int(np.asarray(image.convert("L")).mean())) <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied_as_pillow_applies_it(tmp_path, orientation, fmt):
    rng = np.random.default_rng(orientation)
    image = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"turned.{fmt.lower()}"
    image.save(path, format=fmt, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    decoded = decode_image(path, LIMIT)
    assert decoded.shape == ((40, 20, 3) if orientation >= 5 else (20, 40, 3))
    assert np.array_equal(decoded, expected)


def _pillow_pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))


def _spy(function_name):
    import imagecodecs

    return mock.patch.object(imagecodecs, function_name, wraps=getattr(imagecodecs, function_name))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_8bit_png_decodes_exactly_as_pillow_decodes_it(tmp_path, mode):
    # 8-bit PNGs go through libpng (imagecodecs): the pixels are exactly Pillow's.
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)).convert(mode)
    path = tmp_path / "p.png"
    noise.save(path)
    with _spy("png_decode") as libpng:
        decoded = decode_image(path, LIMIT)
    assert libpng.call_count == 1
    assert np.array_equal(decoded, _pillow_pixels(path))
    mask = decode_mask(path, LIMIT)
    with Image.open(path) as image:
        expected = image.convert("RGBA")
        expected = np.asarray(Image.alpha_composite(Image.new("RGBA", expected.size, (0, 0, 0, 255)), expected).convert("L"))
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize(
    "chunk", [(b"gAMA", struct.pack(">I", 100000)), (b"sBIT", bytes([5, 6, 5])), (b"tRNS", struct.pack(">HHH", 10, 20, 30))],
    ids=["gAMA", "sBIT", "tRNS"],
)
def test_png_colour_chunks_change_no_pixel(tmp_path, chunk):
    # Pillow ignores gamma, significant bits and an RGB colour key; so must the fast decoder.
    from PIL import PngImagePlugin

    pixels = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add(*chunk)
    path = tmp_path / "chunky.png"
    Image.fromarray(pixels).save(path, pnginfo=info)
    assert np.array_equal(decode_image(path, LIMIT), pixels)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}], ids=["420", "progressive", "444"])
def test_jpeg_decodes_exactly_as_pillow_decodes_it(tmp_path, mode, options):
    photo = Image.open(make_photo(tmp_path / "p.png")).convert(mode)
    path = tmp_path / "p.jpg"
    photo.save(path, quality=85, **options)
    with _spy("jpeg8_decode") as libjpeg:
        decoded = decode_image(path, LIMIT)
    assert libjpeg.call_count == 1
    assert np.array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))
    assert np.array_equal(decode_mask(path, LIMIT), np.asarray(Image.open(path).convert("L")))


def test_16bit_rgb_png_is_reduced_to_8bit(tmp_path):
    # 16-bit RGB goes to Pillow (libpng would give uint16): the high byte of each sample.
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    path = tmp_path / "deep.png"
    _write_png(path, 10, 12, 16, 2, samples.astype(">u2").tobytes(), row_bytes=10 * 6)
    decoded = decode_image(path, LIMIT)
    assert np.array_equal(decoded, (samples >> 8).astype(np.uint8))


def _write_png(path, width, height, depth, color_type, raw: bytes, row_bytes: int, before: bytes = b"",
               after: bytes = b"") -> None:
    """A PNG as its specification lays it out, unfiltered, with chunks (from _chunk) `before` and `after` the pixels."""
    rows = b"".join(b"\0" + raw[y * row_bytes : (y + 1) * row_bytes] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + before + _chunk(b"IDAT", zlib.compress(rows)) + after
                     + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # a PNG's colour type by samples per pixel: grey, grey + alpha, RGB, RGBA


def _write_16bit_png(path, samples: np.ndarray, before: bytes = b"", after: bytes = b"") -> None:
    height, width, channels = samples.shape
    _write_png(path, width, height, 16, _COLOUR_TYPES[channels], samples.astype(">u2").tobytes(), width * channels * 2,
               before, after)


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey+alpha", "RGB", "RGBA"])
def test_a_16bit_png_decodes_deep_to_its_own_samples(tmp_path, channels):
    """With `deep`, every 16-bit PNG keeps all of its samples' bits (grey spread over RGB, as Pillow spreads
    8 bits); without, the 8 bits it always had. The file is laid out by hand from the PNG specification."""
    samples = np.random.default_rng(channels).integers(0, 65536, (12, 10, channels), dtype=np.uint16)
    path = tmp_path / "deep.png"
    _write_16bit_png(path, samples)
    decoded = decode_photo(path, LIMIT).pixels
    colour = samples[..., :1].repeat(3, axis=2) if channels <= 2 else samples[..., :3]
    alpha = samples[..., -1:] if channels in (2, 4) else samples[..., :0]
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, np.concatenate((colour, alpha), axis=2))
    shallow = decode_image(path, LIMIT)
    assert shallow.dtype == np.uint8 and shallow.shape == decoded.shape
    if channels == 1:  # 16-bit grey was always scaled (65535 to 255); Pillow keeps the high byte of colour
        assert np.array_equal(shallow, codec.reduce_to_8bit(decoded))


_SAMPLES = np.random.default_rng(7).integers(0, 65536, (32, 48, 4), dtype=np.uint16)
_TIFFS = {  # tifffile.imwrite's arguments, and the samples the first page holds
    "RGB": (dict(data=_SAMPLES[..., :3], photometric="rgb"), _SAMPLES[..., :3]),
    "RGB, deflate with a predictor": (dict(data=_SAMPLES[..., :3], photometric="rgb", compression="zlib",
                                           predictor=True), _SAMPLES[..., :3]),
    "RGB, LZW": (dict(data=_SAMPLES[..., :3], photometric="rgb", compression="lzw"), _SAMPLES[..., :3]),
    "RGB, in tiles": (dict(data=_SAMPLES[..., :3], photometric="rgb", tile=(16, 16)), _SAMPLES[..., :3]),
    "RGB, in planes": (dict(data=_SAMPLES[..., :3].transpose(2, 0, 1), photometric="rgb", planarconfig="separate"),
                       _SAMPLES[..., :3]),
    "RGBA": (dict(data=_SAMPLES, photometric="rgb", extrasamples=["unassalpha"]), _SAMPLES),
    "grey": (dict(data=_SAMPLES[..., 0], photometric="minisblack"), _SAMPLES[..., :1].repeat(3, axis=2)),
    "two pages": (dict(data=np.stack([_SAMPLES[..., :3], _SAMPLES[..., 1:]]), photometric="rgb"), _SAMPLES[..., :3]),
}


@pytest.mark.parametrize("layout", list(_TIFFS))
def test_a_16bit_tiff_decodes_deep_to_its_first_pages_own_samples(tmp_path, layout):
    arguments, expected = _TIFFS[layout]
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, **arguments)
    decoded = decode_photo(path, LIMIT).pixels
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, expected)


@pytest.mark.parametrize("layout", [dict(photometric="rgb", extrasamples=["assocalpha"]), dict(photometric="miniswhite")],
                         ids=["premultiplied alpha", "min-is-white"])
def test_a_16bit_tiff_laid_out_otherwise_is_read_in_8_bits_as_before(tmp_path, layout):
    data = _SAMPLES if "extrasamples" in layout else _SAMPLES[..., 0]
    path = tmp_path / "other.tif"
    tifffile.imwrite(path, data=data, **layout)
    decoded = decode_photo(path, LIMIT).pixels
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, decode_image(path, LIMIT))


def test_a_tiff_without_bits_per_sample_is_bilevel_as_the_tiff_specification_says(tmp_path):
    """The tag's default is 1: laid out by hand, a 16x2 picture of one bit per pixel, read by Pillow."""
    rows = bytes([0b10101010, 0b11110000]) * 2  # 16 pixels a row, two rows
    entries = [(256, 3, 1, 16), (257, 3, 1, 2), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1),
               (278, 3, 1, 2), (279, 4, 1, len(rows))]  # no 258, BitsPerSample
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    path = tmp_path / "bilevel.tif"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + len(rows)) + rows + ifd)
    decoded = decode_photo(path, LIMIT).pixels
    assert decoded.dtype == np.uint8 and decoded[..., 0].tolist() == [[255, 0] * 4 + [255] * 4 + [0] * 4] * 2


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_16bit_tiffs_orientation_is_applied_as_pillow_applies_it_to_its_8bit_reading(tmp_path, orientation):
    path = tmp_path / "turned.tif"
    tifffile.imwrite(path, data=_SAMPLES[:6, :10, :3], photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    decoded = decode_photo(path, LIMIT).pixels
    turned = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))  # Pillow keeps the high byte
    assert decoded.shape == turned.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))
    assert np.array_equal(decoded >> 8, turned)


def test_reduce_to_8bit_scales_65535_to_255_rounding_down():
    every = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(codec.reduce_to_8bit(every), (every.astype(np.int64) * 255 // 65535).astype(np.uint8))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_16bit_pngs_exif_orientation_is_applied_as_pillow_applies_it(tmp_path, orientation):
    """Pillow turns the 8-bit reading of the file; the deep one turns the same way, both bytes of each sample.
    The eXIf chunk comes after the pixels, where Pillow finds it only once it decodes them."""
    samples = np.random.default_rng(orientation).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.png"
    _write_16bit_png(path, samples, after=_chunk(b"eXIf", exif.tobytes()))
    decoded = decode_photo(path, LIMIT).pixels
    turned = []
    for byte in (samples >> 8, samples & 0xFF):  # each byte as an 8-bit PNG with the same EXIF, turned by Pillow
        Image.fromarray(byte.astype(np.uint8)).save(tmp_path / "byte.png", exif=exif)
        turned.append(np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "byte.png"))).astype(np.uint16))
    assert decoded.shape == turned[0].shape and np.array_equal(decoded, turned[0] << 8 | turned[1])


def test_a_16bit_pngs_orientation_in_imagemagicks_raw_exif_text_or_none_in_its_exif(tmp_path):
    from PIL import ExifTags, PngImagePlugin

    samples = np.random.default_rng(0).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    turned = Image.Exif()
    turned[ExifTags.Base.Orientation] = 6
    data = turned.tobytes()
    text = PngImagePlugin.PngInfo()  # as in test_a_png_whose_orientation_is_in_imagemagicks_raw_exif_text...
    text.add_text("Raw profile type exif", f"\nexif\n{len(data):8d}\n{data.hex()}\n", zip=True)
    raw = b"".join(_chunk(kind, body) for kind, body, *_ in text.chunks)
    _write_16bit_png(tmp_path / "raw.png", samples, before=raw)
    assert np.array_equal(decode_photo(tmp_path / "raw.png", LIMIT).pixels, np.rot90(samples, -1))
    unturned = Image.Exif()
    unturned[ExifTags.Base.Make] = "a camera that says nothing of orientation"
    _write_16bit_png(tmp_path / "plain.png", samples, after=_chunk(b"eXIf", unturned.tobytes()))
    assert np.array_equal(decode_photo(tmp_path / "plain.png", LIMIT).pixels, samples)


@pytest.mark.parametrize("depth", [8, 16])
def test_the_bytes_exif_in_a_pngs_pixel_data_are_no_exif_and_pillow_does_not_decode_it(tmp_path, depth):
    """Stored (level 0) deflate keeps the pixels' bytes as they are: rows of "eXIf" and "Raw profile type
    exif" inside IDAT. Only a chunk of that type (or text of that keyword) is EXIF; Pillow decoding the
    whole picture to look for it was a cost of its own."""
    row = (b"eXIf" + b"Raw profile type exif\0" + bytes(6)) * 2  # 64 bytes: 64 grey pixels, or 32 at 16 bits
    ihdr = struct.pack(">IIBBBBB", len(row) * 8 // depth, 4, depth, 0, 0, 0, 0)
    path = tmp_path / "chance.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress((b"\0" + row) * 4, 0))
                     + _chunk(b"IEND", b""))
    assert b"eXIf" in path.read_bytes()
    with mock.patch.object(ImageFile.ImageFile, "load", side_effect=AssertionError("Pillow decoded the pixels")):
        decoded = decode_photo(path, LIMIT).pixels
    samples = np.frombuffer(row, np.uint8 if depth == 8 else ">u2")
    assert decoded.shape == (4, len(samples), 3) and (decoded[..., 0] == samples).all()


@pytest.mark.parametrize("walked", [4, 64], ids=["past the chunks walked", "within them"])
def test_a_png_of_more_chunks_than_are_walked_is_taken_to_hold_exif_so_its_orientation_is_kept(tmp_path, monkeypatch,
                                                                                                walked):
    """Encoders may split the pixels into many IDATs, and an eXIf chunk may follow them. Past the chunks walked,
    the file is taken to hold EXIF and Pillow reads it: an orientation after them is still applied."""
    monkeypatch.setattr(codec, "_PNG_CHUNKS_WALKED", walked)
    photo = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    pixels = zlib.compress(b"".join(b"\0" + row.tobytes() for row in photo))
    idats = b"".join(_chunk(b"IDAT", pixels[start:start + 16]) for start in range(0, len(pixels), 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show it upright
    path = tmp_path / "split.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 12, 8, 2, 0, 0, 0)) + idats
                     + _chunk(b"eXIf", exif.tobytes()) + _chunk(b"IEND", b""))
    assert idats.count(b"IDAT") > 4
    assert np.array_equal(decode_photo(path, LIMIT).pixels, np.rot90(photo, -1))


def test_a_16bit_animated_png_is_read_in_8_bits_first_frame_as_pillow_reads_it(tmp_path):
    first, second = Image.new("I;16", (8, 6), 1000), Image.new("I;16", (8, 6), 40000)
    first.save(tmp_path / "anim.png", save_all=True, append_images=[second])
    decoded = decode_photo(tmp_path / "anim.png", LIMIT).pixels
    assert decoded.dtype == np.uint8 and (decoded == 1000 // 257).all()


@pytest.mark.parametrize("key", [(10,), (10, 20, 30)], ids=["grey", "RGB"])
def test_a_16bit_pngs_transparent_colour_key_is_left_out_as_an_8bit_pngs_is(tmp_path, key):
    samples = np.full((4, 5, len(key)), 1000, np.uint16)
    samples[0, 0] = key
    path = tmp_path / "keyed.png"
    _write_16bit_png(path, samples, before=_chunk(b"tRNS", struct.pack(f">{len(key)}H", *key)))
    assert np.array_equal(decode_photo(path, LIMIT).pixels, samples.repeat(3 // len(key), axis=2))
    assert decode_image(path, LIMIT).shape == (4, 5, 3)  # as test_png_colour_chunks_change_no_pixel shows for 8 bits


def test_a_damaged_16bit_png_is_reported_as_damaged_when_read_deep(tmp_path):
    path = tmp_path / "deep.png"
    _write_16bit_png(path, np.random.default_rng(0).integers(0, 65536, (40, 30, 3), dtype=np.uint16))
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)  # the zlib stream broken, the chunk's length intact
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="^image could not be decoded .*damaged"):
        decode_photo(path, LIMIT).pixels


@pytest.mark.parametrize("options", [{"quality": 80}, {"lossless": True}], ids=["lossy", "lossless"])
@pytest.mark.parametrize("transparent", [False, True])
def test_webp_decodes_exactly_as_pillow_decodes_it(tmp_path, options, transparent):
    photo = Image.open(make_photo(tmp_path / "p.png")).convert("RGBA")
    if transparent:
        photo.putalpha(Image.linear_gradient("L").resize(photo.size))
    path = tmp_path / "p.webp"
    photo.save(path, **options)
    with _spy("webp_decode") as libwebp:
        decoded = decode_image(path, LIMIT)
    assert libwebp.call_count == 1
    with Image.open(path) as image:
        assert image.mode == ("RGBA" if transparent else "RGB")
        assert np.array_equal(decoded, np.asarray(image))


def test_truncated_webp_is_reported_as_damaged(tmp_path):
    path = tmp_path / "p.webp"
    Image.open(make_photo(tmp_path / "p.png")).save(path, quality=80)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="^image could not be (decoded|read)"):
        decode_image(path, LIMIT)


def test_multi_picture_jpeg_decodes_its_first_picture_as_pillow_does(tmp_path):
    rng = np.random.default_rng(4)
    first, second = (Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((60, 80, 3), (30, 40, 3)))
    path = tmp_path / "camera.jpg"
    first.save(path, "MPO", save_all=True, append_images=[second])
    with _spy("jpeg8_decode") as libjpeg:
        decoded = decode_image(path, LIMIT)
    assert libjpeg.call_count == 1
    assert np.array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))


def test_png_with_damaged_pixel_data_is_reported_as_damaged(tmp_path):
    data = bytearray(make_photo(tmp_path / "p.png").read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)  # zlib stream broken, chunk length intact
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as error:
        decode_image(path, LIMIT)
    assert str(error.value) == ("image could not be decoded (broken data stream when reading image file); the file may "
                                "be truncated or damaged, upload it again")


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), color) for color in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    decoded = decode_image(path, LIMIT)
    assert decoded[5, 5, 0] > 200


def test_mask_is_reduced_to_grey_and_resized_with_nearest_neighbour(tmp_path, caplog):
    mask = Image.new("RGB", (10, 10), (0, 0, 0))
    mask.paste((200, 200, 200), (0, 0, 5, 10))  # light grey: over 50%
    mask.paste((100, 100, 100), (5, 0, 10, 10))  # dark grey: under 50%
    path = tmp_path / "m.png"
    mask.save(path)
    with caplog.at_level("INFO"):
        decoded = fit_mask(decode_mask(path, LIMIT), (20, 20))
    assert decoded.dtype == np.uint8 and decoded.shape == (20, 20)
    assert decoded[2, 2] >= 128 > decoded[2, 18]
    assert "resizing the mask" in caplog.text


def test_transparent_mask_pixels_mean_keep(tmp_path):
    mask = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 5, 10))
    path = tmp_path / "m.png"
    mask.save(path)
    decoded = decode_mask(path, LIMIT)
    assert decoded[:, :5].min() == 255 and decoded[:, 5:].max() == 0


def test_palette_with_transparency_keeps_its_alpha(tmp_path):
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 5, 10))
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    decoded = decode_image(path, LIMIT)
    assert decoded.shape == (10, 10, 4)
    assert decoded[1, 1, 3] == 0 and tuple(decoded[1, 8]) == (255, 0, 0, 255)
    assert tuple(flatten(decoded)[1, 1]) == (255, 255, 255) and tuple(flatten(decoded)[1, 8]) == (255, 0, 0)


def test_flatten_lays_partial_transparency_onto_white_as_pillow_does():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    white = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba)).convert("RGB")).astype(int)
    assert np.abs(flatten(rgba).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_round_trips_exactly_with_alpha(tmp_path, mode):
    image = np.asarray(Image.open(make_photo(tmp_path / "p.png")).convert(mode))
    path = encode_image(image, tmp_path / "out", "png", 90)
    assert path.suffix == ".png"
    assert np.array_equal(np.asarray(Image.open(path)), image)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([3, 4]), st.sampled_from([1, 2, 5, 256]), st.integers(0, 2**16),
       st.sampled_from([np.uint8, np.uint16]))
def test_png_strips_make_one_valid_stream_of_the_same_pixels(width, height, channels, strip_rows, seed, dtype):
    """Strips deflated apart and chained by sync flushes: every chunk's CRC, the one zlib stream with
    its Adler-32, and the pixels as Pillow (which reads 16 bits as their high byte) and libpng read them back."""
    pixels = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, (height, width, channels), dtype=dtype)
    pixels[: height // 2] //= 64  # some runs to compress, some noise
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(3) as pool:
        data = encode_image(pixels, Path(folder) / "out", "png", 90, pool.map, strip_rows).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, kinds, stream = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        assert struct.unpack(">I", data[position + 8 + length : position + 12 + length])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        stream += body if kind == b"IDAT" else b""
        position += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    assert kinds.count(b"IDAT") == -(-height // strip_rows)
    assert data[24] == 8 * pixels.itemsize  # IHDR's bit depth
    assert len(zlib.decompress(stream)) == height * (1 + width * channels * pixels.itemsize)  # zlib checks the Adler-32
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels >> 8 if dtype == np.uint16 else pixels)
    assert np.array_equal(imagecodecs.png_decode(data), pixels)


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_a_16bit_output_in_an_8bit_format_is_written_from_its_8bit_reduction(tmp_path, fmt):
    pixels = np.random.default_rng(0).integers(0, 65536, (20, 30, 4), dtype=np.uint16)
    deep = encode_image(pixels, tmp_path / "deep", fmt, 90).read_bytes()
    assert deep == encode_image(codec.reduce_to_8bit(pixels), tmp_path / "shallow", fmt, 90).read_bytes()


def test_adler32_of_two_parts_is_the_adler32_of_the_whole():
    rng = np.random.default_rng(0)
    for first, second in ((b"", b"abc"), (b"abc", b""), (rng.bytes(70000), rng.bytes(123457)), (b"\xff" * 5553, b"\x00" * 65521)):
        combined = codec._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
        assert combined == zlib.adler32(first + second)


def test_webp_keeps_alpha_and_jpg_drops_it(tmp_path):
    image = Image.open(make_photo(tmp_path / "p.png")).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    image = np.asarray(image)
    webp = encode_image(image, tmp_path / "out", "webp", 80)
    jpg = encode_image(image, tmp_path / "out", "jpg", 80)
    assert (webp.suffix, Image.open(webp).format, Image.open(webp).mode) == (".webp", "WEBP", "RGBA")
    assert (jpg.suffix, Image.open(jpg).format, Image.open(jpg).mode) == (".jpg", "JPEG", "RGB")
    assert jpg.stat().st_size < encode_image(image, tmp_path / "hq", "jpg", 100).stat().st_size


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_output_quality_is_what_pillow_writes_at_that_quality(tmp_path, fmt):
    """The lossy outputs are Pillow's own encoding at the quality asked for: the same bytes."""
    pixels = np.asarray(Image.open(make_photo(tmp_path / "p.png")).convert("RGB"))
    for quality in (20, 90):
        path = encode_image(pixels, tmp_path / f"out-{quality}", fmt, quality)
        expected = io.BytesIO()
        Image.fromarray(pixels).save(expected, "WEBP" if fmt == "webp" else "JPEG", quality=quality)  # Pillow's defaults
        assert path.read_bytes() == expected.getvalue()
    assert (tmp_path / "out-20").with_suffix(f".{fmt}").read_bytes() != (tmp_path / "out-90").with_suffix(f".{fmt}").read_bytes()


def _tiff_with_associated_alpha(image: Image.Image, path: Path) -> Path:
    """`image` (LA or RGBA) as a TIFF whose alpha is marked premultiplied (ExtraSamples = 1, "associated
    alpha", TIFF 6.0 section 18), as some scanners and compositing tools write it; Pillow writes 2."""
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    data = buffer.getvalue()
    entry = data.index(struct.pack("<HHI", 338, 3, 1))  # the ExtraSamples tag, SHORT, one value
    path.write_bytes(data[: entry + 8] + struct.pack("<H", 1) + data[entry + 10 :])
    return path


def test_a_tiff_of_premultiplied_grey_and_alpha_decodes_unpremultiplied(tmp_path):
    path = _tiff_with_associated_alpha(Image.new("LA", (6, 4), (64, 128)), tmp_path / "scan.tiff")
    assert Image.open(path).mode == "La"  # which Pillow converts to "LA" alone
    grey = 64 * 255 / 128  # premultiplied 64 at alpha 128
    photo = decode_image(path, LIMIT)
    assert photo.shape == (4, 6, 4) and np.all(np.abs(photo[..., :3].astype(int) - grey) <= 1) and np.all(photo[..., 3] == 128)
    assert np.array_equal(decode_mask(path, LIMIT), np.zeros((4, 6), np.uint8) + round(grey * 128 / 255))  # onto black


def test_a_cielab_tiff_decodes_to_the_srgb_of_littlecms_and_as_a_mask_to_its_luminance(tmp_path):
    from PIL import ImageCms

    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    photo = Image.open(make_photo(tmp_path / "p.png"))
    path = tmp_path / "lab.tiff"
    ImageCms.applyTransform(photo, ImageCms.buildTransform(srgb, lab, "RGB", "LAB")).save(path)
    assert Image.open(path).mode == "LAB"
    expected = np.asarray(ImageCms.applyTransform(Image.open(path), ImageCms.buildTransform(lab, srgb, "LAB", "RGB")))
    decoded = decode_image(path, LIMIT)
    assert np.abs(decoded.astype(int) - expected).max() <= 1
    assert np.abs(np.abs(decoded.astype(int) - np.asarray(photo)).mean()) < 2  # the photo, after a round trip
    assert np.array_equal(decode_mask(path, LIMIT), np.asarray(Image.fromarray(decoded).convert("L")))


def test_a_palette_tiff_with_alpha_keeps_it(tmp_path):
    image = Image.new("PA", (4, 3))
    image.putpalette([10, 20, 30] * 256)
    image.putpixel((0, 0), (0, 100))
    image.save(tmp_path / "pa.tiff")
    decoded = decode_image(tmp_path / "pa.tiff", LIMIT)
    assert decoded.shape == (3, 4, 4) and tuple(decoded[0, 0]) == (10, 20, 30, 100) and decoded[1, 1, 3] == 0


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16B", [0, 65535, 257, 32768], [0, 255, 1, 127]),  # big-endian 16-bit: value * 255 // 65535
    ("I;16", [0, 255, 128, 1], [0, 0, 0, 0]),  # a dark 16-bit picture is still 16-bit
    ("I", [0, 255, 128, -5], [0, 255, 128, 0]),  # 32-bit holding 8-bit values: as they are, negatives at 0
    ("I", [0, 256, 65535, 70000], [0, 0, 255, 255]),  # over 255: a 16-bit range, clipped above it
    ("I", [0, 256, 128, 1], [0, 0, 0, 0]),
    ("F", [0.0, 0.5, 1.0, 0.25], [0, 128, 255, 64]),  # float in 0..1
    ("F", [0.0, 1.5, 0.5, 1.0], [0, 2, 0, 1]),  # over 1: float in 0..255 (numpy rounds half to even)
    ("F", [-3.0, 2.0, 127.5, 300.0], [0, 2, 128, 255]),  # clipped to 0..255
])
def test_grey_of_more_than_8_bits_is_scaled_to_8_bits(tmp_path, mode, values, expected):
    if mode.startswith("I;16"):
        image = Image.new(mode, (2, 2))
        for index, value in enumerate(values):
            image.putpixel((index % 2, index // 2), value)
    else:
        image = Image.fromarray(np.array(values, dtype=np.float32 if mode == "F" else np.int32).reshape(2, 2), mode)
    image.save(tmp_path / "grey.tiff")
    assert Image.open(tmp_path / "grey.tiff").mode == mode
    decoded = decode_image(tmp_path / "grey.tiff", LIMIT)
    assert decoded.shape == (2, 2, 3) and decoded[..., 0].ravel().tolist() == expected
    assert decode_mask(tmp_path / "grey.tiff", LIMIT).ravel().tolist() == expected


def test_a_resized_mask_takes_each_pixel_from_its_nearest_source_pixel(tmp_path):
    """Nearest neighbour as Pillow defines it: output pixel x samples source pixel floor((x + 0.5) * w / W),
    so a mask of one-pixel stripes keeps exactly its own values, with no grey in between."""
    mask = (np.indices((7, 9)).sum(axis=0) % 2 * 255).astype(np.uint8)  # a checkerboard, 9x7
    resized = fit_mask(mask, (20, 11))
    rows = ((np.arange(11) + 0.5) * 7 / 11).astype(int)
    columns = ((np.arange(20) + 0.5) * 9 / 20).astype(int)
    assert np.array_equal(resized, mask[rows][:, columns])


@pytest.mark.parametrize("fmt, mode", [("PNG", "L"), ("PNG", "LA"), ("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "L"),
                                       ("JPEG", "RGB"), ("MPO", "RGB"), ("WEBP", "RGB"), ("WEBP", "RGBA")])
def test_the_fast_formats_are_decoded_by_imagecodecs_and_never_by_pillow(tmp_path, fmt, mode):
    path = tmp_path / "photo"
    photo = Image.open(make_photo(tmp_path / "p.png")).convert(mode)
    photo.save(path, fmt, **({"save_all": True, "append_images": [photo]} if fmt == "MPO" else {}))
    with mock.patch.object(ImageFile.ImageFile, "load", side_effect=AssertionError("Pillow decoded the pixels")):
        decoded = decode_image(path, LIMIT)
    assert decoded.shape[:2] == (120, 200)


@pytest.mark.parametrize("chunk", ["tEXt", "zTXt", "iTXt"])
def test_a_png_whose_orientation_is_in_imagemagicks_raw_exif_text_is_turned_upright(tmp_path, chunk):
    """In any of the PNG specification's three text chunks: plain, compressed or international."""
    from PIL import ExifTags, PngImagePlugin

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = exif.tobytes()
    info = PngImagePlugin.PngInfo()  # ImageMagick's "Raw profile type exif": a header, the length, then hex
    text = f"\nexif\n{len(data):8d}\n{data.hex()}\n"
    if chunk == "iTXt":
        info.add_itxt("Raw profile type exif", text)
    else:
        info.add_text("Raw profile type exif", text, zip=chunk == "zTXt")
    assert [kind for kind, *_ in info.chunks] == [chunk.encode()]
    path = tmp_path / "phone.png"
    Image.open(make_photo(tmp_path / "p.png")).save(path, pnginfo=info)
    decoded = decode_image(path, LIMIT)
    assert decoded.shape == (200, 120, 3)
    assert np.array_equal(decoded, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))


def test_a_file_pillow_cannot_identify_gets_pillows_reason_and_no_path_even_a_quoted_one(tmp_path):
    path = tmp_path / "cat's photo.png"  # Pillow quotes this path with double quotes
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError) as error:
        decode_image(path, LIMIT)
    assert str(error.value) == ("image could not be read as an image (cannot identify image file); "
                                "upload a PNG, JPEG, WebP, GIF or TIFF file")


@pytest.mark.parametrize("size, limits, message", [
    ((64, 64), InputLimits(max_pixels=64 * 64 - 1), "image is 64x64 = 4,096 pixels, over the limit of 4,095 "
                                                    "(INPAINT_MAX_INPUT_PIXELS); upload a smaller image"),
    ((64, 64), InputLimits(max_side=63), "image is 64x64, a side over the limit of 63 pixels (INPAINT_MAX_INPUT_SIDE); "
                                         "upload a smaller image"),
    ((64, 8), InputLimits(max_aspect=7.5), "image is 64x8, longer than 7.5:1 (INPAINT_MAX_INPUT_ASPECT); crop it "
                                           "closer to the region to repaint"),
    ((64, 64), InputLimits(max_pixels=64 * 64, max_side=64), None),  # each limit holds at its value
    ((64, 8), InputLimits(max_aspect=8), None),
    ((1, 1), LIMIT, None),  # a single pixel is an image
])
def test_each_size_limit_holds_at_its_value_and_one_past_it_names_the_setting_and_the_remedy(tmp_path, size, limits,
                                                                                              message):
    Image.new("RGB", size).save(tmp_path / "p.png")
    if message is None:
        assert decode_image(tmp_path / "p.png", limits).shape == (size[1], size[0], 3)
        return
    with pytest.raises(ValueError) as error:
        decode_image(tmp_path / "p.png", limits)
    assert str(error.value) == message


@pytest.mark.parametrize("margins, limits, message", [
    ((10, 5, 10, 0), InputLimits(max_pixels=83 * 53), "the photo (64x48) with outpaint_left, outpaint_up, outpaint_right "
     "and outpaint_down (10, 5, 10, 0) makes a canvas of 84x53 = 4,452 pixels, over the limit of 4,399 "
     "(INPAINT_MAX_INPUT_PIXELS); lower the outpaint margins or send a smaller photo"),
    ((0, 7, 0, 30), InputLimits(max_side=84), "the photo (64x48) with outpaint_left, outpaint_up, outpaint_right and "
     "outpaint_down (0, 7, 0, 30) makes a canvas of 64x85, a side over the limit of 84 pixels (INPAINT_MAX_INPUT_SIDE); "
     "lower the outpaint margins or send a smaller photo"),
    ((100, 0, 100, 0), InputLimits(max_aspect=4), "the photo (64x48) with outpaint_left, outpaint_up, outpaint_right and "
     "outpaint_down (100, 0, 100, 0) makes a canvas of 264x48, longer than 4:1 (INPAINT_MAX_INPUT_ASPECT); lower the "
     "margins along its long side, or add some across it"),
])
def test_an_outpainting_canvas_over_a_limit_names_the_margins_and_the_remedy(margins, limits, message):
    with pytest.raises(ValueError) as error:
        codec.check_canvas((64, 48), margins, limits)
    assert str(error.value) == message
    codec.check_canvas((64, 48), (0, 0, 0, 0), limits)


def test_an_upload_of_exactly_the_byte_limit_is_read_and_one_byte_more_is_not(tmp_path):
    path = make_photo(tmp_path / "p.png")
    size = path.stat().st_size
    assert decode_image(path, InputLimits(max_bytes=size)).shape == (120, 200, 3)
    with pytest.raises(ValueError) as error:
        decode_image(path, InputLimits(max_bytes=size - 1))
    assert str(error.value) == (f"image is a file of {size:,} bytes, over the limit of {size - 1:,} "
                                "(INPAINT_MAX_UPLOAD_BYTES); upload a smaller or compressed image")


def test_a_progressive_jpeg_or_multi_picture_file_at_the_scan_limit_is_read_and_over_it_is_not(tmp_path):
    photo = Image.open(make_photo(tmp_path / "p.png"))
    for fmt, options in (("JPEG", {}), ("MPO", {"save_all": True, "append_images": [photo]})):
        path = tmp_path / f"progressive.{fmt.lower()}"
        photo.save(path, fmt, progressive=True, **options)
        assert Image.open(path).format == fmt
        scans = path.read_bytes().count(b"\xff\xda")  # one SOS marker per scan (ITU T.81, B.2.3)
        assert decode_image(path, InputLimits(max_jpeg_scans=scans)).shape == (120, 200, 3)
        with pytest.raises(ValueError) as error:
            decode_image(path, InputLimits(max_jpeg_scans=scans - 1))
        assert str(error.value) == (f"image is a JPEG of {scans} scans, over the limit of {scans - 1} "
                                    "(INPAINT_MAX_JPEG_SCANS); save it again as a baseline JPEG or a PNG")


def test_an_unknown_output_format_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError) as error:
        encode_image(np.zeros((2, 2, 3), np.uint8), tmp_path / "out", "gif", 90)
    assert str(error.value) == "output_format must be one of png, webp, jpg, got 'gif'"


def test_a_png_output_ends_with_the_one_iend_chunk_the_png_spec_allows(tmp_path):
    path = encode_image(np.zeros((3, 2, 4), np.uint8), tmp_path / "out", "png", 90)
    assert path.read_bytes().endswith(b"\x00\x00\x00\x00IEND\xaeB`\x82")  # empty data, its CRC-32 (PNG 11.2.5)


def _profile(space: str) -> bytes:
    """An ICC profile as LittleCMS (Pillow's ImageCms) writes it: "sRGB" is for RGB data, "LAB" for Lab."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_a_photos_rgb_colour_profile_is_read_for_its_outputs_and_its_pixels_are_left_as_they_are(tmp_path, fmt):
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.open(make_photo(tmp_path / "p.png")).save(path, fmt, icc_profile=_profile("sRGB"))
    photo = decode_photo(path, LIMIT)
    assert photo.icc_profile == _profile("sRGB")
    assert np.array_equal(photo.pixels, _pillow_pixels(path))  # no colour conversion
    assert decode_photo(make_photo(tmp_path / "plain.png"), LIMIT).icc_profile is None


def test_a_16bit_pngs_colour_profile_is_read_too(tmp_path):
    path = tmp_path / "deep.png"
    profile = _profile("sRGB")
    _write_16bit_png(path, np.zeros((4, 4, 3), np.uint16),
                     before=_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(profile)))
    photo = decode_photo(path, LIMIT)
    assert photo.pixels.dtype == np.uint16 and photo.icc_profile == profile


def test_a_colour_profile_the_rgb_outputs_cannot_carry_is_left_out_and_logged(tmp_path, caplog):
    lab = tmp_path / "lab.jpg"  # a Lab profile on a JPEG: its pixels are read as RGB
    Image.open(make_photo(tmp_path / "p.png")).save(lab, icc_profile=_profile("LAB"))
    large = tmp_path / "large.jpg"  # an RGB profile one byte over the cap (JPEG carries up to 16 MB of it)
    padded = _profile("sRGB") + bytes(codec.MAX_PROFILE_BYTES + 1 - len(_profile("sRGB")))
    Image.open(make_photo(tmp_path / "p.png")).save(large, icc_profile=padded)
    junk = tmp_path / "junk.jpg"  # a profile too short to say
    Image.open(make_photo(tmp_path / "p.png")).save(junk, icc_profile=b"RGB " * 4)
    with caplog.at_level("INFO", logger="inpaint.codec"):
        assert decode_photo(lab, LIMIT).icc_profile is None
        assert decode_photo(junk, LIMIT).icc_profile is None
        assert decode_photo(large, LIMIT).icc_profile is None
    assert caplog.messages == [
        "image's ICC colour profile is for 'Lab' data, not RGB: the outputs carry none",
        "image's ICC colour profile is for '' data, not RGB: the outputs carry none",
        f"image's ICC colour profile is {codec.MAX_PROFILE_BYTES + 1:,} bytes, over {codec.MAX_PROFILE_BYTES:,}: "
        "the outputs carry none",
    ]
    exactly = tmp_path / "exactly.jpg"
    Image.open(make_photo(tmp_path / "p.png")).save(exactly, icc_profile=padded[:-1])
    assert decode_photo(exactly, LIMIT).icc_profile == padded[:-1]


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_an_output_carries_the_photos_colour_profile_as_pillow_and_littlecms_read_it(tmp_path, fmt, dtype):
    pixels = np.random.default_rng(0).integers(0, np.iinfo(dtype).max + 1, (20, 30, 4), dtype=dtype)
    path = encode_image(pixels, tmp_path / "out", fmt, 90, icc_profile=_profile("sRGB"))
    with Image.open(path) as image:
        assert image.info["icc_profile"] == _profile("sRGB")
        assert ImageCms.getProfileName(ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))).strip() == "sRGB built-in"
    if fmt == "png":
        assert np.array_equal(imagecodecs.png_decode(path.read_bytes()), pixels)  # libpng takes the chunk too
    without = encode_image(pixels, tmp_path / "plain", fmt, 90)
    assert "icc_profile" not in Image.open(without).info
