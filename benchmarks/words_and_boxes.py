"""Do a finished demo's words and boxes agree, and what do the reading rules change: its test
split read twice, with and without boxes held to their site word's band of rows.

    python benchmarks/words_and_boxes.py --demo cxr-demo [--json OUT]

`--demo` is a finished `cxr demo --out DIR` (its run and phantom data, where every finding has
its true side, site and box). For the reported findings that have a site word ("base", "apex",
...) and a true box of their disease in the image, per reading:

- **in band**: the share of their boxes whose centre lies in the site word's band of rows
  (`cxr.models.localize.SITE_BANDS`); on the phantom every true box of a site word does;
- **IoBB .5**: the share of those findings with a box that covers half of one of the
  disease's true boxes (intersection over the predicted box, ChestX-ray8's T(IoBB) = 0.5);
- the same two figures for the findings with no site word, which the rule leaves alone (a check:
  they must not move).

How sure the words are: per context field, the accuracy of the reported findings' words in bins
of the annotator's confidence in them (`DetectedFinding.confidence`), and the expected
calibration error over those bins, with the run's temperatures (`RunSpec.word_temperature`) and
without (the field heads' raw probabilities; the words are the same).

And the study-level answer: of the studies called abnormal, how many name no finding (no disease
at or above its threshold), how many of those are truly abnormal, and how often the disease
nearest its threshold (in odds) is one the study has: what naming it anyway would be worth.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def iobb(pred, truth) -> float:
    w = min(pred.x + pred.w, truth.x + truth.w) - max(pred.x, truth.x)
    h = min(pred.y + pred.h, truth.y + truth.h) - max(pred.y, truth.y)
    return max(w, 0) * max(h, 0) / max(pred.w * pred.h, 1e-9)


def box_figures(ed, idx, results) -> dict:
    from cxr.models.localize import site_band

    rows = {"site": {"findings": 0, "boxes": 0, "in_band": 0, "hit": 0},
            "no_site": {"findings": 0, "boxes": 0, "hit": 0}}
    for i, r in zip(idx, results):
        truth = ed.truth_boxes(i)
        height = r.image_size[0]
        for f in r.findings:
            own = [b for b in truth if b.label == f.disease]
            if f.disease == "normal" or not own or not f.boxes:
                continue
            band = site_band(f.location)
            row = rows["site" if band else "no_site"]
            row["findings"] += 1
            row["boxes"] += len(f.boxes)
            row["hit"] += any(iobb(b, t) >= 0.5 for b in f.boxes for t in own)
            if band:
                row["in_band"] += sum(band[0] <= (b.y + b.h / 2) / height <= band[1] for b in f.boxes)
    out = {}
    for name, row in rows.items():
        out[name] = {"findings": row["findings"], "boxes": row["boxes"],
                     "iobb_0.5": row["hit"] / row["findings"] if row["findings"] else None}
        if "in_band" in row:
            out[name]["in_band"] = row["in_band"] / row["boxes"] if row["boxes"] else None
    return out


CONFIDENCE_BINS = (0.0, 0.5, 0.7, 0.9, 1.0)  # bins (lo, hi]: below .5, .5-.7, .7-.9, above .9


def confidence_figures(ed, idx, results) -> dict:
    """Per context field, the accuracy of the reported findings' words (paired with the truth as
    `cxr evaluate` pairs them) in bins of the annotator's confidence in the word it wrote."""
    from cxr import metrics as M

    seen = {f: [] for f in ("side", "location", "severity")}
    for i, r in zip(idx, results):
        said = [f for f in r.findings if f.disease != "normal"]
        for true, pred in M.match_findings(ed.truth_findings(i), said):
            if pred is None:
                continue
            for field, rows in seen.items():
                if M._norm(getattr(true, field)) is None or field not in pred.confidence:
                    continue
                rows.append((pred.confidence[field], M._field_ok(true, pred, field)))
    out = {}
    for field, rows in seen.items():
        p = np.array([c for c, _ in rows])
        ok = np.array([o for _, o in rows], dtype=float)
        # accuracy per bin of confidence, and the expected calibration error over the bins: how far
        # the stated confidence is from the share of words that were right
        rel = M.reliability(ok, p, edges=CONFIDENCE_BINS)
        bins = [{"from": b["lo"], "to": b["hi"], "n": b["count"], "accuracy": b["frequency"],
                 "mean_confidence": b["confidence"]} for b in rel["bins"]]
        out[field] = {"n": len(rows), "accuracy": float(ok.mean()) if rows else None,
                      "mean_confidence": float(p.mean()) if rows else None, "ece": rel["ece"] or 0.0,
                      "bins": bins}
    return out


def study_figures(ed, idx, results, reader) -> dict:
    """Studies called abnormal with no disease at or above its threshold: how many, how many truly
    abnormal, and how often the disease nearest its threshold (in odds) is one the study has."""
    from cxr.operating import NORMAL

    eps = 1e-6
    odds = lambda p: np.log(max(p, eps) / max(1 - p, eps))  # noqa: E731
    empty = abnormal_truly = nearest_true = called = 0
    for i, r in zip(idx, results):
        if r.call != "abnormal":
            continue
        called += 1
        if any(f.disease != NORMAL for f in r.findings):
            continue
        empty += 1
        truth = {f.disease for f in ed.truth_findings(i)}
        abnormal_truly += bool(truth)
        nearest = max((t for t in r.scores if t != NORMAL),
                      key=lambda t: odds(r.scores[t]) - odds(reader.spec.thresholds[t]))
        nearest_true += nearest in truth
    return {"called_abnormal": called, "no_finding_above_threshold": empty,
            "of_which_truly_abnormal": abnormal_truly, "nearest_finding_true": nearest_true}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("cxr-demo"), help="a finished `cxr demo --out DIR`")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import dataclasses

    from cxr.checkpoint import load_run
    from cxr.metrics import markdown_table
    from cxr.models.localize import SITE_BANDS
    from cxr.reader import Reader
    from demo_errors import finished_demo  # the script beside this one

    run, ed, idx = finished_demo(args.demo, "words_and_boxes")
    paths = [ed.prep.paths[i] for i in idx]
    reader = Reader.load(run, device="cpu", gate=False)
    readings = {}
    for follow in (False, True):
        reader.boxes_follow_site = follow
        readings["site_band" if follow else "side_only"] = box_figures(ed, idx, reader(paths, heatmaps=False))
    results = reader(paths, heatmaps=False)
    # the word confidence as the annotator's field heads give it, and with the run's temperatures
    raw = Reader(dataclasses.replace(reader.spec, word_temperature={}), load_run(run)[1], "cpu", gate=False)
    out = {"benchmark": "words_and_boxes", "demo": str(args.demo), "split": "test", "studies": len(idx),
           "site_bands": SITE_BANDS, "boxes": readings, "study": study_figures(ed, idx, results, reader),
           "word_temperature": reader.spec.word_temperature,
           "word_confidence": {"calibrated": confidence_figures(ed, idx, results),
                               "raw": confidence_figures(ed, idx, raw(paths, heatmaps=False))}}
    rows = [[name, kind, r[kind]["findings"], r[kind].get("in_band"), r[kind]["iobb_0.5"]]
            for name, r in readings.items() for kind in ("site", "no_site")]
    print(markdown_table(["boxes", "findings", "n", "box centres in the site band", "IoBB .5"], rows, digits=3))
    print(f"word temperatures: {out['word_temperature']}")
    for kind, figures in out["word_confidence"].items():
        for field, c in figures.items():
            print(f"{kind} {field} words ({c['n']}): accuracy {c['accuracy']:.3f}, mean confidence "
                  f"{c['mean_confidence']:.3f}, ECE {c['ece']:.3f}")
            for b in c["bins"]:
                print(f"  confidence {b['from']:.1f}-{b['to']:.1f}: n {b['n']}, accuracy {b['accuracy']}")
    st = out["study"]
    print(f"studies called abnormal: {st['called_abnormal']}; with no disease above its threshold: "
          f"{st['no_finding_above_threshold']} ({st['of_which_truly_abnormal']} truly abnormal); the "
          f"disease nearest its threshold is a true finding in {st['nearest_finding_true']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
