"""Data sources: each turns a dataset on disk into `Study` records (see `cxr.records`).

`open_source(spec)` reads the `--data` argument of the commands:

    openi                      Open-i reports from the cache (fetched when missing)
    openi:PATH                 NLMCXR_reports.tgz, a folder of report XML, or a folder holding
                               the tgz or `ecgen-radiology/`, plus optional `images/` and
                               `nlmcxr_dicom_metadata.csv[.gz]`
    nih                        NIH labels and boxes from the cache (no images)
    nih:PATH                   a folder with Data_Entry*.csv[.gz], optional BBox_List*.csv[.gz],
                               and the images in `images/` or in the folder itself (a
                               `cxr simulate` folder works too: its boxes are in image pixels)
    folder:PATH[,MANIFEST]     the user's images, with an optional CSV manifest (`cxr.sources.folder`)
    phantom:PATH               a `cxr simulate` output folder (Open-i layout + BBox_List_2017.csv)
    PATH                       any of the above, recognised from what the folder/file holds
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CxrError
from ..records import Study
from .folder import read_folder
from .nih import read_boxes, read_nih
from .openi import XML_DIR, read_openi

__all__ = ["open_source", "read_openi", "read_nih", "read_folder", "read_phantom", "SCHEMES"]

SCHEMES = ("openi", "nih", "folder", "phantom")
OPENI_REPORTS = "openi/NLMCXR_reports.tgz"
OPENI_METADATA = "openi/nlmcxr_dicom_metadata.csv.gz"
NIH_LABELS = "nih/Data_Entry_2017_v2020.csv.gz"
NIH_BOXES = "nih/BBox_List_2017.csv.gz"
PHANTOM_BOXES = "BBox_List_2017.csv"


def open_source(spec: str) -> list[Study]:
    """Studies from a `--data` spec (see the module docstring)."""
    spec = (spec or "").strip()
    if not spec:
        raise CxrError("empty data spec; use one of: " + ", ".join(f"{s}:PATH" for s in SCHEMES))
    scheme, sep, rest = spec.partition(":")
    if scheme not in SCHEMES:
        if Path(spec).expanduser().exists():
            return open_source(f"{_guess(Path(spec).expanduser())}:{spec}")
        raise CxrError(f"unknown data source {spec!r}: not an existing path, and not one of "
                       + ", ".join(f"{s}[:PATH]" for s in SCHEMES))
    rest = rest.strip()
    if scheme == "openi":
        return _openi(rest)
    if scheme == "nih":
        return _nih(rest)
    if not rest:
        raise CxrError(f"data spec {spec!r} needs a path: {scheme}:PATH")
    if scheme == "folder":
        root, _, manifest = rest.partition(",")
        return read_folder(_existing(root), manifest.strip() or None)
    return read_phantom(_existing(rest))


def read_phantom(folder: str | Path) -> list[Study]:
    """A `cxr simulate` folder: Open-i reports, images and metadata, plus boxes (image pixels,
    label = the MeSH term) from its `BBox_List_2017.csv` attached to the images."""
    folder = Path(folder).expanduser()
    _check_simulated(folder)
    studies = read_openi(folder)
    boxes_file = folder / PHANTOM_BOXES
    if not boxes_file.is_file() and (folder / (PHANTOM_BOXES + ".gz")).is_file():
        boxes_file = folder / (PHANTOM_BOXES + ".gz")
    if boxes_file.is_file():
        boxes = {Path(k).stem if Path(k).suffix else k: v
                 for k, v in read_boxes(boxes_file, rename=False).items()}
        for study in studies:
            study.source = "phantom"
            for image in study.images:
                image.boxes = list(boxes.get(image.id, []))
    else:
        for study in studies:
            study.source = "phantom"
    return studies


# --- helpers ---

def _check_simulated(folder: Path) -> None:
    """One clear line for a folder that is no simulated set, or one whose `cxr simulate` was
    interrupted (its box and label tables are written last: reading it would lose the boxes)."""
    import json

    manifest = folder / "manifest.json"
    if folder.is_dir() and not manifest.is_file() and not (folder / XML_DIR).is_dir():
        raise CxrError("not a simulated set (no manifest.json, no ecgen-radiology/): make one "
                       "with `cxr simulate --out DIR`", folder)
    if manifest.is_file():
        try:
            complete = json.loads(manifest.read_text()).get("complete", True)
        except (OSError, ValueError, AttributeError):
            return
        if complete is False:
            raise CxrError("simulated set is unfinished (interrupted?): run the same "
                           "`cxr simulate` again to complete it", folder)


def _existing(path: str) -> Path:
    p = Path(path.strip()).expanduser()
    if not p.exists():
        raise CxrError("data path not found", p)
    return p


def _locate(key: str, required: bool = True) -> Path | None:
    from ..fetch import locate

    try:
        return locate(key)
    except CxrError:
        if required:
            raise
        return None


def _openi(rest: str) -> list[Study]:
    if not rest:
        reports = _locate(OPENI_REPORTS)
        metadata = None if (reports.parent / Path(OPENI_METADATA).name).is_file() \
            else _locate(OPENI_METADATA, required=False)
        return read_openi(reports, metadata=metadata)
    return read_openi(_existing(rest))


def _first(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern + ".csv")) + sorted(folder.glob(pattern + ".csv.gz"))
    return found[0] if found else None


def _nih(rest: str) -> list[Study]:
    if not rest:
        return read_nih(_locate(NIH_LABELS), _locate(NIH_BOXES, required=False))
    p = _existing(rest)
    if p.is_file():
        return read_nih(p)
    labels = _first(p, "Data_Entry*")
    if labels is None:
        raise CxrError("no NIH label file (Data_Entry*.csv[.gz]) in the folder", p)
    boxes = _first(p, "BBox_List*")
    images = p / "images" if (p / "images").is_dir() else p
    simulated = (p / XML_DIR).is_dir()  # a `cxr simulate` folder: boxes in image pixels
    return read_nih(labels, boxes, images, box_frame=None if simulated else 1024)


def _guess(p: Path) -> str:
    if p.is_file():
        name = p.name.lower()
        if name.endswith((".tgz", ".tar.gz", ".xml")):
            return "openi"
        if name.startswith("data_entry"):
            return "nih"
        raise CxrError("cannot tell which kind of data this file is; use openi:, nih:, "
                       "folder: or phantom:", p)
    if (p / XML_DIR).is_dir():
        return "phantom" if (p / PHANTOM_BOXES).is_file() else "openi"
    if _first(p, "Data_Entry*") is not None:
        return "nih"
    if list(p.glob("*.tgz")) or list(p.glob("*.xml")):
        return "openi"
    return "folder"
