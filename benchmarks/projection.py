"""PA or AP from the pixels: the quality gate's projection head (`cxr.quality.projection`) on
films it never trained on, and what it changes for the cardiothoracic ratio.

    python benchmarks/projection.py --nih DATA/nih/bbox256 [--json OUT]

- Real NIH films of the gate's held-out test patients, against NIH's recorded View Position:
  ROC AUC of p(AP), accuracy at the head's stored threshold (AP when p(AP) is above it), AP films
  caught (these no longer get a ratio when the file does not say AP) and PA films kept (these
  still get one); the same films under the gate's realistic augmentation (three draws);
- the CT phantom's PA and AP renders of held-out seeds, with the findings an AP film shares with
  some PA ones drawn alike for both (`train_projection.CONFOUNDS`);
- what the head must not read as AP: PA renders of held-out seeds with an enlarged heart of each
  grade (an AP film magnifies the heart), and with `--demo DIR` the demo's own test films (all PA),
  with and without Cardiomegaly; the same for a head trained here by the same recipe on plain
  renders (no findings: `train_projection.train(confounds=())`), paired, unless `--no-baseline`;
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
    y, t = np.asarray(truth, bool), model.projection.threshold
    return {"n": int(len(y)), "ap": int(y.sum()), "auc": float(roc_auc_score(y, p)),
            "accuracy": float(((p > t) == y).mean()), "ap_caught": float((p[y] > t).mean()),
            "pa_kept": float((p[~y] <= t).mean()), "pa_lost": float((p[~y] > t).mean())}


def called_ap(model, images) -> float:
    t = model.projection.threshold
    return float(np.mean([d["AP"] > t for d in model.projections(images)]))


def measure(model, a) -> dict:
    """Everything but the timing, for the head `model.projection`."""
    from cxr.images import load_image
    from cxr.phantom.render import Phantom
    from cxr.phantom.spec import FindingSpec
    from cxr.quality.projection import PROJECTIONS
    from cxr.quality.train import TEST_SEEDS, nih_split, realistic
    from cxr.quality.train_projection import nih_projections, phantom_films

    out = {}
    views = nih_projections(a.nih)
    test = [p for p in nih_split(a.nih, model.meta["training"]["seed"])["test"]
            if views.get(p.stem) in PROJECTIONS]
    films = [load_image(p) for p in test]
    truth = [views[p.stem] == "AP" for p in test]
    out["nih_test"] = scores(model, films, truth)
    augmented = [scores(model, [realistic(f, np.random.default_rng(s * 1000 + i)) for i, f in enumerate(films)], truth)
                 for s in range(3)]
    out["nih_test_augmented"] = {k: float(np.mean([r[k] for r in augmented])) for k in ("auc", "accuracy", "ap_caught", "pa_kept")}
    phantom = Phantom.load()
    renders = phantom_films(phantom, 300_000 + TEST_SEEDS + np.arange(a.phantom))
    out["phantom_test"] = scores(model, renders, [k % 2 == 1 for k in range(a.phantom)])
    seeds = 400_000 + TEST_SEEDS + np.arange(25)
    out["pa_enlarged_heart_called_ap"] = {
        grade: called_ap(model, [phantom.render([FindingSpec("cardiomegaly", severity=grade)], seed=int(s), size=160).image
                                 for s in seeds])
        for grade in ("borderline", "mild", "moderate", "severe")}
    out["pa_enlarged_heart_called_ap"]["none"] = called_ap(
        model, [phantom.render(seed=int(s), size=160).image for s in seeds])
    out["pa_renders_per_grade"] = len(seeds)
    if a.demo:
        from cxr.checkpoint import load_spec
        from cxr.evaluation import EvalData
        from cxr.sources import open_source

        ed = EvalData(load_spec(Path(a.demo) / "run"), open_source(f"phantom:{Path(a.demo) / 'data'}"))
        idx = ed.indices("test")
        enlarged = {i: any(f.disease == "Cardiomegaly" for f in ed.truth_findings(i)) for i in idx}
        out["demo_test_called_ap"] = {
            name: {"n": len(part), "called_ap": called_ap(model, [load_image(ed.prep.paths[i]) for i in part])}
            for name, part in (("cardiomegaly", [i for i in idx if enlarged[i]]),
                               ("other", [i for i in idx if not enlarged[i]]))}

    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nih", required=True)
    ap.add_argument("--phantom", type=int, default=100, help="held-out phantom renders (PA, AP alternately)")
    ap.add_argument("--demo", help="a finished `cxr demo` folder: its test films (all PA) as well")
    ap.add_argument("--no-baseline", action="store_true", help="skip the head trained on plain renders")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "projection.json"))
    a = ap.parse_args(argv)

    import torch

    from cxr.images import load_image
    from cxr.quality.gate import QualityGate
    from cxr.quality.train import nih_split

    torch.set_num_threads(2)
    gate = QualityGate.load()
    model = gate.model
    if model.projection is None:
        print("error: the gate has no projection head")
        return 2
    out = {"benchmark": "projection", "python": platform.python_version(), "head": model.projection.meta}
    out.update(measure(model, a))
    if not a.no_baseline:
        import tempfile

        from cxr.quality.projection import ProjectionHead
        from cxr.quality.train_projection import train

        shipped = model.projection
        with tempfile.TemporaryDirectory() as tmp:
            train(a.nih, tmp, confounds=(), log=lambda *args: None)
            model.projection = ProjectionHead.load(Path(tmp), gate.model_id)
            out["plain_renders"] = {"head": model.projection.meta, **measure(model, a)}
        model.projection = shipped

    film = load_image(nih_split(a.nih, model.meta["training"]["seed"])["test"][0])
    big = np.clip(np.kron(film, np.ones((4, 4), np.float32)), 0, 1)  # a 1024-px film
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
    print("| films | n (AP) | ROC AUC | accuracy | AP caught | PA kept |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| NIH test patients | {n['n']} ({n['ap']}) | {n['auc']:.3f} | {n['accuracy']:.3f} | {n['ap_caught']:.3f} | {n['pa_kept']:.3f} |")
    print(f"| the same, augmented (3 draws) | {n['n']} ({n['ap']}) | {g['auc']:.3f} | {g['accuracy']:.3f} | {g['ap_caught']:.3f} | {g['pa_kept']:.3f} |")
    p = out["phantom_test"]
    print(f"| phantom, held-out seeds | {p['n']} ({p['ap']}) | {p['auc']:.3f} | {p['accuracy']:.3f} | {p['ap_caught']:.3f} | {p['pa_kept']:.3f} |")
    e = out["pa_enlarged_heart_called_ap"]
    print("PA renders called AP, by Cardiomegaly grade: " + ", ".join(f"{k} {v:.2f}" for k, v in e.items()))
    if "demo_test_called_ap" in out:
        print("demo test films (PA) called AP: " + ", ".join(f"{k} {v['called_ap']:.3f} of {v['n']}"
                                                         for k, v in out["demo_test_called_ap"].items()))
    if "plain_renders" in out:
        b = out["plain_renders"]
        print(f"head trained on plain renders: NIH test AUC {b['nih_test']['auc']:.3f}, AP caught "
              f"{b['nih_test']['ap_caught']:.3f}, PA kept {b['nih_test']['pa_kept']:.3f}; PA renders called AP "
              + ", ".join(f"{k} {v:.2f}" for k, v in b["pa_enlarged_heart_called_ap"].items())
              + ("; demo: " + ", ".join(f"{k} {v['called_ap']:.3f}" for k, v in b["demo_test_called_ap"].items())
                 if "demo_test_called_ap" in b else ""))
    print(f"gate per 1024-px film: {w * 1000:.1f} ms with the head, {wo * 1000:.1f} ms without ({w / wo:.3f}x)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
