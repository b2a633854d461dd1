"""A Reader result as DICOM a PACS can store and show, next to the image it describes:

* `<name>.sr.dcm`: a Comprehensive 3D SR with a TID 1500 Measurement Report (highdicom): one
  measurement group per finding box (TID 1410, the box as a closed POLYLINE SCOORD on the source
  image), or per finding without a box (TID 1501); finding type = the disease, the model score as
  a measurement (and what was measured for the finding: Cardiomegaly's cardiothoracic ratio, a
  ratio in UCUM "1"), laterality / severity as qualitative evaluations, the location as finding site,
  the generated annotation as the tracking identifier.
* `<name>.overlay.dcm`: an RGB Secondary Capture with the heatmaps and boxes burned in, for
  viewers that do not render SR.

When the input was DICOM, both join its study (same Study Instance UID and patient module, copied
from the source header, because a PACS files results under the patient; the archive database
never stores these). For a PNG/JPEG input, `<name>.source.dcm` (a Secondary Capture of the input
pixels, new study) is written first, so the SR has an image to reference.

Codes: SNOMED CT / DCM where a standard concept exists (laterality, severity, finding site
concept); the diseases and site words themselves use the private scheme `99CXR` with the model's
own target names as meanings, which is honest about where they come from.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..atomic import replacing
from ..errors import CxrError
from ..results import Result

SCHEME = "99CXR"
MANUFACTURER = "cxr (research use only)"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                          "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                          "ReferringPhysicianName")


NO_FINDING = "No finding above the run's thresholds"


def _code(meaning: str):
    from highdicom.sr import CodedConcept

    value = re.sub(r"[^A-Za-z0-9]+", "-", meaning.strip()).strip("-").upper()[:16] or "UNKNOWN"
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def _sct(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


LATERALITY = {"left": ("7771000", "Left"), "right": ("24028007", "Right"),
              "bilateral": ("51440002", "Right and left")}
SEVERITY = {"mild": ("255604002", "Mild"), "moderate": ("6736007", "Moderate"),
            "severe": ("24484000", "Severe"), "small": ("255507004", "Small"),
            "large": ("255509001", "Large")}


def _source_dataset(image, out_dir: Path, name: str):
    """The DICOM the results refer to: the input's own header, or a new Secondary Capture of the
    input pixels (for PNG/JPEG)."""
    import highdicom as hd
    import pydicom

    meta = getattr(image, "meta", {}) or {}
    path = getattr(image, "path", None)
    if meta.get("format") == "DICOM" and path:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return ds, None
    pixels = np.clip(np.asarray(image.pixels, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=hd.UID(), series_instance_uid=hd.UID(),
        series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "F"),
        series_description=f"source image {Path(path).name if path else ''}"[:64])
    target = out_dir / f"{name}.source.dcm"
    _save(sc, target)
    return sc, target


def _copy_patient_study(src, kwargs: dict) -> dict:
    mapping = {"PatientName": "patient_name", "PatientID": "patient_id",
               "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex",
               "AccessionNumber": "accession_number", "StudyID": "study_id",
               "StudyDate": "study_date", "StudyTime": "study_time",
               "ReferringPhysicianName": "referring_physician_name"}
    for keyword, arg in mapping.items():
        value = src.get(keyword)
        if value not in (None, ""):
            kwargs[arg] = value
    return kwargs


def overlay_rgb(pixels: np.ndarray, result: Result, alpha: float = 0.4) -> np.ndarray:
    """The image in grey with the heatmaps (red, opacity by strength) and boxes (yellow) burned
    in: uint8 (H, W, 3)."""
    grey = np.clip(np.asarray(pixels, np.float32), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    h, w = grey.shape
    for heat in result.heatmaps.values():
        heat = np.asarray(heat, np.float32)
        if heat.shape != grey.shape:
            from ..images import resize

            heat = resize(heat, (h, w))
        a = alpha * np.clip(heat, 0, 1)[..., None]
        rgb = rgb * (1 - a) + np.array([1.0, 0.1, 0.0], np.float32) * a
    out = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    for box in result.boxes:
        x0, y0 = int(max(0, box.x)), int(max(0, box.y))
        x1, y1 = int(min(w - 1, box.x + box.w)), int(min(h - 1, box.y + box.h))
        if x1 <= x0 or y1 <= y0:
            continue
        t = max(1, min(h, w) // 256)
        for sl in ((slice(y0, y0 + t), slice(x0, x1 + 1)), (slice(y1 - t + 1, y1 + 1), slice(x0, x1 + 1)),
                   (slice(y0, y1 + 1), slice(x0, x0 + t)), (slice(y0, y1 + 1), slice(x1 - t + 1, x1 + 1))):
            out[sl] = (255, 230, 0)
    return out


def write_overlay(result: Result, pixels: np.ndarray, source, out_path: Path):
    import highdicom as hd

    kwargs = _copy_patient_study(source, {})
    sc = hd.sc.SCImage(
        pixel_array=overlay_rgb(pixels, result), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=source.StudyInstanceUID, series_instance_uid=hd.UID(),
        series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "F"),
        series_description="cxr findings overlay (research use only)", **kwargs)
    sc.ImageComments = _summary(result)[:10240]
    sc.BurnedInAnnotation = "YES"
    _save(sc, out_path)
    return sc


def _summary(result: Result) -> str:
    parts = [f.line() for f in result.findings]
    return "; ".join(parts) or "no finding above threshold"


def build_sr(result: Result, source):
    """The TID 1500 Measurement Report SR of `result` on the image `source` (a pydicom Dataset
    with the study, patient and SOP attributes)."""
    import highdicom as hd
    from highdicom.sr import (AlgorithmIdentification, CodedConcept, Comprehensive3DSR,
                              DeviceObserverIdentifyingAttributes, FindingSite, GraphicTypeValues,
                              ImageRegion, Measurement, MeasurementReport,
                              MeasurementsAndQualitativeEvaluations, ObservationContext,
                              ObserverContext, PlanarROIMeasurementsAndQualitativeEvaluations,
                              QualitativeEvaluation, SourceImageForMeasurementGroup,
                              SourceImageForRegion, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    algorithm = AlgorithmIdentification(name="cxr cascade", version=(result.model_id or "unknown")[:64])
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="cxr", model_name=(result.model_id or "unknown")[:64]))
    context = ObservationContext(observer_device_context=observer)
    score_name = CodedConcept("SCORE", SCHEME, "Model score (calibrated probability)")
    unit = CodedConcept("1", "UCUM", "no units")
    groups = []
    for n, f in enumerate(result.findings, 1):
        evaluations = []
        if f.side in LATERALITY:
            evaluations.append(QualitativeEvaluation(
                _sct("272741003", "Laterality"), _sct(*LATERALITY[f.side])))
        if f.severity:
            value = _sct(*SEVERITY[f.severity]) if f.severity in SEVERITY else _code(f.severity)
            evaluations.append(QualitativeEvaluation(_sct("246112005", "Severity"), value))
        sites = [FindingSite(_code(" ".join(p for p in (f.organ, loc) if p)))
                 for loc in f.location] or ([FindingSite(_code(f.organ))] if f.organ else [])
        # the score, then what was measured on the film (Cardiomegaly's cardiothoracic ratio)
        measured = [Measurement(name=_code(name.replace("_", " ")), value=float(value), unit=unit,
                                algorithm_id=algorithm) for name, value in f.measurements.items()]
        common = dict(
            finding_type=_code(f.disease), algorithm_id=algorithm, finding_sites=sites or None,
            measurements=[Measurement(name=score_name, value=float(f.score), unit=unit,
                                      algorithm_id=algorithm)] + measured,
            qualitative_evaluations=evaluations or None)
        label = (f.annotation or f.disease)[:64]
        made = []  # this finding's groups: one per box, or one for the image
        if f.boxes:
            for box in f.boxes:
                x0, y0, x1, y1 = box.x, box.y, box.x + box.w, box.y + box.h
                region = ImageRegion(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]],
                                          dtype=np.float32),
                    source_image=SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID))
                made.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=label),
                    referenced_region=region, **common))
        else:
            made.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=label),
                source_images=[SourceImageForMeasurementGroup(source.SOPClassUID,
                                                              source.SOPInstanceUID)],
                **common))
        for group in made:  # why a number is missing, e.g. no ratio on an AP film
            for note in f.notes:
                group[0].ContentSequence.append(hd.sr.TextContentItem(
                    name=codes.DCM.Comment, value=note[:1024],
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups += made
    if not groups:  # TID 1500 needs a group: say "no finding" on the image, with the normal score
        normal = result.scores.get("normal")
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="no finding"),
            source_images=[SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
            finding_type=_code(NO_FINDING), algorithm_id=algorithm,
            measurements=None if normal is None else [
                Measurement(name=score_name, value=float(normal), unit=unit, algorithm_id=algorithm)]))

    def report(library):
        return MeasurementReport(
            observation_context=context,
            procedure_reported=_sct("399208008", "Plain chest X-ray"),
            imaging_measurements=groups or None, referenced_images=library)

    try:  # the image library wants e.g. Imager Pixel Spacing of a DX; leave it out if absent
        content = report([source])
    except AttributeError:
        content = report(None)
    return Comprehensive3DSR(
        evidence=[source], content=content, series_instance_uid=hd.UID(), series_number=901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        series_description="cxr findings (research use only)", is_complete=True)


def write_result_dicom(result: Result, image, out_dir: str | Path,
                       name: str | None = None) -> dict[str, Path]:
    """Write the SR and the overlay Secondary Capture of `result` on `image` (a
    `cxr.images.LoadedImage` or a path) into `out_dir`; return {"sr":…, "overlay":…[, "source":…]}."""
    from ..images import read_image

    if isinstance(image, (str, Path)):
        image = read_image(image)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or Path(image.path or "image").stem
    try:
        source, source_path = _source_dataset(image, out_dir, name)
        paths = {"overlay": out_dir / f"{name}.overlay.dcm", "sr": out_dir / f"{name}.sr.dcm"}
        write_overlay(result, image.pixels, source, paths["overlay"])
        _save(build_sr(result, source), paths["sr"])
    except CxrError:
        raise
    except Exception as exc:
        raise CxrError(f"cannot write DICOM results: {exc}", image.path) from None
    if source_path is not None:
        paths["source"] = source_path
    return paths


def _save(dataset, path: Path) -> None:
    """A DICOM file written atomically (a PACS watching the folder never picks up half a file)."""
    with replacing(path) as tmp:
        dataset.save_as(tmp)
