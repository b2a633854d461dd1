"""Patient-wise train/val/test splits: no patient's images in two splits, reproducible by seed.

Patients (not studies) are shuffled with `numpy.random.default_rng(seed)` after sorting their
ids, so the split depends only on the set of patient ids and the seed, not on input order.
Split sizes are counted in patients (NIH has up to 184 images per patient; Open-i one report per
patient). Every split with a non-zero fraction gets at least one patient when there are enough.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from .errors import CxrError
from .records import Study

SPLITS = ("train", "val", "test")


def split_by_patient(
    studies: Sequence[Study],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[str, list[Study]]:
    """{"train": [...], "val": [...], "test": [...]}; studies keep their input order within a split."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise CxrError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(studies):
        if not s.patient_id:
            raise CxrError(f"study {s.id!r} has no patient id; cannot split by patient")
        by_patient[str(s.patient_id)].append(i)
    patients = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(patients))
    counts = _counts(len(patients), fractions)
    assignment: dict[str, str] = {}
    start = 0
    for name, n in zip(SPLITS, counts):
        for k in order[start:start + n]:
            assignment[patients[k]] = name
        start += n
    out: dict[str, list[Study]] = {name: [] for name in SPLITS}
    for s in studies:
        out[assignment[str(s.patient_id)]].append(s)
    return out


def _counts(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions, then at least 1 per non-zero split if n allows."""
    raw = [n * f for f in fractions]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_summary(splits: dict[str, list[Study]]) -> dict[str, dict[str, int]]:
    """Patients, studies and images per split (for logs and run configs)."""
    return {name: {"patients": len({s.patient_id for s in ss}), "studies": len(ss),
                   "images": sum(len(s.images) for s in ss)} for name, ss in splits.items()}
