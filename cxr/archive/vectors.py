"""Similar-image search: an HNSW index (usearch) over one model's image embeddings, keyed by the
archive's image id, saved beside the database and brought up to date from it.

Why usearch: it is an HNSW index (sub-linear queries at millions of rows) in one small wheel with
no BLAS/conda dependency, saves to one file that loads or memory-maps quickly, takes our integer
ids as keys and adds incrementally. FAISS' pip wheels are large and CPU-feature specific; hnswlib
needs a fixed capacity and is barely maintained; sqlite-vec is a flat scan and only works with
SQLite, while the archive also runs on PostgreSQL (Debian's lacks pgvector). The database stays
the source of truth: the index file can always be rebuilt from the stored embeddings.

The file is never trusted blindly: a sidecar JSON records the archive's uuid, the model, the
dimension, the highest image id it covers (`watermark`) and its size; `sync` adds rows above the
watermark and rebuilds when the database no longer agrees (another archive, rows deleted, rows
committed out of id order).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import replacing, write_atomic


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id)[:100] or "model"


def normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


@dataclass
class VectorState:
    archive_uuid: str
    model_id: str
    ndim: int
    watermark: int = 0  # highest image id included
    size: int = 0


class VectorIndex:
    """The usearch index of one model in one archive; `path` None keeps it in memory only."""

    def __init__(self, state: VectorState, path: Path | None = None):
        from usearch.index import Index

        self.state = state
        self.path = path
        self.verified = False  # checked against the database in this process
        self.index = Index(ndim=state.ndim, metric="cos", dtype="f32",
                           connectivity=16, expansion_add=64, expansion_search=128)

    # -- persistence -------------------------------------------------------------------------
    @staticmethod
    def file_for(directory: Path, model_id: str) -> Path:
        return Path(directory) / f"{_slug(model_id)}.usearch"

    @classmethod
    def load(cls, path: Path, archive_uuid: str, model_id: str, ndim: int) -> "VectorIndex":
        """Open the saved index if it belongs to this archive and model, else an empty one."""
        fresh = cls(VectorState(archive_uuid, model_id, ndim), path)
        side = path.with_suffix(".json")
        try:
            saved = VectorState(**json.loads(side.read_text()))
        except (OSError, ValueError, TypeError):
            return fresh
        if (saved.archive_uuid, saved.model_id, saved.ndim) != (archive_uuid, model_id, ndim):
            return fresh
        try:
            fresh.index.load(str(path))
        except Exception:  # a torn or foreign file: start over, the DB has everything
            return cls(VectorState(archive_uuid, model_id, ndim), path)
        if len(fresh.index) != saved.size:
            return cls(VectorState(archive_uuid, model_id, ndim), path)
        fresh.state = saved
        return fresh

    def save(self) -> None:
        """Write index then sidecar, each atomically: a crash leaves the old pair or a pair whose
        sizes disagree, which `load` detects and rebuilds."""
        if self.path is None:
            return
        try:
            with replacing(self.path) as tmp:
                self.index.save(str(tmp))
            write_atomic(self.path.with_suffix(".json"), json.dumps(self.state.__dict__))
        except OSError as exc:  # read-only place: keep it in memory, rebuilt per process
            warnings.warn(f"cannot save the vector index to {self.path} ({exc}); "
                          "it stays in memory (set vector_dir)", stacklevel=2)
            self.path = None

    # -- contents ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def reset(self) -> None:
        self.index.reset()
        self.state.watermark = 0
        self.state.size = 0

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        if len(keys) == 0:
            return
        self.index.add(keys, normalise(vectors), threads=0)
        self.state.watermark = max(self.state.watermark, int(keys.max()))
        self.state.size = len(self.index)

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and cosine distances (0 = same direction) of the k nearest, best first."""
        if len(self.index) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        matches = self.index.search(normalise(vector).reshape(-1), min(k, len(self.index)))
        return np.asarray(matches.keys, dtype=np.int64), np.asarray(matches.distances, np.float32)


def brute_force(keys: np.ndarray, matrix: np.ndarray, vector: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine nearest neighbours with numpy: the baseline the HNSW index is measured
    against (`matrix` rows must already be unit length)."""
    sims = matrix @ normalise(vector).reshape(-1)
    k = min(k, len(sims))
    top = np.argpartition(-sims, k - 1)[:k]
    top = top[np.argsort(-sims[top])]
    return np.asarray(keys)[top], (1.0 - sims[top]).astype(np.float32)
