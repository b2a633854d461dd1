"""What a simulated case contains: the contract between the case generator (which findings,
drawn from Open-i statistics) and the renderer (which puts them into the CT and projects it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Finding kinds the renderer knows, with the MeSH heading Open-i uses for each.
KINDS: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Pleural Effusion",
    "opacity": "Opacity",
    "airspace_disease": "Airspace Disease",
    "consolidation": "Consolidation",
    "nodule": "Nodule",
    "mass": "Mass",
    "granuloma": "Calcified Granuloma",
    "atelectasis": "Pulmonary Atelectasis",
    "pneumothorax": "Pneumothorax",
    "hypoinflation": "Lung/hypoinflation",
    "hyperdistention": "Lung/hyperdistention",
    "catheter": "Catheters, Indwelling",
}


@dataclass
class FindingSpec:
    """One finding to insert. `site` is a lobe or zone word as Open-i writes it
    ("upper lobe", "lower lobe", "middle lobe", "lingula", "base", "apex", "hilum", ...);
    `severity` is Open-i's word ("mild", "moderate", "severe", "small", "large", "borderline");
    `size_mm` for nodule/mass/granuloma; `term` is the MeSH-style major term written in the report,
    e.g. "Opacity/lung/base/left/mild"."""

    kind: str
    side: str | None = None
    site: str | None = None
    severity: str | None = None
    size_mm: float | None = None
    term: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Case:
    """One simulated study: an id, a seed that fixes every random choice, and its findings
    (empty = normal)."""

    id: str
    seed: int
    findings: list[FindingSpec] = field(default_factory=list)
    view: str = "PA"

    @property
    def normal(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"id": self.id, "seed": self.seed, "view": self.view,
                "findings": [f.to_dict() for f in self.findings]}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(id=d["id"], seed=int(d["seed"]), view=d.get("view", "PA"),
                   findings=[FindingSpec(**f) for f in d.get("findings", [])])
