"""Operating points: from calibrated scores to the yes/no a reader of the film acts on.

Two levels, both chosen on the validation patients and stored in the run:

- **Study**: `abnormal` = calibrated probability that the study has any finding (Platt on the
  `normal` target's logit, sign flipped; on data without a `normal` target, Platt on the highest
  disease score), and one threshold on it chosen for a stated target, `--operating-point`:
  `sensitivity=0.9`, `specificity=0.8` or `f1`.
- **Finding**: a disease is reported only when the study is called abnormal AND its calibrated
  score reaches its own threshold. That threshold maximises F1 among the validation studies the
  gate calls abnormal, then is shrunk (in logit space) toward a prior of 0.5 ("more likely than
  not") by its number of validation positives, n / (n + PRIOR_POSITIVES); with fewer than
  MIN_POSITIVES positives it is the prior. So a rare finding with a handful of validation
  positives cannot end at .02, which made every film abnormal.

A target such as sensitivity .9 is read from the validation ROC interpolated between
neighbouring scores, so it does not jump on one score. Pure numpy/scipy: the Reader uses it too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CxrError

NORMAL = "normal"
PRIOR = 0.5              # a finding's threshold when its validation split says nothing
PRIOR_POSITIVES = 10     # how many validation positives weigh as much as the prior
MIN_POSITIVES = 5        # below this, the prior alone
KINDS = ("sensitivity", "specificity", "f1")
SIGNALS = ("normal", "max_disease", "normal_and_disease")
# what each signal is, in the words `cxr evaluate` and the demo report print
SIGNAL_WORDS = {"normal": "normal score (flipped)", "max_disease": "highest disease score",
                "normal_and_disease": "flipped normal score and highest disease score, their logits summed"}


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class OperatingPoint:
    """What the study-level threshold is chosen for: `sensitivity=0.9`, `specificity=0.8`, `f1`."""

    kind: str = "sensitivity"
    value: float | None = 0.9

    @classmethod
    def parse(cls, text: str) -> "OperatingPoint":
        text = str(text).strip().lower().replace(" ", "")
        kind, _, value = text.partition("=")
        if kind not in KINDS:
            raise CxrError(f"unknown operating point {text!r}; use sensitivity=0.9, specificity=0.8 or f1")
        if kind == "f1":
            if value:
                raise CxrError(f"operating point {text!r}: f1 takes no value")
            return cls("f1", None)
        try:
            v = float(value)
        except ValueError:
            raise CxrError(f"operating point {text!r}: {kind} needs a value, e.g. {kind}=0.9") from None
        if not 0 < v < 1:
            raise CxrError(f"operating point {text!r}: {kind} must lie strictly between 0 and 1")
        return cls(kind, v)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


# --------------------------------------------------------------------------------- rates
def _max_f1(pos: np.ndarray, neg: np.ndarray, n_pos: int) -> float:
    """The logit threshold with the highest F1, halfway between neighbouring validation scores
    (not on a score itself); `n_pos` counts every positive, also those no threshold can reach."""
    cand = np.unique(np.concatenate([pos, neg]))
    cand = np.concatenate([[cand[0] - 1], (cand[1:] + cand[:-1]) / 2]) if len(cand) > 1 else cand - 1
    tp = (pos[None, :] >= cand[:, None]).sum(1)
    fp = (neg[None, :] >= cand[:, None]).sum(1)
    return float(cand[int(np.argmax(2 * tp / (2 * tp + fp + (n_pos - tp))))])


def threshold_for(scores, truth, point: OperatingPoint) -> float:
    """The probability threshold on `scores` (calibrated, one column) that meets `point` on the
    validation studies: the (1 - s) quantile of the abnormal studies' scores for sensitivity s,
    the s quantile of the normal studies' for specificity s (both linearly interpolated between
    neighbouring scores, so a target falls between them instead of jumping on one), or max F1."""
    z, y = _logit(scores), np.asarray(truth) > 0
    pos, neg = z[y], z[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise CxrError("the validation split needs both normal and abnormal studies to choose an "
                       f"operating point ({len(pos)} abnormal, {len(neg)} normal)")
    if point.kind == "sensitivity":
        t = np.quantile(pos, 1 - point.value)
    elif point.kind == "specificity":
        t = np.quantile(neg, point.value)
    else:
        t = _max_f1(pos, neg, len(pos))
    return float(_sigmoid(t))


def finding_threshold(scores, truth, eligible=None, prior: float = PRIOR,
                      prior_positives: float = PRIOR_POSITIVES, min_positives: int = MIN_POSITIVES) -> float:
    """One finding's threshold: max F1 over the `eligible` rows (those the study gate calls
    abnormal; a positive outside them is a miss whatever its score), shrunk toward `prior` in
    logit space by n_pos / (n_pos + prior_positives); `prior` alone below `min_positives`."""
    z, y = _logit(scores), np.asarray(truth) > 0
    eligible = np.ones(len(z), bool) if eligible is None else np.asarray(eligible, bool)
    n_pos = int(y.sum())
    pos, neg = z[y & eligible], z[~y & eligible]
    if n_pos < min_positives or len(pos) == 0:
        return float(prior)
    w = n_pos / (n_pos + prior_positives)
    return float(_sigmoid(w * _max_f1(pos, neg, n_pos) + (1 - w) * _logit(prior)))


# ------------------------------------------------------------------------------ the gate
@dataclass(frozen=True)
class StudyGate:
    """The study-level answer of a run: which score says abnormal, its Platt calibration, and the
    threshold chosen for `operating_point` (with what it gave on the validation patients).

    Signals, on the calibrated per-target scores: "normal" (the `normal` target, sign flipped),
    "max_disease" (the highest disease score: small findings that barely move the `normal` output
    still raise it) or "normal_and_disease" (the sum of the two logits: both pieces of evidence
    at once, as a product of experts; on the demo's three seeds it ranked the test studies
    better than either alone each time). Training keeps whichever ranks the validation studies
    best."""

    signal: str                        # "normal" | "max_disease" | "normal_and_disease"
    platt: list[float]                 # [a, b] on the signal's logit (abnormal direction)
    threshold: float                   # on the calibrated abnormal probability
    operating_point: str = "sensitivity=0.9"
    validation: dict | None = None     # counts, AUC of each signal, sensitivity and specificity

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise CxrError(f"unknown study signal {self.signal!r}; expected {' or '.join(SIGNALS)}")

    def signal_logit(self, scores: np.ndarray, targets: list[str]) -> np.ndarray:
        """The uncalibrated abnormal logit of each row of calibrated per-target scores (B, T)."""
        scores = np.asarray(scores, dtype=np.float64)
        against_normal = -_logit(scores[:, targets.index(NORMAL)]) if self.signal != "max_disease" else 0.0
        if self.signal == "normal":
            return against_normal
        cols = [k for k, t in enumerate(targets) if t != NORMAL]
        return against_normal + _logit(scores[:, cols].max(1))

    def probability(self, scores: np.ndarray, targets: list[str]) -> np.ndarray:
        a, b = self.platt
        return _sigmoid(a * self.signal_logit(scores, targets) + b).astype(np.float32)

    def called(self, abnormal: np.ndarray) -> np.ndarray:
        return np.asarray(abnormal) >= self.threshold


def abnormal_truth(labels: np.ndarray, targets: list[str]) -> np.ndarray:
    """1 where a study is not normal: `normal` off when it is a target, else any target on."""
    labels = np.asarray(labels) > 0
    if NORMAL in targets:
        return (~labels[:, targets.index(NORMAL)]).astype(np.float32)
    return labels.any(1).astype(np.float32)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import rankdata

    y = y > 0
    r = rankdata(s)
    return float((r[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))


def choose(scores: np.ndarray, labels: np.ndarray, targets: list[str], point: OperatingPoint,
           fit_platt) -> tuple[StudyGate, dict[str, float]]:
    """The gate and the per-finding thresholds from validation data: `scores` (N, T) calibrated
    per-target scores, `labels` (N, T) the truth, `fit_platt(z (N, 1), y (N, 1)) -> [(a, b)]`
    (training's Platt fit). The `normal` threshold is stored as the complement of the gate's
    (`normal` is reported exactly when the study is called normal)."""
    y = abnormal_truth(labels, targets)
    if y.all() or not y.any():
        raise CxrError("the validation split needs both normal and abnormal studies to choose an "
                       f"operating point ({int(y.sum())} abnormal, {int((1 - y).sum())} normal)")
    has_normal, has_disease = NORMAL in targets, any(t != NORMAL for t in targets)
    signals = [s for s, ok in (("normal", has_normal), ("max_disease", has_disease),
                               ("normal_and_disease", has_normal and has_disease)) if ok]
    aucs = {s: _auc(y, StudyGate(s, [1.0, 0.0], 0.5).signal_logit(scores, targets)) for s in signals}
    signal = max(signals, key=lambda s: aucs[s])
    (a, b), = fit_platt(StudyGate(signal, [1.0, 0.0], 0.5).signal_logit(scores, targets)[:, None], y[:, None])
    p = StudyGate(signal, [float(a), float(b)], 0.5).probability(scores, targets)
    threshold = threshold_for(p, y, point)
    called = p >= threshold
    rates = confusion(y, called)
    gate = StudyGate(signal, [float(a), float(b)], threshold, str(point),
                     {"abnormal": int(y.sum()), "normal": int((1 - y).sum()), "auc": aucs,
                      "sensitivity": rates["sensitivity"], "specificity": rates["specificity"]})
    thresholds = {}
    for k, t in enumerate(targets):
        if t == NORMAL:
            thresholds[t] = float(1 - threshold)
        else:
            thresholds[t] = finding_threshold(scores[:, k], labels[:, k], eligible=called)
    return gate, thresholds


def decide(abnormal: np.ndarray, calibrated: np.ndarray, targets: list[str], gate_threshold: float,
           thresholds: np.ndarray) -> list[list[int]]:
    """Per row, the target indices reported: the diseases at or above their thresholds when the
    study is called abnormal; `normal` alone when it is called normal (when `normal` is a target)."""
    normal = targets.index(NORMAL) if NORMAL in targets else None
    out = []
    for b in range(len(abnormal)):
        if abnormal[b] >= gate_threshold:
            out.append([t for t in range(len(targets)) if t != normal and calibrated[b, t] >= thresholds[t]])
        else:
            out.append([normal] if normal is not None else [])
    return out


def best_specificity(truth, scores, sensitivity: float) -> float | None:
    """The highest specificity any threshold on `scores` reaches while keeping at least
    `sensitivity` on these studies: how far the ranking allows, whatever the rule chose."""
    y, s = np.asarray(truth) > 0, np.asarray(scores, dtype=np.float64)
    if not y.any() or y.all():
        return None
    pos = np.sort(s[y])
    t = pos[int(np.floor((1 - sensitivity) * len(pos) + 1e-9))]  # keeps >= sensitivity of positives
    return float((s[~y] < t).mean())


def confusion(truth, called) -> dict:
    """Sensitivity, specificity, PPV, NPV and the four counts of yes/no calls against the truth
    (None where a rate has no denominator)."""
    y, c = np.asarray(truth) > 0, np.asarray(called, bool)
    tp, fp = int((y & c).sum()), int((~y & c).sum())
    fn, tn = int((y & ~c).sum()), int((~y & ~c).sum())

    def rate(a, b):
        return a / (a + b) if a + b else None

    return {"sensitivity": rate(tp, fn), "specificity": rate(tn, fp), "ppv": rate(tp, fp),
            "npv": rate(tn, fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
