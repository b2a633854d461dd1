"""`cxr index` and `cxr search` end to end with the real tiny run on real files: NIH radiographs
(PNG), DICOM written with pydicom, a corrupt file; re-runs, a kill -9 in the middle, --like."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import chest_film, view_noting_reader

from cxr.cli import main

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-837261"


def write_chest_dicom(path: Path, seed: int, **kwargs) -> Path:
    """A DICOM of a real NIH film (another one per seed; the quality gate refuses drawings)."""
    from cxr.dicom import write_dicom

    image = chest_film(200 + seed, (96, 96))
    return write_dicom(path, image.astype(np.float32), patient_id=PATIENT_ID,
                       extra={"PatientName": PATIENT_NAME, "PatientBirthDate": "19500101"},
                       **kwargs)


@pytest.fixture
def archive_folder(tmp_path, radiographs):
    """a/ 3 PNG; a/b/ 2 PNG, a DICOM, a DICOM without suffix; a corrupt PNG; a text file."""
    root = tmp_path / "pacs"
    (root / "a" / "b").mkdir(parents=True)
    pngs = radiographs[:5]
    for i, png in enumerate(pngs):
        shutil.copy(png, root / "a" / ("b" if i >= 3 else "") / png.name)
    write_chest_dicom(root / "a" / "b" / "chest.dcm", 1)
    write_chest_dicom(root / "a" / "b" / "IM0002", 2)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_index_a_nested_folder_then_search(tiny_run, archive_folder, tmp_path, capsys):
    from cxr.archive.db import Archive
    from cxr.reader import Reader
    from service_helpers import run_asserting_every_finding

    # every disease reported: the search below needs stored findings, whatever the tiny model learnt
    run = run_asserting_every_finding(tiny_run, tmp_path / "run")

    db = tmp_path / "archive.db"
    url = f"sqlite:///{db}"
    dicom_out = tmp_path / "dicom-out"
    assert main(["index", str(run), str(archive_folder), "--db", url, "--batch-size", "3",
                 "--quiet", "--json", "-", "--dicom-out", str(dicom_out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["indexed"], stats["failed"], stats["skipped"]) == (7, 1, 0)
    assert stats["failures"][0][0].endswith("broken.png")

    archive = Archive(url)
    model_id = Reader.load(run).model_id
    assert archive.models() == [model_id]
    (failed,) = archive.search(status="failed")
    assert failed.path == str(archive_folder / "a" / "broken.png") and failed.reason
    images = {Path(h.path).name: h for h in archive.search(limit=100)}
    assert set(images) == {p.name for p in archive_folder.rglob("*")
                           if p.suffix in (".png", ".dcm", "") and p.is_file()} - {"broken.png"}
    import pydicom

    source = pydicom.dcmread(archive_folder / "a" / "b" / "chest.dcm")
    dcm = images["chest.dcm"]
    assert (dcm.study_uid, dcm.series_uid, dcm.sop_uid) == (
        source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    assert images["IM0002"].study_uid and images[nih_pngs_name(archive_folder)].study_uid is None
    assert all(h.scores and h.image_size for h in images.values())

    # nothing that identifies the patient reaches the database (file, WAL, vectors)
    archive.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("archive.db*") if p.is_file())
    for secret in (b"Doe", b"Jane", PATIENT_ID.encode(), b"19500101"):
        assert secret not in stored

    # the DICOM results join the source study
    srs = sorted(dicom_out.glob("*.sr.dcm"))
    assert len(srs) == 7
    studies = {pydicom.dcmread(p).StudyInstanceUID for p in srs}
    assert source.StudyInstanceUID in studies

    # a second run skips everything; the archive is unchanged
    assert main(["index", str(run), str(archive_folder), "--db", url, "--quiet",
                 "--json", "-"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["indexed"], again["failed"], again["skipped"]) == (0, 0, 8)
    # the archive holds 7 images read and the broken one, counted apart (as the web page does)
    assert (again["archive_images"], again["archive_failed"]) == (7, 1)

    # structured search returns exactly the images whose stored findings match
    archive = Archive(url)
    everything = archive.search(limit=100)
    finding = next(f for h in everything for f in h.findings)
    expect = {h.id for h in everything if any(
        f.disease == finding.disease and f.side == (finding.side or f.side) for f in h.findings)}
    args = ["search", "--finding", finding.disease, "--db", url, "--json", "--limit", "100"]
    if finding.side:
        args += ["--side", finding.side]
    assert main(args) == 0
    found = json.loads(capsys.readouterr().out)
    assert {h["id"] for h in found} == expect
    assert [h["score"] for h in found] == sorted((h["score"] for h in found), reverse=True)

    # similar-image search from a file: the file itself comes first
    png = archive_folder / "a" / nih_pngs_name(archive_folder)
    assert main(["search", "--like", str(png), "--db", url, "--json",  # the indexing run
                 "--limit", "3"]) == 0
    like = json.loads(capsys.readouterr().out)
    assert like[0]["path"] == str(png) and like[0]["distance"] < 1e-3
    assert main(["search", "--like-id", str(like[0]["id"]), "--db", url, "--json"]) == 0
    assert like[0]["id"] not in {h["id"] for h in json.loads(capsys.readouterr().out)}


def nih_pngs_name(root: Path) -> str:
    return sorted(p.name for p in (root / "a").glob("*.png") if p.name != "broken.png")[0]


def test_kill_9_mid_run_then_resume_loses_and_duplicates_nothing(tiny_run, radiographs, tmp_path):
    from cxr.archive.db import Archive

    folder = tmp_path / "many"
    folder.mkdir()
    pngs = radiographs[:24]
    for png in pngs:
        shutil.copy(png, folder / png.name)
    db = tmp_path / "crash.db"
    url = f"sqlite:///{db}"
    Archive(url).close()  # create it, so the test can watch it from the start
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "cxr.cli", "index", str(tiny_run), str(folder),
                             "--db", url, "--batch-size", "2", "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with sqlite3.connect(db, timeout=5) as conn:
                committed = conn.execute("select count(*) from images").fetchone()[0]
            if committed >= 2:  # the first batch is committed: kill it now
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and committed < 2:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    with sqlite3.connect(db) as conn:
        after_kill = conn.execute("select count(*) from images").fetchone()[0]
    assert 2 <= after_kill < len(pngs), "the run must be killed part way"
    assert after_kill % 2 == 0  # whole batches only: a batch is one transaction

    assert main(["index", str(tiny_run), str(folder), "--db", url, "--batch-size", "2",
                 "--quiet"]) == 0
    archive = Archive(url)
    rows = archive.search(limit=1000)
    assert len(rows) == len(pngs) == archive.count()
    assert sorted(Path(r.path).name for r in rows) == sorted(p.name for p in pngs)
    assert len({r.sha256 for r in rows}) == len(pngs)
    # the vector index caught up with the rows the killed run never added to it
    model_id = rows[0].model_id
    assert len(archive.sync_vectors(model_id)) == len(pngs)
    assert len(archive.similar(image_id=rows[-1].id, k=len(pngs))) == len(pngs) - 1


def test_a_sources_recorded_view_reaches_the_archive_and_the_reader(tiny_run, radiographs, tmp_path):
    """A PNG says no view; its source does (a manifest's `view` column here, NIH's View Position
    alike): the archive stores it, and the Reader takes it as it takes a DICOM's ViewPosition
    (no cardiothoracic ratio on an AP film); a DICOM's own tag comes first."""
    from cxr.archive import Archive
    from cxr.archive.index import SourceImage, index_images, iter_inputs

    folder = tmp_path / "export"
    folder.mkdir()
    names = []
    for png in radiographs[:3]:
        shutil.copy(png, folder / png.name)
        names.append(png.name)
    write_chest_dicom(folder / "pa.dcm", 5, view="PA")
    (folder / "manifest.csv").write_text(f"path,view\n{names[0]},AP\n{names[1]},pa\n{names[2]},\npa.dcm,AP\n")
    items = list(iter_inputs(f"folder:{folder},manifest.csv", reports=True))
    assert all(isinstance(i, SourceImage) for i in items)
    assert {Path(i.path).name: i.view for i in items} == {names[0]: "AP", names[1]: "pa", names[2]: None,
                                                          "pa.dcm": "AP"}
    reader = view_noting_reader(tiny_run)
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    stats = index_images(archive, reader, items, batch_size=8, progress=False)
    assert stats.indexed == 4 and stats.failed == 0
    by_name = {Path(h.path).name: h.view for h in archive.search(limit=10)}
    assert by_name == {names[0]: "AP", names[1]: "PA", names[2]: None, "pa.dcm": "PA"}
    assert sorted(sum(reader.seen, []), key=str) == sorted(["AP", "PA", None, "PA"], key=str)
    archive.close()
