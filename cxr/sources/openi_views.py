"""Which Open-i images are laterals: the DICOM header's `View Position` is empty for about a third
of the images and says `PA` for many laterals. The other header fields tell them apart; each rule
below rests on a measurement on the public metadata (`benchmarks/openi_views.py` makes them all,
into benchmarks/results/openi_views.json; the figures quoted here are from it):

1. `View Position` LL / RL / LATERAL / LARGE LATERAL -> lateral.
2. `Patient Orientation` (0020,0020) gives the patient direction of the image rows: A or P is a
   lateral, L or R a frontal (the DICOM meaning of the field). It never contradicts rule 1.
3. `Acquisition Device Processing Code` 60003 (one CR reader's processing menu; its header says
   PA and orientation L\\F, both defaults): in 1,042 of the 1,090 reports holding one 60003 and one
   60025 image in two series, the 60003 image is the later series (a PA and lateral exam takes the
   PA first), and 1,350 of the 1,366 are portrait where 73% of the 60025 images are landscape:
   60003 -> lateral, 60025 -> frontal.
4. With `View Position` empty (a DR unit): processing codes 1 and 2 are the lower exposure of their
   report in 545 of 550 images, 3 and 4 the higher in 544 of 554: 1, 2 -> frontal; 3, 4 -> lateral.
5. Still undecided, in a report of two or more images with an exposure (`Exposure in uAs`, else
   `Exposure` in mAs): a lateral needs several times the dose of a PA (twice the tissue in the
   beam); in 578 of the 581 labelled frontal + lateral pairs the higher exposure is the lateral
   (lateral / frontal ratio: 5th percentile 1.67, median 4.32). So the highest exposure, if at
   least EXPOSURE_RATIO times the lowest, is the lateral and the lowest the frontal.
6. Otherwise `View Position` PA / AP -> frontal; else undecided (None): when the image file is
   present, the quality gate's model decides (`gate_views`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

LATERAL_POSITIONS = {"LL", "RL", "LATERAL", "LARGE LATERAL", "LAT", "LLD", "RLD"}
FRONTAL_POSITIONS = {"PA", "AP"}
LATERAL_CODES = {"60003", "3", "4"}
FRONTAL_CODES = {"60025", "60235", "1", "2"}
EXPOSURE_RATIO = 1.5  # below the 5th percentile of lateral/frontal ratios (1.67), above noise


@dataclass(frozen=True)
class Header:
    """The header fields of one Open-i image that speak to its view."""

    position: str | None = None       # View Position, upper case
    code: str | None = None           # Acquisition Device Processing Code
    orientation: str | None = None    # Patient Orientation's row direction: "L", "R", "A", "P"
    exposure: float | None = None     # in uAs (Exposure in uAs, else 1000 x Exposure in mAs)

    @classmethod
    def from_row(cls, row: dict) -> "Header":
        position = (row.get("View Position") or "").strip().upper() or None
        code = (row.get("Acquisition Device Processing Code") or "").strip() or None
        orientation = _row_direction(row.get("Patient Orientation") or "")
        exposure = _number(row.get("Exposure in uAs"))
        if exposure is None:
            mas = _number(row.get("Exposure"))
            exposure = mas * 1000 if mas else None
        return cls(position, code, orientation, exposure if exposure and exposure > 0 else None)


def infer_views(headers: Sequence[Header | None]) -> list[tuple[str | None, str]]:
    """(frontal | lateral | None, the evidence in words) for the images of one report."""
    out: list[tuple[str | None, str]] = [_alone(h) for h in headers]
    undecided = [i for i, (v, _) in enumerate(out) if v is None]
    exposed = [i for i, h in enumerate(headers) if h is not None and h.exposure]
    if undecided and len(exposed) >= 2:
        high = max(exposed, key=lambda i: headers[i].exposure)
        low = min(exposed, key=lambda i: headers[i].exposure)
        ratio = headers[high].exposure / headers[low].exposure
        if ratio >= EXPOSURE_RATIO:
            why = f"exposure {ratio:.1f}x the report's lowest"
            if high in undecided:
                out[high] = ("lateral", f"highest {why}")
            if low in undecided:
                out[low] = ("frontal", "lowest exposure of its report")
    for i, (view, why) in enumerate(out):
        h = headers[i]
        if view is None and h is not None and h.position in FRONTAL_POSITIONS:
            out[i] = ("frontal", f"View Position {h.position}")
    return out


def _alone(h: Header | None) -> tuple[str | None, str]:
    """Rules 1-4: what one image's own header says."""
    if h is None:
        return None, "no header in the metadata"
    if h.position in LATERAL_POSITIONS:
        return "lateral", f"View Position {h.position}"
    if h.orientation in ("A", "P"):
        return "lateral", f"Patient Orientation rows {h.orientation}"
    if h.code in LATERAL_CODES and (h.code == "60003" or h.position is None):
        return "lateral", f"processing code {h.code}"
    if h.code in FRONTAL_CODES and (h.code.startswith("60") or h.position is None):
        return "frontal", f"processing code {h.code}"
    if h.orientation in ("L", "R") and h.position in FRONTAL_POSITIONS:
        return "frontal", f"View Position {h.position}, Patient Orientation rows {h.orientation}"
    return None, "header does not say"


def gate_views(images, gate=None, cache: Path | None = None) -> int:
    """Let the quality gate's model decide the images whose header did not (`meta["view_class"]`
    None) and whose file is present; returns how many it decided. A file that cannot be read is
    left undecided. Decisions are kept per file (path, size, mtime) and gate model in
    `cache` (default: `views-gate.json` in the derived cache), so train, evaluate and index on
    Open-i's 7,470 full-size PNGs decode them for this once, not every time the source opens."""
    from ..errors import CxrError
    from ..images import read_image

    todo = [im for im in images if im.path is not None and im.meta.get("view_class") is None]
    if not todo:
        return 0
    cache = Path(cache) if cache is not None else _cache_file()
    model = gate.model_id if gate is not None else _shipped_gate_id()
    stored = _read_cache(cache)
    known = stored.setdefault(model, {})
    decided, misses = 0, []
    for im in todo:
        key = _file_key(im.path)
        if key is None:
            continue  # the file is gone
        if key in known:
            decided += _apply(im, known[key])
        else:
            misses.append((im, key))
    if not misses:
        return decided
    if gate is None:
        from ..quality.gate import QualityGate

        gate = QualityGate.load(read_views=("frontal", "lateral"))
    for im, key in misses:
        try:
            report = gate.check([read_image(im.path)])[0]
        except CxrError:
            continue  # unreadable now: asked again next time
        known[key] = None
        if report.view in ("frontal", "lateral") and report.accepted:
            p = report.probabilities["kind"][report.view]
            known[key] = [report.view, f"quality gate (p {p:.2f})"]
        decided += _apply(im, known[key])
    for model_id, entries in list(stored.items()):  # forget files that are gone
        stored[model_id] = {k: v for k, v in entries.items() if os.path.exists(k.rsplit("|", 2)[0])}
    _write_cache(cache, {k: v for k, v in stored.items() if v})
    return decided


def _apply(image, decision) -> int:
    if not decision:
        return 0
    image.meta["view_class"], image.meta["view_evidence"] = decision
    return 1


def _file_key(path) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _cache_file() -> Path:
    from ..phantom.ct import cache_root

    return cache_root() / "views-gate.json"


def _shipped_gate_id() -> str:
    """The shipped gate model's id, from its JSON (without loading the network)."""
    from ..quality.gate import gate_model_id
    from ..quality.model import WEIGHTS_DIR

    try:
        return gate_model_id(json.loads((WEIGHTS_DIR / "gate.json").read_text()))
    except (OSError, ValueError):
        return "unknown"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    from ..atomic import write_atomic

    try:
        write_atomic(path, json.dumps(data))
    except OSError:
        pass  # a read-only cache only costs the next run the same work


def agreement_when_hidden(studies, headers: dict) -> tuple[int, int]:
    """How the rules do where the header's answer is known: hide each image's View Position,
    decide from the rest of its study's headers, and count (agree, disagree) with the hidden
    PA/AP/LAT/LL. Images whose code already says lateral (60003/60025) are left out: the rule
    for them reads no View Position, so they would test nothing."""
    from dataclasses import replace

    agree = disagree = 0
    for study in studies:
        hs = [headers.get(im.id) for im in study.images]
        hidden = [replace(h, position=None) if h else None for h in hs]
        for h, (view, _) in zip(hs, infer_views(hidden)):
            if h is None or h.code in ("60003", "60025") or view is None:
                continue
            truth = ("frontal" if h.position in FRONTAL_POSITIONS else
                     "lateral" if h.position in LATERAL_POSITIONS else None)
            if truth:
                agree += view == truth
                disagree += view != truth
    return agree, disagree


def _row_direction(text: str) -> str | None:
    """"['L', 'F']" or "L\\F" -> "L" (the first letter of the row direction)."""
    letters = [c for c in text if c.isalpha()]
    return letters[0].upper() if letters else None


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
