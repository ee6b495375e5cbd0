"""Classification: resize + normalise, then softmax and top-k over the logits."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.images import normalise, to_array
from service.manifest import Manifest


def resize_to(image: Image.Image, height: int, width: int) -> Image.Image:
    """The classifier's resize, shared with training (which caches its images through it)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)


def preprocess(image: Image.Image, manifest: Manifest) -> np.ndarray:
    """An upright decoded image -> ``[1, C, H, W]`` float32 as the manifest describes."""
    spec = manifest.input
    if spec.size is not None:
        image = resize_to(image, *spec.size)
    return normalise(to_array(image), spec.mean, spec.std)[None]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict[str, object]]:
    """The ``k`` most probable classes of one image's ``logits`` ``[C]``, best first."""
    probabilities = softmax(logits.astype(np.float64))
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"label": labels[i] if i < len(labels) else str(i), "index": int(i), "probability": float(probabilities[i])} for i in best
    ]
