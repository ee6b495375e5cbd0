"""In-memory face index of one (gallery, model, version): exact cosine search in numpy.

Rows are L2-normalised float32 embeddings in one growing matrix; removing a face moves the last
row into its place, so the matrix stays dense and a search is a single matrix product. A search
ranks *subjects*: a subject's similarity is that of its closest enrolled face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INITIAL_CAPACITY = 1024


@dataclass(frozen=True)
class Match:
    subject_id: str
    face_id: str
    similarity: float


class FaceIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vectors = np.zeros((INITIAL_CAPACITY, dim), np.float32)
        self._face_ids: list[str] = []
        self._subject_ids: list[str] = []
        self._row: dict[str, int] = {}

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

    def remove(self, face_id: str) -> None:
        row = self._row.pop(face_id, None)
        if row is None:
            return
        last = len(self._face_ids) - 1
        if row != last:  # move the last row into the hole
            self._vectors[row] = self._vectors[last]
            moved = self._face_ids[last]
            self._face_ids[row] = moved
            self._subject_ids[row] = self._subject_ids[last]
            self._row[moved] = row
        self._face_ids.pop()
        self._subject_ids.pop()

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Match]]:
        """For each query ``[Q, D]``: the ``top_k`` closest subjects, best first."""
        count = len(self._face_ids)
        if count == 0:
            return [[] for _ in queries]
        similarities = queries.astype(np.float32, copy=False) @ self._vectors[:count].T
        return [self._best_subjects(row, top_k) for row in similarities]

    def _best_subjects(self, similarities: np.ndarray, top_k: int) -> list[Match]:
        count = len(similarities)
        take = min(count, 4 * top_k)
        while True:
            top = np.argpartition(-similarities, take - 1)[:take] if take < count else np.arange(count)
            top = top[np.argsort(-similarities[top], kind="stable")]
            best: dict[str, Match] = {}
            for row in top:
                subject = self._subject_ids[row]
                if subject not in best:
                    best[subject] = Match(subject, self._face_ids[row], float(similarities[row]))
                    if len(best) == top_k:
                        return list(best.values())
            if take >= count:  # fewer subjects than top_k
                return list(best.values())
            take = min(count, 4 * take)  # a few subjects own many faces: look further
