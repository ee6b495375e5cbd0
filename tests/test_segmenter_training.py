"""Segmenter smoke runs on real photos: a user's image+mask folder and ISBI 2012 -> export -> served."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from service.manifest import Manifest
from service.repository import file_sha256
from tests.conftest import DATASETS, history, start_server
from training import segmenter
from training.__main__ import main as train
from training.datasets.masks import IGNORE, image_mask_folder, isbi2012, pennfudan

pytestmark = pytest.mark.slow
TINY = ["--base", "4", "--depth", "2", "--max-width", "8", "--max-side", "64", "--crop", "48", "--batch-size", "2"]


def user_folder(root: Path, count: int = 6) -> Path:
    """Penn-Fudan photos as a user would bring them: images/*.jpg + masks/*.png with 0/255 values."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for photo in sorted((DATASETS / "pennfudan" / "images").iterdir())[:count]:
        (root / "images" / photo.name).write_bytes(photo.read_bytes())
        mask = np.asarray(Image.open(DATASETS / "pennfudan" / "masks" / f"{photo.stem}_mask.png")) > 0
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{photo.stem}.png")
    return root


def smoke(tmp: Path, name: str, data: Path, epochs: int, *extra: str) -> Path:
    train(
        [
            "segmenter",
            "--data-dir",
            str(data),
            "--name",
            name,
            "--epochs",
            str(epochs),
            "--eval-every",
            "1",
            "--seed",
            "3",
            "--models-dir",
            str(tmp / "models"),
            "--runs-dir",
            str(tmp / "runs"),
            *TINY,
            *extra,
        ]
    )
    return tmp / "models" / name


def test_user_folder_and_isbi_train_export_and_serve(tmp_path: Path) -> None:
    folder = smoke(tmp_path, "mine", user_folder(tmp_path / "mine"), 2, "--val-fraction", "0.34")
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.json", "card.md", "curves.png"}
    manifest = Manifest.read(folder)
    assert manifest.sha256 == file_sha256(folder / "model.onnx")
    assert manifest.task.value == "segmentation" and manifest.labels == ["background", "foreground"]
    assert manifest.input.size is None and manifest.input.color == "RGB"
    assert manifest.defaults == {"max_side": 64, "stride": 4, "pad": "reflect"}
    assert manifest.metrics["images"] == 2 and manifest.metrics["parity_max_abs_logit_diff"] <= 2e-3
    assert {"iou_foreground", "miou", "dice_foreground", "pixel_accuracy"} <= set(manifest.metrics)
    assert manifest.training["seed"] == 3 and "--val-fraction" in manifest.training["command"]
    card = (folder / "card.md").read_text()
    assert "foreground IoU" in card and 'The "val" curves below are the test split, watched only' in card

    isbi = smoke(tmp_path, "membranes", DATASETS / "isbi2012", 1, "--limit", "3")
    membranes = Manifest.read(isbi)
    assert membranes.input.color == "GRAY" and membranes.labels == ["membrane", "cell"]
    assert len(membranes.input.mean) == 1

    with start_server(models_dir=tmp_path / "models") as live, live.client() as http:
        assert http.get("/readyz").json()["models"] == {"membranes": "ready", "mine": "ready"}
        photo = Image.open(DATASETS / "pennfudan" / "images" / "PennPed00010.jpg").convert("RGB").crop((0, 0, 203, 117))
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        response = http.post("/v1/segment?model=mine", content=buffer.getvalue(), headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (203, 117)
        slice_ = (DATASETS / "isbi2012" / "test" / "0.png").read_bytes()
        response = http.post("/v1/segment?model=membranes&format=json", content=slice_, headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        assert (response.json()["width"], response.json()["height"]) == (512, 512)


def test_resume_repeats_an_uninterrupted_seeded_run(tmp_path: Path) -> None:
    data = user_folder(tmp_path / "data", 4)
    smoke(tmp_path, "straight", data, 2, "--val-fraction", "0.25")
    smoke(tmp_path, "resumed", data, 2, "--val-fraction", "0.25", "--stop-after", "1")
    assert not (tmp_path / "models" / "resumed").exists()  # nothing exported from an unfinished run
    smoke(tmp_path, "resumed", data, 2, "--val-fraction", "0.25", "--resume")
    straight, resumed = history(tmp_path, "straight"), history(tmp_path, "resumed")
    assert len(resumed) == 2
    for a, b in zip(straight, resumed, strict=True):
        for key in ("train_loss", "val_miou", "val_pixel_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_dataset_protocols() -> None:
    train_split, test_split = pennfudan(DATASETS / "pennfudan")
    assert len(train_split) == 120 and len(test_split) == 50
    names = sorted(p.name for p in (DATASETS / "pennfudan" / "images").iterdir())
    assert [p.name for p in test_split.paths] == names[-50:]
    assert train_split.labels == ["background", "person"]
    assert all(set(np.unique(m).tolist()) <= {0, 1} for m in test_split.masks)
    assert all(m.shape == i.shape[:2] for m, i in zip(test_split.masks, test_split.images, strict=True))
    train_isbi, test_isbi = isbi2012(DATASETS / "isbi2012")
    assert len(train_isbi) == 25 and [p.stem for p in test_isbi.paths] == ["25", "26", "27", "28", "29"]
    assert test_isbi.images[0].shape == (512, 512, 1)


def test_user_folder_with_class_indices_and_names(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        for i in range(2):
            Image.new("RGB", (20, 10), (i * 90, 30, 60)).save(tmp_path / split / "images" / f"{i}.jpg")
            mask = np.zeros((10, 20), np.uint8)
            mask[:, 10:] = 2
            mask[0, 0] = 1
            Image.fromarray(mask).save(tmp_path / split / "masks" / f"{i}_mask.png")
    (tmp_path / "labels.txt").write_text("sky\nsea\nsand\n")
    train_split, test_split, split = image_mask_folder(tmp_path, "RGB", 0.2, 0)
    assert split == "test" and len(train_split) == len(test_split) == 2
    assert train_split.labels == ["sky", "sea", "sand"]
    assert set(np.unique(train_split.masks[0]).tolist()) == {0, 1, 2}
    (tmp_path / "labels.txt").write_text("only\n")
    with pytest.raises(ValueError, match="names 1 classes"):
        image_mask_folder(tmp_path, "RGB", 0.2, 0)
    (tmp_path / "labels.txt").unlink()
    coloured = np.zeros((10, 20, 3), np.uint8)
    coloured[:, 10:] = (255, 0, 0)  # red = class 1 in someone's legend: gray 76 if read as luminance
    Image.fromarray(coloured).save(tmp_path / "train" / "masks" / "0_mask.png")
    with pytest.raises(ValueError, match=r"0_mask.png: a colour-coded mask"):  # which file
        image_mask_folder(tmp_path, "RGB", 0.2, 0)


def test_a_mask_saved_with_other_levels_than_its_peers_is_refused_naming_it(tmp_path: Path) -> None:
    """From an own-data hunt: one mask saved 0/128 among 0/255 ones made a 129-class model (126 classes in no
    mask), which trained, exported and served without a word; a truncated mask was 'image file is truncated'."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(4):
        Image.new("RGB", (20, 10), (i * 60, 30, 60)).save(tmp_path / "images" / f"{i}.png")
        mask = np.zeros((10, 20), np.uint8)
        mask[:, 10:] = 128 if i == 3 else 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    with pytest.raises(
        ValueError, match=r"imply 129 classes \(values up to 128, e.g. in the mask of 3.png\) but no mask holds 126"
    ):
        image_mask_folder(tmp_path, "RGB", 0.25, 0)
    whole = (tmp_path / "masks" / "0.png").read_bytes()
    (tmp_path / "masks" / "3.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"3.png: "):
        image_mask_folder(tmp_path, "RGB", 0.25, 0)
    (tmp_path / "masks" / "3.png").write_bytes(whole)
    train_split, test_split, _ = image_mask_folder(tmp_path, "RGB", 0.25, 0)
    assert train_split.labels == ["background", "foreground"] and len(train_split) + len(test_split) == 4


def test_augmentation_moves_image_and_mask_together(tmp_path: Path) -> None:
    """Photo pixels are painted from the mask, so after any joint transform they must still agree."""
    parser = argparse.ArgumentParser()
    segmenter.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(user_folder(tmp_path / "data", 3)), *TINY, "--val-fraction", "0.34"])
    train_split, test_split, _, color = segmenter.load_splits(args)
    train_split.images = [np.repeat((mask * 255)[:, :, None], 3, axis=2) for mask in train_split.masks]
    recipe = segmenter.SegmenterRecipe(args, train_split, test_split, color)
    torch.manual_seed(0)
    checked = 0
    for _ in range(10):
        for image, mask in recipe.samples:
            out_image, out_mask = recipe.augment(image, mask)
            assert isinstance(out_mask, tv_tensors.Mask) and out_image.shape[-2:] == out_mask.shape[-2:] == (48, 48)
            labelled = out_mask[0] != IGNORE
            # Away from edges (where resizing blends the two), bright pixels are exactly the person pixels.
            inner = (
                torch.nn.functional.max_pool2d(out_mask.float(), 3, 1, 1)[0]
                == -torch.nn.functional.max_pool2d(-out_mask.float(), 3, 1, 1)[0]
            )
            keep = labelled & inner
            agree = ((out_image[0] > 128) == (out_mask[0] == 1))[keep]
            assert agree.float().mean() > 0.99
            checked += int(keep.sum())
    assert checked > 1000


def test_metrics_count_pixels_over_the_split() -> None:
    confusion = segmenter.Confusion(2)
    truth = np.array([[0, 0, 1, 1]], np.uint8)
    confusion.add(truth, np.array([[0, 1, 1, 1]], np.uint8))
    confusion.add(np.array([[IGNORE, 1]], np.uint8), np.array([[1, 0]], np.uint8))
    metrics = confusion.metrics(["background", "person"])
    # background: tp 1, fp 1 (the missed person), fn 1; person: tp 2, fp 1, fn 1.
    assert metrics["iou_background"] == pytest.approx(1 / 3) and metrics["iou_person"] == pytest.approx(2 / 4)
    assert metrics["dice_person"] == pytest.approx(4 / 6) and metrics["pixel_accuracy"] == pytest.approx(3 / 5)
    # A class that neither the truth nor the predictions hold has no IoU: it does not pull the means down.
    absent = segmenter.Confusion(3)
    absent.add(np.array([[0, 1]], np.uint8), np.array([[0, 1]], np.uint8))
    assert absent.metrics(["a", "b", "c"])["miou"] == 1.0 and absent.metrics(["a", "b", "c"])["mean_dice"] == 1.0
    logits = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])  # [1, 2, 1, 2], confident and right
    assert segmenter.soft_dice(logits, torch.tensor([[[0, 1]]])).item() == pytest.approx(1.0, abs=1e-4)
    assert segmenter.soft_dice(logits, torch.tensor([[[IGNORE, 1]]])).item() == pytest.approx(1.0, abs=1e-3)


def test_test_photos_that_copy_training_ones_are_counted_and_named(tmp_path: Path) -> None:
    data = tmp_path / "split"
    user_folder(data / "train", 4)
    (data / "test" / "images").mkdir(parents=True)
    (data / "test" / "masks").mkdir()
    first = sorted((data / "train" / "images").iterdir())[0]
    Image.open(first).save(data / "test" / "images" / "again.png")  # the same pixels in another file
    (data / "test" / "masks" / "again.png").write_bytes((data / "train" / "masks" / f"{first.stem}.png").read_bytes())
    fresh = sorted((DATASETS / "pennfudan" / "images").iterdir())[10]
    (data / "test" / "images" / fresh.name).write_bytes(fresh.read_bytes())
    mask = np.asarray(Image.open(DATASETS / "pennfudan" / "masks" / f"{fresh.stem}_mask.png")) > 0
    Image.fromarray((mask * 255).astype(np.uint8)).save(data / "test" / "masks" / f"{fresh.stem}.png")
    folder = smoke(tmp_path, "copied", data, 1)
    manifest = Manifest.read(folder)
    assert manifest.metrics["images"] == 2 and manifest.metrics["test_copies_of_training"] == ["again.png"]
    card = (folder / "card.md").read_text()
    assert "1 of these test photos copies a training photo** (again.png)" in card
    assert "test_copies_of_training |" not in card  # a list is in the text, not a table cell


@pytest.mark.parametrize(
    ("recipe", "options", "problem"),
    [
        ("segmenter", ["--crop", "250"], "--crop 250: a multiple of 32"),  # failed at the first step
        ("detector", ["--image-size", "400"], "--image-size 400: a multiple of 32"),  # failed at the first evaluation
        ("detector", ["--crop", "300"], "--crop 300: a multiple of 32"),
    ],
)
def test_sizes_the_networks_cannot_take_stop_before_any_data_is_read(
    tmp_path: Path, recipe: str, options: list[str], problem: str
) -> None:
    with pytest.raises(SystemExit, match=problem):
        train([recipe, "--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models"), *options])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [">u2", "<u2", "float32"])
def test_gray_micrographs_of_any_bit_depth_make_a_gray_model(tmp_path: Path, dtype: str) -> None:
    """16-bit big-endian (I;16B) and float (F) TIFFs read as colour: a gray dataset trained an RGB model."""
    path = tmp_path / "cell.tif"
    Image.fromarray(np.full((8, 8), 300, dtype)).save(path)
    assert segmenter._is_gray(path)


def test_hidden_files_in_a_users_folders_are_not_photos(tmp_path: Path) -> None:
    # macOS's ._photo metadata beside each photo: "images have no mask: ['._a.png']" stopped the run.
    data = user_folder(tmp_path / "data", 3)
    (data / "images" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (data / "masks" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    train_split, held_out, _ = image_mask_folder(data, "RGB", 0.34, 0)
    assert len(train_split) + len(held_out) == 3
