"""Open-i views from the DICOM header: the evidence behind each rule of `cxr/sources/openi_views.py`
and what the rules decide, measured on the public metadata (`nlmcxr_dicom_metadata.csv.gz`).

    python benchmarks/openi_views.py [--data DIR] [--json benchmarks/results/openi_views.json]

Prints a table; `--json` writes every figure. Metadata only (the images are not needed); seconds.
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def evidence(rows: list[dict]) -> dict:
    """The measurements each rule rests on."""
    from cxr.sources.openi_views import FRONTAL_POSITIONS, LATERAL_POSITIONS, Header

    by_report = collections.defaultdict(list)
    for r in rows:
        by_report[r["imageid"].split("_")[0]].append(r)

    def series(r):
        try:
            return int(r.get("Series Number") or 0)
        except ValueError:
            return 0

    code = lambda r: (r.get("Acquisition Device Processing Code") or "").strip()  # noqa: E731
    pairs = later = 0
    for group in by_report.values():
        codes = sorted(code(r) for r in group)
        if len(group) == 2 and codes == ["60003", "60025"] and series(group[0]) != series(group[1]):
            pairs += 1
            later += code(max(group, key=series)) == "60003"
    portrait = {c: [int(r["Rows"]) > int(r["Columns"]) for r in rows if code(r) == c]
                for c in ("60003", "60025")}
    # empty View Position: is a processing code the higher or the lower exposure of its report?
    high_low = collections.Counter()
    for group in by_report.values():
        heads = [Header.from_row(r) for r in group]
        if len(group) < 2 or any(h.exposure is None for h in heads) or any(h.position for h in heads):
            continue
        top = max(range(len(group)), key=lambda i: heads[i].exposure)
        for i, r in enumerate(group):
            high_low[(code(r), "high" if i == top else "low")] += 1
    # labelled frontal + lateral pairs with exposures: is the higher exposure the lateral?
    right = wrong = 0
    ratios = []
    for group in by_report.values():
        heads = [Header.from_row(r) for r in group]
        kinds = ["frontal" if h.position in FRONTAL_POSITIONS else
                 "lateral" if h.position in LATERAL_POSITIONS else None for h in heads]
        if len(group) != 2 or sorted(map(str, kinds)) != ["frontal", "lateral"] or \
                any(h.exposure is None for h in heads):
            continue
        top = max((0, 1), key=lambda i: heads[i].exposure)
        right += kinds[top] == "lateral"
        wrong += kinds[top] != "lateral"
        lat, front = (heads[0], heads[1]) if kinds[0] == "lateral" else (heads[1], heads[0])
        ratios.append(lat.exposure / front.exposure)
    codes_12 = sum(high_low[(c, "low")] for c in ("1", "2"))
    codes_34 = sum(high_low[(c, "high")] for c in ("3", "4"))
    return {
        "images": len(rows),
        "empty_view_position": sum(not (r.get("View Position") or "").strip() for r in rows),
        "code_60003_60025_reports": pairs, "code_60003_later_series": later,
        "code_60003_portrait": int(sum(portrait["60003"])), "code_60003_images": len(portrait["60003"]),
        "code_60025_landscape_share": round(1 - float(np.mean(portrait["60025"])), 3),
        "codes_1_2_lower_exposure": codes_12,
        "codes_1_2_in_pairs": sum(high_low[(c, k)] for c in ("1", "2") for k in ("high", "low")),
        "codes_3_4_higher_exposure": codes_34,
        "codes_3_4_in_pairs": sum(high_low[(c, k)] for c in ("3", "4") for k in ("high", "low")),
        "labelled_pairs_higher_exposure_is_lateral": right, "labelled_pairs": right + wrong,
        "lateral_to_frontal_exposure_ratio_p5": round(float(np.percentile(ratios, 5)), 2),
        "lateral_to_frontal_exposure_ratio_median": round(float(np.median(ratios)), 2),
    }


def outcome(reports: Path, metadata: Path) -> dict:
    """What the adapter decides, and how the rules do where View Position is hidden."""
    from cxr.sources.openi import read_headers, read_openi
    from cxr.sources.openi_views import agreement_when_hidden

    studies = read_openi(reports, metadata=metadata, gate=False)
    images = [im for s in studies for im in s.images]
    decided = collections.Counter((im.view, im.meta["view_class"]) for im in images)
    empty = [im for im in images if im.view is None]
    agree, disagree = agreement_when_hidden(studies, read_headers(metadata))
    return {
        "report_images": len(images),
        "pa_tagged_lateral": decided[("PA", "lateral")],
        "pa_tagged_frontal": decided[("PA", "frontal")],
        "empty_view_images": len(empty),
        "empty_decided_lateral": sum(im.meta["view_class"] == "lateral" for im in empty),
        "empty_decided_frontal": sum(im.meta["view_class"] == "frontal" for im in empty),
        "empty_undecided": sum(im.meta["view_class"] is None for im in empty),
        "frontal_images": sum(im.frontal for im in images),
        "hidden_view_agree": agree, "hidden_view_decided": agree + disagree,
        "hidden_view_agreement": round(agree / max(agree + disagree, 1), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="data root holding openi/ "
                    "(default: the cxr data cache)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from cxr.data import data_dir

    root = args.data or data_dir()
    reports = root / "openi" / "NLMCXR_reports.tgz"
    metadata = root / "openi" / "nlmcxr_dicom_metadata.csv.gz"
    result = {"evidence": evidence(_rows(metadata)), "outcome": outcome(reports, metadata)}
    for part, figures in result.items():
        print(f"\n{part}")
        for k, v in figures.items():
            print(f"  {k:<45} {v}")
    if args.json:
        from cxr.atomic import write_atomic

        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
