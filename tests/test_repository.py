"""The model repository: broken models are reported, never fatal; reload; API-key roles."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client import generate_latest
from pydantic import ValidationError

from bench.common import ServiceProcess, free_port
from service import repository
from service.__main__ import bound_sockets
from service.cpus import available_cpus, cgroup_cpu_quota
from service.manifest import Manifest
from service.metrics import Metrics
from service.repository import publish_model_folder
from service.runtime import OnnxModel
from service.settings import Settings, check_environment, key_fingerprint
from tests.conftest import CLASSIFIER, DATASETS, MODELS, cifar_photo, png_bytes, start_server

PHOTO = cifar_photo("truck").read_bytes()


def copy_reference(root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(MODELS / CLASSIFIER, target)
    manifest = json.loads((target / "model.json").read_text())
    manifest["name"] = name
    (target / "model.json").write_text(json.dumps(manifest))
    return target


def test_broken_models_are_reported_and_the_rest_serve(tmp_path: Path) -> None:
    copy_reference(tmp_path, "good")
    tampered = copy_reference(tmp_path, "tampered")
    with open(tampered / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    garbage = copy_reference(tmp_path, "garbage")
    (garbage / "model.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((garbage / "model.json").read_text())
    import hashlib

    manifest["sha256"] = hashlib.sha256(b"not an onnx graph").hexdigest()
    (garbage / "model.json").write_text(json.dumps(manifest))
    (copy_reference(tmp_path, "badjson") / "model.json").write_text("{ not json")
    (copy_reference(tmp_path, "missing") / "model.onnx").unlink()

    with start_server(models_dir=tmp_path) as live, live.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200
        states = ready.json()["models"]
        assert states["good"] == "ready"
        assert "sha256" in states["tampered"] and states["tampered"].startswith("failed")
        for name in ("garbage", "badjson", "missing"):
            assert states[name].startswith("failed"), states
        listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        assert listed["garbage"]["state"] == "failed" and listed["garbage"]["error"]
        assert http.get("/v1/models/tampered").json()["state"] == "failed"

        unavailable = http.post("/v1/classify", params={"model": "tampered"}, files={"file": PHOTO})
        assert unavailable.status_code == 503 and unavailable.json()["error"]["code"] == "model_unavailable"
        served = http.post("/v1/classify", files={"file": PHOTO})
        assert served.status_code == 200 and served.json()["model"] == "good"


def test_no_models_means_not_ready(tmp_path: Path) -> None:
    with start_server(models_dir=tmp_path / "absent") as live, live.client() as http:
        assert http.get("/healthz").status_code == 200
        not_ready = [http.get("/readyz"), http.get("/v2/health/ready")]
        assert [(r.status_code, r.headers.get("X-Error-Code")) for r in not_ready] == [(503, "not_ready")] * 2
        assert 'ocellus_errors_total{code="not_ready",status="503"} 2.0' in http.get("/metrics").text  # not "unknown"
        response = http.post("/v1/classify", files={"file": PHOTO})
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_model"


def test_reload_picks_up_new_models_and_needs_admin(tmp_path: Path) -> None:
    copy_reference(tmp_path, "first")
    keys = "reader:read,writer:write,boss:admin"
    with start_server(models_dir=tmp_path, api_keys=keys) as live, live.client() as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        names = [m["name"] for m in http.get("/v1/models", headers={"X-API-Key": "reader"}).json()["models"]]
        assert names == ["first"]
        copy_reference(tmp_path, "second")
        forbidden = http.post("/v1/models/reload", headers={"X-API-Key": "writer"})
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
        reloaded = http.post("/v1/models/reload", headers={"Authorization": "Bearer boss"})
        assert reloaded.status_code == 200
        assert [m["name"] for m in reloaded.json()["models"]] == ["first", "second"]
        changes = {"loaded": ["second"], "unchanged": ["first"], "kept": [], "failed": [], "removed": []}
        assert reloaded.json()["changes"] == changes
        classified = http.post("/v1/classify", params={"model": "second"}, files={"file": PHOTO}, headers={"X-API-Key": "reader"})
        assert classified.status_code == 200
        assert http.post("/v1/classify", files={"file": PHOTO}).status_code == 401
        assert http.get("/healthz").status_code == 200  # probes stay open
        shutil.rmtree(tmp_path / "second")
        both = [http.post("/v1/models/reload", headers={"X-API-Key": "boss"}).json()["changes"] for _ in range(2)]
        assert [c["removed"] for c in both] == [["second"], []]  # the second reload removed nothing


def test_the_openapi_document_says_which_key_role_each_operation_needs(client: httpx.Client) -> None:
    """Swagger UI (/docs) offers its Authorize button from these, and sends the key with "Try it out"."""
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    roles = {
        (method, path): {role for requirement in operation.get("security", []) for role in next(iter(requirement.values()))}
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }
    assert roles[("post", "/v1/models/reload")] == {"admin"}
    assert roles[("post", "/v1/galleries/{g}/subjects")] == roles[("delete", "/v1/galleries/{g}")] == {"write"}
    assert roles[("post", "/v1/classify")] == roles[("post", "/v2/models/{name}/infer")] == {"infer"}
    assert roles[("post", "/v1/faces/verify")] == roles[("get", "/v1/models")] == {"infer"}
    assert roles[("get", "/v1/galleries")] == roles[("post", "/v1/galleries/{g}/identify")] == {"read"}
    open_paths = {path for (_, path), needed in roles.items() if not needed}
    assert open_paths == {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}


@pytest.mark.parametrize(
    ("path", "params", "photo"),
    [
        ("/v1/denoise", {}, "denoising/Set12/01.png"),
        ("/v1/segment", {}, "pennfudan/images/FudanPed00001.jpg"),
        ("/v1/detect", {"format": "image"}, "facemask/images/maksssksksss1.jpg"),
    ],
)
def test_image_answers_carry_the_headers_their_schema_documents(
    client: httpx.Client, path: str, params: dict, photo: str
) -> None:
    documented = client.get("/openapi.json").json()["paths"][path]["post"]["responses"]["200"]["headers"]
    response = client.post(path, params=params, files={"file": (DATASETS / photo).open("rb")})
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/")
    missing = [header for header in documented if not response.headers.get(header)]
    assert not missing, dict(response.headers)


def test_a_model_removed_by_a_reload_leaves_the_metrics(tmp_path: Path) -> None:
    copy_reference(tmp_path, "first")
    second = copy_reference(tmp_path, "second")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        assert http.post("/v1/classify", params={"model": "second"}, files={"file": PHOTO}).status_code == 200
        assert 'ocellus_inference_seconds_count{model="second"}' in http.get("/metrics").text
        shutil.rmtree(second)
        assert [m["name"] for m in http.post("/v1/models/reload").json()["models"]] == ["first"]
        assert 'model="second"' not in http.get("/metrics").text


def test_a_reload_that_finds_a_served_model_broken_keeps_its_last_good_version(tmp_path: Path) -> None:
    good = copy_reference(tmp_path, "good")
    graph = (good / "model.onnx").read_bytes()
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        (good / "model.onnx").write_bytes(graph[: len(graph) // 2])  # a copy still under way
        listed = {m["name"]: m for m in http.post("/v1/models/reload").json()["models"]}
        assert listed["good"]["state"] == "ready" and "sha256" in listed["good"]["error"]
        assert http.get("/readyz").json()["models"]["good"].startswith("ready (last good version")
        assert http.post("/v1/classify", params={"model": "good"}, files={"file": PHOTO}).status_code == 200
        (good / "model.onnx").write_bytes(graph)  # the copy finished
        listed = {m["name"]: m for m in http.post("/v1/models/reload").json()["models"]}
        assert listed["good"]["state"] == "ready" and listed["good"]["error"] is None


def test_a_reload_loads_only_the_folders_whose_files_changed(tmp_path: Path) -> None:
    copy_reference(tmp_path, "kept")
    touched, edited = copy_reference(tmp_path, "touched"), copy_reference(tmp_path, "edited")
    republished = copy_reference(tmp_path, "republished")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        repository = live.app.state.repository
        before = dict(repository.loaded)
        os.utime(touched / "model.onnx")  # written again in place, same bytes
        manifest = json.loads((edited / "model.json").read_text())
        (edited / "model.json").write_text(json.dumps({**manifest, "defaults": {"top_k": 3}}))
        publish_model_folder(republished, lambda folder: shutil.copytree(republished, folder, dirs_exist_ok=True))
        listed = {m["name"]: m for m in http.post("/v1/models/reload").json()["models"]}
        after = repository.loaded
        assert after["kept"] is before["kept"] and listed["kept"]["loaded_at"] == before["kept"].loaded_at
        for name in ("touched", "edited", "republished"):
            assert after[name] is not before[name] and listed[name]["loaded_at"] > before[name].loaded_at, name
        assert listed["edited"]["defaults"] == {"top_k": 3}
        for name in ("kept", "touched", "edited", "republished"):
            assert http.post("/v1/classify", params={"model": name}, files={"file": PHOTO}).status_code == 200
        assert http.post("/v1/models/reload").status_code == 200  # nothing changed: every model is kept
        assert all(repository.loaded[name] is model for name, model in after.items())


def test_a_manifest_lost_mid_copy_or_unreadable_keeps_the_last_good_version(tmp_path: Path) -> None:
    lost, looped = copy_reference(tmp_path, "lost"), copy_reference(tmp_path, "looped")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        (lost / "model.json").unlink()  # a copy tool that replaces the folder's files one by one
        (looped / "model.json").unlink()
        (looped / "model.json").symlink_to(looped / "model.json")  # unreadable: a symlink loop
        listed = {m["name"]: m for m in http.post("/v1/models/reload").json()["models"]}
        assert listed["lost"]["state"] == "ready" and "model.json is missing" in listed["lost"]["error"]
        assert listed["looped"]["state"] == "ready" and listed["looped"]["error"]
        for name in ("lost", "looped"):
            assert http.post("/v1/classify", params={"model": name}, files={"file": PHOTO}).status_code == 200
        shutil.rmtree(lost)  # a folder that is gone unloads
        assert "lost" not in {m["name"] for m in http.post("/v1/models/reload").json()["models"]}


def test_odd_folders_are_reported_once_and_never_break_the_listings(tmp_path: Path) -> None:
    """From a black-box hunt: a failed model's name that JSON cannot carry (a lone surrogate escape in its manifest,
    a folder name that is not UTF-8) made /readyz, /v1/models and reload answer 500; a model.json that is a FIFO
    hung the start (and every reload after); a served folder whose manifest broke was listed twice."""
    served = copy_reference(tmp_path, "served").rename(tmp_path / "served-folder")
    (copy_reference(tmp_path, "surrogate") / "model.json").write_text('{"name": "odd\\udcff", "task": "classification"}')
    not_utf8 = os.path.join(os.fsencode(tmp_path), b"bad\xff")
    os.mkdir(not_utf8)
    Path(os.fsdecode(not_utf8), "model.json").write_text("{ not json")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "model.json")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        states = ready.json()["models"]
        assert states["served"] == "ready" and "not a regular file" in states["fifo"]
        assert states["surrogate"].startswith("failed") and states["bad\\udcff"].startswith("failed"), states
        assert http.get("/v1/models").status_code == 200
        assert http.post("/v2/repository/index").status_code == 200
        (served / "model.json").write_text('{"name": "served", ')  # cut short: the folder's name stands in
        reloaded = http.post("/v1/models/reload")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["changes"]["kept"] == ["served"]
        assert "served-folder" not in reloaded.json()["changes"]["failed"]
        assert "served-folder" not in http.get("/readyz").json()["models"]


def test_a_manifest_that_names_no_model_claims_no_name(tmp_path: Path) -> None:
    """A folder whose manifest's name is no model name (or unreadable) was counted as claiming its folder's name: a
    valid model declaring that name elsewhere then served under neither, 'declared by 2 folders' (a review)."""
    copy_reference(tmp_path, "resnet").rename(tmp_path / "resnet-v2")
    old = copy_reference(tmp_path, "resnet")
    manifest = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**manifest, "name": "old resnet"}))
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        states = http.get("/readyz").json()["models"]
        assert states["resnet"] == "ready" and states["resnet (folder)"].startswith("failed"), states
        assert "declared by 2 folders" not in states["resnet (folder)"]
        assert http.post("/v1/classify", params={"model": "resnet"}, files={"file": PHOTO}).status_code == 200


def test_a_kept_models_name_is_never_a_failures_too(tmp_path: Path) -> None:
    """Folder 'e' serves 'c'; folders 'c' and 'd' both declare 'x'. Once e's manifest broke, a reload kept 'c' serving and
    filed folder c's failure as 'c' too, so /readyz said 'c: failed' for a model that served (a review)."""
    copy_reference(tmp_path, "c").rename(tmp_path / "e")
    for folder in ("c", "d"):
        twin = copy_reference(tmp_path, folder)
        (twin / "model.json").write_text(json.dumps({**json.loads((twin / "model.json").read_text()), "name": "x"}))
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        (tmp_path / "e" / "model.json").write_text("{ cut short")
        changes = http.post("/v1/models/reload").json()["changes"]
        assert changes["kept"] == ["c"] and sorted(changes["failed"]) == ["c (folder)", "d"], changes
        assert http.get("/readyz").json()["models"]["c"].startswith("ready (last good version")
        # A new folder declaring the kept model's name, and failing, is filed under its folder's name too.
        newcomer = copy_reference(tmp_path, "y")
        (newcomer / "model.json").write_text(json.dumps({**json.loads((newcomer / "model.json").read_text()), "name": "c"}))
        (newcomer / "model.onnx").write_bytes(b"\0")
        changes = http.post("/v1/models/reload").json()["changes"]
        assert changes["kept"] == ["c"] and sorted(changes["failed"]) == ["c (folder)", "d", "y"], changes
        assert http.get("/readyz").json()["models"]["c"].startswith("ready (last good version")


def test_a_name_two_folders_declare_serves_neither_new_one(tmp_path: Path) -> None:
    copy_reference(tmp_path, "alpha")
    impostor = copy_reference(tmp_path, "beta")
    manifest = json.loads((impostor / "model.json").read_text())
    (impostor / "model.json").write_text(json.dumps({**manifest, "name": "alpha"}))
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        assert {listed[n]["state"] for n in ("alpha", "beta")} == {"failed"}  # both folders named, neither serves
        assert "declared by 2 folders" in listed["alpha"]["error"] and "declared by 2 folders" in listed["beta"]["error"]


def test_a_reload_without_the_models_folder_is_refused_and_the_models_keep_serving(tmp_path: Path) -> None:
    root = tmp_path / "models"
    copy_reference(root, "good")
    with start_server(models_dir=root) as live, live.client() as http:
        root.rename(tmp_path / "moved")
        refused = http.post("/v1/models/reload")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "models_dir_missing"
        assert http.post("/v1/classify", params={"model": "good"}, files={"file": PHOTO}).status_code == 200


def test_a_models_folder_that_goes_during_the_reload_is_refused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gone between the reload's check and its scan (rm -rf models && cp -r ...), the folder scanned as empty and
    every model was published as removed: /readyz 503 and every request failing, what the check was there to stop."""
    root = tmp_path / "models"
    copy_reference(root, "good")
    scan = repository.ModelRepository.scan

    def folder_goes_first(self: repository.ModelRepository, *args: object) -> object:
        root.rename(tmp_path / "moved")
        return scan(self, *args)  # type: ignore[arg-type]

    with start_server(models_dir=root) as live, live.client() as http:
        monkeypatch.setattr(repository.ModelRepository, "scan", folder_goes_first)
        refused = http.post("/v1/models/reload")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "models_dir_missing", refused.text
        assert http.post("/v1/classify", params={"model": "good"}, files={"file": PHOTO}).status_code == 200


def denied(monkeypatch: pytest.MonkeyPatch, target: str, *paths: Path) -> None:
    """The service's user may not search (lstat) or list (iterdir) ``paths``: what chmod does to a user other than
    root, which these tests run as."""
    real = {"lstat": os.lstat, "iterdir": Path.iterdir}[target]

    def refused(path: object, *args: object) -> object:
        if any(Path(path) == p or p in Path(path).parents for p in paths):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)  # type: ignore[operator]

    if target == "lstat":
        monkeypatch.setattr(os, "lstat", refused)
    else:
        monkeypatch.setattr(Path, "iterdir", refused)


def test_a_model_folder_the_service_may_not_search_is_reported_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its model.json could not be seen, so the folder was skipped without a word and its model simply vanished; the
    filesystem's lost+found (root's, on a mounted volume) is no model."""
    copy_reference(tmp_path, "good")
    for name in ("locked", "lost+found"):
        (tmp_path / name).mkdir()
    denied(monkeypatch, "lstat", tmp_path / "locked", tmp_path / "lost+found")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        states = {m["name"]: m["state"] for m in http.get("/v1/models").json()["models"]}
    assert states == {"good": "ready", "locked": "failed"}, states


def test_a_models_folder_the_service_may_not_list_starts_not_ready_and_refuses_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Start-up failed with a PermissionError traceback (a volume the service's user may not read), where a missing
    folder starts not ready; a reload that may not list the folder answered 500."""
    root = tmp_path / "models"
    copy_reference(root, "good")
    with monkeypatch.context() as patch:
        denied(patch, "iterdir", root)
        with start_server(models_dir=root) as live, live.client() as http:
            assert http.get("/readyz").status_code == 503
        assert "cannot be read (Permission denied)" in capfd.readouterr().err
    with start_server(models_dir=root) as live, live.client() as http:
        denied(monkeypatch, "iterdir", root)
        refused = http.post("/v1/models/reload")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "models_dir_unreadable", refused.text
        assert http.post("/v1/classify", params={"model": "good"}, files={"file": PHOTO}).status_code == 200


@pytest.mark.parametrize("file", ["../other/model.onnx", "/etc/passwd", "sub/model.onnx"])
def test_a_manifest_names_a_file_in_its_own_folder_only(file: str) -> None:
    manifest = json.loads((MODELS / CLASSIFIER / "model.json").read_text())
    with pytest.raises(ValidationError):
        Manifest.model_validate({**manifest, "file": file})


@pytest.mark.parametrize(("field", "value"), [("version", "v" * 65), ("version", ""), ("name", "m" * 129)])
def test_a_manifest_name_and_version_fit_the_gallerys_columns(field: str, value: str) -> None:
    """The gallery records them with each embedding (PostgreSQL: 200 and 100 characters, the version with
    its 13-character hash suffix); a longer one failed every enrollment, so the manifest is refused instead."""
    manifest = json.loads((MODELS / CLASSIFIER / "model.json").read_text())
    Manifest.model_validate({**manifest, field: value[:-1] or "1"})
    with pytest.raises(ValidationError, match=field):
        Manifest.model_validate({**manifest, field: value})


def test_the_graph_that_runs_is_the_one_whose_hash_was_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph copied over model.onnx between the hash check and the sessions' start was served under the checked
    manifest (its labels, its weights version in galleries): the sessions are built from the bytes that were hashed."""
    shutil.copytree(MODELS / CLASSIFIER, tmp_path / CLASSIFIER)
    graph = tmp_path / CLASSIFIER / "model.onnx"
    build = repository.OnnxModel

    def copied_over_first(*args: object, **kwargs: object) -> OnnxModel:
        shutil.copyfile(MODELS / "pennfudan-unet" / "model.onnx", graph)  # another graph, mid-load
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "OnnxModel", copied_over_first)
    loaded = repository.ModelRepository(Settings(_env_file=None, models_dir=tmp_path, data_dir=tmp_path), Metrics()).load_model(
        tmp_path / CLASSIFIER
    )
    assert loaded.model.input_shape[1:] == [3, 32, 32] and loaded.model.output_names == ["logits"]


def test_a_failed_model_is_known_by_its_manifest_name(tmp_path: Path) -> None:
    folder = copy_reference(tmp_path, "declared")
    folder = folder.rename(tmp_path / "folder-name")
    (folder / "model.onnx").write_bytes(b"\0")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        assert http.get("/v1/models/declared").json()["state"] == "failed"
        response = http.post("/v1/classify", params={"model": "declared"}, files={"file": PHOTO})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
        v2 = http.get("/v2/models/declared/ready")  # the same answer over the Open Inference Protocol
        assert v2.status_code == 503 and "failed to load" in v2.json()["error"]


def test_default_models_choose_what_a_request_without_model_gets(tmp_path: Path) -> None:
    copy_reference(tmp_path, "alpha")
    copy_reference(tmp_path, "beta")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        assert http.post("/v1/classify", files={"file": PHOTO}).json()["model"] == "alpha"  # first by name
        # A reload that keeps alpha's loaded version (its folder now fails) added it last: beta became the default.
        manifest = tmp_path / "alpha" / "model.json"
        good = manifest.read_text()
        manifest.write_text("{ half-copied")
        assert http.post("/v1/models/reload").json()["changes"]["kept"] == ["alpha"]
        assert http.post("/v1/classify", files={"file": PHOTO}).json()["model"] == "alpha"
        manifest.write_text(good)
    with start_server(models_dir=tmp_path, default_models="classification=beta") as live, live.client() as http:
        assert http.post("/v1/classify", files={"file": PHOTO}).json()["model"] == "beta"
        assert http.post("/v1/classify", params={"model": "alpha"}, files={"file": PHOTO}).json()["model"] == "alpha"
    typo = start_server(models_dir=tmp_path, default_models="classification=gamma")
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ocellus").addHandler(handler)  # after create_app set the logger up, before the models load
    with typo as live, live.client() as http:
        missing = http.post("/v1/classify", files={"file": PHOTO})
        error = missing.json()["error"]
        assert missing.status_code == 404 and error["code"] == "unknown_model" and "OCELLUS_DEFAULT_MODELS" in error["message"]
        # A typo in the setting is shown where an operator looks (it was silent: /readyz all ready, no log line).
        assert http.get("/readyz").json()["defaults"] == {"classification": "gamma: no model of that name"}
    logging.getLogger("ocellus").removeHandler(handler)
    assert "OCELLUS_DEFAULT_MODELS: the classification default gamma: no model of that name" in errors


def test_unknown_settings_are_named_at_start_and_a_stray_api_key_stops_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pydantic-settings skips names it does not know: a typo'd setting was ignored without a word, and the enroll
    tool's OCELLUS_API_KEY on a server meant to read OCELLUS_API_KEYS left it open to anyone."""
    open_server = Settings(_env_file=None)
    monkeypatch.setenv("OCELLUS_CORS_ORIGIN", "https://app.example.com")
    monkeypatch.setenv("OCELLUS_DB_SERVICE_HOST", "10.0.0.7")  # Kubernetes' service links: not settings, not named
    monkeypatch.setenv("OCELLUS_DB_PORT_5432_TCP_ADDR", "10.0.0.7")
    monkeypatch.setenv("OCELLUS_MAX_WORKERS", "3")  # unknown, and nothing to do with keys: named, not refused
    monkeypatch.setenv("OCELLUS_API_KEY", "")  # empty: it sets nothing
    no_env_file = tmp_path / "none"
    warned = check_environment(open_server, no_env_file)
    assert warned[0] == "OCELLUS_CORS_ORIGIN is no setting (did you mean OCELLUS_CORS_ORIGINS?); it is ignored"
    assert len(warned) == 2 and warned[1].startswith("OCELLUS_MAX_WORKERS is no setting")
    monkeypatch.delenv("OCELLUS_API_KEY")  # (an empty one in the environment would hide .env's, as pydantic reads them)
    env_file = tmp_path / ".env"
    env_file.write_text("OCELLUS_API_KEY=s3cret:admin\n")  # in .env as in the environment
    for source in (
        {},
        {"OCELLUS_API_KEY": "s3cret:admin"},
        {"OCELLUS_API_KYES": "s3cret:admin"},
        {"OCELLUS_API_TOKENS": "s3cret"},
        {"OCELLUS_API_KEYS_FILE": "/run/secrets/keys"},
    ):
        with monkeypatch.context() as scope:
            for name, value in source.items():
                scope.setenv(name, value)
            with pytest.raises(ValueError, match="OCELLUS_API_KEYS, the server's keys, is not") as refused:
                check_environment(open_server, env_file if not source else no_env_file)
            assert "s3cret" not in str(refused.value)
    monkeypatch.setenv("OCELLUS_API_KEY", "s3cret:admin")  # the tool and a keyed server may share a shell
    check_environment(Settings(_env_file=None, api_keys="s3cret:admin"), no_env_file)
    Settings(_env_file=None)  # recipes, the backup tool and add_model build settings too: never refused there


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        ([], {"OCELLUS_PORT": "abc"}, "python -m service: OCELLUS_PORT: Input should be a valid integer"),
        ([], {"OCELLUS_API_KEYS": "k:superuser"}, "python -m service: OCELLUS_API_KEYS: key 'key-"),
        ([], {"OCELLUS_API_TOKEN": "abc"}, "python -m service: OCELLUS_API_TOKEN is set but OCELLUS_API_KEYS"),
        (["--port", "99999"], {}, "argument --port: 99999 is not a TCP port (0 to 65535)"),
        # These failed the start-up with a traceback after every model had loaded, not naming the setting.
        ([], {"OCELLUS_GALLERY_URL": "postgresql://u:s3cret@db:abc/x"}, "service: OCELLUS_GALLERY_URL: not a SQLAlchemy URL"),
        ([], {"OCELLUS_GALLERY_URL": "postgresql+psycopg2://u:s3cret@db/x"}, "OCELLUS_GALLERY_URL: its database driver is not"),
    ],
)
def test_the_server_refuses_bad_settings_in_one_line(arguments: list[str], environment: dict[str, str], message: str) -> None:
    """Each printed a 15-line traceback (a container's log, a restart loop), and --port 99999 listened on 34463 while
    announcing 99999 (black-box hunt). --help works whatever the environment holds."""
    if "psycopg2" in environment.get("OCELLUS_GALLERY_URL", "") and importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is installed here: the URL is a usable one")
    env = {**os.environ, **environment}
    done = subprocess.run([sys.executable, "-m", "service", *arguments], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "superuser" not in done.stderr and "s3cret" not in done.stderr
    shown = subprocess.run([sys.executable, "-m", "service", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--port PORT" in shown.stdout, shown.stderr


def test_a_dot_env_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """The refusal named a byte ("'utf-8' codec can't decode byte 0xff in position 25"), not the file."""
    (tmp_path / ".env").write_bytes(b"OCELLUS_LOG_LEVEL=info\nNOTE=caf\xe9\n")  # Latin-1
    for module in ("service", "service.gallery.backup"):
        command = [sys.executable, "-m", module, *(["export"] if "backup" in module else [])]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        refusal = f"python -m {module}: {tmp_path.resolve() / '.env'} is not UTF-8 text (invalid continuation byte at byte 31)"
        assert done.returncode == 2 and refusal in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_busy_port_or_an_unknown_host_is_refused_before_the_models_load(tmp_path: Path) -> None:
    """Both were reported only once every model had loaded (200 models: 30 s), in a traceback-like uvicorn line."""
    env = {**os.environ, "OCELLUS_MODELS_DIR": str(MODELS), "OCELLUS_DATA_DIR": str(tmp_path), "OCELLUS_LOG_LEVEL": "info"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, why in (("127.0.0.1", "Address already in use"), ("no-such-host.invalid", ""), ("a..b", "")):
            command = [sys.executable, "-m", "service", "--host", host, "--port", str(port)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
            refusal = f"python -m service: cannot listen on {host}:{port}: {why}"
            assert done.returncode == 1 and refusal in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert "models ready" not in done.stderr  # (no model was loaded)


def test_an_empty_host_listens_on_every_interface() -> None:
    sockets = bound_sockets("", 0)  # as uvicorn took it; getaddrinfo("") found no address
    try:
        assert "0.0.0.0" in {sock.getsockname()[0] for sock in sockets}
    finally:
        for sock in sockets:
            sock.close()


def start_logging(port: int, tmp_path: Path) -> subprocess.Popen[str]:
    """``python -m service`` on ``port`` with the reference models, its log on a pipe."""
    env = {**os.environ, "OCELLUS_MODELS_DIR": str(MODELS), "OCELLUS_DATA_DIR": str(tmp_path), "OCELLUS_LOG_LEVEL": "info"}
    command = [sys.executable, "-m", "service", "--port", str(port)]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def until_started(process: subprocess.Popen[str]) -> list[str]:
    """The log lines up to uvicorn's "Started server process": its port is bound, its models not yet loaded."""
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "Started server process" in line:
            return lines
    raise AssertionError("".join(lines))


def test_a_port_taken_while_the_models_load_is_refused_in_one_line(tmp_path: Path) -> None:
    """From a review: two servers starting at once both bound the port (neither listened yet); the one that lost it
    at listen() died with a traceback once its models had loaded (uvloop had detached its socket without a word)."""
    with socket.socket() as rival:
        rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rival.bind(("127.0.0.1", 0))  # bound, not listening yet: another server starting
        port = rival.getsockname()[1]
        process = start_logging(port, tmp_path)
        try:
            until_started(process)
            rival.listen()  # ... which wins the port while this one loads its models
            log = process.communicate(timeout=90)[1]
        finally:
            process.kill()
    assert process.returncode == 1 and f"cannot listen on 127.0.0.1:{port}: another process listens" in log, log
    assert "Traceback" not in log and "Application shutdown complete" in log  # the models were closed


def test_a_sighup_while_the_models_load_reloads_once_they_are_loaded(tmp_path: Path) -> None:
    """From a review: it ended the process (SIGHUP's default) until the models had loaded."""
    port = free_port()
    process = start_logging(port, tmp_path)
    try:
        until_started(process)
        process.send_signal(signal.SIGHUP)
        assert process.stderr is not None
        for line in process.stderr:
            if "SIGHUP: the model repository was reloaded" in line:
                break
        assert process.poll() is None and httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_with_a_poll_interval_the_server_picks_up_model_changes_itself(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A reload posted through a load balancer reached one replica of several; Triton polls its repository."""
    models = tmp_path / "models"
    models.mkdir()
    (models / CLASSIFIER).symlink_to(MODELS / CLASSIFIER)
    broken = copy_reference(models, "broken")  # fails at every poll alike: loaded, hashed and logged once (review)
    manifest = json.loads((broken / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))

    def served(http: httpx.Client) -> set[str]:
        return {model["name"] for model in http.get("/v1/models").json()["models"] if model["state"] == "ready"}

    def until(http: httpx.Client, wanted: set[str]) -> None:
        deadline = time.monotonic() + 20
        while served(http) != wanted:
            assert time.monotonic() < deadline, served(http)
            time.sleep(0.05)

    with start_server(models_dir=models, models_poll_s=0.2, log_level="info") as live, live.client() as http:
        assert served(http) == {CLASSIFIER}
        (models / "face-detector").symlink_to(MODELS / "face-detector")
        until(http, {CLASSIFIER, "face-detector"})
        (models / CLASSIFIER).unlink()
        until(http, {"face-detector"})
        shutil.rmtree(models)  # refused, logged once, and what is loaded goes on serving
        time.sleep(1)
        assert served(http) == {"face-detector"}
        models.mkdir()
        time.sleep(1)
    logged = [json.loads(line)["message"] for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    polls = [message for message in logged if message.startswith("models")]  # quiet while nothing changes
    assert polls[1:3] == ["models poll: {'loaded': ['face-detector']}", f"models poll: {{'removed': ['{CLASSIFIER}']}}"], polls
    assert "does not exist" in polls[3] and polls[4:6] == [
        "models poll: the models folder can be read again",
        "models poll: {'removed': ['face-detector']}",
    ], polls
    assert len(polls) == 6 and sum(message.startswith("model broken failed to load") for message in logged) == 1, logged


def test_a_sighup_during_shutdown_does_not_cut_it_short(tmp_path: Path) -> None:
    """From a review: removing the reload handler at shutdown restored SIGHUP's default, so one then ended the process
    before the lifespan closed the gallery and the models."""
    port = free_port()
    process = start_logging(port, tmp_path)
    try:
        until_started(process)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as upload:  # a request in flight holds the shutdown open
            upload.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\nab")
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            process.send_signal(signal.SIGHUP)
            time.sleep(0.3)
        log = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    # (uvicorn ends by raising the SIGTERM it caught again, once its shutdown is done)
    assert process.returncode == -signal.SIGTERM and "Application shutdown complete" in log, (process.returncode, log[-2000:])


def test_sighup_reloads_the_model_repository_and_the_server_goes_on(tmp_path: Path) -> None:
    """SIGHUP ended the process (its default); operators send it to reload, as they do nginx's."""
    models = tmp_path / "models"
    models.mkdir()
    (models / CLASSIFIER).symlink_to(MODELS / CLASSIFIER)
    with ServiceProcess({"OCELLUS_MODELS_DIR": str(models)}) as service:
        (models / "face-detector").symlink_to(MODELS / "face-detector")
        service.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "face-detector" not in {m["name"] for m in httpx.get(f"{service.url}/v1/models").json()["models"]}:
            assert time.monotonic() < deadline and service.process.poll() is None, "SIGHUP did not reload the models"
            time.sleep(0.1)
        shutil.rmtree(models)  # no models folder: the reload is refused and logged, and everything loaded goes on serving
        service.process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert service.process.poll() is None and httpx.get(f"{service.url}/readyz").status_code == 200


@pytest.mark.parametrize(
    ("script", "module"),
    [("ocellus-serve", "service"), ("ocellus-enroll", "service.enroll"), ("ocellus-gallery", "service.gallery.backup")],
)
def test_console_tools_name_themselves_as_they_were_run(script: str, module: str) -> None:
    # ocellus-serve's usage (and its one-line errors) said "python -m service", ocellus-enroll's "python -m service.enroll",
    # and `python -m service.gallery.backup` called itself ocellus-gallery (a README walkthrough).
    installed = str(Path(sysconfig.get_path("scripts")) / script)
    for command, name in (([installed], script), ([sys.executable, "-m", module], f"python -m {module}")):
        shown = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {name} "), shown.stdout[:200] + shown.stderr


def test_malformed_settings_stop_the_server_at_start() -> None:
    for bad in (
        {"api_keys": "k:root"},
        {"default_models": "detect=facemask-detector"},
        {"default_models": "detection="},
        {"max_queue": 0},  # would answer every request 503
        {"request_timeout_s": 0},  # would time every run out
        {"log_level": "warn"},  # uvicorn would fail on it at start with a KeyError
        {"api_keys": ","},  # or an unexpanded "${A},${B}": no key at all would have meant an open server
        {"api_keys": ",", "cors_origins": "*"},  # ... which the guard on * took for a keyed one
        {"api_keys": ":admin"},
        {"api_keys": "k:read,k:admin"},  # the last one won, silently
        {"api_keys": "k:read:alice,k:read:bob"},
        {"api_keys": "a:read:ops,b:admin:ops"},  # the log could not tell the admin from the reader
        {"api_keys": "a:read:ops:staff,b:read:ops:hr"},  # ... nor which gallery's key called
        {"api_keys": "a:read::staff hr"},  # galleries are joined by +
        {"api_keys": "a:read::*"},  # all galleries: leave the field out
        {"api_keys": "a:infer::staff"},  # an infer key reaches no gallery
        {"api_keys": "k:admin:write"},  # two roles: it started as an admin key labelled "write"
        {"gallery_url": "sqlite:"},  # a traceback once every model had loaded
        {"gallery_timeout_s": 400_000},  # PostgreSQL refused its statement_timeout: every gallery call 503
        {"gallery_timeout_s": float("inf")},  # an OverflowError at start
        {"gallery_timeout_s": 0.0001},  # lock_timeout=0: no timeout at all
        {"gallery_sync_interval_s": 1e-300},  # a busy loop
    ):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **bad)
    assert Settings(_env_file=None, log_level="WARNING").log_level == "warning"
    keyed = Settings(_env_file=None, api_keys=" k : admin , r ,r, i:infer: phone app ")
    assert {key: grant.role for key, grant in keyed.api_key_entries.items()} == {"k": "admin", "r": "read", "i": "infer"}
    labels = {key: grant.label for key, grant in keyed.api_key_entries.items()}
    assert labels == {"k": key_fingerprint("k"), "r": key_fingerprint("r"), "i": "phone app"}
    scoped = Settings(_env_file=None, api_keys="k:write:kiosk: staff + acme.* ").api_key_entries["k"]
    assert scoped.galleries == ("acme.*", "staff") and scoped.may_use("acme.lab") and not scoped.may_use("acme")
    same = Settings(_env_file=None, api_keys="a:write:l:staff+hr,b:write:l:hr+staff+hr").api_key_entries  # one label, one grant
    assert same["a"] == same["b"]
    for typo in ("s3cret-key:write:kiosk:staff+Visitors Hall", "admin:s3cret-key:ops", ":s3cret-key"):
        with pytest.raises(ValidationError) as refused:
            Settings(_env_file=None, api_keys=typo)
        assert "s3cret" not in str(refused.value), str(refused.value)  # start-up logs never show a key
    assert not scoped.may_use("staff2") and keyed.api_key_entries["k"].may_use("anything")
    assert key_fingerprint("k").startswith("key-") and hashlib.sha256(b"k").hexdigest()[:8] not in key_fingerprint("k")


def test_with_keys_set_the_open_readyz_says_which_models_failed_but_not_why(tmp_path: Path) -> None:
    copy_reference(tmp_path, "good")
    broken = copy_reference(tmp_path, "broken")
    (broken / "model.onnx").write_bytes(b"not a graph")  # with its hash in the manifest: ONNX Runtime refuses it
    manifest = json.loads((broken / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**manifest, "sha256": hashlib.sha256(b"not a graph").hexdigest()}))
    with start_server(models_dir=tmp_path, api_keys="r:read") as live, live.client() as http:
        states = http.get("/readyz").json()["models"]
        assert states == {"good": "ready", "broken": "failed (GET /v1/models/broken says why)"}
        error = http.get("/v1/models/broken", headers={"X-API-Key": "r"}).json()["error"]
        assert "INVALID_PROTOBUF" in error and str(tmp_path) not in error  # the folder's name, not the host's path


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_onnxruntime_threads_follow_the_cpus_a_container_may_use(tmp_path: Path) -> None:
    # cgroup v2 inside a container (its own namespace): the limit is on the root.
    v2, me = tmp_path / "v2", tmp_path / "self"
    write(me, "0::/\n")
    write(v2 / "cpu.max", "150000 100000\n")  # docker run --cpus=1.5
    assert cgroup_cpu_quota(v2, me) == 1.5
    write(v2 / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(v2, me) is None
    # systemd CPUQuota=200% on a service, under a parent slice with a looser limit (cgroup v2).
    write(me, "0::/system.slice/ocellus.service\n")
    write(v2 / "system.slice" / "cpu.max", "400000 100000\n")
    write(v2 / "system.slice" / "ocellus.service" / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_quota(v2, me) == 2.0
    # cgroup v1: the cpu controller's tree, the quota on the service's own cgroup.
    v1 = tmp_path / "v1"
    write(me, "12:pids:/system.slice/ocellus.service\n4:cpu,cpuacct:/system.slice/ocellus.service\n")
    write(v1 / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(v1 / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(v1 / "cpu" / "system.slice" / "ocellus.service" / "cpu.cfs_quota_us", "100000\n")
    write(v1 / "cpu" / "system.slice" / "ocellus.service" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(v1, me) == 1.0
    # A v1 container without its own namespace lists the host's path; its limit is on the mounted root.
    write(me, "4:cpu,cpuacct:/docker/0123abcd\n")
    write(v1 / "cpu" / "cpu.cfs_quota_us", "300000\n")
    assert cgroup_cpu_quota(v1, me) == 3.0
    assert cgroup_cpu_quota(tmp_path / "no-cgroup", tmp_path / "no-self") is None

    mask = len(os.sched_getaffinity(0))
    write(me, "0::/\n")
    write(v2 / "cpu.max", "50000 100000\n")  # half a CPU still gets a thread
    assert available_cpus(v2, me) == 1
    write(v2 / "cpu.max", f"{(mask + 4) * 100000} 100000\n")  # a quota above the affinity mask
    assert available_cpus(v2, me) == mask
    # A process pinned to one CPU (taskset, docker --cpuset-cpus) runs one thread per session.
    script = "from service.settings import Settings; print(Settings(_env_file=None).intra_op_threads)"
    pinned = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        env={k: v for k, v in os.environ.items() if not k.startswith("OCELLUS_")},
    )
    assert pinned.stdout.strip() == "1"


def test_a_folder_swapped_while_a_reload_lists_the_folders_is_loaded_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.repository import ModelRepository

    folder = copy_reference(tmp_path, "swapped")
    original_scan = ModelRepository.scan

    def scan_during_a_swap(self: ModelRepository, *args: object):  # the listing falls between the swap's two renames
        folder.rename(tmp_path / ".swapped.previous")
        try:
            return original_scan(self, *args)
        finally:
            (tmp_path / ".swapped.previous").rename(folder)  # the new version in place, the old one gone

    with start_server(models_dir=tmp_path) as live, live.client() as http:
        monkeypatch.setattr(ModelRepository, "scan", scan_during_a_swap)
        listed = {m["name"]: m for m in http.post("/v1/models/reload").json()["models"]}
        assert listed["swapped"]["state"] == "ready" and listed["swapped"].get("error") is None, listed["swapped"]
        assert http.post("/v1/classify", params={"model": "swapped"}, files={"file": PHOTO}).status_code == 200


def test_a_folder_mid_swap_or_renamed_in_its_manifest_is_reported_not_lost(tmp_path: Path) -> None:
    swapped, renamed = copy_reference(tmp_path, "swapped"), copy_reference(tmp_path, "renamed")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        swapped.rename(tmp_path / ".swapped.previous")  # the instant between training's two renames
        manifest = json.loads((renamed / "model.json").read_text())
        (renamed / "model.json").write_text(json.dumps({**manifest, "name": "newname", "sha256": "0" * 64}))
        listed = {m["name"]: m for m in http.post("/v1/models/reload").json()["models"]}
        assert listed["swapped"]["state"] == "ready" and "being replaced" in listed["swapped"]["error"]
        assert listed["renamed"]["state"] == "ready" and listed["newname"]["state"] == "failed"  # the new name's error shows
        assert http.post("/v1/classify", params={"model": "newname"}, files={"file": PHOTO}).status_code == 503


def test_started_from_another_folder_the_service_finds_the_checkouts_models_and_gallery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("OCELLUS_MODELS_DIR", "OCELLUS_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.models_dir == MODELS and settings.data_dir == MODELS.parent / "data"


def test_without_a_known_key_a_request_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    """FastAPI reads and parses a multipart form (up to 25 MB, to temp files) before a route's key check."""
    with start_server(data_dir=tmp_path, api_keys="r:read") as live, live.client() as http:
        for headers in ({}, {"X-API-Key": "wrong"}):
            with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                sock.sendall(
                    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
                    + head.encode()
                    + b"Content-Length: 20000000\r\n\r\n--XX\r\n"  # and the rest never comes
                )
                answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        # The paths the OpenAPI document marks open stay open; a known key of too low a role is a 403, as before.
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/docs", "/openapi.json"):
            assert http.get(path).status_code == 200, path
        assert http.post("/v1/models/reload", headers={"X-API-Key": "r"}).status_code == 403
        assert http.post("/v1/classify", files={"file": PHOTO}, headers={"Authorization": "bearer r"}).status_code == 200
        # Refused before routing: counted as such (they were "unmatched", with the 404s of scans).
        metrics = http.get("/metrics").text
        assert 'ocellus_requests_total{method="POST",route="refused",status="401"} 2.0' in metrics, metrics


def edited_copy(root: Path, source: str, name: str, **changes: object) -> None:
    """A linked copy of reference model ``source`` whose manifest takes ``changes`` (``input`` is merged)."""
    folder = root / name
    folder.mkdir()
    (folder / "model.onnx").symlink_to(MODELS / source / "model.onnx")
    manifest = json.loads((MODELS / source / "model.json").read_text())
    manifest["name"] = name
    manifest["input"].update(changes.pop("input", {}))  # type: ignore[call-overload]
    manifest.update(changes)
    (folder / "model.json").write_text(json.dumps(manifest))


def test_the_openapi_document_says_which_parts_a_multipart_form_needs(client: httpx.Client) -> None:
    """FastAPI declares the file parts optional (a raw or JSON body may carry the image instead); a form needs them, and
    generated clients and Swagger UI's file pickers read this."""
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, parts in {
        "/v1/faces/verify": ["image_a", "image_b"],
        "/v1/galleries/{g}/subjects": ["file"],
        "/v1/classify": ["file"],
    }.items():
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] and {"multipart/form-data", "application/json"} <= set(body["content"])
        form = components[body["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]]
        assert form["required"] == parts
        assert all(form["properties"][part]["format"] == "binary" and "anyOf" not in form["properties"][part] for part in parts)
        assert body["content"]["application/json"]["schema"]["required"] == parts
    assert "x-multipart-required" not in json.dumps(schema)


def test_the_openapi_document_declares_the_bodies_the_server_takes_and_no_others(client: httpx.Client) -> None:
    """A schemathesis review: forms documented open to any part (the server refuses others, 422 unknown_parameter),
    and raw application/octet-stream bodies (README) taken but not documented."""
    schema = client.get("/openapi.json").json()
    forms = {name: body for name, body in schema["components"]["schemas"].items() if name.startswith("Body_")}
    assert len(forms) >= 10 and all(body["additionalProperties"] is False for body in forms.values())
    extra = client.post("/v1/classify", files={"file": PHOTO}, data={"topk": "3"})
    assert extra.status_code == 422 and extra.json()["error"]["code"] == "unknown_parameter"
    raw_routes = [
        (path, operation["requestBody"]["content"])
        for path, operations in schema["paths"].items()
        for operation in operations.values()
        if "image/*" in operation.get("requestBody", {}).get("content", {})
    ]
    assert len(raw_routes) >= 8 and all(content["application/octet-stream"] == content["image/*"] for _, content in raw_routes)
    raw = client.post("/v1/classify", content=PHOTO, headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == 200, raw.text


def test_a_manifest_the_service_cannot_serve_fails_at_load_not_on_each_request(tmp_path: Path) -> None:
    """Each of these loaded as ready and then answered every request with a 500 (code review)."""
    edited_copy(tmp_path, CLASSIFIER, "three-means-gray", input={"color": "GRAY"})  # mean/std of 3 values
    edited_copy(tmp_path, "facemask-detector", "logits-detector", outputs={"logits": "boxes"})
    edited_copy(tmp_path, CLASSIFIER, "five-labels", labels=["a", "b", "c", "d", "e"])  # the graph has 10 classes
    edited_copy(tmp_path, CLASSIFIER, "no-size", input={"size": None})
    edited_copy(tmp_path, "facemask-detector", "stretched-detector", input={"resize": "stretch"})
    edited_copy(tmp_path, "bsd-denoiser-unet", "no-stride", defaults={"tile": 512})  # the side multiple it needs
    edited_copy(tmp_path, "bsd-denoiser-unet", "zero-padded", defaults={"stride": 4, "pad": "zeros"})  # not implemented
    edited_copy(tmp_path, CLASSIFIER, "worded-top-k", defaults={"top_k": "abc"})  # audit: 500 on default requests
    edited_copy(tmp_path, "facemask-detector", "worded-threshold", defaults={"score_threshold": "high"})
    edited_copy(tmp_path, "bsd-denoiser-unet", "true-stride", defaults={"stride": True})
    edited_copy(tmp_path, CLASSIFIER, "null-top-k", defaults={"top_k": None})  # read as "unset", then int(None)
    edited_copy(tmp_path, CLASSIFIER, "unbatched", serving={"max_batch_size": 0})
    edited_copy(tmp_path, CLASSIFIER, "unlabelled", labels=[])  # served with the classes' numbers
    edited_copy(tmp_path, "bsd-denoiser-unet", "huge-tile", defaults={"stride": 4, "tile": 4096})  # past the memory bound
    edited_copy(tmp_path, CLASSIFIER, "huge-size", input={"size": [100_000, 100_000]})  # a 240 GB warm-up input
    edited_copy(tmp_path, "bsd-denoiser-unet", "gray-defaults")
    gray = json.loads((tmp_path / "gray-defaults" / "model.json").read_text())
    del gray["input"]["mean"], gray["input"]["std"]  # the defaults: one value each for GRAY (three were taken)
    (tmp_path / "gray-defaults" / "model.json").write_text(json.dumps(gray))
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        expected = {
            "three-means-gray": "mean and std take 1 value",
            "logits-detector": "detection outputs are ['boxes', 'scores']",
            "five-labels": "10 classes but 5 labels",
            "no-size": "classification needs a fixed input size",
            "stretched-detector": "resizes with 'letterbox', not 'stretch'",
            "no-stride": "denoising needs defaults.stride",
            "zero-padded": "defaults.pad: the service implements 'reflect' only",
            "worded-top-k": "defaults.top_k: Input should be a valid integer",
            "worded-threshold": "defaults.score_threshold: Input should be a valid number",
            "true-stride": "defaults.stride is not a boolean",
            "null-top-k": "defaults.top_k is null",
            "unbatched": "serving.max_batch_size: Input should be greater than or equal to 1",
            "huge-tile": "defaults.tile: Input should be less than or equal to 1024",
            "huge-size": "input.size.0: Input should be less than or equal to 4096",
        }
        for name, message in expected.items():
            assert models[name]["state"] == "failed" and message in models[name]["error"], models[name]
            assert "validation error" not in models[name]["error"], models[name]  # one line per field, no pydantic echo
        assert models["unlabelled"]["labels"] == [str(i) for i in range(10)]
        answer = http.post("/v1/classify", params={"model": "unlabelled", "top_k": 3}, content=PHOTO)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3, answer.text
        noisy = png_bytes(Image.effect_noise((64, 48), 30))
        denoised = http.post("/v1/denoise", params={"model": "gray-defaults"}, content=noisy)
        assert denoised.status_code == 200 and Image.open(io.BytesIO(denoised.content)).size == (64, 48), denoised.text


def test_a_models_own_max_batch_size_bounds_every_run_it_makes(tmp_path: Path) -> None:
    """A photo of four faces, embedded by a face model whose manifest allows batches of 2, runs in two batches of 2
    (the limit /v2 advertises and enforces too), and answers all four."""
    edited_copy(tmp_path, "lfw-face", "lfw-face", serving={"max_batch_size": 2})
    (tmp_path / "face-detector").symlink_to(MODELS / "face-detector")
    faces = [
        Image.open(DATASETS / "lfw" / "images" / person / f"{person}_0001.jpg")
        for person in ("Colin_Powell", "Tony_Blair", "Hugo_Chavez", "Serena_Williams")
    ]
    grid = Image.new("RGB", (500, 500))
    for i, face in enumerate(faces):
        grid.paste(face.resize((250, 250)), ((i % 2) * 250, (i // 2) * 250))
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        embedded = http.post("/v1/faces/embed", files={"file": png_bytes(grid)})
        assert embedded.status_code == 200 and len(embedded.json()["faces"]) == 4, embedded.text
        batches = http.get("/v2/models/lfw-face/stats").json()["model_stats"][0]["batch_stats"]
        assert {batch["batch_size"] for batch in batches} == {2}, batches
        assert http.get("/v1/models/lfw-face").json()["serving"]["max_batch_size"] == 2  # an int, not 2.0


def test_a_model_forgotten_by_its_retired_namesake_keeps_its_series() -> None:
    # A retired replica closed after its successor loaded (and before the reload published it) forgot the series
    # the successor's observer had bound at load: its inference metrics vanished from /metrics for good.
    metrics = Metrics()
    observe = metrics.observer("alpha")
    metrics.forget("alpha")
    observe(4, 0.01, [0.002])
    exposed = generate_latest(metrics.registry).decode()
    assert 'ocellus_batch_size_count{model="alpha"} 1.0' in exposed
    assert 'ocellus_inference_seconds_count{model="alpha"} 1.0' in exposed


def graph_folder(
    root: Path, name: str, source: str, nodes: list, out_shape: list, initializers: list | None = None, **changes: object
) -> None:
    """A folder serving a small graph ``input [N, C, H, W] -> output`` under reference model ``source``'s manifest
    (with ``changes``)."""
    import onnx
    from onnx import helper

    manifest = json.loads((MODELS / source / "model.json").read_text())
    channels = 3 if manifest["input"]["color"] == "RGB" else 1
    height, width = manifest["input"]["size"] or ("H", "W")
    [role] = manifest["outputs"]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", channels, height, width])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, out_shape)],
        initializers or [],
    )
    folder = root / name
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    manifest.update(name=name, outputs={role: "output"}, sha256=hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest())
    manifest.update(changes)
    (folder / "model.json").write_text(json.dumps(manifest))


def test_a_graph_whose_outputs_its_task_cannot_read_fails_to_load(tmp_path: Path) -> None:
    """Both loaded as ready: the classifier's [N, 10, 1, 1] logits answered every request 500, the colour denoiser's
    one channel answered every colour photo gray."""
    import numpy as np
    from onnx import helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((10, 3, 1, 1), np.float32), "weights")
    pooled = [
        helper.make_node("Conv", ["input", "weights"], ["conv"]),
        helper.make_node("GlobalAveragePool", ["conv"], ["output"]),
    ]
    graph_folder(tmp_path, "pooled-logits", CLASSIFIER, pooled, ["N", 10, 1, 1], [weights])
    gray = [helper.make_node("ReduceMean", ["input"], ["output"], axes=[1])]
    graph_folder(tmp_path, "gray-output", "color-denoiser-unet", gray, ["N", 1, "H", "W"])
    identity = [helper.make_node("Identity", ["input"], ["output"])]
    graph_folder(tmp_path, "identity", "color-denoiser-unet", identity, ["N", 3, "H", "W"])
    # A graph that runs one sample at a time (a Reshape to [1, -1]) serves under max_batch_size 1: its warm-up is one.
    shape = numpy_helper.from_array(np.asarray([1, -1], np.int64), "shape")
    one_at_a_time = [helper.make_node("Reshape", ["input", "shape"], ["output"])]
    graph_folder(
        tmp_path, "one-at-a-time", CLASSIFIER, one_at_a_time, [1, 3072], [shape], labels=[], serving={"max_batch_size": 1}
    )
    # An embedder ending in [N, D, 1, 1] (a conv head without Flatten) is served as [N, D].
    face_defaults = {**json.loads((MODELS / "lfw-face" / "model.json").read_text())["defaults"], "embedding_size": 3}
    pool = [helper.make_node("GlobalAveragePool", ["input"], ["output"])]
    graph_folder(tmp_path, "pooled-embedder", "lfw-face", pool, ["N", 3, 1, 1], defaults=face_defaults)
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        for name in ("identity", "one-at-a-time", "pooled-embedder"):
            assert models[name]["state"] == "ready", models[name]
        for name, says in (("pooled-logits", "logits must be [N, classes]"), ("gray-output", "image must be [N, 3, H, W]")):
            assert models[name]["state"] == "failed" and says in models[name]["error"], models[name]
        refused = http.post("/v1/classify", params={"model": "pooled-logits"}, content=PHOTO)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable", refused.text
