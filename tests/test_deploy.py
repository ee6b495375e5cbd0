"""The deployment files: Dockerfile, .dockerignore, docker-compose.yml and deploy/nginx.conf.

No Docker engine is needed: `docker-compose config` validates the compose file, `nginx -t` the load
balancer's configuration, and the image's install step is replayed for real in a fresh virtual
environment built from the same build context (the files .dockerignore lets through), which then
serves over HTTP and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
ENV_EXAMPLE = ROOT / "deploy" / "ocellus.env.example"
GALLERY_URL = "postgresql+psycopg://ocellus:ocellus@postgres:5432/ocellus"
APT_HINT = "install it with: apt-get install -y docker-compose nginx-light"


# --------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((keyword, args))
    return stages


def test_dockerfile_is_multi_stage_slim_python() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 2, froms
    assert froms[0].split()[0] == "python:3.11-slim" and froms[0].split()[-1].lower() == "builder"
    assert froms[1].split()[0] == "python:3.11-slim"


def test_dockerfile_builder_installs_the_project_without_torch() -> None:
    builder, final = dockerfile_stages()
    runs = " ".join(args for keyword, args in builder if keyword == "RUN")
    assert "python -m venv /opt/venv" in runs
    install = re.search(r"pip install\s+([^&;]+)", runs)
    assert install, runs
    targets = shlex.split(install.group(1))
    assert targets == [".[postgres]"], f"install the project non-editable with only the postgres extra: {targets}"
    assert "torch" not in DOCKERFILE.read_text().lower()
    # Nothing is compiled or installed with apt in the final image.
    final_runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert "apt-get" not in final_runs and "pip install" not in final_runs

    # The service's own dependencies (what the image installs) must not pull in torch either.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]]
    names += [re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() for dep in project["optional-dependencies"]["postgres"]]
    assert not {"torch", "torchvision", "onnx", "onnxscript"} & set(names), names


def test_dockerfile_final_stage() -> None:
    final = dockerfile_stages()[-1]
    keywords = [keyword for keyword, _ in final]
    text = {keyword: " ".join(args for k, args in final if k == keyword) for keyword in keywords}

    copies = [args for keyword, args in final if keyword == "COPY"]
    assert any("--from=builder" in c and c.split()[-2:] == ["/opt/venv", "/opt/venv"] for c in copies), copies
    assert any(c.split()[-1].rstrip("/") == "/app/models" and "models" in c.split()[-2] for c in copies), copies

    env = text["ENV"]
    for setting in ("OCELLUS_HOST=0.0.0.0", "OCELLUS_PORT=8000", "PYTHONUNBUFFERED=1", "OCELLUS_MODELS_DIR=/app/models"):
        assert setting in env.split(), setting
    assert "/opt/venv/bin" in env

    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, user
    # USER comes before CMD, so the server never runs as root.
    assert keywords.index("USER") < keywords.index("CMD")

    assert text["EXPOSE"].split() == ["8000"]
    assert "/readyz" in text["HEALTHCHECK"] and "urllib" in text["HEALTHCHECK"]
    assert "curl" not in text["HEALTHCHECK"] and "wget" not in text["HEALTHCHECK"]
    assert text["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(text["CMD"]) == ["python", "-m", "service"]


# --------------------------------------------------------------------------------------------------
# .dockerignore: evaluated with Docker's rules (last matching pattern wins; a pattern that matches a
# folder covers everything inside it; "!" re-includes).


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((negated, pattern))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/") and "/" not in pattern[3:]:  # a name at any depth
        return any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
    # Docker's "*" does not cross "/", so match component-wise against the leading sub-path of the same depth.
    want = pattern.split("/")
    return any(
        len(got) == len(want) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(got, want, strict=True))
        for got in (c.split("/") for c in candidates)
    )


def ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    excluded = False
    for negated, pattern in patterns:
        if _pattern_matches(pattern, path):
            excluded = not negated
    return excluded


def build_context(patterns: list[tuple[bool, str]]) -> list[str]:
    """The files `docker build .` would send, relative to the repository root."""
    reincluded = [pattern for negated, pattern in patterns if negated]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not ignored(rel + d, patterns) or any(p.startswith(rel + d + "/") for p in reincluded)]
        files += [rel + name for name in names if not ignored(rel + name, patterns)]
    return sorted(files)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git/HEAD",
        "runs/cifar10-resnet/checkpoint.pt",
        "data/gallery.sqlite",
        "training/engine.py",
        "tests/test_deploy.py",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "bench/results/classify.json",
        ".venv/bin/python",
        "ocellus.egg-info/PKG-INFO",
        "build/lib/service/app.py",
        ".env",
        "deploy/ocellus.env",
        "service/__pycache__/app.cpython-311.pyc",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "service/app.py", "service/api/health.py", "models/any/model.onnx"):
        assert not ignored(path, patterns), f"{path} is needed by the image"

    context = build_context(patterns)
    assert "pyproject.toml" in context and "service/__main__.py" in context
    assert not [f for f in context if f.split("/")[0] not in {"pyproject.toml", "README.md", "service", "models"}]


# --------------------------------------------------------------------------------------------------
# docker-compose.yml


def require(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")  # nginx lives in sbin
    if path is None:
        pytest.fail(f"`{binary}` is not installed; {APT_HINT}")
    return path


def compose_config(**env: str) -> dict:
    docker_compose = require("docker-compose")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OCELLUS_", "POSTGRES_", "COMPOSE_"))}
    result = subprocess.run(
        [docker_compose, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def published(port: object) -> tuple[int, int]:
    if isinstance(port, dict):
        return int(port["published"]), int(port["target"])
    host, _, container = str(port).split("/")[0].rpartition(":")
    return int(host.rpartition(":")[2]), int(container)


def mounted(volume: object) -> tuple[str, str, str]:
    """A volume's source, target and mode ("ro" or "rw"): docker-compose v1 prints "source:target[:mode]", v2
    (Debian 13's package) the long form."""
    if isinstance(volume, dict):
        return str(volume["source"]), str(volume["target"]), "ro" if volume.get("read_only") else "rw"
    spelled = str(volume)
    has_mode = spelled.rsplit(":", 1)[-1] in ("ro", "rw")
    source, target, *mode = spelled.rsplit(":", 2 if has_mode else 1)  # a source may hold ":" (the target, a path, not)
    return source, target, mode[0] if mode else "rw"


def test_compose_config_validates() -> None:
    config = compose_config()
    services = config["services"]
    assert set(services) == {"api", "postgres", "lb"}

    api = services["api"]
    assert Path(api["build"]["context"]).resolve() == ROOT
    assert api["deploy"]["replicas"] == 3
    assert "ports" not in api and "container_name" not in api, "replicas cannot share a host port or a name"
    assert api["restart"] == "unless-stopped"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    environment = api["environment"]
    assert environment["OCELLUS_GALLERY_URL"] == GALLERY_URL
    assert "OCELLUS_API_KEYS" in environment, "the env file must carry the API keys setting"

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert postgres["restart"] == "unless-stopped"
    assert any(mounted(v)[:2] == ("pgdata", "/var/lib/postgresql/data") for v in postgres["volumes"]), postgres["volumes"]
    assert "pgdata" in config["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "ports" not in postgres, "the database stays inside the compose network"

    lb = services["lb"]
    assert lb["image"] == "nginx:1.27-alpine"
    assert [published(p) for p in lb["ports"]] == [(8000, 80)]
    assert all("127.0.0.1" in str(p) for p in lb["ports"]), "published on this host only by default"
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert "-h 127.0.0.1" in " ".join(postgres["healthcheck"]["test"]), "TCP, not the init server's socket"
    (mount,) = lb["volumes"]
    source, target, mode = mounted(mount)
    assert Path(source).resolve() == NGINX_CONF and target == "/etc/nginx/conf.d/default.conf" and mode == "ro"
    assert lb["healthcheck"]["test"] and lb["restart"] == "unless-stopped"
    for name, service in services.items():  # Docker's json-file logs grow without bound unless rotated
        assert service["logging"]["options"]["max-size"], name


def test_compose_env_file_can_be_swapped(tmp_path: Path) -> None:
    """A real deployment points OCELLUS_ENV_FILE at its own (git-ignored) file with keys."""
    env_file = tmp_path / "ocellus.env"
    env_file.write_text("OCELLUS_API_KEYS=k1:admin,k2:read\n")
    api = compose_config(OCELLUS_ENV_FILE=str(env_file), POSTGRES_PASSWORD="s3cret")["services"]["api"]
    assert api["environment"]["OCELLUS_API_KEYS"] == "k1:admin,k2:read"
    assert api["environment"]["OCELLUS_GALLERY_URL"] == GALLERY_URL.replace("ocellus:ocellus@", "ocellus:s3cret@")
    assert "OCELLUS_ORT_THREADS" not in api["environment"]


def test_env_example_names_real_settings() -> None:
    from service.settings import Settings

    names = {"OCELLUS_" + name.upper() for name in Settings.model_fields}
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    keys = [line.partition("=")[0] for line in lines]
    assert "OCELLUS_API_KEYS" in keys
    assert set(keys) <= names, set(keys) - names


# --------------------------------------------------------------------------------------------------
# deploy/nginx.conf


def test_nginx_conf(tmp_path: Path) -> None:
    text = NGINX_CONF.read_text()
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", text, re.M), "Docker DNS, so scaled replicas are found"
    upstream = re.search(r"set\s+(\$\w+)\s+api:8000;", text)
    assert upstream and f"proxy_pass http://{upstream.group(1)};" in text, "resolve api:8000 per request"
    assert re.search(r"client_max_body_size\s+26m;", text), "just above the service's 25 MiB, so its JSON 413 answers"
    assert re.search(r"location /v1/denoise \{[^}]*proxy_read_timeout 300s;", text), "long tiled denoises"
    assert "X-Forwarded-For $remote_addr;" in text and "add_header X-Request-ID $ocellus_request_id always;" in text
    assert re.search(r"proxy_set_header\s+X-Request-ID\s+\$\w+;", text)
    for timeout in ("proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout"):
        assert timeout in text

    # The real parser: include the file where the nginx image includes conf.d/*.conf (inside http {}).
    # `nginx -t` binds the listen sockets, so the copy listens on a free port (port 80 needs root).
    nginx = require("nginx")
    assert re.search(r"^\s*listen\s+80;", text, re.M), "the image publishes container port 80"
    conf = tmp_path / "default.conf"
    conf.write_text(re.sub(r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{free_port()};", text, flags=re.M))
    # Private temp folders, so that the check needs neither root nor the package's /var/lib/nginx.
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "".join(f'    {kind}_temp_path "{tmp_path / kind}";\n' for kind in kinds)  # quoted: TMPDIR may hold spaces
    wrapper = tmp_path / "nginx.conf"
    wrapper.write_text(
        f'pid "{tmp_path}/nginx.pid";\nerror_log "{tmp_path}/error.log";\n'
        f'events {{}}\nhttp {{\n{temp_paths}    include "{conf}";\n}}\n'
    )
    result = subprocess.run(
        [nginx, "-t", "-q", "-c", str(wrapper), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# The image's install step, replayed in a fresh venv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.slow
def test_image_install_serves_without_torch(tmp_path: Path) -> None:
    # The build context exactly as .dockerignore lets it through.
    context = tmp_path / "context"
    for rel in build_context(dockerignore_patterns()):
        if rel.startswith("models/"):
            continue  # the builder only copies models/ on; the install does not read it
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OCELLUS_", "PYTHON", "VIRTUAL_ENV"))}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", ".[postgres]"],
        cwd=context,
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    workdir = tmp_path / "workdir"
    workdir.mkdir()

    def venv_python(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-c", code], cwd=workdir, env=environ, capture_output=True, text=True, timeout=120)

    assert venv_python("import torch").returncode != 0, "torch must not be installed by the image's install command"
    assert venv_python("import training").returncode != 0, "the training package stays out of the image"
    probe = venv_python(
        "import json, pathlib, service, psycopg, onnxruntime; from service.settings import DEFAULT_MODELS;"
        "print(json.dumps({'file': service.__file__, 'default_models': str(DEFAULT_MODELS)}))"
    )
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    assert Path(info["file"]).is_relative_to(venv), "non-editable: the venv holds the package"
    # Outside a checkout the default is ./models, which is why the image sets OCELLUS_MODELS_DIR.
    assert info["default_models"] == "models"

    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(
        [str(python), "-m", "service", "--port", str(port)],
        cwd=workdir,
        env={
            **environ,
            "OCELLUS_MODELS_DIR": str(ROOT / "models"),
            "OCELLUS_DATA_DIR": str(tmp_path / "data"),
            "OCELLUS_ORT_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{Path(log.name).read_text()}"
            try:
                status, body = get(base + "/healthz")
                break
            except (ConnectionError, urllib.error.URLError, TimeoutError):
                assert time.monotonic() < deadline, "the server did not answer within 90 s"
                time.sleep(0.25)
        assert status == 200 and json.loads(body) == {"status": "ok"}

        status, body = get(base + "/readyz")
        readiness = json.loads(body)
        assert status == 200 and readiness["ready"], readiness
        assert set(readiness["models"]) == {p.parent.name for p in (ROOT / "models").glob("*/model.json")}
        assert set(readiness["models"].values()) == {"ready"}, readiness  # every reference model loads in the image
        photo = sorted((ROOT.parent / "shared" / "datasets" / "cifar10" / "test" / "ship").iterdir())[0].read_bytes()
        request = urllib.request.Request(base + "/v1/classify", data=photo, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as response:  # decoding and inference in the image
            assert json.loads(response.read())["predictions"][0]["label"] == "ship"
        # The docs' scripts come with the install (the image has no internet at run time either).
        status, body = get(base + "/docs/static/swagger-ui-bundle.js")
        assert status == 200 and len(body) > 100_000

        server.send_signal(signal.SIGTERM)
        returncode = server.wait(timeout=15)
        output = Path(log.name).read_text()
        # uvicorn >= 0.29 finishes its graceful shutdown, then re-raises the signal it caught so that the
        # exit status says why it stopped: -SIGTERM (143 in a shell or `docker ps`) is a clean stop.
        assert returncode in (0, -signal.SIGTERM), f"exit code {returncode} after SIGTERM:\n{output}"
        assert "Application shutdown complete." in output and "Finished server process" in output, output
        assert "Traceback" not in output, output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.parametrize("entry", ["service", "training.export", "bench.common"])
def test_onnx_runtime_telemetry_is_off_unless_an_operator_turns_it_on(entry: str) -> None:
    """ONNX Runtime 1.32's Linux wheels send usage telemetry and keep a device id in ~/.cache. Unwritable there (the
    image's user), it printed a colour-coded non-JSON warning at every start; the warning shows whether it ran."""
    # Only what Python needs: ORT also skips telemetry where a variable says it runs under CI (CI, GITHUB_ACTIONS,
    # SYSTEM_TEAMFOUNDATIONCOLLECTIONURI...), which made "0" below show nothing on the project's CI.
    env = {name: os.environ[name] for name in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV") if name in os.environ}
    load = f"import {entry}, onnxruntime as ort; ort.InferenceSession('models/cifar10-resnet/model.onnx')"
    for home, telemetry in (("/proc/no-home", None), ("/proc/no-home", "0")):
        run_env = {**env, "HOME": home, **({"ORT_DISABLE_TELEMETRY": telemetry} if telemetry else {})}
        done = subprocess.run([sys.executable, "-c", load], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert ("telemetry" in done.stderr) == (telemetry == "0"), done.stderr  # "0" turns it on: the test can fail
