"""Read chest radiographs from PNG, JPEG and DICOM into one form: float32 (H, W) in [0, 1],
bright = dense (as a radiologist sees it, DICOM MONOCHROME2).

Normalisation lives here only, by these rules:

* PNG / JPEG / TIFF: value / (2**bit_depth - 1) of the file's own sample depth (8-bit -> /255,
  16-bit -> /65535), as the PNG spec defines sample values; colour is converted to luma first,
  and `meta["colour_fraction"]` keeps how much real colour the source had (`colour_fraction`),
  so the quality gate can refuse a photograph that luma alone would pass off as a film.
* DICOM: stored values -> modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) ->
  VOI: the first VOI LUT Sequence item if present, else the first Window Center/Width pair
  (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID), whose output range maps to [0, 1]; with no
  VOI in the header, the image's own min..max (after the modality LUT) maps to [0, 1] (a constant
  image becomes 0). MONOCHROME1 is then inverted (1 - y), so bright is always dense.

Every failure (missing, empty, truncated, not an image, DICOM without pixel data, a transfer
syntax with no installed decoder) raises `CxrError` naming the file and the problem.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import replacing
from .errors import CxrError

# The file names `load_image` reads, for every part of cxr that looks for images in a folder.
# Order = preference where one image comes in several forms (PNG first, DICOM last).
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES

# Header values worth carrying along; none of them identifies the patient.
DICOM_META_KEYWORDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "PixelSpacing", "ImagerPixelSpacing", "PhotometricInterpretation", "BitsStored",
    "BitsAllocated", "PixelRepresentation", "Rows", "Columns", "NumberOfFrames", "ViewPosition",
    "BodyPartExamined", "PatientOrientation", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "PresentationLUTShape",
)


@dataclass
class LoadedImage:
    """An image plus what its file says about it (`meta` never holds patient identifiers)."""

    pixels: np.ndarray                      # float32 (H, W) in [0, 1], bright = dense
    view: str | None = None                 # DICOM ViewPosition ("PA", "AP", "LL", ...) or None
    meta: dict = field(default_factory=dict)
    path: str | None = None


def pixels_of(image) -> np.ndarray:
    """The pixels of a LoadedImage, or the array itself (what the Reader and the gate accept)."""
    return getattr(image, "pixels", image)


def load_image(path: str | Path) -> np.ndarray:
    """The pixels of a PNG / JPEG / DICOM file: float32 (H, W) in [0, 1], bright = dense."""
    return read_image(path).pixels


def read_image(path: str | Path) -> LoadedImage:
    """Pixels plus view position and non-identifying header values (see module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CxrError("file not found", path)
    if path.is_dir():
        raise CxrError("is a directory, not an image file", path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise CxrError(f"cannot read file ({exc.strerror or exc})", path) from None
    if size == 0:
        raise CxrError("file is empty", path)
    if head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path, has_preamble=head[128:132] == b"DICM")
    return _read_raster(path)


# ---------------------------------------------------------------- PNG / JPEG / TIFF (Pillow)

def _read_raster(path: Path) -> LoadedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                im.load()
                if fmt in ("JPEG", "MPO", "TIFF"):
                    im = ImageOps.exif_transpose(im)
                mode = im.mode
                colour = colour_fraction(np.asarray(im.convert("RGB"))) if _has_chroma(mode) else 0.0
                array, depth = _raster_to_array(im)
    except UnidentifiedImageError:
        if _looks_like_dicom_without_preamble(path):
            return _read_dicom(path, has_preamble=False)
        raise CxrError("not an image Pillow or pydicom can read (PNG, JPEG, TIFF, DICOM)",
                       path) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CxrError(f"image too large to decode safely ({exc})", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CxrError(f"cannot decode image: {_explain(exc)}", path) from None
    if array.ndim != 2 or array.size == 0:
        raise CxrError(f"unexpected image shape {array.shape}", path)
    if depth is None:  # float TIFF and the like: no nominal range, use min..max
        pixels = _minmax(array.astype(np.float32))
    else:  # integers within 0..2**depth-1 by construction: no clip needed
        pixels = array.astype(np.float32)
        pixels *= np.float32(1.0 / (2**depth - 1))
    meta = {"format": fmt, "mode": mode, "BitDepth": depth, "colour_fraction": colour,
            "Rows": int(pixels.shape[0]), "Columns": int(pixels.shape[1])}
    return LoadedImage(pixels=pixels, view=None, meta=meta, path=str(path))


# A pixel counts as coloured when its channels spread by more than this (of full scale): well
# above JPEG chroma noise on a grey picture (a few levels of 255), well below any real colour.
CHROMA_SPREAD = 24 / 255
COLOUR_SAMPLE_SIDE = 256  # colour is judged on a grid of at most this many pixels a side: cheap


def _has_chroma(mode: str) -> bool:
    return mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV")


def colour_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels whose R, G, B spread by more than CHROMA_SPREAD (0 for a grey picture
    stored as RGB; a colour photograph, most of its pixels), on a subsampled grid."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3 or rgb.size == 0:
        return 0.0
    step = max(1, max(rgb.shape[:2]) // COLOUR_SAMPLE_SIDE)
    sample = rgb[::step, ::step, :3].astype(np.float32)
    if rgb.dtype.kind in "ui":
        sample /= float(np.iinfo(rgb.dtype).max)
    spread = sample.max(-1) - sample.min(-1)
    return round(float((spread > CHROMA_SPREAD).mean()), 4)


def _raster_to_array(im) -> tuple[np.ndarray, int | None]:
    """Grey array and its nominal bit depth (None: floating point, no nominal range)."""
    mode = im.mode
    if mode.startswith("I;16"):            # 16-bit grey PNG/TIFF (any byte order)
        return np.asarray(im).astype(np.uint16, copy=False), 16
    if mode == "I":                          # 32-bit int container (older Pillow, TIFF)
        array = np.asarray(im).astype(np.int64).clip(0, None)
        return array, 16 if array.max(initial=0) < 65536 else 32
    if mode == "F":
        return np.asarray(im, dtype=np.float32), None
    if mode == "L":
        return np.asarray(im), 8
    # 1, P, LA, RGB, RGBA, CMYK, YCbCr, I;16 colour ... : Pillow's ITU-R 601 luma (alpha ignored)
    return np.asarray(im.convert("L")), 8


# ---------------------------------------------------------------- DICOM (pydicom)

def _read_dicom(path: Path, has_preamble: bool) -> LoadedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=not has_preamble)
    except InvalidDicomError as exc:
        raise CxrError(f"not a valid DICOM file ({exc})", path) from None
    except Exception as exc:  # pydicom raises many types on truncated / corrupt headers
        raise CxrError(f"cannot parse DICOM header (truncated or corrupt?): {_explain(exc)}",
                       path) from None
    if not has_preamble and not any(k in ds for k in ("PixelData", "Rows", "SOPClassUID")):
        # a forced parse reads any bytes as elements: without the marker or a DICOM element
        # that every image has, the file is something else named .dcm
        raise CxrError("not a DICOM file (no 'DICM' marker at byte 128, no DICOM image "
                       "elements)", path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom stops silently at a cut; an image class or an empty body suggests truncation
        sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
        name = getattr(sop, "name", None) or (str(sop) if sop else "")
        if len(ds) == 0:
            raise CxrError("DICOM file has no data set after its header (truncated?)", path)
        if "Image" in name or "Rows" in ds:
            raise CxrError(f"DICOM file has no pixel data although it is an image ({name}): "
                           "the file may be truncated", path)
        raise CxrError(f"DICOM file has no pixel data ({name or 'unknown SOP class'})", path)
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if keyword not in ds:
            raise CxrError(f"DICOM pixel data without {keyword} in the header", path)

    _ensure_transfer_syntax(ds)
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        frame, colour = _decode_first_frame(ds)
    except Exception as exc:
        name = getattr(tsyntax, "name", tsyntax) or "unknown transfer syntax"
        raise CxrError(f"cannot decode DICOM pixel data ({name}): {_explain(exc)}", path) from None

    photometric = str(ds.PhotometricInterpretation).strip().upper()
    try:
        pixels = _dicom_to_unit(frame, ds, photometric)
    except Exception as exc:
        raise CxrError(f"cannot apply the DICOM modality / VOI LUT: {_explain(exc)}", path) from None

    view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
    meta = {"format": "DICOM", "TransferSyntaxUID": str(tsyntax) if tsyntax else None,
            "colour_fraction": colour}
    for keyword in DICOM_META_KEYWORDS:
        if keyword in ds and ds[keyword].value not in (None, ""):
            meta[keyword] = _plain(ds[keyword].value)
    return LoadedImage(pixels=pixels, view=view, meta=meta, path=str(path))


def _looks_like_dicom_without_preamble(path: Path) -> bool:
    """Old or raw DICOM (no 128-byte preamble, any file name): a forced parse that finds
    image rows and pixel data."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds
    except Exception:
        return False


def _ensure_transfer_syntax(ds) -> None:
    """A file without file meta (no preamble) still says how it was encoded while parsing."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _decode_first_frame(ds) -> tuple[np.ndarray, float]:
    """Stored values of frame 0 (BitsStored and signedness respected by pydicom) and the
    colour fraction; colour images come back as RGB and are reduced to luma."""
    from pydicom.pixels import pixel_array

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        array = pixel_array(ds, index=0)
    else:
        array = ds.pixel_array
    if str(ds.PhotometricInterpretation).strip().upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        array = apply_color_lut(array, ds)
    if array.ndim == 3:  # RGB (YBR already converted by pydicom)
        colour = colour_fraction(array)
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return array, colour
    return array, 0.0


def _dicom_to_unit(frame: np.ndarray, ds, photometric: str) -> np.ndarray:
    values = _modality(frame, ds)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and "VOILUTSequence" in ds:
        pixels = _apply_voi_sequence(values, ds)
    elif photometric in ("MONOCHROME1", "MONOCHROME2") and _window(ds) is not None:
        pixels = _apply_window(values, ds, *_window(ds))
    else:
        pixels = _minmax(values)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, pixels, out=pixels)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _modality(frame: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values. A Modality LUT Sequence goes through pydicom; the
    common linear rescale is done here in float32 (pydicom's goes through float64, 4x slower
    on a 2048x2048 image), and an identity rescale keeps the integers."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut
        return apply_modality_lut(frame, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept == 0.0:
        return frame
    values = frame.astype(np.float32)
    values *= np.float32(slope)
    values += np.float32(intercept)
    return values


def _window(ds) -> tuple[float, float] | None:
    """The first Window Center / Width pair (multi-valued headers list alternatives)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if center is None or width is None or float(width) <= 0:
        return None
    return float(center), float(width)


def _apply_window(values: np.ndarray, ds, center: float, width: float) -> np.ndarray:
    """Window Center / Width to [0, 1] by PS3.3 C.11.2.1.2: LINEAR and LINEAR_EXACT in float32
    here (the standard's formulas, checked against pydicom's in the tests), SIGMOID through
    pydicom's `apply_windowing` against a fixed 16-bit output range."""
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        from pydicom.dataset import Dataset
        from pydicom.pixels import apply_windowing

        spec = Dataset()
        spec.PhotometricInterpretation = "MONOCHROME2"
        spec.PixelRepresentation = 0
        spec.BitsStored = 16
        spec.WindowCenter, spec.WindowWidth, spec.VOILUTFunction = center, width, "SIGMOID"
        out = apply_windowing(values.astype(np.float64), spec)
        return (out / 65535.0).clip(0.0, 1.0).astype(np.float32)
    if function == "LINEAR_EXACT":
        low, span = center - width / 2.0, width
    else:  # LINEAR (the default; unknown functions fall back to it)
        if width < 1:
            width = 1.0
        low, span = center - 0.5 - (width - 1.0) / 2.0, width - 1.0
    if span <= 0:
        return (values > low).astype(np.float32)
    out = np.subtract(values, np.float32(low), dtype=np.float32)
    out *= np.float32(1.0 / span)
    return np.clip(out, 0.0, 1.0, out=out)


def _apply_voi_sequence(values: np.ndarray, ds) -> np.ndarray:
    """A VOI LUT table: output / the table's nominal maximum (2**bits - 1, or its largest entry
    when a header under-states the bit depth)."""
    from pydicom.pixels import apply_voi

    item = ds.VOILUTSequence[0]
    if values.dtype.kind == "f":  # a LUT is indexed by integers: round the modality output
        values = np.rint(values).astype(np.int64)
    out = apply_voi(values, ds, index=0).astype(np.float32)
    bits = int(item.LUTDescriptor[2])
    top = max(float(2**bits - 1), float(out.max(initial=0)))
    return (out / top).clip(0.0, 1.0) if top > 0 else np.zeros_like(out)


# ---------------------------------------------------------------- shared helpers

def _first(value):
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _minmax(values: np.ndarray) -> np.ndarray:
    """[low, high] of the image itself -> [0, 1] (min and max found on the original dtype,
    then one float32 pass)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    if not high > low:
        return np.zeros(values.shape, np.float32)
    out = np.subtract(values, np.float32(low), dtype=np.float32)  # convert + shift, one pass
    out *= np.float32(1.0 / (float(high) - float(low)))
    return out


def _plain(value):
    """A header value as plain JSON-able Python (MultiValue -> list, DSfloat -> float)."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str)):
        base = float if isinstance(value, float) else int if isinstance(value, int) else str
        return base(value)
    return str(value)


def _explain(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


# ---------------------------------------------------------------- utilities for other modules

def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a float image to `size` (an int: square side; a tuple: (height, width)).

    Shrinking averages areas (box filter, like OpenCV's INTER_AREA: no aliasing, no overshoot);
    enlarging is bilinear. Output is float32 in the input's range.
    """
    from PIL import Image

    height, width = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"resize: size must be positive, got {size!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"resize: expected a 2-D grey image, got shape {image.shape}")
    if image.shape == (height, width):
        return image.copy()
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(image), mode="F").resize((width, height), resample)
    return np.asarray(out, dtype=np.float32)


def save_png16(path: str | Path, image: np.ndarray) -> Path:
    """Write a float image in [0, 1] as a 16-bit greyscale PNG (values clipped, rounded),
    atomically."""
    from PIL import Image

    path = Path(path)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"save_png16: expected a 2-D grey image, got shape {image.shape}")
    array = np.rint(np.nan_to_num(image).clip(0.0, 1.0) * 65535.0).astype(np.uint16)
    with replacing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # uint16 -> mode I;16
    return path
