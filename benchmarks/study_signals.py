"""Which score should say "abnormal": each study-level signal of `cxr.operating.StudyGate` read on
finished runs, on their validation patients (where training chooses) and their test patients.

    python benchmarks/study_signals.py --run RUN phantom:DATA [--run RUN2 DATA2 ...] --json OUT

For each run: the AUC of each signal (the `normal` output, the highest disease score, and their
summed logits) on the validation and test studies, and the best specificity any threshold on it
reaches at sensitivity .9 on the test studies. No run is retrained: the CNN's calibrated scores
are read once per image and every signal is computed from the same scores, so the signals are
paired. Prints a table; --json writes everything.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scores_and_truth(run: str, data: str, splits=("val", "test")):
    """Per split, the calibrated per-target scores (N, T) of the run's images and their abnormal
    truth; and the targets. The run and its source are read once for all the splits."""
    import numpy as np

    from cxr.evaluation import EvalData
    from cxr.images import load_image
    from cxr.operating import abnormal_truth
    from cxr.reader import Reader
    from cxr.sources import open_source

    reader = Reader.load(run, device="cpu", gate=False)
    ed = EvalData(reader.spec, open_source(data))
    out = {}
    for split in splits:
        idx = ed.indices(split)
        scores = []
        for s in range(0, len(idx), 64):
            _, logits, _ = reader.forward([load_image(ed.prep.paths[i]) for i in idx[s:s + 64]])
            scores.append(reader.scores(logits)[0])
        out[split] = (np.concatenate(scores), abnormal_truth(ed.prep.labels[idx], list(ed.targets)))
    return out, list(ed.targets)


def measure(run: str, data: str) -> dict:
    from cxr.operating import SIGNALS, StudyGate, _auc, best_specificity

    out = {"run": f"{Path(run).parent.name}/{Path(run).name}", "data": data.split(":")[0], "signals": {}}
    read, targets = scores_and_truth(run, data)
    for signal in SIGNALS:
        gate = StudyGate(signal, [1.0, 0.0], 0.5)
        row = {}
        for split, (scores, y) in read.items():
            z = gate.signal_logit(scores, targets)
            row[f"{split}_auc"] = _auc(y, z)
            if split == "test":
                row["test_best_specificity_at_sensitivity_0.9"] = best_specificity(y, z, 0.9)
        out["signals"][signal] = row
    out["chosen_on_validation"] = max(SIGNALS, key=lambda s: out["signals"][s]["val_auc"])
    out["studies"] = {split: {"abnormal": int(y.sum()), "normal": int((1 - y).sum())}
                      for split, (_, y) in read.items()}
    return out


def main(argv=None) -> int:
    from cxr.metrics import markdown_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs=2, action="append", required=True, metavar=("RUN", "DATA"),
                    help="a finished run and the source it was trained on (e.g. phantom:cxr-demo/data)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from cxr.errors import CxrError

    try:
        results = [measure(run, data) for run, data in args.run]
    except CxrError as e:  # a wrong run or data path: one line, not a traceback
        raise SystemExit(f"study_signals: {e}")
    rows = [[r["run"], s, v["val_auc"], v["test_auc"], v["test_best_specificity_at_sensitivity_0.9"],
             "yes" if s == r["chosen_on_validation"] else ""]
            for r in results for s, v in r["signals"].items()]
    print(markdown_table(["run", "signal", "validation AUC", "test AUC", "test: best specificity at "
                          "sensitivity .9", "chosen"], rows, digits=3))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "study_signals", "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
