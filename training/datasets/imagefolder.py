"""ImageFolder datasets (``root/<class>/<image>``) decoded once into uint8 tensors in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import make_dataset

from service.tasks.classification import resize_to
from training.datasets import is_photo, read_photo
from training.datasets.copies import copied_indices


@dataclass
class TensorImages:
    """Images as a uint8 ``[N, 3, H, W]`` tensor with integer labels and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    names: list[str]  # each image's path under its folder (class/file), to name it in messages

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> TensorImages:
        names = [self.names[i] for i in indices.tolist()]
        return TensorImages(self.images[indices], self.labels[indices], self.classes, names)

    def copies_of(self, other: TensorImages) -> list[str]:
        """The names of these images that copy one of ``other``'s (a photo in both splits; ``training.datasets.copies``)."""
        as_arrays = lambda images: images.permute(0, 2, 3, 1).numpy()  # noqa: E731  (channels last, as decoded)
        found = copied_indices(as_arrays(self.images), as_arrays(other.images))
        return [self.names[i] for i in found]


def _decode(path: str, size: int | None) -> np.ndarray:
    """Pixels exactly as the service feeds them to a classifier of input ``size``: its JPEG draft and its resize."""
    if size is None:
        return np.asarray(read_photo(path, "RGB"))
    return np.asarray(resize_to(read_photo(path, "RGB", draft_size=(size, size)), size, size))


def load_image_folder(
    root: Path, size: int | None = None, classes: list[str] | None = None, limit_per_class: int | None = None
) -> TensorImages:
    """Decode every image under ``root/<class>/`` (optionally resized to ``size`` x ``size``).

    ``classes`` fixes the label order (so a test split uses the training split's labels);
    ``limit_per_class`` keeps the first images of each class, for smoke runs.
    """
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise ValueError(f"{root} holds no class folders (root/<class>/<image>)")
    class_to_idx = {name: index for index, name in enumerate(found)}
    if classes is not None:
        missing = sorted(set(found) - set(classes))
        if missing:
            raise ValueError(f"{root} has classes the training split lacks: {missing}")
        class_to_idx = {name: index for index, name in enumerate(classes)}
        class_to_idx = {name: class_to_idx[name] for name in found}
    samples = make_dataset(str(root), class_to_idx, is_valid_file=lambda path: is_photo(path, root))
    if limit_per_class is not None:
        kept: dict[int, int] = {}
        limited = []
        for path, label in samples:
            if kept.get(label, 0) < limit_per_class:
                kept[label] = kept.get(label, 0) + 1
                limited.append((path, label))
        samples = limited
    if not samples:
        raise ValueError(f"no images found under {root}")
    # Filled in place, one image at a time: the dataset is held once (a list of arrays, then a stack of
    # them, then a transposed copy held it three times at the peak: 9 GB for 20,000 images of 224 px).
    first = _decode(samples[0][0], size)
    images = torch.empty((len(samples), first.shape[2], first.shape[0], first.shape[1]), dtype=torch.uint8)
    pixels = images.numpy()  # the same memory, written through numpy (Pillow's arrays are read-only)
    for index, (path, _) in enumerate(samples):
        array = first if index == 0 else _decode(path, size)
        if array.shape != first.shape:
            raise ValueError(
                f"images under {root} differ in size ({path}: {array.shape[1]}x{array.shape[0]}, "
                f"{samples[0][0]}: {first.shape[1]}x{first.shape[0]}); pass --image-size"
            )
        pixels[index] = array.transpose(2, 0, 1)
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    names = [Path(path).relative_to(root).as_posix() for path, _ in samples]
    return TensorImages(images, labels, classes or found, names)
