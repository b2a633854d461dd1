"""The label space and annotation vocabulary of Shin et al. 2016, built from the reports alone.

How Shin et al. chose an image's disease pattern (reverse-engineered from their released
`openi.mesh` / `openi.mesh.top`, and reproduced exactly, image for image):

1. An image's terms are its report's `<major>` MeSH terms, de-duplicated and sorted (both images
   of a report share them), without `Technical Quality of Image Unsatisfactory` (a remark on the
   film, not on the patient).
2. Images whose report then has no term, or only `No Indexing`, are dropped: 172 images of
   `No Indexing` reports and 14 of reports indexed only as poor technical quality, 186 in all,
   which leaves 7,284 of the 7,470 images.
3. A term's pattern element is its heading (`Calcified Granuloma/lung/upper lobe/right` ->
   `Calcified Granuloma`), except for six anatomical headings where the next part is kept:
   `Aorta`, `Diaphragm`, `Lung`, `Markings`, `Spine`, `Thoracic Vertebrae`
   (`Lung/hypoinflation/mild` -> `Lung/hypoinflation`, `Diaphragm/right/elevated` ->
   `Diaphragm/right`). The image's pattern is the sorted set of its elements joined by `|`.
4. `normal` is the pattern of reports whose only term is `normal` (Open-i never combines
   `normal` with another term): 2,696 images, 37% of 7,284.
5. The label space is every pattern carried by >= 30 images: 16 single-heading patterns plus
   `normal` (no combination reaches 30; the most frequent, `Calcified Granuloma|Calcinosis`,
   has 27).

Difference from the released file: we normalise case, which Shin did not. Report CXR1776
writes `Thoracic vertebrae/degenerative` (lower-case v); Shin's case-sensitive rule 3 turned
it into the pattern `Thoracic vertebrae`, ours into `Thoracic Vertebrae/degenerative`. So its
2 images are labelled `Thoracic Vertebrae/degenerative` here and unlabelled in the released file
(120 images instead of 118). `case_sensitive=True` reproduces the released file exactly.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..atomic import write_atomic
from ..errors import CxrError
from ..records import Finding, Study, term_tokens
from .mesh import NO_INDEXING, NORMAL, canonical_heading, term_parts

TECHNICAL_QUALITY = "Technical Quality of Image Unsatisfactory"
SHIN_TWO_PART_HEADINGS = frozenset(
    {"Aorta", "Diaphragm", "Lung", "Markings", "Spine", "Thoracic Vertebrae"}
)
MIN_COUNT = 30
PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


def _finding_term(f: Finding) -> str:
    """The MeSH term as written for MeSH findings; the normalised term for mined or given ones
    (their `raw` is a text span or a label as the user wrote it)."""
    return f.raw if (f.source == "mesh" and f.raw) else f.term


def study_terms(study: Study, *, case_sensitive: bool = False) -> list[str]:
    """Shin's terms of a study: its MeSH-style terms, sorted and de-duplicated, without the
    technical-quality remark and `No Indexing`. Empty -> the study is not labelled."""
    terms = set()
    for f in study.findings:
        if f.certainty != "positive":
            continue
        raw = _finding_term(f)
        parts = term_parts(raw)
        if not parts:
            continue
        heading = canonical_heading(parts[0])
        if heading in (TECHNICAL_QUALITY, NO_INDEXING):
            continue
        if case_sensitive:
            terms.add(raw)  # as written, like the released files
        else:
            terms.add("/".join([heading, *(p.lower() for p in parts[1:])]))
    return sorted(terms)


def pattern_element(term: str, *, case_sensitive: bool = False) -> str:
    """`Lung/hypoinflation/mild` -> `Lung/hypoinflation`; `Nodule/lung/right` -> `Nodule`."""
    if case_sensitive:
        parts = term.split("/")
        head = parts[0]
        if head in SHIN_TWO_PART_HEADINGS and len(parts) > 1:
            return f"{head}/{parts[1]}"
        return head
    parts = term_parts(term)
    if not parts:
        return ""
    head = canonical_heading(parts[0])
    if head in SHIN_TWO_PART_HEADINGS and len(parts) > 1:
        return f"{head}/{parts[1].lower()}"
    return head


def study_pattern(study: Study, *, case_sensitive: bool = False) -> str | None:
    """The disease pattern of a study (`Calcified Granuloma|Calcinosis`, `normal`), or None when
    the study is not labelled (no usable terms)."""
    terms = study_terms(study, case_sensitive=case_sensitive)
    if not terms:
        return None
    return "|".join(sorted({pattern_element(t, case_sensitive=case_sensitive) for t in terms}))


def count_patterns(studies: Iterable[Study], *, case_sensitive: bool = False) -> dict[str, tuple[int, int]]:
    """pattern -> (images, reports), most images first. Counted like Shin et al., per image:
    the 101 Open-i reports that list no image count in neither column."""
    images: Counter = Counter()
    reports: Counter = Counter()
    for s in studies:
        p = study_pattern(s, case_sensitive=case_sensitive)
        if p is None or not s.images:
            continue
        images[p] += len(s.images)
        reports[p] += 1
    order = sorted(images, key=lambda p: (-images[p], p))
    return {p: (images[p], reports[p]) for p in order}


@dataclass
class LabelSpace:
    """Training targets. `exclusive=True` is Shin's set-up: a study is labelled only when its
    whole pattern is a target (one-hot, softmax); others get an all-zero row and are left out.
    `exclusive=False` gives multi-hot rows: a target is on when all its pattern elements are
    among the study's (an image with `Calcified Granuloma|Calcinosis` turns on both)."""

    targets: list[str]
    exclusive: bool = True
    case_sensitive: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # images per target when built
    min_count: int = MIN_COUNT

    @classmethod
    def build(cls, studies: Sequence[Study], min_count: int = MIN_COUNT, *, exclusive: bool = True,
              case_sensitive: bool = False) -> "LabelSpace":
        table = count_patterns(studies, case_sensitive=case_sensitive)
        targets = [p for p, (n, _) in table.items() if n >= min_count]
        if not targets:
            raise CxrError(f"no disease pattern has >= {min_count} images "
                           f"({len(studies)} studies given)")
        return cls(targets=targets, exclusive=exclusive, case_sensitive=case_sensitive,
                   counts={p: table[p][0] for p in targets}, min_count=min_count)

    def __len__(self) -> int:
        return len(self.targets)

    def index(self, target: str) -> int:
        return self.targets.index(target)

    def labels_of(self, study: Study) -> np.ndarray:
        """float32 row of len(targets): one-hot (exclusive) or multi-hot; zeros when unlabelled."""
        row = np.zeros(len(self.targets), dtype=np.float32)
        pattern = study_pattern(study, case_sensitive=self.case_sensitive)
        if pattern is None:
            return row
        if self.exclusive:
            if pattern in self.targets:
                row[self.targets.index(pattern)] = 1.0
            return row
        elements = set(pattern.split("|"))
        for i, t in enumerate(self.targets):
            if set(t.split("|")) <= elements:
                row[i] = 1.0
        return row

    def covers(self, study: Study) -> bool:
        """Whether the study gets a label (Shin trains only on those)."""
        return bool(self.labels_of(study).any())

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "exclusive": self.exclusive,
                "case_sensitive": self.case_sensitive, "counts": dict(self.counts),
                "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpace":
        try:
            return cls(targets=list(d["targets"]), exclusive=bool(d.get("exclusive", True)),
                       case_sensitive=bool(d.get("case_sensitive", False)),
                       counts=dict(d.get("counts", {})), min_count=int(d.get("min_count", MIN_COUNT)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CxrError(f"not a label space: {exc}") from exc

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LabelSpace":
        return cls.from_dict(_read_json(path))


@dataclass
class Vocabulary:
    """Annotation tokens: the lower-cased '/'-parts of MeSH terms (`upper lobe` is one token),
    at most 5 per term, plus <pad> (id 0), <start>, <end>, <unk>."""

    tokens: list[str]

    def __post_init__(self):
        if list(self.tokens[: len(SPECIALS)]) != list(SPECIALS):
            self.tokens = list(SPECIALS) + [t for t in self.tokens if t not in SPECIALS]
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, studies: Iterable[Study], min_count: int = 1) -> "Vocabulary":
        """From the terms Shin keeps (`study_terms`); tokens seen < min_count times are <unk>."""
        counts: Counter = Counter()
        for s in studies:
            for term in study_terms(s):
                counts.update(term_tokens(term))
        kept = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def start_id(self) -> int:
        return self._ids[START]

    @property
    def end_id(self) -> int:
        return self._ids[END]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    def encode(self, term: str | Sequence[str], length: int | None = None) -> list[int]:
        """A term (`Opacity/lung/base`) or its tokens -> [<start>, ids..., <end>], padded with
        <pad> to `length` when given (7 = 5 tokens + start + end)."""
        tokens = term_tokens(term) if isinstance(term, str) else [t.lower() for t in term][:5]
        ids = [self.start_id, *(self._ids.get(t, self.unk_id) for t in tokens), self.end_id]
        if length is not None:
            if len(ids) > length:
                ids = ids[: length - 1] + [self.end_id]
            ids += [self.pad_id] * (length - len(ids))
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """ids -> tokens, from after <start> up to <end>, skipping <pad>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return out

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise CxrError("not a vocabulary: expected {'tokens': [...]}")
        return cls(list(d["tokens"]))

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_dict(_read_json(path))


def _read_json(path: str | Path) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise CxrError("file not found", p) from exc
    except (OSError, ValueError) as exc:
        raise CxrError(f"cannot read JSON: {exc}", p) from exc


def normal_fraction(studies: Sequence[Study]) -> float:
    """Share of labelled images whose pattern is `normal` (Shin: 37%)."""
    table = count_patterns(studies)
    total = sum(n for n, _ in table.values())
    return table.get(NORMAL, (0, 0))[0] / total if total else 0.0
