"""Images/s of `cxr.load_image` on 2048x2048 radiographs: 16-bit PNG and DICOM (uncompressed,
RLE, JPEG Lossless, JPEG 2000), against the bare decode measured in the same run (Pillow `open().load()` +
numpy view; `pydicom.dcmread(...).pixel_array`). The ratio says what the normalisation costs.

    python benchmarks/images.py [--size 2048] [--repeats 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_radiograph(size: int, seed: int = 0) -> np.ndarray:
    """A chest-like picture with detector noise, so compressors see realistic entropy."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2) ** 3)
    lungs = sum(np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.25) ** 2) ** 2) for cx in (0.32, 0.68))
    spine = np.exp(-((x - 0.5) / 0.04) ** 2) * (y > 0.1)
    image = 0.15 + 0.6 * body - 0.35 * lungs + 0.25 * spine
    image += rng.normal(0.0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def rate(fn, path: Path, repeats: int) -> tuple[float, float]:
    fn(path)  # warm caches / imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return 1.0 / best, best


def pil_decode(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def pydicom_decode(path: Path):
    import pydicom

    return pydicom.dcmread(path).pixel_array


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from cxr.dicom import write_dicom
    from cxr.machine import cpu_name
    from cxr.images import load_image, save_png16

    image = synthetic_radiograph(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("PNG 16-bit", save_png16(tmp / "x.png", image), pil_decode)]
        for compression, label in ((None, "DICOM 16-bit uncompressed"), ("rle", "DICOM 16-bit RLE"),
                                   ("jpeg-lossless", "DICOM 16-bit JPEG Lossless SV1"),
                                   ("jpeg2000", "DICOM 16-bit JPEG 2000 lossless")):
            path = write_dicom(tmp / f"{compression}.dcm", image, bits_stored=16,
                               compression=compression)
            cases.append((label, path, pydicom_decode))
        for label, path, baseline in cases:
            ours, ours_s = rate(load_image, path, args.repeats)
            base, base_s = rate(baseline, path, args.repeats)
            # all lossless; DICOM without a window maps its own min..max to 0..1
            expected = image if label.startswith("PNG") else \
                (image - image.min()) / (image.max() - image.min())
            assert np.abs(load_image(path) - expected).max() < 1e-4, label
            rows.append({"format": label, "file_mb": round(path.stat().st_size / 2**20, 2),
                         "load_image_per_s": round(ours, 2), "load_image_ms": round(ours_s * 1e3, 1),
                         "baseline_per_s": round(base, 2), "baseline_ms": round(base_s * 1e3, 1),
                         "baseline": baseline.__name__,
                         "ratio_vs_baseline": round(ours / base, 3)})

    header = f"{'format':<33} {'MB':>6} {'load_image/s':>12} {'baseline/s':>11} {'ratio':>6}"
    print(f"load_image on {args.size}x{args.size}, median of {args.repeats} runs, one process")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['format']:<33} {r['file_mb']:>6.2f} {r['load_image_per_s']:>12.2f} "
              f"{r['baseline_per_s']:>11.2f} {r['ratio_vs_baseline']:>6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "images", "size": args.size, "repeats": args.repeats,
            "machine": {"python": platform.python_version(), "processor": cpu_name(),
                        "system": platform.platform()},
            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
