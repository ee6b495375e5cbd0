"""Image decoding: every common format and mode becomes an upright 8-bit image, bad data a 4xx."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from service.api.errors import ApiError
from service.images import decode_for_graph, decode_image
from tests.conftest import cifar_photo, damaged_png, jpeg_bytes, png_bytes

LIMIT = 50_000_000


def reference() -> Image.Image:
    return Image.open(cifar_photo("automobile", 5)).convert("RGB").resize((64, 48))


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def close(a: Image.Image, b: Image.Image, tolerance: float) -> bool:
    return a.size == b.size and float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()) <= tolerance


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("JPEG", {"quality": 95}, 4),
        ("WEBP", {"quality": 90}, 6),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
    ],
)
def test_formats_decode_to_the_same_pixels(fmt: str, params: dict, tolerance: float) -> None:
    image = reference()
    assert close(decode_image(encoded(image, fmt, **params), LIMIT), image, tolerance)


def test_palette_png() -> None:
    image = reference().quantize(64)
    decoded = decode_image(png_bytes(image), LIMIT)
    assert decoded.mode == "RGB" and close(decoded, image.convert("RGB"), 0)


def test_rgba_is_composited_on_white() -> None:
    image = reference().convert("RGBA")
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[:, :32] = 0
    image.putalpha(Image.fromarray(alpha))
    decoded = np.asarray(decode_image(png_bytes(image), LIMIT))
    assert (decoded[:, :32] == 255).all()
    assert (decoded[:, 32:] == np.asarray(reference())[:, 32:]).all()


def test_grayscale_and_16_bit_png_scale_to_8_bit() -> None:
    gray = reference().convert("L")
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    for data in (png_bytes(gray), png_bytes(sixteen)):
        decoded = decode_image(data, LIMIT)
        assert decoded.mode == "RGB"
        assert (np.asarray(decoded)[..., 0] == np.asarray(gray)).all()
    assert decode_image(png_bytes(sixteen), LIMIT, color="GRAY").mode == "L"


@pytest.mark.parametrize(
    ("mode", "scale"),
    [("F", 1 / 255), ("F", 1.0), ("F", 257.0), ("I", 1.0), ("I", 257.0), ("I", 65537.0)],
    ids=["float-0..1", "float-0..255", "float-0..65535", "int32-0..255", "int32-0..65535", "int32-wider"],
)
def test_float_and_32_bit_tiffs_keep_their_brightness(mode: str, scale: float) -> None:
    """A float TIFF in [0, 1] (the usual convention) is not read as nearly black, nor a 32-bit one clipped."""
    gray = np.array(reference().convert("L"))
    gray[0, 0] = 255  # a white pixel: a wide 32-bit image has no convention, so its own maximum is white
    values = gray.astype(np.float32 if mode == "F" else np.int64) * scale
    if mode == "I":
        values = np.round(values).astype(np.int32)
    stored = encoded(Image.fromarray(values, mode), "TIFF")
    assert Image.open(io.BytesIO(stored)).mode == mode
    decoded = np.asarray(decode_image(stored, LIMIT, color="GRAY"), float)
    assert float(np.abs(decoded - gray).max()) <= 1


def test_cmyk_jpeg() -> None:
    image = reference()
    decoded = decode_image(encoded(image.convert("CMYK"), "JPEG", quality=95), LIMIT)
    assert decoded.mode == "RGB" and close(decoded, image, 6)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = reference()
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(upright.transpose(undo), "JPEG", quality=98, exif=exif.tobytes())
    decoded = decode_image(data, LIMIT)
    assert close(decoded, upright, 4)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_the_size_results_map_to_is_the_decoded_photos(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown 180 wide and 250 high
    data = encoded(Image.new("RGB", (250, 180), "red"), fmt, exif=exif)
    assert decode_for_graph(data, LIMIT, "RGB", None, keep_photo=False).size == decode_image(data, LIMIT).size == (180, 250)


def test_jpeg_draft_decodes_a_smaller_image_quickly() -> None:
    big = reference().resize((1024, 768))
    decoded = decode_image(encoded(big, "JPEG"), LIMIT, draft_size=(32, 32))
    assert decoded.size[0] < 1024 and min(decoded.size) >= 32


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"", 400), (b"GIF89a" + b"\x00" * 5, 400), (b"%PDF-1.4 not an image", 415), (b"\x89PNG\r\n\x1a\n", 400)],
)
def test_bad_bytes(data: bytes, status: int) -> None:
    with pytest.raises(ApiError) as raised:
        decode_image(data, LIMIT)
    assert raised.value.status_code == status


@pytest.mark.parametrize("draft", [None, (480, 480)])
def test_damaged_png_pixels_are_a_400_on_the_graph_path_too(draft: tuple[int, int] | None) -> None:
    # Reading a PNG's EXIF before the decode decoded it, swallowed the error and left a half-decoded image: 200.
    with pytest.raises(ApiError) as raised:
        decode_for_graph(damaged_png(), LIMIT, "RGB", draft, keep_photo=False)
    assert raised.value.status_code == 400 and raised.value.code == "corrupt_image"


def test_a_photo_kept_for_drawing_is_in_colour_whatever_the_graph_takes() -> None:
    """A GRAY detector's or segmenter's format=image / overlay came back gray: the kept photo was decoded for the graph."""
    data = cifar_photo("cat", 0).read_bytes()
    decoded = decode_for_graph(data, LIMIT, "GRAY", None, keep_photo=True)
    assert decoded.image.mode == "L" and decoded.photo is not None and decoded.photo.mode == "RGB"
    assert np.asarray(decoded.photo).std(axis=2).mean() > 1  # the cat's colours, not three equal channels


def test_a_photo_too_long_for_jpeg_is_refused_before_drawing_only() -> None:
    """Drawn-on photos are JPEGs, at most 65,500 px a side: a 66000x4 PNG answered 500 on format=image/overlay."""
    data = png_bytes(Image.new("RGB", (66_000, 4)))
    assert decode_for_graph(data, LIMIT, "RGB", None, keep_photo=False).size == (66_000, 4)
    with pytest.raises(ApiError) as raised:
        decode_for_graph(data, LIMIT, "RGB", None, keep_photo=True)
    assert raised.value.status_code == 422 and "65,500 px a side" in raised.value.detail


def test_an_orientation_written_as_text_turns_nothing_and_swaps_no_size() -> None:
    """Pillow's exif_transpose knows orientations as numbers only: the text "6" left the photo as stored, while the
    size it was mapped back to was swapped (a segment answer of 1000x2000 for a 2000x1000 photo; a review)."""
    # A big-endian TIFF block, one entry: the orientation tag, type 2 (ASCII), "6" (Pillow writes it as a number only).
    tiff = b"MM\0*" + struct.pack(">IH", 8, 1) + struct.pack(">HHI", 0x0112, 2, 2) + b"6\0\0\0" + struct.pack(">I", 0)
    plain = jpeg_bytes(Image.new("RGB", (2000, 1000), (40, 90, 200)))
    data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\0\0" + tiff + plain[2:]
    decoded = decode_for_graph(data, LIMIT, "RGB", (320, 320), keep_photo=False)
    assert decoded.size == (2000, 1000) and decoded.span.size == (2000, 1000)
    assert decoded.span.width / decoded.image.width == decoded.span.height / decoded.image.height  # one draft scale
