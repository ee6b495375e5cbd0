"""``python -m service.enroll DIR --gallery G``: enroll a folder of people into a gallery over the HTTP API.

``DIR/<person>/<photo>`` (deepface's ``db_path`` layout, and LFW's): each sub-folder is one person, named by the
folder; their first photo with a usable face creates the subject, the others are added to it. People already
in the gallery (by exact name) are skipped, so a rerun after a failure enrolls only who is missing; with
``--add-to-existing`` their photos are added instead. Photos the service refuses (no face, a face too small,
a broken file) are listed and skipped. Standard library only: it runs wherever the service is installed.

A write is retried only when the server surely did not make it (503 overloaded, a refused connection); when an
answer is lost (a dropped connection, a timeout), the subject is looked up to learn whether the write happened.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"}
SKIPPED_FOLDERS = {"__MACOSX", "@eaDir"}  # archive and NAS metadata, not people
RETRIES = 4
# 503s given before anything was written: the write may be sent again. (gallery_unavailable may come after a
# commit that outlived its timeout: then the subject is looked up instead.)
NOTHING_WRITTEN = {"overloaded", "shutting_down", "timeout", "model_unloaded"}
CREATE_ONLY = {"reject_duplicates"}  # options that adding a face does not take
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # as the API's {g}


class ApiFailure(Exception):
    """The service answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @property
    def stops_the_run(self) -> bool:
        """A wrong key, role or URL: every other request would fail the same way."""
        return self.status in (401, 403) or self.code == "not_found"


class Unanswered(Exception):
    """A write whose answer was lost: it may or may not have happened."""


class RunStopped(Exception):
    """A failure that every other request would meet too (a wrong key, role or URL, the service gone)."""

    def __init__(self, cause: BaseException, summary: Summary) -> None:
        super().__init__(str(cause))
        self.summary = summary  # what was done before it


@dataclass
class Refused:
    person: str
    photo: str
    code: str
    message: str


@dataclass
class Summary:
    people: int = 0
    enrolled: int = 0  # people created by this run
    extended: int = 0  # people already there, given more photos (--add-to-existing)
    skipped: int = 0  # people already there, left alone
    failed: int = 0  # people none of whose photos could be enrolled (or whose folder name could not be read)
    faces: int = 0
    refused: list[Refused] = field(default_factory=list)


@dataclass
class Subject:
    id: str
    faces: int


class Client:
    """The few calls enrollment needs, as JSON with the photos in base64 (no multipart encoder needed)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Accept": "application/json"} | ({"X-API-Key": api_key} if api_key else {})

    def get(self, path: str, params: dict[str, str]) -> Any:
        for attempt in range(RETRIES + 1):  # a read may always be sent again
            try:
                return self._send("GET", path, params, None)
            except ApiFailure as failure:
                if failure.status != 503 or attempt == RETRIES:
                    raise
            except (OSError, Unanswered):
                if attempt == RETRIES:
                    raise
            time.sleep(attempt + 1)
        raise AssertionError("unreachable")

    def post(self, path: str, params: dict[str, str], photo: bytes) -> Any:
        for attempt in range(RETRIES + 1):
            try:
                return self._send("POST", path, params, photo)
            except ApiFailure as failure:
                if failure.code not in NOTHING_WRITTEN or attempt == RETRIES:
                    raise
            except ConnectionRefusedError:  # nothing reached the server
                if attempt == RETRIES:
                    raise
            time.sleep(attempt + 1)
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, params: dict[str, str], photo: bytes | None) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        body = None if photo is None else json.dumps({"file": base64.b64encode(photo).decode("ascii")}).encode()
        headers = self.headers | ({"Content-Type": "application/json"} if body is not None else {})
        request = urllib.request.Request(self.url + path + query, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise _failure(error) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, ConnectionRefusedError):
                raise error.reason from None
            raise Unanswered(str(error.reason)) from None
        except (ConnectionError, TimeoutError) as error:  # sent, then cut off or not answered in time
            if isinstance(error, ConnectionRefusedError):
                raise
            raise Unanswered(str(error) or type(error).__name__) from None

    def subject(self, gallery: str, name: str) -> Subject | None:
        page = self.get(f"/v1/galleries/{gallery}/subjects", {"name": name, "limit": "1"})
        return Subject(page["subjects"][0]["id"], page["subjects"][0]["face_count"]) if page["subjects"] else None


def _failure(error: urllib.error.HTTPError) -> ApiFailure:
    try:
        detail = json.load(error)["error"]
        return ApiFailure(error.code, str(detail["code"]), str(detail["message"]))
    except Exception:
        return ApiFailure(error.code, "http_error", str(error.reason))


def shown(name: str) -> str:
    """A file name as printable text (a name that is not UTF-8 holds surrogate escapes, which print() refuses)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def people_in(folder: Path, underscores_as_spaces: bool) -> tuple[list[tuple[str, list[Path]]], list[Refused]]:
    """(name, photos) per sub-folder that holds photos, by name; and the folders whose name cannot be a person's."""
    found, unreadable = [], []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        if person.name.startswith(".") or person.name in SKIPPED_FOLDERS:
            continue
        photos = sorted(
            p for p in person.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith(".")
        )
        if not photos:
            continue
        if shown(person.name) != person.name:
            message = "the folder's name is not UTF-8 (an archive from another system?): rename it"
            unreadable.append(Refused(shown(person.name), "", "bad_folder_name", message))
            continue
        found.append((person.name.replace("_", " ") if underscores_as_spaces else person.name, photos))
    return found, unreadable


def enroll_person(
    client: Client, gallery: str, name: str, photos: list[Path], options: dict[str, str], add_to_existing: bool
) -> tuple[str, int, list[Refused]]:
    """Enrolls one person; returns what happened to them ("enrolled", "extended", "skipped" or "failed"), how
    many faces were stored and the photos refused."""
    try:
        subject = client.subject(gallery, name)
    except ApiFailure as failure:
        if failure.status != 422:
            raise
        return "failed", 0, [Refused(name, "", failure.code, failure.message)]  # a name the service does not take
    if subject is not None and not add_to_existing:
        return "skipped", 0, []
    outcome = "extended" if subject is not None else "enrolled"
    faces, refused = 0, []
    for photo in photos:
        try:
            data = photo.read_bytes()
        except OSError as error:
            refused.append(Refused(name, shown(photo.name), "unreadable", str(error)))
            continue
        added, subject, problem = add_photo(client, gallery, name, subject, data, options)
        faces += added
        if problem is not None:
            refused.append(Refused(name, shown(photo.name), *problem))
    return (outcome if faces else "failed"), faces, refused


def add_photo(
    client: Client, gallery: str, name: str, subject: Subject | None, data: bytes, options: dict[str, str]
) -> tuple[int, Subject | None, tuple[str, str] | None]:
    """Creates the subject from this photo, or adds it to them; returns the faces stored (0 or 1), the subject as
    it now stands and, for a refused photo, the code and message."""
    base = f"/v1/galleries/{gallery}/subjects"
    for _ in range(RETRIES + 1):
        try:
            if subject is None:
                created = client.post(base, {"name": name, **options}, data)["subject"]
                return 1, Subject(created["id"], created["face_count"]), None
            adding = {key: value for key, value in options.items() if key not in CREATE_ONLY}
            client.post(f"{base}/{subject.id}/faces", adding, data)
            return 1, Subject(subject.id, subject.faces + 1), None
        except Unanswered as lost:
            now = client.subject(gallery, name)  # did the write happen before its answer was lost?
            if now is not None and (subject is None or now.faces > subject.faces):
                return 1, now, None
            problem = ("no_answer", f"the service did not answer ({lost}); the photo was not stored")
        except ApiFailure as failure:
            if failure.stops_the_run:
                raise
            if failure.code != "duplicate_name" or subject is not None:
                return 0, subject, (failure.code, failure.message)
            subject = client.subject(gallery, name)  # enrolled meanwhile (another run): add the photo to them
            problem = (failure.code, failure.message)
    return 0, subject, problem


def enroll_folder(
    client: Client,
    folder: Path,
    gallery: str,
    options: dict[str, str],
    workers: int = 4,
    add_to_existing: bool = False,
    underscores_as_spaces: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> Summary:
    """Enrolls every person folder; on a failure that stops the run (a wrong key or URL) the people not yet begun
    are left alone, and ``RunStopped`` carries the summary so far."""
    people, unreadable = people_in(folder, underscores_as_spaces)
    summary = Summary(people=len(people) + len(unreadable), failed=len(unreadable), refused=unreadable)
    lock, stop, done = threading.Lock(), threading.Event(), 0

    def one(person: tuple[str, list[Path]]) -> None:
        nonlocal done
        if stop.is_set():
            return
        name, photos = person
        try:
            outcome, faces, refused = enroll_person(client, gallery, name, photos, options, add_to_existing)
        except (ApiFailure, OSError, Unanswered) as error:
            if isinstance(error, ApiFailure) and not error.stops_the_run:
                outcome, faces, refused = "failed", 0, [Refused(name, "", error.code, error.message)]
            else:
                stop.set()
                raise
        with lock:
            setattr(summary, outcome, getattr(summary, outcome) + 1)
            summary.faces += faces
            summary.refused += refused
            done += 1
            progress(
                f"[{done}/{len(people)}] {name}: {outcome}, {faces} face(s)" + (f", {len(refused)} refused" if refused else "")
            )

    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(one, person) for person in people]
    summary.refused.sort(key=lambda r: (r.person, r.photo))
    errors = [error for error in (future.exception() for future in futures) if error is not None]
    if errors:
        raise RunStopped(errors[0], summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.enroll", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="one sub-folder of photos per person, named as the person")
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("OCELLUS_API_KEY"), help="a write key (default: $OCELLUS_API_KEY)")
    parser.add_argument("--workers", type=int, default=4, help="people enrolled at once (default %(default)s)")
    parser.add_argument("--add-to-existing", action="store_true", help="add the photos of people already enrolled")
    parser.add_argument("--underscores-as-spaces", action="store_true", help="Colin_Powell enrolls as 'Colin Powell'")
    parser.add_argument("--no-detect", action="store_true", help="the photos are face crops already (detect=false)")
    parser.add_argument("--single-face", action="store_true", help="refuse photos that show several faces")
    parser.add_argument("--reject-duplicates", action="store_true", help="refuse a new person who matches an enrolled one")
    parser.add_argument("--model", help="the face model (default: the service's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if not GALLERY_NAME.fullmatch(args.gallery):
        parser.error(f"--gallery {args.gallery!r}: letters, digits, _ . - (at most 64, starting with a letter or digit)")
    flags = {
        "detect": args.no_detect and "false",
        "single_face": args.single_face and "true",
        "reject_duplicates": args.reject_duplicates and "true",
        "model": args.model,
    }
    options = {key: value for key, value in flags.items() if value}
    loose = [p.name for p in args.folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES]
    if loose:
        print(f"{len(loose)} photo(s) directly in {args.folder} are not enrolled: one sub-folder per person", file=sys.stderr)
    client = Client(args.url, args.api_key, args.timeout)
    try:
        summary = enroll_folder(
            client,
            args.folder,
            args.gallery,
            options,
            args.workers,
            args.add_to_existing,
            args.underscores_as_spaces,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except RunStopped as stopped:
        print(json.dumps(asdict(stopped.summary), indent=2, ensure_ascii=False))
        print(f"enrollment stopped: {stopped}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    if not summary.people:
        print(f"no person folders (sub-folders holding photos) in {args.folder}", file=sys.stderr)
        return 2
    return 1 if summary.refused else 0


if __name__ == "__main__":
    sys.exit(main())
