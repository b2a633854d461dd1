"""The REST service for real: the app under a real uvicorn server on a loopback port, the tiny
trained run, an SQLite archive indexed with the archive API, real HTTP requests with httpx."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import chest_film
from service_helpers import run_asserting_every_finding

import httpx  # the `service` extra, part of `.[test]`: missing is a broken install, not a skip


def chest_dicom(path: Path, shape=(96, 120), **kwargs) -> Path:
    """A DICOM of a chest film (the quality gate refuses drawings)."""
    from cxr.dicom import write_dicom

    return write_dicom(path, chest_film(300, shape), **kwargs)


def png_size(data_url: str) -> tuple[int, int]:
    from PIL import Image

    head, payload = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
        return im.height, im.width


@pytest.fixture(scope="module")
def service(tiny_run, radiographs, tmp_path_factory):
    """(base URL, the Reader, indexed NIH paths): 6 NIH PNGs and a DICOM indexed first; the
    server opens the run and the archive itself at start-up (lifespan)."""
    from cxr.archive.db import Archive
    from cxr.archive.index import index_images
    from cxr.reader import Reader
    from cxr.service.app import create_app
    from cxr.service.server import running_server

    tmp = tmp_path_factory.mktemp("service")
    folder = tmp / "pacs"
    folder.mkdir()
    for png in radiographs[:6]:
        shutil.copy(png, folder / png.name)
    chest_dicom(folder / "chest.dcm")
    url = f"sqlite:///{tmp / 'archive.db'}"
    run = run_asserting_every_finding(tiny_run, tmp / "run")
    reader = Reader.load(run)
    with Archive(url) as archive:
        stats = index_images(archive, reader, sorted(map(str, folder.iterdir())), progress=False)
    assert stats.indexed == 7
    app = create_app(run, url, max_upload_mb=1, max_batch=8, batch_wait_ms=50,
                     upload_dir=tmp / "uploads")
    with running_server(app) as base:
        yield base, reader, tmp


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service[0], timeout=60) as c:
        yield c


def test_health_openapi_docs_and_page(client, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_id"] == service[1].model_id
    assert health["targets"] == service[1].targets and health["archive"]["images"] == 7
    assert health["quality_gate"] == service[1].gate.model_id
    spec = client.get("/openapi.json").json()
    assert {"/annotate", "/studies", "/studies/{image_id}", "/studies/{image_id}/image", "/search",
            "/health"} <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    # swagger-ui-bundle-v2 is a declared dependency of the service extra: /docs works offline
    assert "cdn" not in docs.text and client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "Research use only" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_annotate_png_matches_the_reader(client, service, radiographs):
    from cxr.images import load_image

    png = radiographs[20]
    r = client.post("/annotate", files={"file": (png.name, png.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    direct = service[1](load_image(png))
    assert body["filename"] == png.name and body["image_size"] == [256, 256]
    assert body["model_id"] == direct.model_id
    assert body["scores"] == pytest.approx(direct.scores, abs=1e-5)
    assert [f["disease"] for f in body["findings"]] == [f.disease for f in direct.findings]
    assert [f["annotation"] for f in body["findings"]] == [f.annotation for f in direct.findings]
    assert "heatmaps" not in body and "embedding" not in body and "id" not in body
    assert "Research use only" in body["disclaimer"]


def test_heatmap_image_and_embedding_on_request(client, service, radiographs):
    png = radiographs[21]
    r = client.post("/annotate", params={"heatmap": "true", "image": "true", "embedding": "true"},
                    files={"file": (png.name, png.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    diseases = [f["disease"] for f in body["findings"] if f["disease"] != "normal"]
    assert diseases, "a run with zero thresholds asserts every disease"
    # one per disease; a grounded run adds the maps it attended to per word ("Opacity:left")
    assert set(diseases) <= set(body["heatmaps"])
    assert {k.split(":")[0] for k in body["heatmaps"]} == set(diseases)
    assert all(png_size(h) == (256, 256) for h in body["heatmaps"].values())
    assert png_size(body["image"]) == (256, 256)
    assert len(body["embedding"]) == service[1].spec.architecture.image_dim
    assert all(b["w"] > 0 and b["h"] > 0 for f in body["findings"] for b in f["boxes"])


def test_heatmaps_of_a_large_image_are_shrunk_to_512(client, radiographs):
    from PIL import Image

    from cxr.images import load_image

    png = radiographs[22]
    buf = io.BytesIO()
    film = (load_image(png) * 255).round().astype(np.uint8)  # 8-bit, whatever the file's depth
    Image.fromarray(film).resize((768, 640)).save(buf, format="PNG")
    r = client.post("/annotate", params={"heatmap": "true"}, files={"file": ("big.png", buf.getvalue())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [640, 768] and body["heatmaps"]
    assert {png_size(h) for h in body["heatmaps"].values()} == {(427, 512)}
    assert max(b["x"] + b["w"] for f in body["findings"] for b in f["boxes"]) <= 768


def test_annotate_dicom(client, service, tmp_path):
    dcm = chest_dicom(tmp_path / "upload.dcm", shape=(96, 120), view="AP", compression="rle")
    r = client.post("/annotate", files={"file": ("upload.dcm", dcm.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [96, 120] and body["view"] == "AP"
    assert set(body["scores"]) == set(service[1].targets)


def dicom_without_pixels(path: Path) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid(), "DX"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["truncated", "text", "empty", "no-pixels"])
def test_bad_uploads_get_a_4xx_with_the_reason(client, radiographs, tmp_path, case):
    png = radiographs[0].read_bytes()
    name, data, words = {
        "truncated": ("cut.png", png[:len(png) // 3], ("cut.png",)),
        "text": ("notes.png", b"this is a radiology report, not an image\n" * 20, ("notes.png",)),
        "empty": ("empty.png", b"", ("empty",)),
        "no-pixels": ("header.dcm", dicom_without_pixels(tmp_path / "h.dcm"), ("pixel",)),
    }[case]
    r = client.post("/annotate", files={"file": (name, data)})
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert all(w.lower() in detail.lower() for w in words), detail
    assert "/tmp" not in detail and "cxr-upload" not in detail  # the server's temp file stays private
    assert client.get("/health").json()["status"] == "ok"


def test_a_refused_upload_gets_422_with_the_reason_and_force_reads_it(client):
    from PIL import Image
    from skimage.data import astronaut

    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)).save(noise, "PNG")
    photo = io.BytesIO()
    Image.fromarray(astronaut()).save(photo, "JPEG")
    for name, data, why in (("noise.png", noise.getvalue(), "looks like noise"),
                            ("photo.jpg", photo.getvalue(), "a colour picture")):
        r = client.post("/annotate", files={"file": (name, data)})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"{name}: not read: {why}")
    r = client.post("/annotate", params={"force": "true"}, files={"file": ("noise.png", noise.getvalue())})
    assert r.status_code == 200, r.text
    quality = r.json()["quality"]
    assert quality["forced"] and not quality["accepted"] and quality["reasons"][0].startswith("looks like noise")
    assert r.json()["scores"]


def test_a_film_stored_on_its_side_is_read_stored_and_served_upright(client, radiographs):
    from PIL import Image

    from cxr.images import load_image

    film = (load_image(radiographs[33]) * 255).round().astype(np.uint8)  # 8 or 16-bit PNG
    buf = io.BytesIO()
    Image.fromarray(np.rot90(film).copy()).save(buf, "PNG")
    r = client.post("/annotate", params={"store": "true", "image": "true"},
                    files={"file": ("turned.png", buf.getvalue())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["quality"]["rotation"] == 90 and "turned back" in body["quality"]["notes"][0]
    assert body["image_size"] == list(film.shape) and png_size(body["image"]) == film.shape
    record = client.get(f"/studies/{body['id']}").json()
    assert record["quality"]["rotation"] == 90
    served = np.asarray(Image.open(io.BytesIO(client.get(f"/studies/{body['id']}/image").content)))
    assert served.shape == film.shape and np.abs(served.astype(int) - film).max() <= 1


def test_oversized_upload_is_refused_with_413(client):
    big = np.random.default_rng(0).bytes(int(1.5 * 2**20))
    r = client.post("/annotate", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit is 1 MiB" in r.json()["detail"]

    body = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--xyz--\r\n")

    def chunks():  # no Content-Length: counted as it streams
        step = 64 << 10
        for i in range(0, len(body), step):
            yield body[i:i + step]
    r = client.post("/annotate", content=chunks(),
                    headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_studies_image_and_search(client, service):
    studies = client.get("/studies", params={"limit": 100}).json()
    assert studies["total"] >= 7 and len(studies["items"]) == studies["total"]
    first = studies["items"][0]
    assert first["findings"] is not None and first["image_url"] == f"/studies/{first['id']}/image"
    assert "embedding" not in first
    page = client.get("/studies", params={"limit": 2, "offset": 1}).json()["items"]
    assert [p["id"] for p in page] == [s["id"] for s in studies["items"][1:3]]

    one = client.get(f"/studies/{first['id']}", params={"heatmap": "true"}).json()
    assert one["id"] == first["id"] and "path" not in one and "path" not in first  # ids, not paths
    diseases = {f["disease"] for f in one["findings"] if f["disease"] != "normal"}
    assert diseases <= set(one["heatmaps"]) and {k.split(":")[0] for k in one["heatmaps"]} == diseases
    image = client.get(f"/studies/{first['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    from PIL import Image

    h, w = first["image_size"]
    assert Image.open(io.BytesIO(image.content)).size == (w, h)
    assert client.get("/studies/999999").status_code == 404
    assert client.get("/studies/999999/image").status_code == 404

    # structured search: exactly the images with that finding, above the score
    finding = first["findings"][0]
    everything = {s["id"]: s for s in studies["items"]}
    cut = finding["score"]
    hits = client.get("/search", params={"finding": finding["disease"], "min_score": cut}).json()
    expect = {i for i, s in everything.items()
              if any(f["disease"] == finding["disease"] and f["score"] >= cut for f in s["findings"])}
    assert {h["id"] for h in hits["items"]} == expect and first["id"] in expect
    assert hits["query"] == {"finding": finding["disease"], "min_score": cut}
    words = client.get("/search", params={"q": finding["annotation"]}).json()["items"]
    assert first["id"] in {h["id"] for h in words}
    assert client.get("/search", params={"finding": "Pneumothorax"}).json()["items"] == []

    # similar images: not itself, nearest first
    like = client.get("/search", params={"like_id": first["id"], "k": 3}).json()["items"]
    assert len(like) == 3 and first["id"] not in {h["id"] for h in like}
    assert [h["distance"] for h in like] == sorted(h["distance"] for h in like)
    assert client.get("/search", params={"like_id": 999999}).status_code == 404
    assert client.get("/search", params={"min_score": 3}).status_code == 422
    vocab = client.get("/vocabulary").json()
    assert finding["disease"] in vocab["diseases"]


def test_store_indexes_the_upload_under_the_server_folder(client, service, radiographs):
    base, reader, tmp = service
    png = radiographs[30]
    before = client.get("/health").json()["archive"]["images"]
    # a path-like name is only a name: nothing is read or written there
    r = client.post("/annotate", params={"store": "true", "embedding": "true"},
                    files={"file": ("../../../../etc/passwd.png", png.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["filename"] == "passwd.png"
    record = client.get(f"/studies/{body['id']}").json()
    assert "path" not in record and str(tmp) not in json.dumps(record)
    stored = [p for p in (tmp / "uploads").rglob("*") if p.is_file()]
    assert png.read_bytes() in [p.read_bytes() for p in stored]
    assert client.get("/health").json()["archive"]["images"] == before + 1
    again = client.post("/annotate", params={"store": "true"}, files={"file": ("x.png", png.read_bytes())})
    assert again.json()["id"] == body["id"]  # same content, same model: one row
    # more like this, from the embedding of an upload: the stored copy comes first
    like = client.post("/search/similar", json={"embedding": body["embedding"], "k": 2}).json()["items"]
    assert like[0]["id"] == body["id"] and like[0]["distance"] < 1e-3


def test_concurrent_requests_are_batched_and_answered_correctly(client, service, radiographs):
    from cxr.images import load_image

    base, reader, _ = service
    pngs = radiographs[40:48]
    before = client.get("/health").json()["batching"]

    async def post_all():
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            return await asyncio.gather(*(
                c.post("/annotate", files={"file": (p.name, p.read_bytes())}) for p in pngs))

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * 8
    for p, r in zip(pngs, responses):  # each answer belongs to its own upload
        assert r.json()["filename"] == p.name
        assert r.json()["scores"] == pytest.approx(reader(load_image(p)).scores, abs=1e-5)
    after = client.get("/health").json()["batching"]
    assert after["items"] - before["items"] == 8
    assert after["batches"] - before["batches"] < 8
    assert after["max_batch_seen"] > 1


def test_micro_batcher_batches_and_a_bad_item_fails_alone():
    from cxr.service.batching import MicroBatcher

    calls: list[list[str]] = []

    def upper(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    async def go():
        batcher = MicroBatcher(upper, max_batch=4, max_wait_ms=50)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(x) for x in ["a", "b", "bad", "c", "d", "e"]),
                                        return_exceptions=True), batcher.stats
        finally:
            await batcher.stop()

    out, stats = asyncio.run(go())
    assert out[:2] == ["A", "B"] and out[3:] == ["C", "D", "E"]
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad item"
    assert calls[0] == ["a", "b", "bad", "c"] and ["bad"] in calls and calls[-1] == ["d", "e"]
    assert stats.max_batch_seen == 4 and stats.items == 6


def test_serve_start_up_errors_are_one_line(tiny_run, tmp_path, capsys):
    """A port in use or out of range, an unknown host, a file as --upload-dir or as the SQLite
    database: `cxr serve` says so in one line and exits 2, before serving anything."""
    import socket

    from cxr.cli import main

    not_db = tmp_path / "notes.db"
    not_db.write_text("not a database\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            f"cannot listen on 127.0.0.1:{port}": ["--port", str(port)],
            "--port must be 0-65535": ["--port", "70000"],
            "cannot resolve --host": ["--host", "no.such.host.invalid"],
            "--upload-dir is a file": ["--port", "0", "--upload-dir", str(not_db)],
            "file is not a database": ["--port", "0", "--db", f"sqlite:///{not_db}"],
            "refusing to serve 0.0.0.0 without tokens": ["--port", "0", "--host", "0.0.0.0"],
            "--tls-cert and --tls-key go together": ["--port", "0", "--tls-cert", str(not_db)],
            "TLS file not found": ["--port", "0", "--tls-cert", str(not_db), "--tls-key", "nope.pem"],
            "tokens file not found": ["--port", "0", "--tokens", str(tmp_path / "none.txt")],
        }
        for words, extra in cases.items():
            assert main(["serve", str(tiny_run), *extra]) == 2, words
            err = capsys.readouterr().err
            assert words in err and "Traceback" not in err and err.count("\n") == 1, err
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2  # a folder that is not a run
    err = capsys.readouterr().err
    assert "not a trained run" in err and str(tmp_path) in err and err.count("\n") == 1, err
