"""Dataset readers. Every image file is decoded exactly as the service decodes an upload of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from service.api.errors import ApiError
from service.images import decode_image

MAX_PIXELS = 200_000_000  # training photos are trusted; this only stops a mistaken giant file
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # what the service reads


def is_photo(path: str | Path, root: str | Path) -> bool:
    """A photo file under ``root`` by its suffix, unless it or a folder on its way is hidden (``.ipynb_checkpoints/``,
    macOS's ``._photo.jpg`` metadata files)."""
    relative = Path(path).relative_to(root)
    return relative.suffix.lower() in PHOTO_SUFFIXES and not any(part.startswith(".") for part in relative.parts)


def read_photo(path: str | Path, color: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """``path`` as the service sees it: EXIF-upright, 16-bit scaled to 8, alpha on white, ``color`` "RGB" or
    "GRAY", and a large JPEG decoded at a reduced scale when the model's input ``draft_size`` allows (as the
    service decodes it for that model). A file that is not a readable image is a ``ValueError`` naming it."""
    try:
        return decode_image(Path(path).read_bytes(), MAX_PIXELS, color, draft_size=draft_size)
    except ApiError as error:
        raise ValueError(f"{path}: {error.detail.replace('the upload', 'the file', 1)}") from None


class ChannelStatistics:
    """Per-channel mean and standard deviation (unbiased) of 8-bit pixels, in [0, 1]: the manifest's input
    normalisation. Summed in float64 a part at a time, so no float copy of a whole training set is made."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.count = 0

    def add(self, pixels: np.ndarray) -> None:
        """``pixels``: channels last (``[..., C]``), values 0..255."""
        flat = np.asarray(pixels).reshape(-1, pixels.shape[-1]).astype(np.float64)
        if self.total is None or self.squares is None:
            self.total, self.squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        self.total += flat.sum(0)
        self.squares += np.square(flat).sum(0)
        self.count += len(flat)

    def result(self) -> tuple[list[float], list[float]]:
        if self.total is None or self.squares is None or self.count < 2:
            raise ValueError("channel statistics need at least two pixels")
        mean = self.total / self.count
        variance = np.maximum(self.squares - self.count * np.square(mean), 0) / (self.count - 1)
        return (mean / 255).tolist(), (np.sqrt(variance) / 255).tolist()
