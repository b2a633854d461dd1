"""`cxr demo --out DIR`: the embedded default a newcomer runs, with no data of their own.

    1. simulate   chest radiographs with known findings from the bundled-or-fetched chest CT
    2. train      the recurrent neural cascade (CNN -> RNN -> k-means label refinement -> again)
    3. evaluate   on the held-out test patients (`cxr evaluate`: AUC, BLEU before/after the
                  cascade, context accuracy, localisation, calibration)
    4. annotate   a few held-out images (heatmaps, boxes, generated annotations)
    5. report     DIR/report.html (self-contained) and DIR/metrics.json, DIR/metrics.md

Every stage resumes: simulation and training continue where they stopped, and finished stages
are not redone, so an interrupted demo is finished by running the same command again. The
defaults are sized for minutes, not hours, on 2 CPU cores (a small CNN at 128 pixels; measured
times in benchmarks/results/demo.json, written by benchmarks/demo.py); `--quick` is a smoke test,
not a result.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..atomic import write_atomic
from ..errors import CxrError
from ..machine import cpu, cpu_name

# The default demo: chosen so that the whole run takes minutes on 2 CPU cores and the detector is
# clearly better than chance on the phantom's test patients (see the report for the figures).
DEFAULTS = dict(n=1500, size=256, image_size=128, crop=112, backbone="tiny", epochs=20,
                cascade_epochs=10, rnn_epochs=40, batch_size=32, min_label_count=20,
                min_cluster_members=120, images_per_cluster=60, rnn_hidden=128, rnn_embed=64,
                lr=3e-3, rnn_lr=5e-3, ground_epochs=24, ground_lr=3e-3, ground_cnn_lr=0.1, attn_dim=64,
                pooling="class_lse")
QUICK = dict(n=60, size=128, image_size=64, crop=56, backbone="tiny", epochs=2, cascade_epochs=1,
             rnn_epochs=6, batch_size=16, min_label_count=2, min_cluster_members=8,
             images_per_cluster=4, rnn_hidden=32, rnn_embed=16, lr=3e-3, rnn_lr=1e-2,
             ground_epochs=2, ground_lr=3e-3, ground_cnn_lr=0.1, attn_dim=16, pooling="class_lse")
# the demo's settings that are TrainConfig fields (the rest say what to simulate)
TRAIN_KEYS = ("backbone", "image_size", "crop", "epochs", "cascade_epochs", "rnn_epochs", "batch_size",
              "min_label_count", "min_cluster_members", "images_per_cluster", "rnn_hidden",
              "rnn_embed", "lr", "rnn_lr", "ground_epochs", "ground_lr", "ground_cnn_lr", "attn_dim", "pooling",
              "seed")
STATE = "demo.json"
# settings that may change when a demo is resumed (training continues from its last epoch)
RESUMABLE = ("epochs", "cascade_epochs", "rnn_epochs")


def configure(parser) -> None:
    parser.add_argument("--out", default="cxr-demo", help="output folder (default: ./cxr-demo)")
    parser.add_argument("--n", type=int, help=f"simulated studies (default {DEFAULTS['n']})")
    parser.add_argument("--size", type=int, help=f"simulated image size (default {DEFAULTS['size']})")
    parser.add_argument("--image-size", type=int, help="model input size "
                        f"(default {DEFAULTS['image_size']}; the random crop is 7/8 of it)")
    parser.add_argument("--backbone", choices=("tiny", "nin", "googlenet", "densenet121"),
                        help=f"CNN (default {DEFAULTS['backbone']}: the others need a GPU or hours)")
    parser.add_argument("--epochs", type=int, help=f"CNN epochs of stage 1 (default {DEFAULTS['epochs']})")
    parser.add_argument("--examples", type=int, default=8, help="held-out images shown in the report")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for simulation (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny smoke run (60 images, 64 px, 2 epochs): checks the pipeline, "
                             "says nothing about accuracy")


def settings_from_args(args) -> dict:
    s = dict(QUICK if args.quick else DEFAULTS)
    for key in ("n", "size", "image_size", "backbone", "epochs"):
        v = getattr(args, key, None)
        if v is not None:
            s[key] = v
    if args.image_size is not None:
        s["crop"] = args.image_size - args.image_size // 8
    if s["image_size"] > s["size"]:
        raise CxrError(f"--image-size {s['image_size']} is larger than the simulated --size {s['size']}")
    s.update(seed=args.seed, quick=bool(args.quick))
    return s


def run(args) -> int:
    settings = settings_from_args(args)
    run_demo(args.out, settings, workers=args.workers, examples=args.examples, device=args.device)
    return 0


def _stage(k: int, text: str) -> None:
    print(f"[{k}/5] {text}", file=sys.stderr, flush=True)


def run_demo(out: str | Path, settings: dict, workers: int = 1, examples: int = 8,
             device: str | None = None, progress: bool = True) -> dict:
    """The whole demo into `out`; returns the metrics dict (also in out/metrics.json)."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    fixed = {k: v for k, v in settings.items() if k not in RESUMABLE}
    if state.get("settings") and {k: v for k, v in state["settings"].items()
                                  if k not in RESUMABLE} != fixed:
        raise CxrError("holds a demo with other settings "
                       f"({_diff(state['settings'], settings)}); choose another --out or delete it",
                       out)
    state["settings"] = settings
    times = state.setdefault("seconds", {})

    def save() -> None:
        write_atomic(state_path, json.dumps(state, indent=1))

    save()
    t_all = time.time()
    from ..phantom.simulate import simulate
    from ..sources import open_source
    from ..training import TrainConfig, train
    from ..evaluation import evaluate_run, write_metrics

    _stage(1, f"simulating {settings['n']} chest radiographs ({settings['size']} px) from the CT "
              f"into {out / 'data'}")
    t0 = time.time()
    data = simulate(out / "data", n=settings["n"], size=settings["size"], seed=settings["seed"],
                    workers=max(1, workers), progress=progress)
    times.setdefault("simulate", round(time.time() - t0, 1))
    save()
    spec = f"phantom:{data}"
    studies = open_source(spec)

    _stage(2, f"training the cascade ({settings['backbone']} CNN at {settings['image_size']} px, "
              f"{settings['epochs']} + {settings['cascade_epochs']} epochs, GRU annotator) "
              f"into {out / 'run'}")
    t0 = time.time()
    config = TrainConfig(data=spec, rnn="gru", device=device or "auto", progress=progress,
                         num_workers=0, **{k: settings[k] for k in TRAIN_KEYS})
    run_dir = train(config, out / "run", studies=studies)
    times.setdefault("train", round(time.time() - t0, 1))
    save()

    _stage(3, "evaluating on the held-out test patients")
    t0 = time.time()
    metrics = evaluate_run(run_dir, split="test", out=out, progress=progress, studies=studies,
                           device=device)
    times["evaluate"] = round(time.time() - t0, 1)

    _stage(4, f"annotating {examples} held-out images")
    t0 = time.time()
    chosen = annotate_examples(run_dir, studies, examples, device)
    times["annotate"] = round(time.time() - t0, 1)

    _stage(5, "writing the report")
    times["total_this_call"] = round(time.time() - t_all, 1)
    # CPU time (this process and its simulation workers), summed over resumed calls: on a shared
    # machine it says more about the cost than the wall clock does
    state["cpu_seconds"] = round(state.get("cpu_seconds_before", 0.0) + _cpu_seconds(), 1)
    state["cpu_seconds_before"] = state["cpu_seconds"]
    metrics["demo"] = {"settings": settings, "seconds": dict(times), "threads": _threads(),
                       "cpu_seconds": state["cpu_seconds"],
                       "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores",
                       "cpu": cpu(), "data": str(data), "run": str(run_dir)}
    write_metrics(metrics, out)
    path = write_demo_report(out / "report.html", metrics, chosen)
    save()
    print(f"\nmean AUC on the test patients: {_f(metrics['auc']['mean'])}; report: {path}",
          flush=True)
    return metrics


def annotate_examples(run_dir: Path, studies, n: int, device: str | None = None) -> list:
    """Up to `n` test-split images, chosen to show several kinds of finding and a normal one,
    annotated by the Reader with heatmaps."""
    from ..checkpoint import load_spec
    from ..images import load_image
    from ..reader import Reader
    from ..report_html import Example
    from ..evaluation import EvalData

    ed = EvalData(load_spec(run_dir), studies)
    test = ed.indices("test")
    picked, seen = [], set()
    # first one image per disease (most findings first), then a normal one, then the rest
    for i in sorted(test, key=lambda i: -len(ed.truth_findings(i))):
        kinds = {f.disease for f in ed.truth_findings(i)}
        if kinds and not kinds <= seen:
            picked.append(i)
            seen |= kinds
        if len(picked) >= max(n - 1, 1):
            break
    normals = [i for i in test if ed.studies[i].normal and i not in picked]
    picked += normals[:1]
    picked += [i for i in test if i not in picked][:max(0, n - len(picked))]
    picked = picked[:n]
    reader = Reader.load(run_dir, device=device)
    out = []
    for i in picked:
        image = load_image(ed.prep.paths[i])
        result = reader(image, heatmaps=True, force=True)  # every example shown; quality reported
        truth = [f.term for f in ed.studies[i].positive] or []
        out.append(Example(id=ed.prep.image_ids[i], image=image, result=result, truth=truth,
                           truth_boxes=[b for b in ed.images[i].boxes]))
    return out


def write_demo_report(path: Path, m: dict, examples) -> Path:
    from .. import metrics as M
    from ..report_html import write_report
    from ..evaluation import metric_tables

    demo = m.get("demo", {})
    s, secs = demo.get("settings", {}), demo.get("seconds", {})
    bleu = m.get("bleu", {})

    def b4(model):
        return (bleu.get(model, {}).get("test", {}).get("given_disease", {}) or {}).get("bleu4")

    loc = (m.get("localisation") or {}).get("protocol_given_disease") or {}
    study = m.get("study") or {}
    summary = [
        ("mean AUC (test)", m["auc"]["mean"]),
        (f"study level: sensitivity at {study.get('operating_point', '–')}", study.get("sensitivity")),
        ("study level: specificity (normal films called normal)", study.get("specificity")),
        ("BLEU-4 before cascade", b4("stage1")),
        ("BLEU-4 after cascade", b4("cascade") if "cascade" in bleu else b4("final")),
        ("context: all 3 fields right", (m.get("context") or {}).get("exact")),
        ("localised at IoBB > 0.5", (loc.get("iobb") or {}).get("mean", {}).get("0.5")),
        ("ECE", m["calibration"]["ece"]),
    ]
    total = sum(v for k, v in secs.items() if k in ("simulate", "train", "evaluate", "annotate"))
    meta = [
        f"{s.get('n')} simulated studies ({s.get('size')} px) from a real chest CT; "
        f"train/val/test patients {m['split_counts']['train']}/{m['split_counts']['val']}/"
        f"{m['split_counts']['test']} images",
        f"{m['backbone']} CNN at {s.get('image_size')} px + {m['rnn']} annotator; "
        f"{len(m['targets'])} targets, {m['cascade']['refined_labels']} refined labels after the cascade",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k != "total_this_call")
        + f" (total {total / 60:.1f} min wall, {demo.get('cpu_seconds', 0) / 60:.1f} min CPU; "
        f"{demo.get('machine', '')}, torch threads {demo.get('threads')})",
    ]
    notes = [
        "The phantom: each image is a projection of one real chest CT with findings inserted in 3D, "
        "drawn from the statistics of the real Open-i reports, so the truth (disease, side, site, "
        "severity, box) is known exactly. Figures on it show the system works end to end; they "
        "are not figures on real patients.",
        "Published reference: Wang et al., ChestX-ray8 (CVPR 2017; 108,948 real images, "
        "ResNet-50): mean AUC of 8 findings .696; Shin et al. 2016 report BLEU of their "
        "annotations on Open-i before and after the cascade.",
        f"metrics.json and metrics.md beside this file hold every number. {M.BLEU_SMOOTHING}.",
    ]
    return write_report(path, "cxr demo: the recurrent neural cascade on simulated radiographs",
                        summary, metric_tables(m), examples, m.get("calibration"), meta, notes)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"
