"""Train the gate's PA/AP projection head (`projection.py`) on the shipped gate's frozen trunk.

    python -m cxr.quality.train_projection --nih DATA/nih/bbox256 [--out cxr/quality/weights]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import replacing, write_atomic
from ..errors import CxrError
from .projection import NAME, PROJECTIONS


def nih_projections(nih_dir: str | Path) -> dict[str, str]:
    """Image name (without extension) -> "PA" / "AP" from NIH's label file
    (Data_Entry_2017*.csv[.gz]) in `nih_dir` or its parent."""
    from ..sources.nih import read_nih

    root = Path(nih_dir).expanduser()
    found = sorted(root.glob("Data_Entry*.csv*")) or sorted(root.parent.glob("Data_Entry*.csv*"))
    if not found:
        raise CxrError("no NIH label file (Data_Entry_2017*.csv) with the films' View Position", root)
    return {im.id: (im.view or "").upper() for study in read_nih(found[0]) for im in study.images}


# AP is called only when the head is sure enough that a PA film rarely is: a PA film called AP
# loses its cardiothoracic ratio where it is worth most (an enlarged heart looks AP-like), while an
# AP film called PA keeps one the report should not trust (the README says how often).
MAX_PA_CALLED_AP = 0.05
THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)

# What an AP film shares with some PA ones, drawn alike for both views so that the head cannot
# read the projection from them: an enlarged heart (an AP film magnifies the heart, and a head
# trained on plain renders calls .727 of the demo's PA films with Cardiomegaly AP,
# `benchmarks/projection.py`, which would withhold the ratio exactly where it matters), low lung
# volumes, a line or tube, an effusion.
CONFOUNDS = (("cardiomegaly", 0.5, ("borderline", "mild", "moderate", "severe")),
             ("hypoinflation", 0.15, (None,)), ("catheter", 0.2, (None,)),
             ("effusion", 0.15, ("small", "moderate")))


def phantom_films(phantom, seeds, size: int = 160, confounds=CONFOUNDS) -> list[np.ndarray]:
    """Phantom renders PA, AP, PA, ... of `seeds`, each with findings drawn from `confounds`
    by its own seed, whatever its view."""
    from ..phantom.spec import FindingSpec

    out = []
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng([int(seed), 7])
        findings = [FindingSpec(kind, side=str(rng.choice(["left", "right"])) if kind == "effusion" else None,
                                severity=grades[int(rng.integers(len(grades)))])
                    for kind, p, grades in confounds if rng.random() < p]
        out.append(phantom.render(findings, seed=int(seed), size=size, view=("PA", "AP")[k % 2]).image)
    return out


def _samples(films: list[np.ndarray], labels: list[int], copies: int, rng) -> tuple[list, list]:
    """Each film as stored and `copies` times under the gate's realistic augmentation."""
    from .train import realistic

    images, y = [], []
    for img, label in zip(films, labels):
        images.append(img)
        y.append(label)
        for _ in range(copies):
            images.append(realistic(img, rng))
            y.append(label)
    return images, y


def _features(gate, images: list[np.ndarray], batch: int = 256) -> torch.Tensor:
    return torch.cat([gate.features(images[i:i + batch]) for i in range(0, len(images), batch)])


def train(nih_dir, out_dir, seed: int = 0, copies: int = 8, n_phantom: int = 600, ct=None,
          labels=None, structures=None, C: float = 1.0, phantom_weight: float = 1.0,
          confounds=CONFOUNDS, log=print) -> Path:
    """Fit the head on the shipped gate's trunk and write it into `out_dir` (`confounds=()`:
    plain renders, what `benchmarks/projection.py` compares against)."""
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    from ..images import load_image
    from ..phantom.render import Phantom
    from .model import GateModel, gate_model_id
    from .train import CALIB_SEEDS, TRAIN_SEEDS, fit_temperature, nih_split

    t0 = time.time()
    gate = GateModel.load()
    views = nih_projections(nih_dir)
    files = nih_split(nih_dir, seed)
    phantom = Phantom.load(ct, labels, structures)
    rng = np.random.default_rng(seed)
    data, counts = {}, {}
    for split, offset, n in (("train", TRAIN_SEEDS, n_phantom), ("calib", CALIB_SEEDS, max(n_phantom // 3, 20))):
        paths = [p for p in files[split] if views.get(p.stem) in PROJECTIONS]
        films = [load_image(p) for p in paths]
        y = [PROJECTIONS.index(views[p.stem]) for p in paths]
        renders = phantom_films(phantom, 300_000 + offset + np.arange(n), confounds=confounds)  # PA, AP, ...
        films, y = films + renders, y + [k % 2 for k in range(n)]
        images, targets = _samples(films, y, copies, rng)
        is_phantom = np.arange(len(images)) >= len(paths) * (copies + 1)  # renders come last
        data[split] = (_features(gate, images), np.asarray(targets), is_phantom)
        counts[split] = {"nih_films": len(paths), "nih_ap": int(sum(y[:len(paths)])), "phantom_renders": n,
                         "samples": len(images)}
        log(f"{split}: {len(paths)} NIH films ({sum(y[:len(paths)])} AP), {n} phantom renders, "
            f"{len(images)} samples ({time.time() - t0:.0f} s)")
    X, y, is_phantom = data["train"]
    clf = LogisticRegression(C=C, max_iter=5000).fit(X.numpy(), y,
                                                    sample_weight=np.where(is_phantom, phantom_weight, 1.0))
    weight = torch.tensor(np.concatenate([-clf.coef_ / 2, clf.coef_ / 2]), dtype=torch.float32)
    bias = torch.tensor([-clf.intercept_[0] / 2, clf.intercept_[0] / 2], dtype=torch.float32)
    Xc, yc, _ = data["calib"]
    logits = Xc @ weight.T + bias
    temperature = fit_temperature(logits, torch.from_numpy(yc))
    p_ap = torch.softmax(logits / temperature, 1)[:, 1].numpy()
    stored = np.arange(len(yc)) % (copies + 1) == 0  # each calibration film as stored, not augmented
    pa = stored & (yc == 0)
    threshold = next((float(t) for t in THRESHOLDS if (p_ap[pa] > t).mean() <= MAX_PA_CALLED_AP),
                     float(THRESHOLDS[-1]))
    accuracy = float(((p_ap > threshold) == (yc == 1)).mean())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with replacing(out_dir / f"{NAME}.safetensors") as tmp:
        save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(tmp))
    meta = {"version": 1, "classes": list(PROJECTIONS), "temperature": temperature,
            "threshold": threshold, "max_pa_called_ap": MAX_PA_CALLED_AP,
            "threshold_rule": f"the lowest of {THRESHOLDS[0]:.2f}..{THRESHOLDS[-1]:.2f} at which at most "
                              f"{MAX_PA_CALLED_AP:.0%} of the calibration PA films (as stored) are called AP",
            "gate_model": gate_model_id(gate.meta),
            "reads": "the gate network's trunk features (GateModel.features) of the upright film",
            "training": {"seed": seed, "copies": copies, "n_phantom_renders": n_phantom,
                         "confounds": [list(c) for c in confounds],
                         "splits": counts,
                         "nih_split": "the gate's own split by patient (its test patients unseen)",
                         "classifier": f"scikit-learn LogisticRegression(C={C}) on the features",
                         "seconds": round(time.time() - t0, 1)},
            "calibration_accuracy": round(accuracy, 4)}
    write_atomic(out_dir / f"{NAME}.json", json.dumps(meta, indent=1))
    log(f"wrote {out_dir / (NAME + '.safetensors')}: AP when p > {threshold:.2f}, calibration accuracy "
        f"{accuracy:.3f}, temperature {temperature:.2f} ({time.time() - t0:.0f} s)")
    return out_dir


def main(argv=None) -> int:
    from .model import WEIGHTS_DIR

    ap = argparse.ArgumentParser(prog="python -m cxr.quality.train_projection", description=__doc__.split("\n")[0])
    ap.add_argument("--nih", required=True, help="NIH films folder (PNGs, or one with images/) and its Data_Entry csv")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="where projection.* go (default: the package's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=8, help="augmented copies of each film")
    ap.add_argument("--phantom-renders", type=int, default=600)
    ap.add_argument("--ct"), ap.add_argument("--labels"), ap.add_argument("--structures")
    a = ap.parse_args(argv)
    try:
        torch.manual_seed(a.seed)
        train(a.nih, a.out, seed=a.seed, copies=a.copies, n_phantom=a.phantom_renders, ct=a.ct,
              labels=a.labels, structures=a.structures)
    except CxrError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
