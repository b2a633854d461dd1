"""`cxr labels [REPORTS]`: print Shin et al.'s label space mined from Open-i reports.

REPORTS is NLMCXR_reports.tgz, a folder of report XML, or any `--data` spec (`phantom:OUT`);
without it the cached Open-i reports are used (fetched once when missing).

`cxr labels --audit RUN`: how well a run's labels mined from report text (`cxr train
--labels-from report`, RUN/mined_labels.jsonl) agree with the labels its source gave, on the
studies that have both: precision and recall per disease.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CxrError
from .cli import check_output, write_json
from .labels import MIN_COUNT, LabelSpace, Vocabulary, count_patterns


def configure(parser) -> None:
    parser.add_argument("reports", nargs="?", default=None,
                        help="NLMCXR_reports.tgz, a folder of XML, or a data spec "
                             "(default: the cached Open-i reports)")
    parser.add_argument("--min-count", type=int, default=MIN_COUNT,
                        help=f"images a pattern needs to become a label (default {MIN_COUNT})")
    parser.add_argument("--case-sensitive", action="store_true",
                        help="match headings as written, exactly like Shin et al.'s released file")
    parser.add_argument("--all", action="store_true", help="also list patterns below --min-count")
    parser.add_argument("--parts", action="store_true",
                        help="also print the words at each position of the MeSH terms, with their "
                             "word class (the evidence behind cxr.reports.mesh)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="write the label space, the pattern table and the vocabulary here")
    parser.add_argument("--audit", type=Path, default=None, metavar="RUN",
                        help="score a run's labels mined from reports against the source's own labels")


def _studies(spec: str | None):
    from ..sources import open_source

    if spec is None:
        return open_source("openi")
    if ":" in spec.split("/")[0] and not Path(spec).exists():
        return open_source(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise CxrError("reports not found", p)
    return open_source(("phantom:" if (p / "BBox_List_2017.csv").is_file() else "openi:") + str(p))


def run(args) -> int:
    if args.audit is not None:
        return _audit(args)
    if args.min_count < 1:
        raise CxrError(f"--min-count must be >= 1, got {args.min_count}")
    check_output(args.json)
    studies = _studies(args.reports)
    table = count_patterns(studies, case_sensitive=args.case_sensitive)
    space = LabelSpace.build(studies, args.min_count, case_sensitive=args.case_sensitive)
    vocab = Vocabulary.build(studies)
    n_images = sum(len(s.images) for s in studies)
    labelled = sum(n for n, _ in table.values())
    covered = sum(space.counts.values())
    rows = [(p, n, r) for p, (n, r) in table.items() if args.all or n >= args.min_count]
    width = max([len("pattern")] + [len(p) for p, _, _ in rows])
    print(f"{'pattern':<{width}}  {'images':>6}  {'reports':>7}  {'share':>6}")
    for p, n, r in rows:
        mark = "" if n >= args.min_count else "  (below --min-count)"
        print(f"{p:<{width}}  {n:>6}  {r:>7}  {n / max(labelled, 1):>6.1%}{mark}")
    print(f"\n{len(studies)} reports, {n_images} images; {labelled} images with a pattern "
          f"({n_images - labelled} dropped: no indexing or only a technical-quality remark); "
          f"{len(space)} labels (>= {args.min_count} images) cover {covered} images; "
          f"vocabulary {len(vocab)} tokens")
    if args.parts:
        _print_parts(studies)
    if args.json:
        out = {
            "label_space": space.to_dict(),
            "patterns": [{"pattern": p, "images": n, "reports": r} for p, (n, r) in table.items()],
            "vocabulary": vocab.to_dict(),
            "reports": len(studies), "images": n_images, "labelled_images": labelled,
        }
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


def _print_parts(studies) -> None:
    from .mesh import position_table, word_class

    terms = [f.raw or f.term for s in studies for f in s.findings]
    for i, words in enumerate(position_table(terms)):
        title = "heading" if i == 0 else f"part {i + 1}"
        print(f"\n{title}: {len(words)} distinct words, {sum(words.values())} occurrences")
        shown = list(words.items())[: 25 if i == 0 else 60]
        for word, n in shown:
            print(f"  {n:>6}  {word:<40} {'' if i == 0 else word_class(word) or 'UNKNOWN'}")
        if len(words) > len(shown):
            print(f"  ... {len(words) - len(shown)} more")


def _audit(args) -> int:
    from .report_labels import audit, read_records

    check_output(args.json)
    records = read_records(args.audit)
    result = audit(records)
    left_out = sum(1 for r in records if r.get("note"))
    print(f"{len(records)} studies mined ({left_out} left out: no usable report); "
          f"{result['studies']} have given labels too")
    if not result["studies"]:
        print("no study has both mined and given labels: nothing to compare")
    else:
        def pct(v):
            return "-" if v is None else f"{v:.3f}"

        width = max([len("disease")] + [len(d) for d in result["per_disease"]])
        print(f"{'disease':<{width}}  {'given':>5}  {'mined':>5}  {'agree':>5}  {'ignored':>7}  "
              f"{'precision':>9}  {'recall':>6}")
        for d, r in result["per_disease"].items():
            print(f"{d:<{width}}  {r['given']:>5}  {r['mined']:>5}  {r['agree']:>5}  {r['ignored']:>7}  "
                  f"{pct(r['precision']):>9}  {pct(r['recall']):>6}")
        m = result["micro"]
        print(f"{'micro':<{width}}  {'':>5}  {'':>5}  {'':>5}  {'':>7}  {pct(m['precision']):>9}  "
              f"{pct(m['recall']):>6}")
    if args.json:
        write_json(args.json, {"run": str(args.audit), "left_out": left_out, **result})
        print(f"wrote {args.json}")
    return 0
