"""Findings inserted in 3D at sites taken from the CT's label map, each with a severity.

Every insert is a change of attenuation in 3D (a delta volume on the 2 mm coarse grid, or an
analytic shape), projected per depth slab onto the plane grid and added to the soft-tissue slabs
before the pose is applied, so it moves, rotates and breathes with the anatomy around it. Some
findings change the patient instead (heart size, diaphragm height, aeration). Each insert also
yields the map its mask is cut from, so box and mask are in the rendered image's pixels.

Densities (relative to water): aerated lung ~0.15, fluid/consolidated lung ~1.0, soft-tissue
nodule ~1.0, calcified granuloma ~4 (dense calcium as seen at chest-film energies; a fixed value,
not scaled with the image's bone weight), catheter ~6 (radiopaque stripe).

What is not simulated (not honest at this fidelity): air bronchograms, fissural fluid, mediastinal
shift, degenerative spine changes, fractures, scoliosis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import CxrError
from .ct import COARSE_MM, LOBES, LUNG_REF, MU_WATER, N_SLABS, SID_MM, Anatomy
from .spec import KINDS, FindingSpec

H = COARSE_MM
# dense calcification (~1500 HU) weighted as bone is at chest-film energies, less the lung it
# replaces, in 1/mm
CALCIUM = 4.0 * MU_WATER

# cardiothoracic ratio per cardiomegaly severity (Open-i words)
CTR_RANGE = {"borderline": (0.505, 0.53), "mild": (0.53, 0.58), "moderate": (0.58, 0.64),
             "severe": (0.64, 0.72)}
SEVERITY_ALIASES = {"minimal": "mild", "small": "mild", "slight": "mild", "large": "severe",
                    "massive": "severe", "marked": "severe", "extensive": "severe",
                    "significant": "moderate", "mild to moderate": "moderate"}


def add_patch(dst: np.ndarray, r0: int, c0: int, patch: np.ndarray) -> None:
    """dst[r0:, c0:] += patch, clipped to dst (a finding's projected patch may cross the edge)."""
    h, w = patch.shape
    R0, C0 = max(r0, 0), max(c0, 0)
    R1, C1 = min(r0 + h, dst.shape[0]), min(c0 + w, dst.shape[1])
    if R1 > R0 and C1 > C0:
        dst[R0:R1, C0:C1] += patch[R0 - r0:R1 - r0, C0 - c0:C1 - c0]


@dataclass
class Insert:
    """One finding as rendered: additive slab patches and how to cut its mask."""

    kind: str
    label: str
    patches: list = field(default_factory=list)   # (slab, row0, col0, 2D line-integral patch)
    mask_from: str = "delta"                      # "delta" | "heart" | "lungs"
    slab: int = N_SLABS // 2                      # depth slab whose pose the mask follows
    rigid: bool = False
    mask_rel: float = 0.15                        # mask = map > mask_rel * max(map)
    info: dict = field(default_factory=dict)
    mask_patches: list | None = None              # when the mask is not the whole delta
    fills_lung: bool = False                      # fluid/consolidation replacing aerated lung

    def plane_map(self, g) -> np.ndarray:
        out = np.zeros((g.height, g.width), np.float32)
        for _, r0, c0, p in (self.patches if self.mask_patches is None else self.mask_patches):
            add_patch(out, r0, c0, np.abs(p))
        return out

    def to_mask(self, m: np.ndarray) -> np.ndarray:
        peak = float(m.max()) if m.size else 0.0
        if peak <= 0:
            return np.zeros(m.shape, bool)
        # thickness maps (heart, lungs) are in mm: count a pixel once 5 mm of organ is in the path
        thr = self.mask_rel * peak if self.mask_from == "delta" else 5.0
        return m > thr


class Sites:
    """Anatomy lookups and 3D -> plane projection for the inserts of one rendering."""

    _memo: dict = {}

    def __init__(self, anatomy: Anatomy, layout):
        self.a = anatomy
        self.lay = layout
        self.g = layout.grid
        self.edges = anatomy.slab_edges
        ymid = 0.5 * (self.edges[:-1] + self.edges[1:])
        if layout.geometry == "cone":
            self.mag = (SID_MM - (layout.det_y - layout.yc)) / (SID_MM - (layout.det_y - ymid))
        else:
            self.mag = np.ones(N_SLABS)

    # -- anatomy
    def region(self, side: str, site: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(origin index, cropped bool mask) of the lung region a site word names, on one side."""
        key = (self.a.key, side, site)
        if key not in self._memo:
            self._memo[key] = self._region(side, site)
        return self._memo[key]

    def _region(self, side, site):
        s = (site or "lung").lower()
        lobe = None
        if "upper" in s:
            lobe = "upper"
        elif "middle" in s or "lingul" in s:
            lobe = "middle" if side == "right" else "upper"
        elif "lower" in s:
            lobe = "lower"
        names = [LOBES[(side, lobe)]] if lobe and (side, lobe) in LOBES else self.a.lobe_names(side)
        ids = self.a.ids(*names)
        lab = np.asarray(self.a.labels)
        full = np.isin(lab, ids)
        if not full.any():
            raise CxrError(f"the label map has no {side} lung for site {site!r}")
        lo, hi = _bounds(full)
        lo = [max(0, v - 3) for v in lo]
        hi = [min(n, v + 3) for v, n in zip(hi, full.shape)]
        m = full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
        # the label map's lungs stop a voxel or two short of the aerated tissue; fill that rim
        # too, or a finding leaves a thin shell of air that shows as a dark line
        mu = _crop(self.a.mu, lo, m.shape)
        m |= ndimage.binary_dilation(m, iterations=2) & (mu < 0.6 * MU_WATER)
        m &= ~np.isin(lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
                      [i for i in self.a.ids(*LOBES.values()) if i not in ids])
        zs = (np.arange(m.shape[2]) + lo[2]) * H
        z0, z1 = zs[m.any(axis=(0, 1))][[0, -1]]
        if "lingul" in s and side == "left":
            m &= (zs < z0 + 0.45 * (z1 - z0))[None, None, :]
            ys = (np.arange(m.shape[1]) + lo[1]) * H
            m &= (ys > np.median(ys[m.any(axis=(0, 2))]))[None, :, None]
        elif "base" in s:
            m &= (zs < z0 + 0.4 * (z1 - z0))[None, None, :]
        elif "apex" in s or "apical" in s:
            m &= (zs > z1 - 0.25 * (z1 - z0))[None, None, :]
        elif "hil" in s:
            xs = (np.arange(m.shape[0]) + lo[0]) * H
            hx = self.a.info["heart_centroid"][0]
            mid = 0.5 * (z0 + z1)
            near = np.abs(xs - hx)[:, None] ** 2 + 0 * zs[None, :]
            m &= ((np.abs(zs - (mid + 20))[None, :] < 45) &
                  (near < (np.abs(xs - hx).min() + 60) ** 2))[:, None, :]
        if not m.any():
            raise CxrError(f"no lung tissue at site {site!r} on the {side}")
        return np.array(lo), m

    def lung(self, side: str):
        return self.region(side, None)

    def crop(self, name: str, origin, shape, step: int = 1) -> np.ndarray:
        """float32 crop (every `step`-th voxel of the box `shape` at `origin`) of a coarse
        volume ("mu" or "lung_depth"), memoised: the same sites are cropped image after image."""
        key = (self.a.key, name, tuple(int(v) for v in origin), tuple(shape), step)
        if key not in self._memo:
            vol = getattr(self.a, name)
            self._memo[key] = np.asarray(
                vol[origin[0]:origin[0] + shape[0]:step, origin[1]:origin[1] + shape[1]:step,
                    origin[2]:origin[2] + shape[2]:step], np.float32)
        return self._memo[key]

    # -- projection
    def slab_of(self, y_mm: float) -> int:
        return int(np.clip(np.searchsorted(self.edges, y_mm) - 1, 0, N_SLABS - 1))

    def project(self, origin: np.ndarray, dv: np.ndarray, step: int = 1) -> list:
        """Patches (slab, row0, col0, patch) of a delta volume `dv` (1/mm) whose first voxel is
        at coarse index `origin`, its voxels `step` coarse voxels apart."""
        g = self.g
        cx, cz = self.lay.centre
        out = []
        Hs = H * step
        ys = origin[1] * H + np.arange(dv.shape[1]) * Hs
        for s in range(N_SLABS):
            sel = (ys >= self.edges[s]) & (ys < self.edges[s + 1])
            if not sel.any():
                continue
            P = dv[:, sel, :].sum(axis=1) * Hs
            if not P.any():
                continue
            M = self.mag[s]
            x_lo, x_hi = origin[0] * H, origin[0] * H + (dv.shape[0] - 1) * Hs
            z_lo, z_hi = origin[2] * H, origin[2] * H + (dv.shape[2] - 1) * Hs
            c0 = int(np.floor((cx + (x_lo - cx) * M - g.x0) / g.pixel))
            c1 = int(np.ceil((cx + (x_hi - cx) * M - g.x0) / g.pixel)) + 1
            r0 = int(np.floor((g.z0 - (cz + (z_hi - cz) * M)) / g.pixel))
            r1 = int(np.ceil((g.z0 - (cz + (z_lo - cz) * M)) / g.pixel)) + 1
            xd = g.x0 + np.arange(c0, c1) * g.pixel
            zd = g.z0 - np.arange(r0, r1) * g.pixel
            ai = ((cx + (xd - cx) / M) - origin[0] * H) / Hs
            ci = ((cz + (zd - cz) / M) - origin[2] * H) / Hs
            cc, aa = np.meshgrid(ci, ai, indexing="ij")
            patch = ndimage.map_coordinates(P.astype(np.float32), [aa, cc], order=1, cval=0.0)
            out.append((s, r0, c0, patch.astype(np.float32)))
        return out

    def spheres(self, centres: list, radii: list, dmu: float) -> list:
        """Analytic projection of a union of spheres (mm) of excess attenuation `dmu` (1/mm):
        the chord through the union is taken as the longest chord of any one sphere."""
        g = self.g
        cx, cz = self.lay.centre
        s = self.slab_of(centres[0][1])
        M = self.mag[s]
        pts = [(cx + (c[0] - cx) * M, cz + (c[2] - cz) * M, r * M) for c, r in zip(centres, radii)]
        x_lo = min(p[0] - p[2] for p in pts) - 2 * g.pixel
        x_hi = max(p[0] + p[2] for p in pts) + 2 * g.pixel
        z_lo = min(p[1] - p[2] for p in pts) - 2 * g.pixel
        z_hi = max(p[1] + p[2] for p in pts) + 2 * g.pixel
        c0, c1 = int((x_lo - g.x0) // g.pixel), int((x_hi - g.x0) // g.pixel) + 2
        r0, r1 = int((g.z0 - z_hi) // g.pixel), int((g.z0 - z_lo) // g.pixel) + 2
        xs = g.x0 + np.arange(c0, c1) * g.pixel
        zs = g.z0 - np.arange(r0, r1) * g.pixel
        chord = np.zeros((len(zs), len(xs)), np.float32)
        # supersample 3x3 inside each pixel so a 3 mm granuloma is not a single aliased dot
        offs = (np.arange(3) - 1) / 3.0 * g.pixel
        for ox in offs:
            for oz in offs:
                best = np.zeros_like(chord)
                for px, pz, r in pts:
                    d2 = (xs[None, :] + ox - px) ** 2 + (zs[:, None] + oz - pz) ** 2
                    best = np.maximum(best, 2 * np.sqrt(np.maximum(r * r - d2, 0)) / M)
                chord += best / 9.0
        return [(s, r0, c0, chord * dmu)]

    def tube(self, pts_mm: np.ndarray, radius: float, dmu: float) -> list:
        """Analytic projection of a tube (catheter) along a 3D polyline."""
        g = self.g
        cx, cz = self.lay.centre
        s = self.slab_of(float(np.median(pts_mm[:, 1])))
        M = self.mag[s]
        P = np.stack([cx + (pts_mm[:, 0] - cx) * M, cz + (pts_mm[:, 2] - cz) * M], axis=1)
        r = radius * M
        lo = P.min(axis=0) - r - 2 * g.pixel
        hi = P.max(axis=0) + r + 2 * g.pixel
        c0, c1 = int((lo[0] - g.x0) // g.pixel), int((hi[0] - g.x0) // g.pixel) + 2
        r0, r1 = int((g.z0 - hi[1]) // g.pixel), int((g.z0 - lo[1]) // g.pixel) + 2
        X, Z = np.meshgrid(g.x0 + np.arange(c0, c1) * g.pixel, g.z0 - np.arange(r0, r1) * g.pixel)
        acc = np.zeros(X.shape, np.float32)
        offs = (np.arange(3) - 1) / 3.0 * g.pixel
        for ox in offs:
            for oz in offs:
                d2 = np.full(X.shape, np.inf)
                for a, b in zip(P[:-1], P[1:]):
                    ab = b - a
                    t = np.clip(((X + ox - a[0]) * ab[0] + (Z + oz - a[1]) * ab[1]) /
                                max(ab @ ab, 1e-9), 0, 1)
                    d2 = np.minimum(d2, (X + ox - a[0] - t * ab[0]) ** 2 +
                                    (Z + oz - a[1] - t * ab[1]) ** 2)
                # a tube seen from the side: chord through a cylinder, plus its wall
                acc += 2 * np.sqrt(np.maximum(r * r - d2, 0)) / 9.0
        return [(s, r0, c0, acc * dmu / M)]


def _bounds(mask):
    idx = [np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    return [int(i.min()) for i in idx], [int(i.max()) + 1 for i in idx]


SIZE_WORDS = {"mild": "small", "minimal": "small", "trace": "small", "tiny": "small",
              "severe": "large", "massive": "large", "extensive": "large", "marked": "large",
              "significant": "moderate", "mild to moderate": "moderate"}


def _severity(spec: FindingSpec, choices: tuple, rng) -> str:
    """The spec's severity as one of `choices` (Open-i synonyms mapped), else a random one."""
    s = " ".join((spec.severity or "").strip().lower().split())
    if s in choices:
        return s
    for table in ((SIZE_WORDS,) if "small" in choices else (SEVERITY_ALIASES,)):
        if table.get(s) in choices:
            return table[s]
    return str(rng.choice(choices))


def _sides(spec: FindingSpec, rng) -> list[str]:
    s = (spec.side or "").strip().lower()
    if s == "bilateral":
        return ["right", "left"]
    if s in ("left", "right"):
        return [s]
    return [str(rng.choice(["right", "left"]))]


def _pick(mask: np.ndarray, rng, weights: np.ndarray | None = None) -> np.ndarray:
    idx = np.flatnonzero(mask)
    if not len(idx):
        raise CxrError("no place for the finding at that site")
    p = None
    if weights is not None:
        w = weights.ravel()[idx].astype(np.float64)
        p = w / w.sum() if w.sum() > 0 else None
    return np.array(np.unravel_index(idx[rng.choice(len(idx), p=p)], mask.shape))


def _crop(arr, origin, shape):
    return np.asarray(arr[origin[0]:origin[0] + shape[0], origin[1]:origin[1] + shape[1],
                          origin[2]:origin[2] + shape[2]], dtype=np.float32)


def _smooth_noise(shape, rng, cell_vox: float = 5.0) -> np.ndarray:
    """A smooth random field (unit variance, ~cell_vox voxel correlation) of `shape`: random
    values on a coarse lattice, interpolated linearly along each axis in turn."""
    small = [max(2, int(math.ceil(n / cell_vox)) + 1) for n in shape]
    f = rng.standard_normal(small).astype(np.float32)
    for axis, (n, k) in enumerate(zip(shape, small)):
        x = np.linspace(0, k - 1, n)
        i0 = np.minimum(x.astype(int), k - 2)
        t = (x - i0).astype(np.float32)
        a, b = np.take(f, i0, axis=axis), np.take(f, i0 + 1, axis=axis)
        sh = [1] * 3
        sh[axis] = n
        f = a + (b - a) * t.reshape(sh)
    return (f - f.mean()) / (f.std() + 1e-6)


# ---------------------------------------------------------------------- the kinds


def _cardiomegaly(spec, rng, var, sites, ins):
    sev = _severity(spec, tuple(CTR_RANGE), rng)
    target = float(rng.uniform(*CTR_RANGE[sev]))
    var.ctr = target
    ins.mask_from = "heart"
    ins.info.update(severity=sev, ctr=round(target, 4))


def _effusion(spec, rng, var, sites, ins):
    """Free fluid in the upright patient: it fills the pleural space from the costophrenic recess
    up to a level, and above it coats the lung with a layer that thins with height. Seen PA, the
    layer is tangential at the lateral chest wall, which draws the meniscus (higher laterally,
    concave upward) with no drawing of it."""
    sev = _severity(spec, ("small", "moderate", "large"), rng)
    sides = _sides(spec, rng)
    a = sites.a
    for side in sides:
        origin, m = sites.lung(side)
        cp = _costophrenic_z(origin, m, side)
        level = cp + {"small": rng.uniform(6, 20), "moderate": rng.uniform(35, 60),
                      "large": rng.uniform(85, 130)}[sev]
        lam = {"small": 10.0, "moderate": 15.0, "large": 20.0}[sev] * rng.uniform(0.8, 1.25)
        zs = (np.arange(m.shape[2]) + origin[2]) * H
        top = int(np.searchsorted(zs, level + 6 * lam)) + 1   # the layer is < 0.1 mm above
        top = min(top, m.shape[2])
        zs = zs[:top]
        depth = sites.crop("lung_depth", origin, m.shape)[:, :, :top]
        mu = sites.crop("mu", origin, m.shape)[:, :, :top]
        m = m[:, :, :top]
        layer = np.where(zs < level, 1e3, 40.0 * np.exp(-(zs - level) / lam)).astype(np.float32)
        fluid = m & (depth < layer[None, None, :])
        dv = np.where(fluid, 1.02 * MU_WATER - mu, 0).astype(np.float32)
        ins.patches += sites.project(origin, dv)
        ins.info.setdefault("level_mm_above_costophrenic_angle", {})[side] = round(level - cp, 1)
    ins.slab = N_SLABS // 2
    ins.mask_rel = 0.12
    ins.info.update(severity=sev, side="bilateral" if len(sides) == 2 else sides[0])


def _costophrenic_z(origin, m, side) -> float:
    """Height (mm) of the lateral costophrenic angle: the lowest lung in the outer quarter."""
    xs = np.nonzero(m.any(axis=(1, 2)))[0]
    x0, x1 = xs[0], xs[-1]
    outer = slice(x0 + int(0.75 * (x1 - x0)), x1 + 1) if side == "left" else \
        slice(x0, x0 + int(0.25 * (x1 - x0)) + 1)
    zs = np.nonzero(m[outer].any(axis=(0, 1)))[0]
    return float((zs[0] + origin[2]) * H)


AIRSPACE = {  # kind -> severity -> (density as fraction of fluid, extent as fraction of the site)
    "opacity": {"mild": (0.3, 0.35), "moderate": (0.5, 0.55), "severe": (0.75, 0.8)},
    "density": {"mild": (0.3, 0.3), "moderate": (0.45, 0.45), "severe": (0.7, 0.7)},
    "infiltrate": {"mild": (0.3, 0.4), "moderate": (0.45, 0.6), "severe": (0.7, 0.8)},
    "airspace_disease": {"mild": (0.35, 0.4), "moderate": (0.55, 0.6), "severe": (0.8, 0.85)},
    "consolidation": {"mild": (0.65, 0.5), "moderate": (0.8, 0.7), "severe": (0.95, 0.9)},
}


def _airspace(spec, rng, var, sites, ins):
    """Patchy (opacity, airspace disease) or confluent (consolidation) filling of the airspaces
    of a lobe or zone: a smooth random field, biased toward a seed point, thresholded to the
    extent, raising lung toward water density by the severity's fraction. Built on a 4 mm grid
    (the shapes are smooth at that scale)."""
    sev = _severity(spec, ("mild", "moderate", "severe"), rng)
    density, extent = AIRSPACE[spec.kind][sev]
    sides = _sides(spec, rng)
    site = spec.site or str(rng.choice(["upper lobe", "lower lobe", "base", "middle lobe"]))
    for side in sides:
        origin, m_full = sites.region(side, site)
        m = m_full[::2, ::2, ::2]
        mu = sites.crop("mu", origin, m_full.shape, step=2)
        noise = _smooth_noise(m.shape, rng, cell_vox=3.0 if spec.kind != "consolidation" else 5.0)
        c = _pick(m, rng)
        grid = np.ogrid[tuple(slice(0, n) for n in m.shape)]
        dist = np.sqrt(sum(((gi - ci) / max(m.shape)) ** 2 for gi, ci in zip(grid, c)))
        field_ = noise - 1.5 * dist
        vals = field_[m]
        thr = np.partition(vals, int((1 - extent) * (len(vals) - 1)))[int((1 - extent) * (len(vals) - 1))]
        w = np.clip((field_ - thr) / 0.4, 0, 1) * m
        dv = np.maximum(density * w * (MU_WATER - mu), 0).astype(np.float32)
        ins.patches += sites.project(origin, dv, step=2)
        ins.slab = sites.slab_of((origin[1] + 2 * c[1]) * H)
    ins.mask_rel = 0.2
    ins.info.update(severity=sev, site=site, side="bilateral" if len(sides) == 2 else sides[0])


def _nodular(spec, rng, var, sites, ins):
    kind = spec.kind
    side = _sides(spec, rng)[0] if (spec.side or "").lower() != "bilateral" else "right"
    site = spec.site or str(rng.choice(["upper lobe", "lower lobe", "middle lobe"]))
    default = {"nodule": (7, 25), "mass": (32, 60), "granuloma": (2.5, 6)}[kind]
    size = float(spec.size_mm) if spec.size_mm else float(rng.uniform(*default))
    r = size / 2
    origin, m = sites.region(side, site)
    depth = sites.crop("lung_depth", origin, m.shape)
    room = m & (depth >= min(r + 2, 0.8 * float(depth.max())))
    c = (_pick(room if room.any() else m, rng) + origin) * H
    if kind == "mass":
        centres, radii = [c], [r]
        for _ in range(3):
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
            centres.append(c + d * r * 0.45)
            radii.append(r * rng.uniform(0.5, 0.7))
        dmu = (1.0 - LUNG_REF) * MU_WATER
    elif kind == "granuloma":
        centres, radii, dmu = [c], [r], CALCIUM
    else:
        centres, radii, dmu = [c], [r], (1.0 - LUNG_REF) * MU_WATER
    ins.patches += sites.spheres(centres, radii, dmu)
    ins.slab = sites.slab_of(c[1])
    ins.mask_rel = 0.2
    ins.info.update(side=side, site=site, size_mm=round(size, 1),
                    centre_mm=[round(float(v), 1) for v in c])


def _atelectasis(spec, rng, var, sites, ins):
    sev = _severity(spec, ("mild", "moderate", "severe"), rng)
    sides = _sides(spec, rng)
    for side in sides:
        origin, m = sites.region(side, spec.site or "lower lobe")
        dome = sites.a.info["domes"][side]
        zs = (np.arange(m.shape[2]) + origin[2]) * H
        depth = sites.crop("lung_depth", origin, m.shape)
        band_z = (zs > dome + 8) & (zs < dome + 55)
        cand = m & band_z[None, None, :] & (depth > 6)
        c = _pick(cand if cand.any() else m, rng)
        thick = {"mild": 4.0, "moderate": 7.0, "severe": 11.0}[sev]
        tilt = math.radians(rng.uniform(-15, 15))
        n = np.array([math.sin(tilt), 0.15 * rng.standard_normal(), math.cos(tilt)])
        n /= np.linalg.norm(n)
        g = np.ogrid[tuple(slice(0, k) for k in m.shape)]
        d = [((g[i] - c[i]) * H).astype(np.float32) for i in range(3)]
        off = d[0] * n[0] + d[1] * n[1] + d[2] * n[2]
        rx, ry = rng.uniform(30, 55), rng.uniform(25, 45)
        ell = (d[0] / rx) ** 2 + (d[1] / ry) ** 2
        w = np.clip(1 - np.abs(off) / (thick / 2), 0, 1) * np.clip((1 - ell) * 3, 0, 1) * m
        mu = sites.crop("mu", origin, m.shape)
        dv = (0.95 * w * np.maximum(MU_WATER - mu, 0)).astype(np.float32)
        band = sites.project(origin, dv)
        ins.patches += band
        # the mask: the band and the base below it, where the volume loss shows
        below = (m & (zs < (origin[2] + c[2]) * H + thick)[None, None, :]).astype(np.float32)
        peak = max(float(np.abs(p[3]).max()) for p in band)
        ins.mask_patches = (ins.mask_patches or []) + band + [
            (s_, r0, c0, p * (peak / max(float(p.max()), 1e-6)) * 0.5)
            for s_, r0, c0, p in sites.project(origin, below)]
        ins.slab = sites.slab_of((origin[1] + c[1]) * H)
        # volume loss: the hemidiaphragm rises
        var.diaphragm_local_mm[side] -= {"mild": 6.0, "moderate": 10.0, "severe": 15.0}[sev]
    ins.mask_rel = 0.2
    ins.info.update(severity=sev, side="bilateral" if len(sides) == 2 else sides[0],
                    site=spec.site or "base")


def _pneumothorax(spec, rng, var, sites, ins):
    """Air in the pleural space of the upright patient: the lung retracts toward the hilum,
    most from the apex and the lateral wall; the visceral pleura shows as a thin line with no
    lung markings beyond it; the collapsed lung is denser. The 3D work depends only on the side
    and the retraction (quantised to 0.02), so its projection is memoised per layout."""
    sev = _severity(spec, ("small", "moderate", "large"), rng)
    side = _sides(spec, rng)[0]
    f = {"small": rng.uniform(0.86, 0.9), "moderate": rng.uniform(0.76, 0.82),
         "large": rng.uniform(0.6, 0.68)}[sev]
    f = round(f / 0.02) * 0.02
    key = (sites.a.key, "pneumothorax", side, round(f, 2), sites.lay.geometry, sites.g.tag())
    if key not in sites._memo:
        if sum(1 for k in sites._memo if k[1] == "pneumothorax") > 48:
            for k in [k for k in sites._memo if k[1] == "pneumothorax"]:
                del sites._memo[k]
        sites._memo[key] = _pneumothorax_projection(sites, side, f)
    patches, mask_patches, vol = sites._memo[key]
    ins.patches += patches
    ins.mask_patches = mask_patches
    ins.slab = N_SLABS // 2
    ins.mask_rel = 0.25
    ins.info.update(severity=sev, side=side, lung_fraction=round(vol, 3))


def _pneumothorax_projection(sites, side: str, f: float):
    origin, m = sites.lung(side)
    xs = (np.arange(m.shape[0]) + origin[0]) * H
    cols = m.any(axis=(1, 2))
    medial_x = xs[cols][0] if side == "left" else xs[cols][-1]
    lateral_x = xs[cols][-1] if side == "left" else xs[cols][0]
    zs = (np.arange(m.shape[2]) + origin[2]) * H
    zz = zs[m.any(axis=(0, 1))]
    anchor = np.array([medial_x + 0.1 * (lateral_x - medial_x),      # the hilum
                       (origin[1] + m.shape[1] / 2) * H, zz[0] + 0.35 * (zz[-1] - zz[0])])
    g = np.indices(m.shape, dtype=np.float32)
    # upright: the lung falls away from the apex and the lateral wall toward the hilum, less so
    # from front and back, and stays on the diaphragm (no scaling below the anchor)
    fy = 1 - 0.5 * (1 - f)
    pos = [(g[i] + origin[i]) * H for i in range(3)]
    src_mm = [anchor[0] + (pos[0] - anchor[0]) / f, anchor[1] + (pos[1] - anchor[1]) / fy,
              np.where(pos[2] > anchor[2], anchor[2] + (pos[2] - anchor[2]) / f, pos[2])]
    idx = [np.rint(src_mm[i] / H - origin[i]).astype(np.intp) for i in range(3)]
    ok = np.ones(m.shape, bool)
    for i in range(3):
        ok &= (idx[i] >= 0) & (idx[i] < m.shape[i])
        np.clip(idx[i], 0, m.shape[i] - 1, out=idx[i])
    inside = ok & m[idx[0], idx[1], idx[2]]
    air = m & ~inside
    line = m & inside & ndimage.maximum_filter(air.view(np.uint8), size=3).astype(bool)
    mu = sites.crop("mu", origin, m.shape)
    dv = np.where(air, -mu, 0).astype(np.float32)
    dv += np.where(line, 0.9 * MU_WATER - mu, 0).astype(np.float32)
    # the collapsed lung holds the same tissue in less volume: denser (blood shunted away: 0.7)
    vol = max(float(inside[m].mean()), 0.05)
    dv += np.where(inside & m & ~line, 0.7 * (1 / vol - 1) * LUNG_REF * MU_WATER,
                   0).astype(np.float32)
    mask_dv = np.where(air, mu + 0.01 * MU_WATER, 0).astype(np.float32)
    return sites.project(origin, dv), sites.project(origin, mask_dv), vol


def _inflation(spec, rng, var, sites, ins):
    sev = _severity(spec, ("mild", "moderate", "severe"), rng)
    k = {"mild": 1.0, "moderate": 1.4, "severe": 1.8}[sev]
    if spec.kind == "hypoinflation":
        dz = -rng.uniform(16, 24) * k
        var.lung_density = max(var.lung_density, 1.0) * (1 + 0.1 * k)
    else:
        dz = rng.uniform(16, 24) * k
        var.lung_density = min(var.lung_density, 1.0) * (1 - 0.1 * k)
    for side in ("left", "right"):
        var.diaphragm_mm[side] = float(np.clip(var.diaphragm_mm[side], -4, 4) + dz)
    ins.mask_from = "lungs"
    ins.info.update(severity=sev, diaphragm_shift_mm=round(dz, 1))


def _catheter(spec, rng, var, sites, ins):
    """A central venous catheter: in through a subclavian vein, down the brachiocephalic vein
    and the superior vena cava, tip near the cavo-atrial junction."""
    a = sites.a
    side = (spec.side or "right").lower()
    side = side if side in ("left", "right") else "right"
    lab = a.labels

    def centroid_path(name: str, n: int) -> np.ndarray:
        ids = a.ids(name)
        m = np.isin(lab, ids)
        if not m.any():
            raise CxrError(f"the label map has no {name} to route a catheter")
        zs = np.nonzero(m.any(axis=(0, 1)))[0]
        pts = []
        for z in np.linspace(zs[-1], zs[0], n).round().astype(int):
            xi, yi = np.nonzero(m[:, :, z])
            if len(xi):
                pts.append([xi.mean() * H, yi.mean() * H, z * H])
        return np.array(pts)

    key = (a.key, "catheter", side)
    if key not in sites._memo:
        svc = centroid_path("superior_vena_cava", 6)
        bcv = centroid_path(f"brachiocephalic_vein_{side}", 4)
        xi, yi, zi = np.nonzero(np.isin(lab, a.ids(f"clavicula_{side}")))
        lateral = xi.max() if side == "left" else xi.min()
        medial = xi.min() if side == "left" else xi.max()
        xl = medial + 0.65 * (lateral - medial)
        sel = np.abs(xi - xl) < 3
        sites._memo[key] = (svc, bcv, np.array([xl * H, yi[sel].mean() * H,
                                                zi[sel].mean() * H - 12]))
    svc, bcv, start = sites._memo[key]
    outside = start + np.array([(1 if side == "left" else -1) * 35, 10, 25])
    tip = svc[-1] + np.array([0, 0, -rng.uniform(0, 15)])
    pts = np.vstack([outside, start, bcv[:2], svc[1:], tip])
    pts += rng.normal(0, 1.0, pts.shape) * np.array([1, 1, 1])
    ins.patches += sites.tube(pts, radius=1.2, dmu=6.0 * MU_WATER)
    ins.slab = sites.slab_of(float(np.median(svc[:, 1])))
    ins.mask_rel = 0.2
    ins.info.update(side=side, tip_mm=[round(float(v), 1) for v in tip])


def _elevated_diaphragm(spec, rng, var, sites, ins):
    """One hemidiaphragm higher than it should be (phrenic palsy, eventration, subpulmonic
    process): the lung base above it follows; the ribs do not."""
    sev = _severity(spec, ("mild", "moderate", "severe"), rng)
    side = _sides(spec, rng)[0] if (spec.side or "").lower() != "bilateral" else "right"
    rise = {"mild": 15.0, "moderate": 25.0, "severe": 38.0}[sev] * rng.uniform(0.85, 1.15)
    var.diaphragm_local_mm[side] -= rise
    origin, m = sites.lung(side)
    dome = sites.a.info["domes"][side]
    zs = (np.arange(m.shape[2]) + origin[2]) * H
    base = (m & (zs < dome + 50)[None, None, :]).astype(np.float32)
    ins.mask_patches = sites.project(origin, base)
    ins.mask_rel = 0.1
    ins.info.update(severity=sev, side=side, rise_mm=round(rise, 1))


def _emphysema(spec, rng, var, sites, ins):
    """Hyperinflated, hyperlucent lungs: low flat diaphragm, less parenchyma per volume."""
    sev = _severity(spec, ("mild", "moderate", "severe"), rng)
    k = {"mild": 1.0, "moderate": 1.4, "severe": 1.8}[sev]
    dz = rng.uniform(18, 26) * k
    for side in ("left", "right"):
        var.diaphragm_mm[side] = float(np.clip(var.diaphragm_mm[side], -4, 4) + dz)
    var.lung_density = min(var.lung_density, 1.0) * (1 - 0.18 * k)
    ins.mask_from = "lungs"
    ins.info.update(severity=sev, diaphragm_shift_mm=round(dz, 1))


def _aortic_calcinosis(spec, rng, var, sites, ins):
    """Curvilinear calcification in the wall of the aortic arch (the 'aortic knob')."""
    a = sites.a
    key = (a.key, "aortic_arch")
    if key not in sites._memo:
        aorta = np.isin(a.labels, a.ids("aorta"))
        lo, hi = _bounds(aorta)
        box = aorta[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        zs = (np.arange(box.shape[2]) + lo[2]) * H
        arch = box & (zs > zs[box.any(axis=(0, 1))].max() - 28)[None, None, :]
        wall = arch & ~ndimage.binary_erosion(arch, iterations=1)
        sites._memo[key] = (np.array(lo), wall)
    origin, wall = sites._memo[key]
    sev = _severity(spec, ("mild", "moderate", "severe"), rng)
    keep = _smooth_noise(wall.shape, rng, cell_vox=3.0) > {"mild": 0.9, "moderate": 0.4,
                                                             "severe": -0.2}[sev]
    xs = (np.arange(wall.shape[0]) + origin[0]) * H
    lateral = (xs > np.median(xs[wall.any(axis=(1, 2))]))[:, None, None]  # the knob: left wall
    dv = (wall & keep & lateral).astype(np.float32) * 1.6 * MU_WATER
    if not dv.any():
        dv = (wall & lateral).astype(np.float32) * 1.6 * MU_WATER
    ins.patches += sites.project(origin, dv)
    ins.slab = sites.slab_of(float((origin[1] + wall.shape[1] / 2) * H))
    ins.rigid = False
    ins.mask_rel = 0.15
    ins.info.update(severity=sev, site="aortic arch")


def _granulomatous(spec, rng, var, sites, ins):
    """Several calcified granulomas scattered through both lungs (healed granulomatous
    infection)."""
    n = int(rng.integers(3, 9))
    centres = []
    for side in ("right", "left"):
        origin, m = sites.lung(side)
        depth = sites.crop("lung_depth", origin, m.shape)
        for _ in range(n // 2 + (side == "right")):
            c = (_pick(m & (depth > 6), rng) + origin) * H
            centres.append(c)
            ins.patches += sites.spheres([c], [rng.uniform(1.5, 3.5)], CALCIUM)
    ins.mask_rel = 0.2
    ins.info.update(count=len(centres), side="bilateral")


# Findings beyond spec.KINDS that can be made honestly (Open-i headings); callers may use these
# kinds in FindingSpec too.
EXTRA_KINDS = {
    "density": "Density",
    "infiltrate": "Infiltrate",
    "diaphragm_elevated": "Diaphragm/elevated",
    "emphysema": "Pulmonary Emphysema",
    "aortic_calcinosis": "Calcinosis/aorta",
    "granulomatous_disease": "Granulomatous Disease",
}

FILLS_LUNG = {"effusion", "opacity", "airspace_disease", "consolidation", "density", "infiltrate",
              "atelectasis"}

HANDLERS = {
    "cardiomegaly": _cardiomegaly, "effusion": _effusion, "opacity": _airspace,
    "airspace_disease": _airspace, "consolidation": _airspace, "nodule": _nodular,
    "mass": _nodular, "granuloma": _nodular, "atelectasis": _atelectasis,
    "pneumothorax": _pneumothorax, "hypoinflation": _inflation, "hyperdistention": _inflation,
    "catheter": _catheter, "density": _airspace, "infiltrate": _airspace,
    "diaphragm_elevated": _elevated_diaphragm, "emphysema": _emphysema,
    "aortic_calcinosis": _aortic_calcinosis, "granulomatous_disease": _granulomatous,
}


def plan_findings(specs: list[FindingSpec], var, anatomy: Anatomy, layout, seed: int) -> list[Insert]:
    """The inserts for `specs` (in order), each drawn from its own random stream
    (seed, 2, index), so adding a finding never changes the rest of the image. May change `var`
    (heart size, diaphragm, aeration)."""
    sites = Sites(anatomy, layout)
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, FindingSpec):
            raise CxrError(f"finding {i} is not a FindingSpec: {spec!r}")
        handler = HANDLERS.get(spec.kind)
        if handler is None:
            raise CxrError(f"unknown finding kind {spec.kind!r}; known: {', '.join(HANDLERS)}")
        label = spec.term or KINDS.get(spec.kind) or EXTRA_KINDS.get(spec.kind, spec.kind)
        ins = Insert(kind=spec.kind, label=label, info={"kind": spec.kind, "term": label},
                     fills_lung=spec.kind in FILLS_LUNG)
        handler(spec, np.random.default_rng([int(seed), 2, i]), var, sites, ins)
        out.append(ins)
    return out
