"""Reports in the archive: a study's report text made safe to store, mined into findings
(`cxr.reports.text.TextMiner`), and the SQL that searches the text and compares what the report
says with what the model found.

A bad report never costs the batch: empty -> no report stored; bytes that are not UTF-8, or a
report over MAX_REPORT_CHARS -> stored empty with the reason in `note`; markup (HTML/XML tags,
entities) -> stored as its plain text, noted.
"""
from __future__ import annotations

import html
import re
from functools import lru_cache
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import Integer, and_, column, exists, func, literal_column, or_, select, text

from ..errors import CxrError
from ..records import Finding
from .models import FindingRow, ImageRow, ReportFindingRow, ReportRow, encode_location

MAX_REPORT_CHARS = 100_000  # far above any radiology report; beyond it the text is refused
# a tag starts with a letter, / or ! ("<b>", "</div>", "<!-- -->"): "nodule <1 cm, mass >3 cm" is text
_TAG = re.compile(r"<[/!?]?[A-Za-z][^<>]{0,500}>")
DIRECTIONS = ("report-only", "model-only")


@dataclass
class ReportText:
    """A report ready to store: its text ("" when refused), what was done to it, its findings."""

    text: str
    note: str | None = None
    findings: list[Finding] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)  # what the miner reads
    # per finding: where its mention stands in `text`, [start, end), or None (mention_spans)
    spans: list[tuple[int, int] | None] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return not self.text and self.note is not None


def _decode(value) -> tuple[str | None, str | None]:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, f"refused: not UTF-8 text (byte 0x{value[exc.start]:02x} at {exc.start})"
    value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. a file read with surrogateescape
        return None, f"refused: not UTF-8 text (undecodable character at {exc.start})"
    return value, None


def prepare_report(report: Mapping[str, object] | str | bytes | None) -> ReportText | None:
    """`{section: text}` (a Study's report) or plain text -> a ReportText, or None when there is
    no text at all."""
    if report is None:
        return None
    sections = report if isinstance(report, Mapping) else {"FINDINGS": report}
    raw_size = sum(len(v) for v in sections.values() if v is not None)
    if raw_size > 8 * MAX_REPORT_CHARS:  # not even worth cleaning
        return ReportText("", f"refused: report too long ({raw_size:,} characters, at most "
                              f"{MAX_REPORT_CHARS:,})")
    clean: dict[str, str] = {}
    notes: list[str] = []
    for name, value in sections.items():
        if value is None:
            continue
        decoded, problem = _decode(value)
        if problem:
            return ReportText("", f"{problem} in section {name}")
        plain = decoded.replace("\x00", "")
        if _TAG.search(plain) or "&" in plain:
            stripped = html.unescape(_TAG.sub(" ", plain))
            if stripped != plain:
                plain = stripped
                notes.append(f"markup removed from {name}")
        plain = " ".join(plain.split())
        if plain:
            clean[str(name).upper()] = plain
    if not clean:
        return None
    body = report_body(clean)
    if len(body) > MAX_REPORT_CHARS:
        return ReportText("", f"refused: report too long ({len(body):,} characters, at most "
                              f"{MAX_REPORT_CHARS:,})")
    return ReportText(body, "; ".join(notes) or None, sections=clean)


def report_body(sections: Mapping[str, str]) -> str:
    """The stored text: one `NAME: text` line per section, in the report's order."""
    return "\n".join(f"{name}: {value}" for name, value in sections.items())


def mention_spans(sections: Mapping[str, str], findings: list[Finding],
                  miner) -> list[tuple[int, int] | None]:
    """Where each mined finding's mention stands in `report_body(sections)`, [start, end).

    The miner reads its sections (FINDINGS, IMPRESSION) in its own order, after splitting glued
    sentences ("effusion.There" -> "effusion. There"), and yields mentions in text order; so
    each mention's words (`raw`) are looked for, as whole words, after the previous one, and the
    offset mapped back through that split. A phrase the miner reads as two headings ("calcified
    nodule": Nodule and Calcinosis) gives both findings the same span."""
    from ..reports.text import _GLUED_SENTENCE

    starts, at = {}, 0
    for name, value in sections.items():
        starts[name] = at + len(name) + 2
        at += len(name) + 2 + len(value) + 1
    read = [(name, sections[name]) for name in miner.sections if sections.get(name)]
    also = getattr(miner, "_also", {})
    out: list[tuple[int, int] | None] = []
    part, cursor = 0, 0
    cleaned = [_split_glued(value, _GLUED_SENTENCE) for _, value in read]
    previous: Finding | None = None
    for f in findings:
        span = None
        if previous is not None and out and out[-1] and f.raw == previous.raw and \
                f.disease in also.get(f.raw.lower(), ()):
            span = out[-1]  # a second heading of the same phrase
        elif f.raw and f.source == "text":
            pattern = re.compile(r"(?<!\w)" + re.escape(f.raw) + r"(?!\w)")
            while part < len(read):
                text_, back = cleaned[part]
                m = pattern.search(text_, cursor)
                if m:
                    cursor = m.end()
                    base = starts[read[part][0]]
                    span = (base + back(m.start()), base + back(m.end() - 1) + 1)
                    break
                part, cursor = part + 1, 0
        out.append(span)
        previous = f
    return out


def _split_glued(value: str, glued: re.Pattern):
    """`value` as the miner reads it, and a map from its offsets back to `value`'s."""
    pieces, marks, at, shift = [], [], 0, 0  # marks: (from this cleaned offset on, add shift)
    for m in glued.finditer(value):
        pieces += [value[at:m.start()], ". "]
        after = m.start() - shift + 2  # where the text after the ". " starts, cleaned
        shift += (m.end() - m.start()) - 2
        marks.append((after, shift))
        at = m.end()
    pieces.append(value[at:])

    def back(i: int) -> int:
        add = 0
        for start, total in marks:
            if i < start:
                break
            add = total
        return i + add

    return "".join(pieces), back


def mine_reports(reports: list[ReportText | None]) -> None:
    """Fill each stored report's findings, the whole batch through one miner pass (loading
    spaCy/medspaCy once per process); a report the miner chokes on keeps its text, noted."""
    todo = [r for r in reports if r is not None and not r.refused]
    if not todo:
        return
    miner = _miner()
    try:
        for r, found in zip(todo, miner.mine_many([r.sections for r in todo])):
            r.findings = found
            r.spans = mention_spans(r.sections, found, miner)
    except Exception:  # one bad text: mine one by one so only it goes without findings
        for r in todo:
            try:
                r.findings = miner.mine(r.sections)
                r.spans = mention_spans(r.sections, r.findings, miner)
            except Exception as exc:
                r.findings = []
                r.note = "; ".join(filter(None, [r.note, f"not mined: {exc!r}"[:300]]))


_MINER = None


def _miner():
    global _MINER
    if _MINER is None:
        from ..reports.text import TextMiner

        _MINER = TextMiner()
    return _MINER


@lru_cache(maxsize=4096)
def label_key(disease: str) -> str:
    """One key for a disease whoever names it: a ChestX-ray14 name maps to its MeSH heading
    ("Effusion" -> "pleural effusion"), Open-i's alias headings fold, case and spaces do not
    count. Mined findings and model targets meet under it."""
    from ..reports.mesh import NIH_TO_MESH
    from ..reports.text import label_of

    name = " ".join(disease.split("/")[0].split())
    return " ".join(label_of(NIH_TO_MESH.get(name, name)).lower().split())


def model_key(disease: str) -> str:
    """FindingRow.disease_key of a model finding named `disease`."""
    return " ".join(disease.lower().split())


def report_rows(image_id: int, report: ReportText) -> list:
    rows: list = [ReportRow(image_id=image_id, text=report.text, note=report.note)]
    spans = report.spans if len(report.spans) == len(report.findings) else [None] * len(report.findings)
    rows += [ReportFindingRow(
        image_id=image_id, disease=f.disease[:128], label_key=label_key(f.disease)[:128],
        certainty=f.certainty, side=f.side, location=encode_location(f.location),
        severity=(f.severity.lower() if f.severity else None), sentence=f.sentence,
        span_start=span[0] if span else None, span_end=span[1] if span else None)
        for f, span in zip(report.findings, spans)]
    return rows


# -- queries ------------------------------------------------------------------------------------
def fts_condition(dialect: str, words: str):
    """A WHERE condition on ImageRow: its report matches `words` (all of them, stemmed)."""
    terms = re.findall(r"\w+", words.lower())
    if not terms:
        raise CxrError(f"report search needs words, got {words!r}")
    if dialect == "postgresql":
        matched = select(ReportRow.image_id).where(
            func.to_tsvector(literal_column("'english'"), ReportRow.text).op("@@")(
                func.plainto_tsquery(literal_column("'english'"), " ".join(terms))))
    elif dialect == "sqlite":
        match = " ".join(f'"{t}"' for t in terms)  # quoted: a word is never FTS5 syntax
        # the FTS rowid is the image id (migration 0003)
        matched = text("SELECT rowid FROM reports_fts WHERE reports_fts MATCH :match").bindparams(
            match=match).columns(column("rowid", Integer))
    else:
        matched = select(ReportRow.image_id).where(
            and_(*[ReportRow.text.ilike(f"%{t}%") for t in terms]))
    return ImageRow.id.in_(matched)


def disagreement_condition(direction: str, targets: Mapping[str, set[str]],
                           finding: str | None = None):
    """A WHERE condition on ImageRow for images whose report and model disagree.

    `targets`: label key -> the model's disease keys for it (from the models' score keys), so
    only diseases a model can name are compared. report-only: the report asserts X (positive)
    and the model has no finding X; model-only: the model found X and the image's report (stored,
    not refused) does not assert X."""
    if direction not in DIRECTIONS:
        raise CxrError(f"--disagree wants one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if finding:
        key = label_key(finding)
        if key not in targets:
            raise CxrError(f"no model in the archive reads {finding!r} "
                           f"(it reads {', '.join(sorted(targets)) or 'nothing yet'})")
        targets = {key: targets[key]}
    rf, f = ReportFindingRow, FindingRow
    per_disease = []
    for key, model_keys in targets.items():
        said = exists(select(rf.id).where(rf.image_id == ImageRow.id, rf.certainty == "positive",
                                          rf.label_key == key))
        found = exists(select(f.id).where(f.image_id == ImageRow.id,
                                          f.disease_key.in_(sorted(model_keys))))
        per_disease.append(and_(said, ~found) if direction == "report-only"
                           else and_(found, ~said))
    if not per_disease:
        return ImageRow.id.is_(None)  # nothing comparable: no rows
    has_report = exists(select(ReportRow.id).where(ReportRow.image_id == ImageRow.id,
                                                   ReportRow.text != ""))
    return and_(has_report, or_(*per_disease))


# -- one study: its report beside the model ---------------------------------------------------
_RANK = {"positive": 3, "uncertain": 2, "negative": 1}


def compare(record, targets: Mapping[str, set[str]]) -> dict:
    """An indexed image's report beside the model's findings, as a viewer shows them: each mined
    mention with what the model did about its disease (`found`, `not found`, or `not read` when
    no model of the archive reads it), each model finding with what the report says of it, and
    the disagreements both ways, by the rules `disagreement_condition` searches with (only a
    stored, non-empty report disagrees; only diseases a model reads count)."""
    found_keys = {model_key(f.disease) for f in record.findings}
    said: dict[str, str] = {}  # label key -> the report's strongest certainty
    for m in record.report_findings:
        key = m.get("label_key") or label_key(m["disease"])
        if _RANK.get(m["certainty"], 0) > _RANK.get(said.get(key), 0):
            said[key] = m["certainty"]
    has_report = bool(record.report)

    def model_says(key: str) -> str:
        if key not in targets:
            return "not read"
        return "found" if found_keys & set(targets[key]) else "not found"

    mentions = []
    for m in record.report_findings:
        key = m.get("label_key") or label_key(m["disease"])
        mentions.append({**m, "label_key": key, "model": model_says(key)})
    report_only: list[str] = []
    for m in mentions:
        if (m["certainty"] == "positive" and m["model"] == "not found"
                and m["disease"] not in report_only):
            report_only.append(m["disease"])
    model_findings, model_only = [], []
    for f in record.findings:
        key = label_key(f.disease)
        says = said.get(key, "not mentioned") if has_report else "no report"
        model_findings.append({"disease": f.disease, "score": f.score, "report": says})
        if has_report and says != "positive" and f.disease not in model_only:
            model_only.append(f.disease)
    return {"id": record.id, "report": record.report, "note": record.report_note,
            "mentions": mentions, "model_findings": model_findings,
            "report_only": report_only, "model_only": model_only}
