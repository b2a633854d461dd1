"""Which training recipe reads real films best: `benchmarks/real_nih.py` (scratch, 5 folds by
patient) once per recipe, recipes run side by side, and one table of their AUCs.

    python benchmarks/real_nih_sweep.py --data DIR --work nih-sweep --json sweep.json [--parallel 4]
    python benchmarks/real_nih_sweep.py --summarise nih-sweep --json sweep.json   # tables only

A recipe is a list of real_nih.py arguments (below). Each writes WORK/NAME.json; a recipe whose JSON
exists is not run again, so a sweep resumes, and `--summarise` builds the table from JSONs made
elsewhere (e.g. on a GPU machine, where all recipes fit at once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {
    "t64e40": ["--image-size", "64", "--epochs", "40"],
    "t128e40": ["--image-size", "128", "--epochs", "40"],
    "t256e40": ["--image-size", "256", "--epochs", "40"],
    "t128e40g": ["--image-size", "128", "--epochs", "40", "--set", "annotator=global", "--set", "ground_epochs=0"],
    "t128e40nodd": ["--image-size", "128", "--epochs", "40", "--set", "data_dropout=false"],
    "t128e40cw": ["--image-size", "128", "--epochs", "40", "--class-weighted"],
    "t128e40lse": ["--image-size", "128", "--epochs", "40", "--set", "pooling=lse"],
    "t128e80lr1": ["--image-size", "128", "--epochs", "80", "--lr", "1e-3"],
    "t128e40aug": ["--image-size", "128", "--epochs", "40", "--set", "rotation=15", "--set", "intensity=0.2"],
    "nin128e40": ["--backbone", "nin", "--image-size", "128", "--epochs", "40"],
    "goog128e40": ["--backbone", "googlenet", "--image-size", "128", "--epochs", "40", "--lr", "1e-3"],
    "goog256e30": ["--backbone", "googlenet", "--image-size", "256", "--epochs", "30", "--lr", "1e-3"],
    "dense256e30": ["--backbone", "densenet121", "--image-size", "256", "--epochs", "30", "--lr", "1e-3"],
    # one network per fold, the three poolings of the CNN head (`cxr train --pooling`)
    "t64e40n1avg": ["--ensemble", "1", "--pooling", "avg"],
    "t64e40n1lse": ["--ensemble", "1", "--pooling", "lse"],
    "t64e40n1cls": ["--ensemble", "1", "--pooling", "class_lse"],
}


def run_one(name: str, args, work: Path) -> None:
    out = work / f"{name}.json"
    if out.exists():
        return
    cmd = [sys.executable, str(HERE / "real_nih.py"), "--data", args.data, "--work", str(work / name),
           "--modes", "scratch", "--json", str(out), *RECIPES[name]]
    with open(work / f"{name}.log", "w") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.limit_s,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:  # the folds it finished stay in its log
            pass


def partial_folds(log: Path) -> list[float]:
    """Fold AUCs a recipe printed before it was stopped (its JSON is written only at the end)."""
    if not log.exists():
        return []
    return [float(line.split("mean AUC")[1].split()[0]) for line in log.read_text().splitlines()
            if "fold" in line and "mean AUC" in line]


def summarise(work: Path) -> dict:
    rows = {}
    for name in RECIPES:
        path = work / f"{name}.json"
        if path.exists():
            m = json.loads(path.read_text())["modes"]["scratch"]
            rows[name] = {"args": RECIPES[name], "complete": True, "pooled_auc": m["auc"]["mean"],
                          "per_label": m["auc"]["per_label"], "fold_mean_auc": m["mean_auc_over_folds"],
                          "fold_sd_auc": m["sd_auc_over_folds"],
                          "iobb_0.5": m["localisation"]["iobb"]["mean"]["0.5"], "seconds": m["seconds"],
                          "folds_done": len(m["folds"]),
                          # each map source's T(IoBB)=0.5 (true disease, fixed threshold), and what
                          # the Reader itself boxes for a detected finding, per box source
                          "iobb_0.5_by_source": {src: v["iobb"]["mean"]["0.5"]
                                                 for src, v in m.get("localisation_sources", {}).items()},
                          "reader_iobb_0.5_by_source": {
                              src: v["iobb"]["mean"]["0.5"]
                              for src, v in m.get("reader_output_by_box_source", {}).items()
                              if isinstance(v, dict) and "iobb" in v}}
        elif folds := partial_folds(work / f"{name}.log"):
            rows[name] = {"args": RECIPES[name], "complete": False, "folds_done": len(folds),
                          "fold_mean_auc": sum(folds) / len(folds)}
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="the NIH folder (as for real_nih.py)")
    ap.add_argument("--work", type=Path, default=Path("nih-sweep"))
    ap.add_argument("--summarise", type=Path, help="only build the table from WORK's JSONs")
    ap.add_argument("--only", help="comma-separated recipe names")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--machine", default="", help="where the recipes ran (kept in the JSON)")
    ap.add_argument("--limit-s", type=float, help="stop a recipe after this many seconds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = (args.summarise or args.work).expanduser()
    t0 = time.time()
    if not args.summarise:
        if not args.data:
            ap.error("--data is needed to run recipes")
        work.mkdir(parents=True, exist_ok=True)
        names = args.only.split(",") if args.only else list(RECIPES)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda n: run_one(n, args, work), names))
    rows = summarise(work)
    print(f"{'recipe':14s} {'pooled AUC':>10s} {'fold mean':>10s} {'sd':>6s} {'IoBB.5':>7s}  args")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["fold_mean_auc"]):
        print(f"{name:14s} {r.get('pooled_auc') or float('nan'):10.3f} {r['fold_mean_auc']:10.3f} "
              f"{r.get('fold_sd_auc') or float('nan'):6.3f} {r.get('iobb_0.5') or float('nan'):7.3f}  "
              + ' '.join(r['args']) + ('' if r['complete'] else f" ({r['folds_done']} of 5 folds)"))
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "real_nih_sweep", "machine": args.machine,
                                         "limit_s": args.limit_s, "n_recipes": len(rows),
                                         "recipes": rows, "seconds": round(time.time() - t0, 1)},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
