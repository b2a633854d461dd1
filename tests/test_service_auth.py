"""Who may do what on the REST service, for real (uvicorn on a loopback port): every API route of
the app, without a token, with a wrong one, with a role too weak and with the right one; no
response names a server path; the audit log records who searched what."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from conftest import chest_film  # noqa: F401  (the radiographs fixture lives there too)
from service_helpers import run_asserting_every_finding

from cxr.errors import CxrError

import httpx  # the `service` extra, part of `.[test]`: missing is a broken install, not a skip
from fastapi.routing import APIRoute

from cxr.service.app import create_app
from cxr.service.auth import PUBLIC_PATHS, ROLES, RULES, Tokens

TOKENS = {"read": "r-token-0123456789abcdef", "annotate": "a-token-0123456789abcdef",
          "admin": "x-token-0123456789abcdef"}
NAMES = {"read": "Dr Read", "annotate": "Modality Seven", "admin": "PACS admin"}


def api_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the app, taken from the app itself: a new endpoint is tested
    (and fails here until it has a rule in auth.RULES)."""
    app = create_app("no-run", "sqlite:////nonexistent/archive.db", upload_dir="/nonexistent/uploads")
    return sorted((method, route.path) for route in app.routes if isinstance(route, APIRoute)
                  and route.path not in PUBLIC_PATHS for method in route.methods if method != "HEAD")


@pytest.fixture(scope="module")
def secured(tiny_run, radiographs, tmp_path_factory):
    """(base URL, a stored image id, an embedding, the audit log, the test's temp root)."""
    from cxr.archive.db import Archive
    from cxr.archive.index import index_images
    from cxr.reader import Reader
    from cxr.service.server import running_server

    tmp = tmp_path_factory.mktemp("secured") / "patient-Jane-Doe"  # a folder name that must not leak
    folder = tmp / "pacs"
    folder.mkdir(parents=True)
    for png in radiographs[:3]:
        shutil.copy(png, folder / png.name)
    (folder / "broken.png").write_bytes(b"not an image")  # a failed record, its reason names the file
    url = f"sqlite:///{tmp / 'archive.db'}"
    run = run_asserting_every_finding(tiny_run, tmp / "run")
    reader = Reader.load(run)
    with Archive(url) as archive:
        index_images(archive, reader, sorted(map(str, folder.iterdir())), progress=False)
    lines = "\n".join(f"{TOKENS[r]} {r} {NAMES[r]}" for r in ROLES if r != "admin")
    admin_hash = hashlib.sha256(TOKENS["admin"].encode()).hexdigest()
    tokens = Tokens.parse(f"# who may do what\n{lines}\nsha256:{admin_hash} admin {NAMES['admin']}\n", "test")
    audit = tmp / "audit.jsonl"
    app = create_app(run, url, max_upload_mb=1, upload_dir=tmp / "uploads", tokens=tokens, audit_log=audit)
    png = radiographs[10].read_bytes()
    with running_server(app) as base:
        with httpx.Client(base_url=base, timeout=60) as c:
            r = c.post("/annotate", params={"embedding": "true", "store": "true"},
                       headers=bearer("admin"), files={"file": ("x.png", png)})
            assert r.status_code == 200, r.text
            yield base, r.json()["id"], r.json()["embedding"], audit, tmp, png


def bearer(role: str) -> dict:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def call(client, method: str, path: str, secured, headers: dict) -> httpx.Response:
    """A well-formed request to the route, so the right role gets a 2xx."""
    _, image_id, embedding, _, _, png = secured
    url = path.replace("{image_id}", str(image_id))
    kwargs: dict = {"headers": headers}
    if (method, path) == ("POST", "/annotate"):
        kwargs["files"] = {"file": ("chest.png", png)}
    elif (method, path) == ("POST", "/search/similar"):
        kwargs["json"] = {"embedding": embedding, "k": 2}
    elif (method, path) == ("GET", "/search"):
        kwargs["params"] = {"q": "opacity"}
    return client.request(method, url, **kwargs)


@pytest.mark.parametrize("method,path", api_routes())
def test_every_route_refuses_a_missing_or_wrong_token_and_a_weak_role(secured, method, path):
    assert (method, path) in RULES, f"{method} {path} has no rule in cxr.service.auth.RULES"
    need = RULES[(method, path)]
    private = str(secured[4].parent)
    with httpx.Client(base_url=secured[0], timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": f"Basic {TOKENS['admin']}"}, {"Authorization": "Bearer"}):
            r = call(client, method, path, secured, headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
        for role in ROLES:
            r = call(client, method, path, secured, bearer(role))
            if ROLES.index(role) < ROLES.index(need):
                assert r.status_code == 403 and need in r.json()["detail"], (role, r.text)
            else:
                assert r.status_code < 400, (role, r.status_code, r.text[:300])
                assert private not in r.text and "Jane-Doe" not in r.text  # ids, not server paths


def test_the_page_and_docs_need_no_token(secured):
    with httpx.Client(base_url=secured[0], timeout=60) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/no/such/endpoint").status_code == 401  # unknown: no hint what exists


def test_no_response_names_a_server_path(secured):
    """Failed records, errors and listings: ids and URLs only, never the server's files."""
    private = str(secured[4].parent)
    with httpx.Client(base_url=secured[0], timeout=60, headers=bearer("admin")) as client:
        failed = client.get("/studies", params={"status": "failed"}).json()
        assert failed["items"] and all("path" not in item for item in failed["items"])
        bodies = [json.dumps(failed), client.get("/studies").text, client.get("/studies/999999").text,
                  client.get("/search", params={"q": "opacity"}).text,
                  client.post("/annotate", files={"file": ("bad.png", b"junk")}).text,
                  client.get(f"/studies/{failed['items'][0]['id']}/image").text, client.get("/health").text]
    for body in bodies:
        assert private not in body and "Jane-Doe" not in body and "cxr-upload" not in body, body


def test_the_audit_log_records_who_searched_what(secured):
    audit = secured[3]
    with httpx.Client(base_url=secured[0], timeout=60) as client:
        hits = client.get("/search", params={"finding": "Opacity", "min_score": 0},
                          headers=bearer("read")).json()["items"]
        refused = client.get("/audit", headers=bearer("read"))
        assert refused.status_code == 403
        entries = client.get("/audit", headers=bearer("admin")).json()["items"]
    on_file = [json.loads(line) for line in audit.read_text().splitlines()]
    search = [e for e in on_file if e["endpoint"] == "/search" and "finding=Opacity" in e["query"]]
    assert search and search[-1]["name"] == "Dr Read" and search[-1]["role"] == "read"
    assert search[-1]["ids"] == [h["id"] for h in hits] and search[-1]["status"] == 200 and search[-1]["time"]
    assert any(e["endpoint"] == "/audit" and e["status"] == 403 and e["name"] == "Dr Read" for e in entries)
    assert TOKENS["read"] not in audit.read_text()  # names, never tokens


def test_tokens_from_lines_json_or_the_environment():
    text = json.dumps([{"token": TOKENS["read"], "role": "read", "name": "a"},
                       {"sha256": hashlib.sha256(b"s" * 20).hexdigest(), "role": "admin", "name": "b"}])
    tokens = Tokens.parse(text, "t.json")
    assert tokens.check(TOKENS["read"]).role == "read" and tokens.check("s" * 20).name == "b"
    assert tokens.check("s" * 19) is None and tokens.check("") is None
    env = Tokens.load(environ={"CXR_TOKENS": f"{TOKENS['admin']} admin Ops"})
    assert env.check(TOKENS["admin"]).name == "Ops" and not Tokens.load(environ={})
    for bad, words in [("tok admin x", "at least 16"), (f"{TOKENS['read']} root x", "role must be"),
                       (f"{TOKENS['read']} read", "TOKEN ROLE NAME"), ("[{", "not valid JSON"),
                       ("sha256:abc read x", "64 hex")]:
        with pytest.raises(CxrError, match=words):
            Tokens.parse(bad, "tokens.txt")
