"""Back up, restore and move face galleries: ``python -m service.gallery.backup export|import`` (``ocellus-gallery``).

An export is JSON lines: a header, then each subject followed by its faces, each face with its embedding, the
model and version that made it and the face region kept at enrollment, and last an end record with the counts,
so that a file cut short is told from a whole one. Importing it into a store, SQLite or PostgreSQL, keeps every
id and time, so clients holding subject or face ids find the same gallery, and an enrollment's photo still
re-embeds for a later model. Each imported face is an "add" in the change log: replicas running on that store
pick it up within a sync interval. Importing a file again adds only what is missing, so an interrupted import
is simply rerun.

Both work on the store itself (by default the one the service uses: ``OCELLUS_GALLERY_URL``, else SQLite under
``OCELLUS_DATA_DIR``) and may run beside the service: an export is one read statement, a consistent snapshot;
an import writes in transactions under the store's write lock, as enrollments do.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, cast

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from sqlalchemy import Connection, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from service import program_name
from service.gallery import GALLERY_NAME
from service.gallery.names import FORBIDDEN_IN_NAMES, MAX_NAME
from service.gallery.store import (
    ID_PATTERN,
    FacePhoto,
    GalleryStore,
    NewFace,
    face_photos,
    faces,
    sqlite_file,
    sqlite_url,
    subjects,
)
from service.image_guards import check_structure
from service.tasks.faces import PHOTO_SIDE

FORMAT = "ocellus-gallery"
# 2: the end record is required (version 1, the first release's, wrote none: its files import, unchecked for an end).
FORMAT_VERSION = 2
BATCH_FACES = 1000  # faces written per transaction on import (and rows read per round trip on export)
UNIT_TOLERANCE = 1e-3  # an embedding's length may differ from 1 by this much (float32 rounding, and no more)
GZIP_MAGIC = b"\x1f\x8b"
JPEG_MAGIC = b"\xff\xd8\xff"
MAX_KEPT_PIXELS = (4 * PHOTO_SIDE) ** 2  # kept regions are PHOTO_SIDE a side at most; room to spare for older ones

Id = Annotated[str, Field(pattern=ID_PATTERN)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Box = Annotated[list[Finite], Field(min_length=4, max_length=4)]


def already_checked(info: ValidationInfo) -> bool:
    """Whether the file was read whole and checked already: the import's second reading skips the costly checks."""
    return bool(info.context and info.context.get("checked"))


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
    name: str
    created_at: Finite

    @field_validator("name")
    @classmethod
    def _a_name_the_api_takes(cls, value: str, info: ValidationInfo) -> str:
        # What the store holds and the API can return; not today's stricter rules for new names (a letter or digit, no
        # invisible format characters): names enrolled before them are kept, and a backup must restore them.
        if not 1 <= len(value) <= MAX_NAME or any(unicodedata.category(c) in FORBIDDEN_IN_NAMES for c in value):
            raise ValueError(f"a name of 1 to {MAX_NAME} characters without control characters or line breaks")
        return value


class Photo(Record):
    jpeg: str  # base64
    box: Box
    whole: bool

    @model_validator(mode="after")
    def _a_jpeg_holding_its_box(self, info: ValidationInfo) -> Photo:
        """What re-embedding will read: a whole JPEG, and the face's box inside it."""
        if already_checked(info):
            return self
        data = base64.b64decode(self.jpeg, validate=True)  # binascii.Error is a ValueError too
        if not data.startswith(JPEG_MAGIC):
            raise ValueError("not a JPEG: enrollment photos are kept as JPEG")
        try:
            check_structure(data)  # a crafted JPEG of a million comments: seconds of Python
            with Image.open(io.BytesIO(data)) as photo:
                width, height = photo.size
                if width * height > MAX_KEPT_PIXELS:  # before decoding: a crafted line could ask for gigabytes
                    raise ValueError(f"{width}x{height} is larger than any kept face region")
                photo.load()  # every pixel: verify() reads the headers alone and passed a JPEG cut short
        except Exception as error:  # Pillow raises many kinds for a damaged file
            raise ValueError(f"a damaged JPEG ({error})") from None
        x1, y1, x2, y2 = self.box
        # A pixel of slack: earlier versions scaled a whole-photo box by the unrounded ratio (213.33 in 213 px).
        if not (0 <= x1 < x2 <= width + 1 and 0 <= y1 < y2 <= height + 1):
            raise ValueError(f"the face box {self.box} is not inside the {width}x{height} photo")
        return self


class Face(Record):
    id: Id
    subject_id: Id
    model: str = Field(min_length=1, max_length=200)
    model_version: str = Field(min_length=1, max_length=100)
    embedding: list[Finite] = Field(min_length=1, max_length=8192)
    box: Box
    created_at: Finite
    photo: Photo | None

    @field_validator("embedding")
    @classmethod
    def _unit_length(cls, value: list[float], info: ValidationInfo) -> list[float]:
        if already_checked(info):
            return value
        with np.errstate(over="ignore"):
            norm = float(np.linalg.norm(np.asarray(value, np.float32)))
        if not abs(norm - 1) <= UNIT_TOLERANCE:  # also inf and nan: 1e300 is finite, but not as float32
            raise ValueError(f"an embedding of length {norm:g}: the service stores them L2-normalised")
        return value


class End(Record):
    subjects: int
    faces: int


KINDS: dict[str, type[Record]] = {"header": Header, "subject": Subject, "face": Face, "end": End}


class BadExport(ValueError):
    """The file is not an export, or line ``line`` is not a record of one."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")


# -- export ---------------------------------------------------------------------------------------


def export_records(store: GalleryStore, galleries: Sequence[str] = ()) -> Iterator[Record]:
    """The header, every subject of ``galleries`` (all when empty) followed by its faces, and the end record."""
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
    counts = {"subjects": 0, "faces": 0}
    with store.engine.connect() as connection, connection.begin():
        if store.dialect == "postgresql":  # the store's limits are for requests: an export may run (and wait on its reader) long
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
        current = None
        for row in connection.execution_options(stream_results=True, yield_per=BATCH_FACES).execute(query):
            if row.subject_id != current:
                current = row.subject_id
                counts["subjects"] += 1
                # Read from the store: written as they are, not validated again (one odd row must not stop a backup).
                yield Subject.model_construct(
                    id=row.subject_id, gallery=row.gallery, name=row.name, created_at=row.subject_created
                )
            if row.face_id is None:  # a subject whose faces were all deleted
                continue
            photo = None
            if row.image is not None:
                photo = Photo.model_construct(
                    jpeg=base64.b64encode(row.image).decode(), box=json.loads(row.photo_box), whole=row.whole
                )
            counts["faces"] += 1
            yield Face.model_construct(  # read from the store: not validated again
                id=row.face_id,
                subject_id=row.subject_id,
                model=row.model,
                model_version=row.model_version,
                embedding=np.frombuffer(row.embedding, np.float32).tolist(),  # a float32 prints as the double it is
                box=json.loads(row.box),
                created_at=row.face_created,
                photo=photo,
            )
    yield End(**counts)


def write_export(records: Iterable[Record], out: IO[str]) -> dict[str, int]:
    last: Record | None = None
    for last in records:
        out.write(json.dumps({record_kind(last): last.model_dump()}, separators=(",", ":")) + "\n")
    assert isinstance(last, End)
    return last.model_dump()


def record_kind(record: Record) -> str:
    return next(kind for kind, cls in KINDS.items() if isinstance(record, cls))


def unknown_galleries(store: GalleryStore, galleries: Sequence[str]) -> list[str]:
    held = {name for name, *_ in store.galleries()}
    return [name for name in galleries if name not in held]


# -- import ---------------------------------------------------------------------------------------


def read_export(lines: Iterable[str], checked: bool = False) -> Iterator[tuple[Subject, list[Face]]]:
    """Each subject of an export with its faces; ``BadExport`` at the first line that is not what it should be,
    and at the end when the end record is missing or its counts differ (a file cut short)."""
    subject: Subject | None = None
    own: list[Face] = []
    counts = {"subjects": 0, "faces": 0}
    lengths: dict[tuple[str, str], int] = {}  # (model, version) -> its embeddings' length
    seen: set[tuple[type, str]] = set()  # subject and face ids so far: one twice would merge two records silently
    number, ended, version = 0, False, FORMAT_VERSION
    for number, line in enumerate(lines, 1):
        if number > 1 and not line.strip():
            continue
        if number == 1:
            version = read_header(line)
            continue
        record = parse_line(number, line, checked)
        if ended:
            raise BadExport(number, "a record after the end record: two exports joined together?")
        if not checked and isinstance(record, Subject | Face):  # the second reading: checked on the first
            if (type(record), record.id) in seen:
                raise BadExport(number, f"{record_kind(record)} {record.id} a second time: two exports joined together?")
            seen.add((type(record), record.id))
        if isinstance(record, Subject):
            if subject is not None:
                yield subject, own
            subject, own = record, []
            counts["subjects"] += 1
        elif isinstance(record, Face):
            if subject is None or record.subject_id != subject.id:
                raise BadExport(number, f"face {record.id} does not follow its subject {record.subject_id}")
            length = lengths.setdefault((record.model, record.model_version), len(record.embedding))
            if len(record.embedding) != length:
                raise BadExport(number, f"an embedding of {len(record.embedding)} numbers; this model's others hold {length}")
            own.append(record)
            counts["faces"] += 1
        elif isinstance(record, End):
            if record.model_dump() != counts:
                raise BadExport(number, f"the end record counts {record.model_dump()}, the file holds {counts}")
            ended = True
        else:
            raise BadExport(number, "a second header: two exports joined together?")
    if number == 0:
        raise BadExport(1, "the file is empty")
    if not ended and version >= 2:  # the first release wrote no end record: its whole files must import
        raise BadExport(
            number,
            "the file ends without its end record: an export cut short (what came before may be "
            "imported; importing a whole export adds the rest)",
        )
    if subject is not None:
        yield subject, own


def read_header(line: str) -> int:
    """The export's format version, once its header is known to be one this service reads."""
    if not line:
        raise BadExport(1, "the file is empty")
    if not line.startswith('{"header":'):
        raise BadExport(1, f"not an {FORMAT} export (made by `ocellus-gallery export`)")
    header = parse_line(1, line)
    if not isinstance(header, Header) or header.format != FORMAT:
        raise BadExport(1, f"not an {FORMAT} export (made by `ocellus-gallery export`)")
    if not 1 <= header.version <= FORMAT_VERSION:
        raise BadExport(1, f"format version {header.version}; this version of the service reads 1 to {FORMAT_VERSION}")
    return header.version


def parse_line(number: int, line: str, checked: bool = False) -> Record:
    try:
        value = json.loads(line)
    except ValueError as error:
        raise BadExport(number, f"not JSON ({error}); cut short?") from None
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        raise BadExport(number, f"expected one of {sorted(KINDS)} as the only key")
    [(kind, body)] = value.items()
    try:
        return KINDS[kind].model_validate(body, context={"checked": checked})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadExport(number, f"{kind}.{where}: {first['msg']}") from None


@dataclass
class ImportReport:
    store: str  # where it went (without a password)
    subjects_added: int = 0
    faces_added: int = 0
    subjects_there: int = 0  # already in the store (an import run again)
    faces_there: int = 0
    skipped: list[str] = field(default_factory=list)  # subjects and faces left out, and why


def import_export(
    store: GalleryStore, people: Iterable[tuple[Subject, list[Face]]], galleries: Sequence[str] = ()
) -> ImportReport:
    """Write what the store lacks of ``people`` (those of ``galleries`` only, when given)."""
    report = ImportReport(make_url(store.url).render_as_string(hide_password=True))
    lengths = stored_lengths(store)
    batch: list[tuple[Subject, list[Face]]] = []
    size = 0
    for subject, own in people:
        if galleries and subject.gallery not in galleries:
            continue
        batch.append((subject, own))
        size += 1 + len(own)
        if size >= BATCH_FACES:
            write_batch(store, batch, lengths, report)
            batch, size = [], 0
    if batch:
        write_batch(store, batch, lengths, report)
    return report


def stored_lengths(store: GalleryStore) -> dict[tuple[str, str], int]:
    """The embedding length of the faces each (model, version) made, in the store now."""
    with store.engine.connect() as connection:
        made_by = (faces.c.model, faces.c.model_version)
        rows = connection.execute(select(*made_by, func.max(faces.c.dim)).group_by(*made_by))
        return {(model, version): int(dim) for model, version, dim in rows}


def write_batch(
    store: GalleryStore, batch: list[tuple[Subject, list[Face]]], lengths: dict[tuple[str, str], int], report: ImportReport
) -> None:
    """One transaction; what it finds in the store decides, under the write lock, what is added or skipped."""
    with store.write() as connection:
        held, named, face_holders = stored_state(connection, batch)
        new_subjects: list[dict[str, object]] = []
        new_faces: list[tuple[str, str, NewFace, float, str | None]] = []
        for subject, own in batch:
            refusal = subject_refusal(subject, held, named)
            if refusal is not None:
                report.skipped.append(refusal)
                continue
            adding = []
            for face in own:
                holder = face_holders.get(face.id)
                length = lengths.setdefault((face.model, face.model_version), len(face.embedding))
                if holder == subject.id:
                    report.faces_there += 1
                elif holder is not None:
                    report.skipped.append(f"face {face.id} of subject {subject.id}: the store has it under subject {holder}")
                elif len(face.embedding) != length:
                    report.skipped.append(
                        f"face {face.id}: {len(face.embedding)} numbers, where the store's faces of "
                        f"{face.model} {face.model_version} hold {length}"
                    )
                else:
                    adding.append(face)
            if subject.id in held:
                report.subjects_there += 1
            elif own and not adding:  # a subject is not made without the faces it came with
                report.skipped.append(f"subject {subject.id} ({subject.name!r}): none of its faces could be imported")
                continue
            else:
                new_subjects.append(subject.model_dump())
                held[subject.id], named[(subject.gallery, subject.name)] = (subject.gallery, subject.name), subject.id
                report.subjects_added += 1
            for face in adding:
                new_faces.append((subject.gallery, subject.id, new_face(face), face.created_at, face.id))
                face_holders[face.id] = subject.id
                report.faces_added += 1
        if new_subjects:
            connection.execute(subjects.insert(), new_subjects)
        store.insert_faces(connection, new_faces)


def subject_refusal(subject: Subject, held: dict[str, tuple[str, str]], named: dict[tuple[str, str], str]) -> str | None:
    """Why ``subject`` cannot be imported, if it cannot. A subject the store has in the same gallery is the same one,
    renamed or not since the export: its missing faces are added to it, and it keeps the name it has now."""
    if subject.id in held:
        gallery = held[subject.id][0]
        return None if gallery == subject.gallery else f"subject {subject.id}: the store has that id in gallery {gallery!r}"
    holder = named.get((subject.gallery, subject.name))
    if holder is not None:
        return (
            f"subject {subject.id}: {subject.gallery!r} already has a subject named {subject.name!r} (id {holder}); "
            "rename one of them and import again"
        )
    return None


def stored_state(
    connection: Connection, batch: list[tuple[Subject, list[Face]]]
) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, str], str], dict[str, str]]:
    """Of the batch's subjects and faces, what the store has: subject id -> (gallery, name), the subject holding
    each of their names, and face id -> the subject holding it."""
    ids = [subject.id for subject, _ in batch]
    names = {subject.name for subject, _ in batch}
    columns = (subjects.c.id, subjects.c.gallery, subjects.c.name)
    held = {r.id: (r.gallery, r.name) for r in connection.execute(select(*columns).where(subjects.c.id.in_(ids)))}
    named = {(r.gallery, r.name): r.id for r in connection.execute(select(*columns).where(subjects.c.name.in_(names)))}
    face_ids = [face.id for _, own in batch for face in own]
    holders: dict[str, str] = {}
    if face_ids:
        query = select(faces.c.id, faces.c.subject_id).where(faces.c.id.in_(face_ids))
        holders = {r.id: r.subject_id for r in connection.execute(query)}
    return held, named, holders


def new_face(face: Face) -> NewFace:
    photo = None
    if face.photo is not None:
        box = face.photo.box
        photo = FacePhoto(base64.b64decode(face.photo.jpeg), (box[0], box[1], box[2], box[3]), face.photo.whole)
    vector = np.asarray(face.embedding, np.float32)
    return NewFace(vector, face.model, face.model_version, (face.box[0], face.box[1], face.box[2], face.box[3]), photo)


# -- files ----------------------------------------------------------------------------------------


def open_input(path: str) -> IO[str]:
    """The file as text, gunzipped when it is gzip (by its first bytes, whatever its name)."""
    with open(path, "rb") as raw:
        zipped = raw.read(2) == GZIP_MAGIC
    return cast(IO[str], gzip.open(path, "rt", encoding="utf-8")) if zipped else open(path, encoding="utf-8")


@contextlib.contextmanager
def output_file(path: str) -> Iterator[IO[str]]:
    """``-``: stdout. Else a file written aside and put in place only when whole, so that a failed export leaves
    the previous one as it was; a name ending in ``.gz`` is compressed."""
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    # One partial file per run (two overlapping exports, cron's, wrote into one and put a mix of both in place); its
    # mode is mkstemp's 0600: the embeddings are biometric data.
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    try:
        with gzip.open(partial, "wt", encoding="utf-8") if path.endswith(".gz") else open(partial, "w", encoding="utf-8") as out:
            yield out
        with open(partial, "rb") as written:  # on disk before it replaces the last good export
            os.fsync(written.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


# -- command line ---------------------------------------------------------------------------------


def default_store_url() -> str:
    from service.settings import Settings, settings_problems  # the service's own (read only when no --store is given)

    try:
        settings = Settings()
    except ValidationError as error:
        raise Refused(settings_problems(error)) from None
    except ValueError as error:  # a .env that is not UTF-8 text
        raise Refused(str(error)) from None
    return settings.gallery_url or sqlite_url(settings.data_dir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("service.gallery.backup"), description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in (
        ("export", "write galleries to a JSON-lines file (or stdout)"),
        ("import", "add an export's subjects and faces to the store (what it has already is left as it is)"),
    ):
        command = commands.add_parser(name, help=about, description=about)
        where = "- for stdin/stdout; an export named .gz is compressed (import reads gzip whatever its name)"
        command.add_argument("file", nargs="?" if name == "export" else None, default="-", help=where)
        command.add_argument("--store", help="SQLAlchemy URL of the gallery store (default: the service's, from OCELLUS_*)")
        command.add_argument("--gallery", action="append", default=[], help="only this gallery (repeat for several)")
    return parser.parse_args(argv)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Refused(Exception):
    """A reason to stop before doing anything (exit 2)."""


# ValueError: BadExport, and text that is not UTF-8; OSError: a file missing, or not gzip after all; ImportError: a
# --store URL naming a driver that is not installed.
BAD_FILE_OR_STORE = (
    Refused,
    ValueError,
    OSError,
    EOFError,
    RecursionError,
    zlib.error,
    binascii.Error,
    SQLAlchemyError,
    ImportError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when done, 1 when an import left subjects or faces out (listed), 2 for a bad file or store,
    130 when interrupted."""
    # SIGTERM and SIGHUP end it as Ctrl-C does: the temporary copy of stdin and a partial export are removed.
    previous = {stop: signal.signal(stop, _interrupted) for stop in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return run(parse_args(argv))
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def run(args: argparse.Namespace) -> int:
    store = None
    try:
        url = args.store or default_store_url()
        missing = (store_file := sqlite_file(url)) is not None and not store_file.is_file()
        if missing and (args.command == "export" or not args.store):  # import creates a store only where told to
            raise Refused(f"no gallery store at {url}" + ("" if args.store else " (give --store to make one)"))
        store = GalleryStore(url)
        if args.command == "export":
            unknown = unknown_galleries(store, args.gallery)
            if unknown:
                raise Refused(f"no gallery {unknown[0]!r} in the store (names are case-sensitive)")
            with output_file(args.file) as out:
                counts = write_export(export_records(store, args.gallery), out)
            print(json.dumps(counts), file=sys.stderr)
            return 0
        with spooled(args.file) as path:  # stdin is kept in a file first: a stream cut short is refused whole too
            stamp = file_stamp(path)
            held = check_whole(path)
            if absent := [name for name in args.gallery or () if name not in held]:  # a typo imported nothing, exit 0
                raise Refused(f"no gallery {absent[0]!r} in {args.file} (it holds {sorted(held)}; names are case-sensitive)")
            with open_input(path) as stream:  # read again to write, the costly checks done: unless it changed since
                if file_stamp(path) != stamp:
                    raise Refused(f"{path} changed while it was checked: import it again once it stays as it is")
                report = import_export(store, read_export(stream, checked=True), args.gallery)
    except KeyboardInterrupt:  # an export's previous FILE stays; an import is rerun (it adds only what is missing)
        print(f"{program_name('service.gallery.backup')}: interrupted", file=sys.stderr)
        return 130
    except BAD_FILE_OR_STORE as error:
        print(f"{program_name('service.gallery.backup')}: {error}", file=sys.stderr)
        return 2
    finally:
        if store is not None:
            store.close()
    print(json.dumps(asdict(report), indent=2))
    return 1 if report.skipped else 0


@contextlib.contextmanager
def spooled(path: str) -> Iterator[str]:
    """``path``, or for ``-`` (stdin) and pipes a temporary file holding what they give (removed afterwards), since
    the file is read twice."""
    if path != "-" and Path(path).is_file():
        yield path
        return
    with (
        tempfile.NamedTemporaryFile(prefix="ocellus-import-", suffix=".jsonl") as copy,
        contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb") as source,
    ):
        shutil.copyfileobj(source, copy, 1 << 20)
        copy.flush()
        yield copy.name


def file_stamp(path: str) -> tuple[int, int, int]:
    found = os.stat(path)
    return found.st_ino, found.st_size, found.st_mtime_ns


def check_whole(path: str) -> set[str]:
    """Read the whole file once before writing any of it: a damaged line anywhere, or a file cut short, refuses it
    whole (about half the time an import takes). The galleries it holds."""
    with open_input(path) as stream:
        return {subject.gallery for subject, _ in read_export(stream)}


if __name__ == "__main__":
    sys.exit(main())
