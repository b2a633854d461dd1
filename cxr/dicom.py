"""Write real DICOM radiographs (DX or CR) with pydicom: used by the phantom, the tests and the
archive, so every DICOM code path in `cxr` is exercised on files a PACS would accept.

`image` is what a viewer should show (float in [0, 1], bright = dense). With
`photometric="MONOCHROME1"` the stored values are inverted, so `load_image` of the file returns
the same picture either way.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from .atomic import replacing

SOP_CLASSES = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1",    # Computed Radiography Image Storage
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPRESSIONS = (None, "rle", "jpeg2000", "jpeg", "jpeg-lossless")


def write_dicom(
    path: str | Path,
    image: np.ndarray,
    *,
    view: str | None = "PA",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    compression: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "ANON",
    modality: str = "DX",
    window: tuple[float, float] | None = None,
    pixel_spacing: float | tuple[float, float] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `image` as a single-frame DICOM file and return its path.

    image        float array (H, W) in [0, 1] (scaled to 0..2**bits_stored-1), or an integer
                 array of stored values written as given (must fit in bits_stored).
    view         ViewPosition (PA, AP, LL, RL, ...) or None.
    photometric  MONOCHROME2 (high = bright) or MONOCHROME1 (stored inverted).
    bits_stored  1..16; BitsAllocated is 8 up to 8 bits, else 16.
    compression  None (explicit VR little endian), "rle" (RLE Lossless), "jpeg2000" (lossless,
                 through pylibjpeg-openjpeg), "jpeg" (baseline, lossy, 8-bit only, via Pillow)
                 or "jpeg-lossless" (JPEG Lossless SV1, the usual PACS syntax, via GDCM).
    window       (center, width) in modality units, written as Window Center / Width.
    pixel_spacing  mm per pixel at the detector (ImagerPixelSpacing); omitted when unknown.
    extra        further attributes by pydicom keyword, set last (e.g. RescaleSlope,
                 RescaleIntercept, VOILUTFunction, StudyDescription).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if not 1 <= int(bits_stored) <= 16:
        raise ValueError(f"bits_stored must be 1..16, not {bits_stored}")
    if compression == "jpeg" and bits_stored != 8:
        raise ValueError("JPEG baseline holds 8-bit samples: pass bits_stored=8 "
                         "(or use compression='jpeg2000' or 'rle', which are lossless)")
    stored = _stored_values(np.asarray(image), int(bits_stored), photometric)
    rows, cols = stored.shape
    if compression == "jpeg2000" and min(rows, cols) < 32:
        raise ValueError("JPEG 2000 (openjpeg, 6 resolution levels) needs at least 32x32 pixels; "
                         f"got {rows}x{cols}: use compression='rle'")
    modality = modality.upper()
    sop_class = SOP_CLASSES.get(modality, SECONDARY_CAPTURE)
    sop_uid = sop_uid or generate_uid()
    now = _dt.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXR_" + _version()[:11]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    # Patient / study / series / equipment: only what the IODs require, nothing identifying.
    # a one-component name needs its '^' (family name only), else readers (highdicom) warn
    ds.PatientName = patient_id if "^" in patient_id else patient_id + "^"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "cxr"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    # rows run toward the patient's left (frontal) or back (lateral) as conventionally displayed
    ds.PatientOrientation = {"PA": ["L", "F"], "AP": ["L", "F"], "LL": ["P", "F"]}.get(
        str(view or "").upper(), "")
    ds.BurnedInAnnotation = "NO"
    if view:
        ds.ViewPosition = str(view).upper()
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.DetectorType = "DIRECT"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    if pixel_spacing is not None:
        spacing = (pixel_spacing, pixel_spacing) if np.isscalar(pixel_spacing) else pixel_spacing
        ds.ImagerPixelSpacing = [f"{float(s):.6g}" for s in spacing]
    if window is not None:
        ds.WindowCenter = f"{float(window[0]):.6g}"
        ds.WindowWidth = f"{float(window[1]):.6g}"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = int(bits_stored)
    ds.HighBit = int(bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16).tobytes()

    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    if compression == "rle":
        from pydicom.uid import RLELossless
        ds.compress(RLELossless, stored.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16),
                    generate_instance_uid=False)
    elif compression == "jpeg2000":
        from pydicom.uid import JPEG2000Lossless
        ds.compress(JPEG2000Lossless, stored.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16),
                    generate_instance_uid=False)
    elif compression == "jpeg":
        _compress_jpeg_baseline(ds, stored.astype(np.uint8))
    elif compression == "jpeg-lossless":
        return _save_atomic(ds, Path(path), transcode=_gdcm_jpeg_lossless)

    return _save_atomic(ds, Path(path))


def _stored_values(image: np.ndarray, bits: int, photometric: str) -> np.ndarray:
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"write_dicom: expected a 2-D grey image, got shape {image.shape}")
    top = 2**bits - 1
    if np.issubdtype(image.dtype, np.integer):
        if image.min() < 0 or image.max() > top:
            raise ValueError(f"write_dicom: integer values {image.min()}..{image.max()} do not fit "
                             f"in {bits} bits")
        stored = image.astype(np.int64)
        return top - stored if photometric == "MONOCHROME1" else stored
    unit = np.nan_to_num(image.astype(np.float64)).clip(0.0, 1.0)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * top).astype(np.int64)


def _compress_jpeg_baseline(ds, stored: np.ndarray) -> None:
    """JPEG baseline (lossy, 8-bit) by Pillow, encapsulated by pydicom: pydicom has no encoder
    for this syntax."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    Image.fromarray(stored, mode="L").save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    ds.PixelData = encapsulate([data])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{stored.size / len(data):.4g}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


def _gdcm_jpeg_lossless(src: str, dst: str) -> None:
    """Re-encode an uncompressed file as JPEG Lossless, Process 14 SV1 (pydicom has no encoder
    for it; GDCM does, and keeps every other attribute)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(src)
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError("GDCM could not encode JPEG Lossless")
    writer = gdcm.ImageWriter()
    writer.SetFileName(dst)
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM cannot write {dst}")


def _save_atomic(ds, path: Path, transcode=None) -> Path:
    """Write to a temporary file beside the target and rename, so no reader sees half a file."""
    with replacing(path) as final:
        if transcode is None:
            ds.save_as(final, enforce_file_format=True)
        else:
            raw = final.with_name(final.name + ".raw")
            try:
                ds.save_as(raw, enforce_file_format=True)
                transcode(str(raw), str(final))
            finally:
                raw.unlink(missing_ok=True)
    return path


def _version() -> str:
    from . import __version__
    return __version__
