"""Boxes of whole-organ findings from the anatomy model (`cxr.anatomy`), paired against the
boxes the finding's own map gives, on real films and on the demo's phantom test split.

    python benchmarks/anatomy.py --demo DIR --nih NIH_DIR [--anatomy WEIGHTS_DIR] --json benchmarks/results/anatomy.json

- **Real NIH films** (`--nih`: Data_Entry*.csv, BBox_List*.csv, images/): every film with an
  expert Cardiomegaly box; the heart box of the shipped anatomy model (trained on the CT phantom
  only) against the box the demo's run draws from its map of Cardiomegaly (ChestX-ray8's
  protocol: the film is known to have it; the run's map source and box rule, the heart's row band).
  On every NIH film: the measured cardiothoracic ratio as a score for NIH's Cardiomegaly label
  (ROC AUC, by view), beside the demo run's own Cardiomegaly score.
- **Phantom** (the demo's test split, `--demo`: a finished `cxr demo` folder): the same pairing
  for Cardiomegaly, hyper- and hypoinflation and emphysema (the truth: the heart's or both
  lungs' mask); the Reader's own boxes of the findings it reports, with
  `Reader.boxes_of_whole_organs` on and off; the cardiothoracic ratio measured from the masks
  against the ratio the phantom drew, and the Cardiomegaly grade read from it (`cxr.anatomy.CTR_GRADES`)
  beside the grade word the run's annotator writes and the one the Reader reports (the ratio's
  where one is measured: `Reader.grade_from_ratio`).
- **Time**: the anatomy model per film (batch 1) over the run's own CNN forward pass, in turn in
  one process.
Accuracy at T(IoU) and T(IoBB) as in `cxr.metrics.localisation_accuracy`. Prints tables; --json
writes everything.
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

WHOLE = ("Cardiomegaly", "Lung/hyperdistention", "Lung/hypoinflation", "Emphysema")


def _acc(pairs) -> dict:
    from cxr import metrics as M

    la = M.localisation_accuracy(pairs)
    return {"n": la["n"], **{m: {lab: la[m]["accuracy"][lab] for lab in la["n"]} for m in ("iou", "iobb")}}


def nih(reader, model, nih_dir: Path) -> dict:
    """Every NIH film read once: on the films with an expert Cardiomegaly box, the anatomy model's
    heart box vs the run's map box; on all, the measured ratio against the Cardiomegaly label.
    `reader` None: the anatomy model's measures only (no map boxes, no run score)."""
    from cxr.evaluation import boxes_of_true_diseases
    from cxr.images import load_image
    from cxr.records import Box
    from cxr.sources import open_source

    anatomy, maps, rows = [], [], []
    for study in open_source(f"nih:{nih_dir}"):
        image = study.images[0]
        pixels = load_image(image.path)
        organs = model([pixels])[0]
        score = reader(pixels, heatmaps=False).scores.get("Cardiomegaly") if reader else None
        rows.append((image.view, any(f.disease == "Cardiomegaly" for f in study.positive),
                     organs.cardiothoracic_ratio, score))
        truth = [Box("Cardiomegaly", b.x, b.y, b.w, b.h) for b in image.boxes if b.label.lower() == "cardiomegaly"]
        if not truth:
            continue
        heart = organs.boxes["heart"]
        anatomy.append((truth, [Box("Cardiomegaly", heart.x, heart.y, heart.w, heart.h)] if heart else []))
        if reader:
            maps.append((truth, boxes_of_true_diseases(reader, pixels, truth, reader.box_source)))
    out = {"films": len(anatomy), "anatomy": _acc(anatomy), "ratio_vs_label": ratio_vs_label(rows)}
    return {**out, "map": _acc(maps), "map_source": reader.box_source} if reader else out


def ratio_vs_label(rows) -> dict:
    """Does the measured ratio tell NIH's Cardiomegaly label (ROC AUC), by view (an AP film
    magnifies the heart), beside the demo run's own Cardiomegaly score on the same films?
    `rows`: (view, label, ratio or None, the run's score) per film."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for view in ("all", "PA", "AP"):
        part = [r for r in rows if view == "all" or r[0] == view]
        y = np.array([r[1] for r in part])
        found = [r for r in part if r[2] is not None]
        yr, ratio = np.array([r[1] for r in found]), np.array([r[2] for r in found])
        out[view] = {
            "films": len(part), "positives": int(y.sum()), "ratio_found": len(found) / max(len(part), 1),
            "ratio_auc": float(roc_auc_score(yr, ratio)) if 0 < yr.sum() < len(yr) else None,
            "ratio_mean_positive": float(ratio[yr].mean()) if yr.any() else None,
            "ratio_mean_negative": float(ratio[~yr].mean()) if (~yr).any() else None,
            "share_positive_above_half": float((ratio[yr] > 0.5).mean()) if yr.any() else None,
            "share_negative_above_half": float((ratio[~yr] > 0.5).mean()) if (~yr).any() else None,
            "run_score_auc": float(roc_auc_score(y, [r[3] for r in part]))
            if 0 < y.sum() < len(y) and all(r[3] is not None for r in part) else None}
    return out


def phantom(reader, model, demo: Path) -> dict:
    """The demo's test split: whole-organ boxes (protocol and the Reader's own), the ratio, grades.
    `reader` None: the anatomy model's measures only (its boxes and the ratio)."""
    from cxr.anatomy import organ_of
    from cxr.checkpoint import load_spec
    from cxr.evaluation import EvalData, boxes_of_true_diseases
    from cxr.images import load_image
    from cxr.records import Box
    from cxr.sources import open_source

    run = demo / "run"
    ed = EvalData(load_spec(run), open_source(f"phantom:{demo / 'data'}"))
    drawn = {}
    for line in (demo / "data" / "cases.jsonl").read_text().splitlines():
        rec = json.loads(line)
        drawn[rec["image"]["id"]] = rec["render"]["ctr"]
    idx = ed.indices("test")
    films = [load_image(ed.prep.paths[i]) for i in idx]
    organs = model(films)
    anatomy, maps, ratios = [], [], []
    for i, pixels, org in zip(idx, films, organs):
        ratios.append((drawn[ed.prep.image_ids[i]], org.cardiothoracic_ratio))
        truth = [b for b in ed.truth_boxes(i) if b.label in WHOLE]
        if not truth:
            continue
        found = []
        for label in sorted({b.label for b in truth}):
            box = org.boxes[organ_of(label)]
            found += [Box(label, box.x, box.y, box.w, box.h)] if box else []
        anatomy.append((truth, found))
        if reader:
            maps.append((truth, boxes_of_true_diseases(reader, pixels, truth, reader.box_source)))
    own = {}
    grade_words = []
    for on in (True, False) if reader else ():
        reader.boxes_of_whole_organs = on
        results = reader(films, heatmaps=False)
        own["on" if on else "off"] = _acc([
            ([b for b in ed.truth_boxes(i) if b.label in WHOLE],
             [b for f in r.findings if f.disease in WHOLE for b in f.boxes])
            for i, r in zip(idx, results) if any(b.label in WHOLE for b in ed.truth_boxes(i))])
        if on:
            grade_words = [(i, r) for i, r in zip(idx, results)]
    if reader:
        reader.boxes_of_whole_organs = True

    from cxr.anatomy import grade_of_ratio

    annotator = {}  # the run's own grade words: the Reader with the grade rule off
    if reader:
        reader.grade_from_ratio = False
        annotator = dict(zip(idx, reader(films, heatmaps=False)))
        reader.grade_from_ratio = True
    said, read, measured = [], [], []
    for (i, r), org in zip(grade_words, organs):
        true = [f for f in ed.truth_findings(i) if f.disease == "Cardiomegaly"]
        if not true or not true[0].severity:
            continue
        word = next((f.severity for f in r.findings if f.disease == "Cardiomegaly"), None)
        if word is not None:  # reported: the Reader's grade, the annotator's own, the ratio's
            read.append(word == true[0].severity)
            said.append(next(f.severity for f in annotator[i].findings if f.disease == "Cardiomegaly")
                        == true[0].severity)
            measured.append(grade_of_ratio(org.cardiothoracic_ratio) == true[0].severity)
    t, m = np.array([a for a, b in ratios if b is not None]), np.array([b for a, b in ratios if b is not None])
    out = {
        "test_films": len(idx), "anatomy": _acc(anatomy),
        **({"map": _acc(maps), "map_source": reader.box_source, "reader_own_boxes": own} if reader else {}),
        "ratio": {"films": len(t), "found": len(t) / max(len(ratios), 1),
                  "mean_abs_error": float(np.abs(m - t).mean()), "bias": float((m - t).mean()),
                  "pearson_r": float(np.corrcoef(t, m)[0, 1])},
        "cardiomegaly_grade": {"reported": len(said), "word_accuracy": float(np.mean(said)) if said else None,
                               "reader_accuracy": float(np.mean(read)) if read else None,
                               "ratio_band_accuracy": float(np.mean(measured)) if measured else None},
    }
    return out


def timing(reader, model, films, repeats: int = 10) -> dict:
    """ms per film at batch 1, in turn in one process: the anatomy model, the run's forward pass,
    and a MONAI DenseNet-121 (random weights, 256-px input, the usual reader's network) on the
    same 1024-px film (each resizes it from full size)."""
    import torch
    from monai.networks.nets import DenseNet121

    from cxr.images import resize
    from cxr.preprocess import preprocess

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=14).eval()
    films = [resize(f, 1024) for f in films]

    def densenet(film):
        with torch.no_grad():
            net(torch.from_numpy(preprocess(film, 256, True))[None, None])

    steps = {"anatomy": lambda f: model([f]), "forward": lambda f: reader.forward([f]), "densenet121": densenet}
    times = {k: [] for k in steps}
    for k in range(repeats):
        for name in (list(steps) if k % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[name](films[k % len(films)])
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"anatomy_ms": ms["anatomy"], "forward_ms": ms["forward"], "densenet121_ms": ms["densenet121"],
            "anatomy_over_forward": ms["anatomy"] / ms["forward"],
            "anatomy_over_densenet121": ms["anatomy"] / ms["densenet121"], "repeats": repeats,
            "film_px": 1024, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `cxr demo --out DIR`")
    ap.add_argument("--nih", type=Path, help="folder with Data_Entry*.csv, BBox_List*.csv, images/")
    ap.add_argument("--anatomy", type=Path, help="other anatomy weights (a folder with anatomy.safetensors "
                    "and .json, as `python -m cxr.anatomy.train --out` writes); default: the shipped ones")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from cxr import metrics as M
    from cxr.anatomy import AnatomyModel
    from cxr.errors import CxrError
    from cxr.images import load_image
    from cxr.reader import Reader

    if not (args.demo / "run" / "config.json").is_file():
        raise SystemExit(f"anatomy: {args.demo} is not a finished `cxr demo` folder (run/)")
    try:
        reader = Reader.load(args.demo / "run", device="cpu", gate=False)
        model = AnatomyModel.load(args.anatomy)
        # the Reader's own boxes come from the same weights (on the one thread it reads them with)
        Reader._anatomy = {("cpu", 1): AnatomyModel.load(args.anatomy, threads=1)}
    except CxrError as e:
        raise SystemExit(f"anatomy: {e}")
    out = {"benchmark": "anatomy", "demo": str(args.demo), "model": model.meta, "engine": model.engine}
    out["phantom"] = ph = phantom(reader, model, args.demo)
    if args.nih:
        out["nih"] = nih(reader, model, args.nih)
    films = [load_image(p) for p in sorted((args.demo / "data" / "images").glob("*.png"))[:10]]
    out["time"] = timing(reader, model, films)

    def rows(part, labels):
        for lab in labels:
            if lab not in part["anatomy"]["n"]:
                continue
            yield [lab, part["anatomy"]["n"][lab]] + [part[s][m][lab]["0.5"] for s in ("map", "anatomy")
                                                      for m in ("iou", "iobb")]
    head = ["finding", "films", "map T(IoU)=0.5", "map T(IoBB)=0.5", "anatomy T(IoU)=0.5", "anatomy T(IoBB)=0.5"]
    if args.nih:
        print(f"Real NIH films with an expert Cardiomegaly box (map: the demo run's {out['nih']['map_source']} map)")
        print(M.markdown_table(head, rows(out["nih"], ["Cardiomegaly"])))
        rv = out["nih"]["ratio_vs_label"]
        print("\nThe measured cardiothoracic ratio against NIH's Cardiomegaly label, every film")
        print(M.markdown_table(["view", "films", "positives", "ratio AUC", "mean ratio +", "mean ratio -",
                                "run's score AUC"],
                               [[v, r["films"], r["positives"], r["ratio_auc"], r["ratio_mean_positive"],
                                 r["ratio_mean_negative"], r["run_score_auc"]] for v, r in rv.items()]))
    print(f"\nPhantom test split (map: the run's {ph['map_source']} map)")
    print(M.markdown_table(head, rows(ph, WHOLE)))
    own = ph["reader_own_boxes"]
    print("\nThe Reader's own boxes of the findings it reports, T(IoU)=0.5: organ boxes on / off")
    print(M.markdown_table(["finding", "films", "on", "off"],
                           [[lab, own["on"]["n"][lab], own["on"]["iou"][lab]["0.5"], own["off"]["iou"][lab]["0.5"]]
                            for lab in WHOLE if lab in own["on"]["n"]]))
    print(f"\nCardiothoracic ratio: |error| {ph['ratio']['mean_abs_error']:.3f}, bias {ph['ratio']['bias']:+.3f}, "
          f"r {ph['ratio']['pearson_r']:.3f} on {ph['ratio']['films']} films; Cardiomegaly grade of reported "
          f"findings: annotator's word {ph['cardiomegaly_grade']['word_accuracy']}, Reader "
          f"{ph['cardiomegaly_grade']['reader_accuracy']}, ratio bands "
          f"{ph['cardiomegaly_grade']['ratio_band_accuracy']} ({ph['cardiomegaly_grade']['reported']})")
    tm = out["time"]
    print(f"Time per 1024-px film: anatomy {tm['anatomy_ms']:.1f} ms, the run's forward {tm['forward_ms']:.1f} ms "
          f"({tm['anatomy_over_forward']:.2f}x), DenseNet-121 {tm['densenet121_ms']:.1f} ms "
          f"({tm['anatomy_over_densenet121']:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
