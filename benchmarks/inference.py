"""Inference speed of the whole Reader (CNN scores + calibration + RNN annotations + CAM heatmaps
and boxes, from a float32 image to `Result`s), at batch 1 (latency) and batch 32 (throughput),
for each engine (torch, and the exported graph under onnxruntime and openvino), against a plain
MONAI DenseNet-121 classifier (the usual model alone) and against each Reader's own bare CNN
forward pass (`Reader.forward`, timed in the Reader's own process in turn with each of its calls:
the ratio is taken call by call, so the shared machine's load falls on both sides of it; the
forward pass alone is also measured in a process of its own, for its images/s and memory),
all measured in the same run on the same input path and at the
same precision (float32): every measurement gets the same 1024-px float32 arrays and resizes and
preprocesses them with `cxr.preprocess` to the model's input size (decoding is left out for all
alike), so a ratio says what the cascade's extra outputs cost, not what a baseline was spared.

With `--before COMMIT` the Reader of that commit (its cxr/reader.py, annotators and CAM/box code,
from git; parameters its grounded annotator does not have are left out of the random run it
reads) is measured too, with the torch engine, on each random run (and its time over its own
forward pass, where it has `Reader.forward`): the speed-up of the current Reader over it is then
a ratio in one run.
With `--micro-batches 1 4 8 32` the Reader's own forward pass is also measured with each of those
CNN call sizes (`Reader.micro_batch`) at each batch: what `Reader.CPU_MICRO_BATCH` is chosen from.
The JSON's `summary` holds the ratios the targets are about: per engine, images/s at the largest
batch over images/s at batch 1, the Reader's time over its own forward pass, and images/s over
the `--before` Reader's.

    python benchmarks/inference.py [--run RUN] [--backbone densenet121] [--before COMMIT] [--json OUT]

Without --run two runs with random weights are written, with the same CNN: one with Shin's
global annotator and one with the grounded annotator (`cxr train`'s default, which attends over
the feature map at every word); the Reader of each is measured (the timing does not depend on the
weights, but thresholds are set low so that every image gets seven findings, each with an
annotation, a heatmap and boxes: the worst case). The summary's `grounded_annotator` holds the
second run's ratios. Each measurement runs in its own process, so the peak
memory (resident set, or CUDA max allocated) is that measurement's own.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.machine import cpu_name  # noqa: E402

TARGETS = ["normal", "Opacity", "Cardiomegaly", "Pleural Effusion", "Pulmonary Atelectasis",
           "Nodule", "Calcified Granuloma", "Lung/hypoinflation"]
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "normal", "opacity", "lung", "base", "left", "right",
         "mild", "moderate", "cardiomegaly", "pleural effusion", "small", "upper lobe", "nodule"]


ATTN_DIM = 128  # `cxr train`'s default width of the grounded annotator


def random_run(out: Path, backbone: str, image_size: int, annotator: str = "grounded") -> Path:
    """A complete run directory with random weights (the Reader's checkpoint format), with the
    annotator `cxr train` gives by default (grounded) or Shin's global one."""
    import torch

    from cxr.checkpoint import prefixed, save_run
    from cxr.models.annotator import Annotator
    from cxr.models.cascade import RefinedLabels
    from cxr.models.cnn import create_cnn
    from cxr.preprocess import MEAN, STD, STRETCH
    from cxr.records import MAX_TOKENS
    from cxr.models.localize import chestxray8_params
    from cxr.runspec import Architecture, Calibration, DataSpec, Preprocessing, RunSpec

    torch.manual_seed(0)
    cnn = create_cnn(backbone, len(TARGETS))
    rnn = Annotator(len(WORDS), len(TARGETS), cnn.num_features, 512, 256, "gru")
    weights = {**prefixed("cnn", cnn.state_dict()), **prefixed("rnn", rnn.state_dict())}
    if annotator == "grounded":
        from cxr.models.grounded import GroundedAnnotator, field_word_ids

        ground = GroundedAnnotator(len(WORDS), len(TARGETS), cnn.num_features, field_word_ids(WORDS),
                                   512, 256, "gru", ATTN_DIM, vocab=WORDS)
        weights.update(prefixed("ground", ground.state_dict()))
    spec = RunSpec(
        stage="random", cxr_version="bench", created="", seed=0,
        architecture=Architecture(backbone=backbone, num_classes=len(TARGETS), in_chans=1,
                                  image_dim=cnn.num_features, rnn="gru", rnn_hidden=512, rnn_embed=256,
                                  vocab_size=len(WORDS), num_labels=len(TARGETS), max_tokens=MAX_TOKENS,
                                  annotator=annotator, attn_dim=ATTN_DIM if annotator == "grounded" else 0),
        targets=TARGETS,
        refined=RefinedLabels.identity(TARGETS),
        vocabulary=WORDS,
        preprocessing=Preprocessing(image_size=image_size, crop=image_size, mean=MEAN, std=STD, stretch=STRETCH),
        calibration=Calibration(method="platt", params={t: [1.0, 0.0] for t in TARGETS}),
        thresholds={t: 0.0 for t in TARGETS},  # every disease detected: the worst case
        threshold_rule="all 0: every disease detected",
        localization=chestxray8_params(),  # the default box rule: two thresholds, two labellings
        validation={}, train_config={}, pretrained=None,
        data=DataSpec(spec="", views="frontal", split_seed=0, fractions=[1.0, 0.0, 0.0],
                      patients={"train": [], "val": [], "test": []}, counts={}, unreadable={},
                      label_counts={}),
    )
    return save_run(out, weights, spec)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


#: the modules the Reader's own work after the CNN lives in, taken from `--before`'s commit too
BEFORE_MODULES = ("cxr.models.annotator", "cxr.models.grounded", "cxr.models.localize")


def _reader_class(commit: str | None):
    """The Reader class of the working tree, or of `commit`: its reader.py, annotator
    (`cxr.models.annotator`) and CAM/box code (`cxr.models.localize`) loaded from git inside the
    current cxr package (the network, preprocessing and checkpoint code are today's). Only ever
    called in a measurement's own process: the old modules replace today's in `sys.modules`."""
    if not commit:
        from cxr.reader import Reader

        return Reader
    import importlib
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def load(name: str, path: str):
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
        spec = importlib.util.spec_from_loader(name, loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = name.rpartition(".")[0]
        sys.modules[name] = module
        exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
        return module

    for name in BEFORE_MODULES:
        importlib.import_module(name.rpartition(".")[0])
        setattr(sys.modules[name.rpartition(".")[0]], name.rpartition(".")[2],
                load(name, name.replace(".", "/") + ".py"))
    _drop_new_parameters(sys.modules["cxr.models.grounded"].GroundedAnnotator)
    return load("cxr._reader_before", "cxr/reader.py").Reader


def _drop_new_parameters(cls) -> None:
    """Let the grounded annotator of an earlier commit load today's random grounded run: the
    parameters added since (`presence_bias`, zeros in a random run, which then change nothing)
    are left out; a parameter it has and the run lacks still fails."""
    from torch import nn

    def load_state_dict(self, state, strict=True, **kw):
        own = self.state_dict()
        return nn.Module.load_state_dict(self, {k: v for k, v in state.items() if k in own}, strict, **kw)

    cls.load_state_dict = load_state_dict


def measure(job: dict) -> dict:
    """One measurement in a fresh process: {'kind': 'reader'|'cnn'|'densenet', 'engine', 'batch',
    ...}. 'cnn' is the Reader's own forward pass (preprocess + CNN) alone."""
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    rng = np.random.default_rng(0)
    batch, repeats = job["batch"], job["repeats"]
    images = [rng.random((job["input"], job["input"]), dtype=np.float32) for _ in range(batch)]
    if job["kind"] in ("reader", "cnn"):
        Reader = _reader_class(job.get("commit"))
        engine = {} if job.get("commit") else {"engine": job["engine"]}
        if job.get("micro_batch"):
            engine["micro_batch"] = job["micro_batch"]
        # the cascade alone (benchmarks/quality.py measures what the quality gate adds)
        reader = Reader.load(job["run"], device=device, gate=False, **engine)

        def step():
            if job["kind"] == "cnn":
                return reader.forward(images)
            out = reader(images if batch > 1 else images[0], batch_size=batch)
            if job.get("read_heatmaps"):  # what a caller that draws every heatmap pays on top
                for result in (out if batch > 1 else [out]):
                    for heat in result.heatmaps.values():
                        heat.shape
            return out
    else:
        from monai.networks.nets import DenseNet121

        from cxr.preprocess import normalise, preprocess

        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(TARGETS)).to(device).eval()

        def step():  # the Reader's input path: resize + stretch, normalise, forward
            x = np.stack([preprocess(im, job["size"], job["stretch"]) for im in images])[:, None]
            x = normalise(torch.from_numpy(x).to(device), job["mean"], job["std"])
            with torch.no_grad():
                y = torch.sigmoid(net(x))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return y
    step()  # warm-up
    # a Reader's own forward pass is timed beside each of its calls, in the same process, the
    # two in turn: their ratio, call by call, is what the Reader adds, whatever load the shared
    # machine carries at that moment (separate processes minutes apart measured the same
    # ratio from 1.10x to 1.54x)
    own = getattr(reader, "forward", None) if job["kind"] == "reader" else None
    if own is not None:
        own(images)
    times, own_times = [], []
    for k in range(repeats):
        for which in (("call", "own") if k % 2 == 0 else ("own", "call")) if own else ("call",):
            t0 = time.perf_counter()
            step() if which == "call" else own(images)
            (times if which == "call" else own_times).append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"kind": job["kind"], "engine": job.get("engine", "torch"), "commit": job.get("commit"),
            "read_heatmaps": bool(job.get("read_heatmaps")), "micro_batch": job.get("micro_batch"),
            "annotator": job.get("annotator"),
            "batch": batch, "latency_s_median": med,
            "latency_s_p90": sorted(times)[max(0, int(0.9 * len(times)) - 1)],
            "images_per_s": batch / med, "peak_mb": _peak_mb(device), "repeats": repeats,
            "times": times, "own_cnn_times": own_times}


def _engines() -> list[str]:
    """torch, and the ONNX engines whose packages are installed."""
    import importlib.util

    found = ["torch"]
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        found.append("onnxruntime")
        if importlib.util.find_spec("openvino"):
            found.append("openvino")
    return found


def reader_options(ap, batches: list[int], calls: int, calls_help: str) -> None:
    """The options of the benchmarks that time the grounded Reader call by call in one process
    per engine (`organs_beside_words.py`, `findings_per_film.py`, `decoding.py`)."""
    ap.add_argument("--engines", nargs="+", default=None, help="default: torch and those installed")
    ap.add_argument("--batches", type=int, nargs="+", default=batches)
    ap.add_argument("--calls", type=int, default=calls, help=calls_help)
    ap.add_argument("--input", type=int, default=1024, help="side of the films")
    ap.add_argument("--json", type=Path)


def two_settings(run: Path, engine: str, batch: int, calls: int, image: int, apply) -> tuple:
    """One Reader of `run` reading `batch` random `image`-px films in two settings (`apply(reader,
    True)` or `apply(reader, False)` sets one) alternated call by call, each call followed by the
    Reader's own forward pass alone; the first round warms up. Returns its first call's Results
    (read in the first setting), and per setting the median ms per call and the median ratio of a
    call to the forward pass after it (the machine's load falls on both)."""
    import statistics
    import time

    import numpy as np

    from cxr.reader import Reader

    reader = Reader.load(run, device="cpu", gate=False, engine=engine)
    rng = np.random.default_rng(0)
    films = [rng.random((image, image), dtype=np.float32) for _ in range(batch)]
    apply(reader, True)
    first = reader(films, batch_size=batch)
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for k in range(calls + 1):
        for setting in ((True, False) if k % 2 == 0 else (False, True)):
            apply(reader, setting)
            t0 = time.perf_counter()
            reader(films, batch_size=batch)
            t1 = time.perf_counter()
            reader.forward(films)
            t2 = time.perf_counter()
            if k:
                times[setting].append((t1 - t0, t2 - t1))
    return first, {setting: {"ms_per_call": round(1e3 * statistics.median(t for t, _ in pairs), 2),
                             "time_x_own_cnn": round(statistics.median(t / o for t, o in pairs), 4)}
                   for setting, pairs in times.items()}


def exported_run_for(out: Path, engines: list[str], annotator: str = "grounded") -> Path:
    """The random DenseNet-121 run at 256-px input with `annotator` (`random_run`) in `out`,
    exported to ONNX where an engine other than torch is to read it: what the Reader-only
    benchmarks read."""
    from cxr.cli import main as cxr_main

    run = random_run(out, "densenet121", 256, annotator)
    if set(engines) - {"torch"}:
        cxr_main(["export", str(run), "--onnx"])
    return run


def _jobs(engines: list[str], before: str | None, micro_batches: list[int], batch: int,
          grounded: bool = False) -> list[dict]:
    jobs = [{"kind": "densenet"}]
    for engine in engines:
        jobs += [{"kind": "cnn", "engine": engine, "micro_batch": m} for m in micro_batches if m <= batch]
    for engine in engines:
        jobs += [{"kind": "cnn", "engine": engine}, {"kind": "reader", "engine": engine}]
        if grounded:
            jobs.append({"kind": "reader", "engine": engine, "annotator": "grounded"})
    jobs.append({"kind": "reader", "engine": "torch", "read_heatmaps": True})
    if before:
        jobs.append({"kind": "reader", "engine": "torch", "commit": before})
        if grounded:
            jobs.append({"kind": "reader", "engine": "torch", "commit": before, "annotator": "grounded"})
    return jobs


def _name(r: dict, backbone: str, args) -> str:
    if r["kind"] == "densenet":
        return f"MONAI DenseNet-121 alone ({args.input} px image -> scores)"
    if r["kind"] == "cnn" and r.get("micro_batch"):
        return f"Reader.forward alone, {r['engine']}, CNN calls of {r['micro_batch']}"
    if r["kind"] == "cnn":
        return f"Reader.forward alone, {r['engine']} (preprocess + CNN)"
    if r["commit"]:
        grounded = ", grounded annotator" if r.get("annotator") == "grounded" else ""
        return f"Reader at {r['commit']}, torch{grounded} ({args.input} px image -> Result)"
    extra = ", every heatmap read" if r["read_heatmaps"] else ""
    extra += ", grounded annotator" if r.get("annotator") == "grounded" else ""
    return f"Reader, {r['engine']}{extra} ({args.input} px image -> Result)"


def _summary(results: list[dict], engines: list[str], annotator: str | None = None) -> dict:
    """The ratios the targets are about, each within this run: per engine, the Reader's
    images/s at the largest batch over batch 1 (>= 1: batching never slows it down), its time
    over its own forward pass per batch, and its images/s over the --before Reader's; of the
    run with `annotator` ("grounded": the second random run; None: the first, or --run)."""
    readers = [r for r in results if r["kind"] == "reader" and not r["commit"] and not r["read_heatmaps"]
               and r.get("annotator") == annotator]
    batches = sorted({r["batch"] for r in readers})
    out: dict = {}
    for engine in engines:
        by_batch = {r["batch"]: r for r in readers if r["engine"] == engine}
        if not by_batch:
            continue
        row = {"images_per_s": {b: round(r["images_per_s"], 3) for b, r in by_batch.items()},
               "time_x_own_cnn": {b: round(r["time_ratio_vs_own_cnn"], 3) for b, r in by_batch.items()}}
        if len(batches) > 1 and batches[0] in by_batch and batches[-1] in by_batch:
            row[f"batch_{batches[-1]}_over_batch_{batches[0]}_per_image"] = round(
                by_batch[batches[-1]]["images_per_s"] / by_batch[batches[0]]["images_per_s"], 3)
        if all("speedup_vs_before" in r for r in by_batch.values()):
            row["images_per_s_x_before"] = {b: round(r["speedup_vs_before"], 3) for b, r in by_batch.items()}
        out[engine] = row
    if out:
        out["fastest"] = {b: max(engines_, key=lambda e: out[e]["images_per_s"].get(b, 0))
                          for engines_ in [list(out)] for b in batches}
    return out


def main(argv=None) -> int:
    import torch

    from cxr.metrics import markdown_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run (default: random weights, see --backbone)")
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--image-size", type=int, default=256, help="model input size of the random run")
    ap.add_argument("--input", type=int, default=1024, help="side of the input images (resized by the Reader)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3,
                    help="every measurement this many times, interleaved (a shared machine's load "
                         "then falls on all alike); the median over all rounds is reported")
    ap.add_argument("--engines", nargs="+", default=None, help="default: torch and those installed")
    ap.add_argument("--before", metavar="COMMIT", default=None,
                    help="also measure the Reader of this git commit (torch engine)")
    ap.add_argument("--micro-batches", type=int, nargs="*", default=[],
                    help="also measure Reader.forward with CNN calls of these sizes")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    engines = args.engines or _engines()
    if args.device != "cpu":
        engines = ["torch"]

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp) / "run", args.backbone, args.image_size,
                                                         "global")
        grounded = None if args.run else random_run(Path(tmp) / "grounded", args.backbone, args.image_size)
        from cxr.checkpoint import load_spec

        if set(engines) - {"torch"}:
            from cxr.cli import main as cxr_main

            if args.run:  # a given run is not written to: the Readers read the graph from a copy
                raise SystemExit("--run with ONNX engines: run `cxr export RUN --onnx` first, then "
                                 "pass --engines explicitly")
            for each in (run, grounded):
                cxr_main(["export", str(each), "--onnx"])
        spec = load_spec(run)
        size = spec.preprocessing.image_size
        backbone = spec.architecture.backbone
        pre = spec.preprocessing
        ctx = mp.get_context("spawn")
        rows, results = [], []
        for batch in args.batches:
            reps = max(2, args.repeats if batch == 1 else max(2, args.repeats // 2))
            jobs = _jobs(engines, args.before, args.micro_batches, batch, grounded is not None)
            samples: dict[int, list] = {i: [] for i in range(len(jobs))}
            for round_ in range(args.rounds):
                order = list(range(len(jobs)))
                for i in (order if round_ % 2 == 0 else order[::-1]):
                    job = {**jobs[i], "batch": batch, "repeats": reps, "threads": args.threads,
                           "device": args.device, "input": args.input, "size": size,
                           "run": str(grounded if jobs[i].get("annotator") == "grounded" else run),
                           "stretch": pre.stretch, "mean": pre.mean, "std": pre.std}
                    with ctx.Pool(1) as pool:
                        samples[i].append(pool.apply(measure, (job,)))
                    print(f"  round {round_ + 1}, batch {batch}: {jobs[i]} "
                          f"{samples[i][-1]['images_per_s']:.2f} images/s", flush=True)
            by_key = {}
            for i, runs in samples.items():
                times = [t for r in runs for t in r["times"]]
                own = [t for r in runs for t in r["own_cnn_times"]]
                r = {**runs[0], "times": times, "own_cnn_times": own, "latency_s_median": statistics.median(times),
                     "peak_mb": max(x["peak_mb"] for x in runs), "rounds": len(runs)}
                r["images_per_s"] = batch / r["latency_s_median"]
                by_key[i] = r
            cnn = {r["engine"]: r for r in by_key.values() if r["kind"] == "cnn" and not r["micro_batch"]}
            base = next(r for r in by_key.values() if r["kind"] == "densenet")
            # the --before Reader of each run (Shin's annotator's, and the grounded one's)
            before = {r.get("annotator"): r for r in by_key.values() if r["commit"]}
            for r in by_key.values():
                r["time_ratio_vs_densenet"] = r["latency_s_median"] / base["latency_s_median"]
                if r["kind"] == "reader" and r["own_cnn_times"]:  # call by call, against its own forward pass
                    r["time_ratio_vs_own_cnn"] = statistics.median(
                        t / o for t, o in zip(r["times"], r["own_cnn_times"]))
                if r["kind"] == "reader" and not r["commit"]:
                    r["time_ratio_vs_forward_alone"] = r["latency_s_median"] / cnn[r["engine"]]["latency_s_median"]
                if r.get("annotator") in before and r["kind"] == "reader":
                    r["speedup_vs_before"] = r["images_per_s"] / before[r.get("annotator")]["images_per_s"]
                results.append(r)
                rows.append([_name(r, backbone, args), batch, r["images_per_s"], r["latency_s_median"] * 1000,
                             r["peak_mb"], r["time_ratio_vs_densenet"], r.get("time_ratio_vs_own_cnn", ""),
                             r.get("speedup_vs_before", "")])
                print(f"  {rows[-1][0]} batch {batch}: {r['images_per_s']:.1f} images/s", flush=True)
    print()
    print(markdown_table(["what", "batch", "images/s", "ms per call (median)", "peak MB",
                          "time x DenseNet", "time x own CNN", "images/s x before"], rows, digits=2))
    summary = _summary(results, engines)
    if any(r.get("annotator") == "grounded" for r in results):
        summary["grounded_annotator"] = _summary(results, engines, "grounded")
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "inference", "device": args.device, "threads": args.threads,
            "cpu": cpu_name(), "torch": torch.__version__,
            "run": args.run or f"random {backbone}", "backbone": backbone, "model_input": size,
            "image_input": args.input, "engines": engines, "before": args.before,
            "precision": "float32 for every engine",
            "input_path": "the same float32 arrays for all; cxr.preprocess resize and stretch to the "
                          "run's input size, normalise (decoding excluded for all alike)",
            "baseline": "MONAI DenseNet-121 on the same float32 images: cxr.preprocess resize and "
                        "stretch to the run's input size, normalise, forward, sigmoid",
            "summary": summary, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
