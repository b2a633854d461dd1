"""The indexing run: walk a folder (or a source adapter) lazily, read each image, run the Reader
in batches and store every image in the archive, ok or failed. An image the quality gate refuses
(no chest radiograph, a view the run does not read) is stored as failed with the reason,
`not read: ...`, so `cxr search --failed` lists it and a later run does not read it again.

Resumable and idempotent by construction: an image's identity is (content sha256, model id); a
batch is committed in one transaction; before reading a batch the run asks the archive which of
its hashes are stored and skips them. A crash loses at most the batch in flight, which the next
run redoes; the unique constraint makes a duplicate impossible even with two runs at once.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ..errors import CxrError
from ..hashing import file_sha256
from ..images import IMAGE_SUFFIXES
from ..records import Box
from ..results import DetectedFinding, Result
from .db import Archive, Entry

REFUSED = "not read: "  # the reason's prefix for an image the quality gate refused


class SourceImage(NamedTuple):
    """An image a source adapter lists: its file, its study's report sections, and the view the
    source records (NIH's View Position, a manifest's `view` column, Open-i's DICOM metadata)
    for files that do not say it themselves (a PNG): the archive stores it, and the Reader takes
    it as a DICOM's ViewPosition (no cardiothoracic ratio on an AP film)."""

    path: str
    report: object | None = None
    view: str | None = None

@dataclass
class IndexStats:
    seen: int = 0
    indexed: int = 0
    failed: int = 0
    refused: int = 0  # of the failed: not read, the quality gate refused them
    skipped: int = 0  # already in the archive (this model, same content)
    duplicates: int = 0  # same content met twice in this run
    reports: int = 0  # report documents met (DICOM SR, encapsulated CDA/PDF): not images
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # first few (path, reason)

    @property
    def images_per_second(self) -> float:
        return (self.indexed + self.failed) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"seen": self.seen, "indexed": self.indexed, "failed": self.failed,
                "refused": self.refused,
                "skipped": self.skipped, "duplicates": self.duplicates, "reports": self.reports,
                "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2),
                "failures": [list(f) for f in self.failures]}

    def count(self, entries: list[Entry], ids: list[int | None]) -> None:
        for e, i in zip(entries, ids):
            if i is None:
                self.duplicates += 1
            elif e.error:
                self.failed += 1
                self.refused += e.error.startswith(REFUSED)
                if len(self.failures) < 20:
                    self.failures.append((e.path, e.error))
            else:
                self.indexed += 1


# -- inputs -----------------------------------------------------------------------------------
def _is_dicom_without_suffix(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def walk_images(root: str | Path) -> Iterator[str]:
    """Image files under `root`, depth first in name order, found lazily (a PACS export of a
    million files starts indexing at once). Hidden files and folders are left out; a file with no
    suffix is taken when it carries the DICOM preamble."""
    root = Path(root).expanduser().absolute()  # stored paths must not depend on the cwd
    if root.is_file():
        yield str(root)
        return
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix == "" and _is_dicom_without_suffix(path)):
                yield str(path)


def iter_inputs(source: str | Path, reports: bool = False) -> Iterator:
    """Paths of the images to index: a folder or file on disk, else a source spec that
    `cxr.sources.open_source` understands (e.g. "nih:/data/nih"). With `reports`, a source's
    images come as `SourceImage`s (path, the study's report sections, the recorded view) so the
    archive stores the report and the view too."""
    path = Path(str(source)).expanduser()
    if path.exists():
        yield from walk_images(path)
        return
    try:
        from ..sources import open_source
    except ImportError:
        raise CxrError("no such file or folder", source) from None
    for study in open_source(str(source)):
        for image in study.images:
            if image.path is not None:
                yield SourceImage(str(image.path), study.report or None, image.view or None) \
                    if reports else str(image.path)


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


# -- one batch --------------------------------------------------------------------------------
def content_hash(path: str) -> tuple[str, str | None]:
    """(sha256 of the bytes, None) or, for a file that cannot be read, a stable stand-in hash
    of its path and the reason, so the failure is recorded once, not retried on every run."""
    try:
        return file_sha256(path), None
    except OSError as exc:
        stand_in = hashlib.sha256(f"unreadable:{os.path.abspath(path)}".encode()).hexdigest()
        return stand_in, f"cannot read file ({exc.strerror or exc})"


def reader_model_id(reader) -> str:
    model_id = getattr(reader, "model_id", None)
    if not model_id:
        raise CxrError("the Reader does not name its model (model_id)")
    return str(model_id)


@dataclass
class Batch:
    """What one batch of paths became: entries to store (with their loaded images, None for
    failures) and how many were skipped as stored already or as repeated content."""

    entries: list[Entry]
    images: list
    skipped: int = 0
    duplicates: int = 0
    reports: list = field(default_factory=list)  # DicomReports met among the files (not images)


def process_batch(reader, model_id: str, paths: list[str],
                  known: Callable[[list[str]], set[str]], heatmaps: bool = False,
                  force: bool = False, views: dict[str, str] | None = None) -> Batch:
    """Hash, skip what `known` says is stored, read and run the Reader on the rest. A file that
    cannot be read, or on which the Reader fails, becomes a failed entry; the batch goes on.
    `views`: path -> the view a source records, for files that do not say it themselves."""
    from ..images import read_image

    hashed = [(p, *content_hash(p)) for p in paths]
    stored = known([h for _, h, _ in hashed])
    batch = Batch([], [])
    seen: set[str] = set()
    for path, sha, error in hashed:
        if sha in stored:
            batch.skipped += 1
            continue
        if sha in seen:
            batch.duplicates += 1
            continue
        seen.add(sha)
        loaded = None
        if error is None:
            try:
                loaded = read_image(path)
            except CxrError as exc:
                error = exc.problem
                report = _report_document(path)
                if report is not None:  # a study's report, not a failed image
                    batch.reports.append(report)
                    continue
            except Exception as exc:  # a reader bug must not stop an archive run
                error = f"cannot read image: {exc!r}"[:500]
        if loaded is None:
            batch.entries.append(Entry(path, sha, model_id, error=error))
            batch.images.append(None)
            continue
        if loaded.view is None and (views or {}).get(path):  # the file's own tag first
            loaded.view = str(views[path]).strip().upper()
        meta = loaded.meta or {}
        batch.entries.append(Entry(
            path, sha, model_id, study_uid=_uid(meta, "StudyInstanceUID"),
            series_uid=_uid(meta, "SeriesInstanceUID"), sop_uid=_uid(meta, "SOPInstanceUID"),
            view=loaded.view))
        batch.images.append(loaded)
    todo = [i for i, im in enumerate(batch.images) if im is not None]
    for i, result in zip(todo, run_reader(reader, [batch.images[i] for i in todo], heatmaps, force)):
        if isinstance(result, Result):
            if result.model_id and result.model_id != model_id:
                raise CxrError(f"the Reader returned model {result.model_id!r}, "
                               f"expected {model_id!r}")
            if result.refused:  # not read: no result, the reason and the gate's report
                batch.entries[i].error = f"{REFUSED}{'; '.join(result.quality.reasons)}"
                batch.entries[i].quality = result.quality.to_dict()
            else:
                batch.entries[i].result = result
        else:
            batch.entries[i].error = result
    return batch


def _report_document(path: str):
    """The report in a DICOM file that is no image (text SR, encapsulated CDA/PDF), or None."""
    if Path(path).suffix.lower() not in (".dcm", ".dicom", "") and not _is_dicom_without_suffix(Path(path)):
        return None
    from .dicom_reports import read_dicom_report

    return read_dicom_report(path)


def run_reader(reader, pixels: list, heatmaps: bool = False,
               force: bool = False) -> list[Result | str]:
    """The Reader on a batch of LoadedImages or arrays (full-size heatmaps only when asked: the
    archive stores boxes, not maps); if the batch fails, image by image, so one bad image costs
    only itself (its entry gets the reason)."""
    if not pixels:
        return []

    def call(items):
        options = dict(heatmaps=heatmaps, batch_size=max(len(items), 1))
        try:
            return reader(items, **options, force=True) if force else reader(items, **options)
        except TypeError:  # a Reader without these options
            return reader(items)

    try:
        results = call(pixels)
        if len(results) == len(pixels):
            return list(results)
    except Exception:
        pass
    out: list[Result | str] = []
    for p in pixels:
        try:
            out.append(call([p])[0])
        except Exception as exc:
            out.append(f"the model failed on this image: {exc!r}"[:500])
    return out


def _uid(meta: dict, key: str) -> str | None:
    value = meta.get(key)
    return str(value)[:64] if value else None


# -- the run ----------------------------------------------------------------------------------
def index_images(archive: Archive, reader, paths: Iterable[str], *, batch_size: int = 32,
                 dicom_out: str | Path | None = None, progress: bool = True,
                 retry_failed: bool = False, force: bool = False) -> IndexStats:
    """Index `paths` with `reader` into `archive`, one committed transaction per batch."""
    from tqdm import tqdm

    model_id = reader_model_id(reader)
    stats = IndexStats()
    start = time.perf_counter()
    status = "ok" if retry_failed else None
    known = lambda hashes: archive.indexed(hashes, model_id, status=status)  # noqa: E731
    bar = tqdm(desc="indexing", unit="img", disable=not progress, dynamic_ncols=True)
    study_reports: dict[str, object] = {}  # study uid -> its report from a DICOM document
    try:
        for items in batched(paths, batch_size):
            paths_batch, reports, views = split_reports(items)
            batch = process_batch(reader, model_id, paths_batch, known, heatmaps=bool(dicom_out),
                                  force=force, views=views)
            attach_reports(batch.entries, reports)
            found = study_documents(batch.reports, study_reports, batch.entries)
            stats.reports += len(batch.reports)
            ids = archive.add_results(batch.entries, replace_failed=retry_failed)
            if found:  # images of those studies stored before (earlier batches, earlier runs)
                archive.attach_study_reports(found)
            stats.seen += len(paths_batch)
            stats.skipped += batch.skipped
            stats.duplicates += batch.duplicates
            stats.count(batch.entries, ids)
            if dicom_out:
                _write_dicom_outputs(batch, ids, dicom_out)
            bar.update(len(paths_batch))
            bar.set_postfix(ok=stats.indexed, failed=stats.failed, skipped=stats.skipped)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    if stats.indexed:
        archive.sync_vectors(model_id)
    return stats


def split_reports(items: list) -> tuple[list[str], dict[str, object], dict[str, str]]:
    """A batch of `path`, `(path, report)` or `SourceImage` items -> the paths, path -> report
    and path -> recorded view."""
    paths, reports, views = [], {}, {}
    for item in items:
        if isinstance(item, tuple):
            path, report, view = (*item, None)[:3]
            paths.append(str(path))
            if report:
                reports[str(path)] = report
            if view:
                views[str(path)] = view
        else:
            paths.append(str(item))
    return paths, reports, views


def study_documents(documents: list, known: dict[str, object],
                    entries: list[Entry] = ()) -> dict[str, object]:
    """Reports from DICOM documents (`dicom_reports.DicomReport`) -> study uid -> ReportText,
    cleaned and mined; added to `known` (the run's), given to the `entries` of those studies
    that have no report, and returned for the studies new in the run (the caller gives them to
    images stored before: `Archive.attach_study_reports`). A study's first report document
    wins; one without text is stored empty with the reason."""
    from .reports import ReportText, mine_reports, prepare_report

    new: dict[str, object] = {}
    for doc in documents:
        if doc.study_uid in known or doc.study_uid in new:
            continue
        report = prepare_report(doc.sections) if not doc.problem else None
        if report is None:
            why = doc.problem or "refused: the document holds no text"
            report = ReportText("", f"{why} ({doc.kind})")
        new[doc.study_uid] = report
    mine_reports(list(new.values()))
    known.update(new)
    for e in entries:
        if e.report is None and e.study_uid in known:
            e.report = known[e.study_uid]
    return new


def attach_reports(entries: list[Entry], reports: dict[str, object]) -> None:
    """Give each entry its study's report, cleaned (archive.reports) and mined: one miner pass
    for the whole batch, so spaCy's cost is per batch, not per image."""
    if not reports:
        return
    from .reports import mine_reports, prepare_report

    for e in entries:
        if e.path in reports:
            e.report = prepare_report(reports[e.path])
    mine_reports([e.report for e in entries])


def _write_dicom_outputs(batch: Batch, ids: list[int | None], out_dir) -> None:
    """An SR and an overlay Secondary Capture per newly indexed image (see dicom_out)."""
    from .dicom_out import write_result_dicom

    for e, image, i in zip(batch.entries, batch.images, ids):
        if i is not None and e.result is not None and image is not None:
            write_result_dicom(e.result, upright(image, e.result), out_dir, name=f"{i:08d}")


def upright(image, result: Result):
    """The LoadedImage as the Reader read it (turned back when the gate corrected it), so boxes
    and heatmaps drawn on it fall in place."""
    if result.quality is None or not result.quality.corrected:
        return image
    from dataclasses import replace

    from ..quality.gate import QualityGate

    return replace(image, pixels=QualityGate.correct(image.pixels, result.quality))


# -- Result <-> plain data (for Ray and JSON) --------------------------------------------------
def result_from_dict(d: dict, embedding: np.ndarray | None = None) -> Result:
    findings = [DetectedFinding(
        disease=f["disease"], score=float(f["score"]), annotation=f.get("annotation") or "",
        organ=f.get("organ"), location=tuple(f.get("location") or ()), side=f.get("side"),
        severity=f.get("severity"), boxes=[Box(**b) for b in f.get("boxes") or []],
        confidence={k: float(v) for k, v in (f.get("confidence") or {}).items()},
        measurements={k: float(v) for k, v in (f.get("measurements") or {}).items()},
        notes=list(f.get("notes") or []))
        for f in d.get("findings", [])]
    size = d.get("image_size") or (0, 0)
    quality = None
    if d.get("quality"):
        from ..quality.gate import QualityReport

        quality = QualityReport.from_dict(d["quality"])
    return Result(scores={k: float(v) for k, v in d.get("scores", {}).items()}, findings=findings,
                  embedding=embedding, model_id=d.get("model_id", ""),
                  image_size=(int(size[0]), int(size[1])), quality=quality, abnormal=d.get("abnormal"),
                  call=d.get("call"))
