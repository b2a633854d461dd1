"""The recurrent neural cascade (Shin et al. 2016, section 6): refine labels by image/text context.

After the CNN and RNN are trained on the mined disease labels, each training (image, finding)
pair gets a joint image/text context vector: the mean of the RNN hidden states while it reads the
finding's annotation, started from the image embedding. Inside every label with at least
`min_members` pairs, k-means splits the pairs into ``members // per_cluster`` clusters (the
paper: >= 170 members, n/50 clusters, 17 labels -> 57). The CNN is retrained on the refined
labels, then the RNN. Every output maps a refined label back to its disease (max over the
sub-labels' probabilities), so users only ever see the original targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RefinedLabels:
    """names[i] is a refined label, parents[i] the index of its original target."""

    names: list[str]
    parents: list[int]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "parents": list(self.parents)}

    @classmethod
    def identity(cls, targets: list[str]) -> "RefinedLabels":
        return cls(list(targets), list(range(len(targets))))

    @classmethod
    def from_dict(cls, d: dict) -> "RefinedLabels":
        return cls(list(d["names"]), [int(p) for p in d["parents"]])

    def children(self, parent: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == parent]


def refine(contexts: np.ndarray, pair_labels: np.ndarray, targets: list[str], min_members: int,
           per_cluster: int, seed: int = 0) -> tuple[RefinedLabels, np.ndarray]:
    """Cluster the context vectors of each label. contexts (P, H) and pair_labels (P,) describe
    (image, finding) pairs. Returns the refined label set and each pair's refined label index."""
    names: list[str] = []
    parents: list[int] = []
    assigned = np.full(len(pair_labels), -1, dtype=np.int64)
    for t, target in enumerate(targets):
        members = np.flatnonzero(pair_labels == t)
        k = len(members) // max(per_cluster, 1) if len(members) >= min_members else 1
        k = max(1, min(k, len(np.unique(contexts[members], axis=0)) if len(members) else 1))
        if k == 1:
            assigned[members] = len(names)
            names.append(target)
            parents.append(t)
            continue
        labels_ = _kmeans(contexts[members].astype(np.float64), k, seed)
        k = int(labels_.max()) + 1
        # order clusters by size (largest first) so names are stable and readable
        order = np.argsort(-np.bincount(labels_, minlength=k), kind="stable")
        rank = np.empty(k, dtype=np.int64)
        rank[order] = np.arange(k)
        for j in range(k):
            names.append(f"{target}#{j + 1}")
            parents.append(t)
        assigned[members] = len(names) - k + rank[labels_]
    return RefinedLabels(names, parents), assigned


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 4) -> np.ndarray:
    """k-means++ (scipy), best of a few seeded restarts by inertia; empty clusters are dropped
    and the rest renumbered 0..k'-1."""
    from scipy.cluster.vq import kmeans2

    best, best_inertia = None, np.inf
    for r in range(restarts):
        centres, labels = kmeans2(x, k, minit="++", seed=seed * 100 + r)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    _, renumbered = np.unique(best, return_inverse=True)
    return renumbered.astype(np.int64)


def to_original(probs: np.ndarray, refined: RefinedLabels, n_targets: int, head: str = "sigmoid") -> np.ndarray:
    """Per-refined-label probabilities (N, R) -> per-target probabilities (N, T): the max over a
    target's children for independent (sigmoid) outputs, their sum for a softmax (exclusive
    sub-labels of one pattern)."""
    out = np.zeros((probs.shape[0], n_targets), dtype=probs.dtype)
    for i, p in enumerate(refined.parents):
        out[:, p] = out[:, p] + probs[:, i] if head == "softmax" else np.maximum(out[:, p], probs[:, i])
    return out


def output_probabilities(logits, head: str = "sigmoid") -> np.ndarray:
    """The CNN's logits (torch, (N, R)) as probabilities: sigmoid per output, or one softmax."""
    import torch

    return (torch.softmax(logits, 1) if head == "softmax" else torch.sigmoid(logits)).float().cpu().numpy()
