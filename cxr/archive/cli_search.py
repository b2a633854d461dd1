"""`cxr search`: find indexed images by finding ("opacity left base" --severity moderate), by
their report's words (--report "small effusion"), where report and model disagree
(--disagree report-only|model-only), or by likeness to an image (--like chest.dcm, --like-id 42)."""
from __future__ import annotations

import argparse
import json

from ..errors import CxrError
from .db import DEFAULT_URL


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", default=None,
                        help='words describing one finding, e.g. "opacity left base"')
    parser.add_argument("--db", default=DEFAULT_URL, help=f"database URL (default {DEFAULT_URL})")
    parser.add_argument("--finding", help="disease name (case-insensitive), e.g. Opacity")
    parser.add_argument("--side", choices=["left", "right", "bilateral"])
    parser.add_argument("--location", help="site word, e.g. base, upper lobe, hilum")
    parser.add_argument("--severity", help="mild, moderate, severe, small, large, ...")
    parser.add_argument("--min-score", type=float, help="the finding's score at least this")
    parser.add_argument("--and", dest="also", action="append", default=[], metavar="TEXT",
                        help='another finding the image must also have, e.g. "effusion right"')
    parser.add_argument("--score", action="append", default=[], metavar="TARGET>=X",
                        help="any target's score at least X, asserted or not (repeatable)")
    parser.add_argument("--report", metavar="WORDS",
                        help="words the study's report must contain (full-text, stemmed)")
    parser.add_argument("--disagree", choices=["report-only", "model-only"],
                        help="report-only: the report asserts a finding the model did not flag; "
                        "model-only: the model flagged one the report does not assert "
                        "(with --finding: that finding only)")
    parser.add_argument("--like", metavar="IMAGE", help="images similar to this file")
    parser.add_argument("--like-id", type=int, metavar="ID", help="images similar to indexed ID")
    parser.add_argument("--run", help="trained run that embeds the --like image (default: the "
                        "run that indexed the archive)")
    parser.add_argument("--model", help="only results of this model id")
    parser.add_argument("--failed", action="store_true", help="list images that failed to index")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--vector-dir", default=None, help="where the similar-image index lives")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def _scores(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        target, sep, value = item.partition(">=")
        try:
            out[target.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not target.strip():
            raise CxrError(f"--score wants TARGET>=NUMBER, got {item!r}")
    return out


def _indexing_run(archive) -> str:
    """The run folder that indexed the archive, when there is exactly one and it still exists."""
    from pathlib import Path

    runs = {m: r for m, r in archive.known_runs().items() if Path(r).exists()}
    if len(runs) == 1:
        return next(iter(runs.values()))
    if not runs:
        raise CxrError("--like IMAGE needs --run RUN: the run that indexed this archive is "
                       "not known or no longer exists")
    raise CxrError(f"several runs indexed this archive ({', '.join(sorted(runs))}): "
                   "choose one with --run")


def run(args: argparse.Namespace) -> int:
    from .db import Archive

    if args.limit < 1:
        raise CxrError("--limit must be at least 1")
    with Archive(args.db, vector_dir=args.vector_dir, create=False) as archive:
        if args.like or args.like_id is not None:
            filters = dict(report=args.report, disagree=args.disagree,
                           disagree_finding=args.finding if args.disagree else None)
            if args.like and args.like_id is not None:
                raise CxrError("give --like or --like-id, not both")
            if args.like:
                from ..images import read_image
                from ..reader import Reader

                reader = Reader.load(args.run or _indexing_run(archive))
                embedding = reader.embed([read_image(args.like).pixels])[0]
                hits = archive.similar(embedding=embedding, model_id=reader.model_id, k=args.limit,
                                       **filters)
            else:
                hits = archive.similar(image_id=args.like_id, k=args.limit, **filters)
            described = f"like {args.like or '#' + str(args.like_id)}"
        else:
            finding = None if args.disagree else args.finding
            hits = archive.search(args.query, finding=finding, side=args.side,
                                  location=args.location, severity=args.severity,
                                  min_score=args.min_score, also=args.also,
                                  scores=_scores(args.score), model_id=args.model,
                                  status="failed" if args.failed else "ok",
                                  report=args.report, disagree=args.disagree,
                                  disagree_finding=args.finding if args.disagree else None,
                                  limit=args.limit, offset=args.offset)
            described = args.query or (f"report {args.report!r}" if args.report else "query")
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
        return 0
    if not hits:
        print(f"no images match {described}")
        return 0
    for h in hits:
        key = (f"distance {h.distance:.3f}" if h.distance is not None
               else f"score {h.score:.2f}" if h.score is not None else h.status)
        print(f"#{h.id}  {h.path}  ({key})")
        if h.status != "ok":
            print(f"    failed: {h.reason}")
        if h.report:
            print(f"    report: {h.report[:200]}" + ("..." if len(h.report) > 200 else ""))
        if h.report_note:
            print(f"    report note: {h.report_note}")
        said = sorted({f["disease"] for f in h.report_findings if f["certainty"] == "positive"})
        if said:
            print(f"    report asserts: {', '.join(said)}")
        for f in h.findings:
            where = " ".join(p for p in (f.side, *f.location) if p)
            print(f"    {f.score:.2f}  {f.disease}" + (f" [{where}]" if where else "")
                  + (f" {f.severity}" if f.severity else "")
                  + (f"  \"{f.annotation}\"" if f.annotation else "")
                  + (f"  {len(f.boxes)} box(es)" if f.boxes else ""))
    return 0
