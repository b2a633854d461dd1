"""Make docs/phantom_examples.png: simulated radiographs with and without findings, each finding's
box drawn and its MeSH term written under the image.

    python docs/make_grid.py [--out docs/phantom_examples.png] [--size 256] [--seed 0]

Cases come from the Open-i case generator (the same draw `cxr simulate --seed SEED` makes); the
script picks two normal studies and the first studies that show each finding listed in WANTED.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr.phantom.cases import CaseGenerator
from cxr.phantom.render import Phantom

WANTED = ("cardiomegaly", "effusion", "opacity", "nodule", "pneumothorax", "atelectasis",
          "granuloma", "catheter", "consolidation", "hypoinflation")
COLOURS = [(255, 80, 80), (80, 200, 255), (255, 210, 60), (120, 255, 120), (255, 120, 255)]


def pick_cases(generator: CaseGenerator, seed: int, n_normal: int, kinds: tuple[str, ...]):
    """Two normal cases, then one case per wanted kind (its first appearance in the draw)."""
    chosen, normal, covered = [], 0, set()
    for case in generator.draw(5000, seed=seed):
        if case.normal and normal < n_normal:
            chosen.append(case)
            normal += 1
        elif case.findings and len(case.findings) <= 3:
            new = {f.kind for f in case.findings} & set(kinds) - covered
            if new and len(chosen) < n_normal + len(kinds):
                chosen.append(case)
                covered |= {f.kind for f in case.findings}
        if normal == n_normal and covered >= set(kinds):
            break
    return chosen


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def tile(ph: Phantom, case, size: int) -> Image.Image:
    r = ph.render(case.findings, seed=case.seed, size=size)
    grey = Image.fromarray(np.rint(np.clip(r.image, 0, 1) * 255).astype(np.uint8), "L")
    text_h = 42
    canvas = Image.new("RGB", (size, size + text_h), (0, 0, 0))
    canvas.paste(grey.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    f = font(11)
    lines = []
    for i, (finding, box) in enumerate(zip(case.findings, r.boxes)):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([box.x, box.y, box.x + box.w, box.y + box.h], outline=colour, width=2)
        lines += [(l, colour) for l in textwrap.wrap(finding.term, 40)]
    if not case.findings:
        lines = [("normal", (220, 220, 220))]
    for j, (line, colour) in enumerate(lines[:3]):
        draw.text((4, size + 3 + 12 * j), line, fill=colour, font=f)
    draw.text((size - 40, 3), case.id, fill=(200, 200, 200), font=font(10))
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("phantom_examples.png"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--columns", type=int, default=4)
    ap.add_argument("--kinds", default="cardiomegaly,effusion,opacity,nodule,pneumothorax,catheter",
                    help=f"findings to show, comma-separated (any of {', '.join(WANTED)})")
    args = ap.parse_args()
    cases = pick_cases(CaseGenerator.from_openi(), args.seed, 2, tuple(args.kinds.split(",")))
    ph = Phantom.load()
    tiles = [tile(ph, c, args.size) for c in cases]
    cols = args.columns
    rows = -(-len(tiles) // cols)
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * 4, rows * h + (rows - 1) * 4), (40, 40, 40))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * (w + 4), (i // cols) * (h + 4)))
    # a fixed palette (48 greys + the box colours) keeps the file small and the colours exact
    greys = [round(i * 255 / 47) for i in range(48)]
    colours = [(g, g, g) for g in greys] + COLOURS + [(220, 220, 220), (200, 200, 200), (40, 40, 40)]
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in colours for c in rgb] + [0] * 3 * (256 - len(colours)))
    grid.quantize(palette=palette, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"{args.out}: {len(tiles)} cases, {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
