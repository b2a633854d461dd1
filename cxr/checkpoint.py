"""Self-describing checkpoints: `weights.safetensors` + `config.json`, never a pickle.

A run directory (what `cxr train` writes and `Reader.load` reads):

    RUN/config.json          everything needed to rebuild and use the model (a RunSpec)
    RUN/weights.safetensors  tensors "cnn.*" (classifier) and "rnn.*" (annotator)
    RUN/stage1/              the same pair for the model before the cascade (when the cascade ran)
    RUN/history.jsonl        one line per epoch: phase, epoch, losses, val AUC
    RUN/state/               resume state: progress.json, per phase weights + optimizer (the
                             .safetensors are deleted once the run has finished), .lock
    RUN/cache/               decoded images (uint16 .npy), unless TrainConfig.cache_dir says elsewhere

config.json is a `cxr.runspec.RunSpec` as JSON (see that module for its fields and their
meaning); `load_spec` reads it, `load_run` reads both files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .atomic import replacing, write_atomic
from .errors import CxrError
from .hashing import file_sha256
from .runspec import FORMAT, RunSpec

WEIGHTS, CONFIG = "weights.safetensors", "config.json"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with replacing(path) as tmp:
        save_file(clean, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CxrError("weights file not found", path)
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CxrError(f"cannot read safetensors weights: {exc}", path) from None


def load_shipped(path: str | Path | None, default_dir: Path, name: str, build) -> tuple[torch.nn.Module, dict, Path]:
    """A small network shipped in the package (the quality gate's, the anatomy network):
    `path` a folder holding NAME.safetensors + NAME.json, or the .safetensors file with its .json
    beside it; None: `default_dir`. `build(meta)` makes the network the weights go into. Returns
    (network, meta, the JSON's path); a missing or unreadable pair is a CxrError naming it."""
    import json

    from safetensors.torch import load_file

    p = Path(path) if path is not None else default_dir
    weights = p / f"{name}.safetensors" if p.is_dir() else p
    meta_path = weights.with_suffix(".json")
    if not weights.is_file() or not meta_path.is_file():
        raise CxrError(f"{name} weights not found (need {name}.safetensors and {name}.json)", p)
    try:
        meta = json.loads(meta_path.read_text())
        net = build(meta)
        net.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CxrError(f"cannot load the {name} weights: {e}", weights)
    return net, meta, meta_path


def save_run(run_dir: str | Path, tensors: dict[str, torch.Tensor], spec: RunSpec) -> Path:
    """Write weights then the spec (config.json last: a run with a config.json is complete)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / WEIGHTS, tensors, {"format": FORMAT})
    write_atomic(run_dir / CONFIG, spec.to_json())
    return run_dir


def load_spec(run_dir: str | Path) -> RunSpec:
    """The RunSpec of a run directory (a clear CxrError when it is missing, not JSON, or not a run)."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / CONFIG
    if not path.exists():
        raise CxrError("not a trained run (no config.json); train one with `cxr train`", run_dir)
    return RunSpec.from_json(path.read_text(), str(path))


def load_run(run_dir: str | Path) -> tuple[RunSpec, dict[str, torch.Tensor]]:
    spec = load_spec(run_dir)
    return spec, load_tensors(Path(run_dir).expanduser() / WEIGHTS)


def weights_hash(run_dir: str | Path) -> str:
    return file_sha256(Path(run_dir) / WEIGHTS)


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
