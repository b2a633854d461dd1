"""The anatomy band of boxes on real films read by a model that never saw one: a finished `cxr
demo` run (trained on the phantom only) localises each true Effusion and Cardiomegaly of the NIH
images with expert boxes (ChestX-ray8's protocol: the map of the disease the film is known to
have, the run's box rule), with `Reader.boxes_follow_anatomy` on and off, paired on the same
films and maps, for each map source.

    python benchmarks/anatomy_band.py --demo DIR --data NIH_DIR --json OUT

The band (`cxr.models.localize.DISEASE_BANDS`) keeps an effusion's box in the basal band of rows
and the heart's below the upper third where the words name no site. `benchmarks/real_nih.py`
measures the same switch on runs trained on these films.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DISEASES = ("Pleural Effusion", "Cardiomegaly")  # the run's names; NIH's "Effusion" maps to the first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `cxr demo --out DIR`")
    ap.add_argument("--data", type=Path, required=True, help="folder with Data_Entry*.csv, BBox_List*.csv, images/")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from cxr import metrics as M
    from cxr.errors import CxrError
    from cxr.evaluation import boxes_of_true_diseases, map_sources, target_lookup
    from cxr.images import load_image
    from cxr.reader import Reader
    from cxr.records import Box
    from cxr.sources import open_source

    if not (args.demo / "run" / "config.json").is_file():
        raise SystemExit(f"anatomy_band: {args.demo} is not a finished `cxr demo` folder (run/)")
    try:  # a wrong data path or run: one line, not a traceback
        reader = Reader.load(args.demo / "run", gate=False)
        studies = open_source(f"nih:{args.data}")
    except CxrError as e:
        raise SystemExit(f"anatomy_band: {e}")
    lookup = target_lookup(reader.targets)
    pairs = {(src, band): [] for src in map_sources(reader) for band in (True, False)}
    films = 0
    for study in studies:
        image = study.images[0]
        truth = [Box(lookup[b.label.lower()], b.x, b.y, b.w, b.h) for b in image.boxes
                 if lookup.get(b.label.lower()) in DISEASES]
        if not truth:
            continue
        films += 1
        pixels = load_image(image.path)
        for (src, band), found in pairs.items():
            reader.boxes_follow_anatomy = band
            found.append((truth, boxes_of_true_diseases(reader, pixels, truth, src)))
    reader.boxes_follow_anatomy = True
    rows, out = [], {"benchmark": "anatomy_band", "demo": str(args.demo), "films": films, "sources": {}}
    for (src, band), found in pairs.items():
        la = M.localisation_accuracy(found)
        out["sources"].setdefault(src, {})["band" if band else "no_band"] = la
        rows.append([src, "on" if band else "off"] + [la["iobb"]["accuracy"].get(d, {}).get("0.5") for d in DISEASES])
    print(M.markdown_table(["map source", "anatomy band"] + [f"{d}: T(IoBB)=0.5" for d in DISEASES], rows, digits=3))
    print(f"{films} NIH films with a true box of {' or '.join(DISEASES)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
