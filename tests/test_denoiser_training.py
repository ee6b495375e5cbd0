"""Denoiser recipe: the Noise2Void blind spot, smoke runs (supervised and N2V) -> export -> served, 24 MP tiling."""

from __future__ import annotations

import argparse
import io
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.manifest import Manifest
from service.repository import file_sha256
from service.runtime import OnnxModel
from service.tasks import denoising
from tests.conftest import DATASETS, history, start_server
from training.__main__ import main as train
from training.datasets.denoising import image_paths, n2v_mask, random_patches, read_image, write_noisy_copy
from training.denoiser import Batches, DenoiserRecipe, add_arguments, receptive_radius, sure_blend_weight
from training.nets.dncnn import DenoiseUNet, DihedralAveraged, DnCNN

TRAIN400 = DATASETS / "denoising" / "Train400"
TINY = ["--width", "4", "--depth", "1", "--patch", "32", "--batch-size", "4", "--patches-per-image", "2"]
SMOKE = ["--limit", "10", "--val-count", "2", "--bm3d", "none", "--test-limit", "1", "--seed", "3", "--threads", "1"]


def smoke(tmp: Path, name: str, epochs: int, *extra: str) -> Path:
    train(
        [
            "denoiser",
            "--name",
            name,
            "--epochs",
            str(epochs),
            "--models-dir",
            str(tmp / "models"),
            "--runs-dir",
            str(tmp / "runs"),
            *TINY,
            *SMOKE,
            *extra,
        ]
    )
    return tmp / "models" / name


def test_n2v_blind_spots_are_hidden_from_the_network() -> None:
    """No input pixel carries a masked pixel's value: the loss pixels' own noise cannot be copied."""
    x = torch.rand(4, 1, 64, 96, requires_grad=True)
    inputs, mask = n2v_mask(x, 0.002, 2, torch.Generator().manual_seed(0))
    # Gradient of every output of a real network w.r.t. the original image: zero exactly at the blind spots.
    net = DenoiseUNet(1, (4, 8, 16), 1)
    net(inputs).sum().backward()
    assert x.grad is not None
    assert (x.grad[mask] == 0).all()
    assert (x.grad[~mask] != 0).float().mean() > 0.99
    # Changing the blind spots' values changes nothing the network sees.
    changed = x.detach() + 10 * mask
    again, mask_again = n2v_mask(changed, 0.002, 2, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask_again) and torch.equal(inputs.detach(), again)


def test_n2v_training_loss_counts_the_blind_spots_only() -> None:
    """The recipe's step: an output exact at the blind spots and off by 255 levels everywhere else costs nothing
    (a loss over every pixel would teach the identity)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--mode", "n2v", "--noise-sigma", "25", "--no-bf16", *TINY])
    recipe = DenoiserRecipe(args, [np.random.default_rng(0).random((1, 48, 48), np.float32)], [])
    inputs = torch.rand(4, 1, 32, 32)
    _, mask = n2v_mask(inputs, 0.01, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = recipe.model(inputs.contiguous(memory_format=torch.channels_last)).float() + (~mask).float()
    assert recipe.train_step((inputs, mask, target))["loss"] < 1.0  # squared 8-bit levels: zero but for rounding
    assert recipe.train_step((inputs, None, target))["loss"] > 1000  # the supervised step counts every pixel


def test_self_ensemble_maps_every_view_back() -> None:
    """The 8-view mean of a (not equivariant) network is itself equivariant: each view was mapped back right."""
    torch.manual_seed(0)
    net = DihedralAveraged(DenoiseUNet(1, (4, 8, 16), 1, residual=False)).eval()
    x = torch.rand(1, 1, 24, 36)
    with torch.no_grad():
        y = net(x)
        assert y.shape == x.shape
        for view, back in (
            (x.flip(3), lambda t: t.flip(3)),
            (x.flip(2), lambda t: t.flip(2)),
            (x.transpose(2, 3), lambda t: t.transpose(2, 3)),
            (x.rot90(1, (2, 3)), lambda t: t.rot90(-1, (2, 3))),
        ):
            torch.testing.assert_close(back(net(view)), y, atol=1e-5, rtol=0)
        assert (net.model(x) - y).abs().max() > 1e-4  # the plain network alone is not equivariant


class NeighbourMean(torch.nn.Module):
    """A fixed 3x3 smoother: with ``centre=False`` it ignores each pixel's own value, as a blind-spot network does."""

    def __init__(self, centre: bool) -> None:
        super().__init__()
        kernel = torch.ones(1, 1, 3, 3)
        kernel[0, 0, 1, 1] = 1.0 if centre else 0.0
        self.register_buffer("kernel", kernel / kernel.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel)


@pytest.mark.parametrize("centre", [False, True])
def test_sure_blend_weight_is_the_one_the_clean_images_would_pick(centre: bool) -> None:
    """From noisy images and sigma alone, SURE finds the blend weight that minimises the error to the clean images;
    with ``centre`` the smoother sees each pixel's own noise, which only the divergence term accounts for."""
    sigma = 25.0
    rng = np.random.default_rng(0)
    clean = [torch.from_numpy(read_image(path)) for path in sorted(TRAIN400.iterdir())[:12]]
    noisy = [x + torch.from_numpy(rng.normal(0, sigma / 255, x.shape).astype(np.float32)) for x in clean]
    network = NeighbourMean(centre)
    weight = sure_blend_weight(network, noisy, sigma, stride=4, seed=0)
    # The oracle: argmin_w sum ||(g - x) + w (y - g)||^2 over the images, with the clean x known.
    with torch.no_grad():
        outputs = [network(y[None])[0] for y in noisy]
    numerator = sum(float(((g - x) * (y - g)).sum()) for g, x, y in zip(outputs, clean, noisy, strict=True))
    denominator = sum(float(((y - g) ** 2).sum()) for g, y in zip(outputs, noisy, strict=True))
    oracle = -numerator / denominator
    assert 0.05 < oracle < 0.6 and weight == pytest.approx(oracle, abs=0.02)


def test_n2v_mask_is_stratified_and_copies_a_neighbour() -> None:
    n, height, width = 8, 64, 64
    x = torch.arange(n * height * width, dtype=torch.float32).reshape(n, 1, height, width)  # every value unique
    inputs, mask = n2v_mask(x, 0.002, 2, torch.Generator().manual_seed(1))
    cell = 22  # round(sqrt(1 / 0.002))
    counts = mask.reshape(n, height, width).unfold(1, cell, cell).unfold(2, cell, cell).sum((-1, -2))
    assert (counts <= 1).all() and mask.float().mean().item() == pytest.approx(0.002, rel=0.3)
    assert torch.equal(inputs[~mask], x[~mask])
    for b, _, y, x0 in mask.nonzero().tolist():
        value = inputs[b, 0, y, x0].item()
        assert value != x[b, 0, y, x0].item()  # never itself
        sy, sx = divmod(int(value) - b * height * width, width)
        assert max(abs(sy - y), abs(sx - x0)) <= 2  # from its 5x5 neighbourhood
        assert not mask[b, 0, sy, sx]


@pytest.mark.parametrize(
    ("network", "stride", "reach"),
    [
        (DnCNN(1, 17, 8), 1, 17),
        (DnCNN(1, 40, 8), 1, 40),
        (DenoiseUNet(1, (8, 16, 32), 2), 4, 31),
        (DenoiseUNet(1, (8, 16, 32), 3), 4, 46),
    ],
    ids=["dncnn-17", "dncnn-40", "unet-depth-2", "unet-depth-3"],
)
def test_the_receptive_field_is_measured_for_any_architecture(network: torch.nn.Module, stride: int, reach: int) -> None:
    """The export sets the tiles' overlap from it: a fixed 32 px left a depth-3 U-Net (46 px) or a 40-layer DnCNN
    with seams in every photo larger than a tile. DnCNN's reach is its depth (3x3 convolutions)."""
    assert receptive_radius(network.eval(), 1, stride) == reach


def test_n2v_reads_the_noisy_copies_of_its_own_training_images_only(tmp_path: Path) -> None:
    """The copy folder is named by sigma, seed and colour: a run with fewer training images (a larger --val-count)
    found the earlier run's copies of its now held-out images there, and trained on them."""
    photos = sorted(TRAIN400.glob("*.png"))[:3]
    assert len(write_noisy_copy(photos, 25, 0, tmp_path)) == 3
    fewer = write_noisy_copy(photos[:2], 25, 0, tmp_path)
    assert [path.name for path in fewer] == ["00000-" + photos[0].stem + ".npy", "00001-" + photos[1].stem + ".npy"]
    assert len(list(fewer[0].parent.iterdir())) == 3  # the third is still there, and not read


def test_patches_are_seeded_crops() -> None:
    images = [torch.rand(1, 40, 50), torch.rand(1, 20, 20)]
    a = random_patches(images, 6, 32, torch.Generator().manual_seed(5))
    b = random_patches(images, 6, 32, torch.Generator().manual_seed(5))
    assert a.shape == (6, 1, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, random_patches(images, 6, 32, torch.Generator().manual_seed(6)))
    # Each patch is a crop of one of the images (the first; the second is too small to hold one unpadded), turned
    # or flipped.
    large = images[0][0]
    for patch in random_patches(images[:1], 12, 32, torch.Generator().manual_seed(7))[:, 0]:
        orientations = [torch.rot90(p, -turns) for p in (patch, patch.flip(1)) for turns in range(4)]
        assert any(torch.equal(large[y : y + 32, x : x + 32], o) for o in orientations for y in range(9) for x in range(19))


def test_colour_batches_include_gray_patches_with_the_same_noise_in_every_channel() -> None:
    """A grayscale photo reaches a colour model replicated, its noise identical in the three channels."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--color", "--gray-fraction", "0.5", "--batch-size", "64", "--patch", "16", "--clip-fraction", "0"])
    recipe = DenoiserRecipe(args, [np.random.default_rng(0).random((3, 40, 50), dtype=np.float32)], [])
    noisy, _, clean = next(iter(Batches(recipe, 0)))
    noise = noisy - clean
    gray = (clean[:, :1] == clean).all(dim=(1, 2, 3))
    same_noise = (noise[:, :1] == noise).all(dim=(1, 2, 3))
    assert torch.equal(gray, same_noise) and 16 < int(gray.sum()) < 48
    args.gray_fraction = 0.0
    _, _, clean = next(iter(Batches(recipe, 0)))
    assert not (clean[:, :1] == clean).all(dim=(1, 2, 3)).any()


@pytest.mark.slow
def test_bm3d_runs_on_the_same_noisy_images_and_fills_the_cards_table(tmp_path: Path) -> None:
    """The classical baseline is computed in the run (the other smoke runs skip it): one Set12 photo, three sigmas."""
    folder = smoke(tmp_path, "tiny-bm3d", 1, "--bm3d", "run", "--test-sets", "Set12")
    metrics = Manifest.read(folder).metrics
    for sigma, floor in ((15, 30.0), (25, 27.5), (50, 24.0)):  # BM3D on Set12's first photo: about 2 dB above these
        assert metrics[f"bm3d_psnr_Set12_s{sigma}"] > floor, metrics
        assert metrics[f"bm3d_psnr_Set12_s{sigma}"] > metrics[f"psnr_Set12_s{sigma}"]  # a one-epoch toy model loses
    card = (folder / "card.md").read_text()
    assert "BM3D PSNR / SSIM (this run)" in card and "| Set12 | 25 | 1 |" in card


@pytest.mark.slow
def test_supervised_smoke_run_exports_and_serves_any_size(tmp_path: Path) -> None:
    folder = smoke(tmp_path, "tiny", 2)
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "model.json", "card.md", "curves.png"}
    manifest = Manifest.read(folder)
    assert manifest.sha256 == file_sha256(folder / "model.onnx")
    assert manifest.task.value == "denoising" and manifest.outputs == {"image": "image"}
    assert manifest.input.size is None and manifest.input.color == "GRAY"
    assert manifest.defaults == {"tile": 512, "overlap": 32, "stride": 4, "pad": "reflect"}
    assert manifest.metrics["parity_max_abs_diff"] < 1e-3
    assert {"psnr_Set12_s15", "psnr_BSD68_s50", "ssim_CBSD68_s25"} <= set(manifest.metrics)
    assert manifest.training["mode"] == "supervised" and manifest.training["seed"] == 3
    card = (folder / "card.md").read_text()
    assert "| BSD68 | 25 |" in card and "channel by channel" in card
    assert "receptive-field radius, 16 px as measured at export" in card  # depth 1: within the overlap of 32
    rows = history(tmp_path, "tiny")
    assert len(rows) == 2 and {"train_loss", "val_psnr15", "val_psnr25", "val_psnr50"} <= set(rows[-1])

    # A 24-megapixel photo over HTTP: tiled, bounded, the exact size back.
    photo = Image.open(DATASETS / "denoising" / "BSD68" / "test011.png").convert("L").resize((6000, 4000))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=85)
    with start_server(models_dir=tmp_path / "models") as live, httpx.Client(base_url=live.url, timeout=600) as http:
        response = http.post("/v1/denoise", content=buffer.getvalue(), headers={"content-type": "image/jpeg"})
        assert response.status_code == 200, response.text
        assert int(response.headers["x-tiles"]) == 126  # 14 x 9 tiles of 512 px overlapping by 2 x 32
        out = Image.open(io.BytesIO(response.content))
        assert out.size == (6000, 4000) and out.mode == "L"

    # In-process, the same photo's peak numpy memory: the uint8 photo, the uint8 result and a few tiles.
    pixels = np.asarray(photo)[:, :, None]
    model = OnnxModel(folder / "model.onnx", "input", ["image"], 1)
    tracemalloc.start()
    output = denoising.Tiler(pixels, manifest).run(lambda batch: model.run(batch)[0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert output.shape == pixels.shape
    assert peak < 2 * pixels.nbytes + 40e6, peak  # the whole photo as float32 alone would be 96 MB


def test_fine_tuning_in_place_starts_a_new_run_and_keeps_the_earlier_one(tmp_path: Path) -> None:
    # README's two steps (the reference model's lineage): --init-from the model under its own --name. A run never
    # replaces a checkpoint unasked, but --init-from asks for a new run: the earlier one moves aside.
    first = smoke(tmp_path, "same", 1)
    earlier = (tmp_path / "runs" / "same" / "metrics.jsonl").read_text()
    smoke(tmp_path, "same", 1, "--init-from", str(first), "--lr", "3e-4")
    assert (tmp_path / "runs" / "same.before-init-from" / "metrics.jsonl").read_text() == earlier
    assert Manifest.read(first).training["init_from"]["model"].endswith("same")
    with pytest.raises(SystemExit, match="holds an earlier run of --name same: continue it with --resume"):
        smoke(tmp_path, "same", 1)  # without --init-from, as ever


def test_fine_tuning_starts_from_an_exported_model(tmp_path: Path) -> None:
    first = smoke(tmp_path, "first", 1)
    again = smoke(tmp_path, "again", 0, "--init-from", str(first))  # no epoch: the same weights, exported again
    x = np.random.default_rng(0).random((1, 1, 32, 48), dtype=np.float32)
    before = OnnxModel(first / "model.onnx", "input", ["image"], 1).run(x)[0]
    after = OnnxModel(again / "model.onnx", "input", ["image"], 1).run(x)[0]
    assert np.abs(before - after).max() < 1e-5
    manifest = Manifest.read(again)
    assert manifest.training["init_from"]["sha256"] == Manifest.read(first).sha256
    assert manifest.training["init_from"]["command"] == Manifest.read(first).training["command"]
    card = (again / "card.md").read_text()
    assert "started from the weights of" in card and "no epoch was trained here" in card
    assert (again / "curves.png").read_bytes() == (first / "curves.png").read_bytes()
    with pytest.raises(SystemExit, match="not the same architecture"):
        smoke(tmp_path, "wider", 0, "--init-from", str(first), "--width", "8")
    with pytest.raises(SystemExit, match="--predict noise"):  # residual weights read as a clean-image network
        smoke(tmp_path, "n2v", 0, "--init-from", str(first), "--mode", "n2v")
    # DnCNN's export folds its batch-norms into the convolutions: its graph cannot be trained from.
    dncnn = smoke(tmp_path, "dncnn", 1, "--arch", "dncnn", "--depth", "3")
    with pytest.raises(SystemExit, match="folded the batch-norm"):
        smoke(tmp_path, "dncnn-again", 0, "--arch", "dncnn", "--depth", "3", "--init-from", str(dncnn))


def test_colour_model_starts_from_a_gray_one_and_serves_colour_photos(tmp_path: Path) -> None:
    gray = smoke(tmp_path, "soft-gray", 1)  # sorts between the colour models: routing, not order, must pick it
    photos = ["--color", "--data-dir", str(DATASETS / "pennfudan" / "images"), "--reduce", "2", "--test-sets", "CBSD68"]
    inflated = smoke(tmp_path, "inflated", 0, "--init-from", str(gray), *photos)
    manifest = Manifest.read(inflated)
    assert manifest.input.color == "RGB" and manifest.input.channels == 3 and manifest.input.mean == [0.0] * 3
    # Inflated weights: a gray image replicated to three channels gets the gray network's result in each.
    x = np.random.default_rng(0).random((1, 1, 32, 48), dtype=np.float32)
    expected = OnnxModel(gray / "model.onnx", "input", ["image"], 1).run(x)[0]
    colour = OnnxModel(inflated / "model.onnx", "input", ["image"], 1).run(np.repeat(x, 3, axis=1))[0]
    assert colour.shape == (1, 3, 32, 48) and np.abs(colour - expected).max() < 1e-5

    tuned = smoke(tmp_path, "tuned", 1, "--init-from", str(gray), *photos)
    manifest = Manifest.read(tuned)
    assert "psnr_CBSD68_s25" in manifest.metrics and "pennfudan" in manifest.training["data"]
    assert {"val_psnr25", "val_gray_psnr25"} <= history(tmp_path, "tuned")[-1].keys()  # gray photos validated too
    card = (tuned / "card.md").read_text()
    assert "an RGB image" in card and "shrunk 2x" in card and "started from the weights of" in card and "made gray" in card
    photo = Image.open(sorted((DATASETS / "denoising" / "CBSD68").iterdir())[0])
    buffer = io.BytesIO()
    photo.convert("RGB").save(buffer, format="PNG")
    with start_server(models_dir=tmp_path / "models") as live, httpx.Client(base_url=live.url, timeout=120) as http:
        response = http.post("/v1/denoise?model=tuned", content=buffer.getvalue(), headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        out = Image.open(io.BytesIO(response.content))
        assert out.mode == "RGB" and out.size == photo.size
        # Without ?model=, an upload gets the first loaded denoiser of its own colour.
        response = http.post("/v1/denoise", content=buffer.getvalue(), headers={"content-type": "image/png"})
        assert response.status_code == 200 and response.headers["x-model"] == "inflated"
        buffer = io.BytesIO()
        photo.convert("L").save(buffer, format="PNG")
        response = http.post("/v1/denoise", content=buffer.getvalue(), headers={"content-type": "image/png"})
        assert response.status_code == 200 and response.headers["x-model"] == "soft-gray"
        assert Image.open(io.BytesIO(response.content)).mode == "L"
    # The operator's default wins over colour routing.
    settings = {"models_dir": tmp_path / "models", "default_models": "denoising=tuned"}
    with start_server(**settings) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        response = http.post("/v1/denoise", content=buffer.getvalue(), headers={"content-type": "image/png"})
        assert response.status_code == 200 and response.headers["x-model"] == "tuned"
        assert Image.open(io.BytesIO(response.content)).mode == "L"


def test_n2v_on_a_users_noisy_photos_only(tmp_path: Path) -> None:
    """N2V from a folder of noisy photos, with no clean images at all (--data-dir points nowhere)."""
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(TRAIN400.iterdir())[:6]:
        clean = np.asarray(Image.open(path), np.float64)
        Image.fromarray(np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)).save(noisy / path.name)
    mine = ["--mode", "n2v", "--noisy-dir", str(noisy), "--data-dir", str(tmp_path / "absent"), "--val-count", "0"]
    with pytest.raises(SystemExit, match="needs --noise-sigma"):  # the blend must know the photos' noise level
        smoke(tmp_path, "mine", 1, *mine)
    folder = smoke(tmp_path, "mine", 1, *mine, "--noise-sigma", "25", "--self-ensemble")
    manifest = Manifest.read(folder)
    assert manifest.training["mode"] == "n2v" and manifest.training["train_images"] == 6
    assert "psnr_BSD68_s25" in manifest.metrics and "psnr_BSD68_s15" not in manifest.metrics  # measured at its sigma only
    card = (folder / "card.md").read_text()
    assert "Noise2Void" in card and "self-ensemble" in card and "predicts the clean pixels directly" in card
    assert 0 < manifest.metrics["blend_weight"] < 1 and "minimises SURE" in card
    # As the README's command runs it, with no ../shared/datasets at all (own-data hunt): validation read Train400
    # (absent: "No such file or directory"), every export needed Set12/BSD68, and the card named Train400 as the data.
    where = [
        "--models-dir",
        str(tmp_path / "models"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--test-dir",
        str(tmp_path / "absent"),
    ]
    options = [*TINY, "--bm3d", "none", "--threads", "1", *mine[:-2], "--noise-sigma", "25", "--test-sets"]
    train(["denoiser", "--name", "alone", "--epochs", "1", *where, *options])
    alone = Manifest.read(tmp_path / "models" / "alone")
    card = (tmp_path / "models" / "alone" / "card.md").read_text()
    assert alone.training["data"] == str(noisy) and alone.training["train_images"] == 6
    assert "No test set was measured" in card and "no image held out" in card and "Train400" not in card


def test_n2v_noisy_copy_and_resume_repeat_a_straight_run(tmp_path: Path) -> None:
    smoke(tmp_path, "straight", 2, "--mode", "n2v")
    copies = list((tmp_path / "runs" / "straight").glob("noisy-*/*.npy"))
    assert len(copies) == 8 and copies[0].parent.name == "noisy-s25-seed3-gray-r1"  # 10 images, 2 held out
    smoke(tmp_path, "resumed", 2, "--mode", "n2v", "--stop-after", "1")
    assert not (tmp_path / "models" / "resumed").exists()
    with pytest.raises(SystemExit, match="--predict clean"):  # a residual network would misread its weights
        smoke(tmp_path, "resumed", 2, "--mode", "n2v", "--resume", "--predict", "noise")
    with pytest.raises(SystemExit, match="--mask-fraction"):  # the blind spots it trained with
        smoke(tmp_path, "resumed", 2, "--mode", "n2v", "--resume", "--mask-fraction", "0.01")
    smoke(tmp_path, "resumed", 2, "--mode", "n2v", "--resume")
    for a, b in zip(history(tmp_path, "straight"), history(tmp_path, "resumed"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_psnr25"] == pytest.approx(b["val_psnr25"], abs=1e-4)


def test_patches_larger_than_twice_a_photo_are_mirrored_up_to_size() -> None:
    from training.datasets.denoising import random_patches

    photo = torch.arange(180 * 170, dtype=torch.float32).reshape(1, 180, 170)
    patches = random_patches([photo, torch.ones(1, 1, 5)], 6, 400, torch.Generator().manual_seed(0))
    assert patches.shape == (6, 1, 400, 400)
    assert set(patches.unique().tolist()) <= set(photo.unique().tolist()) | {1.0}  # only the photos' own pixels


def test_n2v_trains_a_colour_model(tmp_path: Path) -> None:
    # One blind-spot mask for the three channels (review: the first step failed with an IndexError).
    photos = ["--color", "--data-dir", str(DATASETS / "pennfudan" / "images"), "--reduce", "2", "--test-sets", "CBSD68"]
    folder = smoke(tmp_path, "colour-n2v", 1, "--mode", "n2v", *photos)
    manifest = Manifest.read(folder)
    assert manifest.input.color == "RGB" and manifest.training["mode"] == "n2v" and "psnr_CBSD68_s25" in manifest.metrics


@pytest.mark.parametrize(
    ("tile", "message"),
    [
        ("2048", r"--tile 2048: the service takes tiles of 1\.\.1024 px"),  # trained to the end, failed at the export
        ("64", r"--tile 64 is under 3x --overlap 32"),  # served with 20 px of overlap: seams, though the card said none
    ],
)
def test_a_tile_the_service_would_refuse_or_cut_stops_the_recipe_before_training(tmp_path: Path, tile: str, message: str) -> None:
    from training.denoiser import main as run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--tile", tile, "--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models")])
    with pytest.raises(SystemExit, match=message):
        run(args)
    assert not (tmp_path / "runs").exists()


def test_hidden_files_are_not_training_images(tmp_path: Path) -> None:
    for name in ("a.png", "._a.png", ".b.png", "c.npy", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in image_paths(tmp_path)] == ["a.png", "c.npy"]  # ._a.png was read as an image
