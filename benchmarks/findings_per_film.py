"""The Reader's time over its own forward pass by what a film reports: no finding, one, two,
three, and every disease (the worst case that `inference.py` and `organs_beside_words.py` measure).

    python benchmarks/findings_per_film.py [--engines torch onnxruntime openvino] [--json OUT]

The run is `benchmarks/inference.py`'s random DenseNet-121 with the grounded annotator, reading
1024-px float32 films; which diseases a film reports is set by the Reader's thresholds (0 for the
diseases of a setting, above 1 for the others), so every film of a setting reports the same ones.
Everything after the CNN grows with the findings: each gets its words (one greedy decoding of
all of a batch's findings at once), its map and boxes, and a whole organ's finding
(Cardiomegaly, Lung/hypoinflation) also the anatomy network. In one process per engine the
settings alternate call by call, each call followed by the Reader's own forward pass alone: the
ratio of a call to that forward pass is taken call by call (the shared machine's load falls on
both), and its median is reported, with the median time per call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cxr.machine import cpu_name  # noqa: E402

# what a film reports in each setting: one finding, one that needs the anatomy network, two, three
# (the anatomy network among them), and every disease of the random run
SETTINGS = {
    "none": [],
    "Opacity": ["Opacity"],
    "Cardiomegaly": ["Cardiomegaly"],
    "Opacity, Pleural Effusion": ["Opacity", "Pleural Effusion"],
    "Opacity, Pleural Effusion, Cardiomegaly": ["Opacity", "Pleural Effusion", "Cardiomegaly"],
    "every disease (7)": None,
}


def measure(run: Path, engine: str, batch: int, calls: int, image: int) -> list[dict]:
    """Per setting: median ms per call and time over the own forward pass, one engine and batch."""
    import numpy as np

    from cxr.reader import Reader

    reader = Reader.load(run, device="cpu", gate=False, engine=engine)
    diseases = [t for t in reader.targets if t != "normal"]
    rng = np.random.default_rng(0)
    films = [rng.random((image, image), dtype=np.float32) for _ in range(batch)]
    thresholds = {name: np.array([0.0 if t in (on if on is not None else diseases) else 2.0
                                  for t in reader.targets], dtype=np.float32)
                  for name, on in SETTINGS.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    reported: dict[str, int] = {}
    names = list(SETTINGS)
    for k in range(calls + 1):  # the first round warms up and is not kept
        for name in (names if k % 2 == 0 else names[::-1]):
            reader.thresholds = thresholds[name]
            t0 = time.perf_counter()
            results = reader(films, batch_size=batch)
            t1 = time.perf_counter()
            reader.forward(films)
            t2 = time.perf_counter()
            reported[name] = len(results[0].findings)
            if k:
                times[name].append((t1 - t0, t2 - t1))
    return [{"engine": engine, "batch": batch, "calls": calls, "setting": name,
             "findings_per_film": reported[name],
             "ms_per_call": round(1e3 * statistics.median(t for t, _ in pairs), 2),
             "time_x_own_cnn": round(statistics.median(t / o for t, o in pairs), 4)}
            for name, pairs in times.items()]


def main(argv=None) -> int:
    import torch

    from cxr.atomic import write_atomic
    from cxr.metrics import markdown_table
    from inference import _engines, exported_run_for, reader_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # batch 1 by default: where the Reader's work after the CNN weighs most (32 takes ten times as long)
    reader_options(ap, [1], 30, "calls of each setting at batch 1 (a sixth of that at batch 32)")
    args = ap.parse_args(argv)
    engines = args.engines or _engines()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = exported_run_for(Path(tmp) / "grounded", engines)
        for batch in args.batches:
            for engine in engines:
                calls = args.calls if batch == 1 else max(3, args.calls // 6)
                for r in measure(run, engine, batch, calls, args.input):
                    results.append(r)
                    rows.append([engine, batch, r["setting"], r["findings_per_film"], r["ms_per_call"],
                                 r["time_x_own_cnn"]])
                    print(f"  {engine} batch {batch}, {r['setting']}: x own CNN {r['time_x_own_cnn']:.3f}",
                          flush=True)
    print(markdown_table(["engine", "batch", "film reports", "findings per film", "ms per call",
                          "time x own CNN"], rows, digits=3))
    if args.json:
        write_atomic(args.json, json.dumps({
            "benchmark": "findings_per_film", "cpu": cpu_name(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "run": "random densenet121, grounded annotator, diseases reported set by the thresholds",
            "image_input": args.input, "precision": "float32", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
