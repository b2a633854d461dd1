"""The web page end to end in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright) against the real service: upload, findings, opacity slider, search, more like this."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import needs_in_ci
from service_helpers import run_asserting_every_finding

CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def site(tiny_run, radiographs, tmp_path_factory):
    """Base URL of a served archive of 6 NIH radiographs."""
    from cxr.archive.db import Archive
    from cxr.archive.index import index_images
    from cxr.reader import Reader
    from cxr.service.app import create_app
    from cxr.service.server import running_server

    tmp = tmp_path_factory.mktemp("web")
    folder = tmp / "pacs"
    folder.mkdir()
    for png in radiographs[:6]:
        shutil.copy(png, folder / png.name)
    url = f"sqlite:///{tmp / 'archive.db'}"
    run = run_asserting_every_finding(tiny_run, tmp / "run")
    reader = Reader.load(run)
    with Archive(url) as archive:
        index_images(archive, reader, sorted(map(str, folder.iterdir())), progress=False)
    with running_server(create_app(run, url, reader=reader, upload_dir=tmp / "uploads")) as base:
        yield base


@contextlib.contextmanager
def chromium_page(url: str, width: int, height: int):
    """A headless Chromium page at `url`; `page.errors` collects the page's script errors and
    console errors, which the tests assert empty."""
    needs_in_ci(os.path.exists(CHROMIUM), "Chromium")
    from playwright import sync_api  # the `test` extra
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.set_default_timeout(30_000)
            page.goto(url)
            page.errors = errors
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(site):
    with chromium_page(site + "/", 1280, 1000) as page:
        yield page


def test_upload_see_findings_slide_opacity_search_and_more_like_this(page, radiographs, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#banner")).to_contain_text("Research use only")
    expect(page.locator("#model")).to_contain_text("6 indexed image")
    expect(page.locator("#studies li")).to_have_count(6)
    # before any image: the hint, not an empty (broken) image
    expect(page.locator("#placeholder")).to_be_visible()
    expect(page.locator("#stage")).to_be_hidden()

    # upload: findings with scores and annotations, the image, a drawn heatmap, boxes
    png = radiographs[50]
    page.set_input_files("#file", str(png))
    page.click("#annotate")
    expect(page.locator("#status")).to_contain_text("finding(s) in " + png.name)
    findings = page.locator("#findings .finding")
    expect(findings.first).to_be_visible()
    # the study-level answer comes first, in words, with its probability
    expect(page.locator("#findings .study")).to_have_text(re.compile(r"^Study: (ab)?normal \(p abnormal 0\.\d\d\)$"))
    assert findings.count() >= 1
    first = findings.first.inner_text()
    assert any(c.isdigit() for c in first) and findings.first.locator(".annotation").inner_text()
    expect(page.locator("#stage")).to_be_visible()
    assert page.evaluate("document.getElementById('base').naturalWidth") == 256
    page.wait_for_function("document.getElementById('heat').dataset.drawn")
    assert page.locator("#heat-select option").count() >= 1
    assert page.locator("#boxes rect").count() >= 1

    # the opacity slider drives the overlay
    page.locator("#opacity").fill("80")
    expect(page.locator("#opacity-value")).to_have_text("80%")
    assert page.evaluate("getComputedStyle(document.getElementById('heat')).opacity") == "0.8"
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)

    # more like this (from the upload's embedding): the nearest archive images
    page.click("#more-like")
    expect(page.locator("#search-title")).to_contain_text("most like")
    expect(page.locator("#results li")).to_have_count(6)

    # structured search with a menu filled from the archive
    disease = page.locator("#findings .finding .name").first.inner_text()
    page.select_option("#f-finding", disease)
    page.click("#search-button")
    expect(page.locator("#search-title")).to_contain_text("match")
    assert page.locator("#results li").count() >= 1
    assert page.evaluate("[...document.querySelectorAll('#results img')].every(i => i.complete)")

    # open a result: the indexed image with its stored findings, then more like it
    page.locator("#results li").first.click()
    expect(page.locator("#subject")).to_contain_text("#")
    page.click("#more-like")
    expect(page.locator("#results li")).to_have_count(5)  # the other indexed images
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    assert page.errors == []
    if os.environ.get("CXR_SCREENSHOTS"):
        shutil.copy(tmp_path / "viewer.png", Path(os.environ["CXR_SCREENSHOTS"]) / "viewer.png")
        shutil.copy(tmp_path / "search.png", Path(os.environ["CXR_SCREENSHOTS"]) / "search.png")


def test_a_bad_upload_shows_the_reason(page, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    page.set_input_files("#file", str(bad))
    page.click("#annotate")
    expect(page.locator("#status")).to_contain_text("broken.png")
    expect(page.locator("#status")).to_have_class("error")


def test_a_refused_upload_shows_the_gate_s_reason(page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect
    from skimage.data import astronaut

    photo = tmp_path / "holiday.jpg"
    Image.fromarray(astronaut()).save(photo)
    page.set_input_files("#file", str(photo))
    page.click("#annotate")
    expect(page.locator("#status")).to_contain_text("holiday.jpg: not read: a colour picture")
    expect(page.locator("#status")).to_have_class("error")


def test_a_film_stored_upside_down_is_read_upright_and_the_page_says_so(page, radiographs, tmp_path):
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    from cxr.images import load_image

    film = (load_image(radiographs[60]) * 255).round().astype(np.uint8)  # 8 or 16-bit PNG
    turned = tmp_path / "upside_down.png"
    Image.fromarray(np.rot90(film, 2).copy()).save(turned)
    page.set_input_files("#file", str(turned))
    page.click("#annotate")
    expect(page.locator("#status")).to_contain_text("in upside_down.png")
    expect(page.locator("#status")).to_contain_text("stored rotated 180 degrees")
    expect(page.locator("#status")).not_to_have_class("error")


def test_a_finding_shows_what_was_measured_and_why_a_number_is_missing(page):
    """The page draws a finding as the service sends it (`DetectedFinding.to_dict`): the
    cardiothoracic ratio as a chip on a PA film, and on an AP film the note that says why there
    is none, so a missing number does not read as a fault."""
    from playwright.sync_api import expect

    from cxr.reader import NO_RATIO_ON_AP
    from cxr.results import DetectedFinding

    pa = DetectedFinding("Cardiomegaly", 0.9, "cardiomegaly mild", severity="mild",
                         measurements={"cardiothoracic_ratio": 0.56})
    ap = DetectedFinding("Cardiomegaly", 0.8, "cardiomegaly moderate", severity="moderate",
                         notes=[NO_RATIO_ON_AP])
    before = len(page.errors)  # the refused uploads above logged theirs
    page.evaluate("f => showFindings(f, {}, 'abnormal', 0.9)", [pa.to_dict(), ap.to_dict()])
    shown = page.locator("#findings .finding")
    expect(shown).to_have_count(2)
    expect(shown.nth(0)).to_contain_text("cardiothoracic ratio 0.56")
    expect(shown.nth(0).locator(".note")).to_have_count(0)
    expect(shown.nth(1).locator(".note")).to_have_text(NO_RATIO_ON_AP)
    expect(shown.nth(1)).not_to_contain_text("cardiothoracic ratio 0.")
    assert page.errors[before:] == []


def test_api_docs_render_without_the_internet(page, site):
    """Swagger UI comes from local files (swagger-ui-bundle-v2), so /docs works offline."""
    from playwright.sync_api import expect

    page.goto(site + "/docs")
    expect(page.locator(".opblock-summary-path").filter(has_text="/annotate").first).to_be_visible()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("cxr")
