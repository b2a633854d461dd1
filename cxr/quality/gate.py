"""The quality gate's decision: read, read after turning the film back, or refuse (and why).

    gate = QualityGate.load()                  # the shipped gate model, loaded once
    report = gate.check([pixels])[0]           # QualityReport: accepted, reasons, view, ...
    upright = gate.correct(pixels, report)     # rotation and polarity undone

The rule, in order:
1. a cheap check fails (`checks.py`: size, aspect, colour, blank, grey levels, noise) -> refused,
   the model is not run;
2. p(kind = other) > P_OTHER -> refused: not a chest radiograph;
3. p(kind = lateral) > P_VIEW and the reader reads frontal films only (today's case) -> refused;
4. rotation: the most likely of 90/180/270 with p > P_ROTATED is turned back before reading;
   polarity: p(inverted) > P_INVERTED is inverted back; both are said in `notes`;
5. mirroring of a frontal film is reported when p > P_MIRRORED (`mirrored`, a note), never
   corrected: a left-right flipped PA film and a true one of a patient with dextrocardia differ
   only by the side marker, so a wrong "correction" would swap the side of every finding
   silently; a note lets a person look at the marker. The reader's side words (left/right) are
   then to be read with care.

6. an accepted frontal film is called PA or AP (`projection`, read on the film turned upright;
   AP only when p(AP) is above the head's stored threshold, chosen so that few PA films are
   called AP: `cxr.quality.train_projection`): the Reader measures no cardiothoracic ratio on
   an AP film when the file itself does not say (a DICOM's ViewPosition comes first).

Probabilities are the gate model's calibrated ones, every head, in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..images import pixels_of
from .checks import failures, run_checks
from .model import gate_model_id

# Decision thresholds on the calibrated probabilities: a calibrated p > .5 is "more likely than
# not", the natural cut when refusing and reading wrongly cost alike; the benchmark
# (benchmarks/quality.py) measures the refusal rate on upright real frontal films at these.
P_OTHER = 0.5
P_VIEW = 0.5
P_ROTATED = 0.5
P_INVERTED = 0.5
# Mirroring is only ever a note, so it must be likely to be worth a person's attention: a note on
# many upright films would be ignored, and a missed one costs nothing the gate would have done.
# It is also the weakest head (a flipped PA film differs from an upright one by the heart's side
# and the marker only), so it speaks only when confident, and only of frontal films (a lateral
# may face either way).
P_MIRRORED = 0.9
READ_VIEWS = ("frontal",)  # the views today's runs read (trained on PA/AP films)
MODEL_BATCH = 32


@dataclass
class QualityReport:
    """What the gate found on one image, and what was done about it.

    `rotation` is in degrees counter-clockwise as stored: stored = np.rot90(upright, rotation // 90),
    so the Reader reads np.rot90(stored, -rotation // 90) and its boxes and heatmaps refer to that
    upright film. `inverted`: the polarity was turned back (1 - stored). `mirrored`: the film looks
    left-right flipped (reported only, see the module docstring). `forced`: read although refused.
    """

    accepted: bool
    reasons: list[str] = field(default_factory=list)   # why refused (empty when accepted)
    notes: list[str] = field(default_factory=list)     # what was corrected or flagged
    view: str | None = None                            # frontal | lateral | other (model's best)
    projection: str | None = None                      # PA | AP of an accepted frontal film
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    rotation: int = 0
    inverted: bool = False
    mirrored: bool = False
    checks: dict[str, dict] = field(default_factory=dict)
    forced: bool = False
    gate_model: str = ""

    @property
    def corrected(self) -> bool:
        return bool(self.rotation or self.inverted)

    @property
    def reason(self) -> str:
        """The refusal in one line (the first reason; the others are in `reasons`)."""
        return self.reasons[0] if self.reasons else ""

    def summary(self) -> str:
        """One line for a terminal: the verdict, the view and what was done."""
        if not self.accepted:
            return f"{'refused, read anyway' if self.forced else 'not read'}: {'; '.join(self.reasons)}"
        kind = self.probabilities.get("kind", {})
        head = f"ok: {self.view} (p {kind.get(self.view, 0):.2f})" if self.view else "ok"
        if self.projection:
            head += f", looks {self.projection} (p {self.probabilities['projection'][self.projection]:.2f})"
        return "; ".join([head, *self.notes])

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "reasons": list(self.reasons), "notes": list(self.notes),
                "view": self.view, "projection": self.projection, "rotation": self.rotation,
                "inverted": self.inverted, "mirrored": self.mirrored, "forced": self.forced,
                "probabilities": {h: {k: round(float(p), 4) for k, p in v.items()}
                                  for h, v in self.probabilities.items()},
                "checks": self.checks, "gate_model": self.gate_model}

    @classmethod
    def from_dict(cls, d: dict) -> "QualityReport":
        return cls(accepted=bool(d["accepted"]), reasons=list(d.get("reasons") or []),
                   notes=list(d.get("notes") or []), view=d.get("view"), projection=d.get("projection"),
                   probabilities={h: dict(v) for h, v in (d.get("probabilities") or {}).items()},
                   rotation=int(d.get("rotation") or 0), inverted=bool(d.get("inverted")),
                   mirrored=bool(d.get("mirrored")), checks=dict(d.get("checks") or {}),
                   forced=bool(d.get("forced")), gate_model=str(d.get("gate_model") or ""))


def decide(probabilities: dict[str, dict[str, float]], read_views: Sequence[str] = READ_VIEWS,
           gate_model: str = "") -> QualityReport:
    """The decision from the model's probabilities alone (the cheap checks passed)."""
    kind = probabilities["kind"]
    view = max(kind, key=kind.get)
    report = QualityReport(accepted=True, view=view, probabilities=probabilities,
                           gate_model=gate_model)
    if kind.get("other", 0.0) > P_OTHER:
        report.reasons.append(f"not a chest radiograph (p {kind['other']:.2f})")
    for name in ("frontal", "lateral"):
        if name not in read_views and kind.get(name, 0.0) > P_VIEW:
            report.reasons.append(f"a {name} view (p {kind[name]:.2f}); this model reads "
                                  f"{' and '.join(read_views)} films only")
    report.accepted = not report.reasons
    rotation = probabilities.get("rotation", {})
    turned = {k: p for k, p in rotation.items() if k != "0"}
    if turned:
        best = max(turned, key=turned.get)
        if turned[best] > P_ROTATED:
            report.rotation = int(best)
            report.notes.append(f"stored rotated {best} degrees (p {turned[best]:.2f}): turned back")
    p_inverted = probabilities.get("inverted", {}).get("yes", 0.0)
    if p_inverted > P_INVERTED:
        report.inverted = True
        report.notes.append(f"inverted polarity (p {p_inverted:.2f}): turned back")
    p_mirrored = probabilities.get("mirrored", {}).get("yes", 0.0)
    if view == "frontal" and p_mirrored > P_MIRRORED:
        report.mirrored = True
        report.notes.append(f"looks mirrored left-right (p {p_mirrored:.2f}): not changed, "
                            "check the side marker before trusting left/right")
    return report


def refused_by_checks(checks, gate_model: str = "") -> QualityReport:
    return QualityReport(accepted=False, reasons=failures(checks),
                         checks={c.name: c.to_dict() for c in checks}, gate_model=gate_model)


class QualityGate:
    """Cheap checks plus the gate model (loaded once), and the decision rule above."""

    def __init__(self, model, read_views: Sequence[str] = READ_VIEWS):
        self.model = model
        self.read_views = tuple(read_views)
        self.model_id = gate_model_id(getattr(model, "meta", None) or {})

    @classmethod
    def load(cls, path: str | Path | None = None, device=None,
             read_views: Sequence[str] = READ_VIEWS) -> "QualityGate":
        """The gate with the shipped model (or the weights at `path`)."""
        from .model import GateModel

        return cls(GateModel.load(path, device=device), read_views)

    def check(self, images: Sequence) -> list[QualityReport]:
        """One report per image: float (H, W) arrays in [0, 1], (H, W, 3|4) colour arrays, or
        `LoadedImage`s (whose file said whether it had colour)."""
        reports: list[QualityReport | None] = []
        todo, pixels = [], []
        for i, item in enumerate(images):
            grey, colour = _grey(item)
            checks = run_checks(grey, colour)
            if failures(checks):
                reports.append(refused_by_checks(checks, self.model_id))
                continue
            reports.append(None)
            todo.append((i, {c.name: c.to_dict() for c in checks}))
            pixels.append(grey)
        for s in range(0, len(pixels), MODEL_BATCH):
            probabilities = self.model.predict(pixels[s:s + MODEL_BATCH])
            for (i, checks), probs in zip(todo[s:s + MODEL_BATCH], probabilities):
                report = decide(probs, self.read_views, self.model_id)
                report.checks = checks
                reports[i] = report
        self._projections([(i, grey) for (i, _), grey in zip(todo, pixels)], reports)
        return reports  # type: ignore[return-value]

    def _projections(self, films: list[tuple[int, np.ndarray]], reports: list[QualityReport]) -> None:
        """PA or AP for each accepted frontal film (in place): `projection`, from the head's
        probabilities on the film as read, or, for a film the gate turns back, read again on the
        upright film (the head was trained on upright films). Other images keep no projection."""
        again = []
        for i, grey in films:
            report = reports[i]
            if not (report.accepted and report.view == "frontal"):
                report.probabilities.pop("projection", None)
            elif report.corrected and "projection" in report.probabilities:
                again.append((i, self.correct(grey, report)))
        for s in range(0, len(again), MODEL_BATCH):
            part = again[s:s + MODEL_BATCH]
            for (i, _), probs in zip(part, self.model.projections([f for _, f in part])):
                reports[i].probabilities["projection"] = probs
        for i, _ in films:
            probs = reports[i].probabilities.get("projection")
            if probs:
                reports[i].projection = "AP" if probs["AP"] > self.model.projection.threshold else "PA"

    @staticmethod
    def correct(image: np.ndarray, report: QualityReport) -> np.ndarray:
        """The image turned upright and back to bright = dense, as the report says."""
        image = np.asarray(image, dtype=np.float32)
        if report.inverted:
            image = 1.0 - image
        if report.rotation:
            image = np.rot90(image, -(report.rotation // 90))
        return np.ascontiguousarray(image)


def _grey(item) -> tuple[np.ndarray, float | None]:
    """Grey float32 pixels and the colour fraction when known (from the file or the array)."""
    pixels = np.asarray(pixels_of(item))
    colour = (getattr(item, "meta", None) or {}).get("colour_fraction")
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        from ..images import colour_fraction

        colour = colour_fraction(pixels)
        pixels = pixels[..., :3].astype(np.float32).mean(-1)
    return np.asarray(pixels, dtype=np.float32), colour
