"""Metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxr import metrics
from cxr.records import Box, Finding
from cxr.results import DetectedFinding


# ------------------------------------------------------------------------------------- AUC
def test_auc_per_label_hand_values_and_skips():
    # label a: positives 0.9, 0.4; negatives 0.8, 0.1 -> pairs (0.9>0.8, 0.9>0.1, 0.4<0.8, 0.4>0.1)
    # = 3/4. label b: all negative -> skipped. label c: perfect, with a NaN row left out.
    y = np.array([[1, 0, 1], [1, 0, np.nan], [0, 0, 0], [0, 0, 0]], dtype=float)
    s = np.array([[0.9, 0.5, 0.7], [0.4, 0.5, 0.0], [0.8, 0.5, 0.2], [0.1, 0.5, 0.3]])
    out = metrics.auc_per_label(y, s, ["a", "b", "c"])
    assert out["per_label"]["a"] == pytest.approx(0.75)
    assert out["per_label"]["b"] is None and out["skipped"]["b"] == "no positive images"
    assert out["per_label"]["c"] == pytest.approx(1.0)
    assert out["mean"] == pytest.approx(0.875) and out["n_labels"] == 2
    assert out["positives"] == {"a": 2, "b": 0, "c": 1}


def test_auc_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.auc_per_label(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])


# ------------------------------------------------------------------------------------ BLEU
@pytest.mark.parametrize("annotation, vocab, tokens", [
    (["Opacity", "lung"], (), ["opacity", "lung"]),
    ("Opacity/lung/upper lobe/right", (), ["opacity", "lung", "upper lobe", "right"]),
    ("opacity lung upper lobe right", ("upper lobe", "lung"), ["opacity", "lung", "upper lobe", "right"]),
    ("opacity lung upper lobe right", (), ["opacity", "lung", "upper", "lobe", "right"]),
])
def test_annotation_tokens(annotation, vocab, tokens):
    assert metrics.annotation_tokens(annotation, vocab) == tokens


def test_bleu_exact_match_is_one_and_known_partial_value():
    refs = [[["opacity", "lung", "base", "left", "mild"]]]
    out = metrics.bleu_scores(refs, [["opacity", "lung", "base", "left", "mild"]])
    assert all(out[f"bleu{n}"] == pytest.approx(1.0) for n in range(1, 5))
    # hypothesis "opacity lung base right" (4 tokens) vs reference of 4 tokens:
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> smoothed (method1: 0.1/1); brevity penalty 1.
    out = metrics.bleu_scores([[["opacity", "lung", "base", "left"]]],
                              [["opacity", "lung", "base", "right"]])
    assert out["bleu1"] == pytest.approx(0.75)
    assert out["bleu2"] == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert out["bleu3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert out["bleu4"] == pytest.approx((0.75 * 2 / 3 * 0.5 * 0.1) ** (1 / 4))


def test_bleu_multi_reference_and_brevity_and_empty():
    # a one-token hypothesis against a 2-token reference: p1 = 1, BP = exp(1 - 2/1)
    out = metrics.bleu_scores([[["cardiomegaly", "mild"], ["nodule"]]], [["cardiomegaly"]])
    # closest reference length is 1 ("nodule") -> no brevity penalty
    assert out["bleu1"] == pytest.approx(1.0)
    out = metrics.bleu_scores([[["cardiomegaly", "mild"]]], [["cardiomegaly"]])
    assert out["bleu1"] == pytest.approx(math.exp(1 - 2))
    empty = metrics.bleu_scores([[]], [["x"]])
    assert empty["n"] == 0 and empty["bleu1"] is None


# --------------------------------------------------------------------------------- context
def test_context_accuracy_pairs_by_disease_and_scores_known_fields():
    true = [
        Finding("Opacity", "lung", ("base",), "left", "mild"),
        Finding("Nodule", "lung", ("upper lobe",), "right", None),
        Finding("Cardiomegaly", severity="mild"),
        Finding("Pneumothorax", side="left"),
    ]
    pred = [
        DetectedFinding("Cardiomegaly", 0.9, severity="moderate"),
        DetectedFinding("Nodule", 0.8, location=("upper lobe",), side="left"),
        DetectedFinding("opacity", 0.7, location=("base",), side="left", severity="mild"),
    ]
    out = metrics.context_accuracy([(true, pred)])
    # side: opacity ok, nodule wrong (pneumothorax missed) -> 1/2; location: opacity, nodule ok
    # -> 2/2; severity: opacity ok, cardiomegaly wrong -> 1/2. Exact: opacity only -> 1/3.
    assert out["fields"]["side"] == {"accuracy": 0.5, "n": 2}
    assert out["fields"]["location"] == {"accuracy": 1.0, "n": 2}
    assert out["fields"]["severity"] == {"accuracy": 0.5, "n": 2}
    assert out["exact"] == pytest.approx(1 / 3)
    assert out["detected"] == pytest.approx(3 / 4)
    assert out["per_disease"]["Nodule"]["side"] == 0.0


def test_context_matching_prefers_agreeing_prediction():
    true = [Finding("Nodule", side="left"), Finding("Nodule", side="right")]
    pred = [DetectedFinding("Nodule", 0.9, side="right"), DetectedFinding("Nodule", 0.8, side="left")]
    out = metrics.context_accuracy([(true, pred)])
    assert out["fields"]["side"]["accuracy"] == 1.0 and out["exact"] == 1.0


def test_one_prediction_of_a_disease_named_twice_is_scored_as_one_finding():
    # the truth writes a left and a right effusion; a reader naming effusion once says "bilateral"
    true = [Finding("Pleural Effusion", side="left", severity="small"),
            Finding("Pleural Effusion", side="right", location=("base",), severity="moderate")]
    both = metrics.context_accuracy([(true, [DetectedFinding("Pleural Effusion", 0.9, side="bilateral",
                                                             location=("base",), severity="moderate")])])
    assert both["fields"]["side"] == {"accuracy": 1.0, "n": 1}
    assert both["fields"]["location"]["accuracy"] == 1.0 and both["fields"]["severity"]["accuracy"] == 1.0
    assert both["detected"] == 1.0 and both["exact"] == 1.0
    one = metrics.context_accuracy([(true, [DetectedFinding("Pleural Effusion", 0.9, side="left",
                                                            severity="mild")])])
    assert one["fields"]["side"]["accuracy"] == 0.0 and one["fields"]["severity"]["accuracy"] == 0.0


# ---------------------------------------------------------------------------- localisation
@pytest.mark.parametrize("pred, truth, want_iobb, want_iou", [
    (Box("a", 0, 0, 10, 10), Box("a", 0, 0, 10, 10), 1.0, 1.0),
    (Box("a", 0, 0, 10, 10), Box("a", 5, 0, 10, 10), 0.5, 50 / 150),
    (Box("a", 2, 2, 2, 2), Box("a", 0, 0, 10, 10), 1.0, 0.04),   # small box inside: IoBB 1
    (Box("a", 0, 0, 10, 10), Box("a", 20, 20, 5, 5), 0.0, 0.0),
    (Box("a", 0, 0, 0, 10), Box("a", 0, 0, 10, 10), 0.0, 0.0),   # empty box
])
def test_iobb_iou(pred, truth, want_iobb, want_iou):
    assert metrics.iobb(pred, truth) == pytest.approx(want_iobb)
    assert metrics.iou(pred, truth) == pytest.approx(want_iou)


def test_localisation_accuracy_chestxray8_rule():
    images = [
        # image 1: Mass localised with IoBB 0.5 (half overlaps), plus one false box
        ([Box("Mass", 0, 0, 10, 10)], [Box("Mass", 5, 0, 10, 10), Box("Mass", 50, 50, 5, 5)]),
        # image 2: Mass predicted inside the truth: IoBB 1, IoU 0.04
        ([Box("Mass", 0, 0, 10, 10)], [Box("Mass", 2, 2, 2, 2), Box("Nodule", 0, 0, 10, 10)]),
        # image 3: Nodule with no Nodule box predicted (a box of another label does not count)
        ([Box("Nodule", 0, 0, 10, 10)], [Box("Mass", 0, 0, 10, 10)]),
    ]
    out = metrics.localisation_accuracy(images)
    assert out["n"] == {"Mass": 2, "Nodule": 1}
    acc = out["iobb"]["accuracy"]["Mass"]
    assert [acc[str(t)] for t in metrics.LOCALISATION_THRESHOLDS] == [1.0, 1.0, 0.5, 0.5, 0.5]
    acc_iou = out["iou"]["accuracy"]["Mass"]
    # image 1 IoU = 1/3, image 2 IoU = 0.04
    assert [acc_iou[str(t)] for t in metrics.LOCALISATION_THRESHOLDS] == [0.5, 0.5, 0, 0, 0]
    assert out["iobb"]["accuracy"]["Nodule"]["0.1"] == 0.0
    # false positives at IoBB 0.5: image 1 has 2 boxes <= 0.5, image 2 none -> 2/2
    assert out["iobb"]["afp"]["Mass"]["0.5"] == 1.0
    assert out["iobb"]["mean"]["0.1"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- calibration
def test_reliability_and_ece_hand_values():
    # scores 0.1 (x2, one positive) and 0.9 (x2, both positive); 2 bins.
    y = [0, 1, 1, 1]
    p = [0.1, 0.1, 0.9, 0.9]
    out = metrics.reliability(y, p, n_bins=2)
    assert [b["count"] for b in out["bins"]] == [2, 2]
    assert out["bins"][0]["frequency"] == 0.5 and out["bins"][0]["confidence"] == pytest.approx(0.1)
    # ECE = 0.5*|0.5-0.1| + 0.5*|1-0.9| = 0.25
    assert out["ece"] == pytest.approx(0.25)
    assert metrics.expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)
    assert len(metrics.reliability([np.nan, 1], [0.2, 0.7])["bins"]) == metrics.ECE_BINS
    assert metrics.reliability([np.nan, 1], [0.2, 0.7])["n"] == 1
    # bins of its own edges, each (lo, hi]: 0.5 falls in the first, 0.95 in the last
    out = metrics.reliability([1, 0, 1, 1], [0.5, 0.6, 0.95, 0.3], edges=(0.0, 0.5, 0.9, 1.0))
    assert [b["count"] for b in out["bins"]] == [2, 1, 1]
    assert [b["frequency"] for b in out["bins"]] == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------- mining
def test_precision_recall_f1():
    gold = [{"Nodule", "Mass"}, {"Nodule"}, set()]
    pred = [{"Nodule"}, {"Nodule", "Mass"}, {"Mass"}]
    out = metrics.precision_recall_f1(gold, pred, labels=["Nodule", "Mass"])
    assert out["per_label"]["Nodule"]["f1"] == 1.0
    mass = out["per_label"]["Mass"]
    assert (mass["tp"], mass["fp"], mass["fn"]) == (0, 2, 1) and mass["f1"] == 0.0
    assert out["micro"]["precision"] == pytest.approx(2 / 4)
    assert out["micro"]["recall"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx(0.5)
    assert metrics.prf(0, 0, 0)["f1"] is None


def test_markdown_table_and_references():
    md = metrics.markdown_table(["label", "AUC"], [["Mass", 0.56091], ["a|b", None]])
    assert md.splitlines() == ["| label | AUC |", "| :--- | ---: |", "| Mass | 0.561 |",
                               "| a\\|b | – |"]
    assert metrics.reference_for("Pleural Effusion", metrics.WANG2017_AUC) == 0.7362
    assert metrics.reference_for("Effusion", metrics.WANG2017_IOBB_05) == 0.3333
    assert metrics.reference_for("Catheter", metrics.WANG2017_AUC) is None


def test_bootstrap_auc_interval_holds_the_auc_and_narrows_with_data():
    """The 95% interval brackets the AUC, is wider on fewer patients, and moves a patient's
    films together (two copies of each film as one patient: same width as the films alone)."""
    rng = np.random.default_rng(0)

    def data(n):
        y = rng.integers(0, 2, (n, 2)).astype(float)
        return y, y * 0.8 + rng.normal(0, 0.6, y.shape)

    y, s = data(400)
    auc = metrics.auc_per_label(y, s, ["a", "b"])
    ci = metrics.bootstrap_auc_ci(y, s, ["a", "b"], n=300)
    for k in ("a", "b"):
        lo, hi = ci["per_label"][k]
        assert lo < auc["per_label"][k] < hi and hi - lo < 0.15
    small = metrics.bootstrap_auc_ci(y[:60], s[:60], ["a", "b"], n=300)
    assert np.diff(small["per_label"]["a"])[0] > np.diff(ci["per_label"]["a"])[0]
    assert ci["mean"][0] < auc["mean"] < ci["mean"][1]
    twice = metrics.bootstrap_auc_ci(np.repeat(y, 2, 0), np.repeat(s, 2, 0), ["a", "b"],
                               groups=np.repeat(np.arange(len(y)), 2), n=300)
    alone = np.diff(ci["per_label"]["a"])[0]
    assert abs(np.diff(twice["per_label"]["a"])[0] - alone) < 0.35 * alone
    rows_as_groups = metrics.bootstrap_auc_ci(np.repeat(y, 2, 0), np.repeat(s, 2, 0), ["a", "b"], n=300)
    assert np.diff(rows_as_groups["per_label"]["a"])[0] < 0.85 * alone  # too narrow: copies counted as patients
