"""Reports that come as DICOM documents beside a study's images: a text SR (Basic Text, Enhanced,
Comprehensive, Comprehensive 3D or Extensible SR, e.g. TID 2000 Basic Diagnostic Imaging Report)
or an Encapsulated CDA / PDF document. `cxr index` meets them among the files of a study and
stores their text as the report of every image with the same StudyInstanceUID.

An SR's text is its TEXT items (and CODE items, as "name: meaning"), grouped under the heading of
the container they sit in ("Findings", "Impression"), or their own concept name when they sit at
the top (coded items only under such a heading: not the document's language or procedure). The miner reads FINDINGS and IMPRESSION (`cxr.reports.text`); text under no heading it
knows counts as FINDINGS, so a one-paragraph report is still mined. cxr's own result SRs
(`--dicom-out`, a TID 1500 measurement report of the model's findings) are no report: skipped,
or the model would agree with itself.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .dicom_out import MANUFACTURER

TEXT_SR = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR",
}
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
ENCAPSULATED_CDA = "1.2.840.10008.5.1.4.1.1.104.2"
REPORT_CLASSES = frozenset(TEXT_SR) | {ENCAPSULATED_PDF, ENCAPSULATED_CDA}
MEASUREMENT_REPORT = "126000"  # DCM code of TID 1500's title: measurements, not a narrative
# headings as reports write them -> the section names the miner and the archive use
HEADINGS = {"FINDING": "FINDINGS", "FINDINGS": "FINDINGS", "IMPRESSION": "IMPRESSION",
            "IMPRESSIONS": "IMPRESSION", "CONCLUSION": "IMPRESSION", "CONCLUSIONS": "IMPRESSION",
            "SUMMARY": "IMPRESSION", "HISTORY": "HISTORY", "CLINICAL HISTORY": "HISTORY",
            "INDICATION": "INDICATION", "INDICATIONS": "INDICATION",
            "REASON FOR STUDY": "INDICATION", "COMPARISON": "COMPARISON",
            "TECHNIQUE": "TECHNIQUE", "PROCEDURE": "TECHNIQUE"}


@dataclass
class DicomReport:
    """One report document: the study it belongs to, its sections (or why none: `problem`)."""

    path: str
    study_uid: str
    kind: str
    sections: dict[str, str | bytes]
    problem: str | None = None


def read_dicom_report(path: str | Path) -> DicomReport | None:
    """The report in a DICOM file, or None when the file is no report document (an image,
    a presentation state, cxr's own result SR, a file pydicom cannot parse)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception:
        return None
    sop = str(ds.get("SOPClassUID", "") or "")
    study = str(ds.get("StudyInstanceUID", "") or "")[:64]
    if not study or sop not in REPORT_CLASSES:
        return None
    if sop in TEXT_SR:
        if str(ds.get("Manufacturer", "")) == MANUFACTURER or _concept(ds)[0] == MEASUREMENT_REPORT:
            return None
        return DicomReport(str(path), study, TEXT_SR[sop], sr_sections(ds))
    data = ds.get("EncapsulatedDocument")
    data = bytes(data) if data is not None else b""
    length = ds.get("EncapsulatedDocumentLength")
    if length and int(length) <= len(data):
        data = data[:int(length)]  # the value is padded to an even length
    if sop == ENCAPSULATED_CDA:
        sections, problem = cda_sections(data)
        return DicomReport(str(path), study, "Encapsulated CDA", sections, problem)
    sections, problem = pdf_sections(data)
    return DicomReport(str(path), study, "Encapsulated PDF", sections, problem)


def _concept(item) -> tuple[str, str]:
    """(code value, meaning) of an SR item's concept name, ("", "") when it has none."""
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return "", ""
    code = seq[0]
    return str(code.get("CodeValue", "") or ""), str(code.get("CodeMeaning", "") or "")


def _heading(meaning: str) -> str | None:
    return HEADINGS.get(" ".join(meaning.upper().split()))


def sr_sections(ds) -> dict[str, str]:
    """An SR's text, by section (see the module docstring)."""
    sections: dict[str, list[str]] = {}

    def add(heading: str, text: str) -> None:
        text = " ".join(str(text).split())
        if text:
            sections.setdefault(heading, []).append(text)

    def walk(items, heading: str | None) -> None:
        for item in items or ():
            kind = str(item.get("ValueType", ""))
            meaning = _concept(item)[1]
            if kind == "CONTAINER":
                walk(item.get("ContentSequence"), heading or _heading(meaning))
                continue
            where = heading or _heading(meaning)
            if kind == "TEXT":
                add(where or "FINDINGS", item.get("TextValue", ""))
            elif kind == "CODE" and where and item.get("ConceptCodeSequence"):
                # coded findings under a heading; not the document's own codes (language, ...)
                value = str(item.ConceptCodeSequence[0].get("CodeMeaning", ""))
                add(where, f"{meaning}: {value}" if meaning else value)
            walk(item.get("ContentSequence"), heading)

    walk(ds.get("ContentSequence"), None)
    return {name: " ".join(_sentence(t) for t in texts) for name, texts in sections.items()}


def _sentence(text: str) -> str:
    """Items are often fragments without a full stop: end each so the miner splits them."""
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def cda_sections(data: bytes) -> tuple[dict[str, str], str | None]:
    """An HL7 CDA document's sections: each <section>'s <title> and the text of its <text>."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        return {}, f"refused: the CDA document is not well-formed XML ({exc})"
    local = lambda el: el.tag.rsplit("}", 1)[-1]  # noqa: E731  (CDA lives in urn:hl7-org:v3)
    sections: dict[str, list[str]] = {}
    for section in (el for el in root.iter() if local(el) == "section"):
        title = next((el for el in section if local(el) == "title"), None)
        body = next((el for el in section if local(el) == "text"), None)
        if body is None:
            continue
        text = " ".join("".join(body.itertext()).split())
        heading = _heading("".join(title.itertext()) if title is not None else "") or "FINDINGS"
        if text:
            sections.setdefault(heading, []).append(text)
    if not sections:
        text = " ".join("".join(root.itertext()).split())
        return ({"FINDINGS": text} if text else {}), None
    return {k: " ".join(v) for k, v in sections.items()}, None


def pdf_sections(data: bytes) -> tuple[dict[str, str], str | None]:
    """A PDF report's text (with pypdf, when installed), split at headings such as
    "Impression:"; else why not."""
    try:
        from pypdf import PdfReader
    except ImportError:
        return {}, "refused: a PDF report; its text needs pypdf (pip install pypdf)"
    import io

    try:
        text = "\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages)
    except Exception as exc:
        return {}, f"refused: cannot read the PDF report ({exc})"[:300]
    return split_headings(text), None


_HEADING_LINE = re.compile(r"(?im)^\s*(" + "|".join(sorted(HEADINGS, key=len, reverse=True))
                           + r")\s*:")


def split_headings(text: str) -> dict[str, str]:
    """Plain report text with "FINDINGS:" / "IMPRESSION:" lines -> sections (all FINDINGS when
    it has none; what stands before the first heading is the HEADER)."""
    marks = list(_HEADING_LINE.finditer(text))
    if not marks:
        return {"FINDINGS": text} if text.strip() else {}
    sections: dict[str, list[str]] = {}
    if text[:marks[0].start()].strip():  # a title or header before the first heading
        sections["HEADER"] = [text[:marks[0].start()]]
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end():nxt.start() if nxt else len(text)]
        sections.setdefault(_heading(m.group(1)) or "FINDINGS", []).append(body)
    return {k: " ".join(" ".join(v).split()) for k, v in sections.items()}
