"""Per-image variation of patient, positioning and exposure, all drawn from one numpy Generator,
so that no two renderings are alike and the same seed gives the same image bit for bit.

Ranges are those of ordinary PA chest films: a few degrees of rotation, a centimetre of shift,
+-8 % magnification, breathing moving each hemidiaphragm by up to a centimetre, heart size within
normal limits, 0-4 cm extra soft tissue, a tenfold range of detector dose.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Variation:
    roll_deg: float = 0.0        # in-plane rotation (about the beam axis)
    yaw_deg: float = 0.0         # rotation about the vertical axis (one shoulder forward)
    pitch_deg: float = 0.0       # rotation about the left-right axis (lordotic / kyphotic tilt)
    shift_mm: tuple = (0.0, 0.0)  # centring error (x, down)
    scale: float = 1.0           # magnification (field of view = FOV_MM / scale)
    fov_mm: float = 330.0
    diaphragm_mm: dict = field(default_factory=lambda: {"left": 0.0, "right": 0.0})  # + = lower
    diaphragm_local_mm: dict = field(default_factory=lambda: {"left": 0.0, "right": 0.0})
    # ^ a hemidiaphragm moved by local volume loss (atelectasis): only the lung base follows
    ctr: float = 0.46            # cardiothoracic ratio: normal < 0.5 (sets the heart's size)
    heart_scale: float = 1.0     # the heart's linear size relative to the CT's (set from ctr)
    lung_density: float = 1.0    # aeration: < 1 = more air (deep inspiration), > 1 = less
    bone_weight: float = 1.5     # bone attenuation relative to the CT's (beam energy)
    extra_tissue_mm: float = 0.0  # water-equivalent soft tissue added over the body
    deform: np.ndarray | None = None  # (2, 5, 5) control-point displacements in mm
    photons: float = 2e4         # detected quanta per mm^2 unattenuated (exposure)
    scatter: float = 0.2         # scatter-to-primary scale (with anti-scatter grid)
    psf_mm: float = 0.5          # detector blur (Gaussian sigma)
    unsharp: float = 0.9         # strength of the large-kernel edge enhancement (post-processing)
    unsharp_mm: float = 25.0
    detail: float = 0.5          # strength of the small-kernel (2.5 mm) detail enhancement
    window: tuple = (0.26, 0.9)  # grey levels of the lung fields and of the densest parts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deform"] = None if self.deform is None else np.round(self.deform, 3).tolist()
        return d


def draw_variation(rng: np.random.Generator) -> Variation:
    """One patient/positioning/exposure draw. The order of draws is fixed: changing it changes
    every seed's image, so append new draws at the end."""
    u = rng.uniform
    common = u(-8, 8)
    return Variation(
        roll_deg=float(rng.normal(0, 1.2)),
        yaw_deg=float(rng.normal(0, 2.0)),
        pitch_deg=float(rng.normal(0, 2.0)),
        shift_mm=(float(rng.normal(0, 6)), float(rng.normal(0, 6))),
        scale=float(u(0.94, 1.06)),
        fov_mm=330.0,
        diaphragm_mm={"left": float(common + rng.normal(0, 3)),
                      "right": float(common + rng.normal(0, 3))},
        ctr=float(u(0.42, 0.495)),
        lung_density=float(u(0.9, 1.1)),
        bone_weight=float(u(1.4, 1.9)),
        extra_tissue_mm=float(u(0, 40)),
        deform=rng.normal(0, 1.5, size=(2, 5, 5)),
        photons=float(np.exp(u(np.log(3e4), np.log(3e5)))),
        scatter=float(u(0.1, 0.3)),
        psf_mm=float(u(0.35, 0.7)),
        unsharp=float(u(0.5, 1.3)),
        unsharp_mm=float(u(15, 35)),
        detail=float(u(0.3, 0.9)),
        window=(float(u(0.2, 0.32)), float(u(0.86, 0.95))),
    )


def ap_view(var: Variation, rng: np.random.Generator) -> None:
    """Turn a PA draw into an AP (portable, often supine) film: the heart lies far from the
    detector and is magnified (cardiothoracic ratio ~0.05-0.1 larger), the patient leans back
    (lordotic tilt), breathes less deeply, and the exposure is lower with more scatter (no grid).
    Drawn from its own generator so the PA draw of the same seed is unchanged."""
    var.ctr = float(min(var.ctr + rng.uniform(0.04, 0.1), 0.62))
    var.pitch_deg = float(var.pitch_deg + rng.uniform(3, 10))
    var.diaphragm_mm = {k: float(v - rng.uniform(5, 15)) for k, v in var.diaphragm_mm.items()}
    var.lung_density = float(var.lung_density * rng.uniform(1.0, 1.1))
    var.photons = float(var.photons * rng.uniform(0.4, 1.0))
    var.scatter = float(min(var.scatter * rng.uniform(1.3, 2.0), 0.6))
