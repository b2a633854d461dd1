"""PA or AP from the pixels: the quality gate's projection head (`cxr.quality.projection`) on
films it never trained on, and what it changes for the cardiothoracic ratio.

    python benchmarks/projection.py --nih DATA/nih/bbox256 [--json OUT]

- Real NIH films of the gate's held-out test patients, against NIH's recorded View Position:
  ROC AUC of p(AP), accuracy at the gate's rule (AP when p > .5), AP films caught (these no longer
  get a ratio when the file does not say AP) and PA films kept (these still get one); the same
  films under the gate's realistic augmentation (three draws);
- the CT phantom's PA and AP renders of held-out seeds;
- the gate's time per 1024-px film with the head and without it, interleaved in this run.
Writes benchmarks/results/projection.json (or --json OUT) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scores(model, images, truth) -> dict:
    from sklearn.metrics import roc_auc_score

    p = np.array([d["AP"] for d in model.projections(images)])
    y = np.asarray(truth, bool)
    return {"n": int(len(y)), "ap": int(y.sum()), "auc": float(roc_auc_score(y, p)),
            "accuracy": float(((p > 0.5) == y).mean()), "ap_caught": float((p[y] > 0.5).mean()),
            "pa_kept": float((p[~y] <= 0.5).mean()), "pa_lost": float((p[~y] > 0.5).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nih", required=True)
    ap.add_argument("--phantom", type=int, default=100, help="held-out phantom renders (PA, AP alternately)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "projection.json"))
    a = ap.parse_args(argv)

    import torch

    from cxr.images import load_image
    from cxr.phantom.render import Phantom
    from cxr.quality.gate import QualityGate
    from cxr.quality.projection import PROJECTIONS
    from cxr.quality.train_projection import nih_projections
    from cxr.quality.train import TEST_SEEDS, nih_split, realistic, render_phantom

    torch.set_num_threads(2)
    gate = QualityGate.load()
    model = gate.model
    if model.projection is None:
        print("error: the gate has no projection head")
        return 2
    views = nih_projections(a.nih)
    test = [p for p in nih_split(a.nih, model.meta["training"]["seed"])["test"]
            if views.get(p.stem) in PROJECTIONS]
    films = [load_image(p) for p in test]
    truth = [views[p.stem] == "AP" for p in test]
    out = {"benchmark": "projection", "python": platform.python_version(),
           "head": model.projection.meta, "nih_test": scores(model, films, truth)}
    augmented = [scores(model, [realistic(f, np.random.default_rng(s * 1000 + i)) for i, f in enumerate(films)], truth)
                 for s in range(3)]
    out["nih_test_augmented"] = {k: float(np.mean([r[k] for r in augmented])) for k in ("auc", "accuracy", "ap_caught", "pa_kept")}
    renders = render_phantom(Phantom.load(), 300_000 + TEST_SEEDS + np.arange(a.phantom))
    out["phantom_test"] = scores(model, renders, [k % 2 == 1 for k in range(a.phantom)])

    big = np.clip(np.kron(films[0], np.ones((4, 4), np.float32)), 0, 1)  # a 1024-px film
    head, times = model.projection, {"with": [], "without": []}
    gate.check([big])
    for k in range(a.repeats):
        for which in (("with", "without") if k % 2 else ("without", "with")):
            model.projection = head if which == "with" else None
            t0 = time.perf_counter()
            gate.check([big])
            times[which].append(time.perf_counter() - t0)
    model.projection = head
    w, wo = statistics.median(times["with"]), statistics.median(times["without"])
    out["gate_ms"] = {"film_px": int(big.shape[0]), "threads": torch.get_num_threads(),
                      "with_head": w * 1000, "without_head": wo * 1000, "ratio": w / wo}

    n, g = out["nih_test"], out["nih_test_augmented"]
    print(f"| films | n (AP) | ROC AUC | accuracy | AP caught | PA kept |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| NIH test patients | {n['n']} ({n['ap']}) | {n['auc']:.3f} | {n['accuracy']:.3f} | {n['ap_caught']:.3f} | {n['pa_kept']:.3f} |")
    print(f"| the same, augmented (3 draws) | {n['n']} ({n['ap']}) | {g['auc']:.3f} | {g['accuracy']:.3f} | {g['ap_caught']:.3f} | {g['pa_kept']:.3f} |")
    p = out["phantom_test"]
    print(f"| phantom, held-out seeds | {p['n']} ({p['ap']}) | {p['auc']:.3f} | {p['accuracy']:.3f} | {p['ap_caught']:.3f} | {p['pa_kept']:.3f} |")
    print(f"gate per 1024-px film: {w * 1000:.1f} ms with the head, {wo * 1000:.1f} ms without ({w / wo:.3f}x)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
