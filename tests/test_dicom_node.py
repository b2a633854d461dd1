"""The DICOM node and DICOMweb against real servers on loopback: Orthanc (with its DICOMweb plugin)
as the PACS, dcmtk's storescu/echoscu as the modality, `cxr listen` and `cxr index` as
subprocesses. Skipped locally when Orthanc or dcmtk are missing; in CI (.ci/run installs them)
nothing skips."""
from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import chest_film, needs_in_ci
from cxr.cli import main
from dicom_servers import (Node, Orthanc, acknowledged, echoscu, free_port, have_dcmtk,
                           have_orthanc, storescu, wait_for)

PATIENT = "PAT-0042-SECRET"


@pytest.fixture(scope="module")
def servers_available():
    needs_in_ci(have_dcmtk(), "dcmtk (storescu, echoscu: apt-get install dcmtk)")
    needs_in_ci(have_orthanc(), "Orthanc with DICOMweb (apt-get install orthanc orthanc-dicomweb)")
    for module in ("pynetdicom", "dicomweb_client"):
        needs_in_ci(importlib.util.find_spec(module) is not None, f"{module} (pip install 'cxr[net]')")


def write_films(folder: Path, n: int, size: int, first: int = 0) -> list[Path]:
    from cxr.dicom import write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    return [write_dicom(folder / f"film{i:03d}.dcm", chest_film(i % 8, (size, size)),
                        modality="DX", patient_id=PATIENT) for i in range(first, first + n)]


def sop_uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def study_uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def archive_sop_counts(db_url: str) -> dict[str, int]:
    db = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        return dict(db.execute("SELECT sop_uid, COUNT(*) FROM images GROUP BY sop_uid"))
    finally:
        db.close()


@pytest.fixture(scope="module")
def pacs(servers_available, tiny_run, tmp_path_factory):
    """Orthanc, which knows the node, and the node, which sends its results to Orthanc."""
    work = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = Orthanc(work / "orthanc", {"cxr": ("CXR", node_port)})
    node = Node(tiny_run, work / "node", allow=("MOD", "ORTHANC"), port=node_port,
                send_to=f"{orthanc.ae}@127.0.0.1:{orthanc.dicom_port}")
    try:
        node.start()
        yield orthanc, node
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.kill9()  # safe at any moment (the journal), and quicker than torch's exit
        orthanc.stop()


def test_storescu_to_node_to_orthanc(pacs, tmp_path):
    """A modality pushes films; each one's SR + overlay arrive in the PACS, filed in the film's
    study; the archive holds each film once and no patient identifier."""
    orthanc, node = pacs
    assert echoscu("MOD", node.port).returncode == 0
    films = write_films(tmp_path / "films", 3, 256)
    sent = storescu("MOD", node.port, films, verbose=True)
    assert sent.returncode == 0, sent.stderr
    assert len(acknowledged(sent.stderr + sent.stdout)) == 3
    counts = node.wait_processed(3)
    assert counts["states"]["sent"] == 3, (counts, node.text()[-2000:])
    srs = orthanc.instances(Modality="SR")
    studies = {study_uid(f) for f in films}
    assert len(srs) == 3
    assert {sr["MainDicomTags"].get("SOPInstanceUID") for sr in srs}  # stored by SOP UID
    sr_studies = {orthanc.get(f"/instances/{sr['ID']}/study")["MainDicomTags"]["StudyInstanceUID"]
                  for sr in srs}
    assert sr_studies == studies
    assert len(orthanc.instances(Modality="OT")) == 3  # the overlays (Secondary Capture)
    assert sorted(archive_sop_counts(node.db)) == sorted(sop_uid(f) for f in films)
    db_bytes = Path(node.db.removeprefix("sqlite:///")).read_bytes()
    assert PATIENT.encode() not in db_bytes


def test_orthanc_forwards_a_film_to_the_node(pacs, tmp_path):
    """The PACS routes a film to the node (C-STORE from Orthanc, an allowed AE); the results
    come back into the PACS, in the film's study."""
    import urllib.request

    orthanc, node = pacs
    film = write_films(tmp_path / "films", 1, 256, first=20)[0]
    req = urllib.request.Request(orthanc.url + "/instances", data=film.read_bytes(),
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=30) as r:
        orthanc_id = json.loads(r.read())["ID"]
    journalled = node.journal()["instances"]
    sent = orthanc.post("/modalities/cxr/store", {"Resources": [orthanc_id], "Synchronous": True})
    assert sent["FailedInstancesCount"] == 0, sent
    node.wait_processed(journalled + 1)
    study = study_uid(film)
    srs = [sr for sr in orthanc.instances(Modality="SR", StudyInstanceUID=study)]
    assert len(srs) == 1


def test_listen_with_the_onnx_engine_reads_as_torch_does(servers_available, tiny_run, tmp_path):
    """`cxr listen --engine onnxruntime` runs the graph `cxr export --onnx` wrote: a film pushed
    to it is archived with the findings the PyTorch Reader gives the same file, scores within
    1e-3."""
    needs_in_ci(importlib.util.find_spec("onnxruntime") is not None, "onnxruntime (pip install 'cxr[fast]')")
    import cxr
    from service_helpers import run_asserting_every_finding

    run = run_asserting_every_finding(tiny_run, tmp_path / "run")  # findings to compare
    assert main(["export", str(run), "--onnx"]) == 0
    film = write_films(tmp_path / "films", 1, 256, first=5)[0]
    node = Node(run, tmp_path / "node", extra=("--engine", "onnxruntime")).start()
    try:
        assert storescu("MOD", node.port, [film]).returncode == 0
        node.wait_processed(1)
    finally:
        node.kill9()
    assert "(onnxruntime)" in node.text()
    db = sqlite3.connect(node.db.removeprefix("sqlite:///"))
    try:
        (scores,), = db.execute("SELECT scores FROM images").fetchall()
        archived = sorted(db.execute("SELECT disease, score FROM findings").fetchall())
    finally:
        db.close()
    want = cxr.Reader.load(run, device="cpu")(film)  # torch, with the gate, as the node reads
    assert want.quality.accepted and want.findings
    scores = json.loads(scores)
    assert set(scores) == set(want.scores)
    assert all(abs(scores[t] - s) < 1e-3 for t, s in want.scores.items())
    assert [d for d, _ in archived] == sorted(f.disease for f in want.findings)
    assert all(abs(s - {f.disease: f.score for f in want.findings}[d]) < 1e-3 for d, s in archived)


def test_bad_associations_are_refused_and_logged(pacs, tmp_path):
    """Unknown calling AE, a SOP class that is no chest film, a dataset without pixels and one
    that cannot be decoded: each refused with its DICOM status and a log line; the node serves
    on."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE
    from pynetdicom import _config as pynetdicom_config

    from cxr.dicom import write_dicom

    _, node = pacs
    journalled = node.journal()["instances"]
    intruder = echoscu("INTRUDER", node.port)
    assert intruder.returncode != 0 and "Calling AE Title Not Recognized" in intruder.stderr

    ct = write_dicom(tmp_path / "ct.dcm", np.zeros((64, 64), np.float32), modality="CT")
    ds = pydicom.dcmread(ct)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    ds.save_as(ct)
    out = storescu("MOD", node.port, [ct])
    assert out.returncode != 0 and "No Acceptable Presentation Contexts" in out.stderr

    no_pixels = write_dicom(tmp_path / "nopix.dcm", np.zeros((64, 64), np.float32))
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    out = storescu("MOD", node.port, [no_pixels], verbose=True)
    assert "DataSetDoesNotMatchSOPClass" in out.stderr + out.stdout

    garbage = tmp_path / "garbage.dcm"  # good file meta, a dataset that ends inside an element
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(garbage, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(f, meta)
        f.write(b"\x08\x00\x16\x00UI\x40\x00" + b"1.2.3")
    ae = AE(ae_title="MOD")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR")
    assert assoc.is_established
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes undecoded
    try:
        status = assoc.send_c_store(garbage)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    assert status.Status == 0xC210

    assert echoscu("MOD", node.port).returncode == 0  # still serving
    time.sleep(0.5)
    log = node.text()
    assert "association from INTRUDER@127.0.0.1" in log and "rejected" in log
    assert "refused presentation contexts" in log and "CT Image Storage" in log
    assert "0xA900" in log and "0xC210" in log
    assert node.journal()["instances"] == journalled  # none of these reached the journal


def test_dicomweb_index_stows_results_back(pacs, tiny_run, tmp_path, capsys):
    """Films in the PACS -> `cxr index RUN dicomweb:URL` -> SR + overlay back in their studies;
    a second run fetches and stores nothing new."""
    import pydicom
    from test_dicom_reports import FINDINGS, IMPRESSION, text_sr

    orthanc, _ = pacs
    films = write_films(tmp_path / "films", 2, 256, first=10)
    # the radiologist's report of the first film's study, a text SR in the PACS beside it
    report = text_sr(tmp_path / "films" / "report.dcm", pydicom.dcmread(films[0]), FINDINGS,
                     IMPRESSION)
    sent = storescu("MOD", orthanc.dicom_port, films + [report], called=orthanc.ae)
    assert sent.returncode == 0, sent.stderr
    before = len(orthanc.instances(Modality="SR"))
    db = f"sqlite:///{tmp_path / 'web.db'}"
    args = ["index", str(tiny_run), f"dicomweb:{orthanc.dicomweb}", "--db", db,
            "--spool", str(tmp_path / "spool"), "--quiet", "--json", "-"]

    def index() -> dict:  # in this process: the CLI as users call it, without a second start-up
        capsys.readouterr()
        assert main(args) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    in_pacs = len(orthanc.instances(Modality="DX"))  # these 2 and any an earlier test put there
    stats = index()
    # the node's SRs and overlays in the PACS are no films: only the films are read
    assert stats["indexed"] + stats["failed"] == in_pacs
    assert stats["stowed"] == 2 * stats["indexed"]
    assert stats["indexed"] >= 1
    srs = orthanc.instances(Modality="SR")
    assert len(srs) == before + stats["indexed"]
    studies = {orthanc.get(f"/instances/{sr['ID']}/study")["MainDicomTags"]["StudyInstanceUID"]
               for sr in srs}
    assert {study_uid(f) for f in films} <= studies
    # the report SR became its study's report; cxr's own SRs in the PACS are none
    assert stats["reports"] == 1
    from cxr.archive.db import Archive

    with Archive(db) as archive:
        reported = {h.sop_uid: h for h in archive.search(report="effusion", limit=50)}
    assert set(reported) == {sop_uid(films[0])}
    assert reported[sop_uid(films[0])].report == f"FINDINGS: {FINDINGS}\nIMPRESSION: {IMPRESSION}"
    again = index()
    assert again["stowed"] == 0 and again["skipped"] == in_pacs and again["reports"] == 1
    assert len(orthanc.instances(Modality="SR")) == len(srs)


def test_kill9_mid_stream_every_acknowledged_instance_once(servers_available, tiny_run, tmp_path):
    """40 films pushed; `cxr listen` killed with SIGKILL mid-stream; the modality sends again
    what was not acknowledged (here: everything, as a cautious modality would); after the
    restart the archive holds every instance exactly once."""
    films = write_films(tmp_path / "films", 40, 128)
    uids = {str(f): sop_uid(f) for f in films}
    node = Node(tiny_run, tmp_path / "node", batch_size=8).start()
    push = subprocess.Popen(["storescu", "-R", "-v", "-aet", "MOD", "-aec", "CXR", "127.0.0.1",
                             str(node.port), *map(str, films)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # storescu sends one instance at a time and waits for its answer, so a 13th in the
        # journal means the 12th was acknowledged (the 12th alone may be journalled with its
        # answer still in flight when the node dies)
        wait_for(lambda: node.journal()["instances"] >= 13, 120, "13 instances received")
        node.kill9()
        out, _ = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
    acked = {uids[f] for f in acknowledged(out)}
    journalled = node.journal()
    print(f"before kill -9: {len(acked)} acknowledged, {journalled['instances']} journalled, "
          f"states {journalled['states']}")
    assert 12 <= len(acked) < 40
    node.start()
    again = storescu("MOD", node.port, films, verbose=True)
    assert len(acknowledged(again.stderr + again.stdout)) == 40
    counts = node.wait_processed(40)
    node.kill9()
    per_sop = archive_sop_counts(node.db)
    print(f"after restart: journal {counts}, archive rows {sum(per_sop.values())}")
    assert acked <= set(per_sop)
    assert set(per_sop) == set(uids.values()) and set(per_sop.values()) == {1}
    assert counts["instances"] == 40 and counts["states"]["done"] == 40


@pytest.mark.parametrize("args, problem", [
    (["--port", "11112"], "--allow"),
    (["--allow", "MOD", "--send-to", "PACS:104"], "expected AE@HOST:PORT"),
    (["--allow", "MOD", "--ae-title", "A_TITLE_TOO_LONG_X"], "1 to 16 characters"),
])
def test_listen_refuses_bad_options_in_one_line(tmp_path, capsys, args, problem):
    assert main(["listen", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1


def test_index_refuses_a_dicomweb_source_that_is_no_url(tmp_path, capsys):
    assert main(["index", str(tmp_path), "dicomweb:pacs/dicom-web", "--db",
                 f"sqlite:///{tmp_path / 'a.db'}"]) == 2
    assert "dicomweb:http(s)://" in capsys.readouterr().err
