"""Why the demo's study-level call cannot reach sensitivity .9 with specificity .6: how many
abnormal test studies carry only findings the demo's CNN scores at chance, and whether a larger
input would let the same CNN see them.

    python benchmarks/small_findings.py --demo cxr-demo [--sizes 128 256] [--json OUT]

`--demo` is a finished `cxr demo --out DIR` (its data, run and metrics.json). Reported:
- the findings at chance: those whose test AUC in the demo's metrics is under `--chance` (.65);
  the abnormal test studies whose every finding is one of them; and how many of those a call
  needs to reach sensitivity .9 when it catches every other abnormal study;
- per input size, the demo's CNN alone (its backbone and settings, no cascade, no annotator,
  `--epochs` epochs, crop 7/8 of the size, the same patient split) trained on the demo's data and
  scored on its test split: AUC per finding, mean, and the study-level AUC;
- a crude detector of small bright lesions beside it: per test film (standardised, at each input
  size), the mean of the five strongest responses of a scale-normalised Laplacian of Gaussian
  (bright blobs) in the film's central three quarters, at five scales; its AUC per finding at
  each scale. It asks whether the lesions are the brightest spots on the film.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOB_SIGMAS = (0.75, 1.0, 1.5, 2.0, 3.0)  # in pixels of a 256-px film, scaled with the input size


def at_chance(demo: Path, chance: float) -> dict[str, float]:
    """The findings whose test AUC in the demo's metrics is under `chance` (normal excluded)."""
    auc = json.loads((demo / "metrics.json").read_text())["auc"]["per_label"]
    return {t: a for t, a in auc.items() if t != "normal" and a is not None and a < chance}


def studies_with_only(ed, idx, names: set[str]) -> dict:
    """Abnormal test studies, those whose every finding is in `names`, and how many of those a
    call must catch to reach sensitivity .9 when it catches all the others."""
    abnormal = [i for i in idx if not ed.studies[i].normal]
    only = [i for i in abnormal if ed.truth_findings(i) and {f.disease for f in ed.truth_findings(i)} <= names]
    need = max(0, math.ceil(0.9 * len(abnormal)) - (len(abnormal) - len(only)))
    return {"abnormal": len(abnormal), "only_at_chance": len(only),
            "share": len(only) / len(abnormal) if abnormal else None,
            "needed_for_sensitivity_0.9": need}


def cnn_alone(demo: Path, data, size: int, epochs: int, out: Path) -> dict:
    """The demo's CNN alone at input `size`, trained on the demo's data, scored on its test split."""
    from cxr.commands.demo import TRAIN_KEYS
    from cxr.evaluation import evaluate_run
    from cxr.training.config import TrainConfig
    from cxr.training.pipeline import train

    settings = json.loads((demo / "metrics.json").read_text())["demo"]["settings"]
    keys = {k: settings[k] for k in TRAIN_KEYS if k in settings}
    keys.update(image_size=size, crop=size * 7 // 8, epochs=epochs, cascade_epochs=0, rnn_epochs=1,
                ground_epochs=0)
    config = TrainConfig(data=f"phantom:{demo / 'data'}", rnn="gru", device="cpu", progress=False,
                         num_workers=0, cascade=False, annotator="global", report_text=False, **keys)
    t0 = time.time()
    run = train(config, out / f"cnn{size}", studies=data)
    seconds = time.time() - t0
    m = evaluate_run(run, split="test", out=out / f"eval{size}", progress=False, studies=data, device="cpu")
    return {"size": size, "epochs": epochs, "train_seconds": round(seconds, 1), "auc": m["auc"]["per_label"],
            "mean_auc": m["auc"]["mean"], "study_auc": (m.get("study") or {}).get("auc")}


def blob_detector(ed, idx, sizes, targets) -> dict:
    """AUC per finding, per input size and scale, of the strongest bright blobs (see the module
    docstring)."""
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    from cxr.images import load_image, pixels_of, resize

    feats = {s: [] for s in sizes}
    for i in idx:
        film = pixels_of(load_image(ed.prep.paths[i])).astype(np.float32)
        for s in sizes:
            im = resize(film, s) if film.shape != (s, s) else film
            im = (im - im.mean()) / (im.std() + 1e-6)
            row = []
            for sigma in BLOB_SIGMAS:
                sg = sigma * s / 256
                r = -ndimage.gaussian_laplace(im, sg) * sg ** 2  # bright blobs positive
                centre = r[s // 8: -(s // 8), s // 8: -(s // 8)]
                row.append(float(np.sort(centre.ravel())[-5:].mean()))
            feats[s].append(row)
    out = {}
    for s in sizes:
        f = np.array(feats[s])
        out[str(s)] = {}
        for t in targets:
            y = np.array([any(x.disease == t for x in ed.truth_findings(i)) for i in idx])
            if 0 < y.sum() < len(y):
                out[str(s)][t] = {str(sig): float(roc_auc_score(y, f[:, k])) for k, sig in enumerate(BLOB_SIGMAS)}
    return out


def main(argv=None) -> int:
    from demo_errors import finished_demo

    from cxr.atomic import write_atomic
    from cxr.metrics import markdown_table
    from cxr.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("cxr-demo"), help="a finished `cxr demo --out DIR`")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--chance", type=float, default=0.65)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    run, ed, idx = finished_demo(args.demo, "small_findings")
    chance = at_chance(args.demo, args.chance)
    out = {"benchmark": "small_findings", "demo": str(args.demo), "chance_below": args.chance,
           "at_chance": chance, "test": studies_with_only(ed, idx, set(chance))}
    t = out["test"]
    print(f"findings at chance (test AUC < {args.chance}): " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()))
    print(f"{t['only_at_chance']} of {t['abnormal']} abnormal test studies carry only those; sensitivity .9 "
          f"needs {t['needed_for_sensitivity_0.9']} of them called abnormal")
    data = open_source(f"phantom:{args.demo / 'data'}")
    with tempfile.TemporaryDirectory() as tmp:
        out["cnn_alone"] = []
        for size in args.sizes:
            r = cnn_alone(args.demo, data, size, args.epochs, Path(tmp))
            out["cnn_alone"].append(r)
            print(f"  CNN alone at {size} px: mean AUC {r['mean_auc']:.3f}, study {r['study_auc']:.3f}, "
                  f"{r['train_seconds']:.0f} s", flush=True)
    out["blob_detector"] = blob_detector(ed, idx, args.sizes, list(chance))
    rows = []
    for target in chance:
        row = [target, chance[target]]
        row += [r["auc"].get(target) for r in out["cnn_alone"]]
        row += [max(out["blob_detector"][str(s)].get(target, {"-": float("nan")}).values()) for s in args.sizes]
        rows.append(row)
    print(markdown_table(["finding", "demo AUC"] + [f"CNN alone {s} px" for s in args.sizes]
                         + [f"blobs {s} px, best scale" for s in args.sizes], rows, digits=3))
    if args.json:
        write_atomic(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
