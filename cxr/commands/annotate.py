"""`cxr annotate RUN IMAGE...`: findings, annotations, boxes for PNG / JPEG / DICOM files.

Writes a JSON list (one entry per image: path + the Result) and, with --overlay, one PNG per image
with the heatmap of the top finding, every box and the generated annotations drawn on it. A bad
file is reported (stderr and an "error" entry) and the others go on; the exit status is 1 when
any file failed.

Each image passes the quality gate first (`cxr check` runs it alone): one that is no chest
radiograph, or of a view the run does not read, is not read: `FILE: not read: <reason>` on stderr,
its entry carries `quality` and no findings, and the exit status is 1 (`--force` reads it anyway).
A film stored rotated or inverted is turned back and read; its `quality` says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..atomic import replacing, write_atomic
from ..images import IMAGE_SUFFIXES

COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (80, 220, 120), (220, 90, 255), (255, 140, 0)]


def configure(parser) -> None:
    parser.add_argument("run", type=Path, help="trained run directory (cxr train --out)")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders (PNG, JPEG, DICOM)")
    parser.add_argument("--json", type=Path, help="write results here (`-` for stdout)")
    parser.add_argument("--overlay", type=Path, help="folder for overlay PNGs (heatmap, boxes, annotations)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beams", type=int, default=1, help="beam width for the annotations (1 = greedy)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
    parser.add_argument("--engine", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="what runs the CNN: torch, or the graph of `cxr export RUN --onnx` "
                        "under ONNX Runtime or OpenVINO (CPU; faster)")
    parser.add_argument("--force", action="store_true",
                        help="read images the quality gate refuses (their quality still says why)")


def expand(paths: list[Path]) -> list[Path]:
    """Folders -> their image files (sorted); files as given."""
    out = []
    for p in paths:
        p = p.expanduser()
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in (*IMAGE_SUFFIXES, "")
                          and not q.name.startswith("."))
        else:
            out.append(p)
    return out


def overlay(image: np.ndarray, result, path: Path, min_side: int = 512) -> Path:
    """Grey image + the top finding's heatmap (red, alpha by heat) + boxes + annotation text."""
    from PIL import Image, ImageDraw, ImageFont

    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1).astype(np.float32)
    if result.findings and result.findings[0].disease in result.heatmaps:
        heat = result.heatmaps[result.findings[0].disease][..., None]
        colour = np.array([255.0, 40.0, 0.0])
        alpha = 0.45 * heat
        rgb = rgb * (1 - alpha) + colour * alpha
    canvas = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    scale = max(1.0, min_side / min(canvas.size))
    if scale > 1:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    size = max(12, canvas.height // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    lines = [(result.study_text, (255, 255, 255))] if result.study_text else []
    for k, f in enumerate(result.findings):
        colour = COLOURS[k % len(COLOURS)]
        for b in f.boxes:
            draw.rectangle([b.x * scale, b.y * scale, (b.x + b.w) * scale, (b.y + b.h) * scale],
                           outline=colour, width=max(2, canvas.height // 200))
        lines.append((f.line(), colour))
    if not result.findings:
        lines.append(("no finding above threshold", (255, 255, 255)))
    y = 4
    for text, colour in lines:
        box = draw.textbbox((6, y), text, font=font)
        draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
        draw.text((6, y), text, fill=colour, font=font)
        y = box[3] + 4
    with replacing(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)
    return path


def run(args) -> int:
    from ..errors import CxrError
    from ..images import read_image
    from ..reader import Reader

    if args.batch_size < 1 or args.beams < 1:
        raise CxrError("--batch-size and --beams must be at least 1")
    reader = Reader.load(args.run, device=args.device, engine=args.engine)
    files = expand(args.images)
    if not files:  # only folders were given, and none holds an image
        raise CxrError(f"no image files in {', '.join(str(p) for p in args.images)} "
                       "(PNG, JPEG, TIFF or DICOM files, or folders holding them)")
    entries, failed, refused, used_names = [], 0, 0, set()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc="annotating", unit="img", disable=args.json is not None
               and str(args.json) == "-" or len(files) < 2)

    def say(line: str) -> None:  # a line of its own, not glued to the progress bar
        tqdm.write(line, file=sys.stderr)
    for s in range(0, len(files), max(args.batch_size, 1)):
        chunk, images = [], []
        for f in files[s:s + args.batch_size]:
            try:
                images.append(read_image(f))
                chunk.append(f)
            except CxrError as exc:
                failed += 1
                say(f"cxr annotate: skipped {exc}")
                entries.append({"path": str(f), "error": exc.problem})
        results = reader(images, heatmaps=args.overlay is not None, beams=args.beams,
                         batch_size=args.batch_size, force=args.force) if images else []
        for f, image, result in zip(chunk, images, results):
            entry = {"path": str(f), **result.to_dict()}
            quality = result.quality
            if quality is not None and not quality.accepted:
                refused += 1
                say(f"{f}: {quality.summary()}")
                if not quality.forced:
                    entries.append(entry)
                    continue
            elif quality is not None and quality.notes:
                say(f"{f}: {'; '.join(quality.notes)}")
            if args.overlay:
                image = reader.gate.correct(image.pixels, quality) if quality else image.pixels
                name = f.stem or f.name
                while name in used_names:
                    name += "_"
                used_names.add(name)
                entry["overlay"] = str(overlay(image, result, args.overlay / f"{name}.png"))
            entries.append(entry)
        bar.update(len(files[s:s + args.batch_size]))
    bar.close()
    text = json.dumps(entries, indent=1)
    if args.json is None or str(args.json) == "-":
        print(text)
    else:
        write_atomic(args.json, text)
        read = len(files) - failed - (0 if args.force else refused)
        print(f"annotated {read} of {len(files)} images -> {args.json}", file=sys.stderr)
    if failed == len(files):
        raise CxrError(f"none of the {len(files)} images could be read")
    return 1 if failed or (refused and not args.force) else 0
