"""Which way of training the anatomy network reads real films best: each recipe trained with
several seeds (`python -m cxr.anatomy.train`, on the CT phantom only) and scored by
`benchmarks/anatomy.py`'s measures, seed by seed, with each recipe's mean and spread.

    python benchmarks/anatomy_recipes.py --demo DIR --nih NIH_DIR --work anatomy-recipes \
        [--recipes u16 u8 u16-warp u8-warp] [--seeds 0 1 2] --json benchmarks/results/anatomy_recipes.json

A network trained on one CT reads real films differently from seed to seed (its heart box on the
NIH Cardiomegaly films moved from .69 to .84 at T(IoU) = 0.5 between three seeds of one recipe),
so a recipe is judged by the mean over its seeds, never by one seed's luck. Measures per network:
on the 111 real NIH films with an expert Cardiomegaly box, the heart box at T(IoU) and T(IoBB) =
0.5; over all 656 NIH films, the cardiothoracic ratio's ROC AUC for NIH's Cardiomegaly label on PA
and on AP films; on the demo's phantom test split, the ratio's mean |error| and Pearson r against
the ratio the phantom drew; and (first seed of each recipe) its time per 1024-px film in eager
PyTorch over a DenseNet-121 forward pass. `--work` keeps the trained networks: a rerun trains only what is missing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WIDE = ["--features", "16", "16", "32", "64", "128", "16"]
SMALL = ["--features", "8", "8", "16", "32", "64", "8"]
WARP = ["--warp", "0.12"]
NO_WARP = ["--warp", "0"]
RECIPES = {  # name -> `python -m cxr.anatomy.train` arguments (besides --out and --seed)
    "u16": WIDE + NO_WARP,          # the first shipped network
    "u8": SMALL + NO_WARP,          # half the widths
    "u16-warp": WIDE + WARP,        # smooth random deformations, width apart from height, blur/sharpen
    "u8-warp": SMALL + WARP,        # the shipped network now (the train command's defaults)
    "u8-warp-2400": SMALL + WARP + ["--films", "2400", "--epochs", "12"],
}
MEASURES = ("nih_heart_iou_0.5", "nih_heart_iobb_0.5", "nih_ratio_auc_pa", "nih_ratio_auc_ap",
            "phantom_ratio_abs_error", "phantom_ratio_r")


def trained(work: Path, recipe: str, seed: int) -> Path:
    """The network of `recipe` and `seed` under `work`, trained now if it is not there yet."""
    from cxr.anatomy.train import main as train

    out = work / f"{recipe}-s{seed}"
    if not (out / "anatomy.json").is_file():
        print(f"training {recipe} seed {seed} -> {out}", flush=True)
        train(RECIPES[recipe] + ["--out", str(out), "--seed", str(seed)])
    return out


def measures(model, demo: Path, nih_dir: Path) -> dict:
    """The anatomy network's own measures (the demo run's Reader is not needed for them: its
    map boxes and scores are the same for every network)."""
    import anatomy as bench

    ph, nih = bench.phantom(None, model, demo), bench.nih(None, model, nih_dir)
    return {"nih_heart_iou_0.5": nih["anatomy"]["iou"]["Cardiomegaly"]["0.5"],
            "nih_heart_iobb_0.5": nih["anatomy"]["iobb"]["Cardiomegaly"]["0.5"],
            "nih_ratio_auc_pa": nih["ratio_vs_label"]["PA"]["ratio_auc"],
            "nih_ratio_auc_ap": nih["ratio_vs_label"]["AP"]["ratio_auc"],
            "phantom_ratio_abs_error": ph["ratio"]["mean_abs_error"],
            "phantom_ratio_r": ph["ratio"]["pearson_r"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `cxr demo --out DIR`")
    ap.add_argument("--nih", type=Path, required=True, help="folder with Data_Entry*.csv, BBox_List*.csv, images/")
    ap.add_argument("--work", type=Path, default=Path("anatomy-recipes"), help="the trained networks (kept)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import anatomy as bench

    from cxr import metrics as M
    from cxr.anatomy import AnatomyModel
    from cxr.images import load_image
    from cxr.reader import Reader

    reader = Reader.load(args.demo / "run", device="cpu", gate=False)
    films = [load_image(p) for p in sorted((args.demo / "data" / "images").glob("*.png"))[:10]]
    out = {"benchmark": "anatomy_recipes", "seeds": args.seeds,
           "recipes": {r: {"train_args": RECIPES[r], "runs": {}} for r in args.recipes}}
    for recipe in args.recipes:
        part = out["recipes"][recipe]
        for seed in args.seeds:
            model = AnatomyModel.load(trained(args.work, recipe, seed), engine="torch")  # as measured
            part["runs"][str(seed)] = {**measures(model, args.demo, args.nih),
                                       "train_seconds": model.meta.get("seconds")}
            if seed == args.seeds[0]:
                part["time"] = bench.timing(reader, model, films)
            print(recipe, seed, part["runs"][str(seed)], flush=True)
        runs = list(part["runs"].values())
        part["mean"] = {m: statistics.mean(r[m] for r in runs) for m in MEASURES}
        part["sd"] = {m: statistics.stdev(r[m] for r in runs) if len(runs) > 1 else 0.0 for m in MEASURES}
    print(M.markdown_table(
        ["recipe", "NIH heart T(IoU)=0.5", "T(IoBB)=0.5", "ratio AUC PA", "ratio AUC AP", "phantom ratio abs. error",
         "phantom r", "time x DenseNet-121"],
        [[r, *(f"{p['mean'][m]:.3f} ± {p['sd'][m]:.3f}" for m in MEASURES), p["time"]["anatomy_over_densenet121"]]
         for r, p in out["recipes"].items()]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
