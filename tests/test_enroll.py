"""``python -m service.enroll``: a folder of people enrolled over real HTTP, rerun safely, with API keys, lost
answers, odd folders and runs that must stop."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from service import enroll
from tests.conftest import DATASETS, start_server

LFW = DATASETS / "lfw" / "images"
NO_FACE = DATASETS / "denoising" / "Set12" / "03.png"  # peppers


def people_folder(root: Path, people: dict[str, tuple[int, ...]] | None = None) -> Path:
    folder = root / "people"
    for person, numbers in (people or {"Colin_Powell": (1, 2), "Tony_Blair": (1,)}).items():
        (folder / person).mkdir(parents=True)
        for number in numbers:
            shutil.copy(LFW / person / f"{person}_{number:04d}.jpg", folder / person)
    if people is None:
        shutil.copy(NO_FACE, folder / "Tony_Blair" / "peppers.png")
        (folder / "Tony_Blair" / "notes.txt").write_text("not a photo: left alone")
        (folder / "Tony_Blair" / "._Tony_Blair_0001.jpg").write_bytes(b"AppleDouble metadata, not a photo")
        (folder / "Nobody").mkdir()
        shutil.copy(NO_FACE, folder / "Nobody")
        (folder / "Empty").mkdir()  # no photos: not a person
        (folder / ".thumbnails").mkdir()  # hidden: not a person
        shutil.copy(LFW / "Tony_Blair" / "Tony_Blair_0002.jpg", folder / ".thumbnails")
    return folder


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """The exit code, the summary printed and what went to stderr."""
    code = enroll.main(list(args))
    printed = capsys.readouterr()
    return code, json.loads(printed.out) if printed.out.strip() else {}, printed.err


def test_a_folder_of_people_is_enrolled_once_and_reruns_only_add_who_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = people_folder(tmp_path)
    with start_server(api_keys="r:read,w:write") as live, live.client() as http:
        base = [str(folder), "--gallery", "team", "--url", live.url, "--underscores-as-spaces"]
        code, _, err = run(capsys, *base, "--api-key", "r")
        assert code == 2 and "403 forbidden" in err  # a read key cannot enroll: stopped, not 3 refusals
        code, summary, _ = run(capsys, *base, "--api-key", "w", "--workers", "2")
        assert code == 1  # some photos were refused
        assert {k: summary[k] for k in ("people", "enrolled", "failed", "skipped", "faces")} == {
            "people": 3,
            "enrolled": 2,
            "failed": 1,
            "skipped": 0,
            "faces": 3,
        }
        assert summary["without_photos"] == ["Empty"]  # not a person, but said (it went unmentioned)
        assert sorted((r["person"], r["photo"], r["code"]) for r in summary["refused"]) == [
            ("Nobody", "03.png", "no_face"),
            ("Tony Blair", "peppers.png", "no_face"),
        ]
        keyed = {"X-API-Key": "r"}
        listed = http.get("/v1/galleries/team/subjects", headers=keyed).json()
        assert sorted((s["name"], s["face_count"]) for s in listed["subjects"]) == [("Colin Powell", 2), ("Tony Blair", 1)]
        probe = (LFW / "Colin_Powell" / "Colin_Powell_0003.jpg").read_bytes()
        found = http.post("/v1/galleries/team/identify", headers=keyed, files={"file": probe}).json()
        assert found["faces"][0]["match"]["name"] == "Colin Powell"

        _, again, _ = run(capsys, *base, "--api-key", "w")
        assert (again["skipped"], again["enrolled"], again["faces"]) == (2, 0, 0)  # nobody enrolled twice
        # Adding to people already enrolled sends their photos again: the ones they have are counted, not stored twice.
        (folder / "Colin_Powell" / "Colin_Powell_0003.jpg").write_bytes(probe)
        _, extended, _ = run(capsys, *base, "--api-key", "w", "--add-to-existing", "--single-face", "--reject-duplicates")
        assert (extended["extended"], extended["skipped"], extended["faces"], extended["already_there"]) == (1, 1, 1, 3)
        assert http.get("/v1/galleries/team", headers=keyed).json()["faces"] == 4


@pytest.mark.parametrize(
    ("when", "options"),
    [("after the write", []), ("while the write runs", []), ("after the write", ["--reject-duplicates"])],
)
def test_a_lost_answer_never_stores_a_photo_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, when: str, options: list[str]
) -> None:
    """The first answer to each write is lost (a dropped connection once the server made it, or a client timeout while
    it still runs, so that the photo is sent again beside it): each photo is still stored once, each person created
    once (the service refuses a face its subject has, and a name taken). With --reject-duplicates, the resent creation
    matches the subject it made: that is the name taken too, not a new person refused."""
    folder = people_folder(tmp_path, {"Colin_Powell": (1, 2, 3), "Hugo_Chavez": (1, 2, 3)})
    real_send, lost = enroll.Client._send, set[tuple[str, str | None]]()

    def send_and_lose_the_answer(self: enroll.Client, method: str, path: str, params: dict[str, str], photo: bytes | None) -> Any:
        if method != "POST" or (path, params.get("name")) in lost:
            return real_send(self, method, path, params, photo)
        lost.add((path, params.get("name")))
        if when == "after the write":
            real_send(self, method, path, params, photo)
            raise enroll.Unanswered("Remote end closed connection without response")

        def unheard() -> None:  # the server goes on with it; its answer (201, or a 409 if the resend won) is not read
            with contextlib.suppress(enroll.ApiFailure):
                real_send(self, method, path, params, photo)

        threading.Thread(target=unheard).start()
        raise enroll.Unanswered("timed out")

    monkeypatch.setattr(enroll.Client, "_send", send_and_lose_the_answer)
    with start_server() as live, live.client() as http:
        code, summary, _ = run(capsys, str(folder), "--gallery", "lossy", "--url", live.url, "--workers", "1", *options)
        assert code == 0 and (summary["enrolled"], summary["faces"], summary["refused"]) == (2, 6, []), summary
        listed = http.get("/v1/galleries/lossy/subjects").json()["subjects"]
        assert sorted((s["name"], s["face_count"]) for s in listed) == [("Colin_Powell", 3), ("Hugo_Chavez", 3)]
    assert len(lost) == 4  # each person's creation and first added face lost their answers


def test_odd_folders_are_reported_and_runs_that_cannot_work_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = people_folder(tmp_path, {"Colin_Powell": (1,)})
    latin1 = os.fsdecode(bytes(folder) + b"/Jos\xe9_Latin1")  # a name from an old archive: not UTF-8
    os.mkdir(latin1)
    shutil.copy(LFW / "Tony_Blair" / "Tony_Blair_0001.jpg", latin1)
    with start_server() as live:
        code, summary, _ = run(capsys, str(folder), "--gallery", "odd", "--url", live.url)
        assert code == 1 and (summary["people"], summary["enrolled"], summary["failed"]) == (2, 1, 1)
        assert [(r["person"], r["code"]) for r in summary["refused"]] == [("Jos\\xe9_Latin1", "bad_folder_name")]

        flat = tmp_path / "flat"
        flat.mkdir()
        shutil.copy(LFW / "Tony_Blair" / "Tony_Blair_0001.jpg", flat)
        code, _, err = run(capsys, str(flat), "--gallery", "odd", "--url", live.url)
        assert code == 2 and "one sub-folder per person" in err and "no person folders" in err
        with pytest.raises(SystemExit):
            enroll.main([str(folder), "--gallery", "my staff", "--url", live.url])  # not a gallery name
        assert "--gallery 'my staff': letters, digits" in capsys.readouterr().err

        # A model the service does not serve refuses every photo the same way: the run stops at the first.
        code, _, err = run(capsys, str(folder), "--gallery", "odd2", "--url", live.url, "--model", "no-such-face-model")
        assert code == 2 and "enrollment stopped: 404 unknown_model" in err
        code, _, err = run(capsys, str(folder), "--gallery", "odd2", "--url", live.url, "--model", "cifar10-resnet")
        assert code == 2 and "enrollment stopped: 400 wrong_task" in err  # not a face model: each photo was refused, exit 1

        # A wrong URL stops the run at once: the people not yet begun are not tried, the work so far is printed.
        many = people_folder(
            tmp_path / "many", {name: (1,) for name in ("Colin_Powell", "Tony_Blair", "Hugo_Chavez", "Serena_Williams")}
        )
        begun: list[str] = []
        real = enroll.enroll_person
        monkeypatch.setattr(
            enroll, "enroll_person", lambda client, gallery, name, *rest: begun.append(name) or real(client, gallery, name, *rest)
        )
        code, partial, err = run(capsys, str(many), "--gallery", "g", "--url", live.url + "/nowhere", "--workers", "1")
    assert code == 2 and "enrollment stopped: 404 not_found" in err and partial["faces"] == 0
    assert len(begun) == 1


def test_ctrl_c_lets_the_person_being_enrolled_finish_and_begins_nobody_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    many = people_folder(tmp_path, {name: (1, 2) for name in ("Colin_Powell", "Tony_Blair", "Hugo_Chavez", "Serena_Williams")})
    real = enroll.enroll_person

    def interrupted_during_the_first(client: enroll.Client, gallery: str, name: str, *rest: Any) -> Any:
        if name == "Colin_Powell":
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)  # Ctrl-C reaches the main thread
        return real(client, gallery, name, *rest)

    monkeypatch.setattr(enroll, "enroll_person", interrupted_during_the_first)
    with start_server() as live, live.client() as http:
        code, partial, err = run(capsys, str(many), "--gallery", "ctrl-c", "--url", live.url, "--workers", "1")
        assert code == 130 and "interrupted" in err
        assert (partial["enrolled"], partial["faces"]) == (1, 2)  # Colin, whole; nobody else begun
        assert [s["name"] for s in http.get("/v1/galleries/ctrl-c/subjects").json()["subjects"]] == ["Colin_Powell"]


def test_a_shutting_down_answer_may_follow_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request cancelled at shutdown answers 503 shutting_down while its store write may run on and commit: the
    resend's 409s then mean this run stored the photo. Counted 'already' (the person 'skipped'), the summary was wrong."""
    answers = iter(
        [
            enroll.ApiFailure(503, "shutting_down", "the server is shutting down"),  # the create committed regardless
            enroll.ApiFailure(409, "duplicate_name", "taken"),
            enroll.ApiFailure(409, "duplicate_face", "already there"),
        ]
    )

    class Restarting(enroll.Client):
        def post(self, path: str, params: dict[str, str], photo: bytes | None) -> Any:
            raise next(answers)

        def subject_id(self, gallery: str, name: str) -> str | None:
            return "f" * 32

    monkeypatch.setattr(enroll.time, "sleep", lambda seconds: None)
    outcome = enroll.add_photo(Restarting("http://127.0.0.1:9", None, 1.0), "g", "Ann", None, b"photo", {})
    assert outcome == ("stored", "f" * 32, None)


def test_a_model_that_is_not_served_stops_the_run_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """503 no_face_detector (or no_model, model_unavailable) comes before any write and meets every photo: each
    was retried five times over 10 s and reported as 'may be stored'; a folder the size of LFW ran for hours."""
    posts: list[str] = []

    class NoDetector(enroll.Client):
        def post(self, path: str, params: dict[str, str], photo: bytes | None) -> Any:
            posts.append(path)
            raise enroll.ApiFailure(503, "no_face_detector", "no loaded face detector for the face model")

    monkeypatch.setattr(enroll.time, "sleep", lambda seconds: None)
    with pytest.raises(enroll.ApiFailure, match="no_face_detector"):
        enroll.add_photo(NoDetector("http://127.0.0.1:9", None, 1.0), "g", "Ann", None, b"photo", {})
    assert len(posts) == 1


def test_a_proxys_refusal_is_a_refusal_not_a_lost_answer() -> None:
    """nginx refuses a body over its client_max_body_size with its own HTML 413 before the service sees it: the photo
    was sent five times (15 s) and reported 'the photo may be stored' (black-box hunt). A proxy's 502 or 504 may
    follow a write, so those are still sent again."""

    def proxy_answer(status: int, reason: str) -> Exception:
        page = io.BytesIO(f"<html><head><title>{status} {reason}</title></head></html>".encode())
        return enroll._failure(urllib.error.HTTPError("http://lb/v1/galleries/g/subjects", status, reason, Message(), page))

    too_large = proxy_answer(413, "Request Entity Too Large")
    assert isinstance(too_large, enroll.ApiFailure) and too_large.code == "payload_too_large" and not too_large.stops_the_run
    assert isinstance(proxy_answer(400, "Bad Request"), enroll.ApiFailure)
    for status, reason in ((502, "Bad Gateway"), (504, "Gateway Time-out"), (429, "Too Many Requests")):
        assert isinstance(proxy_answer(status, reason), enroll.Unanswered), status
    assert proxy_answer(403, "Forbidden").stops_the_run  # type: ignore[attr-defined]


def test_a_service_on_this_machine_is_reached_without_the_environments_proxy(tmp_path: Path) -> None:
    # With http_proxy set (a machine reaching the internet through one) and NO_PROXY not naming 127.0.0.1, every
    # request went to the proxy: "enrollment stopped" at the first, as if the service were down.
    with socket.socket() as probe:  # a proxy that is not there: any request sent to it is refused
        probe.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"
    proxied = {"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy, "no_proxy": "", "NO_PROXY": ""}
    folder = people_folder(tmp_path, {"Colin_Powell": (1,)})
    with start_server() as live:
        for url in (live.url, live.url.replace("127.0.0.1", "localhost")):
            command = [sys.executable, "-m", "service.enroll", str(folder), "--gallery", "proxied", "--url", url]
            done = subprocess.run(command, env={**os.environ, **proxied}, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
    assert enroll.is_loopback("127.0.0.2") and enroll.is_loopback("::1") and not enroll.is_loopback("10.0.0.1")
    assert not enroll.is_loopback("example.com")
