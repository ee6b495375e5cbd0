"""Operational hardening over real HTTP: overload sheds with 503, reload under load loses nothing,
JSON logs carry request ids, and a schemathesis fuzz of the OpenAPI schema finds no 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.common import ServiceProcess
from service.app import create_app
from service.settings import Settings
from tests.conftest import DATASETS, MODELS, cifar_photo, free_port, png_bytes, start_server, wait_for_metric

PHOTO = cifar_photo("deer").read_bytes()


def classify(url: str, count: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=60) as http:
        return [http.post("/v1/classify", content=PHOTO, headers={"content-type": "image/jpeg"}) for _ in range(count)]


def test_overload_answers_503_with_retry_after_and_recovers() -> None:
    with start_server(max_queue=1, max_batch_size=1) as live:
        with ThreadPoolExecutor(24) as pool:
            responses = [r for batch in pool.map(lambda _: classify(live.url, 4), range(24)) for r in batch]
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503}, statuses
        shed = [r for r in responses if r.status_code == 503]
        assert shed, "a queue of one must shed load under 24 concurrent clients"
        assert all(r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded" for r in shed)
        assert classify(live.url, 1)[0].status_code == 200


def models_copy(root: Path, *names: str) -> Path:
    """A models folder holding copies of reference models: ``replaced(...)`` can change their files."""
    for name in names:
        shutil.copytree(MODELS / name, root / "models" / name)
    return root / "models"


def replaced(models_dir: Path, name: str) -> None:
    """Give a model's graph a new mtime and ctime: the next reload must load it afresh (unchanged ones are kept)."""
    os.utime(models_dir / name / "model.onnx")


def loaded_at(http: httpx.Client, name: str) -> float:
    return http.get(f"/v1/models/{name}").json()["loaded_at"]


def test_reload_under_load_fails_no_request(tmp_path: Path) -> None:
    models = models_copy(tmp_path, "cifar10-resnet")
    with start_server(models_dir=models, max_batch_wait_ms=1) as live, live.client() as admin:
        stop = threading.Event()
        results: list[int] = []

        def hammer() -> None:
            with httpx.Client(base_url=live.url, timeout=60) as http:
                while not stop.is_set():
                    results.append(http.post("/v1/classify", files={"file": PHOTO}).status_code)

        workers = [threading.Thread(target=hammer) for _ in range(6)]
        for worker in workers:
            worker.start()
        try:
            for _ in range(3):
                before = loaded_at(admin, "cifar10-resnet")
                replaced(models, "cifar10-resnet")
                assert admin.post("/v1/models/reload").status_code == 200
                assert loaded_at(admin, "cifar10-resnet") > before  # swapped under load, not kept
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert len(results) > 20 and set(results) == {200}, {s: results.count(s) for s in set(results)}


def test_a_reload_retires_busy_models_together(tmp_path: Path) -> None:
    """Each replaced model still in use gets up to request_timeout_s to finish: waited for one after another, a
    reload that replaced two busy models answered after two timeouts (nine models, nine)."""
    models = models_copy(tmp_path, "cifar10-resnet", "cifar10-resnet-int8")
    timeout_s = 5.0
    with start_server(models_dir=models, request_timeout_s=timeout_s) as live, contextlib.ExitStack() as busy:
        for name in ("cifar10-resnet", "cifar10-resnet-int8"):
            replaced(models, name)
        started = time.monotonic()
        assert httpx.post(f"{live.url}/v1/models/reload", timeout=60).status_code == 200
        # The same reload with nobody busy: its sessions' start, and the memory handed back after the models it
        # closed (the busy ones are closed later, in the background), so more than the busy reload's own share.
        loading = time.monotonic() - started
        for name in ("cifar10-resnet", "cifar10-resnet-int8"):
            busy.enter_context(live.app.state.repository.loaded[name].batcher.in_use())  # as a tiled photo holds it
            replaced(models, name)
        started = time.monotonic()
        answer = httpx.post(f"{live.url}/v1/models/reload", timeout=60)
        took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json()["changes"]["loaded"] == ["cifar10-resnet", "cifar10-resnet-int8"]
    message = f"the reload took {took:.1f} s ({loading:.1f} s with nobody busy) with a {timeout_s:g} s timeout"
    assert timeout_s <= took < 1.5 * timeout_s + loading, message


def tile_batch_seconds(name: str, tile: int) -> float:
    """How long one batch of a denoiser's tiles (a million pixels, several graph runs) takes on this machine, run
    as the server runs it (its ONNX Runtime session settings)."""
    from service.manifest import Manifest
    from service.runtime import OnnxModel
    from service.tasks import denoising

    manifest = Manifest.read(MODELS / name)
    _, inputs = next(denoising.Tiler(np.zeros((1024, 1024, 1), np.uint8), manifest, tile=tile).batches())
    model = OnnxModel(MODELS / name / manifest.file, manifest.input.name, list(manifest.outputs.values()), threads=0)
    model.run(inputs[:32])  # the first run allocates
    started = time.perf_counter()
    model.run(inputs[:32])
    return (time.perf_counter() - started) * len(inputs) / 32


def test_reload_during_a_tiled_photo_lets_it_finish(tmp_path: Path) -> None:
    """Between two batches of tiles nothing of the photo is queued or running; the reload must still wait, and past
    OCELLUS_REQUEST_TIMEOUT_S too (each run keeps within it, the photo does not): the retired model was closed on
    that timer, and the photo's remaining tiles failed with 503 model_unloaded."""
    photo = io.BytesIO()
    Image.effect_noise((1200, 1200), 40).save(photo, format="PNG")  # 64-px tiles: about 10 batches
    models = models_copy(tmp_path, "bsd-denoiser-unet")
    # Each batch's runs are queued together and the last one waits for the others: the timeout must outlast a
    # whole batch, which took 1.3 s on AVX-512 cores and 4.9 s on AVX2 ones (a fixed 4 s failed there); the photo
    # (~10 batches) then outlasts the reload by more than the timeout at any speed.
    timeout_s = max(1.0, 3 * tile_batch_seconds("bsd-denoiser-unet", 64))
    with (
        start_server(models_dir=models, request_timeout_s=timeout_s) as live,
        live.client(timeout=600) as admin,  # the photo (~10 batches) took over a minute on cores shared with other work
        ThreadPoolExecutor(1) as pool,
    ):
        tiled = pool.submit(
            admin.post, "/v1/denoise", params={"model": "bsd-denoiser-unet", "tile": 64}, content=photo.getvalue()
        )
        deadline = time.monotonic() + 30
        while not denoiser_batches(live.url):  # its first tiles are running
            assert time.monotonic() < deadline and not tiled.done()
            time.sleep(0.02)
        assert not tiled.done()  # still tiles to go: the reload meets the photo halfway
        replaced(models, "bsd-denoiser-unet")
        reloaded = time.monotonic()
        assert httpx.post(f"{live.url}/v1/models/reload", timeout=120).status_code == 200
        response = tiled.result()
        outlasted = time.monotonic() - reloaded  # the photo ran on past the reload's wait of request_timeout_s
    assert response.status_code == 200, response.text
    assert int(response.headers["x-tiles"]) > 100 and Image.open(io.BytesIO(response.content)).size == (1200, 1200)
    assert outlasted > timeout_s, f"the photo ended {outlasted:.1f} s after the reload, within the {timeout_s:.1f} s timeout"


def test_photos_past_the_pixel_budget_wait_for_it_then_answer_503(tmp_path: Path) -> None:
    """Every request in progress held its photo decoded while it waited for the model, and only OCELLUS_MAX_REQUESTS
    (128) bounded how many: eight 50 MP overlays took a replica to 4.3 GB, past the compose file's 4 GB (an aggregate
    memory hunt). A photo's pixels now come from OCELLUS_MAX_PIXELS_IN_FLIGHT, and go back when its answer is sent."""
    noisy = io.BytesIO()
    Image.effect_noise((1200, 1200), 40).save(noisy, format="PNG")  # 1.44 MP: 64-px tiles run for about 10 batches
    large = png_bytes(Image.new("RGB", (1000, 1000), (90, 120, 30)))  # 1 MP: does not fit beside it
    timeout_s = max(1.0, 3 * tile_batch_seconds("bsd-denoiser-unet", 64))  # each tile batch keeps within it
    models = models_copy(tmp_path, "bsd-denoiser-unet", "cifar10-resnet")
    with (
        start_server(models_dir=models, request_timeout_s=timeout_s, max_pixels_in_flight=2_000_000) as live,
        live.client(timeout=600) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        tiled = pool.submit(http.post, "/v1/denoise", params={"model": "bsd-denoiser-unet", "tile": 64}, content=noisy.getvalue())
        deadline = time.monotonic() + 30
        while not denoiser_batches(live.url):  # its pixels are taken
            assert time.monotonic() < deadline and not tiled.done()
            time.sleep(0.02)
        assert http.post("/v1/classify", content=PHOTO).status_code == 200  # 1,024 px fit beside it
        # A request refused anyway does not wait for pixels first (it waited, then got a 503; a review).
        asked = time.monotonic()
        assert http.post("/v1/classify", params={"model": "nope"}, content=large).status_code == 404
        assert http.post("/v1/classify", params={"top_k": 0}, content=large).status_code == 422
        assert http.post("/v1/detect", content=large).json()["error"]["code"] == "no_model"  # no detector here
        assert time.monotonic() - asked < timeout_s
        # A client that hangs up while it waits leaves the queue: it held its head, for nobody (a review).
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as ghost:
            head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(large)}\r\n\r\n"
            ghost.sendall(head.encode() + large)
            time.sleep(0.3)
        asked = time.monotonic()
        assert http.post("/v1/classify", content=PHOTO).status_code == 200 and time.monotonic() - asked < timeout_s
        asked = time.monotonic()
        refused = http.post("/v1/classify", content=large)
        waited = time.monotonic() - asked
        assert not tiled.done()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
        assert refused.headers["retry-after"] == "1" and "OCELLUS_MAX_PIXELS_IN_FLIGHT" in refused.json()["error"]["message"]
        assert waited >= timeout_s * 0.9, f"refused after {waited:.2f} s, before the {timeout_s:.2f} s it may wait"
        assert tiled.result().status_code == 200
        assert http.post("/v1/classify", content=large).status_code == 200  # the denoise gave its pixels back


def test_an_unexpected_error_is_a_json_500_that_keeps_its_request_id(tmp_path: Path) -> None:
    app = create_app(Settings(_env_file=None, models_dir=tmp_path, data_dir=tmp_path))

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.get("/broken", headers={"X-Request-ID": "trace-500"})

    handler = Collect()
    logging.getLogger("ocellus").addHandler(handler)
    try:
        response = asyncio.run(call())
    finally:
        logging.getLogger("ocellus").removeHandler(handler)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert response.headers["x-request-id"] == "trace-500"
    failure = next(r for r in records if r.levelno == logging.ERROR)
    assert failure.request_id == "trace-500" and failure.exc_info is not None  # type: ignore[attr-defined]
    access = next(r for r in records if r.getMessage() == "request")
    assert access.status == 500 and access.error == "internal_error"  # type: ignore[attr-defined]


def test_probes_log_quietly_and_every_route_has_its_metrics_label(tmp_path: Path) -> None:
    # Health probes and scrapes every few seconds would drown the clients' access lines; their errors still show.
    app = create_app(Settings(_env_file=None, data_dir=tmp_path, models_dir=tmp_path / "none"))
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    async def calls() -> str:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for path in ("/healthz", "/readyz", "/openapi.json", "/docs/static/swagger-ui.css", "/v1/models", "/nope"):
                await http.get(path)
            return (await http.get("/metrics")).text

    handler = Collect(logging.DEBUG)
    access = logging.getLogger("ocellus.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.DEBUG)
    try:
        scraped = asyncio.run(calls())
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    levels = {r.path: r.levelno for r in records if r.getMessage() == "request"}  # type: ignore[attr-defined]
    assert levels["/healthz"] == logging.DEBUG and levels["/v1/models"] == logging.INFO and levels["/nope"] == logging.INFO
    assert levels["/readyz"] == logging.INFO  # no model loaded: 503, an answer worth seeing
    for label in ('route="/openapi.json"', 'route="/docs/static"', 'route="/v1/models"', 'route="unmatched",status="404"'):
        assert label in scraped, label


def test_access_logs_are_json_with_request_ids() -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    photo = (DATASETS / "cifar10" / "test" / "cat" / "0000.jpg").read_bytes()
    with start_server(server_timing=False) as live, live.client() as http:
        handler = Collect()
        handler.setFormatter(logging.getLogger("ocellus").handlers[0].formatter)
        logging.getLogger("ocellus.access").addHandler(handler)
        try:
            response = http.post("/v1/classify", files={"file": b"not an image"}, headers={"X-Request-ID": "trace-42"})
            classified = http.post("/v1/classify", files={"file": photo}, headers={"X-Request-ID": "trace-43"})
            http.get("/v1/models/" + "x" * 60_000, headers={"X-Request-ID": "trace-44"})  # logged whole: 60 kB a line
        finally:
            logging.getLogger("ocellus.access").removeHandler(handler)
    assert response.headers["x-request-id"] == "trace-42"
    entry = json.loads(next(r for r in records if "trace-42" in r))
    assert entry["status"] == 415 and entry["error"] == "unsupported_image" and entry["path"] == "/v1/classify"
    assert entry["level"] == "info" and entry["ms"] >= 0 and entry["client"] == "127.0.0.1"
    # OCELLUS_SERVER_TIMING=false keeps the breakdown in the log only.
    timings = json.loads(next(r for r in records if "trace-43" in r))["timings"]
    assert set(timings) == {"image", "queue", "infer"} and "server-timing" not in classified.headers
    long = json.loads(next(r for r in records if "trace-44" in r))
    assert long["status"] in (404, 422) and len(long["path"]) < 2100 and long["path"].endswith("(57,963 more characters)")


@pytest.mark.slow
def test_schemathesis_fuzz_finds_no_server_error() -> None:
    executable = shutil.which("schemathesis") or pytest.fail("schemathesis is part of the dev extra")
    with start_server() as live:
        # A real gallery under the name the schema gives as its example, so gallery routes reach the store.
        photo = (DATASETS / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg").read_bytes()
        with live.client() as http:
            assert http.post("/v1/galleries/demo/subjects", data={"name": "Tony"}, files={"file": photo}).status_code == 201

        def fuzz(seed: int) -> subprocess.CompletedProcess[str]:
            command = [executable, "run", f"{live.url}/openapi.json", "--checks", "not_a_server_error", "--seed", str(seed)]
            return subprocess.run(
                [
                    *command,
                    *("--max-examples", "300"),  # per operation: issue 7 asks for a few hundred
                    # One worker: schemathesis's threads parse lambdas with ast concurrently, which CPython before
                    # 3.11.8 can fail with "SystemError: AST constructor recursion depth mismatch" (gh-106905).
                    *("--workers", "1"),
                    *("--suppress-health-check", "all"),
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )

        run = fuzz(1)
        # Hypothesis itself crashed once in CI ("ValueError: 156 is not in list" in its shrinker's interval sets)
        # with every generated case passed and no 5xx in the server's log; the same seed passed when run again.
        # Only that crash gets a second run, with another seed: any server error still fails the test.
        if run.returncode and "hypothesis/internal" in run.stdout and re.search(r"(\d+) generated, \1 passed", run.stdout):
            run = fuzz(2)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", run.stdout)
    tested = re.search(r"Tested: (\d+)", run.stdout)
    assert selected and tested, run.stdout[-4000:]
    # Every operation of the schema was exercised (the run covers all routes, classify included).
    assert int(tested[1]) == int(selected[1]) == int(selected[2]) >= 25, run.stdout[-4000:]


def test_every_log_line_is_json_and_hang_ups_and_odd_request_ids_are_handled(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "cifar10-resnet").symlink_to(MODELS / "cifar10-resnet")
    log_file = tmp_path / "server.log"
    port = free_port()
    env = {**os.environ, "OCELLUS_MODELS_DIR": str(models), "OCELLUS_DATA_DIR": str(tmp_path / "data")}
    with open(log_file, "wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env, stderr=sink, stdout=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, log_file.read_text()
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as raw:  # not HTTP at all: uvicorn's own warning
            raw.sendall(b"GARBAGE\r\n\r\n")
            raw.recv(1024)
        with socket.create_connection(("127.0.0.1", port)) as raw:  # hangs up halfway through an upload
            raw.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n")
            raw.sendall(PHOTO[:100])
        tiff = io.BytesIO()  # a deflated TIFF with corrupt data: libtiff itself writes to stderr
        # Seeded: with unseeded noise, 77 of 300 such damaged streams still inflated, and the test failed by chance.
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(tiff, "TIFF", compression="tiff_deflate")
        broken = bytearray(tiff.getvalue())
        broken[100:200] = bytes(b ^ 0xFF for b in broken[100:200])
        assert httpx.post(f"{url}/v1/classify", content=bytes(broken), headers={"content-type": "image/tiff"}).status_code == 400
        with socket.create_connection(("127.0.0.1", port)) as raw:  # the same inside a multipart form
            head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            raw.sendall(head + b"Content-Length: 5000\r\n\r\n")
            raw.sendall(b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + PHOTO[:100])
        echoed = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "{trace-7}@a/b"}).headers["x-request-id"]
        spaced = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "two words"}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", spaced)
        replaced = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "caf\xe9\tid".encode("latin-1")}).headers["x-request-id"]
        assert echoed == "{trace-7}@a/b" and re.fullmatch(r"[0-9a-f]{32}", replaced)
        hang_ups = 'ocellus_errors_total{code="client_closed",status="499"} 2.0'  # the upload's and the form's
        deadline = time.monotonic() + 10
        while hang_ups not in (metrics := httpx.get(f"{url}/metrics").text):
            assert time.monotonic() < deadline, [line for line in metrics.splitlines() if line.startswith("ocellus_errors")]
            time.sleep(0.1)
        assert 'status="500"' not in metrics, [line for line in metrics.splitlines() if 'status="500"' in line]
        assert 'code="bad_request"' not in metrics  # a cut form is no bad request
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, uvicorn's included
    assert any(e["logger"].startswith("uvicorn") and "Invalid HTTP" in e["message"] for e in entries)
    assert any(e.get("status") == 499 and e.get("error") == "client_closed" for e in entries)


def test_a_trickled_upload_gets_a_408_and_frees_its_slot(tmp_path: Path) -> None:
    """A client that sends its headers and then trickles the body held one of OCELLUS_MAX_REQUESTS for good (uvicorn
    bounds no body read): enough of them and every other request was a 503. The body now has a deadline."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cifar10-resnet").symlink_to(MODELS / "cifar10-resnet")
    jpeg = {"content-type": "image/jpeg"}
    with start_server(models_dir=tmp_path / "models", max_requests=1, body_timeout_s=2.0) as live, live.client() as http:
        with socket.create_connection(("127.0.0.1", live.port), timeout=20) as raw:
            raw.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n")
            raw.sendall(PHOTO[:100])
            statuses = []
            while 503 not in statuses and len(statuses) < 50:  # the trickling request holds the one slot
                statuses.append(http.post("/v1/classify", content=PHOTO, headers=jpeg).status_code)
                time.sleep(0.02)
            assert statuses[-1] == 503, statuses
            answer = b""
            while b"}" not in answer:  # its answer comes at the deadline
                chunk = raw.recv(65536)
                assert chunk, answer
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        assert json.loads(body)["error"]["code"] == "body_timeout"
        assert http.post("/v1/classify", content=PHOTO, headers=jpeg).status_code == 200  # the slot is free again


def test_the_service_starts_while_its_database_is_down_and_answers_gallery_calls_503(tmp_path: Path) -> None:
    nowhere = f"postgresql+psycopg://ocellus@127.0.0.1:{free_port()}/ocellus?connect_timeout=2"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cifar10-resnet").symlink_to(MODELS / "cifar10-resnet")
    with start_server(models_dir=tmp_path / "models", gallery_url=nowhere) as live, live.client() as http:
        assert http.get("/readyz").status_code == 200  # the models serve
        assert http.post("/v1/classify", content=PHOTO, headers={"content-type": "image/jpeg"}).status_code == 200
        response = http.get("/v1/galleries")
        assert response.status_code == 503 and response.json()["error"]["code"] == "gallery_unavailable"


def test_many_pixel_heavy_uploads_at_once_stay_within_a_bounded_memory(tmp_path: Path) -> None:
    """A 49-megapixel PNG is ~160 KB on the wire and ~200 MB while it decodes: 12 at once must not all
    decode at once (a replica's memory limit would kill it with everything in flight)."""
    from bench.common import ServiceProcess

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cifar10-resnet").symlink_to(MODELS / "cifar10-resnet")
    buffer = io.BytesIO()
    Image.new("RGB", (7000, 7000), (120, 130, 140)).save(buffer, format="PNG", optimize=True)
    heavy = buffer.getvalue()
    assert len(heavy) < 300_000
    with ServiceProcess({"OCELLUS_MODELS_DIR": str(tmp_path / "models")}) as service:
        status = Path(f"/proc/{service.process.pid}/status")

        def peak_mb() -> float:
            return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 1024  # type: ignore[union-attr]

        before = peak_mb()
        with ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{service.url}/v1/classify", files={"file": heavy}, timeout=120), range(12))
            )
        assert all(answer.status_code == 200 for answer in answers), {a.status_code for a in answers}
        grown = peak_mb() - before
    assert grown < 1200, f"peak memory grew by {grown:.0f} MB"  # 12 decodes at once: ~2.4 GB


def test_reloads_give_the_memory_of_retired_models_back(tmp_path: Path) -> None:
    """Each reload loads the changed models afresh; the retired sessions' memory goes back to the system."""
    from bench.common import ServiceProcess

    names = ("cifar10-resnet", "pennfudan-unet", "face-detector")
    models = models_copy(tmp_path, *names)
    with ServiceProcess({"OCELLUS_MODELS_DIR": str(models)}) as service:
        status = Path(f"/proc/{service.process.pid}/status")

        def rss_mb() -> float:
            return int(re.search(r"VmRSS:\s+(\d+) kB", status.read_text()).group(1)) / 1024  # type: ignore[union-attr]

        def reload_all() -> None:
            for name in names:
                replaced(models, name)
            assert httpx.post(f"{service.url}/v1/models/reload", timeout=120).status_code == 200

        reload_all()
        before = rss_mb()
        first = {m["name"]: m["loaded_at"] for m in httpx.get(f"{service.url}/v1/models").json()["models"]}
        for _ in range(8):
            reload_all()
        last = {m["name"]: m["loaded_at"] for m in httpx.get(f"{service.url}/v1/models").json()["models"]}
        grown = rss_mb() - before
    assert all(last[name] > first[name] for name in names)  # every reload really replaced all three
    assert grown < 60, f"RSS grew by {grown:.0f} MB over 8 reloads"


def test_the_largest_runs_of_the_free_size_models_do_not_keep_their_memory() -> None:
    """Each session's own arena kept its largest run for good: one run of 4 windows of 512x512 through each of the
    four free-size reference models left a server at 3.66 GB (a soak hunt saw 4.45 GB from mixed traffic), over the
    compose file's 4 GB per replica. Now one arena is shared and such runs hand their memory back."""
    from bench.common import ServiceProcess

    with ServiceProcess() as service:
        status = Path(f"/proc/{service.process.pid}/status")
        for name in ("bsd-denoiser-unet", "bsd-n2v-unet", "color-denoiser-unet", "pennfudan-unet"):
            inputs = httpx.get(f"{service.url}/v2/models/{name}", timeout=30).json()["inputs"][0]
            batch = np.full((4, inputs["shape"][1], 512, 512), 0.5, np.float32)
            header = json.dumps(
                {
                    "inputs": [
                        {
                            "name": inputs["name"],
                            "shape": list(batch.shape),
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": batch.nbytes},
                        }
                    ],
                    "parameters": {"binary_data_output": True},
                }
            ).encode()
            answer = httpx.post(
                f"{service.url}/v2/models/{name}/infer",
                content=header + batch.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
                timeout=120,
            )
            assert answer.status_code == 200, answer.text[:300]
        kept = int(re.search(r"VmRSS:\s+(\d+) kB", status.read_text()).group(1)) / 1024  # type: ignore[union-attr]
    assert kept < 2000, f"the server kept {kept:.0f} MB after the four runs"


def test_requests_beyond_the_cap_get_503_before_their_body_is_read_and_probes_still_answer() -> None:
    """Each request in progress may hold a whole upload (25 MB) in memory: their number is capped."""
    with start_server(max_requests=2) as live, live.client() as http:
        stalled = []
        for _ in range(2):  # two uploads whose bodies never finish arriving
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=5)
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n\xff\xd8"
            )
            stalled.append(sock)
        wait_for_metric(live.url, "ocellus_requests_in_progress 2.0")  # both are in, waiting for their bodies
        refused = http.post("/v1/classify", content=PHOTO, headers={"content-type": "image/jpeg"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert http.get("/healthz").status_code == 200 and http.get("/metrics").status_code == 200
        for sock in stalled:
            sock.close()
        deadline = time.monotonic() + 5
        while (answer := http.post("/v1/classify", content=PHOTO, headers={"content-type": "image/jpeg"})).status_code == 503:
            assert time.monotonic() < deadline, "the hung-up uploads were never let go"
            time.sleep(0.1)
        assert answer.status_code == 200


def denoiser_batches(url: str) -> float:
    """Tile batches the denoiser has run (its batch-size histogram's count)."""
    found = re.search(r'ocellus_batch_size_count\{model="bsd-denoiser-unet"\} (\S+)', httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(("grace", "size", "status"), [(30.0, 800, 200), (0.5, 1600, 503)])
def test_sigterm_lets_requests_in_flight_finish_within_the_grace_and_answers_the_rest_503(
    tmp_path: Path, grace: float, size: int, status: int
) -> None:
    """A denoise in progress on SIGTERM finishes when it can within OCELLUS_SHUTDOWN_GRACE_S; one that cannot
    gets a JSON 503 shutting_down (retry elsewhere), not a connection closed without an answer."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "bsd-denoiser-unet").symlink_to(MODELS / "bsd-denoiser-unet")
    env = {"OCELLUS_MODELS_DIR": str(models), "OCELLUS_DATA_DIR": str(tmp_path / "data"), "OCELLUS_SHUTDOWN_GRACE_S": str(grace)}
    photo = png_bytes(Image.effect_noise((size, size), 40))
    with ServiceProcess(env) as service, ThreadPoolExecutor(1) as pool:
        params = {"tile": 64}  # many tile batches: seconds of work
        pending = pool.submit(httpx.post, f"{service.url}/v1/denoise", params=params, content=photo, timeout=60)
        deadline = time.monotonic() + 30
        while not denoiser_batches(service.url):  # the photo is being denoised
            assert time.monotonic() < deadline and not pending.done(), "the denoise did not start"
            time.sleep(0.05)
        assert not pending.done()  # tiles to go: SIGTERM meets the photo halfway
        service.process.terminate()
        response = pending.result(timeout=60)
        assert service.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert response.status_code == status, response.text[:300]
    if status == 503:
        assert response.json()["error"]["code"] == "shutting_down" and response.headers["retry-after"] == "1"
    else:
        assert Image.open(io.BytesIO(response.content)).size == (size, size)


def test_inference_longer_than_the_request_timeout_is_a_503_and_the_server_goes_on(tmp_path: Path) -> None:
    """OCELLUS_REQUEST_TIMEOUT_S bounds each wait for the model: one 1024x1024 tile takes seconds here."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("bsd-denoiser-unet", "cifar10-resnet"):
        (models / name).symlink_to(MODELS / name)
    photo = png_bytes(Image.effect_noise((1024, 1024), 40))
    with start_server(models_dir=models, request_timeout_s=0.01) as live, live.client() as http:  # no CPU runs it in 10 ms
        slow = http.post("/v1/denoise", params={"tile": 1024}, content=photo, headers={"content-type": "image/png"})
        assert slow.status_code == 503 and slow.json()["error"]["code"] == "timeout", slow.text
        assert slow.headers["retry-after"] == "1" and "0.01 s" in slow.json()["error"]["message"]
        assert http.get("/healthz").status_code == 200  # the server goes on
        assert 'ocellus_errors_total{code="timeout",status="503"} 1.0' in http.get("/metrics").text


def test_concurrent_requests_are_merged_into_batches_with_the_same_answers(tmp_path: Path) -> None:
    """The micro-batcher through the real server: 16 requests at once run in fewer, larger session.run calls."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "cifar10-resnet").symlink_to(MODELS / "cifar10-resnet")
    photos = [cifar_photo(label, index).read_bytes() for label in ("cat", "ship") for index in range(8)]
    with start_server(models_dir=models, max_batch_wait_ms=50, ort_sessions=1) as live, live.client() as http:
        alone = [http.post("/v1/classify", content=photo).json()["predictions"] for photo in photos[:2]]

        ready = threading.Barrier(len(photos))

        def classify(photo: bytes) -> list[dict]:
            with live.client() as own:
                ready.wait(10)  # all sixteen go together
                return own.post("/v1/classify", content=photo).json()["predictions"]

        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(classify, photos))
        metrics = http.get("/metrics").text
    for a, b in zip(alone, together[:2], strict=True):  # the same probabilities, batched or not
        assert [p["label"] for p in a] == [p["label"] for p in b]
        assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-5)

    def histogram(series: str) -> float:
        found = re.search(rf"^ocellus_batch_size_{re.escape(series)} (\S+)$", metrics, re.MULTILINE)
        assert found, series
        return float(found.group(1))

    runs, samples = histogram('count{model="cifar10-resnet"}'), histogram('sum{model="cifar10-resnet"}')
    assert samples == 18 and runs < 18, (runs, samples)  # 2 alone, then 16 in fewer runs
    # Each request's wait for its batch is observed, and the queue (empty now) is a gauge per model.
    waited = re.search(r'^ocellus_queue_seconds_count\{model="cifar10-resnet"\} (\S+)$', metrics, re.MULTILINE)
    assert waited and float(waited.group(1)) == 18, metrics
    assert 'ocellus_queue_depth{model="cifar10-resnet"} 0.0' in metrics


def test_a_line_logged_while_serving_a_request_carries_its_id() -> None:
    from service.logs import JsonFormatter, set_request_id

    def logged_in_a_request() -> dict:
        set_request_id("trace-44")  # as the middleware does for each request (its own context)
        record = logging.LogRecord("ocellus", logging.WARNING, __file__, 1, "the store is slow", (), None)
        return json.loads(JsonFormatter().format(record))

    assert contextvars.copy_context().run(logged_in_a_request)["request_id"] == "trace-44"
    outside = JsonFormatter().format(logging.LogRecord("ocellus", logging.INFO, __file__, 1, "started", (), None))
    assert "request_id" not in json.loads(outside)  # the background sync's lines, start-up


def test_other_libraries_log_lines_are_json_too() -> None:
    """SQLAlchemy's pool errors and asyncio's unretrieved task exceptions went out as plain multi-line tracebacks."""
    script = (
        "import logging, logging.config\n"
        "from service.logs import uvicorn_log_config\n"
        "logging.config.dictConfig(uvicorn_log_config('info'))\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('sqlalchemy.pool.impl.QueuePool').error('Exception during reset', exc_info=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    (line,) = done.stderr.splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "sqlalchemy.pool.impl.QueuePool" and "ZeroDivisionError" in entry["exception"]


def test_memory_freed_after_a_burst_of_large_photos_goes_back_to_the_system() -> None:
    """glibc kept what the burst freed for good: 16 concurrent 12 MP photos left a replica at 1,045 MB (328 MB
    before). The heap is trimmed once the pixel budget has been idle a moment."""
    photo = Image.open(sorted((DATASETS / "pennfudan" / "images").iterdir())[0]).convert("RGB").resize((4000, 3000))
    body = png_bytes(photo)

    with ServiceProcess({"OCELLUS_MODELS_DIR": str(MODELS)}) as service:
        status = Path(f"/proc/{service.process.pid}/status")

        def rss_mb() -> float:
            return int(status.read_text().split("VmRSS:")[1].split()[0]) / 1024

        before = rss_mb()
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{service.url}/v1/segment", content=body, timeout=300), range(12)))
        assert {answer.status_code for answer in answers} == {200}
        peak = rss_mb()
        assert peak > before + 100, (before, peak)  # the burst did grow the heap
        deadline = time.monotonic() + 30
        while rss_mb() > before + (peak - before) / 3:
            assert time.monotonic() < deadline, (before, peak, rss_mb())
            time.sleep(0.5)
