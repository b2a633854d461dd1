"""OIDC bearer tokens, for real: an RSA key made here, its JWKS and OpenID configuration served
by a loopback HTTP server, JWTs signed with it (and forged ones), checked by `OidcVerifier` and
by the app's access rules (401 without a valid token, 403 for a role too weak)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

jwt = pytest.importorskip("jwt", reason="PyJWT (the `service` extra) is not installed")
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cxr.errors import CxrError  # noqa: E402
from cxr.service.app import create_app  # noqa: E402
from cxr.service.auth import Tokens  # noqa: E402
from cxr.service.oidc import Credentials, OidcVerifier  # noqa: E402


def _key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def issuer():
    """(issuer URL, the signing key) with the key's JWKS served on a loopback port."""
    key = _key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            base = f"http://127.0.0.1:{self.server.server_port}"
            body = {"/.well-known/openid-configuration": {"issuer": base, "jwks_uri": base + "/jwks"},
                    "/jwks": {"keys": [jwk]}}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body or {}).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", key
    finally:
        server.shutdown()


def token(url, key, kid="k1", **claims) -> str:
    body = {"iss": url, "aud": "cxr", "exp": int(time.time()) + 300, "sub": "u1",
            "preferred_username": "dr.lee", "realm_access": {"roles": ["read"]}, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_verifier_accepts_only_the_issuers_valid_tokens(issuer):
    url, key = issuer
    oidc = OidcVerifier(url, "cxr", "realm_access.roles", {"radiologist": "annotate"})
    who = oidc.check(token(url, key))
    assert who is not None and (who.name, who.role) == ("oidc:dr.lee", "read")
    assert oidc.check(token(url, key, realm_access={"roles": ["read", "radiologist"]})).role == "annotate"
    assert oidc.check(token(url, key, realm_access={"roles": ["admin", "read"]})).role == "admin"
    refused = {
        "signed with another key": token(url, _key()),
        "an unknown key id": token(url, key, kid="k2"),
        "expired": token(url, key, exp=int(time.time()) - 60),
        "another audience": token(url, key, aud="pacs"),
        "another issuer": token(url, key, iss="http://127.0.0.1:1"),
        "no cxr role": token(url, key, realm_access={"roles": ["nurse"]}),
        "unsigned": jwt.encode({"iss": url, "aud": "cxr", "exp": int(time.time()) + 300,
                                "realm_access": {"roles": ["admin"]}}, None, algorithm="none",
                               headers={"kid": "k1"}),
        "not a JWT": "x.y.z",
    }
    for why, bad in refused.items():
        assert oidc.check(bad) is None, why


def test_an_unreachable_issuer_is_one_line():
    with pytest.raises(CxrError, match="OpenID configuration"):
        OidcVerifier("http://127.0.0.1:9", "cxr", timeout=2)
    with pytest.raises(CxrError, match="roles are"):
        OidcVerifier("http://127.0.0.1:9", "cxr", role_map={"x": "superuser"})


def test_the_app_takes_oidc_tokens_by_role(issuer, tmp_path):
    url, key = issuer
    credentials = Credentials(Tokens(), OidcVerifier(url, "cxr", "realm_access.roles"))
    app = create_app("no-run", f"sqlite:///{tmp_path / 'archive.db'}", upload_dir=tmp_path / "up",
                     tokens=credentials, audit_log=tmp_path / "audit.jsonl")
    client = TestClient(app)  # no lifespan: the access rules need no model

    def get(path, bearer=None):
        return client.get(path, headers={"Authorization": f"Bearer {bearer}"} if bearer else {})

    assert get("/audit").status_code == 401
    assert get("/audit", token(url, _key(), realm_access={"roles": ["admin"]})).status_code == 401
    assert get("/audit", token(url, key)).status_code == 403  # read may not see the audit log
    assert get("/audit", token(url, key, realm_access={"roles": ["admin"]})).status_code == 200
    names = [json.loads(line)["name"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert "oidc:dr.lee" in names
