"""PA or AP: which way the beam went through a frontal film, for files that do not say.

Why: the cardiothoracic ratio is read on PA films only (an AP film, usually supine or portable,
magnifies the heart). A DICOM file says which (ViewPosition); a PNG, an array or an export that
dropped the tag does not, and NIH's own AP films then got a ratio. The gate network's 128 trunk
features already separate the two (a linear read-out, cross-validated by patient on the 656 NIH
films, ranked them with ROC AUC .96), so the projection is a linear head on those features with
the gate's trunk frozen: the gate's other heads, and every figure measured of them, stay as they
are.

Trained on the gate's own NIH training patients (their recorded View Position; the gate's test
patients stay unseen) and the CT phantom's PA and AP renders, each under the gate's realistic
augmentation. The renders carry an enlarged heart, low volumes, a line or an effusion whatever
their view (an AP film magnifies the heart, and a head trained without them called most PA films
with Cardiomegaly AP). One temperature and a threshold (AP only when few calibration PA films
score above it) come from the gate's calibration patients. The head reads the upright film (the
gate turns a rotated or inverted film back first, `QualityGate.check`).

    python -m cxr.quality.train_projection --nih DATA/nih/bbox256 [--out cxr/quality/weights]

writes projection.safetensors + projection.json beside the gate's weights (never pickle); the
JSON names the gate whose trunk it reads, and a gate of other weights does not use it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CxrError

PROJECTIONS = ("PA", "AP")
NAME = "projection"


class ProjectionHead:
    """The linear read-out of the gate's trunk features (N, hidden) -> calibrated p(PA), p(AP)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, meta: dict):
        self.weight, self.bias, self.meta = weight.float(), bias.float(), meta
        self.temperature = float(meta.get("temperature", 1.0))
        self.threshold = float(meta.get("threshold", 0.5))  # AP when p(AP) > this (train_projection)

    def probabilities(self, features: torch.Tensor) -> np.ndarray:
        logits = features.float().cpu() @ self.weight.T + self.bias
        return torch.softmax(logits / self.temperature, 1).numpy()

    @classmethod
    def load(cls, folder: Path, gate_id: str) -> "ProjectionHead | None":
        """The head in `folder` if there is one and it was trained on this gate's trunk
        (`gate_id`); None otherwise (a gate without it answers no projection)."""
        from safetensors.torch import load_file

        weights, meta_path = folder / f"{NAME}.safetensors", folder / f"{NAME}.json"
        if not weights.is_file() or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(weights))
            head = cls(tensors["weight"], tensors["bias"], meta)
        except (OSError, ValueError, KeyError) as e:
            raise CxrError(f"cannot load the projection head: {e}", weights) from None
        if tuple(meta.get("classes", ())) != PROJECTIONS:
            raise CxrError("the projection head was trained for other classes than this code knows", meta_path)
        return head if meta.get("gate_model") == gate_id else None
