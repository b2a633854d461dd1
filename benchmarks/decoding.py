"""What dropping ended findings from the decoding batch saves: the Reader with the grounded
annotator dropping a finding once it has written <end> (`GroundedAnnotator.drop_ended`, the
default) against the same Reader decoding every finding to the last step, in one process, call
after call.

    python benchmarks/decoding.py [--engines torch onnxruntime openvino] [--json OUT]

The run is `benchmarks/inference.py`'s random DenseNet-121 with the grounded annotator and every
disease detected (seven findings per film: the worst case; its random annotator writes one to
four words per finding, so findings end at different steps), reading 1024-px float32 films at
batch 1. For each engine the two settings alternate call by call, and each call is followed by
the Reader's own forward pass alone: the ratio of a call to that forward pass is taken call by
call (the shared machine's load falls on both), and its median is reported, with the median time
per call. `--rounds` repeats the whole measurement (engines in turn), so that its spread shows.
Both settings write the same words (`tests/test_grounded.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cxr.machine import cpu_name  # noqa: E402


def measure(run: Path, engine: str, batch: int, calls: int, image: int) -> dict:
    """Median ms per call and time over the own forward pass, ended findings dropped or kept."""
    import torch

    from inference import two_settings

    def drop(reader, setting):
        reader.ground.drop_ended = setting

    first, got = two_settings(run, engine, batch, calls, image, drop)
    out = {"engine": engine, "batch": batch, "calls": calls, "torch_threads": torch.get_num_threads(),
           "words_per_finding": [len(f.annotation.split()) for f in first[0].findings],
           "dropped": got[True], "kept": got[False]}
    out["time_x_own_cnn_change"] = round(out["dropped"]["time_x_own_cnn"] - out["kept"]["time_x_own_cnn"], 4)
    return out


def main(argv=None) -> int:
    import torch

    from cxr.atomic import write_atomic
    from cxr.metrics import markdown_table
    from inference import _engines, grounded_run_for, reader_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reader_options(ap, [1], 40, "calls of each setting")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    engines = args.engines or _engines()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = grounded_run_for(Path(tmp) / "grounded", engines)
        for round_ in range(1, args.rounds + 1):
            for batch in args.batches:
                for engine in engines:
                    r = {"round": round_, **measure(run, engine, batch, args.calls, args.input)}
                    results.append(r)
                    rows.append([engine, round_, batch, args.calls, r["kept"]["ms_per_call"],
                                 r["dropped"]["ms_per_call"], r["kept"]["time_x_own_cnn"],
                                 r["dropped"]["time_x_own_cnn"]])
                    print(f"  round {round_}, {engine} batch {batch}: x own CNN "
                          f"{r['kept']['time_x_own_cnn']:.3f} kept, {r['dropped']['time_x_own_cnn']:.3f} dropped",
                          flush=True)
    print(markdown_table(["engine", "round", "batch", "calls each", "ms per call, every finding to the last step",
                          "ended findings dropped", "time x own CNN, kept", "dropped"], rows, digits=3))
    if args.json:
        write_atomic(args.json, json.dumps({
            "benchmark": "decoding", "cpu": cpu_name(), "torch": torch.__version__,
            "run": "random densenet121, grounded annotator, every disease detected",
            "image_input": args.input, "precision": "float32", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
