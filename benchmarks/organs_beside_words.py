"""What reading the organs beside the words saves: the Reader with the anatomy model on a second
thread while the grounded annotator writes (`Reader.organs_beside_words`, the default) against
the same Reader reading the organs after the words, in one process, call after call.

    python benchmarks/organs_beside_words.py [--engines torch onnxruntime openvino] [--json OUT]

The run is `benchmarks/inference.py`'s random DenseNet-121 with the grounded annotator and every
disease detected (seven findings per film, Cardiomegaly and Lung/hypoinflation among them, so the
anatomy model reads every film: the worst case), reading 1024-px float32 films. For each engine
and batch the two settings alternate call by call, and each call is followed by the Reader's own
forward pass alone: the ratio of a call to that forward pass is taken call by call (the shared
machine's load falls on both), and its median is reported, with the median time per call.
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
    """Median ms per call and time over the own forward pass, beside and after, one engine."""
    import torch

    from inference import two_settings

    def beside(reader, setting):
        reader.organs_beside_words = setting

    _, got = two_settings(run, engine, batch, calls, image, beside)
    out = {"engine": engine, "batch": batch, "calls": calls, "torch_threads": torch.get_num_threads(),
           "beside": got[True], "after": got[False]}
    out["time_x_own_cnn_change"] = round(out["beside"]["time_x_own_cnn"] - out["after"]["time_x_own_cnn"], 4)
    return out


def main(argv=None) -> int:
    import torch

    from cxr.atomic import write_atomic
    from cxr.metrics import markdown_table
    from inference import _engines, exported_run_for, reader_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reader_options(ap, [1, 32], 40, "calls of each setting at batch 1 (a quarter of that at batch 32)")
    args = ap.parse_args(argv)
    engines = args.engines or _engines()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = exported_run_for(Path(tmp) / "grounded", engines)
        for batch in args.batches:
            for engine in engines:
                calls = args.calls if batch == 1 else max(3, args.calls // 4)
                r = measure(run, engine, batch, calls, args.input)
                results.append(r)
                rows.append([engine, batch, calls, r["after"]["ms_per_call"], r["beside"]["ms_per_call"],
                             r["after"]["time_x_own_cnn"], r["beside"]["time_x_own_cnn"]])
                print(f"  {engine} batch {batch}: x own CNN {r['after']['time_x_own_cnn']:.3f} after, "
                      f"{r['beside']['time_x_own_cnn']:.3f} beside", flush=True)
    print(markdown_table(["engine", "batch", "calls each", "ms per call, organs after the words",
                          "beside", "time x own CNN, after", "beside"], rows, digits=3))
    if args.json:
        write_atomic(args.json, json.dumps({
            "benchmark": "organs_beside_words", "cpu": cpu_name(),
            "torch": torch.__version__, "run": "random densenet121, grounded annotator, every disease detected",
            "image_input": args.input, "precision": "float32", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
