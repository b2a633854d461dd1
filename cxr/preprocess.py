"""An image as loaded -> the model's input: what training's disk cache and the Reader share.

Both paths call `preprocess` then `normalise` with the run's `RunSpec.preprocessing`, so the model
sees at inference exactly the grey levels it was trained on. Inference imports this module, not
the training package."""
from __future__ import annotations

import numpy as np
import torch

from .errors import CxrError

# What training does (and stores in RunSpec.preprocessing, which is what inference reads):
# percentile stretch on, then (x - MEAN) / STD.
MEAN, STD = 0.5, 0.25
STRETCH = True


def preprocess(image: np.ndarray, size: int, stretch: bool) -> np.ndarray:
    """An image as loaded (float32 (H, W) in [0, 1]) -> the model's square input size
    (`square`, then `levels`)."""
    return levels(square(image, size), stretch)


def square(image: np.ndarray, size: int) -> np.ndarray:
    """An image as loaded (float32 (H, W) in [0, 1], or RGB(A) from Python) -> grey, squashed to
    size x size by area averaging: the film at the CNN's size before its grey levels are set,
    which the Reader also hands the anatomy network (one resize of the film, not two)."""
    from .images import resize

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:  # RGB(A) arrays handed in from Python
        image = image[..., :3].mean(-1) if image.shape[-1] in (3, 4) else image[0]
    if image.ndim != 2:
        raise CxrError(f"expected a 2-D grey image, got shape {image.shape}")
    return resize(image, size)


def levels(image: np.ndarray, stretch: bool) -> np.ndarray:
    """A `square` image -> the grey levels the CNN reads. With `stretch`, stretched so the
    0.5th..99.5th percentiles span [0, 1]: an 8-bit PNG export and the DICOM it came from
    (windowed or min-max scaled by the loader) then give the model the same input, whatever range
    each file used."""
    if stretch:
        lo, hi = np.percentile(image, (0.5, 99.5))
        if hi - lo > 1e-6:
            image = (image - lo) / (hi - lo)
    # float32 whatever NumPy's promotion rules: under NumPy 2 the float64 percentiles above would
    # otherwise make the image float64, and a float32 network refuses a float64 input
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def normalise(batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (batch - mean) / std
