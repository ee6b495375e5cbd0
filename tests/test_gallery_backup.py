"""``ocellus-gallery export|import``: galleries backed up and moved between SQLite and PostgreSQL with their ids,
embeddings and enrollment photos, picked up by a running replica; reruns, conflicts and bad files."""

from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.gallery.backup import main
from service.gallery.store import FacePhoto, GalleryStore, NewFace, sqlite_url
from service.tasks.faces import enrollment_photo
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


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it (a process of its own, as installed: ocellus-gallery)."""
    command = [sys.executable, "-m", "service.gallery.backup", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


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
    assert [next(iter(json.loads(line))) for line in only.stdout.splitlines()] == ["header", "subject", "face", "end"]
    typo = cli("export", "--gallery", "Visitors", "--store", sqlite_url(data))
    assert typo.returncode == 2 and "no gallery 'Visitors'" in typo.stderr and not typo.stdout

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
        assert report["store"] == postgres.url  # where it went (a password would show as ***)
        # Exported again from PostgreSQL: the same records, bit for bit (the header's time aside).
        again_out = cli("export", "--store", postgres.url)
        assert again_out.returncode == 0 and again_out.stdout.splitlines()[1:] == [
            json.dumps(line, separators=(",", ":")) for line in lines[1:]
        ]


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
    capsys.readouterr()
    assert main(["import", backup, "--gallery", "G", "--store", target.url]) == 2  # a typo: nothing to import
    assert "no gallery 'G' in" in capsys.readouterr().err and target.list_subjects("g", 10, 0)[1] == 1
    assert main(["import", backup, "--store", target.url]) == 1  # done, with subjects left out
    report = json.loads(capsys.readouterr().out)
    assert (report["subjects_added"], report["faces_added"]) == (2, 2)
    assert len(report["skipped"]) == 1 and "already has a subject named 'Bob'" in report["skipped"][0]
    assert sorted(name for name, *_ in target.galleries()) == ["g"] and target.list_subjects("g", 10, 0)[1] == 3
    source.close()
    target.close()


def test_an_import_leaves_out_faces_that_do_not_fit_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A face whose embedding length differs from the store's faces of its model, or whose id another subject holds,
    is listed, not imported: a replica would otherwise fail to load the store."""
    target = GalleryStore(sqlite_url(tmp_path / "b"))
    held = target.create_subject("g", "Bob", face(1))
    odd = GalleryStore(sqlite_url(tmp_path / "a"))
    short = np.ones(64, np.float32) / 8  # unit length, but 64 numbers where the store's lfw-face faces hold 128
    odd.create_subject("g", "Dee", NewFace(short, "lfw-face", "1+abc", (1.0, 2.0, 3.0, 4.0)))
    backup = str(tmp_path / "odd.jsonl")
    assert main(["export", backup, "--store", odd.url]) == 0
    with open(backup) as lines:
        records = [json.loads(line) for line in lines]
    records[2]["face"]["id"] = held.faces[0].id  # and the same again, its face id taken by Bob's
    records[1]["subject"]["id"] = records[2]["face"]["subject_id"] = "e" * 32
    records[1]["subject"]["name"] = "Eve"
    collided = str(tmp_path / "collided.jsonl")
    with open(collided, "w") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)
    capsys.readouterr()
    assert main(["import", backup, "--store", target.url]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["subjects_added"], report["faces_added"]) == (0, 0) and "64 numbers" in report["skipped"][0]
    assert "none of its faces could be imported" in report["skipped"][1]  # no subject left without the faces it had
    assert main(["import", collided, "--store", target.url]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["faces_added"] == 0 and f"under subject {held.id}" in report["skipped"][0]
    assert target.get_subject("g", held.id).face_count == 1
    for store in (odd, target):
        store.close()


def test_rows_that_earlier_versions_wrote_are_backed_up_and_restored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Names enrolled before today's rules (no letter or digit, a zero-width space) and a whole-photo box that an
    earlier version scaled past its 213 px region (213.33): each stopped the whole export, exit 2."""
    source, target = GalleryStore(sqlite_url(tmp_path / "a")), GalleryStore(sqlite_url(tmp_path / "b"))
    region, _ = enrollment_photo(Image.new("RGB", (250, 300), "gray"), (0, 0, 250, 300), True)
    assert Image.open(io.BytesIO(region)).size == (213, 256)
    old_box = (0.0, 0.0, 250 * 256 / 300, 256.0)  # the unrounded scale, as kept before
    source.create_subject("g", "\U0001f600", face(1))
    whole = NewFace(face(2).embedding, "lfw-face", "1+abc", (0, 0, 250, 300), FacePhoto(region, old_box, True))
    source.create_subject("g", "Ann\u200b", whole)
    backup = str(tmp_path / "g.jsonl")
    assert main(["export", backup, "--store", source.url]) == 0
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == [] and (Path(backup).stat().st_mode & 0o077) == 0
    assert main(["import", backup, "--store", target.url]) == 0
    names = sorted(s.name for s in target.list_subjects("g", 10, 0)[0])
    assert names == sorted(["\U0001f600", "Ann\u200b"])
    for store in (source, target):
        store.close()


def test_a_whole_photo_face_box_fits_its_rounded_region() -> None:
    _, box = enrollment_photo(Image.new("RGB", (250, 300)), (0, 0, 250, 300), True)
    assert box == (0.0, 0.0, 213.0, 256.0)


def test_a_backup_brings_back_the_faces_of_a_subject_renamed_since(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = GalleryStore(sqlite_url(tmp_path / "a"))
    ann = store.create_subject("g", "Ann", face(1))
    store.add_face("g", ann.id, face(2))
    backup = str(tmp_path / "g.jsonl")
    assert main(["export", backup, "--store", store.url]) == 0
    store.delete_face("g", ann.faces[0].id)  # lost since the backup,
    store.rename_subject("g", ann.id, "Ann Lee")  # and the subject renamed
    capsys.readouterr()
    assert main(["import", backup, "--store", store.url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["subjects_there"], report["faces_added"], report["faces_there"]) == (1, 1, 1)
    restored = store.get_subject("g", ann.id)
    assert restored.name == "Ann Lee" and restored.face_count == 2  # the name it has now, and both faces
    store.close()


def test_the_default_store_is_never_made_by_an_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run where the service's settings are not, an import must not fill a new SQLite file the service never reads."""
    source = GalleryStore(sqlite_url(tmp_path / "a"))
    source.create_subject("g", "Ann", face(1))
    backup = str(tmp_path / "g.jsonl")
    assert main(["export", backup, "--store", source.url]) == 0
    monkeypatch.setenv("OCELLUS_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("OCELLUS_GALLERY_URL", raising=False)
    assert main(["import", backup]) == 2
    assert "give --store to make one" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    source.close()


def test_a_whole_export_of_the_first_release_imports_without_an_end_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 1 (the first release) wrote no end record; the end record then became required under the same version,
    and every whole backup of that release was refused as 'cut short' (an upgrade hunt). Version 2 requires it."""
    source = GalleryStore(sqlite_url(tmp_path / "a"))
    source.create_subject("g", "Ann", face(1))
    backup = tmp_path / "g.jsonl"
    assert main(["export", str(backup), "--store", source.url]) == 0
    header, subject, one, _end = backup.read_text().splitlines()
    assert '"version":2' in header
    backup.write_text("\n".join([header.replace('"version":2', '"version":1'), subject, one]) + "\n")
    target = GalleryStore(sqlite_url(tmp_path / "b"))
    assert main(["import", str(backup), "--store", target.url]) == 0, capsys.readouterr().err
    assert [s.name for s in target.list_subjects("g", 10, 0)[0]] == ["Ann"]
    backup.write_text("\n".join([header, subject, one]) + "\n")  # version 2 without its end: cut short
    assert main(["import", str(backup), "--store", target.url]) == 2 and "without its end record" in capsys.readouterr().err
    source.close()
    target.close()


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        (["export", "--store", "mysql://db/ocellus"], {}, "the gallery store is sqlite: or postgresql:, not mysql:"),
        (["export", "--store", "postgresql+asyncpg://db/ocellus"], {}, "No module named 'asyncpg'"),
        (["export"], {"OCELLUS_PORT": "abc"}, "OCELLUS_PORT: Input should be a valid integer"),
    ],
)
def test_a_store_it_cannot_use_or_settings_it_cannot_read_are_one_line(
    arguments: list[str], environment: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each printed a traceback (exit 1, which means 'an import left subjects out'); from a black-box hunt."""
    if "asyncpg" in message and importlib.util.find_spec("asyncpg") is not None:
        pytest.skip("asyncpg is installed here: no driver is missing")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    done = cli(*arguments)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "the file is empty"),
        ("not an export", "not an ocellus-gallery export"),
        ("another version", "format version 9"),
        ("a line cut short", "line 3: not JSON"),
        ("cut short at a line's end", "ends without its end record"),
        ("counts differ", "the end record counts"),
        ("a face out of place", "does not follow its subject"),
        ("a subject twice", "line 4: subject 00000000000000000000000000000001 a second time"),
        ("a face twice", "line 4: face 000000000000000000000000000f4241 a second time"),
        ("NaN", "line 3: face.embedding"),
        ("an infinite time", "line 3: face.created_at"),
        ("a photo that is no JPEG", "not a JPEG"),
        ("a damaged JPEG", "a damaged JPEG"),
        ("a JPEG cut short", "a damaged JPEG"),  # its headers whole: verify() passed it, re-embedding failed on it
        ("a giant JPEG", "larger than any kept face region"),  # refused from its header, before decoding
        ("a box outside its photo", "not inside the 64x48 photo"),
        ("a damaged line after 1,000 faces", "line 2301: not JSON"),
        ("not of unit length", "L2-normalised"),
        ("a control character in a name", "control characters"),
        ("gzip cut short", "end-of-stream"),
        ("not text", "not an ocellus-gallery export"),  # a SQLite file, given by mistake
    ],
)
def test_a_bad_file_stops_the_import_before_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    source = GalleryStore(sqlite_url(tmp_path / "a"))
    source.create_subject("g", "Ann", face(1))
    backup = tmp_path / "g.jsonl"
    assert main(["export", str(backup), "--store", source.url]) == 0
    header, subject, one, end = backup.read_text().splitlines()
    bigger = json.loads(one)
    bigger["face"]["embedding"] = [2 * x for x in bigger["face"]["embedding"]]
    more_faces = end.replace('"faces":1', '"faces":2')
    with_nan = one.replace('"embedding":[', '"embedding":[NaN,', 1)
    odd_name = subject.replace("Ann", "An\\u0007n")  # JSON's escape for BEL

    def with_photo(data: bytes, box: list[float]) -> str:
        record = json.loads(one)
        record["face"]["photo"] = {"jpeg": base64.b64encode(data).decode(), "box": box, "whole": False}
        return json.dumps(record)

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(jpeg, "JPEG")
    giant = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(giant, "JPEG")  # 13 kB of JPEG, 36 MB decoded
    noisy = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(noisy, "JPEG")
    many = [header]  # more than one transaction's worth: the bad line comes after the first batch would be written
    for number in range(1200):
        person, photo_of = json.loads(subject), json.loads(one)
        person["subject"]["id"] = photo_of["face"]["subject_id"] = f"{number:032x}"
        photo_of["face"]["id"] = f"{number + 10**6:032x}"
        person["subject"]["name"] = f"Person {number}"
        many += [json.dumps(person), json.dumps(photo_of)]
    many[2300] = many[2300][:30]
    many.append(json.dumps({"end": {"subjects": 1200, "faces": 1200}}))
    lines = {
        "a photo that is no JPEG": [header, subject, with_photo(b"hello", [0.0, 0.0, 1.0, 1.0]), end],
        "a damaged JPEG": [header, subject, with_photo(jpeg.getvalue()[:3] + bytes(200), [0.0, 0.0, 1.0, 1.0]), end],
        "a JPEG cut short": [header, subject, with_photo(noisy.getvalue()[:-1000], [0.0, 0.0, 1.0, 1.0]), end],
        "a giant JPEG": [header, subject, with_photo(giant.getvalue(), [0.0, 0.0, 1.0, 1.0]), end],
        "a box outside its photo": [header, subject, with_photo(jpeg.getvalue(), [0.0, 0.0, 1e9, 1e9]), end],
        "a damaged line after 1,000 faces": many,
        "empty": [],
        "not an export": [subject],
        "another version": [header.replace('"version":2', '"version":9')],
        "a line cut short": [header, subject, one[:40], end],
        "cut short at a line's end": [header, subject, one],
        "counts differ": [header, subject, one, more_faces],
        "a face out of place": [header, one, end],
        "a subject twice": [many[0], *many[3:5], many[3], many[-1]],  # it would have merged silently
        "a face twice": [many[0], *many[3:5], many[4], many[-1]],
        "NaN": [header, subject, with_nan, end],
        "an infinite time": [header, subject, re.sub(r'"created_at":[0-9.e+]+', '"created_at":Infinity', one), end],
        "not of unit length": [header, subject, json.dumps(bigger), end],
        "a control character in a name": [header, odd_name, one, end],
    }.get(case)
    if case == "gzip cut short":
        whole = gzip.compress(backup.read_bytes() * 50)
        backup.write_bytes(whole[: len(whole) // 2])
    elif case == "not text":
        backup.write_bytes((tmp_path / "a" / "gallery.sqlite3").read_bytes())
    else:
        assert lines is not None
        backup.write_text("".join(line + "\n" for line in lines))
    target = tmp_path / "b"
    if case == "cut short at a line's end":  # from stdin too: kept aside and refused whole
        piped = cli("import", "-", "--store", sqlite_url(tmp_path / "c"), stdin=backup.read_text())
        assert piped.returncode == 2 and "ends without its end record" in piped.stderr, piped.stderr
        assert GalleryStore(sqlite_url(tmp_path / "c")).galleries() == []
    assert main(["import", str(backup), "--store", sqlite_url(target)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
    assert GalleryStore(sqlite_url(target)).galleries() == []  # nothing of a bad file is written
    source.close()
