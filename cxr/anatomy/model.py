"""The anatomy network (a small U-Net, MONAI's BasicUNet) and what is read from its masks.

Input: a frontal film (float32 (H, W) in [0, 1], bright = dense) resized to SIZE x SIZE and
stretched between its 1st and 99th percentiles; output: per organ, the probability that each
pixel's ray crosses more than 5 mm of it (the phantom's organ labels, `cxr.phantom.render`).
From the masks: the heart is the largest connected region of its mask, the lungs the two
largest of theirs; the cardiothoracic ratio is the heart's widest extent over the thorax's (the
outer edges of the lungs on one row, widest row), as a radiologist measures it on a PA film.
Weights: safetensors + JSON beside them, never pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..errors import CxrError
from ..records import Box

ORGANS = ("heart", "lungs")
SIZE = 96
FEATURES = (8, 8, 16, 32, 64, 8)  # the shipped network's widths (MODEL_CARD.md: why these)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MIN_SHARE = {"heart": 0.01, "lungs": 0.01}  # a region smaller than this share of the film is no organ

# Findings that are a property of a whole organ, by lower-case disease name -> the organ boxed.
ORGAN_OF_FINDING = {"cardiomegaly": "heart", "lung/hypoinflation": "lungs",
                    "lung/hyperdistention": "lungs", "emphysema": "lungs",
                    "pulmonary emphysema": "lungs"}


# Cardiomegaly's grade by cardiothoracic ratio (lower bound of each; a PA film): a heart wider than
# half the thorax is enlarged; the grades are those the phantom's reports are written from
# (`cxr.phantom.findings.CTR_RANGE`), close to the usual rule of thumb (mild to 0.55-0.58,
# moderate to about 0.6-0.65, severe beyond). Below the first, the ratio names no grade.
CTR_GRADES = (("borderline", 0.505), ("mild", 0.53), ("moderate", 0.58), ("severe", 0.64))


def grade_of_ratio(ratio: float | None) -> str | None:
    """Cardiomegaly's grade word for a measured cardiothoracic ratio (None: not enlarged, or none)."""
    word = None
    for name, lower in CTR_GRADES:
        if ratio is not None and ratio >= lower:
            word = name
    return word


def graded_by_measurement(disease: str) -> bool:
    """Whether the Reader reads this finding's grade from a measurement where one is made
    (Cardiomegaly's from the cardiothoracic ratio) rather than from the annotator's word."""
    return organ_of(disease) == "heart"


def organ_of(disease: str) -> str | None:
    """The organ a finding of `disease` is the whole of (None: a finding with a place of its own)."""
    return ORGAN_OF_FINDING.get(disease.strip().lower())


def build_net(features=FEATURES) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(ORGANS), features=tuple(features))


def stretch(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) -> each image stretched between its 1st and 99th percentiles, in [0, 1]."""
    lo, hi = _quantiles(x.flatten(1), (0.01, 0.99))
    scale = (hi - lo).clamp(min=1e-6)
    return ((x - lo[:, None, None, None]) / scale[:, None, None, None]).clamp(0, 1)


def _quantiles(flat: torch.Tensor, qs) -> list[torch.Tensor]:
    """Per row of (B, n): `torch.quantile`'s linear interpolation, from order statistics
    (`kthvalue`: 0.1 ms on a 96-px film, where torch.quantile's full sort took 0.5 to 1.3 ms)."""
    n, out = flat.shape[1], []
    for q in qs:
        pos = q * (n - 1)
        i = int(pos)
        below = flat.kthvalue(i + 1, dim=1).values
        above = flat.kthvalue(min(i + 2, n), dim=1).values
        out.append(below + (pos - i) * (above - below))
    return out


def net_input(x: torch.Tensor) -> torch.Tensor:
    """Stretched images (B, 1, SIZE, SIZE) in [0, 1] -> what the network reads."""
    return (x - 0.5) / 0.25


def preprocess(image: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """(1, 1, size, size): the film squashed to a square by area averaging (a ratio of widths
    survives the squash) and stretched by `stretch`, as in training."""
    from ..images import pixels_of, resize

    img = np.asarray(pixels_of(image), np.float32)
    if img.ndim != 2 or not img.size:  # any film the Reader reads, however small (a forced read)
        raise CxrError(f"the anatomy model needs a 2D grey image, got shape {img.shape}")
    small = np.nan_to_num(np.clip(resize(img, size), 0, 1))  # on the small image: 1 ms, not 7
    return stretch(torch.from_numpy(small)[None, None])


def _largest(mask: np.ndarray, k: int, min_px: float) -> np.ndarray:
    """The k largest 8-connected regions of `mask` of at least `min_px` pixels."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(mask)
    area = ndimage.sum(mask, lab, np.arange(1, n + 1))
    keep = [i + 1 for i in np.argsort(-area)[:k] if area[i] >= min_px]
    return np.isin(lab, keep)


@dataclass
class Organs:
    """One film's organs: masks on the model's grid, boxes in the film's pixels (None: not found)."""

    masks: dict[str, np.ndarray]
    boxes: dict[str, Box | None]
    cardiothoracic_ratio: float | None


def read_masks(prob: np.ndarray, size: tuple[int, int]) -> Organs:
    """Probabilities (organs, s, s) -> the heart (largest region), the lungs (two largest), their
    boxes at the film's (h, w) and the cardiothoracic ratio."""
    s = prob.shape[-1]
    masks, boxes = {}, {}
    for k, organ in enumerate(ORGANS):
        m = _largest(prob[k] > 0.5, 1 if organ == "heart" else 2, MIN_SHARE[organ] * s * s)
        masks[organ] = m
        box = Box.around(m, organ)
        boxes[organ] = box.scaled(size[1] / s, size[0] / s) if box else None
    return Organs(masks, boxes, cardiothoracic_ratio(masks["heart"], masks["lungs"]))


def cardiothoracic_ratio(heart: np.ndarray, lungs: np.ndarray) -> float | None:
    """Widest horizontal extent of the heart over the widest row of the thorax (outer lung edges)."""
    if not heart.any() or not lungs.any():
        return None
    cols = np.flatnonzero(heart.any(0))
    rows = lungs.any(1)
    first, last = lungs.argmax(1), lungs.shape[1] - 1 - lungs[:, ::-1].argmax(1)
    thorax = int((last - first + 1)[rows].max())
    return float((cols[-1] - cols[0] + 1) / thorax) if thorax > 0 else None


class AnatomyModel:
    """The shipped (or a given) anatomy network, ready to read films. On a CPU it runs under ONNX
    Runtime where that is installed (`engine="auto"`): the graph exported from the same weights
    when the model is loaded (0.3 s) reads a film about twice as fast as eager PyTorch at batch 1
    (`benchmarks/anatomy.py`), logits within 1e-4 (MONAI's U-Net is many small layers, where
    eager dispatch dominates)."""

    ENGINES = ("auto", "torch", "onnxruntime")

    def __init__(self, net: torch.nn.Module, meta: dict, device=None, engine: str = "auto",
                 threads: int | None = None):
        if engine not in self.ENGINES:
            raise CxrError(f"anatomy engine must be one of {', '.join(self.ENGINES)}, not {engine!r}")
        self.device = torch.device(device or "cpu")
        self.net = net.to(self.device).eval()
        self.meta = meta
        self.size = int(meta.get("size", SIZE))
        # the side of the films it was trained from (`train.RENDER_SIZE`): a smaller copy of a
        # film that keeps at least this much reads as the film does (the Reader's square)
        self.trained_from = int(meta.get("render_size", 256))
        self.session = None
        # ONNX Runtime's threads (default: torch's); the Reader gives it one when it reads
        # beside the annotator's words, which hold the other core
        self.threads = int(threads or torch.get_num_threads())
        if self.device.type == "cpu" and engine != "torch":
            self.session = _onnx_session(self.net, self.size, required=engine == "onnxruntime",
                                         threads=self.threads)
        self.engine = "onnxruntime" if self.session is not None else "torch"

    @classmethod
    def load(cls, path=None, device=None, engine: str = "auto", threads: int | None = None) -> "AnatomyModel":
        """`path`: a folder holding anatomy.safetensors + anatomy.json, or the .safetensors file
        (its .json beside it); None -> the weights shipped in the package. `engine`: see above."""
        from ..checkpoint import load_shipped

        net, meta, meta_path = load_shipped(path, WEIGHTS_DIR, "anatomy",
                                            lambda meta: build_net(meta.get("features", FEATURES)))
        if tuple(meta.get("organs", ORGANS)) != ORGANS:
            raise CxrError("the anatomy weights were trained for other organs than this code knows", meta_path)
        return cls(net, meta, device, engine, threads)

    @torch.no_grad()
    def probabilities(self, images) -> np.ndarray:
        """(N, organs, size, size) for a list of films."""
        x = net_input(torch.cat([preprocess(im, self.size) for im in images]))
        if self.session is not None:
            logits = torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])
        else:
            logits = self.net(x.to(self.device))
        return torch.sigmoid(logits).float().cpu().numpy()

    def __call__(self, images, sizes=None) -> list[Organs]:
        """Each film's organs (masks, boxes at the film's size, cardiothoracic ratio). `sizes`:
        each film's (height, width) where `images` are smaller copies of the films (the
        Reader's square at the CNN's input size), for boxes in the film's pixels."""
        images = list(images)
        if not images:
            return []
        sizes = sizes or [np.shape(im)[:2] for im in images]
        return [read_masks(p, size) for p, size in zip(self.probabilities(images), sizes)]


def _onnx_session(net: torch.nn.Module, size: int, required: bool, threads: int):
    """`net` exported to ONNX in memory and opened in ONNX Runtime (None where it is not
    installed or the export fails, unless `required`)."""
    import io
    import warnings

    from ..engines import OPSET, ort_session

    try:
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's notes on instance norm
            torch.onnx.export(net.cpu(), torch.zeros(1, 1, size, size), buf, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        return ort_session(buf.getvalue(), threads)
    except Exception as e:  # onnxruntime or onnx missing, or an exporter that cannot: eager torch
        if required:
            raise CxrError(f"the anatomy network cannot run under ONNX Runtime: {e}") from None
        return None
