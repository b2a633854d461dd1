"""NIH ChestX-ray14 / ChestX-ray8 -> Study records (one Study per image).

Reads `Data_Entry_2017*.csv[.gz]` (labels, patient, age, sex, view; the v2017 and v2020 headers
both work: `OriginalImage[Width,Height]` is split over two columns by its unquoted comma) and,
optionally, `BBox_List_2017.csv[.gz]` (header `Image Index,Finding Label,Bbox [x,y,w,h],,,`:
the four numbers sit under one name plus three empty ones).

Findings come from `Finding Labels` with `source="label"` and the NIH name as disease
(`cxr.reports.mesh.NIH_TO_MESH` maps them to Open-i headings); `No Finding` becomes the finding
`normal` (raw `No Finding`). The box list writes `Infiltrate` where the labels write
`Infiltration`; box labels use the label file's spelling.

Boxes are given on the 1024x1024 release images. With an image folder, each box is scaled to
the size of the file actually there (read from the file header, pixels not decoded), so
thumbnails or re-sampled copies of any size work; rows whose image is not in the folder are
skipped. Without images (`images=None`), studies carry no paths and boxes stay in the 1024-pixel
frame (`Image.meta["box_frame"] = (1024, 1024)`). The original DICOM size is in `Image.meta`.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
from functools import lru_cache
from pathlib import Path

from ..errors import CxrError
from ..images import DICOM_SUFFIXES, IMAGE_SUFFIXES
from ..records import Box, Finding, Image, Study

RELEASE_SIZE = 1024
NO_FINDING = "No Finding"
BOX_LABEL_SPELLING = {"Infiltrate": "Infiltration"}


def read_nih(
    labels_csv: str | Path,
    boxes_csv: str | Path | None = None,
    images: str | Path | None = None,
    box_frame: int | None = RELEASE_SIZE,
) -> list[Study]:
    """One Study per image of the label file (only those present when `images` is given).

    `box_frame`: the square size the box file's coordinates refer to (1024 for NIH); None when
    they are already in the pixels of each image (`cxr simulate` writes them so)."""
    labels_csv = Path(labels_csv).expanduser()
    rows = _read_labels(str(_existing(labels_csv, "NIH label file")), labels_csv.stat().st_mtime_ns)
    boxes = read_boxes(boxes_csv) if boxes_csv is not None else {}
    files = _index_files(Path(images).expanduser()) if images is not None else None
    studies = []
    for row in rows:
        name = row["image"]
        path = None
        if files is not None:
            path = files.get(name) or files.get(os.path.splitext(name)[0])
            if path is None:
                continue
        studies.append(_study(row, path, boxes.get(name, []), box_frame))
    return studies


def read_boxes(boxes_csv: str | Path, *, rename: bool = True) -> dict[str, list[Box]]:
    """`Image Index` -> boxes as written in a BBox_List file (no scaling). Used for NIH (1024
    frame) and for the phantom's box file (image pixel frame)."""
    path = _existing(Path(boxes_csv).expanduser(), "bounding-box file")
    out: dict[str, list[Box]] = {}
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[0].strip() != "Image Index" or len(header) < 3:
            raise CxrError("not a BBox_List file: expected header 'Image Index,Finding Label,"
                           f"Bbox [x,y,w,h],,,' (got {','.join(header or [])[:80]!r})", path)
        for n, row in enumerate(reader, start=2):
            if not row or not row[0].strip():
                continue
            try:
                x, y, w, h = (float(v) for v in row[2:6])
            except ValueError as exc:
                raise CxrError(f"line {n}: bad box numbers {row[2:6]}: {exc}", path) from exc
            label = row[1].strip()
            if rename:
                label = BOX_LABEL_SPELLING.get(label, label)
            if w <= 0 or h <= 0:
                raise CxrError(f"line {n}: box of non-positive size {w}x{h}", path)
            out.setdefault(row[0].strip(), []).append(Box(label, x, y, w, h))
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header without decoding pixels (PNG/JPEG via PIL,
    DICOM via pydicom)."""
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - any unreadable header is the user's file problem
        raise CxrError(f"cannot read image size: {exc}", path) from exc


# --- helpers ---

def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CxrError(f"{what} not found", path)
    return path


def _open_text(path: Path):
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise CxrError(f"cannot open: {exc}", path) from exc


def _column(header: list[str], prefix: str, path: Path, required: bool = True) -> int | None:
    for i, name in enumerate(header):
        if name.strip().startswith(prefix):
            return i
    if required:
        raise CxrError(f"NIH label file lacks column {prefix!r}", path)
    return None


def _age(value: str) -> float | None:
    v = value.strip().upper()
    if not v:
        return None
    unit = v[-1] if v[-1] in "YMWD" else "Y"
    v = v.rstrip("YMWD")
    try:
        n = float(v)
    except ValueError:
        return None
    return n / {"Y": 1, "M": 12, "W": 52, "D": 365}[unit]


@lru_cache(maxsize=4)
def _read_labels(path_str: str, _mtime: int) -> tuple[dict, ...]:
    path = Path(path_str)
    rows = []
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise CxrError("empty NIH label file", path)
            col = {k: _column(header, k, path) for k in ("Image Index", "Finding Labels", "Patient ID")}
            opt = {k: _column(header, k, path, required=False)
                   for k in ("Patient Age", "Patient Gender", "View Position", "Follow-up",
                             "OriginalImage[Width")}
            for n, row in enumerate(reader, start=2):
                if not row or not row[0].strip():
                    continue
                if len(row) <= max(col.values()):
                    raise CxrError(f"line {n}: {len(row)} fields, expected {len(header)}", path)

                def get(key):
                    i = opt[key]
                    return row[i].strip() if i is not None and i < len(row) else ""

                w_i = opt["OriginalImage[Width"]
                try:
                    original = (int(float(row[w_i])), int(float(row[w_i + 1]))) if w_i is not None else None
                except (ValueError, IndexError):
                    original = None
                rows.append({
                    "image": row[col["Image Index"]].strip(),
                    "labels": [x.strip() for x in row[col["Finding Labels"]].split("|") if x.strip()],
                    "patient": row[col["Patient ID"]].strip(),
                    "age": _age(get("Patient Age")),
                    "sex": get("Patient Gender") or None,
                    "view": get("View Position") or None,
                    "follow_up": get("Follow-up"),
                    "original": original,
                })
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise CxrError(f"cannot read NIH label file: {exc}", path) from exc
    if not rows:
        raise CxrError("NIH label file has no rows", path)
    return tuple(rows)


def _index_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise CxrError("image folder not found", folder)
    found: dict[str, Path] = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                p = Path(dirpath) / name
                found.setdefault(name, p)
                found.setdefault(stem, p)
    return found


@lru_cache(maxsize=None)
def _finding(label: str) -> Finding:
    """Findings are frozen, so one object per label name serves every image."""
    if label == NO_FINDING:
        return Finding(disease="normal", raw=NO_FINDING, source="label")
    return Finding(disease=label, raw=label, source="label")


def _study(row: dict, path: Path | None, boxes: list[Box], box_frame: int | None) -> Study:
    findings = [_finding(lab) for lab in row["labels"]]
    meta = {"original_size": row["original"], "box_frame": (box_frame, box_frame)}
    if box_frame is None:
        meta["box_frame"] = "image"
    elif path is not None and boxes:
        width, height = image_size(path)
        boxes = [b.scaled(width / box_frame, height / box_frame) for b in boxes]
        meta["box_frame"] = (width, height)
    elif path is not None:
        meta.pop("box_frame")
    image_id = os.path.splitext(row["image"])[0]
    image = Image(id=image_id, path=path, view=row["view"], boxes=list(boxes), meta=meta)
    return Study(
        id=image_id,
        patient_id=row["patient"],
        images=[image],
        findings=findings,
        source="nih",
        meta={"age": row["age"], "sex": row["sex"], "follow_up": row["follow_up"],
              "image_index": row["image"]},
    )
