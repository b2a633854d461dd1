"""Real radiographs: patient-wise 5-fold cross-validation on the 656 NIH ChestX-ray8 images with
expert boxes, for the 8 ChestX-ray8 findings, (a) trained from scratch on these images and (b)
pre-trained on the phantom, then fine-tuned. AUC per finding (out-of-fold scores pooled over the
folds) and the ChestX-ray8 localisation table (CAM of the true finding -> boxes; accuracy at
T(IoBB) and T(IoU)), beside Wang et al. 2017.

    python benchmarks/real_nih.py --data DIR --json nih.json \
        [--phantom-run cxr-demo/run | --phantom-data cxr-demo/data] [--epochs 40] [--set KEY=VALUE]
        [--ensemble K]

`--ensemble K` trains each fold's run with `cxr train --ensemble K`: K networks that differ only
in their seed, on one patient split, merged into one run (logits averaged; the first network's
annotator, maps and boxes) and read by one Reader, as a user would; the JSON's
`auc_by_ensemble_size` gives the pooled mean AUC of the mean of the first 1..K networks' own
calibrated scores (each network is a complete run under the fold's run folder).

The defaults are the recipe that read real films best here (benchmarks/real_nih_sweep.py and the
runs after it): tiny CNN at 64 px, 40 epochs, log-sum-exp pooling, pre-trained for 20 epochs on
1,500 phantom films, and five networks merged into one run (`cxr train --ensemble 5`;
`--ensemble 1` is the single network of benchmarks/results/real_nih_single.json). `--members 5 --ensemble 1`
reads with five CNN trunks in one network trained together (`cxr train --members`; the phantom
pre-training then has five too): benchmarks/results/real_nih_members5.json.

What the numbers can and cannot say: every one of these 656 images carries at least one of the 8
findings (they are the images the radiologists boxed), so a finding's AUC here is "this finding
against the other findings", harder than ChestX-ray8's "against all 108,948 images, most of them
normal"; and ~525 training images per fold are 200 times fewer than ChestX-ray8's. Expect figures
well below the paper's, with wide uncertainty (about 60-240 positives per finding).

The measured figures are in benchmarks/results/real_nih.json (the README's table is taken from
it); `phantom_vs_scratch` there counts the findings and folds where pre-training helped. With a
grounded run (the default annotator) the grounded maps are scored too (`localisation_sources`:
CAM, the finding map, the finding word's attention), and `reader_output_by_box_source` scores
the boxes of the findings the Reader itself reports (a finding it does not report is a miss) with
each box source, paired on the same films; `box_source_stored` counts the source each fold's run
stored (`cxr train --box-source auto`). The `_no_anatomy_band` keys score the same maps and films
with `Reader.boxes_follow_anatomy` off: an effusion or the heart boxed anywhere on the film, as
before that rule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr import metrics as M  # noqa: E402
from cxr.records import Box  # noqa: E402

FINDINGS = M.CHESTXRAY8_FINDINGS


def folds_by_patient(patients: list[str], k: int, seed: int) -> np.ndarray:
    """Fold index per image; every patient's images in one fold; folds of near-equal size."""
    unique = sorted(set(patients))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    counts = {p: patients.count(p) for p in unique}
    sizes, fold_of = [0] * k, {}
    for p in sorted(order, key=lambda p: -counts[p]):  # largest patients first, stable by seed
        f = int(np.argmin(sizes))
        fold_of[p] = f
        sizes[f] += counts[p]
    return np.array([fold_of[p] for p in patients])


def restrict(studies, names=FINDINGS):
    """Studies with only the 8 ChestX-ray8 findings kept (the others are not targets here)."""
    keep = set(names)
    return [dataclasses.replace(s, findings=[f for f in s.findings if f.disease in keep])
            for s in studies]


def cnn_weights(run_dir: Path, out: Path) -> Path:
    """The CNN tensors of a run as a plain state dict file (what TrainConfig.pretrained takes)."""
    from cxr.checkpoint import load_tensors, save_tensors, unprefixed

    save_tensors(out, unprefixed("cnn", load_tensors(run_dir / "weights.safetensors")))
    return out


def base_config(args, **kw):
    from cxr.training import TrainConfig

    settings = dict(backbone=args.backbone, image_size=args.image_size,
                    crop=args.image_size - args.image_size // 8, epochs=args.epochs,
                    rnn_epochs=3, rnn_hidden=32, rnn_embed=16, batch_size=32, lr=args.lr,
                    min_label_count=5, cascade=False, fractions=(0.85, 0.15, 0.0),
                    num_workers=0, progress=False, class_weighted=args.class_weighted,
                    pooling=args.pooling, members=args.members)
    settings.update(kw)
    settings.update(args.set or {})
    return TrainConfig(**settings)


def parse_setting(text: str) -> tuple[str, object]:
    """`KEY=VALUE` for any TrainConfig field; the value is read as JSON where it parses (numbers,
    true/false), else kept as a string."""
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def phantom_pretraining(args, work: Path) -> tuple[Path, dict]:
    """CNN weights trained on the phantom: from --phantom-run, or trained here on --phantom-data
    (or on a set simulated here)."""
    from cxr.training import train

    t0 = time.time()
    if args.phantom_run:
        run = Path(args.phantom_run).expanduser()
        info = {"from": str(run)}
    else:
        data = Path(args.phantom_data).expanduser() if args.phantom_data else None
        if data is None:
            from cxr.phantom.simulate import simulate

            data = simulate(work / "phantom-data", n=args.phantom_n, size=256, seed=1,
                            workers=args.workers, progress=False)
        cfg = base_config(args, data=f"phantom:{data}", seed=1, fractions=(0.9, 0.1, 0.0),
                          min_label_count=20, epochs=args.pretrain_epochs)
        run = train(cfg, work / "phantom-run")
        info = {"from": f"trained here on phantom:{data}", "epochs": args.pretrain_epochs}
    from cxr.checkpoint import load_spec

    arch = load_spec(run).architecture
    if arch.backbone != args.backbone:
        raise SystemExit(f"the phantom run is a {arch.backbone} network, not {args.backbone}")
    info["seconds"] = round(time.time() - t0, 1)
    return cnn_weights(run, work / "phantom-cnn.safetensors"), info


def run_mode(args, name: str, studies, folds: np.ndarray, work: Path, pretrained: Path | None) -> dict:
    from cxr.evaluation import boxes_of_true_diseases, map_sources
    from cxr.images import load_image
    from cxr.models.localize import chestxray8_params
    from cxr.reader import Reader
    from cxr.runspec import LocalizeParams
    from cxr.training import train
    from cxr.training.ensemble import member_dirs

    n = len(studies)
    scores = np.full((n, len(FINDINGS)), np.nan)  # out-of-fold scores of the run a user gets
    member_scores = np.full((args.ensemble, n, len(FINDINGS)), np.nan)  # each network's own
    per_fold, src_pairs, out_pairs, out_pairs_no_band, stored = [], {}, {}, {}, {}
    t0 = time.time()
    for k in range(args.folds):
        tf = time.time()
        train_studies = [s for s, f in zip(studies, folds) if f != k]
        test_rows = [i for i, f in enumerate(folds) if f == k]
        wang, one = chestxray8_params(), LocalizeParams(0.5)
        cfg = base_config(args, data=f"nih:{args.data}", seed=k, cache_dir=str(work / "cache"),
                          pretrained=str(pretrained) if pretrained else None, ensemble=args.ensemble)
        run = train(cfg, work / f"{name}-fold{k}", studies=train_studies)
        reader = Reader.load(run)  # with --ensemble K, the merged run: K networks read as one
        networks = [Reader.load(d) for d in member_dirs(run)]
        for i in test_rows:
            image = load_image(studies[i].images[0].path)
            result = reader(image, heatmaps=False, force=True)  # the gate turns rotated films back
            for t in reader.targets:
                if t in FINDINGS:
                    scores[i, FINDINGS.index(t)] = result.scores[t]
            for j, member in enumerate(networks):
                alone = member(image, heatmaps=False, force=True)
                for t in member.targets:
                    if t in FINDINGS:
                        member_scores[j, i, FINDINGS.index(t)] = alone.scores[t]
            truth = [b for b in studies[i].images[0].boxes if b.label in reader.targets]
            # each map source, its boxes by ChestX-ray8's rule (thresholds 180 and 60 of 255, the
            # default) and by one threshold at 0.5 (the default before), and by ChestX-ray8's rule
            # without the anatomy band (an effusion or the heart boxed anywhere: the rule before)
            for src in map_sources(reader):
                for rule, params, band in (("chestxray8", wang, True), ("threshold", one, True),
                                           ("chestxray8_no_band", wang, False)):
                    reader.boxes_follow_anatomy = band
                    src_pairs.setdefault((src, rule), []).append(
                        (truth, boxes_of_true_diseases(reader, image, truth, src, params)))
            reader.boxes_follow_anatomy = True
            # what a user sees: the boxes of the findings the Reader itself reports (at its stored
            # thresholds: a finding it does not report is a miss), with the box source the run
            # stored (the reading above) and, paired on the same film, with each
            # other source
            own = reader.box_source
            stored[own] = stored.get(own, 0) + 1
            for band in (True, False):  # and without the anatomy band, paired
                reader.boxes_follow_anatomy = band
                for src in map_sources(reader):
                    reader.box_source = src
                    found = (result if src == own and band else reader(image, heatmaps=False, force=True)).findings
                    (out_pairs if band else out_pairs_no_band).setdefault(src, []).append(
                        (truth, [b for f in found for b in f.boxes]))
            reader.box_source, reader.boxes_follow_anatomy = own, True
        y = labels_matrix([studies[i] for i in test_rows])
        fold_auc = M.auc_per_label(y, np.nan_to_num(scores[test_rows], nan=0.0), FINDINGS)
        per_fold.append({"fold": k, "test_images": len(test_rows), "mean_auc": fold_auc["mean"],
                         "seconds": round(time.time() - tf, 1)})
        print(f"  {name} fold {k + 1}/{args.folds}: {len(test_rows)} test images, mean AUC "
              f"{M.fmt(fold_auc['mean'])} ({time.time() - tf:.0f} s)", flush=True)
    y = labels_matrix(studies)
    auc = M.auc_per_label(y, np.nan_to_num(scores, nan=0.0), FINDINGS)
    auc["ci95"] = M.bootstrap_auc_ci(y, np.nan_to_num(scores, nan=0.0), FINDINGS,
                                     groups=[s.patient_id for s in studies], n=1000, seed=0)
    fold_means = [f["mean_auc"] for f in per_fold if f["mean_auc"] is not None]
    # pooled mean AUC of the mean of the first m networks' own calibrated scores, m = 1..K: what
    # each added network buys (the merged run averages logits and is calibrated once: `auc`)
    by_size = {m: M.auc_per_label(y, np.nan_to_num(member_scores[:m].mean(0), nan=0.0), FINDINGS)["mean"]
               for m in range(1, args.ensemble + 1)} if args.ensemble > 1 else {}
    return {"auc": auc, "folds": per_fold, "ensemble": args.ensemble, "auc_by_ensemble_size": by_size,
            "mean_auc_over_folds": float(np.mean(fold_means)) if fold_means else None,
            "sd_auc_over_folds": float(np.std(fold_means)) if fold_means else None,
            "localisation": M.localisation_accuracy(src_pairs["cam", "chestxray8"]),
            "localisation_sources": {src: M.localisation_accuracy(p) for (src, rule), p in src_pairs.items()
                                     if rule == "chestxray8"},
            "localisation_sources_one_threshold": {src: M.localisation_accuracy(p) for (src, rule), p
                                                   in src_pairs.items() if rule == "threshold"},
            "localisation_sources_no_anatomy_band": {src: M.localisation_accuracy(p) for (src, rule), p
                                                     in src_pairs.items() if rule == "chestxray8_no_band"},
            "reader_output_by_box_source": {src: M.localisation_accuracy(p) for src, p in out_pairs.items()},
            "reader_output_by_box_source_no_anatomy_band": {src: M.localisation_accuracy(p)
                                                            for src, p in out_pairs_no_band.items()},
            "box_source_stored": stored,
            "seconds": round(time.time() - t0, 1)}


def compare(scratch: dict, phantom: dict) -> dict:
    """How often phantom pre-training beat training from scratch: findings (pooled AUC) and folds
    (fold mean AUC), the counts the README quotes."""
    better = [t for t in FINDINGS if (phantom["auc"]["per_label"][t] or 0) > (scratch["auc"]["per_label"][t] or 0)]
    folds = [a["mean_auc"] is not None and b["mean_auc"] is not None and b["mean_auc"] > a["mean_auc"]
             for a, b in zip(scratch["folds"], phantom["folds"])]
    return {"findings_better": len(better), "findings": len(FINDINGS), "folds_better": sum(folds),
            "folds": len(folds), "better": better}


def labels_matrix(studies) -> np.ndarray:
    return np.array([[float(any(f.disease == t for f in s.positive)) for t in FINDINGS]
                     for s in studies])


def tables(result: dict) -> str:
    modes = list(result["modes"])
    rows = []
    for t in FINDINGS:
        row = [t, result["positives"][t], result["boxed_images"].get(t, 0)]
        row += [result["modes"][m]["auc"]["per_label"][t] for m in modes]
        row.append(M.WANG2017_AUC[t])
        row += [result["modes"][m]["localisation"]["iobb"]["accuracy"].get(t, {}).get("0.5")
                for m in modes]
        row.append(M.WANG2017_IOBB_05[t])
        rows.append(row)
    rows.append(["mean", None, None] + [result["modes"][m]["auc"]["mean"] for m in modes]
                + [float(np.mean(list(M.WANG2017_AUC.values())))]
                + [result["modes"][m]["localisation"]["iobb"]["mean"]["0.5"] for m in modes]
                + [float(np.mean(list(M.WANG2017_IOBB_05.values())))])
    headers = (["finding", "positives", "boxed"] + [f"AUC {m}" for m in modes] + ["AUC Wang 2017"]
               + [f"IoBB>0.5 {m}" for m in modes] + ["IoBB>0.5 Wang 2017"])
    out = [M.markdown_table(headers, rows), ""]
    rows = [[m, src, rule, la["iobb"]["mean"]["0.5"], la["iou"]["mean"]["0.5"]]
            for m in modes for key, rule in (("localisation_sources", "ChestX-ray8's (180, 60 of 255)"),
                                             ("localisation_sources_one_threshold", "one threshold, 0.5"),
                                             ("localisation_sources_no_anatomy_band",
                                              "ChestX-ray8's, no anatomy band"))
            for src, la in (result["modes"][m].get(key) or {}).items()]
    if rows:
        out += ["Localisation by source and box rule (mean over findings, T = 0.5):", "",
                M.markdown_table(["mode", "source", "boxes", "T(IoBB)=0.5", "T(IoU)=0.5"], rows), ""]
    rows = [[m, src + extra, la["iobb"]["mean"]["0.25"], la["iobb"]["mean"]["0.5"], la["iou"]["mean"]["0.5"]]
            for m in modes for key, extra in (("reader_output_by_box_source", ""),
                                              ("reader_output_by_box_source_no_anatomy_band", ", no anatomy band"))
            for src, la in (result["modes"][m].get(key) or {}).items()]
    if rows:
        out += ["Boxes of the findings the Reader reports, by box source (stored: "
                + "; ".join(f"{m} {result['modes'][m].get('box_source_stored')}" for m in modes) + "):", "",
                M.markdown_table(["mode", "box source", "T(IoBB)=0.25", "T(IoBB)=0.5", "T(IoU)=0.5"], rows), ""]
    for m in modes:
        la = result["modes"][m]["localisation"]
        ths = [str(t) for t in la["thresholds"]]
        for measure, label in (("iobb", "IoBB"), ("iou", "IoU")):
            rows = [[lab, n] + [la[measure]["accuracy"][lab][t] for t in ths] for lab, n in la["n"].items()]
            rows.append(["mean", sum(la["n"].values())] + [la[measure]["mean"][t] for t in ths])
            out += [f"Localisation, {m}, by {label}:", "",
                    M.markdown_table(["finding", "images"] + [f"T({label})={t}" for t in ths], rows), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with Data_Entry*.csv, BBox_List*.csv, images/")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path("nih-cv"), help="runs and caches (resumable)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--pooling", default="lse", help="avg (CAM's), lse (ChestX-ray8's log-sum-exp) or class_lse "
                    "(each class map pooled by its own learnt log-sum-exp)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--class-weighted", action="store_true")
    ap.add_argument("--phantom-run", help="a trained phantom run (e.g. cxr-demo/run) to take the CNN from")
    ap.add_argument("--phantom-data", help="a simulated set to pre-train on (default: simulate one)")
    ap.add_argument("--phantom-n", type=int, default=1500)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--members", type=int, default=1,
                    help="CNN trunks in each run's network, trained apart, logits averaged (cxr train --members)")
    ap.add_argument("--ensemble", type=int, default=5,
                    help="networks per fold's run (cxr train --ensemble: seeds, merged into one run)")
    ap.add_argument("--modes", default="scratch,phantom")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", type=parse_setting, metavar="KEY=VALUE",
                    help="any other TrainConfig setting, e.g. --set crop=224 --set annotator=global")
    args = ap.parse_args(argv)
    args.set = dict(args.set or [])

    from cxr.sources import open_source

    t0 = time.time()
    args.data = str(Path(args.data).expanduser())
    studies = restrict(open_source(f"nih:{args.data}"))
    studies = [s for s in studies if s.images and s.images[0].path is not None]
    patients = [s.patient_id for s in studies]
    folds = folds_by_patient(patients, args.folds, args.seed)
    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    y = labels_matrix(studies)
    result = {
        "benchmark": "real_nih", "data": args.data, "images": len(studies),
        "patients": len(set(patients)), "folds": args.folds,
        "positives": {t: int(y[:, j].sum()) for j, t in enumerate(FINDINGS)},
        "boxed_images": {t: sum(any(b.label == t for b in s.images[0].boxes) for s in studies)
                         for t in FINDINGS},
        "settings": {"backbone": args.backbone, "image_size": args.image_size, "epochs": args.epochs,
                     "lr": args.lr, "class_weighted": args.class_weighted, "pooling": args.pooling,
                     "pretrain_epochs": args.pretrain_epochs, "phantom_n": args.phantom_n,
                     "members": args.members, "ensemble": args.ensemble, **args.set,
                     "inner_split": "85/15 of the training patients (validation for calibration "
                                    "and thresholds)"},
        "modes": {},
        "published": {"wang2017_auc": M.WANG2017_AUC,
                      "wang2017_auc_mean": float(np.mean(list(M.WANG2017_AUC.values()))),
                      "wang2017_iobb_0.5": M.WANG2017_IOBB_05,
                      "wang2017_iobb_0.5_mean": float(np.mean(list(M.WANG2017_IOBB_05.values()))),
                      "wang2017_training_images": 108948},
    }
    print(f"{len(studies)} images of {len(set(patients))} patients, {args.folds} folds by patient",
          flush=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        pretrained = None
        if mode == "phantom":
            pretrained, info = phantom_pretraining(args, work)
            result["pretraining"] = info
            print(f"  phantom pre-training ready ({info['seconds']:.0f} s)", flush=True)
        result["modes"][mode] = run_mode(args, mode, studies, folds, work, pretrained)
        if args.json:  # after each mode, so a long run leaves what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=float))
    if {"scratch", "phantom"} <= set(result["modes"]):
        result["phantom_vs_scratch"] = compare(result["modes"]["scratch"], result["modes"]["phantom"])
    result["seconds"] = round(time.time() - t0, 1)
    text = tables(result)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
