"""The API documentation pages (/docs, /redoc) work without internet: their scripts come from the service.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so on an offline machine (like this one)
they stay blank. The browser test renders them in headless Chromium with every host but 127.0.0.1
unresolvable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer

ASSET = re.compile(r'(?:src|href)="([^"]+)"')


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("`chromium` is not installed; install it with: apt-get install -y chromium (.ci/run does)")
    return path


def rendered_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, with no host but 127.0.0.1 reachable."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",  # let the bundle fetch /openapi.json and render
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_every_asset_from_the_service(server: LiveServer, page: str) -> None:
    html = httpx.get(server.url + page, timeout=10).text
    assets = ASSET.findall(html)
    assert assets, html
    for asset in assets:
        assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
        response = httpx.get(server.url + asset, timeout=10)
        assert response.status_code == 200, asset
        assert len(response.content) > 1000, asset


def test_swagger_ui_renders_every_endpoint_offline(server: LiveServer, tmp_path: Path) -> None:
    dom = rendered_dom(server.url + "/docs", tmp_path)
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    schema_paths = set(httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"])
    assert {"/v1/classify", "/v1/faces/verify", "/v1/galleries/{g}/identify"} <= paths, sorted(paths)
    assert paths == schema_paths


def test_redoc_renders_offline(server: LiveServer, tmp_path: Path) -> None:
    dom = rendered_dom(server.url + "/redoc", tmp_path)
    assert "Ocellus" in dom
    assert "/v1/galleries/{g}/identify" in dom
