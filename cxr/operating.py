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

Every rate is read from a kernel-smoothed ROC (each validation score spread by a Gaussian in
logit space, Silverman's bandwidth), so a target such as sensitivity .9 interpolates between the
few scores near it instead of jumping on one of them. Pure numpy/scipy: the Reader uses it too.
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


# ------------------------------------------------------------------------ smoothed rates
def _bandwidth(z: np.ndarray) -> float:
    """Silverman's rule on logit scores (robust spread), never below 0.05 logit."""
    if len(z) < 2:
        return 0.5
    iqr = np.subtract(*np.percentile(z, [75, 25]))
    sigma = min(np.std(z), iqr / 1.349) if iqr > 0 else np.std(z)
    return float(max(0.9 * sigma * len(z) ** -0.2, 0.05))


def smoothed_above(z: np.ndarray, t, h: float | None = None) -> np.ndarray:
    """Smoothed count of logit scores `z` at or above each threshold in `t` (logits)."""
    from scipy.special import ndtr

    z = np.asarray(z, dtype=np.float64)
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if len(z) == 0:
        return np.zeros_like(t)
    h = _bandwidth(z) if h is None else h
    return ndtr((z[None, :] - t[:, None]) / h).sum(1)


def _grid(*zs: np.ndarray) -> np.ndarray:
    lo = min((z.min() for z in zs if len(z)), default=-5.0) - 3
    hi = max((z.max() for z in zs if len(z)), default=5.0) + 3
    return np.linspace(lo, hi, 801)


def threshold_for(scores, truth, point: OperatingPoint) -> float:
    """The probability threshold on `scores` (calibrated, one column) that meets `point` on the
    smoothed validation ROC: the highest threshold whose sensitivity reaches the target, the
    lowest whose specificity does, or the one with the highest F1."""
    z, y = _logit(scores), np.asarray(truth) > 0
    pos, neg = z[y], z[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise CxrError("the validation split needs both normal and abnormal studies to choose an "
                       f"operating point ({len(pos)} abnormal, {len(neg)} normal)")
    grid = _grid(pos, neg)
    sens = smoothed_above(pos, grid) / len(pos)
    spec = 1 - smoothed_above(neg, grid) / len(neg)
    if point.kind == "sensitivity":
        ok = np.flatnonzero(sens >= point.value)
        t = grid[ok[-1]] if len(ok) else grid[0]
    elif point.kind == "specificity":
        ok = np.flatnonzero(spec >= point.value)
        t = grid[ok[0]] if len(ok) else grid[-1]
    else:
        tp, fp = sens * len(pos), (1 - spec) * len(neg)
        t = grid[int(np.argmax(2 * tp / (2 * tp + fp + (len(pos) - tp))))]
    return float(_sigmoid(t))


def finding_threshold(scores, truth, eligible=None, prior: float = PRIOR,
                      prior_positives: float = PRIOR_POSITIVES, min_positives: int = MIN_POSITIVES) -> float:
    """One finding's threshold: smoothed max F1 over the `eligible` rows (those the study gate
    calls abnormal; a positive outside them is a miss whatever its score), shrunk toward `prior`
    in logit space by n_pos / (n_pos + prior_positives); `prior` alone below `min_positives`."""
    z, y = _logit(scores), np.asarray(truth) > 0
    eligible = np.ones(len(z), bool) if eligible is None else np.asarray(eligible, bool)
    n_pos = int(y.sum())
    if n_pos < min_positives:
        return float(prior)
    pos, neg = z[y & eligible], z[~y & eligible]
    if len(pos) == 0:
        return float(prior)
    grid = _grid(pos, neg)
    tp = smoothed_above(pos, grid)
    fp = smoothed_above(neg, grid) if len(neg) else np.zeros_like(grid)
    best = grid[int(np.argmax(2 * tp / (2 * tp + fp + (n_pos - tp))))]
    w = n_pos / (n_pos + prior_positives)
    return float(_sigmoid(w * best + (1 - w) * _logit(prior)))


# ------------------------------------------------------------------------------ the gate
@dataclass
class StudyGate:
    """The study-level answer of a run: which score says abnormal, its Platt calibration, and the
    threshold chosen for `operating_point` (with what it gave on the validation patients)."""

    signal: str                        # "normal" (1 - normal) | "max_disease"
    platt: tuple[float, float]         # on the signal's logit (abnormal direction)
    threshold: float                   # on the calibrated abnormal probability
    operating_point: str = "sensitivity=0.9"
    validation: dict | None = None

    def raw_logit(self, raw_probs: np.ndarray, targets: list[str]) -> np.ndarray:
        """The uncalibrated abnormal logit of each row of per-target probabilities (B, T)."""
        raw_probs = np.asarray(raw_probs, dtype=np.float64)
        if self.signal == "normal":
            return -_logit(raw_probs[:, targets.index(NORMAL)])
        cols = [k for k, t in enumerate(targets) if t != NORMAL]
        return _logit(raw_probs[:, cols].max(1))

    def probability(self, raw_probs: np.ndarray, targets: list[str]) -> np.ndarray:
        a, b = self.platt
        return _sigmoid(a * self.raw_logit(raw_probs, targets) + b).astype(np.float32)

    def to_dict(self) -> dict:
        return {"signal": self.signal, "platt": list(self.platt), "threshold": self.threshold,
                "operating_point": self.operating_point, "validation": self.validation}

    @classmethod
    def from_dict(cls, d: dict) -> "StudyGate":
        return cls(d["signal"], tuple(d["platt"]), float(d["threshold"]), d.get("operating_point", ""),
                   d.get("validation"))


def abnormal_truth(labels: np.ndarray, targets: list[str]) -> np.ndarray:
    """1 where a study is not normal: `normal` off when it is a target, else any target on."""
    labels = np.asarray(labels) > 0
    if NORMAL in targets:
        return (~labels[:, targets.index(NORMAL)]).astype(np.float32)
    return labels.any(1).astype(np.float32)


def choose(raw_probs: np.ndarray, labels: np.ndarray, targets: list[str],
           point: OperatingPoint, calibrated: np.ndarray) -> tuple[StudyGate, dict[str, float]]:
    """The gate and the per-finding thresholds from validation scores.

    `raw_probs` (N, T): uncalibrated per-target probabilities; `calibrated` (N, T): the same after
    the per-target Platt scaling; `labels` (N, T) the truth. The `normal` threshold is stored as
    the complement of the gate's (normal is reported exactly when the study is called normal)."""
    from .training.calibration import fit_platt

    y = abnormal_truth(labels, targets)
    signal = NORMAL if NORMAL in targets else "max_disease"
    gate = StudyGate(signal, (1.0, 0.0), 0.5, str(point))
    z = gate.raw_logit(raw_probs, targets)
    (a, b), = fit_platt(z[:, None], y[:, None])
    gate.platt = (a, b)
    p = gate.probability(raw_probs, targets)
    gate.threshold = threshold_for(p, y, point)
    called = p >= gate.threshold
    yb = y > 0
    gate.validation = {"abnormal": int(yb.sum()), "normal": int((~yb).sum()),
                       "sensitivity": float(called[yb].mean()), "specificity": float((~called[~yb]).mean())}
    thresholds = {}
    for k, t in enumerate(targets):
        if t == NORMAL:
            thresholds[t] = float(1 - gate.threshold)
        else:
            thresholds[t] = finding_threshold(calibrated[:, k], labels[:, k], eligible=called)
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
