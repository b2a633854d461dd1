"""Is the side word limited by how it is chosen, or by the maps it is chosen from? On a finished
demo's phantom, the side of each detected finding whose truth names one, read five ways from the
same run's own evidence per image half:

    python benchmarks/side_readouts.py --demo cxr-demo [--json OUT]

- `words`: the side word the Reader writes (the grounded annotator's field head weighed with the
  presence of the finding map in each image half, `GroundedAnnotator.field_log_probs`);
- `head`: the field head alone; `halves`: the presence logits per half alone (bilateral where
  both exceed a margin, else the stronger half); `cam`: the CNN's class map of the disease pooled
  (its own log-sum-exp) over each half, relative to the whole film's (the head's logit), the
  same rule;
- `fitted`: a logistic regression on all of them together (head, presence, CAM per half).

Margins and the regression are fitted on the validation split's findings and scored on the test
split's (few findings: the figures move by a few hundredths with one finding); for the per-half
rules the best margin on the test split itself is given too, as an upper bound. The image-left
half is the patient's right on these PA films, as everywhere in cxr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("right", "left", "bilateral")
MARGINS = np.round(np.arange(-6.0, 3.01, 0.25), 2)  # the CAM per half is relative to the whole: mostly below 0


def by_halves(right_half: float, left_half: float, margin: float) -> str:
    """The patient's side from evidence in the image-left half (patient's right) and image-right half."""
    if right_half > margin and left_half > margin:
        return "bilateral"
    return "right" if right_half >= left_half else "left"


def evidence(reader, ed, idx) -> list[dict]:
    """Per detected finding of images `idx` whose truth names a side: the truth, the word the
    Reader wrote, and the run's evidence per half for that finding."""
    import torch

    from cxr.images import read_image, pixels_of
    from cxr.metrics import match_findings
    from cxr.models.grounded import zone_masks_of
    from cxr.training.loops import half_logits

    g, head_maps = reader.ground, reader.cnn.head
    side_words = [reader.words[i] for i in g.field_words["side"]]
    order = [side_words.index(s) for s in SIDES]
    out = []
    for i in idx:
        pixels = pixels_of(read_image(ed.prep.paths[i]))
        result = reader._batch([pixels], heatmaps=False, beams=1)[0]
        sided = [(truth, said) for truth, said in match_findings(ed.truth_findings(int(i)), result.findings)
                 if said is not None and getattr(truth, "side", None)]
        if not sided:
            continue
        maps, logits, _ = reader.forward([pixels])  # the maps `_batch` read (it keeps none)
        _, best = reader.scores(logits)
        with torch.no_grad():
            values, keys = g.regions(maps)
            # each class map pooled over each half as the head pools the whole film, minus the whole
            cam = (half_logits(head_maps.class_maps, maps, head_maps.sharpness()[:, None])[0]
                   - logits[0][:, None])
            for truth, said in sided:
                t = reader.targets.index(said.disease)
                _, pooled, presence = g.finding(values, keys, torch.tensor([t]), zone_masks_of(maps))
                head = torch.log_softmax(g.field_logits(pooled)["side"], -1)[0, order]
                out.append({"image": int(i), "disease": said.disease, "truth": truth.side, "words": said.side,
                            "head": head.tolist(), "halves": presence[0, :2].tolist(),
                            "cam": cam[int(best[0, t])].tolist()})
    return out


def features(f: dict) -> list[float]:
    return f["head"] + f["halves"] + f["cam"]


def accuracy(found: list[dict], said) -> float:
    return float(np.mean([said(f) == f["truth"] for f in found])) if found else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("cxr-demo"), help="a finished `cxr demo --out DIR`")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from sklearn.linear_model import LogisticRegression

    from cxr.atomic import write_atomic
    from cxr.machine import cpu_name
    from cxr.reader import Reader
    from demo_errors import finished_demo

    torch.set_num_threads(2)
    t0 = time.time()
    run, ed, test_idx = finished_demo(args.demo, "side_readouts")
    reader = Reader.load(run, device="cpu", gate=False)
    if reader.ground is None:
        raise SystemExit(f"side_readouts: {run} has no grounded annotator")
    val, test = evidence(reader, ed, ed.indices("val")), evidence(reader, ed, test_idx)
    if not val or not test:
        raise SystemExit("side_readouts: no detected finding with a true side in the validation or test split")

    def best_margin(key: str) -> float:
        return float(max(MARGINS, key=lambda m: accuracy(val, lambda f: by_halves(*f[key], m))))

    margins = {key: best_margin(key) for key in ("halves", "cam")}
    fit = LogisticRegression(C=1.0, max_iter=2000).fit(
        np.array([features(f) for f in val]), [SIDES.index(f["truth"]) for f in val])
    rules = {
        "words": lambda f: f["words"],
        "head": lambda f: SIDES[int(np.argmax(f["head"]))],
        "halves": lambda f: by_halves(*f["halves"], margins["halves"]),
        "cam": lambda f: by_halves(*f["cam"], margins["cam"]),
        "fitted": lambda f: SIDES[int(fit.predict([features(f)])[0])],
    }
    table = {name: {"val": accuracy(val, rule), "test": accuracy(test, rule)} for name, rule in rules.items()}
    # an upper bound for the per-half rules: their best margin chosen on the test split itself
    for key in margins:
        table[key]["test_best_margin"] = max(accuracy(test, lambda f: by_halves(*f[key], m)) for m in MARGINS)
    confusion = {}
    for f in test:
        key = f"{f['truth']} -> {f['words']}"
        confusion[key] = confusion.get(key, 0) + 1
    result = {"benchmark": "side_readouts", "demo": str(args.demo), "processor": cpu_name(),
              "findings": {"val": len(val), "test": len(test)}, "margins": margins,
              "accuracy": table, "test_words_confusion": dict(sorted(confusion.items())),
              "seconds": round(time.time() - t0, 1), "found": {"val": val, "test": test}}
    print(f"sided detected findings: validation {len(val)}, test {len(test)}; margins {margins}")
    print("| read-out | validation | test | test, margin chosen on test |\n| --- | ---: | ---: | ---: |")
    for name, acc in table.items():
        best = f"{acc['test_best_margin']:.3f}" if "test_best_margin" in acc else ""
        print(f"| {name} | {acc['val']:.3f} | {acc['test']:.3f} | {best} |")
    print("test, truth -> words:", result["test_words_confusion"])
    if args.json:
        import json

        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
