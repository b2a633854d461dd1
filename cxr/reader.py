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
back: max over a disease's sub-labels, their sum for a softmax run); the study-level answer
(`abnormal`, the calibrated probability that the study has any finding, and `call`, normal or
abnormal at the run's stored operating point); the findings: in a study called abnormal, the
diseases at or above their stored thresholds, each with a generated annotation (the RNN,
conditioned on that disease), its context fields parsed back from the tokens, boxes and a
heatmap at the input size; in a study called normal, `normal` alone; and the image embedding.
(A run without a study-level answer reports the diseases above their thresholds, and `normal`
only when no disease is.)

Full-size heatmaps are made when first read (`cxr.models.localize.Heatmaps`).

`engine` runs the CNN with PyTorch ("torch", the default) or runs the graph `cxr export RUN
--onnx` wrote with ONNX Runtime ("onnxruntime") or OpenVINO ("openvino"), see `cxr.engines`;
everything after the CNN (calibration, CAMs, boxes, the annotator RNN) is the same code for all.
On a CPU with ONNX Runtime installed, the grounded annotator decodes through two graphs exported
from its own weights on first use, whatever the engine (`cxr.models.grounded_onnx`; the same words),
and the global annotator through one, its GRU step (`cxr.models.annotator_onnx`).

A run with the grounded annotator (`cxr.models.grounded`, the default) writes each finding's
words from the CNN's feature map: `heatmaps["Opacity"]` is its finding map (where it says the
finding is; the boxes come from it) and `heatmaps["Opacity:left"]` the map it attended to while
writing "left". Older runs (Shin's annotator on the pooled embedding) give CAM heatmaps and boxes.
Either way a finding's boxes lie on the side its words name (PA display: the patient's left is
the image's right), a bilateral one gets a box on each side, and a finding with a site word is
boxed within that site's band of rows ("base": the lower 60% of the film), so words and boxes
never contradict each other. A finding of a whole organ (Cardiomegaly; hyper- and hypoinflation,
emphysema) is boxed with that organ as the anatomy network finds it (`cxr.anatomy`: the heart,
both lungs), its heatmap still the map it looked at, and Cardiomegaly carries the film's
cardiothoracic ratio in `measurements`, unless the film is AP (its DICOM says so, or, where the
file does not say, the gate calls it AP: `quality.projection`).

    reader.localise(image, ["Cardiomegaly"])        # boxes of named targets, detected or not
    feats = reader.forward(images); scores, _ = reader.scores(feats.logits)   # the raw steps

Everything the Reader knows about the run is its `RunSpec` (`reader.spec`); it imports nothing
from `cxr.training`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .calibration import apply_platt, logit
from .checkpoint import load_run, unprefixed, weights_hash
from .errors import CxrError
from .images import LoadedImage, pixels_of
from .models.annotator import Annotator, decode
from .models.cascade import output_probabilities
from .models.cnn import create_cnn
from .models.localize import (Heatmaps, boxes_from_heatmaps, disease_band, half_at_own_peak,
                              heatmaps_at, site_consistent)
from .preprocess import levels, normalise, square
from .records import Box
from .results import DetectedFinding, Result
from .operating import decide
from .runspec import BOX_SOURCES, LocalizeParams, RunSpec

NORMAL = "normal"
# why a Cardiomegaly finding carries no cardiothoracic ratio (DetectedFinding.notes)
NO_RATIO_ON_AP = "no cardiothoracic ratio: an AP film magnifies the heart"
NO_RATIO_FOUND = "no cardiothoracic ratio: heart or lungs not found"


class Features(NamedTuple):
    """What one forward pass of the CNN gives for a batch: feature maps (B, C, h, w) for CAMs,
    raw logits (B, refined labels), pooled embeddings (B, D)."""

    maps: torch.Tensor
    logits: torch.Tensor
    embeddings: torch.Tensor


class Detection(NamedTuple):
    """What the CNN's logits decide for a batch before any word is written: calibrated scores
    (B, targets), the refined label carrying each, the study's abnormal probability (None
    without a study-level answer), and per image the target indices it reports."""

    scores: np.ndarray
    best: np.ndarray
    abnormal: np.ndarray | None
    detected: list[list[int]]


class Reader:
    """A trained run, ready to read images. Everything it knows about the run is `spec` (a
    `cxr.runspec.RunSpec`); `tensors` are the run's weights ("cnn.*", "rnn.*"). `gate`: True for
    the shipped quality gate (loaded once, on first use), a `QualityGate` to use that one, False
    for none. `micro_batch`: images per CNN call (default: the engine's `CPU_MICRO_BATCH` on the
    CPU, the whole batch on a GPU)."""

    #: Images per CNN call on the CPU, per engine. A DenseNet-121 at batch 32 keeps 32
    #: images' concatenated feature maps alive per dense block (4 MB per image in the first
    #: block at 256 px) and spills the CPU's caches: on 2 cores (32 MB L3) it read fewer images
    #: per second at batch 32 than at batch 1. Batches are cut into calls of this size (scores
    #: bit-identical). Measured there, torch channels-last, 32 images: calls of 8 were the
    #: fastest on a quiet machine (18 images/s; 15 in calls of 1, 3 in calls of 16 or 32); under
    #: a load of 7 on the 2 cores larger calls did better (calls of 8: 1.6, 32: 2.0, 1: 1.0).
    #: OpenVINO, compiled for latency, was fastest in calls of 1 (21.8 images/s against 18.7-20.2
    #: in calls of 8, two rounds on a quiet machine), and so was ONNX Runtime once batch 32 and
    #: 32 films one at a time were measured in turn in one process (`benchmarks/batching.py`:
    #: its forward pass read batch 32 at 1.004x batch 1's speed per image in calls of 1, 0.915x in
    #: calls of 8; separate processes had shown either order).
    CPU_MICRO_BATCH = {"torch": 8, "onnxruntime": 1, "openvino": 1}

    def __init__(self, spec: RunSpec, tensors: dict[str, torch.Tensor], device: str | torch.device | None = None,
                 model_id: str = "", amp: bool = True, gate=True, engine: str = "torch",
                 onnx_path: str | Path | None = None, weights_sha256: str = "", micro_batch: int | None = None):
        self.spec = spec
        self._gate = gate
        self.amp = amp  # mixed precision for the CNN trunk on CUDA (head, CAM and RNN stay float32)
        arch = spec.architecture
        self.device = torch.device(device) if device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.targets: list[str] = list(spec.targets)
        self.words: list[str] = list(spec.vocabulary)
        self.image_size = spec.preprocessing.image_size
        self.thresholds = np.array([spec.thresholds[t] for t in self.targets], dtype=np.float32)
        self.platt = [tuple(spec.calibration.params[t]) for t in self.targets]
        self.cnn = create_cnn(arch.backbone, arch.num_classes, arch.in_chans, pooling=arch.pooling,
                              lse_r=arch.lse_r, transition=arch.transition, batch_norm=arch.batch_norm,
                              members=arch.members)
        self.cnn.load_state_dict(unprefixed("cnn", tensors))
        # the grounded annotator (attends over the feature map; cxr.models.grounded), if the run has one
        self.ground = None
        if arch.annotator == "grounded":
            from .models.grounded import GroundedAnnotator, field_word_ids

            weights = unprefixed("ground", tensors)
            self.ground = GroundedAnnotator(arch.vocab_size, arch.num_labels, arch.image_dim,
                                            field_word_ids(self.words), arch.rnn_hidden, arch.rnn_embed,
                                            arch.rnn, arch.attn_dim, vocab=self.words)
            # a run from before the presence logits: its side and site words come from the heads
            self._where = "presence_bias" in weights
            weights.setdefault("presence_bias", torch.zeros(5))
            self.ground.load_state_dict(weights)
            self.ground.to(self.device).eval()
        # the map a detected finding's boxes and heatmap come from (`LocalizeParams.source`; a run
        # from before it: the finding map of a grounded run, else the CAM)
        self.box_source = "cam" if self.ground is None else (spec.localization.source or "attention")
        self._graphs: dict = {}  # each annotator's ONNX Runtime graphs, made when it first decodes (`_use_graphs`)
        self.rnn = Annotator(arch.vocab_size, arch.num_labels, arch.image_dim, arch.rnn_hidden,
                             arch.rnn_embed, arch.rnn)
        self.rnn.load_state_dict(unprefixed("rnn", tensors))
        self.cnn.to(self.device).eval()
        # channels-last convolutions are oneDNN's fast path on the CPU (scores within 1e-6)
        self._channels_last = self.device.type == "cpu" and engine == "torch"
        if self._channels_last:
            self.cnn.to(memory_format=torch.channels_last)
        self.micro_batch = micro_batch or (self.CPU_MICRO_BATCH[engine] if self.device.type == "cpu" else None)
        self.rnn.to(self.device).eval()
        self.model_id = model_id or spec.model_name
        # the head's weights as one array: CAMs of a whole batch are then a few small products
        self._head = self.cnn.head.weight.detach().float().cpu().numpy()
        self.engine_name = engine
        self._engine = None
        if engine != "torch":
            from .engines import ONNX_NAME, open_engine

            if self.device.type != "cpu":
                raise CxrError(f"engine {engine} runs on the CPU; use --device cpu or engine torch")
            if onnx_path is None:
                raise CxrError(f"engine {engine} needs the exported graph (cxr export RUN --onnx -> RUN/{ONNX_NAME})")
            self._engine = open_engine(engine, onnx_path, weights_sha256)

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None, amp: bool = True,
             gate=True, engine: str = "torch", micro_batch: int | None = None) -> "Reader":
        """Load a run directory (config.json + weights.safetensors; nothing is unpickled).
        `engine` other than "torch" reads RUN/model.onnx (`cxr export RUN --onnx`)."""
        from .engines import ENGINES, ONNX_NAME

        if engine not in ENGINES:
            raise CxrError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        run_dir = Path(run_dir).expanduser()
        spec, tensors = load_run(run_dir)
        sha = weights_hash(run_dir)
        if engine != "torch" and device is None:
            device = "cpu"
        return cls(spec, tensors, device, f"{spec.model_name}-{sha[:12]}", amp, gate, engine,
                   run_dir / ONNX_NAME, sha, micro_batch)

    @property
    def read_views(self) -> tuple[str, ...]:
        """The views this run was trained to read (its data spec: frontal, lateral or all)."""
        views = self.spec.data.views or "frontal"
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
        arr = arr.astype(np.float32, copy=False)  # a 1024-px film: no 4 MB copy per image
        if arr.max() > 1.0 + 1e-3 or arr.min() < -1e-3:
            raise CxrError(f"image values must lie in [0, 1] (got {arr.min():.3g}..{arr.max():.3g}); "
                           "load files with cxr.load_image, or divide by the maximum")
        return arr

    # ------------------------------------------------------------------ model

    @torch.no_grad()
    def forward(self, images: list[np.ndarray], squares: list[np.ndarray] | None = None) -> Features:
        """The CNN on a batch of loaded images (float32 (H, W) in [0, 1]), preprocessed as the
        run's spec says, `micro_batch` images per call. `squares`: the images already resized to
        the CNN's input (`cxr.preprocess.square`), where the caller keeps them."""
        if squares is None:
            squares = [square(im, self.spec.preprocessing.image_size) for im in images]
        step = self.micro_batch or len(squares)
        parts = [self._forward(squares[s:s + step]) for s in range(0, len(squares), step)]
        if len(parts) == 1:
            return parts[0]
        return Features(*(torch.cat(part) for part in zip(*parts)))

    def _forward(self, squares: list[np.ndarray]) -> Features:
        pre = self.spec.preprocessing
        x = np.stack([levels(im, pre.stretch) for im in squares])[:, None]
        if self._engine is not None:
            maps, logits, emb = (torch.from_numpy(a) for a in self._engine(normalise(x, pre.mean, pre.std)))
            return Features(maps, logits, emb)
        x = normalise(torch.from_numpy(x).to(self.device), pre.mean, pre.std)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda" and self.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                maps = self.cnn.forward_features(x)
        else:
            maps = self.cnn.forward_features(x)
        maps = maps.float().contiguous()
        logits = self.cnn.forward_head(maps).float()
        return Features(maps, logits, self.cnn.pool(maps))

    def scores(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated per-target scores (B, T) from logits, and, per target, the refined label
        carrying it (its highest-probability sub-label: the one whose CAM localises it)."""
        softmax = self.spec.architecture.head == "softmax"
        probs = output_probabilities(logits, self.spec.architecture.head)
        per_target = np.zeros((probs.shape[0], len(self.targets)), dtype=np.float32)
        best = np.zeros((probs.shape[0], len(self.targets)), dtype=np.int64)
        for t in range(len(self.targets)):
            kids = self.spec.refined.children(t)
            sub = probs[:, kids]
            best[:, t] = np.asarray(kids)[sub.argmax(1)]
            per_target[:, t] = sub.sum(1) if softmax else sub.max(1)
        return apply_platt(logit(per_target), self.platt), best

    def _batch_cams(self, maps: torch.Tensor, best: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
        """CAMs (P, h, w) for (image, target) pairs, each through the refined label carrying
        that target in that image (`best`): one matrix product per image."""
        n, c, h, w = maps.shape
        out = np.zeros((len(pairs), h, w), dtype=np.float32)
        if not pairs:
            return out
        flat = maps.detach().float().cpu().numpy().reshape(n, c, h * w)
        for b in sorted({b for b, _ in pairs}):
            rows = [i for i, (b_, _) in enumerate(pairs) if b_ == b]
            classes = [int(best[b, pairs[i][1]]) for i in rows]
            out[rows] = (self._head[classes] @ flat[b]).reshape(len(rows), h, w)
        return out

    #: A finding's boxes stay in its site word's band of rows (`site_consistent`); off only to
    #: measure what that rule changes (`benchmarks/words_and_boxes.py`).
    boxes_follow_site = True
    #: Where its words name no site, a finding with a place of its own (an effusion, the heart:
    #: `DISEASE_BANDS`) is boxed only within that band of rows; off only to measure what that
    #: changes (`benchmarks/real_nih.py`).
    boxes_follow_anatomy = True
    #: A finding of a whole organ (Cardiomegaly: the heart; hyper-/hypoinflation, emphysema: both
    #: lungs, `cxr.anatomy.ORGAN_OF_FINDING`) is boxed where the anatomy model finds that organ,
    #: not around its map's peak (a heart border); off only to measure what that changes
    #: (`benchmarks/anatomy.py`). Where the organ is not found, the map's boxes stay.
    boxes_of_whole_organs = True
    #: Cardiomegaly's grade word follows its measured cardiothoracic ratio (`cxr.anatomy.CTR_GRADES`)
    #: where one is measured and names a grade, so the word and the number shown beside it agree;
    #: off only to measure what that changes (`benchmarks/anatomy.py`).
    grade_from_ratio = True
    #: On a CPU the anatomy model reads on a second thread while the words are written, where
    #: the two ran one after the other (on 2 cores the Reader's time after its CNN is then about
    #: the longer of the two); off only to measure what that changes
    #: (`benchmarks/organs_beside_words.py`).
    organs_beside_words = True
    #: The anatomy model reads the CNN's square of a larger film (`_read_organs`) where that
    #: square keeps the 256 px it was trained from; off only to measure what that changes
    #: (`benchmarks/anatomy_square.py`: the same ratios and grades; `benchmarks/decoding.py
    #: --compare organs_from_square`: the time).
    organs_from_square = True
    #: On a CPU the grounded annotator's regions and per-word step run as ONNX Runtime graphs
    #: (`cxr.models.grounded_onnx`), and the global annotator's GRU step too
    #: (`cxr.models.annotator_onnx`), where it is installed: the same words, in less time; off
    #: only to measure what that changes (`benchmarks/decoding.py`).
    onnx_decoding = True
    _anatomy: dict = {}  # the anatomy model by (device, threads), loaded when a film first has such a finding

    def _organ_rows(self, diseases: list[list[str]]) -> list[int]:
        """The images (by their diseases reported) with a finding of a whole organ
        (`cxr.anatomy.organ_of`): those the anatomy model reads."""
        from .anatomy import organ_of

        if not self.boxes_of_whole_organs:
            return []
        return [b for b, names in enumerate(diseases) if any(organ_of(d) for d in names)]

    def _read_organs(self, images: list[np.ndarray], rows: list[int],
                     squares: list[np.ndarray] | None = None) -> dict:
        """The anatomy model's organs of `images[b]` for each row b in `rows`, by row, its boxes
        in the film's pixels. It reads the CNN's square of the film (`squares`) where that holds
        at least the films the network was trained from (`AnatomyModel.trained_from`, 256 px) and
        is smaller than the film: the same area average, one resize of a 1024-px film (~2.4 ms,
        a quarter of the network's time) not done twice."""
        if not rows:
            return {}
        model = self._anatomy_model()
        squares = squares if self.organs_from_square else None
        films = [squares[b] if squares is not None and model.trained_from <= squares[b].shape[0]
                 and all(s >= n for s, n in zip(np.shape(images[b])[:2], squares[b].shape))
                 else images[b] for b in rows]
        return dict(zip(rows, model(films, sizes=[np.shape(images[b])[:2] for b in rows])))

    def _anatomy_model(self):
        """The anatomy model, loaded once per device (load it outside `_one_thread`). Its ONNX
        Runtime session takes one thread where it reads beside the words on a CPU (the words
        hold the other core: a film reporting Cardiomegaly alone read 1.19x its own forward pass
        against 1.21x with two threads, ONNX Runtime's CNN at batch 1), else the CNN's threads."""
        from .anatomy import AnatomyModel

        threads = 1 if self._organs_on_worker else torch.get_num_threads()
        key = (str(self.device), threads)
        if key not in Reader._anatomy:
            Reader._anatomy[key] = AnatomyModel.load(device=self.device, threads=threads)
        return Reader._anatomy[key]

    @property
    def _organs_on_worker(self) -> bool:
        """Whether the anatomy model reads on the worker thread beside the words (a CPU with
        `organs_beside_words`): where it does, and what its session's threads are, follow from this."""
        return self.device.type == "cpu" and self.organs_beside_words

    def _whole_organs(self, images: list[np.ndarray], results: list[Result],
                      views: list[str | None] | None = None, organs: dict | None = None) -> list[Result]:
        """Each reported finding of a whole organ (`cxr.anatomy.organ_of`) boxed with that organ
        where the anatomy model finds it (in place), and Cardiomegaly given the film's
        cardiothoracic ratio (`measurements`), except on an AP film (`views`: its DICOM
        ViewPosition, else the gate's PA/AP call): an AP film magnifies the heart, and
        radiologists do not measure the ratio on one; the grade word then follows the ratio
        (`grade_from_ratio`). A Cardiomegaly without a ratio says why in its `notes`. `organs`:
        the anatomy model's reading of those images by row, where it was read already."""
        from .anatomy import grade_of_ratio, organ_of

        if organs is None:
            organs = self._read_organs(images, self._organ_rows([[f.disease for f in r.findings] for r in results]))
        wanted = [(b, f, organ_of(f.disease)) for b, r in enumerate(results) for f in r.findings]
        wanted = [w for w in wanted if w[2] and w[0] in organs]
        for b, f, organ in wanted:
            box, ratio = organs[b].boxes.get(organ), organs[b].cardiothoracic_ratio
            on_ap = bool(views) and views[b] == "AP"
            if organ == "heart" and on_ap:
                f.notes.append(NO_RATIO_ON_AP)
            elif organ == "heart" and not (box is not None and ratio):
                f.notes.append(NO_RATIO_FOUND)
            if box is not None:
                f.boxes = [Box(f.disease, box.x, box.y, box.w, box.h)]
                if organ == "heart" and ratio and not on_ap:
                    f.measurements = {"cardiothoracic_ratio": round(ratio, 3)}
                    replaced = _grade_by_ratio(f, grade_of_ratio(ratio)) if self.grade_from_ratio else None
                    maps = getattr(results[b].heatmaps, "cams", None)
                    if replaced and maps is not None:  # where it looked writing a word no longer shown
                        maps.pop(f"{f.disease}:{replaced}", None)
        return results

    BOX_SUBCELLS = 4  # boxes are found on a grid of 4 x 4 points per cell of the CNN's map

    def box_grid(self, map_size: int) -> int:
        """Side of the square grid boxes are found on: the model's input size, or 4 points per
        map cell where that is coarser (a 16x16 map of a 256-px model: 64). A bilinearly
        upsampled map changes linearly within a cell, so finer points add no box edge worth the
        time (at 256 px, labelling the input-size grid cost a tenth of DenseNet-121 itself; with
        ChestX-ray8's two thresholds, 98% of boxes on smooth random maps stay within one step of
        this grid of the input-size ones, `tests/test_reader_speed.py`)."""
        return min(self.image_size, self.BOX_SUBCELLS * int(map_size))

    def _on_box_grid(self, cams: np.ndarray) -> np.ndarray:
        """Maps (N, h, w) -> heatmaps (N, g, g) in [0, 1] on the box grid of their own size."""
        grid = self.box_grid(max(np.shape(cams)[-2:]))
        return heatmaps_at(cams, (grid, grid))

    def _boxes(self, heatmaps: np.ndarray, targets: Sequence[str], sizes: Sequence[tuple[int, int]],
               sides: Sequence[str | None] | None = None, params: LocalizeParams | None = None,
               sites: Sequence[Sequence[str]] | None = None) -> list[list[Box]]:
        """Boxes of maps already on the box grid (`heatmaps_at` to `box_grid`), all found at
        once, each in its image's (h, w) pixels; with a site word ("base", "apex"), only within
        that site's band of rows (`site_consistent`), and with none, a disease that has a place of
        its own (an effusion, the heart) only within its band (`disease_band`); with a `side`
        word, only on that side of the patient, from that side's map at its own peak
        (`half_at_own_peak`; replaced in place: pass maps made for this); "bilateral": the first
        box of each side's own map, one per lung."""
        size = heatmaps.shape[-1]
        for i, target in enumerate(targets):
            location = sites[i] if sites and self.boxes_follow_site else ()
            band = disease_band(target) if self.boxes_follow_anatomy else None
            if location or band:
                heatmaps[i] = site_consistent(heatmaps[i], location, band)
        sides = list(sides or [None] * len(heatmaps))
        for i, side in enumerate(sides):
            if side in ("left", "right"):
                heatmaps[i] = half_at_own_peak(heatmaps[i], side)
        both = [i for i, side in enumerate(sides) if side == "bilateral"]
        if both:  # each bilateral map is looked at twice, once per side, and keeps one box of each
            halves = np.stack([half_at_own_peak(heatmaps[i], s) for i in both for s in ("right", "left")])
            heatmaps = np.concatenate([heatmaps, halves])
            targets = list(targets) + [targets[i] for i in both for _ in range(2)]
        found = boxes_from_heatmaps(heatmaps, targets, params or self.spec.localization)
        for k, i in enumerate(both):
            n = len(sides)
            found[i] = found[n + 2 * k][:1] + found[n + 2 * k + 1][:1]
        return [[b.scaled(w / size, h / size) for b in boxes] for boxes, (h, w) in zip(found, sizes)]

    SOURCES = BOX_SOURCES

    @torch.no_grad()
    def localise(self, image, targets: Sequence[str], source: str = "cam",
                 boxes: LocalizeParams | None = None) -> dict[str, list[Box]]:
        """Boxes of each named target on one image (path or array), whether the target is
        detected or not: the ChestX-ray8 protocol localises the disease an image is known to
        have. Boxes of detected findings come with `reader(image)` already. `source`: "cam"
        (class activation map), "attention" (the grounded annotator's finding map, the image
        branch taught by the report cross-attention) or "word" (its map while writing the
        finding's word); the last two need a grounded run. `boxes`: how maps become boxes
        (default: the run's own rule; e.g. `LocalizeParams(0.5)` for one threshold)."""
        if not targets:
            return {}
        unknown = [t for t in targets if t not in self.targets]
        if unknown:
            raise CxrError(f"not a target of this run: {', '.join(unknown)}")
        if source not in self.SOURCES:
            raise CxrError(f"unknown localisation source {source!r}; choose {', '.join(self.SOURCES)}")
        if source != "cam" and self.ground is None:
            raise CxrError(f"this run has no grounded annotator: no {source!r} maps (use source='cam')")
        image = pixels_of(self._load(image))
        maps, logits, _ = self.forward([image])
        h, w = image.shape[:2]
        cols = [self.targets.index(t) for t in targets]
        if source == "cam":
            _, best = self.scores(logits)
            grids = self._batch_cams(maps, best, [(0, c) for c in cols])
        else:
            g = self._ground([0] * len(cols), cols, maps)
            grids = _numpy(g["finding"] if source == "attention" else torch.stack(
                [m[0] if len(m) else f for m, f in zip(g["words"], g["finding"])]))
        return dict(zip(targets, self._boxes(self._on_box_grid(grids), targets, [(h, w)] * len(targets),
                                             params=boxes)))

    def _ground(self, rows: list[int], labels: list[int], maps: torch.Tensor) -> dict:
        """The grounded annotator on (image row, target) pairs: token lists, word maps and
        finding maps as (h, w) grids."""
        h, w = maps.shape[2:]
        lab = torch.tensor(labels, dtype=torch.long, device=maps.device)
        n = self.spec.architecture.max_tokens + 1
        from .models.grounded_onnx import onnx_decoding

        self._use_graphs(self.ground, onnx_decoding)
        images, item_rows = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        if len(images) < len(maps):  # only the images with a finding (a copy: avoided when all have)
            maps = maps[torch.from_numpy(images)]
        seqs, wmaps, finding, fields = self.ground.generate(maps, lab, n, where=self._where,
                                                            rows=item_rows.reshape(-1))
        return {"tokens": [decode(s, self.words)[:self.spec.architecture.max_tokens] for s in seqs],
                "words": [m.reshape(-1, h, w) for m in wmaps], "finding": finding.reshape(-1, h, w),
                "confidence": self._word_confidence(seqs, fields)}

    def _use_graphs(self, annotator, make) -> None:
        """`annotator.decoding`: its ONNX Runtime graphs as `onnx_decoding` says, made by `make`
        (`grounded_onnx.onnx_decoding`, `annotator_onnx.global_onnx_decoding`) when first needed;
        None where ONNX Runtime is missing, off the CPU, or for an LSTM."""
        if self.onnx_decoding and annotator not in self._graphs:
            self._graphs[annotator] = make(annotator) or False  # False: tried, not available
        annotator.decoding = (self._graphs[annotator] or None) if self.onnx_decoding else None

    def _word_confidence(self, seqs: list[list[int]], fields: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        """Per item, the probability the grounded annotator gave the side, site and grade word it
        wrote, among that field's words (its field head, weighed with where the map lies), with
        the run's temperature per field (`RunSpec.word_temperature`, fitted on the validation
        findings): how sure it was of "left" rather than "right" or "bilateral"."""
        probs = {f: _numpy(p) for f, p in fields.items()}
        for f, t in self.spec.word_temperature.items():  # calibrated on the validation findings
            if f in probs:
                scaled = np.power(np.clip(probs[f], 1e-12, 1.0), 1.0 / t)
                probs[f] = scaled / scaled.sum(-1, keepdims=True)
        column = {f: {wid: j for j, wid in enumerate(self.ground.field_words[f])} for f in probs}
        out = []
        for k, seq in enumerate(seqs):
            said = {}
            for f, ids in column.items():
                wid = next((w for w in seq if w in ids), None)
                if wid is not None:
                    said[f] = round(float(probs[f][k, ids[wid]]), 4)
            out.append(said)
        return out

    def annotate(self, embeddings: torch.Tensor, labels: torch.Tensor, beams: int = 1,
                 maps: torch.Tensor | None = None) -> list[list[str]]:
        """Token sequences for (embedding, target index) pairs: greedy (beams=1) or beam search.
        A grounded run writes from the pairs' feature `maps` (B, C, h, w) instead (greedy)."""
        if len(labels) == 0:
            return []
        if self.ground is not None and maps is not None:
            return self._ground(list(range(len(labels))), [int(t) for t in labels], maps.to(self.device))["tokens"]
        emb, lab = embeddings.to(self.device), labels.to(self.device)
        n = self.spec.architecture.max_tokens + 1
        from .models.annotator_onnx import global_onnx_decoding

        self._use_graphs(self.rnn, global_onnx_decoding)
        ids = self.rnn.greedy(emb, lab, n) if beams <= 1 else self.rnn.beam(emb, lab, beams, n)
        return [decode(s, self.words)[:self.spec.architecture.max_tokens] for s in ids]

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
        pixels = [pixels_of(im) for im in loaded]
        views = [im.view if isinstance(im, LoadedImage) else None for im in loaded]  # DICOM ViewPosition
        gate = self.gate
        if gate is None:
            return self._batch(pixels, heatmaps, beams, views)
        reports = gate.check(loaded)
        # the projection the file states (DICOM ViewPosition) first, else the gate's PA/AP call
        views = [v if v in ("PA", "AP") else r.projection or v for v, r in zip(views, reports)]
        todo = [i for i, r in enumerate(reports) if r.accepted or force]
        read = self._batch([gate.correct(pixels[i], reports[i]) for i in todo], heatmaps, beams,
                           [views[i] for i in todo]) if todo else []
        out = [Result(scores={}, model_id=self.model_id, image_size=tuple(np.shape(p)[:2]), quality=r)
               for p, r in zip(pixels, reports)]
        for i, result in zip(todo, read):
            reports[i].forced = not reports[i].accepted
            result.quality = reports[i]
            out[i] = result
        return out

    @torch.no_grad()
    def _batch(self, images: list[np.ndarray], heatmaps: bool, beams: int,
               views: list[str | None] | None = None) -> list[Result]:
        squares = [square(im, self.spec.preprocessing.image_size) for im in images]
        maps, logits, emb = self.forward(images, squares)
        detection = self._detect(logits)
        rows = self._organ_rows([[self.targets[t] for t in hits] for hits in detection.detected])
        if rows:
            self._anatomy_model()  # loaded here, with the CNN's threads, not in the worker
        with _one_thread(self.device):
            # the anatomy model (a second CNN) reads on the other core while this one writes the
            # words: after the CNN, the Reader then takes about the longer of the two, not their sum
            pending = _background().submit(self._read_organs, images, rows, squares) \
                if rows and self._organs_on_worker else None
            results = self._results(images, maps, emb, detection, heatmaps, beams)
        organs = pending.result() if pending is not None else self._read_organs(images, rows, squares)
        return self._whole_organs(images, results, views, organs)

    def _detect(self, logits: torch.Tensor) -> Detection:
        """What the CNN's logits decide before any word: calibrated scores, the refined label
        carrying each, the study's abnormal probability, and the target indices each image reports."""
        scores, best = self.scores(logits)
        normal = self.targets.index(NORMAL) if NORMAL in self.targets else None
        study = self.spec.study
        abnormal = study.probability(scores, self.targets) if study is not None else None
        if study is not None:
            detected = decide(abnormal, scores, self.targets, study.threshold, self.thresholds)
        else:
            detected = []
            for b in range(len(scores)):
                hits = [t for t in range(len(self.targets)) if t != normal and scores[b, t] >= self.thresholds[t]]
                if not hits and normal is not None and scores[b, normal] >= self.thresholds[normal]:
                    hits = [normal]
                detected.append(hits)
        return Detection(scores, best, abnormal, detected)

    def _results(self, images: list[np.ndarray], maps: torch.Tensor, emb: torch.Tensor,
                 detection: Detection, heatmaps: bool, beams: int) -> list[Result]:
        """Everything after the CNN but the organs: findings, annotations, boxes, Results."""
        from .reports.mesh import annotation_term

        scores, best, abnormal, detected = detection
        normal = self.targets.index(NORMAL) if NORMAL in self.targets else None
        study = self.spec.study
        pairs = [(b, t) for b, hits in enumerate(detected) for t in hits]
        grounded, confidence = {}, {}
        if self.ground is not None and pairs:
            g = self._ground([b for b, _ in pairs], [t for _, t in pairs], maps)
            tokens = g["tokens"]
            grounded = {p: (g["finding"][k], g["words"][k]) for k, p in enumerate(pairs)}
            confidence = dict(zip(pairs, g["confidence"]))
        else:
            tokens = self.annotate(emb[[b for b, _ in pairs]] if pairs else emb[:0],
                                   torch.tensor([t for _, t in pairs], dtype=torch.long), beams)
        words = dict(zip(pairs, tokens))
        # the finding is known: the words are read as its qualifiers, whatever their order
        parsed = {}
        for (b, t), toks in words.items():
            parsed[b, t] = annotation_term(self.targets[t], toks) if toks else None
        # each detected disease's map (the run's `box_source`: the grounded annotator's finding
        # map or its map while writing the finding's word, or the CAM), all brought to the box
        # grid (`box_grid`) at once for the whole batch; full-size heatmaps are made only when
        # read (`Heatmaps`)
        located = [(b, t) for b, t in pairs if t != normal]
        if grounded and self.box_source != "cam":
            word = self.box_source == "word"  # the first word's map: the finding's own word
            small_maps = np.stack([_numpy(grounded[p][1][0] if word and len(grounded[p][1]) else grounded[p][0])
                                   for p in located]) if located else None
        else:
            small_maps = self._batch_cams(maps, best, located)
        at_grid = self._on_box_grid(small_maps) if located else None
        where = {pair: i for i, pair in enumerate(located)}
        # on the side its words name (a grounded finding map: where it looked)
        located_boxes = self._boxes(at_grid, [self.targets[t] for _, t in located],
                                    [images[b].shape[:2] for b, _ in located],
                                    [parsed[p].side if parsed.get(p) else None for p in located],
                                    sites=[parsed[p].location if parsed.get(p) else () for p in located]) \
            if located else []
        results = []
        for b, image in enumerate(images):
            h, w = image.shape[:2]
            findings, maps_out = [], {}
            for t in detected[b]:
                target, toks, term = self.targets[t], words.get((b, t), []), parsed.get((b, t))
                boxes: list[Box] = []
                if (b, t) in where:
                    i = where[(b, t)]
                    boxes = located_boxes[i]
                    maps_out[target] = small_maps[i]
                    if (b, t) in grounded:
                        for word, m in zip(toks, grounded[(b, t)][1]):
                            maps_out[f"{target}:{word}"] = _numpy(m)
                findings.append(DetectedFinding(
                    disease=target, score=float(scores[b, t]), annotation=" ".join(toks),
                    organ=term.organ if term else None,
                    location=tuple(term.location) if term else (),
                    side=term.side if term else None,
                    severity=term.severity if term else None, boxes=boxes,
                    confidence=_confidence_of_term(confidence.get((b, t), {}), term)))
            findings.sort(key=lambda f: -f.score)
            results.append(Result(
                scores={t: float(scores[b, k]) for k, t in enumerate(self.targets)}, findings=findings,
                heatmaps=Heatmaps(maps_out if heatmaps else {}, (h, w)),
                embedding=emb[b].cpu().numpy().astype(np.float32),
                model_id=self.model_id, image_size=(int(h), int(w)),
                abnormal=None if abnormal is None else float(abnormal[b]),
                call=None if abnormal is None else ("abnormal" if abnormal[b] >= study.threshold else "normal")))
        return results

    @torch.no_grad()
    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        """Image embeddings (N, D) only (what the archive's vector index stores), of each image
        as the Reader reads it: turned upright when the gate would turn it (no image is refused
        here: an embedding is a search key, not a reading)."""
        items = [images] if _single(images) else list(images)
        out = []
        for s in range(0, len(items), batch_size):
            loaded = [self._load(it) for it in items[s:s + batch_size]]
            pixels = [pixels_of(im) for im in loaded]
            if self.gate is not None:
                pixels = [self.gate.correct(p, r) for p, r in zip(pixels, self.gate.check(loaded))]
            _, _, emb = self.forward(pixels)
            out.append(emb.cpu().numpy())
        return np.concatenate(out).astype(np.float32)


_THREADPOOLS = None
_BACKGROUND: dict[int, ThreadPoolExecutor] = {}


def _background() -> ThreadPoolExecutor:
    """One worker beside the thread that writes the words (`Reader._batch`), for the anatomy
    model's read; one per process (a forked child does not inherit the parent's thread, and
    an executor that thinks it has one would never run the work)."""
    import os

    pid = os.getpid()
    if pid not in _BACKGROUND:
        _BACKGROUND[pid] = ThreadPoolExecutor(1, thread_name_prefix="cxr-organs")
    return _BACKGROUND[pid]


@contextmanager
def _one_thread(device: torch.device):
    """One thread for torch, BLAS and OpenMP while a block runs on the CPU. What follows the
    CNN is small work (a few GRU steps on a handful of findings, maps of 16x16 to 256x256): a
    second thread only waits on the first, and on a busy CPU those waits and the spinning
    BLAS/OpenMP workers cost more than the work (up to half the time of a film's forward
    pass, measured on 2 shared cores)."""
    global _THREADPOOLS
    if device.type != "cpu":
        yield
        return
    from threadpoolctl import ThreadpoolController

    _THREADPOOLS = _THREADPOOLS or ThreadpoolController()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _THREADPOOLS.limit(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def _grade_by_ratio(finding: DetectedFinding, grade: str | None) -> str | None:
    """The finding's severity word (and its annotation) set to `grade`, in place; the annotator's
    confidence in the word it wrote no longer applies. Returns the word replaced (None: none; no
    grade, or the same one: the annotator's word stays)."""
    if grade is None or grade == finding.severity:
        return None
    old, words = finding.severity, finding.annotation.split()
    if old and old in words:
        words[words.index(old)] = grade
    else:
        words.append(grade)
    finding.severity, finding.annotation = grade, " ".join(words)
    finding.confidence.pop("severity", None)
    return old


def _confidence_of_term(confidence: dict[str, float], term) -> dict[str, float]:
    """The word confidences of the fields the parsed term kept (a side word the parser did not
    take as the side is not reported as one)."""
    if term is None:
        return {}
    kept = {"side": term.side, "location": term.location, "severity": term.severity}
    return {f: p for f, p in confidence.items() if kept.get(f)}


def _numpy(x) -> np.ndarray:
    """A map as float32 NumPy (a tensor is detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _single(images) -> bool:
    """A path, a LoadedImage, a 2-D array, or an (H, W, 3|4) colour array is one image; lists,
    tuples and (N, H, W) stacks are many."""
    if isinstance(images, (str, Path)) or hasattr(images, "pixels"):
        return True
    ndim = getattr(images, "ndim", None)
    if ndim == 2:
        return True
    return ndim == 3 and images.shape[-1] in (3, 4)
