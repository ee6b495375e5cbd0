"""Denoising: tiled numpy pre/post-processing around a fully convolutional graph.

The graph maps a noisy image to the clean one (``[N, C, H, W]`` in, the same out; pixels in
[0, 1] before the manifest's mean/std), for any ``H x W`` that is a multiple of its stride
(``defaults.stride``). Any photo size is served with bounded memory:

1. the photo is cut into windows of ``defaults.tile`` pixels (a multiple of the stride) that
   overlap by ``2 * defaults.overlap``; windows start on multiples of the stride (so a U-Net's
   down-sampling grid is the whole image's) and the last one ends on the photo's size rounded
   up to the stride, reflect-padded there exactly as a whole-image run would be;
2. every window's output is kept only in its core: the window minus ``overlap`` pixels on each
   side that has a neighbour (cropped-centre stitching). With ``overlap`` at least the
   network's receptive-field radius a core pixel sees exactly what it would in a whole-image
   run, so there are no seams to blend away;
3. only ``RUN_PIXELS`` worth of windows exist as float32 at a time (one graph run); the result is
   written straight into the uint8 output, so a 24-megapixel photo never exists as float32 at all.

Colour photos through a grayscale model go channel by channel (each channel is one sample of
the batch: the noise in the three channels is independent); a grayscale photo through a colour
model is replicated to three channels and the mean of the outputs is kept.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from service.manifest import Manifest

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
DEFAULT_BATCH = 4  # default-sized windows (x channels) per graph run
# Samples x pixels per graph run: four 512x512 windows. It bounds the float32 in flight and ONNX Runtime's
# arena, which kept its largest run's memory for good (one 2048-pixel tile took a server from 2.5 to 5.3 GB) until
# runs this large shrank it after them (service/runtime.py).
RUN_PIXELS = DEFAULT_BATCH * DEFAULT_TILE**2
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class Window:
    """One graph input: rows ``y0:y0+h`` x columns ``x0:x0+w`` (may end past the photo: padded);
    its output is kept in the core ``cy0:cy1`` x ``cx0:cx1`` (photo coordinates)."""

    y0: int
    x0: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def spans(length: int, tile: int, overlap: int, stride: int) -> list[tuple[int, int, int]]:
    """1-D windows ``(start, core_start, core_end)`` of size ``min(tile, length rounded up to stride)``."""
    padded = round_up(length, stride)
    if padded <= tile:
        return [(0, 0, length)]
    step = tile - 2 * overlap
    starts = list(range(0, padded - tile, step))
    starts.append(padded - tile)  # the last window ends where a whole-image run's padding ends
    result = []
    for i, start in enumerate(starts):
        # Cores meet half-way through the overlap of two neighbours (at least `overlap` inside each).
        core_start = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        core_end = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        result.append((start, core_start, core_end))
    return result


def tile_settings(manifest: Manifest, tile: int | None = None, overlap: int | None = None) -> tuple[int, int, int]:
    """``(tile, overlap, stride)``: the request's override or the manifest's defaults, aligned to the stride.
    Without an overlap override, a small tile keeps at most a third of itself as overlap (less context, so
    faint seams become possible below ~3x the model's overlap)."""
    stride = manifest.stride
    tile = round_up(int(tile or manifest.defaults.get("tile", DEFAULT_TILE)), stride)
    if overlap is None:
        overlap = min(int(manifest.defaults.get("overlap", DEFAULT_OVERLAP)), tile // 3 // stride * stride)
    overlap = min(round_up(overlap, stride), (tile - stride) // 2)  # a window must keep a core
    return tile, overlap, stride


def plan(height: int, width: int, tile: int, overlap: int, stride: int) -> tuple[list[Window], tuple[int, int]]:
    """Every window of an ``height x width`` photo and the common window size ``(h, w)``."""
    rows, cols = spans(height, tile, overlap, stride), spans(width, tile, overlap, stride)
    size = (min(tile, round_up(height, stride)), min(tile, round_up(width, stride)))
    windows = [Window(y0, x0, cy0, cy1, cx0, cx1) for y0, cy0, cy1 in rows for x0, cx0, cx1 in cols]
    return windows, size


def _cut(pixels: np.ndarray, window: Window, size: tuple[int, int]) -> np.ndarray:
    """``h x w x C`` pixels of the window, reflect-padded where it runs past the photo."""
    height, width = pixels.shape[:2]
    h, w = size
    part = pixels[window.y0 : min(window.y0 + h, height), window.x0 : min(window.x0 + w, width)]
    pad_h, pad_w = h - part.shape[0], w - part.shape[1]
    if pad_h or pad_w:
        # numpy reflects repeatedly when the pad exceeds the side; a 1-pixel side can only repeat.
        mode: Literal["reflect", "edge"] = "reflect" if min(part.shape[:2]) > 1 else "edge"
        part = np.pad(part, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
    return part


class Tiler:
    """Splits a ``H x W x C`` photo (uint8, or floats in [0, 1]) into graph batches and stitches the uint8 result."""

    def __init__(self, pixels: np.ndarray, manifest: Manifest, tile: int | None = None, overlap: int | None = None) -> None:
        self.pixels = pixels
        self.manifest = manifest
        self.model_channels = manifest.input.channels
        height, width, channels = pixels.shape
        self.windows, self.size = plan(height, width, *tile_settings(manifest, tile, overlap))
        self.output = np.empty((height, width, channels), np.uint8)
        spec = manifest.input
        self.mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
        # Samples per window: a colour photo through a grayscale model is three samples.
        self.per_window = channels if self.model_channels == 1 else 1
        self.batch_windows = max(1, RUN_PIXELS // (self.size[0] * self.size[1] * self.per_window))

    def batches(self) -> Iterator[tuple[list[Window], np.ndarray]]:
        """``(windows, inputs)`` with ``inputs`` the normalised float32 ``[n, C, h, w]`` graph input."""
        for first in range(0, len(self.windows), self.batch_windows):
            group = self.windows[first : first + self.batch_windows]
            cuts = np.stack([_cut(self.pixels, window, self.size) for window in group])  # n x h x w x C uint8
            x = cuts.transpose(0, 3, 1, 2).astype(np.float32)
            if self.pixels.dtype == np.uint8:
                x *= np.float32(1 / 255)  # else already [0, 1] floats (the evaluation's unquantised noisy images)
            if self.model_channels == 1:
                x = x.reshape(-1, 1, *self.size)  # channel-major within a window: [w0c0, w0c1, w0c2, w1c0, ...]
            elif x.shape[1] == 1:
                x = np.repeat(x, self.model_channels, axis=1)
            yield group, np.ascontiguousarray((x - self.mean) / self.std)

    def stitch(self, group: list[Window], outputs: np.ndarray) -> None:
        """Write the cores of a batch's ``outputs`` (``[n, C, h, w]``) into the uint8 result."""
        y = outputs * self.std + self.mean
        channels = self.pixels.shape[2]
        if self.model_channels == 1:
            y = y.reshape(len(group), channels, *self.size)
        elif channels == 1:
            y = y.mean(axis=1, keepdims=True)
        for window, out in zip(group, y, strict=True):
            core = out[:, window.cy0 - window.y0 : window.cy1 - window.y0, window.cx0 - window.x0 : window.cx1 - window.x0]
            self.output[window.cy0 : window.cy1, window.cx0 : window.cx1] = to_uint8(core.transpose(1, 2, 0))

    def run(self, model: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The whole photo through ``model`` (a synchronous ``inputs -> outputs``), for evaluation and benchmarks."""
        for group, inputs in self.batches():
            self.stitch(group, model(inputs))
        return self.output


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded and clipped (what a PNG can carry)."""
    return np.clip(x * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)


def is_grayscale(image: Image.Image) -> bool:
    """The upload's own mode says grayscale (then the answer is a grayscale PNG too)."""
    if image.mode == "P":
        palette = np.asarray(image.getpalette() or [], np.uint8).reshape(-1, 3)
        return bool(len(palette)) and bool((palette == palette[:, :1]).all())
    return image.mode in GRAY_MODES


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a ``H x W x C`` uint8 result (mode L for one channel, RGB for three)."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, "L" if pixels.shape[2] == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: large photos, lossless either way
    return buffer.getvalue()
