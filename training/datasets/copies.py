"""Held-out photos that are copies of training photos: the same photo saved into both splits, maybe re-encoded or
resized. A copy's held-out score measures memory, not generalisation.

Two photos count as copies when their 16x16 grey thumbnails correlate above ``SAME_PHOTO`` (0.99): the
facemask data set holds byte-identical files, re-encodings (correlation 1.0) and one re-shot frame (0.9996),
while its most alike distinct photos correlate below 0.98.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from training.datasets import read_photo

SAME_PHOTO = 0.99
THUMBNAIL = 16


def thumbnail(image: Image.Image) -> np.ndarray:
    """The photo as a standardised 16x16 grey thumbnail (256 values; zeros for a flat photo)."""
    small = np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX), np.float32).ravel()
    spread = small.std()
    return (small - small.mean()) / spread if spread > 1e-6 else np.zeros_like(small)


def _copies(held_out: list[np.ndarray], training: list[np.ndarray], chunk: int = 1024) -> list[int]:
    """Indices of the ``held_out`` thumbnails that correlate above SAME_PHOTO with a ``training`` one, a chunk of
    rows at a time (CIFAR-10's 10,000 x 50,000 correlations at once would take 2 GB)."""
    if not held_out or not training:
        return []
    reference = np.stack(training).T
    found: list[int] = []
    for start in range(0, len(held_out), chunk):
        best = (np.stack(held_out[start : start + chunk]) @ reference).max(axis=1) / THUMBNAIL**2
        found += [start + int(i) for i in np.flatnonzero(best > SAME_PHOTO)]
    return found


def copies_of_training(held_out: Iterable[Path], training: Iterable[Path]) -> list[Path]:
    """The ``held_out`` photos (as the service decodes them) that copy a ``training`` photo."""
    held = list(held_out)
    found = _copies([thumbnail(read_photo(p, "RGB")) for p in held], [thumbnail(read_photo(p, "RGB")) for p in training])
    return [held[i] for i in found]


def copied_indices(held_out: Iterable[np.ndarray], training: Iterable[np.ndarray]) -> list[int]:
    """The same for photos already decoded (HxW or HxWxC uint8): the indices of the ``held_out`` copies."""
    thumbs = lambda images: [thumbnail(Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)) for a in images]  # noqa: E731
    return _copies(thumbs(held_out), thumbs(training))


def _copy(count: int) -> str:
    return "copies a training photo" if count == 1 else "copy training photos"


def _listed(names: Sequence[str], most: int | None = None) -> str:
    shown = names[:most] if most else names
    return f" ({', '.join(shown)}{', ...' if len(shown) < len(names) else ''})" if names else ""


def copies_warning(names: Sequence[str], held_out: int, split: str) -> str:
    """The line printed before training: how many held-out photos copy training ones, and which."""
    return (
        f"warning: {len(names)} of the {held_out} {split} photos {_copy(len(names))}{_listed(names, 5)}; their score "
        "overstates the score on unseen photos: move each copy to one side of the split"
    )


def copies_note(names: Sequence[str]) -> str:
    """The model card's sentence on them."""
    return (
        f"**{len(names)} of these test photos {_copy(len(names))}**{_listed(names)} (the same photo, perhaps re-encoded or "
        "resized), so these numbers overstate those on unseen photos; move each copy to one side of the split and train again."
    )
