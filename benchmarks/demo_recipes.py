"""Which demo recipe reads best: the demo's cascade trained and evaluated with other settings
(input size, epochs, learning rate, grounding epochs, seed) on the demo's phantom data and its
split, one recipe per process, so recipes run side by side on a machine with the cores (or a GPU).

    python benchmarks/demo_recipes.py --data phantom:cxr-demo/data --recipe e20 '{"epochs": 20, "cascade_epochs": 10}'
    python benchmarks/demo_recipes.py --collect logs/*.log --json benchmarks/results/demo_recipes.json

Each recipe prints one `RESULT {...}` line: mean AUC, the study-level AUC and, at the stored
operating point, sensitivity / specificity / normal recall, the context accuracy of detected
findings (side / location / severity, with their counts) and of the words written for every true
finding when told its disease (`given_disease`: paired across recipes), mean localisation accuracy at
T(IoBB) = 0.5 per source, and the train / evaluate seconds. `--collect` gathers those lines from
the recipes' logs into one JSON with a table (the demo's defaults were chosen from it). Settings
not given keep `cxr demo`'s defaults; a `seed` changes the split as well as the initialisation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def run_recipe(name: str, extra: dict, data: str, work: Path, device: str) -> dict:
    import numpy as np

    from cxr.commands.demo import DEFAULTS, TRAIN_KEYS
    from cxr.evaluation import evaluate_run
    from cxr.sources import open_source
    from cxr.training import TrainConfig, train

    s = {**DEFAULTS, "seed": 0, **extra}
    if "image_size" in extra and "crop" not in extra:
        s["crop"] = s["image_size"] - s["image_size"] // 8
    import dataclasses

    from cxr.errors import CxrError

    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CxrError(f"recipe {name}: not a training setting: {', '.join(unknown)}")
    other = {k: v for k, v in extra.items() if k not in TRAIN_KEYS}
    studies = open_source(data)
    t0 = time.time()
    cfg = TrainConfig(data=data, rnn="gru", device=device, progress=False, num_workers=0,
                      **{k: s[k] for k in TRAIN_KEYS}, **other)
    run = train(cfg, work / name / "run", studies=studies)
    t1 = time.time()
    m = evaluate_run(run, split="test", out=work / name, progress=False, studies=studies,
                     device=None if device == "auto" else device)  # the Reader picks CUDA when present
    st, loc = m["study"], m["localisation"]["sources"]
    iobb = {src: float(np.mean([v["0.5"] for v in loc[src]["iobb"]["accuracy"].values()])) for src in loc}
    return {"name": name, "extra": extra, "auc": m["auc"]["mean"], "study_auc": st["auc"],
            "sens": st["sensitivity"], "spec": st["specificity"], "normal_recall": st.get("normal_recall"),
            "best_spec_at_target": st.get("best_specificity_at_target"),
            "side": m["context"]["fields"]["side"], "location": m["context"]["fields"]["location"],
            "severity": m["context"]["fields"]["severity"], "iobb05": iobb,
            "given_disease": (m["context"].get("given_disease") or {}).get("fields"),
            "train_s": round(t1 - t0), "eval_s": round(time.time() - t1)}


def table(rows: list[dict]) -> str:
    from cxr.metrics import markdown_table

    return markdown_table(
        ["recipe", "settings", "mean AUC", "study AUC", "sens", "spec", "side", "location", "severity",
         "side / location / severity given the disease", "attention IoBB .5"],
        [[r["name"], json.dumps(r["extra"]), r["auc"], r["study_auc"], r["sens"], r["spec"],
          r["side"]["accuracy"], r["location"]["accuracy"], r["severity"]["accuracy"],
          " / ".join(f"{r['given_disease'][f]['accuracy']:.3f}" for f in ("side", "location", "severity"))
          if r.get("given_disease") else None,
          r["iobb05"].get("attention")] for r in rows], digits=3)


def collect(logs: list[Path], machine: str, note: str, base: dict) -> dict:
    rows = []
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith("RESULT "):
                rows.append(json.loads(line[len("RESULT "):]))
    return {"benchmark": "demo_recipes", "machine": machine, "note": note, "base_settings": base,
            "rows": sorted(rows, key=lambda r: (r["extra"].get("seed", 0), r["name"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="phantom:DIR, the demo's data (cxr-demo/data)")
    ap.add_argument("--recipe", nargs=2, metavar=("NAME", "JSON"), help="a name and the settings it changes")
    ap.add_argument("--work", type=Path, default=Path("demo-recipes"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--collect", nargs="+", type=Path, metavar="LOG", help="gather RESULT lines instead")
    ap.add_argument("--machine", default="", help="with --collect: where the recipes ran")
    ap.add_argument("--note", default="", help="with --collect: what else to know about the run")
    ap.add_argument("--base", default="{}", help="with --collect: the settings the recipes changed "
                    "(JSON; `cxr demo`'s defaults at the time)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    def settings_of(text: str, what: str) -> dict:
        try:
            value = json.loads(text)
        except ValueError as exc:
            ap.error(f"{what} is not JSON ({exc}): {text}")
        if not isinstance(value, dict):
            ap.error(f"{what} must be a JSON object of settings, not {text}")
        return value

    if args.collect:
        missing = [str(p) for p in args.collect if not p.is_file()]
        if missing:
            ap.error(f"no such log: {', '.join(missing)}")
        out = collect(args.collect, args.machine, args.note, settings_of(args.base, "--base"))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(table(out["rows"]))
        return 0
    if not (args.data and args.recipe):
        ap.error("give --data and --recipe (or --collect)")
    name, settings = args.recipe
    from cxr.errors import CxrError

    try:
        row = run_recipe(name, settings_of(settings, f"recipe {name}"), args.data, args.work, args.device)
    except CxrError as exc:
        raise SystemExit(f"demo_recipes: {exc}") from None
    print("RESULT", json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
