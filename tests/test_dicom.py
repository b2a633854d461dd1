"""write_dicom makes files a PACS would take: proper file meta, SOP class, transfer syntax,
UIDs, DX attributes, no identifying values beyond the given pseudonym."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from cxr.dicom import SOP_CLASSES, write_dicom

IMAGE = np.linspace(0.0, 1.0, 40 * 36, dtype=np.float32).reshape(40, 36)


@pytest.mark.parametrize("compression, syntax", [
    (None, ExplicitVRLittleEndian), ("rle", RLELossless), ("jpeg2000", JPEG2000Lossless),
    ("jpeg-lossless", JPEGLosslessSV1)])
def test_file_meta_and_syntax(tmp_path, compression, syntax):
    path = write_dicom(tmp_path / "a.dcm", IMAGE, compression=compression, study_uid="1.2.3",
                       series_uid="1.2.3.4", sop_uid="1.2.3.4.5", patient_id="P0001")
    assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    pydicom.dataset.validate_file_meta(ds.file_meta)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.SOPClassUID == SOP_CLASSES["DX"] == ds.file_meta.MediaStorageSOPClassUID
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == \
        ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.PatientID == "P0001" and ds.PatientBirthDate == ""
    assert str(ds.PatientName) == "P0001^" and ds.PatientName.family_name == "P0001"
    assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (40, 36, 16, 16, 15)
    stored = ds.pixel_array  # decodes through the installed plugins
    assert stored.dtype == np.uint16 and stored[0, 0] == 0 and stored[-1, -1] == 65535


def test_monochrome1_stores_inverted_values(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "m1.dcm", IMAGE, photometric="MONOCHROME1",
                                     bits_stored=12))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PresentationLUTShape == "INVERSE"
    assert ds.pixel_array[0, 0] == 4095 and ds.pixel_array[-1, -1] == 0
    assert ds.PixelIntensityRelationshipSign == 1


def test_cr_8_bit_window_spacing_and_extra(tmp_path):
    path = write_dicom(tmp_path / "cr.dcm", IMAGE, modality="CR", bits_stored=8, view="ll",
                       window=(128, 200), pixel_spacing=0.2,
                       extra={"StudyDescription": "CHEST 2 VIEWS"})
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SOP_CLASSES["CR"] and ds.BitsAllocated == 8
    assert ds.ViewPosition == "LL" and float(ds.WindowCenter) == 128.0
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.2, 0.2]
    assert ds.StudyDescription == "CHEST 2 VIEWS"


def test_integer_input_is_written_as_stored_values(tmp_path):
    stored = np.array([[0, 1, 4095]], dtype=np.uint16)
    ds = pydicom.dcmread(write_dicom(tmp_path / "i.dcm", stored, bits_stored=12))
    assert ds.pixel_array.tolist() == [[0, 1, 4095]]
    with pytest.raises(ValueError, match="do not fit"):
        write_dicom(tmp_path / "j.dcm", np.array([[4096]], np.uint16), bits_stored=12)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="8-bit"):
        write_dicom(tmp_path / "x.dcm", IMAGE, compression="jpeg")
    with pytest.raises(ValueError, match="photometric"):
        write_dicom(tmp_path / "x.dcm", IMAGE, photometric="RGB")
    with pytest.raises(ValueError, match="compression"):
        write_dicom(tmp_path / "x.dcm", IMAGE, compression="zip")
    with pytest.raises(ValueError, match="32x32"):
        write_dicom(tmp_path / "x.dcm", IMAGE[:20], compression="jpeg2000")
    with pytest.raises(ValueError, match="2-D"):
        write_dicom(tmp_path / "x.dcm", np.zeros((2, 2, 3)))
    assert not (tmp_path / "x.dcm").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # no half-written file left behind
