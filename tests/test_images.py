"""load_image / read_image on real files: DICOM written by pydicom (both photometric
interpretations, 12/16-bit, rescale, VOI window and LUT, compressed syntaxes), PNG 8/16-bit,
JPEG, RGB(A), one real NIH radiograph, and every kind of bad file."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

import cxr
from cxr.dicom import write_dicom
from cxr.errors import CxrError
from cxr.images import load_image, read_image, resize, save_png16

# A horizontal gradient with a dark square: left = dark (air), right = bright (dense).
GRADIENT = np.tile(np.linspace(0.0, 1.0, 96, dtype=np.float32), (64, 1))
GRADIENT[8:16, 8:16] = 0.0


# ---------------------------------------------------------------- DICOM round trips

@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("compression", [None, "rle", "jpeg2000", "jpeg-lossless"])
def test_dicom_round_trip(tmp_path, photometric, bits, compression):
    path = write_dicom(tmp_path / "x.dcm", GRADIENT, photometric=photometric, bits_stored=bits,
                       compression=compression, view="AP")
    stored = pydicom.dcmread(path).pixel_array.astype(np.int64)
    assert stored.max() <= 2**bits - 1
    # MONOCHROME1 stores dense as LOW values: the raw row must fall left to right ...
    rising = np.diff(stored[32]) > 0
    assert rising.all() if photometric == "MONOCHROME2" else (~rising).all()
    # ... and load_image must still give bright = dense, rising left to right
    loaded = read_image(path)
    assert loaded.pixels.dtype == np.float32 and loaded.pixels.shape == GRADIENT.shape
    np.testing.assert_allclose(loaded.pixels, GRADIENT, atol=1.0 / (2**bits - 1) + 1e-6)
    assert loaded.view == "AP"
    assert loaded.meta["PhotometricInterpretation"] == photometric
    assert loaded.meta["BitsStored"] == bits


def test_dicom_jpeg_baseline_is_close(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", GRADIENT, bits_stored=8, compression="jpeg")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert np.abs(load_image(path) - GRADIENT).mean() < 0.01


def test_rescale_and_window(tmp_path):
    """Stored 0..1000, slope 2 intercept -100 -> modality -100..1900; window 900/400 shows
    700..1100 (PS3.3 C.11.2.1.2.1 LINEAR) and clips the rest."""
    stored = np.tile(np.arange(0, 1001, 10, dtype=np.uint16), (4, 1))
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, window=(900, 400),
                       extra={"RescaleSlope": 2, "RescaleIntercept": -100})
    x = stored.astype(np.float64) * 2 - 100
    c, w = 900.0, 400.0
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(load_image(path), expected, atol=1e-4)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("signed", [False, True])
def test_window_agrees_with_pydicom(tmp_path, function, signed):
    """Our float32 windowing equals pydicom's apply_voi_lut, scaled by its output range."""
    from pydicom.pixels import apply_voi_lut

    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (2, 1))
    extra = {"VOILUTFunction": function, "RescaleSlope": 1.5, "RescaleIntercept": -1024}
    path = write_dicom(tmp_path / "p.dcm", stored, bits_stored=12, window=(1000, 1500), extra=extra)
    ds = pydicom.dcmread(path)
    if signed:  # same picture stored as signed values shifted down by 2048
        ds.PixelRepresentation = 1
        ds.PixelData = (stored.astype(np.int16) - 2048).tobytes()
        ds.RescaleIntercept = -1024 + 2048 * 1.5
        ds.save_as(path)
    modality = ds.pixel_array.astype(np.float64) * 1.5 + float(ds.RescaleIntercept)
    reference = apply_voi_lut(modality, ds)
    bits = ds.BitsStored
    y_min = -(2 ** (bits - 1)) if signed else 0
    y_max = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    y_min, y_max = (v * 1.5 + float(ds.RescaleIntercept) for v in (y_min, y_max))
    expected = (reference - y_min) / (y_max - y_min)
    np.testing.assert_allclose(load_image(path), expected, atol=2e-4)


def test_window_then_monochrome1_inversion(tmp_path):
    stored = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))
    path = write_dicom(tmp_path / "w1.dcm", stored, photometric="MONOCHROME2", bits_stored=12,
                       window=(2048, 1024))
    m2 = load_image(path)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "w1m1.dcm")
    m1 = load_image(tmp_path / "w1m1.dcm")
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2[0, 0] == 0.0 and m2[0, -1] == 1.0 and 0.0 < m2[0, 32] < 1.0


def test_voi_lut_sequence(tmp_path):
    """A VOI LUT table takes precedence over min..max: here an inverting 8-bit table."""
    from pydicom.dataset import Dataset

    stored = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    path = write_dicom(tmp_path / "lut.dcm", stored, bits_stored=8)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new("LUTData", "OW", (255 - np.arange(256)).astype("<u2").tobytes())
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut2.dcm")
    np.testing.assert_allclose(load_image(tmp_path / "lut2.dcm")[0], 1.0 - np.arange(256) / 255,
                               atol=1e-6)


def test_no_voi_uses_image_min_max(tmp_path):
    stored = np.tile(np.arange(1000, 3001, 100, dtype=np.uint16), (3, 1))
    pixels = load_image(write_dicom(tmp_path / "m.dcm", stored, bits_stored=12))
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    np.testing.assert_allclose(pixels[0], (stored[0] - 1000) / 2000.0, atol=1e-6)


def test_dicom_detected_by_content_and_meta_is_anonymous(tmp_path):
    path = write_dicom(tmp_path / "scan.png", GRADIENT, view="pa", patient_id="SECRET-42",
                       study_uid="1.2.3.4", extra={"PatientBirthDate": "19700101"})
    loaded = read_image(path)  # named .png, but the 'DICM' preamble wins
    assert loaded.meta["format"] == "DICOM" and loaded.view == "PA"
    assert loaded.meta["StudyInstanceUID"] == "1.2.3.4"
    assert loaded.meta["Modality"] == "DX"
    assert "SECRET-42" not in repr(loaded.meta) and "19700101" not in repr(loaded.meta)
    assert not any(k.startswith("Patient") and k != "PatientOrientation" for k in loaded.meta)


def test_dicom_without_preamble_or_file_meta(tmp_path):
    """Old / raw DICOM: no 'DICM' preamble, no file meta, no extension (PACS exports name
    files by UID)."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", GRADIENT, bits_stored=12))
    ds.preamble = None
    del ds.file_meta
    raw = tmp_path / "1.2.840.99.1"
    ds.save_as(raw, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    loaded = read_image(raw)
    assert loaded.meta["format"] == "DICOM"
    np.testing.assert_allclose(loaded.pixels, GRADIENT, atol=1 / 4095 + 1e-6)


def test_dicom_without_view_position(tmp_path):
    assert read_image(write_dicom(tmp_path / "v.dcm", GRADIENT, view=None)).view is None


# ---------------------------------------------------------------- PNG / JPEG

def test_png_8_and_16_bit(tmp_path):
    values8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(values8).save(tmp_path / "8.png")
    np.testing.assert_allclose(load_image(tmp_path / "8.png"), values8 / 255.0, atol=1e-7)

    values16 = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    values16[0, 0] = 1  # a value an 8-bit path would lose
    Image.fromarray(values16).save(tmp_path / "16.png")
    loaded = read_image(tmp_path / "16.png")
    assert loaded.meta["BitDepth"] == 16
    np.testing.assert_allclose(loaded.pixels, values16 / 65535.0, atol=1e-7)
    assert loaded.pixels[0, 0] > 0


def test_save_png16_round_trip(tmp_path):
    path = save_png16(tmp_path / "sub" / "g.png", GRADIENT)
    assert Image.open(path).mode == "I;16"
    np.testing.assert_allclose(load_image(path), GRADIENT, atol=0.5 / 65535 + 1e-7)


def test_jpeg_and_colour(tmp_path):
    grey = (GRADIENT * 255).round().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "g.jpg") - GRADIENT).mean() < 0.01
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    np.testing.assert_allclose(load_image(tmp_path / "c.png"), grey / 255.0, atol=1.5 / 255)
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "c.jpg", quality=95)
    assert load_image(tmp_path / "c.jpg").ndim == 2


def test_real_nih_radiographs(nih_sample):
    folder = nih_sample / "images"
    rgba = read_image(folder / "00001369_000.png")  # one of the RGBA files
    assert rgba.meta["mode"] == "RGBA"
    grey = read_image(folder / "00000003_000.png") if (folder / "00000003_000.png").exists() \
        else read_image(sorted(folder.glob("*.png"))[0])
    for image in (rgba.pixels, grey.pixels):
        assert image.shape == (256, 256) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    # a chest radiograph: the mediastinum (centre column) is denser than the lung fields
    centre, lungs = rgba.pixels[60:180, 118:138].mean(), rgba.pixels[60:180, 50:90].mean()
    assert centre > lungs
    assert cxr.load_image(folder / "00001369_000.png").shape == (256, 256)


# ---------------------------------------------------------------- bad files

def _text_as_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a report, not an image\n")
    return path


def _truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray((np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _truncated_dicom(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", GRADIENT)
    path.write_bytes(path.read_bytes()[:-3000])
    return path


def _truncated_dicom_header(tmp_path):
    path = write_dicom(tmp_path / "head.dcm", GRADIENT)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path


def _dicom_without_pixels(tmp_path):
    path = write_dicom(tmp_path / "sr.dcm", GRADIENT)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    return path


def _text_as_dcm(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not dicom\n")
    return path


def _missing(tmp_path):
    return tmp_path / "nowhere.png"


def _directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    return tmp_path / "folder.png"


@pytest.mark.parametrize("make, words", [
    (_text_as_png, "not an image"),
    (_truncated_png, "truncated"),
    (_truncated_dicom, "pixel data"),
    (_truncated_dicom_header, "truncated"),
    (_empty, "empty"),
    (_dicom_without_pixels, "no pixel data"),
    (_text_as_dcm, "not a DICOM file"),
    (_missing, "not found"),
    (_directory, "directory"),
])
def test_bad_files_raise_one_clear_error(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(CxrError) as caught:
        load_image(path)
    message = str(caught.value)
    assert path.name in message and words.lower() in message.lower(), message
    assert caught.value.path == str(path)
    assert "\n" not in message


# ---------------------------------------------------------------- resize

def test_resize_area_and_bilinear():
    image = np.random.default_rng(1).random((64, 96)).astype(np.float32)
    small = resize(image, (16, 24))
    assert small.shape == (16, 24) and small.dtype == np.float32
    # box filter at an integer factor = the mean of each 4x4 block
    np.testing.assert_allclose(small, image.reshape(16, 4, 24, 4).mean(axis=(1, 3)), atol=1e-5)
    big = resize(image, 128)
    assert big.shape == (128, 128) and big.dtype == np.float32
    assert image.min() - 1e-6 <= big.min() and big.max() <= image.max() + 1e-6
    assert np.ptp(resize(np.full((10, 10), 0.25, np.float32), (7, 3))) < 1e-6
    with pytest.raises(ValueError):
        resize(image, 0)
