"""`cxr simulate`: simulated chest radiographs with known findings, as an Open-i + NIH style set."""
from __future__ import annotations

import os
from pathlib import Path


def _cores() -> int:
    """Cores this process may use (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure(parser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (created; an interrupted run in it is resumed)")
    parser.add_argument("--n", type=int, default=2000, help="number of studies (default 2000; a larger --n grows an existing set)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set (default 0)")
    parser.add_argument("--workers", type=int, default=_cores(),
                        help="parallel processes (default: all cores)")
    parser.add_argument("--dicom", action="store_true",
                        help="also write each image as DICOM (DX) beside the PNG")
    parser.add_argument("--photometric", choices=("MONOCHROME2", "MONOCHROME1"),
                        default="MONOCHROME2", help="DICOM photometric interpretation")
    parser.add_argument("--ct", type=Path, help="chest CT NIfTI (default: the data cache)")
    parser.add_argument("--labels", type=Path, help="its organ label map (default: the data cache)")
    parser.add_argument("--reports", type=Path,
                        help="Open-i reports the case statistics come from: NLMCXR_reports.tgz or "
                             "a folder of XML (default: the data cache)")
    parser.add_argument("--normal-share", type=float,
                        help="share of normal studies (default: Open-i's, 0.36)")
    parser.add_argument("--terms", choices=("complete", "as_reported"), default="complete",
                        help="write drawn context into the MeSH terms (complete) or keep them as "
                             "the Open-i radiologist wrote them")
    parser.add_argument("--masks", action="store_true",
                        help="also write each finding's mask (1-bit PNG in OUT/masks/)")
    parser.add_argument("--geometry", choices=("parallel", "cone"), default="parallel",
                        help="projection: parallel beam, or cone beam from a point source")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import json

    from .simulate import MANIFEST, simulate

    out = simulate(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                   progress=not args.no_progress, dicom=args.dicom, photometric=args.photometric,
                   ct=args.ct, labels=args.labels, reports=args.reports,
                   normal_share=args.normal_share, terms=args.terms, geometry=args.geometry,
                   masks=args.masks)
    m = json.loads((out / MANIFEST).read_text())
    print(f"{out}: {m['done']} studies ({m['normal']} normal), {m['boxes']} boxes; "
          f"train on it with `cxr train --data phantom:{out} --out RUN` "
          f"(Python: cxr.sources.open_source('phantom:{out}'))")
    return 0
