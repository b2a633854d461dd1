"""Operating points chosen on a small validation split must hold on new studies, and a finding
with a handful of validation positives must not get a threshold that flags every film."""
import numpy as np
import pytest

from cxr import operating as O
from cxr.errors import CxrError
from cxr.training.calibration import fit_platt


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _binormal(rng, n_pos, n_neg, separation=2.0):
    """Calibrated-looking scores: logits N(-1, 1) for negatives, N(-1 + separation, 1) positives."""
    z = np.concatenate([rng.normal(-1 + separation, 1, n_pos), rng.normal(-1, 1, n_neg)])
    y = np.concatenate([np.ones(n_pos), np.zeros(n_neg)])
    return _sigmoid(z), y


@pytest.mark.parametrize("text, kind, value", [("sensitivity=0.9", "sensitivity", 0.9),
                                               ("Specificity = 0.8", "specificity", 0.8),
                                               ("f1", "f1", None)])
def test_parse(text, kind, value):
    p = O.OperatingPoint.parse(text)
    assert (p.kind, p.value) == (kind, value)
    assert O.OperatingPoint.parse(str(p)) == p


@pytest.mark.parametrize("bad", ["sensitivity", "sensitivity=1.2", "recall=0.9", "f1=0.3", "specificity=x"])
def test_parse_rejects(bad):
    with pytest.raises(CxrError):
        O.OperatingPoint.parse(bad)


@pytest.mark.parametrize("point", ["sensitivity=0.9", "specificity=0.8"])
def test_study_threshold_holds_on_new_studies(point):
    """Chosen on 150 validation studies, the target holds within sampling error on 20,000 new
    ones (averaged over 50 validation draws, so a biased rule fails)."""
    op = O.OperatingPoint.parse(point)
    rng = np.random.default_rng(0)
    test_p, test_y = _binormal(rng, 10000, 10000)
    got = []
    for _ in range(50):
        p, y = _binormal(rng, 90, 60)
        t = O.threshold_for(p, y, op)
        rate = ((test_p[test_y > 0] >= t).mean() if op.kind == "sensitivity"
                else (test_p[test_y == 0] < t).mean())
        got.append(rate)
    assert abs(np.mean(got) - op.value) < 0.03, np.mean(got)
    assert min(got) > op.value - 0.25  # one draw of 60-90 studies can miss by 3 SD or more


def test_few_positives_do_not_collapse_the_threshold():
    """A rare finding, 6 positives in 150 validation images, its scores low and barely above the
    negatives': max F1 on the validation scores picks a threshold near .03 (a fifth of the films
    without it flagged on new data); the shrunk rule stays near the prior and flags almost none."""
    from cxr.training.calibration import max_f1_thresholds

    rng = np.random.default_rng(3)
    z_neg = rng.normal(-4.0, 0.8, 144)
    z_pos = np.array([-4.1, -3.8, -3.6, -3.3, -3.0, -2.6])
    p = _sigmoid(np.concatenate([z_pos, z_neg]))
    y = np.concatenate([np.ones(6), np.zeros(144)])
    old = max_f1_thresholds(p[:, None], y[:, None])[0]
    new = O.finding_threshold(p, y)
    assert old < 0.05                      # the collapse this guards against
    assert new > 0.2, new
    new_negatives = _sigmoid(rng.normal(-4.0, 0.8, 10000))
    assert (new_negatives >= new).mean() < 0.01
    assert (new_negatives >= old).mean() > 0.15
    # fewer than MIN_POSITIVES: the prior itself
    assert O.finding_threshold(p[2:], y[2:]) == O.PRIOR


def test_many_positives_follow_the_data():
    rng = np.random.default_rng(1)
    p, y = _binormal(rng, 400, 400, separation=3.0)
    t = O.finding_threshold(p, y)
    assert abs(O._logit(t) - O._logit(O.PRIOR)) > 0.05  # moved off the prior
    assert 0.2 < t < 0.8


def test_gate_and_decisions():
    """The gate's probability is calibrated on validation; a study called normal carries only
    `normal`, one called abnormal only the diseases above their thresholds (possibly none)."""
    rng = np.random.default_rng(2)
    targets = ["normal", "Opacity", "Nodule"]
    n = 300
    normal = rng.random(n) < 0.4
    labels = np.zeros((n, 3), np.float32)
    labels[normal, 0] = 1
    labels[~normal, 1 + rng.integers(0, 2, (~normal).sum())] = 1
    raw = np.clip(np.where(labels > 0, rng.beta(5, 2, labels.shape), rng.beta(2, 5, labels.shape)), 0.01, 0.99)
    gate, th = O.choose(raw, labels, targets, O.OperatingPoint.parse("sensitivity=0.9"), fit_platt)
    assert gate.signal in O.SIGNALS and gate.validation["sensitivity"] >= 0.85
    assert th["normal"] == pytest.approx(1 - gate.threshold)
    p = gate.probability(raw, targets)
    assert abs(p.mean() - (~normal).mean()) < 0.05  # calibrated on average
    decisions = O.decide(p, raw, targets, gate.threshold, np.array([th[t] for t in targets]))
    for row, ds in zip(p, decisions):
        if row < gate.threshold:
            assert ds == [0]
        else:
            assert 0 not in ds
    normal_recall = np.mean([d == [0] for d, nm in zip(decisions, normal) if nm])
    assert normal_recall > 0.5
    import dataclasses
    import json

    again = O.StudyGate(**json.loads(json.dumps(dataclasses.asdict(gate))))
    assert np.allclose(again.probability(raw, targets), p)


def test_gate_takes_both_signals_when_each_sees_part_of_the_truth():
    """The `normal` output and the highest disease score, each a noisy view of the same truth:
    their summed logits rank the studies better than either, and the gate keeps that signal."""
    rng = np.random.default_rng(5)
    targets = ["normal", "Opacity", "Nodule"]
    n = 400
    abnormal = rng.random(n) < 0.6
    labels = np.zeros((n, 3), np.float32)
    labels[~abnormal, 0] = 1
    labels[abnormal, 1 + rng.integers(0, 2, abnormal.sum())] = 1
    sig = lambda z: 1 / (1 + np.exp(-z))
    raw = np.empty((n, 3))
    raw[:, 0] = sig(np.where(abnormal, -1.0, 1.0) + rng.normal(0, 1.5, n))
    raw[:, 1:] = sig(np.where(labels[:, 1:] > 0, 1.0, -1.0) + rng.normal(0, 1.5, (n, 2)))
    gate, _ = O.choose(raw, labels, targets, O.OperatingPoint.parse("sensitivity=0.9"), fit_platt)
    aucs = gate.validation["auc"]
    assert gate.signal == "normal_and_disease" and set(O.SIGNAL_WORDS) == set(O.SIGNALS)
    assert aucs["normal_and_disease"] > max(aucs["normal"], aucs["max_disease"]) + 0.02


def test_gate_without_normal_target_uses_the_highest_disease():
    targets = ["Opacity", "Nodule"]
    labels = np.array([[1, 0], [0, 1], [0, 0], [0, 0], [1, 1], [0, 0]], np.float32)
    raw = np.array([[.8, .1], [.2, .7], [.1, .2], [.2, .1], [.9, .9], [.3, .2]])
    gate, _ = O.choose(raw, labels, targets, O.OperatingPoint.parse("f1"), fit_platt)
    assert gate.signal == "max_disease"
    p = gate.probability(raw, targets)
    assert p[[0, 1, 4]].min() > p[[2, 3, 5]].max()


def test_one_class_validation_is_a_clear_error():
    with pytest.raises(CxrError, match="both normal and abnormal"):
        O.threshold_for(np.array([0.2, 0.9]), np.array([1, 1]), O.OperatingPoint())


def test_confusion():
    c = O.confusion([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (2, 1, 1, 1)
    assert c["sensitivity"] == pytest.approx(2 / 3) and c["specificity"] == 0.5 and c["ppv"] == pytest.approx(2 / 3)
    assert O.confusion([0, 0], [0, 0])["sensitivity"] is None


def test_best_specificity():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([.9, .8, .7, .2, .75, .3, .1, .05])
    assert O.best_specificity(truth, scores, 0.75) == 0.75   # threshold .7: 3 of 4 abnormal kept, one normal above it
    assert O.best_specificity(truth, scores, 1.0) == 0.5     # threshold .2 lets .75 and .3 through
