"""`cxr mine [REPORTS] --json OUT`: findings per report from the MeSH terms and the free text.

REPORTS is Open-i's NLMCXR_reports.tgz or a folder of its XML files (the default is the cached
copy, fetched once when missing). For every report the JSON holds the MeSH findings
(`cxr.reports.mesh`) and the text findings (`cxr.reports.text.TextMiner`: disease, certainty,
organ, location, side, severity and the sentence), so other tools can score or reuse them. The
printed table compares the two per ChestX-ray14 label: how often the text agrees with the MeSH.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CxrError
from ..metrics import markdown_table, precision_recall_f1

OPENI_REPORTS = "openi/NLMCXR_reports.tgz"


def configure(parser) -> None:
    parser.add_argument("reports", nargs="?", default=None,
                        help="NLMCXR_reports.tgz or a folder of Open-i XML "
                             "(default: the cached Open-i reports)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="write the findings of every report here")
    parser.add_argument("--rules", type=Path, default=None,
                        help="a text-mining vocabulary JSON to use instead of the bundled one "
                             "(same layout as cxr/reports/text_rules.json)")
    parser.add_argument("--sections", nargs="+", default=["FINDINGS", "IMPRESSION"],
                        help="report sections to mine (default: FINDINGS IMPRESSION)")
    parser.add_argument("--limit", type=int, default=None, help="mine only the first N reports")
    parser.add_argument("--text", default=None, metavar="REPORT_TEXT",
                        help="mine this text instead of a report collection and print its "
                             "findings, e.g. --text 'Small left effusion. No pneumothorax.'")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _reports_path(arg: str | None) -> Path:
    from ..fetch import locate

    if arg is None:
        return locate(OPENI_REPORTS)
    path = Path(arg).expanduser()
    if not path.exists():
        raise CxrError("reports not found (expected NLMCXR_reports.tgz or a folder of Open-i "
                       "XML files)", path)
    return path


def mine_studies(studies, miner, progress: bool = True) -> list[dict]:
    """One record per study: id, its report sections, MeSH findings and text findings."""
    from tqdm import tqdm

    texts = miner.mine_many([s.report for s in studies])
    out = []
    for study, found in tqdm(zip(studies, texts), total=len(studies), unit="report",
                             desc="mining", disable=not progress):
        out.append({
            "id": study.id,
            "report": {k: study.report.get(k, "") for k in miner.sections},
            "indexed": study.meta.get("indexed", True),
            "mesh": [f.to_dict() for f in study.findings],
            "text": [f.to_dict() for f in found],
        })
    return out


def summary_table(records: list[dict]) -> str:
    """Per label: reports MeSH marks, reports the text asserts, and agreement P/R/F1."""
    from ..records import Finding
    from .text import OPENI_EVAL_LABELS, report_labels

    gold = [report_labels(Finding.from_dict(d) for d in r["mesh"]) for r in records]
    pred = [report_labels(Finding.from_dict(d) for d in r["text"]) for r in records]
    scores = precision_recall_f1(gold, pred, OPENI_EVAL_LABELS)
    rows = []
    for lab in OPENI_EVAL_LABELS:
        v = scores["per_label"][lab]
        rows.append([lab, v["tp"] + v["fn"], v["tp"] + v["fp"], v["tp"], v["precision"],
                     v["recall"], v["f1"]])
    m = scores["micro"]
    rows.append(["micro average", m["tp"] + m["fn"], m["tp"] + m["fp"], m["tp"], m["precision"],
                 m["recall"], m["f1"]])
    return markdown_table(["label", "MeSH", "text", "both", "P", "R", "F1"], rows)


def check_output(path: Path | None) -> None:
    """Refuse an unusable --json before the work, not after it."""
    if path is not None and path.is_dir():
        raise CxrError("is a folder: --json needs a file name", path)


def write_json(path: Path, payload: dict) -> None:
    """Write next to the target, then rename: an interrupted run never leaves half a file."""
    from ..atomic import write_atomic

    try:
        write_atomic(path, json.dumps(payload, indent=1).encode())
    except OSError as exc:
        raise CxrError(f"cannot write output: {exc.strerror or exc}", path) from exc


def findings_table(findings) -> str:
    rows = [[f.disease, f.certainty, f.side or "", ", ".join(f.location), f.severity or "",
             f.sentence or ""] for f in findings]
    return markdown_table(["disease", "certainty", "side", "location", "severity", "sentence"],
                          rows)


def run(args) -> int:
    from ..sources.openi import read_openi
    from .text import TextMiner

    check_output(args.json)
    if args.limit is not None and args.limit < 1:
        raise CxrError(f"--limit must be at least 1, not {args.limit}")
    if args.text is not None:
        miner = TextMiner(rules=args.rules, sections=args.sections)
        findings = miner.mine(args.text)
        print(findings_table(findings))
        if args.json is not None:
            write_json(args.json, {"text": args.text,
                                    "findings": [f.to_dict() for f in findings]})
        return 0
    path = _reports_path(args.reports)
    studies = read_openi(path)
    if args.limit is not None:
        studies = studies[: args.limit]
    miner = TextMiner(rules=args.rules, sections=args.sections)
    records = mine_studies(studies, miner, progress=not args.quiet)
    print(f"{len(records):,} reports from {path}: text findings against the MeSH indexing\n")
    print(summary_table(records))
    if args.json is not None:
        write_json(args.json, {"source": str(path), "sections": list(miner.sections),
                                "n_reports": len(records),
                                "reports": {r.pop("id"): r for r in records}})
        print(f"\nwrote {args.json}")
    return 0
