"""What the Reader returns for one image: the contract between the cascade and its users
(CLI `annotate`, archive index, REST service)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .records import Box

if TYPE_CHECKING:
    from .quality.gate import QualityReport


@dataclass
class DetectedFinding:
    """A finding the model asserts on an image, keyed by a checkpoint target name."""

    disease: str
    score: float  # calibrated probability in [0, 1]
    annotation: str = ""  # generated sequence, e.g. "opacity lung base left mild"
    organ: str | None = None
    location: tuple[str, ...] = ()
    side: str | None = None
    severity: str | None = None
    boxes: list[Box] = field(default_factory=list)
    # per context field the annotation names ("side", "location", "severity"): the probability
    # the grounded annotator gave the word it wrote among that field's words (empty: Shin's
    # annotator, or a field it did not name)
    confidence: dict[str, float] = field(default_factory=dict)
    # what was measured on the film for this finding: Cardiomegaly's "cardiothoracic_ratio" (the
    # heart's widest extent over the thorax's, from `cxr.anatomy`'s masks)
    measurements: dict[str, float] = field(default_factory=dict)
    # why something a reader would look for is not there, e.g. Cardiomegaly on an AP film: "no
    # cardiothoracic ratio: an AP film magnifies the heart" (so a missing number is not a bug)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "disease": self.disease, "score": float(self.score), "annotation": self.annotation,
            "organ": self.organ, "location": list(self.location), "side": self.side,
            "severity": self.severity,
            "boxes": [dict(label=b.label, x=b.x, y=b.y, w=b.w, h=b.h) for b in self.boxes],
            "confidence": {k: float(v) for k, v in self.confidence.items()},
            "measurements": {k: float(v) for k, v in self.measurements.items()},
            "notes": list(self.notes),
        }

    def measured(self) -> list[str]:
        """What was measured, as a reader writes it: ["cardiothoracic ratio 0.58"]."""
        return [f"{k.replace('_', ' ')} {v:.2f}" for k, v in self.measurements.items()]

    def measured_or_why_not(self) -> list[str]:
        """`measured()` and the notes: what a reader of the finding sees beside its words."""
        return self.measured() + list(self.notes)

    def line(self) -> str:
        """The finding in one line of text, as a picture or a DICOM comment shows it:
        "Cardiomegaly 0.81: cardiomegaly heart mild, cardiothoracic ratio 0.56"."""
        return f"{self.disease} {self.score:.2f}: {self.annotation}" + "".join(
            f", {m}" for m in self.measured_or_why_not())


@dataclass
class Result:
    """Everything the cascade says about one image.

    `scores` covers every target (keyed by the checkpoint's names); `abnormal` is the calibrated
    probability that the study has any finding and `call` the run's normal/abnormal answer at its
    stored operating point; `findings` are the diseases above their stored thresholds in a study
    called abnormal, or `normal` alone in one called normal. `heatmaps` are (H, W) float32 in [0, 1] at the input
    image's size, one per detected finding (a mapping: the Reader's `Heatmaps` makes each when it
    is first read); `embedding` is the CNN image embedding.
    """

    scores: dict[str, float]
    findings: list[DetectedFinding] = field(default_factory=list)
    heatmaps: Mapping[str, np.ndarray] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    model_id: str = ""
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the input image
    abnormal: float | None = None  # calibrated probability that the study has any finding
    call: str | None = None        # "normal" | "abnormal" at the run's operating point (None: a run without one)
    quality: "QualityReport | None" = None

    @property
    def refused(self) -> bool:
        """The gate refused the image and it was not read (no scores, no findings)."""
        return self.quality is not None and not self.quality.accepted and not self.quality.forced

    def __repr__(self) -> str:  # short: the embedding and heatmaps are large arrays
        if self.refused:
            return f"Result(not read: {self.quality.reason})"
        found = ", ".join(f"{f.disease} {f.score:.2f}" for f in self.findings) or "nothing"
        call = f"{self.call} ({self.abnormal:.2f}); " if self.call is not None else ""
        return (f"Result({self.model_id or 'model'}: {call}{found}; {len(self.scores)} scores, "
                f"{len(self.heatmaps)} heatmaps)")

    @property
    def study_text(self) -> str | None:
        """The study-level answer in words, e.g. "study: abnormal (p abnormal 0.91)": what a
        reader of a picture or page must see first (a study called abnormal may name no finding
        above its threshold); None for a run without a study-level answer."""
        if self.call is None or self.abnormal is None:
            return None
        return f"study: {self.call} (p abnormal {self.abnormal:.2f})"

    @property
    def boxes(self) -> list[Box]:
        return [b for f in self.findings for b in f.boxes]

    def to_dict(self, embedding: bool = False) -> dict:
        d = {
            "model_id": self.model_id,
            "image_size": list(self.image_size),
            "abnormal": None if self.abnormal is None else float(self.abnormal),
            "call": self.call,
            "scores": {k: float(v) for k, v in self.scores.items()},
            "findings": [f.to_dict() for f in self.findings],
        }
        if self.quality is not None:
            d["quality"] = self.quality.to_dict()
        if embedding and self.embedding is not None:
            d["embedding"] = [float(x) for x in self.embedding]
        return d
