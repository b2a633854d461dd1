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
  applies (equalises lungs against mediastinum), then a window anchored on the lung fields and
  the densest parts (spine, mediastinum) (anatomy-based auto-ranging, measured on a small finding-free rendering of the
  same patient and exposure, so a finding never shifts the whole image) and a contrast curve.
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


def enhance(D: np.ndarray, var, pixel_mm: float) -> np.ndarray:
    """Two-band unsharp masking: broad (equalise lungs against mediastinum) and narrow (vessel
    and rib detail), as digital chest systems process the log signal."""
    return (D + var.unsharp * (D - lowpass(D, var.unsharp_mm / pixel_mm))
            + var.detail * (D - ndimage.gaussian_filter(D, 2.5 / pixel_mm, truncate=2.5)))


def window_levels(D: np.ndarray, var, pixel_mm: float, lung_mm: np.ndarray,
                  heart_mm: np.ndarray) -> tuple[float, float]:
    """Processed-signal levels of the lung fields (40th percentile where > 10 cm of lung and no
    heart lie in the path) and of the densest parts (98th percentile: spine behind the
    mediastinum, upper abdomen), as anatomy-based auto-ranging."""
    D2 = enhance(D, var, pixel_mm)
    lungs = D2[(lung_mm > 100) & (heart_mm < 5)]
    lung_level = np.percentile(lungs, 40) if lungs.size > 10 else np.percentile(D2, 25)
    dense_level = np.percentile(D2, 98)  # spine, mediastinum, upper abdomen
    return float(lung_level), float(dense_level)


def display(D: np.ndarray, var, pixel_mm: float, levels: tuple[float, float]) -> np.ndarray:
    """The processed image in [0, 1], bright = dense: enhancement, then the window that puts
    the lung fields and the densest parts at the grey levels `var.window`, and a film-like curve
    with a toe and a shoulder."""
    D2 = enhance(D, var, pixel_mm)
    lung_level, dense_level = levels
    lo, hi = var.window
    x = lo + (D2 - lung_level) * ((hi - lo) / max(dense_level - lung_level, 0.2))
    # toe: values below 0.12 approach 0 smoothly; shoulder: above 0.8 approach 1
    y = np.where(x < 0.12, 0.12 * np.exp((x - 0.12) / 0.12), x)
    y = np.where(y > 0.8, 0.8 + 0.2 * np.tanh((y - 0.8) / 0.2), y)
    return np.clip(y, 0.0, 1.0).astype(np.float32)
