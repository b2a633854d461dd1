"""`cxr index RUN dicomweb:URL`: index the chest films of a DICOMweb server (a PACS) and STOW the
results back.

QIDO-RS finds the studies, and in them the CR and DX series (so the SRs and overlays this sends
back are never read as films) and the report documents (text SR, encapsulated CDA/PDF: stored as
their study's report, `cxr.archive.dicom_reports`); WADO-RS fetches each instance once into a local spool (named by
SOP Instance UID, so a second run fetches only what is new); the usual indexing run reads them
(resumable: what the archive holds is skipped); each newly indexed film's SR and overlay
Secondary Capture go back by STOW-RS. Results wait in the outbox until the server has taken them,
so a run interrupted between indexing and storing sends them next time.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator

from ..atomic import replacing
from ..errors import CxrError

log = logging.getLogger("cxr.net")
PREFIX = "dicomweb:"
FILM_MODALITIES = ("CR", "DX")
REPORT_MODALITIES = ("SR", "DOC")  # where a study's report document is
PAGE = 100


def parse_url(source: str) -> str:
    url = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if not url.startswith(("http://", "https://")):
        raise CxrError(f"not a DICOMweb source {source!r}: expected dicomweb:http(s)://HOST/PATH, "
                       "e.g. dicomweb:http://pacs:8042/dicom-web")
    return url.rstrip("/")


def default_spool(url: str) -> Path:
    from ..data import data_dir

    return data_dir() / "dicomweb" / hashlib.sha256(url.encode()).hexdigest()[:16]


def client(url: str):
    """A DICOMweb client; `$CXR_DICOMWEB_TOKEN`, when set, goes as a bearer token (most PACS put
    DICOMweb behind OAuth/OIDC)."""
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise CxrError("dicomweb: sources need dicomweb-client: pip install 'cxr[net]'") from None
    session = requests.Session()
    token = os.environ.get("CXR_DICOMWEB_TOKEN")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=url, session=session)


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _paged(search, **kwargs) -> Iterator[dict]:
    offset = 0
    while True:
        page = search(offset=offset, limit=PAGE, **kwargs)
        yield from page
        if len(page) < PAGE:
            return
        offset += len(page)


def fetch_films(web, spool: Path) -> Iterator[str]:
    """Paths of the CR/DX instances on the server, and of the studies' report documents (text
    SR, encapsulated CDA/PDF in SR/DOC series: the indexer stores their text as the study's
    report), fetched (WADO-RS) into `spool/instances` unless there already; found lazily
    (QIDO-RS), study by study. cxr's own result SRs, sent back by earlier runs, are no report:
    fetched once, remembered in `spool/not-reports`, never yielded."""
    import requests

    from ..archive.dicom_reports import REPORT_CLASSES
    from ..archive.dicom_out import MANUFACTURER

    folder, skip = spool / "instances", spool / "not-reports"
    folder.mkdir(parents=True, exist_ok=True)
    skip.mkdir(exist_ok=True)
    try:
        for study in _paged(web.search_for_studies):
            study_uid = _value(study, "0020000D")
            for series in web.search_for_series(study_uid):
                modality = _value(series, "00080060")
                if modality not in FILM_MODALITIES + REPORT_MODALITIES:
                    continue
                series_uid = _value(series, "0020000E")
                for inst in _paged(web.search_for_instances, study_instance_uid=study_uid,
                                   series_instance_uid=series_uid):
                    sop_uid = _value(inst, "00080018")
                    report = modality in REPORT_MODALITIES
                    if report and (_value(inst, "00080016") not in REPORT_CLASSES
                                   or (skip / sop_uid).exists()):
                        continue
                    path = folder / f"{sop_uid}.dcm"
                    if not path.exists():
                        ds = web.retrieve_instance(study_uid, series_uid, sop_uid)
                        if report and str(ds.get("Manufacturer", "")) == MANUFACTURER:
                            (skip / sop_uid).touch()
                            continue
                        with replacing(path) as tmp:
                            ds.save_as(tmp, enforce_file_format=True)
                    yield str(path)
    except requests.RequestException as exc:
        raise CxrError(f"the DICOMweb server did not answer as expected: {exc}") from None


def stow_outbox(web, outbox: Path, chunk: int = 16) -> int:
    """STOW-RS every result file waiting in `outbox`; each is removed once the server has it."""
    import pydicom
    import requests

    files = sorted(outbox.glob("*.dcm"))
    stored = 0
    for i in range(0, len(files), chunk):
        part = files[i:i + chunk]
        try:
            web.store_instances([pydicom.dcmread(f) for f in part])
        except requests.RequestException as exc:
            raise CxrError(f"STOW-RS refused the results ({exc}); they wait in the outbox "
                           "and go with the next run", outbox) from None
        for f in part:
            f.unlink()
        stored += len(part)
    return stored


def index_dicomweb(archive, reader, source: str, *, spool: str | Path | None = None,
                   batch_size: int = 32, progress: bool = True, retry_failed: bool = False,
                   force: bool = False):
    """Index the films of the DICOMweb server `source` and STOW their results back; returns
    (IndexStats, number of result objects stored)."""
    from ..archive.index import index_images

    url = parse_url(source)
    spool = Path(spool).expanduser() if spool else default_spool(url)
    outbox = spool / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    web = client(url)
    stow_outbox(web, outbox)  # what an interrupted run left
    stats = index_images(archive, reader, fetch_films(web, spool), batch_size=batch_size,
                         dicom_out=outbox, progress=progress, retry_failed=retry_failed,
                         force=force)
    for source_copy in outbox.glob("*.source.dcm"):  # only for non-DICOM inputs; none here
        source_copy.unlink()
    return stats, stow_outbox(web, outbox)
