"""Box-annotated datasets: Pascal VOC XML folders (facemask, anything a user brings) and Penn-Fudan.

Each reader returns :class:`BoxedImage` records (the image path, its boxes in pixels as
x1, y1, x2, y2 and a class name per box); decoding is left to the recipe, which caches the
letterboxed pixels once.

Layouts understood by :func:`load_boxes`:

- ``root/annotations/*.xml`` + ``root/images/*`` (facemask; Kaggle style),
- ``root/Annotations/*.xml`` + ``root/JPEGImages/*`` (Pascal VOC),
- ``root/annotations/*.txt`` + ``root/images/*`` (Penn-Fudan "PASCAL Annotation Version 1.00").

The image of an XML is found by its ``<filename>`` stem, whatever the extension (facemask's
XMLs name ``.png`` files that were re-encoded as ``.jpg``). Objects marked ``difficult`` are
kept and flagged.
"""

from __future__ import annotations

import json
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.datasets import PHOTO_SUFFIXES
from training.datasets.orientation import drawn_on_stored_pixels, stored_orientation, upright_boxes

PENNFUDAN_BOX = re.compile(r"Bounding box for object \d+ .*?:\s*\((\d+),\s*(\d+)\)\s*-\s*\((\d+),\s*(\d+)\)")


@dataclass
class BoxedImage:
    path: Path
    boxes: np.ndarray  # [K, 4] float32, x1 y1 x2 y2 in pixels of the upright image (EXIF applied, as served)
    names: list[str]
    difficult: list[bool] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The name a split file lists (the file stem)."""
        return self.path.stem


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in PHOTO_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def read_voc_xml(xml_path: Path, image_dir: Path) -> BoxedImage:
    """One Pascal VOC annotation file; raises ``ValueError`` when its image is missing."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:  # (a SyntaxError: it ended the run in a traceback naming no file)
        raise ValueError(f"{xml_path}: not a readable Pascal VOC annotation ({error})") from None
    filename = root.findtext("filename") or xml_path.stem
    image = _find_image(image_dir, Path(filename).stem) or _find_image(image_dir, xml_path.stem)
    if image is None:
        raise ValueError(f"{xml_path}: no image {Path(filename).stem}.* in {image_dir}")
    boxes, names, difficult = [], [], []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            continue
        try:
            x1, y1, x2, y2 = (float(bndbox.findtext(tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as error:
            raise ValueError(f"{xml_path}: a box coordinate is not a number ({error})") from None
        if not (x2 > x1 and y2 > y1):
            continue  # degenerate or missing coordinates
        boxes.append((x1, y1, x2, y2))
        names.append((obj.findtext("name") or "object").strip())
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    array = np.asarray(boxes, np.float32).reshape(-1, 4)
    orientation, stored = stored_orientation(image)
    if drawn_on_stored_pixels(orientation, stored, _declared_size(root)):
        array = upright_boxes(array, orientation, *stored).astype(np.float32)
    # Clipped to the photo, and dropped when nothing of them is in it: a box past the edge was scored unclipped
    # against clipped predictions, and one wholly outside counted as an object no detector can find.
    width, height = (stored[1], stored[0]) if orientation >= 5 else stored
    array = np.clip(array, 0, [width, height, width, height]).astype(np.float32)
    keep = np.flatnonzero((array[:, 2] > array[:, 0]) & (array[:, 3] > array[:, 1]))
    return BoxedImage(image, array[keep], [names[i] for i in keep], [difficult[i] for i in keep])


def _declared_size(root: ET.Element) -> tuple[int, int] | None:
    """The annotation's ``<size>`` (width, height), None when it has none or it does not parse."""
    try:
        return int(float(root.findtext("size/width") or "nan")), int(float(root.findtext("size/height") or "nan"))
    except (ValueError, OverflowError):  # not a number; inf
        return None


def read_pennfudan_txt(txt_path: Path, image_dir: Path) -> BoxedImage:
    """One Penn-Fudan annotation; its coordinates are 1-based inclusive, ours are 0-based continuous."""
    image = _find_image(image_dir, txt_path.stem)
    if image is None:
        raise ValueError(f"{txt_path}: no image {txt_path.stem}.* in {image_dir}")
    boxes = [
        (float(x1) - 1, float(y1) - 1, float(x2), float(y2)) for x1, y1, x2, y2 in PENNFUDAN_BOX.findall(txt_path.read_text())
    ]
    return BoxedImage(image, np.asarray(boxes, np.float32).reshape(-1, 4), ["person"] * len(boxes), [False] * len(boxes))


def load_boxes(root: Path) -> list[BoxedImage]:
    """Every annotated image under ``root`` (see the module docstring for the layouts), sorted by name."""
    for labels_dir, images in (("annotations", "images"), ("Annotations", "JPEGImages")):
        xmls = sorted(path for path in (root / labels_dir).glob("*.xml") if not path.name.startswith("."))  # (macOS's ._*)
        if xmls:
            return [read_voc_xml(path, root / images) for path in xmls]
    texts = sorted((root / "annotations").glob("*.txt"))
    if texts:
        return [read_pennfudan_txt(path, root / "images") for path in texts]
    raise FileNotFoundError(f"{root}: expected annotations/*.xml + images/, Annotations/*.xml + JPEGImages/ or annotations/*.txt")


def class_names(samples: list[BoxedImage]) -> list[str]:
    return sorted({name for sample in samples for name in sample.names})


def make_split(keys: list[str], seed: int, test_fraction: float) -> dict[str, list[str]]:
    """A seeded split by image: ``{"train": [...], "test": [...]}``, each sorted."""
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    held = round(len(order) * test_fraction)
    return {"train": sorted(order[held:]), "test": sorted(order[:held])}


def read_split(path: Path) -> dict[str, list[str]]:
    split = json.loads(path.read_text())
    if set(split["train"]) & set(split["test"]):
        raise ValueError(f"{path}: train and test share images")
    return split


def write_split(path: Path, split: dict[str, list[str]], **info: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, "train": split["train"], "test": split["test"]}, indent=1) + "\n")
