"""Training smoke runs on real CIFAR-10 photos: train -> export (parity) -> the service serves it."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from PIL import Image

from service.manifest import Manifest
from service.repository import file_sha256
from service.settings import Settings
from tests.conftest import CLASSIFIER, DATASETS, MODELS, cifar_photo, history, start_server
from training.__main__ import main as train
from training.export import OrtParity, ParityError, export_onnx, schedule_note

pytestmark = pytest.mark.slow


def smoke(tmp: Path, name: str, epochs: int, *extra: str) -> Path:
    train(
        [
            "classifier",
            "--data-dir",
            str(DATASETS / "cifar10"),
            "--name",
            name,
            "--limit-per-class",
            "12",
            "--epochs",
            str(epochs),
            "--batch-size",
            "32",
            "--widths",
            "16",
            "32",
            "32",
            "--seed",
            "7",
            "--models-dir",
            str(tmp / "models"),
            "--runs-dir",
            str(tmp / "runs"),
            *extra,
        ]
    )
    return tmp / "models" / name


def test_train_export_and_serve(tmp_path: Path) -> None:
    folder = smoke(tmp_path, "tiny", epochs=2)
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.json", "card.md", "curves.png"}
    manifest = Manifest.read(folder)
    assert manifest.sha256 == file_sha256(folder / "model.onnx")
    assert manifest.labels[:2] == ["airplane", "automobile"] and len(manifest.labels) == 10
    assert manifest.metrics["images"] == 120 and manifest.metrics["parity_max_abs_logit_diff"] <= 1e-3
    assert manifest.training["seed"] == 7 and "--limit-per-class" in manifest.training["command"]
    assert "CPUs" in manifest.training["machine"]  # wall times compare only on the same machine
    assert (
        "Top-1 accuracy" in (folder / "card.md").read_text() and manifest.training["machine"] in (folder / "card.md").read_text()
    )

    train(
        [
            "quantize",
            "--model",
            "tiny",
            "--models-dir",
            str(tmp_path / "models"),
            "--calibration-images",
            "16",
            "--calibration-dir",
            str(DATASETS / "cifar10" / "train" / "frog"),
            "--bench-seconds",
            "0.2",
        ]
    )
    quantized = Manifest.read(tmp_path / "models" / "tiny-int8")
    assert quantized.metrics["int8_images_per_s_batch32"] > 0 and quantized.training["calibration_images"] == 16
    assert quantized.training["reduce_range"] is True and quantized.training["activations"] == "uint8"

    with start_server(models_dir=tmp_path / "models") as live, live.client() as http:
        assert http.get("/readyz").json()["models"] == {"tiny": "ready", "tiny-int8": "ready"}
        for name in ("tiny", "tiny-int8"):
            photo = cifar_photo("frog").open("rb")
            response = http.post("/v1/classify", params={"model": name, "top_k": 3}, files={"file": photo})
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"]) == 3


def test_resume_repeats_an_uninterrupted_seeded_run(tmp_path: Path) -> None:
    smoke(tmp_path, "straight", epochs=2)
    smoke(tmp_path, "resumed", 2, "--stop-after", "1")
    assert not (tmp_path / "models" / "resumed").exists()  # nothing exported from an unfinished run
    smoke(tmp_path, "resumed", 2, "--resume")
    straight, resumed = history(tmp_path, "straight"), history(tmp_path, "resumed")
    assert len(resumed) == 2
    for a, b in zip(straight, resumed, strict=True):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert "schedule" not in Manifest.read(tmp_path / "models" / "resumed").training  # one schedule, not a restart
    # Resumed with another --epochs, the schedule restarts over the new length: the card said "2 epochs" and nothing.
    smoke(tmp_path, "stretched", 2, "--stop-after", "1")
    smoke(tmp_path, "stretched", 3, "--resume")
    assert Manifest.read(tmp_path / "models" / "stretched").training["schedule"] == [[0, 2], [1, 3]]
    card = (tmp_path / "models" / "stretched" / "card.md").read_text()
    assert "planned over 2 epochs; after epoch 1 it was set to 3 epochs (`--resume --epochs 3`)" in card


def test_schedule_note_is_empty_for_one_schedule() -> None:
    assert schedule_note([[0, 10]]) == ""
    assert "after epoch 10 it was set to 22 epochs" in schedule_note([[0, 10], [10, 22]])


def test_parity_check_refuses_a_graph_that_disagrees(tmp_path: Path) -> None:
    torch.manual_seed(0)
    exported, other = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
    export_onnx(exported, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", output_names=["y"])
    same = OrtParity(exported, tmp_path / "m.onnx", tolerance=1e-4)
    same.run(torch.randn(4, 3, 8, 8))
    same.check()
    different = OrtParity(other, tmp_path / "m.onnx", tolerance=1e-4)
    different.run(torch.randn(4, 3, 8, 8))
    with pytest.raises(ParityError, match=r"differs from PyTorch by [0-9.e+-]+ > 0.0001$"):
        different.check()


def test_parity_names_outputs_too_large_for_float32_to_agree(tmp_path: Path) -> None:
    # A segmenter trained at --lr 0.5 exported outputs near 1e9: its refusal blamed the export alone.
    torch.manual_seed(0)
    blown_up = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
    with torch.no_grad():
        for parameter in blown_up.parameters():
            parameter.mul_(1e3)
    export_onnx(blown_up, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", output_names=["y"])
    parity = OrtParity(blown_up, tmp_path / "m.onnx", tolerance=1e-3)
    parity.run(torch.randn(4, 3, 32, 32))
    assert parity.max_abs_output > 1e5
    with pytest.raises(ParityError, match=r"the outputs reach .*: did the training diverge \(retrain with a lower --lr\)"):
        parity.check()


def test_parity_refuses_an_output_of_another_shape(tmp_path: Path) -> None:
    # The graph's [1, 4] would broadcast against PyTorch's [4, 4]: equal values must not hide a wrong shape.
    class PerImage(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x[:, 0, 0, :4])

    class FirstImageOnly(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x[:1, 0, 0, :4])

    export_onnx(FirstImageOnly(), torch.randn(2, 3, 8, 8), tmp_path / "one.onnx", output_names=["y"])
    with pytest.raises(ParityError, match="shape"):
        OrtParity(PerImage(), tmp_path / "one.onnx", tolerance=1e-4).run(torch.randn(4, 3, 8, 8))


def test_whitening_stem_decorrelates_real_patches() -> None:
    from training.datasets.imagefolder import load_image_folder
    from training.nets.resnet import ResidualCNN

    images = load_image_folder(DATASETS / "cifar10" / "test", limit_per_class=50).images.float() / 255
    images = (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)
    model = ResidualCNN(10)
    model.init_whitening(images)
    responses = torch.nn.functional.conv2d(images, model.whiten.weight)[:, :12]
    covariance = torch.cov(responses.permute(1, 0, 2, 3).reshape(12, -1))
    off_diagonal = covariance - torch.diag(covariance.diag())
    assert off_diagonal.abs().max() < 1e-3
    assert covariance.diag().max() < 1.01 and covariance.diag()[-4:].min() > 0.95


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--epochs", "0"], "--epochs must be positive"),
        (["--batch-size", "-4"], "--batch-size must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--name", "has space"], "--name 'has space'"),
        (["--name", "a" * 129], "--name: at most 128 characters"),  # the export refused it, after the training
        (["--data-dir", "/nonexistent/cifar"], "no such folder"),
        # Each was a traceback, some after the data was read: from torch, torchvision, or a ZeroDivisionError.
        (["--threads", "-2"], "--threads must be at least 1"),
        (["--translate", "-1"], "--translate must be at least 0"),
        (["--widths", "16", "0", "32"], "--widths must be at least 1, not 0"),
        (["--image-size", "0"], "--image-size must be at least 1"),
        (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1)"),
        (["--val-fraction", "-0.5"], "--val-fraction is a share of the images: between 0 and 1"),
        (["--val-fraction", "1.5"], "--val-fraction is a share of the images: between 0 and 1"),
    ],
)
def test_bad_options_stop_before_any_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], problem: str
) -> None:
    with pytest.raises(SystemExit):
        train(["classifier", "--data-dir", str(DATASETS / "cifar10"), "--runs-dir", str(tmp_path), *options])
    assert problem in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_models_dir_is_the_services_by_default(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A user serving from OCELLUS_MODELS_DIR trained into the checkout's models/, which that service never reads."""
    monkeypatch.setenv("OCELLUS_MODELS_DIR", "/srv/ocellus-models")
    for recipe in ("classifier", "detector", "segmenter", "denoiser", "face", "quantize"):
        with pytest.raises(SystemExit):
            train([recipe, "--help"])
        assert "else models/): /srv/ocellus-models" in " ".join(capsys.readouterr().out.split()), recipe


def test_resuming_with_other_run_defining_options_is_refused(tmp_path: Path) -> None:
    smoke(tmp_path, "half", 2, "--stop-after", "1")
    with pytest.raises(SystemExit, match=r"--batch-size 32 \(now 16\)"):
        train(
            [
                *("classifier", "--data-dir", str(DATASETS / "cifar10"), "--name", "half", "--limit-per-class", "12"),
                *("--epochs", "2", "--batch-size", "16", "--widths", "16", "32", "32", "--seed", "7", "--threads", "2"),
                *("--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"), "--resume"),
            ]
        )


def test_a_run_that_cannot_resume_or_would_overwrite_stops_in_one_line(tmp_path: Path) -> None:
    smoke(tmp_path, "half", 3, "--stop-after", "2")
    log = (tmp_path / "runs" / "half" / "metrics.jsonl").read_text()
    # Without --resume, the checkpoint and its metrics were silently replaced by a fresh run.
    with pytest.raises(SystemExit, match="holds an earlier run of --name half: continue it with --resume"):
        smoke(tmp_path, "half", 3)
    # A schedule shorter than the epochs trained: nothing trained, yet a model was exported saying "1 epoch".
    with pytest.raises(SystemExit, match="has 2 epochs trained: resume with --epochs 2 or more, not 1"):
        smoke(tmp_path, "half", 1, "--resume")
    assert (tmp_path / "runs" / "half" / "metrics.jsonl").read_text() == log and not (tmp_path / "models" / "half").exists()
    checkpoint = tmp_path / "runs" / "half" / "checkpoint.pt"
    for damage in (checkpoint.read_bytes()[:1000], b"not a checkpoint"):  # each was a traceback from torch.load
        checkpoint.write_bytes(damage)
        with pytest.raises(SystemExit, match=r"checkpoint\.pt does not load \(.+\): start afresh under a new --name"):
            smoke(tmp_path, "half", 3, "--resume")


def test_another_recipes_checkpoint_is_refused(tmp_path: Path) -> None:
    smoke(tmp_path, "shared", 2, "--stop-after", "1")
    checkpoint = torch.load(tmp_path / "runs" / "shared" / "checkpoint.pt", weights_only=False)
    assert checkpoint["settings"]["recipe"] == "ClassifierRecipe"
    checkpoint["settings"]["recipe"] = "SegmenterRecipe"  # as a segmenter trained under this --name leaves it
    torch.save(checkpoint, tmp_path / "runs" / "shared" / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"was trained with another recipe \(SegmenterRecipe\)"):
        smoke(tmp_path, "shared", 2, "--resume")


def test_an_unwritable_models_dir_stops_the_run_before_training(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match=r"--models-dir .*a-file/models: .*a-file is not a folder"):
        smoke(tmp_path, "w", 1, "--models-dir", str(tmp_path / "a-file" / "models"))
    assert not (tmp_path / "runs").exists()  # found before training (it was found at export, after every epoch)


def test_hidden_folders_and_files_are_not_classes_or_photos(tmp_path: Path) -> None:
    data = photo_folder(tmp_path / "data", 4)
    (data / ".ipynb_checkpoints").mkdir()  # was a class, served as a label; empty, it failed the run
    (data / "ship" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: failed the run
    Image.open(data / "cat" / "0.jpg").save(data / "cat" / "animated.gif")  # a format the service reads: was skipped
    command = ["classifier", "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path)]
    train([*command, "--name", "mine", "--epochs", "1", "--widths", "8", "16", "16", "--val-fraction", "0.4"])
    manifest = Manifest.read(tmp_path / "mine")
    assert manifest.labels == ["cat", "ship"] and manifest.training["train_images"] + manifest.metrics["images"] == 9


def photo_folder(root: Path, per_class: int) -> Path:
    """A user's own ImageFolder without test/: CIFAR cats and ships."""
    for label in ("cat", "ship"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            shutil.copy(cifar_photo(label, index), root / label / f"{index}.jpg")
    return root


def test_test_images_that_are_copies_of_training_images_are_counted_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    photo_folder(data / "train", 8)
    for label in ("cat", "ship"):  # two held-out photos each, and two copies of training photos
        (data / "test" / label).mkdir(parents=True)
        for index in (8, 9):
            shutil.copy(cifar_photo(label, index), data / "test" / label / f"{index}.jpg")
    Image.open(data / "train" / "cat" / "3.jpg").save(data / "test" / "cat" / "copy.png")  # the same pixels
    Image.open(data / "train" / "ship" / "3.jpg").save(data / "test" / "ship" / "copy.jpg", quality=60)  # other pixels
    train(
        [
            *("classifier", "--data-dir", str(data), "--name", "mine", "--epochs", "1", "--batch-size", "8"),
            *("--widths", "8", "16", "16", "--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs")),
        ]
    )
    assert "warning: 2 of the 6 test photos copy training photos (cat/copy.png, ship/copy.jpg)" in capsys.readouterr().out
    manifest = Manifest.read(tmp_path / "models" / "mine")
    assert manifest.metrics["copies_of_training_images"] == 2
    assert manifest.metrics["test_copies_of_training"] == ["cat/copy.png", "ship/copy.jpg"]
    card = (tmp_path / "models" / "mine" / "card.md").read_text()
    assert "2 of these test photos copy training photos** (cat/copy.png, ship/copy.jpg)" in card
    assert "copies_of_training_images | 2" in card


def test_resuming_with_another_split_or_other_files_is_refused(tmp_path: Path) -> None:
    """Either would move held-out images into training under the same run."""
    data = photo_folder(tmp_path / "data", 8)
    command = [
        *("classifier", "--data-dir", str(data), "--name", "mine", "--epochs", "2", "--batch-size", "8"),
        *("--widths", "8", "16", "16", "--models-dir", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs")),
    ]
    train([*command, "--stop-after", "1"])
    with pytest.raises(SystemExit, match=r"--val-fraction 0.1 \(now 0.3\)"):
        train([*command, "--resume", "--val-fraction", "0.3"])
    with pytest.raises(SystemExit, match=r"--cutout 12 \(now 8\)"):  # the augmentation: a silently mixed run
        train([*command, "--resume", "--cutout", "8"])
    (data / "cat" / "0.jpg").unlink()
    with pytest.raises(SystemExit, match="other files in --data-dir"):
        train([*command, "--resume"])


def test_held_out_split_takes_every_class_and_keeps_one_of_each() -> None:
    from training.classifier import stratified_split

    labels = torch.tensor([0] * 20 + [1] * 10 + [2])
    kept, held = stratified_split(labels, ["a", "b", "c"], 0.2, seed=0)
    assert sorted(labels[held].tolist()) == [0, 0, 0, 0, 1, 1]  # 20 % of each class
    assert 2 in labels[kept].tolist()  # a class of one image is trained on, never held out whole
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(len(labels)))
    assert torch.equal(stratified_split(labels, ["a", "b", "c"], 0.2, seed=0)[1], held)  # the seed decides it alone


def test_the_data_is_held_once_and_batches_are_built_one_at_a_time() -> None:
    """Statistics by chunks and batches gathered one at a time give what whole-set float copies gave."""
    from argparse import Namespace

    from training.classifier import TranslatedBatches, channel_statistics
    from training.datasets.imagefolder import load_image_folder

    data = load_image_folder(DATASETS / "cifar10" / "test", limit_per_class=5)
    assert data.images.shape == (50, 3, 32, 32) and data.images.dtype == torch.uint8
    photo = np.asarray(Image.open(sorted((DATASETS / "cifar10" / "test" / "cat").iterdir())[2]).convert("RGB"))
    assert np.array_equal(data.images[data.labels.tolist().index(3) + 2].permute(1, 2, 0).numpy(), photo)
    mean, std = channel_statistics(data.images, chunk=7)
    assert torch.allclose(mean, data.images.float().mean(dim=(0, 2, 3)) / 255, atol=1e-6)
    assert torch.allclose(std, data.images.float().std(dim=(0, 2, 3)) / 255, atol=1e-6)

    recipe = Namespace(
        args=Namespace(seed=3, batch_size=8, cutout=0),
        train=data,
        padded=torch.nn.functional.pad(data.images, (2, 2, 2, 2), mode="reflect"),
        flip_base=torch.rand(50, generator=torch.Generator().manual_seed(0)) < 0.5,
    )
    batches = TranslatedBatches(recipe, epoch=1)  # type: ignore[arg-type]
    shifted = torch.stack(
        [recipe.padded[i, :, dy : dy + 32, dx : dx + 32] for i, dy, dx in zip(range(50), batches.dy, batches.dx, strict=True)]
    )
    shifted[batches.flip] = shifted[batches.flip].flip(-1)
    built = list(batches)
    assert len(built) == len(batches) == 7 and [len(images) for images, _ in built] == [8] * 6 + [2]
    assert torch.equal(torch.cat([images for images, _ in built]), shifted[batches.order])
    assert torch.equal(torch.cat([labels for _, labels in built]), data.labels[batches.order])

    # --translate 4 --cutout 12: shifts of up to 4 px, and a 12x12 square around each seeded centre (cut at the
    # image's edge) set to the mean pixel, every other pixel the shifted one.
    recipe.args.cutout, recipe.mean_pixel = 12, torch.tensor([7, 8, 9], dtype=torch.uint8)
    recipe.padded = torch.nn.functional.pad(data.images, (4, 4, 4, 4), mode="reflect")
    batches = TranslatedBatches(recipe, epoch=2)  # type: ignore[arg-type]
    assert batches.dy.max() == 8 and batches.dx.max() == 8 and batches.centres is not None
    cut = torch.cat([images for images, _ in batches])
    for row, i in enumerate(batches.order.tolist()):
        expected = recipe.padded[i, :, batches.dy[i] : batches.dy[i] + 32, batches.dx[i] : batches.dx[i] + 32].clone()
        if batches.flip[i]:
            expected = expected.flip(-1)
        y, x = (int(v) - 6 for v in batches.centres[i])
        expected[:, max(0, y) : y + 12, max(0, x) : x + 12] = recipe.mean_pixel[:, None, None]
        assert torch.equal(cut[row], expected), row


def test_bad_data_ends_in_one_line_not_a_traceback(tmp_path: Path) -> None:
    data = photo_folder(tmp_path / "data", 4)
    (data / "ship" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    command = ["classifier", "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"error: .*broken\.jpg"):
        train(command)
    (data / "ship" / "broken.jpg").unlink()
    (data / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"error: .*empty"):
        train(command)


def test_a_train_and_val_layout_holds_val_out(tmp_path: Path) -> None:
    """From an own-data hunt: train/ + val/ (ImageNet's layout) was read as train/ alone, 10 % of it held out."""
    from training import classifier

    data = tmp_path / "data"
    photo_folder(data / "train", 4)
    photo_folder(data / "val", 2)
    parser = argparse.ArgumentParser()
    classifier.add_arguments(parser)
    train_split, held, split = classifier.load_splits(parser.parse_args(["--data-dir", str(data)]))
    assert split == "val" and (len(train_split), len(held)) == (8, 4)


def test_folders_the_classifier_would_misread_are_refused(tmp_path: Path) -> None:
    test_only = photo_folder(tmp_path / "test-only" / "test", 2).parent  # test/ read as a class: its photos trained on
    wide = photo_folder(tmp_path / "wide", 3)  # the network, its export and the manifest take square images
    for photo in wide.glob("*/*.jpg"):
        Image.open(photo).resize((48, 32)).save(photo)
    val_only = photo_folder(tmp_path / "val-only" / "val", 2).parent
    refused = ((test_only, "test/ folder but no train/"), (val_only, "val/ folder but no train/"), (wide, "48x32, not square"))
    for data, message in refused:
        with pytest.raises(SystemExit, match=message):
            train(["classifier", "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1"])
    assert not (tmp_path / "runs").exists()


def test_a_diverging_loss_stops_the_run_and_nothing_is_exported(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="training loss became nan"):
        smoke(tmp_path, "diverged", 2, "--lr", "1e12")
    assert not (tmp_path / "models" / "diverged").exists()


def test_an_export_whose_top1_disagrees_with_pytorch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits within the tolerance can still rank classes otherwise: the export counts top-1 disagreements
    on the test split (above 0.1 %: refused, nothing written). Here ONNX Runtime's top two are swapped."""

    class SwappedTopTwo(OrtParity):
        def run(self, batch: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
            reference, (logits,) = super().run(batch)  # the logit difference is measured before the swap
            rows, order = np.arange(len(logits)), np.argsort(logits, axis=1)
            swapped = logits.copy()
            swapped[rows, order[:, -1]], swapped[rows, order[:, -2]] = logits[rows, order[:, -2]], logits[rows, order[:, -1]]
            return reference, [swapped]

    monkeypatch.setattr("training.classifier.OrtParity", SwappedTopTwo)
    with pytest.raises(SystemExit, match="top-1 differs on"):
        smoke(tmp_path, "disagrees", 1)
    assert not (tmp_path / "models" / "disagrees").exists()


def test_parity_refuses_a_graph_that_outputs_nan(tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    export_onnx(Broken(), torch.randn(1, 3, 8, 8), tmp_path / "nan.onnx", output_names=["y"])
    with pytest.raises(ParityError, match="NaN"):
        OrtParity(Broken(), tmp_path / "nan.onnx", tolerance=1e-4).run(torch.randn(2, 3, 8, 8))


def test_training_reads_16_bit_and_rotated_photos_as_they_are_shown(tmp_path: Path) -> None:
    from training.datasets.denoising import read_image
    from training.datasets.imagefolder import _decode

    values = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    sixteen = tmp_path / "deep.png"
    Image.fromarray(values).save(sixteen)  # 16-bit gray: Pillow's convert() clips it to white
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    assert np.array_equal(_decode(str(sixteen), None)[..., 0], expected)
    assert np.array_equal(np.round(read_image(sixteen)[0] * 255).astype(np.uint8), expected)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 32 wide x 16 high, shown turned by 90 degrees: 16 wide x 32 high
    Image.open(cifar_photo("cat")).crop((0, 0, 32, 16)).save(rotated, exif=exif)
    assert _decode(str(rotated), None).shape == (32, 16, 3) and read_image(rotated).shape == (1, 32, 16)


def test_classifier_training_decodes_and_resizes_as_the_service_feeds_it(tmp_path: Path) -> None:
    """A user's large JPEG: the service decodes it at a reduced JPEG scale and resizes it its own way;
    training caches the same pixels (else the served model sees other inputs than it trained on)."""
    from service.api.deps import prepare
    from service.tasks.classification import preprocess
    from training.datasets.imagefolder import _decode

    photo = tmp_path / "large.jpg"
    Image.open(DATASETS / "pennfudan" / "images" / "FudanPed00001.jpg").convert("RGB").save(photo, quality=90)
    # What /v1/classify's own entry point feeds a 64x64 model (mean 0, std 1: the pixels over 255).
    manifest = Manifest.read(MODELS / CLASSIFIER)
    manifest.input.size, manifest.input.mean, manifest.input.std = (64, 64), [0.0] * 3, [1.0] * 3
    served = asyncio.run(prepare(photo.read_bytes(), Settings(_env_file=None), manifest, preprocess))[0]
    cached = _decode(str(photo), 64).transpose(2, 0, 1).astype(np.float32) / 255
    assert served.shape == (3, 64, 64) and np.abs(served - cached).max() < 1e-6


def test_a_model_folder_is_replaced_whole(tmp_path: Path) -> None:
    folder = smoke(tmp_path, "twice", 1)
    (folder / "stale.txt").write_text("from the run before")
    smoke(tmp_path, "twice", 1, "--resume")  # nothing left to train: exported again
    assert not (folder / "stale.txt").exists() and Manifest.read(folder).sha256 == file_sha256(folder / "model.onnx")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["twice"]  # no building/previous leftovers


def test_quantize_refuses_a_model_it_cannot_calibrate_or_measure(tmp_path: Path) -> None:

    with pytest.raises(SystemExit, match="quantize handles classification models"):
        train(["quantize", "--model", "face-detector", "--models-dir", str(MODELS), "--calibration-dir", str(tmp_path)])


def test_one_class_is_refused_before_training(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        for i in range(3):
            (tmp_path / "one" / split / "cat" / f"{i}.jpg").write_bytes(cifar_photo("cat", i).read_bytes())
    with pytest.raises(SystemExit, match="needs at least two"):
        train(["classifier", "--data-dir", str(tmp_path / "one"), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1"])
    assert not (tmp_path / "runs").exists()


def test_a_linked_model_folder_is_replaced_behind_its_link(tmp_path: Path) -> None:
    from training.export import write_model_folder

    folder = smoke(tmp_path, "real", 1)
    manifest = Manifest.read(folder)
    link = tmp_path / "served" / "linked"
    link.parent.mkdir()
    link.symlink_to(folder, target_is_directory=True)
    for _ in range(2):
        write_model_folder(link, folder / "model.onnx", manifest, "card", None)
        assert link.is_symlink() and (link / "card.md").read_text() == "card"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["real"]


def test_without_the_training_extra_the_cli_says_what_to_install() -> None:
    import subprocess
    import sys

    hide_onnx = "import sys; sys.modules['onnx'] = None; from training.__main__ import main; main(['classifier', '--help'])"
    result = subprocess.run([sys.executable, "-c", hide_onnx], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: onnx is not installed; training needs: python3 -m pip install -e '.[train]'"


@pytest.mark.parametrize("recipe", ["classifier", "detector", "segmenter", "denoiser", "face", "quantize"])
def test_each_recipe_help_shows_defaults_but_none(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    # "(default: None)" followed each unset option, twice over the detector's own "(default ../shared/datasets/facemask)"
    from training.__main__ import main

    with pytest.raises(SystemExit):
        main([recipe, "--help"])
    shown = capsys.readouterr().out
    assert "(default: None)" not in shown and "--seed" in shown and "(default: " in shown


def test_a_write_killed_halfway_leaves_the_previous_file(tmp_path: Path) -> None:
    """Checkpoints, logs and Noise2Void's noisy copies are written whole or not at all: a torn .npy was reused by
    every later run (and --resume) and failed each with an error naming no file."""
    from training.files import durable_write

    target = tmp_path / "checkpoint.pt"
    durable_write(target, lambda file: file.write(b"complete"))

    def killed(file: BinaryIO) -> None:
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        durable_write(target, killed)
    assert target.read_bytes() == b"complete"
