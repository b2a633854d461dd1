"""Lateral chest radiographs from the phantom CT: the same patient projected along the left-right
axis instead of anterior-posterior, through the same variation and detector model as the PA view.

Why: a reader trained on frontal films must be told when it is given a lateral, and the quality
gate learns that from these renders (real laterals are not among the shared films).

How (deliberately simpler than the PA path, which needs exact slabs for 3D findings): the coarse
(2 mm) attenuation volume of `Anatomy` is split into soft tissue and bone excess by the label map
and summed along x once per phantom (milliseconds). A rendering samples those two maps (and the
lung, heart and body thickness maps) through the drawn pose (roll, shift, magnification, smooth
deformation), adds bone weighting, aeration and extra soft tissue as the PA path does, and sends
the line integral through `detector.detect` / `display`. Findings are not inserted in this view.

Image convention: a left lateral as radiologists view it: anterior on the image's LEFT, row 0
superior, bright = dense.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .ct import BONE_PREFIXES, COARSE_MM, HEART, LOBES, LUNG_REF, MU_WATER, Anatomy
from .detector import detect, display, window_levels
from .variation import Variation

LATERAL_DOSE = 4.0     # laterals are exposed ~3-5x a PA (twice the tissue in the beam)
TAPER_TOP_MM = 90.0    # tissue above the CT's top slice (shoulders, neck) fades out over this


class LateralMaps:
    """Per-phantom projections along x (left-right) on the coarse (y, z) grid, in line-integral
    units (soft, bone) or mm of thickness (lung, heart, body)."""

    def __init__(self, anatomy: Anatomy):
        mu = np.asarray(anatomy.mu, np.float32)
        labels = np.asarray(anatomy.labels)
        st = anatomy.structures
        bone = np.isin(labels, [i for n, i in st.items() if n.startswith(BONE_PREFIXES)])
        bone_excess = np.where(bone, np.maximum(mu - MU_WATER, 0.0), 0.0).astype(np.float32)
        lung = np.isin(labels, [st[v] for v in LOBES.values() if v in st])
        heart = np.isin(labels, [st[n] for n in HEART if n in st])
        self.maps = np.stack([(mu - bone_excess).sum(axis=0), bone_excess.sum(axis=0),
                              lung.sum(axis=0), heart.sum(axis=0),
                              (mu > 0.2 * MU_WATER).sum(axis=0)]).astype(np.float32) * COARSE_MM
        self.shape = self.maps.shape[1:]   # (ny, nz)
        info = anatomy.info
        self.centre_y = 0.5 * sum(info["body_y"])
        self.top_z = anatomy.extent[2]


def line_integral(maps: LateralMaps, var: Variation, size: int, top_margin_mm: float):
    """Line integral (size, size) and the lung and heart thickness maps (mm) for one drawn pose."""
    n = size
    pix = var.fov_mm / var.scale / n
    t = ((np.arange(n) + 0.5 - n / 2) * pix).astype(np.float32)
    roll = math.radians(var.roll_deg)
    oz = maps.top_z + top_margin_mm - var.fov_mm / 2
    # anterior (larger y) on the image's left: y falls as the column grows
    Y = (maps.centre_y - var.shift_mm[0]) - (math.cos(roll) * t[None, :] - math.sin(roll) * t[:, None])
    Z = (oz - var.shift_mm[1]) - (math.sin(roll) * t[None, :] + math.cos(roll) * t[:, None])
    if var.deform is not None:
        d = np.asarray(var.deform, np.float32)
        zoom = n / d.shape[-1]
        Y = Y + ndimage.zoom(d[0], zoom, order=3, mode="nearest")[:n, :n]
        Z = Z + ndimage.zoom(d[1], zoom, order=3, mode="nearest")[:n, :n]
    ny, nz = maps.shape
    yi = Y / COARSE_MM
    zi = Z / COARSE_MM
    beyond = np.clip((Z - maps.top_z) / TAPER_TOP_MM, 0, 1)
    weight = np.cos(0.5 * np.pi * beyond) ** 2
    zi = np.clip(zi, 0, nz - 1)
    out = np.stack([ndimage.map_coordinates(m, [yi, zi], order=1, mode="constant", cval=0.0)
                    for m in maps.maps]) * weight[None]
    soft, bone, lung_mm, heart_mm, body_mm = out
    L = soft + var.bone_weight * bone
    L += (var.lung_density - 1.0) * LUNG_REF * MU_WATER * lung_mm
    L += var.extra_tissue_mm * MU_WATER * np.clip(body_mm / 40.0, 0, 1)
    return L.astype(np.float32), lung_mm.astype(np.float32), heart_mm.astype(np.float32), pix


def render_lateral(maps: LateralMaps, var: Variation, seed: int, size: int,
                   top_margin_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(image in [0, 1], raw log signal, pixel mm) of one lateral view."""
    var.photons *= LATERAL_DOSE
    L, lung_mm, heart_mm, pix = line_integral(maps, var, size, top_margin_mm)
    noise = np.random.default_rng([seed, 1]).standard_normal(L.shape, dtype=np.float32)
    raw = detect(L, var, pix, noise)
    clean = detect(L, var, pix, np.zeros_like(L))
    levels = window_levels(clean, var, pix, lung_mm, heart_mm)
    return display(raw, var, pix, levels), raw, pix
