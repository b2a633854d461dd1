"""Structured queries over indexed findings: what a radiologist types ("opacity left base",
"moderate effusion") turned into SQL over the `findings` table.

A `Query` is a list of `FindingClause`s that must all hold on the same image (each clause is met
by one finding: "moderate left basal opacity" is one finding, not three), plus score thresholds
on any target (`scores`, which also reaches targets below their operating threshold).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import and_, exists, select
from sqlalchemy.sql.util import ClauseAdapter

from ..errors import CxrError
from .models import FindingRow, ImageRow

SIDES = {"left": "left", "right": "right", "bilateral": "bilateral", "both": "bilateral",
         "bibasilar": "bilateral"}
SEVERITIES = {"mild", "moderate", "severe", "small", "large", "minimal", "marked", "extensive"}
# words people type -> the site words Open-i MeSH terms use
LOCATION_WORDS = {"basal": "base", "bases": "base", "bibasilar": "base", "basilar": "base",
                  "apical": "apex", "apices": "apex", "hilar": "hilum", "lingular": "lingula"}


@dataclass
class FindingClause:
    """Conditions one finding must meet. `finding` is a disease name (case-insensitive; a word of
    a known disease also matches it, "effusion" -> "Pleural Effusion"); `words` must all appear
    in the generated annotation."""

    finding: str | None = None
    side: str | None = None
    location: str | None = None
    severity: str | None = None
    min_score: float | None = None
    words: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.finding or self.side or self.location or self.severity
                    or self.min_score is not None or self.words)

    def describe(self) -> str:
        parts = [self.severity, self.side, self.location, self.finding, *self.words]
        text = " ".join(p for p in parts if p) or "any finding"
        return text + (f" (score >= {self.min_score:g})" if self.min_score is not None else "")


@dataclass
class Query:
    clauses: list[FindingClause] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # target -> minimum score
    model_id: str | None = None
    status: str | None = "ok"  # "ok", "failed" or None for both
    study_uid: str | None = None
    limit: int = 50
    offset: int = 0
    # further SQL conditions on ImageRow (report text, report/model disagreement: archive.reports)
    conditions: list = field(default_factory=list)


@dataclass
class Vocabulary:
    """What the archive holds, to resolve free text (and to fill a search form's menus)."""

    diseases: dict[str, str] = field(default_factory=dict)  # lower-case key -> display name
    locations: set[str] = field(default_factory=set)
    severities: set[str] = field(default_factory=set)
    sides: set[str] = field(default_factory=set)

    def to_dict(self) -> dict:
        return {"diseases": sorted(self.diseases.values()), "locations": sorted(self.locations),
                "severities": sorted(self.severities), "sides": sorted(self.sides)}


def parse_text(text: str, vocab: Vocabulary) -> FindingClause:
    """"opacity left base" -> FindingClause(finding="opacity", side="left", location="base").

    Longest phrases first, so "upper lobe" is a location and "pleural effusion" a disease; words
    that are none of these must appear in the annotation text.
    """
    words = text.lower().replace(",", " ").split()
    clause = FindingClause()
    rest: list[str] = []
    diseases = vocab.diseases
    locations = set(vocab.locations)
    severities = SEVERITIES | set(vocab.severities)
    i = 0
    while i < len(words):
        for n in (3, 2, 1):
            phrase = " ".join(words[i:i + n])
            if len(words[i:i + n]) < n:
                continue
            if n == 1 and phrase in SIDES and clause.side is None:
                clause.side = SIDES[phrase]
                if phrase == "bibasilar" and clause.location is None:
                    clause.location = "base"
            elif phrase in diseases and clause.finding is None:
                clause.finding = phrase
            elif LOCATION_WORDS.get(phrase, phrase) in locations and clause.location is None:
                clause.location = LOCATION_WORDS.get(phrase, phrase)
            elif n == 1 and phrase in LOCATION_WORDS and clause.location is None:
                clause.location = LOCATION_WORDS[phrase]
            elif n == 1 and phrase in severities and clause.severity is None:
                clause.severity = phrase
            elif n == 1 and clause.finding is None and _disease_word(phrase, diseases):
                clause.finding = phrase
            elif n == 1:
                rest.append(phrase)
            else:
                continue
            i += n
            break
    clause.words = tuple(rest)
    return clause


def _disease_word(word: str, diseases: dict[str, str]) -> bool:
    return any(word in key.split() for key in diseases)


def _clause_conditions(clause: FindingClause, vocab: Vocabulary | None):
    f = FindingRow
    conds = []
    if clause.finding:
        key = " ".join(clause.finding.lower().split())
        if vocab is None or key in vocab.diseases:
            conds.append(f.disease_key == key)
        else:
            matches = [k for k in (vocab.diseases if vocab else ()) if key in k.split()]
            if not matches:
                conds.append(f.disease_key == key)  # nothing indexed under that name: no rows
            else:
                conds.append(f.disease_key.in_(matches))
    if clause.side:
        side = SIDES.get(clause.side.lower())
        if side is None:
            raise CxrError(f"unknown side {clause.side!r}: use left, right or bilateral")
        conds.append(f.side == side)
    if clause.location:
        loc = " ".join(clause.location.lower().split())
        loc = LOCATION_WORDS.get(loc, loc)
        conds.append(f.location.like(f"%/{loc}/%"))
    if clause.severity:
        conds.append(f.severity == clause.severity.lower())
    if clause.min_score is not None:
        conds.append(f.score >= float(clause.min_score))
    for w in clause.words:
        conds.append(f.annotation.like(f"%{w.lower()}%"))
    return conds


def _image_conditions(query: Query):
    conds = []
    if query.model_id:
        conds.append(ImageRow.model_id == query.model_id)
    if query.status:
        conds.append(ImageRow.status == query.status)
    if query.study_uid:
        conds.append(ImageRow.study_uid == query.study_uid)
    for target, threshold in query.scores.items():
        conds.append(ImageRow.scores[target].as_float() >= float(threshold))
    return conds + list(query.conditions)


def matching_ids(session, query: Query, vocab: Vocabulary | None) -> list[tuple[int, float | None]]:
    """(image id, score of the finding that met the first clause), best first, paged.

    With a finding clause the rows stream from the (disease, score) index in score order and
    stop at the page's end, so the cost follows the page, not the archive."""
    clauses = [c for c in query.clauses if not c.empty()]
    image_conds = _image_conditions(query)
    want = query.offset + query.limit
    if not clauses:
        stmt = select(ImageRow.id).where(*image_conds).order_by(ImageRow.id.desc())
        rows = session.execute(stmt.offset(query.offset).limit(query.limit)).all()
        return [(r[0], None) for r in rows]
    first, others = clauses[0], clauses[1:]
    stmt = (select(FindingRow.image_id, FindingRow.score)
            .join(ImageRow, ImageRow.id == FindingRow.image_id)
            .where(*_clause_conditions(first, vocab), *image_conds))
    for clause in others:
        other = FindingRow.__table__.alias()
        conds = _clause_conditions(clause, vocab)
        adapter = ClauseAdapter(other)  # rebind the clause from FindingRow to the alias
        stmt = stmt.where(exists(select(other.c.id).where(
            other.c.image_id == FindingRow.image_id, and_(*[adapter.traverse(c) for c in conds]))))
    stmt = stmt.order_by(FindingRow.score.desc(), FindingRow.image_id)
    seen: dict[int, float] = {}
    result = session.execute(stmt.execution_options(yield_per=max(want * 2, 64)))
    for image_id, score in result:
        if image_id not in seen:
            seen[image_id] = float(score)
            if len(seen) >= want:
                break
    result.close()
    return list(seen.items())[query.offset:want]
