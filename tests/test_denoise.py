"""/v1/denoise end to end over real HTTP against the committed reference denoisers, plus the tiling maths."""

from __future__ import annotations

import io
import re
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.manifest import Manifest
from service.tasks import denoising
from tests.conftest import DATASETS, MODELS, png_bytes, start_server

SUPERVISED = "bsd-denoiser-unet"
N2V = "bsd-n2v-unet"
COLOUR = "color-denoiser-unet"
DENOISING = DATASETS / "denoising"


def noisy_png(path, sigma: float, color: str = "L") -> tuple[np.ndarray, bytes]:
    """A test photo with seeded Gaussian noise, clipped and quantised as any uploaded 8-bit image is."""
    clean = np.asarray(Image.open(path).convert(color))
    rng = np.random.default_rng([7, int(sigma), zlib.crc32(path.name.encode())])
    noisy = np.clip(clean + rng.normal(0, sigma, clean.shape) + 0.5, 0, 255).astype(np.uint8)
    return clean, png_bytes(Image.fromarray(noisy, color))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def denoise(client: httpx.Client, body: bytes, **params: object) -> httpx.Response:
    return client.post("/v1/denoise", params={"model": SUPERVISED, **params}, content=body, headers={"content-type": "image/png"})


def decoded(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_noisy_set12_comes_back_cleaner_by_the_models_margin(client: httpx.Client) -> None:
    """All of Set12 at sigma 25 over HTTP: the mean PSNR the card reports (on 8-bit uploads, within 0.3 dB)."""
    noisy_scores, clean_scores = [], []
    for path in sorted((DENOISING / "Set12").iterdir()):
        clean, body = noisy_png(path, 25)
        image = decoded(denoise(client, body))
        assert image.mode == "L" and image.size == (clean.shape[1], clean.shape[0])
        noisy_scores.append(psnr(clean, np.asarray(Image.open(io.BytesIO(body)))))
        clean_scores.append(psnr(clean, np.asarray(image)))
    card = Manifest.read(MODELS / SUPERVISED).metrics["psnr_Set12_s25"]
    assert np.mean(clean_scores) >= card - 0.3, (np.mean(clean_scores), card)
    assert min(np.subtract(clean_scores, noisy_scores)) > 7.0  # every image gains, none is spoilt


@pytest.mark.parametrize("model", [SUPERVISED, N2V])
def test_bsd68_over_http_measures_what_the_card_says(client: httpx.Client, model: str) -> None:
    """The quality bars read BSD68 at sigma 25 from the cards (Noise2Void >= 27.0 dB, the supervised model above
    BM3D): measured again here over HTTP, on 8-bit uploads (clipped and rounded, unlike the export's float noisy
    images) with other noise. Measured so, the Noise2Void model gave 27.33 dB against its card's 27.45 (it trained on
    unclipped noise), the supervised one, which trained on clipped patches too, 28.97 against 28.98."""
    scores = []
    for path in sorted((DENOISING / "BSD68").iterdir()):
        clean, body = noisy_png(path, 25)
        scores.append(psnr(clean, np.asarray(decoded(denoise(client, body, model=model)))))
    card = Manifest.read(MODELS / model).metrics
    measured = float(np.mean(scores))
    assert len(scores) == 68 and abs(measured - card["psnr_BSD68_s25"]) < 0.2, (measured, card["psnr_BSD68_s25"])
    assert measured >= 27.0 if model == N2V else measured > card["bm3d_psnr_BSD68_s25"], measured


def test_colour_photo_is_denoised_per_channel_and_stays_colour(client: httpx.Client) -> None:
    path = sorted((DENOISING / "CBSD68").iterdir())[3]
    clean, body = noisy_png(path, 25, "RGB")
    image = decoded(denoise(client, body))
    assert image.mode == "RGB" and image.size == (clean.shape[1], clean.shape[0])
    out = np.asarray(image)
    assert psnr(clean, out) > psnr(clean, np.asarray(Image.open(io.BytesIO(body)))) + 6
    assert np.abs(out.astype(int) - out.mean(axis=2, keepdims=True)).mean() > 3  # colour kept, not grayed


def test_colour_model_takes_colour_photos_by_default_and_gray_ones_by_name(client: httpx.Client) -> None:
    """CBSD68 photos at sigma 25 go to the colour model unasked and beat the gray model's per-channel result;
    a gray photo at sigma 50 sent to it by name is not mistaken for detail (its noise is the same in every channel)."""
    gains = []
    for path in sorted((DENOISING / "CBSD68").iterdir())[:4]:
        clean, body = noisy_png(path, 25, "RGB")
        default = client.post("/v1/denoise", content=body, headers={"content-type": "image/png"})
        assert default.headers["x-model"] == COLOUR
        gains.append(psnr(clean, np.asarray(decoded(default))) - psnr(clean, np.asarray(decoded(denoise(client, body)))))
    assert np.mean(gains) > 0.8, gains  # the card: +1.5 dB over the gray model on all of CBSD68
    clean, body = noisy_png(DENOISING / "Set12" / "05.png", 50)
    image = decoded(denoise(client, body, model=COLOUR))
    assert image.mode == "L"
    gray_model = psnr(clean, np.asarray(decoded(denoise(client, body))))
    assert psnr(clean, np.asarray(image)) > gray_model - 1.0, (psnr(clean, np.asarray(image)), gray_model)


def test_grayscale_jpeg_and_odd_sizes_keep_their_exact_size(client: httpx.Client) -> None:
    path = DENOISING / "BSD68" / "test005.png"
    photo = Image.open(path).convert("L").crop((3, 5, 3 + 201, 5 + 77))  # odd size: not a multiple of the stride
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    response = client.post("/v1/denoise", files={"file": ("x.jpg", buffer.getvalue())}, params={"model": SUPERVISED})
    image = decoded(response)
    assert image.size == (201, 77) and image.mode == "L"
    assert response.headers["x-model"] == SUPERVISED and response.headers["x-tiles"] == "1"
    tiny = decoded(denoise(client, png_bytes(Image.new("L", (1, 1), 128))))
    assert tiny.size == (1, 1)


def test_tiles_leave_no_seams(client: httpx.Client) -> None:
    """A BSD68 photo in 96-pixel tiles (20 of them) vs in one piece: the same image within 0.05 dB."""
    clean, body = noisy_png(DENOISING / "BSD68" / "test017.png", 25)
    whole_response = denoise(client, body)
    tiled_response = denoise(client, body, tile=96, overlap=32)
    assert whole_response.headers["x-tiles"] == "1" and int(tiled_response.headers["x-tiles"]) > 20
    whole, tiled = np.asarray(decoded(whole_response)), np.asarray(decoded(tiled_response))
    assert abs(psnr(clean, whole) - psnr(clean, tiled)) < 0.05
    # The overlap covers the receptive field: apart from 8-bit rounding the two are the same.
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    assert np.mean(whole != tiled) < 0.001


def test_noise2void_model_serves_set12_by_its_cards_margin(client: httpx.Client) -> None:
    """The self-supervised model (trained at sigma 25 on noisy images only): the card's Set12 PSNR, within 0.3 dB."""
    scores = []
    for path in sorted((DENOISING / "Set12").iterdir()):
        clean, body = noisy_png(path, 25)
        out = np.asarray(decoded(client.post("/v1/denoise", params={"model": N2V}, content=body)))
        scores.append(psnr(clean, out))
        assert scores[-1] > psnr(clean, np.asarray(Image.open(io.BytesIO(body)))) + 3
    card = Manifest.read(MODELS / N2V).metrics["psnr_Set12_s25"]
    assert np.mean(scores) >= card - 0.3, (np.mean(scores), card)


def test_bad_requests_are_4xx_json(client: httpx.Client) -> None:
    body = png_bytes(Image.new("L", (40, 30), 90))
    # Its colour is read from its palette, which Pillow decodes the image for: that failure was a 500.
    truncated_palette = png_bytes(Image.effect_noise((256, 256), 60).convert("P"))[:-40]
    for response, status, code in (
        (denoise(client, b"\x89PNG\r\n\x1a\n broken"), 400, "corrupt_image"),
        (denoise(client, truncated_palette), 400, "corrupt_image"),
        (client.post("/v1/denoise", params={"model": "nope"}, content=b"\x89PNG\r\n\x1a\n broken"), 404, "unknown_model"),
        (denoise(client, body, tile=8), 422, "invalid_parameter"),
        (denoise(client, body, overlap=-1), 422, "invalid_parameter"),
        (denoise(client, body, tile=64, overlap=32), 422, "invalid_parameter"),  # thin cores: work multiplies
        (denoise(client, body, tile=96, overlap=40), 422, "invalid_parameter"),
        (denoise(client, body, tile=2048), 422, "invalid_parameter"),  # one run's memory would be the client's choice
        (client.post("/v1/denoise", params={"model": "cifar10-resnet"}, content=body), 400, "wrong_task"),
        (client.post("/v1/denoise", params={"model": "nope"}, content=body), 404, "unknown_model"),
        (client.post("/v1/denoise", content=b"text", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ):
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    message = denoise(client, body, tile=100, overlap=33).json()["error"]["message"]
    assert "overlap=33 (36 px per side, a multiple of the model's stride 4)" in message  # what was sent, and why
    assert "pass overlap=32 at most (or a larger tile)" in message  # and what would be taken
    # At the largest tile, "pass a larger tile" had no way out (black-box hunt): the largest overlap is named.
    message = denoise(client, body, tile=1024, overlap=341).json()["error"]["message"]
    assert message.endswith("pass overlap=340 at most"), message


def test_a_small_tile_alone_takes_a_smaller_overlap(client: httpx.Client) -> None:
    clean, body = noisy_png(DENOISING / "Set12" / "01.png", 25)
    response = denoise(client, body, tile=64)  # the model's overlap (32) would leave no core: a third of the tile
    assert response.status_code == 200 and decoded(response).size == (clean.shape[1], clean.shape[0])
    assert int(response.headers["x-tiles"]) > 16
    assert denoising.tile_settings(Manifest.read(MODELS / SUPERVISED), 64) == (64, 20, 4)


@pytest.mark.parametrize(("tile", "channels"), [(512, 1), (1024, 1), (1024, 3), (96, 3)])
def test_a_graph_run_holds_a_bounded_number_of_pixels(tile: int, channels: int) -> None:
    manifest = Manifest.read(MODELS / SUPERVISED)
    tiler = denoising.Tiler(np.zeros((3000, 2000, channels), np.uint8), manifest, tile)
    _, inputs = next(tiler.batches())
    samples_pixels = inputs.shape[0] * inputs.shape[2] * inputs.shape[3]
    assert samples_pixels <= max(denoising.RUN_PIXELS, channels * tile * tile)  # one window at least
    assert samples_pixels > denoising.RUN_PIXELS // 2  # small tiles are still batched


@pytest.mark.parametrize("length", [1, 3, 60, 64, 65, 127, 128, 129, 300, 1001])
def test_tile_cores_cover_every_pixel_once(length: int) -> None:
    tile, overlap, stride = 64, 16, 4
    spans = denoising.spans(length, tile, overlap, stride)
    covered = np.zeros(length, int)
    for start, core_start, core_end in spans:
        size = min(tile, denoising.round_up(length, stride))
        assert start % stride == 0 and start >= 0
        assert start <= core_start < core_end <= min(start + size, length)
        if core_start > 0:  # an inner edge keeps at least `overlap` pixels of context
            assert core_start - start >= overlap
        if core_end < length:
            assert start + size - core_end >= overlap
        covered[core_start:core_end] += 1
    assert (covered == 1).all()


def test_colour_through_a_gray_model_is_three_samples() -> None:
    manifest = Manifest.read(MODELS / SUPERVISED)
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    tiler = denoising.Tiler(pixels, manifest)
    (group, inputs), *rest = list(tiler.batches())
    assert not rest and inputs.shape == (3, 1, 52, 72)
    for channel in range(3):
        assert np.allclose(inputs[channel, 0, :50, :70] * 255, pixels[:, :, channel])
    tiler.stitch(group, inputs)  # an identity model gives the photo back, channels in place
    assert np.array_equal(tiler.output, pixels)


def test_a_client_that_hangs_up_stops_its_tiled_photo(tmp_path: Path) -> None:
    """Without a check between tile batches, the server finished the whole photo (seconds of both cores) for nobody."""
    photo = png_bytes(Image.effect_noise((2000, 2000), 40))  # tile 64: 6,724 windows in 210 runs, far more than the 1 s wait
    with start_server(data_dir=tmp_path) as live, live.client() as http:
        with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection when it gives up
            http.post("/v1/denoise", params={"model": SUPERVISED, "tile": 64}, content=photo, timeout=1.0)
        # The tile batch running when the client left finishes first (a million pixels: about 1.3 s on AVX-512
        # cores, 4.9 s on AVX2 ones, where a 5 s wait failed in CI); a minute covers machines far slower still.
        deadline = time.monotonic() + 60
        while 'ocellus_errors_total{code="client_closed",status="499"} 1.0' not in (metrics := http.get("/metrics").text):
            assert time.monotonic() < deadline, "the denoise went on after its client had gone"
            time.sleep(0.1)
    runs = float(re.search(rf'ocellus_batch_size_count{{model="{SUPERVISED}"}} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    tiler = denoising.Tiler(np.zeros((2000, 2000, 1), np.uint8), Manifest.read(MODELS / SUPERVISED), tile=64)
    whole = len(tiler.windows) / live.app.state.settings.max_batch_size  # graph runs of the whole photo
    assert runs < whole / 4, f"{runs:g} graph runs of the photo's {whole:.0f} before it stopped"
