"""One process's view of the shared gallery store: in-memory indexes kept current from the change log.

Every replica (service process) loads a snapshot at start-up, then applies the store's change log
(``changes`` rows after the last one it applied):

- in the background every ``sync_interval_s``, so idle replicas stay current;
- before every identification, so a subject deleted anywhere before the request started is never
  returned (one indexed query; concurrent requests share it);
- right after this replica's own writes, so a client reads its own enrollments at once.

The log is pruned to its newest ``change_log_keep`` rows (every replica tries, about once a
minute); a replica whose position was pruned away (it was cut off from the store for that long)
reloads from a snapshot instead of missing changes.

Indexes are keyed by (gallery, model, model version): embeddings of different models are never
compared.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio
import numpy as np

from service import timing
from service.gallery.index import FaceIndex, Match
from service.gallery.store import CHANGES_BATCH, Change, FaceRecord, GalleryStore, NewFace, SubjectRecord

log = logging.getLogger("ocellus.gallery")

IndexKey = tuple[str, str, str]  # gallery, model, model version
T = TypeVar("T")
INLINE_SEARCH_PAIRS = 100_000  # queries x faces of an exact search run on the event loop (2-3 ms)


class StoreUnavailable(RuntimeError):
    """The store refused, failed or did not answer in time: a 503 for the client, who may retry."""


class ReplicaReloading(StoreUnavailable):
    """This replica is loading a fresh snapshot (the store itself is fine): a 503 for a request."""


def _log_failed_reload(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("reloading the gallery snapshot failed; the next sync retries", exc_info=task.exception())


class GalleryReplica:
    def __init__(
        self,
        store: GalleryStore,
        sync_interval_s: float,
        ann_min: int = 0,
        change_log_keep: int = 100_000,
        timeout_s: float = 10.0,
        embedding_length: Callable[[str, str], int | None] = lambda model, version: None,
    ) -> None:
        self.store = store
        self.sync_interval_s = sync_interval_s
        # (model, version) -> the length of its embeddings when that model is loaded: a face of another length
        # (a damaged store) is left out of the index, however many there are and in whatever order they come.
        self.embedding_length = embedding_length
        self.ann_min = ann_min
        self.change_log_keep = change_log_keep
        self.timeout_s = timeout_s
        # Store calls get worker threads of their own, one per connection the pool may hold, apart from the ones
        # that decode images: a database that hangs (rather than refusing connections) holds only these. A slot
        # is held until the thread is done, not until its caller gives up, so threads still waiting on a hung
        # database are counted: further calls wait for a slot within their own timeout.
        self._store_threads = anyio.CapacityLimiter(store.max_connections)
        self._store_slots = threading.BoundedSemaphore(store.max_connections)
        self.busy_store_calls = 0  # store calls whose thread has not finished, given up on or not
        self._next_prune = 0.0
        self._space_to_reclaim = False  # free pages were left by the last reclaim step: another one at the next sync
        self.indexes: dict[IndexKey, FaceIndex] = {}
        self.names: dict[str, str] = {}  # subject id -> name, for subjects with faces in an index
        self._faces_of: Counter[str] = Counter()  # subject id -> its faces in the indexes
        self.face_keys: dict[str, IndexKey] = {}  # face id -> the index holding it
        self.seq = 0
        self.loaded = False
        self.healthy = False  # the last background sync reached the store (ocellus_gallery_up)
        self.synced_at: float | None = None  # time.monotonic() when this replica last had the whole log applied
        self.on_search: Callable[[float], None] = lambda seconds: None  # each search's seconds (a metric)
        # Log reads begun so far, and the number of the last one that found nothing left to apply: requests that
        # arrived before a read that caught up began need no read of their own.
        self._reads_begun = 0
        self._caught_up_by = 0
        self._failed_read: tuple[int, str] = (0, "")  # the number of the last read that failed, and why
        self._index_lock = asyncio.Lock()  # applying changes never overlaps a search running in a thread
        self._task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None  # a snapshot reload after falling behind a pruned log
        self._sync_task: asyncio.Task[None] | None = None  # the change-log reads under way, shared by the requests waiting
        self._closing = False

    async def store_call(self, operation: Callable[..., T], *args: Any, timeout: bool = True) -> T:
        """``operation(*args)`` in a store worker thread, given up after ``timeout_s`` (StoreUnavailable).

        A call given up on is abandoned, not stopped: a write may still commit afterwards (as after any
        timeout, the client learns by reading or retrying; names are unique, so a retried enrollment is a 409).
        """
        with timing.timed("store"):
            return await self._store_call(operation, *args, timeout=timeout)

    async def _store_call(self, operation: Callable[..., T], *args: Any, timeout: bool) -> T:
        deadline = time.monotonic() + self.timeout_s
        while not self._store_slots.acquire(blocking=False):  # a threading semaphore: threads release it
            if timeout and time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"all {self.store.max_connections} gallery store connections stayed busy for {self.timeout_s:g} s"
                )
            await asyncio.sleep(0.01)
        self.busy_store_calls += 1
        started, given_up, guard = False, False, threading.Lock()

        def run() -> T | None:
            nonlocal started
            with guard:
                if given_up:  # the caller left before this thread began: its slot is already back
                    return None
                started = True
            try:
                return operation(*args)
            finally:
                self._release_store_slot()

        work = anyio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=self._store_threads)
        try:
            remaining = max(deadline - time.monotonic(), 0.001) if timeout else None
            return cast(T, await asyncio.wait_for(work, remaining))  # None only for a gone caller
        except TimeoutError:
            raise StoreUnavailable(f"the gallery store did not answer within {self.timeout_s:g} s") from None
        finally:
            with guard:
                if not started:
                    given_up = True
                    self._release_store_slot()

    def _release_store_slot(self) -> None:
        self._store_slots.release()
        self.busy_store_calls -= 1  # an int's += and -= are atomic enough under the GIL for a gauge-like count

    # -- keeping current -----------------------------------------------------------------------

    def load(self, attempts: int = 5) -> None:
        """Start-up: the log position first, then every face; replaying from there misses nothing, unless the
        rows after that position were pruned while the snapshot was read: then it starts over.

        Starts from empty indexes, so a retry after a failed attempt keeps nothing of it.
        """
        self.store.ensure_schema()
        for _ in range(attempts):
            self.indexes, self.names, self.face_keys, self._faces_of = {}, {}, {}, Counter()
            self.seq = start = self.store.last_seq()
            for batch in self.store.snapshot():
                self._apply(batch)
            # As _read_log: the changes first; if the log still reaches back to our position afterwards, none was lost.
            batch = self.store.changes_since(start)
            if self.store.first_seq() <= start + 1:
                break
            # A deletion logged meanwhile would be missed for good (the snapshot still held the face).
            log.warning("the change log was pruned past the snapshot's position while it loaded; loading again")
        else:
            raise StoreUnavailable(f"the change log was pruned past every one of {attempts} snapshots while it loaded")
        self._apply(batch)
        self.loaded = True
        self.healthy = True
        self.synced_at = time.monotonic()
        log.info("gallery loaded", extra={"faces": len(self.face_keys), "indexes": len(self.indexes), "seq": self.seq})

    def _apply(self, batch: list[Change]) -> None:
        # self.seq moves only past changes whose effect is in the indexes: queued "add"s count once flushed. A flush that
        # fails (a MemoryError growing a large index) leaves them to the next read, which replays them harmlessly
        # (add_many skips faces already there; removing an absent face does nothing).
        grouped: dict[IndexKey, list[Change]] = defaultdict(list)
        for change in batch:
            if change.op == "add":
                if change.embedding is None or change.model is None or change.model_version is None:
                    continue  # removed again since; its "remove" row follows
                key = (change.gallery, change.model, change.model_version)
                if change.subject_name is not None:
                    self.names[change.subject_id] = change.subject_name
                grouped[key].append(change)
            elif change.op == "rename":  # no face changes: the index keeps its order
                # None: deleted since (its removals follow); a subject without faces gets its name with its next face.
                if change.subject_name is not None and change.subject_id in self.names:
                    self.names[change.subject_id] = change.subject_name
            else:
                for key, pending in list(grouped.items()):  # keep the log's order across an add and its removal
                    self._flush(key, pending)
                grouped.clear()
                holder = self.face_keys.pop(change.face_id, None)
                if holder is not None:
                    # The subject the index has it under: a replayed log row may name one it has moved from since.
                    subject_id = self._remove(holder, change.face_id) or change.subject_id
                    self._faces_of[subject_id] -= 1
                    if self._faces_of[subject_id] <= 0:  # a name kept for every subject ever seen would only grow
                        del self._faces_of[subject_id]
                        self.names.pop(subject_id, None)
                self.seq = max(self.seq, change.seq)  # nothing before it is left queued
        for key, pending in grouped.items():
            self._flush(key, pending)
        self.seq = max([self.seq, *(change.seq for change in batch)])

    def _remove(self, key: IndexKey, face_id: str) -> str | None:
        """Drop a face from its index; an index left empty goes (a deleted gallery's, or a model's whose faces were all
        re-embedded, kept its arrays at their peak size in every replica until a restart)."""
        index = self.indexes.get(key)
        if index is None:  # gone empty already: a damaged store's face was left out of it (_flush's length check)
            return None
        subject_id = index.remove(face_id)
        if not len(index):
            del self.indexes[key]  # an IVF build under way for it (maintain) installs into this orphan: harmless
        return subject_id

    def _flush(self, key: IndexKey, adds: list[Change]) -> None:
        if not adds:
            return
        for change in adds:
            # Replayed after a snapshot that already placed it, an "add" reads the face as it is now: if it has
            # moved to another model since, it leaves the old index here (its "remove" reaches only the new one).
            previous = self.face_keys.get(change.face_id)
            if previous is not None and previous != key:
                self._remove(previous, change.face_id)
        index = self.indexes.get(key)
        dim = index.dim if index is not None else self.embedding_length(key[1], key[2]) or most_common_length(adds)
        fitting = [change for change in adds if change.embedding is not None and change.embedding.shape == (dim,)]
        if len(fitting) < len(adds):  # a damaged store (an edited import): never a failed start-up nor search
            kept = {id(change) for change in fitting}
            skipped = [change.face_id for change in adds if id(change) not in kept]
            log.warning("faces left out of the index: embeddings of another length", extra={"faces": skipped[:10], "dim": dim})
            adds = fitting
            if not adds:
                return
        vectors = np.stack([change.embedding for change in adds])  # type: ignore[misc]
        if index is None:
            index = self.indexes[key] = FaceIndex(dim, self.ann_min)
        index.add_many([c.face_id for c in adds], [c.subject_id for c in adds], vectors)
        for change in adds:
            if change.face_id not in self.face_keys:  # a replayed add is no new face
                self._faces_of[change.subject_id] += 1
            self.face_keys[change.face_id] = key

    async def catch_up(self) -> None:
        """Apply everything logged since the last call.

        Only a log read that began after the caller arrived counts (never one already in flight), so whatever was
        acknowledged before a request began is visible to it. One sync runs at a time and is shared: requests that
        arrive while it reads wait for its next read instead of querying again one after another, each for
        OCELLUS_GALLERY_TIMEOUT_S at most. (Each request reading for itself, the k-th of k on a hung store waited k
        timeouts; reading each at once, they tied up a connection each, until the database answered.)
        """
        if not self.loaded:
            raise StoreUnavailable("the gallery store has not been reachable since start-up")
        deadline = time.monotonic() + self.timeout_s
        arrived_after = self._reads_begun
        while self._caught_up_by <= arrived_after:
            failed_read, why = self._failed_read
            if failed_read > arrived_after:  # a read begun since this request arrived failed: so does the request
                raise StoreUnavailable(why)
            self._refuse_while_reloading()
            if self._sync_task is None or self._sync_task.done():
                self._sync_task = asyncio.get_running_loop().create_task(self._sync(), context=contextvars.Context())
                # Its failure is told through _failed_read: retrieved here, it is never logged as unretrieved when
                # every request waiting for it has timed out.
                self._sync_task.add_done_callback(lambda task: task.cancelled() or task.exception())
            sync = self._sync_task
            try:
                with timing.timed("store"):  # the shared reads run in their own context: their time is this request's
                    await asyncio.wait_for(asyncio.shield(sync), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                self._refuse_while_reloading()  # the sync found the log pruned: a snapshot is on its way
                raise StoreUnavailable(f"the gallery store did not answer within {self.timeout_s:g} s") from None
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if sync.cancelled() and current is not None and not current.cancelling():  # close() cancelled the sync
                    raise StoreUnavailable("this replica is shutting down") from None
                raise
            except Exception:  # recorded by the sync: this request's failure if its read began after the request arrived
                continue

    async def _sync(self) -> None:
        """Read and apply the log until a read does not fill its batch, each read given timeout_s; a read that fails
        is recorded (``_failed_read``) for the requests that were waiting when it began."""
        while True:
            self._reads_begun += 1
            read = self._reads_begun
            try:
                first, batch = await self.store_call(self._read_log)
                if first > self.seq + 1:  # the rows after our position were pruned: start over from a snapshot
                    if self._reload_task is None or self._reload_task.done():
                        self._refuse_while_reloading()  # none after close() began
                        self._reload_task = asyncio.get_running_loop().create_task(self._reload(), context=contextvars.Context())
                        self._reload_task.add_done_callback(_log_failed_reload)
                    await asyncio.shield(self._reload_task)  # a large snapshot takes long: requests wait timeout_s at most
                    continue
                if batch:
                    async with self._index_lock:
                        self._apply(batch)
            except Exception as error:  # any failure ends the sync for those waiting; a driver's message may name hosts
                self._failed_read = (read, str(error) if isinstance(error, StoreUnavailable) else "the gallery store failed")
                raise
            # The log is written in seq order under the store's write lock: a read that did not fill its batch saw all
            # that was committed before it began (waiting for an empty one, identify starved under steady enrollments).
            if len(batch) < CHANGES_BATCH:
                self.synced_at = time.monotonic()
                self._caught_up_by = read
                return

    def _refuse_while_reloading(self) -> None:
        if self._closing:
            raise StoreUnavailable("this replica is shutting down")
        if self._reload_task is not None and not self._reload_task.done():
            raise ReplicaReloading("this replica is reloading the gallery (it fell behind the change log); retry shortly")

    def _read_log(self) -> tuple[int, list[Change]]:
        """The log's oldest ``seq`` and what follows our position (one thread hop for both queries).

        The changes are read first: pruning only ever deletes the oldest rows, so if the log still
        reaches back to our position afterwards, it did while the changes were read.
        """
        batch = self.store.changes_since(self.seq)
        return self.store.first_seq(), batch

    async def _reload(self) -> None:
        fresh = GalleryReplica(
            self.store, self.sync_interval_s, self.ann_min, self.change_log_keep, self.timeout_s, self.embedding_length
        )
        await self.store_call(fresh.load, timeout=False)  # a large snapshot may take long
        async with self._index_lock:
            self.indexes, self.names, self.face_keys, self.seq = fresh.indexes, fresh.names, fresh.face_keys, fresh.seq
            self._faces_of = fresh._faces_of
        log.warning("gallery reloaded: the change log was pruned past this replica's position", extra={"seq": self.seq})

    async def maintain(self) -> None:
        """Prune the change log now and then, and give the space of deleted faces back to the file system (SQLite: a
        step each sync while any is left); (re)build the IVF index of galleries that have grown large."""
        # Their failures (e.g. behind another writer's long transaction) are not a store outage, which the catch-up
        # before them would have met: the sync must neither back off nor report the store down for them.
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 60
            try:
                await self.store_call(self.store.prune_changes, self.change_log_keep)
                self._space_to_reclaim = True
            except Exception as error:
                log.warning("the change log was not pruned (tried again in a minute): %s", error)
        if self._space_to_reclaim:
            try:
                self._space_to_reclaim = bool(await self.store_call(self.store.reclaim_space))
            except Exception as error:
                self._space_to_reclaim = False  # until the next prune
                log.warning("free pages were not given back to the file system: %s", error)
        for key, index in list(self.indexes.items()):
            if not index.wants_ivf():
                continue
            async with self._index_lock:
                vectors, keys = index.start_ivf_build()
            log.info("building an IVF index", extra={"gallery": key[0], "model": key[1], "faces": len(vectors)})
            try:
                ivf = await anyio.to_thread.run_sync(index.build_ivf, vectors, keys)
            except Exception:  # faiss failed or ran out of memory: search on, exactly or with the last index
                async with self._index_lock:
                    index.abort_ivf_build()
                # Not a store failure either.
                log.exception("building the IVF index failed; searching on without it", extra={"gallery": key[0]})
                continue
            async with self._index_lock:
                index.install_ivf(ivf, len(vectors))

    async def _poll(self) -> None:
        failures = 0
        while not self._closing:
            # While the store fails, wait longer each time (up to 30 s): a wrong URL or a long outage must not
            # flood the log, nor the database with reconnects.
            await asyncio.sleep(min(30.0, self.sync_interval_s * 2**failures))
            try:
                if not self.loaded:  # the store was unreachable at start-up
                    async with self._index_lock:
                        await self.store_call(self.load, timeout=False)
                await self.catch_up()
                await self.maintain()
            except ReplicaReloading:  # the store answers; the snapshot is on its way
                if self._reload_task is not None:
                    await asyncio.wait({self._reload_task})
            except Exception as error:  # keep serving what we have
                failures = min(failures + 1, 10)
                self.healthy = False
                if failures == 1:  # one warning with the cause per outage; the rest at debug level
                    log.warning("the gallery store fails; retrying with back-off", exc_info=True)
                else:
                    log.debug("gallery catch-up failed again: %s", error)
            else:
                if failures:
                    log.warning("the gallery store answers again", extra={"seq": self.seq, "failures": failures})
                failures = 0
                self.healthy = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        self._closing = True  # no reload starts from now on
        # Cancelled again until they end: before Python 3.12, asyncio.wait_for can swallow a cancellation that
        # arrives as its awaitable completes, and the task then runs on. Re-read: a reload may start meanwhile.
        while pending := [t for t in (self._task, self._reload_task, self._sync_task) if t is not None and not t.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
        await anyio.to_thread.run_sync(self.store.close)

    # -- operations ----------------------------------------------------------------------------

    async def _show_own_write(self) -> None:
        """Apply a write this replica just committed. The commit is the acknowledgement: failing the
        request now would make the client retry a write that happened, so a failure here only
        waits for the background sync (and identify, which catches up first, answers 503 till then)."""
        try:
            await self.catch_up()
        except ReplicaReloading:
            log.debug("a committed write waits for the snapshot reload to show")
        except Exception:
            log.warning("catching up after a committed write failed; the background sync will retry", exc_info=True)

    async def create_subject(
        self, gallery: str, name: str, face: NewFace, unmatched_since: tuple[int, float] | None = None
    ) -> SubjectRecord:
        subject = await self.store_call(self.store.create_subject, gallery, name, face, unmatched_since)
        await self._show_own_write()
        return subject

    async def add_face(self, gallery: str, subject_id: str, face: NewFace) -> tuple[FaceRecord, SubjectRecord]:
        written = await self.store_call(self.store.add_face, gallery, subject_id, face)
        await self._show_own_write()
        return written

    async def rename_subject(self, gallery: str, subject_id: str, name: str) -> SubjectRecord:
        subject = await self.store_call(self.store.rename_subject, gallery, subject_id, name)
        await self._show_own_write()
        return subject

    async def merge_subject(self, gallery: str, subject_id: str, into: str) -> SubjectRecord:
        subject = await self.store_call(self.store.merge_subject, gallery, subject_id, into)
        await self._show_own_write()
        return subject

    async def delete_subject(self, gallery: str, subject_id: str) -> int:
        removed = await self.store_call(self.store.delete_subject, gallery, subject_id)
        await self._show_own_write()
        return removed

    async def delete_face(self, gallery: str, face_id: str) -> None:
        await self.store_call(self.store.delete_face, gallery, face_id)
        await self._show_own_write()

    async def replace_embeddings(self, gallery: str, model: str, version: str, updates: list[tuple[str, np.ndarray]]) -> int:
        done = await self.store_call(self.store.replace_embeddings, gallery, model, version, updates)
        await self._show_own_write()
        return done

    async def delete_gallery(self, gallery: str) -> int:
        removed = await self.store_call(self.store.delete_gallery, gallery)
        await self._show_own_write()
        return removed

    async def identify(
        self, gallery: str, model: str, version: str, queries: np.ndarray, top_k: int, current: bool = True
    ) -> list[list[Match]]:
        """The ``top_k`` closest subjects of each query. ``current``: catch up with the store first (else the index as
        the background sync left it, at most a sync interval behind; still refused before the first load)."""
        if current:
            await self.catch_up()
        elif not self.loaded:
            raise StoreUnavailable("the gallery store has not been reachable since start-up")
        else:
            self._refuse_while_reloading()
        started = time.perf_counter()
        try:
            with timing.timed("search"):
                async with self._index_lock:
                    index = self.indexes.get((gallery, model, version))
                    if index is None or not len(index):
                        return [[] for _ in queries]
                    if not index.uses_ivf and len(queries) * len(index) <= INLINE_SEARCH_PAIRS:
                        return index.search(queries, top_k)  # cheaper inline than a thread hop
                    # Off the event loop: 100 queries against 100,000 faces take ~0.2 s. Changes wait for the lock.
                    return await anyio.to_thread.run_sync(index.search, queries, top_k)
        finally:
            self.on_search(time.perf_counter() - started)

    def other_model_faces(self, gallery: str, model: str, version: str) -> int:
        """Faces of ``gallery`` enrolled with any other model or version (never compared with this one's)."""
        return sum(len(index) for key, index in self.indexes.items() if key[0] == gallery and key[1:] != (model, version))

    def size(self, gallery: str, model: str, version: str) -> int:
        index = self.indexes.get((gallery, model, version))
        return len(index) if index is not None else 0


def most_common_length(adds: list[Change]) -> int:
    """For the faces of a model that is not loaded: the embedding length most of them have."""
    return Counter(len(change.embedding) for change in adds if change.embedding is not None).most_common(1)[0][0]
