"""In-memory face index of one (gallery, model, version): exact cosine search, IVF for large galleries.

Rows are L2-normalised float32 embeddings in one growing matrix; removing a face moves the last
row into its place, so the matrix stays dense and an exact search is one matrix product. A search
ranks *subjects*: a subject's similarity is that of its closest enrolled face.

An exact scan reads every embedding (512 MB per million 128-d faces; ~50 ms here), so from
``ann_min`` faces on, an inverted-file index (faiss ``IndexIVFScalarQuantizer``, 8-bit codes,
``nprobe`` lists of ~4 sqrt(n)) proposes candidates, which are then re-scored exactly from the
float32 matrix: similarities in answers are always exact, only recall is approximate. The IVF
index is built in a worker thread from a copy; changes made meanwhile go to the index in use and to a journal
that is replayed into the new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from service.tasks.faces import cosine

INITIAL_CAPACITY = 1024
IVF_PROBES = 48
IVF_CANDIDATES = 64  # faces proposed per query, at least 8 per requested subject

faiss.omp_set_num_threads(1)  # one query's IVF scan is far too small to pay for an OpenMP team


class DimensionMismatch(ValueError):
    """Queries of another length than the index's embeddings."""


@dataclass(frozen=True)
class Match:
    subject_id: str
    face_id: str
    similarity: float


class FaceIndex:
    def __init__(self, dim: int, ann_min: int = 0) -> None:
        self.dim = dim
        self.ann_min = ann_min  # 0 = always exact
        self._vectors = np.zeros((INITIAL_CAPACITY, dim), np.float32)
        self._face_ids: list[str] = []
        self._subject_ids: list[str] = []
        self._row: dict[str, int] = {}
        # IVF keys are stable per face (rows move on removal): key -> row, and each row's key.
        self._keys: list[int] = []
        self._key_row: dict[int, int] = {}
        self._next_key = 0
        self._ivf: faiss.Index | None = None
        self._ivf_trained_on = 0
        # Changes made while an IVF index is being built. Every method but build_ivf runs on the event
        # loop under the replica's index lock; build_ivf touches only its own copy.
        self._journal: list[tuple[str, int]] | None = None
        self._ivf_retry_from = 0  # after a failed build: the next waits until the gallery has doubled
        # Each row's subject as a small integer, and the subjects in code order: made when a search needs every
        # subject's best face, dropped by any change.
        self._subject_codes: tuple[np.ndarray, list[str]] | None = None

    def __len__(self) -> int:
        return len(self._face_ids)

    def __contains__(self, face_id: str) -> bool:
        return face_id in self._row

    @property
    def nbytes(self) -> int:
        return self._vectors.nbytes

    def add(self, face_id: str, subject_id: str, vector: np.ndarray) -> None:
        if face_id in self._row:
            return  # replaying the change log twice must not duplicate a face
        if vector.shape != (self.dim,):
            raise ValueError(f"embedding of size {vector.shape} in an index of dimension {self.dim}")
        count = len(self._face_ids)
        if count == len(self._vectors):
            grown = np.zeros((2 * count, self.dim), np.float32)
            grown[:count] = self._vectors
            self._vectors = grown
        self._vectors[count] = vector
        self._row[face_id] = count
        self._face_ids.append(face_id)
        self._subject_ids.append(subject_id)
        self._subject_codes = None
        self._new_keys(count, 1)

    def add_many(self, face_ids: list[str], subject_ids: list[str], vectors: np.ndarray) -> None:
        """Bulk add (start-up and benchmarks): one copy instead of a row at a time."""
        fresh = [i for i, f in enumerate(face_ids) if f not in self._row]
        count, needed = len(self._face_ids), len(self._face_ids) + len(fresh)
        if needed > len(self._vectors):
            grown = np.zeros((max(needed, 2 * len(self._vectors)), self.dim), np.float32)
            grown[:count] = self._vectors[:count]
            self._vectors = grown
        self._vectors[count:needed] = vectors[fresh]
        for offset, i in enumerate(fresh):
            self._row[face_ids[i]] = count + offset
            self._face_ids.append(face_ids[i])
            self._subject_ids.append(subject_ids[i])
        self._subject_codes = None
        self._new_keys(count, len(fresh))

    def _new_keys(self, first_row: int, count: int) -> None:
        keys = list(range(self._next_key, self._next_key + count))
        self._next_key += count
        for offset, key in enumerate(keys):
            self._keys.append(key)
            self._key_row[key] = first_row + offset
        if self._journal is not None:  # for the index being built
            self._journal.extend(("add", key) for key in keys)
        if self._ivf is not None and keys:  # the index in use finds them while a build runs
            self._ivf.add_with_ids(self._vectors[first_row : first_row + count], np.asarray(keys, np.int64))

    def remove(self, face_id: str) -> str | None:
        """Drop the face; returns the subject it belonged to here (None: not here)."""
        row = self._row.pop(face_id, None)
        if row is None:
            return None
        last = len(self._face_ids) - 1
        key, subject_id = self._keys[row], self._subject_ids[row]
        if row != last:  # move the last row into the hole
            self._vectors[row] = self._vectors[last]
            moved = self._face_ids[last]
            self._face_ids[row] = moved
            self._subject_ids[row] = self._subject_ids[last]
            self._row[moved] = row
            self._keys[row] = self._keys[last]
            self._key_row[self._keys[row]] = row
        self._face_ids.pop()
        self._subject_ids.pop()
        self._subject_codes = None
        self._keys.pop()
        del self._key_row[key]
        if self._journal is not None:
            self._journal.append(("remove", key))
        if self._ivf is not None:
            self._ivf.remove_ids(np.asarray([key], np.int64))  # type: ignore[arg-type]  # faiss's Python wrapper takes ids
        return subject_id

    # -- the IVF index for large galleries -----------------------------------------------------

    def wants_ivf(self) -> bool:
        """Large enough for IVF, no build under way, and none built yet or the gallery has grown fourfold since."""
        count = len(self._face_ids)
        if not self.ann_min or count < max(self.ann_min, self._ivf_retry_from) or self._journal is not None:
            return False
        return self._ivf is None or count >= 4 * self._ivf_trained_on

    def start_ivf_build(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of the rows and their keys to build from; changes from now on are journaled."""
        self._journal = []
        count = len(self._face_ids)
        return self._vectors[:count].copy(), np.asarray(self._keys, np.int64)

    def build_ivf(self, vectors: np.ndarray, keys: np.ndarray, seed: int = 0) -> faiss.Index:
        """Train and fill an IVF index from that copy (slow: run it in a worker thread)."""
        count = len(vectors)
        lists = max(1, min(int(4 * np.sqrt(count)), count // 40))  # k-means wants ~40 points per list
        sample = vectors[np.random.default_rng(seed).choice(count, min(count, 64 * lists), replace=False)]
        ivf = faiss.index_factory(self.dim, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.add_with_ids(vectors, keys)
        faiss.extract_index_ivf(ivf).nprobe = IVF_PROBES
        return ivf

    def install_ivf(self, ivf: faiss.Index, trained_on: int) -> None:
        """Replay the journal into the new index and search with it from now on."""
        self._replay_journal(ivf)
        self._ivf, self._ivf_trained_on = ivf, trained_on

    def abort_ivf_build(self) -> None:
        """After a failed build: the index in use (if any) already has the changes made meanwhile; the next
        attempt waits until the gallery has doubled."""
        self._journal = None
        self._ivf_retry_from = 2 * len(self._face_ids)

    def _replay_journal(self, ivf: faiss.Index) -> None:
        for op, key in self._journal or []:
            if op == "add" and key in self._key_row:
                ivf.add_with_ids(self._vectors[self._key_row[key]][None], np.asarray([key], np.int64))
            elif op == "remove":
                ivf.remove_ids(np.asarray([key], np.int64))  # type: ignore[arg-type]  # faiss's Python wrapper takes ids
        self._journal = None

    @property
    def uses_ivf(self) -> bool:
        return self._ivf is not None

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Match]]:
        """For each query ``[Q, D]``: the ``top_k`` closest subjects, best first."""
        count = len(self._face_ids)
        if count == 0:
            return [[] for _ in queries]
        if queries.shape[1:] != (self.dim,):
            raise DimensionMismatch(f"each must hold {self.dim} numbers, as the gallery's faces of this model do")
        queries = queries.astype(np.float32, copy=False)
        if self._ivf is not None:
            return [self._ivf_search(query, top_k) for query in queries]
        similarities = queries @ self._vectors[:count].T
        return [self._best_subjects(row, top_k) for row in similarities]

    def _ivf_search(self, query: np.ndarray, top_k: int) -> list[Match]:
        assert self._ivf is not None
        _, keys = self._ivf.search(query[None], max(IVF_CANDIDATES, 8 * top_k))
        rows = np.asarray([self._key_row[k] for k in keys[0] if k in self._key_row], np.int64)
        similarities = self._vectors[rows] @ query  # exact re-scoring
        best: dict[str, Match] = {}
        for i in np.argsort(-similarities, kind="stable"):
            subject = self._subject_ids[rows[i]]
            if subject not in best:
                best[subject] = Match(subject, self._face_ids[rows[i]], cosine(similarities[i]))
                if len(best) == top_k:
                    break
        return list(best.values())

    def _best_subjects(self, similarities: np.ndarray, top_k: int) -> list[Match]:
        """The ``top_k`` subjects of the closest faces (ties: the lower row first), each with its closest face."""
        count = len(similarities)
        take = min(count, 4 * top_k)
        if take < count:  # the closest faces, with every face tied with the last of them (argpartition splits ties)
            cut = similarities[np.argpartition(-similarities, take - 1)[take - 1]]
            top = np.flatnonzero(similarities >= cut)
            take = len(top)
        else:
            top = np.arange(count)
        top = top[np.lexsort((top, -similarities[top]))]
        best: dict[str, Match] = {}
        for row in top:
            subject = self._subject_ids[row]
            if subject not in best:
                best[subject] = Match(subject, self._face_ids[row], cosine(similarities[row]))
                if len(best) == top_k:
                    return list(best.values())
        if take == count:  # fewer subjects than top_k
            return list(best.values())
        # A few subjects own the closest faces: every subject's best, in numpy (a Python walk of 100,000 faces
        # per query stalled the server for seconds).
        return self._every_subjects_best(similarities, top_k)

    def _every_subjects_best(self, similarities: np.ndarray, top_k: int) -> list[Match]:
        if self._subject_codes is None:
            numbering: dict[str, int] = {}
            codes = np.fromiter((numbering.setdefault(s, len(numbering)) for s in self._subject_ids), np.int64, len(self))
            self._subject_codes = codes, list(numbering)
        codes, subjects = self._subject_codes
        best = np.full(len(subjects), -np.inf, similarities.dtype)
        np.maximum.at(best, codes, similarities)
        winners = np.flatnonzero(similarities == best[codes])
        first_winner = np.full(len(subjects), len(codes), np.int64)
        np.minimum.at(first_winner, codes[winners], winners)
        chosen = np.lexsort((first_winner, -best))[:top_k]
        return [Match(subjects[c], self._face_ids[first_winner[c]], cosine(best[c])) for c in chosen]
