"""`RunSpec`: everything a trained run says about itself, typed, in one place.

Training writes it (RUN/config.json, beside RUN/weights.safetensors); the Reader, evaluation,
the archive, the service and the demo read it, and nothing else reads the JSON. Each setting has
exactly one meaning and at most one default, here: a reader never guesses with
`config.get(key, default)`, so two readers cannot disagree about how a run was preprocessed.

    spec = RunSpec.from_json(text)          # or cxr.checkpoint.load_spec(RUN)
    spec.preprocessing.image_size, spec.thresholds["Cardiomegaly"], spec.data.patients["test"]
    text = spec.to_json()

The JSON is plain: one object per dataclass, field names as keys, plus `"format": "cxr-run/2"`
(the schema version). Unknown keys and missing required keys are one clear `CxrError`.

ADDING A FIELD: add one line to the dataclass it belongs to, WITH a default (the value that
describes runs written before the field existed), e.g.

    quality_gate: float | None = None   # in RunSpec: why it exists, what None means

and write it in training (`cxr.training.pipeline._write_run`). The field is then serialised,
read back, and defaulted for older runs with no other change. All dataclasses are keyword-only,
so order does not matter, and frozen: a changed copy is `dataclasses.replace(spec, thresholds=...)`
(the Reader derives arrays from its spec once). Nested settings get their own dataclass (a field
typed with it is (de)serialised recursively, also inside `X | None`).

Runs written before this module (`"format": "cxr-run/1"`, the same keys) load through
`from_v1`, which requires every key the v1 writer wrote.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass

from .errors import CxrError
from .models.cascade import RefinedLabels
from .operating import StudyGate

FORMAT = "cxr-run/2"
V1_FORMAT = "cxr-run/1"

__all__ = ["FORMAT", "Architecture", "Calibration", "DataSpec", "LabelMining", "LocalizeParams", "Preprocessing",
           "RunSpec", "from_v1"]


@dataclass(kw_only=True, frozen=True)
class Preprocessing:
    """How an image as loaded (float32 (H, W) in [0, 1], bright = dense) becomes the model's
    input: resized to `image_size` (area), optionally percentile-stretched (`stretch`, 0.5-99.5th
    percentiles to [0, 1]), then (x - mean) / std. `crop` is the training crop (inference sees the
    whole image)."""

    image_size: int
    crop: int
    mean: float
    std: float
    stretch: bool
    input: str = ("float32 (H, W) in [0, 1], bright = dense; resized to image_size (area), "
                  "0.5-99.5th percentiles stretched to [0, 1], then (x - mean) / std")


@dataclass(frozen=True)
class LocalizeParams:
    """CAM heatmap -> boxes (`cxr.models.localize`): `threshold` on the [0, 1] heatmap;
    components smaller than `min_area` (fraction of the image) are dropped; at most `max_boxes`
    per finding, by CAM mass. `also`: further thresholds whose components are boxes too, listed
    after the first threshold's (ChestX-ray8 thresholds its heatmaps at 180/255 and at 60/255:
    `cxr.models.localize.CHESTXRAY8_THRESHOLDS`)."""

    threshold: float = 0.5
    max_boxes: int = 2
    min_area: float = 0.002
    also: tuple[float, ...] = ()
    # the map a detected finding's boxes and heatmap come from: "cam", "attention" (the grounded
    # annotator's finding map) or "word" (its map while writing the finding's word); "" (runs
    # from before this field): the finding map for a grounded run, the CAM otherwise
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "also", tuple(float(t) for t in self.also))
        if self.source not in BOX_SOURCES + ("",):
            raise CxrError(f"unknown box source {self.source!r}; choose {', '.join(BOX_SOURCES)}")

    @property
    def thresholds(self) -> tuple[float, ...]:
        return (float(self.threshold), *self.also)


BOX_SOURCES = ("cam", "attention", "word")
# the CNN head's poolings (`cxr.models.cnn`): average (CAM), ChestX-ray8's log-sum-exp of the
# features, or each class map by its own learnt log-sum-exp
POOLINGS = ("avg", "lse", "class_lse")


@dataclass(kw_only=True, frozen=True)
class Architecture:
    """What to build before loading the weights: the CNN (`backbone`, `num_classes` refined
    outputs, `in_chans`, embedding size `image_dim`) and the annotator RNN; `max_tokens` is the
    longest annotation it writes."""

    backbone: str
    num_classes: int
    in_chans: int
    image_dim: int
    rnn: str
    rnn_hidden: int
    rnn_embed: int
    vocab_size: int
    num_labels: int
    max_tokens: int
    pooling: str = "avg"          # the CNN head's pooling: avg | lse (ChestX-ray8) | class_lse
    lse_r: float = 10.0
    transition: int = 0           # ChestX-ray8 transition layer width (0: none)
    annotator: str = "global"     # global (Shin's RNN on the pooled embedding) | grounded
    attn_dim: int = 0             # the grounded annotator's width (weights "ground.*")
    batch_norm: bool = True            # False: batch norms replaced by per-channel scale and shift
    head: str = "sigmoid"              # sigmoid: multi-label | softmax: one pattern per image (shin2016)
    members: int = 1                   # CNN trunks side by side (an ensemble in one network)


@dataclass(kw_only=True, frozen=True)
class Calibration:
    """Platt scaling per target on logits: score = sigmoid(a * z + b), params {target: [a, b]}."""

    method: str
    params: dict[str, list[float]]


@dataclass(kw_only=True, frozen=True)
class DataSpec:
    """The data a run was trained on and its split by patient (so evaluation scores exactly the
    run's test patients)."""

    spec: str                                  # source spec, e.g. "openi:PATH"
    views: str                                 # frontal | lateral | all
    split_seed: int
    fractions: list[float]                     # train, val, test
    patients: dict[str, list[str]]             # {"train": [...], "val": [...], "test": [...]}
    counts: dict[str, int]                     # images per split
    unreadable: dict[str, str]                 # file -> problem (left out)
    label_counts: dict[str, int]               # training images per target


@dataclass(kw_only=True, frozen=True)
class LabelMining:
    """Labels mined from the reports (`cxr train --labels-from report`): the uncertainty policy
    (ignore: masked out of the loss | positive | negative), the per-study records in the run
    directory (report hash, mined findings, labels; `cxr labels --audit RUN`), and how many
    studies were labelled or left out for want of a usable report."""

    uncertain: str
    records: str = "mined_labels.jsonl"
    studies: int = 0
    left_out: int = 0


@dataclass(kw_only=True, frozen=True)
class RunSpec:
    """A trained run: what it predicts (`targets`, the CNN's `refined` labels -> target), how to
    build and feed it, what its scores mean (`calibration`, operating `thresholds`), how it
    localises, and which data and split it came from."""

    cxr_version: str
    stage: str                                 # "stage1" | "cascade" | "ensemble" (cxr train --ensemble)
    created: str                               # UTC, ISO 8601
    architecture: Architecture
    targets: list[str]                         # the output keys (original labels)
    refined: RefinedLabels                     # the CNN's outputs -> target index
    vocabulary: list[str]                      # annotation tokens, id = index, specials first
    preprocessing: Preprocessing
    calibration: Calibration
    thresholds: dict[str, float]               # operating threshold per target (calibrated score)
    threshold_rule: str                        # how the thresholds were chosen
    localization: LocalizeParams               # CAM heatmap -> boxes
    validation: dict[str, float]               # val_images, val_auc
    train_config: dict                         # the TrainConfig (cxr.training.config) as a dict
    pretrained: dict | None                    # what loading the pretrained CNN reported, or None
    data: DataSpec
    seed: int
    study: StudyGate | None = None             # the study-level answer (abnormal probability, its
                                               # threshold); None: a run from before it existed
    labels_from: str = "labels"                # labels: the source's own | report: mined from its text
    label_mining: LabelMining | None = None    # how, when labels_from is "report"
    # per context field (side, location, severity), the temperature that calibrates the grounded
    # annotator's confidence in the word it writes, fitted on the validation findings; a field
    # absent (a run from before, or too few validation words): 1, the raw field probabilities
    word_temperature: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        problems = []
        missing = [t for t in self.targets if t not in self.thresholds]
        if missing:
            problems.append(f"no threshold for {', '.join(missing)}")
        missing = [t for t in self.targets if t not in self.calibration.params]
        if missing:
            problems.append(f"no calibration for {', '.join(missing)}")
        if len(self.refined.names) != self.architecture.num_classes:
            problems.append(f"{len(self.refined.names)} refined labels for {self.architecture.num_classes} outputs")
        if any(not 0 <= p < len(self.targets) for p in self.refined.parents):
            problems.append("a refined label's parent is not a target")
        if len(self.targets) != self.architecture.num_labels:
            problems.append(f"{len(self.targets)} targets for {self.architecture.num_labels} annotator labels")
        if len(self.vocabulary) != self.architecture.vocab_size:
            problems.append(f"{len(self.vocabulary)} words for an annotator of {self.architecture.vocab_size}")
        if problems:
            raise CxrError("inconsistent run: " + "; ".join(problems))

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": FORMAT, **_plain(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "RunSpec":
        """A v2 dict (`to_dict`) or a v1 one (converted by `from_v1`); anything else is a CxrError."""
        if not isinstance(d, dict):
            raise CxrError("a run's config must be a JSON object", where)
        fmt = d.get("format")
        if fmt == V1_FORMAT:
            return from_v1(d, where)
        if fmt != FORMAT:
            raise CxrError(f"unknown run format {fmt!r} (this cxr reads {FORMAT} and {V1_FORMAT})", where)
        return _build(cls, {k: v for k, v in d.items() if k != "format"}, where, "")

    @classmethod
    def from_json(cls, text: str, where: str = "config.json") -> "RunSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CxrError(f"not valid JSON: {exc}", where) from None
        return cls.from_dict(d, where)

    # ------------------------------------------------------------------ conveniences

    @property
    def model_name(self) -> str:
        """backbone-stage, the start of the Reader's model id."""
        return f"{self.architecture.backbone}-{self.stage}"


# Every key the v1 writer (before RunSpec) wrote, by section. Fixed: fields added to RunSpec later
# have defaults and are not looked for in a v1 run.
V1_KEYS = {
    "": ("cxr_version", "stage", "created", "architecture", "targets", "refined", "vocabulary",
         "preprocessing", "calibration", "thresholds", "threshold_rule", "localization", "validation",
         "train_config", "pretrained", "data", "seed"),
    "preprocessing": ("image_size", "crop", "mean", "std", "stretch"),
    "architecture": ("backbone", "num_classes", "in_chans", "image_dim", "rnn", "rnn_hidden", "rnn_embed",
                     "vocab_size", "num_labels", "max_tokens"),
    "localization": ("threshold", "max_boxes", "min_area"),
    "calibration": ("method", "params"),
    "data": ("spec", "views", "split_seed", "fractions", "patients", "counts", "unreadable", "label_counts"),
}


def from_v1(d: dict, where: str = "config.json") -> RunSpec:
    """A run written before RunSpec (`cxr-run/1`). Its writer stored the same keys, so the
    conversion is the v2 reading with every v1 key required: a v1 run lacking one (an early run
    without `stretch` or `max_tokens`, whose readers guessed) is refused, never guessed."""
    for section, keys in V1_KEYS.items():
        part = d.get(section) if section else d
        lacking = [k for k in keys if not isinstance(part, dict) or k not in part]
        if lacking:
            names = ", ".join(f"{section}.{k}" if section else k for k in lacking)
            raise CxrError(f"an old ({V1_FORMAT}) run without {names}: retrain it with this cxr", where)
    return _build(RunSpec, {k: v for k, v in d.items() if k != "format"}, where, "")


# ---------------------------------------------------------------------------- (de)serialising

def _plain(value):
    """Dataclasses -> dicts, tuples -> lists, recursively (what json.dumps takes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _dataclass_in(hint):
    """The dataclass a field is typed with (directly or as `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _build(cls, d, where: str, path: str):
    if not isinstance(d, dict):
        raise CxrError(f"{path or 'the run'} must be a JSON object", where)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise CxrError(f"unknown field(s) {', '.join(path + k for k in unknown)} "
                       "(written by a newer cxr?)", where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CxrError(f"missing field {path}{f.name}", where)
            continue
        value, inner = d[f.name], _dataclass_in(hints[f.name])
        if inner is not None and value is not None:
            value = _build(inner, value, where, f"{path}{f.name}.")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise CxrError(f"{path or 'run'}: {exc}", where) from None
