"""`cxr demo` building blocks on the tiny run (a full demo takes minutes): settings, example
annotation, the HTML report (self-contained, with tables, images and the reliability diagram)."""
from __future__ import annotations

import argparse
import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image as PILImage

from cxr.commands import demo
from cxr.errors import CxrError
from cxr.evaluation import evaluate_run
from cxr.records import Box
from cxr.report_html import overlay


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _args(**kw):
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return parser.parse_args(argv)


def test_settings_defaults_quick_and_overrides():
    s = demo.settings_from_args(_args())
    assert s["backbone"] == "tiny" and s["n"] == demo.DEFAULTS["n"] and not s["quick"]
    q = demo.settings_from_args(_args(quick=True, n=30))
    assert q["n"] == 30 and q["image_size"] == demo.QUICK["image_size"] and q["quick"]
    s = demo.settings_from_args(_args(image_size=96))
    assert s["crop"] == 84
    with pytest.raises(CxrError, match="larger than the simulated"):
        demo.settings_from_args(_args(size=64, image_size=96))


def test_figures_name_the_processor_they_were_measured_on():
    """The demo's metrics and the benchmarks' JSON name the CPU model from /proc/cpuinfo, where
    `platform.processor()` says only "x86_64" (or nothing) on Linux."""
    import platform
    from pathlib import Path

    from cxr.machine import cpu

    info = cpu()
    assert info["torch_capability"] and info["model"]
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    if names:
        assert info["model"] == names[0] and info["model"] != platform.machine()


def test_demo_refuses_a_folder_with_other_settings(tmp_path):
    (tmp_path / demo.STATE).write_text(json.dumps({"settings": {"n": 5}}))
    with pytest.raises(CxrError, match="other settings"):
        demo.run_demo(tmp_path, dict(demo.QUICK, seed=0, quick=True))


def test_overlay_draws_heat_and_boxes():
    img = np.full((40, 40), 0.5, np.float32)
    heat = np.zeros((40, 40), np.float32)
    heat[:10, :10] = 1.0
    pil = overlay(img, heat, [(Box("x", 20, 20, 10, 10), (255, 0, 0))], [Box("t", 0, 30, 8, 8)], width=40)
    a = np.asarray(pil).astype(int)
    assert a.shape == (40, 40, 3)
    assert abs(a[5, 5] - a[15, 15]).sum() > 50  # hot corner is coloured, cold stays grey
    assert tuple(a[15, 15]) == (128, 128, 128)
    assert tuple(a[20, 25]) == (255, 0, 0)  # predicted box outline
    assert a[30, 4, 1] > 200 and a[30, 4, 0] < 100  # true box outline is green


def test_report_on_the_tiny_run(tiny_run, tmp_path):
    from cxr.sources import open_source
    from cxr.checkpoint import load_spec

    spec = load_spec(tiny_run).data.spec
    studies = open_source(spec)
    m = evaluate_run(tiny_run, split="all", out=tmp_path, progress=False, studies=studies,
                     bleu_splits=("test",))
    m["demo"] = {"settings": {"n": 28, "size": 64, "image_size": 64}, "seconds": {"train": 1.0},
                 "machine": "test", "threads": 1}
    from service_helpers import run_asserting_every_finding

    # the examples from a copy that calls every study abnormal and reports every disease, so that
    # the report has findings to draw whatever the tiny model learnt
    examples = demo.annotate_examples(run_asserting_every_finding(tiny_run, tmp_path / "eager"), studies, 3)
    assert 1 <= len(examples) <= 3
    assert all(e.result.image_size == e.image.shape for e in examples)
    path = demo.write_demo_report(tmp_path / "report.html", m, examples)
    doc = path.read_text()
    p = _Collect()
    p.feed(doc)
    assert p.tags.count("table") >= 4 and "svg" in p.tags
    # two per example, plus one small map per word the grounded annotator wrote
    word_maps = sum(1 for e in examples for k in e.result.heatmaps if ":" in k
                    and k.split(":", 1)[0] in {f.disease for f in e.result.findings})
    assert word_maps > 0 and len(p.images) == 2 * len(examples) + word_maps
    for src in p.images:  # every image is an embedded, decodable PNG
        assert src.startswith("data:image/png;base64,")
        PILImage.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    text = " ".join(p.text)
    for words in ("mean AUC", "study level: sensitivity", "BLEU-4 before cascade", "Localisation accuracy by IoBB",
                  "Research use only", examples[0].id):
        assert words in text
    # each example says the study-level answer first (that copy calls every study abnormal)
    assert text.count("study: abnormal (p abnormal") == len(examples)
    assert "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
