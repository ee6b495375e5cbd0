"""Annotations drawn on a photo's stored pixels, turned upright as ``read_photo`` turns the photo.

A phone photo is often stored sideways with an EXIF orientation; the service and training read it upright.
Annotation tools that ignore the tag record boxes and masks in the stored pixels. When the size they record (a
VOC file's ``<size>``, a mask's shape) is the stored size of a photo that turns sideways, they are turned with
the photo. For a mirror or a half-turn (orientations 2-4), or a square photo, the size cannot tell which pixels
were annotated: they are taken as upright, as the photo is shown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112
# What PIL's ImageOps.exif_transpose does for each orientation (1 is upright).
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def stored_orientation(path: Path) -> tuple[int, tuple[int, int]]:
    """The photo's EXIF orientation (1 when it has none) and its stored ``(width, height)``, from the header."""
    with Image.open(path) as image:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
        orientation = orientation if orientation in TRANSPOSES else 1
        width, height = image.size
        if image.format == "TIFF" and orientation >= 5:  # Pillow reports (and decodes) a TIFF upright already
            width, height = height, width
        return orientation, (width, height)


def drawn_on_stored_pixels(orientation: int, stored: tuple[int, int], annotated: tuple[int, int] | None) -> bool:
    """Whether annotations of ``annotated`` (width, height) were evidently drawn on a photo's ``stored`` pixels."""
    return orientation >= 5 and stored[0] != stored[1] and annotated == stored


def upright_boxes(boxes: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """``[K, 4]`` x1 y1 x2 y2 boxes in the stored ``width x height`` pixels of a sideways photo (orientation 5-8,
    the only ones :func:`drawn_on_stored_pixels` can tell) -> in the upright photo's pixels."""
    w, h = float(width), float(height)
    turn = {  # where a stored point (x, y) lands upright
        5: lambda x, y: (y, x),
        6: lambda x, y: (h - y, x),
        7: lambda x, y: (h - y, w - x),
        8: lambda x, y: (y, w - x),
    }[orientation]
    (ax, ay), (bx, by) = turn(boxes[:, 0], boxes[:, 1]), turn(boxes[:, 2], boxes[:, 3])
    return np.stack([np.minimum(ax, bx), np.minimum(ay, by), np.maximum(ax, bx), np.maximum(ay, by)], axis=1)


def upright_mask(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A ``uint8`` label mask in the stored pixels, turned upright exactly as the photo is."""
    return np.asarray(Image.fromarray(mask).transpose(TRANSPOSES[orientation]))
