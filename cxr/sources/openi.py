"""Open-i (Indiana University chest X-ray collection) -> Study records.

`reports` may be:
* `NLMCXR_reports.tgz` (the public release: `ecgen-radiology/<n>.xml`), or
* a folder of `<n>.xml` files, or a folder holding `ecgen-radiology/*.xml` (the layout
  `cxr simulate` writes: `OUT/ecgen-radiology/`, `OUT/images/`, `OUT/nlmcxr_dicom_metadata.csv`),
* or a folder holding the tgz,
with the images in `images/`, in `NLMCXR_png/` (Open-i's own PNG release, `NLMCXR_png.tgz`
unpacked: `CXR1_1_IM-0001-3001.png`, ...) or anywhere under the folder.

One Study per report. Open-i is de-identified per report and carries no patient key, so the
patient id is the report id (`CXR1000`): one report per patient, as the collection describes.
Findings come from the MeSH `<major>` terms (`cxr.reports.mesh.parse_term`; `No Indexing` is
not a finding but sets `meta["indexed"] = False`); the MTI `<automatic>` terms are kept in
`meta["automatic"]`, the raw `<major>` strings in `meta["mesh"]`.

Images are the report's `<parentImage id=...>` (e.g. `CXR1000_IM-0003-1001`). Their view comes
from `View Position` in `nlmcxr_dicom_metadata.csv[.gz]` (found automatically beside the reports
or in the folder; many rows leave it empty -> view None), kept as the header says. Whether an
image is frontal or lateral is decided from the whole header (`openi_views`: patient orientation,
processing code, exposure within the report; many laterals are tagged PA) into
`Image.meta["view_class"]` ("frontal" | "lateral" | None) with `meta["view_evidence"]`, which
`Image.frontal` follows; images the header leaves undecided are decided by the quality gate's
model when their file is present (`gate_views`). A path is set when
`<id>.png|.jpg|.jpeg|.dcm` exists anywhere under the image folder; Shin et al.'s file names
without the `CXR` prefix (`1000_IM-0003-1001.png`) are matched too.
"""
from __future__ import annotations

import csv
import gzip
import os
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from functools import lru_cache
from pathlib import Path

from ..errors import CxrError
from ..images import IMAGE_SUFFIXES
from ..records import Image, Study
from ..reports.mesh import NO_INDEXING, canonical_heading, parse_term, term_parts
from .openi_views import Header, gate_views, infer_views

SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
METADATA_NAMES = ("nlmcxr_dicom_metadata.csv.gz", "nlmcxr_dicom_metadata.csv")
XML_DIR = "ecgen-radiology"
PNG_DIR = "NLMCXR_png"  # Open-i's image release (NLMCXR_png.tgz), unpacked
PROCESSING_CODE = "Acquisition Device Processing Code"


def read_openi(
    reports: str | Path,
    images: str | Path | None = None,
    metadata: str | Path | None = None,
    gate: bool = True,
) -> list[Study]:
    """Read Open-i reports (tgz or folder) into Studies, sorted by report number. With `gate`,
    images whose header leaves the view undecided and whose file is present are shown to the
    quality gate's model (only then is it loaded)."""
    reports = Path(reports).expanduser()
    if not reports.exists():
        raise CxrError("Open-i reports not found (expected NLMCXR_reports.tgz or a folder of "
                       "ecgen-radiology XML files)", reports)
    home = reports if reports.is_dir() else reports.parent
    if reports.is_dir() and not ((reports / XML_DIR).is_dir() or any(reports.glob("*.xml"))):
        archives = sorted(reports.glob("*.tgz")) + sorted(reports.glob("*.tar.gz"))
        if not archives:
            raise CxrError("no Open-i reports here (expected NLMCXR_reports.tgz, "
                           "ecgen-radiology/ or *.xml)", reports)
        if images is None:  # a folder holding the tgz: its images are in images/ or beside it
            images = _image_folder(reports)
        reports = archives[0]
    if images is None and reports.is_dir():
        images = _image_folder(reports)
    if metadata is None:
        metadata = next((home / n for n in METADATA_NAMES if (home / n).is_file()), None)
    views = read_views(metadata) if metadata is not None else {}
    codes = _processing_codes(metadata) if metadata is not None else {}
    headers = read_headers(metadata) if metadata is not None else {}
    files = index_images(images) if images is not None else {}
    if not files and images is not None:
        _refuse_packed_images(Path(images))
    parsed = _parse_reports(str(reports.resolve()), _stamp(reports))
    studies = [_study(rec, views, files, codes, headers) for rec in parsed]
    if gate and files:
        gate_views([im for s in studies for im in s.images])
    return studies


def _image_folder(home: Path) -> Path:
    """Where a report folder's images are: `images/` (the layout `cxr simulate` writes),
    `NLMCXR_png/` (Open-i's PNG release unpacked), else anywhere under the folder."""
    for name in ("images", PNG_DIR):
        if (home / name).is_dir():
            return home / name
    return home


def _refuse_packed_images(folder: Path) -> None:
    """No image file found, but Open-i's image release is there still packed: say so (reading
    7,470 PNGs out of a 1 GB tgz on every run would be slow; unpack once)."""
    packed = sorted(p.name for p in folder.glob("NLMCXR_*.tgz") if "report" not in p.name.lower())
    if packed:
        raise CxrError(f"the Open-i images are still packed in {packed[0]}: unpack it first "
                       f"(mkdir {PNG_DIR} && tar -xzf {packed[0]} -C {PNG_DIR})", folder)


def read_views(metadata: str | Path) -> dict[str, str | None]:
    """image id -> `View Position` ("PA", "AP", "LL", "LATERAL", ...; None when empty)."""
    path = Path(metadata).expanduser()
    if not path.is_file():
        raise CxrError("Open-i DICOM metadata file not found", path)
    return {i: v for i, v, _, _ in _read_views(str(path.resolve()), path.stat().st_mtime_ns)}


def read_headers(metadata: str | Path) -> dict[str, Header]:
    """image id -> the header fields that tell its view (see `openi_views`)."""
    path = Path(metadata).expanduser()
    return {i: h for i, _, _, h in _read_views(str(path.resolve()), path.stat().st_mtime_ns)}


def _processing_codes(metadata: str | Path) -> dict[str, str]:
    path = Path(metadata).expanduser()
    return {i: c for i, _, c, _ in _read_views(str(path.resolve()), path.stat().st_mtime_ns) if c}


@lru_cache(maxsize=4)
def _read_views(path: str, _mtime: int) -> tuple[tuple[str, str | None, str, Header], ...]:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"imageid", "View Position"} - set(reader.fieldnames or ())
            if missing:
                raise CxrError(f"metadata CSV lacks column(s) {sorted(missing)}", path)
            return tuple((row["imageid"].strip(), (row["View Position"] or "").strip() or None,
                          (row.get(PROCESSING_CODE) or "").strip(), Header.from_row(row))
                         for row in reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise CxrError(f"cannot read metadata CSV: {exc}", path) from exc


def index_images(folder: str | Path) -> dict[str, Path]:
    """image id -> file for every image under `folder` (recursive). Keys: the file stem, and
    `CXR<stem>` for Shin-style names that lack the prefix. PNG wins over JPEG over DICOM."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CxrError("image folder not found", folder)
    found: dict[str, Path] = {}
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            stem, suffix = os.path.splitext(name)
            suffix = suffix.lower()
            if suffix not in rank:
                continue
            keys = [stem] if stem.upper().startswith("CXR") else [stem, "CXR" + stem]
            for key in keys:
                old = found.get(key)
                if old is None or rank[suffix] < rank[old.suffix.lower()]:
                    found[key] = Path(dirpath) / name
    return found


def _stamp(path: Path) -> int:
    """A cache key that changes when the tgz or any file in the folder changes."""
    if path.is_file():
        return path.stat().st_mtime_ns
    stamp = path.stat().st_mtime_ns
    sub = path / XML_DIR
    if sub.is_dir():
        stamp = max(stamp, sub.stat().st_mtime_ns)
    return stamp


# --- parsing (cached per process: the 3,955 XML files take under a second) ---

@lru_cache(maxsize=4)
def _parse_reports(path: str, _stamp: int) -> tuple[dict, ...]:
    p = Path(path)
    records = []
    for name, data in (_tar_members(p) if p.is_file() else _folder_members(p)):
        records.append(_parse_xml(data, name, p))
    if not records:
        raise CxrError("no Open-i report XML files found", p)
    records.sort(key=lambda r: _number(r["id"]))
    return tuple(records)


def _tar_members(path: Path):
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if member.isfile() and member.name.lower().endswith(".xml"):
                    fh = tf.extractfile(member)
                    yield member.name, fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        why = "not a gzip, bzip2, xz or plain tar file" if isinstance(exc, tarfile.ReadError) else exc
        raise CxrError(f"not a readable tar archive of Open-i reports ({why})", path) from exc


def _folder_members(path: Path):
    folder = path / XML_DIR if (path / XML_DIR).is_dir() else path
    for file in sorted(folder.glob("*.xml")):
        try:
            yield file.name, file.read_bytes()
        except OSError as exc:
            raise CxrError(f"cannot read report: {exc}", file) from exc


def _parse_xml(data: bytes, name: str, source: Path) -> dict:
    where = f"{source}:{name}" if source.is_file() else str(source / name)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise CxrError(f"malformed XML in report {name}: {exc}", where) from exc
    uid = root.find("uId")
    rid = uid.get("id") if uid is not None else None
    if not rid:
        raise CxrError(f"report {name} has no <uId id=...>", where)
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        if label:
            sections[label] = " ".join((node.text or "").split())
    return {
        "id": rid.strip(),
        "report": sections,
        "major": [t.text or "" for t in root.iter("major")],
        "automatic": [t.text or "" for t in root.iter("automatic")],
        "images": [e.get("id").strip() for e in root.iter("parentImage") if e.get("id")],
        "file": name,
    }


def _number(rid: str) -> tuple[int, str]:
    m = re.search(r"\d+", rid)
    return (int(m.group()) if m else -1, rid)


def _study(rec: dict, views: dict, files: dict, codes: dict, headers: dict) -> Study:
    majors = [t for t in rec["major"] if term_parts(t)]
    heads = [canonical_heading(term_parts(t)[0]) for t in majors]
    findings = [parse_term(t) for t, h in zip(majors, heads) if h != NO_INDEXING]
    inferred = infer_views([headers.get(i) for i in rec["images"]])
    images = []
    for i, (view_class, evidence) in zip(rec["images"], inferred):
        meta = {"processing_code": codes[i]} if i in codes else {}
        meta["view_class"], meta["view_evidence"] = view_class, evidence
        images.append(Image(id=i, path=files.get(i), view=views.get(i), meta=meta))
    return Study(
        id=rec["id"],
        patient_id=rec["id"],
        images=images,
        report=dict(rec["report"]),
        findings=findings,
        source="openi",
        meta={
            "automatic": list(rec["automatic"]),
            "mesh": list(rec["major"]),
            "indexed": bool(findings),
            "file": rec["file"],
        },
    )
