"""The DICOM node under load: N instances pushed at once by parallel dcmtk `storescu` processes to
`cxr listen` (a real subprocess on loopback), then a `kill -9` mid-stream and a restart.

1. Load: N small DX instances (distinct SOP Instance UIDs) from S storescu processes at once.
   Figures: how many were acknowledged, journalled and archived (none may be lost), the rate at
   which the node acknowledges (spool + fsync + journal before each success status), the rate at
   which it reads them (quality gate + Reader + archive + SR/SC written), and the latency from an
   instance's receipt to its results (journal timestamps, p50/p95/max).
2. kill -9: the same push to a fresh node, killed with SIGKILL once a third is journalled; the
   modality sends again what was not acknowledged (as storescu's users do); the node restarts on
   the same spool. Figures: acknowledged before the kill, re-sent, archive rows, distinct SOP
   Instance UIDs, duplicates (must be 0), acknowledged instances missing (must be 0), and how many
   instances the Reader started twice (the batch in flight when the process died: their results
   were never committed, so they count once in the archive).

With Orthanc installed it is the destination: the node C-STOREs each film's SR and overlay there,
and the SRs in Orthanc are counted (one per film read; `--no-pacs`: results only archived).

The Reader is a tiny trained cascade (`cxr.testing.make_tiny_run`) unless --run is given: this
measures the node (network, spool, journal, batching, archive), not the CNN.

    python benchmarks/dicom_node.py [--n 1000] [--senders 4] [--size 128] [--run RUN] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cxr.metrics import markdown_table  # noqa: E402
from dicom_servers import (Node, Orthanc, acknowledged, have_dcmtk, have_orthanc,  # noqa: E402
                           wait_for)


def source_films(k: int, size: int) -> list[np.ndarray]:
    """k chest films: real NIH radiographs from the data cache where present, else phantom ones."""
    from cxr.data import data_dir
    from cxr.images import load_image, resize

    nih = sorted((data_dir() / "nih" / "bbox256" / "images").glob("*.png"))[:k]
    if nih:
        return [resize(load_image(p), (size, size)) for p in nih]
    from cxr.phantom.render import Phantom

    phantom = Phantom.load()
    return [phantom.render([], seed=i, size=size).image for i in range(k)]


def write_films(folder: Path, n: int, size: int) -> dict[str, str]:
    """n DX files (a few distinct films, each instance its own study and SOP Instance UID);
    returns {path: SOP Instance UID}."""
    from pydicom.uid import generate_uid

    from cxr.dicom import write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    films = source_films(16, size)
    out = {}
    for i in range(n):
        uid = generate_uid()
        path = write_dicom(folder / f"{i:05d}.dcm", films[i % len(films)], modality="DX",
                           sop_uid=uid, patient_id=f"BENCH{i:05d}")
        out[str(path)] = uid
    return out


def push(port: int, files: list[str], senders: int) -> list[subprocess.Popen]:
    """`senders` storescu processes at once, each with its share of the files."""
    procs = []
    for s in range(senders):
        share = files[s::senders]
        if share:
            procs.append(subprocess.Popen(
                ["storescu", "-R", "-v", "-aet", "MOD", "-aec", "CXR", "127.0.0.1", str(port),
                 *share], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def collect(procs: list[subprocess.Popen]) -> list[str]:
    acked = []
    for p in procs:
        out, _ = p.communicate()
        acked += acknowledged(out)
    return acked


def journal_rows(spool: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{spool / 'journal.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT sop_uid, received_at, done_at, state, reads FROM instances").fetchall()
    finally:
        db.close()


def archive_sops(db_url: str) -> dict[str, int]:
    db = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        return dict(db.execute("SELECT sop_uid, COUNT(*) FROM images GROUP BY sop_uid"))
    finally:
        db.close()


def archive_read(db_url: str) -> int:
    """Rows read (status ok; the others the quality gate refused or could not be read)."""
    db = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        return db.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0]
    finally:
        db.close()


def start_pacs(work: Path, use: bool) -> Orthanc | None:
    return Orthanc(work / "orthanc") if use else None


def results_in_pacs(pacs: Orthanc | None) -> int | None:
    return pacs.count(Modality="SR") if pacs else None


def bench_load(run: Path, work: Path, uids: dict[str, str], senders: int, batch: int,
               pacs: Orthanc | None) -> dict:
    send_to = f"{pacs.ae}@127.0.0.1:{pacs.dicom_port}" if pacs else None
    node = Node(run, work / "load", batch_size=batch, send_to=send_to).start()
    try:
        start = time.perf_counter()
        procs = push(node.port, list(uids), senders)
        acked = collect(procs)
        ack_s = time.perf_counter() - start
        node.wait_processed(len(uids), timeout=3600)
        total_s = time.perf_counter() - start
    finally:
        node.stop()
    rows = journal_rows(node.spool)
    latency = np.array([done - got for _, got, done, _, _ in rows if done]) * 1000
    archived = archive_sops(node.db)
    return {
        "instances": len(uids), "senders": senders, "batch_size": batch,
        "acknowledged": len(acked), "journalled": len(rows), "archived": len(archived),
        "lost": len(set(uids.values()) - set(archived)),
        "duplicates": sum(c - 1 for c in archived.values()),
        "archived_read": archive_read(node.db), "srs_in_pacs": results_in_pacs(pacs),
        "ack_seconds": round(ack_s, 2), "acks_per_second": round(len(acked) / ack_s, 1),
        "seconds_to_all_read": round(total_s, 2),
        "read_per_second": round(len(rows) / total_s, 1),
        "latency_receipt_to_result_ms": {
            "p50": round(float(np.percentile(latency, 50)), 1),
            "p95": round(float(np.percentile(latency, 95)), 1),
            "max": round(float(latency.max()), 1)},
    }


def bench_kill(run: Path, work: Path, uids: dict[str, str], senders: int, batch: int,
               pacs: Orthanc | None) -> dict:
    before = results_in_pacs(pacs)
    send_to = f"{pacs.ae}@127.0.0.1:{pacs.dicom_port}" if pacs else None
    node = Node(run, work / "kill", batch_size=batch, send_to=send_to).start()
    procs = push(node.port, list(uids), senders)
    wait_for(lambda: node.journal()["instances"] >= len(uids) // 3, 600, "a third journalled")
    node.kill9()
    acked = set(collect(procs))
    journalled_at_kill = node.journal()["instances"]
    unacked = [f for f in uids if f not in acked]
    node.start()
    try:
        again = set(collect(push(node.port, unacked, senders)))
        counts = node.wait_processed(len(uids), timeout=3600)
    finally:
        node.stop()
    archived = archive_sops(node.db)
    acked_uids = {uids[f] for f in acked}
    return {
        "instances": len(uids), "acknowledged_before_kill": len(acked),
        "journalled_at_kill": journalled_at_kill, "resent": len(unacked),
        "acknowledged_on_resend": len(again), "journalled": counts["instances"],
        "archive_rows": sum(archived.values()), "archived_distinct": len(archived),
        "duplicates": sum(c - 1 for c in archived.values()),
        "acknowledged_missing": len(acked_uids - set(archived)),
        "lost": len(set(uids.values()) - set(archived)),
        "reader_started_twice": sum(v for k, v in counts["reads"].items() if k >= 2),
        "archived_read": archive_read(node.db),
        "srs_in_pacs": None if pacs is None else results_in_pacs(pacs) - before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="instances per phase")
    parser.add_argument("--senders", type=int, default=4, help="parallel storescu processes")
    parser.add_argument("--size", type=int, default=128, help="film side in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="the node's Reader batch")
    parser.add_argument("--run", type=Path, default=None, help="trained run (default: a tiny one)")
    parser.add_argument("--no-pacs", action="store_true",
                        help="no Orthanc as the destination (results only archived)")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)
    if not have_dcmtk():
        print("dcmtk's storescu is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cxr-dicom-node-") as tmp:
        work = Path(tmp)
        run = args.run
        if run is None:
            from cxr.testing import make_tiny_run

            run = make_tiny_run(work / "tiny")
        uids = write_films(work / "films", args.n, args.size)
        pacs = start_pacs(work, have_orthanc() and not args.no_pacs)
        try:
            load = bench_load(run, work, uids, args.senders, args.batch_size, pacs)
            kill = bench_kill(run, work, write_films(work / "films2", args.n, args.size),
                              args.senders, args.batch_size, pacs)
        finally:
            if pacs:
                pacs.stop()
        print(markdown_table(["instances", "acknowledged", "archived", "lost", "duplicates",
                              "SRs in PACS", "acks/s", "read/s", "latency p50 ms", "p95 ms"],
                             [[load["instances"], load["acknowledged"], load["archived"],
                               load["lost"], load["duplicates"], load["srs_in_pacs"],
                               load["acks_per_second"],
                               load["read_per_second"],
                               load["latency_receipt_to_result_ms"]["p50"],
                               load["latency_receipt_to_result_ms"]["p95"]]]))
        print()
        print(markdown_table(["instances", "acked before kill -9", "re-sent", "archive rows",
                              "distinct", "duplicates", "acked missing", "read twice",
                              "SRs in PACS"],
                             [[kill["instances"], kill["acknowledged_before_kill"], kill["resent"],
                               kill["archive_rows"], kill["archived_distinct"], kill["duplicates"],
                               kill["acknowledged_missing"], kill["reader_started_twice"],
                               kill["srs_in_pacs"]]]))
    report = {"machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
              "film_size": args.size, "pacs": "orthanc" if pacs else None, "run": "tiny" if args.run is None else str(args.run),
              "load": load, "kill9": kill}
    ok = (load["lost"] == 0 and load["duplicates"] == 0 and load["acknowledged"] == args.n
          and kill["duplicates"] == 0 and kill["acknowledged_missing"] == 0 and kill["lost"] == 0
          and (pacs is None or (load["srs_in_pacs"] == load["archived_read"]
                                and kill["srs_in_pacs"] == kill["archived_read"])))
    report["passed"] = ok
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    print("PASSED: none lost, none twice" if ok else "FAILED: see the counts above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
