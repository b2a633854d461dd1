"""Training labels from report text: each study's report mined by `TextMiner` into the findings
(disease + side / site / severity) that `cxr train --labels-from report` learns from.

Per study and disease (Shin et al.'s pattern element, so the label space is built by the same
count rule as from MeSH terms):

* positive mentions are positive labels, each with the context its sentence gives (the words the
  annotator RNN learns to write);
* negated mentions ("no pleural effusion") are explicit negatives (label 0, kept in the record);
* uncertain mentions ("cannot exclude pneumonia") follow the policy, as CheXpert's:
  `ignore` (U-Ignore: the study's loss for that target is masked), `positive` (U-Ones) or
  `negative` (U-Zeros);
* a disease the report does not mention is 0; `normal` is 1 when nothing is positive, masked when
  the only findings are ignored uncertain ones.

A study without usable text (empty, or not text: mostly symbols, a mining failure) is left out
with a one-line note. Every study's outcome is one JSON record (report hash, mined findings with
certainty, labels, the source's own labels where it has them) for `RUN/mined_labels.jsonl`, which
`cxr labels --audit RUN` scores against the given labels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..atomic import write_atomic
from ..errors import CxrError
from ..records import Finding, Study
from .labels import pattern_element, study_terms

POLICIES = ("ignore", "positive", "negative")
NORMAL = "normal"
RECORDS = "mined_labels.jsonl"
IGNORED = "ignored_labels"  # Study.meta key: pattern elements whose loss is masked
# Open-i indexes an elevated hemidiaphragm side first (`Diaphragm/right/elevated`), so Shin's
# pattern element is `Diaphragm/right`; the miner's disease is `Diaphragm/elevated`.
SIDE_FIRST = ("Diaphragm",)
MAX_CHARS = 100_000  # far above any radiology report; a longer field is not one (nor worth mining)
_TAG = re.compile(r"<[/!?]?[A-Za-z][^<>]{0,500}>")
_WORD = re.compile(r"[A-Za-z]{2,}")


def report_hash(report: dict) -> str:
    """sha256 of the report's sections (sorted), so an audit can tell which text was mined."""
    text = json.dumps({str(k): str(v) for k, v in (report or {}).items()}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def clean_report(report: dict) -> tuple[dict[str, str], str | None]:
    """(sections with markup removed, a note when the text is unusable). Unusable: no text, or
    text that is mostly not Latin letters (a garbled or binary field, or a script the English
    rules cannot read: left out rather than mined as a report that says nothing abnormal)."""
    clean = {}
    for name, value in (report or {}).items():
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        text = html.unescape(_TAG.sub(" ", str(value or ""))).replace("\x00", " ")
        if text.strip():
            clean[str(name)] = text
    body = " ".join(clean.get(s, "") for s in ("FINDINGS", "IMPRESSION")).strip()
    if len(body) > MAX_CHARS:
        return clean, f"report text too long ({len(body):,} characters, at most {MAX_CHARS:,})"
    if not body:
        return clean, "no report text (FINDINGS / IMPRESSION empty)"
    visible = [c for c in body if not c.isspace()]
    letters = sum(c.isalpha() and c.isascii() for c in visible)
    if letters < 0.6 * len(visible) or len(_WORD.findall(body)) < 2:
        return clean, (f"report text is not readable English text ({letters} Latin letters of "
                       f"{len(visible)} characters)")
    return clean, None


def as_mesh(f: Finding) -> Finding:
    """A mined finding written as Open-i indexes it (see SIDE_FIRST)."""
    head, _, change = f.disease.partition("/")
    if head in SIDE_FIRST and change and f.side:
        return dataclasses.replace(f, disease=head, attributes=(change, *f.attributes))
    return f


def element(f: Finding) -> str:
    return NORMAL if f.disease == NORMAL else pattern_element(f.term)


def label_studies(studies: Sequence[Study], uncertain: str = "ignore", miner=None
                  ) -> tuple[list[Study], list[dict]]:
    """Each study with its findings replaced by the ones mined from its report (see the module
    docstring), and one record per study. Studies whose report is unusable come back unlabelled
    (no findings, `meta["labelled"]` False) with the reason in their record's `note`."""
    if uncertain not in POLICIES:
        raise CxrError(f"unknown uncertainty policy {uncertain!r}; choose {', '.join(POLICIES)}")
    if miner is None:
        from .text import TextMiner

        miner = TextMiner(add_normal=False)
    cleaned = [clean_report(s.report) for s in studies]
    usable = [k for k, (_, note) in enumerate(cleaned) if note is None]
    mined: dict[int, list[Finding] | str] = {}
    try:
        for k, found in zip(usable, miner.mine_many([cleaned[k][0] for k in usable])):
            mined[k] = found
    except Exception:  # one bad text must not cost the batch: mine one by one, note the failure
        for k in usable:
            if k not in mined:
                try:
                    mined[k] = miner.mine(cleaned[k][0])
                except Exception as exc:  # noqa: BLE001 - the note names it
                    mined[k] = f"mining failed: {type(exc).__name__}: {exc}"
    out, records = [], []
    for k, s in enumerate(studies):
        given = study_terms(s)
        record = {"study": s.id, "report_sha256": report_hash(s.report),
                  "given": sorted({pattern_element(t) for t in given}) if given else None}
        found = mined.get(k, cleaned[k][1])
        if isinstance(found, str):
            record.update(note=found, labels={}, findings=[])
            out.append(dataclasses.replace(s, findings=[], meta={**s.meta, "labelled": False,
                                                                 IGNORED: []}))
            records.append(record)
            continue
        findings, labels, ignored = _labels(found, uncertain)
        record.update(note=None, labels=labels, findings=[_plain(f) for f in found])
        out.append(dataclasses.replace(s, findings=findings,
                                       meta={**s.meta, "labelled": True, IGNORED: ignored}))
        records.append(record)
    return out, records


def _labels(found: list[Finding], uncertain: str) -> tuple[list[Finding], dict, list[str]]:
    """(findings to train on, {element: 1 | 0 | None (ignored)}, ignored elements)."""
    found = [as_mesh(f) for f in found]
    best: dict[str, str] = {}  # the strongest certainty of each element's mentions
    order = {"negative": 0, "uncertain": 1, "positive": 2}
    for f in found:
        e = element(f)
        if e and (e not in best or order[f.certainty] > order[best[e]]):
            best[e] = f.certainty
    positive = {e for e, c in best.items() if c == "positive" or (c == "uncertain" and uncertain == "positive")}
    ignored = sorted(e for e, c in best.items() if c == "uncertain" and uncertain == "ignore")
    # a positive label learns the context of its positive mentions (of its uncertain ones under
    # the `positive` policy when nothing else is said)
    train = [dataclasses.replace(f, certainty="positive") for f in found
             if element(f) in positive and f.certainty == best[element(f)]]
    train += [f for f in found if element(f) not in positive and f.certainty == "negative"]
    labels = {e: (1 if e in positive else None if e in ignored else 0) for e in best}
    if positive:
        labels[NORMAL] = 0
    elif ignored:
        labels[NORMAL] = None
        ignored.append(NORMAL)
    else:
        labels[NORMAL] = 1
        train.append(Finding(disease=NORMAL, source="text"))
    return train, labels, ignored


def _plain(f: Finding) -> dict:
    return {"disease": f.disease, "certainty": f.certainty, "term": as_mesh(f).term, "side": f.side,
            "location": list(f.location), "severity": f.severity, "sentence": f.sentence}


def note_summary(records: Iterable[dict], limit: int = 3) -> str | None:
    """'2 of 40 studies left out: S1 (no report text), S7 (...)', or None when none were."""
    records = list(records)
    bad = [r for r in records if r.get("note")]
    if not bad:
        return None
    shown = ", ".join(f"{r['study']} ({r['note']})" for r in bad[:limit])
    return f"{len(bad)} of {len(records)} studies left out (no usable report): {shown}" + (
        ", ..." if len(bad) > limit else "")


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    return write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS
    if not path.is_file():
        raise CxrError("no mined labels here (was the run trained with --labels-from report?)", path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CxrError(f"line {n} is not JSON: {exc}", path) from None
    return out


def audit(records: Iterable[dict], diseases: Iterable[str] | None = None) -> dict:
    """Mined vs given labels on the studies that have both: per disease precision and recall of
    the mined positives (ignored uncertain labels count as not mined), and micro totals."""
    tp, fp, fn, ignored = Counter(), Counter(), Counter(), Counter()
    n = 0
    wanted = set(diseases) if diseases is not None else None
    for r in records:
        if r.get("note") or r.get("given") is None:
            continue
        n += 1
        given = set(r["given"])
        mined = {d for d, v in r["labels"].items() if v == 1}
        for d, v in r["labels"].items():
            if v is None:
                ignored[d] += 1
        for d in given | mined:
            if wanted is not None and d not in wanted:
                continue
            if d in given and d in mined:
                tp[d] += 1
            elif d in mined:
                fp[d] += 1
            else:
                fn[d] += 1

    def ratio(a, b):
        return a / b if b else None

    names = sorted(set(tp) | set(fp) | set(fn), key=lambda d: (-(tp[d] + fn[d]), d))
    per = {d: {"given": tp[d] + fn[d], "mined": tp[d] + fp[d], "agree": tp[d], "ignored": ignored[d],
               "precision": ratio(tp[d], tp[d] + fp[d]), "recall": ratio(tp[d], tp[d] + fn[d])}
           for d in names}
    T, P, F = sum(tp.values()), sum(fp.values()), sum(fn.values())
    return {"studies": n, "per_disease": per,
            "micro": {"precision": ratio(T, T + P), "recall": ratio(T, T + F)}}
