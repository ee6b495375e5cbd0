"""The face detector: several sources with merged labels (facemask + LFW), LFW's re-framing, the
smoke run of that recipe, and the reference ``face-detector`` over real HTTP on LFW DevTest and AT&T photos."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from service.manifest import Manifest
from tests.conftest import DATASETS, MODELS, ROOT, start_server
from training import detector
from training.__main__ import main as train
from training.datasets.lfw import boxed_faces, pair_people, read_pairs

FACEMASK = DATASETS / "facemask"
LFW = DATASETS / "lfw"
ATT = DATASETS / "att_faces"
TINY = ["--widths", "8", "16", "32", "32", "--depths", "0", "1", "1", "1", "--neck-width", "16"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    detector.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.data_dir = args.data_dir or [detector.DEFAULT_DATA]
    return args


def person(sample: detector.BoxedImage) -> str:
    return sample.path.parent.name


def test_facemask_and_lfw_merge_into_face_and_devtest_people_stay_out() -> None:
    args = parse("--data-dir", str(FACEMASK), "--data-dir", str(LFW), "--merge-labels", "face")
    facemask, lfw = detector.load_sources(args)
    for source in (facemask, lfw):
        assert {n for s in source.train + source.val + source.test for n in s.names} == {"face"}

    # facemask keeps its committed split; the merge renames labels and nothing else
    split = json.loads((ROOT / "training" / "splits" / "facemask.json").read_text())
    assert sorted(s.key for s in facemask.test) == sorted(split["test"])
    assert sorted(s.key for s in facemask.train + facemask.val) == sorted(split["train"])
    alone, *_ = detector.load_splits(parse("--data-dir", str(FACEMASK)))
    assert [s.key for s in alone] == [s.key for s in facemask.train]
    assert sum(len(s.boxes) for s in alone) == sum(len(s.boxes) for s in facemask.train)

    # LFW: DevTest people are the test set and only that; validation people are whole people apart
    devtest = pair_people(LFW / "pairs" / "pairsDevTest.txt")
    assert {person(s) for s in lfw.test} == devtest
    assert not {person(s) for s in lfw.train + lfw.val} & devtest
    assert not {person(s) for s in lfw.train} & {person(s) for s in lfw.val}
    assert 0 < len(lfw.val) <= detector.LFW_VAL_IMAGES
    assert len(lfw.train) + len(lfw.val) + len(lfw.test) == len(boxed_faces(LFW))
    pair_paths = {LFW / "images" / p for pair in read_pairs(LFW / "pairs" / "pairsDevTest.txt") for p in (pair.a, pair.b)}
    assert lfw.pair_images == pair_paths and len(pair_paths) == 1549 and pair_paths <= {s.path for s in lfw.test}
    assert lfw.portraits and not facemask.portraits

    again = detector.load_sources(args)[1]  # seeded: the same validation people every time
    assert [s.path for s in again.val] == [s.path for s in lfw.val]


def test_lfw_photos_are_reframed_from_small_faces_to_faces_larger_than_the_crop() -> None:
    torch.manual_seed(0)
    samples = boxed_faces(LFW)[:40]
    crop = 128
    portraits = detector.Portraits(samples, ["face"], crop, (16.0, 160.0), (110, 110, 110), grayscale=1.0)
    sides = []
    for index in range(len(samples)):
        image, boxes, labels = portraits[index]
        assert image.shape == (3, crop, crop) and image.dtype == torch.uint8
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grayscale=1: every crop gray
        assert len(boxes) == 1 and labels.tolist() == [0]
        assert (boxes >= 0).all() and (boxes <= crop).all()
        sides.append(float((boxes[0, 2:] - boxes[0, :2]).max()))
    assert min(sides) < 32 and max(sides) >= crop - 1  # tiny faces and faces filling the crop (clipped by it)


def test_an_epoch_draws_the_asked_number_from_each_source() -> None:
    args = parse("--data-dir", str(FACEMASK), *TINY, "--batch-size", "4")
    small, large = torch.utils.data.TensorDataset(torch.zeros(5)), torch.utils.data.TensorDataset(torch.zeros(50))
    val = detector.Cached([], ["face"], 64, [0.5, 0.5, 0.5])
    recipe = detector.DetectorRecipe(args, [small, large], val, ["face"], [0.5] * 3, [0.25] * 3, epoch_images=[12, 20])
    order = recipe.epoch_order(torch.Generator().manual_seed(0))
    assert len(order) == 32 == recipe.epoch_size
    from_small = [i for i in order if i < 5]
    from_large = [i for i in order if i >= 5]
    assert len(from_small) == 12 and set(from_small) == set(range(5))  # fewer photos than asked: every one, then again
    assert len(from_large) == 20 and len(set(from_large)) == 20  # more than asked: each at most once
    assert order != sorted(order)


@pytest.mark.slow
def test_trains_on_facemask_and_lfw_with_merged_labels(tmp_path: Path) -> None:
    check = tmp_path / "att"
    check.mkdir()
    for person_dir in ("s1", "s2"):
        shutil.copy(ATT / person_dir / "1.pgm", check / f"{person_dir}.pgm")
    argv = ["detector", "--data-dir", str(FACEMASK), "--data-dir", str(LFW), "--merge-labels", "face", "--name", "tiny-face"]
    argv += ["--limit", "12", "--batch-size", "6", "--image-size", "128", "--crop", "96", *TINY, "--strides", "8", "16", "32"]
    argv += ["--epochs", "1", "--epoch-images", "6", "12", "--grayscale", "0.2", "--check-dir", str(check)]
    argv += [
        "--workers",
        "0",
        "--no-bf16",
        "--seed",
        "3",
        "--models-dir",
        str(tmp_path / "models"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    train(argv)
    folder = tmp_path / "models" / "tiny-face"
    manifest = Manifest.read(folder)
    assert manifest.labels == ["face"]
    metrics = manifest.metrics
    assert metrics["dataset"] == "facemask" and metrics["images"] == 3
    assert metrics["lfw"]["images"] == 3 and metrics["lfw"]["pair_images"] == 3 and "detection_rate" in metrics["lfw"]
    assert metrics["att"]["photos"] == 2 and 0 <= metrics["att"]["found"] <= 1 and metrics["att"]["photo_size"] == "92x112"
    assert manifest.training["sources"]["lfw"]["train_images"] == 12
    assert manifest.training["epoch_images"] == {"facemask": 6, "lfw": 12}
    history = [json.loads(line) for line in (tmp_path / "runs" / "tiny-face" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_facemask_any_ap50", "val_lfw_any_ap50"} <= set(history[-1])
    card = (folder / "card.md").read_text()
    assert "`lfw` test" in card and "`att` (2 photos" in card and "labels merged into `face`" in card


# --- the reference model over real HTTP ---------------------------------------------------------

FACE_DETECTOR = "face-detector"


def detect(client: httpx.Client, data: bytes, content_type: str) -> list[dict]:
    response = client.post("/v1/detect", params={"model": FACE_DETECTOR}, content=data, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    return response.json()["detections"]


@pytest.fixture(scope="module")
def face_client() -> httpx.Client:
    with start_server(models_dir=MODELS) as live, live.client() as http:
        yield http


def test_reference_face_detector_finds_the_face_in_lfw_devtest_photos(face_client: httpx.Client) -> None:
    manifest = Manifest.read(MODELS / FACE_DETECTOR)
    assert manifest.labels == ["face"]
    pairs = read_pairs(LFW / "pairs" / "pairsDevTest.txt")
    boxes = {s.path: s.boxes for s in boxed_faces(LFW)}
    for pair in pairs[:4] + pairs[-4:]:  # matched and mismatched pairs' first photos: people never trained on
        path = LFW / "images" / pair.a
        found = detect(face_client, path.read_bytes(), "image/jpeg")
        assert found and {d["label"] for d in found} == {"face"}
        predicted = torch.tensor([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found])
        assert box_iou(torch.from_numpy(boxes[path]), predicted).max() >= 0.5, (path.name, found)


def test_reference_face_detector_finds_a_face_filling_an_att_photo(face_client: httpx.Client) -> None:
    for person_dir, number in (("s1", 1), ("s17", 5), ("s40", 10)):
        buffer = io.BytesIO()
        with Image.open(ATT / person_dir / f"{number}.pgm") as image:
            assert image.size == (92, 112) and image.mode == "L"
            image.save(buffer, format="PNG")  # the service takes PNG, not PGM: what a client would send
        found = detect(face_client, buffer.getvalue(), "image/png")
        assert found, (person_dir, number)
        best = max(found, key=lambda d: d["score"])["box"]
        width, height = best["x2"] - best["x1"], best["y2"] - best["y1"]
        centre = np.array([(best["x1"] + best["x2"]) / 2, (best["y1"] + best["y2"]) / 2])
        assert width > 0.4 * 92 and height > 0.3 * 112  # the face, not a detail of it
        assert np.abs(centre - [46, 56]).max() < 25  # near the photo's middle, where AT&T's faces are
