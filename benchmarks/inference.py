"""Inference speed of the whole Reader (CNN scores + calibration + RNN annotations + CAM heatmaps
and boxes, from a float32 image to `Result`s), at batch 1 (latency) and batch 32 (throughput),
against a plain MONAI DenseNet-121 classifier (the usual model alone) measured in the same run on
the same input path: both get the same 1024-px float32 arrays and both resize and preprocess them
with `cxr.preprocess` to the model's input size, so the ratio says what the cascade's extra
outputs cost, not what the baseline was spared.

    python benchmarks/inference.py [--run RUN] [--backbone densenet121] [--json OUT]

Without --run a run with random weights is written (the timing does not depend on the weights,
but thresholds are set low so that every image gets several findings, each with an annotation,
a heatmap and boxes: the worst case). Each measurement runs in its own process, so the peak
memory (resident set, or CUDA max allocated) is that measurement's own.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["normal", "Opacity", "Cardiomegaly", "Pleural Effusion", "Pulmonary Atelectasis",
           "Nodule", "Calcified Granuloma", "Lung/hypoinflation"]
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "normal", "opacity", "lung", "base", "left", "right",
         "mild", "moderate", "cardiomegaly", "pleural effusion", "small", "upper lobe", "nodule"]


def random_run(out: Path, backbone: str, image_size: int) -> Path:
    """A complete run directory with random weights (the Reader's checkpoint format)."""
    import torch

    from cxr.checkpoint import prefixed, save_run
    from cxr.models.annotator import Annotator
    from cxr.models.cascade import RefinedLabels
    from cxr.models.cnn import create_cnn
    from cxr.preprocess import MEAN, STD, STRETCH
    from cxr.records import MAX_TOKENS
    from cxr.runspec import Architecture, Calibration, DataSpec, LocalizeParams, Preprocessing, RunSpec

    torch.manual_seed(0)
    cnn = create_cnn(backbone, len(TARGETS))
    rnn = Annotator(len(WORDS), len(TARGETS), cnn.num_features, 512, 256, "gru")
    spec = RunSpec(
        stage="random", cxr_version="bench", created="", seed=0,
        architecture=Architecture(backbone=backbone, num_classes=len(TARGETS), in_chans=1,
                                  image_dim=cnn.num_features, rnn="gru", rnn_hidden=512, rnn_embed=256,
                                  vocab_size=len(WORDS), num_labels=len(TARGETS), max_tokens=MAX_TOKENS),
        targets=TARGETS,
        refined=RefinedLabels.identity(TARGETS),
        vocabulary=WORDS,
        preprocessing=Preprocessing(image_size=image_size, crop=image_size, mean=MEAN, std=STD, stretch=STRETCH),
        calibration=Calibration(method="platt", params={t: [1.0, 0.0] for t in TARGETS}),
        thresholds={t: 0.0 for t in TARGETS},  # every disease detected: the worst case
        threshold_rule="all 0: every disease detected",
        localization=LocalizeParams(threshold=0.5, max_boxes=2, min_area=0.002),
        validation={}, train_config={}, pretrained=None,
        data=DataSpec(spec="", views="frontal", split_seed=0, fractions=[1.0, 0.0, 0.0],
                      patients={"train": [], "val": [], "test": []}, counts={}, unreadable={},
                      label_counts={}),
    )
    return save_run(out, {**prefixed("cnn", cnn.state_dict()), **prefixed("rnn", rnn.state_dict())},
                    spec)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(job: dict) -> dict:
    """One measurement in a fresh process: {'kind': 'reader'|'densenet', 'batch', ...}."""
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    rng = np.random.default_rng(0)
    batch, repeats = job["batch"], job["repeats"]
    images = [rng.random((job["input"], job["input"]), dtype=np.float32) for _ in range(batch)]
    if job["kind"] == "reader":
        from cxr.reader import Reader

        # the cascade alone (benchmarks/quality.py measures what the quality gate adds)
        reader = Reader.load(job["run"], device=device, gate=False)

        def step():
            out = reader(images if batch > 1 else images[0], batch_size=batch)
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
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"kind": job["kind"], "batch": batch, "latency_s_median": med,
            "latency_s_p90": sorted(times)[max(0, int(0.9 * len(times)) - 1)],
            "images_per_s": batch / med, "peak_mb": _peak_mb(device), "repeats": repeats}


def main(argv=None) -> int:
    import torch

    from cxr.metrics import markdown_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run (default: random weights, see --backbone)")
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--image-size", type=int, default=256, help="model input size of the random run")
    ap.add_argument("--input", type=int, default=1024, help="side of the input images (resized by the Reader)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp) / "run", args.backbone, args.image_size)
        from cxr.checkpoint import load_spec

        spec = load_spec(run)
        size = spec.preprocessing.image_size
        backbone = spec.architecture.backbone
        ctx = mp.get_context("spawn")
        rows, results = [], []
        for batch in args.batches:
            reps = max(2, args.repeats if batch == 1 else max(2, args.repeats // 2))
            pair = {}
            for kind in ("densenet", "reader"):
                pre = spec.preprocessing
                job = {"kind": kind, "batch": batch, "repeats": reps, "threads": args.threads,
                       "device": args.device, "run": str(run), "input": args.input, "size": size,
                       "stretch": pre.stretch, "mean": pre.mean, "std": pre.std}
                with ctx.Pool(1) as pool:
                    r = pool.apply(measure, (job,))
                pair[kind] = r
                results.append(r)
                print(f"  {kind} batch {batch}: {r['images_per_s']:.1f} images/s, "
                      f"{r['latency_s_median'] * 1000:.0f} ms per call", flush=True)
            ratio = pair["reader"]["latency_s_median"] / pair["densenet"]["latency_s_median"]
            pair["reader"]["time_ratio_vs_densenet"] = ratio
            for kind, name in (("densenet", f"MONAI DenseNet-121 ({args.input} px image -> {size} px "
                                            "preprocessed -> scores)"),
                               ("reader", f"Reader, {backbone} ({args.input} px image -> Result)")):
                r = pair[kind]
                rows.append([name, batch, r["images_per_s"], r["latency_s_median"] * 1000,
                             r["peak_mb"], r.get("time_ratio_vs_densenet", 1.0)])
    print()
    print(markdown_table(["what", "batch", "images/s", "ms per call (median)", "peak MB",
                          "time x baseline"], rows, digits=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "inference", "device": args.device, "threads": args.threads,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "run": args.run or f"random {backbone}", "backbone": backbone, "model_input": size,
            "image_input": args.input,
            "baseline": "MONAI DenseNet-121 on the same float32 images: cxr.preprocess resize and "
                        "stretch to the run's input size, normalise, forward, sigmoid",
            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
