"""dlib's face-recognition ResNet as a distillation teacher: one 128-d embedding per LFW image.

A training-time extra only (``pip install -e '.[teacher]'``); the served model never calls it.
The teacher sees its own 150x150 chip aligned by its 5-point shape predictor. The face rectangle
given to the shape predictor is the HOG detection nearest the LFW landmark box, or that landmark
box itself when HOG finds nothing there. Embeddings (of the photo and of its mirror image) are
cached in one ``.npz`` keyed by the image's path relative to ``images/``; the cache is resumable.

``python -m training.face_teacher --out runs/face-teacher/teacher.npz``
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from training.datasets import lfw
from training.files import durable_write

DIM = 128


def teacher_files() -> tuple[Path, Path]:
    # find_spec, not import: the package's __init__ imports pkg_resources, which is not installed.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the teacher needs: pip install -e '.[teacher]'")
    models = Path(spec.submodule_search_locations[0]) / "models"
    return models / "dlib_face_recognition_resnet_model_v1.dat", models / "shape_predictor_5_face_landmarks.dat"


class Teacher:
    def __init__(self) -> None:
        net, predictor = teacher_files()  # first: it names the install command when the extra is missing
        try:
            import dlib
        except ImportError:
            raise SystemExit("the teacher needs dlib: pip install -e '.[teacher]'") from None

        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor))
        self.net = dlib.face_recognition_model_v1(str(net))

    def rectangle(self, image: np.ndarray, box: np.ndarray) -> tuple[object, bool]:
        """The HOG detection overlapping ``box`` best (IoU >= 0.3), else ``box`` itself; and whether HOG found it."""
        best, best_iou = None, 0.3
        for det in self.detector(image, 1):
            d = np.asarray([det.left(), det.top(), det.right(), det.bottom()], np.float32)
            inter = np.prod(np.clip(np.minimum(d[2:], box[2:]) - np.maximum(d[:2], box[:2]), 0, None))
            iou = inter / (np.prod(d[2:] - d[:2]) + np.prod(box[2:] - box[:2]) - inter)
            if iou >= best_iou:
                best, best_iou = det, iou
        if best is not None:
            return best, True
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        return self.dlib.rectangle(x1, y1, x2, y2), False

    def embed(self, image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, bool]:
        rect, found = self.rectangle(image, box)
        shape = self.predictor(image, rect)
        return np.asarray(self.net.compute_face_descriptor(image, shape), np.float32), found


def mirrored_box(box: np.ndarray, width: int) -> np.ndarray:
    return np.asarray([width - box[2], box[1], width - box[0], box[3]], np.float32)


def load(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path) as cache:
        return {k: cache[k] for k in cache.files}


def extract(root: Path, out: Path, paths: list[str], flips: bool, save_every: int = 500) -> dict[str, np.ndarray]:
    """Teacher embeddings of ``paths`` (relative to ``images/``) added to the cache at ``out``; returns the whole cache."""
    marks = lfw.read_landmarks(root)
    cache = load(out)
    done = {p: i for i, p in enumerate(cache.get("paths", np.asarray([], str)).tolist())}
    emb = {p: cache["embedding"][i] for p, i in done.items()}
    emb_flip = {p: cache["embedding_flip"][i] for p, i in done.items() if cache["has_flip"][i]}
    hog = {p: bool(cache["hog"][i]) for p, i in done.items()}
    teacher = Teacher()

    def save() -> None:
        keys = sorted(emb)
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(file: BinaryIO) -> None:
            np.savez(
                file,
                paths=np.asarray(keys),
                embedding=np.stack([emb[k] for k in keys]) if keys else np.zeros((0, DIM), np.float32),
                embedding_flip=np.stack([emb_flip.get(k, np.zeros(DIM, np.float32)) for k in keys])
                if keys
                else np.zeros((0, DIM), np.float32),
                has_flip=np.asarray([k in emb_flip for k in keys], bool),
                hog=np.asarray([hog[k] for k in keys], bool),
            )

        durable_write(out, write)

    # Plain pass first, the mirrored pass second: the plain one alone is enough to train on.
    for flip in [False, True] if flips else [False]:
        todo = [p for p in paths if p not in (emb_flip if flip else emb)]
        start = time.perf_counter()
        for n, rel in enumerate(todo, 1):
            image = np.asarray(Image.open(root / "images" / rel).convert("RGB"))
            box = np.clip(lfw.landmark_box(marks[rel]), 0, image.shape[1])
            if flip:
                vec, _ = teacher.embed(np.ascontiguousarray(image[:, ::-1]), mirrored_box(box, image.shape[1]))
                emb_flip[rel] = vec
            else:
                emb[rel], hog[rel] = teacher.embed(image, box)
            if n % save_every == 0 or n == len(todo):
                save()
                rate = (time.perf_counter() - start) / n
                print(f"{'mirrored' if flip else 'plain'}: {n}/{len(todo)} {1000 * rate:.0f} ms/face", flush=True)
    save()
    return load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/lfw"))
    parser.add_argument("--out", type=Path, default=Path("runs/face-teacher/teacher.npz"))
    parser.add_argument("--no-flips", action="store_true", help="skip the mirrored copies")
    args = parser.parse_args()
    exclude = lfw.pair_people(args.data / "pairs" / "pairsDevTest.txt")
    paths = sorted(p for p in lfw.read_landmarks(args.data) if p.split("/")[0] not in exclude)
    extract(args.data, args.out, paths, flips=not args.no_flips)


if __name__ == "__main__":
    main()
