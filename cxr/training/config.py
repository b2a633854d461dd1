"""`TrainConfig`: every choice of a training run in one dataclass (stored in the checkpoint)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import CxrError
from ..runspec import BOX_SOURCES, POOLINGS


@dataclass
class TrainConfig:
    """A run is reproducible from this (plus the data it names).

    Defaults follow Shin et al. 2016 where the paper says (images 256, random crop 224, labels with
    >= 30 cases, cascade clusters of >= 170 members into n/50) and are modest elsewhere.
    """

    data: str = ""                   # source spec: "openi:PATH", "nih:PATH", "folder:PATH", "phantom:PATH"
    backbone: str = "googlenet"      # tiny | nin | googlenet | densenet121
    rnn: str = "gru"                 # gru | lstm
    image_size: int = 256            # images are resized to this square once (disk cache)
    crop: int = 224                  # random crop in training; inference sees the whole image
    epochs: int = 30                 # CNN epochs, stage 1
    cascade_epochs: int | None = None  # CNN epochs on the refined labels (None: same as epochs)
    rnn_epochs: int = 40             # RNN epochs (each stage)
    batch_size: int = 32
    rnn_batch_size: int = 64
    lr: float = 1e-3                 # AdamW, cosine decay over the phase
    rnn_lr: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2             # before the CNN head
    rnn_hidden: int = 512            # paper: 1024
    rnn_embed: int = 256
    data_dropout: bool = True        # Shin et al.: drop normals, duplicate minority classes
    normal_keep_factor: float = 4.0  # keep a normal with p = min(1, factor * n_max / n_normal)
    max_duplicate: int = 4           # at most this many copies of a minority-class image per epoch
    class_weighted: bool = False     # BCE with positive weights neg/pos per label (Wang et al.)
    cascade: bool = True             # cluster joint image/text contexts, retrain on refined labels
    min_cluster_members: int = 170   # labels with fewer (image, finding) pairs are not split
    images_per_cluster: int = 50     # k = members // images_per_cluster
    min_label_count: int = 30        # a disease becomes a target with >= this many training images
    views: str = "frontal"           # frontal | lateral | all (Open-i has both per report)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train/val/test, by patient
    seed: int = 0
    split_seed: int | None = None    # the patient split's seed (None: seed)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: bool = True                 # mixed precision on CUDA (bf16 where supported, else fp16)
    num_workers: int = 2             # DataLoader workers and image-decoding threads
    pretrained: str | None = None    # a state dict (safetensors / weights-only torch) for the CNN
    rotation: float = 5.0            # augmentation: degrees
    intensity: float = 0.1           # augmentation: gamma/contrast/brightness jitter
    pooling: str = "class_lse"       # class_lse (each class map by its own learnt LSE) | avg (CAM's) | lse (ChestX-ray8's)
    lse_r: float = 10.0              # LSE sharpness: small = average, large = max
    transition: int = 0              # ChestX-ray8 transition layer width before pooling (0: none)
    members: int = 1                 # CNN trunks side by side, each trained on its own: an ensemble in one network
    ensemble: int = 1                # networks trained apart (seeds seed..seed+K-1, one split), merged into one run
    annotator: str = "grounded"      # grounded (attends over the feature map) | global (Shin's)
    ground_epochs: int = 12          # joint CNN + grounded-annotator epochs after the last CNN phase
    ground_lr: float = 1e-3
    ground_cnn_lr: float = 0.1       # the CNN's share of ground_lr in that phase: keeps detection from drifting
    attn_dim: int = 128              # the grounded annotator's region/attention width
    report_text: bool = True         # train with report cross-attention (Bhalodia et al. 2021)
    side_mil: float = 0.1            # CNN phases: weight of the side-word loss per image half (0: off)
    boxes: str = "chestxray8"        # chestxray8 (a box per region above 180/255 and above 60/255) | threshold
    localize_threshold: float = 0.5  # the heatmap threshold of --boxes threshold
    max_boxes: int = 2               # per finding and threshold
    box_source: str = "auto"         # auto | cam | attention | word: the map a finding's boxes come from
    cache_dir: str | None = None     # image cache (default RUN/cache)
    progress: bool = True
    max_images: int | None = None    # use only the first N studies' images (quick trials)
    labels: str = "diseases"         # diseases (multi-label, sigmoid) | shin2016 (one pattern, softmax)
    batch_norm: bool = True          # off: every batch norm becomes a per-channel scale and shift
    operating_point: str = "sensitivity=0.9"  # study-level target on validation: sensitivity=S | specificity=S | f1
    labels_from: str = "labels"      # labels: the source's own (MeSH, table, manifest) | report: mined from the text
    uncertain: str = "ignore"        # --labels-from report: uncertain mentions ignore (masked) | positive | negative

    def __post_init__(self):
        self.fractions = tuple(float(f) for f in self.fractions)
        if self.backbone not in ("tiny", "nin", "googlenet", "densenet121"):
            raise CxrError(f"unknown backbone {self.backbone!r}")
        if self.rnn not in ("gru", "lstm"):
            raise CxrError(f"unknown rnn {self.rnn!r}; choose gru or lstm")
        if self.pooling not in POOLINGS:
            raise CxrError(f"unknown pooling {self.pooling!r}; choose {', '.join(POOLINGS)}")
        if self.annotator not in ("grounded", "global"):
            raise CxrError(f"unknown annotator {self.annotator!r}; choose grounded or global")
        if self.views not in ("frontal", "lateral", "all"):
            raise CxrError(f"unknown views {self.views!r}; choose frontal, lateral or all")
        if self.boxes not in ("threshold", "chestxray8"):
            raise CxrError(f"unknown boxes {self.boxes!r}; choose threshold or chestxray8")
        if self.box_source not in ("auto", *BOX_SOURCES):
            raise CxrError(f"unknown box source {self.box_source!r}; choose {', '.join(('auto', *BOX_SOURCES))}")
        if self.box_source in ("attention", "word") and self.annotator != "grounded":
            raise CxrError(f"--box-source {self.box_source} needs the grounded annotator (--annotator grounded)")
        if self.labels not in ("diseases", "shin2016"):
            raise CxrError(f"unknown labels {self.labels!r}; choose diseases or shin2016")
        if self.labels_from not in ("labels", "report"):
            raise CxrError(f"unknown labels_from {self.labels_from!r}; choose labels or report")
        if self.uncertain not in ("ignore", "positive", "negative"):
            raise CxrError(f"unknown uncertainty policy {self.uncertain!r}; choose ignore, positive or negative")
        from ..operating import OperatingPoint

        self.operating_point = str(OperatingPoint.parse(self.operating_point))
        if self.members < 1:
            raise CxrError(f"members must be at least 1, got {self.members}")
        if self.members > 1 and self.transition:
            raise CxrError("a transition layer would mix the members' maps; use --members 1 or --transition 0")
        if self.ensemble < 1:
            raise CxrError(f"ensemble must be at least 1, got {self.ensemble}")
        if self.ensemble > 1 and self.members > 1:
            raise CxrError("--ensemble K merges K one-member networks; use --members 1 with it")
        if self.ensemble > 1 and self.cascade:
            raise CxrError("--ensemble needs --no-cascade: each network's cascade would refine its labels "
                           "its own way, and the merged head needs one label space")
        if self.ensemble > 1 and self.transition:
            raise CxrError("a transition layer would mix the members' maps; use --transition 0 with --ensemble")
        if self.crop > self.image_size:
            raise CxrError(f"crop {self.crop} is larger than image_size {self.image_size}")
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-6:
            raise CxrError(f"fractions must be three numbers summing to 1, got {self.fractions}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fractions"] = list(self.fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # settings that may change between an interrupted run and its resumption
    RESUMABLE_CHANGES = ("epochs", "cascade_epochs", "rnn_epochs", "device", "amp", "num_workers",
                         "progress", "cache_dir")

    @property
    def patient_split_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def same_run(self, other: "TrainConfig") -> list[str]:
        """Names of settings that differ in a way that makes resuming wrong."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in self.RESUMABLE_CHANGES and a[k] != b[k]]
