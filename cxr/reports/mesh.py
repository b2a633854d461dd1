"""Open-i MeSH `<major>` terms -> Findings.

An Open-i term is a '/'-separated list: a heading (a MeSH descriptor such as
`Pulmonary Atelectasis`, or an anatomical one such as `Lung`) followed by qualifier words, e.g.
`Opacity/lung/base/left/patchy/mild` or `Lung/hypoinflation/mild`.

The word classes below were derived from the data, not guessed: all 1,719 distinct `<major>`
terms of the 3,955 reports (121 heading spellings, 119 after case folding; 87 distinct qualifier
words; `cxr labels --parts` prints them by position). Every qualifier that occurs falls in
exactly one class (checked by tests/test_mesh.py):

* SIDES: left, right, bilateral.
* SEVERITIES: mild, moderate, severe, small, large, borderline (size and grade words).
* ORGANS: structures (`lung`, `thoracic vertebrae`, `aorta`, `ribs`, `lymph nodes`, ...).
  The first one is the Finding's `organ`; later ones go to `location`.
* LOCATIONS: sites within an organ (`base`, `upper lobe`, `hilum`, `apex`, `lingula`, ...).
* CHANGES: what happened to a structure named by an anatomical heading (`hypoinflation`,
  `degenerative`, `tortuous`, `elevated`, `blunted`, `enlarged`, ...). For an anatomical
  heading the disease is `Heading/change`, e.g. `Lung/hypoinflation`, `Aorta/tortuous`,
  `Costophrenic Angle/blunted`; its organ is then None (the heading is the organ).
* Any other qualifier (`patchy`, `multiple`, `chronic`, `interstitial`, ...) is an attribute.

`normal` and `No Indexing` are headings without qualifiers. Headings are case-normalised to
Open-i's usual spelling (`Thoracic vertebrae` -> `Thoracic Vertebrae`) and whitespace is
collapsed (89 term occurrences carry stray spaces); `raw` keeps the term as written.
"""
from __future__ import annotations

from functools import lru_cache

from ..records import Finding, term_tokens

NORMAL = "normal"
NO_INDEXING = "No Indexing"

SIDES = ("left", "right", "bilateral")
SEVERITIES = ("mild", "moderate", "severe", "small", "large", "borderline")
ORGANS = (
    "lung", "thoracic vertebrae", "lumbar vertebrae", "cervical vertebrae", "spine", "aorta",
    "aorta, thoracic", "ribs", "mediastinum", "thorax", "pleura", "abdomen", "lymph nodes",
    "clavicle", "costophrenic angle", "humerus", "breast", "blood vessels", "heart",
    "trachea, carina", "trachea", "shoulder", "coronary vessels", "sternum", "aortic valve",
    "mitral valve", "neck", "pulmonary alveoli", "pulmonary artery", "adipose tissue",
    "diaphragm", "heart ventricles", "heart atria", "bronchi", "breast implants", "esophagus",
)
LOCATIONS = (
    "base", "lower lobe", "upper lobe", "middle lobe", "hilum", "apex", "lingula",
    "retrocardiac", "posterior", "anterior", "sulcus", "azygos lobe", "cardiophrenic angle",
    "paratracheal", "supracardiac", "pleural sinus",
)
CHANGES = (
    "hypoinflation", "hyperdistention", "degenerative", "tortuous", "elevated", "flattened",
    "blunted", "enlarged", "prominent", "obscured",
)
ATTRIBUTES = (
    "multiple", "scattered", "interstitial", "chronic", "round", "diffuse", "focal", "patchy",
    "healed", "streaky", "irregular", "reticular", "acute", "abnormal", "multilobar",
    "bronchovascular",
)
# Headings that name a structure (the finding is the change word that follows).
ANATOMICAL_HEADINGS = frozenset(
    {o for o in ORGANS} | {"sulcus", "cardiac shadow", "epicardial fat", "bone and bones"}
)
_LOWER_WORDS = {"of", "and"}

# ChestX-ray14 (NIH) finding name <-> Open-i MeSH heading, for mining and benchmarks. Open-i
# indexes 14 of the 14 NIH findings under these headings (Infiltration as `Infiltrate`,
# Pleural_Thickening as `Thickening`, usually `Thickening/pleura`).
NIH_TO_MESH: dict[str, str] = {
    "Atelectasis": "Pulmonary Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Infiltration": "Infiltrate",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Pulmonary Edema",
    "Emphysema": "Emphysema",
    "Fibrosis": "Pulmonary Fibrosis",
    "Pleural_Thickening": "Thickening",
    "Hernia": "Hernia, Hiatal",
}
MESH_TO_NIH: dict[str, str] = {v: k for k, v in NIH_TO_MESH.items()}
NIH_NO_FINDING = "No Finding"


def canonical_heading(heading: str) -> str:
    """`Thoracic vertebrae ` -> `Thoracic Vertebrae`; `normal` and `No Indexing` kept."""
    words = heading.split()
    if not words:
        return ""
    if len(words) == 1 and words[0].lower() == NORMAL:
        return NORMAL
    out = []
    for i, w in enumerate(words):
        lw = w.lower()
        out.append(lw if (i and lw in _LOWER_WORDS) else lw[:1].upper() + lw[1:])
    return " ".join(out)


def term_parts(term: str) -> list[str]:
    """Whitespace-collapsed, non-empty '/'-parts of a term, case as written."""
    return [" ".join(p.split()) for p in (term or "").split("/") if p.strip()]


@lru_cache(maxsize=8192)
def parse_term(term: str) -> Finding:
    """One Open-i MeSH term -> Finding(source="mesh", certainty="positive").

    `Opacity/lung/base/left/patchy/mild` -> disease "Opacity", organ "lung", location ("base",),
    side "left", attributes ("patchy",), severity "mild".
    `Lung/hypoinflation/mild` -> disease "Lung/hypoinflation", severity "mild".
    """
    parts = term_parts(term)
    if not parts:
        return Finding(disease="", raw=term or "", source="mesh")
    heading = canonical_heading(parts[0])
    qualifiers = [p.lower() for p in parts[1:]]
    anatomical = heading.lower() in ANATOMICAL_HEADINGS
    disease = heading
    organ: str | None = None
    location: list[str] = []
    side: str | None = None
    severity: str | None = None
    attributes: list[str] = []
    for word in qualifiers:
        if anatomical and disease == heading and word in CHANGES:
            disease = f"{heading}/{word}"
        elif word in SIDES and side is None:
            side = word
        elif word in SEVERITIES and severity is None:
            severity = word
        elif word in ORGANS and organ is None and not anatomical:
            organ = word
        elif word in ORGANS or word in LOCATIONS:
            location.append(word)
        else:
            attributes.append(word)
    return Finding(
        disease=disease, organ=organ, location=tuple(location), side=side, severity=severity,
        certainty="positive", raw=term, source="mesh", attributes=tuple(attributes),
    )


def annotation_term(disease: str, tokens: list[str]) -> Finding:
    """A generated annotation read as a term of the disease it was written for: its words are
    that disease's qualifiers whatever their order (the disease's own words are left out, so
    "opacity lung base left" for Opacity gives location ("base",), side "left")."""
    own = set(term_tokens(disease))
    return parse_term("/".join([disease] + [w for w in tokens if w not in own]))


WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "side": SIDES, "severity": SEVERITIES, "organ": ORGANS, "location": LOCATIONS,
    "change": CHANGES, "attribute": ATTRIBUTES,
}
_CLASS_OF = {w: c for c, words in WORD_CLASSES.items() for w in words}


def word_class(word: str) -> str | None:
    """"side", "severity", "organ", "location", "change", "attribute", or None (unknown word)."""
    return _CLASS_OF.get(" ".join(word.split()).lower())


def position_table(terms: list[str]) -> list[dict[str, int]]:
    """Occurrences of each word at each '/'-position (0 = heading), case-folded: the evidence the
    word classes above were drawn from (`cxr labels --parts` prints it)."""
    table: list[dict[str, int]] = []
    for term in terms:
        for i, part in enumerate(term_parts(term)):
            while len(table) <= i:
                table.append({})
            word = part.lower()
            table[i][word] = table[i].get(word, 0) + 1
    return [dict(sorted(t.items(), key=lambda kv: (-kv[1], kv[0]))) for t in table]


def is_indexed(terms: list[str]) -> bool:
    """False when the indexers gave no terms or said `No Indexing`."""
    heads = [canonical_heading(term_parts(t)[0]) for t in terms if term_parts(t)]
    return bool(heads) and NO_INDEXING not in heads
