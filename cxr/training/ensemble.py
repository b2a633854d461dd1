"""`cxr train --ensemble K`: K networks trained apart, read as one run (what merges them;
`cxr.training.pipeline` trains them).

Averaging the scores of separately trained networks lifted real-film AUC more than any recipe
change (`benchmarks/real_nih.py`), but a user reads one run. So the K networks (seeds seed ..
seed+K-1, all on the patient split of `seed`, each a complete run under RUN/members/j) are merged
into one members-K network (`cxr.models.cnn`, `--members`): network j's trunk and head become
member j, and the merged logit is the mean of the networks' logits, exactly. The annotators are
the first network's, reading its channels only (the other members' input weights are zero), so
the words, the maps and the boxes are exactly those of the first network, which is the plain
`cxr train` run of the same seed. The merged run is calibrated, and its operating points chosen,
on the shared validation patients; it reads, exports and serves as any run does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import unprefixed
from ..errors import CxrError
from .config import TrainConfig

MEMBERS_DIR = "members"


def member_config(cfg: TrainConfig, j: int, out: Path) -> TrainConfig:
    """Network j of the ensemble: its own seed, the ensemble's patient split, one image cache."""
    return dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + j, split_seed=cfg.patient_split_seed,
                               cache_dir=cfg.cache_dir or str(out / "cache"))


def member_dirs(run: str | Path) -> list[Path]:
    """The run folders of an ensemble run's networks (empty for a plain run)."""
    root = Path(run) / MEMBERS_DIR
    return sorted((p for p in root.iterdir() if (p / "config.json").exists()), key=lambda p: int(p.name)) \
        if root.is_dir() else []


def pad_input(weight: torch.Tensor, members: int) -> torch.Tensor:
    """A layer reading one network's C channels -> the same layer reading the merged network's
    K*C channels, with zero weights on every member but the first (dimension 1 is the input)."""
    shape = list(weight.shape)
    shape[1] *= members
    out = weight.new_zeros(shape)
    out[:, :weight.shape[1]] = weight
    return out


def merge_tensors(runs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weights of K one-member runs (their `weights.safetensors`) as one members-K run's."""
    k = len(runs)
    merged: dict[str, torch.Tensor] = {}
    for j, tensors in enumerate(runs):
        cnn = unprefixed("cnn", tensors)
        for name, value in cnn.items():
            if name.startswith("features."):
                merged[f"cnn.features.trunks.{j}.{name[len('features.'):]}"] = value
            elif not name.startswith("head."):
                raise CxrError(f"cannot merge a network with a {name.split('.')[0]!r} layer after its trunk")
    heads = [unprefixed("cnn", t) for t in runs]
    merged["cnn.head.member_weight"] = torch.cat([h["head.weight"] for h in heads], 1)
    merged["cnn.head.bias"] = torch.stack([h["head.bias"] for h in heads]).mean(0)
    if "head.log_sharpness" in heads[0]:  # class_lse: each member pools its maps with its own sharpness
        merged["cnn.head.log_sharpness"] = torch.stack([h["head.log_sharpness"] for h in heads])
        merged["cnn.head.mean_pooled"] = heads[0]["head.mean_pooled"]
    for name, value in runs[0].items():  # the annotators: the first network's, on its own channels
        if name.startswith("cnn."):
            continue
        if name in ("rnn.init_h.weight", "rnn.init_c.weight", "ground.region.weight"):
            value = pad_input(value, k)
        merged[name] = value
    return merged


def check_compatible(specs: list) -> None:
    """The networks must share what the merged run stores once."""
    first = specs[0]
    for spec in specs[1:]:
        for what in ("targets", "vocabulary", "preprocessing", "refined"):
            if getattr(spec, what) != getattr(first, what):
                raise CxrError(f"the ensemble's networks differ in their {what}; they cannot be merged")
        if spec.architecture != first.architecture:
            raise CxrError("the ensemble's networks differ in their architecture; they cannot be merged")
        if spec.data.patients != first.data.patients:
            raise CxrError("the ensemble's networks were trained on different patient splits")
    if first.architecture.members != 1 or first.architecture.transition:
        raise CxrError("only one-member networks without a transition layer can be merged")
