"""How well the quality gate's network answers, on what it never trained on, and what it costs.

    python benchmarks/quality.py [--weights DIR] [--nih DATA/nih/bbox256] [--json OUT]

- Real NIH films of held-out patients (the gate's own patient split, test part): rotation accuracy
  over 0/90/180/270, inverted polarity, mirrored, and the share of upright films that would be
  refused or wrongly corrected (DECISION below);
- the same films after realistic augmentation (crop, gamma, contrast, tilt, blur, noise), every
  fault drawn at random;
- non-radiographs from held-out seeds and held-out photographs: share refused (not "frontal");
- phantom renders of held-out seeds: laterals told from frontals (PA and AP);
- expected calibration error of each head (top-label, after its temperature) on a held-out mix;
- the gate's time per image against a DenseNet-121 Reader's (random weights; timing does not
  depend on them) at the same input, measured interleaved in this run.
Writes benchmarks/results/quality.json (or --json OUT) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cxr.machine import cpu_name  # noqa: E402

TARGETS = {"orientation": 0.99, "inverted": 0.99, "upright_refused": 0.01,
           "non_radiographs_refused": 0.99, "lateral_vs_frontal": 0.98, "time_ratio": 0.10}


def top(pred: dict, head: str) -> str:
    return max(pred[head], key=pred[head].get)


def refused(pred: dict) -> bool:
    """DECISION: the gate's own rule (`cxr.quality.gate.decide`, its thresholds on the calibrated
    probabilities): an upright frontal film counts as refused when the gate refuses it or would
    turn it (rotation or polarity); mirroring is only reported by the gate, never corrected."""
    from cxr.quality.gate import decide

    report = decide(pred)
    return not report.accepted or report.corrected


def gate_refused(gate_full, images) -> list[bool]:
    """The whole gate (cheap checks, then the model and `decide`): refused, or turned."""
    return [not r.accepted or r.corrected for r in gate_full.check(images)]


def film_faults(gate, films, gate_full, names=()) -> dict:
    images, truth = [], []
    for film in films:
        for k in range(4):
            for inv in (False, True):
                for m in (False, True):
                    img = np.rot90(film[:, ::-1] if m else film, k)
                    images.append(np.ascontiguousarray(1 - img if inv else img))
                    truth.append((k, inv, m))
    preds = []
    for i in range(0, len(images), 64):
        preds += gate.predict(images[i:i + 64])
    rot = [top(p, "rotation") == str(90 * k) for p, (k, inv, m) in zip(preds, truth)]
    rot_plain = [r for r, (k, inv, m) in zip(rot, truth) if not inv and not m]
    inv_ok = [top(p, "inverted") == ("yes" if inv else "no") for p, (k, inv, m) in zip(preds, truth)]
    mir_ok = [top(p, "mirrored") == ("yes" if m else "no") for p, (k, inv, m) in zip(preds, truth)]
    mir_up = [ok for ok, (k, inv, m) in zip(mir_ok, truth) if k == 0 and not inv]
    upright = [p for p, t in zip(preds, truth) if t == (0, False, False)]
    full = gate_refused(gate_full, films)
    refused_names = [getattr(f, "name", i) for i, (f, r) in enumerate(zip(names, full)) if r]
    kind_ok = [top(p, "kind") == "frontal" for p in preds]
    return {"films": len(films), "trials": len(images),
            "orientation_accuracy": float(np.mean(rot_plain)),
            "orientation_accuracy_all_faults": float(np.mean(rot)),
            "inverted_accuracy": float(np.mean(inv_ok)),
            "mirrored_accuracy_upright": float(np.mean(mir_up)),
            "mirrored_accuracy_all_faults": float(np.mean(mir_ok)),
            "called_frontal_all_faults": float(np.mean(kind_ok)),
            "upright_refused_model": float(np.mean([refused(p) for p in upright])),
            "upright_refused": float(np.mean(full)),
            "upright_refused_count": int(sum(full)),
            "upright_refused_files": refused_names}


def pool_metrics(gate, src, n: int, seed: int) -> dict:
    """Accuracy and top-label calibration error per head on a held-out augmented mix, with the
    same labels the network trained on."""
    from cxr.metrics import reliability
    from cxr.quality.model import HEADS
    from cxr.quality.train import IGNORE, draw_sample

    rng = np.random.default_rng(seed)
    samples = [draw_sample(src, rng, held_out=True) for _ in range(n)]
    preds = []
    for i in range(0, n, 64):
        preds += gate.predict([s[0] for s in samples[i:i + 64]])
    out = {"n": n}
    for head, names in HEADS.items():
        rows = [(p[head], lab[head]) for p, (_, lab, _) in zip(preds, samples) if lab[head] != IGNORE]
        correct = np.array([max(p, key=p.get) == names[y] for p, y in rows], float)
        conf = np.array([max(p.values()) for p, _ in rows])
        out[head] = {"n": len(rows), "accuracy": float(correct.mean()),
                     "ece": reliability(correct, conf)["ece"]}
    by_source = {}
    for p, (_, lab, source) in zip(preds, samples):
        by_source.setdefault(source, []).append(
            top(p, "kind") == HEADS["kind"][lab["kind"]])
    out["kind_accuracy_by_source"] = {k: float(np.mean(v)) for k, v in by_source.items()}
    return out


def non_radiographs(gate, gate_full, ct, n: int, seed: int) -> dict:
    from cxr.quality import synth

    rng = np.random.default_rng(seed)
    per = {}
    for i in range(n):
        kind, img = synth.other_image(rng, ct, held_out=True)
        per.setdefault(kind, []).append(img)
    rows, all_refused, all_other, all_model = {}, [], [], []
    for kind, imgs in per.items():
        preds = gate.predict(imgs)
        ref = [top(p, "kind") != "frontal" for p in preds]
        oth = [top(p, "kind") == "other" for p in preds]
        full = gate_refused(gate_full, imgs)
        rows[kind] = {"n": len(imgs), "refused": float(np.mean(full)),
                      "refused_model_only": float(np.mean(ref)), "called_other": float(np.mean(oth))}
        all_refused += full
        all_model += ref
        all_other += oth
    return {"n": len(all_refused), "refused": float(np.mean(all_refused)),
            "refused_model_only": float(np.mean(all_model)),
            "called_other": float(np.mean(all_other)), "by_kind": rows}


def phantom_views(gate, phantom, n: int, seed0: int) -> dict:
    lat = [phantom.render(seed=seed0 + 50_000 + i, size=256, view="lateral").image for i in range(n)]
    fro = [phantom.render(seed=seed0 + i, size=256, view=("PA", "AP")[i % 2]).image for i in range(n)]
    pl, pf = gate.predict(lat), gate.predict(fro)
    ok_l = [top(p, "kind") == "lateral" for p in pl]
    ok_f = [top(p, "kind") == "frontal" for p in pf]
    return {"n_lateral": n, "n_frontal": n, "lateral_called_lateral": float(np.mean(ok_l)),
            "frontal_called_frontal": float(np.mean(ok_f)),
            "accuracy": float(np.mean(ok_l + ok_f))}


def timing(gate_full, films, repeats: int) -> dict:
    """Whole gate (cheap checks + model + decision) vs Reader per image, batch 1, interleaved so
    both see the same machine load."""
    import torch

    from inference import random_run
    from cxr.reader import Reader

    with tempfile.TemporaryDirectory() as tmp:
        # the Reader alone (gate=False: it gates by default) against the whole gate
        reader = Reader.load(random_run(Path(tmp) / "run", "densenet121", 256), device="cpu",
                             gate=False)
        images = films[:repeats]
        reader(images[0])
        gate_full.check([images[0]])
        tg, tr = [], []
        for img in images:
            t0 = time.perf_counter()
            gate_full.check([img])
            t1 = time.perf_counter()
            reader(img)
            t2 = time.perf_counter()
            tg.append(t1 - t0)
            tr.append(t2 - t1)
    g, r = statistics.median(tg), statistics.median(tr)
    return {"images": len(images), "input": list(images[0].shape), "threads": torch.get_num_threads(),
            "reader": "DenseNet-121 Reader (256 px, random weights, all outputs)",
            "gate": "QualityGate.check: cheap checks + model + decision",
            "gate_ms_median": 1000 * g, "reader_ms_median": 1000 * r, "ratio": g / r}


def _weights_bytes(path) -> int:
    from cxr.quality.model import WEIGHTS_DIR

    p = Path(path) if path else WEIGHTS_DIR
    return (p / "gate.safetensors" if p.is_dir() else p).stat().st_size


def main(argv=None) -> int:
    import torch

    from PIL import Image

    from cxr.images import load_image
    from cxr.metrics import markdown_table
    from cxr.phantom.render import Phantom
    from cxr.quality import synth
    from cxr.quality.gate import QualityGate
    from cxr.quality.model import GateModel
    from cxr.quality.train import TEST_SEEDS, Sources, nih_split, render_phantom

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="folder with gate.safetensors + gate.json (default: shipped)")
    ap.add_argument("--nih", default=str(ROOT.parent / "shared" / "data" / "nih" / "bbox256"))
    ap.add_argument("--others", type=int, default=1000)
    ap.add_argument("--phantom", type=int, default=150)
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--timing-images", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    gate = GateModel.load(args.weights)
    gate_full = QualityGate(gate)
    seed = int(gate.meta["training"]["seed"])
    test_files = nih_split(args.nih, seed)["test"]
    films = [load_image(p) for p in test_files]
    phantom = Phantom.load()
    ct = synth.CtSlices(phantom.anatomy.mu)
    t0 = time.time()
    res = {"benchmark": "quality", "weights": args.weights or "shipped",
           "gate_version": gate.meta.get("version"), "targets": TARGETS,
           "decision": refused.__doc__.strip().replace("\n   ", ""),
           "cpu": cpu_name(), "torch": torch.__version__,
           "gate_training": gate.meta.get("training", {}),
           "gate_temperatures": gate.meta.get("temperatures", {}),
           "gate_parameters": sum(p.numel() for p in gate.net.parameters()),
           "gate_weights_mb": round(_weights_bytes(args.weights) / 2 ** 20, 2)}
    res["nih_held_out"] = film_faults(gate, films, gate_full, test_files)
    print(f"NIH held-out films done ({time.time() - t0:.0f} s)", flush=True)
    res["non_radiographs"] = non_radiographs(gate, gate_full, ct, args.others, TEST_SEEDS + 1)
    print(f"non-radiographs done ({time.time() - t0:.0f} s)", flush=True)
    res["phantom_views"] = phantom_views(gate, phantom, args.phantom, TEST_SEEDS)
    print(f"phantom views done ({time.time() - t0:.0f} s)", flush=True)
    src = Sources(films, render_phantom(phantom, TEST_SEEDS + 1000 + np.arange(60)),
                  render_phantom(phantom, TEST_SEEDS + 51_000 + np.arange(60), ("lateral",)), ct)
    res["held_out_mix"] = pool_metrics(gate, src, args.pool, TEST_SEEDS + 2)
    print(f"held-out mix done ({time.time() - t0:.0f} s)", flush=True)
    res["timing"] = timing(gate_full, films, args.timing_images)
    big = [np.asarray(Image.fromarray(f).resize((1024, 1024), Image.BILINEAR)) for f in
           films[:args.timing_images]]
    res["timing_1024"] = timing(gate_full, big, args.timing_images)

    nih, mix, tm = res["nih_held_out"], res["held_out_mix"], res["timing"]
    rows = [
        ["NIH held-out films: orientation accuracy (0/90/180/270)", nih["orientation_accuracy"], ">= 0.99"],
        ["NIH held-out films: inverted polarity accuracy", nih["inverted_accuracy"], ">= 0.99"],
        ["NIH held-out films: upright films refused or wrongly turned (whole gate)", nih["upright_refused"], "<= 0.01"],
        ["NIH held-out films: mirrored accuracy (upright)", nih["mirrored_accuracy_upright"], "(report)"],
        ["NIH held-out films: orientation accuracy, any fault combination", nih["orientation_accuracy_all_faults"], ""],
        ["Non-radiographs refused (held-out seeds and photographs)", res["non_radiographs"]["refused"], ">= 0.99"],
        ["Non-radiographs refused by the model alone (not 'frontal')", res["non_radiographs"]["refused_model_only"], ""],
        ["Phantom laterals told from frontals (held-out seeds)", res["phantom_views"]["accuracy"], ">= 0.98"],
        ["Held-out augmented mix: rotation accuracy", mix["rotation"]["accuracy"], ""],
        ["Held-out augmented mix: inverted accuracy", mix["inverted"]["accuracy"], ""],
        ["Held-out augmented mix: kind accuracy", mix["kind"]["accuracy"], ""],
        *[[f"Calibration error (ECE), {h}", mix[h]["ece"], ""] for h in ("kind", "rotation", "inverted", "mirrored")],
        ["Gate time per image / Reader time per image (256 px films)", tm["ratio"], "<= 0.10"],
        ["Gate time per image / Reader time per image (1024 px films)", res["timing_1024"]["ratio"], "<= 0.10"],
    ]
    print()
    print(markdown_table(["measure", "value", "target"], rows, digits=3))
    for t in (tm, res["timing_1024"]):
        print(f"gate {t['gate_ms_median']:.1f} ms, Reader {t['reader_ms_median']:.1f} ms per "
              f"{t['input'][0]} px image ({t['threads']} threads)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
