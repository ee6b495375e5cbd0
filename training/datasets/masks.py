"""Image + mask folders for segmentation: Penn-Fudan, ISBI 2012 membranes, and a user's own.

Every reader returns :class:`MaskSplit` objects: the full-resolution photos (uint8 ``HxWxC``)
with their label maps (uint8 ``HxW``, values = class indices, :data:`IGNORE` = not labelled),
the file paths (the test protocol re-reads the photo bytes the way the service would) and the
class names.

- ``pennfudan``: ``images/*.jpg`` + ``masks/*_mask.png`` instance masks, merged into
  person (any instance) vs background; first 120 images (sorted by name) train, last 50 test.
- ``isbi2012``: ``train/image/N.png`` + ``train/label/N.png`` (255 = cell, 0 = membrane);
  the last 5 of the 30 slices (numeric order) are held out.
- a user's folder: ``images/`` + ``masks/`` (mask = same stem, optionally ``_mask``, any image
  format, pixel value = class index or 0/255 for binary), or ``train/`` and ``test/`` each
  holding such a pair; class names from ``labels.txt`` (one a line) when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.datasets import is_photo, read_photo
from training.datasets.orientation import drawn_on_stored_pixels, stored_orientation, upright_mask

IGNORE = 255  # label of pixels that no loss or metric counts (padding, unlabelled)


@dataclass
class MaskSplit:
    paths: list[Path]
    images: list[np.ndarray]  # HxWxC uint8, full resolution
    masks: list[np.ndarray]  # HxW uint8 class indices
    labels: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: list[int]) -> MaskSplit:
        return MaskSplit(
            [self.paths[i] for i in indices], [self.images[i] for i in indices], [self.masks[i] for i in indices], self.labels
        )


def read_image(path: Path, color: str) -> np.ndarray:
    array = np.asarray(read_photo(path, color))
    return array[:, :, None] if array.ndim == 2 else array


def read_mask(path: Path) -> np.ndarray:
    """Class indices (or a 0/255 binary mask) from a gray, palette or 16-bit file. An RGB file passes only
    when its channels are equal: colour-coded masks (red = class 1, ...) would read as arbitrary gray levels."""
    with Image.open(path) as image:
        if image.mode in ("L", "P", "1", "I", "I;16"):
            return np.asarray(image).astype(np.int64)
        pixels = np.asarray(image.convert("RGB"))
    if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
        raise ValueError(
            "a colour-coded mask; masks hold class indices (gray values 0, 1, 2... or a palette PNG), "
            "so map each colour to its index first"
        )
    return pixels[..., 0].astype(np.int64)


def _binary_or_indices(mask: np.ndarray) -> np.ndarray:
    """0/255 masks are binary (255 -> 1); anything else already holds class indices."""
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    if values.max() >= IGNORE:
        raise ValueError(f"mask values go up to {values.max()}; class indices must stay below {IGNORE}")
    return mask.astype(np.uint8)


def _load(pairs: list[tuple[Path, Path]], labels: list[str], color: str, convert) -> MaskSplit:
    images, masks = [], []
    for image_path, mask_path in pairs:
        image = read_image(image_path, color)
        try:
            mask = convert(read_mask(mask_path))
        except (OSError, ValueError) as error:  # a truncated file, a colour-coded mask...: which one
            raise ValueError(f"{mask_path}: {error}") from None
        orientation, stored = stored_orientation(image_path)
        if drawn_on_stored_pixels(orientation, stored, (mask.shape[1], mask.shape[0])):
            mask = upright_mask(mask, orientation)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{image_path.name} is {image.shape[:2]} but its mask {mask_path.name} is {mask.shape}")
        images.append(image)
        masks.append(mask)
    return MaskSplit([p for p, _ in pairs], images, masks, labels)


def pennfudan(root: Path, limit: int | None = None) -> tuple[MaskSplit, MaskSplit]:
    images = sorted((root / "images").iterdir())
    pairs = [(p, root / "masks" / f"{p.stem}_mask.png") for p in images]
    if len(pairs) != 170:
        raise ValueError(f"{root} should hold the 170 Penn-Fudan photos, found {len(pairs)}")
    train, test = pairs[:120], pairs[-50:]
    if limit is not None:
        train, test = train[:limit], test[:limit]

    def merge(mask: np.ndarray) -> np.ndarray:
        return (mask > 0).astype(np.uint8)  # instance k -> person

    labels = ["background", "person"]
    return _load(train, labels, "RGB", merge), _load(test, labels, "RGB", merge)


def isbi2012(root: Path, limit: int | None = None, held_out: int = 5) -> tuple[MaskSplit, MaskSplit]:
    images = sorted((root / "train" / "image").glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    pairs = [(p, root / "train" / "label" / p.name) for p in images]
    train, test = pairs[:-held_out], pairs[-held_out:]
    if limit is not None:
        train, test = train[:limit], test[:limit]

    def binary(mask: np.ndarray) -> np.ndarray:
        return (mask > 127).astype(np.uint8)  # labels are 0/255 but may carry interpolation greys

    labels = ["membrane", "cell"]
    return _load(train, labels, "GRAY", binary), _load(test, labels, "GRAY", binary)


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    masks = {}
    for path in (folder / "masks").iterdir():
        if is_photo(path, folder):
            stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
            masks[stem] = path
    pairs, missing = [], []
    for path in sorted((folder / "images").iterdir()):
        if is_photo(path, folder):
            if path.stem in masks:
                pairs.append((path, masks[path.stem]))
            else:
                missing.append(path.name)
    if missing:
        raise ValueError(f"{len(missing)} images under {folder / 'images'} have no mask, e.g. {missing[:3]}")
    if not pairs:
        raise ValueError(f"no image + mask pairs under {folder}")
    return pairs


def image_mask_folder(
    root: Path, color: str, val_fraction: float, seed: int, limit: int | None = None
) -> tuple[MaskSplit, MaskSplit, str]:
    """A user's folder: ``train/`` + ``test/`` pairs, or one pair with a seeded held-out fraction."""
    if (root / "train" / "images").is_dir():
        train_pairs = _pairs(root / "train")
        test_pairs = _pairs(root / "test") if (root / "test" / "images").is_dir() else None
    else:
        train_pairs, test_pairs = _pairs(root), None
    split = "test"
    if test_pairs is None:
        order = np.random.default_rng(seed).permutation(len(train_pairs))
        held = max(1, round(len(train_pairs) * val_fraction))
        test_pairs = [train_pairs[i] for i in sorted(order[:held])]
        train_pairs = [train_pairs[i] for i in sorted(order[held:])]
        split = f"seeded {val_fraction:.0%} of the pairs"
    if limit is not None:
        train_pairs, test_pairs = train_pairs[:limit], test_pairs[:limit]
    train = _load(train_pairs, [], color, _binary_or_indices)
    test = _load(test_pairs, [], color, _binary_or_indices)
    values = [set(np.unique(m).tolist()) - {IGNORE} for m in train.masks + test.masks]  # each mask's classes
    largest = [max(classes, default=0) for classes in values]
    count = max(max(largest) + 1, 2)
    top = f"the mask of {(train.paths + test.paths)[int(np.argmax(largest))].name}"  # one holding the largest index
    names_file = root / "labels.txt"
    if names_file.is_file():
        labels = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(labels) < count:
            raise ValueError(f"{names_file} names {len(labels)} classes but the masks use {count} (up to {count - 1} in {top})")
    else:
        # Every class a mask implies must be in some mask: a mask saved 0/128 (or 0/254, or as JPEG) among 0/255 ones
        # made a model of 129 classes, 126 of them in no mask, trained and served without a word.
        present = set().union(*values)
        if absent := [index for index in range(count) if index not in present]:
            raise ValueError(
                f"the masks imply {count} classes (values up to {count - 1}, e.g. in {top}) but no mask holds "
                f"{len(absent)} of them ({', '.join(map(str, absent[:5]))}{'...' if len(absent) > 5 else ''}): save "
                "masks as 0/255 (binary) or as class indices 0, 1, 2..., or name the classes in labels.txt"
            )
        labels = ["background", "foreground"] if count == 2 else ["background"] + [f"class_{i}" for i in range(1, count)]
    train.labels = test.labels = labels
    return train, test, split
