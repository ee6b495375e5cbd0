"""Decode and validate uploaded images; resize and encode results. Pure Pillow + numpy.

Every failure is an :class:`ApiError` with a 4xx status: nothing a client sends reaches the
model as anything but a well-formed 8-bit RGB or grayscale image, and pixel counts are checked
from the header before any pixel is decoded (decompression bombs never allocate).
"""

from __future__ import annotations

import io
import warnings
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.api.errors import ApiError
from service.image_guards import TIFF_PREFIXES, check_decoding_cost, check_exif, check_structure

# We check pixel counts ourselves (from the header, before decoding) with a clear 413.
Image.MAX_IMAGE_PIXELS = None
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # PPM = Netpbm PBM/PGM/PPM (e.g. AT&T faces)
SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", *TIFF_PREFIXES, b"P4\n", b"P5\n", b"P6\n")
JPEG_MAX_SIDE = 65_500  # libjpeg encodes no longer side


def _has_image_signature(data: bytes) -> bool:
    """A known format's magic bytes: Pillow could not parse it, so it is corrupt rather than foreign."""
    return data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_image(data: bytes, max_pixels: int, color: str = "RGB", draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> an upright (EXIF-rotated) 8-bit image in ``color`` ("RGB" or "GRAY").

    ``draft_size`` lets the JPEG decoder downscale by 1/2..1/8 while decoding when the model
    needs no more than that many pixels (much faster for camera photos).
    """
    return load_image(open_image(data, max_pixels), color, draft_size)


@dataclass(frozen=True)
class Span:
    """Where a decoded image lies on the upright photo of ``size``: it covers ``width`` x ``height`` photo pixels,
    the first ``left`` columns and ``top`` rows of them before the photo's edge.

    The photo itself, but for a JPEG decoded at 1/k (a draft): libjpeg makes a W-px side ceil(W/k) pixels of k
    photo pixels each, the last partly past the stored image's right or bottom edge, which the EXIF orientation
    may turn to the left or top. Results map back by k from there (by W / ceil(W/k) they fell up to k-1 px short).
    """

    size: tuple[int, int]
    width: int
    height: int
    left: int = 0
    top: int = 0

    @classmethod
    def whole(cls, size: tuple[int, int]) -> Span:
        """A decoded image that is the photo, or stretched over it exactly."""
        return cls(size, *size)


def draft_span(decoded_wh: tuple[int, int], upright_wh: tuple[int, int], orientation: int = 1) -> Span:
    """The :class:`Span` of an upright decoded image of ``decoded_wh`` from a photo of ``upright_wh``, drafted or not."""
    (width, height), (upright_w, upright_h) = decoded_wh, upright_wh
    for k in (1, 2, 4, 8):  # the scales a draft picks; a photo at least k x the graph's side fits one k only
        if -(-upright_w // k) == width and -(-upright_h // k) == height:
            # Orientations 2, 3, 6, 7 turn the stored image's last column or row to the left; 3, 4, 7, 8 to the top.
            left = width * k - upright_w if orientation in (2, 3, 6, 7) else 0
            top = height * k - upright_h if orientation in (3, 4, 7, 8) else 0
            return Span(upright_wh, width * k, height * k, left, top)
    return Span.whole(upright_wh)  # sizes no draft explains


@dataclass
class GraphPhoto:
    """A photo decoded for a graph: ``image`` (JPEG-drafted where the graph needs fewer pixels), the ``span`` it
    covers on the upright photo (what results map back to), and the full ``photo`` when one is drawn on and returned."""

    image: Image.Image
    span: Span
    photo: Image.Image | None

    @property
    def size(self) -> tuple[int, int]:
        """The upright photo's width and height."""
        return self.span.size

    def in_colour(self, data: bytes, max_pixels: int) -> Image.Image:
        """The whole photo in colour: ``image`` when the draft left it whole and it is RGB, else ``data`` decoded again."""
        whole = self.image.size == self.span.size and self.image.mode == "RGB"
        return self.image if whole else decode_image(data, max_pixels, "RGB")


def decode_for_graph(
    data: bytes, max_pixels: int, color: str, draft_size: tuple[int, int] | None, keep_photo: bool
) -> GraphPhoto:
    """The graph's input is decoded alike whatever is returned (a drawn-on photo must not change the
    answer); the full photo is decoded a second time only when the draft made the first one smaller."""
    opened = open_image(data, max_pixels)
    if keep_photo and max(opened.size) > JPEG_MAX_SIDE:  # libjpeg's limit: the drawn photo could not be encoded
        width, height = opened.size
        raise ApiError(
            422,
            "invalid_parameter",
            f"the drawn-on photo is returned as JPEG, at most {JPEG_MAX_SIDE:,} px a side; this one is {width}x{height}: "
            "ask for the JSON answer",
        )
    # Before the draft shrinks it (only a JPEG is drafted); the header is parsed once (hostile ones take seconds).
    # Not for a PNG: its EXIF lookup decodes the pixels and swallows a decode error (a corrupt PNG answered 200).
    orientation = _orientation(opened) if opened.format == "JPEG" else 1
    width, height = opened.size  # as stored: the draft makes it the decoded size
    image = load_image(opened, color, draft_size)
    if opened.format == "JPEG":
        span = draft_span(image.size, (height, width) if orientation in (5, 6, 7, 8) else (width, height), orientation)
    else:
        span = Span.whole(image.size)
    photo = None
    if keep_photo:  # in colour whatever the graph takes: boxes and masks are drawn on the photo as sent
        photo = GraphPhoto(image, span, None).in_colour(data, max_pixels)
    return GraphPhoto(image, span, photo)


# Headers read ahead of the decoding (deps.reserve_pixels reads a photo's to take its pixels from the budget): the
# next open_image of those bytes in the same request (its context, which worker threads copy) takes the result
# instead of parsing the header again.
_OPENED_AHEAD: ContextVar[dict[int, tuple[bytes, Image.Image]]] = ContextVar("ocellus_opened_ahead")


def keep_opened(data: bytes, image: Image.Image) -> None:
    """Hand ``image``, :func:`open_image` of ``data``, to the request's next open_image of ``data`` (call it on the
    event loop: a worker thread's context is a copy)."""
    try:
        kept = _OPENED_AHEAD.get()
    except LookupError:
        kept = {}
        _OPENED_AHEAD.set(kept)
    kept[id(data)] = (data, image)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only (format, size) and enforce the pixel limit; no pixel is decoded yet."""
    kept = _OPENED_AHEAD.get(None)
    ahead = kept.pop(id(data), None) if kept else None
    if ahead is not None and ahead[0] is data:  # (an id is only unique while its object lives: the bytes are kept too)
        return ahead[1]
    if not data:
        raise ApiError(400, "empty_image", "the request carries no image bytes")
    check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if _has_image_signature(data):
            raise ApiError(400, "corrupt_image", "the image header is corrupt or truncated") from None
        message = "the upload is not an image we can read (JPEG, PNG, WebP, BMP, TIFF, GIF, PGM/PPM)"
        raise ApiError(415, "unsupported_image", message) from None
    except Exception as error:  # Pillow raises many types on hostile headers
        raise ApiError(400, "corrupt_image", f"the image header cannot be read: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(400, "corrupt_image", "the image has no pixels")
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"{width}x{height} is {width * height:,} pixels; the limit is {max_pixels:,}")
    check_decoding_cost(image, max_pixels)
    return image


def load_image(image: Image.Image, color: str = "RGB", draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an :func:`open_image` result: upright, 8-bit, ``color``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size is not None and image.format == "JPEG":
                side = max(draft_size)
                # An RGB draft only picks a 1/2..1/8 scale; below twice the size it does nothing (and costs ~40 us).
                if color != "RGB" or min(image.size) >= 2 * side:
                    image.draft("RGB" if color == "RGB" else "L", (side, side))
            image.load()
            check_exif(image)  # read now: a PNG's may follow its pixels
            ImageOps.exif_transpose(image, in_place=True)  # a new image would copy every upright photo (24 MP: ~60 ms)
            return _to_8bit(image, color)
    except ApiError:
        raise
    except Exception as error:  # truncated data, bad chunks, broken EXIF...
        raise ApiError(400, "corrupt_image", f"the image data is corrupt or truncated: {error}") from None


def _to_8bit(image: Image.Image, color: str) -> Image.Image:
    """Any Pillow mode (palette, 16-bit, float, alpha, CMYK, ...) -> 8-bit RGB or L."""
    if image.mode.startswith("I;16"):
        # Integers (exactly round(v / 65535 * 255)): 8 bytes a pixel at the peak, where float64 took ~25.
        wide = np.asarray(image).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        image = Image.fromarray(wide.astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), copy=True, nan=0.0, posinf=0.0, neginf=0.0)
        values *= np.float32(255.0 / _white_level(image.mode, values))
        values += np.float32(0.5)
        np.clip(values, 0, 255, out=values)
        image = Image.fromarray(values.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels are shown on white, as a browser would.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "RGB" if color == "RGB" else "L"
    return image if image.mode == target else image.convert(target)


def _white_level(mode: str, values: np.ndarray) -> float:
    """The value that means white in a 32-bit integer or float image: 1 for floats in [0, 1] (the usual
    convention for float TIFFs); otherwise the smallest of 255, 65535 or the image's own maximum that holds
    every value."""
    top = float(values.max(initial=0.0))
    if mode == "F" and top <= 1.0:
        return 1.0
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else top


def _orientation(image: Image.Image) -> int:
    """An opened image's EXIF orientation (1 = upright as stored), as ImageOps.exif_transpose reads it: a value it does
    not know (the text "6") turns nothing, so it must not swap the size either."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is ignored by the decoder as well
        return 1
    return int(orientation) if orientation in range(2, 9) else 1


def to_array(image: Image.Image) -> np.ndarray:
    """``HxWxC`` uint8 (C = 1 for grayscale)."""
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def normalise(pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """``HxWxC`` uint8 -> ``CxHxW`` float32, scaled to [0, 1] then standardised per channel."""
    scale = np.float32(1 / 255)
    x: np.ndarray = pixels.astype(np.float32) * scale
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
