"""`cxr index RUN SOURCE --db URL`: read every image of a folder or source with a trained run and
store the results in a searchable archive. Run it again to resume: stored images are skipped.
A source with reports (openi:, phantom:, folder: with a report column) stores each study's report
and the findings mined from it (`cxr search --report`, `--disagree`); so does a folder of DICOM
files holding a study's report as a text SR or encapsulated CDA/PDF (`archive.dicom_reports`).
`SOURCE` may be a PACS: `dicomweb:URL` fetches its chest films (QIDO-RS/WADO-RS) and STOWs the SR
and overlay of each back (`cxr.net.dicomweb`)."""
from __future__ import annotations

import argparse
import json
import sys

from ..atomic import write_atomic
from ..errors import CxrError
from .db import DEFAULT_URL


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="trained run folder (checkpoint) whose Reader indexes")
    parser.add_argument("source", help="folder of PNG/JPEG/DICOM (nested), one image file, a "
                        "source spec such as nih:/data/nih, or a PACS: dicomweb:http://HOST/PATH "
                        "(results go back by STOW-RS)")
    parser.add_argument("--db", default=DEFAULT_URL,
                        help=f"database URL (default {DEFAULT_URL}; postgresql://user@host/db)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per Reader batch and per committed transaction")
    parser.add_argument("--ray", metavar="auto|local|ADDRESS", default=None,
                        help="run the Readers on a Ray cluster (auto: the one this machine "
                        "belongs to, else a new local one; local: a new local one); this process "
                        "writes the results")
    parser.add_argument("--ray-actors", type=int, default=None,
                        help="number of Reader actors on Ray (default: one per cluster CPU)")
    parser.add_argument("--dicom-out", metavar="DIR", default=None,
                        help="also write a DICOM SR (TID 1500) and an overlay Secondary Capture "
                        "per newly indexed image into DIR")
    parser.add_argument("--engine", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="what runs the CNN: torch, or the graph of `cxr export RUN --onnx` "
                        "under ONNX Runtime or OpenVINO (CPU; faster)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="read again the images recorded as failed")
    parser.add_argument("--force", action="store_true",
                        help="read images the quality gate refuses (otherwise they are recorded "
                        "as failed with the reason: cxr search --failed)")
    parser.add_argument("--vector-dir", default=None,
                        help="where the similar-image index lives (default: beside a SQLite "
                        "file, else in the cxr cache)")
    parser.add_argument("--spool", metavar="DIR", default=None,
                        help="dicomweb: where fetched films and results waiting to be stored "
                        "live (default: in the cxr cache, per server)")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="write the run's counts as JSON ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .db import Archive
    from .index import index_images, iter_inputs

    if args.batch_size < 1:
        raise CxrError("--batch-size must be at least 1")
    if not Path(args.run).exists():
        raise CxrError("run folder not found", args.run)
    source_path = Path(args.source).expanduser()
    if ":" not in args.source and not source_path.exists():
        raise CxrError("no such file or folder", args.source)
    stowed = None
    dicomweb = args.source.startswith("dicomweb:")
    if dicomweb:
        from ..net.dicomweb import parse_url

        parse_url(args.source)  # a bad URL is one line now, not after loading the model
        if args.ray or args.dicom_out:
            raise CxrError("a dicomweb: source is read here and its results go back to the "
                           "server: leave out --ray and --dicom-out")
    with Archive(args.db, vector_dir=args.vector_dir) as archive:
        if dicomweb:
            from ..net.dicomweb import index_dicomweb
            from ..reader import Reader

            reader = Reader.load(args.run)
            archive.remember_run(reader.model_id, args.run)
            stats, stowed = index_dicomweb(archive, reader, args.source, spool=args.spool,
                                           batch_size=args.batch_size, progress=not args.quiet,
                                           retry_failed=args.retry_failed, force=args.force)
        elif args.ray:
            from .ray_index import index_with_ray

            stats = index_with_ray(archive, args.run, iter_inputs(args.source, reports=True),
                                   address=args.ray, batch_size=args.batch_size,
                                   num_actors=args.ray_actors, dicom_out=args.dicom_out,
                                   progress=not args.quiet, retry_failed=args.retry_failed,
                                   force=args.force, engine=args.engine)
        else:
            from ..reader import Reader

            reader = Reader.load(args.run, engine=args.engine)
            archive.remember_run(reader.model_id, args.run)
            stats = index_images(archive, reader, iter_inputs(args.source, reports=True),
                                 batch_size=args.batch_size, dicom_out=args.dicom_out,
                                 progress=not args.quiet, retry_failed=args.retry_failed,
                                 force=args.force)
        # as the web page counts them: images read; those that failed are listed apart
        total, failed_total = archive.count(status="ok"), archive.count(status="failed")
    line = (f"indexed {stats.indexed}, failed {stats.failed} (of which {stats.refused} refused by "
            f"the quality gate), skipped {stats.skipped} already "
            f"indexed, {stats.duplicates} duplicate content"
            + (f", {stats.reports} report document(s) (SR, CDA, PDF)" if stats.reports else "")
            + f"; {total} images read in the archive, {failed_total} failed "
            f"({stats.images_per_second:.1f} images/s)")
    if stowed is not None:
        line += f"; {stowed} result objects (SR, overlay) stored back by STOW-RS"
    print(line, file=sys.stderr)
    for path, reason in stats.failures[:5]:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    if args.json:
        extra = {"archive_images": total, "archive_failed": failed_total} | ({"stowed": stowed} if stowed is not None else {})
        text = json.dumps(stats.to_dict() | extra, indent=2)
        if args.json == "-":
            print(text)
        else:
            write_atomic(args.json, text + "\n")
    return 0
