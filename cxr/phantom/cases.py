"""Which findings a simulated study has, drawn from the real Open-i MeSH statistics.

A case is made by resampling a real Open-i report: the generator keeps every report whose MeSH
`<major>` terms include at least one finding the renderer can draw (`renderable_kinds()`), and a case
takes the renderable terms of one such report, chosen at random. Co-occurrence, sides, sites and
severities therefore follow the real reports exactly (a bootstrap, not a fitted model), and the
annotation language is the real one. Normal studies are drawn with the real share of reports whose
only term is `normal`: 1,391 of the 3,860 indexed Open-i reports, 36% (Shin et al. count 37% of
the images; 95 reports say "No Indexing" and are left out).

Reports whose findings are all outside the renderer's reach (degenerative spine, scars, hilar
calcified nodes, ...) are not drawn: rendering them as normal images under an abnormal report
would be false ground truth. So every renderable finding is more frequent than in Open-i by the
factor 1 / P(renderable | abnormal), about 1.4 (1,753 of the 2,469 abnormal indexed reports have
one); `CaseGenerator.expected_frequencies()` gives the exact figures a drawn set should show.

Context the radiologist did not write (an effusion with no side, an opacity with no site, a
cardiomegaly with no grade) is drawn from the same kind's real distribution, given to the renderer,
and, with `terms="complete"` (default), written into the term in Open-i order
(heading/organ/site/side/descriptors/severity), so the term describes the image exactly; with
`terms="as_reported"` the term stays as the radiologist wrote it. What was drawn is recorded in
`case.meta["filled"]`.
"""
from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import CxrError
from ..records import normalise_term
from .spec import KINDS, Case, FindingSpec

SIDES = ("left", "right", "bilateral")
# Lung sites the renderer can place a finding in, as Open-i words.
SITES = ("upper lobe", "middle lobe", "lower lobe", "lingula", "base", "apex", "hilum")
# Open-i site words that name a renderable place under another word: word -> (site, side or None).
SITE_ALIASES = {
    "retrocardiac": ("lower lobe", "left"),
    "costophrenic angle": ("base", None),
    "pleural sinus": ("base", None),
    "sulcus": ("base", None),
}
# Organ / place words that put a finding outside the lungs and pleura: not renderable.
NON_LUNG = {"mediastinum", "breast", "ribs", "heart", "thoracic vertebrae", "abdomen",
            "adipose tissue", "paratracheal", "supracardiac", "sternum", "lymph nodes",
            "blood vessels", "trachea, carina", "clavicle", "shoulder", "spine"}
ORGANS = {"lung", "thorax", "pleura", "pulmonary alveoli"}
MULTIPLE = {"multiple", "scattered"}

# Severity words the renderer understands per kind, and how other Open-i words map onto them.
SEVERITIES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("borderline", "mild", "moderate", "severe"),
    "effusion": ("small", "moderate", "large"),
    "opacity": ("mild", "moderate", "severe"),
    "airspace_disease": ("mild", "moderate", "severe"),
    "consolidation": ("mild", "moderate", "severe"),
    "atelectasis": ("mild", "moderate", "severe"),
    "pneumothorax": ("small", "moderate", "large"),
    "hypoinflation": ("mild", "moderate", "severe"),
    "hyperdistention": ("mild", "moderate", "severe"),
    "nodule": ("small", "large"),
    "mass": ("small", "large"),
    "granuloma": ("small", "large"),
    "catheter": (),
    "density": ("mild", "moderate", "severe"),
    "infiltrate": ("mild", "moderate", "severe"),
    "diaphragm_elevated": ("mild", "moderate", "severe"),
    "emphysema": ("mild", "moderate", "severe"),
    "aortic_calcinosis": ("mild", "moderate", "severe"),
    "granulomatous_disease": (),
}
SEVERITY_WORDS = {"borderline", "mild", "moderate", "severe", "small", "large"}
_TO_SMALL_LARGE = {"borderline": "small", "mild": "small", "severe": "large"}
_TO_MILD_SEVERE = {"borderline": "mild", "small": "mild", "large": "severe"}
SEVERITY_MAP: dict[str, dict[str, str]] = {
    "cardiomegaly": {"small": "mild", "large": "severe"},
    "effusion": _TO_SMALL_LARGE,
    "pneumothorax": _TO_SMALL_LARGE,
    "nodule": {**_TO_SMALL_LARGE, "moderate": "large"},
    "mass": {**_TO_SMALL_LARGE, "moderate": "large"},
    "granuloma": {**_TO_SMALL_LARGE, "moderate": "large"},
}
for _k in ("opacity", "airspace_disease", "consolidation", "atelectasis", "hypoinflation",
           "hyperdistention", "density", "infiltrate", "diaphragm_elevated", "emphysema",
           "aortic_calcinosis"):
    SEVERITY_MAP[_k] = _TO_MILD_SEVERE

# Which context the renderer needs per kind (the rest is left as written).
NEEDS_SITE = {"opacity", "airspace_disease", "consolidation", "atelectasis", "nodule", "mass",
              "granuloma", "density", "infiltrate"}
NEEDS_SIDE = NEEDS_SITE | {"effusion", "pneumothorax", "catheter", "diaphragm_elevated"}
# Grades Open-i writes (the renderer draws one at random otherwise, e.g. for aortic calcinosis,
# which Open-i never grades: its term is left alone).
NEEDS_SEVERITY = {k for k, v in SEVERITIES.items()
                  if v and k not in ("nodule", "mass", "granuloma", "aortic_calcinosis")}
# Kinds whose Open-i terms name the organ ("Opacity/lung/base/left").
LUNG_ORGAN_KINDS = {"opacity", "airspace_disease", "consolidation", "nodule", "mass", "granuloma",
                    "density", "infiltrate"}
POINT_KINDS = {"nodule", "mass", "granuloma"}  # drawn one per lesion: bilateral/multiple -> several
PAIRED_KINDS = {"catheter", "diaphragm_elevated"}  # bilateral -> one on each side
SINGLE_KINDS = {"cardiomegaly", "hypoinflation", "hyperdistention", "emphysema",
                "aortic_calcinosis", "granulomatous_disease"}  # at most one per study
# Kinds the renderer draws on both lungs whatever the term says (`findings._inflation`,
# `_emphysema`): their side is not in the image. A term naming one side ("Lung/left/
# hyperdistention", four Open-i terms) would not describe it, and "bilateral" (11 of about 600
# such Open-i terms; the rest name no side, as radiologists write a whole-lung process) is the
# report's wording, which no reader of the image can tell: the complete term names no side.
BOTH_LUNG_KINDS = {"hypoinflation", "hyperdistention", "emphysema"}
# Lesion diameter in mm by kind and size word (None = not stated).
SIZE_MM: dict[str, dict[str | None, tuple[float, float]]] = {
    "nodule": {None: (6.0, 20.0), "small": (4.0, 8.0), "large": (15.0, 28.0)},
    "mass": {None: (32.0, 55.0), "small": (30.0, 38.0), "large": (50.0, 70.0)},
    "granuloma": {None: (3.0, 7.0), "small": (2.0, 4.0), "large": (6.0, 9.0)},
}


@lru_cache(maxsize=1)
def renderable_kinds() -> dict[str, str]:
    """Every kind the renderer draws -> its Open-i heading: `spec.KINDS` plus the renderer's
    extra Open-i findings (density, infiltrate, elevated hemidiaphragm, emphysema, aortic
    calcification, granulomatous disease)."""
    try:
        from .findings import EXTRA_KINDS
    except ImportError:  # a renderer without extras
        EXTRA_KINDS = {}
    return {**KINDS, **{k: v for k, v in EXTRA_KINDS.items() if k in SEVERITIES}}


# How an Open-i term names each kind: (heading, word that must follow it or None). Open-i writes
# emphysema under two headings, and aortic calcification as Calcinosis/aorta[, thoracic].
TERM_FORMS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "hypoinflation": (("Lung", "hypoinflation"),),
    "hyperdistention": (("Lung", "hyperdistention"),),
    "diaphragm_elevated": (("Diaphragm", "elevated"),),
    "emphysema": (("Pulmonary Emphysema", None), ("Emphysema", None)),
    "aortic_calcinosis": (("Calcinosis", "aorta"), ("Calcinosis", "aorta, thoracic")),
    "density": (("Density", None),),
    "infiltrate": (("Infiltrate", None),),
    "granulomatous_disease": (("Granulomatous Disease", None),),
}


@dataclass
class Mention:
    """One renderable MeSH term of a real report, split into the parts the renderer needs.

    `parts` are the term's '/'-parts as written (normalised), `site`/`side`/`severity` the
    renderer's reading of them (aliases resolved, severity mapped onto the kind's words)."""

    kind: str
    parts: list[str]
    site: str | None = None
    side: str | None = None
    severity: str | None = None
    multiple: bool = False

    @property
    def term(self) -> str:
        return "/".join(self.parts)


def parse_term(term: str) -> Mention | None:
    """Read an Open-i MeSH major term as a renderable finding, or None when the renderer cannot
    draw it (another disease, or a place outside the lungs such as "Mass/mediastinum/right")."""
    parts = normalise_term(term).split("/")
    if not parts or not parts[0]:
        return None
    head, low = parts[0], [p.lower() for p in parts]
    kind = _kind_of(head, low[1:])
    if kind is None:
        return None
    if kind != "aortic_calcinosis" and any(w in NON_LUNG for w in low[1:]):
        return None
    m = Mention(kind=kind, parts=[head] + low[1:])
    for w in low[1:]:
        if w in SIDES and m.side is None:
            m.side = w
        elif w in SITES and m.site is None:
            m.site = w
        elif w in SITE_ALIASES and m.site is None:
            m.site, alias_side = SITE_ALIASES[w]
            m.side = m.side or alias_side
        elif w in SEVERITY_WORDS and m.severity is None:
            m.severity = w
        elif w in MULTIPLE:
            m.multiple = True
    if m.severity is not None:
        allowed = SEVERITIES[kind]
        if not allowed:  # the renderer takes no grade: the word stays in the term only
            m.severity = None
        elif m.severity not in allowed:
            mapped = SEVERITY_MAP.get(kind, {}).get(m.severity)
            m.parts = [mapped if p == m.severity else p for p in m.parts] if mapped else m.parts
            if mapped is None:
                m.parts = [p for p in m.parts if p != m.severity]
            m.severity = mapped
    if kind not in NEEDS_SITE:
        m.site = None
    return m


def _kind_of(head: str, words: list[str]) -> str | None:
    """The renderer's kind for a term's heading and lower-cased qualifiers, if it has one."""
    kinds = renderable_kinds()
    for kind, forms in TERM_FORMS.items():
        if kind in kinds and any(head == h and (w is None or w in words) for h, w in forms):
            return kind
    for kind, heading in kinds.items():
        if "/" not in heading and heading == head and kind not in TERM_FORMS:
            return kind
    return None


@dataclass
class DrawnCase(Case):
    """A Case plus where it came from: `meta` holds `source` (the Open-i report id whose findings
    it took, "" for a normal case), `reported` (those terms as written there), `filled` (per
    finding, the context parts that were drawn because the report did not state them), and the
    simulated patient's `age` and `sex`."""

    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DrawnCase":
        case = super().from_dict(d)
        case.meta = dict(d.get("meta") or {})
        return case


def _weighted(counter: Counter, rng: np.random.Generator, allowed: Iterable[str] | None = None):
    """Draw a key of `counter` with probability proportional to its count (restricted to
    `allowed` when given); None if nothing is left."""
    items = [(k, c) for k, c in sorted(counter.items()) if allowed is None or k in allowed]
    if not items:
        return None
    cum = list(itertools.accumulate(c for _, c in items))
    return items[bisect.bisect_right(cum, rng.random() * cum[-1])][0]


class CaseGenerator:
    """Draws simulated studies whose findings follow real Open-i reports.

    `reports`: (report id, its MeSH major terms) for every report; `normal_share`: the share of
    normal cases to draw (default: the share of indexed reports whose only term is "normal")."""

    def __init__(self, reports: Sequence[tuple[str, Sequence[str]]],
                 normal_share: float | None = None, terms: str = "complete"):
        if terms not in ("complete", "as_reported"):
            raise CxrError(f"terms must be 'complete' or 'as_reported', not {terms!r}")
        self.terms = terms
        self.n_reports = len(reports)
        self.n_indexed = 0  # reports the indexers gave terms (not empty, not "No Indexing")
        self.n_normal = 0
        self.pool: list[tuple[str, list[Mention]]] = []
        for rid, majors in reports:
            low = [t for t in (normalise_term(t).lower() for t in majors) if t]
            if not low or "no indexing" in low:
                continue
            self.n_indexed += 1
            if all(t == "normal" for t in low):
                self.n_normal += 1
                continue
            # one mention per distinct term: a term indexed twice is one finding
            terms = dict.fromkeys(normalise_term(t) for t in majors)
            mentions = [m for m in map(parse_term, terms) if m is not None]
            if mentions:
                self.pool.append((rid, mentions))
        if not self.pool or self.n_normal == 0:
            raise CxrError(f"no usable Open-i reports among {len(reports)} "
                           f"({self.n_normal} normal, {len(self.pool)} with renderable findings)")
        self.normal_share = (self.n_normal / self.n_indexed if normal_share is None
                             else float(normal_share))
        if not 0.0 <= self.normal_share < 1.0:
            raise CxrError(f"normal_share must be in [0, 1), not {normal_share}")
        # Context distributions per kind, from the terms that state it.
        self.kinds = renderable_kinds()
        self.sides: dict[str, Counter] = {k: Counter() for k in self.kinds}
        self.sites: dict[str, Counter] = {k: Counter() for k in self.kinds}
        self.site_side: dict[str, Counter] = {k: Counter() for k in self.kinds}
        self.severities: dict[str, Counter] = {k: Counter() for k in self.kinds}
        for _, mentions in self.pool:
            for m in mentions:
                if m.side:
                    self.sides[m.kind][m.side] += 1
                if m.site:
                    self.sites[m.kind][m.site] += 1
                if m.site and m.side:
                    self.site_side[m.kind][(m.site, m.side)] += 1
                if m.severity:
                    self.severities[m.kind][m.severity] += 1

    @classmethod
    def from_openi(cls, path: str | Path | None = None, **kwargs) -> "CaseGenerator":
        """Build from Open-i reports: the NLMCXR_reports.tgz or a folder of ecgen-radiology XML
        (default: the data cache's `openi/NLMCXR_reports.tgz`, fetched once if missing)."""
        from ..fetch import locate
        from ..sources.openi import read_openi

        if path is None:
            path = locate("openi/NLMCXR_reports.tgz")
        return cls.from_studies(read_openi(path), **kwargs)

    @classmethod
    def from_studies(cls, studies: Iterable, **kwargs) -> "CaseGenerator":
        """Build from `cxr.records.Study` objects whose findings came from MeSH major terms."""
        reports = []
        for s in studies:
            terms = s.meta.get("mesh")
            if terms is None:
                terms = [f.raw or f.term for f in s.findings
                         if f.source == "mesh" and f.certainty == "positive"]
            reports.append((s.id, list(terms)))
        return cls(reports, **kwargs)

    # -- statistics -------------------------------------------------------------------------
    def expected_frequencies(self) -> dict[str, float]:
        """Share of drawn cases that should carry each kind (and "normal")."""
        counts = Counter(k for _, ms in self.pool for k in {m.kind for m in ms})
        abnormal = 1.0 - self.normal_share
        freq = {k: abnormal * counts[k] / len(self.pool) for k in self.kinds}
        freq["normal"] = self.normal_share
        return freq

    # -- drawing ----------------------------------------------------------------------------
    def draw(self, n: int, seed: int = 0, start: int = 1) -> list[DrawnCase]:
        """`n` cases with ids CXR<start>..CXR<start+n-1>. Case i depends only on (seed, i), so a
        longer draw extends a shorter one and any case can be redrawn alone."""
        return [self.case(i, seed) for i in range(start, start + n)]

    def case(self, index: int, seed: int = 0) -> DrawnCase:
        """The case with id CXR<index> of the set drawn with `seed`."""
        rng = np.random.default_rng([int(seed), int(index)])
        render_seed = int(rng.integers(0, 2**31 - 1))
        meta = {"age": int(rng.integers(18, 91)), "sex": "F" if rng.random() < 0.5 else "M",
                "source": "", "reported": [], "filled": []}
        case = DrawnCase(id=f"CXR{index}", seed=render_seed, meta=meta)
        if rng.random() < self.normal_share:
            return case
        rid, mentions = self.pool[int(rng.integers(len(self.pool)))]
        meta["source"], meta["reported"] = rid, [m.term for m in mentions]
        seen: set[str] = set()
        for m in mentions:
            if m.kind in SINGLE_KINDS:
                if m.kind in seen:
                    continue
                seen.add(m.kind)
            for spec, filled in self._specs(m, rng):
                case.findings.append(spec)
                meta["filled"].append(filled)
        return case

    def _specs(self, m: Mention, rng: np.random.Generator) -> list[tuple[FindingSpec, list[str]]]:
        """The renderer's findings for one mention: one, or several lesions for a point kind
        that is multiple or bilateral; context the term lacks is drawn."""
        kind = m.kind
        filled: list[str] = []
        if kind in BOTH_LUNG_KINDS and m.side is not None:
            m = replace(m, side=None, parts=m.parts if self.terms == "as_reported"
                                    else [p for p in m.parts if p != m.side])
        side, site, severity = m.side, m.site, m.severity
        if kind in NEEDS_SITE and site is None:
            site = self._draw_site(kind, side, rng)
            filled.append("site")
        if kind in NEEDS_SIDE and side is None:
            side = self._draw_side(kind, site, rng)
            filled.append("side")
        if kind in NEEDS_SEVERITY and severity is None:
            severity = _weighted(self.severities[kind], rng) or SEVERITIES[kind][0]
            filled.append("severity")
        term = self._term(m, site, side, severity, filled)
        count = 1
        if kind in POINT_KINDS and (m.multiple or side == "bilateral"):
            count = int(rng.integers(2, 4))
        elif kind in PAIRED_KINDS and side == "bilateral":
            count = 2  # one on each side
        out = []
        for j in range(count):
            lesion_side, lesion_site = side, site
            if count > 1 and side == "bilateral":
                lesion_side = ("left", "right")[j % 2] if j < 2 else str(rng.choice(["left", "right"]))
            if kind in POINT_KINDS and j > 0 and "site" in filled:
                lesion_site = self._draw_site(kind, lesion_side, rng)
            if lesion_side in ("left", "right"):
                lesion_site = _compatible_site(lesion_site, lesion_side)
            size = None
            if kind in POINT_KINDS:
                lo, hi = SIZE_MM[kind][severity]
                size = round(float(rng.uniform(lo, hi)), 1)
            out.append((FindingSpec(kind=kind, side=lesion_side, site=lesion_site,
                                    severity=severity, size_mm=size, term=term), list(filled)))
        return out

    def _draw_site(self, kind: str, side: str | None, rng: np.random.Generator) -> str:
        allowed = [s for s in SITES if side is None or _compatible_site(s, side) == s]
        return _weighted(self.sites[kind], rng, allowed) or "base"

    def _draw_side(self, kind: str, site: str | None, rng: np.random.Generator) -> str:
        if site == "lingula":
            return "left"
        if site == "middle lobe":
            return "right"
        if site is not None and any(s == site for s, _ in self.site_side[kind]):
            given = Counter({sd: c for (s, sd), c in self.site_side[kind].items() if s == site})
            return _weighted(given, rng)
        allowed = SIDES if kind != "pneumothorax" else ("left", "right")
        return _weighted(self.sides[kind], rng, allowed) or "right"

    def _term(self, m: Mention, site, side, severity, filled: list[str]) -> str:
        """The term written for the finding: as reported, or with drawn context inserted where
        Open-i puts it (heading/organ/site/side/descriptors/severity)."""
        parts = list(m.parts)
        if self.terms == "as_reported":
            return "/".join(parts)
        if "site" in filled:
            if len(parts) > 1 and parts[1] in ORGANS:
                parts.insert(2, site)
            elif m.kind in LUNG_ORGAN_KINDS:
                parts[1:1] = ["lung", site]
            else:
                parts.insert(1, site)
        if "side" in filled and not (site == "lingula" and side == "left"):
            anchors = [i for i, p in enumerate(parts) if p in SITES or p in SITE_ALIASES or p in ORGANS]
            at = (max(anchors) + 1) if anchors else 1
            parts.insert(at, side)
        if "severity" in filled:
            parts.append(severity)
        return "/".join(parts)


def _compatible_site(site: str | None, side: str) -> str | None:
    """Lingula is left and the middle lobe right: on the other side the same zone is the mid
    lung, which the renderer draws as the upper part of the lower lobe's zone."""
    if site == "lingula" and side == "right":
        return "middle lobe"
    if site == "middle lobe" and side == "left":
        return "lingula"
    return site


def summarise(cases: Sequence[Case]) -> dict[str, float]:
    """Share of cases carrying each kind, and of normal cases: to compare a drawn set with
    `CaseGenerator.expected_frequencies()`."""
    n = max(len(cases), 1)
    counts = Counter(k for c in cases for k in {f.kind for f in c.findings})
    out = {k: counts[k] / n for k in renderable_kinds()}
    out["normal"] = sum(c.normal for c in cases) / n
    return out
