"""`cxr serve RUN --db URL`: the REST API and web viewer under uvicorn.

The run and the database are opened before the server starts, so a wrong path or URL is one
line on stderr, not a start-up traceback. Likewise the access rules: tokens (`--tokens FILE` or
$CXR_TOKENS, see auth.py) are read first, and an address other than loopback without tokens is
refused before the model loads (anyone on the network could otherwise read the archive).
`--tls-cert` / `--tls-key` serve HTTPS (uvicorn's ssl_certfile / ssl_keyfile).
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
    parser.add_argument("--engine", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="what runs the CNN (onnxruntime / openvino: the graph of `cxr export "
                        "RUN --onnx`, on the CPU)")
    parser.add_argument("--oidc-issuer", metavar="URL", default=None,
                        help="also accept JWTs signed by this OpenID Connect issuer (its JWKS from "
                        "URL/.well-known/openid-configuration; see cxr/service/oidc.py)")
    parser.add_argument("--oidc-audience", default="cxr", help="the `aud` the JWTs must carry (default cxr)")
    parser.add_argument("--oidc-role-claim", default="roles",
                        help="claim naming the role: read, annotate or admin (default roles; a dotted "
                        "path such as realm_access.roles reaches a nested claim)")
    parser.add_argument("--oidc-role", action="append", default=[], metavar="NAME=ROLE",
                        help="the provider's role NAME means cxr's ROLE (repeatable)")
    parser.add_argument("--tokens", type=Path, default=None,
                        help="bearer tokens: lines `TOKEN ROLE NAME` (roles read < annotate < admin) "
                        "or JSON (default: $CXR_TOKENS; none: open, loopback only)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM): serve HTTPS")
    parser.add_argument("--tls-key", type=Path, default=None, help="the certificate's private key (PEM)")
    parser.add_argument("--audit-log", type=Path, default=None,
                        help="JSON-lines log of who read or searched what (default: beside the "
                        "upload folder, e.g. cxr-archive.db.audit.jsonl)")
    parser.add_argument("--log-level", default="info")


def run(args) -> int:
    import uvicorn

    from ..archive.db import Archive
    from ..checkpoint import load_spec
    from ..errors import CxrError
    from ..reader import Reader
    from .app import create_app
    from .auth import ENV, Tokens

    if args.max_batch < 1 or args.max_upload_mb <= 0:
        raise CxrError("--max-batch and --max-upload-mb must be positive")
    load_spec(args.run)  # a bad run is one line before the port is checked and the model loaded
    if args.upload_dir is not None and args.upload_dir.exists() and not args.upload_dir.is_dir():
        raise CxrError("--upload-dir is a file, not a folder", args.upload_dir)
    _check_listen(args.host, args.port)
    tokens = Tokens.load(args.tokens)
    if args.oidc_issuer:
        from .oidc import Credentials, OidcVerifier

        pairs = [item.partition("=") for item in args.oidc_role]
        if any(not sep for _, sep, _ in pairs):
            raise CxrError("--oidc-role expects NAME=ROLE")
        tokens = Credentials(tokens, OidcVerifier(args.oidc_issuer, args.oidc_audience, args.oidc_role_claim,
                                                  {name: role for name, _, role in pairs}))
    if not tokens and not _loopback(args.host):
        raise CxrError(f"refusing to serve {args.host} without tokens: anyone who reaches it could "
                       f"read and search the archive; give --tokens FILE or set {ENV} (an open "
                       "server is allowed on loopback only, e.g. --host 127.0.0.1)")
    tls = _tls_files(args.tls_cert, args.tls_key)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # before the engines size their thread pools
    reader = Reader.load(args.run, device=args.device, engine=args.engine)
    archive = _open_archive(Archive, args.db)
    app = create_app(args.run, args.db, max_upload_mb=args.max_upload_mb, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, upload_dir=args.upload_dir,
                     device=args.device, threads=args.threads, reader=reader, archive=archive,
                     tokens=tokens, audit_log=args.audit_log)
    access = f"{len(tokens)} token(s)" if tokens else "open: no tokens (loopback only)"
    if args.oidc_issuer:
        access += f", OIDC tokens of {args.oidc_issuer}"
    print(f"cxr serve: {reader.model_id} ({args.engine}) on {'https' if tls else 'http'}://{args.host}:"
          f"{args.port}/ ({access}; audit log {app.state.audit.path}; API docs at /docs; research use "
          "only)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **tls)
    finally:
        archive.close()
    return 0


def _loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # _check_listen says why it cannot be served
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _tls_files(cert: Path | None, key: Path | None) -> dict:
    """uvicorn's TLS options; both files or neither, each readable."""
    from ..errors import CxrError

    if (cert is None) != (key is None):
        raise CxrError("--tls-cert and --tls-key go together (the certificate and its key)")
    if cert is None:
        return {}
    for path in (cert, key):
        if not path.is_file():
            raise CxrError("TLS file not found", path)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


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
