"""The benchmarks refuse what would make their numbers meaningless, before measuring or writing anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.common import ROOT, ServiceProcess
from bench.loadgen import build_request, run_load
from tests.conftest import cifar_photo


def bench(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["bench.classify", "--model", "face-detector"], "is a detection model: this benchmark needs a classification one"),
        (["bench.denoise", "--model", "cifar10-resnet"], "is a classification model: this benchmark needs a denoising one"),
        (["bench.segment", "--model", "nosuch"], "--model 'nosuch': no such model in models/"),
        (["bench.classify", "--seconds", "0"], "argument --seconds: 0 is not above 0"),
        (["bench.detect", "--concurrency", "8", "0"], "argument --concurrency: 0 is not above 0"),
        (["bench.gallery", "--sizes", "-5"], "argument --sizes: -5 is not above 0"),
    ],
)
def test_a_model_of_another_task_or_a_zero_is_refused_in_one_line(arguments: list[str], message: str) -> None:
    """A detector given to the classification benchmark answered 400 to every request, counted as 2,084 requests/s,
    10.9 times the ONNX Runtime ceiling; a zero --seconds divided by zero (black-box hunt)."""
    done = bench(*arguments)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_failed_requests_count_as_no_throughput_and_stop_the_run() -> None:
    with ServiceProcess() as service:
        path = "/v1/classify?model=nosuch"
        body = cifar_photo("cat").read_bytes()
        result = run_load(
            "127.0.0.1", [service.port], [build_request("127.0.0.1", service.port, path, body, "image/jpeg")], 2, 0.5
        )
        assert result.requests == 0 and result.errors > 0 and result.rps == 0
        with pytest.raises(SystemExit, match=r"requests to /v1/classify\?model=nosuch failed \(first: HTTP/1.1 404 Not Found\)"):
            result.check(path)
        good = "/v1/classify"
        served = run_load(
            "127.0.0.1", [service.port], [build_request("127.0.0.1", service.port, good, body, "image/jpeg")], 2, 0.5
        )
        assert served.check(good).requests > 0 and served.errors == 0


def test_bad_service_settings_are_named_in_one_line() -> None:
    """The bare ONNX Runtime loops read the service's settings: a bad one was a pydantic traceback (a review)."""
    env = {**os.environ, "OCELLUS_MAX_QUEUE": "abc"}
    done = subprocess.run([sys.executable, "-m", "bench.segment"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == "OCELLUS_MAX_QUEUE: Input should be a valid integer, unable to parse string as an integer"
