"""Shin et al. 2016's label space rebuilt from the Open-i XML (`cxr labels`), counted, and compared
image for image with the released `openi.mesh.top`: the README's label-space figures.

    python benchmarks/labels.py [--reports NLMCXR_reports.tgz] [--released openi.mesh.top] [--json OUT]

Both of cxr's readings are compared: headings as written (Shin's rule, `case_sensitive`) and
headings case- and whitespace-folded (cxr's default).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.errors import CxrError  # noqa: E402
from cxr.fetch import locate  # noqa: E402
from cxr.reports.labels import LabelSpace, count_patterns, study_pattern  # noqa: E402
from cxr.sources.openi import read_openi  # noqa: E402

MIN_IMAGES = 30  # Shin et al.: patterns with at least 30 images are labels


def read_released(path: Path) -> dict[str, str]:
    """image id -> pattern string, from `/imgs/512/<a>/<b>/<id>.png|term|term...` lines."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split("|")
        out["CXR" + parts[0].rsplit("/", 1)[1][: -len(".png")]] = "|".join(parts[1:])
    return out


def compare(studies, released: dict[str, str], case_sensitive: bool) -> dict:
    """Images whose pattern, or whose label (a pattern with >= MIN_IMAGES images), differs."""
    space = LabelSpace.build(studies, MIN_IMAGES, case_sensitive=case_sensitive)
    labels = {p for p, n in _counts(released.values()).items() if n >= MIN_IMAGES}
    pattern_diff, label_diff = [], []
    for s in studies:
        ours = study_pattern(s, case_sensitive=case_sensitive)
        row = space.labels_of(s)
        our_label = space.targets[int(row.argmax())] if row.any() else None
        for im in s.images:
            theirs = released.get(im.id)
            if ours != theirs:
                pattern_diff.append(im.id)
            if our_label != (theirs if theirs in labels else None):
                label_diff.append(im.id)
    return {"images_with_another_pattern": len(pattern_diff),
            "images_with_another_label": len(label_diff),
            "reports_with_another_pattern": sorted({i.split("_")[0] for i in pattern_diff}),
            "images_with_another_label_ids": label_diff}


def _counts(patterns) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in patterns:
        out[p] = out.get(p, 0) + 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", help="NLMCXR_reports.tgz (default: the data cache)")
    ap.add_argument("--released", help="Shin et al.'s openi.mesh.top (default: the data cache)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    studies = read_openi(locate("openi/NLMCXR_reports.tgz", args.reports))
    table = count_patterns(studies)
    images = sum(len(s.images) for s in studies)
    labelled = sum(n for n, _ in table.values())
    folded = LabelSpace.build(studies, MIN_IMAGES)
    exact = LabelSpace.build(studies, MIN_IMAGES, case_sensitive=True)
    out = {"benchmark": "labels", "min_images": MIN_IMAGES, "reports": len(studies), "images": images,
           "labelled_images": labelled, "dropped_images": images - labelled,
           "normal_images": folded.counts["normal"], "normal_share": folded.counts["normal"] / labelled,
           "labels": len(folded), "counts": folded.counts, "counts_case_sensitive": exact.counts}
    try:
        released = read_released(locate("openi/shin2016/openi.mesh.top", args.released))
    except CxrError as exc:
        print(f"not compared with the released labels: {exc}", file=sys.stderr)
    else:
        out["released"] = {"images": len(released),
                           "counts": {p: n for p, n in _counts(released.values()).items() if n >= MIN_IMAGES}}
        out["against_released"] = {"case_sensitive": compare(studies, released, True),
                                   "case_folded": compare(studies, released, False)}
    print(f"{len(studies)} reports, {images} images; {labelled} with a pattern ({images - labelled} "
          f"dropped); {len(folded)} labels; normal {out['normal_images']} ({out['normal_share']:.0%})")
    for how, c in out.get("against_released", {}).items():
        print(f"against openi.mesh.top, {how}: {c['images_with_another_pattern']} images with another "
              f"pattern, {c['images_with_another_label']} with another label")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
