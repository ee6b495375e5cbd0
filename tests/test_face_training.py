"""Face-embedding recipe: a smoke run on real LFW photos (train -> export with parity -> served), the
metric-learning losses' key properties, the verification metrics and the data protocol."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from service.images import normalise, to_array
from service.manifest import Manifest, Task
from service.repository import file_sha256
from service.tasks.faces import DEFAULT_MARGIN, crop_face
from tests.conftest import DATASETS, start_server
from training.__main__ import main as train
from training.datasets import lfw
from training.face import (
    add_arguments,
    balanced_threshold,
    make_split,
    one_shot_rank1,
    roc_auc,
    tar_at_far,
    threshold_at_far,
)
from training.losses import ArcFace, batch_hard_triplet, contrastive, distillation
from training.nets.face import FaceNet, Normalised

LFW = DATASETS / "lfw"
TINY = ["--widths", "8", "16", "16", "--depths", "1", "1", "1", "--stem", "8", "--dim", "32", "--no-bf16"]


def smoke(tmp: Path, name: str, *extra: str) -> Path:
    train(
        [
            "face",
            "--name",
            name,
            "--limit",
            "30",
            "--val-people",
            "6",
            "--batch-size",
            "8",
            *TINY,
            "--eval-limit",
            "20",
            "--detector",
            "none",
            "--seed",
            "3",
            "--threads",
            "1",
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
    args = ["--distill-weight", "0", "--metric-loss", "arcface", "--epochs", "2"]
    folder = smoke(tmp_path, "tiny-face", *args, "--stop-after", "1")
    assert not folder.exists()  # stopped early on purpose: nothing exported yet
    folder = smoke(tmp_path, "tiny-face", *args, "--resume")
    history = [json.loads(line) for line in (tmp_path / "runs" / "tiny-face" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2] and {"train_arcface", "val_auc", "val_tar_far1e-2"} <= set(history[-1])

    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.json", "card.md", "curves.png"}
    manifest = Manifest.read(folder)
    assert manifest.task == Task.face_embedding and manifest.sha256 == file_sha256(folder / "model.onnx")
    assert manifest.input.size == (112, 112) and manifest.input.resize == "stretch" and manifest.input.color == "RGB"
    assert manifest.outputs == {"embedding": "embedding"}
    defaults = manifest.defaults
    assert -1 <= defaults["threshold"] <= 1 and 0 <= defaults["far"] <= 1 and defaults["crop_margin"] == DEFAULT_MARGIN
    assert defaults["threshold_rule"] == "best balanced accuracy"
    assert defaults["detector"] == "face-detector" and defaults["embedding_size"] == 32
    metrics = manifest.metrics
    assert metrics["pairs"] == 20 and metrics["att_people"] == 2
    assert {"devtest_accuracy", "devtest_auc", "devtest_tar_far1e-2", "att_whole_photo_rank1"} <= set(metrics)
    assert metrics["parity_max_abs_diff"] <= 1e-3 and metrics["parity_min_cosine"] >= 1 - 1e-4
    calibration = metrics["calibration"]
    assert calibration["threshold_at_far1e-3"] >= calibration["threshold_at_far1e-2"]  # a rarer false accept: stricter
    assert manifest.training["seed"] == 3 and manifest.training["excluded_devtest_people"] == 963
    card = (folder / "card.md").read_text()
    assert "DevTest" in card
    assert "x arcface\n  (ArcFace s=" in card

    # Dynamic batch, unit-length rows.
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.random.default_rng(0).normal(size=(3, 3, 112, 112)).astype(np.float32)})[0]
    assert out.shape == (3, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)

    # The service embeds an already-cropped photo (detect=false: the whole photo, no margin) as the recipe evaluated it.
    photo_a, photo_b = (LFW / "images" / "Aaron_Peirsol" / f"Aaron_Peirsol_000{i}.jpg" for i in (1, 2))
    crop = crop_face(Image.open(photo_a).convert("RGB"), (0, 0, 160, 160), 0.0, (112, 112))
    expected = session.run(None, {"input": normalise(to_array(crop), manifest.input.mean, manifest.input.std)[None]})[0][0]
    with start_server(models_dir=tmp_path / "models") as live, live.client() as http:
        response = http.get("/v1/models/tiny-face")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["state"] == "ready" and body["task"] == "face_embedding"
        assert body["defaults"]["threshold"] == defaults["threshold"]
        response = http.post("/v1/faces/embed", params={"detect": "false"}, files={"file": photo_a.open("rb")})
        assert response.status_code == 200, response.text
        (face,) = response.json()["faces"]
        assert np.allclose(face["embedding"], expected, atol=1e-4)
        files = {"image_a": photo_a.open("rb"), "image_b": photo_b.open("rb")}
        response = http.post("/v1/faces/verify", params={"detect": "false"}, files=files)
        assert response.status_code == 200, response.text
        assert response.json()["threshold"] == pytest.approx(defaults["threshold"])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_the_other_metric_losses_train_without_a_teacher(tmp_path: Path, loss: str) -> None:
    """--metric-loss triplet|contrastive reach their loss (the teacher test that also uses triplets needs dlib)."""
    args = ["--limit", "12", "--val-people", "3", "--epochs", "2", "--stop-after", "1", "--workers", "0"]
    smoke(tmp_path, f"tiny-{loss}", *args, "--distill-weight", "0", "--metric-loss", loss)
    row = json.loads((tmp_path / "runs" / f"tiny-{loss}" / "metrics.jsonl").read_text().splitlines()[-1])
    others = {"train_arcface", "train_triplet", "train_contrastive"} - {f"train_{loss}"}
    assert math.isfinite(row[f"train_{loss}"]) and not others & set(row), row


@pytest.mark.slow
def test_distills_a_real_teacher_with_triplets(tmp_path: Path) -> None:
    pytest.importorskip("dlib")
    cache = tmp_path / "teacher.npz"
    smoke(
        tmp_path,
        "tiny-distilled",
        *["--limit", "6", "--val-people", "3", "--epochs", "1", "--stop-after", "1", "--workers", "0"],
        *["--teacher-cache", str(cache), "--metric-loss", "triplet", "--metric-weight", "0.5", "--dim", "128"],
    )
    with np.load(cache) as teacher:
        keys = set(teacher["paths"].tolist())
        assert teacher["embedding"].shape == (len(keys), 128)
    devtest = lfw.pair_people(LFW / "pairs" / "pairsDevTest.txt")
    assert keys and not {k.split("/")[0] for k in keys} & devtest
    row = json.loads((tmp_path / "runs" / "tiny-distilled" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_teacher_cos", "train_triplet", "val_teacher_cos"} <= set(row)


def test_split_leaves_out_devtest_and_held_out_people() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    split = make_split(parser.parse_args(["--data-dir", str(LFW), "--val-people", "50"]))
    devtest = lfw.pair_people(LFW / "pairs" / "pairsDevTest.txt")
    train_people = {p.key.split("/")[0] for p in split.train}
    val_people = {p.key.split("/")[0] for p in split.val}
    assert not train_people & devtest and not val_people & devtest and not train_people & val_people
    assert len(val_people) == 50 and len(split.train) + len(split.val) + split.excluded_photos == 13233
    counts = np.bincount(split.person)
    assert (split.arc_class >= 0).sum() == counts[counts >= 2].sum()
    assert all(0 <= v <= 160 for p in split.train[:50] for v in p.box)


def test_the_card_names_the_metric_loss_it_trained_with() -> None:
    """From an own-data hunt: a triplet run's card gave ArcFace's scale and margin."""
    from training.face import metric_loss_words

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for loss, words in (("triplet", "batch-hard triplet, margin 0.3"), ("contrastive", "contrastive, margin 1.0")):
        assert metric_loss_words(parser.parse_args(["--metric-loss", loss])) == words


def test_a_training_set_of_one_photo_is_refused_in_one_line() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # --limit 1 kept one person of one photo: batch-norm's "Expected more than 1 value per channel" traceback.
    with pytest.raises(SystemExit, match=r"--limit 1: 1 training photo\(s\); training needs at least 2"):
        make_split(parser.parse_args(["--data-dir", str(LFW), "--val-people", "3", "--limit", "1"]))
    # An own-data hunt's 27 people: --val-people took every one with two photos; it trained on nothing (loss 0).
    with pytest.raises(SystemExit, match=r"0 training people have two or more photos"):
        make_split(parser.parse_args(["--data-dir", str(LFW), "--val-people", "3", "--limit", "3"]))
    with pytest.raises(SystemExit, match=r"--att-dir .*no-att-here: no such folder"):  # (found after the training)
        make_split(parser.parse_args(["--data-dir", str(LFW), "--att-dir", str(LFW / "no-att-here")]))


# ----- losses -----


def test_arcface_adds_the_angular_margin_to_the_true_class_only() -> None:
    torch.manual_seed(0)
    head = ArcFace(dim=8, classes=5, scale=10.0, margin=0.3)
    embeddings, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = head.logits(embeddings, labels)
    cosine = F.normalize(embeddings) @ F.normalize(head.weight).T
    theta = torch.acos(cosine.gather(1, labels[:, None]))[:, 0]
    expected_true = torch.where(theta + 0.3 < math.pi, torch.cos(theta + 0.3), torch.cos(theta) - 0.3 * math.sin(0.3))
    assert torch.allclose(logits.gather(1, labels[:, None])[:, 0], 10 * expected_true, atol=1e-4)
    others = torch.ones_like(logits, dtype=torch.bool).scatter(1, labels[:, None], False)
    assert torch.allclose(logits[others], 10 * cosine[others], atol=1e-5)
    # The margin makes the loss strictly harder than plain normalised softmax; margin 0 is that softmax.
    assert head(embeddings, labels) > F.cross_entropy(10 * cosine, labels)
    assert torch.allclose(ArcFace.forward(_with_margin(head, 0.0), embeddings, labels), F.cross_entropy(10 * cosine, labels))


def _with_margin(head: ArcFace, margin: float) -> ArcFace:
    head.margin = margin
    return head


def test_arcface_trains_embeddings_towards_their_class_centre() -> None:
    torch.manual_seed(0)
    head = ArcFace(dim=4, classes=3, scale=16.0, margin=0.2)
    embeddings = torch.randn(12, 4, requires_grad=True)
    labels = torch.arange(12) % 3
    optimizer = torch.optim.SGD([embeddings, *head.parameters()], lr=0.5)
    first = head(embeddings, labels).item()
    for _ in range(100):
        optimizer.zero_grad()
        head(embeddings, labels).backward()
        optimizer.step()
    assert head(embeddings, labels).item() < first / 4
    predicted = (F.normalize(embeddings) @ F.normalize(head.weight).T).argmax(1)
    assert torch.equal(predicted, labels)


def test_triplet_is_zero_when_separated_by_the_margin_and_uses_the_hardest_pairs() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [-0.99, 0.14]])
    assert batch_hard_triplet(separated, labels, margin=0.3).item() == 0.0
    assert batch_hard_triplet(separated * 5, labels, margin=0.3).item() == 0.0  # the scale does not matter
    # One photo of person 1 sits next to person 0: its anchors' hardest negative is that photo.
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.95, 0.31], [-1.0, 0.0]])
    loss = batch_hard_triplet(mixed, labels, margin=0.3)
    d = lambda a, b: (F.normalize(mixed[a], dim=0) - F.normalize(mixed[b], dim=0)).norm()  # noqa: E731
    expected = torch.stack(
        [
            F.relu(d(0, 1) - d(0, 2) + 0.3),
            F.relu(d(1, 0) - min(d(1, 2), d(1, 3)) + 0.3),
            F.relu(d(2, 3) - min(d(2, 0), d(2, 1)) + 0.3),
            F.relu(d(3, 2) - min(d(3, 0), d(3, 1)) + 0.3),
        ]
    ).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    # No positives in the batch: zero, with a gradient path.
    alone = torch.randn(3, 2, requires_grad=True)
    zero = batch_hard_triplet(alone, torch.tensor([0, 1, 2]))
    zero.backward()
    assert zero.item() == 0.0 and alone.grad is not None


def test_contrastive_pulls_positives_and_pushes_negatives_only_inside_the_margin() -> None:
    labels = torch.tensor([0, 0, 1])
    ideal = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # positives coincide, the negative is at distance 2
    assert contrastive(ideal, labels, margin=1.0).item() < 1e-5
    close_negative = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1]])
    far_positive = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert contrastive(close_negative, labels).item() > 0.3
    assert contrastive(far_positive, labels).item() > 0.5
    # Gradient moves a positive pair together.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], requires_grad=True)
    contrastive(x, labels).backward()
    assert x.grad[1, 0] < 0 and x.grad[0, 1] < 0  # descending the gradient moves each towards the other


def test_distillation_is_the_cosine_distance_and_ignores_scale() -> None:
    teacher = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    assert distillation(teacher * 0.1, teacher).item() < 1e-6
    assert math.isclose(distillation(torch.tensor([[0.0, 1.0], [0.0, -1.0]]), teacher).item(), 1.5, abs_tol=1e-6)


# ----- metrics -----


def test_threshold_at_far_accepts_at_most_that_share_of_negatives() -> None:
    negatives = np.linspace(-0.5, 0.5, 1000).astype(np.float32)
    for far in (1e-3, 1e-2, 0.1):
        threshold = threshold_at_far(negatives, far)
        assert (negatives >= threshold).mean() <= far
        assert (negatives >= threshold - 2e-3).mean() > far  # and it is the lowest such threshold
    scores = np.asarray([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    same = np.asarray([True, True, True, False, False, False])
    assert roc_auc(scores, same) == pytest.approx(8 / 9)
    assert tar_at_far(scores, same, 0.0) == pytest.approx(2 / 3)


def test_balanced_threshold_maximises_tar_minus_far() -> None:
    scores = np.asarray([0.9, 0.8, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2])
    same = np.asarray([True, True, False, True, True, False, False, False])
    threshold = balanced_threshold(scores, same)
    best = max(((scores[same] >= t).mean() - (scores[~same] >= t).mean(), t) for t in scores)
    assert threshold == best[1] == 0.5
    tied = np.asarray([0.5, 0.5, 0.1])  # a threshold cannot split equal scores
    assert balanced_threshold(tied, np.asarray([True, False, False])) == 0.5


def test_flip_averaged_embedding_is_mirror_invariant() -> None:
    torch.manual_seed(0)
    served = Normalised(FaceNet(16, (8, 8, 8), (1, 1, 1), 8), flip=True).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(served(x), served(x.flip(-1)), atol=1e-5)
        assert torch.allclose(served(x).norm(dim=1), torch.ones(2))


def test_one_shot_rank1_counts_missed_faces_as_errors() -> None:
    a, b = np.asarray([1.0, 0.0]), np.asarray([0.0, 1.0])
    grid: list[list[np.ndarray | None]] = [[a, a, b], [b, b, None]]
    # enrolled photo 0: person 0's queries a (right), b (wrong); person 1's b (right), None (error)
    assert one_shot_rank1(grid, 0) == pytest.approx(2 / 4)
