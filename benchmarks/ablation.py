"""Shin et al. 2016's design choices, measured on the phantom: each arm changes one thing from a
base run, on the same patient split and seed, for several seeds; the paired differences (arm minus
base, per seed) with their spread say what helps.

    python benchmarks/ablation.py --json benchmarks/results/ablation.json           # every arm, < 1 h on 2 cores
    python benchmarks/ablation.py --large --json benchmarks/results/ablation.json   # 64 px, twice the epochs
    python benchmarks/ablation.py --reduced --json benchmarks/results/ablation.json # what fits a busy machine

Arms (base: NIN with batch norm, data dropout, no class weighting, Shin's global GRU annotator, no cascade):
  googlenet, densenet121      the CNN (at the small input the base uses)
  no_batch_norm               every batch norm replaced by a per-channel scale and shift
  no_data_dropout             every training image once per epoch, no normal dropped, none repeated
  class_weighted              BCE positives weighted neg/pos per target (Wang et al. 2017)
  lstm                        the annotator cell
  cascade vs control          both train stage 1 then a second CNN + RNN stage of the same length,
                              warm-started; the cascade relabels by k-means of the joint contexts,
                              the control keeps the labels (no cluster is allowed: the same total
                              epochs and learning-rate restart, without relabelling)
Measures on the held-out test patients: mean ROC AUC of the CNN over the targets, and BLEU-4 of
the annotator given the true disease (Shin et al.'s measure of the cascade). The cascade arm is
compared with its control, every other arm with the base.

Data: the demo's phantom set (1,500 studies at 256 px, seed 0; simulated once into the data cache)
and its kind of patient split (70/10/20, seeded by the run seed). The default trains every arm on
all of it at 64 px for 6 CNN epochs; `--large` for 8; `--reduced` takes the first 600
studies and leaves DenseNet-121 out. `--workers` runs (arm, seed) jobs side by side, each with
its share of the cores (default: 2 workers on 2 or more cores); the JSON's `settings` say what
ran and `wall_seconds` how long it took from start to end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr import metrics as M  # noqa: E402

ARMS = {
    "base": {},
    "googlenet": {"backbone": "googlenet"},
    "densenet121": {"backbone": "densenet121"},
    "no_batch_norm": {"batch_norm": False},
    "no_data_dropout": {"data_dropout": False},
    "class_weighted": {"class_weighted": True},
    "lstm": {"rnn": "lstm"},
    "control": {"cascade": True, "min_cluster_members": 10 ** 9},
    "cascade": {"cascade": True},
}
BASELINE_OF = {arm: ("control" if arm == "cascade" else "base") for arm in ARMS if arm != "base"}
# the default: every arm, all 1,500 studies, sized to run in under an hour on 2 cores (2 workers)
DEFAULT = dict(n=1500, max_images=None, image_size=64, epochs=6, rnn_epochs=15, seeds=3,
               arms=list(ARMS))
LARGE = dict(n=1500, max_images=None, image_size=64, epochs=8, rnn_epochs=20, seeds=3,
             arms=list(ARMS))
REDUCED = dict(n=1500, max_images=600, image_size=48, epochs=4, rnn_epochs=10, seeds=3,
               arms=["base", "googlenet", "no_batch_norm", "no_data_dropout", "class_weighted", "lstm",
                     "control", "cascade"])


def base_config(s: dict, data: str, seed: int, cache: Path, **arm):
    from cxr.training import TrainConfig

    size = s["image_size"]
    settings = dict(data=data, backbone="nin", rnn="gru", annotator="global", image_size=size, crop=size - size // 8,
                    epochs=s["epochs"], rnn_epochs=s["rnn_epochs"], batch_size=32, lr=3e-3, rnn_lr=5e-3,
                    rnn_hidden=128, rnn_embed=64, min_label_count=20, min_cluster_members=120,
                    images_per_cluster=60, cascade=False, seed=seed, num_workers=0, progress=False,
                    cache_dir=str(cache), pooling="avg")  # Shin et al.'s networks: global average pooling
    settings.update(arm)
    return TrainConfig(**settings)


def measure(run_dir: Path, studies) -> dict:
    """Test-split mean AUC of the CNN's calibrated scores and BLEU-4 of the annotator given the
    true disease (the final model of the run)."""
    import torch

    from cxr.checkpoint import load_spec
    from cxr.reader import Reader
    from cxr.training.prepare import prepare

    spec = load_spec(run_dir)
    prep = prepare(studies, patient_split=spec.data.patients, targets=list(spec.targets),
                   words=list(spec.vocabulary))
    test = prep.indices("test")
    reader = Reader.load(run_dir, device="cpu", gate=False)  # phantom films: the quality gate is not the question here
    scores, embs = [], []
    for s in range(0, len(test), 64):
        results = reader([prep.paths[i] for i in test[s:s + 64]], heatmaps=False)
        scores += [[r.scores[t] for t in prep.targets] for r in results]
        embs += [r.embedding for r in results]
    auc = M.auc_per_label(prep.labels[test], np.array(scores), prep.targets)
    row = {int(i): k for k, i in enumerate(test)}
    pairs = sorted({(i, t) for i, t, _ in prep.pairs if i in row})
    refs = {}
    for i, t, tokens in prep.pairs:
        refs.setdefault((i, t), []).append(list(tokens))
    hyps = reader.annotate(torch.from_numpy(np.stack([embs[row[i]] for i, _ in pairs])),
                           torch.tensor([t for _, t in pairs]))
    bleu = M.bleu_scores([refs[p] for p in pairs], [M.annotation_tokens(h, reader.words) for h in hyps])
    return {"mean_auc": auc["mean"], "bleu4": bleu["bleu4"], "test_images": int(len(test))}


def paired(results: dict, arm: str, base: str, key: str) -> dict | None:
    seeds = sorted(set(results.get(arm, {})) & set(results.get(base, {})))
    d = [results[arm][s][key] - results[base][s][key] for s in seeds
         if results[arm][s][key] is not None and results[base][s][key] is not None]
    if not d:
        return None
    return {"mean": float(np.mean(d)), "sd": float(np.std(d, ddof=1)) if len(d) > 1 else None,
            "min": float(min(d)), "max": float(max(d)), "n": len(d), "all": [float(x) for x in d]}


def summary(runs: dict) -> dict:
    """Means over an arm's seeds (what the table shows)."""
    def mean(key):
        values = [r[key] for r in runs.values() if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {"seeds": len(runs), "mean_auc": mean("mean_auc"), "bleu4": mean("bleu4"),
            "seconds": mean("seconds")}


def table(out: dict) -> str:
    rows = []
    for arm in out["arms"]:
        m = out["summary"].get(arm) or {}
        d_auc = out["differences"].get(arm, {}).get("mean_auc") or {}
        d_bleu = out["differences"].get(arm, {}).get("bleu4") or {}
        rows.append([arm, BASELINE_OF.get(arm, "–"), m.get("seeds"), m.get("mean_auc"), d_auc.get("mean"),
                     d_auc.get("sd"), m.get("bleu4"), d_bleu.get("mean"), d_bleu.get("sd"),
                     m.get("seconds")])
    return M.markdown_table(["arm", "vs", "seeds", "AUC", "ΔAUC", "sd", "BLEU-4", "ΔBLEU-4", "sd",
                             "s/run"], rows, digits=3)


def combine(paths: list[Path], json_out: Path | None) -> int:
    """One result from several partial ones (same settings; each seed's runs from any file)."""
    parts = [json.loads(p.read_text()) for p in paths]
    out = dict(parts[0], results={}, differences={}, summary={})
    for part in parts:
        if {k: v for k, v in part["settings"].items() if k not in ("arms", "seeds")} != \
                {k: v for k, v in out["settings"].items() if k not in ("arms", "seeds")}:
            raise SystemExit(f"{', '.join(map(str, paths))}: not run with the same settings")
        for arm, runs in part["results"].items():
            out["results"].setdefault(arm, {}).update(runs)
    out["arms"] = [a for a in ARMS if a in out["results"]]
    out["settings"] = dict(out["settings"], arms=out["arms"],
                           seeds=min(len(r) for r in out["results"].values()))
    out["combined_from"] = len(parts)
    out["seconds"] = round(sum(r["seconds"] for runs in out["results"].values() for r in runs.values()), 1)
    _finish(out, out["settings"], json_out, time.time(), done=True)
    out["wall_seconds"] = None  # pieces run apart: no one wall time
    out["seconds"] = round(sum(r["seconds"] for runs in out["results"].values() for r in runs.values()), 1)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1) + "\n")
    print(readme_block(out))
    return 0


def readme_block(out: dict) -> str:
    """The README's ablation figures (paste after a run)."""
    s = out["settings"]
    what = (f"the first {s['max_images']} studies" if s.get("max_images") else f"all {s['n']} studies")
    return "\n".join([
        "<!-- figures: benchmarks/results/ablation.json -->",
        f"Measured: {what} of the demo's phantom set, {s['image_size']} px, {s['epochs']} CNN epochs "
        f"(and {s['epochs']} more in the cascade and its control), {s['rnn_epochs']} RNN epochs, "
        f"{s['seeds']} seeds; AUC is the mean test AUC of the CNN, BLEU-4 the annotator's given the "
        "true disease; Δ is the arm minus its baseline on the same seed and split, sd its spread "
        "over the seeds.",
        "",
        "<!-- figures: benchmarks/results/ablation.json -->",
        table(out),
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path("ablation-runs"), help="runs (resumable)")
    ap.add_argument("--large", action="store_true", help="8 CNN and 20 RNN epochs (over an hour on 2 cores)")
    ap.add_argument("--workers", type=int, help="(arm, seed) jobs run side by side (default: 2 on 2+ cores)")
    ap.add_argument("--reduced", action="store_true",
                    help="the first 600 studies, 48 px, 4 epochs, no DenseNet (what a busy 2-core machine allows)")
    ap.add_argument("--arms", help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds FIRST..FIRST+SEEDS-1 (to spread seeds over processes; a later run "
                         "over the same --work with all seeds only measures the finished runs)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--data", help="phantom:DIR (default: the demo's set, simulated once into the cache)")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="merge the results of earlier runs of this script (e.g. one per process and "
                         "seed) into --json instead of training")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.json)
    s = dict(REDUCED if args.reduced else LARGE if args.large else DEFAULT)
    for key in ("seeds", "epochs", "image_size"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.arms:
        s["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in s["arms"] if a not in ARMS]
        if unknown:
            raise SystemExit(f"unknown arm(s): {', '.join(unknown)}")
    import os

    from cxr.sources import open_source

    data = args.data
    if not data:
        from cxr.commands.train import _phantom_default

        data = _phantom_default(s["n"], 256, 0)
    from cxr.errors import CxrError

    try:
        studies = open_source(data)
    except CxrError as exc:
        raise SystemExit(f"ablation: {exc}") from None
    if s["max_images"]:
        studies = studies[:s["max_images"]]  # the test split is then that subset's test patients
    work = args.work.expanduser()
    cores = os.cpu_count() or 1
    workers = max(1, args.workers or min(2, cores))
    threads = max(1, cores // workers)
    s["workers"], s["threads_per_worker"] = workers, threads
    out = {"settings": s, "data": data, "threads": threads, "arms": s["arms"],
           "baseline_of": {a: BASELINE_OF[a] for a in s["arms"] if a in BASELINE_OF},
           "results": {}, "differences": {}, "summary": {}, "machine": f"{cores} CPU cores"}
    t_all = time.time()
    _image_cache(studies, base_config(s, data, 0, work / "cache"))  # once, before the workers share it
    # the slowest arms first, so that the last jobs left are short ones
    order = sorted(s["arms"], key=lambda a: -SLOW.get(a, 1))
    jobs = [(arm, seed) for arm in order for seed in range(args.first_seed, args.first_seed + s["seeds"])]
    done = 0

    def record(arm: str, seed: int, rec: dict) -> None:
        nonlocal done
        done += 1
        out["results"].setdefault(arm, {})[str(seed)] = rec
        print(f"[{done}/{len(jobs)}, {time.time() - t_all:.0f} s] seed {seed} {arm:16s} "
              f"AUC {M.fmt(rec['mean_auc'])} BLEU-4 {M.fmt(rec['bleu4'])} ({rec['seconds']:.0f} s)", flush=True)
        _finish(out, s, args.json, t_all, done=False)  # what has run so far survives a stop

    if workers == 1:
        for arm, seed in jobs:
            record(arm, seed, run_job(s, data, seed, arm, str(work), threads))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, s, data, seed, arm, str(work), threads): (arm, seed)
                       for arm, seed in jobs}
            for future in as_completed(futures):
                record(*futures[future], future.result())
    _finish(out, s, args.json, t_all, done=True)
    print(readme_block(out))
    return 0


# relative cost of an arm (orders the jobs; the two-stage arms train twice)
SLOW = {"control": 2.2, "cascade": 2.2, "densenet121": 1.5, "googlenet": 1.2}


def run_job(s: dict, data: str, seed: int, arm: str, work: str, threads: int) -> dict:
    """Train and measure one (arm, seed) in this process with `threads` threads (a worker)."""
    import torch

    from cxr.sources import open_source
    from cxr.training import train

    torch.set_num_threads(threads)
    studies = open_source(data)
    if s["max_images"]:
        studies = studies[:s["max_images"]]
    t0 = time.time()
    cfg = base_config(s, data, seed, Path(work) / "cache", **ARMS[arm])
    run = train(cfg, Path(work) / f"{arm}-seed{seed}", studies=studies)
    rec = measure(run, studies)
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def _image_cache(studies, cfg) -> None:
    """Decode and resize the images once, as `train` would with `cfg` (every run reads the same
    cache: the image list does not depend on the seed or the arm)."""
    from cxr.dataset import build_cache
    from cxr.training.prepare import prepare

    prep = prepare(studies, cfg.views, cfg.fractions, cfg.seed, cfg.min_label_count)
    build_cache(prep.paths, cfg.image_size, cfg.cache_dir, 0, False)


def _finish(out: dict, s: dict, path: Path | None, t_all: float, done: bool) -> None:
    for arm in s["arms"]:
        base = BASELINE_OF.get(arm)
        if base and base in out["results"] and arm in out["results"]:
            out["differences"][arm] = {k: paired(out["results"], arm, base, k) for k in ("mean_auc", "bleu4")}
    out["summary"] = {arm: summary(runs) for arm, runs in out["results"].items()}
    out["seconds"] = out["wall_seconds"] = round(time.time() - t_all, 1)
    out["complete"] = done
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
