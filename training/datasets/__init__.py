"""Dataset readers. Every image file is decoded exactly as the service decodes an upload of it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from service.api.errors import ApiError
from service.images import decode_image

MAX_PIXELS = 200_000_000  # training photos are trusted; this only stops a mistaken giant file


def read_photo(path: str | Path, color: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """``path`` as the service sees it: EXIF-upright, 16-bit scaled to 8, alpha on white, ``color`` "RGB" or
    "GRAY", and a large JPEG decoded at a reduced scale when the model's input ``draft_size`` allows (as the
    service decodes it for that model). A file that is not a readable image is a ``ValueError`` naming it."""
    try:
        return decode_image(Path(path).read_bytes(), MAX_PIXELS, color, draft_size=draft_size)
    except ApiError as error:
        raise ValueError(f"{path}: {error.detail.replace('the upload', 'the file', 1)}") from None
