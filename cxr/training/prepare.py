"""From Study records to what the models train on: images, patient split, targets, sequences.

Targets: `normal` plus every disease with at least `min_label_count` training images (Shin et
al.: 17 patterns with >= 30 cases). Each image inherits the positive findings of its study (Open-i
labels are per report). Every (image, finding) pair whose disease is a target is one annotation
sequence for the RNN (`Finding.tokens()`; `normal` for normal studies). The vocabulary is the
tokens of the training sequences.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import CxrError
from ..models.annotator import SPECIALS
from ..records import Study

NORMAL = "normal"
SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    paths: list[str]
    image_ids: list[str]
    study_ids: list[str]
    patients: list[str]
    split: np.ndarray                 # (N,) 0 train, 1 val, 2 test
    targets: list[str]
    labels: np.ndarray                # (N, T) multi-hot over targets
    pairs: list[tuple[int, int, list[str]]]  # (image index, target index, tokens)
    words: list[str]                  # SPECIALS + vocabulary (index = token id)
    patient_split: dict[str, list[str]] = field(default_factory=dict)

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(name))

    @property
    def word_index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def split_patients(patients: list[str], fractions, seed: int) -> dict[str, list[str]]:
    """Patient ids -> train/val/test, seeded; val and test get at least one patient when there
    are three or more."""
    unique = sorted(set(patients))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n = len(order)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


def _use_view(image, views: str) -> bool:
    if views == "all":
        return True
    return image.frontal if views == "frontal" else not image.frontal


def finding_sequences(study: Study) -> list[tuple[str, list[str]]]:
    """(disease, tokens) for each positive finding of a study; [("normal", ["normal"])] when normal."""
    if study.normal:
        return [(NORMAL, [NORMAL])]
    out = []
    for f in study.positive:
        tokens = f.tokens() or [f.disease.lower()]
        out.append((f.disease, tokens))
    return out


def prepare(studies: list[Study], views: str = "frontal", fractions=(0.7, 0.1, 0.2), seed: int = 0,
            min_label_count: int = 30, patient_split: dict[str, list[str]] | None = None,
            targets: list[str] | None = None, words: list[str] | None = None) -> Prepared:
    """Select images, split by patient (or reuse `patient_split`), build targets and vocabulary
    (or reuse the stored ones, when resuming or evaluating)."""
    rows = []
    for s in studies:
        for im in s.images:
            if im.path is not None and _use_view(im, views):
                rows.append((s, im))
    if not rows:
        raise CxrError(f"no images with files for views={views!r} in the data")
    patients = [s.patient_id or s.id for s, _ in rows]
    patient_split = patient_split or split_patients(patients, fractions, seed)
    where = {p: i for i, name in enumerate(SPLITS) for p in patient_split[name]}
    split = np.array([where.get(p, 2) for p in patients], dtype=np.int64)  # unknown -> test

    seqs = [finding_sequences(s) for s, _ in rows]
    if targets is None:
        counts = Counter()
        for i, sq in enumerate(seqs):
            if split[i] == 0:
                counts.update({d for d, _ in sq})
        diseases = sorted((d for d, c in counts.items() if c >= min_label_count and d != NORMAL),
                          key=lambda d: (-counts[d], d))
        targets = ([NORMAL] if counts[NORMAL] else []) + diseases
        if not diseases:
            raise CxrError(f"no disease has >= {min_label_count} training images; lower min_label_count "
                           f"(most frequent: {counts.most_common(3)})")
    t_index = {t: i for i, t in enumerate(targets)}
    labels = np.zeros((len(rows), len(targets)), dtype=np.float32)
    pairs = []
    for i, sq in enumerate(seqs):
        for disease, tokens in sq:
            if disease in t_index:
                labels[i, t_index[disease]] = 1
                pairs.append((i, t_index[disease], tokens))
    if words is None:
        vocab = Counter(tok for i, _, toks in pairs if split[i] == 0 for tok in toks)
        words = list(SPECIALS) + sorted(vocab, key=lambda w: (-vocab[w], w))
    return Prepared(
        paths=[str(im.path) for _, im in rows], image_ids=[im.id for _, im in rows],
        study_ids=[s.id for s, _ in rows], patients=patients, split=split, targets=list(targets),
        labels=labels, pairs=pairs, words=list(words),
        patient_split={k: list(v) for k, v in patient_split.items()})
