"""``python -m service.enroll DIR --gallery G``: enroll a folder of people into a gallery over the HTTP API.

``DIR/<person>/<photo>`` (deepface's ``db_path`` layout, and LFW's): each sub-folder is one person, named by the
folder; their first photo with a usable face creates the subject, the others are added to it. People already
in the gallery (by exact name) are skipped, so a rerun after a failure enrolls only who is missing; with
``--add-to-existing`` their photos are added instead. Photos the service refuses (no face, a face too small,
a broken file) are listed and skipped. Standard library only: it runs wherever the service is installed.

Sending a photo again is safe: the service refuses a face its subject already has (409 duplicate_face) and a
name already taken (409 duplicate_name, then the photo goes to that subject). So when an answer is lost (a dropped
connection, a timeout, a 5xx from the store or a proxy), the photo is simply sent again, and its 409 tells that the
lost request had stored it. With ``--add-to-existing``, photos a person already has are counted, not added again.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
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

from service import program_name
from service.gallery import GALLERY_NAME  # (the package itself imports nothing: this stays standard library only)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"}
SKIPPED_FOLDERS = {"__MACOSX", "@eaDir"}  # archive and NAS metadata, not people
RETRIES = 4
# 503s given before anything was written. Other 5xx may follow a write (gallery_unavailable after a commit that
# outlived its timeout, shutting_down for a request cancelled while its store write ran on, a proxy's 504); a photo
# is sent again after either, and the 409s tell what happened.
NOTHING_WRITTEN = {"overloaded", "timeout", "model_unloaded"}
# The model the run needs is not served (not loaded, failed to load, its detector missing, a mistyped --model, one of
# another task): refused before any write, and every other photo would be refused the same way.
NO_MODEL = {"no_model", "model_unavailable", "no_face_detector", "unknown_model", "wrong_task"}
CREATE_ONLY = {"reject_duplicates"}  # options that adding a face does not take


class ApiFailure(Exception):
    """The service answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @property
    def stops_the_run(self) -> bool:
        """A wrong key, role, URL or model: every other request would fail the same way."""
        return self.status in (401, 403) or self.code == "not_found" or self.code in NO_MODEL


class Unanswered(Exception):
    """A request whose answer was lost (or came cut off): a write may or may not have happened."""


class RunStopped(Exception):
    """A failure that every other request would meet too (a wrong key, role or URL, the service gone)."""

    def __init__(self, cause: BaseException, summary: Summary) -> None:  # (raised "from" the cause)
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
    skipped: int = 0  # people already there, left alone (or all of whose photos were there already)
    failed: int = 0  # people none of whose photos could be enrolled (or whose folder name could not be read)
    faces: int = 0  # photos stored by this run
    already_there: int = 0  # photos their subject had before this run (--add-to-existing)
    refused: list[Refused] = field(default_factory=list)
    without_photos: list[str] = field(default_factory=list)  # sub-folders holding no photo: not people (were unmentioned)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    """The few calls enrollment needs, as JSON with the photos in base64 (no multipart encoder needed)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Accept": "application/json"} | ({"X-API-Key": api_key} if api_key else {})
        # A service on this machine is reached directly: a proxy named by the environment (http_proxy, for the
        # internet) would refuse or fail requests to 127.0.0.1 unless NO_PROXY happened to name it.
        direct = is_loopback(urllib.parse.urlsplit(self.url).hostname or "")
        self.opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if direct else []))

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
        """Sent once: ``add_photo`` decides whether to send a write again, knowing what an earlier try may have done."""
        return self._send("POST", path, params, photo)

    def _send(self, method: str, path: str, params: dict[str, str], photo: bytes | None) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        body = None if photo is None else json.dumps({"file": base64.b64encode(photo).decode("ascii")}).encode()
        headers = self.headers | ({"Content-Type": "application/json"} if body is not None else {})
        request = urllib.request.Request(self.url + path + query, data=body, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=self.timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise _failure(error) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, ConnectionRefusedError):
                raise error.reason from None
            raise Unanswered(str(error.reason)) from None
        # Sent, then cut off, not answered in time, or answered in part (IncompleteRead, a body that does not parse).
        except (ConnectionError, TimeoutError, http.client.HTTPException, ValueError) as error:
            raise Unanswered(str(error) or type(error).__name__) from None

    def subject_id(self, gallery: str, name: str) -> str | None:
        try:
            page = self.get(f"/v1/galleries/{gallery}/subjects", {"name": name, "limit": "1"})
        except ApiFailure as failure:
            if failure.code == "unknown_gallery":  # no subjects yet: its first person is about to be enrolled
                return None
            raise
        return str(page["subjects"][0]["id"]) if page["subjects"] else None


def _failure(error: urllib.error.HTTPError) -> Exception:
    """The service's error; an answer without its JSON body (cut off, or a proxy's page) tells nothing of a write
    (Unanswered), but for the statuses that stop a run (a wrong key, role or URL) and a proxy's refusals: a 4xx
    other than 408 and 429 comes before the request reaches the service (nginx's 413 for a body over its
    client_max_body_size was sent five times and reported as 'may be stored')."""
    try:
        detail = json.load(error)["error"]
        return ApiFailure(error.code, str(detail["code"]), str(detail["message"]))
    except Exception:
        code = {404: "not_found", 413: "payload_too_large"}.get(error.code, "http_error")
        failure = ApiFailure(error.code, code, f"{error.reason} (from a proxy: the service's error body is missing)")
        if failure.stops_the_run or (400 <= error.code < 500 and error.code not in (408, 429)):
            return failure
        return Unanswered(f"{error.code} {error.reason} without the service's error body")


def shown(name: str) -> str:
    """A file name as printable text (a name that is not UTF-8 holds surrogate escapes, which print() refuses)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def people_in(folder: Path, underscores_as_spaces: bool) -> tuple[list[tuple[str, list[Path]]], list[Refused], list[str]]:
    """(name, photos) per sub-folder that holds photos, by name; the folders whose name cannot be a person's; and
    those that hold no photo."""
    found, unreadable, empty = [], [], []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        if person.name.startswith(".") or person.name in SKIPPED_FOLDERS:
            continue
        photos = sorted(
            p for p in person.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith(".")
        )
        if not photos:
            empty.append(shown(person.name))
            continue
        if shown(person.name) != person.name:
            message = "the folder's name is not UTF-8 (an archive from another system?): rename it"
            unreadable.append(Refused(shown(person.name), "", "bad_folder_name", message))
            continue
        found.append((person.name.replace("_", " ") if underscores_as_spaces else person.name, photos))
    return found, unreadable, empty


def enroll_person(
    client: Client, gallery: str, name: str, photos: list[Path], options: dict[str, str], add_to_existing: bool
) -> tuple[str, dict[str, int], list[Refused]]:
    """Enrolls one person; returns what happened to them ("enrolled", "extended", "skipped" or "failed"), how
    many photos this run stored and how many were there already, and the photos refused."""
    counts = {"stored": 0, "already": 0}
    subject = client.subject_id(gallery, name)  # a name the service does not take: its 422 fails this person alone
    if subject is not None and not add_to_existing:
        return "skipped", counts, []
    outcome = "extended" if subject is not None else "enrolled"
    refused = []
    for photo in photos:
        try:
            data = photo.read_bytes()
        except OSError as error:
            refused.append(Refused(name, shown(photo.name), "unreadable", str(error)))
            continue
        result, subject, problem = add_photo(client, gallery, name, subject, data, options)
        if problem is None:
            counts[result] += 1
        else:
            refused.append(Refused(name, shown(photo.name), *problem))
    if not counts["stored"]:
        outcome = "skipped" if counts["already"] else "failed"
    return outcome, counts, refused


def add_photo(
    client: Client, gallery: str, name: str, subject: str | None, data: bytes, options: dict[str, str]
) -> tuple[str, str | None, tuple[str, str] | None]:
    """Creates the subject (``subject`` None) from this photo, or adds it to them. Returns "stored" (by this call)
    or "already" (the subject had it), the subject's id, and for a refused photo its code and message."""
    base = f"/v1/galleries/{gallery}/subjects"
    lost = False  # an earlier attempt's answer was lost: a duplicate then means that attempt stored the photo
    problem = ("no_answer", "the service did not answer")
    for attempt in range(RETRIES + 1):
        try:
            if subject is None:
                return "stored", str(client.post(base, {"name": name, **options}, data)["subject"]["id"]), None
            adding = {key: value for key, value in options.items() if key not in CREATE_ONLY}
            client.post(f"{base}/{subject}/faces", adding, data)
            return "stored", subject, None
        except ConnectionRefusedError:  # nothing reached the service
            if attempt == RETRIES:
                raise  # it is gone: the run stops
        except Unanswered as error:
            message = f"the service did not answer ({error}); the photo may be stored: rerun with --add-to-existing"
            lost, problem = True, ("no_answer", message)
        except ApiFailure as failure:
            if failure.stops_the_run:
                raise
            if failure.code == "duplicate_face":
                return ("stored" if lost else "already"), subject, None
            if failure.code == "duplicate_name" and subject is None:
                subject = client.subject_id(gallery, name)  # made by a lost attempt, or by another run: add to them
                continue
            if failure.status < 500:
                return "refused", subject, (failure.code, failure.message)
            lost = lost or failure.code not in NOTHING_WRITTEN  # those 503s come before any write
            maybe = " (the photo may be stored: rerun with --add-to-existing)" if lost else ""
            problem = (failure.code, failure.message + maybe)
        time.sleep(attempt + 1)
    return "refused", subject, problem


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
    people, unreadable, empty = people_in(folder, underscores_as_spaces)
    summary = Summary(people=len(people) + len(unreadable), failed=len(unreadable), refused=unreadable, without_photos=empty)
    changed = threading.Condition()  # guards the summary, and the count of people being enrolled
    stop, running, done = threading.Event(), 0, 0

    def one(person: tuple[str, list[Path]]) -> None:
        nonlocal running, done
        with changed:
            if stop.is_set():
                return
            running += 1
        name, photos = person
        outcome: str | None = None
        try:
            outcome, counts, refused = enroll_person(client, gallery, name, photos, options, add_to_existing)
        except ApiFailure as error:
            if error.stops_the_run:
                stop.set()
                raise
            outcome, counts, refused = "failed", {}, [Refused(name, "", error.code, error.message)]
        except BaseException:  # the service gone, a bug: every other person would meet it too
            stop.set()
            raise
        finally:
            with changed:  # the person is counted before they stop counting as running (Ctrl-C waits for that)
                if outcome is not None:
                    setattr(summary, outcome, getattr(summary, outcome) + 1)
                    summary.faces += counts.get("stored", 0)
                    summary.already_there += counts.get("already", 0)
                    summary.refused += refused
                    done += 1
                    refusals = f", {len(refused)} refused" if refused else ""
                    progress(f"[{done}/{len(people)}] {name}: {outcome}, {counts.get('stored', 0)} face(s) stored{refusals}")
                running -= 1
                changed.notify_all()

    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = [pool.submit(one, person) for person in people]
        errors = [error for error in (future.exception() for future in futures) if error is not None]
    except KeyboardInterrupt as interrupt:  # Ctrl-C: the people being enrolled finish, nobody else begins
        with changed:
            stop.set()
            changed.wait_for(lambda: running == 0)
        errors = [interrupt]
    pool.shutdown(wait=True, cancel_futures=True)
    summary.refused.sort(key=lambda r: (r.person, r.photo))
    if errors:
        raise RunStopped(errors[0], summary) from errors[0]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("service.enroll"), description=(__doc__ or "").split("\n\n")[0])
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
    if not re.fullmatch(GALLERY_NAME, args.gallery):
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
        interrupted = isinstance(stopped.__cause__, KeyboardInterrupt)
        print(f"enrollment stopped: {'interrupted' if interrupted else stopped}", file=sys.stderr)
        return 130 if interrupted else 2
    print(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    if not summary.people:
        print(f"no person folders (sub-folders holding photos) in {args.folder}", file=sys.stderr)
        return 2
    return 1 if summary.refused else 0


if __name__ == "__main__":
    sys.exit(main())
