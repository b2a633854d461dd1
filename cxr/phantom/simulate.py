"""`simulate`: draw cases, render them, and write a data set that the Open-i and NIH adapters read.

Layout of OUT (see the README section "The phantom"):

    ecgen-radiology/<n>.xml              Open-i report per case (MeSH majors, FINDINGS, ...)
    images/CXR<n>_IM-0001-1001.png        16-bit grey PNG (+ .dcm with dicom=True)
    masks/CXR<n>_IM-0001-1001_<k>.png     with masks=True: 1-bit mask of finding k (0-based)
    records/CXR<n>.json                   the per-case record; written last, so it marks the case done
    nlmcxr_dicom_metadata.csv             imageid, View Position, ... (as Open-i ships it)
    Data_Entry_2017.csv                   NIH ChestX-ray14 label table (the terms' MeSH headings
                                          as `cxr.reports.mesh` reads them, joined by '|')
    BBox_List_2017.csv                    NIH box table, Finding Label = the MeSH term
    cases.jsonl                           ground truth: case, boxes, render meta, one line per case
    manifest.json                         settings, data hashes, code version, progress

Resumable: every per-case file is written to a temporary name and renamed into place, and the
case's record goes last; a re-run with the same settings skips the cases that have a record and
rebuilds the tables from all records at the end. A re-run with other settings into the same
folder is refused (CxrError), so a set never mixes two configurations; only a larger `n` is
accepted, and adds cases to the set. Case i depends only on
(seed, i), so the result does not depend on the number of workers or on interruptions.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

from ..atomic import remove_stale, write_atomic
from ..errors import CxrError
from ..hashing import file_sha256 as sha256
from ..images import save_png16
from ..reports.mesh import parse_term
from .cases import CaseGenerator, DrawnCase
from .reports import image_id, report_xml

FORMAT = 1  # layout version of a simulated set
REPORTS_DIR, IMAGES_DIR, RECORDS_DIR = "ecgen-radiology", "images", "records"
MASKS_DIR = "masks"
MANIFEST = "manifest.json"
NIH_LABELS, NIH_BOXES = "Data_Entry_2017.csv", "BBox_List_2017.csv"
OPENI_METADATA, CASES = "nlmcxr_dicom_metadata.csv", "cases.jsonl"
NIH_LABELS_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_BOXES_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
METADATA_COLUMNS = ("imageid", "View Position", "Photometric Interpretation", "Rows", "Columns",
                    "Pixel Spacing", "Patient ID", "Patient's Sex", "filename")
RENDER_ATTEMPTS = 3
FIELD_OF_VIEW_MM = 360.0  # used for the pixel spacing only when the renderer does not report one


def simulate(out: str | Path, n: int, size: int = 256, seed: int = 0, workers: int = 1,
             progress: bool = True, dicom: bool = False, photometric: str = "MONOCHROME2",
             ct: str | Path | None = None, labels: str | Path | None = None,
             reports: str | Path | None = None, normal_share: float | None = None,
             terms: str = "complete", geometry: str = "parallel", masks: bool = False) -> Path:
    """Simulate `n` studies into `out` (created; resumed when it holds an interrupted run with
    the same settings) and return `out`.

    ct, labels: the chest CT and its organ label map (default: the data cache, fetched once);
    reports: the Open-i reports the case statistics come from (default: the data cache);
    normal_share, terms: see `CaseGenerator`; geometry: "parallel" or "cone" beam;
    masks: also write each finding's mask (1-bit PNG in masks/, named in the record's boxes)."""
    out = Path(out).expanduser()
    if n < 1:
        raise CxrError(f"--n must be at least 1, not {n}")
    if size < 32:
        raise CxrError(f"--size must be at least 32 pixels, not {size}")
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise CxrError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if geometry not in ("parallel", "cone"):
        raise CxrError(f"geometry must be 'parallel' or 'cone', not {geometry!r}")
    ct_path, labels_path, reports_path = _inputs(ct, labels, reports)
    generator = CaseGenerator.from_openi(reports_path, normal_share=normal_share, terms=terms)
    settings = {
        "format": FORMAT, "n": int(n), "size": int(size), "seed": int(seed), "dicom": bool(dicom),
        "photometric": photometric if dicom else None, "terms": terms, "geometry": geometry,
        "masks": bool(masks),
        "normal_share": round(generator.normal_share, 6),
        "cxr_version": _version(),
        "ct_sha256": sha256(ct_path), "labels_sha256": sha256(labels_path),
        "reports_sha256": sha256(reports_path) if reports_path.is_file() else None,
    }
    _claim(out, settings)
    subs = (REPORTS_DIR, IMAGES_DIR, RECORDS_DIR) + ((MASKS_DIR,) if masks else ())
    for sub in subs:
        (out / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("",) + subs:
        remove_stale(out / sub)
    todo = [i for i in range(1, n + 1) if not (out / RECORDS_DIR / f"CXR{i}.json").is_file()]
    job = _Job(out, settings, generator, str(ct_path), str(labels_path))
    _run(job, todo, n, workers, progress)
    records = [read_record(out, i) for i in range(1, n + 1)]
    write_tables(out, records)
    _write_json(out / MANIFEST, {**_manifest(settings), "complete": True, "done": len(records),
                                 "normal": sum(not r["case"]["findings"] for r in records),
                                 "boxes": sum(len(r["boxes"]) for r in records)})
    return out


# --- inputs and the settings lock ---

def _inputs(ct, labels, reports) -> tuple[Path, Path, Path]:
    from ..fetch import locate

    ct_path = locate("phantom/chest_ct.nii.gz", ct)
    labels_path = locate("phantom/chest_ct_labels.nii.gz", labels)
    if reports is None:
        reports_path = locate("openi/NLMCXR_reports.tgz")
    else:
        reports_path = Path(reports).expanduser()
        if not reports_path.exists():
            raise CxrError("Open-i reports not found", reports_path)
    return ct_path, labels_path, reports_path


def _version() -> str:
    from .. import __version__
    return __version__


def _manifest(settings: dict) -> dict:
    return {"settings": settings, "layout": {
        "reports": f"{REPORTS_DIR}/<n>.xml", "images": f"{IMAGES_DIR}/CXR<n>_IM-0001-1001.png",
        "records": f"{RECORDS_DIR}/CXR<n>.json", "nih_labels": NIH_LABELS, "nih_boxes": NIH_BOXES,
        "openi_metadata": OPENI_METADATA, "cases": CASES,
        **({"masks": f"{MASKS_DIR}/CXR<n>_IM-0001-1001_<k>.png"} if settings.get("masks") else {})}}


def _claim(out: Path, settings: dict) -> None:
    """Start a new set in `out`, or check that the set already there was made with the same
    settings (then the run resumes it)."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise CxrError("not a folder: --out needs a new, empty or simulated-set folder", out)
    if manifest.is_file() and not _any_done(out):  # a claim whose run failed before any study
        _write_json(manifest, {**_manifest(settings), "complete": False})
        return
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text()).get("settings", {})
        except (OSError, ValueError) as exc:
            raise CxrError(f"unreadable manifest of a simulated set: {exc}", manifest) from exc
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v and k != "n"}
        if diff:
            said = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise CxrError(f"folder holds a simulated set made with other settings ({said}); "
                           "use another --out, or the same settings to resume it", out)
        if int(old.get("n", 0)) > settings["n"]:
            raise CxrError(f"folder holds a simulated set of {old['n']} studies; --n {settings['n']} "
                           "would leave the others behind: use --n >= that, or another --out", out)
        if int(old.get("n", 0)) < settings["n"]:  # growing a set: case i depends on (seed, i) only
            _write_json(manifest, {**_manifest(settings), "complete": False})
        return
    if out.exists() and any(out.iterdir()):
        raise CxrError("folder is not empty and holds no simulated set: use a new or empty --out",
                       out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(manifest, {**_manifest(settings), "complete": False})


def _any_done(out: Path) -> bool:
    """Whether a claimed set holds a finished study (else its settings may change freely)."""
    records = out / RECORDS_DIR
    return records.is_dir() and any(records.glob("CXR*.json"))


def _write_json(path: Path, data) -> Path:
    return write_atomic(path, (json.dumps(data, indent=1, default=_plain) + "\n").encode())


def _plain(value):
    """JSON for numpy scalars/arrays, paths and tuples in render meta."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, set, frozenset)):
        return str(value) if isinstance(value, Path) else sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- the work: one case at a time, in this process or in a pool ---

class _Job:
    """Everything a worker needs to make a case (picklable; the phantom is loaded per worker)."""

    def __init__(self, out: Path, settings: dict, generator: CaseGenerator, ct: str, labels: str):
        self.out, self.settings, self.generator = out, settings, generator
        self.ct, self.labels = ct, labels
        self._phantom = None

    def __getstate__(self):
        return {**self.__dict__, "_phantom": None}

    def phantom(self):
        if self._phantom is None:
            self._phantom = _load_phantom(self.ct, self.labels)
        return self._phantom

    def _render(self, case: DrawnCase):
        """Render a case; when the renderer cannot place a finding with the case's seed (a
        CxrError), try again with seeds derived from it, so a rare placement failure does not
        stop a long run at the same case every time. The seed used is the case's seed."""
        s = self.settings
        for attempt in range(RENDER_ATTEMPTS):
            if attempt:
                case.seed = int(np.random.default_rng([case.seed, attempt]).integers(2**31 - 1))
                case.meta["render_attempt"] = attempt
            try:
                return self.phantom().render(case.findings, seed=case.seed, size=s["size"],
                                             geometry=s["geometry"])
            except CxrError as exc:
                error = exc
        raise CxrError(f"case {case.id}: the renderer could not draw "
                       f"{[f.term for f in case.findings]} in {RENDER_ATTEMPTS} tries: {error}")

    def make(self, index: int) -> int:
        """Render case `index` and write its image(s), report and record (record last)."""
        s = self.settings
        case = self.generator.case(index, s["seed"])
        rendering = self._render(case)
        image = np.asarray(rendering.image, dtype=np.float32)
        if image.shape != (s["size"], s["size"]):
            raise CxrError(f"renderer returned an image of shape {image.shape} for size {s['size']}")
        if len(rendering.boxes) != len(case.findings):
            raise CxrError(f"renderer returned {len(rendering.boxes)} boxes for "
                           f"{len(case.findings)} findings of {case.id}")
        meta = dict(getattr(rendering, "meta", {}) or {})
        spacing = float(meta.get("pixel_mm") or FIELD_OF_VIEW_MM / s["size"])
        iid = image_id(case)
        files = {"png": f"{IMAGES_DIR}/{iid}.png"}
        save_png16(self.out / files["png"], image)
        if s["dicom"]:
            files["dicom"] = f"{IMAGES_DIR}/{iid}.dcm"
            _save_dicom(self.out / files["dicom"], image, case, spacing, s["photometric"])
        write_atomic(self.out / REPORTS_DIR / f"{index}.xml", report_xml(case, [iid]))
        boxes = [{"label": f.term, "kind": f.kind, "x": float(b.x), "y": float(b.y),
                  "w": float(b.w), "h": float(b.h)} for f, b in zip(case.findings, rendering.boxes)]
        if s.get("masks"):
            for k, (box, mask) in enumerate(zip(boxes, rendering.masks)):
                box["mask"] = f"{MASKS_DIR}/{iid}_{k}.png"
                write_atomic(self.out / box["mask"], _mask_png(mask))
        record = {"case": case.to_dict(), "image": {"id": iid, **files, "width": s["size"],
                                                    "height": s["size"], "view": case.view,
                                                    "photometric": s["photometric"] or "MONOCHROME2",
                                                    "pixel_spacing_mm": spacing},
                  "boxes": boxes, "render": meta}
        _write_json(self.out / RECORDS_DIR / f"{case.id}.json", record)
        return index


@lru_cache(maxsize=1)
def _load_phantom(ct: str, labels: str):
    """The phantom, kept for the next run in this process (tests, `cxr demo`, notebooks)."""
    from .render import Phantom

    return Phantom.load(ct=ct, labels=labels)


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    job.phantom()  # load the CT once per worker, before the first case


def _make(index: int) -> int:
    return _JOB.make(index)


def _run(job: _Job, todo: list[int], n: int, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=n, initial=n - len(todo), unit="img", desc="simulate", disable=not progress,
               dynamic_ncols=True)
    try:
        if not todo:
            return
        workers = max(1, min(int(workers), len(todo)))
        # Load here first: a bad CT fails in this process with a clear error, and the derived
        # arrays are computed and cached once rather than by every worker at the same time.
        job.phantom().layout(job.settings["size"], job.settings["geometry"])
        if workers == 1:
            for index in todo:
                job.make(index)
                bar.update()
            return
        job._phantom = None  # the workers load their own: free this process's copy
        _load_phantom.cache_clear()
        ctx = mp.get_context("spawn")  # no fork after threads; the same on every platform
        with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
            try:
                for _ in pool.imap_unordered(_make, todo, chunksize=1):
                    bar.update()
            except BaseException:
                pool.terminate()
                raise
    finally:
        bar.close()


def _mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _save_dicom(path: Path, image: np.ndarray, case: DrawnCase, spacing: float,
                photometric: str) -> None:
    from pydicom.uid import generate_uid

    from ..dicom import write_dicom

    meta = getattr(case, "meta", {}) or {}
    uid = lambda what: generate_uid(entropy_srcs=["cxr phantom", case.id, str(case.seed), what])
    extra = {"StudyDescription": "Simulated chest X-ray (cxr phantom)",
             "PatientSex": meta.get("sex", "")}
    if meta.get("age"):
        extra["PatientAge"] = f"{int(meta['age']):03d}Y"
    write_dicom(path, image, view=case.view, photometric=photometric, patient_id=case.id,
                study_uid=uid("study"), series_uid=uid("series"), sop_uid=uid("image"),
                pixel_spacing=spacing, extra=extra)


# --- records and the tables built from them ---

def read_record(out: str | Path, index: int) -> dict:
    path = Path(out) / RECORDS_DIR / f"CXR{index}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CxrError(f"cannot read the record of case CXR{index}: {exc}", path) from exc


def iter_records(out: str | Path) -> Iterable[dict]:
    """The records of a finished set, in case order (what `cases.jsonl` holds)."""
    with open(Path(out) / CASES) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_tables(out: Path, records: list[dict]) -> None:
    """cases.jsonl and the NIH / Open-i CSV tables, rebuilt from the per-case records."""
    lines = [json.dumps(r, default=_plain) for r in records]
    write_atomic(out / CASES, ("\n".join(lines) + "\n").encode())

    labels, boxes, metadata = io.StringIO(), io.StringIO(), io.StringIO()
    labels.write(NIH_LABELS_HEADER + "\n")
    boxes.write(NIH_BOXES_HEADER + "\n")
    lw, bw = csv.writer(labels, lineterminator="\n"), csv.writer(boxes, lineterminator="\n")
    mw = csv.writer(metadata, lineterminator="\n")
    mw.writerow(METADATA_COLUMNS)
    for r in records:
        case, image = r["case"], r["image"]
        name = Path(image["png"]).name
        heads = list(dict.fromkeys(parse_term(f["term"]).disease for f in case["findings"]))
        meta = case.get("meta") or {}
        number = case["id"][3:]
        sp = f"{image['pixel_spacing_mm']:.6g}"
        lw.writerow([name, "|".join(heads) or "No Finding", 0, number, meta.get("age", ""),
                     meta.get("sex", ""), image["view"], image["width"], image["height"], sp, sp])
        for b in r["boxes"]:
            bw.writerow([name, b["label"], f"{b['x']:.4f}", f"{b['y']:.4f}", f"{b['w']:.4f}",
                         f"{b['h']:.4f}"])
        mw.writerow([image["id"], image["view"], image.get("photometric", "MONOCHROME2"), image["height"], image["width"],
                     f"['{sp}', '{sp}']", number, meta.get("sex", ""),
                     "./" + Path(image.get("dicom") or image["png"]).name])
    write_atomic(out / NIH_LABELS, labels.getvalue().encode())
    write_atomic(out / NIH_BOXES, boxes.getvalue().encode())
    write_atomic(out / OPENI_METADATA, metadata.getvalue().encode())
