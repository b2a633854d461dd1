"""Self-describing checkpoints: `weights.safetensors` + `config.json`, never a pickle.

A run directory (what `cxr train` writes and `Reader.load` reads):

    RUN/config.json          everything needed to rebuild and use the model (keys below)
    RUN/weights.safetensors  tensors "cnn.*" (classifier) and "rnn.*" (annotator)
    RUN/stage1/              the same pair for the model before the cascade (when the cascade ran)
    RUN/history.jsonl        one line per epoch: phase, epoch, losses, val AUC
    RUN/state/               resume state: progress.json, per phase weights + optimizer (the
                             .safetensors are deleted once the run has finished), .lock
    RUN/cache/               decoded images (uint16 .npy), unless TrainConfig.cache_dir says elsewhere

config.json keys: format, cxr_version, stage ("stage1" | "cascade"), architecture {backbone,
num_classes, rnn, rnn_hidden, rnn_embed, image_dim}, targets (original labels, the output keys),
refined {names, parents} (the CNN's outputs -> target index), vocabulary (token list, ids = index,
specials first), preprocessing {image_size, crop, mean, std, stretch}, calibration {method,
params {target: [a, b]}} (Platt on logits), thresholds {target: t}, localization {threshold,
max_boxes, min_area}, validation {val_images, val_auc}, train_config (the TrainConfig), pretrained
(load report or null), data {spec, views, split_seed, fractions, patients {train, val, test},
counts, label_counts, unreadable}, seed, created.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import CxrError

FORMAT = "cxr-run/1"
WEIGHTS, CONFIG = "weights.safetensors", "config.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CxrError("weights file not found", path)
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"cannot read safetensors weights: {exc}", path) from None


def save_run(run_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write weights then config (config last: a run with a config.json is complete)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / WEIGHTS, tensors, {"format": FORMAT})
    config = {"format": FORMAT, **config}
    _atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=1, sort_keys=False))
    return run_dir


def load_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir).expanduser()
    path = run_dir / CONFIG
    if not path.exists():
        raise CxrError("not a trained run (no config.json); train one with `cxr train`", run_dir)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CxrError(f"config.json is not valid JSON: {exc}", path) from None
    if config.get("format") != FORMAT:
        raise CxrError(f"unknown checkpoint format {config.get('format')!r} (expected {FORMAT})", path)
    return config


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = load_config(run_dir)
    return config, load_tensors(Path(run_dir).expanduser() / WEIGHTS)


def weights_hash(run_dir: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(run_dir) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


# ------------------------------------------------------------------ optimizer state, no pickle

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (the rest)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
                meta["state"][str(idx)][k] = "tensor"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: tensors[f"opt.{idx}.{k}"] if v == "tensor" else v for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
