"""The gallery store: subjects, their face embeddings and a change log, in SQLite or PostgreSQL.

SQLAlchemy Core over these tables:

- ``subjects``: ``id`` (uuid hex), ``gallery``, ``name`` (unique per gallery), ``created_at``;
- ``faces``: ``id``, ``subject_id``, ``gallery``, the ``model`` name and ``model_version`` that made
  the ``embedding`` (float32 bytes, L2-normalised), the face ``box`` in the enrolled photo, ``created_at``;
- ``face_photos`` (the face region kept for re-embedding) and ``face_uploads`` (a digest of the upload), one row
  per face at most;
- ``changes``: an append-only log, ``seq`` increasing, one row per face added or removed and per
  subject renamed.

Every write is one transaction that also appends its ``changes`` rows, so a replica that has
applied the log up to ``seq`` knows exactly what to add or drop to be current
(:meth:`GalleryStore.changes_since`). On PostgreSQL, write transactions take one advisory lock
first: sequence numbers are then committed in order, and a reader can never see ``seq`` 11
before a still-running transaction commits ``seq`` 10 (which it would then skip forever).
On SQLite, write transactions begin with ``BEGIN IMMEDIATE``: they hold the database's one write
lock from their first statement, so the check a write makes (the subject still exists) and the
write itself are one serialised step (pysqlite alone would begin only at the first INSERT/DELETE,
after the check). A write is acknowledged only after its commit, and SQLite runs with
``synchronous=FULL`` in WAL mode, so an acknowledged enrollment survives a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.util import asbool

metadata = MetaData()

subjects = Table(
    "subjects",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("gallery", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", Double, nullable=False),
    UniqueConstraint("gallery", "name", name="uq_subject_name"),
    Index("ix_subjects_gallery_created", "gallery", "created_at", "id"),  # pages in listing order
)

faces = Table(
    "faces",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("subject_id", String(32), ForeignKey("subjects.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("gallery", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("model_version", String(100), nullable=False),
    Column("dim", Integer, nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    Column("box", Text, nullable=False),  # JSON [x1, y1, x2, y2] in the enrolled photo
    Column("created_at", Double, nullable=False),
    Index("ix_faces_gallery_model", "gallery", "model", "model_version"),
)

# The photo region each face was enrolled from (JPEG), so a new embedder can re-embed it.
face_photos = Table(
    "face_photos",
    metadata,
    Column("face_id", String(32), ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    Column("image", LargeBinary, nullable=False),
    Column("box", Text, nullable=False),  # JSON [x1, y1, x2, y2]: the face in that image
    Column("whole", Boolean, nullable=False),  # the whole upload was the face (no detection, no margin)
)

# A digest of the upload each face came from: the same photo sent again is known after a re-embedding (made from
# the kept region, shrunk to 256 px, the face no longer reaches SAME_FACE against the full photo).
face_uploads = Table(
    "face_uploads",
    metadata,
    Column("face_id", String(32), ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True),
    Column("digest", String(64), nullable=False),  # read with the subject's faces (by face_id): no index of its own
)

changes = Table(
    "changes",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("gallery", String(64), nullable=False),
    Column("op", String(8), nullable=False),  # "add" | "remove" | "rename" (face_id "")
    Column("face_id", String(32), nullable=False),
    Column("subject_id", String(32), nullable=False),
    Column("at", Double, nullable=False),
)

SCHEMA_LOCK_KEY = 0x6F63656C6C7573  # 'ocellus'
WRITE_LOCK_KEY = 0x0CE11A5  # the PostgreSQL advisory lock that orders gallery writes
WRITE_OPTION = "ocellus_gallery_write"  # execution option that marks a write transaction


class NotFound(LookupError):
    pass


class DuplicateName(ValueError):
    def __init__(self, gallery: str, name: str, holder: str) -> None:
        super().__init__(f"gallery {gallery!r} already has a subject named {name!r} (id {holder})")
        self.holder = holder  # the subject that has the name


class DuplicateFace(ValueError):
    def __init__(self, subject_id: str, face_id: str) -> None:
        super().__init__(f"subject {subject_id} already has this face (face {face_id}): the same photo, enrolled before")
        self.face_id = face_id


class SimilarFace(ValueError):
    """A face logged after the caller's search (which could not see it) matches the new one."""

    def __init__(self, subject_id: str, similarity: float) -> None:
        super().__init__(f"the face matches subject {subject_id}, enrolled meanwhile (similarity {similarity:.3f})")
        self.subject_id, self.similarity = subject_id, similarity


# Cosine of the same photo embedded again: alone and in a batch it measured 1 - 1.2e-7, while two different photos of
# one person reached 0.940 (LFW) and two consecutive AT&T shots 0.978 at most (/tmp/sameface.py).
SAME_FACE = 0.9995


@dataclass(frozen=True)
class FacePhoto:
    """The region of the upload a face was enrolled from, kept for re-embedding by a later model."""

    image: bytes  # JPEG
    box: tuple[float, float, float, float]  # the face in ``image``
    whole: bool  # the upload itself was the face crop


@dataclass(frozen=True)
class NewFace:
    """A face to enroll: its embedding and where it came from."""

    embedding: np.ndarray  # [D] float32, L2-normalised
    model: str
    model_version: str
    box: tuple[float, float, float, float]
    photo: FacePhoto | None = None
    upload_digest: str | None = None  # sha256 of the upload (and how its face was found): a resend is then known


@dataclass(frozen=True)
class StaleFace:
    """An enrolled face whose embedding another model made, with the photo kept at its enrollment."""

    id: str
    subject_id: str
    photo: FacePhoto


@dataclass
class FaceRecord:
    id: str
    subject_id: str
    model: str
    model_version: str
    box: list[float]
    created_at: float


@dataclass
class SubjectRecord:
    id: str
    gallery: str
    name: str
    created_at: float
    face_count: int = 0
    faces: list[FaceRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Change:
    seq: int
    gallery: str
    op: str
    face_id: str
    subject_id: str
    subject_name: str | None = None  # for "add" and "rename": the subject's name now (None: deleted since)
    model: str | None = None
    model_version: str | None = None
    embedding: np.ndarray | None = None


ID_PATTERN = r"^[0-9a-f]{32}$"  # what new_id() makes: subject and face ids


def new_id() -> str:
    return uuid.uuid4().hex


def _first_match(rows: Sequence[Any], embedding: np.ndarray, threshold: float) -> tuple[Any, float] | None:
    """The first stored row (``.embedding`` bytes) of ``embedding``'s length whose cosine with it is >= ``threshold``."""
    vector = np.asarray(embedding, dtype=np.float32)
    for row in rows:
        stored = np.frombuffer(row.embedding, dtype=np.float32)
        if stored.shape == vector.shape and (similarity := float(stored @ vector)) >= threshold:
            return row, similarity
    return None


CHANGES_BATCH = 10_000  # change-log rows a replica reads at a time


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'gallery.sqlite3').resolve()}"


def sqlite_file(url: str) -> Path | None:
    """The database file a SQLite URL names, as SQLAlchemy reads it (query strings, %-escapes); None for another
    database, an in-memory one (``sqlite://``) or a ``file:`` URI, which SQLite resolves itself."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") and asbool(parsed.query.get("uri", False)):
        return None
    return Path(database)  # as pysqlite opens it, 'file:x.db' without uri=true too


SQLITE_WAL_LIMIT = 16 * 1024 * 1024  # bytes of -wal file kept after a checkpoint
RECLAIM_PAGES = 8192  # free pages given back per reclaim_space call (32 MB of 4 KB pages: a short write lock)
# Free pages left in the file: each minute's prune of the change log frees a few that new changes take again, which
# would otherwise be given back and regrown every minute (a write transaction each time).
RECLAIM_SLACK = 256
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for incremental


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # no implicit BEGINs: _sqlite_begin issues them
    cursor = dbapi_connection.cursor()
    # Before anything writes a new file's header (WAL mode does): deleted faces' pages can then be given back to the
    # file system (reclaim_space). A store made before this keeps SQLite's default: its file never shrinks. Only on an
    # empty file: on one made with auto-vacuum the pragma is a write (it took the write lock at every connect, and
    # failed on a read-only store).
    if not cursor.execute("PRAGMA page_count").fetchone()[0]:
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (and vice versa)
    cursor.execute("PRAGMA synchronous=FULL")  # fsync at every commit: an acknowledged write survives power loss
    cursor.execute("PRAGMA foreign_keys=ON")  # (the busy timeout is the connection's timeout= argument: timeout_s)
    # A long reader (an export, a snapshot load) stops checkpoints from restarting the WAL, which then grows with every
    # write meanwhile and kept that size for good (129 MB after 2,000 enrollments); the limit truncates it at the next reset.
    cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT}")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    """Writes take the write lock at once (reads see one consistent snapshot either way)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITE_OPTION) else "BEGIN")


class GalleryStore:
    """Synchronous store operations (call them from worker threads)."""

    def __init__(self, url: str, create_schema: bool = True, timeout_s: float = 10.0, max_connections: int = 16) -> None:
        """``create_schema=False`` connects nothing yet (the service creates the tables in ``ensure_schema``
        when the store first answers, so an unreachable database does not stop its start-up).

        ``timeout_s`` bounds the waits the database can enforce: connecting, a free pooled connection, a
        lock (SQLite's busy timeout; PostgreSQL's lock_timeout, which also bounds the write lock). A server
        that stops answering altogether is the replica's to give up on (``GalleryReplica.store_call``).

        ``max_connections``: the most this process holds (half pooled, half overflow); the replica runs at most
        as many store calls at once.
        """
        self.url = url
        self.max_connections = max_connections
        self.dialect = url.split(":", 1)[0].split("+", 1)[0]
        if self.dialect not in ("sqlite", "postgresql"):  # the change log's order rests on their write locks
            raise ValueError(f"the gallery store is sqlite: or postgresql:, not {self.dialect}:")
        if self.dialect == "sqlite":
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": timeout_s}, hide_parameters=True
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            ms = round(timeout_s * 1000)
            server_limits = [
                f"lock_timeout={ms}",
                f"statement_timeout={6 * ms}",  # an abandoned statement does not run (and hold locks) for ever
                f"idle_in_transaction_session_timeout={6 * ms}",  # nor does a replica paused mid-transaction
            ]
            connect_args = {
                "connect_timeout": max(1, round(timeout_s)),
                "options": " ".join(f"-c {limit}" for limit in server_limits),
                "keepalives": 1,  # a dead peer (a partition) is noticed in about 20 s
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 2,
            }
            self.engine = create_engine(
                url,
                hide_parameters=True,  # a failed statement's error (logged) would carry names, ids, boxes
                pool_pre_ping=True,
                pool_size=max_connections // 2,
                max_overflow=max_connections - max_connections // 2,
                pool_timeout=timeout_s,
                connect_args=connect_args,
            )
        if create_schema:
            self.ensure_schema()

    def ensure_schema(self) -> None:
        """Create the tables that do not exist yet. Replicas starting together on an empty PostgreSQL take turns
        (an advisory lock): concurrent CREATE TABLEs otherwise fail on PostgreSQL's catalog. A SQLite file's folder is
        made here, not at construction: one the service may not write is then a store that does not answer yet
        (gallery calls 503, retried in the background), not a start-up that fails."""
        path = sqlite_file(self.url)
        if path is not None:
            # Owner-only, as the backups are: embeddings and kept face photos are biometric data (SQLite made the file
            # 0644 under the usual umask, and its -wal and -shm files take the file's mode). A store made earlier, or a
            # folder made by someone else, keeps its mode: that is the operator's choice.
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # an empty file: a new database
        with self.engine.connect() as connection, connection.begin():
            if self.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            metadata.create_all(connection)
            for index in subjects.indexes:  # a store made by an earlier version has the tables but not a newer index
                index.create(connection, checkfirst=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, holding the store's write lock (see the module's docstring)."""
        with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as connection, connection.begin():
            if self.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
            yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction whose statements all see one snapshot, for answers that add up several counts: REPEATABLE
        READ on PostgreSQL (under its READ COMMITTED each statement saw the commits made before it began); a SQLite read
        transaction is one snapshot already."""
        with self.engine.connect() as connection:
            if self.dialect == "postgresql":
                connection.execution_options(isolation_level="REPEATABLE READ")  # this checkout only: reset on return
            with connection.begin():
                yield connection

    # -- writes ---------------------------------------------------------------------------------

    def insert_face(
        self, connection: Connection, gallery: str, subject_id: str, face: NewFace, now: float, face_id: str | None = None
    ) -> FaceRecord:
        """Within a ``write()`` transaction: the face's rows and its "add" in the log (a restored face keeps its id)."""
        return self.insert_faces(connection, [(gallery, subject_id, face, now, face_id)])[0]

    @staticmethod
    def insert_faces(connection: Connection, new: Sequence[tuple[str, str, NewFace, float, str | None]]) -> list[FaceRecord]:
        """``insert_face`` for many (gallery, subject id, face, time, id or None) in three statements, not three each."""
        records, face_rows, photo_rows, upload_rows, change_rows, now = [], [], [], [], [], time.time()
        for gallery, subject_id, face, created_at, face_id in new:
            box = [round(float(v), 2) for v in face.box]
            record = FaceRecord(face_id or new_id(), subject_id, face.model, face.model_version, box, created_at)
            vector = np.ascontiguousarray(face.embedding, dtype=np.float32)
            face_rows.append(
                {
                    "id": record.id,
                    "subject_id": subject_id,
                    "gallery": gallery,
                    "model": face.model,
                    "model_version": face.model_version,
                    "dim": int(vector.shape[0]),
                    "embedding": vector.tobytes(),
                    "box": json.dumps(box),
                    "created_at": created_at,
                }
            )
            if face.photo is not None:
                photo_box = json.dumps([round(float(v), 2) for v in face.photo.box])
                photo_rows.append({"face_id": record.id, "image": face.photo.image, "box": photo_box, "whole": face.photo.whole})
            if face.upload_digest is not None:
                upload_rows.append({"face_id": record.id, "digest": face.upload_digest})
            change_rows.append({"gallery": gallery, "op": "add", "face_id": record.id, "subject_id": subject_id, "at": now})
            records.append(record)
        for table, rows in ((faces, face_rows), (face_photos, photo_rows), (face_uploads, upload_rows), (changes, change_rows)):
            if rows:
                connection.execute(table.insert(), rows)
        return records

    def replace_embeddings(self, gallery: str, model: str, version: str, updates: list[tuple[str, np.ndarray]]) -> int:
        """Give faces (by id) new embeddings from another model; the log gets a removal and an addition
        for each, so every replica moves them to the new model's index. Returns how many were found."""
        done = 0
        with self.write() as connection:
            now = time.time()
            for face_id, embedding in updates:
                vector = np.ascontiguousarray(embedding, dtype=np.float32)
                subject_id = connection.execute(
                    select(faces.c.subject_id).where(faces.c.id == face_id, faces.c.gallery == gallery)
                ).scalar_one_or_none()
                if subject_id is None:
                    continue  # deleted meanwhile
                connection.execute(
                    faces.update()
                    .where(faces.c.id == face_id)
                    .values(model=model, model_version=version, dim=int(vector.shape[0]), embedding=vector.tobytes())
                )
                connection.execute(
                    changes.insert(),
                    [
                        {"gallery": gallery, "op": op, "face_id": face_id, "subject_id": subject_id, "at": now}
                        for op in ("remove", "add")
                    ],
                )
                done += 1
        return done

    def create_subject(
        self, gallery: str, name: str, face: NewFace, unmatched_since: tuple[int, float] | None = None
    ) -> SubjectRecord:
        """``unmatched_since=(seq, threshold)``: refuse (SimilarFace) when a face logged after ``seq``, which the
        caller's duplicate search could not see, matches at ``threshold``; checked in the write lock, so two
        enrollments of one person at once (on any replicas) cannot both pass their search."""
        subject = SubjectRecord(new_id(), gallery, name, 0.0, face_count=1)
        with self._unique_name(gallery, name, subject.id), self.write() as connection:
            # Taken in the write lock: subjects are listed (and paged by cursor) in this order, which is then the commits'.
            subject.created_at = now = time.time()
            if unmatched_since is not None:
                # The name first: a resend whose first answer was lost is a duplicate name (the enroll tool then adds
                # to that subject), not a refused face.
                if (holder := self._subject_id_by_name(connection, gallery, name)) is not None:
                    raise DuplicateName(gallery, name, holder)
                self._refuse_similar(connection, gallery, face, *unmatched_since)
            connection.execute(subjects.insert().values(id=subject.id, gallery=gallery, name=name, created_at=now))
            subject.faces.append(self.insert_face(connection, gallery, subject.id, face, now))
        return subject

    @staticmethod
    def _refuse_similar(connection: Connection, gallery: str, face: NewFace, since_seq: int, threshold: float) -> None:
        added = changes.join(faces, faces.c.id == changes.c.face_id)
        rows = connection.execute(
            select(faces.c.subject_id, faces.c.embedding)
            .select_from(added)
            .where(changes.c.seq > since_seq, changes.c.op == "add", changes.c.gallery == gallery)
            .where(faces.c.model == face.model, faces.c.model_version == face.model_version)
        ).all()
        if match := _first_match(rows, face.embedding, threshold):
            raise SimilarFace(match[0].subject_id, match[1])

    @contextmanager
    def _unique_name(self, gallery: str, name: str, subject_id: str) -> Iterator[None]:
        """Turns the unique constraint's error into DuplicateName when another subject holds ``name``."""
        try:
            yield
        except IntegrityError:
            with self.engine.connect() as connection:
                holder = self._subject_id_by_name(connection, gallery, name)
            if holder not in (None, subject_id):
                raise DuplicateName(gallery, name, str(holder)) from None
            raise

    @staticmethod
    def _require_subject(connection: Connection, gallery: str, subject_id: str) -> None:
        found = connection.execute(
            select(subjects.c.id).where(subjects.c.id == subject_id, subjects.c.gallery == gallery)
        ).first()
        if found is None:
            raise NotFound(f"no subject {subject_id!r} in gallery {gallery!r}")

    def add_face(self, gallery: str, subject_id: str, face: NewFace) -> tuple[FaceRecord, SubjectRecord]:
        """Adds ``face`` to the subject; returns it and the subject as written. DuplicateFace when it is one of
        theirs already (checked inside the write lock, so a client that sends a photo again after losing the
        answer never stores it twice)."""
        with self.write() as connection:
            self._require_subject(connection, gallery, subject_id)
            # This model's faces only: one another model made (not re-embedded, no photo kept) is re-enrolled from the
            # same photo, as README says.
            rows = connection.execute(
                select(faces.c.id, faces.c.embedding, face_uploads.c.digest)
                .select_from(faces.outerjoin(face_uploads, face_uploads.c.face_id == faces.c.id))
                .where(faces.c.subject_id == subject_id, faces.c.model == face.model, faces.c.model_version == face.model_version)
            ).all()
            if face.upload_digest is not None and (sent := next((r for r in rows if r.digest == face.upload_digest), None)):
                raise DuplicateFace(subject_id, sent.id)
            if match := _first_match(rows, face.embedding, SAME_FACE):
                raise DuplicateFace(subject_id, match[0].id)
            record = self.insert_face(connection, gallery, subject_id, face, time.time())
            # Read in the same transaction: a read after the commit could fail (or find the subject deleted)
            # and turn an acknowledged write into an error.
            return record, self._subject(connection, gallery, subject_id)

    def rename_subject(self, gallery: str, subject_id: str, name: str) -> SubjectRecord:
        with self._unique_name(gallery, name, subject_id), self.write() as connection:
            self._require_subject(connection, gallery, subject_id)
            connection.execute(subjects.update().where(subjects.c.id == subject_id).values(name=name))
            connection.execute(
                changes.insert().values(gallery=gallery, op="rename", face_id="", subject_id=subject_id, at=time.time())
            )
            return self._subject(connection, gallery, subject_id)  # as written: a delete right after cannot make it a 404

    def delete_subject(self, gallery: str, subject_id: str) -> int:
        """Removes the subject and all its faces; returns how many faces went."""
        with self.write() as connection:
            self._require_subject(connection, gallery, subject_id)
            face_ids = connection.execute(select(faces.c.id).where(faces.c.subject_id == subject_id)).scalars().all()
            self._log_removals(connection, gallery, subject_id, list(face_ids))
            connection.execute(faces.delete().where(faces.c.subject_id == subject_id))
            connection.execute(subjects.delete().where(subjects.c.id == subject_id))
            return len(face_ids)

    def merge_subject(self, gallery: str, subject_id: str, into: str) -> SubjectRecord:
        """Move every face of ``subject_id`` to ``into`` (their ids stay) and delete ``subject_id``: one person
        enrolled twice becomes one. The log gets a removal and an addition per face, as a re-embedding does."""
        with self.write() as connection:
            self._require_subject(connection, gallery, subject_id)
            self._require_subject(connection, gallery, into)
            face_ids = connection.execute(select(faces.c.id).where(faces.c.subject_id == subject_id)).scalars().all()
            connection.execute(faces.update().where(faces.c.subject_id == subject_id).values(subject_id=into))
            now = time.time()
            moves = [(op, face_id, holder) for face_id in face_ids for op, holder in (("remove", subject_id), ("add", into))]
            if moves:
                connection.execute(
                    changes.insert(),
                    [{"gallery": gallery, "op": op, "face_id": f, "subject_id": holder, "at": now} for op, f, holder in moves],
                )
            connection.execute(subjects.delete().where(subjects.c.id == subject_id))
            return self._subject(connection, gallery, into)

    def delete_face(self, gallery: str, face_id: str) -> None:
        with self.write() as connection:
            row = connection.execute(select(faces.c.subject_id).where(faces.c.id == face_id, faces.c.gallery == gallery)).first()
            if row is None:
                raise NotFound(f"no face {face_id!r} in gallery {gallery!r}")
            self._log_removals(connection, gallery, row.subject_id, [face_id])
            connection.execute(faces.delete().where(faces.c.id == face_id))

    def delete_gallery(self, gallery: str) -> int:
        """Removes every subject of ``gallery``; returns how many subjects went."""
        with self.write() as connection:
            rows = connection.execute(select(faces.c.id, faces.c.subject_id).where(faces.c.gallery == gallery)).all()
            now = time.time()
            if rows:
                connection.execute(
                    changes.insert(),
                    [{"gallery": gallery, "op": "remove", "face_id": r.id, "subject_id": r.subject_id, "at": now} for r in rows],
                )
            connection.execute(faces.delete().where(faces.c.gallery == gallery))
            return connection.execute(subjects.delete().where(subjects.c.gallery == gallery)).rowcount

    @staticmethod
    def _log_removals(connection: Connection, gallery: str, subject_id: str, face_ids: list[str]) -> None:
        if face_ids:
            now = time.time()
            connection.execute(
                changes.insert(),
                [{"gallery": gallery, "op": "remove", "face_id": f, "subject_id": subject_id, "at": now} for f in face_ids],
            )

    # -- reads ----------------------------------------------------------------------------------

    def has_subjects(self, gallery: str) -> bool:
        """Whether the gallery exists (a gallery is made by its first subject and ends with its last)."""
        with self.engine.connect() as connection:
            return connection.execute(select(subjects.c.id).where(subjects.c.gallery == gallery).limit(1)).first() is not None

    @staticmethod
    def _subject_id_by_name(connection: Connection, gallery: str, name: str) -> str | None:
        return connection.execute(
            select(subjects.c.id).where(subjects.c.gallery == gallery, subjects.c.name == name)
        ).scalar_one_or_none()

    def get_subject(self, gallery: str, subject_id: str) -> SubjectRecord:
        with self.read() as connection:  # the subject and its faces of one moment
            return self._subject(connection, gallery, subject_id)

    @staticmethod
    def _subject(connection: Connection, gallery: str, subject_id: str) -> SubjectRecord:
        row = connection.execute(select(subjects).where(subjects.c.id == subject_id, subjects.c.gallery == gallery)).first()
        if row is None:
            raise NotFound(f"no subject {subject_id!r} in gallery {gallery!r}")
        face_rows = connection.execute(
            select(faces.c.id, faces.c.model, faces.c.model_version, faces.c.box, faces.c.created_at)
            .where(faces.c.subject_id == subject_id)
            .order_by(faces.c.created_at, faces.c.id)
        ).all()
        records = [FaceRecord(f.id, subject_id, f.model, f.model_version, json.loads(f.box), f.created_at) for f in face_rows]
        return SubjectRecord(row.id, row.gallery, row.name, row.created_at, len(records), records)

    def get_face(self, gallery: str, face_id: str) -> tuple[FaceRecord, bool]:
        """One enrolled face, and whether the photo region it was enrolled from is kept."""
        with self.engine.connect() as connection:
            columns = (faces.c.subject_id, faces.c.model, faces.c.model_version, faces.c.box, faces.c.created_at)
            row = connection.execute(
                select(*columns, face_photos.c.face_id.label("kept"))
                .select_from(faces.outerjoin(face_photos, face_photos.c.face_id == faces.c.id))
                .where(faces.c.id == face_id, faces.c.gallery == gallery)
            ).first()
        if row is None:
            raise NotFound(f"no face {face_id!r} in gallery {gallery!r}")
        record = FaceRecord(face_id, row.subject_id, row.model, row.model_version, json.loads(row.box), row.created_at)
        return record, row.kept is not None

    def face_photo(self, gallery: str, face_id: str) -> FacePhoto | None:
        """The photo region kept with an enrolled face (None: kept photos were off then); NotFound without the face."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(faces.c.id, face_photos.c.image, face_photos.c.box, face_photos.c.whole)
                .select_from(faces.outerjoin(face_photos, face_photos.c.face_id == faces.c.id))
                .where(faces.c.id == face_id, faces.c.gallery == gallery)
            ).first()
        if row is None:
            raise NotFound(f"no face {face_id!r} in gallery {gallery!r}")
        return None if row.image is None else FacePhoto(row.image, tuple(json.loads(row.box)), row.whole)

    def subject_embeddings(
        self, gallery: str, subject_id: str, model: str, version: str, length: int | None = None
    ) -> tuple[str, np.ndarray, int]:
        """A subject's name, the ``[k, D]`` embeddings ``model``/``version`` made of it (k may be 0) and how many
        faces it has in all (any model). Only those of ``length`` (else of the most common length) are kept: others
        come from a damaged store, which the replicas' indexes leave out too (they made np.stack fail: a 500)."""
        with self.engine.connect() as connection:
            name = connection.execute(
                select(subjects.c.name).where(subjects.c.id == subject_id, subjects.c.gallery == gallery)
            ).scalar_one_or_none()
            if name is None:
                raise NotFound(f"no subject {subject_id!r} in gallery {gallery!r}")
            rows = connection.execute(
                select(faces.c.embedding, faces.c.model, faces.c.model_version).where(faces.c.subject_id == subject_id)
            ).all()
        vectors = [np.frombuffer(row.embedding, np.float32) for row in rows if (row.model, row.model_version) == (model, version)]
        if length is None and vectors:
            length = Counter(map(len, vectors)).most_common(1)[0][0]
        vectors = [vector for vector in vectors if len(vector) == length]
        return name, np.stack(vectors) if vectors else np.zeros((0, 0), np.float32), len(rows)

    def list_subjects(
        self,
        gallery: str,
        limit: int,
        offset: int,
        name_prefixes: Sequence[str] = (),
        names: Sequence[str] | None = None,
        after: tuple[float, str] | None = None,
    ) -> tuple[list[SubjectRecord], int]:
        """One page of subjects, oldest first, with their face counts, and the total (of those with one of ``names``,
        or whose names start with one of ``name_prefixes``, when given). ``after``: the page starts after this subject's
        ``(created_at, id)``, the listing order (a cursor: deletions and insertions elsewhere move no page)."""
        condition = subjects.c.gallery == gallery
        if names is not None:
            condition = condition & subjects.c.name.in_(sorted(set(names)))
        prefixes = sorted(set(name_prefixes))
        # An empty prefix matches every name. Case-sensitive on both backends (SQLite's LIKE ignores ASCII case).
        if prefixes and all(prefixes):
            condition = condition & or_(*(func.substr(subjects.c.name, 1, len(prefix)) == prefix for prefix in prefixes))
        page = condition
        if after is not None:
            created_at, subject_id = after
            later = (subjects.c.created_at == created_at) & (subjects.c.id > subject_id)
            page = page & ((subjects.c.created_at > created_at) | later)
        query = select(subjects).where(page).order_by(subjects.c.created_at, subjects.c.id).limit(limit).offset(offset)
        with self.read() as connection:  # the page, its counts and the total of one moment
            rows = connection.execute(query).all()
            # The page's faces only: counting the gallery's and joining made every page cost the whole gallery.
            counted = select(faces.c.subject_id, func.count()).where(faces.c.subject_id.in_([r.id for r in rows]))
            counts: dict[str, int] = dict(connection.execute(counted.group_by(faces.c.subject_id)).all()) if rows else {}
            total = connection.execute(select(func.count()).select_from(subjects).where(condition)).scalar_one()
        return [SubjectRecord(r.id, r.gallery, r.name, r.created_at, int(counts.get(r.id, 0))) for r in rows], int(total)

    def galleries(self) -> list[tuple[str, int, int]]:
        """``(gallery, subjects, faces)`` for every gallery that has subjects."""
        with self.read() as connection:
            subject_rows = connection.execute(select(subjects.c.gallery, func.count()).group_by(subjects.c.gallery)).all()
            face_rows = connection.execute(select(faces.c.gallery, func.count()).group_by(faces.c.gallery)).all()
        face_counts: dict[str, int] = {g: int(n) for g, n in face_rows}
        return [(g, int(n), face_counts.get(g, 0)) for g, n in sorted(subject_rows)]

    def gallery_counts(self, gallery: str) -> tuple[int, dict[tuple[str, str], int]]:
        """How many subjects ``gallery`` has, and how many faces each (model, version) made in it, at one moment."""
        with self.read() as connection:
            count = connection.execute(select(func.count()).select_from(subjects).where(subjects.c.gallery == gallery))
            subject_count = int(count.scalar_one())
            rows = connection.execute(
                select(faces.c.model, faces.c.model_version, func.count())
                .where(faces.c.gallery == gallery)
                .group_by(faces.c.model, faces.c.model_version)
            ).all()
        return subject_count, {(r[0], r[1]): int(r[2]) for r in rows}

    def stale_faces(self, gallery: str, model: str, version: str, limit: int) -> tuple[list[StaleFace], int, int]:
        """Faces of ``gallery`` not embedded by ``model``/``version``: up to ``limit`` of those with a kept
        photo (oldest first), how many have a photo in all, and how many have none (re-enroll those)."""
        stale = (faces.c.gallery == gallery) & ((faces.c.model != model) | (faces.c.model_version != version))
        joined = faces.outerjoin(face_photos, face_photos.c.face_id == faces.c.id)
        with self.read() as connection:  # the counts and the rows of one moment
            missing = face_photos.c.face_id.is_(None)
            counts = connection.execute(select(missing, func.count()).select_from(joined).where(stale).group_by(missing)).all()
            rows = connection.execute(
                select(faces.c.id, faces.c.subject_id, face_photos.c.image, face_photos.c.box, face_photos.c.whole)
                .select_from(faces.join(face_photos, face_photos.c.face_id == faces.c.id))
                .where(stale)
                .order_by(faces.c.created_at, faces.c.id)
                .limit(limit)
            ).all()
        without = {bool(none): int(n) for none, n in counts}
        found = [StaleFace(r.id, r.subject_id, FacePhoto(r.image, tuple(json.loads(r.box)), bool(r.whole))) for r in rows]
        return found, without.get(False, 0), without.get(True, 0)

    def drop_photos(self, gallery: str, face_ids: list[str]) -> None:
        """Forget the kept photos of ``face_ids`` (ones that no longer decode): those faces then count as without a
        photo, instead of heading every re-embedding page, unreadable, for good."""
        with self.write() as connection:
            in_gallery = select(faces.c.id).where(faces.c.gallery == gallery, faces.c.id.in_(face_ids))
            connection.execute(face_photos.delete().where(face_photos.c.face_id.in_(in_gallery)))

    def last_seq(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.coalesce(func.max(changes.c.seq), 0))).scalar_one())

    def first_seq(self) -> int:
        """The oldest ``seq`` still in the log (0 when it is empty)."""
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.coalesce(func.min(changes.c.seq), 0))).scalar_one())

    def prune_changes(self, keep: int) -> int:
        """Delete all but about the newest ``keep`` log rows (at least one: numbering must never restart).

        The faces table is the state; the log only serves replicas catching up, and a replica that
        finds its position pruned reloads from a snapshot. Returns the number of rows deleted.
        """
        with self.write() as connection:
            newest = int(connection.execute(select(func.coalesce(func.max(changes.c.seq), 0))).scalar_one())
            return connection.execute(changes.delete().where(changes.c.seq <= newest - max(keep, 1))).rowcount

    def reclaim_space(self, pages: int | None = None) -> int:
        """SQLite: give up to ``pages`` (RECLAIM_PAGES) free pages (left by deletions) back to the file system, in one
        short write transaction, keeping RECLAIM_SLACK; return how many more there are to give back (0 on PostgreSQL,
        whose autovacuum does this, and on a SQLite store made without incremental auto-vacuum, which cannot)."""
        if self.dialect != "sqlite":
            return 0
        with self.engine.connect() as connection:
            raw = connection.connection.driver_connection
            assert raw is not None
            if raw.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
                return 0
            extra = raw.execute("PRAGMA freelist_count").fetchone()[0] - RECLAIM_SLACK
            if extra > 0:
                # Never waits for the write lock (a replica's sync would wait with it): another writer holds it, next time.
                waits = raw.execute("PRAGMA busy_timeout").fetchone()[0]
                raw.execute("PRAGMA busy_timeout=0")
                try:
                    # As a script: pysqlite steps a statement without result columns once, which frees one page only.
                    step = min(extra, int(pages or RECLAIM_PAGES))
                    raw.executescript(f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({step}); COMMIT;")
                except sqlite3.OperationalError as error:
                    if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:  # (its extended codes too)
                        raise
                    return extra
                finally:
                    raw.execute(f"PRAGMA busy_timeout={int(waits)}")
            return max(0, raw.execute("PRAGMA freelist_count").fetchone()[0] - RECLAIM_SLACK)

    def snapshot(self, batch: int = 50_000) -> Iterator[list[Change]]:
        """Every face now in the store, as "add" changes, in batches (a replica's start-up load)."""
        query = (
            select(
                faces.c.id,
                faces.c.subject_id,
                faces.c.gallery,
                faces.c.model,
                faces.c.model_version,
                faces.c.embedding,
                subjects.c.name,
            )
            .select_from(faces.join(subjects, subjects.c.id == faces.c.subject_id))
            .order_by(faces.c.id)
        )
        with self.engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=batch).execute(query)
            for rows in result.partitions(batch):
                yield [
                    Change(
                        0,
                        r.gallery,
                        "add",
                        r.id,
                        r.subject_id,
                        r.name,
                        r.model,
                        r.model_version,
                        np.frombuffer(r.embedding, np.float32),
                    )
                    for r in rows
                ]

    def changes_since(self, seq: int, limit: int = CHANGES_BATCH) -> list[Change]:
        """The log after ``seq``, oldest first; "add" rows carry the embedding if the face still exists."""
        query = (
            select(
                changes.c.seq,
                changes.c.gallery,
                changes.c.op,
                changes.c.face_id,
                changes.c.subject_id,
                faces.c.model,
                faces.c.model_version,
                faces.c.embedding,
                subjects.c.name,
            )
            .select_from(
                changes.outerjoin(faces, faces.c.id == changes.c.face_id).outerjoin(
                    subjects, subjects.c.id == changes.c.subject_id
                )
            )
            .where(changes.c.seq > seq)
            .order_by(changes.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [
            Change(
                int(r.seq),
                r.gallery,
                r.op,
                r.face_id,
                r.subject_id,
                r.name,
                r.model,
                r.model_version,
                None if r.embedding is None else np.frombuffer(r.embedding, np.float32),
            )
            for r in rows
        ]
