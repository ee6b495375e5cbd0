"""Denoising data: clean image folders (Train400), noisy copies for Noise2Void, patches and N2V masking.

Train400 is 400 clean 180x180 grayscale crops; colour models train on colour photos (e.g. the
Penn-Fudan and facemask photos, shrunk to hide their JPEG blocks). Images are ``C x H x W``; the
last ``val_count`` of the folders, by name, are held out for per-epoch validation (the test sets
Set12 / BSD68 / CBSD68 are never used for training or selection). Noise2Void reads only a
folder of *noisy* images: a user's own, or a fixed-sigma noisy copy of the training images
written once by :func:`write_noisy_copy` (float32 ``.npy``, unclipped, like the test protocol),
so the N2V training code has no path to the clean pixels.
"""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from training.datasets import is_photo, read_photo
from training.files import durable_write


def image_paths(folder: Path, limit: int | None = None) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if is_photo(p, folder) or (p.suffix == ".npy" and not p.name.startswith(".")))
    if not paths:
        raise FileNotFoundError(f"no images in {folder}")
    return paths[:limit]


def read_image(path: Path, color: bool = False, reduce: int = 1) -> np.ndarray:
    """``C x H x W`` float32 in [0, 1], C = 3 with ``color`` else 1: an 8-bit image file, or a float ``.npy``
    (noisy copies). ``reduce`` shrinks an image file by that factor with a box filter, which averages away
    JPEG blocks and camera noise in photos that serve as clean targets."""
    if path.suffix == ".npy":
        array = np.load(path).astype(np.float32)
        return array if array.ndim == 3 else array[None]
    image = read_photo(path, "RGB" if color else "GRAY")
    if reduce > 1:
        image = image.reduce(reduce)
    array = np.asarray(image, np.float32) / np.float32(255)
    return np.ascontiguousarray(array.transpose(2, 0, 1)) if color else array[None]


def split_clean(folders: list[Path], val_count: int, limit: int | None = None) -> tuple[list[Path], list[Path]]:
    """Training and held-out validation paths: the images of ``folders`` in order, the last ``val_count`` held out."""
    paths = [path for folder in folders for path in image_paths(folder)][:limit]
    if val_count >= len(paths):
        raise ValueError(f"{', '.join(map(str, folders))} hold {len(paths)} images; cannot hold out {val_count}")
    return paths[: len(paths) - val_count], paths[len(paths) - val_count :]


def noisy_version(clean: np.ndarray, sigma: float, seed: int, name: str) -> np.ndarray:
    """``clean`` (float [0, 1]) plus Gaussian noise of ``sigma`` / 255, seeded by (seed, sigma, name)."""
    rng = np.random.default_rng([seed, round(sigma * 100), zlib.crc32(name.encode())])
    return clean + rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma / 255)


def write_noisy_copy(
    paths: list[Path], sigma: float, seed: int, runs_dir: Path, color: bool = False, reduce: int = 1
) -> list[Path]:
    """A fixed noisy copy of ``paths`` under ``runs_dir`` (files reused when there): the only data N2V reads.

    The folder is named by what makes the copy (sigma, seed, colour, reduce), so a run with other
    settings never reuses it; files are numbered, so same-named photos of two folders both count.
    Returns the copies of ``paths`` alone: the folder may hold others from an earlier run (with more
    training images, or another --data-dir), which would leak held-out images into the training.
    """
    out_dir = runs_dir / f"noisy-s{sigma:g}-seed{seed}-{'rgb' if color else 'gray'}-r{reduce}"
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for index, path in enumerate(paths):
        target = out_dir / f"{index:05d}-{path.stem}.npy"
        if not target.exists():  # written whole or not at all: a killed run leaves no torn copy to reuse
            noisy = noisy_version(read_image(path, color, reduce), sigma, seed, path.stem)
            durable_write(target, functools.partial(np.save, arr=noisy))
        copies.append(target)
    return copies


def stack(images: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(image)) for image in images]  # C x H x W each


def random_patches(images: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size`` crops in random dihedral orientations (flips, 90-degree turns): ``[count, C, s, s]``."""
    picks = torch.randint(len(images), (count,), generator=generator).tolist()
    patches = []
    for index in picks:
        image = images[index]
        height, width = image.shape[-2:]
        while height < size or width < size:  # small images are reflected up to the patch size (a reflection
            # adds at most the side minus one, so a patch over twice the side takes several)
            mode = "reflect" if min(height, width) > 1 else "replicate"  # a 1-pixel side has nothing to mirror
            limit = (width - 1, height - 1) if mode == "reflect" else (size, size)
            grow_w, grow_h = min(max(0, size - width), limit[0]), min(max(0, size - height), limit[1])
            image = torch.nn.functional.pad(image[None], (0, grow_w, 0, grow_h), mode=mode)[0]
            height, width = image.shape[-2:]
        y = int(torch.randint(height - size + 1, (1,), generator=generator))
        x = int(torch.randint(width - size + 1, (1,), generator=generator))
        patch = image[:, y : y + size, x : x + size]
        turns, flip = torch.randint(4, (2,), generator=generator).tolist()
        patch = torch.rot90(patch, turns, (1, 2))
        patches.append(patch.flip(2) if flip % 2 else patch)
    return torch.stack(patches)


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index >= length, 2 * (length - 1) - index, index)


def n2v_mask(
    x: torch.Tensor, fraction: float, radius: int, generator: torch.Generator, attempts: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise2Void blind spots: ``(inputs, mask)`` for a batch ``x`` ``[N, C, H, W]``.

    Stratified sampling: the patch is divided into cells of ``1 / fraction`` pixels and one pixel
    of each cell is drawn. Each drawn pixel's value is replaced (in every channel) by that of a
    random other pixel within ``radius`` (reflected at the border, never itself). A replacement
    is never taken from another blind spot (that would show the network the hidden value one pixel
    away): such draws are redrawn, and a pixel still without a clean source is dropped from the
    mask and keeps its value. ``mask`` (``[N, 1, H, W]`` bool) marks the pixels the loss uses;
    no input pixel carries the original value of any masked pixel.
    """
    n, _, height, width = x.shape
    cell = max(1, round(math.sqrt(1 / fraction)))
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    ys = torch.arange(rows)[None, :, None] * cell + torch.randint(cell, (n, rows, cols), generator=generator)
    xs = torch.arange(cols)[None, None, :] * cell + torch.randint(cell, (n, rows, cols), generator=generator)
    batch = torch.arange(n)[:, None, None].expand(n, rows, cols)
    inside = (ys < height) & (xs < width)
    batch, ys, xs = batch[inside], ys[inside], xs[inside]
    mask = torch.zeros(n, 1, height, width, dtype=torch.bool)
    mask[batch, 0, ys, xs] = True

    offsets = torch.tensor([(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy or dx])
    source_y, source_x = ys.clone(), xs.clone()
    pending = torch.ones(len(ys), dtype=torch.bool)
    for _ in range(attempts):
        index = pending.nonzero()[:, 0]
        if not len(index):
            break
        pick = offsets[torch.randint(len(offsets), (len(index),), generator=generator)]
        source_y[index] = _reflect(ys[index] + pick[:, 0], height)
        source_x[index] = _reflect(xs[index] + pick[:, 1], width)
        pending[index] = mask[batch[index], 0, source_y[index], source_x[index]]
    keep = ~pending
    mask[batch[pending], 0, ys[pending], xs[pending]] = False
    batch, ys, xs, source_y, source_x = batch[keep], ys[keep], xs[keep], source_y[keep], source_x[keep]
    inputs = x.clone()
    inputs[batch, :, ys, xs] = x[batch, :, source_y, source_x]
    return inputs, mask
