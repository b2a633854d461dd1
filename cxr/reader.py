"""`Reader`: a trained cascade applied to new images, batched.

    reader = cxr.Reader.load("runs/openi")
    result = reader("chest.dcm")                    # or a float32 (H, W) array in [0, 1]
    results = reader(["a.png", "b.dcm"], beams=3)    # a list in, a list out
    result.quality                                   # the quality gate's report (cxr.quality)

Before reading, the quality gate (`cxr.quality.QualityGate`, loaded once per Reader) checks each
image: one that is no chest radiograph, or of a view the run does not read, gives a Result with
`quality.accepted` False and no findings (a bad image in a batch never raises); a film stored
rotated or with inverted polarity is turned back first, and `quality` says so (boxes and heatmaps
then refer to the upright film). `force=True` reads refused images anyway; `gate=False` skips it.

For each image: calibrated scores for every original target (refined cascade labels are folded
back: max over a disease's sub-labels); the targets above their stored operating thresholds as
findings, each with a generated annotation (the RNN, conditioned on that disease), its context
fields parsed back from the tokens, CAM boxes and a heatmap at the input size; and the image
embedding. `normal` is reported as a finding only when no disease is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import load_run, unprefixed, weights_hash
from .dataset import normalise, preprocess
from .errors import CxrError
from .models.annotator import Annotator, decode
from .models.cascade import RefinedLabels
from .models.cnn import create_cnn
from .models.localize import LocalizeParams, boxes_from_heatmap, class_activation_maps, to_heatmap
from .records import Box
from .results import DetectedFinding, Result
from .training.calibration import apply_platt, logit

NORMAL = "normal"


class Reader:
    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], device: str | torch.device | None = None,
                 model_id: str = "", amp: bool = True, gate=True):
        self.config = config
        # True: the shipped gate, loaded on first use; a QualityGate: that one; False/None: none
        self._gate = gate
        self.amp = amp  # mixed precision for the CNN trunk on CUDA (head, CAM and RNN stay float32)
        arch = config["architecture"]
        self.device = torch.device(device) if device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.targets: list[str] = list(config["targets"])
        self.refined = RefinedLabels.from_dict(config["refined"])
        self.words: list[str] = list(config["vocabulary"])
        self.image_size = int(config["preprocessing"]["image_size"])
        self.mean = float(config["preprocessing"].get("mean", 0.5))
        self.std = float(config["preprocessing"].get("std", 0.25))
        self.stretch = bool(config["preprocessing"].get("stretch", False))
        self.thresholds = np.array([config["thresholds"][t] for t in self.targets], dtype=np.float32)
        self.platt = [tuple(config["calibration"]["params"][t]) for t in self.targets]
        self.localization = LocalizeParams.from_dict(config.get("localization"))
        self.max_tokens = int(arch.get("max_tokens", 5))
        self.cnn = create_cnn(arch["backbone"], arch["num_classes"], arch.get("in_chans", 1))
        self.cnn.load_state_dict(unprefixed("cnn", tensors))
        self.rnn = Annotator(arch["vocab_size"], arch["num_labels"], arch["image_dim"], arch["rnn_hidden"],
                             arch["rnn_embed"], arch["rnn"])
        self.rnn.load_state_dict(unprefixed("rnn", tensors))
        self.cnn.to(self.device).eval()
        self.rnn.to(self.device).eval()
        self.model_id = model_id or f"{arch['backbone']}-{config.get('stage', 'run')}"

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None, amp: bool = True,
             gate=True) -> "Reader":
        """Load a run directory (config.json + weights.safetensors; nothing is unpickled)."""
        run_dir = Path(run_dir).expanduser()
        config, tensors = load_run(run_dir)
        arch = config["architecture"]
        model_id = f"{arch['backbone']}-{config.get('stage', 'run')}-{weights_hash(run_dir)[:12]}"
        return cls(config, tensors, device, model_id, amp, gate)

    @property
    def read_views(self) -> tuple[str, ...]:
        """The views this run was trained to read (its data config; frontal by default)."""
        views = (self.config.get("data") or {}).get("views") or "frontal"
        return ("frontal", "lateral") if views == "all" else (str(views),)

    @property
    def gate(self):
        """The quality gate (loaded once, on first use), or None when switched off."""
        if self._gate is True:
            from .quality.gate import QualityGate

            self._gate = QualityGate.load(device=self.device, read_views=self.read_views)
        return self._gate or None

    # ------------------------------------------------------------------ inputs

    def _load(self, item):
        """A path -> its LoadedImage (pixels and what the file says, e.g. colour); a
        LoadedImage as it is; an array -> checked float32 pixels."""
        from .images import LoadedImage, read_image

        if isinstance(item, (str, Path)):
            return read_image(item)
        if isinstance(item, LoadedImage):
            return item
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        arr = np.asarray(item)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise CxrError(f"expected an image (H, W) float32 in [0, 1], got shape {arr.shape}")
        arr = arr.astype(np.float32)
        if arr.max() > 1.0 + 1e-3 or arr.min() < -1e-3:
            raise CxrError(f"image values must lie in [0, 1] (got {arr.min():.3g}..{arr.max():.3g}); "
                           "load files with cxr.load_image, or divide by the maximum")
        return arr

    # ------------------------------------------------------------------ model

    @torch.no_grad()
    def _forward(self, images: list[np.ndarray]):
        x = np.stack([preprocess(im, self.image_size, self.stretch) for im in images])[:, None]
        x = normalise(torch.from_numpy(x).to(self.device), self.mean, self.std)
        if self.device.type == "cuda" and self.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                maps = self.cnn.forward_features(x)
        else:
            maps = self.cnn.forward_features(x)
        maps = maps.float()
        logits = self.cnn.forward_head(maps).float()
        return maps, logits, self.cnn.pool(maps)

    def _scores(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated per-target scores (B, T) and, per target, the refined label carrying it."""
        probs = torch.sigmoid(logits).cpu().numpy()
        per_target = np.zeros((probs.shape[0], len(self.targets)), dtype=np.float32)
        best = np.zeros((probs.shape[0], len(self.targets)), dtype=np.int64)
        for t in range(len(self.targets)):
            kids = self.refined.children(t)
            sub = probs[:, kids]
            best[:, t] = np.asarray(kids)[sub.argmax(1)]
            per_target[:, t] = sub.max(1)
        return apply_platt(logit(per_target), self.platt), best

    def annotate(self, embeddings: torch.Tensor, labels: torch.Tensor, beams: int = 1) -> list[list[str]]:
        """Token sequences for (embedding, target index) pairs: greedy (beams=1) or beam search."""
        if len(labels) == 0:
            return []
        emb, lab = embeddings.to(self.device), labels.to(self.device)
        n = self.max_tokens + 1
        ids = self.rnn.greedy(emb, lab, n) if beams <= 1 else self.rnn.beam(emb, lab, beams, n)
        return [decode(s, self.words)[:self.max_tokens] for s in ids]

    def __call__(self, images, heatmaps: bool = True, beams: int = 1, batch_size: int = 16,
                 force: bool = False):
        """One image (path, LoadedImage or array) -> Result; a list -> list[Result]. Each image
        passes the quality gate first (see the module docstring); `force` reads refused ones."""
        single = _single(images)
        items: Sequence = [images] if single else list(images)
        results: list[Result] = []
        for s in range(0, len(items), max(batch_size, 1)):
            results.extend(self._gated([self._load(it) for it in items[s:s + batch_size]], heatmaps,
                                       beams, force))
        return results[0] if single else results

    def _gated(self, loaded: list, heatmaps: bool, beams: int, force: bool) -> list[Result]:
        """The gate on a batch, then the cascade on what it lets through (turned upright)."""
        pixels = [getattr(im, "pixels", im) for im in loaded]
        gate = self.gate
        if gate is None:
            return self._batch(pixels, heatmaps, beams)
        reports = gate.check(loaded)
        todo = [i for i, r in enumerate(reports) if r.accepted or force]
        read = self._batch([gate.correct(pixels[i], reports[i]) for i in todo], heatmaps, beams) if todo else []
        out = [Result(scores={}, model_id=self.model_id, image_size=tuple(np.shape(p)[:2]), quality=r)
               for p, r in zip(pixels, reports)]
        for i, result in zip(todo, read):
            reports[i].forced = not reports[i].accepted
            result.quality = reports[i]
            out[i] = result
        return out

    @torch.no_grad()
    def _batch(self, images: list[np.ndarray], heatmaps: bool, beams: int) -> list[Result]:
        from .reports.mesh import parse_term

        maps, logits, emb = self._forward(images)
        scores, best = self._scores(logits)
        detected = []
        normal = self.targets.index(NORMAL) if NORMAL in self.targets else None
        for b in range(len(images)):
            hits = [t for t in range(len(self.targets)) if t != normal and scores[b, t] >= self.thresholds[t]]
            if not hits and normal is not None and scores[b, normal] >= self.thresholds[normal]:
                hits = [normal]
            detected.append(hits)
        pairs = [(b, t) for b, hits in enumerate(detected) for t in hits]
        tokens = self.annotate(emb[[b for b, _ in pairs]] if pairs else emb[:0],
                               torch.tensor([t for _, t in pairs], dtype=torch.long), beams)
        words = dict(zip(pairs, tokens))
        results = []
        for b, image in enumerate(images):
            h, w = image.shape[:2]
            findings, maps_out = [], {}
            cams = None
            disease_hits = [t for t in detected[b] if t != normal]
            if disease_hits:
                cams = class_activation_maps(maps[b:b + 1], self.cnn.head.weight,
                                             torch.tensor([[int(best[b, t]) for t in disease_hits]],
                                                          device=maps.device))[0]
            for t in detected[b]:
                target, toks = self.targets[t], words.get((b, t), [])
                parsed = parse_term("/".join(toks)) if toks else None
                boxes: list[Box] = []
                if cams is not None and t != normal:
                    cam = cams[disease_hits.index(t)]
                    small = to_heatmap(cam, (self.image_size, self.image_size))
                    sx, sy = w / self.image_size, h / self.image_size
                    boxes = [bx.scaled(sx, sy) for bx in boxes_from_heatmap(small, target, self.localization)]
                    if heatmaps:
                        maps_out[target] = to_heatmap(cam, (h, w))
                findings.append(DetectedFinding(
                    disease=target, score=float(scores[b, t]), annotation=" ".join(toks),
                    organ=parsed.organ if parsed else None,
                    location=tuple(parsed.location) if parsed else (),
                    side=parsed.side if parsed else None,
                    severity=parsed.severity if parsed else None, boxes=boxes))
            findings.sort(key=lambda f: -f.score)
            results.append(Result(
                scores={t: float(scores[b, k]) for k, t in enumerate(self.targets)}, findings=findings,
                heatmaps=maps_out, embedding=emb[b].cpu().numpy().astype(np.float32),
                model_id=self.model_id, image_size=(int(h), int(w))))
        return results

    @torch.no_grad()
    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        """Image embeddings (N, D) only (what the archive's vector index stores)."""
        items = [images] if _single(images) else list(images)
        out = []
        for s in range(0, len(items), batch_size):
            _, _, emb = self._forward([getattr(im, "pixels", im) for im in
                                       (self._load(it) for it in items[s:s + batch_size])])
            out.append(emb.cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def _single(images) -> bool:
    """A path, a LoadedImage, a 2-D array, or an (H, W, 3|4) colour array is one image; lists,
    tuples and (N, H, W) stacks are many."""
    if isinstance(images, (str, Path)) or hasattr(images, "pixels"):
        return True
    ndim = getattr(images, "ndim", None)
    if ndim == 2:
        return True
    return ndim == 3 and images.shape[-1] in (3, 4)
