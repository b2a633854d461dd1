"""Evaluation measures, pure numpy/scikit-learn/NLTK: AUC, BLEU-1..4 of annotations, accuracy of
context fields, ChestX-ray8 localisation accuracy (IoBB and IoU), calibration (ECE, reliability
data), mining precision/recall/F1, and Markdown tables for reports.

Every function takes plain arrays or the record types (`Box`, `Finding`, `DetectedFinding`) and
returns JSON-ready dicts, so `cxr evaluate`, the demo report and the benchmarks share one meaning
of each number.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from .records import Box, normalise_term, term_tokens

LOCALISATION_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
CONTEXT_FIELDS = ("side", "location", "severity")
ECE_BINS = 15
BLEU_SMOOTHING = ("NLTK corpus_bleu, uniform cumulative weights, SmoothingFunction().method1 "
                  "(epsilon 0.1 for an n-gram order without any match in the whole corpus)")

# Published figures of Wang et al., ChestX-ray8 (CVPR 2017; ResNet-50 on 108,948 real images):
# per-finding ROC AUC, and localisation accuracy at T(IoBB) = 0.5. Keyed by ChestX-ray8 names.
WANG2017_AUC = {
    "Atelectasis": 0.7069, "Cardiomegaly": 0.8141, "Effusion": 0.7362, "Infiltration": 0.6128,
    "Mass": 0.5609, "Nodule": 0.7164, "Pneumonia": 0.6333, "Pneumothorax": 0.7891,
}
WANG2017_IOBB_05 = {
    "Atelectasis": 0.2833, "Cardiomegaly": 0.8767, "Effusion": 0.3333, "Infiltration": 0.4227,
    "Mass": 0.1411, "Nodule": 0.0126, "Pneumonia": 0.3833, "Pneumothorax": 0.1836,
}
CHESTXRAY8_FINDINGS = tuple(WANG2017_AUC)
# Open-i MeSH headings (and the phantom's) for the ChestX-ray8 names, to set numbers side by side.
CHESTXRAY8_TO_MESH = {
    "Atelectasis": "Pulmonary Atelectasis", "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion", "Infiltration": "Infiltrate", "Mass": "Mass",
    "Nodule": "Nodule", "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax",
}


def reference_for(label: str, table: dict[str, float]) -> float | None:
    """The published figure for `label`, by ChestX-ray8 name or its Open-i MeSH heading."""
    if label in table:
        return table[label]
    for nih, mesh in CHESTXRAY8_TO_MESH.items():
        if mesh.lower() == label.lower() and nih in table:
            return table[nih]
    return None


# --------------------------------------------------------------------------------------- AUC
def auc_per_label(y_true, scores, labels: Sequence[str]) -> dict:
    """ROC AUC of each label column, and their mean over the labels where it is defined.

    `y_true` (N, L) holds 1/0, or NaN where the truth is unknown (those rows are left out for that
    label). A label whose known rows hold only one class has no AUC: it is listed in `skipped` with
    the reason and left out of the mean, never counted as 0.5.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2 or y.shape[1] != len(labels):
        raise ValueError(f"y_true {y.shape}, scores {s.shape} and {len(labels)} labels disagree")
    per_label: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    positives: dict[str, int] = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y[:, j])
        yj, sj = y[known, j], s[known, j]
        n_pos = int((yj == 1).sum())
        positives[label] = n_pos
        if n_pos == 0 or n_pos == len(yj):
            per_label[label] = None
            skipped[label] = ("no positive images" if n_pos == 0 else "no negative images")
            continue
        per_label[label] = float(roc_auc_score(yj, sj))
    defined = [v for v in per_label.values() if v is not None]
    return {
        "per_label": per_label,
        "mean": float(np.mean(defined)) if defined else None,
        "n_labels": len(defined),
        "positives": positives,
        "skipped": skipped,
    }


# -------------------------------------------------------------------------------------- BLEU

def bootstrap_auc_ci(y_true, scores, labels: Sequence[str], groups: Sequence | None = None,
                     n: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of each label's AUC and of their mean: `n` resamples of the
    `groups` (patients, so one patient's films move together; each row its own group if None)
    with replacement. A resample where a label has one class only is skipped for that label.
    Returns {"per_label": {label: [lo, hi] or None}, "mean": [lo, hi] or None, "n": n, "level": level}."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == g) for g in range(len(ids))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {label: [] for label in labels}
    means = []
    for _ in range(n):
        rows = np.concatenate([rows_of[g] for g in rng.integers(0, len(ids), len(ids))])
        got = []
        for j, label in enumerate(labels):
            known = rows[~np.isnan(y[rows, j])]
            yj = y[known, j]
            if 0 < yj.sum() < len(yj):
                draws[label].append(float(roc_auc_score(yj, s[known, j])))
                got.append(draws[label][-1])
        if len(got) == len(labels):
            means.append(float(np.mean(got)))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(values):
        return [float(v) for v in np.percentile(values, q)] if len(values) >= n // 2 else None

    return {"per_label": {label: interval(v) for label, v in draws.items()},
            "mean": interval(means), "n": n, "level": level}

def annotation_tokens(annotation, vocabulary: Iterable[str] = ()) -> list[str]:
    """Tokens of an annotation, where a token is one '/'-part of a MeSH term ("upper lobe" is one).

    Accepts a token list, a MeSH-style term ("Opacity/lung/upper lobe/right") or a space-joined
    sequence ("opacity lung upper lobe right"); in the last case multi-word tokens are rejoined
    greedily (longest first) from `vocabulary`.
    """
    if isinstance(annotation, (list, tuple)):
        return [str(t).lower() for t in annotation]
    text = str(annotation).strip()
    if "/" in text:
        return term_tokens(text)
    words = text.lower().split()
    multi = sorted({v.lower() for v in vocabulary if " " in v}, key=lambda v: -len(v.split()))
    out: list[str] = []
    i = 0
    while i < len(words):
        for m in multi:
            parts = m.split()
            if words[i:i + len(parts)] == parts:
                out.append(m)
                i += len(parts)
                break
        else:
            out.append(words[i])
            i += 1
    return out


def bleu_scores(references: Sequence[Sequence[Sequence[str]]],
                hypotheses: Sequence[Sequence[str]], max_n: int = 4) -> dict:
    """Corpus BLEU-1..max_n of generated token sequences against their references.

    `references[i]` is the list of reference token lists for `hypotheses[i]` (an image with
    several true findings gives a generated sequence several references). Hypotheses without any
    reference are left out. Returns {"bleu1": ..., "bleu4": ..., "n": count}; None when empty.
    """
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    pairs = [([list(r) for r in refs if len(r)], list(h))
             for refs, h in zip(references, hypotheses)]
    pairs = [(refs, h) for refs, h in pairs if refs]
    out: dict = {"n": len(pairs)}
    if not pairs:
        return out | {f"bleu{n}": None for n in range(1, max_n + 1)}
    refs, hyps = zip(*pairs)
    smooth = SmoothingFunction().method1
    for n in range(1, max_n + 1):
        weights = tuple([1.0 / n] * n)
        out[f"bleu{n}"] = float(corpus_bleu(list(refs), list(hyps), weights=weights,
                                            smoothing_function=smooth))
    return out


# --------------------------------------------------------------------------- context fields
def _norm(value) -> str | tuple[str, ...] | None:
    if value is None or value == "" or value == () or value == []:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(sorted(" ".join(str(v).lower().split()) for v in value))
    return " ".join(str(value).lower().split())


class _OneFinding:
    """Several true findings of one disease in one image, as a reader naming that disease once
    describes them: one side ("left" + "right" = "bilateral", as a radiologist writes it), and
    any location or grade that one of them has (the reader names one; either is right)."""

    def __init__(self, findings: Sequence):
        self.disease = findings[0].disease
        sides = {_norm(f.side) for f in findings} - {None}
        self.side = ("bilateral" if "bilateral" in sides or {"left", "right"} <= sides
                     else next(iter(sides), None))
        self.choices = {f: {_norm(getattr(t, f)) for t in findings} - {None}
                        for f in ("location", "severity")}
        self.location = min(self.choices["location"], default=None)
        self.severity = min(self.choices["severity"], default=None)


def _field_ok(true, pred, field: str) -> bool:
    if isinstance(true, _OneFinding) and field in true.choices:
        return _norm(getattr(pred, field)) in true.choices[field] if true.choices[field] else \
            _norm(getattr(pred, field)) is None
    return _norm(getattr(true, field)) == _norm(getattr(pred, field))


def _agreement(true, pred) -> int:
    return sum(_field_ok(true, pred, f) for f in CONTEXT_FIELDS)


def match_findings(true: Sequence, predicted: Sequence) -> list[tuple[object, object | None]]:
    """Pair each true finding with a predicted finding of the same disease (each used once),
    preferring the one whose context fields agree most; unmatched true findings get None. Where
    the truth names a disease several times and the prediction once, the true findings are
    paired as one (`_OneFinding`: left + right = bilateral)."""
    pool = defaultdict(list)
    for p in predicted:
        pool[normalise_term(p.disease).lower()].append(p)
    by_disease = defaultdict(list)
    for t in true:
        by_disease[normalise_term(t.disease).lower()].append(t)
    # one prediction of a disease the truth names several times (a left and a right effusion):
    # scored against them as one finding (`_OneFinding`)
    true = [t for d, ts in by_disease.items() for t in
            ([_OneFinding(ts)] if len(ts) > 1 and len(pool[d]) == 1 else ts)]
    pairs = []
    for t in true:
        candidates = pool[normalise_term(t.disease).lower()]
        if not candidates:
            pairs.append((t, None))
            continue
        best = max(candidates, key=lambda p: _agreement(t, p))
        candidates.remove(best)
        pairs.append((t, best))
    return pairs


def context_accuracy(images: Iterable[tuple[Sequence, Sequence]]) -> dict:
    """Accuracy of each context field (side, location, severity) of detected findings.

    `images` yields (true findings, predicted findings) per image; anything with `disease`, `side`,
    `location`, `severity` attributes works (`Finding`, `DetectedFinding`). A true finding is
    paired with a predicted one of the same disease (see `match_findings`); a field is scored only
    where the truth states it. `exact` is the share of matched findings whose three fields all
    agree (a field the truth leaves empty must then be empty in the prediction too). `detected` is
    the share of true findings that were matched at all.
    """
    correct, total = Counter(), Counter()
    per_disease: dict[str, Counter] = defaultdict(Counter)
    n_true = n_matched = n_exact = 0
    for true, predicted in images:
        for t, p in match_findings(list(true), list(predicted)):
            n_true += 1
            if p is None:
                continue
            n_matched += 1
            d = normalise_term(t.disease)
            if _agreement(t, p) == len(CONTEXT_FIELDS):
                n_exact += 1
                per_disease[d]["exact"] += 1
            per_disease[d]["matched"] += 1
            for f in CONTEXT_FIELDS:
                truth = _norm(getattr(t, f))
                if truth is None:
                    continue
                total[f] += 1
                ok = _field_ok(t, p, f)
                correct[f] += ok
                per_disease[d][f"{f}_n"] += 1
                per_disease[d][f"{f}_ok"] += ok

    def ratio(a, b):
        return a / b if b else None

    return {
        "fields": {f: {"accuracy": ratio(correct[f], total[f]), "n": total[f]}
                   for f in CONTEXT_FIELDS},
        "exact": ratio(n_exact, n_matched),
        "detected": ratio(n_matched, n_true),
        "n_true": n_true,
        "n_matched": n_matched,
        "per_disease": {
            d: {"matched": c["matched"], "exact": ratio(c["exact"], c["matched"]),
                **{f: ratio(c[f"{f}_ok"], c[f"{f}_n"]) for f in CONTEXT_FIELDS}}
            for d, c in sorted(per_disease.items())
        },
    }


# ------------------------------------------------------------------------------ localisation
def _intersection(a: Box, b: Box) -> float:
    w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    return max(w, 0.0) * max(h, 0.0)


def iobb(pred: Box, truth: Box) -> float:
    """Intersection over the predicted box's area (ChestX-ray8's IoBB)."""
    area = pred.w * pred.h
    return _intersection(pred, truth) / area if area > 0 else 0.0


def iou(pred: Box, truth: Box) -> float:
    """Intersection over union."""
    inter = _intersection(pred, truth)
    union = pred.w * pred.h + truth.w * truth.h - inter
    return inter / union if union > 0 else 0.0


OVERLAPS = {"iobb": iobb, "iou": iou}


def localisation_accuracy(images: Iterable[tuple[Sequence[Box], Sequence[Box]]],
                          thresholds: Sequence[float] = LOCALISATION_THRESHOLDS) -> dict:
    """ChestX-ray8 localisation accuracy per label and threshold, by IoBB and by IoU.

    `images` yields (true boxes, predicted boxes) per image, all in that image's pixels, labelled
    by `Box.label`. For every (image, label) with a true box, the finding counts as localised at T
    when any predicted box of that label overlaps any true box of that label by more than T.
    `afp` is the mean number of predicted boxes of that label that overlap no true box by more than
    T (Wang et al.'s average false positives), over the same (image, label) pairs.
    """
    hits = {m: defaultdict(Counter) for m in OVERLAPS}
    false_pos = {m: defaultdict(Counter) for m in OVERLAPS}
    counts: Counter = Counter()
    for truth, pred in images:
        by_label_true = defaultdict(list)
        for b in truth:
            by_label_true[b.label].append(b)
        by_label_pred = defaultdict(list)
        for b in pred:
            by_label_pred[b.label].append(b)
        for label, tboxes in by_label_true.items():
            counts[label] += 1
            pboxes = by_label_pred.get(label, [])
            for name, fn in OVERLAPS.items():
                best = [max((fn(p, t) for t in tboxes), default=0.0) for p in pboxes]
                for thr in thresholds:
                    hits[name][label][thr] += any(v > thr for v in best)
                    false_pos[name][label][thr] += sum(v <= thr for v in best)
    labels = sorted(counts)
    out: dict = {"thresholds": list(thresholds), "n": {lab: counts[lab] for lab in labels}}
    for name in OVERLAPS:
        acc = {lab: {str(t): hits[name][lab][t] / counts[lab] for t in thresholds} for lab in labels}
        afp = {lab: {str(t): false_pos[name][lab][t] / counts[lab] for t in thresholds}
               for lab in labels}
        mean = {str(t): (float(np.mean([acc[lab][str(t)] for lab in labels])) if labels else None)
                for t in thresholds}
        out[name] = {"accuracy": acc, "afp": afp, "mean": mean}
    return out


# ------------------------------------------------------------------------------- calibration
def reliability(y_true, probs, n_bins: int = ECE_BINS, edges=None) -> dict:
    """Reliability-diagram data and expected calibration error of probabilistic scores.

    Every (image, label) score is one binary forecast: in each of `n_bins` equal-width bins of the
    score (or the bins between `edges`, each holding the scores in (lo, hi], the first from 0),
    `confidence` is the mean score and `frequency` the observed share of positives;
    ECE = sum over bins of |frequency - confidence| * count / total. NaN truths are left out.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    known = ~np.isnan(y)
    y, p = y[known], np.clip(p[known], 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1) if edges is None else np.asarray(edges, dtype=np.float64)
    n_bins = len(edges) - 1
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        conf = float(p[sel].mean()) if n else None
        freq = float(y[sel].mean()) if n else None
        if n:
            ece += abs(freq - conf) * n / len(p)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                     "confidence": conf, "frequency": freq})
    return {"ece": float(ece) if len(p) else None, "n": int(len(p)), "n_bins": n_bins,
            "bins": bins}


def expected_calibration_error(y_true, probs, n_bins: int = ECE_BINS) -> float | None:
    return reliability(y_true, probs, n_bins)["ece"]


# ---------------------------------------------------------------------------- mining P/R/F1
def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall, F1 from counts (None where undefined)."""
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    if p is None or r is None:
        f = None
    else:
        f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn}


def precision_recall_f1(gold: Sequence[Iterable[str]], predicted: Sequence[Iterable[str]],
                        labels: Sequence[str] | None = None) -> dict:
    """Per-label and micro/macro P/R/F1 of label sets, one gold and one predicted set per item
    (a report, an image). `labels` restricts and orders the labels scored."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold items but {len(predicted)} predicted")
    tp, fp, fn = Counter(), Counter(), Counter()
    seen = set()
    for g, p in zip(gold, predicted):
        g, p = set(g), set(p)
        seen |= g | p
        for lab in g & p:
            tp[lab] += 1
        for lab in p - g:
            fp[lab] += 1
        for lab in g - p:
            fn[lab] += 1
    labels = list(labels) if labels is not None else sorted(seen)
    per_label = {lab: prf(tp[lab], fp[lab], fn[lab]) for lab in labels}
    micro = prf(sum(tp[lab] for lab in labels), sum(fp[lab] for lab in labels),
                sum(fn[lab] for lab in labels))
    f1s = [v["f1"] for v in per_label.values() if v["f1"] is not None]
    return {"per_label": per_label, "micro": micro,
            "macro_f1": float(np.mean(f1s)) if f1s else None}


# ---------------------------------------------------------------------------------- tables
def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` places, None/NaN as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], digits: int = 3) -> str:
    """A GitHub Markdown table; number columns right-aligned, the first column and text left."""
    raw = [list(r) for r in rows]
    numeric = [j > 0 and all(isinstance(r[j], (int, float, np.number)) or r[j] is None
                             for r in raw if j < len(r)) for j in range(len(headers))]
    rows = [[fmt(c, digits) for c in r] for r in raw]
    head = "| " + " | ".join(str(h) for h in headers) + " |"
    align = "| " + " | ".join("---:" if n else ":---" for n in numeric) + " |"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join([head, align, *body])
