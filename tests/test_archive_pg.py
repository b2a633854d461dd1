"""The same archive on a real PostgreSQL server: a throwaway cluster started here with Debian's
`initdb`/`pg_ctl` on a free loopback port (as the `postgres` user when the tests run as root)."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import chest_film, needs_in_ci
from service_helpers import run_asserting_every_finding


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _pg_bin()
    needs_in_ci(bindir is not None and (bindir / "initdb").exists(), "PostgreSQL")
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    if as_root:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    run = lambda *args: subprocess.run(prefix + list(args), check=True, capture_output=True,  # noqa: E731
                                       timeout=60)
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "cxr", "--auth=trust", "-E", "UTF8",
            "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "30", "-l", str(root / "log"),
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL: {exc.stderr.decode()[-1000:]} {log[-1000:]}")
    try:
        yield f"postgresql://cxr@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                 "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_index_and_search_on_postgresql(postgres_url, tiny_run, radiographs, tmp_path):
    from cxr.archive.db import Archive, Entry
    from cxr.archive.index import index_images, iter_inputs
    from cxr.dicom import write_dicom
    from cxr.reader import Reader

    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    for png in radiographs[:4]:
        shutil.copy(png, folder / png.name)
    write_dicom(folder / "x.dcm", chest_film(400, (64, 64)),  # a film: the gate refuses noise
                extra={"PatientName": "Doe^Jane"})
    (folder / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02")

    reader = Reader.load(run_asserting_every_finding(tiny_run, tmp_path / "run"))  # findings to search
    archive = Archive(postgres_url, vector_dir=tmp_path / "vectors")
    assert archive.engine.dialect.name == "postgresql"
    stats = index_images(archive, reader, iter_inputs(tmp_path / "in"), batch_size=2,
                         progress=False)
    assert (stats.indexed, stats.failed) == (5, 1)
    again = index_images(archive, reader, iter_inputs(tmp_path / "in"), batch_size=4,
                         progress=False)
    assert (again.indexed, again.skipped) == (0, 6) and archive.count() == 6

    # the unique key holds on PostgreSQL too (ON CONFLICT DO NOTHING)
    row = archive.search(limit=1)[0]
    assert archive.add_results([Entry("/other/place.png", row.sha256, row.model_id,
                                      error="dup")]) == [None]

    hits = archive.search(limit=100)
    assert len(hits) == 5 and all(h.scores for h in hits)
    assert all(h.findings for h in hits)
    for finding in {(f.disease, f.side): f for h in hits for f in h.findings}.values():
        found = archive.search(finding=finding.disease, side=finding.side, limit=100)
        expected = {h.id for h in hits if any(f.disease == finding.disease and f.side == (finding.side or f.side)
                                              for f in h.findings)}
        assert {h.id for h in found} == expected
    target = sorted(hits[0].scores)[0]
    above = archive.search(scores={target: 0.5}, limit=100)  # JSON path on PostgreSQL
    assert {h.id for h in above} == {h.id for h in hits if h.scores[target] >= 0.5}
    (failed,) = archive.search(status="failed")
    assert failed.path.endswith("bad.dcm") and failed.reason

    near = archive.similar(image_id=hits[0].id, k=10)
    assert len(near) == 4 and hits[0].id not in {h.id for h in near}
    # a second process sees the same archive and the saved vector index
    other = Archive(postgres_url, vector_dir=tmp_path / "vectors")
    assert other.uuid == archive.uuid
    assert [h.id for h in other.similar(image_id=hits[0].id, k=10)] == [h.id for h in near]
    from sqlalchemy import text

    with archive.engine.connect() as conn:
        dump = conn.execute(text("select string_agg(images::text, ' ') from images")).scalar()
    assert "Doe" not in dump
    archive.close()
    other.close()


def test_reports_full_text_and_disagreement_on_postgresql(postgres_url, tmp_path):
    """The same planted reports as test_archive_reports.py, through to_tsvector/plainto_tsquery
    (and the GIN index migration 0003 builds) on a real server."""
    from sqlalchemy import text
    from test_archive_reports import CASES, MODEL, result

    from cxr.archive.db import Archive, Entry
    from cxr.archive.reports import mine_reports, prepare_report

    archive = Archive(postgres_url, vector_dir=tmp_path / "vectors")
    model = MODEL + "-pg"  # the module's archive is shared: a model of its own
    entries = [Entry(f"/pg/{name}.png", f"{i + 1000:064x}", model, result=result(diseases, i),
                     report=prepare_report(report))
               for i, (name, (diseases, report)) in enumerate(CASES.items())]
    mine_reports([e.report for e in entries])
    ids = dict(zip(CASES, archive.add_results(entries)))
    assert all(ids.values())
    name = {v: k for k, v in ids.items()}
    found = lambda **kw: {name[h.id] for h in archive.search(model_id=model, **kw)}  # noqa: E731
    assert found(report="effusions") == {"agree_effusion", "report_only_effusion"}
    assert found(report="right pleural effusion") == {"agree_effusion"}
    assert found(text="cardiomegaly", report="mild") == {"markup_cardio"}
    assert found(disagree="report-only") == {"report_only_effusion"}
    assert found(disagree="model-only") == {"model_only_cardio"}
    assert "not UTF-8" in archive.get(ids["not_utf8"]).report_note
    agree = archive.get(ids["agree_effusion"])  # mention offsets (migration 0004) on PostgreSQL
    assert [agree.report[slice(*f["span"])] for f in agree.report_findings if f["span"]] == [
        "pleural effusion", "effusion"]
    with archive.engine.connect() as conn:
        assert conn.execute(text("select count(*) from pg_indexes where "
                                 "indexname = 'ix_reports_fts'")).scalar() == 1
    archive.close()
