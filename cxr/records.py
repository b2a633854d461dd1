"""The one contract every source yields: Study -> Images + report + Findings.

Source adapters (Open-i, NIH, folder, phantom) all produce these, so mining, training,
evaluation and indexing never special-case a dataset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

CERTAINTIES = ("positive", "negative", "uncertain")
SIDES = ("left", "right", "bilateral")
MAX_TOKENS = 5  # Shin et al. 2016: at most 5 words per annotation, plus start/end


def normalise_term(term: str) -> str:
    """Canonical form of a MeSH-style term: parts stripped, inner whitespace collapsed."""
    return "/".join(" ".join(p.split()) for p in term.split("/") if p.strip())


def term_tokens(term: str) -> list[str]:
    """Annotation tokens of a term: its lower-cased '/'-parts, at most MAX_TOKENS.

    `Opacity/lung/upper lobe/right` -> ["opacity", "lung", "upper lobe", "right"].
    """
    return [p.lower() for p in normalise_term(term).split("/")][:MAX_TOKENS]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates of the image it belongs to."""

    label: str
    x: float
    y: float
    w: float
    h: float

    def scaled(self, sx: float, sy: float | None = None) -> "Box":
        sy = sx if sy is None else sy
        return Box(self.label, self.x * sx, self.y * sy, self.w * sx, self.h * sy)

    @classmethod
    def around(cls, mask, label: str) -> "Box | None":
        """The tightest box around the true pixels of a 2-D mask (None: none is true)."""
        import numpy as np

        rows = np.flatnonzero(np.any(mask, axis=1))
        cols = np.flatnonzero(np.any(mask, axis=0))
        if not len(rows):
            return None
        return cls(label, float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1),
                   float(rows[-1] - rows[0] + 1))


@dataclass(frozen=True)
class Finding:
    """One disease statement with its context, mined from MeSH terms or free text.

    `disease` is the MeSH heading as Open-i writes it (case/whitespace normalised);
    `raw` keeps the original text the finding came from.
    """

    disease: str
    organ: str | None = None
    location: tuple[str, ...] = ()
    side: str | None = None
    severity: str | None = None
    certainty: str = "positive"
    raw: str = ""
    sentence: str | None = None
    source: str = "mesh"  # "mesh" | "text" | "label" | "phantom"
    attributes: tuple[str, ...] = ()  # other descriptors: "patchy", "multiple", "chronic", ...

    @property
    def term(self) -> str:
        """The normalised MeSH-style term: disease/organ/location.../side/severity."""
        parts = [self.disease, self.organ, *self.location, self.side, *self.attributes, self.severity]
        return "/".join(p for p in parts if p)

    def tokens(self) -> list[str]:
        """The annotation sequence the RNN learns to write for this finding."""
        if self.raw and self.source == "mesh":
            return term_tokens(self.raw)
        return term_tokens(self.term)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["location"] = list(self.location)
        d["attributes"] = list(self.attributes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        d = dict(d)
        d["location"] = tuple(d.get("location") or ())
        d["attributes"] = tuple(d.get("attributes") or ())
        return cls(**d)


@dataclass
class Image:
    """One radiograph of a study. `path` may be None when only the report is known."""

    id: str
    path: Path | None = None
    view: str | None = None  # "PA", "AP", "LAT", "LL", ... as in the DICOM header
    boxes: list[Box] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def frontal(self) -> bool:
        """A frontal film: as decided from the whole header or by the quality gate when a source
        did (`meta["view_class"]`, see sources/openi_views.py), else by View Position (empty
        counts as frontal)."""
        decided = self.meta.get("view_class")
        if decided in ("frontal", "lateral"):
            return decided == "frontal"
        return (self.view or "").upper() in ("PA", "AP", "")


@dataclass
class Study:
    """A report and the images it describes. NIH has one image per study; Open-i about two."""

    id: str
    patient_id: str
    images: list[Image] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)  # section -> text: FINDINGS, IMPRESSION, ...
    findings: list[Finding] = field(default_factory=list)
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def positive(self) -> list[Finding]:
        return [f for f in self.findings if f.certainty == "positive"]

    @property
    def labelled(self) -> bool:
        """False when the source says the report was never indexed (Open-i "No Indexing")."""
        return self.meta.get("indexed", True) is not False

    @property
    def normal(self) -> bool:
        """No positive finding, in a report that was indexed (unindexed reports are unknown)."""
        if not self.labelled:
            return False
        return not self.positive or all(f.disease.lower() == "normal" for f in self.positive)
