"""MeSH term parsing: table-driven cases, and every qualifier word in Open-i is classified."""
from __future__ import annotations

import collections

import pytest

from cxr.records import Finding
from cxr.reports import mesh
from cxr.reports.mesh import NIH_TO_MESH, parse_term, term_parts

CASES = [
    ("normal", dict(disease="normal")),
    ("No Indexing", dict(disease="No Indexing")),
    ("Opacity/lung/base/left/patchy/mild",
     dict(disease="Opacity", organ="lung", location=("base",), side="left", severity="mild",
          attributes=("patchy",))),
    ("Lung/hypoinflation/mild", dict(disease="Lung/hypoinflation", severity="mild")),
    ("Thoracic vertebrae/degenerative/mild",
     dict(disease="Thoracic Vertebrae/degenerative", severity="mild")),
    ("Catheters, Indwelling/right", dict(disease="Catheters, Indwelling", side="right")),
    ("Costophrenic Angle/right/blunted/mild",
     dict(disease="Costophrenic Angle/blunted", side="right", severity="mild")),
    ("Subcutaneous  Emphysema/right", dict(disease="Subcutaneous Emphysema", side="right")),
    ("Technical Quality of Image Unsatisfactory ",
     dict(disease="Technical Quality of Image Unsatisfactory")),
    ("Calcinosis/lung/hilum/lymph nodes/right",
     dict(disease="Calcinosis", organ="lung", location=("hilum", "lymph nodes"), side="right")),
    ("Cardiomegaly/borderline", dict(disease="Cardiomegaly", severity="borderline")),
    ("Pleural Effusion/bilateral/small", dict(disease="Pleural Effusion", side="bilateral",
                                               severity="small")),
]


@pytest.mark.parametrize("term,expected", CASES)
def test_parse_term(term, expected):
    f = parse_term(term)
    assert f.raw == term and f.source == "mesh" and f.certainty == "positive"
    for key, value in expected.items():
        assert getattr(f, key) == value, (term, key)
    for key in ("organ", "side", "severity"):
        if key not in expected:
            assert getattr(f, key) is None, (term, key)


def test_term_roundtrip_keeps_every_word():
    f = parse_term("Opacity/lung/upper lobe/right/streaky/mild")
    assert f.term == "Opacity/lung/upper lobe/right/streaky/mild"
    assert f.tokens() == ["opacity", "lung", "upper lobe", "right", "streaky"]
    assert Finding.from_dict(f.to_dict()) == f


def test_every_open_i_qualifier_is_classified(shared_data):
    from cxr.sources.openi import read_openi

    studies = read_openi(shared_data / "openi" / "NLMCXR_reports.tgz")
    terms = [t for s in studies for t in s.meta["mesh"]]
    assert len(set(terms)) == 1719
    classes = [mesh.SIDES, mesh.SEVERITIES, mesh.ORGANS, mesh.LOCATIONS, mesh.CHANGES,
               mesh.ATTRIBUTES]
    words = collections.Counter(p.lower() for t in terms for p in term_parts(t)[1:])
    for word in words:
        assert sum(word in c for c in classes) == 1, word
    # every word of every term ends up in exactly one Finding field (nothing lost)
    for term in set(terms):
        f = parse_term(term)
        assert len(f.term.split("/")) == len(term_parts(term)), term
    headings = {parse_term(t).disease.split("/")[0] for t in terms}
    assert "Thoracic vertebrae" not in headings and "Thoracic Vertebrae" in headings


def test_nih_mapping_headings_exist_in_open_i(shared_data):
    from cxr.sources.openi import read_openi

    diseases = {f.disease for s in read_openi(shared_data / "openi" / "NLMCXR_reports.tgz")
                for f in s.findings}
    assert len(NIH_TO_MESH) == 14
    for nih, heading in NIH_TO_MESH.items():
        assert heading in diseases, (nih, heading)


def test_word_class_and_position_table():
    assert mesh.word_class(" Upper  Lobe") == "location"
    assert mesh.word_class("bilateral") == "side" and mesh.word_class("martian") is None
    table = mesh.position_table(["Opacity/lung/base", "opacity/lung", "normal"])
    assert table == [{"opacity": 2, "normal": 1}, {"lung": 2}, {"base": 1}]


def test_cli_parts(shared_data, capsys):
    from cxr.cli import main

    assert main(["labels", str(shared_data / "openi" / "NLMCXR_reports.tgz"), "--parts"]) == 0
    out = capsys.readouterr().out
    assert "hypoinflation" in out and "UNKNOWN" not in out
