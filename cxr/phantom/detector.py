"""Detector and image processing: line integral -> detected quanta -> log signal -> the processed,
windowed image a radiologist sees.

Model (per output pixel of size p mm):
- primary transmission T = exp(-L), L the attenuation line integral;
- scatter S = scatter * lowpass(T): a broad (~5 cm) blur of the primary, which is how scatter
  behaves behind an anti-scatter grid (scatter-to-primary ratio ~0.1 in the lungs, ~1-2 behind
  the heart);
- quantum noise: N = photons * p^2 * (T + S) quanta, Poisson, taken as Gaussian with variance N
  (N is in the hundreds or more everywhere inside the body, where that is exact enough);
- detector blur: Gaussian PSF applied after the noise (the scintillator blurs both);
- log signal D = -ln(I / I0), then the large-kernel unsharp masking every digital chest system
  applies (equalises lungs against mediastinum), then a window from the image's own histogram
  (auto-ranging; pixels of inserted findings are left out so a finding does not move the window)
  and a contrast curve.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def lowpass(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with a large sigma, done on a downsampled copy (cost independent of sigma)."""
    h, w = img.shape
    f = max(1, int(sigma_px // 3))
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    small = F.avg_pool2d(t, f, ceil_mode=True) if f > 1 else t
    small = ndimage.gaussian_filter(small[0, 0].numpy(), sigma_px / f, mode="nearest")
    up = F.interpolate(torch.from_numpy(small)[None, None], size=(h, w), mode="bilinear",
                       align_corners=False)
    return up[0, 0].numpy()


def detect(L: np.ndarray, var, pixel_mm: float, noise: np.ndarray) -> np.ndarray:
    """Log-domain detector signal D = -ln(I/I0) (float32) from the line integral `L`, with
    scatter, quantum noise (`noise` is a standard normal field of L's shape) and blur."""
    T = np.exp(-L)
    I = T + var.scatter * lowpass(T, 45.0 / pixel_mm)
    quanta = var.photons * pixel_mm ** 2
    I = I + np.sqrt(I / quanta) * noise
    I = ndimage.gaussian_filter(I, var.psf_mm / pixel_mm, mode="nearest", truncate=3.0)
    return (-np.log(np.maximum(I, 1e-5))).astype(np.float32)


def display(D: np.ndarray, var, pixel_mm: float, exclude: np.ndarray | None = None) -> np.ndarray:
    """The processed image in [0, 1], bright = dense."""
    D2 = D + var.unsharp * (D - lowpass(D, var.unsharp_mm / pixel_mm))
    sample = D2[::2, ::2] if exclude is None else D2[::2, ::2][~exclude[::2, ::2]]
    if sample.size < 16:
        sample = D2.ravel()
    lo, hi = np.percentile(sample, (0.5, 99.8))
    span = max(hi - lo, 1e-3) * var.window[1]
    x = (D2 - lo) / span - var.window[0]
    x = np.clip(x, 0.0, 1.0) ** var.gamma
    # a gentle film-like S curve: toe in the blacks, shoulder in the whites
    y = x + 0.12 * np.sin(2 * np.pi * x) / (2 * np.pi) * -1.0
    return np.clip(y, 0.0, 1.0).astype(np.float32)
