"""Back up, restore and move face galleries: ``python -m service.gallery.backup export|import`` (``ocellus-gallery``).

An export is JSON lines: a header, then each subject followed by its faces, each face with its embedding, the
model and version that made it and the face region kept at enrollment. Importing it into a store, SQLite or
PostgreSQL, keeps every id and time, so clients holding subject or face ids find the same gallery, and an
enrollment's photo still re-embeds for a later model. Each imported face is an "add" in the change log: replicas
running on that store pick it up within a sync interval. Importing a file again adds only what is missing, so
an interrupted import is simply rerun.

Both work on the store itself (by default the one the service uses: ``OCELLUS_GALLERY_URL``, else SQLite under
``OCELLUS_DATA_DIR``) and may run beside the service: an export is one read statement, a consistent snapshot;
an import writes in transactions under the store's write lock, as enrollments do.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Connection, select
from sqlalchemy.exc import SQLAlchemyError

from service.gallery import GALLERY_NAME
from service.gallery.store import FacePhoto, GalleryStore, NewFace, face_photos, faces, sqlite_url, subjects

FORMAT = "ocellus-gallery"
FORMAT_VERSION = 1
BATCH_FACES = 1000  # faces written per transaction on import (and rows read per round trip on export)

Id = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Box = Annotated[list[float], Field(min_length=4, max_length=4)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Header(Record):
    format: str
    version: int
    exported_at: str
    galleries: list[str] | None  # the galleries asked for; None: all of them


class Subject(Record):
    id: Id
    gallery: str = Field(pattern=f"^{GALLERY_NAME}$")
    name: str = Field(min_length=1, max_length=200)
    created_at: float


class Photo(Record):
    jpeg: str  # base64
    box: Box
    whole: bool

    @field_validator("jpeg")
    @classmethod
    def _base64(cls, value: str) -> str:
        base64.b64decode(value, validate=True)  # a binascii.Error is a ValueError: pydantic reports it
        return value


class Face(Record):
    id: Id
    subject_id: Id
    model: str = Field(min_length=1, max_length=200)
    model_version: str = Field(min_length=1, max_length=100)
    embedding: list[Finite] = Field(min_length=1, max_length=8192)
    box: Box
    created_at: float
    photo: Photo | None


class BadExport(ValueError):
    """The file is not an export, or line ``line`` is not a record of one."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")


# -- export ---------------------------------------------------------------------------------------


def export_records(store: GalleryStore, galleries: Sequence[str] = ()) -> Iterator[Record]:
    """The header, then every subject of ``galleries`` (all when empty) followed by its faces."""
    yield Header(
        format=FORMAT, version=FORMAT_VERSION, exported_at=datetime.now(UTC).isoformat(), galleries=sorted(galleries) or None
    )
    query = (
        select(
            subjects.c.id.label("subject_id"),
            subjects.c.gallery,
            subjects.c.name,
            subjects.c.created_at.label("subject_created"),
            faces.c.id.label("face_id"),
            faces.c.model,
            faces.c.model_version,
            faces.c.embedding,
            faces.c.box,
            faces.c.created_at.label("face_created"),
            face_photos.c.image,
            face_photos.c.box.label("photo_box"),
            face_photos.c.whole,
        )
        .select_from(
            subjects.outerjoin(faces, faces.c.subject_id == subjects.c.id).outerjoin(
                face_photos, face_photos.c.face_id == faces.c.id
            )
        )
        .order_by(subjects.c.gallery, subjects.c.created_at, subjects.c.id, faces.c.created_at, faces.c.id)
    )
    if galleries:
        query = query.where(subjects.c.gallery.in_(list(galleries)))
    with store.engine.connect() as connection:
        current = None
        for row in connection.execution_options(stream_results=True, yield_per=BATCH_FACES).execute(query):
            if row.subject_id != current:
                current = row.subject_id
                yield Subject(id=row.subject_id, gallery=row.gallery, name=row.name, created_at=row.subject_created)
            if row.face_id is None:  # a subject whose faces were all deleted
                continue
            photo = None
            if row.image is not None:
                photo = Photo(jpeg=base64.b64encode(row.image).decode(), box=json.loads(row.photo_box), whole=row.whole)
            yield Face(
                id=row.face_id,
                subject_id=row.subject_id,
                model=row.model,
                model_version=row.model_version,
                embedding=np.frombuffer(row.embedding, np.float32).tolist(),  # a float32 prints as the double it is
                box=json.loads(row.box),
                created_at=row.face_created,
                photo=photo,
            )


def write_export(records: Iterable[Record], out: IO[str]) -> dict[str, int]:
    counts = {"subjects": 0, "faces": 0}
    for record in records:
        kind = record_kind(record)
        if kind != "header":
            counts[f"{kind}s"] += 1
        out.write(json.dumps({kind: record.model_dump()}, separators=(",", ":")) + "\n")
    return counts


def record_kind(record: Record) -> str:
    return {Header: "header", Subject: "subject", Face: "face"}[type(record)]


# -- import ---------------------------------------------------------------------------------------

KINDS: dict[str, type[Record]] = {"header": Header, "subject": Subject, "face": Face}


def read_export(lines: Iterable[str]) -> Iterator[tuple[Subject, list[Face]]]:
    """Each subject of an export with its faces; ``BadExport`` at the first line that is not what it should be."""
    subject: Subject | None = None
    own: list[Face] = []
    number = 0
    for number, line in enumerate(lines, 1):
        if number > 1 and not line.strip():
            continue
        if number == 1:
            if not line.startswith('{"header":'):
                raise BadExport(1, f"not an {FORMAT} export (made by `ocellus-gallery export`)")
            record = parse_line(number, line)
            if not isinstance(record, Header) or record.format != FORMAT:
                raise BadExport(1, f"not an {FORMAT} export (made by `ocellus-gallery export`)")
            if record.version != FORMAT_VERSION:
                raise BadExport(1, f"format version {record.version}; this version of the service reads {FORMAT_VERSION}")
        elif isinstance(record := parse_line(number, line), Subject):
            if subject is not None:
                yield subject, own
            subject, own = record, []
        elif isinstance(record, Face):
            if subject is None or record.subject_id != subject.id:
                raise BadExport(number, f"face {record.id} does not follow its subject {record.subject_id}")
            own.append(record)
        else:
            raise BadExport(number, "a second header: two exports joined together?")
    if number == 0:
        raise BadExport(1, "the file is empty")
    if subject is not None:
        yield subject, own


def parse_line(number: int, line: str) -> Record:
    try:
        value = json.loads(line)
    except ValueError as error:
        raise BadExport(number, f"not JSON ({error}); cut short?") from None
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        raise BadExport(number, f"expected one of {sorted(KINDS)} as the only key")
    [(kind, body)] = value.items()
    try:
        return KINDS[kind].model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadExport(number, f"{kind}.{where}: {first['msg']}") from None


@dataclass
class ImportReport:
    subjects_added: int = 0
    faces_added: int = 0
    subjects_there: int = 0  # already in the store (an import run again)
    faces_there: int = 0
    skipped: list[str] = field(default_factory=list)  # subjects left out, and why


def import_export(
    store: GalleryStore, people: Iterable[tuple[Subject, list[Face]]], galleries: Sequence[str] = ()
) -> ImportReport:
    """Write what the store lacks of ``people`` (those of ``galleries`` only, when given)."""
    report, batch, size = ImportReport(), [], 0
    for subject, own in people:
        if galleries and subject.gallery not in galleries:
            continue
        batch.append((subject, own))
        size += 1 + len(own)
        if size >= BATCH_FACES:
            write_batch(store, batch, report)
            batch, size = [], 0
    if batch:
        write_batch(store, batch, report)
    return report


def write_batch(store: GalleryStore, batch: list[tuple[Subject, list[Face]]], report: ImportReport) -> None:
    """One transaction; what it finds in the store decides, under the write lock, what is added or skipped."""
    with store.write() as connection:
        held, named, known_faces = stored_state(connection, batch)
        new_subjects: list[dict[str, object]] = []
        new_faces: list[tuple[str, str, NewFace, float, str | None]] = []
        for subject, own in batch:
            place = (subject.gallery, subject.name)
            if subject.id in held and held[subject.id] != place:
                report.skipped.append(f"subject {subject.id} ({subject.name!r}): the store has it as {held[subject.id]}")
                continue
            if named.get(place, subject.id) != subject.id:
                report.skipped.append(
                    f"subject {subject.id}: {subject.gallery!r} already has a subject named {subject.name!r} "
                    f"(id {named[place]}); rename one of them and import again"
                )
                continue
            if subject.id in held:
                report.subjects_there += 1
            else:
                new_subjects.append(subject.model_dump())
                held[subject.id], named[place] = place, subject.id
                report.subjects_added += 1
            for face in own:
                if face.id in known_faces:
                    report.faces_there += 1
                    continue
                new_faces.append((subject.gallery, subject.id, new_face(face), face.created_at, face.id))
                known_faces.add(face.id)
                report.faces_added += 1
        if new_subjects:
            connection.execute(subjects.insert(), new_subjects)
        store.insert_faces(connection, new_faces)


def stored_state(
    connection: Connection, batch: list[tuple[Subject, list[Face]]]
) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, str], str], set[str]]:
    """Of the batch's subjects and faces, what the store has: subject id -> (gallery, name), the subject holding
    each of their names, and the face ids."""
    ids = [subject.id for subject, _ in batch]
    names = {subject.name for subject, _ in batch}
    columns = (subjects.c.id, subjects.c.gallery, subjects.c.name)
    held = {r.id: (r.gallery, r.name) for r in connection.execute(select(*columns).where(subjects.c.id.in_(ids)))}
    named = {(r.gallery, r.name): r.id for r in connection.execute(select(*columns).where(subjects.c.name.in_(names)))}
    face_ids = [face.id for _, own in batch for face in own]
    known = set(connection.execute(select(faces.c.id).where(faces.c.id.in_(face_ids))).scalars()) if face_ids else set()
    return held, named, known


def new_face(face: Face) -> NewFace:
    photo = None
    if face.photo is not None:
        box = face.photo.box
        photo = FacePhoto(base64.b64decode(face.photo.jpeg, validate=True), (box[0], box[1], box[2], box[3]), face.photo.whole)
    vector = np.asarray(face.embedding, np.float32)
    return NewFace(vector, face.model, face.model_version, (face.box[0], face.box[1], face.box[2], face.box[3]), photo)


# -- command line ---------------------------------------------------------------------------------


def default_store_url() -> str:
    from service.settings import Settings  # the service's own setting (read only when no --store is given)

    settings = Settings()
    return settings.gallery_url or sqlite_url(settings.data_dir)


def open_text(path: str, mode: str) -> contextlib.AbstractContextManager[IO[str]]:
    """``-`` is stdin or stdout; a name ending in ``.gz`` is gzip-compressed."""
    if path == "-":
        return contextlib.nullcontext(sys.stdout if mode == "w" else sys.stdin)
    if path.endswith(".gz"):
        return cast(IO[str], gzip.open(path, mode + "t", encoding="utf-8"))  # text mode (mypy sees a str mode)
    return open(path, mode, encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ocellus-gallery", description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in (
        ("export", "write galleries to a JSON-lines file (or stdout)"),
        ("import", "add an export's subjects and faces to the store (what it has already is left as it is)"),
    ):
        command = commands.add_parser(name, help=about, description=about)
        command.add_argument(
            "file", nargs="?" if name == "export" else None, default="-", help="- for stdin/stdout; .gz compresses"
        )
        command.add_argument("--store", help="SQLAlchemy URL of the gallery store (default: the service's, from OCELLUS_*)")
        command.add_argument("--gallery", action="append", default=[], help="only this gallery (repeat for several)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when done, 1 when an import skipped subjects (listed), 2 for a bad file or store."""
    args = parse_args(argv)
    url = args.store or default_store_url()
    if url.startswith("sqlite:///") and args.command == "export" and not Path(url.removeprefix("sqlite:///")).is_file():
        print(f"ocellus-gallery: no gallery store at {url}", file=sys.stderr)
        return 2
    store = GalleryStore(url)
    try:
        with open_text(args.file, "w" if args.command == "export" else "r") as stream:
            if args.command == "export":
                counts = write_export(export_records(store, args.gallery), stream)
                print(json.dumps(counts), file=sys.stderr)
                return 0
            report = import_export(store, read_export(stream), args.gallery)
    except (BadExport, OSError, SQLAlchemyError) as error:
        print(f"ocellus-gallery: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(json.dumps(asdict(report), indent=2))
    return 1 if report.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
