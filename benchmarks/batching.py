"""Is a batch of 32 read at least as fast per image as 32 films one at a time? Paired, in one process.

    python benchmarks/batching.py [--engines torch onnxruntime openvino] [--rounds 8] [--json OUT]

`inference.py` measures batch 1 and batch 32 in separate processes minutes apart, each batch-1
call on the same film; on this shared 2-core host the two have come out in either order from one
session to the next (ONNX Runtime's bare forward pass 8.94 against 9.66 images/s in one run,
11.82 against 9.36 in the next). Here one process per engine and annotator reads the same 32
distinct 1024-px films both ways in turn, round after round: 32 calls of one film, then one call
of 32 (the order swapped every other round). The ratio of the per-image times within a round
(batch 1 over batch 32: above 1 when batching is faster) puts whatever load the host carries at
that moment on both. The Reader's own forward pass alone is measured the same way with each CNN
call size in `--micro-batches` (`Reader.micro_batch`), the choice behind `Reader.CPU_MICRO_BATCH`.
The runs are `inference.py`'s random DenseNet-121 runs at 256-px input with every disease
detected (the worst case after the CNN), with the grounded and the global annotator.
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


def paired(one_at_a_time, all_at_once, films: int, rounds: int) -> dict:
    """`rounds` rounds (after one warm-up) of `one_at_a_time()` and `all_at_once()` in turn,
    each reading `films` films: images/s both ways and, per round, the ratio of their per-image
    times (batch 1 over batch 32)."""
    ones, batches = [], []
    for k in range(rounds + 1):
        for which in ("one", "batch") if k % 2 == 0 else ("batch", "one"):
            t0 = time.perf_counter()
            one_at_a_time() if which == "one" else all_at_once()
            if k:
                (ones if which == "one" else batches).append((time.perf_counter() - t0) / films)
    ratios = [o / b for o, b in zip(ones, batches)]
    return {"images_per_s_one_at_a_time": round(1 / statistics.median(ones), 3),
            "images_per_s_batched": round(1 / statistics.median(batches), 3),
            "batched_x_one_at_a_time": round(statistics.median(ratios), 4),
            "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
            "rounds_batched_faster": sum(r >= 1 for r in ratios), "rounds": rounds}


def measure(run: Path, engine: str, annotator: str, micro_batches: list[int], batch: int,
            rounds: int, image: int) -> list[dict]:
    """The Reader of `run` on `engine`: the whole Reader (its default CNN call size), then its
    forward pass alone with each CNN call size, batch 1 against batch `batch` paired."""
    import numpy as np

    from cxr.reader import Reader

    reader = Reader.load(run, device="cpu", gate=False, engine=engine)
    default = reader.micro_batch
    rng = np.random.default_rng(0)
    films = [rng.random((image, image), dtype=np.float32) for _ in range(batch)]
    out = [{"engine": engine, "annotator": annotator, "what": "Reader", "micro_batch": default,
            **paired(lambda: [reader(f) for f in films], lambda: reader(films, batch_size=batch),
                     batch, rounds)}]
    for m in micro_batches:
        reader.micro_batch = m
        out.append({"engine": engine, "annotator": annotator, "what": "Reader.forward alone",
                    "micro_batch": m,
                    **paired(lambda: [reader.forward([f]) for f in films], lambda: reader.forward(films),
                             batch, rounds)})
    reader.micro_batch = default
    return out


def main(argv=None) -> int:
    import torch

    from cxr.atomic import write_atomic
    from cxr.metrics import markdown_table
    from inference import _engines, exported_run_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=None, help="default: torch and those installed")
    ap.add_argument("--annotators", nargs="+", default=["grounded", "global"])
    ap.add_argument("--micro-batches", type=int, nargs="*", default=[1, 8],
                    help="CNN call sizes for the forward pass alone (none: the Reader only)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--input", type=int, default=1024, help="side of the films")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    engines = args.engines or _engines()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for annotator in args.annotators:
            run = exported_run_for(Path(tmp) / annotator, engines, annotator)
            for engine in engines:
                # the forward pass alone does not depend on the annotator: measured once per engine
                sizes = args.micro_batches if annotator == args.annotators[0] else []
                for r in measure(run, engine, annotator, sizes, args.batch, args.rounds, args.input):
                    results.append(r)
                    print(f"  {engine}, {annotator}, {r['what']} (CNN calls of {r['micro_batch']}): "
                          f"batch {args.batch} x batch 1 per image {r['batched_x_one_at_a_time']:.3f}", flush=True)
    rows = [[r["what"] if r["what"] != "Reader" else f"Reader, {r['annotator']} annotator", r["engine"],
             r["micro_batch"], r["images_per_s_one_at_a_time"], r["images_per_s_batched"], r["batched_x_one_at_a_time"],
             f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}", f"{r['rounds_batched_faster']}/{r['rounds']}"]
            for r in results]
    print(markdown_table(["what", "engine", "CNN calls of", "images/s, batch 1", f"batch {args.batch}",
                          f"per image, batch {args.batch} x batch 1", "rounds' range", f"rounds batch {args.batch} faster"],
                         rows, digits=3))
    if args.json:
        write_atomic(args.json, json.dumps({
            "benchmark": "batching", "cpu": cpu_name(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "run": "random densenet121, 256-px input, every disease detected",
            "image_input": args.input, "batch": args.batch, "precision": "float32",
            "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
