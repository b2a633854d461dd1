"""What a score means, fitted: Platt scaling per target on the validation split (stored in the
run's RunSpec; applying it, `apply_platt` and `logit`, lives in `cxr.calibration`, which inference
imports). The operating points (study gate and finding thresholds) are chosen by `cxr.operating`.
`max_f1_thresholds` is the earlier per-target rule, kept as the reference the tests compare with:
on a small validation split it puts rare findings' thresholds near zero."""
from __future__ import annotations

import numpy as np
import torch


def fit_platt(raw_logits: np.ndarray, y: np.ndarray, prior: float = 1.0) -> list[tuple[float, float]]:
    """Per column: sigmoid(a * z + b) fitted by BCE, with a Gaussian prior pulling (a, b) to (1, 0)
    (weight `prior`), so a validation split with a handful of positives cannot make it wild.
    Columns with no positive or no negative keep the identity."""
    params = []
    for k in range(raw_logits.shape[1]):
        z = torch.tensor(raw_logits[:, k], dtype=torch.float64)
        t = torch.tensor(y[:, k], dtype=torch.float64)
        if t.sum() == 0 or t.sum() == len(t):
            params.append((1.0, 0.0))
            continue
        ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([ab], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * z + ab[1], t, reduction="sum")
            loss = loss + prior * ((ab[0] - 1) ** 2 + ab[1] ** 2)
            loss.backward()
            return loss

        opt.step(closure)
        a, b = (float(v) for v in ab.detach())
        params.append((max(a, 1e-3), b) if np.isfinite([a, b]).all() else (1.0, 0.0))
    return params


def max_f1_thresholds(probs: np.ndarray, y: np.ndarray, default: float = 0.5) -> list[float]:
    """Per column, the threshold with the highest F1 on (probs, y), placed halfway between the
    lowest score it accepts and the next lower score (not on a validation score itself, which
    over-fits a small split); `default` where the column has no positive."""
    out = []
    for k in range(probs.shape[1]):
        p, t = probs[:, k], y[:, k] > 0
        if not t.any():
            out.append(default)
            continue
        values = np.unique(p)
        best, best_f1 = 0, -1.0
        for j, th in enumerate(values):
            pred = p >= th
            tp = float((pred & t).sum())
            f1 = 2 * tp / (pred.sum() + t.sum())
            if f1 > best_f1 + 1e-12:
                best, best_f1 = j, f1
        out.append(float(values[best] + values[best - 1]) / 2 if best > 0 else float(values[0]) / 2)
    return out
