"""The REST service and web viewer: `create_app(run_dir, db_url)` -> a FastAPI app.

    POST /annotate            upload PNG / JPEG / DICOM -> findings, scores, annotations, boxes
                              (?heatmap=true: heatmaps as 8-bit grey PNG, base64, at most 512 px
                              on the long side, to stretch over image_size; ?image=true: the
                              normalised image as PNG, turned upright if the gate turned it;
                              ?embedding=true; ?store=true: index it). The quality gate runs
                              first: an image it refuses gets 422 with the reason
                              ("FILE: not read: ..."), unless ?force=true; `quality` says what
                              it found and whether the film was turned back before reading.
    GET  /studies             indexed images, newest first, paged
    GET  /studies/{id}        one indexed image (?heatmap=true re-runs the model for heatmaps)
    GET  /studies/{id}/report the study's report, its mined mentions (with offsets in the text),
                              the model's findings and where the two disagree
    GET  /studies/{id}/image  its pixels as PNG (the server reads the path it stored itself), turned
                              upright if the quality gate turned it before reading
    GET  /search              structured filters, report= words, disagree=report-only|model-only,
                              or like_id= for similar images
    POST /search/similar      similar images to an embedding (from /annotate?embedding=true)
    GET  /vocabulary          diseases, sides, locations, severities present in the archive
    GET  /health              model, archive size, batching counters
    GET  /audit               the last entries of the audit log (admin)
    GET  /                    the web page (static/); OpenAPI docs at /docs (served locally when
                              swagger-ui-bundle-v2 is installed), the schema at /openapi.json

The model loads once (lifespan); uploads from concurrent requests are micro-batched into one
Reader call in a worker thread (see batching.py). Nothing a client sends is ever used as a path:
an upload is written to a server-made temporary file (its name only lends a known suffix) and
stored uploads go under the server's upload folder, named by content hash. Nothing the server
sends names a file of its own: images are ids and /studies/{id}/image URLs, and error messages
leave out absolute paths.

Who may call what: bearer tokens with roles, and an audit log (see auth.py; `tokens`, `audit_log`).
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi import Query as Param
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..atomic import write_atomic
from ..errors import CxrError
from ..images import IMAGE_SUFFIXES
from .auth import AuditLog, Auth, Tokens
from .batching import MicroBatcher

STATIC = Path(__file__).resolve().parent / "static"
DISCLAIMER = "Research use only - not for diagnosis."
HEATMAP_SIDE = 512  # longest side of a heatmap PNG


@dataclass
class Settings:
    run_dir: str
    db_url: str
    max_upload_bytes: int = 32 << 20
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    upload_dir: Path | None = None
    device: str | None = None
    threads: int | None = None


# -- uploads ---------------------------------------------------------------------------------
class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 with a clear message, whether the
    client announced it (Content-Length) or streams it (counted as it arrives, never buffered)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return (f"upload too large: the limit is {self.max_bytes / 2**20:g} MiB "
                "(cxr serve --max-upload-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # Read (and drop) what the client sends, so it sees the 413 rather than a reset
            # connection; a body far beyond the limit is not waited for.
            if int(length) <= 4 * self.max_bytes:
                while (await receive()).get("more_body"):
                    pass
            response = JSONResponse({"detail": self.message()}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message())
            return msg

        return await self.app(scope, counted, send)


def _safe_name(filename: str | None) -> str:
    """The client's file name for messages only: last component, printable, short."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:120]
    return name or "upload"


def _suffix(filename: str | None) -> str:
    suffix = Path(_safe_name(filename)).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ""


def decode_upload(data: bytes, filename: str | None):
    """Upload bytes -> `LoadedImage`, through a temporary file the server names itself."""
    from ..images import read_image

    name = _safe_name(filename)
    if not data:
        raise CxrError("the upload is empty", name)
    fd, tmp = tempfile.mkstemp(prefix="cxr-upload-", suffix=_suffix(filename))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return read_image(tmp)
        except CxrError as exc:
            raise CxrError(exc.problem, name) from None
        except Exception as exc:  # a decoder bug must still answer 4xx, not 500
            raise CxrError(f"cannot read image: {exc}", name) from None
    finally:
        os.unlink(tmp)


def png_base64(gray: np.ndarray, max_side: int | None = None) -> str:
    """float (H, W) in [0, 1] -> 'data:image/png;base64,...' (8-bit grey), shrunk to at most
    `max_side` pixels on its long side (keeping the aspect ratio) when given."""
    if max_side and max(gray.shape) > max_side:
        from ..images import resize

        scale = max_side / max(gray.shape)
        gray = resize(gray, (max(1, round(gray.shape[0] * scale)), max(1, round(gray.shape[1] * scale))))
    return "data:image/png;base64," + base64.b64encode(png_bytes(gray)).decode("ascii")


def heatmaps_json(heatmaps: dict[str, np.ndarray]) -> dict[str, str]:
    """Heatmaps as PNG data URLs of at most HEATMAP_SIDE px (a CAM is coarse: the client
    stretches it over `image_size`)."""
    return {k: png_base64(v, HEATMAP_SIDE) for k, v in heatmaps.items()}


def png_bytes(gray: np.ndarray) -> bytes:
    from PIL import Image

    arr = (np.clip(np.nan_to_num(gray), 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def default_upload_dir(db_url: str) -> Path:
    """Where stored uploads live: beside a SQLite file, else in the cxr cache (per database)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(db_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database).expanduser().resolve()
        return db.with_name(db.name + ".uploads")
    from ..data import data_dir

    key = hashlib.sha256(parsed.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    return data_dir() / "archive-uploads" / key


# -- the app ---------------------------------------------------------------------------------
class SimilarQuery(BaseModel):
    embedding: list[float] = Field(..., min_length=1, max_length=65536)
    k: int = Field(10, ge=1, le=200)


def create_app(run_dir: str | Path, db_url: str, *, max_upload_mb: float = 32, max_batch: int = 16,
               batch_wait_ms: float = 5.0, upload_dir: str | Path | None = None,
               device: str | None = None, threads: int | None = None, reader=None,
               archive=None, tokens: Tokens | None = None,
               audit_log: str | Path | None = None) -> FastAPI:
    """The service for one trained run and one archive database. `reader` / `archive` may be
    given ready (the CLI opens them first, to report a bad run or URL in one line); otherwise
    they are opened at start-up. `threads` sets torch's intra-op threads for the model (default:
    torch's choice; 1 is often fastest on a busy or small CPU). `tokens`: who may call what
    (none: open); `audit_log`: the JSON-lines file of who read or searched what (default: beside
    the upload folder, see `default_audit_log`)."""
    settings = Settings(str(run_dir), db_url, int(max_upload_mb * 2**20), int(max_batch),
                        float(batch_wait_ms), Path(upload_dir) if upload_dir else None, device,
                        threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.reader = reader
        if state.reader is None:
            from ..reader import Reader

            state.reader = await run_in_threadpool(Reader.load, settings.run_dir, settings.device)
        # the quality gate's model loads now, once, not on the first upload
        state.gate = await run_in_threadpool(lambda: getattr(state.reader, "gate", None))
        state.archive = archive
        if state.archive is None:
            from ..archive.db import Archive

            state.archive = await run_in_threadpool(Archive, settings.db_url)
        state.upload_dir = settings.upload_dir or default_upload_dir(settings.db_url)
        state.batcher = MicroBatcher(lambda items: _run_reader(state.reader, items),
                                     settings.max_batch, settings.batch_wait_ms,
                                     initializer=lambda: _set_threads(settings.threads))
        state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            if archive is None:
                state.archive.close()

    swagger = _swagger_files()
    app = FastAPI(title="cxr", version=_version(), lifespan=lifespan,
                  docs_url=None if swagger else "/docs", redoc_url=None,
                  description="Chest X-ray reading: findings, annotations, boxes, heatmaps; a "
                              f"searchable archive. {DISCLAIMER}")
    app.state.settings = settings
    if swagger:  # API docs from local files: hospital networks are often offline
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs-static", StaticFiles(directory=swagger), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        def docs():
            return get_swagger_ui_html(openapi_url=app.openapi_url, title="cxr API",
                                       swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-static/swagger-ui.css",
                                       swagger_favicon_url="/docs-static/favicon-32x32.png")

    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    audit = AuditLog(audit_log or default_audit_log(db_url, settings.upload_dir))
    app.state.audit = audit
    app.add_middleware(Auth, tokens=tokens or Tokens(), audit=audit, routes_of=lambda: app.routes)

    @app.exception_handler(CxrError)
    async def _bad_input(request: Request, exc: CxrError):
        # a client's upload is named by its own (relative) name; a server file is not named
        named = exc.path is not None and not os.path.isabs(exc.path)
        return JSONResponse({"detail": str(exc) if named else exc.problem}, status_code=400)

    # -- annotate ----------------------------------------------------------------------------
    @app.post("/annotate", summary="Read one chest radiograph (PNG, JPEG or DICOM)")
    async def annotate(request: Request, file: UploadFile = File(..., description="the image"),
                       heatmap: bool = False, image: bool = False, embedding: bool = False,
                       store: bool = False, force: bool = False):
        state = request.app.state
        data = await file.read()
        loaded = await run_in_threadpool(decode_upload, data, file.filename)
        result = await _read(state.batcher, loaded, heatmap, force)
        if result.refused:
            raise HTTPException(422, f"{_safe_name(file.filename)}: {result.quality.summary()}")
        out = {"filename": _safe_name(file.filename), "view": loaded.view,
               **await run_in_threadpool(result_json, result, heatmap)}
        if image:
            out["image"] = await run_in_threadpool(png_base64, _upright(loaded.pixels, result))
        if embedding and result.embedding is not None:
            out["embedding"] = [float(x) for x in result.embedding]
        if store:
            out["id"] = await run_in_threadpool(_store, state, data, file.filename, loaded, result)
        out["disclaimer"] = DISCLAIMER
        return out

    # -- archive -----------------------------------------------------------------------------
    @app.get("/studies", summary="Indexed images, newest first")
    def studies(request: Request, limit: int = Param(50, ge=1, le=500), offset: int = Param(0, ge=0),
                status: str | None = Param("ok", pattern="^(ok|failed)$")):
        archive = request.app.state.archive
        items = archive.list_images(status=status, limit=limit, offset=offset)
        request.state.audit_ids = [r.id for r in items]
        return {"total": archive.count(status=status), "limit": limit, "offset": offset,
                "items": [record_json(r) for r in items]}

    @app.get("/studies/{image_id}", summary="One indexed image")
    async def study(request: Request, image_id: int, heatmap: bool = False):
        state = request.app.state
        record = await run_in_threadpool(_get, state.archive, image_id)
        out = record_json(record)
        if heatmap:
            loaded = await run_in_threadpool(_read_stored, record)
            result = await _read(state.batcher, loaded, True, True)  # it was read when indexed
            out["heatmaps"] = await run_in_threadpool(heatmaps_json, result.heatmaps)
            out["heatmap_model_id"] = result.model_id
        return out

    @app.get("/studies/{image_id}/report", summary="An indexed image's report beside the "
             "model: mined mentions with their place in the text, the model's findings, and "
             "where the two disagree")
    def study_report(request: Request, image_id: int):
        from ..archive.reports import compare

        archive = request.app.state.archive
        record = _get(archive, image_id)
        return compare(record, archive.targets(record.model_id))

    @app.get("/studies/{image_id}/image", summary="An indexed image as PNG",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def study_image(request: Request, image_id: int):
        record = _get(request.app.state.archive, image_id)
        pixels = _read_stored(record).pixels
        if record.quality:  # as it was read: turned upright if the gate did (its boxes are)
            from ..quality.gate import QualityGate, QualityReport

            pixels = QualityGate.correct(pixels, QualityReport.from_dict(record.quality))
        return Response(png_bytes(pixels), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.get("/search", summary="Search by finding (structured), report words, report/model "
             "disagreement, or by similarity (like_id)")
    def search(request: Request, q: str | None = Param(None, description='e.g. "opacity left base"'),
               finding: str | None = None, side: str | None = None, location: str | None = None,
               severity: str | None = None, min_score: float | None = Param(None, ge=0, le=1),
               report: str | None = Param(None, description='words the report must contain, '
                                          'e.g. "small effusion" (full text, stemmed)'),
               disagree: str | None = Param(None, pattern="^(report-only|model-only)$",
                                            description="report-only: the report asserts a "
                                            "finding the model did not flag; model-only: the "
                                            "reverse (with finding=: that finding only)"),
               like_id: int | None = Param(None, description="images similar to this indexed id"),
               k: int = Param(10, ge=1, le=200), limit: int = Param(50, ge=1, le=500),
               offset: int = Param(0, ge=0)):
        archive = request.app.state.archive
        if like_id is not None:
            _get(archive, like_id)
            hits = archive.similar(image_id=like_id, k=k, report=report or None,
                                   disagree=disagree or None,
                                   disagree_finding=(finding or None) if disagree else None)
            request.state.audit_ids = [r.id for r in hits]
            return {"like_id": like_id, "items": [record_json(r) for r in hits]}
        hits = archive.search(q or None, finding=None if disagree else (finding or None),
                              side=side or None, location=location or None,
                              severity=severity or None, min_score=min_score,
                              report=report or None, disagree=disagree or None,
                              disagree_finding=(finding or None) if disagree else None,
                              limit=limit, offset=offset)
        request.state.audit_ids = [r.id for r in hits]
        query = {"q": q, "finding": finding, "side": side, "location": location,
                 "severity": severity, "min_score": min_score, "report": report,
                 "disagree": disagree}
        return {"query": {k_: v for k_, v in query.items() if v not in (None, "")},
                "items": [record_json(r) for r in hits]}

    @app.post("/search/similar", summary="Images similar to an embedding from /annotate")
    def search_similar(request: Request, body: SimilarQuery):
        state = request.app.state
        hits = state.archive.similar(embedding=np.asarray(body.embedding, np.float32),
                                     model_id=state.reader.model_id, k=body.k)
        request.state.audit_ids = [r.id for r in hits]
        return {"items": [record_json(r) for r in hits]}

    @app.get("/vocabulary", summary="What the archive's findings hold (for search menus)")
    def vocabulary(request: Request):
        return request.app.state.archive.vocabulary().to_dict()

    @app.get("/health", summary="Liveness, model, archive size and batching counters")
    def health(request: Request):
        state = request.app.state
        reader_ = state.reader
        return {"status": "ok", "model_id": reader_.model_id, "targets": list(reader_.targets),
                "device": str(reader_.device), "threads": settings.threads,
                "quality_gate": getattr(state.gate, "model_id", None),
                "archive": {"images": state.archive.count(status="ok")},
                "batching": {"max_batch": settings.max_batch, "wait_ms": settings.batch_wait_ms,
                             **state.batcher.stats.to_dict()},
                "max_upload_mb": settings.max_upload_bytes / 2**20, "disclaimer": DISCLAIMER}

    @app.get("/audit", summary="The last entries of the audit log: who read or searched what")
    def audit_entries(request: Request, limit: int = Param(100, ge=1, le=10000)):
        return {"items": request.app.state.audit.tail(limit)}

    # -- the page ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# -- helpers ---------------------------------------------------------------------------------
def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _run_reader(reader, items: list[tuple]):
    """Reader calls for a micro-batch of (image, heatmap, force): one call for the usual requests,
    one more for those that force reading past the quality gate; heatmaps only for the requests
    that asked."""
    results: list = [None] * len(items)
    for force in (False, True):
        todo = [i for i, item in enumerate(items) if item[2] == force]
        if not todo:
            continue
        out = reader([items[i][0] for i in todo], heatmaps=any(items[i][1] for i in todo),
                     batch_size=max(len(todo), 1), force=force)
        for i, result in zip(todo, out):
            if not items[i][1]:
                result.heatmaps = {}
            results[i] = result
    return results


def _upright(pixels: np.ndarray, result) -> np.ndarray:
    """The image as the Reader read it (turned back if the gate did), so boxes fall in place."""
    if result.quality is None or not result.quality.corrected:
        return pixels
    from ..quality.gate import QualityGate

    return QualityGate.correct(pixels, result.quality)


async def _read(batcher, image, heatmap: bool, force: bool = False):
    """The Reader on one image (a LoadedImage) through the micro-batcher; a model failure is a
    500 that says so."""
    try:
        return await batcher.submit((image, heatmap, force))
    except CxrError:
        raise
    except Exception as exc:
        import logging

        logging.getLogger("cxr.service").exception("the model failed on an image")
        raise HTTPException(500, f"the model failed on this image ({type(exc).__name__}; see "
                                 "the server's log)") from None


def result_json(result, heatmap: bool) -> dict:
    out = result.to_dict()
    if heatmap:
        out["heatmaps"] = heatmaps_json(result.heatmaps)
    return out


def record_json(record) -> dict:
    """An archive record for a client: its id and image URL, never the server's file path
    (a folder named after a patient would leak), also not inside a failure's reason."""
    d = record.to_dict()
    path = d.pop("path", None)
    if d.get("reason") and path:
        for text in (str(path), str(Path(path).parent)):
            d["reason"] = d["reason"].replace(text, f"image {record.id}")
    d["image_url"] = f"/studies/{record.id}/image"
    return d


def _get(archive, image_id: int):
    try:
        return archive.get(image_id)
    except CxrError as exc:
        raise HTTPException(404, str(exc.problem)) from None


def _read_stored(record):
    """The pixels of an indexed image, from the path the indexer stored (never a client's)."""
    from ..images import read_image

    if record.status != "ok":
        raise HTTPException(404, f"image {record.id} failed to index: {record.reason}")
    try:
        return read_image(record.path)
    except CxrError as exc:
        raise HTTPException(410, f"image {record.id}: the indexed file cannot be read any more "
                                 f"({exc.problem})") from None


def _store(state, data: bytes, filename: str | None, loaded, result) -> int:
    """Keep the upload under the server's upload folder and index it; returns its archive id."""
    from sqlalchemy import select

    from ..archive.db import Entry
    from ..archive.models import ImageRow

    sha = hashlib.sha256(data).hexdigest()
    folder = Path(state.upload_dir) / sha[:2]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sha}{_suffix(filename) or '.img'}"
    if not path.exists():
        write_atomic(path, data)  # a unique temporary name: two uploads at once are safe
    meta = loaded.meta or {}
    uid = lambda key: str(meta[key])[:64] if meta.get(key) else None  # noqa: E731
    model_id = state.reader.model_id
    entry = Entry(str(path), sha, model_id, result=result, study_uid=uid("StudyInstanceUID"),
                  series_uid=uid("SeriesInstanceUID"), sop_uid=uid("SOPInstanceUID"),
                  view=loaded.view)
    (image_id,) = state.archive.add_results([entry])
    if image_id is None:  # this content was indexed by this model before
        with state.archive.session() as s:
            image_id = s.scalar(select(ImageRow.id).where(ImageRow.sha256 == sha,
                                                           ImageRow.model_id == model_id))
    return int(image_id)


def default_audit_log(db_url: str, upload_dir: Path | None = None) -> Path:
    """The audit log beside the upload folder: `<db>.uploads` -> `<db>.audit.jsonl`."""
    uploads = Path(upload_dir) if upload_dir else default_upload_dir(db_url)
    stem = uploads.name[:-len(".uploads")] if uploads.name.endswith(".uploads") else uploads.name
    return uploads.with_name(stem + ".audit.jsonl")


def _swagger_files() -> str | None:
    """Swagger UI's files from the `swagger-ui-bundle-v2` wheel, if installed (else FastAPI's
    default /docs, which loads them from a CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return str(path) if (path / "swagger-ui-bundle.js").exists() else None


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"
