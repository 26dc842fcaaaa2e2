"""Files crafted to hurt, built here byte by byte: each is refused from its header or its size, fast
and in bounded memory, with a message that names the input and the cap."""

from __future__ import annotations

import io
import json
import random
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageCms, PngImagePlugin

from inpaint.codec import InputLimits, decode_image, decode_mask, decode_photo
from inpaint.inputs import PROMPT_MAX_CHARS, check_inputs

ROOT = Path(__file__).resolve().parent.parent


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _chunk_positions(png: bytes, kind: bytes | None) -> list[int]:
    """Where each chunk of `kind` (None: of any kind) starts, as the PNG specification lays chunks out."""
    positions, position = [], 8
    while position + 8 <= len(png):
        length = struct.unpack(">I", png[position:position + 4])[0]
        if kind is None or png[position + 4:position + 8] == kind:
            positions.append(position)
        position += 12 + length
    return positions


def png_strip(width: int, height: int) -> bytes:
    """A complete, valid grey PNG of width x height, every pixel black: rows of zeros deflate to almost nothing."""
    raw = zlib.compressobj(9)
    row = b"\0" * (1 + width)  # filter byte + pixels
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + _chunk(
        b"IDAT", body
    ) + _chunk(b"IEND", b"")


def jpeg_scan_bomb(side: int = 4096, repeats: int = 20_000) -> bytes:
    """A progressive JPEG whose last scan is repeated `repeats` times before the end marker: each
    repeat makes the decoder run over the whole picture again."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    scan = data[last_scan:-2]  # the last SOS segment and its entropy-coded data, without EOI
    return data[:-2] + scan * repeats + b"\xff\xd9"


def png_metadata_bomb(kind: bytes = b"zTXt", after_pixels: bool = False, inflated: int = 200 << 20, bits: int = 8) -> bytes:
    """A valid 64x64 PNG (grey, or grey and alpha at 16 bits) with one compressed metadata chunk (zTXt, iTXt or
    iCCP, as the PNG specification lays each out) that inflates to `inflated` bytes of zeros, before or after
    the pixels."""
    packed = zlib.compress(b"\0" * inflated, 9)
    body = {b"zTXt": b"Comment\0\0", b"iTXt": b"XML:com.adobe.xmp\0\1\0\0\0", b"iCCP": b"icc\0\0"}[kind] + packed
    colour, channels = (0, 1) if bits == 8 else (4, 2)
    rows = zlib.compress((b"\0" + b"\0" * (64 * channels * bits // 8)) * 64)
    chunks = [_chunk(b"IDAT", rows), _chunk(kind, body)] if after_pixels else [_chunk(kind, body), _chunk(b"IDAT", rows)]
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, bits, colour, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + _chunk(b"IEND", b"")


def jpeg_exif_tag_flood() -> bytes:
    """A valid 64x64 JPEG whose Exif segment (APP1, at most 64 KiB) is one IFD of as many entries as fit, each
    claiming more data than the file holds: Pillow skips each with a warning that names the tag."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(buffer, "JPEG")
    count = (65_533 - 6 - 8 - 2 - 4) // 12
    entries = b"".join(struct.pack("<HHII", 0x9000 + index, 7, 65_000, 8) for index in range(count))  # UNDEFINED
    segment = b"Exif\0\0" + b"II*\0" + struct.pack("<IH", 8, count) + entries + struct.pack("<I", 0)
    jpeg = buffer.getvalue()
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


def png_chunk_flood(chunks: int, where: str = "before", mode: str = "L") -> bytes:
    """A valid 64x64 PNG (Pillow's, in `mode`) of `chunks` chunks before its IEND: its own (IHDR, PLTE for a
    palette, one IDAT) and empty ones of a private type `where` = "before" or "after" the pixels; or, `where` =
    "idat", its compressed pixels split over as many IDATs as make up the count, nearly all empty."""
    buffer = io.BytesIO()
    Image.new(mode, (64, 64), 3).save(buffer, "PNG")
    png = buffer.getvalue()
    (start,) = _chunk_positions(png, b"IDAT")
    length = struct.unpack(">I", png[start:start + 4])[0]
    head, rows, tail = png[:start], png[start + 8:start + 8 + length], png[start + 12 + length:]
    own = len(_chunk_positions(head, None))  # IHDR, and PLTE for a palette
    assert tail == _chunk(b"IEND", b"") and length < 1024
    if where == "idat":
        pieces = [rows[:5]] + [b""] * (chunks - own - 2) + [rows[5:]]
        return head + b"".join(_chunk(b"IDAT", piece) for piece in pieces) + tail
    flood = _chunk(b"prVt", b"") * (chunks - own - 1)
    idat = _chunk(b"IDAT", rows)
    return head + (flood + idat if where == "before" else idat + flood) + tail


def jpeg_segment_flood(comments: int, fill: int = 0, stray: int = 0, bare: bytes = b"", bares: int = 0) -> bytes:
    """A valid 64x64 JPEG with `comments` empty comment segments (FF FE, its length counting itself), `fill`
    fill bytes (FF, allowed before any marker), `stray` zero bytes (extraneous data, which decoders skip) and
    `bares` markers `bare` without parameters (RSTn, TEM) after its first segment (JFIF's APP0)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    assert jpeg[2:4] == b"\xff\xe0"
    after = 4 + int.from_bytes(jpeg[4:6], "big")
    flood = b"\0" * stray + b"\xff" * fill + b"\xff\xfe\x00\x02" * comments + bare * bares
    return jpeg[:after] + flood + jpeg[after:]


def gif_extension_flood(*blocks: int, version: bytes = b"87a", table: str = "global") -> bytes:
    """A valid 64x64 GIF (of 256 colours) with a comment extension of each count of one-byte data sub-blocks in
    `blocks` before its image; its colour table `table` = "global", or "local" to the image (none global)."""
    image = Image.new("P", (64, 64))
    image.putpalette(bytes(range(256)) * 3)
    image.putdata([index % 256 for index in range(64 * 64)])
    buffer = io.BytesIO()
    image.save(buffer, "GIF", optimize=False)
    gif = buffer.getvalue()
    flags = gif[10]
    assert flags & 0x80 and flags & 7 == 7  # a global table of 256 colours
    start = 13 + 768
    assert gif[start:start + 1] == b","  # Pillow's GIF has no extension before its image
    descriptor, rest = gif[start:start + 10], gif[start + 10:]
    if table == "local":  # the table moved after the image's descriptor, its flag and size there
        descriptor = descriptor[:9] + bytes([descriptor[9] | 0x80 | 7])
        rest = gif[13:start] + rest
        gif = gif[:10] + bytes([flags & 0x7F]) + gif[11:13]  # (the size bits kept: decoders read them only with the flag)
        start = 13
    extensions = b"".join(b"\x21\xfe" + b"\x01x" * count + b"\0" for count in blocks)
    return b"GIF" + version + gif[6:start] + extensions + descriptor + rest


def bigtiff_tag_flood(tags: int) -> bytes:
    """A valid 64x64 grey little-endian BigTIFF (version 43, 8-byte offsets, as the BigTIFF design lays it out)
    whose one directory holds `tags` entries: the nine an image needs, then a private tag repeated."""
    side, pixels, order = 64, bytes(64 * 64), "<"

    def entry(tag: int, kind: int, value: int) -> bytes:  # one SHORT (3) or LONG8 (16), in the entry itself
        return struct.pack(order + "HHQ", tag, kind, 1) + struct.pack(order + ("H" if kind == 3 else "Q"), value).ljust(8, b"\0")

    needed = [entry(256, 3, side), entry(257, 3, side), entry(258, 3, 8), entry(259, 3, 1), entry(262, 3, 1),
              entry(273, 16, 16), entry(277, 3, 1), entry(278, 3, side), entry(279, 16, len(pixels))]
    directory = struct.pack(order + "Q", tags) + b"".join(needed) + entry(65_000, 3, 0) * (tags - len(needed))
    return b"II" + struct.pack(order + "HHHQ", 43, 8, 0, 16 + len(pixels)) + pixels + directory + struct.pack(order + "Q", 0)


def tiff_strip_flood(strips: int, version: int = 42, order: str = "<", byte_counts: int | None = None) -> bytes:
    """A valid 64x64 grey TIFF (classic, version 42, or BigTIFF, 43, in either byte order, as TIFF 6.0 and the
    BigTIFF design lay them out) in strips of one row, whose directory lists `strips` strips: the 64 the image
    has, then the last row again; and as many strip sizes, or `byte_counts`."""
    side, big = 64, version == 43
    long_kind, long_format = (16, "Q") if big else (4, "I")
    start = 16 if big else 8
    pixels = bytes(range(side)) * side
    offsets = [start + row * side for row in range(side)] + [start + (side - 1) * side] * (strips - side)
    counts = strips if byte_counts is None else byte_counts
    arrays = struct.pack(f"{order}{strips}{long_format}", *offsets) + struct.pack(f"{order}{counts}{long_format}", *[side] * counts)
    arrays_at = start + len(pixels)

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:  # the value in the entry, or where it is
        inline = struct.pack(order + ("H" if kind == 3 else long_format), value)
        return struct.pack(order + ("HHQ" if big else "HHI"), tag, kind, count) + inline.ljust(8 if big else 4, b"\0")

    entries = [entry(256, 3, 1, side), entry(257, 3, 1, side), entry(258, 3, 1, 8), entry(259, 3, 1, 1),
               entry(262, 3, 1, 1), entry(273, long_kind, strips, arrays_at), entry(277, 3, 1, 1), entry(278, 3, 1, 1),
               entry(279, long_kind, counts, arrays_at + strips * struct.calcsize(long_format))]
    directory = struct.pack(order + ("Q" if big else "H"), len(entries)) + b"".join(entries) + struct.pack(order + long_format, 0)
    directory_at = arrays_at + len(arrays)
    header = (b"II" if order == "<" else b"MM") + (struct.pack(order + "HHHQ", 43, 8, 0, directory_at) if big
                                                   else struct.pack(order + "HI", 42, directory_at))
    return header + pixels + arrays + directory


def ico_bomb(side: int = 13_000) -> bytes:
    """An ICO whose one entry is a PNG of side x side: Pillow's ICO plugin decodes it whole, before
    any size check, since the ICO directory says 256x256 (0)."""
    png = png_strip(side, side)
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def _refused_fast_in_bounded_memory(path: Path, decoder: str = "decode_image") -> tuple[str, float, int]:
    """(error message or None, seconds, growth of the peak resident memory in MB) of decoding `path` in a
    fresh process, after the imports."""
    code = f"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from inpaint.codec import InputLimits, {decoder} as decode
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    decode(Path({str(path)!r}), InputLimits())
    message = None
except ValueError as error:
    message = str(error)
seconds = time.perf_counter() - started
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print(json.dumps([message, seconds, grown]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return tuple(json.loads(result.stdout.splitlines()[-1]))


def test_a_sixteen_megapixel_strip_one_pixel_tall_is_refused_from_its_header(tmp_path):
    """Within the pixel limit, but its resize would take gigabytes (113 s and +5 GB before the cap)."""
    path = tmp_path / "strip.png"
    path.write_bytes(png_strip(16_777_216, 1))
    assert path.stat().st_size < 100_000
    message, seconds, grown = _refused_fast_in_bounded_memory(path)
    assert message == (
        "image is 16777216x1, a side over the limit of 8,192 pixels (INPAINT_MAX_INPUT_SIDE); upload a smaller image"
    )
    assert seconds < 1 and grown < 50


def test_a_strip_within_the_side_limit_is_refused_for_its_shape(tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(png_strip(8192, 64))
    with pytest.raises(ValueError, match=r"^mask is 8192x64, longer than 16:1 \(INPAINT_MAX_INPUT_ASPECT\)"):
        decode_mask(path, InputLimits())
    decode_mask(path, InputLimits(max_aspect=128))  # a setting: a deployment may allow it


def test_a_jpeg_scan_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(jpeg_scan_bomb())
    assert path.stat().st_size < 2_000_000
    with Image.open(path) as image:
        assert image.size == (4096, 4096)  # a well-formed header: only the scans count gives it away
    message, seconds, grown = _refused_fast_in_bounded_memory(path)
    assert message.startswith("image is a JPEG of 20,") and "scans, over the limit of 64 (INPAINT_MAX_JPEG_SCANS)" in message
    assert seconds < 1 and grown < 50


def test_an_ordinary_progressive_jpeg_still_decodes(tmp_path):
    path = tmp_path / "progressive.jpg"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path, "JPEG", progressive=True)
    assert decode_image(path, InputLimits()).shape == (200, 300, 3)


BLOCKS_REFUSED = ("{} holds over 65,536 blocks (a PNG's chunks, a JPEG's segments, a GIF's extension blocks, a TIFF's "
                  "tags and strips or tiles), where a photo has far fewer; save it again as PNG or JPEG without its metadata")


@pytest.mark.parametrize("flood, suffix", [(lambda: png_chunk_flood(2_000_000), "png"),
                                           (lambda: png_chunk_flood(2_000_000, "after", "P"), "png"),
                                           (lambda: png_chunk_flood(2_000_000, "idat", "P"), "png"),
                                           (lambda: jpeg_segment_flood(5_000_000), "jpg"),
                                           (lambda: jpeg_segment_flood(0, fill=20_000_000), "jpg"),
                                           (lambda: gif_extension_flood(10_000_000), "gif"),
                                           (lambda: bigtiff_tag_flood(2_000_000), "tif"),
                                           (lambda: tiff_strip_flood(1_000_000), "tif"),
                                           (lambda: tiff_strip_flood(1_000_000, 43), "tif")],
                         ids=["PNG chunks", "PNG chunks after the pixels", "PNG pixels in empty IDATs", "JPEG segments",
                              "JPEG fill bytes", "GIF sub-blocks", "BigTIFF tags", "TIFF strips", "BigTIFF strips"])
def test_a_flood_of_blocks_is_refused_before_pillow_walks_it(tmp_path, flood, suffix):
    """Pillow reads these one by one in Python, holding the GIL, and a JPEG's segments each take memory (what
    they cost before the cap: docs/serving.md, Input files). A palette PNG is decoded by Pillow itself, which
    reads its chunks after the pixels, and each IDAT, too. An uncompressed TIFF's strips Pillow decodes one
    by one, however many the directory lists."""
    path = tmp_path / f"flood.{suffix}"
    path.write_bytes(flood())
    with Image.open(path) as image:  # each a valid file, as Pillow reads it (slowly)
        assert image.size == (64, 64)
    message, seconds, grown = _refused_fast_in_bounded_memory(path, "decode_mask")
    assert message == BLOCKS_REFUSED.format("mask")
    assert seconds < 1 and grown < 50


@pytest.mark.parametrize("where", ["before", "after", "idat"])
def test_a_png_of_exactly_the_blocks_allowed_still_decodes_and_one_more_is_refused(tmp_path, where):
    path = tmp_path / "chunks.png"
    path.write_bytes(png_chunk_flood(65_536, where, "P"))
    assert decode_image(path, InputLimits()).shape == (64, 64, 3)
    path.write_bytes(png_chunk_flood(65_537, where, "P"))
    with pytest.raises(ValueError, match=re.escape(BLOCKS_REFUSED.format("image"))):
        decode_image(path, InputLimits())


def _jpeg_segments_before_scan(jpeg: bytes) -> int:
    """The marker segments of a JPEG from its start of image to its first start of scan, as ITU T.81 (B.1.1.2)
    lays them out: FF, the marker, and but for RSTn, SOI, EOI and TEM a length that counts itself."""
    count, position = 0, 2
    while jpeg[position + 1] != 0xDA:
        assert jpeg[position] == 0xFF
        count += 1
        marker = jpeg[position + 1]
        position += 2 if 0xD0 <= marker <= 0xD9 or marker == 0x01 else 2 + int.from_bytes(jpeg[position + 2:position + 4], "big")
    return count


@pytest.mark.parametrize("flood", ["comments", "fill", "stray", "RST0", "FF00"])
def test_a_jpeg_of_exactly_the_blocks_allowed_still_decodes_and_one_more_is_refused(tmp_path, flood):
    """Each segment before the scan counts, each marker without parameters (RSTn: libjpeg passes over them),
    and each fill byte (FF), stray byte and escaped FF (FF 00) between them."""
    own = _jpeg_segments_before_scan(jpeg_segment_flood(0))
    assert 5 <= own <= 12  # Pillow's: JFIF, the quantisation and Huffman tables, the frame
    path = tmp_path / "segments.jpg"
    for extra, refused in ((65_536 - own, False), (65_537 - own, True)):
        data = {"comments": lambda: jpeg_segment_flood(extra), "fill": lambda: jpeg_segment_flood(0, fill=extra),
                "stray": lambda: jpeg_segment_flood(0, stray=extra),
                "RST0": lambda: jpeg_segment_flood(0, bare=b"\xff\xd0", bares=extra),
                "FF00": lambda: jpeg_segment_flood(0, bare=b"\xff\x00", bares=extra)}[flood]()
        path.write_bytes(data)
        if refused:
            with pytest.raises(ValueError, match=re.escape(BLOCKS_REFUSED.format("image"))):
                decode_image(path, InputLimits())
        else:
            assert decode_image(path, InputLimits()).shape == (64, 64, 3)


@pytest.mark.parametrize("version, table", [(b"87a", "global"), (b"89a", "global"), (b"89a", "local")])
@pytest.mark.parametrize("allowed, refused", [((65_535,), (65_536,)), ((0,) * 65_536, (0,) * 65_537),
                                              ((65_534, 0), (65_534, 0, 0))],
                         ids=["sub-blocks", "extensions", "an extension past the cap"])
def test_a_gif_of_exactly_the_blocks_allowed_still_decodes_and_one_more_is_refused(tmp_path, version, table, allowed,
                                                                                  refused):
    """Each extension before the image counts, and each of its data sub-blocks."""
    path = tmp_path / "blocks.gif"
    path.write_bytes(gif_extension_flood(*allowed, version=version, table=table))
    with Image.open(path) as image:
        assert image.info["version"] == b"GIF" + version
    assert decode_image(path, InputLimits()).shape == (64, 64, 3)
    path.write_bytes(gif_extension_flood(*refused, version=version, table=table))
    with pytest.raises(ValueError, match=re.escape(BLOCKS_REFUSED.format("image"))):
        decode_image(path, InputLimits())


def test_a_bigtiff_of_exactly_the_tags_allowed_still_decodes_and_one_more_is_refused(tmp_path):
    """A classic TIFF counts its tags in 16 bits (65,535 at most); a BigTIFF in 64. The one strip counts too."""
    path = tmp_path / "tags.tif"
    path.write_bytes(bigtiff_tag_flood(65_535))
    assert decode_image(path, InputLimits()).shape == (64, 64, 3)
    for tags in (65_536, 65_537):  # with its strip one over, and over on its own
        path.write_bytes(bigtiff_tag_flood(tags))
        with pytest.raises(ValueError, match=re.escape(BLOCKS_REFUSED.format("image"))):
            decode_image(path, InputLimits())


@pytest.mark.parametrize("version, order", [(42, "<"), (42, ">"), (43, "<")],
                         ids=["classic, little-endian", "classic, big-endian", "BigTIFF"])
def test_a_tiff_of_exactly_the_strips_allowed_still_decodes_and_one_more_is_refused(tmp_path, version, order):
    """Its nine tags and the strips they list: 65,527 strips make 65,536 blocks."""
    path = tmp_path / "strips.tif"
    path.write_bytes(tiff_strip_flood(65_527, version, order))
    assert decode_image(path, InputLimits()).shape == (64, 64, 3)
    path.write_bytes(tiff_strip_flood(65_528, version, order))
    with pytest.raises(ValueError, match=re.escape(BLOCKS_REFUSED.format("image"))):
        decode_image(path, InputLimits())
    path.write_bytes(tiff_strip_flood(64, version, order, byte_counts=65_528))  # the sizes, its last entry, alone
    with pytest.raises(ValueError, match=re.escape(BLOCKS_REFUSED.format("image"))):
        decode_image(path, InputLimits())


@pytest.mark.parametrize("name, cut", [("jpeg", lambda data: data[:data.index(b"\xff\xdb") + 1]),  # at a marker's FF
                                       ("jpeg", lambda data: data.replace(b"\xff\xfe\x00\x02", b"\xff\xfe\x00\x00")),
                                       ("gif", lambda data: data[:13 + 768 + 2 + 6]),  # inside a sub-block
                                       ("png", lambda data: data[:-12] + _chunk(b"prVt", b"")[:4].replace(
                                           b"\0\0\0\0", b"\x80\0\0\0") + b"prVt" + data[-12:])],
                         ids=["JPEG cut at a marker", "JPEG segments of length 0", "GIF cut in an extension",
                              "PNG chunk claiming 2 GiB"])
def test_a_file_cut_short_or_broken_among_its_blocks_is_left_to_the_decoders(tmp_path, name, cut):
    """The count stops where the file does, or at a length that cannot be: the decoders say what is wrong, if
    anything (libjpeg passes over empty comments whose length is 0)."""
    data = {"jpeg": lambda: jpeg_segment_flood(3), "gif": lambda: gif_extension_flood(5),
            "png": lambda: png_chunk_flood(3, "after", "P")}[name]()
    path = tmp_path / f"broken.{name}"
    path.write_bytes(cut(data))
    try:
        assert decode_image(path, InputLimits()).shape == (64, 64, 3)
    except ValueError as refused:
        assert "could not be" in str(refused) and "blocks" not in str(refused)


def test_idats_of_a_kilobyte_or_more_are_not_counted(tmp_path):
    """Encoders write IDATs of 8 KiB and more (libpng's default), the last excepted, and the byte limit bounds
    how many of those a file holds: a PNG at the cap in other chunks still decodes, its pixels in 48 IDATs."""
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=0)
    png = buffer.getvalue()
    idats = _chunk_positions(png, b"IDAT")
    data = b"".join(png[at + 8:at + 8 + struct.unpack(">I", png[at:at + 4])[0]] for at in idats)
    pieces = [data[offset:offset + 1024] for offset in range(0, len(data), 1024)]
    assert len(pieces) == 49 and len(pieces[-1]) < 1024
    # IHDR, 65,534 empty chunks and the short last IDAT: 65,536 counted
    path = tmp_path / "idats.png"
    path.write_bytes(png[:idats[0]] + _chunk(b"prVt", b"") * 65_534 + b"".join(_chunk(b"IDAT", piece) for piece in pieces)
                     + _chunk(b"IEND", b""))
    assert np.array_equal(decode_image(path, InputLimits()), pixels)


def test_files_with_many_real_blocks_still_decode(tmp_path):
    """A JPEG with a colour profile split over many APP2 segments, EXIF and a comment; a PNG with many text
    chunks; an animated GIF with its loop and comment extensions."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo = Image.new("RGB", (64, 64), (90, 120, 30))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 1
    photo.save(tmp_path / "photo.jpg", "JPEG", icc_profile=profile * 40, exif=exif, comment=b"hello")
    text = PngImagePlugin.PngInfo()
    for index in range(200):
        text.add_text(f"key{index}", "value")
    photo.save(tmp_path / "photo.png", "PNG", pnginfo=text)
    frames = [Image.new("P", (64, 64), colour) for colour in (1, 2, 3)]
    frames[0].save(tmp_path / "photo.gif", "GIF", save_all=True, append_images=frames[1:], loop=0, comment=b"hi")
    for name in ("photo.jpg", "photo.png", "photo.gif"):
        assert decode_image(tmp_path / name, InputLimits()).shape == (64, 64, 3), name


def test_an_ico_bomb_is_refused_without_decoding(tmp_path):
    """169 Mpx inside a 170 KB icon; ICO, ICNS, JPEG 2000 and EPS are not among the accepted formats."""
    path = tmp_path / "bomb.ico"
    path.write_bytes(ico_bomb())
    message, seconds, grown = _refused_fast_in_bounded_memory(path, "decode_mask")
    assert message.startswith("mask could not be read as an image")
    assert message.endswith("upload a PNG, JPEG, WebP, GIF or TIFF file")
    assert seconds < 1 and grown < 50


METADATA_REFUSED = ("{} holds too much metadata: a PNG text or colour profile chunk that decompresses past 1,048,576 "
                    "bytes, or text chunks past 67,108,864 bytes in all; save the image again without its metadata")


@pytest.mark.parametrize("decoder", ["decode_image", "decode_mask"])
@pytest.mark.parametrize("bomb", [dict(kind=b"zTXt"), dict(kind=b"iTXt"), dict(kind=b"iCCP"),
                                  dict(kind=b"zTXt", after_pixels=True, bits=16)],
                         ids=["zTXt", "iTXt", "iCCP", "zTXt after the pixels"])
def test_a_png_metadata_zip_bomb_is_refused_with_what_to_do(tmp_path, decoder, bomb):
    """200 MB of text or colour profile in a 200 KB file. Pillow stops inflating a chunk at 1 MiB
    (PngImagePlugin.MAX_TEXT_CHUNK); the error says what is wrong and what to do, which no other format
    would cure. (A chunk after the pixels is read only where Pillow decodes them: a 16-bit PNG.)"""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_metadata_bomb(**bomb))
    assert path.stat().st_size < 300_000
    message, seconds, grown = _refused_fast_in_bounded_memory(path, decoder)
    assert message == METADATA_REFUSED.format(decoder.split("_")[1])
    assert seconds < 1 and grown < 50
    with pytest.raises(ValueError) as refused:  # the same in this process
        {"decode_image": decode_image, "decode_mask": decode_mask}[decoder](path, InputLimits())
    assert str(refused.value) == message


@pytest.mark.parametrize("exif", [False, True], ids=["alone", "with EXIF after it"])
def test_a_16bit_photo_with_a_metadata_bomb_after_its_pixels_is_read_deep_in_bounded_memory(tmp_path, exif):
    """Read as the service reads a photo, at 16 bits, libpng leaves text after the pixels uninflated, so the
    photo decodes; Pillow inflates it only to reach an EXIF orientation there, and is refused as above."""
    data = png_metadata_bomb(kind=b"zTXt", after_pixels=True, bits=16)
    if exif:
        turned = Image.Exif()
        turned[0x0112] = 6
        data = data[:-12] + _chunk(b"eXIf", turned.tobytes()) + data[-12:]  # before IEND
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    message, seconds, grown = _refused_fast_in_bounded_memory(path, "decode_photo")
    assert message == (METADATA_REFUSED.format("image") if exif else None)
    assert seconds < 1 and grown < 50
    if not exif:
        decoded = decode_photo(path, InputLimits()).pixels
        assert decoded.dtype == np.uint16 and decoded.shape == (64, 64, 4) and not decoded.any()
    else:
        with pytest.raises(ValueError, match="^image holds too much metadata"):
            decode_photo(path, InputLimits())


def test_text_chunks_past_pillows_total_are_refused_with_what_to_do(tmp_path):
    """65 plain tEXt chunks of 1 MiB each: each is under Pillow's cap, together they pass its 64 MiB total."""
    lines = b"".join(_chunk(b"tEXt", b"Comment\0" + b"a" * (1 << 20)) for _ in range(65))
    png = png_strip(64, 64)
    path = tmp_path / "text.png"
    path.write_bytes(png[:33] + lines + png[33:])  # after the signature and IHDR
    message, seconds, _ = _refused_fast_in_bounded_memory(path)
    assert message == METADATA_REFUSED.format("image") and seconds < 1
    with pytest.raises(ValueError) as refused:  # the same in this process
        decode_image(path, InputLimits())
    assert str(refused.value) == message


def _webp_in_a_smaller_canvas(lossless: bool) -> bytes:
    """A 256x256 WebP frame in an extended-format (VP8X) canvas said to be 64x64 (RIFF, per Google's WebP
    container specification: the VP8X payload is flags, 3 reserved bytes, then width - 1 and height - 1 in
    24 bits each)."""
    encoded = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 30, 200)).save(encoded, "WEBP", lossless=lossless)
    frame = encoded.getvalue()[12:]  # the VP8 or VP8L chunk after "RIFF", its size and "WEBP"
    canvas = bytes(4) + (63).to_bytes(3, "little") * 2
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(canvas)) + canvas + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _gif_frame_outside_its_screen(frame: tuple[int, int], at: tuple[int, int]) -> bytes:
    """A GIF whose logical screen says 64x64 and whose one image descriptor says `frame` at `at`."""
    image = Image.new("P", frame, 1)
    image.putpalette([0, 0, 0, 200, 30, 30])
    encoded = io.BytesIO()
    image.save(encoded, "GIF")
    data = bytearray(encoded.getvalue())
    data[6:10] = struct.pack("<HH", 64, 64)  # the logical screen, after "GIF89a"
    descriptor = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global colour table
    assert data[descriptor:descriptor + 1] == b","  # the image descriptor: no extension comes first
    data[descriptor + 1:descriptor + 5] = struct.pack("<HH", *at)
    return bytes(data)


@pytest.mark.parametrize("data, refused", [
    pytest.param(lambda: _webp_in_a_smaller_canvas(False), "image could not be read as an image", id="lossy WebP"),
    pytest.param(lambda: _webp_in_a_smaller_canvas(True), "image could not be read as an image", id="lossless WebP"),
    pytest.param(lambda: _gif_frame_outside_its_screen((4097, 4097), (0, 0)),
                 "image is 4097x4097 = 16,785,409 pixels, over the limit of 16,777,216", id="GIF frame over its screen"),
    pytest.param(lambda: _gif_frame_outside_its_screen((64, 64), (60000, 60000)),
                 "image is too large: its header claims more than 16,777,216 pixels", id="GIF frame far off its screen"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # between 1x and 2x the limit: refused below
def test_a_header_that_understates_the_pixels_coded_is_not_believed(tmp_path, data, refused):
    """Where a format states a size before its pixels and codes them at a size of their own, the limits must
    hold the larger: libwebp refuses a frame larger than its canvas at open, and Pillow takes a GIF's size as
    the one that holds its frame. (AVIF is left out of the accepted formats for this: Pillow 13's opener
    takes the size from the container, and the AV1 decoder decodes the frame at its own; docs/serving.md.)"""
    path = tmp_path / "understated"
    path.write_bytes(data())
    with pytest.raises(ValueError, match="^" + re.escape(refused)):
        decode_image(path, InputLimits())


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, fmt, **options)
    return encoded.getvalue()


def _intact_files() -> dict[str, bytes]:
    """A small file of each accepted format, in the layouts the decoders tell apart."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    deep = np.asarray(photo).astype(np.uint16) * 257
    files = {
        "PNG": _encoded(photo, "PNG"), "PNG with a profile": _encoded(photo, "PNG", icc_profile=profile),
        "palette PNG": _encoded(photo.convert("P"), "PNG", transparency=0),
        "16-bit PNG": _encoded(Image.fromarray(deep[..., 0]), "PNG"),
        "JPEG": _encoded(photo, "JPEG"), "progressive JPEG": _encoded(photo, "JPEG", progressive=True),
        "CMYK JPEG": _encoded(photo.convert("CMYK"), "JPEG"), "JPEG with EXIF": _encoded(photo, "JPEG", exif=exif.tobytes()),
        "WebP": _encoded(photo, "WEBP"), "lossless WebP": _encoded(photo.convert("RGBA"), "WEBP", lossless=True),
        "GIF": _encoded(photo.convert("P"), "GIF"), "TIFF": _encoded(photo, "TIFF"),
        "LZW TIFF": _encoded(photo, "TIFF", compression="tiff_lzw"),
    }
    turned = photo.rotate(90)
    files.update({
        "animated GIF": _encoded(photo.convert("P"), "GIF", save_all=True, append_images=[turned.convert("P")]),
        "APNG": _encoded(photo, "PNG", save_all=True, append_images=[turned]),
        "MPO": _encoded(photo, "MPO", save_all=True, append_images=[turned]),
        "animated WebP": _encoded(photo, "WEBP", save_all=True, append_images=[turned]),
        "JPEG-compressed TIFF": _encoded(photo, "TIFF", compression="jpeg"),
        "fax TIFF": _encoded(photo.convert("1"), "TIFF", compression="group4"),
    })
    alpha = np.dstack([deep, deep[..., :1]])
    for name, pixels, options in (("16-bit TIFF", deep, {}), ("16-bit deflated TIFF", deep, {"compression": "zlib"}),
                                  ("16-bit tiled TIFF", deep, {"tile": (16, 16)}),
                                  ("16-bit TIFF in planes", deep, {"planarconfig": "separate"}),
                                  ("16-bit RGBA TIFF", alpha, {"extrasamples": ["unassalpha"]}),
                                  ("16-bit TIFF of two pages", np.stack([deep, deep]), {})):
        encoded = io.BytesIO()
        tifffile.imwrite(encoded, pixels, **options)
        files[name] = encoded.getvalue()
    return files


def _damaged(data: bytes, rng) -> bytes:
    """`data` with one to sixteen changes: a byte overwritten or a bit flipped, bytes inserted, deleted or
    repeated from elsewhere, the file cut short, or a boundary value written over a length or offset."""
    data = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        at, roll = rng.randrange(len(data) or 1), rng.random()
        if roll < 0.5 and data:
            data[at] = rng.randrange(256)
        elif roll < 0.6 and data:
            data[at] ^= 1 << rng.randrange(8)
        elif roll < 0.7:
            data[at:at] = rng.randbytes(rng.randrange(1, 8))
        elif roll < 0.8:
            del data[at:at + rng.randrange(1, 16)]
        elif roll < 0.87:
            del data[at:]
        elif roll < 0.95:
            value = rng.choice((b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\0\0\0", b"\0\1", b"\xff\xff"))
            data[at:at + len(value)] = value
        else:
            start = rng.randrange(len(data) or 1)
            data[at:at] = data[start:start + rng.randrange(1, 64)]
    return bytes(data)


def test_damaged_files_of_every_accepted_format_decode_or_are_refused_naming_the_input(tmp_path):
    """Thousands of files of each accepted format, damaged at random (a fixed seed): each decodes, or is
    refused with a ValueError that names the input. Nothing else escapes, which would fail the prediction
    with an exception's bare words. This found a BigTIFF whose first directory lay far past its end (the
    block count's seek failed) and a TIFF whose directory Pillow read and libtiff did not (the 16-bit
    decoder's IndexError); the two tests below keep them."""
    assert _escaped_from_decoding(tmp_path / "damaged", _intact_files(), _damaged) == {}


def _escaped_from_decoding(path: Path, intact: dict, damage) -> dict[str, str]:
    """Decode 6,000 files damaged by `damage` from those `intact` (a fixed seed) as a photo and as a mask: each
    failure that is no ValueError naming the input, by its words, with the kind of file it came from."""
    rng = random.Random(20261206)
    escaped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns of each damaged EXIF or TIFF tag it skips
        for _ in range(6000):
            kind = rng.choice(sorted(intact))
            path.write_bytes(damage(intact[kind], rng))
            for decode, name in ((decode_photo, "image"), (decode_mask, "mask")):
                try:
                    decode(path, InputLimits())
                except ValueError as error:
                    if not str(error).startswith(f"{name} "):
                        escaped.setdefault(f"unnamed: {error}", kind)
                except Exception as error:  # noqa: BLE001: what must not happen
                    escaped.setdefault(f"{type(error).__name__}: {error}", kind)
    return escaped


def _png_chunks_of(png: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, data), as the PNG specification lays them out."""
    chunks, position = [], 8
    while position + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        chunks.append((kind, png[position + 8:position + 8 + length]))
        position += 12 + length
    return chunks


def _damaged_chunks(chunks: list[tuple[bytes, bytes]], rng) -> bytes:
    """A PNG of `chunks` with one to three changes, each chunk's checksum made good: a chunk's data damaged, a
    field of IHDR set to an edge value, a chunk repeated, dropped or moved, a chunk of a known type with random
    data added, or the inflated pixel data damaged and deflated again."""
    chunks = list(chunks)
    for _ in range(rng.choice((1, 1, 2, 3))):
        at, roll = rng.randrange(len(chunks)), rng.random()
        kind, data = chunks[at]
        if roll < 0.35:
            chunks[at] = (kind, _damaged(data, rng) if data else rng.randbytes(4))
        elif roll < 0.55 and chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13:
            fields = list(struct.unpack(">IIBBBBB", chunks[0][1]))
            field = rng.randrange(7)
            fields[field] = rng.choice((0, 1, 2, 3, 4, 6, 8, 16, 255) if field > 1 else (0, 1, 65535, 2**31, fields[field] * 2 % 2**32))
            chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", *fields))
        elif roll < 0.65:
            chunks.insert(rng.randrange(len(chunks)), chunks[at])
        elif roll < 0.72 and len(chunks) > 1:
            del chunks[at]
        elif roll < 0.8:
            other = rng.randrange(len(chunks))
            chunks[at], chunks[other] = chunks[other], chunks[at]
        elif roll < 0.9:
            kinds = (b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"eXIf", b"acTL", b"fcTL", b"fdAT", b"sBIT",
                     b"bKGD", b"pHYs", b"zTXt", b"iTXt", b"tEXt")
            chunks.insert(rng.randrange(1, max(len(chunks), 2)), (rng.choice(kinds), rng.randbytes(rng.choice((0, 1, 4, 5, 13, 26)))))
        else:
            pixels = [index for index, (name, _) in enumerate(chunks) if name == b"IDAT"]
            try:
                inflated = zlib.decompress(b"".join(chunks[index][1] for index in pixels))
            except zlib.error:
                continue
            if pixels:
                chunks = [chunk for chunk in chunks if chunk[0] != b"IDAT"]
                chunks.insert(pixels[0], (b"IDAT", zlib.compress(_damaged(inflated, rng))))
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, data) for kind, data in chunks)


def test_pngs_damaged_chunk_by_chunk_decode_or_are_refused_naming_the_input(tmp_path):
    """As above, for PNGs damaged with their checksums made good (Pillow and libpng refuse a chunk whose
    checksum is wrong, so random bytes seldom get past them). It found the three that
    test_a_damaged_png_decodes_or_is_refused_naming_the_input keeps."""
    deep = np.random.default_rng(0).integers(0, 65536, (48, 64, 4), dtype=np.uint16)
    intact = {name: _png_chunks_of(data) for name, data in _intact_files().items() if data.startswith(b"\x89PNG")}
    intact["16-bit RGBA PNG"] = _png_chunks_of(imagecodecs.png_encode(deep))
    assert _escaped_from_decoding(tmp_path / "damaged.png", intact, _damaged_chunks) == {}


@pytest.mark.parametrize("offset", [2**48, 2**63 + 8])
def test_a_bigtiff_whose_directory_lies_far_past_its_end_is_refused_naming_the_input(tmp_path, offset):
    """Seeking there failed: past the file system's largest offset (OSError), past 2**63 (a ValueError with
    no input named)."""
    path = tmp_path / "far.tif"
    path.write_bytes(b"II+\0" + struct.pack("<HHQ", 8, 0, offset) + bytes(64))
    with pytest.raises(ValueError, match="^image could not be read as an image"):
        decode_image(path, InputLimits())


def _tiff_entries(data: bytes) -> range:
    """Where each 12-byte entry of a little-endian classic TIFF's first directory starts (TIFF 6.0: the header's
    offset to the directory, then its entry count)."""
    directory = struct.unpack("<I", data[4:8])[0]
    return range(directory + 2, directory + 2 + 12 * struct.unpack("<H", data[directory:directory + 2])[0], 12)


def test_a_16bit_tiff_whose_strip_sizes_lie_past_its_end_is_left_to_pillow(tmp_path):
    """Pillow skips the tag, opens it and decodes it in 8 bits; libtiff reads no directory at all (imagecodecs'
    IndexError), so the 16-bit decoder leaves it to Pillow."""
    encoded = io.BytesIO()
    tifffile.imwrite(encoded, np.full((48, 64, 3), 40000, np.uint16), rowsperstrip=48)
    data = bytearray(encoded.getvalue())
    for entry in _tiff_entries(data):
        if struct.unpack("<H", data[entry:entry + 2])[0] == 279:  # StripByteCounts: ten thousand of them, far off
            data[entry + 4:entry + 12] = struct.pack("<II", 10_000, 0x7FFF0000)
    path = tmp_path / "strips.tif"
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as skipped:  # each tag Pillow skips
        pixels = decode_photo(path, InputLimits()).pixels
    assert "Tag data larger than file. Skipping tag 279" in [str(warning.message) for warning in skipped]
    assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8


def _tiff_in_tiles(pixels: np.ndarray, tile: tuple[int, int], forged: tuple[int, int] | None = None, **options) -> bytes:
    """`pixels` as tifffile writes them in tiles of `tile` (length, width); with `forged`, the directory's
    TileLength and TileWidth then say that instead (TIFF 6.0: tags 323 and 322, SHORT or LONG)."""
    encoded = io.BytesIO()
    tifffile.imwrite(encoded, pixels, tile=tile, **options)
    data = bytearray(encoded.getvalue())
    for entry in _tiff_entries(data):
        tag, kind = struct.unpack("<HH", data[entry:entry + 4])
        if forged and tag in (322, 323):
            value = forged[1] if tag == 322 else forged[0]
            data[entry + 8:entry + 12] = struct.pack("<I" if kind == 4 else "<HH", value, *(() if kind == 4 else (0,)))
    return bytes(data)


@pytest.mark.parametrize("bits, forged, options", [(16, (67_108_880, 16), {}), (8, (16_384, 16_384), {"compression": "zlib"})],
                         ids=["16-bit, a tile 67 million rows long", "8-bit deflated, 16384x16384 tiles"])
def test_a_tiff_whose_tiles_are_far_larger_than_its_image_is_refused_before_decoding(tmp_path, bits, forged, options):
    """libtiff decodes a tile whole, into a buffer of the tile's size, which a 20 KB file of 64x48 pixels can
    set to gigabytes (docs/serving.md, Input files)."""
    pixels = np.full((48, 64, 3), 200, np.uint16 if bits == 16 else np.uint8)
    path = tmp_path / "tiles.tif"
    path.write_bytes(_tiff_in_tiles(pixels, (16, 16), forged, **options))
    message, seconds, grown = _refused_fast_in_bounded_memory(path, "decode_photo")
    assert message == (f"image is a TIFF in tiles of {forged[1]}x{forged[0]} pixels, each decoded whole: larger than the "
                       "image itself (64x48) and than 1,048,576 pixels; save it again without tiles, or as PNG")
    assert seconds < 1 and grown < 50


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow's, for a tag of a type longer than its entry
@pytest.mark.parametrize("kind", range(1, 19))
def test_large_tile_sizes_of_any_type_are_refused(tmp_path, kind):
    """TIFF 6.0 gives TileWidth and TileLength as SHORT or LONG. Of any field type (BigTIFF's too), a large
    size in a compressed file (where Pillow does not look at it) is refused, by the tile check where Pillow
    reads a whole number, else by libtiff: never decoded at that size."""
    data = bytearray(_tiff_in_tiles(np.full((48, 64, 3), 200, np.uint8), (16, 16), compression="zlib"))
    for entry in _tiff_entries(data):
        if struct.unpack("<H", data[entry:entry + 2])[0] in (322, 323):
            data[entry + 2:entry + 12] = struct.pack("<HII", kind, 1, 16_384)
    path = tmp_path / "tiles.tif"
    path.write_bytes(bytes(data))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="^image (is a TIFF in tiles of 16384x16384 pixels|could not be decoded)"):
        decode_image(path, InputLimits())
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("size, tile, decodes", [
    ((48, 64), (1024, 1024), True), ((48, 64), (1040, 1024), False),  # a megapixel whatever the image
    ((1008, 1104), (1008, 1104), True), ((1008, 1104), (1024, 1104), False),  # the image's own size, where more
])
def test_tiles_up_to_the_image_or_a_megapixel_decode_and_larger_ones_are_refused(tmp_path, size, tile, decodes):
    pixels = np.random.default_rng(1).integers(0, 65536, (*size, 3), dtype=np.uint16)
    path = tmp_path / "tiles.tif"
    path.write_bytes(_tiff_in_tiles(pixels, tile, compression="zlib"))
    if decodes:
        assert np.array_equal(decode_photo(path, InputLimits()).pixels, pixels)
    else:
        with pytest.raises(ValueError, match=f"^image is a TIFF in tiles of {tile[1]}x{tile[0]} pixels, each decoded whole"):
            decode_photo(path, InputLimits())


def tiff_offsets_of_type(tag: int, kind: int) -> bytes:
    """An uncompressed TIFF (8-bit in strips, or 16-bit in tiles for the tile offsets, 324) whose offsets
    entry `tag` says type `kind` (TIFF 6.0's field types) instead of LONG."""
    encoded = io.BytesIO()
    tiles = {"tile": (16, 16)} if tag == 324 else {}
    tifffile.imwrite(encoded, np.full((48, 64, 3), 40000 if tiles else 100, np.uint16 if tiles else np.uint8), **tiles)
    data = bytearray(encoded.getvalue())
    for entry in _tiff_entries(data):
        if struct.unpack("<H", data[entry:entry + 2])[0] == tag:
            data[entry + 2:entry + 4] = struct.pack("<H", kind)
    return bytes(data)


@pytest.mark.parametrize("tag, kind", [(273, 2), (273, 5), (273, 7), (273, 11), (324, 16)],
                         ids=["strip offsets as text", "as fractions", "as bytes", "as floats",
                              "tile offsets as 64-bit numbers in a classic TIFF"])
def test_a_tiff_whose_offsets_are_of_another_type_is_refused_naming_the_input(tmp_path, tag, kind):
    """Pillow seeks to such an offset as it is (TypeError), or reads up to the next one, far past the file's
    end (MemoryError); TIFF 6.0 allows SHORT or LONG."""
    path = tmp_path / "offsets.tif"
    path.write_bytes(tiff_offsets_of_type(tag, kind))
    for decode, name in ((decode_photo, "image"), (decode_mask, "mask")):
        with pytest.raises(ValueError, match=f"^{name} could not be decoded"):
            decode(path, InputLimits())


def _png(pixels: np.ndarray) -> bytes:
    return imagecodecs.png_encode(pixels)  # libpng: the signature, then IHDR (33 bytes in all), ..., IEND (12)


@pytest.mark.parametrize("name, damaged, photo, mask", [
    ("no pixels, 8-bit", lambda: _png(np.full((48, 64, 3), 200, np.uint8))[:33] + _chunk(b"IEND", b""),
     "image could not be decoded (cannot load this image)", "mask could not be decoded (cannot load this image)"),
    ("no pixels, 16-bit", lambda: _png(np.full((48, 64), 40000, np.uint16))[:33] + _chunk(b"IEND", b""),
     "image could not be decoded (cannot load this image)", "mask could not be decoded (cannot load this image)"),
    ("a grey colour key of 4 bytes, 16-bit", lambda: (lambda png: png[:33] + _chunk(b"tRNS", b"\x9c\x40\0\0") + png[33:])(
        _png(np.full((48, 64), 40000, np.uint16))), (48, 64, 3), (48, 64)),
    ("a colour profile cut short after the pixels, 16-bit", lambda: (lambda png: png[:-12] + _chunk(b"iCCP", b"sRGB\0")
                                                                       + png[-12:])(_png(np.full((48, 64), 40000, np.uint16))),
     (48, 64, 3), "mask could not be decoded (index out of range)"),
])
def test_a_damaged_png_decodes_or_is_refused_naming_the_input(tmp_path, name, damaged, photo, mask):
    """Chunks damaged with their checksums made good, which random damage seldom reaches: Pillow found no
    pixels (the decoders' IndexError on its empty tile list); a colour key of the wrong length, which libpng
    drops and Pillow keeps (an IndexError on the alpha channel libpng did not add); an iCCP cut short that
    Pillow reads after the pixels (its own IndexError)."""
    path = tmp_path / "damaged.png"
    path.write_bytes(damaged())
    for decode, expected in ((decode_photo, photo), (decode_mask, mask)):
        if isinstance(expected, str):
            with pytest.raises(ValueError, match="^" + re.escape(expected)):
                decode(path, InputLimits())
        else:
            decoded = decode(path, InputLimits())
            assert getattr(decoded, "pixels", decoded).shape == expected


@pytest.mark.parametrize("fmt", ["ICO", "JPEG2000", "BMP", "PPM", "AVIF"])
def test_formats_outside_the_promised_list_are_refused(tmp_path, fmt):
    path = tmp_path / f"small.{fmt.lower()}"
    Image.new("RGB", (32, 32)).save(path, fmt)
    with pytest.raises(ValueError, match="image could not be read as an image .*upload a PNG, JPEG, WebP, GIF or TIFF file"):
        decode_image(path, InputLimits())


def test_an_upload_over_the_byte_cap_is_refused_before_it_is_read(tmp_path):
    """A 64x64 PNG followed by a mountain of zeros: refused from the file's size."""
    path = tmp_path / "padded.png"
    Image.new("RGB", (64, 64)).save(path)
    with path.open("ab") as file:
        file.truncate(path.stat().st_size + (200 << 20))  # sparse: 200 MiB of zeros, no disk used
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"^image is a file of 209,\d{3},\d{3} bytes, over the limit of 134,217,728 "
                                         r"\(INPAINT_MAX_UPLOAD_BYTES\)"):
        decode_image(path, InputLimits())
    assert time.perf_counter() - started < 1


def test_pillows_own_guard_is_at_the_input_limit(inpainter, tmp_path):
    """The service sets Pillow's decompression-bomb limit to the deployment's pixel limit."""
    assert Image.MAX_IMAGE_PIXELS == inpainter.settings.max_input_pixels


def test_prompts_are_capped_in_characters():
    check_inputs(prompt="x" * PROMPT_MAX_CHARS, negative_prompt="y" * PROMPT_MAX_CHARS)
    with pytest.raises(ValueError, match="^prompt is 10,000,000 characters, over the limit of 2,000; shorten it"):
        check_inputs(prompt="x" * 10_000_000)
    with pytest.raises(ValueError, match="^negative_prompt is 2,001 characters, over the limit of 2,000"):
        check_inputs(negative_prompt="y" * 2001)


def test_the_schema_caps_prompts_so_the_server_refuses_them_first():
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]["Input"]
    assert schema["properties"]["prompt"]["maxLength"] == PROMPT_MAX_CHARS
    assert schema["properties"]["negative_prompt"]["maxLength"] == PROMPT_MAX_CHARS


def test_hostile_files_through_the_server_fail_alone_and_it_keeps_serving(server, tmp_path):
    from cogserver import data_uri

    strip = tmp_path / "strip.png"
    strip.write_bytes(png_strip(16_777_216, 1))
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(jpeg_scan_bomb())
    metadata = tmp_path / "metadata.png"
    metadata.write_bytes(png_metadata_bomb())
    segments = tmp_path / "segments.jpg"
    segments.write_bytes(jpeg_segment_flood(5_000_000))
    strips = tmp_path / "strips.tif"
    strips.write_bytes(tiff_strip_flood(200_000))
    tiles = tmp_path / "tiles.tif"
    tiles.write_bytes(_tiff_in_tiles(np.full((48, 64, 3), 200, np.uint16), (16, 16), (67_108_880, 16)))
    offsets = tmp_path / "offsets.tif"
    offsets.write_bytes(tiff_offsets_of_type(273, 2))
    for image, expected in ((strip, "a side over the limit"), (bomb, "scans, over the limit"),
                            (metadata, "save the image again without its metadata"),
                            (segments, "holds over 65,536 blocks"), (strips, "holds over 65,536 blocks"),
                            (tiles, "each decoded whole"), (offsets, "image could not be decoded")):
        started = time.monotonic()
        status, response = server.predict({"image": data_uri(image), "mask": data_uri(image), "num_inference_steps": 1})
        assert status == 200 and response["status"] == "failed", response
        assert expected in response["error"]
        assert time.monotonic() - started < 10
    # Pillow's warning for each of 5,000 damaged EXIF tags stays out of the logs (startup filters them).
    flood = tmp_path / "flood.jpg"
    flood.write_bytes(jpeg_exif_tag_flood())
    with pytest.warns(UserWarning, match="Tag data larger than file") as caught, Image.open(flood) as image:
        image.getexif()
    assert len(caught) > 5_000
    status, response = server.predict({"image": data_uri(flood), "mask": data_uri(flood), "num_inference_steps": 1})
    assert response["status"] == "succeeded" and "Skipping tag" not in response["logs"], response["logs"][-500:]
    assert "Skipping tag" not in server.log_path.read_text(errors="replace")
    status, response = server.predict({"prompt": "x" * (PROMPT_MAX_CHARS + 1), "image": data_uri(strip)})
    assert status == 422 and "prompt" in json.dumps(response)
    assert server.wait_ready()["status"] == "READY"
