"""The quality gate with its shipped model, on real NIH films and phantom renders, and everywhere it
runs: the Reader, `cxr check`, `cxr annotate`, `cxr index` (the REST service's 422 and the web
page are tested in test_service.py and test_web.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.cli import main
from cxr.images import read_image, resize
from cxr.quality.gate import QualityGate


def _nih(nih_sample, n, skip=0):
    return sorted((nih_sample / "images").glob("*.png"))[skip:skip + n]


@pytest.fixture(scope="module")
def gate():
    return QualityGate.load(device="cpu")


@pytest.fixture(scope="module")
def films(nih_sample):
    """Eight real NIH frontal films, upright as stored in the fixture."""
    return [read_image(p).pixels for p in _nih(nih_sample, 8, skip=100)]


def _phantom(view):
    from cxr.phantom.render import Phantom

    return Phantom.load().render([], seed=3, size=256, view=view).image


def _png(path, pixels):
    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(nih_sample, tmp_path_factory):
    """One file per answer of the gate: name -> path."""
    from skimage.data import astronaut

    tmp = tmp_path_factory.mktemp("gate_files")
    film = read_image(_nih(nih_sample, 1, skip=100)[0]).pixels
    rng = np.random.default_rng(0)
    out = {
        "upright": _png(tmp / "upright.png", film),
        "rotated90": _png(tmp / "rotated90.png", np.rot90(film, 1)),
        "upside_down": _png(tmp / "upside_down.png", np.rot90(film, 2)),
        "inverted": _png(tmp / "inverted.png", 1.0 - film),
        "noise": _png(tmp / "noise.png", rng.random((256, 256))),
        "black": _png(tmp / "black.png", np.zeros((256, 256))),
        "white": _png(tmp / "white.png", np.ones((256, 256))),
        "one_pixel": _png(tmp / "one_pixel.png", np.full((1, 1), 0.5)),
        "stretched": _png(tmp / "stretched.png", resize(film, (100, 1000))),
    }
    Image.fromarray(astronaut()).save(tmp / "photo.jpg", quality=90)
    out["photo"] = tmp / "photo.jpg"
    return out


# -- the gate's answers ------------------------------------------------------------------------

def test_upright_real_films_are_read_as_they_are(gate, films):
    for report in gate.check(films):
        assert report.accepted and report.view == "frontal", report.summary()
        assert report.rotation == 0 and not report.inverted, report.summary()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotated_real_films_are_turned_back(gate, films, k):
    stored = [np.rot90(f, k) for f in films]
    for upright, image, report in zip(films, stored, gate.check(stored)):
        assert report.accepted and report.rotation == 90 * k, report.summary()
        np.testing.assert_array_equal(gate.correct(image, report), upright)


def test_inverted_real_films_are_turned_back(gate, films):
    stored = [1.0 - f for f in films]
    for upright, image, report in zip(films, stored, gate.check(stored)):
        assert report.accepted and report.inverted and report.rotation == 0, report.summary()
        np.testing.assert_allclose(gate.correct(image, report), upright, atol=1e-6)


def test_a_lateral_is_refused_by_a_frontal_reader(gate, shared_data):
    lateral, frontal = _phantom("lateral"), _phantom("PA")
    refused, accepted = gate.check([lateral, frontal])
    assert not refused.accepted and refused.view == "lateral"
    assert refused.reason.startswith("a lateral view (p ") and "reads frontal films only" in refused.reason
    assert accepted.accepted and accepted.view == "frontal", accepted.summary()
    both = QualityGate(gate.model, read_views=("frontal", "lateral"))
    assert both.check([lateral])[0].accepted


def test_a_grey_photograph_passes_the_cheap_checks_but_not_the_model(gate):
    from skimage.color import rgb2gray
    from skimage.data import astronaut, camera

    for photo in (rgb2gray(astronaut()), camera() / 255.0):
        report = gate.check([photo.astype(np.float32)])[0]
        assert all(c["passed"] for c in report.checks.values())
        assert not report.accepted and report.reason.startswith("not a chest radiograph"), report.summary()


def test_the_model_alone_calls_noise_no_radiograph(gate):
    noise = np.random.default_rng(1).random((256, 256)).astype(np.float32)
    assert gate.model.predict([noise])[0]["kind"]["other"] > 0.5


# -- cxr check ---------------------------------------------------------------------------------

EXPECTED = {  # file -> the start of its line after "FILE: "
    "upright": "ok: frontal (p ",
    "rotated90": "ok: frontal",
    "upside_down": "ok: frontal",
    "inverted": "ok: frontal",
    "noise": "not read: looks like noise",
    "black": "not read: blank: all black",
    "white": "not read: blank: all white",
    "one_pixel": "not read: too small: 1x1 pixels",
    "stretched": "not read: aspect ratio 10.0:1",
    "photo": "not read: a colour picture",
}


def test_cxr_check_answers_one_line_per_file(files, tmp_path, capsys):
    names = list(EXPECTED)
    code = main(["check", *[str(files[n]) for n in names], str(tmp_path / "missing.png"),
                 "--json", str(tmp_path / "gate.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(lines) == len(names) + 1
    for name, line in zip(names, lines):
        head = f"{files[name]}: "
        assert line.startswith(head + EXPECTED[name]), line
    assert "stored rotated 90 degrees" in lines[1] and "turned back" in lines[1]
    assert "  [kind frontal " in lines[0] and ", rotation 90 " in lines[1]  # every head's answer
    assert "[" not in lines[4]  # noise: refused before the network ran
    assert "stored rotated 180 degrees" in lines[2]
    assert "inverted polarity" in lines[3]
    assert lines[-1] == f"{tmp_path / 'missing.png'}: cannot read: file not found"
    reports = json.loads((tmp_path / "gate.json").read_text())
    assert [r["accepted"] for r in reports] == [True] * 4 + [False] * 7
    assert reports[1]["rotation"] == 90 and reports[3]["inverted"] is True
    assert reports[0]["gate_model"].startswith("gate-v") and len({r.get("gate_model") for r in reports[:-1]}) == 1
    assert set(reports[0]["probabilities"]) == {"kind", "rotation", "inverted", "mirrored", "projection"}
    assert reports[0]["projection"] in ("PA", "AP") and reports[4]["projection"] is None
    assert abs(sum(reports[0]["probabilities"]["kind"].values()) - 1) < 1e-3
    assert reports[5]["checks"]["blank"]["passed"] is False and reports[5]["probabilities"] == {}


def test_cxr_check_exits_0_when_every_file_is_a_frontal_film(files, capsys):
    assert main(["check", str(files["upright"]), str(files["rotated90"])]) == 0
    capsys.readouterr()


def test_cxr_check_on_a_lateral_depends_on_the_views_read(shared_data, tmp_path, capsys):
    path = _png(tmp_path / "lateral.png", _phantom("lateral"))
    assert main(["check", str(path)]) == 1
    assert "not read: a lateral view" in capsys.readouterr().out
    assert main(["check", str(path), "--views", "all"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok: lateral")


# -- the Reader --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader(tiny_run):
    from cxr.reader import Reader

    return Reader.load(tiny_run, device="cpu")


def test_reader_refuses_bad_images_in_a_batch_without_raising(reader, files):
    results = reader([files["upright"], files["noise"], files["photo"], files["one_pixel"]])
    ok, noise, photo, tiny = results
    assert ok.quality.accepted and ok.scores and not ok.refused
    for r in (noise, photo, tiny):
        assert r.refused and r.scores == {} and r.findings == [] and r.embedding is None
    assert "noise" in noise.quality.reason and "colour" in photo.quality.reason
    assert json.loads(json.dumps(noise.to_dict()))["quality"]["accepted"] is False
    assert repr(noise).startswith("Result(not read: looks like noise")


def test_reader_force_reads_a_refused_image_and_still_reports_it(reader, files):
    forced = reader(files["noise"], force=True)
    assert forced.scores and not forced.refused
    assert forced.quality.forced and not forced.quality.accepted
    assert forced.quality.summary().startswith("refused, read anyway: looks like noise")


def test_reader_reads_a_rotated_film_upright(reader, files):
    upright, rotated = reader([files["upright"], files["rotated90"]])
    assert rotated.quality.rotation == 90 and rotated.quality.accepted
    assert rotated.image_size == upright.image_size  # boxes refer to the upright film
    assert rotated.scores == pytest.approx(upright.scores, abs=1e-5)
    inverted = reader(files["inverted"])
    assert inverted.quality.inverted and inverted.scores == pytest.approx(upright.scores, abs=0.02)


def test_a_dicom_with_the_wrong_photometric_interpretation_is_read_the_right_way(reader, files, tmp_path):
    """A MONOCHROME1 film whose header says MONOCHROME2 loads inverted (bone dark): the gate
    turns it back, and the Reader reads what it reads from the film displayed right."""
    from cxr.dicom import write_dicom

    film = read_image(files["upright"]).pixels
    # MONOCHROME1 stores 1 - film; the same stored values under a MONOCHROME2 header
    right = write_dicom(tmp_path / "right.dcm", film, photometric="MONOCHROME1")
    wrong = write_dicom(tmp_path / "wrong.dcm", 1.0 - film, photometric="MONOCHROME2")
    a, b = reader([wrong, right])
    assert a.quality.inverted and not b.quality.inverted
    assert a.scores == pytest.approx(b.scores, abs=1e-4)


def test_embeddings_are_of_the_upright_film_as_read(reader, files):
    """`embed` (what `cxr search --like FILE` uses) turns a film as reading does, so a film on its
    side finds what its upright copy finds; it refuses nothing."""
    upright = reader(files["upright"]).embedding
    turned, noise = reader.embed([files["rotated90"], files["noise"]])
    np.testing.assert_allclose(turned, upright, atol=1e-5)
    assert np.isfinite(noise).all()


def test_reader_without_the_gate(tiny_run, files):
    from cxr.reader import Reader

    plain = Reader.load(tiny_run, device="cpu", gate=False)
    result = plain(files["noise"])
    assert result.quality is None and result.scores and "quality" not in result.to_dict()


# -- cxr annotate and cxr index -----------------------------------------------------------------

def test_annotate_refuses_with_one_line_and_force_reads(tiny_run, files, tmp_path, capsys):
    out = tmp_path / "a.json"
    code = main(["annotate", str(tiny_run), str(files["upright"]), str(files["photo"]),
                 str(files["rotated90"]), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{files['photo']}: not read: a colour picture" in err
    assert f"{files['rotated90']}: stored rotated 90 degrees" in err
    upright, photo, rotated = json.loads(out.read_text())
    assert photo["quality"]["accepted"] is False and photo["findings"] == [] and photo["scores"] == {}
    assert rotated["quality"]["rotation"] == 90 and rotated["scores"]
    assert upright["quality"]["accepted"] and upright["quality"]["notes"] == []
    code = main(["annotate", str(tiny_run), str(files["photo"]), "--force", "--json", str(out)])
    assert code == 0 and "refused, read anyway: a colour picture" in capsys.readouterr().err
    (forced,) = json.loads(out.read_text())
    assert forced["scores"] and forced["quality"]["forced"] is True


def test_index_records_refused_files_with_the_reason(tiny_run, files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "pacs"
    folder.mkdir()
    for name in ("upright", "rotated90", "noise", "photo"):
        shutil.copy(files[name], folder / files[name].name)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert main(["index", str(tiny_run), str(folder), "--db", db, "--quiet", "--json", "-"]) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    assert (stats["indexed"], stats["failed"], stats["refused"]) == (2, 2, 2)
    assert "failed 2 (of which 2 refused by the quality gate)" in captured.err
    assert main(["search", "--db", db, "--failed"]) == 0
    out = capsys.readouterr().out
    assert "failed: not read: looks like noise" in out
    assert "failed: not read: a colour picture" in out
    from cxr.archive.db import Archive

    with Archive(db) as archive:
        stored = {Path(r.path).name: r for r in [*archive.search(limit=10),
                                                  *archive.search(status="failed", limit=10)]}
    assert stored["rotated90.png"].quality["rotation"] == 90  # its boxes refer to the upright film
    assert stored["upright.png"].quality["accepted"] and stored["upright.png"].quality["rotation"] == 0
    assert stored["noise.png"].quality["checks"]["noise"]["passed"] is False
    # a second run does not read them again
    assert main(["index", str(tiny_run), str(folder), "--db", db, "--quiet", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 4
