"""The README's examples run as written (against a live server on its own port) and do what they say."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATASETS, ROOT, start_server

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)


def block(language: str, marker: str) -> str:
    (found,) = [text for lang, text in BLOCKS if lang == language and marker in text]
    return found


def test_every_task_example_answers(tmp_path: Path) -> None:
    curl = shutil.which("curl") or pytest.skip("curl is not installed")
    script = block("bash", "galleries/demo/identify")
    # Run from a folder beside a link to the datasets, as the README's ../shared/datasets paths assume
    # (the pictures it saves land there, not in the checkout).
    (tmp_path / "shared").symlink_to(DATASETS.parent)
    (tmp_path / "checkout").mkdir()
    with start_server(data_dir=tmp_path / "data") as live:
        # Each call's body, then its status on a line of its own.
        script = script.replace("http://127.0.0.1:8000", live.url).replace("curl ", f"{curl} -sS -w '\\n%{{http_code}}\\n' ")
        result = subprocess.run(["bash", "-euc", script], cwd=tmp_path / "checkout", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    statuses = re.findall(r"^(\d{3})$", result.stdout, re.M)
    assert statuses == ["200", "200", "200", "200", "200", "200", "201", "200", "200"], result.stdout[-2000:]
    identified = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"gallery":"demo","model"'))
    assert identified["faces"][0]["match"]["name"] == "Colin Powell"
    for picture in ("faces.jpg", "denoised.png"):
        assert (tmp_path / "checkout" / picture).stat().st_size > 1000


def test_the_tritonclient_example_prints_the_cats_class() -> None:
    pytest.importorskip("tritonclient.http")
    snippet = block("python", "tritonclient")
    with start_server() as live:
        snippet = snippet.replace('"127.0.0.1:8000"', f'"127.0.0.1:{live.port}"')
        result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
