"""The HTML report of an evaluated run: one self-contained file (images embedded as base64 PNG,
the reliability diagram as inline SVG), so it can be mailed or opened from any folder.

`write_report` takes the metrics dict `cxr evaluate` writes, the tables made from it, and a few
annotated example images; it knows nothing about models.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from .atomic import write_atomic
from .metrics import fmt
from .records import Box
from .results import Result

PRED_COLOURS = [(255, 214, 0), (255, 120, 40), (255, 60, 160), (80, 200, 255), (170, 120, 255)]
TRUTH_COLOUR = (40, 230, 90)


@dataclass
class Table:
    """A titled table; `note` says what the numbers mean (shown under the table)."""

    title: str
    headers: list[str]
    rows: list[list]
    note: str = ""
    digits: int = 3


@dataclass
class Example:
    """One held-out image with what the cascade said about it and the truth."""

    id: str
    image: np.ndarray  # (H, W) float32 in [0, 1]
    result: Result
    truth: list[str] = field(default_factory=list)  # true terms, e.g. "Opacity/lung/base/left/mild"
    truth_boxes: list[Box] = field(default_factory=list)


# ------------------------------------------------------------------------------- images
def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map: (H, W) in [0, 1] -> (H, W, 3) float in [0, 1]."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def overlay(image: np.ndarray, heatmap: np.ndarray | None = None,
            boxes: Sequence[tuple[Box, tuple[int, int, int]]] = (),
            truth_boxes: Sequence[Box] = (), width: int = 320) -> PILImage.Image:
    """The radiograph in grey, the heatmap blended where it is hot (alpha grows with heat),
    predicted boxes in their colours, true boxes in green; scaled to `width` pixels."""
    img = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    rgb = np.repeat(img[..., None], 3, axis=-1)
    if heatmap is not None:
        heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1)
        if heat.shape != img.shape:
            heat = np.asarray(PILImage.fromarray(heat).resize(img.shape[::-1], PILImage.BILINEAR))
        alpha = (0.6 * np.clip((heat - 0.4) / 0.6, 0, 1))[..., None]  # cold = transparent
        rgb = (1 - alpha) * rgb + alpha * _jet(heat)
    pil = PILImage.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    scale = width / pil.width
    pil = pil.resize((width, round(pil.height * scale)), PILImage.BILINEAR)
    draw = ImageDraw.Draw(pil)
    for b in truth_boxes:
        draw.rectangle(_xyxy(b, scale), outline=TRUTH_COLOUR, width=2)
    for b, colour in boxes:
        x0, y0, x1, y1 = _xyxy(b, scale)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        draw.text((x0 + 3, y0 + 2), b.label[:18], fill=colour)
    return pil


def _xyxy(b: Box, scale: float) -> tuple[float, float, float, float]:
    return (b.x * scale, b.y * scale, (b.x + b.w) * scale - 1, (b.y + b.h) * scale - 1)


def png_data_uri(pil: PILImage.Image) -> str:
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------- HTML
def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.headers)
    def cell(c) -> str:
        text = html.escape(fmt(c, table.digits))
        return f"<td>{text}</td>" if _is_number(c) else f'<td class="text">{text}</td>'

    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (f"<section><h3>{html.escape(table.title)}</h3><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{note}</section>")


def _is_number(c) -> bool:
    return c is None or (isinstance(c, (int, float, np.number)) and not isinstance(c, bool))


def reliability_svg(calibration: dict, size: int = 260) -> str:
    """Reliability diagram: observed frequency against mean score per bin (bars), diagonal =
    perfect calibration; bar opacity grows with the number of scores in the bin."""
    pad = 34
    inner = size - 2 * pad
    bins = calibration.get("bins") or []
    total = max(sum(b["count"] for b in bins), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
             f'class="reliability" role="img" aria-label="reliability diagram">',
             f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="#fafafa" stroke="#999"/>']
    for b in bins:
        if not b["count"]:
            continue
        x = pad + b["lo"] * inner
        w = (b["hi"] - b["lo"]) * inner
        h = b["frequency"] * inner
        op = 0.35 + 0.65 * min(1.0, 10 * b["count"] / total)
        parts.append(f'<rect x="{x:.1f}" y="{pad + inner - h:.1f}" width="{w - 1:.1f}" '
                     f'height="{h:.1f}" fill="#3b6fb6" fill-opacity="{op:.2f}">'
                     f'<title>scores {b["lo"]:.2f}-{b["hi"]:.2f}: n={b["count"]}, mean score '
                     f'{b["confidence"]:.3f}, positive {b["frequency"]:.3f}</title></rect>')
    parts.append(f'<line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" y2="{pad}" '
                 f'stroke="#c33" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle" font-size="11">'
                 f'score</text>')
    parts.append(f'<text x="10" y="{size / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 10 {size / 2})">share positive</text>')
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{pad + t * inner}" y="{pad + inner + 13}" font-size="10" '
                     f'text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{pad - 4}" y="{pad + inner - t * inner + 3}" font-size="10" '
                     f'text-anchor="end">{t:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _confidence_line(f) -> str:
    """The annotator's confidence in each context word it wrote, e.g. "side .83 · severity .91"."""
    if not f.confidence:
        return ""
    parts = " · ".join(f"{html.escape(k)} {v:.2f}" for k, v in f.confidence.items())
    return f'<br><small class="muted">sure of the words: {parts}</small>'


def _measurement_line(f) -> str:
    """What was measured for the finding, e.g. "cardiothoracic ratio 0.56", or why not."""
    parts = " · ".join(html.escape(m) for m in f.measured_or_why_not())
    return f'<br><small>{parts}</small>' if parts else ""


def example_html(ex: Example, width: int = 300) -> str:
    """Raw image, overlay (heatmaps of the detected findings, their boxes, true boxes in green),
    and the generated annotations next to the true terms."""
    res = ex.result
    coloured = []
    for i, f in enumerate(res.findings):
        coloured += [(b, PRED_COLOURS[i % len(PRED_COLOURS)]) for b in f.boxes]
    # the heatmap of the highest-scoring finding that has one (several would mix colours)
    heat = next((res.heatmaps[f.disease] for f in res.findings if f.disease in res.heatmaps), None)
    raw = png_data_uri(overlay(ex.image, width=width))
    over = png_data_uri(overlay(ex.image, heat, coloured, ex.truth_boxes, width=width))
    found = "".join(
        f'<li><span class="swatch" style="background:rgb{PRED_COLOURS[i % len(PRED_COLOURS)]}">'
        f'</span><b>{html.escape(f.disease)}</b> {f.score:.2f}'
        f'<br><code>{html.escape(f.annotation or "")}</code>{_measurement_line(f)}{_confidence_line(f)}</li>'
        for i, f in enumerate(res.findings)) or "<li><i>no finding above its threshold</i></li>"
    truth = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in ex.truth) \
        or "<li><i>normal</i></li>"
    study = f'<p class="study">{html.escape(res.study_text)}</p>' if res.study_text else ""
    top = sorted(res.scores.items(), key=lambda kv: -kv[1])[:5]
    scores = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in top)
    return (f'<div class="example"><h4>{html.escape(ex.id)}</h4>'
            f'<div class="pair"><img alt="{html.escape(ex.id)}" src="{raw}">'
            f'<img alt="{html.escape(ex.id)} with heatmap and boxes" src="{over}"></div>'
            f'<div class="lists"><div><h5>cxr says</h5>{study}<ul>{found}</ul></div>'
            f'<div><h5>truth</h5><ul>{truth}</ul></div></div>'
            f'{word_maps_html(ex)}'
            f'<p class="note">top scores: {scores}</p></div>')


def word_maps_html(ex: Example, width: int = 96) -> str:
    """Where the annotator looked while writing each word (heatmaps keyed "Disease:word"), one
    small strip per detected finding; empty for runs without the grounded annotator."""
    rows = []
    for f in ex.result.findings:
        keys = [k for k in ex.result.heatmaps if k.startswith(f.disease + ":")]
        if not keys:
            continue
        cells = "".join(
            f'<figure><img alt="{html.escape(k)}" src="{png_data_uri(overlay(ex.image, ex.result.heatmaps[k], width=width))}">'
            f'<figcaption>{html.escape(k.split(":", 1)[1])}</figcaption></figure>' for k in keys)
        rows.append(f'<div class="words"><span>{html.escape(f.disease)}</span>{cells}</div>')
    return "".join(rows)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fff}
header{background:#17324d;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
.banner{background:#fff3cd;color:#664d03;padding:6px 24px;font-size:13px;border-bottom:1px solid #e8d48a}
main{padding:8px 24px 40px;max-width:1400px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:24px;font-weight:600}.card .k{font-size:12px;color:#555}
.tables{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
section{margin:6px 0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:12px 0 6px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f5f7}td:first-child,th:first-child,td.text{text-align:left}
.note{font-size:12px;color:#555;max-width:640px;margin:4px 0}
.examples{display:flex;flex-wrap:wrap;gap:18px}
.example{border:1px solid #ddd;border-radius:8px;padding:8px;width:620px}
.example h4{margin:0 0 6px;font-size:14px}.pair img{width:300px;margin-right:6px;image-rendering:auto}
.lists{display:flex;gap:24px;font-size:13px}.lists ul{padding-left:18px;margin:4px 0}
.lists h5{margin:6px 0 0;font-size:13px}code{font-size:12px;background:#f3f5f7;padding:0 3px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #999}
.legend{font-size:12px;color:#555}
.words{display:flex;align-items:center;gap:4px;font-size:12px;margin-top:4px}.words span{width:90px}
.words figure{margin:0;text-align:center}.words img{width:96px}.words figcaption{font-size:11px}
"""


def write_report(path: str | Path, title: str, summary: Sequence[tuple[str, object]],
                 tables: Sequence[Table], examples: Sequence[Example] = (),
                 calibration: dict | None = None, meta: Sequence[str] = (),
                 notes: Sequence[str] = ()) -> Path:
    """Write one self-contained HTML report. `summary` is the headline cards (label, value),
    `meta` one-line facts under the title (run, data, time), `notes` paragraphs at the end."""
    path = Path(path)
    cards = "".join(f'<div class="card"><div class="v">{html.escape(fmt(v))}</div>'
                    f'<div class="k">{html.escape(k)}</div></div>' for k, v in summary)
    tables_html = "".join(html_table(t) for t in tables)
    cal = ""
    if calibration and calibration.get("n"):
        cal = (f"<h2>Calibration</h2>{reliability_svg(calibration)}"
               f'<p class="note">Expected calibration error over all (image, label) scores: '
               f'{fmt(calibration.get("ece"))} ({calibration.get("n_bins")} bins, '
               f'{calibration.get("n")} scores).</p>')
    ex_html = ""
    if examples:
        ex_html = ("<h2>Held-out examples</h2><p class=\"legend\">Left: the image. Right: heatmap of "
                   "the top detected finding, the boxes of all detected findings (coloured as in the list) and the true boxes "
                   "(green). Generated annotations next to the true MeSH-style terms; below, where the annotator "
                   "looked while writing each word.</p>"
                   f'<div class="examples">{"".join(example_html(e) for e in examples)}</div>')
    meta_html = "<br>".join(html.escape(m) for m in meta)
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
           f"<header><h1>{html.escape(title)}</h1><p>{meta_html}</p></header>"
           f'<div class="banner">Research use only: not a medical device.</div><main>'
           f'<div class="cards">{cards}</div><h2>Metrics</h2><div class="tables">{tables_html}</div>'
           f"{cal}{ex_html}{notes_html}</main></body></html>")
    return write_atomic(path, doc)
