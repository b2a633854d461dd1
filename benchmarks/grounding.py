"""Grounded annotation on the demo's phantom data and split, paired against the CAM and against
Shin's global annotator in the same run.

    python benchmarks/grounding.py --out /tmp/grounding-demo --json benchmarks/results/grounding.json

Runs `cxr demo` (default settings; resumes a finished or interrupted one in --out), then reads its
metrics: context accuracy (side / location / severity) of the detected findings as the run writes
them (grounded annotator), the same for the run's stage-1 model (Shin's annotator on the pooled
embedding, same test patients), and localisation at T(IoBB) and T(IoU) per source (CAM of the
true disease, the grounded finding map, the finding word's attention), with the run's box rule
and, paired, with one heatmap threshold at 0.5. Also the demo's wall and CPU time. Prints a
table; --json writes everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stage1_context(run_dir: Path, studies) -> dict:
    """Context accuracy of the stage-1 model (global annotator) on the run's test split."""
    from cxr import metrics as M
    from cxr.checkpoint import load_spec
    from cxr.evaluation import EvalData
    from cxr.reader import Reader

    ed = EvalData(load_spec(run_dir), studies)
    idx = ed.indices("test")
    reader = Reader.load(run_dir / "stage1", device="cpu")
    results = reader([ed.prep.paths[i] for i in idx], heatmaps=False)
    return M.context_accuracy((ed.truth_findings(i), [f for f in r.findings if f.disease != "normal"])
                              for i, r in zip(idx, results))


def one_threshold_localisation(run_dir: Path, studies, threshold: float = 0.5) -> dict:
    """Localisation of the true disease per map source on the run's test split with one heatmap
    threshold (the box rule before ChestX-ray8's became the default), paired with the demo's."""
    from cxr import metrics as M
    from cxr.checkpoint import load_spec
    from cxr.evaluation import EvalData, boxes_of_true_diseases, map_sources
    from cxr.images import load_image
    from cxr.reader import Reader
    from cxr.runspec import LocalizeParams

    ed = EvalData(load_spec(run_dir), studies)
    reader = Reader.load(run_dir, device="cpu")
    rule = LocalizeParams(threshold, reader.spec.localization.max_boxes, reader.spec.localization.min_area)
    sources = map_sources(reader)
    pairs: dict[str, list] = {src: [] for src in sources}
    for i in ed.indices("test"):
        truth = ed.truth_boxes(i)
        if not truth:
            continue
        image = load_image(ed.prep.paths[i])
        for src in sources:
            pairs[src].append((truth, boxes_of_true_diseases(reader, image, truth, src, rule)))
    return {src: {"iobb": la["iobb"]["mean"], "iou": la["iou"]["mean"]}
            for src, la in ((src, M.localisation_accuracy(p)) for src, p in pairs.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/cxr-grounding-demo", help="the demo's folder")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick settings (smoke test)")
    args = ap.parse_args()

    from cxr.commands.demo import DEFAULTS, QUICK, run_demo
    from cxr.sources import open_source

    settings = dict(QUICK if args.quick else DEFAULTS, seed=0, quick=bool(args.quick))
    t0 = time.time()
    m = run_demo(args.out, settings, workers=os.cpu_count() or 1, examples=4)
    wall = time.time() - t0
    run_dir = Path(m["demo"]["run"])
    studies = open_source(f"phantom:{m['demo']['data']}")
    base = stage1_context(run_dir, studies)
    loc = m["localisation"]
    out = {
        "settings": settings,
        "demo_seconds": m["demo"]["seconds"], "demo_cpu_seconds": m["demo"]["cpu_seconds"],
        "machine": m["demo"]["machine"], "wall_this_call": round(wall, 1),
        "mean_auc": m["auc"]["mean"],
        "context": {
            "grounded": {f: v["accuracy"] for f, v in m["context"]["fields"].items()},
            "global_stage1": {f: base["fields"][f]["accuracy"] for f in base["fields"]},
            "n": {f: v["n"] for f, v in m["context"]["fields"].items()},
            "detected": m["context"]["detected"],
        },
        "localisation": {src: {"iobb": la["iobb"]["mean"], "iou": la["iou"]["mean"]}
                         for src, la in loc["sources"].items()},
        "box_rule": "the run's (ChestX-ray8's: thresholds 180/255 and 60/255)",
        "localisation_one_threshold_0.5": one_threshold_localisation(run_dir, studies),
        "best_source": loc["best_source"],
        "n_localised_images": loc["n_images"],
    }
    print("| | grounded | Shin's global annotator (stage 1) |\n| --- | ---: | ---: |")
    for f in ("side", "location", "severity"):
        print(f"| {f} | {out['context']['grounded'][f]:.3f} | {out['context']['global_stage1'][f]:.3f} |")
    print("\n| source | T(IoBB)=0.5 | T(IoU)=0.5 | one threshold 0.5: T(IoBB)=0.5 | T(IoU)=0.5 |"
          "\n| --- | ---: | ---: | ---: | ---: |")
    for src, la in out["localisation"].items():
        one = out["localisation_one_threshold_0.5"].get(src, {"iobb": {"0.5": None}, "iou": {"0.5": None}})
        print(f"| {src} | {la['iobb']['0.5']:.3f} | {la['iou']['0.5']:.3f} | {one['iobb']['0.5'] or 0:.3f} "
              f"| {one['iou']['0.5'] or 0:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
