"""The README's demo figures: run `cxr demo` (its defaults) into a folder and keep its metrics as
`benchmarks/results/demo.json`, so the README's demo table comes from a committed file; the README's
block is printed at the end, ready to paste.

    python benchmarks/demo.py [--out cxr-demo-bench] [--json benchmarks/results/demo.json]

One command, re-run whenever the model or the phantom changes. The demo resumes, so an interrupted
run is finished by running this again; `--fresh` deletes --out first, for a full measurement (the
times of a resumed run cover only what was left to do). `--no-run` only condenses the metrics of
a demo already in --out. README.md's demo figures (the blocks marked with this file) are rewritten
from the new metrics unless --no-readme.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def condense(metrics: dict) -> dict:
    """The demo's metrics without paths of this machine and without per-image rows."""
    out = {"benchmark": "demo"}
    out.update({k: v for k, v in metrics.items() if k not in ("examples", "per_image", "run", "data")})
    demo = dict(out.get("demo", {}))
    for key in ("data", "run"):
        demo.pop(key, None)
    out["demo"] = demo
    return out


def _f(value: float, digits: int = 3) -> str:
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("0.") else text


POOLING_WORDS = {"avg": "average pooling", "lse": "log-sum-exp pooling",
                 "class_lse": "each class map pooled by its own log-sum-exp"}


def readme_block(m: dict) -> str:
    """The README's demo figures, as the README shows them (paste after a re-run)."""
    s, t = m["demo"]["settings"], m["demo"]["seconds"]
    auc = m["auc"]["per_label"]
    shown = [k for k in ("Cardiomegaly", "Lung/hypoinflation", "Pleural Effusion", "normal", "Opacity",
                         "Nodule") if k in auc]
    bleu = m["bleu"]

    def b4(stage, split, kind):
        row = bleu[stage][split][kind]
        return "/".join(_f(row[f"bleu{i}"]) for i in (1, 2, 3, 4))

    ctx = m["context"]["fields"]
    given = (m["context"].get("given_disease") or {}).get("fields")
    loc = m["localisation"]["protocol_given_disease"]
    ths = [str(x) for x in loc["thresholds"]]
    return "\n".join([
        "<!-- figures: benchmarks/results/demo.json -->",
        textwrap.fill(f"**The demo, measured** (`python benchmarks/demo.py`: `cxr demo` with its defaults on this shared "
        f"2-core machine; simulate {t['simulate']:.0f} s for {s['n']:,} studies, train {t['train']:.0f} s, "
        f"evaluate {t['evaluate']:.0f} s; tiny CNN at {s['image_size']} px, {s['epochs']}+"
        f"{s['cascade_epochs']} epochs, {POOLING_WORDS.get(s.get('pooling', 'avg'), s.get('pooling'))}, GRU), "
        f"on the {m['n_images']} held-out test studies of the phantom:",
        width=100),
        "",
        "<!-- figures: benchmarks/results/demo.json -->",
        "| | |",
        "| --- | --- |",
        f"| mean AUC over {m['auc']['n_labels']} targets | {_f(m['auc']['mean'])} ("
        + ", ".join(f"{k} {_f(auc[k], 2)}" for k in shown) + ") |",
        *([f"| study level, normal or abnormal (AUC of the abnormal probability) | {_f(m['study']['auc'])} |",
           f"| study level at the stored operating point ({m['study']['operating_point']} on the validation "
           f"patients): sensitivity / specificity / normal recall | {_f(m['study']['sensitivity'])} / "
           f"{_f(m['study']['specificity'])} / {_f(m['study']['normal_recall'])} |",
           f"| findings reported (micro): PPV / sensitivity | {_f(m['detection']['micro']['precision'])} / "
           f"{_f(m['detection']['micro']['recall'])} |"] if m.get("study") else []),
        f"| calibration error (ECE, {m['calibration']['n_bins']} bins) | {_f(m['calibration']['ece'])} |",
        "| BLEU-1/2/3/4, annotator given the disease, stage 1 → cascade | "
        f"{b4('stage1', 'test', 'given_disease')} → {b4('cascade', 'test', 'given_disease')} |",
        "| BLEU-1/2/3/4, end to end (detected findings), stage 1 → cascade | "
        f"{b4('stage1', 'test', 'end_to_end')} → {b4('cascade', 'test', 'end_to_end')} |",
        "| context of detected findings: side / location / severity | "
        + " / ".join(_f(ctx[k]["accuracy"], 2) for k in ("side", "location", "severity")) + " |",
        *([f"| context given the disease (every true finding): side / location / severity | "
           + " / ".join(_f(given[k]["accuracy"]) for k in ("side", "location", "severity")) + " |"]
          if given else []),
        f"| localisation, CAM of the true disease, mean accuracy at T(IoBB) = {'/'.join(ths)} | "
        + " / ".join(_f(loc["iobb"]["mean"][k], 2) for k in ths) + " |",
        "",
        "<!-- figures: benchmarks/results/demo.json -->",
        textwrap.fill("On the training split the cascade takes BLEU-4 (given the disease) from "
        f"{_f(bleu['stage1']['train']['given_disease']['bleu4'])} to "
        f"{_f(bleu['cascade']['train']['given_disease']['bleu4'])}; on held-out images, from "
        f"{_f(bleu['stage1']['test']['given_disease']['bleu4'])} to "
        f"{_f(bleu['cascade']['test']['given_disease']['bleu4'])}: at this size it mostly fits the training set.",
        width=100),
    ])


BEGIN, END = "<!-- written by benchmarks/demo.py -->", "<!-- end of what benchmarks/demo.py writes -->"


def update_readme(readme: Path, block: str) -> bool:
    """Replace what lies between the README's BEGIN and END markers with `block`, and nothing
    else (paragraphs written by hand about the same figures stay); False when the README has no
    such markers."""
    text = readme.read_text()
    first, last = text.find(BEGIN), text.find(END)
    if first < 0 or last < first:
        return False
    tmp = readme.with_suffix(".tmp")
    tmp.write_text(text[:first + len(BEGIN)] + "\n" + block + "\n" + text[last:])
    tmp.replace(readme)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("cxr-demo-bench"), help="the demo's folder")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "demo.json")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    ap.add_argument("--no-run", action="store_true", help="only condense the metrics already in --out")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone (default: its demo "
                    "figures are rewritten from the new metrics)")
    args, extra = ap.parse_known_args(argv)  # anything else goes to `cxr demo` (e.g. --quick)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    if not args.no_run:
        command = [sys.executable, "-m", "cxr.cli", "demo", "--out", str(args.out), *extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        subprocess.run(command, check=True, env=env)
    result = condense(json.loads((args.out / "metrics.json").read_text()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    tmp.replace(args.json)
    block = readme_block(result)
    print(f"demo: {result['demo'].get('seconds')}; metrics in {args.json}; the README block:\n")
    print(block)
    if not args.no_readme and update_readme(ROOT / "README.md", block):
        print("\nREADME.md: demo figures updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
