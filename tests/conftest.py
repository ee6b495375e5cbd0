"""Shared fixtures: real datasets, real uvicorn servers on free ports, real HTTP clients."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageOps

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"
MODELS = ROOT / "models"
CIFAR_TEST = DATASETS / "cifar10" / "test"
CLASSIFIER = "cifar10-resnet"

# The tests' servers listen on 127.0.0.1: a proxy the environment names (a CI machine reaching its package registry
# through one) must not carry those requests, from httpx, curl, urllib or the processes the tests start.
LOOPBACK = "127.0.0.1,localhost,::1"
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = f"{os.environ[_name]},{LOOPBACK}" if os.environ.get(_name) else LOOPBACK


@pytest.fixture(scope="session", autouse=True)
def _without_the_shells_ocellus_settings() -> Iterator[None]:
    """A developer's exported OCELLUS_* (API keys, models folder...) must not change what the tests see:
    Settings reads the environment, and service processes inherit it."""
    saved = {key: os.environ.pop(key) for key in [key for key in os.environ if key.startswith("OCELLUS_")]}
    yield
    os.environ.update(saved)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The real app under uvicorn in a background thread, on its own port."""

    def __init__(self, settings: Settings, owned_dir: Path | None = None) -> None:
        self.owned_dir = owned_dir  # a scratch folder removed when the server stops
        self.app = create_app(settings)  # for tests that look inside, e.g. at its repository
        # Bound here and handed to uvicorn: no other run on the machine can take the port in between.
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()  # its scratch folder goes too
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)


def start_server(**overrides: object) -> LiveServer:
    # Without a data_dir, a fresh scratch one (removed on stop): the embedded SQLite gallery starts
    # empty and never lands in the checkout.
    scratch = None if "data_dir" in overrides else Path(tempfile.mkdtemp(prefix="ocellus-data-"))
    try:
        settings = Settings(_env_file=None, **{"models_dir": MODELS, "data_dir": scratch, **overrides})
        return LiveServer(settings, owned_dir=scratch)
    except BaseException:  # bad settings in a test of them: the scratch folder goes now
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """The reference models, default settings."""
    with start_server() as live:
        yield live


@pytest.fixture()
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def history(tmp: Path, name: str) -> list[dict]:
    """The per-epoch metrics of a training run made with ``--runs-dir tmp/runs --name name``."""
    return [json.loads(line) for line in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def wait_for_metric(url: str, line: str, seconds: float = 10) -> None:
    """Until ``/metrics`` holds ``line``: synchronised on the server's state, not on a sleep."""
    deadline = time.monotonic() + seconds
    while line not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, f"no {line!r} in /metrics after {seconds} s"
        time.sleep(0.02)


def cifar_photo(label: str, index: int = 0) -> Path:
    return sorted((CIFAR_TEST / label).iterdir())[index]


def write_toy_classifier(models_dir: Path, name: str, op: str, output_type: int, **attributes: object) -> None:
    """``models_dir/name``: a classifier of 4x4 RGB images whose three logits are ONNX operator ``op`` applied to each
    channel's mean, of ONNX element type ``output_type`` (a graph to test what the service does with odd outputs)."""
    import onnx
    from onnx import TensorProto, helper

    from service.manifest import Manifest
    from service.repository import file_sha256

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0),
            helper.make_node(op, ["mean"], ["logits"], **attributes),
        ],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", output_type, ["batch", 3])],
    )
    folder = models_dir / name
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder / "model.onnx")
    Manifest(
        name=name,
        task="classification",
        version="1",
        sha256=file_sha256(folder / "model.onnx"),
        input={"size": (4, 4)},
        outputs={"logits": "logits"},
        labels=["r", "g", "b"],
    ).write(folder)


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def oriented_jpeg(upright_size: tuple[int, int], bright: tuple[int, int, int, int], orientation: int) -> tuple[bytes, np.ndarray]:
    """A black JPEG stored so that EXIF ``orientation`` shows it ``upright_size``, with a white rectangle placed
    (``bright``, in stored pixels: keep it on the 8 px blocks for sharp edges) and where it shows upright, as
    ``[x1, y1, x2, y2]`` from a full decode (the truth a drafted decode's results are held to)."""
    width, height = upright_size
    stored = Image.new("L", (height, width) if orientation in (5, 6, 7, 8) else (width, height), 0)
    stored.paste(255, bright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(stored, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as full:
        ys, xs = np.nonzero(np.asarray(ImageOps.exif_transpose(full)) > 127)
    return data, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def jpeg_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **params)
    return buffer.getvalue()


def damaged_png() -> bytes:
    """A PNG whose header is sound and whose pixel data is not (100 bytes of seeded noise zeroed): found only when
    the pixels are decoded."""
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    data = bytearray(png_bytes(Image.fromarray(noise)))
    start = data.index(b"IDAT") + 4
    data[start + 2000 : start + 2100] = bytes(100)
    return bytes(data)


def require_datasets() -> None:
    if not DATASETS.is_dir():
        pytest.fail(f"the datasets are expected at {DATASETS}")
