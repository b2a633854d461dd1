"""From Study records to what the models train on: images, patient split, targets, sequences.

Labels follow Shin et al. 2016 through `cxr.reports.labels`: a study's terms are its positive
MeSH terms (`study_terms`), a term's disease is its pattern element (`pattern_element`:
`Opacity/lung/base/left` -> `Opacity`, `Lung/hypoinflation/mild` -> `Lung/hypoinflation`),
`normal` is a term of its own, and studies without usable terms (`No Indexing`) are left out.
Targets are `normal` plus each disease carried by >= `min_label_count` training images. Where Shin
counted whole patterns (single-pattern images only), we count diseases and train multi-label, so
an image with two diseases is a positive of both. Every (image, term) pair is one annotation
sequence for the RNN (the term's tokens, `term_tokens`).

`label_space="shin2016"` is the paper's own set-up instead: an image's target is its whole
pattern (`study_pattern`), one-hot over the patterns that `cxr labels` lists (>= `min_label_count`
images among all the studies given, as Shin et al. counted them), for a softmax; images whose
pattern is not one of them (most multi-finding images) are left out, as in the paper. The
vocabulary is
`cxr.reports.labels.Vocabulary` built on the training studies. The split is
`cxr.splits.split_by_patient`, stored as patient lists.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import CxrError
from ..records import Study, term_tokens
from ..reports.report_labels import IGNORED

NORMAL = "normal"
SPLITS = ("train", "val", "test")
LABEL_SPACES = ("diseases", "shin2016")


@dataclass
class Prepared:
    paths: list[str]
    image_ids: list[str]
    study_ids: list[str]
    patients: list[str]
    split: np.ndarray                 # (N,) 0 train, 1 val, 2 test, -1 left out (unreadable)
    targets: list[str]
    labels: np.ndarray                # (N, T) multi-hot over targets
    pairs: list[tuple[int, int, list[str]]]  # (image index, target index, tokens)
    words: list[str]                  # SPECIALS + vocabulary (index = token id)
    patient_split: dict[str, list[str]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> problem (left out)
    reports: list[dict[str, str]] = field(default_factory=list)  # each image's report sections
    mask: np.ndarray | None = None    # (N, T) 0 where a label is unknown (an ignored uncertain
                                      # mention, `--labels-from report`); None: every label known

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(name))

    def scored(self, name: str) -> np.ndarray:
        """The split's images whose every label is known: validation metrics, calibration and
        thresholds leave out studies with an ignored uncertain mention (`--labels-from report
        --uncertain ignore`)."""
        idx = self.indices(name)
        return idx if self.mask is None else idx[self.mask[idx].all(1)]

    def leave_out(self, failed: dict[int, str]) -> None:
        """Unreadable images (index -> problem) are left out of every split and listed."""
        if failed:
            self.split[list(failed)] = -1
            self.unreadable = {self.paths[i]: problem for i, problem in failed.items()}

    @property
    def word_index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def split_patients(studies: list[Study], fractions, seed: int) -> dict[str, list[str]]:
    """Patient ids per split, by `cxr.splits.split_by_patient` (seeded)."""
    from ..splits import split_by_patient

    splits = split_by_patient(studies, fractions, seed)
    return {name: sorted({str(s.patient_id) for s in group}) for name, group in splits.items()}


def _use_view(image, views: str) -> bool:
    if views == "all":
        return True
    return image.frontal if views == "frontal" else not image.frontal


def finding_sequences(study: Study) -> list[tuple[str, list[str]]]:
    """(disease, tokens) of each of a study's terms (Shin's rules; `normal` -> ["normal"]);
    empty when the study is not labelled."""
    from ..reports.labels import pattern_element, study_terms

    return [(pattern_element(t), term_tokens(t)) for t in study_terms(study)]


def prepare(studies: list[Study], views: str = "frontal", fractions=(0.7, 0.1, 0.2), seed: int = 0,
            min_label_count: int = 30, patient_split: dict[str, list[str]] | None = None,
            targets: list[str] | None = None, words: list[str] | None = None,
            label_space: str = "diseases") -> Prepared:
    """Select labelled images of the chosen views, split by patient (or reuse `patient_split`),
    build targets and vocabulary (or reuse the stored ones, when resuming or evaluating).
    `label_space`: "diseases" (multi-label, the default) or "shin2016" (one pattern per image)."""
    if label_space not in LABEL_SPACES:
        raise CxrError(f"unknown label space {label_space!r}; choose {' or '.join(LABEL_SPACES)}")
    rows, seqs = [], []
    for s in studies:
        sq = finding_sequences(s)
        if not sq and not s.meta.get(IGNORED):  # (a report saying only "cannot exclude X" is
            continue                            # still a negative of every other target)
        for im in s.images:
            if im.path is not None and _use_view(im, views):
                rows.append((s, im))
                seqs.append(sq)
    if not rows:
        raise CxrError(f"no labelled images with files for views={views!r} in the data")
    patients = [str(s.patient_id or s.id) for s, _ in rows]
    if patient_split is None:
        import dataclasses

        used = [dataclasses.replace(s, patient_id=str(s.patient_id or s.id))
                for s in {id(s): s for s, _ in rows}.values()]
        patient_split = split_patients(used, fractions, seed)
    where = {p: i for i, name in enumerate(SPLITS) for p in patient_split[name]}
    split = np.array([where.get(p, 2) for p in patients], dtype=np.int64)  # unknown -> test
    if label_space == "shin2016":
        return _patterns(rows, seqs, patients, split, patient_split, min_label_count, targets, words)

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
    mask = None
    if any(s.meta.get(IGNORED) for s, _ in rows):
        mask = np.ones_like(labels)
        for i, (s, _) in enumerate(rows):
            for name in s.meta.get(IGNORED) or ():
                if name in t_index:
                    mask[i, t_index[name]] = 0
    if words is None:
        from ..reports.labels import Vocabulary

        train_studies = list({id(s): s for (s, _), k in zip(rows, split) if k == 0}.values())
        words = Vocabulary.build(train_studies).tokens
    return Prepared(
        paths=[str(im.path) for _, im in rows], image_ids=[im.id for _, im in rows],
        study_ids=[s.id for s, _ in rows], patients=patients, split=split, targets=list(targets),
        labels=labels, pairs=pairs, words=list(words),
        patient_split={k: list(v) for k, v in patient_split.items()},
        reports=[dict(s.report or {}) for s, _ in rows], mask=mask)


def _patterns(rows, seqs, patients, split, patient_split, min_count, targets, words) -> Prepared:
    """Shin et al.'s targets: one pattern per image (softmax), images of other patterns left out
    (split -1); every term of an image is an annotation of its pattern."""
    from ..reports.labels import LabelSpace, Vocabulary

    if targets is None:
        space = LabelSpace.build(list({id(s): s for s, _ in rows}.values()), min_count)
    else:
        space = LabelSpace(list(targets))
    labels = np.stack([space.labels_of(s) for s, _ in rows]).astype(np.float32)
    certain = np.array([not s.meta.get(IGNORED) for s, _ in rows])  # an uncertain mention: pattern unknown
    labels[~certain] = 0
    split = np.where(labels.any(1), split, -1)
    pairs = [(i, int(labels[i].argmax()), tokens) for i, sq in enumerate(seqs) if labels[i].any()
             for _, tokens in sq]
    if words is None:
        train_studies = list({id(s): s for (s, _), k in zip(rows, split) if k == 0}.values())
        words = Vocabulary.build(train_studies).tokens
    return Prepared(
        paths=[str(im.path) for _, im in rows], image_ids=[im.id for _, im in rows],
        study_ids=[s.id for s, _ in rows], patients=patients, split=split, targets=list(space.targets),
        labels=labels, pairs=pairs, words=list(words),
        patient_split={k: list(v) for k, v in patient_split.items()},
        reports=[dict(s.report or {}) for s, _ in rows])
