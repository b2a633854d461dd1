"""What a score means at inference: Platt scaling of a logit with the run's stored (a, b) per
target. Fitting the parameters (and the operating thresholds) is training's job:
`cxr.training.calibration`."""
from __future__ import annotations

import numpy as np


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def apply_platt(raw_logits: np.ndarray, params: list[tuple[float, float]]) -> np.ndarray:
    """sigmoid(a * z + b) per column, (a, b) = params[column]."""
    a = np.array([p[0] for p in params], dtype=np.float64)
    b = np.array([p[1] for p in params], dtype=np.float64)
    return (1 / (1 + np.exp(-(raw_logits * a + b)))).astype(np.float32)
