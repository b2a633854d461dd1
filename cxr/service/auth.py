"""Who may do what on `cxr serve`: bearer tokens with roles, and an audit log of every request.

Tokens come from a file (`--tokens FILE`) or the environment (`CXR_TOKENS`), one per line as
`TOKEN ROLE NAME` (`#` starts a comment; TOKEN may be written `sha256:HEX` so that the file holds
no usable secret), or as JSON: a list of {"token" | "sha256", "role", "name"}. Only sha256 hashes
are kept in memory, and a presented token is compared with every stored hash in constant time.
Where a hospital has an OpenID Connect provider, its signed JWTs are accepted too
(`--oidc-issuer`, see oidc.py), their role taken from a claim.

Roles are ordered, each allowing what the ones before it allow:

    read      GET /studies, /studies/{id}, /studies/{id}/image, /search, POST /search/similar,
              GET /vocabulary, /health
    annotate  POST /annotate (upload and read an image, ?store=true to index it)
    admin     GET /audit (the audit log)

`RULES` is that table for the app's routes; a route with no rule is refused to everyone but admin
(and the tests fail for it). The page, its static files and the API docs carry no data and stay
public. With no tokens configured every request passes as "anonymous" (admin): `cxr serve`
allows that only on a loopback address.

The audit log is JSON lines (`cxr.atomic.append_line`: whole lines, append-only): time, token
name, role, method, endpoint, status, path parameters (study ids), query, and the ids a search
returned, for every request that reached a rule (also the refused ones).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import append_line
from ..errors import CxrError

ROLES = ("read", "annotate", "admin")
ENV = "CXR_TOKENS"

# (method, route path) -> the least role that may call it
RULES: dict[tuple[str, str], str] = {
    ("POST", "/annotate"): "annotate",
    ("GET", "/studies"): "read",
    ("GET", "/studies/{image_id}"): "read",
    ("GET", "/studies/{image_id}/image"): "read",
    ("GET", "/studies/{image_id}/report"): "read",
    ("GET", "/search"): "read",
    ("POST", "/search/similar"): "read",
    ("GET", "/vocabulary"): "read",
    ("GET", "/health"): "read",
    ("GET", "/audit"): "admin",
}
# No data behind these: the page, its scripts, the API docs and schema.
PUBLIC_PATHS = ("/", "/openapi.json", "/docs")
PUBLIC_PREFIXES = ("/static/", "/docs-static/")


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS = Principal("anonymous", "admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """sha256(token) -> Principal. Empty: no authentication (open)."""

    def __init__(self, entries: list[tuple[bytes, str, str]] = ()):
        self._entries = [(digest, Principal(name, role)) for digest, role, name in entries]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, token: str) -> Principal | None:
        """The principal of `token`, or None. Every stored hash is compared (in constant time),
        so the time taken says nothing about which one matched or how much of it."""
        digest, found = _digest(token), None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    @classmethod
    def parse(cls, text: str, source: str) -> "Tokens":
        """Tokens from the text of a file or of CXR_TOKENS (lines or JSON, see the module)."""
        text = text.strip()
        items: list[dict] = []
        if text.startswith(("[", "{")):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise CxrError(f"tokens: not valid JSON ({exc})", source) from None
            items = data if isinstance(data, list) else data.get("tokens", [])
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise CxrError('tokens: JSON must be a list of {"token", "role", "name"}', source)
        else:
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split(None, 2)
                if len(parts) != 3:
                    raise CxrError(f"tokens line {n}: expected `TOKEN ROLE NAME`", source)
                items.append({"token": parts[0], "role": parts[1], "name": parts[2], "line": n})
        entries = []
        for k, item in enumerate(items, 1):
            where = f"tokens entry {item.get('line', k)}"
            role, name = item.get("role"), str(item.get("name") or "").strip()
            if role not in ROLES:
                raise CxrError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}", source)
            if not name:
                raise CxrError(f"{where}: no name (the audit log records it)", source)
            token = str(item.get("token") or "")
            hexdigest = item.get("sha256") or (token[7:] if token.startswith("sha256:") else None)
            if hexdigest is not None:
                try:
                    digest = bytes.fromhex(str(hexdigest))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise CxrError(f"{where}: sha256 must be 64 hex digits", source)
            elif len(token) < 16:
                raise CxrError(f"{where}: a token must have at least 16 characters", source)
            else:
                digest = _digest(token)
            entries.append((digest, role, name))
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path | None = None, environ=os.environ) -> "Tokens":
        """From `path` if given, else from $CXR_TOKENS if set, else none."""
        if path is not None:
            path = Path(path).expanduser()
            if not path.is_file():
                raise CxrError("tokens file not found", path)
            return cls.parse(path.read_text(), str(path))
        if environ.get(ENV, "").strip():
            return cls.parse(environ[ENV], f"${ENV}")
        return cls()


class AuditLog:
    """Append-only JSON lines of who called what (None: nothing is written)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None

    def write(self, **entry) -> None:
        if self.path is not None:
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
            append_line(self.path, json.dumps(line, default=str))

    def tail(self, n: int) -> list[dict]:
        """The last `n` entries (for GET /audit)."""
        if self.path is None or not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()[-n:]
        return [json.loads(line) for line in lines if line.strip()]


def _route(routes, scope):
    """The route that `scope` reaches, and its path parameters (None for no route)."""
    from starlette.routing import Match

    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route, child.get("path_params", {})
    return None, {}


class Auth:
    """ASGI middleware: the bearer token's role against `RULES` (401 without a valid token, 403
    for a role too weak), then one audit line per request under a rule."""

    def __init__(self, app, tokens: Tokens, audit: AuditLog, routes_of):
        self.app, self.tokens, self.audit, self.routes_of = app, tokens, audit, routes_of

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        route, params = _route(self.routes_of(), scope)
        endpoint = getattr(route, "path", None)
        method = scope["method"]
        rule = RULES.get((method, endpoint), "admin")  # no rule: admin only
        principal = ANONYMOUS
        if self.tokens:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            principal = self.tokens.check(token.strip()) if scheme.lower() == "bearer" else None
        state = scope.setdefault("state", {})
        state["principal"] = principal
        status = {"code": 500}

        async def recorded(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if principal is None:
                response = JSONResponse({"detail": "a valid bearer token is required"}, 401,
                                        headers={"WWW-Authenticate": 'Bearer realm="cxr"'})
                return await response(scope, receive, recorded)
            if not principal.may(rule):
                response = JSONResponse({"detail": f"role {principal.role!r} may not do this; it needs "
                                                   f"{rule!r}"}, 403)
                return await response(scope, receive, recorded)
            return await self.app(scope, receive, recorded)
        finally:
            if endpoint is not None and endpoint != "/health":  # probes would drown the log
                self.audit.write(
                    name=principal.name if principal else None, role=principal.role if principal else None,
                    method=method, endpoint=endpoint, status=status["code"],
                    params={k: v for k, v in params.items()},
                    query=scope.get("query_string", b"").decode("latin-1"),
                    ids=state.get("audit_ids"), client=(scope.get("client") or [None])[0])
