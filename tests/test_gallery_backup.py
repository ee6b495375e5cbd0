"""``ocellus-gallery export|import``: galleries backed up and moved between SQLite and PostgreSQL with their ids,
embeddings and enrollment photos, picked up by a running replica; reruns, conflicts and bad files."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.gallery.backup import main
from service.gallery.store import GalleryStore, NewFace, sqlite_url
from tests.conftest import DATASETS, MODELS, start_server
from tests.postgres import PostgresCluster

LFW = DATASETS / "lfw" / "images"


def lfw(name: str, number: int) -> bytes:
    return (LFW / name / f"{name}_{number:04d}.jpg").read_bytes()


@pytest.fixture(scope="module")
def face_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backup-models")
    for name in ("face-detector", "lfw-face"):
        (root / name).symlink_to(MODELS / name)
    return root


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it (a process of its own, as installed: ocellus-gallery)."""
    return subprocess.run([sys.executable, "-m", "service.gallery.backup", *args], capture_output=True, text=True, timeout=120)


def enroll(http: httpx.Client, gallery: str, name: str, photo: bytes) -> dict:
    response = http.post(f"/v1/galleries/{gallery}/subjects", data={"name": name}, files={"file": photo})
    assert response.status_code == 201, response.text
    return response.json()


def test_galleries_move_from_sqlite_to_a_running_postgresql_service_with_ids_photos_and_embeddings(
    face_models: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with start_server(models_dir=face_models, data_dir=data) as live, live.client() as http:
        colin = enroll(http, "staff", "Colin", lfw("Colin_Powell", 1))["subject"]["id"]
        assert http.post(f"/v1/galleries/staff/subjects/{colin}/faces", files={"file": lfw("Colin_Powell", 3)}).status_code == 201
        enroll(http, "staff", "Serena", lfw("Serena_Williams", 1))
        enroll(http, "visitors", "Tony", lfw("Tony_Blair", 1))
        gone = enroll(http, "staff", "Gone", lfw("Aaron_Eckhart", 1))  # a subject whose faces were all deleted
        assert http.delete(f"/v1/galleries/staff/faces/{gone['face']['id']}").status_code == 204
        before = http.post("/v1/galleries/staff/identify", files={"file": lfw("Colin_Powell", 2)}).json()["faces"][0]
        face_id = before["match"]["face_id"]
        photo = http.get(f"/v1/galleries/staff/faces/{face_id}/photo").content
        subjects = http.get("/v1/galleries/staff/subjects").json()

    backup = tmp_path / "galleries.jsonl.gz"
    exported = cli("export", str(backup), "--store", sqlite_url(data))
    assert exported.returncode == 0 and json.loads(exported.stderr) == {"subjects": 4, "faces": 4}, exported.stderr
    lines = [json.loads(line) for line in gzip.decompress(backup.read_bytes()).splitlines()]
    assert lines[0]["header"]["format"] == "ocellus-gallery" and [next(iter(line)) for line in lines].count("face") == 4
    only = cli("export", "--gallery", "visitors", "--store", sqlite_url(data))  # to stdout
    assert [next(iter(json.loads(line))) for line in only.stdout.splitlines()] == ["header", "subject", "face"]

    with PostgresCluster() as postgres, start_server(models_dir=face_models, gallery_url=postgres.url) as live:
        imported = cli("import", str(backup), "--store", postgres.url)
        assert imported.returncode == 0, imported.stderr
        report = json.loads(imported.stdout)
        assert (report["subjects_added"], report["faces_added"], report["skipped"]) == (4, 4, [])
        with live.client() as http:
            deadline = time.monotonic() + 5  # the replica applies the change log, as for another replica's enrollments
            while (after := http.post("/v1/galleries/staff/identify", files={"file": lfw("Colin_Powell", 2)})).status_code != 200:
                assert time.monotonic() < deadline, after.text
                time.sleep(0.1)
            match = after.json()["faces"][0]["match"]
            assert (match["subject_id"], match["face_id"]) == (colin, face_id)
            assert match["similarity"] == before["match"]["similarity"]  # the very same float32 embedding
            assert http.get(f"/v1/galleries/staff/faces/{face_id}/photo").content == photo
            assert http.get("/v1/galleries/staff/subjects").json() == subjects  # names, ids, times, face counts
            assert [g["name"] for g in http.get("/v1/galleries").json()["galleries"]] == ["staff", "visitors"]
        again = cli("import", str(backup), "--store", postgres.url)  # a rerun (after an interruption) adds nothing
        report = json.loads(again.stdout)
        assert again.returncode == 0 and (report["subjects_added"], report["faces_added"]) == (0, 0)
        assert (report["subjects_there"], report["faces_there"]) == (4, 4)


def face(seed: int) -> NewFace:
    vector = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return NewFace(vector / np.linalg.norm(vector), "lfw-face", "1+abc", (1.0, 2.0, 30.0, 40.0))


def test_an_import_skips_subjects_whose_name_is_taken_and_imports_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = GalleryStore(sqlite_url(tmp_path / "a")), GalleryStore(sqlite_url(tmp_path / "b"))
    for name in ("Ann", "Bob", "Cy"):
        source.create_subject("g", name, face(len(name) + ord(name[0])))
    target.create_subject("g", "Bob", face(99))  # another Bob, enrolled there
    backup = str(tmp_path / "g.jsonl")
    assert main(["export", backup, "--store", source.url]) == 0
    assert main(["import", backup, "--store", target.url]) == 1  # done, with subjects left out
    report = json.loads(capsys.readouterr().out)
    assert (report["subjects_added"], report["faces_added"]) == (2, 2)
    assert len(report["skipped"]) == 1 and "already has a subject named 'Bob'" in report["skipped"][0]
    assert sorted(name for name, *_ in target.galleries()) == ["g"] and target.list_subjects("g", 10, 0, None)[1] == 3
    source.close()
    target.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ('{"subject": {}}\n', "not an ocellus-gallery export"),
        ('{"header": {"format": "ocellus-gallery", "version": 9, "exported_at": "", "galleries": null}}\n', "format version 9"),
        (None, "not JSON"),  # cut short
        (None, "does not follow its subject"),
        (None, "embedding"),  # NaN in an embedding
    ],
)
def test_a_bad_file_stops_the_import_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    source = GalleryStore(sqlite_url(tmp_path / "a"))
    source.create_subject("g", "Ann", face(1))
    backup = tmp_path / "g.jsonl"
    assert main(["export", str(backup), "--store", source.url]) == 0
    header, subject, one = backup.read_text().splitlines()
    if content is None:
        content = {
            "not JSON": f"{header}\n{subject}\n{one[:40]}\n",
            "does not follow its subject": f"{header}\n{one}\n",
            "embedding": f"{header}\n{subject}\n{one.replace('[', '[NaN,', 1) if 'embedding' in one else one}\n",
        }[message]
    backup.write_text(content)
    target = tmp_path / "b"
    assert main(["import", str(backup), "--store", sqlite_url(target)]) == 2
    error = capsys.readouterr().err
    assert message in error and "line" in error, error
    assert GalleryStore(sqlite_url(target)).galleries() == []  # nothing of a bad file is written
    source.close()
