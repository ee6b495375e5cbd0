"""/v1/segment end to end over real HTTP against the committed reference segmenter, plus its numpy parts."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
from PIL import Image

from service.images import Span, decode_for_graph
from service.manifest import Manifest
from service.tasks import segmentation
from tests.conftest import DATASETS, MODELS, damaged_png, jpeg_bytes, oriented_jpeg, png_bytes, start_server

SEGMENTER = "pennfudan-unet"
PENNFUDAN = DATASETS / "pennfudan"
TEST_PHOTOS = sorted((PENNFUDAN / "images").iterdir())[-50:]  # the protocol's test split


def truth(photo: Path) -> np.ndarray:
    return np.asarray(Image.open(PENNFUDAN / "masks" / f"{photo.stem}_mask.png")) > 0


def label_map(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.mode == "P"  # pixel values are class indices, the palette only makes it viewable
        return np.asarray(image)


def segment(client: httpx.Client, body: bytes, content_type: str = "image/png", **params: object) -> httpx.Response:
    return client.post("/v1/segment", params={"model": SEGMENTER, **params}, content=body, headers={"content-type": content_type})


def test_test_photos_are_segmented_at_the_reference_quality(client: httpx.Client) -> None:
    """All 50 held-out Penn-Fudan photos, whole, as multipart uploads: person IoU over the split."""
    intersection = union = 0
    for photo in TEST_PHOTOS:
        response = client.post("/v1/segment", params={"model": SEGMENTER}, files={"file": (photo.name, photo.read_bytes())})
        predicted, expected = label_map(response) == 1, truth(photo)
        assert predicted.shape == expected.shape
        intersection += int((predicted & expected).sum())
        union += int((predicted | expected).sum())
    iou = intersection / union
    # The service runs exactly the evaluation protocol of the export, so it reproduces the card's number.
    assert iou == pytest.approx(Manifest.read(MODELS / SEGMENTER).metrics["iou_person"], abs=0.005)
    assert iou >= 0.80, iou  # the target; the reference model scores 0.808


def test_json_masks_decode_to_the_png_label_map(client: httpx.Client) -> None:
    photo = TEST_PHOTOS[7]
    png = segment(client, photo.read_bytes(), "image/jpeg")
    assert png.headers["x-labels"] == "background,person" and png.headers["x-model"] == SEGMENTER
    labels = label_map(png)
    for form in ("compressed", "counts"):
        response = segment(client, photo.read_bytes(), "image/jpeg", format="json", rle=form)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == SEGMENTER and body["labels"] == ["background", "person"]
        assert (body["height"], body["width"]) == labels.shape
        assert sum(c["pixels"] for c in body["classes"]) == labels.size
        assert sum(c["fraction"] for c in body["classes"]) == pytest.approx(1.0)
        for entry in body["classes"]:
            assert entry["pixels"] == int((labels == entry["index"]).sum())
            assert entry["mask"]["size"] == list(labels.shape)
            assert isinstance(entry["mask"]["counts"], str if form == "compressed" else list)
            assert np.array_equal(segmentation.rle_decode(entry["mask"]), labels == entry["index"])
    person = body["classes"][1]
    assert 0.05 < person["fraction"] < 0.9  # a street photo with people in it


@pytest.mark.parametrize("size", [(333, 251), (97, 61), (1, 1), (2, 777), (641, 1), (1001, 667)])
def test_label_map_has_the_size_of_the_input(client: httpx.Client, size: tuple[int, int]) -> None:
    photo = Image.open(TEST_PHOTOS[3]).convert("RGB").resize(size)
    labels = label_map(segment(client, png_bytes(photo)))
    assert labels.shape == (size[1], size[0])
    body = segment(client, png_bytes(photo), format="json").json()
    assert (body["width"], body["height"]) == size


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photo_gives_the_upright_label_map(client: httpx.Client, orientation: int) -> None:
    upright = Image.open(TEST_PHOTOS[11]).convert("RGB")
    # Stored sideways, with the EXIF orientation that tells viewers (and the service) to turn it upright.
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = label_map(segment(client, jpeg_bytes(stored, exif=exif.tobytes()), "image/jpeg"))
    plain = label_map(segment(client, jpeg_bytes(upright), "image/jpeg"))
    assert rotated.shape == plain.shape == (upright.height, upright.width)
    assert (rotated == plain).mean() > 0.98
    expected = truth(TEST_PHOTOS[11])
    assert ((rotated == 1) & expected).sum() / ((rotated == 1) | expected).sum() > 0.6


def test_overlay_is_the_photo_with_the_people_tinted(client: httpx.Client) -> None:
    photo = TEST_PHOTOS[20]
    labels = label_map(segment(client, photo.read_bytes(), "image/jpeg"))
    response = segment(client, photo.read_bytes(), "image/jpeg", format="overlay", opacity=0.6)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    overlay = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.float32)
    original = np.asarray(Image.open(photo).convert("RGB")).astype(np.float32)
    assert overlay.shape == original.shape
    person, background = labels == 1, labels == 0
    assert np.abs(overlay[background] - original[background]).mean() < 4  # JPEG noise only
    redder = (overlay[person, 0] - overlay[person, 1:].mean(1)) - (original[person, 0] - original[person, 1:].mean(1))
    assert redder.mean() > 40


def test_bad_requests_get_json_errors(client: httpx.Client) -> None:
    photo = TEST_PHOTOS[0].read_bytes()
    jpeg = {"content-type": "image/jpeg"}
    cases = [
        (segment(client, photo, "image/jpeg", format="gif"), 422, "invalid_parameter"),
        (segment(client, photo, "image/jpeg", format="overlay", opacity=1.5), 422, "invalid_parameter"),
        (segment(client, photo, "image/jpeg", format="json", rle="zip"), 422, "invalid_parameter"),
        (segment(client, photo, "image/jpeg", format="png", rle="counts"), 422, "invalid_parameter"),  # was ignored
        (segment(client, photo, "image/jpeg", format="json", opacity=0.9), 422, "invalid_parameter"),
        (client.post("/v1/segment?model=nope", content=photo, headers=jpeg), 404, "unknown_model"),
        (
            client.post(f"/v1/classify?model={SEGMENTER}", content=photo, headers={"content-type": "image/jpeg"}),
            400,
            "wrong_task",
        ),
        (segment(client, b""), 400, "empty_image"),
        (segment(client, photo[: len(photo) // 3], "image/jpeg"), 400, "corrupt_image"),
        (segment(client, damaged_png(), "image/png"), 400, "corrupt_image"),
        (segment(client, b"just some text", "text/plain"), 415, "unsupported_media_type"),
        (segment(client, b"GIF89a but not really"), 400, "corrupt_image"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code


def test_the_model_is_described_by_its_manifest(client: httpx.Client) -> None:
    detail = client.get(f"/v1/models/{SEGMENTER}").json()
    assert detail["state"] == "ready" and detail["task"] == "segmentation"
    assert detail["labels"] == ["background", "person"]
    assert detail["input"]["size"] is None and detail["defaults"]["max_side"] > 0
    assert detail["metrics"]["images"] == 50 and detail["metrics"]["iou_person"] >= 0.80
    assert (MODELS / SEGMENTER / "model.onnx").stat().st_size < 10 * 2**20  # 10 MiB; 2.43 M float32 weights


# --- the numpy parts, without a server ----------------------------------------------------


def test_rle_is_column_major_coco() -> None:
    mask = np.array([[0, 1], [1, 1]], bool)  # column-major: 0, 1, 1, 1
    assert segmentation.rle_encode(mask, compressed=False) == {"size": [2, 2], "counts": [1, 3]}
    assert segmentation.rle_encode(mask)["counts"] == "13"
    assert segmentation.rle_counts(np.ones((2, 3), bool)) == [0, 6]
    # A run shorter than the one two before it is stored as a negative delta (COCO's sign bit).
    assert segmentation.counts_to_string([5, 2, 3, 1]) == "523O"
    assert segmentation.string_to_counts("523O") == [5, 2, 3, 1]


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 80), (333, 251)])
def test_rle_round_trips(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for mask in (
        np.zeros(shape, bool),
        np.ones(shape, bool),
        rng.random(shape) < 0.5,
        rng.random(shape) < 0.02,
        np.hypot(*np.indices(shape) - np.array(shape)[:, None, None] / 2) < min(shape) / 3,  # a disc
    ):
        for compressed in (True, False):
            rle = segmentation.rle_encode(mask, compressed)
            assert np.array_equal(segmentation.rle_decode(rle), mask)
    with pytest.raises(ValueError):
        segmentation.rle_decode({"size": [2, 2], "counts": [1, 2]})
    big = np.zeros((300, 400), bool)
    big[50:250, 100:180] = True
    counts = segmentation.rle_counts(big)
    assert counts[0] == 100 * 300 + 50 and counts[1] == 200 and sum(counts) == big.size
    assert segmentation.string_to_counts(segmentation.counts_to_string(counts)) == counts


def test_padding_to_the_stride_reflects_and_crops_back() -> None:
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    padded = segmentation.pad_to_multiple(x, 4)
    assert padded.shape == (2, 8, 8)
    assert np.array_equal(padded[:, :5, :7], x)
    assert np.array_equal(padded[:, 5, :7], x[:, 3])  # reflection, not a repeated edge
    assert segmentation.pad_to_multiple(x[:, :4, :4], 4).shape == (2, 4, 4)
    assert segmentation.pad_to_multiple(x[:, :1, :1], 32).shape == (2, 32, 32)


def test_model_size_scales_the_longer_side_down_only() -> None:
    assert segmentation.model_size(640, 480, 320) == (320, 240)
    assert segmentation.model_size(480, 640, 320) == (240, 320)
    assert segmentation.model_size(200, 100, 320) == (200, 100)
    assert segmentation.model_size(10000, 1, 320) == (320, 1)
    assert segmentation.model_size(640, 480, None) == (640, 480)


@pytest.mark.parametrize("orientation", [1, 2, 3, 6, 8])
def test_labels_of_a_drafted_jpeg_line_up_with_the_photo(orientation: int) -> None:
    """A 4001x3001 JPEG is decoded at 1/8 scale as 501x376 pixels spanning 4008x3008 photo pixels, the extra ones
    past the stored image's right and bottom edges, which EXIF orientations 2, 3, 6, 8 turn to the left or top:
    stretched to 4001 / 501 = 7.99 a pixel, labels fell up to 7 px short; not shifted, a turned photo's 7 px over."""
    data, truth = oriented_jpeg((4001, 3001), (1000, 808, 2000, 1608), orientation)
    side = Manifest.read(MODELS / SEGMENTER).defaults["max_side"]
    decoded = decode_for_graph(data, 50_000_000, "GRAY", (side, side), keep_photo=False)
    assert decoded.image.size == (501, 376) and decoded.size == (4001, 3001)
    margin = np.asarray(decoded.image, np.float32) / 255 - 0.5  # a "class 1 where bright" graph at the decoded size
    labels = segmentation.labels_from_logits(np.stack([-margin, margin]), margin.shape, decoded.span)
    assert labels.shape == (3001, 4001)
    ys, xs = np.nonzero(labels)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], truth, atol=1.0)


def test_logits_are_resized_before_the_argmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 16, 16)).astype(np.float32)
    labels = segmentation.labels_from_logits(logits, (10, 13), Span.whole((37, 29)))
    assert labels.shape == (29, 37) and labels.dtype == np.uint8

    def resized(channel: np.ndarray) -> np.ndarray:
        image = Image.fromarray(np.ascontiguousarray(channel[:10, :13]), mode="F").resize((37, 29), Image.Resampling.BILINEAR)
        return np.asarray(image)

    # The two-class shortcut (resize the margin) agrees with resizing every class.
    expected = np.stack([resized(c) for c in logits]).argmax(0)
    assert (labels == expected).mean() > 0.999
    three = np.concatenate([logits, np.full((1, 16, 16), -1e3, np.float32)])
    assert (segmentation.labels_from_logits(three, (10, 13), Span.whole((37, 29))) == expected).mean() > 0.999
    same = segmentation.labels_from_logits(logits, (10, 13), Span.whole((13, 10)))
    assert np.array_equal(same, logits[:, :10, :13].argmax(0))


def test_class_names_with_commas_come_whole_in_x_labels(tmp_path: Path) -> None:
    """From an own-data hunt: the names were joined, then encoded with the comma kept, so "person, adult" was two."""
    folder = tmp_path / SEGMENTER
    shutil.copytree(MODELS / SEGMENTER, folder)
    manifest = json.loads((folder / "model.json").read_text())
    manifest["labels"] = ["back ground", "person, adult ü"]
    (folder / "model.json").write_text(json.dumps(manifest))
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        response = segment(http, TEST_PHOTOS[0].read_bytes(), "image/jpeg")
    assert response.status_code == 200, response.text
    assert [unquote(name) for name in response.headers["x-labels"].split(",")] == manifest["labels"]
