"""The gate's network: one small CNN that answers four questions about any grey image at once
(what kind of image, how it is rotated, whether its polarity is inverted, whether it is mirrored),
with probabilities calibrated by a per-head temperature.

Label conventions (what the gate undoes; `cxr/quality/gate.py` applies them):
    stored = invert?(rot90(mirror?(upright), k))      mirror: x[:, ::-1]; invert: 1 - x;
                                                       rot90 is numpy's (counter-clockwise)
    fix:     upright = mirror?(np.rot90(invert?(stored), -k))
`rotation`, `inverted` and `mirrored` are only meaningful when `kind` is a radiograph; `mirrored`
is trained on frontal films only (a lateral may be shown facing either way).

Why this shape: it must add little to a reader's time on a CPU, so the image is letterboxed to
64 px (aspect kept; the aspect and a few intensity statistics of the full image go in as numbers),
four convolutions (the first with stride 2) bring it to 8x8, and the spatial map is flattened (not pooled), because
orientation is exactly where things are.
Weights: safetensors + JSON beside them, never pickle (see `load`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CxrError
from .projection import PROJECTIONS, ProjectionHead

HEADS = {"kind": ["frontal", "lateral", "other"],        # chest PA/AP film, chest lateral, not a chest radiograph
         "rotation": ["0", "90", "180", "270"],          # k: stored = np.rot90(upright, k); fix: np.rot90(stored, -k)
         "inverted": ["no", "yes"],                      # stored = 1 - upright
         "mirrored": ["no", "yes"]}                      # stored = upright[:, ::-1]
SIZE = 64
N_STATS = 10
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def image_stats(image: np.ndarray) -> np.ndarray:
    """Global numbers the letterboxed thumbnail cannot carry: aspect and size, and the intensity
    distribution of the full image (blank frames, clipped or low-contrast images)."""
    h, w = image.shape
    step = max(1, int(np.sqrt(h * w / 65536)))
    v = image[::step, ::step].ravel()
    q = np.percentile(v, [1, 5, 50, 95, 99])
    return np.array([np.log(w / h), np.log(max(h * w, 1)) / 10.0, float(v.mean()), float(v.std()),
                     *q, float(np.mean(np.abs(v - q[2]) < 0.01))], np.float32)


def preprocess(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1, SIZE, SIZE) letterboxed thumbnail (padding 0, centred) and the stats vector."""
    img = np.asarray(image, np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise CxrError(f"the gate needs a 2D grey image, got shape {img.shape}")
    img = np.nan_to_num(np.clip(img, 0.0, 1.0))
    h, w = img.shape
    scale = SIZE / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    small = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=True)[0, 0].clamp(0, 1)
    out = torch.zeros((SIZE, SIZE))
    r0, c0 = (SIZE - nh) // 2, (SIZE - nw) // 2
    out[r0:r0 + nh, c0:c0 + nw] = small
    return out.numpy()[None], image_stats(img)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GateNet(nn.Module):
    """64 px thumbnail + stats -> one logit vector per head (~12 M multiply-adds per image)."""

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(_conv(1, w, 5, 2),                        # 32
                                      _conv(w, 2 * w), nn.MaxPool2d(2),          # 16
                                      _conv(2 * w, 4 * w), nn.MaxPool2d(2),      # 8
                                      _conv(4 * w, 4 * w),
                                      nn.Conv2d(4 * w, 2 * w, 1), nn.ReLU(inplace=True))
        self.stats = nn.Sequential(nn.Linear(N_STATS, 32), nn.ReLU(inplace=True))
        self.trunk = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * w * 8 * 8 + 32, hidden),
                                   nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEADS.items()})

    def trunk_features(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        f = self.features(x - 0.5).flatten(1)
        return self.trunk(torch.cat([f, self.stats(stats)], 1))

    def forward(self, x: torch.Tensor, stats: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk_features(x, stats)
        return {k: head(h) for k, head in self.heads.items()}


class GateModel:
    """The shipped (or a given) gate network with its calibration, ready to predict."""

    def __init__(self, net: GateNet, meta: dict, device=None):
        self.device = torch.device(device or "cpu")
        self.net = net.to(self.device).eval()
        self.meta = meta
        self.temperatures = {k: float(meta.get("temperatures", {}).get(k, 1.0)) for k in HEADS}
        self.projection = None  # PA/AP head on the trunk's features (`projection.py`), if shipped

    @classmethod
    def load(cls, path=None, device=None) -> "GateModel":
        """`path`: a folder holding gate.safetensors + gate.json, or the .safetensors file (its
        .json beside it); None -> the weights shipped in the package."""
        from ..checkpoint import load_shipped

        net, meta, meta_path = load_shipped(path, WEIGHTS_DIR, "gate",
                                            lambda meta: GateNet(**meta.get("architecture", {})))
        if meta.get("heads", HEADS) != HEADS:
            raise CxrError("the gate weights were trained for other heads than this code knows",
                           meta_path)
        model = cls(net, meta, device)
        model.projection = ProjectionHead.load(meta_path.parent, gate_model_id(meta))
        return model

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """The trunk's features (N, hidden) that every head reads."""
        thumbs, stats = zip(*(preprocess(im) for im in images))
        x = torch.from_numpy(np.stack(thumbs)).to(self.device)
        s = torch.from_numpy(np.stack(stats)).to(self.device)
        return self.net.trunk_features(x, s)

    def projections(self, images) -> list[dict[str, float]]:
        """Calibrated {"PA": p, "AP": p} per frontal film (upright); [] without the head."""
        images = list(images)
        if self.projection is None or not images:
            return []
        return self._projection_dicts(self.features(images))

    def _projection_dicts(self, features: torch.Tensor) -> list[dict[str, float]]:
        probs = self.projection.probabilities(features)
        return [{name: float(p[j]) for j, name in enumerate(PROJECTIONS)} for p in probs]

    @torch.no_grad()
    def logits(self, images) -> dict[str, torch.Tensor]:
        """Uncalibrated logits per head for a list of (H, W) float images in [0, 1]."""
        return self._heads(self.features(images))

    def _heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(features) for k, head in self.net.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, dict[str, float]]]:
        """Calibrated probabilities per head, one dict per image:
        {"kind": {"frontal": p, "lateral": p, "other": p}, "rotation": {"0": p, ...}, ...}, and
        "projection" ({"PA": p, "AP": p}, read on the image as given) where the head is shipped."""
        images = list(images)
        if not images:
            return []
        features = self.features(images)
        out = self._heads(features)
        probs = {k: torch.softmax(out[k].float() / self.temperatures[k], 1).cpu().numpy()
                 for k in HEADS}
        preds = [{k: {name: float(probs[k][i, j]) for j, name in enumerate(HEADS[k])}
                  for k in HEADS} for i in range(len(images))]
        if self.projection is not None:
            for pred, proj in zip(preds, self._projection_dicts(features)):
                pred["projection"] = proj
        return preds


def gate_model_id(meta: dict) -> str:
    """`gate-v<version>-<12 hex>`: the hash of the model's metadata (its calibration temperatures
    and measured accuracies differ between trainings), so reports say which weights answered."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    return f"gate-v{meta.get('version', 0)}-{digest[:12]}"
