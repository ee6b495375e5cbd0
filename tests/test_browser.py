"""What a browser sees, in headless Chromium: the API docs offline, and web pages of other origins (CORS).

FastAPI's default doc pages load Swagger UI and ReDoc from a CDN, so on an offline machine (like this
one) they stay blank: here they render with every host but 127.0.0.1 unresolvable. A page served from
another origin calls the API with an API key only where OCELLUS_CORS_ORIGINS names that origin.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.conftest import LiveServer, cifar_photo, start_server

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
        "--no-proxy-server",  # a proxy from the environment would reach the hosts the rule above hides
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
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/classify", "/v1/faces/verify", "/v1/galleries/{g}/identify"} <= paths, sorted(paths)
    assert paths == set(schema)
    assert 'class="btn authorize' in dom  # for keyed servers: Swagger UI sends the key it is given
    operation_ids = [operation["operationId"] for path in schema.values() for operation in path.values()]
    assert len(operation_ids) == len(set(operation_ids)), "operation ids must be unique (client generators need them)"


def test_redoc_renders_offline(server: LiveServer, tmp_path: Path) -> None:
    dom = rendered_dom(server.url + "/redoc", tmp_path)
    assert "Ocellus" in dom
    assert "/v1/galleries/{g}/identify" in dom


# --------------------------------------------------------------------------------------------------
# CORS: a web app on another origin

# The page classifies a photo with a raw-body POST carrying an API key (a non-simple request: the browser
# sends a preflight first) and writes what it got, or the error, into the DOM.
CORS_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const out = document.getElementById("out");
fetch("photo.jpg").then(r => r.blob()).then(photo => fetch("__API__/v1/classify?top_k=1", {
  method: "POST", body: photo, headers: {"Content-Type": "image/jpeg", "X-API-Key": "reader"}}))
  .then(async r => { out.textContent = r.status + " " + r.headers.get("X-Request-ID") + " " + await r.text(); })
  .catch(e => { out.textContent = "refused: " + e; });
</script></body></html>"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def web_app(folder: Path, api_url: str) -> Iterator[str]:
    """A static site (another origin: its own port) serving CORS_PAGE and a CIFAR-10 photo."""
    (folder / "index.html").write_text(CORS_PAGE.replace("__API__", api_url))
    (folder / "photo.jpg").write_bytes(cifar_photo("cat").read_bytes())
    site = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


def page_result(dom: str) -> str:
    match = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert match, dom
    return match.group(1)


def test_a_web_page_on_an_allowed_origin_calls_the_api_and_others_are_refused(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    with start_server(api_keys="reader:read") as closed, web_app(site_dir, closed.url) as origin:
        refused = page_result(rendered_dom(origin + "/index.html", tmp_path / "profile-a"))
        assert refused.startswith("refused: TypeError"), refused
        with start_server(api_keys="reader:read", cors_origins=f"{origin}, https://other.example") as open_api:
            (site_dir / "index.html").write_text(CORS_PAGE.replace("__API__", open_api.url))
            answered = page_result(rendered_dom(origin + "/index.html", tmp_path / "profile-b"))
    status, request_id, body = answered.split(" ", 2)
    assert status == "200" and request_id != "null", answered  # X-Request-ID is exposed to the script
    assert '"label":"cat"' in body.replace(" ", ""), body


def test_a_refused_preflight_under_v2_has_the_protocols_error_shape() -> None:
    """A schemathesis review: OPTIONS /v2/... from a disallowed origin answered /v1's {"error": {"code", "message"}}."""
    origin = "https://app.example.com"
    with start_server(cors_origins=origin) as live, live.client() as http:
        stranger = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        refused = http.options("/v2/models/x/infer", headers=stranger)
        assert refused.status_code == 400 and refused.json() == {"error": "Disallowed CORS origin"}
        assert refused.headers["x-error-code"] == "bad_request" and "access-control-allow-origin" not in refused.headers
        allowed = http.options("/v2/models/x/infer", headers={**stranger, "Origin": origin})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        assert http.options("/v1/classify", headers=stranger).json()["error"]["code"] == "bad_request"  # /v1's shape


def test_cors_headers_follow_the_setting() -> None:
    origin = "https://app.example.com"
    with start_server(cors_origins=origin, api_keys="reader:read") as live, live.client() as http:
        preflight = http.options(
            "/v1/classify",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        # A keyed HEAD is preflighted too (the key is a custom header): it was refused, 400 (a black-box hunt).
        head = http.options(
            "/v1/models",
            headers={"Origin": origin, "Access-Control-Request-Method": "HEAD", "Access-Control-Request-Headers": "x-api-key"},
        )
        assert head.status_code == 200 and "HEAD" in head.headers["access-control-allow-methods"], head.text
        # An error answer carries the headers too, so the page can read its JSON.
        denied = http.post("/v1/classify", content=b"x", headers={"Origin": origin, "Content-Type": "image/jpeg"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
        exposed = denied.headers["access-control-expose-headers"].lower()
        assert {"x-error-code", "x-request-id", "x-labels", "x-detections", "x-model", "server-timing"} <= set(
            exposed.replace(" ", "").split(",")
        )
        assert denied.headers["timing-allow-origin"] == origin  # the Performance API shows the page the timings too
        stranger = http.options(
            "/v1/classify", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
        assert stranger.json()["error"] == {"code": "bad_request", "message": "Disallowed CORS origin"}  # JSON, as every error
        # Preflights pass through the request context: an id, a log line and metrics, as every request (they had none)
        assert all(len(answer.headers.get("x-request-id", "")) == 32 for answer in (preflight, head, stranger))
        scraped = http.get("/metrics").text
        assert 'ocellus_requests_total{method="OPTIONS",route="preflight",status="200"} 2.0' in scraped, scraped
        assert 'ocellus_requests_total{method="OPTIONS",route="preflight",status="400"} 1.0' in scraped
        assert 'ocellus_errors_total{code="bad_request",status="400"} 1.0' in scraped
    with start_server() as live, live.client() as http:  # the default: no origin is allowed
        plain = http.get("/v1/models", headers={"Origin": origin})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
        assert "timing-allow-origin" not in plain.headers
    for bad in (
        "app.example.com",
        "https://app.example.com/path",
        "ftp://x",
        "https://*.example.com",
        "http://u:p@h",
        "https://h:99999",
    ):
        with pytest.raises(ValueError):  # origins that a browser never sends: they would silently match nothing
            Settings(_env_file=None, cors_origins=bad)
    with pytest.raises(ValueError):  # any page a user visits could read the galleries
        Settings(_env_file=None, cors_origins="*")
    assert Settings(_env_file=None, cors_origins="*", api_keys="k:read").cors_origin_list == ["*"]
    # Written as people write them, matched as browsers send them.
    spelled = "HTTPS://App.Example.com:443/, http://localhost:3000, http://[::1]:8080"
    expected = ["https://app.example.com", "http://localhost:3000", "http://[::1]:8080"]
    assert Settings(_env_file=None, cors_origins=spelled).cors_origin_list == expected
