"""The report panel in a real headless Chromium against a real `cxr serve` (its own process, on
loopback) over an archive indexed with reports by `cxr index`: the report text beside the image
with the mined findings marked, the model's findings beside them, a planted disagreement both
ways, and the page's disagreement and report-word search."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from dicom_servers import free_port
from test_web import chromium_page

# the run reports Opacity on every image and never Pulmonary Atelectasis (thresholds 0 / 2),
# so each report below plants what the page must show
REPORTS = {
    # report-only atelectasis, model-only opacity; effusion is uncertain and no target
    "disagree": "Left basilar atelectasis. No pneumothorax. Possible small effusion.",
    "agree": "Right lower lobe opacity.",
    "silent": "",  # no report
}


def _planted_run(tiny_run: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for name in ("config.json", "weights.safetensors"):
        shutil.copy(tiny_run / name, out / name)
    config = json.loads((out / "config.json").read_text())
    assert {"Opacity", "Pulmonary Atelectasis"} <= set(config["thresholds"])
    config["thresholds"] = {t: (v if t == "normal" else 0.0 if t == "Opacity" else 2.0)
                            for t, v in config["thresholds"].items()}
    config["study"]["threshold"] = 0.0  # every study abnormal: the diseases above thresholds
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def served(tiny_run, radiographs, tmp_path_factory):
    """(base URL, name -> archive id) of `cxr serve` over an archive `cxr index` filled from a
    folder with a report column."""
    from cxr.archive.db import Archive
    from cxr.cli import main
    from cxr.service.loadtest import start_server, stop_process

    tmp = tmp_path_factory.mktemp("web_reports")
    folder = tmp / "pacs"
    folder.mkdir()
    rows = ["path,report"]
    for (name, report), png in zip(REPORTS.items(), radiographs[20:]):
        shutil.copy(png, folder / f"{name}.png")
        rows.append(f'{name}.png,"{report}"')
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = _planted_run(tiny_run, tmp / "run")
    db = f"sqlite:///{tmp / 'archive.db'}"
    assert main(["index", str(run), f"folder:{folder},manifest.csv", "--db", db, "--quiet",
                 "--force"]) == 0
    with Archive(db) as archive:
        ids = {Path(h.path).stem: h.id for h in archive.search(limit=10)}
    assert set(ids) == set(REPORTS)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp / "serve.log", "w") as log:
        server = start_server(run, db, port, threads=1, timeout=120, log=log, cwd=tmp, env=env)
        try:
            yield f"http://127.0.0.1:{port}", ids
        finally:
            stop_process(server, 20)


@pytest.fixture(scope="module")
def page(served):
    with chromium_page(served[0] + "/", 1400, 1100) as page:
        yield page


def test_report_panel_marks_mined_findings_and_the_planted_disagreement(page, served, tmp_path):
    from playwright.sync_api import expect

    _, ids = served
    expect(page.locator("#studies li")).to_have_count(3)
    page.locator(f"#studies li[data-id='{ids['disagree']}']").click()
    panel = page.locator("#report-panel")
    expect(panel).to_be_visible()
    expect(page.locator("#report-text")).to_contain_text("Left basilar atelectasis. No pneumothorax.")
    expect(page.locator("#report-panel .legend")).to_be_visible()
    # the mined finding, highlighted where it stands, named, styled by certainty
    atelectasis = page.locator("#report-text mark.mention.positive")
    expect(atelectasis).to_have_count(1)
    expect(atelectasis).to_have_text("atelectasis")
    expect(atelectasis).to_have_attribute("data-disease", "Pulmonary Atelectasis")
    expect(atelectasis).to_have_class("mention positive disagree")  # the model did not find it
    negated = page.locator("#report-text mark.mention.negative")
    expect(negated).to_have_text("pneumothorax")
    assert negated.get_attribute("title") == "Pneumothorax: negative; no model here reads it"
    assert atelectasis.get_attribute("title") == (
        "Pulmonary Atelectasis: positive; the model did not find it")
    uncertain = page.locator("#report-text mark.mention.uncertain")
    expect(uncertain).to_have_text("effusion")
    assert uncertain.get_attribute("title") == "Pleural Effusion: uncertain; no model here reads it"
    styles = page.evaluate("[...document.querySelectorAll('#report-text mark')].map(m => "
                           "getComputedStyle(m).borderStyle + getComputedStyle(m).backgroundColor)")
    assert len(set(styles)) == 3  # asserted, negated and uncertain look different
    # the model's finding beside it, and the disagreement both ways
    opacity = page.locator("#findings .finding[data-disease='Opacity']")
    expect(opacity).to_be_visible()
    expect(opacity.locator(".report-says")).to_have_text("not in the report")
    expect(page.locator("#disagreements li.report-only")).to_have_text(
        "Report says Pulmonary Atelectasis, the model does not")
    expect(page.locator("#disagreements li.model-only")).to_have_text(
        "Model says Opacity, the report does not")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    # a study where they agree
    page.locator(f"#studies li[data-id='{ids['agree']}']").click()
    expect(page.locator("#report-text")).to_contain_text("Right lower lobe opacity.")
    expect(page.locator("#disagreements li")).to_have_text("Report and model agree")
    expect(page.locator("#report-text mark.mention.positive")).to_have_attribute("data-disease",
                                                                                 "Opacity")
    expect(page.locator("#findings .finding[data-disease='Opacity'] .report-says")).to_have_text(
        "in the report")
    # and one without a report
    page.locator(f"#studies li[data-id='{ids['silent']}']").click()
    expect(page.locator("#report-text")).to_have_text("No report for this study.")
    expect(page.locator("#disagreements li")).to_have_count(0)
    expect(page.locator("#report-panel .legend")).to_be_hidden()  # no marks, no key to them
    assert page.errors == []
    if os.environ.get("CXR_SCREENSHOTS"):
        shutil.copy(tmp_path / "report.png", Path(os.environ["CXR_SCREENSHOTS"]) / "report.png")


def test_search_by_disagreement_and_report_words(page, served):
    from playwright.sync_api import expect

    _, ids = served
    results = page.locator("#results li")
    page.select_option("#f-disagree", "report-only")
    page.click("#search-button")
    expect(page.locator("#search-title")).to_contain_text("disagree=report-only")
    expect(results).to_have_count(1)
    expect(results.first).to_have_attribute("data-id", str(ids["disagree"]))
    page.select_option("#f-disagree", "model-only")
    page.click("#search-button")
    expect(page.locator("#search-title")).to_contain_text("disagree=model-only")
    expect(results).to_have_count(1)  # the agreeing study and the one without report are not
    expect(results.first).to_have_attribute("data-id", str(ids["disagree"]))
    page.select_option("#f-disagree", "")
    page.fill("#f-report", "opacity")
    page.click("#search-button")
    expect(page.locator("#search-title")).to_contain_text("report=opacity")
    expect(results).to_have_count(1)
    expect(results.first).to_have_attribute("data-id", str(ids["agree"]))
    results.first.click()  # a hit opens with its report
    expect(page.locator("#report-text")).to_contain_text("Right lower lobe opacity.")
    assert page.errors == []
