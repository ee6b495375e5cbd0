"""``python -m service.enroll DIR --gallery G``: enroll a folder of people into a gallery over the HTTP API.

``DIR/<person>/<photo>`` (deepface's ``db_path`` layout, and LFW's): each sub-folder is one person, named by the
folder; their first photo with a usable face creates the subject, the others are added to it. People already
in the gallery (by exact name) are skipped, so a rerun after a failure enrolls only who is missing; with
``--add-to-existing`` their photos are added instead. Photos the service refuses (no face, a face too small,
a broken file) are listed and skipped. Standard library only: it runs wherever the service is installed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
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
RETRIES = 4  # on 503 (busy, timeouts, a store that hiccups) and dropped connections


class ApiFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


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
    failed: int = 0  # people none of whose photos could be enrolled (or whose name is refused)
    faces: int = 0
    refused: list[Refused] = field(default_factory=list)


class Client:
    """The few calls enrollment needs, as JSON with the photos in base64 (no multipart encoder needed)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.headers = {"Accept": "application/json"} | ({"X-API-Key": api_key} if api_key else {})

    def call(self, method: str, path: str, params: dict[str, str] | None = None, photo: bytes | None = None) -> Any:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        body = None if photo is None else json.dumps({"file": base64.b64encode(photo).decode("ascii")}).encode()
        headers = self.headers | ({"Content-Type": "application/json"} if body is not None else {})
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(self.url + path + query, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                failure = _failure(error)
                if error.code != 503 or attempt == RETRIES:
                    raise failure from None
                time.sleep(float(error.headers.get("Retry-After") or 1) * (attempt + 1))
            except (ConnectionError, TimeoutError, urllib.error.URLError):
                if attempt == RETRIES:
                    raise
                time.sleep(attempt + 1)
        raise AssertionError("unreachable")

    def subject_id(self, gallery: str, name: str) -> str | None:
        page = self.call("GET", f"/v1/galleries/{_quote(gallery)}/subjects", {"name": name, "limit": "1"})
        return page["subjects"][0]["id"] if page["subjects"] else None


def _failure(error: urllib.error.HTTPError) -> ApiFailure:
    try:
        detail = json.load(error)["error"]
        return ApiFailure(error.code, str(detail["code"]), str(detail["message"]))
    except Exception:
        return ApiFailure(error.code, "http_error", str(error.reason))


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def people_in(folder: Path, underscores_as_spaces: bool) -> list[tuple[str, list[Path]]]:
    """(name, photos) per sub-folder that holds photos, by name."""
    found = []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = sorted(p for p in person.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        if photos:
            found.append((person.name.replace("_", " ") if underscores_as_spaces else person.name, photos))
    return found


def enroll_person(
    client: Client, gallery: str, name: str, photos: list[Path], options: dict[str, str], add_to_existing: bool
) -> tuple[str, int, list[Refused]]:
    """Enrolls one person; returns what happened to them ("enrolled", "extended", "skipped" or "failed"), how
    many faces were stored and the photos refused."""
    try:
        subject = client.subject_id(gallery, name)
    except ApiFailure as failure:
        if failure.status != 422:
            raise
        return "failed", 0, [Refused(name, "", failure.code, failure.message)]  # a name the service does not take
    if subject is not None and not add_to_existing:
        return "skipped", 0, []
    outcome = "extended" if subject is not None else "enrolled"
    faces, refused = 0, []
    base = f"/v1/galleries/{_quote(gallery)}/subjects"
    for photo in photos:
        try:
            if subject is None:
                subject = client.call("POST", base, {"name": name, **options}, photo.read_bytes())["subject"]["id"]
            else:
                client.call("POST", f"{base}/{subject}/faces", options, photo.read_bytes())
            faces += 1
        except ApiFailure as failure:
            if failure.status in (401, 403, 404) and failure.code in ("unauthorized", "forbidden", "not_found"):
                raise  # the whole run is wrong (key, role or URL), not this photo
            refused.append(Refused(name, photo.name, failure.code, failure.message))
        except OSError as error:  # an unreadable file
            refused.append(Refused(name, photo.name, "unreadable", str(error)))
    return (outcome if faces else "failed"), faces, refused


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
    people = people_in(folder, underscores_as_spaces)
    summary = Summary(people=len(people))
    lock, done = threading.Lock(), 0

    def one(person: tuple[str, list[Path]]) -> None:
        nonlocal done
        name, photos = person
        outcome, faces, refused = enroll_person(client, gallery, name, photos, options, add_to_existing)
        with lock:
            setattr(summary, outcome, getattr(summary, outcome) + 1)
            summary.faces += faces
            summary.refused += refused
            done += 1
            progress(
                f"[{done}/{len(people)}] {name}: {outcome}, {faces} face(s)" + (f", {len(refused)} refused" if refused else "")
            )

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, people))  # (list: re-raises a worker's error, such as a wrong key)
    summary.refused.sort(key=lambda r: (r.person, r.photo))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.enroll", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="one sub-folder of photos per person, named as the person")
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("OCELLUS_API_KEY"), help="a write key (default: $OCELLUS_API_KEY)")
    parser.add_argument("--workers", type=int, default=4, help="people enrolled at once (default %(default)s)")
    parser.add_argument("--add-to-existing", action="store_true", help="add the photos of people already enrolled")
    parser.add_argument("--underscores-as-spaces", action="store_true", help="Colin_Powell enrolls as 'Colin Powell'")
    parser.add_argument("--no-detect", action="store_true", help="the photos are face crops already (detect=false)")
    parser.add_argument("--model", help="the face model (default: the service's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    options = {"detect": "false"} if args.no_detect else {}
    options |= {"model": args.model} if args.model else {}
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
    except (ApiFailure, OSError) as error:
        print(f"enrollment stopped: {error}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    return 1 if summary.refused else 0


if __name__ == "__main__":
    sys.exit(main())
