"""Does the anatomy network measure the heart on real films as wide as an expert draws it?

    python benchmarks/heart_width.py --nih NIH_DIR --json benchmarks/results/heart_width.json

Cardiomegaly's grade word follows the cardiothoracic ratio (`cxr.anatomy.CTR_GRADES`), and the
shipped anatomy network learnt the heart from the CT phantom only. Real films carry no ratio to
check it against, but NIH's expert Cardiomegaly boxes (ChestX-ray8) are drawn around the heart:
on every NIH film with one (`--nih`: Data_Entry*.csv, BBox_List*.csv, images/), this compares the
network's heart box with the expert's (width, height, each side's edge), and the ratio it measures
with the ratio the same thorax gives with the expert's heart width, and the grade words of the two.
By view (NIH's View Position), since the Reader measures no ratio on an AP film. Prints a table;
--json writes it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(nih_dir: Path, model) -> list[dict]:
    """One row per NIH film with an expert Cardiomegaly box where the network found a heart."""
    from cxr.images import load_image
    from cxr.sources import open_source

    rows = []
    for study in open_source(f"nih:{nih_dir}"):
        image = study.images[0]
        expert = [b for b in image.boxes if b.label.lower() == "cardiomegaly"]
        if not expert:
            continue
        pixels = load_image(image.path)
        organs = model([pixels])[0]
        heart, ratio = organs.boxes["heart"], organs.cardiothoracic_ratio
        if heart is None or not ratio:
            rows.append({"view": image.view, "found": False})
            continue
        e = expert[0]
        film_w = pixels.shape[1]
        rows.append({"view": image.view, "found": True, "film_width": film_w,
                     "width_ratio": heart.w / e.w, "height_ratio": heart.h / e.h,
                     # image-left edge (the patient's right heart border) and image-right edge,
                     # measured minus expert, as a share of the film's width: > 0 is to the right
                     "left_edge": (heart.x - e.x) / film_w,
                     "right_edge": ((heart.x + heart.w) - (e.x + e.w)) / film_w,
                     # the same thorax, the expert's heart width
                     "ratio": ratio, "ratio_expert_width": ratio * e.w / heart.w})
    return rows


def summarise(rows: list[dict]) -> dict:
    from cxr.anatomy import grade_of_ratio

    found = [r for r in rows if r["found"]]
    out = {"films": len(rows), "heart_found": len(found)}
    if not found:
        return out

    def stats(key):
        v = np.array([r[key] for r in found])
        return {"median": float(np.median(v)), "q25": float(np.percentile(v, 25)),
                "q75": float(np.percentile(v, 75)), "mean": float(v.mean())}

    grades = [(grade_of_ratio(r["ratio"]), grade_of_ratio(r["ratio_expert_width"])) for r in found]
    out.update({k: stats(k) for k in ("width_ratio", "height_ratio", "left_edge", "right_edge",
                                      "ratio", "ratio_expert_width")})
    out["grade_agrees"] = float(np.mean([a == b for a, b in grades]))
    order = [None, "borderline", "mild", "moderate", "severe"]
    steps = [order.index(a) - order.index(b) for a, b in grades]
    out["grade_lower"] = float(np.mean([s < 0 for s in steps]))
    out["grade_higher"] = float(np.mean([s > 0 for s in steps]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nih", type=Path, required=True, help="folder with Data_Entry*.csv, BBox_List*.csv, images/")
    ap.add_argument("--anatomy", type=Path, help="other anatomy weights (default: the shipped ones)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from cxr import metrics as M
    from cxr.anatomy import AnatomyModel
    from cxr.errors import CxrError

    try:
        model = AnatomyModel.load(args.anatomy)
        rows = measure(args.nih, model)
    except CxrError as e:
        raise SystemExit(f"heart_width: {e}")
    out = {"benchmark": "heart_width", "model": model.meta,
           "views": {v: summarise([r for r in rows if r["view"] == v]) for v in ("PA", "AP")},
           "all": summarise(rows)}
    table = []
    for name, s in [*out["views"].items(), ("all", out["all"])]:
        if not s.get("heart_found"):
            continue
        table.append([name, f"{s['heart_found']} / {s['films']}",
                      f"{s['width_ratio']['median']:.3f} ({s['width_ratio']['q25']:.3f}-{s['width_ratio']['q75']:.3f})",
                      f"{s['left_edge']['median']:+.3f} / {s['right_edge']['median']:+.3f}",
                      f"{s['height_ratio']['median']:.3f}",
                      f"{s['ratio']['median']:.3f} / {s['ratio_expert_width']['median']:.3f}",
                      f"{s['grade_agrees']:.3f} ({s['grade_lower']:.3f} lower, {s['grade_higher']:.3f} higher)"])
    print(M.markdown_table(["view", "heart found", "width / expert's, median (IQR)",
                            "edges - expert's (image left / right, of film width)", "height / expert's",
                            "ratio: measured / expert width", "grade word the same"], table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
