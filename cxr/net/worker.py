"""The DICOM node's worker: journal entries in batches through the Reader (quality gate first)
into the archive, the SR + Secondary Capture written to the outbox and C-STOREd on.

Order per batch (see `cxr.net.journal` for why each step may be redone after a crash):
read -> write SR + SC to `outbox/<SOP UID>/` -> archive commit -> journal `indexed` -> send ->
journal `sent`.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from ..archive.index import process_batch, reader_model_id, upright
from .journal import Journal, Pending
from .send import Destination, store_files

log = logging.getLogger("cxr.net")


class Worker:
    def __init__(self, journal: Journal, archive, reader, *, destination: Destination | None = None,
                 calling_ae: str = "CXR", batch_size: int = 16, batch_wait_s: float = 0.5,
                 force: bool = False):
        self.journal = journal
        self.archive = archive
        self.reader = reader
        self.model_id = reader_model_id(reader)
        self.destination = destination
        self.calling_ae = calling_ae
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.force = force
        self.stop = threading.Event()

    def run(self, retry_s: float = 10.0) -> None:
        """Until `stop` is set: read what is pending, send what waits, else wait a little. An
        error (the database away, a disk full) is logged and the step retried later: the node
        keeps receiving meanwhile, and the journal keeps what waits."""
        while not self.stop.is_set():
            try:
                worked = self.step()
            except Exception as exc:
                log.error("worker: %s: %s (retrying in %.0f s)", type(exc).__name__, exc, retry_s)
                self.stop.wait(retry_s)
                continue
            if not worked:
                self.stop.wait(0.2)

    def step(self) -> bool:
        """One batch read and one round of sending; True when there was something to do."""
        waiting = self.journal.counts()["received"]
        if 0 < waiting < self.batch_size and self.batch_wait_s > 0:
            # a burst may be arriving: wait briefly for a fuller batch (faster per image)
            self.stop.wait(self.batch_wait_s)
        batch = self.journal.next_batch(self.batch_size) if waiting else []
        if batch:
            self.read(batch)
        sent = self.send() if self.destination else 0
        return bool(batch or sent)

    # -- reading ------------------------------------------------------------------------------
    def read(self, batch: list[Pending]) -> None:
        start = time.perf_counter()
        by_path = {p.path: p for p in batch}
        known = lambda hashes: self.archive.indexed(hashes, self.model_id)  # noqa: E731
        done = process_batch(self.reader, self.model_id, list(by_path), known,
                             heatmaps=self.destination is not None, force=self.force)
        outboxes: dict[str, str] = {}
        for entry, image in zip(done.entries, done.images):
            if entry.result is None or image is None or self.destination is None:
                continue  # no destination: the archive is the product (as cxr index)
            p = by_path[entry.path]
            try:
                outboxes[p.sop_uid] = str(self._write_results(p.sop_uid, entry.result, image))
            except Exception as exc:  # a result that cannot become DICOM is still archived
                log.warning("%s: cannot write the SR/SC: %s", p.sop_uid, exc)
        ids = self.archive.add_results(done.entries)
        handled = set()
        updates = []
        for entry, aid in zip(done.entries, ids):
            p = by_path[entry.path]
            handled.add(p.sop_uid)
            outbox = outboxes.get(p.sop_uid)
            state = "indexed" if outbox and self.destination else "done"
            updates.append((p.sop_uid, state, aid, outbox, entry.error))
        for p in batch:  # in the archive already: an archive write that beat a crash
            if p.sop_uid not in handled:
                outbox = self.journal.outbox / p.sop_uid
                has = outbox.is_dir() and any(outbox.glob("*.dcm"))
                state = "indexed" if has and self.destination else "done"
                updates.append((p.sop_uid, state, None, str(outbox) if has else None, None))
        self.journal.mark(updates)
        if any(i is not None for i in ids):
            self.archive.sync_vectors(self.model_id)
        ok = sum(e.result is not None for e in done.entries)
        log.info("read %d instances (%d with findings to send, %d refused or failed, %d already "
                 "in the archive) in %.2f s", len(batch), len(outboxes), len(done.entries) - ok,
                 len(batch) - len(done.entries), time.perf_counter() - start)

    def _write_results(self, sop_uid: str, result, image) -> Path:
        from ..archive.dicom_out import write_result_dicom

        folder = self.journal.outbox / sop_uid
        tmp = self.journal.outbox / f".{sop_uid}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        write_result_dicom(result, upright(image, result), tmp, name="result")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # the folder appears whole, or not at all
        return folder

    # -- sending ------------------------------------------------------------------------------
    def send(self) -> int:
        pending = self.journal.to_send(self.batch_size * 4)
        if not pending:
            return 0
        files = {p.sop_uid: sorted(Path(p.outbox).glob("*.dcm")) for p in pending}
        try:
            failed = set(store_files([f for fs in files.values() for f in fs], self.destination,
                                     self.calling_ae))
        except Exception as exc:
            log.warning("cannot send results to %s: %s (will retry)", self.destination, exc)
            self.journal.send_failed(list(files), str(exc))
            return 0
        ok = [uid for uid, fs in files.items() if not failed.intersection(fs)]
        bad = [uid for uid in files if uid not in ok]
        self.journal.sent(ok)
        for uid in ok:  # the destination has them now; the journal keeps the record
            shutil.rmtree(self.journal.outbox / uid, ignore_errors=True)
        if bad:
            self.journal.send_failed(bad, f"{self.destination} refused a result")
        log.info("sent the results of %d instances to %s", len(ok), self.destination)
        return len(ok)
