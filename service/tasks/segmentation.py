"""Semantic segmentation: numpy pre/post-processing around a fully convolutional graph.

The graph takes any ``H x W`` that is a multiple of its stride (``defaults.stride``, 16 for a
4-level U-Net) and returns logits ``[N, C, H, W]``. Per request:

1. the longer side is scaled down to ``defaults.max_side`` (the scale the model was trained
   at: people then have the size the network learnt, and the cost stays bounded for camera
   photos); smaller images run at their own size;
2. the normalised image is reflect-padded at the bottom/right to a multiple of the stride
   (reflection keeps the border statistics natural, zeros would read as a dark frame);
3. the logits are cropped back to the unpadded region, resized bilinearly to the original
   image size one class at a time, and only then reduced by argmax, so the label map has
   exactly the input's size and smooth boundaries (argmax-then-resize gives blocky edges).

COCO run-length encoding (``rle_encode``/``rle_decode``) is column-major like pycocotools, in
either form: ``counts`` as a list of ints (uncompressed) or COCO's compact ASCII string.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
from PIL import Image

from service.images import Span, normalise, to_array
from service.manifest import Manifest

# Label-map palette: background black, then distinct colours (a PNG viewer shows them, while the
# pixel values stay the class indices).
COLORS = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
    ],
    np.uint8,
)


def model_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` with the longer side scaled down to ``max_side`` (never up)."""
    longest = max(width, height)
    if not max_side or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def pad_to_multiple(x: np.ndarray, stride: int) -> np.ndarray:
    """``C x H x W`` -> reflect-padded at the bottom and right to multiples of ``stride``."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % stride, -width % stride
    if not pad_h and not pad_w:
        return x
    # numpy reflects repeatedly when the pad exceeds the side; a 1-pixel side can only repeat.
    mode: Literal["reflect", "edge"] = "reflect" if min(height, width) > 1 else "edge"
    return np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def preprocess(image: Image.Image, manifest: Manifest) -> np.ndarray:
    """An upright decoded image -> ``[1, C, H', W']`` float32: scaled to max_side, normalised, padded."""
    spec = manifest.input
    size = model_size(*image.size, manifest.defaults.get("max_side"))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return pad_to_multiple(normalise(to_array(image), spec.mean, spec.std), manifest.stride)[None]


def labels_from_logits(logits: np.ndarray, model_hw: tuple[int, int], span: Span) -> np.ndarray:
    """``logits`` ``[C, H', W']`` -> uint8 label map of the photo's size.

    ``model_hw`` is the unpadded size the image had in the graph; ``span`` the photo pixels that image covers
    (:func:`service.images.draft_span`; ``Span.whole(size)`` for an image stretched over the photo).
    """
    height, width = model_hw
    logits = logits[:, :height, :width].astype(np.float32, copy=False)
    out_w, out_h = span.size
    if (width, height) == span.size:
        return logits.argmax(0).astype(np.uint8)
    left, top = span.left, span.top

    def upsample(channel: np.ndarray) -> np.ndarray:
        scaled = Image.fromarray(np.ascontiguousarray(channel), mode="F").resize(
            (span.width, span.height), Image.Resampling.BILINEAR
        )
        return np.asarray(scaled)[top : top + out_h, left : left + out_w]

    if len(logits) == 2:
        # Bilinear resizing is linear: resizing the logit margin gives the same argmax at half the work.
        return (upsample(logits[1] - logits[0]) > 0).astype(np.uint8)
    best = upsample(logits[0]).copy()  # Pillow's buffer is read-only
    labels = np.zeros(best.shape, np.uint8)
    for index in range(1, len(logits)):
        scores = upsample(logits[index])
        better = scores > best
        labels[better] = index
        np.maximum(best, scores, out=best)
    return labels


def class_pixels(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=classes)[:classes]


def palette_png(labels: np.ndarray) -> bytes:
    """The label map as a palette PNG: pixel values are class indices, the palette makes it viewable."""
    image = Image.fromarray(labels, mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(COLORS)] = COLORS
    image.putpalette(palette.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def overlay(image: Image.Image, labels: np.ndarray, opacity: float) -> Image.Image:
    """The photo with every non-background class tinted in its colour: blended by Pillow in 8 bits (float32 copies of
    a 49-megapixel photo took 2.6 GB)."""
    colors = Image.fromarray(COLORS[labels % len(COLORS)], "RGB")
    alpha = Image.fromarray(np.where(labels > 0, np.uint8(round(opacity * 255)), np.uint8(0)), "L")
    return Image.composite(colors, image.convert("RGB"), alpha)


# --- COCO run-length encoding -------------------------------------------------------------


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary ``H x W`` mask in column-major order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def counts_to_string(counts: list[int]) -> str:
    """COCO's compressed form (pycocotools ``rleToString``): deltas in 5-bit groups as ASCII 48+."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def string_to_counts(text: str) -> list[int]:
    """Inverse of :func:`counts_to_string` (pycocotools ``rleFrString``)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_encode(mask: np.ndarray, compressed: bool = True) -> dict[str, object]:
    """``{"size": [h, w], "counts": str | list[int]}`` as COCO stores a segmentation mask."""
    counts = rle_counts(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(counts) if compressed else counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (either form) -> boolean ``H x W`` mask."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"the runs cover {sum(runs)} pixels, the size {height}x{width} has {height * width}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True  # runs alternate 0, 1, 0, ... starting with zeros
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")
