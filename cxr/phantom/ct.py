"""The chest CT behind the phantom: find it, read it, turn Hounsfield units into X-ray attenuation,
and precompute (once, cached on disk as .npy keyed by the files' sha256) what every rendering needs.

Physics, and the approximations taken (all deliberate, for speed):
- Attenuation: mu = MU_WATER * (1 + HU/1000), the CT's own calibration (HU is linear in mu at the
  CT's ~70 keV effective energy). Bone is kept as a separate component (its excess over water) so a
  rendering can weight it up: a chest film at 100-125 kVp with ~50-60 keV effective energy sees
  calcium relatively denser than the CT does (photoelectric effect).
- The CT was taken with intravenous contrast. A plain film has none, so soft tissue above 40 HU
  that is not bone (enhanced blood pool, myocardium, kidneys, liver) is compressed to about blood
  density (40 + 0.05 * (HU - 40)).
- Everything outside the patient's body (the table, blankets) is replaced by air: the body is the
  largest connected component above -500 HU, holes filled slice by slice.
- Projection is linear in mu, so the volume is split into components (soft tissue, bone excess,
  lung parenchyma, heart excess over aerated lung) and, along the anterior-posterior axis, into a
  few depth slabs. Each (component, slab) is projected once; a rendering then only warps and sums
  2D maps: a small rotation about the vertical (or left-right) axis becomes a per-slab shift, and
  cone-beam magnification is applied per ~7 mm depth group at precompute time (the
  magnification varies by < 0.5 % within a group).
- A coarse (2 mm isotropic) copy of mu and of the labels, and the distance of every lung voxel to
  the lung surface, serve the 3D finding inserts (`findings.py`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import replacing, write_atomic
from ..errors import CxrError
from ..hashing import file_sha256 as sha256

MU_WATER = 0.02          # 1/mm, water at ~60-70 keV effective energy
LUNG_REF = 0.15          # mu of aerated lung relative to water (~ -850 HU)
COARSE_MM = 2.0          # voxel size of the coarse volumes used by the 3D finding inserts
N_SLABS = 6              # depth slabs along anterior-posterior
PRECOMPUTE_VERSION = 7   # bump when the precomputed arrays change meaning
STACK_VERSION = 2        # bump when only the layout resampling changes
SID_MM = 1800.0          # source-image distance of a PA chest film (72 in)

KEYS = {"ct": "phantom/chest_ct.nii.gz", "labels": "phantom/chest_ct_labels.nii.gz",
        "structures": "phantom/structures.csv"}

BONE_PREFIXES = ("vertebrae_", "rib_", "sternum", "costal_cartilages", "clavicula_", "scapula_",
                 "humerus_", "hip_", "femur_", "sacrum", "skull")
LOBES = {("left", "upper"): "lung_upper_lobe_left", ("left", "lower"): "lung_lower_lobe_left",
         ("right", "upper"): "lung_upper_lobe_right", ("right", "middle"): "lung_middle_lobe_right",
         ("right", "lower"): "lung_lower_lobe_right"}
HEART = ("heart", "atrial_appendage_left")
SUBDIAPHRAGM = ("liver", "spleen", "stomach")


def locate_file(which: str, path: str | Path | None = None) -> Path:
    """The CT ("ct"), label map ("labels") or structure table ("structures"): the user's `path`,
    else the data cache, else fetched once from its public home (see `cxr.fetch.locate`)."""
    from ..fetch import locate

    return locate(KEYS[which], path)


def cache_root() -> Path:
    """Where derived arrays go: `$CXR_CACHE_DIR`, else `~/.cache/cxr/derived` (the user cache;
    never the data folder, which may be shared and read-only); a temp folder if neither is
    writable."""
    env = os.environ.get("CXR_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "cxr" / "derived"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    root = Path(tempfile.gettempdir()) / "cxr-derived"
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_structures(path: Path) -> dict[str, int]:
    """structure name -> label id, from the `structures.csv` that ships with the label map."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {r["structure"].strip(): int(r["id"]) for r in rows}
    except (OSError, KeyError, ValueError, csv.Error) as e:
        raise CxrError(f"cannot read the structure table (need columns structure,id): {e}", path)


def read_volume(path: Path, what: str):
    """A NIfTI volume as an array in LAS orientation (axis 0 -> patient left, 1 -> anterior,
    2 -> superior) and its voxel size in mm."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)  # RAS
        raw = img.dataobj
        slope = getattr(raw, "slope", 1.0)
        data = np.asarray(raw, dtype=np.float32 if (what == "CT" or slope != 1.0) else None)
        if what != "CT":
            data = data.astype(np.uint8, copy=False)
    except Exception as e:  # nibabel raises many types for bad files
        raise CxrError(f"cannot read the {what} as NIfTI: {e}", path)
    if data.ndim != 3:
        raise CxrError(f"the {what} must be a 3D volume, got shape {data.shape}", path)
    data = data[::-1]  # RAS -> LAS: axis 0 runs toward the patient's left
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.ascontiguousarray(data), zooms


@dataclass
class Anatomy:
    """What is known about the CT, in its own frame: x (mm, toward the patient's left, = image
    column), y (mm, toward anterior, = depth), z (mm, toward superior). Coarse volumes are indexed
    [x, y, z] at COARSE_MM from the origin (0, 0, 0) = centre of the CT's first voxel."""

    key: str
    spacing: tuple[float, float, float]
    extent: tuple[float, float, float]          # mm covered along x, y, z
    structures: dict[str, int]
    mu: np.ndarray                              # coarse attenuation (1/mm), float32
    labels: np.ndarray                          # coarse labels, uint8
    lung_depth: np.ndarray                      # coarse: mm from each lung voxel to the lung surface
    slab_edges: np.ndarray                      # y (mm) edges of the N_SLABS depth slabs
    info: dict                                  # body centre, diaphragm domes, heart, lungs (mm)

    def ids(self, *names: str) -> list[int]:
        return [self.structures[n] for n in names if n in self.structures]

    def mask(self, *names: str) -> np.ndarray:
        return np.isin(self.labels, self.ids(*names))

    def lobe_names(self, side: str) -> list[str]:
        return [v for (s, _), v in LOBES.items() if s == side]


def _hu_to_components(hu: np.ndarray, labels: np.ndarray, structures: dict[str, int]):
    """Full-resolution attenuation components: soft (everything as water-equivalent tissue,
    including lung), bone (the excess of bone over water), lung (parenchyma only) and heart
    (heart minus aerated lung). Returns float32 arrays in 1/mm and the body mask."""
    bone_ids = [i for n, i in structures.items() if n.startswith(BONE_PREFIXES)]
    bone = np.isin(labels, bone_ids)
    bone = _dilate(bone, (3, 3, 1))
    body = hu > -500
    lab, n = ndimage.label(body)
    if n == 0:
        raise CxrError("the CT holds no tissue above -500 HU")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    del lab
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    hu = np.where(body, hu, -1000.0).astype(np.float32)
    enhanced = (~bone) & (hu > 40)
    hu[enhanced] = 40 + 0.05 * (hu[enhanced] - 40)
    mu = np.maximum(0.0, 1.0 + hu / 1000.0) * MU_WATER
    bone_excess = np.where(bone, np.maximum(hu, 0) / 1000.0 * MU_WATER, 0).astype(np.float32)
    soft = (mu - bone_excess).astype(np.float32)
    lung_ids = [structures[v] for v in LOBES.values() if v in structures]
    lung = np.where(np.isin(labels, lung_ids), mu, 0).astype(np.float32)
    # the cardiac silhouette: heart plus the pericardium and epicardial fat around it (a few mm
    # of soft tissue that is neither lung nor bone), so a resized heart carries its rim along
    heart_ids = [structures[n] for n in HEART if n in structures]
    heart_m = np.isin(labels, heart_ids)
    rim = _dilate(heart_m, (9, 9, 3))
    heart_m |= rim & ~np.isin(labels, lung_ids) & ~bone & (hu > -200)
    heart = np.where(heart_m, mu - LUNG_REF * MU_WATER, 0).astype(np.float32)
    return {"soft": soft, "bone": bone_excess, "lung": lung, "heart": heart}, mu.astype(np.float32), body


def _dilate(mask: np.ndarray, size: tuple) -> np.ndarray:
    """Binary dilation by a box, as a separable maximum filter on the mask's bounding box."""
    if not mask.any():
        return mask
    idx = [np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    sl = tuple(slice(max(0, i.min() - k), i.max() + k + 1) for i, k in zip(idx, size))
    out = np.zeros_like(mask)
    out[sl] = ndimage.maximum_filter(mask[sl].view(np.uint8), size=size).astype(bool)
    return out


def _coarse(vol: np.ndarray, spacing, order: int) -> np.ndarray:
    n = [int(np.floor((s - 1) * sp / COARSE_MM)) + 1 for s, sp in zip(vol.shape, spacing)]
    coords = np.meshgrid(*[np.arange(k) * COARSE_MM / sp for k, sp in zip(n, spacing)],
                         indexing="ij", sparse=True)
    coords = [np.broadcast_to(c, n) for c in coords]
    return ndimage.map_coordinates(vol, coords, order=order, mode="nearest",
                                   output=vol.dtype if order == 0 else np.float32)


class CtSource:
    """The three input files, their content key, and the on-disk cache of derived arrays."""

    def __init__(self, ct=None, labels=None, structures=None):
        self.paths = {"ct": locate_file("ct", ct), "labels": locate_file("labels", labels),
                      "structures": locate_file("structures", structures)}
        digest = hashlib.sha256()
        for k in ("ct", "labels", "structures"):
            digest.update(_cached_sha(self.paths[k]).encode())
        self.key = f"{digest.hexdigest()[:20]}-v{PRECOMPUTE_VERSION}"
        self.dir = cache_root() / "phantom" / self.key
        self._full = None

    # -- full-resolution data, only touched when something is not cached yet
    def full(self):
        if self._full is None:
            structures = read_structures(self.paths["structures"])
            hu, spacing = read_volume(self.paths["ct"], "CT")
            labels, lspacing = read_volume(self.paths["labels"], "label map")
            if labels.shape != hu.shape:
                raise CxrError(f"label map shape {labels.shape} differs from the CT's {hu.shape}",
                               self.paths["labels"])
            comps, mu, body = _hu_to_components(hu.astype(np.float32), labels.astype(np.uint8),
                                                structures)
            self._full = dict(structures=structures, spacing=spacing, labels=labels.astype(np.uint8),
                              comps=comps, mu=mu, body=body)
        return self._full

    def anatomy(self) -> Anatomy:
        files = {n: self.dir / f"{n}.npy" for n in ("mu", "labels", "lung_depth")}
        meta_path = self.dir / "anatomy.json"
        if not (meta_path.is_file() and (self.dir / "groups.npz").is_file()
                and all(p.is_file() for p in files.values())):
            self._build_anatomy(files, meta_path)
        meta = json.loads(meta_path.read_text())
        arrays = {n: np.load(p, mmap_mode="r") for n, p in files.items()}
        return Anatomy(key=self.key, spacing=tuple(meta["spacing"]), extent=tuple(meta["extent"]),
                       structures=meta["structures"], mu=arrays["mu"], labels=arrays["labels"],
                       lung_depth=arrays["lung_depth"], slab_edges=np.array(meta["slab_edges"]),
                       info=meta["info"])

    def _build_anatomy(self, files, meta_path):
        full = self.full()
        sp = full["spacing"]
        structures = full["structures"]
        mu = _coarse(full["mu"], sp, 1).astype(np.float32)
        labels = _coarse(full["labels"], sp, 0).astype(np.uint8)
        lung_ids = [structures[v] for v in LOBES.values() if v in structures]
        lung = np.isin(labels, lung_ids)
        depth = np.zeros(labels.shape, np.float32)
        lungs = {}
        for side in ("left", "right"):
            ids = [structures[v] for (s, _), v in LOBES.items() if s == side and v in structures]
            m = np.isin(labels, ids)
            if m.sum() < 100:
                raise CxrError(f"the label map has no {side} lung", self.paths["labels"])
            sl = tuple(slice(max(0, int(i.min()) - 2), int(i.max()) + 3) for i in np.nonzero(m))
            depth[sl] = np.where(m[sl], ndimage.distance_transform_edt(m[sl]) * COARSE_MM,
                                 depth[sl])
            lungs[side] = _bbox_mm(m)
        extent = [(s - 1) * z for s, z in zip(full["mu"].shape, sp)]
        body = full["body"]
        ys = np.where(body.any(axis=(0, 2)))[0] * sp[1]
        y0, y1 = float(ys.min()), float(ys.max())
        slab_edges = np.linspace(y0, y1 + 1e-3, N_SLABS + 1)
        heart = np.isin(labels, [structures[n] for n in HEART if n in structures])
        info = {"body_y": [y0, y1], "lungs": lungs, "heart": _bbox_mm(heart),
                "heart_centroid": [float(c.mean() * COARSE_MM) for c in np.nonzero(heart)],
                "domes": _domes(labels, lung, structures),
                "lung_apex_z": float(max(lungs["left"][5], lungs["right"][5])),
                "body_x": _body_x(body, sp)}
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, arr in (("mu", mu), ("labels", labels), ("lung_depth", depth.astype(np.float16))):
            _save_npy(files[name], arr)
        groups = _group_projections(full, slab_edges)
        with replacing(self.dir / "groups.npz") as tmp:
            np.savez(tmp, **groups)
        meta = {"spacing": list(sp), "extent": extent, "structures": structures,
                "slab_edges": slab_edges.tolist(), "info": info, "key": self.key,
                "sources": {k: str(v) for k, v in self.paths.items()}}
        write_atomic(meta_path, json.dumps(meta, indent=1))

    def stack(self, anatomy: Anatomy, grid: "PlaneGrid", geometry: str) -> dict[str, np.ndarray]:
        """Per-slab projections of each component on `grid` (line integrals, dimensionless):
        soft, bone, lung: (N_SLABS, H, W); heart, body, lung_left, lung_right, heart_mask: (H, W)
        (the last four are thicknesses in mm, used for masks and the cardiothoracic ratio)."""
        tag = f"{geometry}-{grid.tag()}-s{STACK_VERSION}"
        path = self.dir / f"stack-{tag}.npz"
        if not path.is_file():
            with np.load(self.dir / "groups.npz", allow_pickle=False) as z:
                groups = {k: z[k] for k in z.files}
            arrays = _project_all(groups, anatomy, grid, geometry)
            self.dir.mkdir(parents=True, exist_ok=True)
            with replacing(path) as tmp:
                np.savez(tmp, **arrays)  # plain arrays only; read back with allow_pickle=False
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with replacing(path) as tmp:
        np.save(tmp, arr, allow_pickle=False)


_SHA_MEMO: dict[tuple, str] = {}


def _cached_sha(path: Path) -> str:
    st = path.stat()
    k = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _SHA_MEMO:
        _SHA_MEMO[k] = sha256(path)
    return _SHA_MEMO[k]


def _bbox_mm(mask: np.ndarray) -> list[float]:
    """[x0, y0, z0, x1, y1, z1] in mm of a coarse mask."""
    idx = [np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    lo = [float(i.min() * COARSE_MM) for i in idx]
    hi = [float(i.max() * COARSE_MM) for i in idx]
    return lo + hi


def _domes(labels, lung, structures) -> dict[str, float]:
    """Height (z, mm) of each hemidiaphragm dome: the top of the organs under it (liver on the
    right, spleen/stomach on the left); the lowest lung if none is labelled."""
    out = {}
    nx = labels.shape[0]
    below = [structures[n] for n in SUBDIAPHRAGM if n in structures]
    for side, cols in (("right", slice(0, nx // 2)), ("left", slice(nx // 2, nx))):
        zs = np.nonzero(np.isin(labels[cols], below).any(axis=(0, 1)))[0]
        out[side] = float(zs.max() * COARSE_MM) if len(zs) else float(
            np.nonzero(lung[cols].any(axis=(0, 1)))[0].min() * COARSE_MM)
    return out


def _body_x(body: np.ndarray, sp) -> list[float]:
    xs = np.nonzero(body[:, :, body.shape[2] // 2].any(axis=1))[0] * sp[0]
    return [float(xs.min()), float(xs.max())]


@dataclass(frozen=True)
class PlaneGrid:
    """The 2D grid the slab projections are stored on: column c <-> x = x0 + c*pixel (mm),
    row r <-> z = z0 - r*pixel (mm; row 0 is the most superior)."""

    x0: float
    z0: float
    pixel: float
    width: int
    height: int

    def tag(self) -> str:
        return f"{self.x0:.1f}_{self.z0:.1f}_{self.pixel:.4f}_{self.width}x{self.height}"

    def xs(self) -> np.ndarray:
        return self.x0 + np.arange(self.width) * self.pixel

    def zs(self) -> np.ndarray:
        return self.z0 - np.arange(self.height) * self.pixel


PAD_LATERAL = 50.0   # mm of the plane grid beyond the CT's left/right edges
PAD_TOP = 60.0
PAD_BOTTOM = 20.0
TAPER_LATERAL = 45.0  # mm over which tissue cut by the CT's field of view fades out
TAPER_TOP = 90.0


def plane_grid(anatomy: Anatomy, pixel: float) -> PlaneGrid:
    ex, _, ez = anatomy.extent
    x0 = -PAD_LATERAL
    z0 = ez + PAD_TOP
    width = int(np.ceil((ex + 2 * PAD_LATERAL) / pixel)) + 1
    height = int(np.ceil((ez + PAD_TOP + PAD_BOTTOM) / pixel)) + 1
    return PlaneGrid(round(x0, 3), round(z0, 3), round(pixel, 5), width, height)


def _edge_taper(coord: np.ndarray, lo: float, hi: float, fade_lo: float, fade_hi: float):
    """Index clipped to the CT, and a weight that fades from 1 at the CT's edge to 0 `fade` mm
    beyond it: tissue the CT's field of view cut off (shoulders, arms, neck) tapers smoothly
    instead of ending in a hard edge."""
    below = np.clip((lo - coord) / fade_lo, 0, 1)
    above = np.clip((coord - hi) / fade_hi, 0, 1)
    w = np.cos(0.5 * np.pi * below) ** 2 * np.cos(0.5 * np.pi * above) ** 2
    return np.clip(coord, lo, hi), w


GROUPS_PER_SLAB = 6   # thin depth groups (~7 mm) that share one cone-beam magnification
COMPONENTS = ("soft", "bone", "lung", "heart")
MASKS = ("body", "lung_left", "lung_right", "heart_mask")


def _group_projections(full: dict, slab_edges: np.ndarray) -> dict:
    """Projections at the CT's own resolution, done once: each component summed over thin depth
    groups (GROUPS_PER_SLAB per slab; (G, nx, nz)), each mask summed over all depth (thickness in
    mm; (nx, nz)), and the depth (mm) of each group's centre. Every layout is resampled from
    these, so the full volume is read only when the CT is first seen."""
    sx, sy, sz = full["spacing"]
    ny = full["comps"]["soft"].shape[1]
    bounds = []
    for s in range(N_SLABS):
        j0 = int(np.ceil(slab_edges[s] / sy))
        j1 = min(ny, int(np.ceil(slab_edges[s + 1] / sy)))
        cuts = np.linspace(j0, j1, GROUPS_PER_SLAB + 1).round().astype(int)
        bounds += list(zip(cuts[:-1], cuts[1:]))
    out = {"group_y": np.array([0.5 * (a + b - 1) * sy for a, b in bounds])}
    for name in COMPONENTS:
        vol = full["comps"][name]
        out[name] = np.stack([vol[:, a:b, :].sum(axis=1) * sy for a, b in bounds]).astype(np.float32)
    labels = full["labels"]
    st = full["structures"]
    for name, ids in (("body", None),
                      ("lung_left", [st[v] for (s, _), v in LOBES.items() if s == "left" and v in st]),
                      ("lung_right", [st[v] for (s, _), v in LOBES.items() if s == "right" and v in st]),
                      ("heart_mask", [st[n] for n in HEART if n in st])):
        m = full["body"] if ids is None else np.isin(labels, ids)
        out[name] = (m.sum(axis=1) * sy).astype(np.float32)
    return out


def _project_all(groups: dict, anatomy: Anatomy, grid: PlaneGrid, geometry: str) -> dict:
    if geometry not in ("parallel", "cone"):
        raise CxrError(f"unknown geometry {geometry!r}; use 'parallel' or 'cone'")
    sx, _, sz = anatomy.spacing
    nx, nz = groups["body"].shape
    xs, zs = grid.xs(), grid.zs()
    edges = anatomy.slab_edges
    yc = 0.5 * (edges[0] + edges[-1])
    det_y = edges[-1] + 20.0  # PA: detector just in front of the chest, source behind
    centre_x = 0.5 * sum(anatomy.info["body_x"])
    centre_z = 0.5 * (anatomy.info["domes"]["right"] + anatomy.info["lung_apex_z"])
    obl = np.sqrt(1 + ((xs[None, :] - centre_x) ** 2 + (zs[:, None] - centre_z) ** 2) / SID_MM ** 2)

    def resample(plane: np.ndarray, mag: float) -> np.ndarray:
        """A (nx, nz) projection at CT resolution onto the grid, magnified by `mag` about the
        central ray, tapered beyond the CT's field of view."""
        x = centre_x + (xs - centre_x) / mag
        z = centre_z + (zs - centre_z) / mag
        xi, wx = _edge_taper(x / sx, 0, nx - 1, TAPER_LATERAL / sx, TAPER_LATERAL / sx)
        zi, wz = _edge_taper(z / sz, 0, nz - 1, PAD_BOTTOM / sz, TAPER_TOP / sz)
        zz, xx = np.meshgrid(zi, xi, indexing="ij")
        out = ndimage.map_coordinates(plane, [xx, zz], order=1, mode="nearest")
        # above the CT's top slice the tissue is the top slice continued: blur it sideways more
        # the further it reaches, so the neck fades instead of drawing vertical streaks
        beyond = z - (nz - 1) * sz
        for lo in np.arange(0.0, max(float(beyond.max()), 0.0), 6.0):
            rows = (beyond > lo) & (beyond <= lo + 6.0)
            if rows.any():
                out[rows] = ndimage.gaussian_filter1d(out[rows], (lo + 3.0) * 0.6 / grid.pixel,
                                                      axis=1, mode="nearest")
        return (out * wz[:, None] * wx[None, :]).astype(np.float32)

    out = {}
    for name in COMPONENTS:
        g = groups[name]
        slabs = np.zeros((N_SLABS, grid.height, grid.width), np.float32)
        for s in range(N_SLABS):
            part = slice(s * GROUPS_PER_SLAB, (s + 1) * GROUPS_PER_SLAB)
            if geometry == "parallel":
                slabs[s] = resample(g[part].sum(axis=0), 1.0)
                continue
            for plane, y in zip(g[part], groups["group_y"][part]):
                mag = (SID_MM - (det_y - yc)) / (SID_MM - (det_y - y))
                slabs[s] += resample(plane, mag) * obl
        out[name] = slabs
    out["heart_slabs"] = out["heart"]
    out["heart"] = out["heart"].sum(axis=0)
    for name in MASKS:
        out[name] = resample(groups[name], 1.0)
    out["centre"] = np.array([centre_x, centre_z, yc, det_y], np.float64)
    return out
