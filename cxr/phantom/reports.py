"""A simulated case as an Open-i report: the `ecgen-radiology` XML that `cxr.sources.openi` reads.

The FINDINGS sentences state every finding with its context (side, site, grade, size) and the
negatives a radiologist writes when they hold ("No pneumothorax or pleural effusion.", "The heart
is normal in size."); IMPRESSION sums up the acute findings or says there are none. Phrasing is
varied by the case's seed in the style of the Open-i reports (short declaratives, "There is ...",
"bibasilar", "mildly enlarged"), using the words a report miner should recognise, and never a
negative that contradicts a finding. The MeSH `<major>` terms are the case's terms (or `normal`).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..reports.mesh import parse_term
from .spec import Case, FindingSpec

LUNG_KINDS = {"opacity", "airspace_disease", "consolidation", "nodule", "mass", "granuloma",
              "atelectasis", "density", "infiltrate", "granulomatous_disease"}
AIRSPACE_KINDS = {"opacity", "airspace_disease", "consolidation", "density", "infiltrate"}
# Findings the IMPRESSION lists (the others are written in FINDINGS only, as Open-i does).
ACUTE_KINDS = {"cardiomegaly", "effusion", "opacity", "airspace_disease", "consolidation",
               "nodule", "mass", "atelectasis", "pneumothorax", "hypoinflation", "density",
               "infiltrate", "diaphragm_elevated", "emphysema"}
DESCRIPTORS = {"streaky", "patchy", "interstitial", "focal", "diffuse", "round", "irregular",
               "reticular", "chronic"}
ADVERB = {"borderline": "borderline", "mild": "mildly", "moderate": "moderately",
          "severe": "severely", "small": "slightly", "large": "markedly"}

_HEART = ["The heart is normal in size.", "Heart size is normal.",
          "The cardiomediastinal silhouette is within normal limits.",
          "The heart and mediastinum are normal in size and contour.",
          "The cardiac silhouette and mediastinum size are within normal limits.",
          "The cardiomediastinal silhouette and pulmonary vasculature are within normal limits.",
          "Normal heart size and mediastinal contours."]
_CLEAR = ["The lungs are clear.", "Lungs are clear.", "The lungs are clear bilaterally.",
          "The lungs are clear without focal airspace disease.",
          "There is no focal consolidation.", "No focal airspace consolidation."]
_OTHERWISE_CLEAR = ["The lungs are otherwise clear.", "No focal airspace disease.",
                    "There is no focal consolidation."]
_PLEURA = ["No pneumothorax or pleural effusion.", "There is no pneumothorax or pleural effusion.",
           "No pleural effusion or pneumothorax.",
           "There is no evidence of pneumothorax or pleural effusion."]
_NO_PTX = ["No pneumothorax.", "There is no pneumothorax."]
_NO_EFF = ["No pleural effusion.", "There is no pleural effusion."]
_BONES = ["The osseous structures are unremarkable.", "No acute bony abnormality.",
          "Osseous structures are within normal limits for patient age.",
          "No acute osseous abnormality.", "The visualized bony structures are intact."]
_NORMAL_IMPRESSION = ["No acute cardiopulmonary disease.", "No acute cardiopulmonary abnormality.",
                      "Normal chest.", "No active disease.", "No acute pulmonary findings."]
_INDICATION = ["chest pain", "shortness of breath", "cough", "dyspnea", "fever and cough",
               "a positive PPD", "chest pain and shortness of breath", "weakness",
               "follow-up examination"]
_COMPARISON = ["None.", "None.", "None available.", "No prior studies."]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(site: str | None, side: str | None, rng: np.random.Generator) -> str:
    """'in the left lung base', 'in both upper lobes', 'in the lingula', 'at the right apex'."""
    if site is None:
        return {"bilateral": "in both lungs", None: "in the lungs"}.get(side, f"in the {side} lung")
    if side == "bilateral":
        return {"base": _pick(rng, ["in both lung bases", "at the bases bilaterally"]),
                "upper lobe": "in both upper lobes", "lower lobe": "in both lower lobes",
                "middle lobe": "in both midlungs", "lingula": "in both midlungs",
                "apex": "at both apices", "hilum": "in both hilar regions"}[site]
    s = f"{side} " if side else ""
    return {"base": _pick(rng, [f"in the {s}lung base", f"at the {s}lung base"]),
            "upper lobe": f"in the {s}upper lobe", "lower lobe": f"in the {s}lower lobe",
            "middle lobe": "in the right middle lobe" if side != "left" else "in the lingula",
            "lingula": "in the lingula", "apex": f"at the {s}apex",
            "hilum": f"in the {s}hilar region"}[site]


def _descriptors(term: str) -> str:
    words = [w for w in parse_term(term).attributes if w in DESCRIPTORS]
    return " ".join(words)


def _cap(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[:1].upper() + text[1:]


def _statement(group: list[FindingSpec], rng: np.random.Generator) -> tuple[str, str]:
    """(FINDINGS sentence, IMPRESSION phrase) for the findings written under one term."""
    f = group[0]
    sev = f.severity or ""
    sides = {g.side for g in group}
    sites = {g.site for g in group}
    side = f.side if len(sides) == 1 else "bilateral"
    where = _where(f.site if len(sites) == 1 else None, side, rng)
    desc = _descriptors(f.term)
    k = f.kind
    if k == "cardiomegaly":
        s = _pick(rng, [f"{sev} cardiomegaly.", f"The heart is {ADVERB.get(sev, '')} enlarged.",
                        f"Heart size is {ADVERB.get(sev, '')} enlarged."])
        return _cap(s), _cap(f"{sev} cardiomegaly")
    if k == "effusion":
        both = f.side == "bilateral"
        noun = "bilateral pleural effusions" if both else f"{f.side} pleural effusion"
        s = _pick(rng, [f"{sev} {noun}.", (f"There are {sev} {noun}." if both
                                          else f"There is a {sev} {noun}.")])
        return _cap(s), _cap(f"{sev} {noun}")
    if k in AIRSPACE_KINDS or k == "atelectasis":
        noun = {"opacity": "opacity", "airspace_disease": "airspace disease",
                "consolidation": "consolidation", "atelectasis": "atelectasis",
                "density": "density", "infiltrate": "infiltrate"}[k]
        if k == "opacity" and (f.side == "bilateral" or "multiple" in f.term):
            noun = "opacities"
        s = _pick(rng, [f"There is {sev} {desc} {noun} {where}.",
                        f"{sev} {desc} {noun} {where}."])
        return _cap(s), _cap(f"{sev} {desc} {noun} {where}")
    if k in ("nodule", "mass", "granuloma"):
        many = len(group) > 1
        sizes = [x.size_mm for x in group if x.size_mm]
        if k == "granuloma":
            noun = "calcified granulomas" if many else "calcified granuloma"
            s = (f"{_pick(rng, ['There are', 'Scattered'])} {noun} {where}." if many
                 else _pick(rng, [f"There is a calcified granuloma {where}.",
                                  f"Calcified granuloma {where}."]))
            return _cap(s), _cap(f"{noun} {where}")
        if k == "nodule":
            size = f"{max(sizes):.0f} mm" if sizes else ""
            noun = "nodules" if many else "nodule"
        else:
            size = f"{max(sizes) / 10:.1f} cm" if sizes else ""
            noun = "masses" if many else "mass"
        s = (f"There are {len(group)} pulmonary {noun} {where}, the largest measuring {size}."
             if many else f"There is a {size} {desc} {noun} {where}.")
        return _cap(s), _cap(f"pulmonary {noun} {where}" if many else f"{size} {noun} {where}")
    if k == "pneumothorax":
        apical = _pick(rng, ["", "apical "]) if f.side != "bilateral" else ""
        s = _pick(rng, [f"There is a {sev} {f.side} {apical}pneumothorax.",
                        f"{sev} {f.side} {apical}pneumothorax."])
        return _cap(s), _cap(f"{sev} {f.side} pneumothorax")
    if k == "hypoinflation":
        adv = ADVERB.get(sev, "")
        s = _pick(rng, [f"{adv} low lung volumes.", f"The lungs are {adv} hypoinflated."])
        return _cap(s), _cap(f"{adv} low lung volumes")
    if k == "hyperdistention":
        adv = ADVERB.get(sev, "")
        s = _pick(rng, [f"The lungs are {adv} hyperinflated.", f"{adv} hyperexpanded lungs."])
        return _cap(s), _cap(f"{adv} hyperinflated lungs")
    if k == "diaphragm_elevated":
        if side == "bilateral":
            return "Both hemidiaphragms are elevated.", "Elevated hemidiaphragms"
        s = _pick(rng, [f"The {side} hemidiaphragm is {ADVERB.get(sev, '')} elevated.",
                        f"{sev} elevation of the {side} hemidiaphragm."])
        return _cap(s), _cap(f"{sev} elevation of the {side} hemidiaphragm")
    if k == "emphysema":
        s = _pick(rng, [f"{sev} emphysema.", f"There are changes of {sev} emphysema."])
        return _cap(s), _cap(f"{sev} emphysema")
    if k == "aortic_calcinosis":
        s = _pick(rng, ["There is calcification of the aortic arch.",
                        "The aortic knob is calcified."])
        return s, "Calcification of the aortic arch"
    if k == "granulomatous_disease":
        s = _pick(rng, ["There are findings of prior granulomatous disease.",
                        "Sequela of prior granulomatous disease."])
        return s, "Prior granulomatous disease"
    if k == "catheter":
        if side == "bilateral":
            s = "There are bilateral central venous catheters with tips in the superior vena cava."
            return s, "Bilateral central venous catheters"
        side = f"{side}-sided " if side in ("left", "right") else ""
        s = _pick(rng, [f"There is a {side}central venous catheter with the tip in the superior "
                        "vena cava.", f"{side}PICC line with tip projecting over the SVC."])
        return _cap(s), _cap(f"{side}central venous catheter")
    return _cap(f"{f.term}."), _cap(f.term)


def _groups(findings: list[FindingSpec]) -> list[list[FindingSpec]]:
    """Findings written under the same term (the lesions of a multiple/bilateral nodule term)."""
    out: dict[tuple[str, str], list[FindingSpec]] = {}
    for f in findings:
        out.setdefault((f.kind, f.term), []).append(f)
    return list(out.values())


def report_sections(case: Case) -> dict[str, str]:
    """COMPARISON, INDICATION, FINDINGS and IMPRESSION text for a case, fixed by its seed."""
    rng = np.random.default_rng([int(case.seed), 0x5EC7])
    kinds = {f.kind for f in case.findings}
    groups = _groups(case.findings)
    said = {g[0].term: _statement(g, rng) for g in groups}
    order = ["cardiomegaly", "aortic_calcinosis", "hypoinflation", "hyperdistention", "emphysema",
             *sorted(LUNG_KINDS), "effusion", "pneumothorax", "diaphragm_elevated", "catheter"]
    order += sorted(kinds - set(order))  # a kind without its own place is still written
    by_kind = {k: [said[g[0].term] for g in groups if g[0].kind == k] for k in order}

    findings: list[str] = []
    findings += [s for s, _ in by_kind["cardiomegaly"]] or [_pick(rng, _HEART)]
    findings += [s for s, _ in by_kind["aortic_calcinosis"]]
    findings += [s for k in ("hypoinflation", "hyperdistention", "emphysema") for s, _ in by_kind[k]]
    lung = [s for k in sorted(LUNG_KINDS) for s, _ in by_kind[k]]
    findings += lung
    if not lung:
        findings.append(_pick(rng, _CLEAR))
    elif not kinds & AIRSPACE_KINDS:
        findings.append(_pick(rng, _OTHERWISE_CLEAR))
    findings += [s for k in ("effusion", "pneumothorax") for s, _ in by_kind[k]]
    if not kinds & {"effusion", "pneumothorax"}:
        findings.append(_pick(rng, _PLEURA))
    elif "effusion" not in kinds:
        findings.append(_pick(rng, _NO_EFF))
    elif "pneumothorax" not in kinds:
        findings.append(_pick(rng, _NO_PTX))
    findings += [s for k in ("diaphragm_elevated", "catheter") for s, _ in by_kind[k]]
    findings += [s for k in order[order.index("catheter") + 1:] for s, _ in by_kind[k]]
    if rng.random() < 0.3:
        findings.append(_pick(rng, _BONES))

    acute = [imp for k in order if k in ACUTE_KINDS for _, imp in by_kind[k]]
    if not acute:
        impression = _pick(rng, _NORMAL_IMPRESSION)
    elif len(acute) == 1:
        impression = f"{acute[0]}."
    else:
        impression = " ".join(f"{i}. {a}." for i, a in enumerate(acute, 1))

    age, sex = case_meta(case)
    indication = _pick(rng, _INDICATION)
    indication = _cap(f"{age}-year-old {sex} with {indication}." if age else f"{indication}.")
    return {"COMPARISON": _pick(rng, _COMPARISON), "INDICATION": indication,
            "FINDINGS": " ".join(findings), "IMPRESSION": impression}


def case_meta(case: Case) -> tuple[int | None, str]:
    meta = getattr(case, "meta", {}) or {}
    sex = {"F": "female", "M": "male"}.get(meta.get("sex"), "patient")
    return meta.get("age"), sex


def mesh_terms(case: Case) -> list[str]:
    """The `<major>` terms: each distinct finding term in order, or ["normal"]."""
    terms = list(dict.fromkeys(f.term for f in case.findings if f.term))
    return terms or ["normal"]


def case_number(case_id: str) -> int:
    m = re.fullmatch(r"CXR(\d+)", case_id)
    if not m:
        raise ValueError(f"case id must look like CXR<n>, not {case_id!r}")
    return int(m.group(1))


def image_id(case: Case) -> str:
    """The frontal image's Open-i style id, e.g. CXR12_IM-0001-1001."""
    return f"{case.id}_IM-0001-1001"


def report_xml(case: Case, image_ids: list[str] | None = None,
               sections: dict[str, str] | None = None) -> bytes:
    """The Open-i `<eCitation>` document for a case."""
    n = case_number(case.id)
    image_ids = image_ids if image_ids is not None else [image_id(case)]
    sections = sections or report_sections(case)
    root = ET.Element("eCitation")
    ET.SubElement(root, "meta", type="rr")
    ET.SubElement(root, "uId", id=case.id)
    ET.SubElement(root, "pmcId", id=str(n))
    ET.SubElement(root, "docSource").text = "CXR"
    ET.SubElement(root, "IUXRId", id=str(n))
    ET.SubElement(root, "licenseType").text = "simulated"
    ET.SubElement(root, "publisher").text = "cxr phantom"
    ET.SubElement(root, "title").text = "Simulated chest X-ray (cxr phantom)"
    ET.SubElement(root, "note").text = (f"Simulated from a chest CT; findings drawn from Open-i "
                                        f"statistics; render seed {case.seed}.")
    ET.SubElement(root, "specialty").text = "pulmonary diseases"
    ET.SubElement(root, "subset").text = "CXR"
    article = ET.SubElement(ET.SubElement(root, "MedlineCitation", Owner="cxr", Status="simulated"),
                            "Article", PubModel="Electronic")
    ET.SubElement(article, "ArticleTitle").text = "Simulated chest X-ray (cxr phantom)"
    abstract = ET.SubElement(article, "Abstract")
    for label in ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"):
        ET.SubElement(abstract, "AbstractText", Label=label).text = sections.get(label, "")
    mesh = ET.SubElement(root, "MeSH")
    for term in mesh_terms(case):
        ET.SubElement(mesh, "major").text = term
    for i, iid in enumerate(image_ids, 1):
        parent = ET.SubElement(root, "parentImage", id=iid)
        ET.SubElement(parent, "figureId").text = f"F{i}"
        ET.SubElement(parent, "caption").text = f"Xray Chest {case.view}"
        panel = ET.SubElement(parent, "panel", type="single")
        ET.SubElement(panel, "url").text = f"images/{iid}.png"
    ET.indent(root, space="   ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_report(folder: str | Path, case: Case, image_ids: list[str] | None = None) -> Path:
    """Write `<folder>/<n>.xml` atomically and return its path."""
    return write_atomic(Path(folder) / f"{case_number(case.id)}.xml", report_xml(case, image_ids))
