"""``python -m service.enroll``: a folder of people enrolled over real HTTP, rerun safely, with API keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service import enroll
from tests.conftest import DATASETS, start_server

LFW = DATASETS / "lfw" / "images"
NO_FACE = DATASETS / "denoising" / "Set12" / "03.png"  # peppers


def people_folder(root: Path) -> Path:
    folder = root / "people"
    for person, numbers in {"Colin_Powell": (1, 2), "Tony_Blair": (1,)}.items():
        (folder / person).mkdir(parents=True)
        for number in numbers:
            shutil.copy(LFW / person / f"{person}_{number:04d}.jpg", folder / person)
    shutil.copy(NO_FACE, folder / "Tony_Blair" / "peppers.png")
    (folder / "Tony_Blair" / "notes.txt").write_text("not a photo: left alone")
    (folder / "Nobody").mkdir()
    shutil.copy(NO_FACE, folder / "Nobody")
    (folder / "Empty").mkdir()  # no photos: not a person
    return folder


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    """The exit code and the summary printed (or, when none was, what went to stderr)."""
    code = enroll.main(list(args))
    printed = capsys.readouterr()
    return code, json.loads(printed.out) if printed.out.strip() else {"stderr": printed.err}


def test_a_folder_of_people_is_enrolled_once_and_reruns_only_add_who_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = people_folder(tmp_path)
    with start_server(api_keys="r:read,w:write") as live, live.client() as http:
        base = [str(folder), "--gallery", "team", "--url", live.url, "--underscores-as-spaces"]
        assert run(capsys, *base, "--api-key", "r")[0] == 2  # a read key cannot enroll: stopped, not 3 refusals
        code, summary = run(capsys, *base, "--api-key", "w", "--workers", "2")
        assert code == 1  # some photos were refused
        assert {k: summary[k] for k in ("people", "enrolled", "failed", "skipped", "faces")} == {
            "people": 3,
            "enrolled": 2,
            "failed": 1,
            "skipped": 0,
            "faces": 3,
        }
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

        _, again = run(capsys, *base, "--api-key", "w")
        assert (again["skipped"], again["enrolled"], again["faces"]) == (2, 0, 0)  # nobody enrolled twice
        _, extended = run(capsys, *base, "--api-key", "w", "--add-to-existing")
        assert (extended["extended"], extended["faces"]) == (2, 3)
        assert http.get("/v1/galleries/team", headers=keyed).json()["faces"] == 6


def test_a_wrong_url_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = people_folder(tmp_path)
    with start_server() as live:
        code, printed = run(capsys, str(folder), "--gallery", "g", "--url", live.url + "/nowhere")
    assert code == 2 and "enrollment stopped: 404 not_found" in printed["stderr"]
