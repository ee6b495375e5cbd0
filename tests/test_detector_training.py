"""Detector recipe smoke runs on real photos (train -> export with parity -> served), and the box readers."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from service.manifest import Manifest, Task
from service.repository import file_sha256
from tests.conftest import DATASETS, ROOT, start_server
from training.__main__ import main as train
from training.datasets.voc import load_boxes, make_split

FACEMASK = DATASETS / "facemask"
PENNFUDAN = DATASETS / "pennfudan"
TINY = ["--widths", "8", "16", "32", "32", "--depths", "0", "1", "1", "1", "--neck-width", "16"]


def smoke(tmp: Path, name: str, data_dir: Path, *extra: str) -> Path:
    train(
        [
            "detector",
            "--data-dir",
            str(data_dir),
            "--name",
            name,
            "--limit",
            "12",
            "--batch-size",
            "6",
            "--image-size",
            "128",
            "--crop",
            "96",
            *TINY,
            "--workers",
            "0",
            "--no-bf16",  # tiny channel counts are slow in bf16 on the CPU
            "--seed",
            "3",
            "--models-dir",
            str(tmp / "models"),
            "--runs-dir",
            str(tmp / "runs"),
            *extra,
        ]
    )
    return tmp / "models" / name


@pytest.mark.slow
def test_train_export_and_serve(tmp_path: Path) -> None:
    folder = smoke(tmp_path, "tiny-det", FACEMASK, "--epochs", "2", "--stop-after", "1")
    assert not folder.exists()  # stopped early on purpose: nothing exported yet
    folder = smoke(tmp_path, "tiny-det", FACEMASK, "--epochs", "2", "--resume")
    history = [json.loads(line) for line in (tmp_path / "runs" / "tiny-det" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2] and "val_any_ap50" in history[-1]
    smoke(tmp_path / "straight", "tiny-det", FACEMASK, "--epochs", "2")  # the same run without the interruption
    runs = tmp_path / "straight" / "runs" / "tiny-det" / "metrics.jsonl"
    straight = [json.loads(line) for line in runs.read_text().splitlines()]
    for resumed, uninterrupted in zip(history, straight, strict=True):  # the checkpoint carries every random state
        numbers = {key for key in resumed if key.startswith(("train_", "val_"))}
        assert numbers == {key for key in uninterrupted if key.startswith(("train_", "val_"))} and "train_loss" in numbers
        for key in numbers:
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-6), key

    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.json", "card.md", "curves.png"}
    manifest = Manifest.read(folder)
    assert manifest.task == Task.detection and manifest.sha256 == file_sha256(folder / "model.onnx")
    assert manifest.labels == ["mask_weared_incorrect", "with_mask", "without_mask"]
    assert manifest.input.size == (128, 128) and manifest.input.resize == "letterbox"
    assert manifest.outputs == {"boxes": "boxes", "scores": "scores"}
    assert 0 < manifest.defaults["score_threshold"] < 1 and manifest.defaults["iou_threshold"] == 0.5
    metrics = manifest.metrics
    assert metrics["images"] == 3 and {"any_ap50", "map50", "map", "latency_640px_ms"} <= set(metrics)
    assert metrics["parity_max_abs_graph_diff"] <= 2e-3 and metrics["parity_max_box_px"] <= 1.0
    assert manifest.training["seed"] == 3 and "--limit" in manifest.training["command"]
    assert "AP@0.5" in (folder / "card.md").read_text()

    with start_server(models_dir=tmp_path / "models") as live, live.client() as http:
        photo = sorted((FACEMASK / "images").iterdir())[0]
        response = http.post("/v1/detect", params={"score_threshold": 0.0}, files={"file": photo.open("rb")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny-det" and (body["width"], body["height"]) == Image.open(photo).size


@pytest.mark.slow
def test_trains_on_a_user_pascal_voc_folder(tmp_path: Path) -> None:
    """A VOC layout (Annotations/ + JPEGImages/) with other class names, made from Penn-Fudan photos; the first
    six are there twice (again as PNG: the same pixels in another file), so some copies straddle the split."""
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for index, sample in enumerate(load_boxes(PENNFUDAN)[:16]):
        objects = "".join(
            f"<object><name>pedestrian</name><difficult>0</difficult><bndbox><xmin>{b[0]:.0f}</xmin><ymin>{b[1]:.0f}</ymin>"
            f"<xmax>{b[2]:.0f}</xmax><ymax>{b[3]:.0f}</ymax></bndbox></object>"
            for b in sample.boxes
        )
        width, height = Image.open(sample.path).size
        files = [(sample.key, sample.path.name)] + ([(f"{sample.key}-again", f"{sample.key}-again.png")] if index < 6 else [])
        for key, name in files:
            if name.endswith(".png"):
                Image.open(sample.path).save(voc / "JPEGImages" / name)
            else:
                shutil.copy(sample.path, voc / "JPEGImages" / name)
            (voc / "Annotations" / f"{key}.xml").write_text(
                f"<annotation><filename>{name}</filename><size><width>{width}</width>"
                f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>"
            )
    folder = smoke(tmp_path, "voc-det", voc, "--epochs", "1", "--limit", "40")  # all of them
    manifest = Manifest.read(folder)
    assert manifest.labels == ["pedestrian"] and manifest.metrics["split"].startswith("seeded 20%")
    split = json.loads((tmp_path / "runs" / "voc-det" / "split.json").read_text())
    assert len(split["train"]) + len(split["test"]) == 22 and not set(split["train"]) & set(split["test"])
    # Each test photo whose twin trains is a copy: counted, named, and the scores given without them.
    twin = lambda key: key.removesuffix("-again") if key.endswith("-again") else f"{key}-again"  # noqa: E731
    expected = sorted(Path(key).name for key in split["test"] if twin(key) in split["train"])
    stems = sorted(Path(name).stem for name in manifest.metrics.get("test_copies_of_training", []))
    assert expected and stems == expected, (stems, expected)
    assert manifest.metrics["without_copies"]["images"] == len(split["test"]) - len(expected)
    card = (folder / "card.md").read_text()
    assert f"{len(expected)} of these test photos cop" in card and "test_copies_of_training |" not in card


def test_pennfudan_boxes_are_read() -> None:
    samples = load_boxes(PENNFUDAN)
    assert len(samples) == 170 and sum(len(s.boxes) for s in samples) == 423
    assert {name for s in samples for name in s.names} == {"person"}
    for sample in samples[:20]:
        width, height = Image.open(sample.path).size
        assert (
            (sample.boxes >= 0).all() and (sample.boxes[:, [0, 2]] <= width).all() and (sample.boxes[:, [1, 3]] <= height).all()
        )


def test_facemask_boxes_and_the_committed_split() -> None:
    samples = load_boxes(FACEMASK)
    assert len(samples) == 853 and sum(len(s.boxes) for s in samples) == 4072
    counts = {
        name: sum(n == name for s in samples for n in s.names) for name in ("with_mask", "without_mask", "mask_weared_incorrect")
    }
    assert counts == {"with_mask": 3232, "without_mask": 717, "mask_weared_incorrect": 123}
    assert all(s.path.suffix == ".jpg" for s in samples)  # the XMLs name .png files that are stored as .jpg

    split = json.loads((ROOT / "training" / "splits" / "facemask.json").read_text())
    assert len(split["train"]) == 682 and len(split["test"]) == 171
    assert not set(split["train"]) & set(split["test"])
    assert set(split["train"]) | set(split["test"]) == {s.key for s in samples}
    assert make_split([s.key for s in samples], split["seed"], split["test_fraction"]) == {
        "train": split["train"],
        "test": split["test"],
    }


def test_voc_reader_skips_degenerate_boxes(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "a.png")
    (tmp_path / "annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>9</xmin><ymin>9</ymin><xmax>9</xmax><ymax>15</ymax></bndbox></object>"
        "</annotation>"
    )
    (sample,) = load_boxes(tmp_path)
    assert sample.path.name == "a.png" and sample.names == ["cat"] and sample.difficult == [True]
    np.testing.assert_array_equal(sample.boxes, [[1, 2, 30, 20]])


def test_voc_reader_clips_boxes_to_the_photo_and_names_a_broken_file(tmp_path: Path) -> None:
    """From an own-data hunt: a box past the photo's edge was kept unclipped (scored against clipped predictions), one
    wholly outside counted as an object no detector can find; a truncated XML, or macOS's ._a.xml beside a.xml,
    ended the run in a ParseError traceback naming no file, and a coordinate of '12px' named none either."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "a.png")
    xml = (
        "<annotation><filename>a.png</filename>"
        "<object><name>cat</name><bndbox><xmin>-5</xmin><ymin>-4</ymin><xmax>500</xmax><ymax>30</ymax></bndbox></object>"
        "<object><name>dog</name><bndbox><xmin>90</xmin><ymin>90</ymin><xmax>99</xmax><ymax>99</ymax></bndbox></object>"
        "</annotation>"
    )
    (tmp_path / "annotations" / "a.xml").write_text(xml)
    (tmp_path / "annotations" / "._a.xml").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (sample,) = load_boxes(tmp_path)
    assert sample.names == ["cat"]
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 50, 30]])
    (tmp_path / "annotations" / "a.xml").write_text(xml[:60])
    with pytest.raises(ValueError, match=r"a\.xml: not a readable Pascal VOC annotation"):
        load_boxes(tmp_path)
    (tmp_path / "annotations" / "a.xml").write_text(xml.replace("<xmin>-5</xmin>", "<xmin>12px</xmin>"))
    with pytest.raises(ValueError, match=r"a\.xml: a box coordinate is not a number"):
        load_boxes(tmp_path)


def test_a_class_boxed_in_held_out_photos_only_is_named() -> None:
    """From an own-data hunt: a class found only in test photos became an output nothing taught, its AP 0 in the mAP."""
    from training.datasets.voc import BoxedImage
    from training.detector import Source, untrained_classes

    def photo(name: str) -> BoxedImage:
        return BoxedImage(Path(f"{name}.jpg"), np.array([[1, 1, 5, 5]], np.float32), [name], [False])

    source = Source(Path("mine"), [photo("cat")], [photo("dog")], [photo("helmet"), photo("cat")], "test")
    assert untrained_classes([source], ["cat", "dog", "helmet"]) == ["dog", "helmet"]


def test_photos_a_split_file_leaves_out_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """From an own-data hunt: a folder named as a committed split file (training/splits/facemask.json) took it, and
    its photos the file does not list were left out without a word."""
    from training.detector import add_arguments, load_splits

    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (50, 40)).save(tmp_path / "images" / f"{name}.png")
        (tmp_path / "annotations" / f"{name}.xml").write_text(
            "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>20</ymax>"
            "</bndbox></object></annotation>"
        )
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(tmp_path), "--val-fraction", "0"])
    train_photos, _, test_photos, _ = load_splits(args, tmp_path, split)
    assert [p.key for p in train_photos + test_photos] == ["a", "b"]
    assert "1 photos of" in capsys.readouterr().out


def test_photos_without_a_single_box_are_refused_before_training(tmp_path: Path) -> None:
    root = tmp_path / "negatives"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for photo in sorted((FACEMASK / "images").iterdir())[:6]:
        shutil.copy(photo, root / "images" / photo.name)
        (root / "annotations" / f"{photo.stem}.xml").write_text(
            f"<annotation><filename>{photo.name}</filename><size><width>10</width><height>10</height></size></annotation>"
        )
    with pytest.raises(SystemExit, match="no annotated object"):
        smoke(tmp_path, "negatives", root, "--epochs", "1")
    assert not (tmp_path / "models").exists() and not list(tmp_path.rglob("checkpoint.pt"))  # no epoch ran


def test_training_letterboxes_the_upright_photo_the_service_sees(tmp_path: Path) -> None:
    """A phone photo stored sideways (EXIF orientation 6) is trained on as shown, where its boxes are."""
    from service.images import decode_image
    from service.tasks import detection
    from training.datasets.voc import BoxedImage
    from training.detector import Cached

    upright = Image.open(DATASETS / "facemask" / "images" / "maksssksksss1.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned by 90 degrees; shown upright
    stored = tmp_path / "sideways.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(stored, quality=95, exif=exif)
    sample = BoxedImage(stored, np.array([[10, 20, 60, 80]], np.float32), ["with_mask"], [False])
    cached = Cached([sample], ["with_mask"], 128, [0.5, 0.5, 0.5])
    served = decode_image(stored.read_bytes(), 10**9, "RGB")
    assert served.size == upright.size
    canvas, _ = detection.letterbox_image(served, (128, 128), detection.fill_color([0.5, 0.5, 0.5]))
    assert np.array_equal(cached.images[0].permute(1, 2, 0).numpy(), np.asarray(canvas))


@pytest.mark.parametrize("orientation", [1, 5, 6, 7, 8])
def test_boxes_and_masks_drawn_on_a_sideways_photo_land_on_its_upright_pixels(tmp_path: Path, orientation: int) -> None:
    """Tools that ignore EXIF annotate the stored pixels (the VOC <size> is the stored size): the boxes fell outside
    the upright photo, or on other pixels, without a word. A white square in the stored pixels must be where its box
    and its mask say in the photo as read. (A mirror or half-turn keeps the size: nothing tells, they stay as given.)"""
    from training.datasets import read_photo
    from training.datasets.masks import _load
    from training.datasets.voc import read_voc_xml

    stored = np.zeros((80, 200, 3), np.uint8)
    stored[10:30, 150:190] = 255  # x 150-190, y 10-30 of the stored 200x80 pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "images").mkdir()
    Image.fromarray(stored).save(tmp_path / "images" / "phone.jpg", quality=100, exif=exif)
    (tmp_path / "phone.xml").write_text(
        "<annotation><filename>phone.jpg</filename><size><width>200</width><height>80</height></size><object>"
        "<name>face</name><bndbox><xmin>150</xmin><ymin>10</ymin><xmax>190</xmax><ymax>30</ymax></bndbox></object></annotation>"
    )
    sample = read_voc_xml(tmp_path / "phone.xml", tmp_path / "images")
    shown = np.asarray(read_photo(sample.path, "GRAY"))
    x1, y1, x2, y2 = sample.boxes[0].astype(int)
    assert shown[y1:y2, x1:x2].mean() > 240 and (shown > 128).sum() == pytest.approx((x2 - x1) * (y2 - y1), rel=0.1)
    mask = (stored[..., 0] > 0).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    loaded = _load([(sample.path, tmp_path / "mask.png")], ["background", "face"], "GRAY", lambda m: m.astype(np.uint8))
    assert np.array_equal(loaded.masks[0].astype(bool), shown > 128)


def test_annotations_whose_size_cannot_tell_are_taken_as_upright(tmp_path: Path) -> None:
    from training.datasets.orientation import drawn_on_stored_pixels, stored_orientation
    from training.datasets.voc import read_voc_xml

    assert drawn_on_stored_pixels(6, (200, 80), (200, 80))  # stored 200x80, upright 80x200: evidently stored
    assert not drawn_on_stored_pixels(6, (200, 80), (80, 200))  # the upright size: drawn upright
    assert not drawn_on_stored_pixels(3, (200, 80), (200, 80))  # a half-turn keeps the size: no evidence
    assert not drawn_on_stored_pixels(6, (80, 80), (80, 80))  # a square photo: no evidence
    # Pillow opens a TIFF upright already: its stored size is the other way round (an upright box was turned off it).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (200, 80)).save(tmp_path / "sideways.tif", exif=exif)
    assert stored_orientation(tmp_path / "sideways.tif") == (6, (200, 80))
    (tmp_path / "inf.xml").write_text(  # a <size> of inf: no size (it raised OverflowError)
        "<annotation><filename>sideways.tif</filename><size><width>inf</width><height>80</height></size></annotation>"
    )
    assert read_voc_xml(tmp_path / "inf.xml", tmp_path).path.name == "sideways.tif"


def test_augmentation_moves_boxes_with_their_pixels() -> None:
    """Canvases black but for white rectangles exactly where their boxes say: after any flip, scale jitter,
    crop and colour jitter, every box must still hold white pixels and nearly no white may lie outside."""
    import torch

    from training.detector import Augmented

    canvases, boxes = torch.zeros(3, 3, 64, 64, dtype=torch.uint8), []
    for index, box in enumerate([(6, 10, 26, 50), (40, 4, 60, 20), (20, 30, 56, 44)]):  # x1 y1 x2 y2, off-centre
        x1, y1, x2, y2 = box
        canvases[index, :, y1:y2, x1:x2] = 255
        boxes.append(torch.tensor([box], dtype=torch.float32))
    labels = [torch.tensor([0]) for _ in boxes]
    data = Augmented(SimpleNamespace(images=canvases, boxes=boxes, labels=labels), 48, (0.6, 1.4), (0, 0, 0))  # type: ignore[arg-type]
    torch.manual_seed(0)
    checked = 0
    for _ in range(20):
        for index in range(len(boxes)):
            image, kept, _ = data[index]
            white = image.float().mean(0) > 128
            inside = torch.zeros_like(white)
            for x1, y1, x2, y2 in kept.round().int().tolist():
                assert white[y1:y2, x1:x2].float().mean() > 0.8, (x1, y1, x2, y2)
                inside[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = True
                checked += 1
            inside[:, :3], inside[:, -3:], inside[:3], inside[-3:] = True, True, True, True  # slivers under 2 px are dropped
            assert (white & ~inside).sum() <= 0.02 * max(int(white.sum()), 1)  # a box cropped away took its pixels along
    assert checked > 30
