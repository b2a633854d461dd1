"""A folder of the user's own images (+ an optional CSV manifest) -> Study records.

Manifest format (CSV with a header row; UTF-8; only `path` is required):

    path,patient_id,labels,view,report,study_id
    p1/a.png,P001,Pleural Effusion/right/small|Cardiomegaly,PA,"Small right effusion.",S1
    p1/b.dcm,P001,Pleural Effusion/right/small|Cardiomegaly,LL,,S1
    p2/c.jpg,P002,normal,AP,,
    p3/d.png,P003,,,,

* `path`: the image file, relative to the folder (or absolute). PNG, JPEG or DICOM.
* `patient_id`: used for patient-wise splits; default: the study id (every study its own patient).
* `labels`: `|`-separated findings, each a disease name or an Open-i-style MeSH term
  (`Opacity/lung/base/left/mild`, parsed by `cxr.reports.mesh.parse_term`, so context fields are
  filled); `normal` (or `No Finding`) for a normal study; an empty cell means *unknown*
  (`Study.meta["labelled"] = False`), not normal.
* `view`: `PA`, `AP`, `LL`, `LATERAL`, ... (optional).
* `report`: free text, stored as the FINDINGS section; or give `findings` and `impression`
  columns separately (optional). `cxr train --labels-from report` learns from this text instead
  of the `labels` column (`cxr.reports.report_labels`).
* `study_id`: rows with the same id are one study with several images (their labels are merged);
  default: one study per row, id = the path without its suffix.
Columns the reader does not know are kept in `Study.meta`.

Without a manifest, every image under the folder (recursively) is one study with unknown
labels: enough to index or annotate an archive.
"""
from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path

from ..errors import CxrError
from ..images import IMAGE_SUFFIXES
from ..records import Image, Study
from ..reports.mesh import parse_term

NORMAL_WORDS = {"normal", "no finding"}
KNOWN = {"path", "patient_id", "labels", "view", "report", "findings", "impression", "study_id"}


def read_folder(root: str | Path, manifest: str | Path | None = None) -> list[Study]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CxrError("image folder not found", root)
    if manifest is None:
        return _unlabelled(root)
    manifest = Path(manifest).expanduser()
    if not manifest.is_absolute() and not manifest.exists():
        manifest = root / manifest
    if not manifest.is_file():
        raise CxrError("manifest CSV not found", manifest)
    return _from_manifest(root, manifest)


def _unlabelled(root: Path) -> list[Study]:
    studies = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            sid = path.relative_to(root).with_suffix("").as_posix()
            studies.append(Study(id=sid, patient_id=sid, images=[Image(id=sid, path=path)],
                                 source="folder", meta={"labelled": False}))
    if not studies:
        raise CxrError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found", root)
    return sorted(studies, key=lambda s: s.id)


def _findings(cell: str, where: str):
    out = []
    for label in (x.strip() for x in cell.split("|")):
        if not label:
            continue
        if label.lower() in NORMAL_WORDS:
            out.append(replace(parse_term("normal"), raw=label, source="label"))
        else:
            f = parse_term(label)
            if not f.disease:
                raise CxrError(f"unreadable label {label!r}", where)
            out.append(replace(f, source="label"))
    return out


def _from_manifest(root: Path, manifest: Path) -> list[Study]:
    try:
        with open(manifest, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "path" not in fields:
                raise CxrError(f"manifest needs a 'path' column (has: {', '.join(fields) or 'none'})",
                               manifest)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CxrError(f"cannot read manifest: {exc}", manifest) from exc
    studies: dict[str, Study] = {}
    for n, row in enumerate(rows, start=2):
        where = f"{manifest}:{n}"
        if not row.get("path"):
            raise CxrError("empty 'path'", where)
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise CxrError(f"image listed in the manifest not found: {path}", where)
        image_id = Path(row["path"]).with_suffix("").as_posix()
        sid = row.get("study_id") or image_id
        study = studies.get(sid)
        if study is None:
            report = {}
            if row.get("findings") or row.get("report"):
                report["FINDINGS"] = row.get("findings") or row.get("report")
            if row.get("impression"):
                report["IMPRESSION"] = row["impression"]
            extra = {k: v for k, v in row.items() if k not in KNOWN and k}
            study = Study(id=sid, patient_id=row.get("patient_id") or sid, report=report,
                          source="folder", meta={"labelled": False, **extra})
            studies[sid] = study
        elif row.get("patient_id") and row["patient_id"] != study.patient_id:
            raise CxrError(f"study {sid!r} given two patient ids ({study.patient_id!r}, "
                           f"{row['patient_id']!r})", where)
        study.images.append(Image(id=image_id, path=path, view=row.get("view") or None))
        if row.get("labels"):
            study.meta["labelled"] = True
            for f in _findings(row["labels"], where):
                if f not in study.findings:
                    study.findings.append(f)
    if not studies:
        raise CxrError("manifest lists no images", manifest)
    return list(studies.values())
