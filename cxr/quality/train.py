"""Train the gate network (`model.py`) from what can be had without a labelled archive:
real NIH frontal films under software rotation / mirroring / inversion plus realistic
augmentation, phantom renders (PA, AP, lateral), and non-radiographs (`synth.py`).

Splits (all fixed by the seed):
- NIH films by PATIENT (patient id = file name before '_'): train / calibration / test; the test
  patients are never seen here and are used only by `benchmarks/quality.py`;
- phantom renders by seed range (TRAIN_SEEDS / CALIB_SEEDS / TEST_SEEDS);
- non-radiographs by generator seed, and photographs by name (`synth.PHOTOS_HELD_OUT`).

Training: one pool of augmented samples drawn once (the machine is small), AdamW, cosine decay,
cross-entropy per head with the heads that do not apply to a sample masked out. Calibration:
one temperature per head, fitted by NLL on the calibration split (its own augmented pool).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..atomic import replacing, write_atomic
from ..errors import CxrError
from .model import HEADS, SIZE, GateModel, GateNet, preprocess
from . import synth

IGNORE = -100
TRAIN_SEEDS, CALIB_SEEDS, TEST_SEEDS = 0, 100_000, 200_000    # seed offsets per split
SPLIT_FRACTIONS = (0.65, 0.15, 0.2)                            # NIH patients: train, calib, test
BASE_SIZE = 160                                                # phantom renders are made at this size


def nih_split(nih_dir: str | Path, seed: int = 0) -> dict[str, list[Path]]:
    """The films of `nih_dir` (a folder of PNGs, or one with an `images/` folder) split by patient."""
    root = Path(nih_dir)
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.glob("*.png"))
    if not files:
        raise CxrError("no PNG films found", folder)
    patients = sorted({p.name.split("_")[0] for p in files})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train = int(round(SPLIT_FRACTIONS[0] * len(patients)))
    n_cal = int(round(SPLIT_FRACTIONS[1] * len(patients)))
    which = {}
    for rank, i in enumerate(order):
        which[patients[i]] = "train" if rank < n_train else "calib" if rank < n_train + n_cal else "test"
    out = {"train": [], "calib": [], "test": []}
    for p in files:
        out[which[p.name.split("_")[0]]].append(p)
    return out


def load_films(paths) -> list[np.ndarray]:
    from ..images import load_image
    return [load_image(p) for p in paths]


# ---------------------------------------------------------------- augmentation

def realistic(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What differs between films of the same kind and way up: crop and zoom (including zoomed
    out onto a border), aspect, a small tilt, gamma, contrast, blur, noise, output size."""
    h, w = img.shape
    if rng.random() < 0.8:  # crop
        area = rng.uniform(0.6, 1.0)
        aspect = np.exp(rng.uniform(-0.25, 0.25))
        ch = int(min(h, round(h * math.sqrt(area / aspect))))
        cw = int(min(w, round(w * math.sqrt(area * aspect))))
        r, c = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = img[r:r + ch, c:c + cw]
    if rng.random() < 0.15:  # zoomed out: a border (black or white) around the film
        ph, pw = (int(s * rng.uniform(0.02, 0.15)) for s in img.shape)
        img = np.pad(img, ((ph, ph), (pw, pw)), constant_values=float(rng.choice([0.0, 1.0])))
    if rng.random() < 0.5:  # small tilt
        img = ndimage.rotate(img, rng.uniform(-10, 10), reshape=False, order=1, mode="nearest")
    img = np.clip(img, 0, 1)
    if rng.random() < 0.7:
        img = img ** np.exp(rng.uniform(-0.5, 0.5))
    if rng.random() < 0.5:  # contrast / brightness (window)
        lo, hi = rng.uniform(-0.1, 0.15), rng.uniform(0.85, 1.1)
        img = np.clip((img - lo) / (hi - lo), 0, 1)
    if rng.random() < 0.3:
        img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.5))
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(0.005, 0.04), img.shape)
    # output size: the stored file's own size and aspect
    long_side = int(np.exp(rng.uniform(np.log(96), np.log(512))))
    img = np.clip(img, 0, 1).astype(np.float32)
    h, w = img.shape
    s = long_side / max(h, w)
    if abs(s - 1) > 0.05:
        img = ndimage.zoom(img, (max(8, round(h * s)) / h, max(8, round(w * s)) / w), order=1)
    return np.clip(img, 0, 1).astype(np.float32)


def orient(img: np.ndarray, rng: np.random.Generator, mirror: bool = True):
    """The faults the gate undoes, drawn at random: stored = invert?(rot90(mirror?(x), k))."""
    m = bool(mirror and rng.random() < 0.5)
    k = int(rng.integers(4))
    inv = bool(rng.random() < 0.5)
    out = img[:, ::-1] if m else img
    out = np.rot90(out, k)
    if inv:
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32), k, inv, m


# ---------------------------------------------------------------- samples

@dataclass
class Sources:
    films: list[np.ndarray]          # real NIH frontal films of the split
    frontal: list[np.ndarray]        # phantom PA/AP renders of the split
    lateral: list[np.ndarray]        # phantom lateral renders of the split
    ct: synth.CtSlices | None


def render_phantom(phantom, seeds, views=("PA", "AP"), size=BASE_SIZE) -> list[np.ndarray]:
    out = []
    for i, s in enumerate(seeds):
        out.append(phantom.render(seed=int(s), size=size, view=views[i % len(views)]).image)
    return out


def build_sources(nih_dir, split: str, n_phantom: int, seed: int, phantom=None,
                  files: dict | None = None) -> Sources:
    files = files or nih_split(nih_dir, seed)
    offset = {"train": TRAIN_SEEDS, "calib": CALIB_SEEDS, "test": TEST_SEEDS}[split]
    seeds = offset + np.arange(n_phantom)
    frontal = render_phantom(phantom, seeds) if phantom else []
    lateral = render_phantom(phantom, seeds + 50_000, ("lateral",)) if phantom else []
    ct = synth.CtSlices(phantom.anatomy.mu) if phantom else None
    return Sources(load_films(files[split]), frontal, lateral, ct)


MIX = {"film": 0.45, "frontal": 0.12, "lateral": 0.18, "other": 0.25}


def draw_sample(src: Sources, rng, held_out: bool = False, source: str | None = None):
    """(image, labels dict, source name). Labels use IGNORE where a head does not apply."""
    names = [k for k in MIX if k in ("other",) or getattr(src, {"film": "films"}.get(k, k))]
    if source is None:
        p = np.array([MIX[k] for k in names])
        source = names[rng.choice(len(names), p=p / p.sum())]
    if source == "other":
        _, img = synth.other_image(rng, src.ct, held_out=held_out)
        return img, {"kind": 2, "rotation": IGNORE, "inverted": IGNORE, "mirrored": IGNORE}, source
    pool = {"film": src.films, "frontal": src.frontal, "lateral": src.lateral}[source]
    base = pool[rng.integers(len(pool))]
    img, k, inv, m = orient(realistic(base, rng), rng, mirror=source != "lateral")
    return img, {"kind": 1 if source == "lateral" else 0, "rotation": k, "inverted": int(inv),
                 "mirrored": IGNORE if source == "lateral" else int(m)}, source


def make_pool(src: Sources, n: int, seed: int, held_out: bool = False, progress=None):
    """n preprocessed samples: thumbs (n, 1, SIZE, SIZE) uint8, stats (n, N_STATS), labels."""
    rng = np.random.default_rng(seed)
    thumbs = np.empty((n, 1, SIZE, SIZE), np.uint8)
    stats, labels = [], {k: np.empty(n, np.int64) for k in HEADS}
    for i in range(n):
        img, lab, _ = draw_sample(src, rng, held_out)
        t, s = preprocess(img)
        thumbs[i] = np.round(t * 255)
        stats.append(s)
        for k in HEADS:
            labels[k][i] = lab[k]
        if progress and (i + 1) % 2000 == 0:
            progress(f"pool {i + 1}/{n}")
    return torch.from_numpy(thumbs), torch.from_numpy(np.stack(stats)), \
        {k: torch.from_numpy(v) for k, v in labels.items()}


# ---------------------------------------------------------------- training

def _loss(out, labels, idx=None):
    total = 0.0
    for k in HEADS:
        y = labels[k] if idx is None else labels[k][idx]
        if (y != IGNORE).any():
            total = total + F.cross_entropy(out[k], y, ignore_index=IGNORE)
    return total


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature minimising the NLL of softmax(logits / T) (grid search on log T)."""
    keep = y != IGNORE
    logits, y = logits[keep], y[keep]
    if not len(y):
        return 1.0
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 141))
    nll = [float(F.cross_entropy(logits / t, y)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def train(nih_dir, out_dir, ct=None, labels=None, structures=None, seed: int = 0,
          n_train: int = 24000, n_calib: int = 4000, epochs: int = 6, batch: int = 128,
          lr: float = 3e-3, n_phantom: int = 600, log=print) -> Path:
    """Train, calibrate, and write gate.safetensors + gate.json into `out_dir`."""
    from safetensors.torch import save_file

    from ..phantom.render import Phantom

    t0 = time.time()
    torch.manual_seed(seed)
    phantom = Phantom.load(ct, labels, structures)
    files = nih_split(nih_dir, seed)
    log(f"NIH films: " + ", ".join(f"{k} {len(v)}" for k, v in files.items()))
    train_src = build_sources(nih_dir, "train", n_phantom, seed, phantom, files)
    calib_src = build_sources(nih_dir, "calib", max(n_phantom // 4, 50), seed, phantom, files)
    log(f"sources ready ({time.time() - t0:.0f} s)")
    X, S, Y = make_pool(train_src, n_train, seed + 1, progress=log)
    Xc, Sc, Yc = make_pool(calib_src, n_calib, seed + 2)
    log(f"pools ready ({time.time() - t0:.0f} s)")
    arch = {"width": 16, "hidden": 128}
    net = GateNet(**arch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(n_train / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(n_train, generator=gen)
        run = 0.0
        for b in range(0, n_train, batch):
            idx = perm[b:b + batch]
            out = net(X[idx].float() / 255.0, S[idx])
            loss = _loss(out, Y, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach()) * len(idx)
        acc = evaluate(net, Xc, Sc, Yc)
        log(f"epoch {ep + 1}/{epochs}: loss {run / n_train:.4f}; calib accuracy "
            + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()) + f" ({time.time() - t0:.0f} s)")
    net.eval()
    logits = _logits(net, Xc, Sc)
    temps = {k: fit_temperature(logits[k], Yc[k]) for k in HEADS}
    acc = evaluate(net, Xc, Sc, Yc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with replacing(out_dir / "gate.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    meta = {"version": 1, "input_size": SIZE, "heads": HEADS, "architecture": arch,
            "temperatures": temps,
            "label_convention": "stored = invert?(rot90(mirror?(upright), k)); "
                                "fix: upright = mirror?(rot90(invert?(stored), -k))",
            "training": {"seed": seed, "n_train": n_train, "n_calib": n_calib, "epochs": epochs,
                         "batch": batch, "lr": lr, "n_phantom_renders": n_phantom,
                         "nih_films": {k: len(v) for k, v in files.items()},
                         "nih_split": "by patient, fractions train/calib/test "
                                      f"{SPLIT_FRACTIONS}, permutation seed {seed}",
                         "mix": MIX, "seconds": round(time.time() - t0, 1)},
            "calibration_accuracy": {k: round(v, 4) for k, v in acc.items()}}
    write_atomic(out_dir / "gate.json", json.dumps(meta, indent=1))
    log(f"wrote {out_dir / 'gate.safetensors'}; temperatures {temps}")
    return out_dir


@torch.no_grad()
def _logits(net, X, S, batch: int = 512) -> dict[str, torch.Tensor]:
    net.eval()
    parts = [net(X[i:i + batch].float() / 255.0, S[i:i + batch]) for i in range(0, len(X), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in HEADS}


def evaluate(net, X, S, Y) -> dict[str, float]:
    logits = _logits(net, X, S)
    out = {}
    for k in HEADS:
        keep = Y[k] != IGNORE
        out[k] = float((logits[k][keep].argmax(1) == Y[k][keep]).float().mean()) if keep.any() else float("nan")
    return out
