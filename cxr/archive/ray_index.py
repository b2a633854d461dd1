"""`cxr index ... --ray auto|ADDRESS`: the same indexing run with the Readers on a Ray cluster.

Ray Data streams the paths through `map_batches` with an actor pool of Readers (each actor loads
the run once and hashes, skips, reads and annotates its batches); the driver, this process, writes
each returned batch to the archive in one transaction, exactly as the local run does, so resume,
idempotence and the unique keys are the same. Workers never talk to the database; they get the
hashes already stored as one sorted array of digests in the object store.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import CxrError
from .db import Archive, Entry
from .dicom_reports import DicomReport
from .index import (IndexStats, attach_reports, process_batch, result_from_dict, split_reports,
                    study_documents, upright)

RECORD_FIELDS = ("path", "sha256", "model_id", "error", "study_uid", "series_uid", "sop_uid", "view",
                 "quality")


def _known_digests(archive: Archive, model_id: str, status: str | None) -> np.ndarray:
    from sqlalchemy import select

    from .models import ImageRow

    stmt = select(ImageRow.sha256).where(ImageRow.model_id == model_id)
    if status:
        stmt = stmt.where(ImageRow.status == status)
    with archive.session() as s:
        digests = [bytes.fromhex(h) for h in s.scalars(stmt) if len(h) == 64]
    return np.sort(np.array(digests, dtype="S32")) if digests else np.zeros(0, dtype="S32")


class ReaderActor:
    """One Reader per actor, loaded once; turns a batch of paths into storable records."""

    def __init__(self, run_dir: str, known: np.ndarray, dicom_out: str | None = None,
                 force: bool = False, engine: str = "torch"):
        from ..reader import Reader
        from .index import reader_model_id

        self.reader = Reader.load(run_dir, engine=engine)
        self.model_id = reader_model_id(self.reader)
        self.known = known
        self.dicom_out = dicom_out
        self.force = force

    def _stored(self, hashes: list[str]) -> set[str]:
        if len(self.known) == 0:
            return set()
        digests = np.array([bytes.fromhex(h) for h in hashes], dtype="S32")
        pos = np.searchsorted(self.known, digests).clip(0, len(self.known) - 1)
        return {h for h, hit in zip(hashes, self.known[pos] == digests) if hit}

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        views = {p: str(v) for p, v in zip(paths, batch["view"]) if v} if "view" in batch else {}
        out = process_batch(self.reader, self.model_id, paths, self._stored,
                            heatmaps=bool(self.dicom_out), force=self.force, views=views)
        records, embeddings = [], []
        for e, image in zip(out.entries, out.images):
            rec = {k: getattr(e, k) for k in RECORD_FIELDS}
            rec["result"] = e.result.to_dict() if e.result is not None else None
            emb = e.result.embedding if e.result is not None else None
            embeddings.append(b"" if emb is None else np.asarray(emb, np.float32).tobytes())
            if self.dicom_out and e.result is not None and image is not None:
                from .dicom_out import write_result_dicom

                write_result_dicom(e.result, upright(image, e.result), self.dicom_out,
                                   name=e.sha256[:16])
            records.append(json.dumps(rec))
        # counts ride along on the first row (a batch may have no rows at all)
        counts = json.dumps({"seen": len(paths), "skipped": out.skipped,
                             "duplicates": out.duplicates,
                             "reports": [dataclasses.asdict(r) for r in out.reports]})
        return {"record": np.array(records + [counts], dtype=object),
                "embedding": np.array(embeddings + [b""], dtype=object),
                "kind": np.array(["entry"] * len(records) + ["counts"], dtype=object)}


def _entry(record: str, embedding: bytes) -> Entry:
    rec = json.loads(record)
    result = rec.pop("result")
    e = Entry(**rec)
    if result is not None:
        emb = np.frombuffer(embedding, dtype=np.float32) if embedding else None
        e.result = result_from_dict(result, emb)
    return e


def connect(address: str | None) -> None:
    """Join Ray: "auto" (or None) joins the cluster this machine belongs to if there is one,
    else starts a local one; "local" always starts a fresh local one; anything else is a cluster
    address. A Ray already initialised by the caller (a test, a notebook) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    quiet = dict(include_dashboard=False, log_to_driver=False)
    if address == "local":
        ray.init(**quiet)
    elif address in (None, "", "auto"):
        try:
            ray.init(address="auto", **quiet)
        except (ConnectionError, RuntimeError, ValueError):
            ray.init(**quiet)
    else:
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:
            raise CxrError(f"cannot connect to the Ray cluster at {address}: {exc}") from None


def index_with_ray(archive: Archive, run_dir: str | Path, paths: Iterable[str], *,
                   address: str | None = "auto", batch_size: int = 32,
                   num_actors: int | None = None, dicom_out: str | Path | None = None,
                   progress: bool = True, retry_failed: bool = False,
                   force: bool = False, engine: str = "torch") -> IndexStats:
    """Index `paths` (or (path, report) items, or `SourceImage`s) with Readers of `run_dir` on Ray;
    the caller's process writes the archive and mines the reports."""
    import ray
    from tqdm import tqdm

    from ..reader import Reader
    from .index import reader_model_id

    run_dir = str(Path(run_dir).resolve())
    model_id = reader_model_id(Reader.load(run_dir))
    archive.remember_run(model_id, run_dir)
    connect(address)
    status = "ok" if retry_failed else None
    known = _known_digests(archive, model_id, status)
    listed, by_path, views = split_reports(list(paths))
    items, reports = [], {}  # reports stay here: mined in this process as the batches come back
    for path in listed:
        items.append({"path": str(Path(path).resolve()), "view": str(views.get(path) or "")})
        if path in by_path:
            reports[items[-1]["path"]] = by_path[path]
    stats = IndexStats()
    study_reports: dict[str, object] = {}  # study uid -> its report from a DICOM document
    start = time.perf_counter()
    if not items:
        return stats
    if num_actors is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        num_actors = max(1, min(cpus, (len(items) + batch_size - 1) // batch_size))
    ds = ray.data.from_items(items, override_num_blocks=max(1, (len(items) + batch_size - 1)
                                                             // batch_size))
    ds = ds.map_batches(ReaderActor, fn_constructor_args=(run_dir, known,
                                                          str(dicom_out) if dicom_out else None,
                                                          force, engine),
                        batch_size=batch_size, batch_format="numpy", concurrency=num_actors,
                        num_cpus=1)
    bar = tqdm(total=len(items), desc="indexing (ray)", unit="img", disable=not progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            entries, documents = [], []
            for rec, emb, kind in zip(batch["record"], batch["embedding"], batch["kind"]):
                if kind == "counts":
                    c = json.loads(rec)
                    stats.seen += c["seen"]
                    stats.skipped += c["skipped"]
                    stats.duplicates += c["duplicates"]
                    documents += [DicomReport(**d) for d in c.get("reports", ())]
                    bar.update(c["seen"])
                else:
                    entries.append(_entry(rec, emb))
            attach_reports(entries, reports)
            found = study_documents(documents, study_reports, entries)
            stats.reports += len(documents)
            ids = archive.add_results(entries, replace_failed=retry_failed)
            if found:
                archive.attach_study_reports(found)
            stats.count(entries, ids)
            bar.set_postfix(ok=stats.indexed, failed=stats.failed, skipped=stats.skipped)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    if stats.indexed:
        archive.sync_vectors(model_id)
    return stats
