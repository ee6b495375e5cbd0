"""Refuse uploads that cost Pillow far more to open than their size or pixel count says.

Pillow parses most containers in Python, holding the GIL: a 25 MB file of empty structures (JPEG comments or
fill bytes, PNG chunks, GIF comment blocks, Netpbm header comments, TIFF tags or strips) keeps a core busy for
seconds and slows every other request. Each check here reads the structure with a bounded walk (C-speed counts where a marker
cannot occur by chance) before Pillow sees it, and answers a 413 ``image_too_complex``.
"""

from __future__ import annotations

import re
import struct

from PIL import Image, JpegImagePlugin
from PIL.TiffImagePlugin import PREFIXES as TIFF_PREFIXES

from service.api.errors import ApiError

# A progressive JPEG has about 10 scans; each one walks every block again, so a file that repeats its
# scans buys minutes of CPU in a few hundred kB (326 kB, 500 scans: 25 s). 0xFFDA cannot occur inside
# entropy-coded data, so counting it bounds the scans (an EXIF thumbnail's count too, harmlessly).
MAX_JPEG_SCANS = 100
# Pillow walks what comes before the first scan in Python, a segment or a stray byte at a time: 6 million empty
# comments (24 MB) took 8 s; 25 MB of 0xFF fill bytes 11.5 s; 4 MB of empty DHT, DQT or DRI segments 0.6-0.9 s.
MAX_JPEG_HEADER_SEGMENTS = 10_000
# As Pillow's header walk reads them (JpegImagePlugin.MARKER): the markers it knows, and those of them it reads no
# length after (SOF8, RST0-7, SOI, EOI, JPG0-13); at any other (TEM too) it stops with an error.
JPEG_MARKERS = {code & 0xFF for code in JpegImagePlugin.MARKER}
JPEG_NO_LENGTH = {code & 0xFF for code, (_, _, handler) in JpegImagePlugin.MARKER.items() if handler is None}
JPEG_FILL = re.compile(rb"\xff+")
# 2 million empty PNG chunks (24 MB) took 14 s, before or after the pixels. libpng writes 8 kB IDAT
# chunks, so a 25 MB photo has about 3,000; 20,000 cost Pillow about 0.15 s.
MAX_PNG_CHUNKS = 20_000
# Pillow reads a GIF's extension blocks before the first frame in Python, and steps over stray bytes one at a
# time: 5 million comments (25 MB) took 6.6 s.
MAX_GIF_BLOCKS = 10_000
# Pillow reads a Netpbm header a byte at a time: 25 MB of comment or spaces before the size took 15-19 s.
MAX_NETPBM_HEADER_BYTES = 64 * 1024
NETPBM_GAP = rb"(?:\s|#[^\r\n]*[\r\n])"  # a space, or a comment to its line's end
NETPBM_HEADERS = {tokens: re.compile(rb"P[^\s#]{1,5}(?:%s+[^\s#]+){%d}" % (NETPBM_GAP, tokens)) for tokens in (2, 3)}
NETPBM_KINDS = b"0123456fy"  # what Pillow's reader takes after the P (P0CMYK, PyP... are Pillow's own)
# Pillow reads a TIFF's tags in Python: 60,000 of them (480 kB) took 0.7 s to open, 1.6 s to load. Photos have dozens.
MAX_TIFF_TAGS = 1_000
# ... and makes a Python Fraction of each RATIONAL value: one XResolution of 150,000 (1.2 MB) took 0.68 s.
MAX_TIFF_RATIONALS = 1_000
TIFF_RATIONAL_TYPES = (5, 10)  # RATIONAL, SRATIONAL
# ... and a Python decoder call for each strip or tile: 3 million one-row strips (24 MB) took 11.6 s to open and
# load. A 50 MP photo of one-row strips has 8,000; of 64x64 tiles 12,000.
MAX_TIFF_BLOCKS = 100_000
TIFF_BLOCK_OFFSETS = (273, 324)  # StripOffsets, TileOffsets
# EXIF is parsed in Python too (64,000 tags in a 768 kB PNG or WebP: 0.4 s); a JPEG's segment holds at most 64 kB,
# so every camera's fits in that.
MAX_EXIF_BYTES = 64 * 1024
RAW_EXIF = "Raw profile type exif"
TIFF_TILE_TAGS = (322, 323)  # TileWidth, TileLength
TIFF_ROWS_PER_STRIP = 278
# Decoders Pillow runs in Python, holding the GIL: ~10 s of CPU for a 24 MB plain-text PGM or RLE BMP.
PYTHON_DECODERS = {"ppm_plain": "plain-text (P1-P3) Netpbm", "bmp_rle": "run-length-encoded BMP"}


def check_structure(data: bytes) -> None:
    """Before Pillow opens ``data``: refuse a container built to make its Python parser loop."""
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        _refuse_past("PNG", "chunks", _png_chunks(data, MAX_PNG_CHUNKS), MAX_PNG_CHUNKS)
    elif data.startswith(b"GIF8"):
        _refuse_past("GIF", "blocks or stray bytes before its first frame", _gif_blocks(data, MAX_GIF_BLOCKS), MAX_GIF_BLOCKS)
    elif data[:1] == b"P" and data[1:2] in NETPBM_KINDS and len(data) > MAX_NETPBM_HEADER_BYTES:
        _check_netpbm_header(data)
    elif data[:4] in TIFF_PREFIXES:
        _check_tiff_tags(data)


def check_decoding_cost(image: Image.Image, max_pixels: int) -> None:
    """After the header: refuse what costs far more to decode than its pixel count says: a pure-Python decoder,
    or a TIFF whose tile or strip (allocated whole by libtiff) is larger than the pixel limit (216 bytes
    declaring a 16x16 image in one 24000x24000 tile took 1.7 GB)."""
    for tile in getattr(image, "tile", ()):  # an ImageFile (what Image.open returns) lists its decoders
        if tile.codec_name in PYTHON_DECODERS:
            kind = PYTHON_DECODERS[tile.codec_name]
            raise ApiError(415, "unsupported_image", f"{kind} is not accepted (its decoder is too slow); send PNG or JPEG")
    if image.format == "TIFF":
        tags = image.tag_v2  # type: ignore[attr-defined]  # TiffImageFile
        try:  # a hostile file may give these tags text, NaN or 1/0
            tile_width, tile_height = (int(tags.get(tag, 0) or 0) for tag in TIFF_TILE_TAGS)
            block = tile_width * tile_height or int(tags.get(TIFF_ROWS_PER_STRIP, 0) or 0) * image.size[0]
        except (TypeError, ValueError, ArithmeticError) as error:
            raise ApiError(400, "corrupt_image", f"the TIFF's tile or strip size is not a number: {error}") from None
        if block > max_pixels:
            raise ApiError(413, "image_too_large", f"a TIFF tile or strip of {block:,} pixels; the limit is {max_pixels:,}")


def check_exif(image: Image.Image) -> None:
    """After decoding (a PNG's EXIF may follow its pixels), before the EXIF is parsed for the orientation."""
    # A PNG may carry it as hex text instead (ImageMagick's "Raw profile type exif"): two characters a byte, and breaks.
    if len(image.info.get("exif") or b"") > MAX_EXIF_BYTES or len(image.info.get(RAW_EXIF) or "") > 3 * MAX_EXIF_BYTES:
        raise ApiError(413, "image_too_complex", f"the image's EXIF block is over {MAX_EXIF_BYTES:,} bytes; a photo's is smaller")


def _refuse_past(kind: str, what: str, count: int, most: int) -> None:
    if count > most:
        raise ApiError(413, "image_too_complex", f"the {kind} holds more than {most:,} {what}; a photo has far fewer")


def _check_jpeg(data: bytes) -> None:
    if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ApiError(413, "image_too_complex", f"the JPEG holds {scans} scans; at most {MAX_JPEG_SCANS} are accepted")
    steps = _jpeg_header_steps(data, MAX_JPEG_HEADER_SEGMENTS)
    _refuse_past("JPEG", "segments or fill bytes before its image data", steps, MAX_JPEG_HEADER_SEGMENTS)


def _jpeg_header_steps(data: bytes, most: int) -> int:
    """The steps Pillow's header walk takes up to the first scan (a segment, a fill or stray byte each), counted
    no further than about ``most``; runs of fill bytes are measured at C speed."""
    offset, steps = 2, 0
    while offset + 1 < len(data) and steps <= most:
        if data[offset] != 0xFF:  # stray bytes, stepped over one at a time up to the next 0xFF
            following = data.find(b"\xff", offset)
            steps += (len(data) if following < 0 else following) - offset
            offset = len(data) if following < 0 else following
            continue
        fill = JPEG_FILL.match(data, offset)
        assert fill is not None
        steps += fill.end() - offset - 1  # 0xFF fill before a marker
        offset = fill.end() - 1
        if offset + 1 >= len(data):
            break
        marker = data[offset + 1]
        steps += 1
        if marker == 0xDA:  # the first scan: Pillow stops here
            break
        if marker in JPEG_NO_LENGTH or marker == 0x00:  # (0xFF00: an escaped 0xFF, stepped over)
            offset += 2
        elif marker in JPEG_MARKERS and offset + 4 <= len(data):
            offset += 2 + struct.unpack_from(">H", data, offset + 2)[0]
        else:  # not a marker Pillow knows (it stops there), or cut short
            break
    return steps


def _png_chunks(data: bytes, most: int) -> int:
    """The chunks up to IEND (or the data's end), counted no further than ``most + 1``."""
    offset, count = 8, 0
    while offset + 8 <= len(data) and count <= most:
        count += 1
        if data[offset + 4 : offset + 8] == b"IEND":
            break
        offset += 12 + struct.unpack_from(">I", data, offset)[0]  # length, type, data, CRC
    return count


def _gif_blocks(data: bytes, most: int) -> int:
    """What Pillow reads one at a time before the first frame (stray bytes, and each extension's sub-blocks),
    counted no further than ``most + 1``."""
    flags = data[10] if len(data) > 10 else 0
    offset, count = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), 0  # after the global colour table
    while offset < len(data) and data[offset] not in (0x2C, 0x3B) and count <= most:  # until an image or the end
        count += 1
        if data[offset] != 0x21:  # not an extension: Pillow steps over the byte
            offset += 1
            continue
        offset += 2  # introducer and label, then sub-blocks: a length byte and that many bytes, to an empty one
        while offset < len(data) and count <= most:
            size = data[offset]
            offset, count = offset + 1 + size, count + 1
            if size == 0:
                break
    return count


def _check_netpbm_header(data: bytes) -> None:
    tokens = 2 if data[1:2] in b"14" else 3  # width and height; the others add a maximum (or PFM's scale)
    if not NETPBM_HEADERS[tokens].match(data, 0, MAX_NETPBM_HEADER_BYTES):
        message = f"the Netpbm header (its comments and spaces) runs past {MAX_NETPBM_HEADER_BYTES:,} bytes"
        raise ApiError(413, "image_too_complex", message)


def _check_tiff_tags(data: bytes) -> None:
    """The first IFD, as Pillow reads it (byte order from the first two bytes; BigTIFF when the third is "+"):
    its number of tags, and the length of each RATIONAL one."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2] == 0x2B
    entry, entry_size, header = (order + "HHQQ", 20, 8) if big else (order + "HHII", 12, 2)
    try:
        (offset,) = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)
        (tags,) = struct.unpack_from(order + ("Q" if big else "H"), data, offset)
    except (struct.error, OverflowError):  # the IFD lies past the data: Pillow says it is corrupt
        return
    _refuse_past("TIFF", "tags", tags, MAX_TIFF_TAGS)
    for place in range(offset + header, min(offset + header + tags * entry_size, len(data) - entry_size + 1), entry_size):
        tag, kind, count, _ = struct.unpack_from(entry, data, place)
        if kind in TIFF_RATIONAL_TYPES:
            _refuse_past("TIFF", "fractions in a tag", count, MAX_TIFF_RATIONALS)
        if tag in TIFF_BLOCK_OFFSETS:
            _refuse_past("TIFF", "strips or tiles", count, MAX_TIFF_BLOCKS)
