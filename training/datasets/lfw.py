"""LFW as served in ``../shared/datasets/lfw``: 160x160 centre crops, 5-point landmarks, official pairs.

- ``images/<Name>/<Name>_NNNN.jpg``; ``landmarks.txt``: ``Name/Name_NNNN.jpg`` then 10 numbers
  (left eye, right eye, nose, left and right mouth corner; x y each, in the crop's pixels);
- ``pairs/pairsDevTrain.txt`` / ``pairsDevTest.txt`` (View 1) and ``pairs.txt`` (View 2): a header,
  then ``name i j`` (same person) or ``name1 i name2 j`` (different people).

Nothing here is trained on DevTest people: :func:`pair_people` lists them so recipes can leave
them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets.voc import BoxedImage

FACE = "face"


@dataclass(frozen=True)
class Pair:
    a: str  # path relative to images/, e.g. "Abdullah_Gul/Abdullah_Gul_0013.jpg"
    b: str
    same: bool


def image_path(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def read_pairs(path: Path) -> list[Pair]:
    pairs: list[Pair] = []
    for line in path.read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3:
            pairs.append(Pair(image_path(parts[0], int(parts[1])), image_path(parts[0], int(parts[2])), True))
        elif len(parts) == 4:
            pairs.append(Pair(image_path(parts[0], int(parts[1])), image_path(parts[2], int(parts[3])), False))
    return pairs


def pair_people(path: Path) -> set[str]:
    """Every person named in a pairs file (their folder names)."""
    return {p.split("/")[0] for pair in read_pairs(path) for p in (pair.a, pair.b)}


def read_landmarks(root: Path) -> dict[str, np.ndarray]:
    """``relative path -> [5, 2]`` float32 landmarks in the 160x160 crop's pixels."""
    marks: dict[str, np.ndarray] = {}
    for line in (root / "landmarks.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 11:
            marks[parts[0]] = np.asarray(parts[1:], np.float32).reshape(5, 2)
    return marks


def landmark_box(points: np.ndarray) -> np.ndarray:
    """A square face box (x1, y1, x2, y2) from 5 landmarks, roughly brows to chin.

    Centred between the eyes' and the mouth corners' midpoints; the side is 2.2 times the larger
    of the eye-to-mouth distance and the eye distance (the former survives turned heads, the
    latter tilted ones).
    """
    eyes = points[:2].mean(0)
    mouth = points[3:5].mean(0)
    scale = max(float(np.linalg.norm(mouth - eyes)), float(np.linalg.norm(points[1] - points[0])))
    centre = (eyes + mouth) / 2
    half = 1.1 * scale
    return np.asarray([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], np.float32)


def boxed_faces(root: Path, exclude_people: frozenset[str] | set[str] = frozenset()) -> list[BoxedImage]:
    """One ``face`` box per image (from its landmarks), people in ``exclude_people`` left out."""
    records: list[BoxedImage] = []
    for rel, points in sorted(read_landmarks(root).items()):
        if rel.split("/")[0] in exclude_people:
            continue
        box = np.clip(landmark_box(points), 0, 160)[None]
        records.append(BoxedImage(root / "images" / rel, box.astype(np.float32), [FACE], [False]))
    return records


def images_by_person(paths: list[str]) -> dict[str, list[str]]:
    """Relative image paths grouped by person (folder name), in sorted order."""
    people: dict[str, list[str]] = {}
    for rel in sorted(paths):
        people.setdefault(rel.split("/")[0], []).append(rel)
    return people


def held_out_people(people: dict[str, list[str]], count: int, seed: int, min_images: int = 2, max_images: int = 20) -> set[str]:
    """A seeded choice of ``count`` people with ``min_images..max_images`` photos, for validation and
    threshold calibration (the cap keeps a few very frequent people from eating the training data)."""
    eligible = sorted(p for p, images in people.items() if min_images <= len(images) <= max_images)
    order = np.random.default_rng(seed).permutation(len(eligible))
    return {eligible[i] for i in order[: min(count, len(eligible))]}


def all_pairs(paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair of ``paths`` as index arrays ``(i, j)`` and ``same`` (same person)."""
    people = np.asarray([p.split("/")[0] for p in paths])
    i, j = np.triu_indices(len(paths), k=1)
    return i, j, people[i] == people[j]
