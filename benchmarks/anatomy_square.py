"""Does the anatomy network read the Reader's square of a film as it reads the film?

    python benchmarks/anatomy_square.py [--films 300] [--json benchmarks/results/anatomy_square.json]

The Reader resizes each film once to its CNN's input (`cxr.preprocess.square`, 256 px for a
DenseNet-121 run) and, where that square holds at least the 256 px the anatomy network was
trained from, hands the square to the anatomy network instead of the film (`Reader._read_organs`).
This renders 1024-px PA phantom films (half with Cardiomegaly, the ratio drawn known) and reads
each both ways with the shipped network: the cardiothoracic ratio against the drawn one, the
grade it gives (`cxr.anatomy.CTR_GRADES`) against the drawn ratio's grade, how often the two
ways give different grades, the heart boxes' IoU (boxes in the film's pixels both ways), and the
time per film at batch 1 on one thread (the Reader's worker), in turn in one process (the square
way without its resize: the Reader has made the square for its CNN already).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=300)
    ap.add_argument("--film-px", type=int, default=1024)
    ap.add_argument("--square-px", type=int, default=256, help="the CNN's input side (the Reader's square)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from cxr import metrics as M
    from cxr.anatomy import AnatomyModel, grade_of_ratio
    from cxr.atomic import write_atomic
    from cxr.machine import cpu_name
    from cxr.phantom.render import Phantom
    from cxr.phantom.spec import FindingSpec
    from cxr.preprocess import square

    torch.set_num_threads(1)
    phantom, model = Phantom.load(), AnatomyModel.load(threads=1)
    rng = np.random.default_rng(args.seed)
    drawn, ratios, grades, ious = [], {"film": [], "square": []}, {"film": [], "square": []}, []
    times = {"film": [], "square": []}
    for k in range(args.films):
        findings = [FindingSpec(kind="cardiomegaly")] if rng.random() < 0.5 else []
        r = phantom.render(findings, seed=args.seed * 1_000_003 + k, size=args.film_px, view="PA")
        film = r.image
        small = square(film, args.square_px)
        read = {}
        for way in (("film", "square") if k % 2 == 0 else ("square", "film")):
            t0 = time.perf_counter()
            read[way] = model([film])[0] if way == "film" else model([small], sizes=[film.shape])[0]
            times[way].append(time.perf_counter() - t0)
        drawn.append(r.meta["ctr"])
        for way, organs in read.items():
            ratios[way].append(organs.cardiothoracic_ratio)
            grades[way].append(grade_of_ratio(organs.cardiothoracic_ratio)
                               if organs.cardiothoracic_ratio is not None else None)
        film_box, square_box = read["film"].boxes.get("heart"), read["square"].boxes.get("heart")
        ious.append(M.iou(film_box, square_box) if film_box and square_box else None)
        if (k + 1) % 50 == 0:
            print(f"  {k + 1}/{args.films} films", file=sys.stderr)

    truth = np.array(drawn)
    true_grade = [grade_of_ratio(t) for t in truth]
    out = {"benchmark": "anatomy_square", "cpu": cpu_name(), "torch": torch.__version__, "threads": 1,
           "films": args.films, "film_px": args.film_px, "square_px": args.square_px,
           "network_px": model.size, "engine": model.engine, "ways": {}}
    for way in ("film", "square"):
        found = np.array([x is not None for x in ratios[way]])
        got = np.array([x if x is not None else np.nan for x in ratios[way]])
        out["ways"][way] = {
            "found": float(found.mean()),
            "ratio_mean_abs_error": float(np.nanmean(np.abs(got - truth))),
            "ratio_bias": float(np.nanmean(got - truth)),
            "grade_accuracy": float(np.mean([g == t for g, t in zip(grades[way], true_grade)])),
            "ms_per_film": 1000 * statistics.median(times[way]),
        }
    diff = np.abs(np.array([a if a is not None else np.nan for a in ratios["film"]])
                  - np.array([b if b is not None else np.nan for b in ratios["square"]]))
    out["between"] = {"ratio_abs_diff_median": float(np.nanmedian(diff)),
                      "ratio_abs_diff_p95": float(np.nanpercentile(diff, 95)),
                      "ratio_abs_diff_max": float(np.nanmax(diff)),
                      "grade_differs": int(sum(a != b for a, b in zip(grades["film"], grades["square"]))),
                      "heart_box_iou_median": float(np.median([x for x in ious if x is not None])),
                      "heart_box_iou_min": float(min(x for x in ious if x is not None)),
                      "square_time_over_film": out["ways"]["square"]["ms_per_film"] / out["ways"]["film"]["ms_per_film"]}
    w, b = out["ways"], out["between"]
    print(M.markdown_table(["reads", "ratio found", "ratio |error|", "ratio bias", "grade accuracy", "ms per film"],
                           [[way, w[way]["found"], w[way]["ratio_mean_abs_error"], w[way]["ratio_bias"],
                             w[way]["grade_accuracy"], w[way]["ms_per_film"]] for way in w]))
    print(f"\n{args.films} {args.film_px}-px PA phantom films: the two ways' ratios differ by a median "
          f"{b['ratio_abs_diff_median']:.4f}, at most {b['ratio_abs_diff_max']:.4f}; grades differ on "
          f"{b['grade_differs']} films; heart boxes' IoU median {b['heart_box_iou_median']:.3f}, least "
          f"{b['heart_box_iou_min']:.3f}; the square read in {b['square_time_over_film']:.3f}x the film's time")
    if args.json:
        write_atomic(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
