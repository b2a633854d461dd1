"""Reports that arrive as DICOM documents beside the images: `cxr index` on a PACS-style folder
stores a text SR's (or an encapsulated CDA's) text as the report of every image of its study
(StudyInstanceUID), mined, whichever file comes first; cxr's own result SR is no report. Real
SRs written by highdicom, real films written by cxr.dicom."""
from __future__ import annotations

import json

import pytest

from conftest import chest_film

FINDINGS = "Moderate right pleural effusion. No pneumothorax."
IMPRESSION = "Right effusion, cardiomegaly."


def text_sr(path, image_ds, findings: str, impression: str, *, basic: bool = False):
    """A TID 2000-style report: Findings and Impression containers holding TEXT items."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def section(name: str, item: str, text: str):
        box = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept(*name), relationship_type="CONTAINS")
        box.ContentSequence = [hd.sr.TextContentItem(name=hd.sr.CodedConcept(*item), value=text,
                                                     relationship_type="CONTAINS")]
        return box

    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"), template_id="2000")
    root.ContentSequence = [
        hd.sr.CodeContentItem(name=codes.DCM.LanguageOfContentItemAndDescendants,
                              value=hd.sr.CodedConcept("en-US", "RFC5646", "English (US)"),
                              relationship_type="HAS CONCEPT MOD"),
        section(("121070", "DCM", "Findings"), ("121071", "DCM", "Finding"), findings),
        section(("121072", "DCM", "Impressions"), ("121073", "DCM", "Impression"), impression)]
    sr = hd.sr.EnhancedSR(evidence=[image_ds], content=root, series_instance_uid=hd.UID(),
                          series_number=90, sop_instance_uid=hd.UID(), instance_number=1,
                          manufacturer="Hospital RIS", is_complete=True, is_final=True)
    if basic:  # the same tree as a Basic Text SR (no evidence references needed)
        sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.save_as(path)
    return path


def encapsulated_cda(path, image_ds, sections: dict[str, str]):
    body = "".join(f"<component><section><title>{t}</title><text><paragraph>{x}</paragraph>"
                   f"</text></section></component>" for t, x in sections.items())
    cda = (f'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><component>'
           f"<structuredBody>{body}</structuredBody></component></ClinicalDocument>").encode()
    return encapsulated(path, image_ds, cda, "1.2.840.10008.5.1.4.1.1.104.2", "text/XML")


def tiny_pdf(lines: list[str]) -> bytes:
    """A one-page PDF showing `lines` in Helvetica (the objects and xref written out by hand)."""
    stream = ("BT /F1 11 Tf 14 TL 50 750 Td " + " ".join(f"({t}) '" for t in lines) + " ET").encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def encapsulated(path, image_ds, document: bytes, sop_class: str, mime: str):
    """An Encapsulated Document (CDA, PDF) instance in the image's study."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = image_ds.StudyInstanceUID, generate_uid()
    ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", mime
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(document)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, one_torch_thread):
    """A folder as a PACS export: three studies of DICOM films; study A's SR comes after its two
    films (and after cxr's own result SR of one of them), study B's Basic Text SR before its film,
    study C's report is an encapsulated CDA, study D has none."""
    import pydicom
    from pydicom.uid import generate_uid

    from cxr.dicom import write_dicom

    root = tmp_path_factory.mktemp("pacs")
    studies = {k: generate_uid() for k in "ABCD"}
    films = {}
    for n, (key, uid) in enumerate([("A", studies["A"]), ("A", studies["A"]), ("B", studies["B"]),
                                    ("C", studies["C"]), ("D", studies["D"])]):
        path = root / key / f"film{n}.dcm"
        path.parent.mkdir(exist_ok=True)
        write_dicom(path, chest_film(n, (128, 128)), study_uid=uid, bits_stored=12)
        films.setdefault(key, []).append(path)
    first = pydicom.dcmread(films["A"][0])
    text_sr(root / "A" / "zz-report.dcm", first, FINDINGS, IMPRESSION)
    text_sr(root / "B" / "00-report.dcm", pydicom.dcmread(films["B"][0]),
            "Large left pneumothorax.", "Left pneumothorax.", basic=True)
    encapsulated_cda(root / "C" / "report.dcm", pydicom.dcmread(films["C"][0]),
                     {"Findings": "Heart size is enlarged &amp; lungs clear.",
                      "Impression": "Cardiomegaly."})
    return root, studies, films


def test_sr_text_and_cda_reports_become_their_studys_report(pacs):
    from cxr.archive.dicom_reports import read_dicom_report

    root, studies, films = pacs
    report = read_dicom_report(root / "A" / "zz-report.dcm")
    assert report.study_uid == studies["A"] and report.kind == "Enhanced SR"
    assert report.sections == {"FINDINGS": FINDINGS, "IMPRESSION": IMPRESSION + ""}
    assert read_dicom_report(root / "B" / "00-report.dcm").kind == "Basic Text SR"
    cda = read_dicom_report(root / "C" / "report.dcm")
    assert cda.sections == {"FINDINGS": "Heart size is enlarged & lungs clear.",
                            "IMPRESSION": "Cardiomegaly."}
    assert read_dicom_report(films["A"][0]) is None  # an image is no report


def test_an_encapsulated_pdf_report_is_read_as_text(pacs, tmp_path):
    import pydicom

    from cxr.archive.dicom_reports import read_dicom_report

    root, studies, films = pacs
    pdf = tiny_pdf(["CHEST PA AND LATERAL", "Findings: Small left pleural effusion.",
                    "Impression: Left effusion."])
    path = encapsulated(tmp_path / "pdf.dcm", pydicom.dcmread(films["D"][0]), pdf,
                        "1.2.840.10008.5.1.4.1.1.104.1", "application/pdf")
    report = read_dicom_report(path)
    assert report.kind == "Encapsulated PDF" and report.study_uid == studies["D"]
    assert report.sections == {"HEADER": "CHEST PA AND LATERAL",
                               "FINDINGS": "Small left pleural effusion.",
                               "IMPRESSION": "Left effusion."}
    broken = encapsulated(tmp_path / "broken.dcm", pydicom.dcmread(films["D"][0]), b"%PDF-1.4 cut",
                          "1.2.840.10008.5.1.4.1.1.104.1", "application/pdf")
    assert read_dicom_report(broken).problem.startswith("refused: cannot read the PDF report")


def test_a_report_document_without_usable_text_is_stored_empty_with_the_reason(pacs, tmp_path):
    import pydicom

    from cxr.archive.dicom_reports import read_dicom_report
    from cxr.archive.index import study_documents

    root, studies, films = pacs
    image = pydicom.dcmread(films["D"][0])
    empty = read_dicom_report(text_sr(tmp_path / "empty.dcm", image, " ", "  "))
    assert empty.sections == {}
    broken = read_dicom_report(encapsulated_cda(tmp_path / "cda.dcm", image,
                                                {"Findings": "<b>unclosed"}))
    assert "not well-formed XML" in broken.problem
    found = study_documents([empty, broken], {})
    (report,) = found.values()  # the first document of the study wins
    assert report.text == "" and report.note == "refused: the document holds no text (Enhanced SR)"
    found = study_documents([broken], {})
    assert found[studies["D"]].note.startswith("refused: the CDA document is not well-formed XML")


def test_index_stores_dicom_reports_beside_the_images_of_their_study(pacs, tiny_run, tmp_path,
                                                                     capsys):
    from cxr.archive.db import Archive
    from cxr.archive.dicom_out import write_result_dicom
    from cxr.cli import main
    from cxr.reader import Reader

    root, studies, films = pacs
    # cxr's own result SR of film A0 (`--dicom-out`), met before the real report: not a report
    result = Reader.load(tiny_run)([str(films["A"][0])], force=True)[0]
    written = write_result_dicom(result, str(films["A"][0]), root / "A", name="a0-result")
    (root / "A" / "a0-result.overlay.dcm").unlink()  # the overlay is an image: not the point here
    assert written["sr"].name < "film0.dcm"

    db = f"sqlite:///{tmp_path / 'a.db'}"
    args = ["index", str(tiny_run), str(root), "--db", db, "--quiet", "--force",
            "--batch-size", "2", "--json", "-"]
    assert main(args) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["reports"] == 3 and counts["indexed"] == 5
    # cxr's result SR is no report and no image: failed, with the reason, as before
    assert counts["failed"] == 1 and "a0-result.sr.dcm" in counts["failures"][0][0]
    assert "no pixel data" in counts["failures"][0][1]
    with Archive(db) as archive:
        hits = {h.path.split("/")[-2] + "/" + h.path.split("/")[-1]: h
                for h in archive.search(limit=20)}
        assert set(hits) == {"A/film0.dcm", "A/film1.dcm", "B/film2.dcm", "C/film3.dcm",
                             "D/film4.dcm"}
        for name in ("A/film0.dcm", "A/film1.dcm"):  # the SR came after both films
            a = hits[name]
            assert a.study_uid == studies["A"]
            assert a.report == f"FINDINGS: {FINDINGS}\nIMPRESSION: {IMPRESSION}"
            mined = {(f["disease"], f["certainty"], f["side"]) for f in a.report_findings}
            assert ("Pleural Effusion", "positive", "right") in mined
            assert ("Pneumothorax", "negative", None) in mined
            assert "Cardiomegaly" in {d for d, c, _ in mined if c == "positive"}
            assert all(a.report[slice(*f["span"])].lower() in ("pleural effusion", "pneumothorax",
                                                               "effusion", "cardiomegaly")
                       for f in a.report_findings if f["span"])
        b = hits["B/film2.dcm"]
        assert b.report.startswith("FINDINGS: Large left pneumothorax.")
        assert ("Pneumothorax", "positive", "left") in {
            (f["disease"], f["certainty"], f["side"]) for f in b.report_findings}
        c = hits["C/film3.dcm"]
        assert c.report == "FINDINGS: Heart size is enlarged & lungs clear.\nIMPRESSION: Cardiomegaly."
        assert hits["D/film4.dcm"].report is None
        assert {h.study_uid for h in archive.search(report="pneumothorax")} == {
            studies["A"], studies["B"]}
    # a second run: nothing twice, the reports stay one per image
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] == 6 and again["indexed"] == 0 and again["reports"] == 3
    with Archive(db) as archive:
        from sqlalchemy import func, select

        from cxr.archive.models import ReportRow

        with archive.session() as s:
            assert s.scalar(select(func.count(ReportRow.id))) == 4
