"""Free-text mining: negation, uncertainty, context words, and agreement with real Open-i MeSH."""
from __future__ import annotations

import json

import pytest

from cxr.errors import CxrError
from cxr.metrics import precision_recall_f1
from cxr.reports.text import (
    NORMAL, OPENI_EVAL_LABELS, TextMiner, asserted, report_labels, summarise,
)


@pytest.fixture(scope="session")
def miner() -> TextMiner:
    return TextMiner()


def _only(findings, disease):
    hits = [f for f in findings if f.disease == disease]
    assert hits, f"{disease} not found in {[(f.disease, f.certainty) for f in findings]}"
    return hits[0]


CERTAINTY_CASES = [
    ("Small left pleural effusion.", "Pleural Effusion", "positive"),
    ("No pleural effusion or pneumothorax.", "Pneumothorax", "negative"),
    ("No pleural effusion or pneumothorax.", "Pleural Effusion", "negative"),
    ("The lungs are clear of infiltrates.", "Infiltrate", "negative"),
    ("Lungs are clear without focal consolidation.", "Consolidation", "negative"),
    ("There is no evidence of pneumothorax.", "Pneumothorax", "negative"),
    ("Pneumothorax is not seen.", "Pneumothorax", "negative"),
    ("The previously seen right upper lobe mass is not seen on this study.", "Mass", "negative"),
    ("Negative for pulmonary edema.", "Pulmonary Edema", "negative"),
    ("Left basilar atelectasis has resolved.", "Pulmonary Atelectasis", "negative"),
    ("Cannot exclude pneumonia in the right lower lobe.", "Pneumonia", "uncertain"),
    ("Early pneumonia cannot be excluded.", "Pneumonia", "uncertain"),
    ("Right basilar opacity may represent pneumonia.", "Pneumonia", "uncertain"),
    ("Possible small hiatal hernia.", "Hernia, Hiatal", "uncertain"),
    ("Findings are suspicious for pulmonary nodule.", "Nodule", "uncertain"),
    ("Questionable minimal interstitial edema.", "Pulmonary Edema", "uncertain"),
    ("Recommend follow-up to exclude mass.", "Mass", "uncertain"),
    ("Mild cardiomegaly.", "Cardiomegaly", "positive"),
    ("The heart is mildly enlarged.", "Cardiomegaly", "positive"),
    ("Borderline cardiomegaly.", "Cardiomegaly", "positive"),
    ("Probable small bilateral pleural effusions.", "Pleural Effusion", "positive"),
    # Open-i's indexers code both sides of a differential; so does the miner.
    ("Left basilar atelectasis versus scarring.", "Pulmonary Atelectasis", "positive"),
    ("Emphysematous changes of the lungs.", "Emphysema", "positive"),
    ("Stable right apical pleural thickening.", "Thickening", "positive"),
    ("Large hiatal hernia.", "Hernia, Hiatal", "positive"),
    ("Interstitial fibrosis at both bases.", "Pulmonary Fibrosis", "positive"),
]


@pytest.mark.parametrize("text,disease,certainty", CERTAINTY_CASES)
def test_certainty(miner, text, disease, certainty):
    found = _only(miner.mine(text), disease)
    assert found.certainty == certainty
    assert found.source == "text"
    assert found.sentence == text


def test_negated_heart_size_is_no_cardiomegaly(miner):
    findings = miner.mine("The heart is not enlarged. Heart size is upper limits of normal.")
    assert "Cardiomegaly" not in asserted(findings)
    assert report_labels(findings) == {NORMAL}


CONTEXT_CASES = [
    ("Small left pleural effusion.", "Pleural Effusion", "left", (), "small"),
    ("Bibasilar atelectasis.", "Pulmonary Atelectasis", "bilateral", ("base",), None),
    ("Right upper lobe pneumonia.", "Pneumonia", "right", ("upper lobe",), None),
    ("Moderate cardiomegaly.", "Cardiomegaly", None, (), "moderate"),
    ("Large right pneumothorax.", "Pneumothorax", "right", (), "large"),
    ("Consolidation in the left lower lobe.", "Consolidation", "left", ("lower lobe",), None),
    ("Lingular atelectasis.", "Pulmonary Atelectasis", None, ("lingula",), None),
    ("Right hilar mass.", "Mass", "right", ("hilum",), None),
    ("Left apical pleural thickening.", "Thickening", "left", ("apex",), None),
    ("Borderline cardiomegaly.", "Cardiomegaly", None, (), "borderline"),
    ("Severe emphysema.", "Emphysema", None, (), "severe"),
    ("The heart is mildly enlarged.", "Cardiomegaly", None, (), "mild"),
    # coordinated findings share their words; side and site may come from elsewhere in the
    # sentence; the left lung has no middle lobe
    ("Minimal scarring or atelectasis in the left lung base.", "Pulmonary Atelectasis", "left",
     ("base",), "mild"),
    ("Opacity in the left lung base, likely representing atelectasis.", "Pulmonary Atelectasis",
     "left", ("base",), None),
    ("There is stable scarring or atelectasis in the left midlung.", "Pulmonary Atelectasis",
     "left", ("lingula",), None),
]


@pytest.mark.parametrize("text,disease,side,location,severity", CONTEXT_CASES)
def test_context_words(miner, text, disease, side, location, severity):
    found = _only(miner.mine(text), disease)
    assert (found.side, found.location, found.severity) == (side, location, severity)


def test_context_words_go_to_the_nearest_finding(miner):
    findings = miner.mine("Small left pleural effusion and right basilar atelectasis.")
    effusion = _only(findings, "Pleural Effusion")
    atelectasis = _only(findings, "Pulmonary Atelectasis")
    assert (effusion.side, effusion.location, effusion.severity) == ("left", (), "small")
    assert (atelectasis.side, atelectasis.location) == ("right", ("base",))


def test_negation_stays_in_its_sentence_and_clause(miner):
    findings = miner.mine("No pneumothorax. Mild right basilar atelectasis.")
    assert summarise(findings) == {"Pneumothorax": "negative", "Pulmonary Atelectasis": "positive"}
    findings = miner.mine("No pleural effusion, but there is a small left pneumothorax.")
    assert summarise(findings) == {"Pleural Effusion": "negative", "Pneumothorax": "positive"}


def test_openi_anonymisation_and_glued_sentences(miner):
    findings = miner.mine("No XXXX of a pleural effusion.There is mild right basilar atelectasis.")
    assert summarise(findings) == {"Pleural Effusion": "negative",
                                   "Pulmonary Atelectasis": "positive"}
    atelectasis = _only(findings, "Pulmonary Atelectasis")
    assert atelectasis.sentence == "There is mild right basilar atelectasis."


def test_normal_report_and_sections(miner):
    clear = miner.mine({"FINDINGS": "Heart size normal. Lungs are clear. No pneumothorax.",
                        "IMPRESSION": "No acute cardiopulmonary disease."})
    assert asserted(clear) == {NORMAL}
    # INDICATION and COMPARISON are not read: a clinical question is no finding.
    asked = miner.mine({"INDICATION": "Pneumonia?", "FINDINGS": "Clear lungs."})
    assert asserted(asked) == {NORMAL}
    assert miner.mine({"FINDINGS": "", "IMPRESSION": "  "}) == []  # nothing said: not "normal"


def test_mine_many_keeps_order_with_empty_reports(miner):
    reports = [{}, {"FINDINGS": "No effusion.", "IMPRESSION": "Mild cardiomegaly."}, "",
               "Right pneumothorax.", {"IMPRESSION": ""}]
    out = list(miner.mine_many(reports, batch_size=2))
    assert len(out) == len(reports)
    assert [asserted(f) for f in out] == [set(), {"Cardiomegaly"}, set(), {"Pneumothorax"},
                                          set()]


def test_open_i_headings_for_the_heart(miner):
    """Open-i indexes "enlarged cardiac silhouette" as Cardiac Shadow/enlarged, never as
    Cardiomegaly (0 of 19 reports that say only that); "heart is enlarged" as Cardiomegaly."""
    silhouette = miner.mine("The cardiac silhouette is enlarged.")
    assert asserted(silhouette) == {"Cardiac Shadow/enlarged"}
    assert asserted(miner.mine("Heart size is enlarged.")) == {"Cardiomegaly"}


def test_phrase_with_two_headings(miner):
    assert asserted(miner.mine("Scattered calcified nodules.")) == {"Nodule", "Calcinosis"}


def test_rules_are_data(tmp_path):
    rules = {"concepts": [{"disease": "Pneumothorax", "phrases": ["ptx"]}],
             "context": [], "modifiers": {"left": {"side": "left"}}}
    custom = TextMiner(rules=rules)
    found = _only(custom.mine("Small left PTX. No ptx on the right."), "Pneumothorax")
    assert (found.certainty, found.side) == ("positive", "left")
    bad = tmp_path / "rules.json"
    bad.write_text("{not json")
    with pytest.raises(CxrError, match="not valid JSON"):
        TextMiner(rules=bad)
    with pytest.raises(CxrError, match="not found"):
        TextMiner(rules=tmp_path / "missing.json")
    bad.write_text(json.dumps({"concepts": []}))
    with pytest.raises(CxrError, match="lacks"):
        TextMiner(rules=bad)


# Real Open-i reports whose text and MeSH indexing agree on the evaluation labels.
KNOWN_REPORTS = {
    "CXR1792": {"Pleural Effusion", "Pulmonary Atelectasis"},  # small left effusion, basilar atel.
    "CXR3029": set(),              # cervical degenerative change only: not normal, no NIH label
    "CXR2358": {NORMAL},
    "CXR3154": {"Pulmonary Atelectasis"},  # "probable mild bibasilar airspace disease/atelectasis"
    "CXR1056": {"Emphysema"},      # indexed as "Pulmonary Emphysema"
    "CXR3328": {"Cardiomegaly", "Pleural Effusion"},  # "questionable interstitial edema" is not
}


@pytest.fixture(scope="module")
def openi(shared_data):
    from cxr.sources.openi import read_openi

    return read_openi(shared_data / "openi" / "NLMCXR_reports.tgz")


def test_real_reports_with_known_gold(miner, openi):
    by_id = {s.id: s for s in openi}
    for rid, expected in KNOWN_REPORTS.items():
        study = by_id[rid]
        assert report_labels(study.findings) == expected, rid  # the MeSH gold, as written
        assert report_labels(miner.mine(study.report)) == expected, rid


def test_agreement_with_mesh_on_real_reports(miner, openi):
    """An accuracy floor on 300 real reports (the benchmark reports all 3,955)."""
    sample = openi[:300]
    gold = [report_labels(s.findings) for s in sample]
    pred = [report_labels(f) for f in miner.mine_many([s.report for s in sample])]
    micro = precision_recall_f1(gold, pred, OPENI_EVAL_LABELS)["micro"]
    assert micro["f1"] > 0.88, micro
