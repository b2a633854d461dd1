"""The case generator follows the real Open-i statistics, writes Open-i style terms, and its
reports say what the case holds (no rendering here: these tests are cheap)."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from cxr.errors import CxrError
from cxr.phantom.cases import CaseGenerator, DrawnCase, parse_term, summarise
from cxr.phantom.reports import mesh_terms, report_sections, write_report
from cxr.phantom.spec import KINDS
from cxr.reports import mesh
from cxr.sources.openi import read_openi

N = 4000


@pytest.fixture(scope="module")
def studies(shared_data):
    return read_openi(shared_data / "openi" / "NLMCXR_reports.tgz")


@pytest.fixture(scope="module")
def generator(studies):
    return CaseGenerator.from_studies(studies)


@pytest.fixture(scope="module")
def drawn(generator):
    return generator.draw(N, seed=0)


def _indexed(study) -> bool:
    terms = [t.strip().lower() for t in study.meta["mesh"] if t.strip()]
    return bool(terms) and "no indexing" not in terms


def _real_kinds(studies):
    """Per report: the set of renderable kinds its MeSH terms name, or None when normal;
    computed here from the MeSH headings, independently of the generator's parser."""
    heading_kind = {v: k for k, v in KINDS.items() if "/" not in v}
    heading_kind.update({"Density": "density", "Infiltrate": "infiltrate",
                         "Granulomatous Disease": "granulomatous_disease",
                         "Pulmonary Emphysema": "emphysema", "Emphysema": "emphysema"})
    outside = {"mediastinum", "breast", "paratracheal", "ribs", "sternum", "lymph nodes",
               "heart", "thoracic vertebrae", "abdomen", "clavicle", "blood vessels"}
    out = []
    for s in studies:
        if s.meta["mesh"] and all(t.strip().lower() == "normal" for t in s.meta["mesh"]):
            out.append(None)
            continue
        kinds = set()
        for f in s.findings:
            kind = heading_kind.get(f.disease) or {
                "Lung/hypoinflation": "hypoinflation", "Lung/hyperdistention": "hyperdistention",
                "Diaphragm/elevated": "diaphragm_elevated"}.get(f.disease)
            if f.disease == "Calcinosis" and f.organ in ("aorta", "aorta, thoracic"):
                kinds.add("aortic_calcinosis")
            elif kind and not (outside & {f.organ, *f.location}):
                kinds.add(kind)
        out.append(kinds)
    return out


def test_normal_share_is_openi(studies, generator, drawn):
    real = [k for k, s in zip(_real_kinds(studies), studies) if _indexed(s)]
    share = sum(k is None for k in real) / len(real)
    assert generator.n_reports == 3955 and generator.n_normal == 1391
    assert generator.n_indexed == len(real) == 3955 - 95
    assert abs(generator.normal_share - share) < 1e-9
    assert 0.33 < share < 0.40  # Shin et al.: 37% of the images
    assert abs(summarise(drawn)["normal"] - share) < 0.025


def test_finding_frequencies_follow_openi(studies, generator, drawn):
    real = [k for k in _real_kinds(studies) if k]  # abnormal reports with a renderable finding
    got = summarise(drawn)
    abnormal = 1 - generator.normal_share
    top = Counter(k for ks in real for k in ks).most_common(6)
    assert {k for k, _ in top} >= {"opacity", "cardiomegaly", "atelectasis"}
    for kind, count in top:
        expected = abnormal * count / len(real)
        assert abs(got[kind] - expected) < 0.2 * expected + 0.01, (kind, got[kind], expected)
        assert abs(generator.expected_frequencies()[kind] - expected) < 0.1 * expected
    # co-occurrence: cardiomegaly with effusion as often as in the reports
    both_real = abnormal * sum({"cardiomegaly", "effusion"} <= ks for ks in real) / len(real)
    both = sum({"cardiomegaly", "effusion"} <= {f.kind for f in c.findings} for c in drawn) / N
    assert abs(both - both_real) < 0.5 * both_real + 0.005
    # nothing the reports never pair: hypoinflation with hyperdistention
    assert not any({"hypoinflation", "hyperdistention"} <= {f.kind for f in c.findings} for c in drawn)


def test_contexts_follow_openi(drawn):
    effusions = [f for c in drawn for f in c.findings if f.kind == "effusion"]
    sides = Counter(f.side for f in effusions)
    assert sides["bilateral"] > sides["left"] > 0 and sides["right"] > 0  # as in Open-i
    assert Counter(f.severity for f in effusions).most_common(1)[0][0] == "small"
    cardio = Counter(f.severity for c in drawn for f in c.findings if f.kind == "cardiomegaly")
    assert cardio.most_common(1)[0][0] == "mild" and cardio["severe"] < cardio["borderline"]
    opacity_sites = Counter(f.site for c in drawn for f in c.findings if f.kind == "opacity")
    assert opacity_sites.most_common(1)[0][0] == "base"


def test_terms_are_openi_form_and_match_the_spec(drawn):
    for case in drawn[:1500]:
        for f, filled in zip(case.findings, case.meta["filled"]):
            assert parse_term(f.term).kind == f.kind, f.term
            if f.kind in KINDS:
                assert mesh.parse_term(f.term).disease == KINDS[f.kind], f.term
            words = f.term.lower().split("/")
            if f.kind in ("nodule", "mass", "granuloma"):
                assert f.side in ("left", "right") and f.size_mm > 0
            elif f.side and f.site != "lingula" and "retrocardiac" not in words:
                assert f.side in words or "bilateral" in words, (f.term, f.side)
            if f.site and f.kind not in ("nodule", "mass", "granuloma"):
                assert f.site in words or {"retrocardiac", "costophrenic angle", "sulcus",
                                            "pleural sinus"} & set(words), f.term
            if f.severity and f.kind not in ("nodule", "mass", "granuloma", "emphysema"):
                assert f.severity in words, f.term
            assert set(filled) <= {"site", "side", "severity"}
    terms = Counter(f.term for c in drawn for f in c.findings)
    for example in ("Cardiomegaly/mild", "Pleural Effusion/right/small",
                    "Opacity/lung/base/left/mild", "Calcified Granuloma/lung/upper lobe/right"):
        assert terms[example] > 0, example


def test_filled_context_is_recorded_and_as_reported_keeps_terms(studies):
    gen = CaseGenerator.from_studies(studies, terms="as_reported")
    cases = gen.draw(300, seed=5)
    for case in cases:
        reported = set(case.meta["reported"])
        assert {f.term for f in case.findings} <= reported
        assert case.meta["source"].startswith("CXR") or case.normal
    bare = [f for c in cases for f in c.findings if f.term == "Cardiomegaly"]
    assert bare and all(f.severity in ("borderline", "mild", "moderate", "severe") for f in bare)


def test_draw_is_deterministic_and_extendable(generator):
    a = [c.to_dict() for c in generator.draw(50, seed=3)]
    assert a == [c.to_dict() for c in generator.draw(50, seed=3)]
    assert a[:20] == [c.to_dict() for c in generator.draw(20, seed=3)]
    assert a != [c.to_dict() for c in generator.draw(50, seed=4)]
    assert DrawnCase.from_dict(a[7]).to_dict() == a[7]
    assert [c.id for c in generator.draw(3, seed=0, start=10)] == ["CXR10", "CXR11", "CXR12"]


def test_parse_term_reads_renderable_terms_only():
    m = parse_term("Opacity/lung/base/left/streaky/mild ")
    assert (m.kind, m.site, m.side, m.severity) == ("opacity", "base", "left", "mild")
    assert parse_term("Opacity/retrocardiac").site == "lower lobe"
    assert parse_term("Lung/hyperdistention/mild").kind == "hyperdistention"
    assert parse_term("Calcified Granuloma/multiple").multiple
    assert parse_term("Mass/mediastinum/right") is None  # outside the lungs
    assert parse_term("Thoracic Vertebrae/degenerative") is None
    assert parse_term("Pleural Effusion/borderline").severity == "small"


def test_bad_inputs_raise_cxr_error(tmp_path):
    with pytest.raises(CxrError):
        CaseGenerator([("CXR1", ["Spine/degenerative"])])
    with pytest.raises(CxrError):
        CaseGenerator([("CXR1", ["normal"]), ("CXR2", ["Cardiomegaly"])], normal_share=1.5)
    with pytest.raises(CxrError, match="not found"):
        CaseGenerator.from_openi(tmp_path / "missing.tgz")


def test_reports_state_findings_and_only_true_negatives(drawn, tmp_path):
    for case in drawn[:400]:
        text = report_sections(case)
        findings = text["FINDINGS"].lower()
        kinds = {f.kind for f in case.findings}
        if "pneumothorax" in kinds:
            assert not re.search(r"no (evidence of )?pneumothorax", findings)
        if "effusion" in kinds:
            assert "no pleural effusion" not in findings and "or pleural effusion" not in findings
        if "cardiomegaly" in kinds:
            assert "normal in size" not in findings and "heart size is normal" not in findings
        else:
            assert "cardiomegaly" not in findings and "enlarged" not in findings
        if kinds & {"opacity", "airspace_disease", "consolidation"}:
            assert "lungs are clear" not in findings and "no focal" not in findings
        for f in case.findings:
            if f.kind in ("effusion", "pneumothorax", "catheter") and f.side in ("left", "right") \
                    and "bilateral" not in f.term:
                assert f.side in findings
        if case.normal:
            assert re.search(r"no acti|no acute|normal", text["IMPRESSION"].lower())
    # the Open-i reader takes the written reports back with their MeSH terms
    for case in drawn[:40]:
        write_report(tmp_path / "ecgen-radiology", case)
    back = {s.id: s for s in read_openi(tmp_path)}
    for case in drawn[:40]:
        study = back[case.id]
        assert study.meta["mesh"] == mesh_terms(case)
        assert study.normal == case.normal
        assert set(study.report) == {"COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"}


@pytest.mark.parametrize("terms", ["complete", "as_reported"])
def test_a_finding_drawn_on_both_lungs_names_no_side(terms):
    """Hyper- and hypoinflation are drawn on both lungs whatever the report says: neither its
    "left" nor its "bilateral" is in a complete term (the term describes the image, and the image
    cannot tell them from no side); as_reported keeps the report's words."""
    gen = CaseGenerator([("CXR1", ["normal"]), ("CXR2", ["Lung/left/hyperdistention"]),
                         ("CXR3", ["Lung/bilateral/hypoinflation"])], normal_share=0, terms=terms)
    found = {f.kind: f for case in gen.draw(12, seed=0) for f in case.findings}
    assert set(found) == {"hyperdistention", "hypoinflation"}
    assert found["hyperdistention"].side is None
    assert ("left" in found["hyperdistention"].term.split("/")) == (terms == "as_reported")
    assert found["hypoinflation"].side is None
    assert ("bilateral" in found["hypoinflation"].term.split("/")) == (terms == "as_reported")
