"""The archive: `Archive(url)` opens (and migrates) the database, stores Reader results, and
answers structured and similar-image queries. This is the Python API the CLI and the REST service
use; nothing else touches the tables.

    with Archive("sqlite:///cxr-archive.db") as archive:
        archive.add_results([Entry(path, sha256, model_id, result=result)])
        hits = archive.search("opacity left base", severity="moderate")
        like = archive.similar(image_id=hits[0].id, k=10)
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np
from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import StaticPool
from sqlalchemy.orm import Session, defer, selectinload

from ..errors import CxrError
from ..records import Box
from ..results import DetectedFinding, Result
from .models import FindingRow, ImageRow, Meta, decode_location, encode_location
from .query import FindingClause, Query, Vocabulary, matching_ids, parse_text
from .reports import ReportText, disagreement_condition, fts_condition, label_key, report_rows
from .vectors import VectorIndex

DEFAULT_URL = "sqlite:///cxr-archive.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD_REVISION = "0007"  # newest file in migrations/versions (a test checks they agree)
VOCABULARY_TTL_S = 30.0
SIMILAR_POOL = 20  # similar() with a report filter looks among the 20 * k nearest


@dataclass
class Entry:
    """One image to store: who it is, and either the Reader's Result or why it failed."""

    path: str
    sha256: str
    model_id: str
    result: Result | None = None
    error: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    view: str | None = None
    quality: dict | None = None  # the gate's report of an image it refused (no result)
    report: ReportText | None = None  # the study's report (archive.reports.prepare_report)


@dataclass
class ImageRecord:
    """An indexed image as the archive returns it (search hit, similar hit or `get`)."""

    id: int
    path: str
    sha256: str
    model_id: str
    status: str
    reason: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    view: str | None = None
    image_size: tuple[int, int] | None = None
    scores: dict[str, float] = field(default_factory=dict)
    findings: list[DetectedFinding] = field(default_factory=list)
    indexed_at: datetime | None = None
    quality: dict | None = None  # the quality gate's report (QualityReport.to_dict())
    score: float | None = None  # search: score of the finding that matched the first clause
    distance: float | None = None  # similar: cosine distance to the query (0 = same direction)
    report: str | None = None  # the study's report text ("" when refused: see report_note)
    report_note: str | None = None
    report_findings: list[dict] = field(default_factory=list)  # mined: disease, certainty, ...

    def to_dict(self) -> dict:
        return {
            "id": self.id, "path": self.path, "sha256": self.sha256, "model_id": self.model_id,
            "status": self.status, "reason": self.reason, "study_uid": self.study_uid,
            "series_uid": self.series_uid, "sop_uid": self.sop_uid, "view": self.view,
            "image_size": list(self.image_size) if self.image_size else None,
            "scores": self.scores, "findings": [f.to_dict() for f in self.findings],
            "indexed_at": self.indexed_at.isoformat() if self.indexed_at else None,
            "quality": self.quality, "score": self.score, "distance": self.distance,
            "report": self.report, "report_note": self.report_note,
            "report_findings": self.report_findings,
        }


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (search, service) never block the indexer
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: committed data survives a crash
    cur.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CxrError(f"not a database URL ({exc}); e.g. sqlite:///cxr-archive.db or "
                       "postgresql://user@host/db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parent = Path(parsed.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise CxrError("the folder for the database file does not exist", parent)
    kwargs = {}
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        kwargs = dict(poolclass=StaticPool, connect_args={"check_same_thread": False})
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:
        raise CxrError(f"cannot use database URL: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:  # a connection error propagates; a missing table is None
        try:
            return conn.exec_driver_sql("select version_num from alembic_version").scalar()
        except (OperationalError, ProgrammingError):
            return None


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (no-op when current; Alembic itself is
    only imported when there is something to do, so opening an archive stays fast)."""
    if schema_revision(engine) == HEAD_REVISION:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Archive:
    """An image archive indexed by a Reader: SQL for findings, usearch for embeddings.

    `vector_dir` is where the similar-image indexes live: by default beside a SQLite file
    (`<db>.vectors/`), in the cxr cache for a server database, in memory for `sqlite://`.
    """

    def __init__(self, url: str = DEFAULT_URL, *, vector_dir: str | Path | None = None,
                 migrate_schema: bool = True, create: bool = True):
        self.url = url
        if not create:
            parsed = make_url(url) if "://" in url else None
            if (parsed is not None and parsed.get_backend_name() == "sqlite"
                    and parsed.database not in (None, "", ":memory:")
                    and not Path(parsed.database).expanduser().exists()):
                raise CxrError("no archive here: index images first (cxr index RUN FOLDER --db ...)",
                               parsed.database)
        self.engine = make_engine(url)
        try:
            if not create and schema_revision(self.engine) is None:
                self.engine.dispose()
                raise CxrError("the database holds no archive: index images first (cxr index)",
                               _redact(url))
            if migrate_schema:
                migrate(self.engine)
            with Session(self.engine) as s, s.begin():
                meta = s.get(Meta, "archive_uuid")
                if meta is None:
                    meta = Meta(key="archive_uuid", value=uuid.uuid4().hex)
                    s.add(meta)
                self.uuid = meta.value
        except IntegrityError:  # two processes created it at once: take the winner's uuid
            with Session(self.engine) as s:
                self.uuid = s.get(Meta, "archive_uuid").value
        except DatabaseError as exc:  # unreachable server, or a file that is no database
            self.engine.dispose()
            raise CxrError(f"cannot open the archive database: {exc.orig}", _redact(url)) from None
        self.vector_dir = Path(vector_dir) if vector_dir else self._default_vector_dir()
        self._vectors: dict[str, VectorIndex] = {}
        self._vocab: Vocabulary | None = None
        self._lock = threading.RLock()
        self._vocab_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def _default_vector_dir(self) -> Path | None:
        parsed = make_url(self.url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                return None
            return Path(parsed.database).expanduser().resolve().with_name(
                Path(parsed.database).name + ".vectors")
        from ..data import data_dir

        key = hashlib.sha256(_redact(self.url).encode()).hexdigest()[:16]
        return data_dir() / "archive-vectors" / key

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- writing -----------------------------------------------------------------------------
    def remember_run(self, model_id: str, run_dir: str | Path) -> None:
        """Note which run folder produced `model_id`, so `cxr search --like FILE` can embed a
        query image without being told the run again."""
        with self.session() as s, s.begin():
            s.merge(Meta(key=f"run:{model_id}"[:64], value=str(Path(run_dir).resolve())))

    def known_runs(self) -> dict[str, str]:
        """model id -> run folder, for the runs that indexed this archive."""
        with self.session() as s:
            return {m.key[4:]: m.value for m in s.scalars(select(Meta).where(Meta.key.like("run:%")))}

    def indexed(self, sha256s: Iterable[str], model_id: str, status: str | None = None) -> set[str]:
        """Which of these content hashes this model has already indexed (with `status` only
        those ok, or only those failed)."""
        hashes = list(set(sha256s))
        found: set[str] = set()
        with self.session() as s:
            for i in range(0, len(hashes), 500):
                chunk = hashes[i:i + 500]
                stmt = select(ImageRow.sha256).where(ImageRow.model_id == model_id,
                                                     ImageRow.sha256.in_(chunk))
                if status:
                    stmt = stmt.where(ImageRow.status == status)
                found.update(s.scalars(stmt))
        return found

    def add_results(self, entries: Iterable[Entry], replace_failed: bool = False) -> list[int | None]:
        """Store a batch in one transaction: all of it or (after a crash) none of it. An entry
        whose (content, model) is already stored is skipped (its id is None), so a resumed or
        concurrent run never duplicates. `replace_failed` first drops failed rows of the same
        content and model (a retry)."""
        entries = list(entries)
        ids: list[int | None] = []
        with self.session() as s, s.begin():
            if replace_failed and entries:
                for model_id in {e.model_id for e in entries}:
                    hashes = [e.sha256 for e in entries if e.model_id == model_id]
                    s.execute(delete(ImageRow).where(
                        ImageRow.model_id == model_id, ImageRow.status == "failed",
                        ImageRow.sha256.in_(hashes)))
            for e in entries:
                ids.append(self._insert(s, e))
        self._vocab = None
        return ids

    def _insert(self, s: Session, e: Entry) -> int | None:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        r = e.result
        values = dict(
            sha256=e.sha256, model_id=e.model_id or (r.model_id if r else ""), path=str(e.path),
            status="ok" if r is not None and e.error is None else "failed",
            reason=e.error if e.error else (None if r is not None else "no result"),
            study_uid=e.study_uid, series_uid=e.series_uid, sop_uid=e.sop_uid, view=e.view,
            height=int(r.image_size[0]) if r and r.image_size[0] else None,
            width=int(r.image_size[1]) if r and r.image_size[1] else None,
            scores={k: float(v) for k, v in r.scores.items()} if r else None,
            embedding=(np.asarray(r.embedding, dtype=np.float32).reshape(-1).tobytes()
                       if r is not None and r.embedding is not None else None),
            quality=(r.quality.to_dict() if r is not None and r.quality is not None else e.quality),
            indexed_at=datetime.now().astimezone(),
        )
        stmt = insert(ImageRow).values(**values).on_conflict_do_nothing(
            index_elements=["sha256", "model_id"]).returning(ImageRow.id)
        image_id = s.execute(stmt).scalar()
        if image_id is None:
            return None
        if r is not None:
            s.add_all(finding_rows(image_id, r.findings))
        if e.report is not None:
            s.add_all(report_rows(image_id, e.report))
        return image_id

    def attach_study_reports(self, reports: dict[str, ReportText]) -> int:
        """Give each stored image of these studies (StudyInstanceUID -> report) that has no
        report yet the study's report; returns how many images got one. For reports that come
        as their own DICOM document, which may be met after the study's images."""
        from sqlalchemy import exists

        from .models import ReportRow

        if not reports:
            return 0
        done = 0
        with self.session() as s, s.begin():
            uids = list(reports)
            for i in range(0, len(uids), 500):
                rows = s.execute(select(ImageRow.id, ImageRow.study_uid).where(
                    ImageRow.study_uid.in_(uids[i:i + 500]),
                    ~exists(select(ReportRow.id).where(ReportRow.image_id == ImageRow.id)))).all()
                for image_id, uid in rows:
                    s.add_all(report_rows(image_id, reports[uid]))
                    done += 1
        return done

    # -- reading -----------------------------------------------------------------------------
    def get(self, image_id: int) -> ImageRecord:
        records = self._records([int(image_id)])
        if not records:
            raise CxrError(f"no indexed image with id {image_id}", _redact(self.url))
        return records[0]

    def count(self, status: str | None = None, model_id: str | None = None) -> int:
        stmt = select(func.count(ImageRow.id))
        if status:
            stmt = stmt.where(ImageRow.status == status)
        if model_id:
            stmt = stmt.where(ImageRow.model_id == model_id)
        with self.session() as s:
            return int(s.scalar(stmt) or 0)

    def models(self) -> list[str]:
        with self.session() as s:
            return sorted(s.scalars(select(ImageRow.model_id).distinct()))

    def vocabulary(self) -> Vocabulary:
        """Diseases, locations, severities and sides present in the archive (cached for
        VOCABULARY_TTL_S, so a long-running service sees what other processes index)."""
        if self._vocab is not None and time.monotonic() - self._vocab_at < VOCABULARY_TTL_S:
            return self._vocab
        v = Vocabulary()
        with self.session() as s:
            for key, name in s.execute(select(FindingRow.disease_key, func.min(FindingRow.disease))
                                       .group_by(FindingRow.disease_key)):
                v.diseases[key] = name
            for (loc,) in s.execute(select(FindingRow.location).distinct()):
                v.locations.update(decode_location(loc))
            v.severities = {x for x in s.scalars(select(FindingRow.severity).distinct()) if x}
            v.sides = {x for x in s.scalars(select(FindingRow.side).distinct()) if x}
        self._vocab, self._vocab_at = v, time.monotonic()
        return v

    def search(self, text: str | Query | None = None, *, finding: str | None = None,
               side: str | None = None, location: str | None = None,
               severity: str | None = None, min_score: float | None = None,
               also: Iterable[str | FindingClause] = (), scores: dict[str, float] | None = None,
               model_id: str | None = None, status: str | None = "ok",
               study_uid: str | None = None, report: str | None = None,
               disagree: str | None = None, disagree_finding: str | None = None,
               limit: int = 50, offset: int = 0) -> list[ImageRecord]:
        """Images whose findings match, best score first.

        `text` ("opacity left base") and the keyword filters describe one finding; each item
        of `also` another finding the same image must have; `scores` thresholds any target's
        score, asserted or not; `report` words must all be in the image's report (full text,
        stemmed); `disagree` ("report-only" | "model-only", optionally for `disagree_finding`)
        keeps images whose report and model disagree. A ready `Query` may be passed instead.
        """
        if isinstance(text, Query):
            query = text
        else:
            vocab = self.vocabulary()
            first = parse_text(text, vocab) if text else FindingClause()
            for name, value in (("finding", finding), ("side", side), ("location", location),
                                ("severity", severity)):
                if value:
                    setattr(first, name, value)
            if min_score is not None:
                first.min_score = min_score
            clauses = [first] + [parse_text(a, vocab) if isinstance(a, str) else a for a in also]
            conditions = []
            if report:
                conditions.append(fts_condition(self.engine.dialect.name, report))
            if disagree:
                conditions.append(disagreement_condition(disagree, self.targets(model_id),
                                                         disagree_finding))
            query = Query(clauses=clauses, scores=dict(scores or {}), model_id=model_id,
                          status=status, study_uid=study_uid, limit=limit, offset=offset,
                          conditions=conditions)
        with self.session() as s:
            pairs = matching_ids(s, query, self.vocabulary())
        records = self._records([i for i, _ in pairs])
        for rec, (_, score) in zip(records, pairs):
            rec.score = score
        return records

    def targets(self, model_id: str | None = None) -> dict[str, set[str]]:
        """label key -> the models' finding keys for it: what each model reads (its score keys),
        so a report's finding is compared only with a model that could have found it."""
        out: dict[str, set[str]] = {}
        models = [model_id] if model_id else self.models()
        with self.session() as s:
            for m in models:
                scores = s.scalar(select(ImageRow.scores).where(
                    ImageRow.model_id == m, ImageRow.status == "ok").limit(1))
                for target in scores or {}:
                    out.setdefault(label_key(target), set()).add(" ".join(target.lower().split()))
        return out

    def similar(self, image_id: int | None = None, *, embedding: np.ndarray | None = None,
                model_id: str | None = None, k: int = 10, report: str | None = None,
                disagree: str | None = None,
                disagree_finding: str | None = None) -> list[ImageRecord]:
        """The k indexed images nearest to an indexed image (itself left out) or to an
        embedding computed by `model_id`'s Reader, nearest first; with `report` / `disagree`
        (as in `search`) only neighbours that also meet those (looked for among the nearest
        SIMILAR_POOL * k)."""
        if image_id is not None:
            with self.session() as s:
                row = s.execute(select(ImageRow.embedding, ImageRow.model_id, ImageRow.status,
                                       ImageRow.reason, ImageRow.path)
                                .where(ImageRow.id == int(image_id))).first()
                if row is None:
                    raise CxrError(f"no indexed image with id {image_id}", _redact(self.url))
                if row.embedding is None:
                    raise CxrError(f"image {image_id} has no embedding (status {row.status}: "
                                   f"{row.reason or ''})", row.path)
                embedding = np.frombuffer(row.embedding, dtype=np.float32)
                model_id = row.model_id
        if embedding is None:
            raise CxrError("similar() needs an image id or an embedding")
        if model_id is None:
            models = self.models()
            if len(models) != 1:
                raise CxrError(f"the archive holds several models {models}: name one")
            model_id = models[0]
        with self._lock:  # no search while another thread adds to the index
            index = self.sync_vectors(model_id, ndim=int(np.asarray(embedding).size))
            pool = k * SIMILAR_POOL if (report or disagree) else k
            keys, dists = index.search(np.asarray(embedding, np.float32),
                                       pool + (image_id is not None))
        pairs = [(int(i), float(d)) for i, d in zip(keys, dists) if i != image_id]
        if report or disagree:
            conditions = [ImageRow.id.in_([i for i, _ in pairs])]
            if report:
                conditions.append(fts_condition(self.engine.dialect.name, report))
            if disagree:
                conditions.append(disagreement_condition(disagree, self.targets(model_id),
                                                         disagree_finding))
            with self.session() as s:
                keep = set(s.scalars(select(ImageRow.id).where(*conditions)))
            pairs = [p for p in pairs if p[0] in keep]
        pairs = pairs[:k]
        records = self._records([i for i, _ in pairs])
        for rec, (_, d) in zip(records, pairs):
            rec.distance = d
        return records

    def embeddings(self, model_id: str, after_id: int = 0, chunk: int = 20000):
        """Yield (ids, float32 matrix) of stored embeddings with id > after_id, in id order."""
        last = after_id
        while True:
            with self.session() as s:
                # (model_id, status) + the id range: one index seek, not a scan of the model
                rows = s.execute(select(ImageRow.id, ImageRow.embedding).where(
                    ImageRow.model_id == model_id, ImageRow.status == "ok", ImageRow.id > last,
                    ImageRow.embedding.is_not(None)).order_by(ImageRow.id).limit(chunk)).all()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            mat = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            yield ids, mat
            last = int(ids[-1])

    def sync_vectors(self, model_id: str, ndim: int | None = None, save: bool = True) -> VectorIndex:
        """The similar-image index of `model_id`, brought up to date with the database: loads the
        saved file, adds rows indexed since, rebuilds if the file disagrees with the DB."""
        with self._lock:
            index = self._vectors.get(model_id)
            if index is None:
                ndim = ndim or self._ndim(model_id)
                if ndim is None:
                    raise CxrError(f"no embeddings stored for model {model_id!r}")
                path = VectorIndex.file_for(self.vector_dir, model_id) if self.vector_dir else None
                if path is not None:
                    index = VectorIndex.load(path, self.uuid, model_id, ndim)
                else:
                    from .vectors import VectorState
                    index = VectorIndex(VectorState(self.uuid, model_id, ndim))
                self._vectors[model_id] = index
            elif ndim is not None and ndim != index.state.ndim:
                raise CxrError(f"embedding has {ndim} values, model {model_id!r} stores "
                               f"{index.state.ndim}")
            if not index.verified:  # once per process: does the file still match the DB?
                with self.session() as s:
                    covered = s.scalar(select(func.count(ImageRow.id)).where(
                        ImageRow.model_id == model_id, ImageRow.status == "ok",
                        ImageRow.embedding.is_not(None),
                        ImageRow.id <= index.state.watermark)) or 0
                if covered != len(index):
                    index.reset()
                index.verified = True
            changed = False
            for ids, mat in self.embeddings(model_id, after_id=index.state.watermark):
                index.add(ids, mat)
                changed = True
            if changed and save:
                index.save()
            return index

    def _ndim(self, model_id: str) -> int | None:
        with self.session() as s:
            emb = s.scalar(select(ImageRow.embedding).where(
                ImageRow.model_id == model_id, ImageRow.embedding.is_not(None)).limit(1))
        return None if emb is None else len(emb) // 4

    def list_images(self, *, status: str | None = None, model_id: str | None = None,
                    limit: int = 50, offset: int = 0) -> list[ImageRecord]:
        """Newest first: for browsing (the service's GET /studies)."""
        return self.search(Query(model_id=model_id, status=status, limit=limit, offset=offset))

    def _records(self, ids: list[int]) -> list[ImageRecord]:
        if not ids:
            return []
        with self.session() as s:
            rows = s.scalars(select(ImageRow).where(ImageRow.id.in_(ids))
                             .options(defer(ImageRow.embedding),
                                      selectinload(ImageRow.findings),
                                      selectinload(ImageRow.report),
                                      selectinload(ImageRow.report_findings))).all()
            by_id = {r.id: _record(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]


def finding_rows(image_id: int, findings: Iterable[DetectedFinding]) -> list[FindingRow]:
    return [FindingRow(
        image_id=image_id, disease=f.disease, disease_key=" ".join(f.disease.lower().split()),
        score=float(f.score), annotation=f.annotation or "", organ=f.organ,
        location=encode_location(f.location), side=(f.side or None),
        severity=(f.severity.lower() if f.severity else None),
        boxes=[dict(label=b.label, x=float(b.x), y=float(b.y), w=float(b.w), h=float(b.h))
               for b in f.boxes],
        confidence={k: float(v) for k, v in f.confidence.items()} or None,
        measurements={k: float(v) for k, v in f.measurements.items()} or None,
        notes=list(f.notes) or None) for f in findings]


def _record(r: ImageRow) -> ImageRecord:
    return ImageRecord(
        id=r.id, path=r.path, sha256=r.sha256, model_id=r.model_id, status=r.status,
        reason=r.reason, study_uid=r.study_uid, series_uid=r.series_uid, sop_uid=r.sop_uid,
        view=r.view, image_size=(r.height, r.width) if r.height else None,
        scores=dict(r.scores or {}), indexed_at=r.indexed_at, quality=r.quality,
        findings=[DetectedFinding(
            disease=f.disease, score=f.score, annotation=f.annotation, organ=f.organ,
            location=decode_location(f.location), side=f.side, severity=f.severity,
            boxes=[Box(**b) for b in (f.boxes or [])], confidence=dict(f.confidence or {}),
            measurements=dict(f.measurements or {}), notes=list(f.notes or []))
            for f in r.findings],
        report=r.report.text if r.report else None, report_note=r.report.note if r.report else None,
        report_findings=[dict(disease=f.disease, certainty=f.certainty, side=f.side,
                              location=list(decode_location(f.location)), severity=f.severity,
                              sentence=f.sentence, label_key=f.label_key,
                              span=[f.span_start, f.span_end] if f.span_start is not None
                              else None) for f in r.report_findings])


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"
