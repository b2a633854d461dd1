"""What the Reader's changes after its CNN cost (the grounded annotator's decoding, the anatomy
network's input): the Reader in two settings, in one process, call after call.

    python benchmarks/decoding.py [--compare drop_ended|onnx_decoding|organs_from_square]
        [--reports DISEASE ...] [--engines ...] [--json OUT]

`--compare drop_ended` (the default): a finding dropped from the batch once it has written <end>
(`GroundedAnnotator.drop_ended`, the default) against every finding decoded to the last step.
`--compare onnx_decoding`: the annotator's regions and per-word step run as ONNX Runtime graphs
(`Reader.onnx_decoding`, the default on a CPU where ONNX Runtime is installed) against PyTorch;
with `--annotator global`, the global annotator's GRU step (`cxr.models.annotator_onnx`).
Whatever the engine that runs the CNN, the setting changes only the words' part.
`--compare organs_from_square`: the anatomy network reads the CNN's 256-px square of the film
(`Reader.organs_from_square`, the default) against the 1024-px film, which it then resizes
itself; with `--reports Cardiomegaly` the anatomy network, not the words, is the longer part
after the CNN.

The run is `benchmarks/inference.py`'s random DenseNet-121 with the grounded annotator (or, with
`--annotator global`, Shin et al.'s global one, for `organs_from_square` and `onnx_decoding`) and every
disease detected (seven findings per film: the worst case; its random annotator writes one to
four words per finding, so findings end at different steps), reading 1024-px float32 films at
batch 1. For each engine the two settings alternate call by call, and each call is followed by
the Reader's own forward pass alone: the ratio of a call to that forward pass is taken call by
call (the shared machine's load falls on both), and its median is reported, with the median time
per call. `--rounds` repeats the whole measurement (engines in turn), so that its spread shows.
Both settings of each comparison write the same words (`tests/test_grounded.py`,
`tests/test_reader_speed.py`).
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


#: per comparison: the two settings' names in the JSON (on, off) and what sets one on a Reader
COMPARISONS = {
    "drop_ended": (("dropped", "kept"), lambda reader, on: setattr(reader.ground, "drop_ended", on)),
    "onnx_decoding": (("onnx_runtime", "torch"), lambda reader, on: setattr(reader, "onnx_decoding", on)),
    "organs_from_square": (("square", "film"), lambda reader, on: setattr(reader, "organs_from_square", on)),
}


def measure(run: Path, engine: str, batch: int, calls: int, image: int, compare: str = "drop_ended",
            reports: list[str] | None = None) -> dict:
    """Median ms per call and time over the own forward pass, in the comparison's two settings.
    `reports`: the diseases every film reports (the Reader's thresholds), else every one."""
    import numpy as np
    import torch

    from inference import two_settings

    (on, off), change = COMPARISONS[compare]

    def apply(reader, setting):
        if reports is not None:
            reader.thresholds = np.array([0.0 if t in reports else 2.0 for t in reader.targets], np.float32)
        change(reader, setting)

    first, got = two_settings(run, engine, batch, calls, image, apply)
    out = {"engine": engine, "batch": batch, "calls": calls, "torch_threads": torch.get_num_threads(),
           "words_per_finding": [len(f.annotation.split()) for f in first[0].findings],
           on: got[True], off: got[False]}
    out["time_x_own_cnn_change"] = round(out[on]["time_x_own_cnn"] - out[off]["time_x_own_cnn"], 4)
    return out


def same_reading(demo: Path) -> dict:
    """A finished demo's validation and test films read at batch 32 with the decoding graphs and
    with PyTorch's: how many findings got the same words, boxes and confidences."""
    import numpy as np

    from cxr.reader import Reader
    from demo_errors import finished_demo

    run, ed, test_idx = finished_demo(demo, "decoding")
    films = [ed.prep.paths[i] for i in np.concatenate([ed.indices("val"), test_idx])]
    reader = Reader.load(run, device="cpu", gate=False)
    read = {}
    for setting in (True, False):
        reader.onnx_decoding = setting
        read[setting] = reader(films, batch_size=32, heatmaps=False)
    pairs = [(a, b) for x, y in zip(read[True], read[False]) for a, b in zip(x.findings, y.findings)]
    assert all(len(x.findings) == len(y.findings) for x, y in zip(read[True], read[False]))
    return {"films": len(films), "findings": len(pairs),
            "same_words": sum(a.annotation == b.annotation for a, b in pairs),
            "same_boxes": sum(a.boxes == b.boxes for a, b in pairs),
            "confidence_max_difference": max((abs(a.confidence[k] - b.confidence[k]) for a, b in pairs
                                              for k in a.confidence), default=0.0)}


def words_alone(run: Path, calls: int = 400) -> dict:
    """The words alone, both ways: the Reader's annotator writing every target of the run (one
    film's features, from its CNN) on one thread, as the Reader does after its CNN, with the
    ONNX Runtime graphs and with PyTorch in turn, `calls` times each: median ms per call, and
    whether the two wrote the same words. The whole Reader's time (above) carries the CNN's and
    the host's noise; this is the part the setting changes."""
    import statistics
    import time

    import numpy as np
    import torch

    from cxr.reader import Reader

    reader = Reader.load(run, device="cpu", gate=False, engine="torch")
    maps, _, emb = reader.forward([np.random.default_rng(0).random((1024, 1024), dtype=np.float32)])
    labels = torch.arange(len(reader.targets))
    rows = [0] * len(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times, words = {True: [], False: []}, {}
    for k in range(calls + 10):
        for on in (True, False) if k % 2 == 0 else (False, True):
            reader.onnx_decoding = on
            t0 = time.perf_counter()
            words[on] = reader._ground(rows, labels.tolist(), maps)["tokens"] if reader.ground is not None \
                else reader.annotate(emb[rows], labels)  # as the Reader: an image's regions made once
            if k >= 10:
                times[on].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {"findings": len(labels), "calls": calls, "same_words": words[True] == words[False],
            "words_per_finding": [len(w) for w in words[True]],
            "ms_onnx_runtime": round(1e3 * statistics.median(times[True]), 3),
            "ms_torch": round(1e3 * statistics.median(times[False]), 3),
            "onnx_runtime_x_torch": round(statistics.median(times[True]) / statistics.median(times[False]), 3)}


def hidden_product(items: int = 7, hidden: int = 512, repeats: int = 2000) -> dict:
    """Microseconds of the GRU's hidden product of `items` findings (items x hidden by hidden x
    3 hidden, plus its bias) on one thread, eager PyTorch against ONNX Runtime, same run."""
    import io
    import time
    import warnings

    import torch

    from cxr.engines import OPSET, ort_session

    torch.manual_seed(0)
    layer, h = torch.nn.Linear(hidden, 3 * hidden).eval(), torch.randn(items, hidden)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (h,), buf, input_names=["h"], output_names=["g"], opset_version=OPSET, dynamo=False)
    session, feed = ort_session(buf.getvalue(), 1), {"h": h.numpy()}

    def each(call) -> float:
        for _ in range(50):
            call()
        t0 = time.perf_counter()
        for _ in range(repeats):
            call()
        return round((time.perf_counter() - t0) / repeats * 1e6, 1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        out = {"items": items, "hidden": hidden, "torch_us": each(lambda: layer(h)),
               "onnx_runtime_us": each(lambda: session.run(None, feed))}
    torch.set_num_threads(threads)
    out["torch_x_onnx_runtime"] = round(out["torch_us"] / out["onnx_runtime_us"], 2)
    return out


def main(argv=None) -> int:
    import torch

    from cxr.atomic import write_atomic
    from cxr.metrics import markdown_table
    from inference import _engines, exported_run_for, reader_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reader_options(ap, [1], 40, "calls of each setting")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="drop_ended")
    ap.add_argument("--annotator", choices=("grounded", "global"), default="grounded",
                    help="the random run's annotator (global: Shin et al.'s, its words short)")
    ap.add_argument("--reports", nargs="+", metavar="DISEASE", help="the diseases every film reports "
                    "(default: every one, the worst case), e.g. Cardiomegaly")
    ap.add_argument("--demo", type=Path, help="with --compare onnx_decoding: a finished `cxr demo --out DIR` "
                    "whose validation and test films are read both ways (the same words?)")
    args = ap.parse_args(argv)
    if args.annotator == "global" and args.compare == "drop_ended":
        ap.error(f"--compare {args.compare} changes the grounded annotator: not with --annotator global")
    engines = args.engines or _engines()
    (on, off), _ = COMPARISONS[args.compare]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = exported_run_for(Path(tmp) / args.annotator, engines, args.annotator)
        for round_ in range(1, args.rounds + 1):
            for batch in args.batches:
                for engine in engines:
                    r = {"round": round_, **measure(run, engine, batch, args.calls, args.input, args.compare,
                                                        args.reports)}
                    results.append(r)
                    rows.append([engine, round_, batch, args.calls, r[off]["ms_per_call"], r[on]["ms_per_call"],
                                 r[off]["time_x_own_cnn"], r[on]["time_x_own_cnn"]])
                    print(f"  round {round_}, {engine} batch {batch}: x own CNN "
                          f"{r[off]['time_x_own_cnn']:.3f} {off}, {r[on]['time_x_own_cnn']:.3f} {on}", flush=True)
        extra = {"words_alone": words_alone(run)} if args.compare == "onnx_decoding" else {}
    print(markdown_table(["engine", "round", "batch", "calls each", f"ms per call, {off}", on,
                          f"time x own CNN, {off}", on], rows, digits=3))
    if args.compare == "onnx_decoding":
        print("  the words alone, one thread:", extra["words_alone"])
        extra["hidden_product"] = hidden_product()
        print("  the GRU's hidden product of 7 findings, one thread:", extra["hidden_product"])
        if args.demo:
            extra["demo"] = same_reading(args.demo)
            print("  the demo's validation and test films read both ways:", extra["demo"])
    if args.json:
        write_atomic(args.json, json.dumps({
            "benchmark": "decoding", "compare": args.compare, "cpu": cpu_name(), "torch": torch.__version__,
            "run": f"random densenet121, {args.annotator} annotator, "
                   + (f"every film reports {', '.join(args.reports)}" if args.reports else "every disease detected"),
            "image_input": args.input, "precision": "float32", "results": results, **extra}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
