"""What `cxr train --labels-from report` would learn from the real Open-i reports: the labels mined
from each report's text against its MeSH indexing, per Shin et al. label (pattern element), under
each uncertainty policy. No images needed: this is the labelling step alone.

    python benchmarks/report_labels_openi.py [--reports NLMCXR_reports.tgz] [--json benchmarks/results/report_labels_openi.json]

Scored on the reports the indexers labelled (not `No Indexing`), over the labels with >= 30 images
as `cxr labels` lists them (Shin's label space, `normal` included). An ignored uncertain label
counts as not mined (it is neither a positive nor a negative in training).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", default=None, help="NLMCXR_reports.tgz or a folder of XML (default: the cache)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "report_labels_openi.json")
    args = ap.parse_args()
    from cxr.atomic import write_atomic
    from cxr.reports.labels import MIN_COUNT, LabelSpace
    from cxr.reports.report_labels import POLICIES, audit, label_studies
    from cxr.sources import open_source

    studies = open_source(f"openi:{args.reports}" if args.reports else "openi")
    # single-element patterns of Shin's label space (normal included): the targets a run would have
    labels = [t for t in LabelSpace.build(studies, MIN_COUNT).targets if "|" not in t]
    out = {"benchmark": "report_labels_openi", "reports": len(studies), "labels": labels, "policies": {}}
    for policy in POLICIES:
        t0 = time.time()
        _, records = label_studies(studies, policy)
        result = audit(records, labels)
        uncertain = sum(1 for r in records if any(f["certainty"] == "uncertain" for f in r["findings"]))
        out["policies"][policy] = {
            "seconds": round(time.time() - t0, 1), "studies_scored": result["studies"],
            "left_out": sum(1 for r in records if r["note"]),
            "reports_with_an_uncertain_mention": uncertain,
            "micro": result["micro"], "per_label": result["per_disease"]}
    write_atomic(args.json, json.dumps(out, indent=1) + "\n")
    first = out["policies"]["ignore"]
    width = max(len(x) for x in labels)
    print(f"{out['reports']} reports, {first['studies_scored']} indexed with text; "
          f"{first['reports_with_an_uncertain_mention']} with an uncertain mention")
    print(f"{'label':<{width}}  {'given':>5}  " + "  ".join(f"{p + ' P/R':>17}" for p in POLICIES))
    for label in sorted(labels, key=lambda x: -first["per_label"].get(x, {}).get("given", 0)):
        cells = []
        for p in POLICIES:
            r = out["policies"][p]["per_label"].get(label, {})
            cells.append(f"{_f(r.get('precision'))}/{_f(r.get('recall'))}".rjust(17))
        print(f"{label:<{width}}  {first['per_label'].get(label, {}).get('given', 0):>5}  " + "  ".join(cells))
    print(f"{'micro':<{width}}  {'':>5}  " + "  ".join(
        f"{_f(out['policies'][p]['micro']['precision'])}/{_f(out['policies'][p]['micro']['recall'])}".rjust(17)
        for p in POLICIES))
    print(f"wrote {args.json}")
    return 0


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}".replace("0.", ".", 1)


if __name__ == "__main__":
    raise SystemExit(main())
