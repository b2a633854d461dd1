"""`cxr listen RUN --ae-title CXR --port 11112 --allow MODALITY ... --send-to PACS@HOST:PORT`:
a DICOM node. Modalities and PACS push chest films (CR, DX) by C-STORE; each one is spooled and
journalled before it is acknowledged, read in batches (quality gate, then the Reader), indexed
into the archive, and its SR + Secondary Capture go back by C-STORE to the destination. Stop it
any way you like (even kill -9): started again on the same spool, it finishes what it acknowledged,
each instance once."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..errors import CxrError


def configure(parser: argparse.ArgumentParser) -> None:
    from ..archive.db import DEFAULT_URL

    parser.add_argument("run", help="trained run folder whose Reader reads the incoming films")
    parser.add_argument("--ae-title", default="CXR", help="this node's AE title (default CXR)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    parser.add_argument("--allow", action="append", default=[], metavar="CALLING_AE",
                        help="calling AE title allowed to associate (repeat for each modality "
                        "or PACS); others are rejected")
    parser.add_argument("--allow-any", action="store_true",
                        help="accept any calling AE title (no allow-list)")
    parser.add_argument("--send-to", metavar="AE@HOST:PORT", default=None,
                        help="C-STORE each film's SR + overlay Secondary Capture to this node "
                        "(e.g. the PACS); without it the results are only archived")
    parser.add_argument("--db", default=DEFAULT_URL, help=f"archive database URL (default {DEFAULT_URL})")
    parser.add_argument("--spool", default="cxr-spool",
                        help="folder for received instances, the journal and the outbox "
                        "(default ./cxr-spool)")
    parser.add_argument("--batch-size", type=int, default=16, help="instances per Reader batch")
    parser.add_argument("--batch-wait", type=float, default=0.5, metavar="SECONDS",
                        help="how long to wait for a fuller batch when fewer are pending")
    parser.add_argument("--engine", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="what runs the CNN: torch, or the graph of `cxr export RUN --onnx` "
                        "under ONNX Runtime or OpenVINO (CPU; faster)")
    parser.add_argument("--force", action="store_true",
                        help="read films the quality gate refuses (else archived as not read)")
    parser.add_argument("--vector-dir", default=None, help="where the similar-image index lives")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise CxrError("cxr listen needs pynetdicom: pip install 'cxr[net]'") from None
    from ..archive.db import Archive
    from ..reader import Reader
    from . import scp
    from .journal import Journal
    from .send import Destination
    from .worker import Worker

    if not args.allow and not args.allow_any:
        raise CxrError("name the calling AE titles that may send (--allow AE, repeatable), "
                       "or pass --allow-any")
    if not 0 < args.port < 65536:
        raise CxrError(f"--port must be 1..65535, not {args.port}")
    if args.batch_size < 1:
        raise CxrError("--batch-size must be at least 1")
    if not 0 < len(args.ae_title) <= 16:
        raise CxrError("--ae-title must be 1 to 16 characters")
    if not Path(args.run).exists():
        raise CxrError("run folder not found", args.run)
    destination = Destination.parse(args.send_to) if args.send_to else None
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s cxr listen: %(message)s")
    log = logging.getLogger("cxr.net")  # ours at INFO; libraries' chatter (per PDU...) stays out
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)

    journal = Journal(args.spool)
    reader = Reader.load(args.run, engine=args.engine)
    with Archive(args.db, vector_dir=args.vector_dir) as archive:
        archive.remember_run(reader.model_id, args.run)
        worker = Worker(journal, archive, reader, destination=destination,
                        calling_ae=args.ae_title, batch_size=args.batch_size,
                        batch_wait_s=args.batch_wait, force=args.force)
        _ = reader.gate  # load the quality gate now, not on the first film
        pending = journal.counts()
        if pending["received"] or pending["indexed"]:
            log.info("resuming: %d instances to read, %d results to send",
                     pending["received"], pending["indexed"])
        try:
            server, counters = scp.start(journal, args.ae_title, args.host, args.port,
                                         None if args.allow_any else args.allow)
        except OSError as exc:
            raise CxrError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None

        def stop(*_):
            worker.stop.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(f"cxr listen: {args.ae_title} listening on {args.host}:{args.port}, "
              f"reading with {reader.model_id} ({args.engine})"
              + (f", results to {destination}" if destination else ""), file=sys.stderr, flush=True)
        thread = threading.Thread(target=worker.run, name="cxr-worker")
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
        finally:
            worker.stop.set()
            server.shutdown()
            thread.join()
            journal.close()
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items())
    print(f"cxr listen: stopped ({counts})", file=sys.stderr)
    return 0
