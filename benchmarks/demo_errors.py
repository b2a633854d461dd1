"""Where a finished demo's reading fails, on its phantom test split: which abnormal studies the
study-level call misses at a stated specificity, which normal films it scores most abnormal, and
which side words of detected findings are wrong.

    python benchmarks/demo_errors.py --demo cxr-demo [--specificity 0.6] [--json OUT]

`--demo` is a finished `cxr demo --out DIR` (its run and phantom data). The threshold is the one
that reaches the specificity on the test split's normal films (an oracle threshold: it shows
what the scores can do, not what the stored operating point does). Reported: sensitivity there;
per finding, how many abnormal studies carry it and how many of those fall below the threshold
(abnormal: not labelled normal, as `cxr evaluate` counts it);
the phantom's cardiothoracic ratio (`render.ctr` in cases.jsonl) of the normal films scored most
and least abnormal (a tenth each); and the side words of detected findings against the truth
(true side, side written, finding), scored as `cxr evaluate` does (left + right = bilateral).
Prints a summary; --json writes everything.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def finished_demo(demo: Path, script: str):
    """A finished `cxr demo --out DIR`: its run folder, and its data (`EvalData`) with the test
    split's indices; a folder that is not one stops `script` with one line."""
    from cxr.checkpoint import load_spec
    from cxr.evaluation import EvalData
    from cxr.sources import open_source

    run, data = demo / "run", demo / "data"
    if not (run / "config.json").is_file() or not (data / "cases.jsonl").is_file():
        raise SystemExit(f"{script}: {demo} is not a finished `cxr demo` folder (run/, data/cases.jsonl)")
    ed = EvalData(load_spec(run), open_source(f"phantom:{data}"))
    return run, ed, ed.indices("test")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("cxr-demo"), help="a finished `cxr demo --out DIR`")
    ap.add_argument("--specificity", type=float, default=0.6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from cxr import metrics as M
    from cxr.operating import abnormal_truth
    from cxr.reader import Reader

    run, ed, idx = finished_demo(args.demo, "demo_errors")
    data = args.demo / "data"
    results = Reader.load(run, device="cpu", gate=False)([ed.prep.paths[i] for i in idx], heatmaps=False)
    render = {}
    with open(data / "cases.jsonl") as fh:
        for line in fh:
            case = json.loads(line)
            render[case["image"]["id"]] = case["render"]

    truth = [ed.truth_findings(i) for i in idx]
    # not labelled normal, as `cxr evaluate`'s study-level figures count it
    abnormal = abnormal_truth(ed.prep.labels[idx], list(ed.targets)) > 0
    score = np.array([r.abnormal for r in results], dtype=float)
    # the least threshold at which the wanted share of normal films is called normal
    threshold = float(np.quantile(score[~abnormal], args.specificity))
    missed = abnormal & (score < threshold)
    carried, below = Counter(), Counter()
    for t, m in zip(truth, missed):
        for disease in {f.disease for f in t}:
            carried[disease] += 1
            below[disease] += bool(m)
    normals = np.flatnonzero(~abnormal)
    order = normals[np.argsort(-score[normals])]
    tenth = max(1, len(order) // 10)
    ctr = {name: [render[ed.images[idx[k]].id]["ctr"] for k in rows]
           for name, rows in (("most_abnormal", order[:tenth]), ("least_abnormal", order[-tenth:]))}

    sides = Counter()
    for t, r in zip(truth, results):
        said = [f for f in r.findings if f.disease != "normal"]
        for true, pred in M.match_findings(t, said):
            if pred is not None and true.side is not None:  # several true findings: one side
                sides[(true.side, pred.side or "none", pred.disease)] += 1
    out = {
        "demo": str(args.demo), "split": "test", "studies": len(idx),
        "abnormal": int(abnormal.sum()), "normal": int((~abnormal).sum()),
        "specificity": args.specificity, "threshold": threshold,
        "sensitivity": float((score[abnormal] >= threshold).mean()),
        "missed": int(missed.sum()),
        "missed_by_finding": {d: {"studies": carried[d], "missed": below[d]}
                              for d in sorted(carried, key=lambda d: (-below[d], d))},
        "normal_films_ctr": {k: {"n": len(v), "min": min(v), "max": max(v), "mean": float(np.mean(v))}
                             for k, v in ctr.items()},
        "sides": [{"truth": t, "said": s, "finding": d, "n": n} for (t, s, d), n in sorted(sides.items())],
        "side_accuracy": (sum(n for (t, s, _), n in sides.items() if t == s) / sum(sides.values())
                          if sides else None),
    }
    print(f"at specificity {args.specificity:.2f} (threshold {threshold:.3f}): sensitivity "
          f"{out['sensitivity']:.3f}, {out['missed']} of {out['abnormal']} abnormal studies missed")
    for d, v in out["missed_by_finding"].items():
        if v["missed"]:
            print(f"  {d}: {v['missed']} of {v['studies']} studies missed")
    for k, v in out["normal_films_ctr"].items():
        print(f"normal films scored {k.replace('_', ' ')} ({v['n']}): CTR mean {v['mean']:.3f} "
              f"({v['min']:.3f}-{v['max']:.3f})")
    print(f"side words of detected findings: {out['side_accuracy']}")
    for row in out["sides"]:
        print(f"  truth {row['truth']:>9}, said {row['said']:>9}: {row['n']} ({row['finding']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
