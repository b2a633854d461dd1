"""Cheap checks on a decoded image, before any model: things a chest radiograph never is.

Each check gives a `Check` (name, passed, the measured value, and a one-line reason when it
fails). They run in about a millisecond on a full-size film (statistics are taken on a copy of
at most `SAMPLE_SIDE` pixels a side) and catch what a network should not have to: a photograph,
a blank frame, a thumbnail, a strip, noise. The thresholds are deliberately loose: a real film,
however poor, must pass them all (the NIH films and the phantom renders do, see the tests);
what is left for the gate's model is the hard part (is it a chest, which view, which way up).
There is no saturation check: real films carry large clipped areas (black padding, collimation,
burned-out air), so a share of pixels at 0 or 1 tells a bad film from a good one too poorly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The smallest side a film may have. The Reader's inputs are 64..512 px; below 32 px a film has
# lost its anatomy (a 1-pixel or icon-sized image can only be a mistake).
MIN_SIDE = 32
# Long side / short side. Chest films are 1:1 to 1.4:1 (35x43 cm cassettes, 14x17 in); 3:1 leaves
# room for a crop yet refuses strips, banners and a film squeezed 10:1 by a bad export.
MAX_ASPECT = 3.0
# A pixel in a grey picture stored as colour spreads its R, G, B by a few levels at most (JPEG);
# a radiograph may carry a coloured marker or text, never colour over more than this fraction.
MAX_COLOUR_FRACTION = 0.05
# Standard deviation under which a frame is blank (all black, all white, one grey): a film's
# grey levels spread by 0.1-0.3 of full scale; 0.01 is 2.5 levels of 255.
BLANK_STD = 0.01
# Fewer distinct grey levels (of 256) than this is a drawing, a document or a thresholded mask,
# not an exposure: a film uses most of its levels.
MIN_GREY_LEVELS = 16
# 1st..99th percentile span under this is a near-constant frame (a flat field with a speck).
MIN_SPAN = 0.05
# Noise: mean |difference| of neighbouring pixels over the mean |deviation| from the image mean,
# on the image shrunk to SAMPLE_SIDE. Independent noise gives ~1.1-1.4 at any size; a film is
# smooth at that scale (the NIH films and phantom renders give well under 0.5).
MAX_ROUGHNESS = 0.8
SAMPLE_SIDE = 128


@dataclass
class Check:
    name: str
    passed: bool
    value: float
    reason: str | None = None  # why it failed, one line (None when it passed)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}


def run_checks(pixels: np.ndarray, colour_fraction: float | None = None) -> list[Check]:
    """All cheap checks on an image (float (H, W) in [0, 1], or an (H, W, 3|4) colour array);
    `colour_fraction` comes from the file (`read_image(...).meta`) when the pixels are grey
    already. Checks that cannot be measured on a degenerate image are skipped (the size check
    has already failed)."""
    image = np.asarray(pixels)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        from ..images import colour_fraction as measure

        if colour_fraction is None:
            colour_fraction = measure(image)
        image = image[..., :3].astype(np.float32).mean(-1)
    image = np.asarray(image, dtype=np.float32)
    checks = [check_size(image), check_aspect(image)]
    if colour_fraction is not None:
        checks.append(check_colour(colour_fraction))
    if min(image.shape) >= 2:
        sample = _sample(image)
        blank = check_blank(sample)
        checks.append(blank)
        if blank.passed:  # a blank frame fails the rest too: one reason is enough
            checks += [check_grey_levels(sample), check_span(sample), check_noise(sample)]
    return checks


def failures(checks: list[Check]) -> list[str]:
    return [c.reason for c in checks if not c.passed and c.reason]


def check_size(image: np.ndarray) -> Check:
    side = min(image.shape[:2]) if image.ndim >= 2 else 0
    ok = side >= MIN_SIDE
    h, w = (image.shape[:2] if image.ndim >= 2 else (0, 0))
    return Check("size", ok, float(side), None if ok else
                 f"too small: {w}x{h} pixels (a film has at least {MIN_SIDE} a side)")


def check_aspect(image: np.ndarray) -> Check:
    h, w = image.shape[:2]
    ratio = max(h, w) / max(min(h, w), 1)
    ok = ratio <= MAX_ASPECT
    return Check("aspect", ok, round(float(ratio), 3), None if ok else
                 f"aspect ratio {ratio:.1f}:1 ({w}x{h}); a chest film is at most {MAX_ASPECT:g}:1")


def check_colour(fraction: float) -> Check:
    ok = fraction <= MAX_COLOUR_FRACTION
    return Check("colour", ok, round(float(fraction), 4), None if ok else
                 f"a colour picture ({fraction:.0%} of its pixels in colour); a radiograph is grey")


def check_blank(sample: np.ndarray) -> Check:
    std, mean = float(sample.std()), float(sample.mean())
    ok = std >= BLANK_STD
    what = "all black" if mean < 0.1 else "all white" if mean > 0.9 else f"one grey ({mean:.2f})"
    return Check("blank", ok, round(std, 5), None if ok else f"blank: {what}")


def check_grey_levels(sample: np.ndarray) -> Check:
    levels = int(np.unique(np.rint(np.clip(sample, 0, 1) * 255)).size)
    ok = levels >= MIN_GREY_LEVELS
    return Check("grey_levels", ok, float(levels), None if ok else
                 f"only {levels} grey levels (a drawing or a mask, not an exposure)")


def check_span(sample: np.ndarray) -> Check:
    lo, hi = np.percentile(sample, (1, 99))
    span = float(hi - lo)
    ok = span >= MIN_SPAN
    return Check("dynamic_range", ok, round(span, 4), None if ok else
                 f"near-constant: 98% of its pixels within {span:.3f} of full scale")


def check_noise(sample: np.ndarray) -> Check:
    deviation = float(np.abs(sample - sample.mean()).mean())
    if deviation < 1e-6:
        return Check("noise", True, 0.0)  # constant: the blank check speaks
    steps = (np.abs(np.diff(sample, axis=0)).mean() + np.abs(np.diff(sample, axis=1)).mean()) / 2
    roughness = float(steps) / deviation
    ok = roughness <= MAX_ROUGHNESS
    return Check("noise", ok, round(roughness, 4), None if ok else
                 f"looks like noise (neighbouring pixels unrelated: roughness {roughness:.2f})")


def _sample(image: np.ndarray) -> np.ndarray:
    """The image shrunk (area average) to at most SAMPLE_SIDE a side: cheap statistics, and the
    noise check then sees structure at the scale of anatomy, not of the detector's grain."""
    if max(image.shape) <= SAMPLE_SIDE:
        return image
    from ..images import resize

    scale = SAMPLE_SIDE / max(image.shape)
    return resize(image, (max(2, round(image.shape[0] * scale)), max(2, round(image.shape[1] * scale))))
