"""`cxr check FILE...`: the quality gate alone, no trained run needed.

One line per file: `FILE: ok: frontal (p 0.98)[; what would be turned back]` or
`FILE: not read: <reason>`, then the network's most likely answer on each head with its
probability (when it ran); with --json, every report (probabilities of every value of every
head, the cheap checks). Exit status 1 when any file is refused or cannot be read, so scripts can filter an
archive before reading it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..atomic import write_atomic


def configure(parser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders (PNG, JPEG, DICOM)")
    parser.add_argument("--json", type=Path, help="write the reports here (`-` for stdout)")
    parser.add_argument("--views", default="frontal", choices=("frontal", "lateral", "all"),
                        help="views the reading would accept (default frontal, today's runs)")
    parser.add_argument("--gate", type=Path, default=None,
                        help="gate model weights (default: the ones shipped with cxr)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=32)


def run(args) -> int:
    from ..errors import CxrError
    from ..images import read_image
    from ..quality.gate import QualityGate
    from .annotate import expand

    if args.batch_size < 1:
        raise CxrError("--batch-size must be at least 1")
    files = expand(args.images)
    if not files:
        raise CxrError("no image files given")
    views = ("frontal", "lateral") if args.views == "all" else (args.views,)
    gate = QualityGate.load(args.gate, device=args.device, read_views=views)
    to_stdout = args.json is not None and str(args.json) == "-"
    out = sys.stderr if to_stdout else sys.stdout
    entries, refused = [], 0
    for s in range(0, len(files), args.batch_size):
        chunk, problems = files[s:s + args.batch_size], {}
        loaded = {}
        for f in chunk:
            try:
                loaded[f] = read_image(f)
            except CxrError as exc:
                problems[f] = exc.problem
        reports = dict(zip(loaded, gate.check(list(loaded.values())) if loaded else []))
        for f in chunk:  # in the order given
            if f in problems:
                refused += 1
                print(f"{f}: cannot read: {problems[f]}", file=out)
                entries.append({"path": str(f), "accepted": False, "error": problems[f]})
                continue
            report = reports[f]
            refused += not report.accepted
            print(f"{f}: {report.summary()}{_heads(report)}", file=out)
            entries.append({"path": str(f), **report.to_dict()})
    if args.json is not None:
        text = json.dumps(entries, indent=1)
        if to_stdout:
            print(text)
        else:
            write_atomic(args.json, text + "\n")
    return 1 if refused else 0


def _heads(report) -> str:
    """The network's answer on every head, most likely value and its probability (nothing when
    a cheap check refused the image before the network ran)."""
    if not report.probabilities:
        return ""
    tops = [f"{head} {max(p, key=p.get)} {max(p.values()):.2f}" for head, p in report.probabilities.items()]
    return f"  [{', '.join(tops)}]"
