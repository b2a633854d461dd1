"""`cxr evaluate RUN [--data SOURCE[:PATH]] [--split test] [--out DIR]`: how good is a trained run?

Writes RUN/eval/metrics.json and metrics.md (also printed); what is measured and how is
`cxr.evaluation`, which this command only calls.
"""
from __future__ import annotations

from ..errors import CxrError
from ..evaluation import SPLITS, evaluate_run, metrics_markdown


def configure(parser) -> None:
    parser.add_argument("run", help="a trained run directory (cxr train --out RUN)")
    parser.add_argument("--data", help="SOURCE[:PATH] to evaluate on (default: the run's own data; "
                        "patients the run never saw count as test)")
    parser.add_argument("--split", default="test", choices=(*SPLITS, "all"),
                        help="which patients to score (default: test)")
    parser.add_argument("--out", help="folder for metrics.json and metrics.md (default: RUN/eval)")
    parser.add_argument("--bleu-splits", default="train,val,test",
                        help="comma-separated splits to compute BLEU on (default: train,val,test)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1, help="beam width of the annotator (1: greedy)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    parser.add_argument("--max-images", type=int, help="score at most this many images per split")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    bleu_splits = tuple(s.strip() for s in args.bleu_splits.split(",") if s.strip())
    bad = [s for s in bleu_splits if s not in SPLITS]
    if bad:
        raise CxrError(f"--bleu-splits: unknown split(s) {', '.join(bad)}; use train,val,test")
    result = evaluate_run(args.run, data=args.data, split=args.split, out=args.out,
                          bleu_splits=bleu_splits, batch_size=args.batch_size, beams=args.beams,
                          device=args.device, max_images=args.max_images, progress=not args.quiet)
    print(metrics_markdown(result))
    return 0
