"""Weakly supervised localisation: class activation maps -> heatmap -> boxes (Wang et al. 2017).

CAM (Zhou et al. 2016): with global average pooling and a linear head, the score of class k is the
mean over positions of sum_c w_kc * f_c(x, y), so ``sum_c w_kc f_c`` is a map of where the evidence
for k lies. ChestX-ray8 normalises that map to [0, 255], thresholds it at 60 and at 180 and puts a
box around each isolated region of either binary map; runs do the same by default
(`CHESTXRAY8_THRESHOLDS`, `cxr train --boxes chestxray8`), or use one threshold
(`--boxes threshold`, `LocalizeParams.threshold`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..records import Box
from ..runspec import LocalizeParams


def class_activation_maps(maps: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """maps (B, C, h, w), head weight (K, C), classes (B, N) long -> CAMs (B, N, h, w)."""
    w = weight[classes]  # (B, N, C)
    return torch.einsum("bnc,bchw->bnhw", w.float(), maps.float())


def to_heatmap(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One CAM (h, w) -> heatmap (H, W) float32 in [0, 1], bilinear upsampling then min-max."""
    up = F.interpolate(cam.detach()[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    top = float(up.max())
    return (up / top if top > 0 else up).cpu().numpy().astype(np.float32)


#: ChestX-ray8's box extraction (Wang et al. 2017, sec. 4.3): heatmaps in [0, 255] thresholded at
#: 180 and at 60, a box around every isolated region of each; here at most `max_boxes` per threshold
CHESTXRAY8_THRESHOLDS = (180 / 255, 60 / 255)


def chestxray8_params(max_boxes: int = 2, min_area: float = 0.002) -> LocalizeParams:
    """Box extraction as ChestX-ray8 does it: the tight regions (180/255) first, then the broad."""
    return LocalizeParams(CHESTXRAY8_THRESHOLDS[0], max_boxes, min_area, CHESTXRAY8_THRESHOLDS[1:])


def boxes_from_heatmap(heatmap: np.ndarray, label: str, params: LocalizeParams | None = None) -> list[Box]:
    """Threshold the heatmap, label 8-connected components, one box per component (largest
    CAM mass first), in the heatmap's pixel coordinates; then the same at each further
    threshold of `params.also`."""
    params = params or LocalizeParams()
    boxes = []
    for threshold in params.thresholds:
        boxes += _boxes_at(heatmap, label, params, threshold)
    return boxes


def _boxes_at(heatmap: np.ndarray, label: str, params: LocalizeParams, threshold: float) -> list[Box]:
    mask = heatmap >= threshold
    components, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    mass = ndimage.sum(heatmap, components, ids)
    area = ndimage.sum(mask, components, ids)
    slices = ndimage.find_objects(components)
    min_px = params.min_area * heatmap.size
    boxes = []
    for i in np.argsort(-mass):
        if area[i] < min_px:
            continue
        ys, xs = slices[i]
        boxes.append(Box(label, float(xs.start), float(ys.start), float(xs.stop - xs.start),
                         float(ys.stop - ys.start)))
        if len(boxes) >= params.max_boxes:
            break
    return boxes


# 8-connected within a map, never across the maps of a stack
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True


def boxes_from_heatmaps(heatmaps: np.ndarray, labels: Sequence[str],
                        params: LocalizeParams | None = None) -> list[list[Box]]:
    """`boxes_from_heatmap` of every map of a stack (N, H, W), the same boxes in the same order:
    one labelling pass over the whole stack instead of three calls per map (per-map calls cost
    as much as a tenth of the CNN at batch 1), and every component's area and mass in one count
    each. Components of exactly equal mass keep their labelling order."""
    params = params or LocalizeParams()
    heatmaps = np.asarray(heatmaps)
    out: list[list[Box]] = [[] for _ in range(len(heatmaps))]
    for threshold in params.thresholds:
        for boxes, more in zip(out, _stack_boxes_at(heatmaps, labels, params, threshold)):
            boxes += more
    return out


def _stack_boxes_at(heatmaps: np.ndarray, labels: Sequence[str], params: LocalizeParams,
                    threshold: float) -> list[list[Box]]:
    out: list[list[Box]] = [[] for _ in range(len(heatmaps))]
    if not len(heatmaps):
        return out
    mask = heatmaps >= threshold
    components, n = ndimage.label(mask, structure=_IN_PLANE)
    if n == 0:
        return out
    slices = ndimage.find_objects(components)
    # every component's area and mass in two counts over the stack, not a few array operations
    # per component (on the box grid a stack is small; a loop per component cost more). The
    # masses are ndimage.sum's: a bincount, each component's pixels added in raster order.
    flat = components.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    mass = np.bincount(flat, weights=heatmaps.ravel(), minlength=n + 1)[1:]
    map_of = np.fromiter((sl[0].start for sl in slices), dtype=np.intp, count=n)
    big = np.flatnonzero(area >= params.min_area * heatmaps[0].size)
    # per map, largest mass first (equal masses in labelling order), at most max_boxes
    for i in big[np.lexsort((big, -mass[big], map_of[big]))]:
        k = int(map_of[i])
        if len(out[k]) >= params.max_boxes:
            continue
        _, ys, xs = slices[i]
        out[k].append(Box(labels[k], float(xs.start), float(ys.start), float(xs.stop - xs.start),
                          float(ys.stop - ys.start)))
    return out


def side_consistent(heatmap: np.ndarray, side: str | None) -> np.ndarray:
    """The heatmap with the half of the image that contradicts the side word set to 0, so that a
    "left" finding never gets a right-sided box. On a PA/AP film the patient faces the viewer:
    the patient's LEFT is the IMAGE's RIGHT. "bilateral" or no side: unchanged (see
    `half_at_own_peak` for a bilateral finding's boxes)."""
    if side not in ("left", "right"):
        return heatmap
    out = heatmap.copy()
    mid = heatmap.shape[1] // 2
    if side == "left":
        out[:, :mid] = 0
    else:
        out[:, heatmap.shape[1] - mid:] = 0
    return out


def half_at_own_peak(heatmap: np.ndarray, side: str) -> np.ndarray:
    """The heatmap on one side of the patient only (`side_consistent`), scaled to that side's own
    peak: a "bilateral" finding's boxes come one from each side's map, so that a weaker lung
    still gets its box and no box straddles the midline."""
    return at_own_peak(side_consistent(heatmap, side))


def at_own_peak(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap divided by its maximum (unchanged where it is all zero): what is left of a map
    after a rule cut part of it away is found by the box thresholds as strongly as a whole one."""
    top = float(heatmap.max())
    return heatmap / top if top > 0 else heatmap


# Per site word, the band of image rows (fractions of the height, top = 0) where the peak of its
# finding's map may lie on a PA/AP chest film: wide enough for films framed loosely or tightly
# (on the phantom, every true box of a site word has its centre inside its band), narrow enough
# that a "base" finding is never boxed at the apex, nor an "apex" one at the diaphragm.
SITE_BANDS = {"apex": (0.0, 0.5), "upper lobe": (0.0, 0.7), "middle lobe": (0.2, 0.75),
              "lingula": (0.2, 0.75), "hilum": (0.2, 0.75), "lower lobe": (0.3, 1.0),
              "base": (0.4, 1.0), "retrocardiac": (0.3, 1.0)}


# Per disease, the band of rows where its map's peak may lie when its words name no site: where
# the finding sits on any PA/AP chest film whatever a report says. Fluid gathers at the bases
# (the "base" band); the heart lies below the upper third. Other findings can be anywhere.
DISEASE_BANDS = {"pleural effusion": SITE_BANDS["base"], "effusion": SITE_BANDS["base"],
                 "cardiomegaly": (0.3, 1.0)}


def disease_band(disease: str) -> tuple[float, float] | None:
    """The row band a disease's own anatomy allows (`DISEASE_BANDS`; None: anywhere)."""
    return DISEASE_BANDS.get(disease.strip().lower())


def site_band(location: Sequence[str] | None) -> tuple[float, float] | None:
    """The row band of the first site word that has one (None: no such word)."""
    for word in location or ():
        if word in SITE_BANDS:
            return SITE_BANDS[word]
    return None


def site_consistent(heatmap: np.ndarray, location: Sequence[str] | None,
                    band: tuple[float, float] | None = None) -> np.ndarray:
    """The heatmap with the rows outside its site word's band (`SITE_BANDS`), or outside `band`
    where no word has one, set to 0 and the rest scaled to its own peak, so that the words and the
    box agree on the height as `side_consistent` makes them agree on the side; unchanged with
    neither."""
    band = site_band(location) or band
    if band is None:
        return heatmap
    rows = heatmap.shape[0]
    lo, hi = int(np.floor(band[0] * rows)), int(np.ceil(band[1] * rows))
    out = np.zeros_like(heatmap)
    out[lo:hi] = heatmap[lo:hi]
    return at_own_peak(out)


def side_of_box(box: Box, width: float) -> str:
    """The patient's side a box's centre lies on (PA display: image right = patient left)."""
    return "left" if box.x + box.w / 2 >= width / 2 else "right"


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling exactly as `F.interpolate(...,
    mode="bilinear", align_corners=False)` computes it, so a 2-D upsampling is two small matrix
    products (R_y @ cam @ R_x.T) instead of a pass over every output pixel per map."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    out = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(out, (rows, lo), 1.0 - frac)
    np.add.at(out, (rows, hi), frac)
    return out


@lru_cache(maxsize=32)
def _bilinear(n_out: int, n_in: int) -> np.ndarray:
    """`bilinear_matrix`, made once per size pair (a Reader asks for the same few sizes)."""
    matrix = bilinear_matrix(n_out, n_in)
    matrix.flags.writeable = False
    return matrix


def heatmaps_at(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CAMs (N, h, w) -> heatmaps (N, H, W) float32 in [0, 1]: bilinear upsampling then min-max
    per map (what `to_heatmap` does to one map, for many at once)."""
    cams = np.asarray(cams, dtype=np.float32)
    up = _bilinear(size[0], cams.shape[1]) @ cams @ _bilinear(size[1], cams.shape[2]).T
    up -= up.min(axis=(1, 2), keepdims=True)
    top = up.max(axis=(1, 2), keepdims=True)
    np.divide(up, top, out=up, where=top > 0)
    return up


class Heatmaps(Mapping):
    """One image's heatmaps by finding, made at the image's size when first read.

    A heatmap at a 1024-px film's size is 4 MB and a CAM is 8x8 or 16x16: making one per finding
    for every image cost more than the CNN itself, and most callers draw one or none. Reading
    an item (or `values()`, `dict(...)`) makes and keeps it; `cams` holds the maps it comes from."""

    def __init__(self, cams: dict[str, np.ndarray], size: tuple[int, int]):
        self.cams = cams
        self.size = (int(size[0]), int(size[1]))
        self._made: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._made:
            self._made[key] = heatmaps_at(self.cams[key][None], self.size)[0]
        return self._made[key]

    def __iter__(self):
        return iter(self.cams)

    def __len__(self) -> int:
        return len(self.cams)

    def __repr__(self) -> str:
        return f"Heatmaps({list(self.cams)}, size={self.size})"
