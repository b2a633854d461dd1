"""C-STORE of result files (SR, Secondary Capture) to a DICOM destination `AE@HOST:PORT`."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CxrError

log = logging.getLogger("cxr.net")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """`AE@HOST:PORT`, e.g. `ORTHANC@pacs.local:4242`."""
        m = re.fullmatch(r"([^@]{1,16})@([^:@]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", text.strip())
        if not m or not 0 < int(m.group(3)) < 65536:
            raise CxrError(f"not a DICOM destination {text!r}: expected AE@HOST:PORT, "
                           "e.g. ORTHANC@127.0.0.1:4242")
        return cls(m.group(1), m.group(2).strip("[]"), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def store_files(files: list[Path], dest: Destination, calling_ae: str = "CXR") -> list[Path]:
    """C-STORE each file in one association; return the files the destination refused or that
    could not be sent (empty: all stored). Raises CxrError when no association is possible."""
    import pydicom
    from pynetdicom import AE

    datasets = []
    for f in files:
        datasets.append((f, pydicom.dcmread(f)))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class in sorted({ds.SOPClassUID for _, ds in datasets}):
        ae.add_requested_context(sop_class)  # explicit + implicit VR little endian
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise CxrError(f"cannot associate with {dest} (rejected, aborted or not listening)")
    failed = []
    try:
        for f, ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                log.warning("%s refused %s: status %s", dest, f.name,
                            "none (connection lost)" if code is None else f"0x{code:04X}")
                failed.append(f)
    finally:
        if assoc.is_established:
            assoc.release()
    return failed
