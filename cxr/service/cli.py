"""`cxr serve RUN --db URL`: the REST API and web viewer under uvicorn.

The run and the database are opened before the server starts, so a wrong path or URL is one
line on stderr, not a start-up traceback.
"""
from __future__ import annotations

from pathlib import Path


def configure(parser) -> None:
    from ..archive.db import DEFAULT_URL

    parser.add_argument("run", type=Path, help="trained run directory (cxr train --out)")
    parser.add_argument("--db", default=DEFAULT_URL,
                        help=f"archive database URL (default {DEFAULT_URL}; postgresql://... too)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default loopback; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=32, help="largest upload accepted")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most uploads run through the model at once")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the first upload of a batch waits for others")
    parser.add_argument("--upload-dir", type=Path, default=None,
                        help="where ?store=true keeps uploads (default: beside a SQLite file)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model (default: torch's; 1 suits a busy CPU)")
    parser.add_argument("--log-level", default="info")


def run(args) -> int:
    import uvicorn

    from ..archive.db import Archive
    from ..checkpoint import load_spec
    from ..errors import CxrError
    from ..reader import Reader
    from .app import create_app

    if args.max_batch < 1 or args.max_upload_mb <= 0:
        raise CxrError("--max-batch and --max-upload-mb must be positive")
    load_spec(args.run)  # a bad run is one line before the port is checked and the model loaded
    if args.upload_dir is not None and args.upload_dir.exists() and not args.upload_dir.is_dir():
        raise CxrError("--upload-dir is a file, not a folder", args.upload_dir)
    _check_listen(args.host, args.port)
    reader = Reader.load(args.run, device=args.device)
    archive = _open_archive(Archive, args.db)
    app = create_app(args.run, args.db, max_upload_mb=args.max_upload_mb, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, upload_dir=args.upload_dir,
                     device=args.device, threads=args.threads, reader=reader, archive=archive)
    print(f"cxr serve: {reader.model_id} on http://{args.host}:{args.port}/ "
          f"(API docs at /docs; research use only)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        archive.close()
    return 0


def _check_listen(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be served (uvicorn would print
    a log line and exit only after start-up)."""
    import socket

    from ..errors import CxrError

    if not 0 <= port <= 65535:
        raise CxrError(f"--port must be 0-65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CxrError(f"cannot resolve --host {host!r}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            raise CxrError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _open_archive(archive_class, url: str):
    """The archive, or one line when the URL names a file that is not a database."""
    from sqlalchemy.exc import DatabaseError

    from ..errors import CxrError

    try:
        return archive_class(url)
    except DatabaseError as exc:
        raise CxrError(f"cannot open the archive database: {exc.orig or exc}", url) from None
