"""The DICOM node's Storage SCP (pynetdicom): who may associate, which objects it takes, and the
durable receipt of each instance before it says "success".

* Calling AE titles not on the allow-list: the association is rejected (A-ASSOCIATE-RJ,
  "calling AE title not recognised") and logged.
* Only chest film SOP classes (CR, DX for presentation and for processing) and Verification
  (C-ECHO) are offered; any other presentation context is rejected (abstract syntax not
  supported), so a sender cannot store e.g. a CT slice here, and it is logged.
* A dataset that cannot be decoded gets 0xC210 (cannot understand); one that is no image of its
  SOP class (UIDs that disagree with the command, no pixel data) gets 0xA900 (does not match SOP
  class); a spool that cannot be written gets 0xA700 (out of resources). Each is logged and the
  node goes on serving.
"""
from __future__ import annotations

import logging

from .journal import Journal

log = logging.getLogger("cxr.net")

CHEST_FILM_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
VERIFICATION = "1.2.840.10008.1.1"
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210


def make_ae(ae_title: str, allow: list[str] | None):
    """The Application Entity: chest film storage + verification, all transfer syntaxes pydicom
    can decode, and the calling AE allow-list (None: anyone)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES

    ae = AE(ae_title=ae_title)
    for uid in CHEST_FILM_SOP_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION)
    ae.require_called_aet = True  # an association addressed to another AE title is refused
    if allow is not None:
        ae.require_calling_aet = list(allow)
    ae.maximum_associations = 32
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def check_dataset(event) -> tuple[int, str | None]:
    """(status, reason) for an incoming instance, before it is stored."""
    try:
        ds = event.dataset
        sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        has_pixels = "PixelData" in ds and int(ds.Rows) > 0 and int(ds.Columns) > 0
    except Exception as exc:
        return CANNOT_UNDERSTAND, f"cannot decode the dataset ({exc.__class__.__name__}: {exc})"
    request = event.request
    if sop_uid != str(request.AffectedSOPInstanceUID) or sop_class != str(request.AffectedSOPClassUID):
        return DOES_NOT_MATCH, "the dataset's SOP Class/Instance UID differ from the C-STORE request"
    if not has_pixels:
        return DOES_NOT_MATCH, "no image: Pixel Data, Rows or Columns missing"
    return SUCCESS, None


def handlers(journal: Journal, counters: dict):
    """pynetdicom event handlers bound to `journal`."""
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID
    from pynetdicom import evt

    def peer(event) -> str:
        a = event.assoc.requestor
        return f"{a.ae_title}@{a.address}:{a.port}"

    def on_store(event):
        status, reason = check_dataset(event)
        request = event.request
        uid = str(request.AffectedSOPInstanceUID)
        if status != SUCCESS:
            counters["refused"] += 1
            log.warning("refused instance %s from %s: 0x%04X %s", uid, peer(event), status, reason)
            return status

        def write(f):
            f.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(f, event.file_meta, enforce_standard=True)
            f.write(request.DataSet.getvalue())  # the bytes as received: nothing re-encoded

        try:
            new = journal.receive(uid, str(request.AffectedSOPClassUID), write,
                                  event.assoc.requestor.ae_title)
        except Exception as exc:
            counters["refused"] += 1
            log.error("cannot spool instance %s from %s: %s", uid, peer(event), exc)
            return OUT_OF_RESOURCES
        counters["received" if new else "repeated"] += 1
        if not new:
            log.info("instance %s from %s was received before: kept once", uid, peer(event))
        return SUCCESS

    def on_echo(event):
        log.info("C-ECHO from %s", peer(event))
        return SUCCESS

    def on_rejected(event):
        counters["rejected_associations"] += 1
        log.warning("association from %s rejected (calling AE title not on the allow-list, or "
                    "called AE title wrong)", peer(event))

    def on_accepted(event):
        refused = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
        if refused:
            counters["rejected_contexts"] += len(refused)
            names = ", ".join(UID(u).name for u in refused[:3]) + (", ..." if len(refused) > 3 else "")
            log.info("%s: refused presentation contexts of %d SOP classes that are no chest film "
                     "(CR, DX) or in a transfer syntax not supported: %s", peer(event),
                     len(refused), names)

    return [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo),
            (evt.EVT_REJECTED, on_rejected), (evt.EVT_ACCEPTED, on_accepted)]


def start(journal: Journal, ae_title: str, host: str, port: int, allow: list[str] | None):
    """Start serving in background threads; returns (server, counters)."""
    counters = {"received": 0, "repeated": 0, "refused": 0, "rejected_associations": 0,
                "rejected_contexts": 0}
    ae = make_ae(ae_title, allow)
    server = ae.start_server((host, port), block=False, evt_handlers=handlers(journal, counters))
    return server, counters
