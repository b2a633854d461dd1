"""The quality gate's cheap checks and its decision rule (no network needed here; the gate model's
answers on real films are tested in test_quality_gate.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cxr.images import read_image, resize
from cxr.quality.checks import failures, run_checks
from cxr.quality.gate import QualityGate, QualityReport, decide


def _nih(nih_sample, n=None, step=1):
    files = sorted((nih_sample / "images").glob("*.png"))
    return files[::step][:n]


def _failed(pixels, colour=None) -> list[str]:
    return [c.name for c in run_checks(pixels, colour) if not c.passed]


def test_real_films_pass_every_cheap_check(nih_sample):
    """Loose thresholds: every one of the real NIH films (8-bit, some RGBA) passes."""
    for path in _nih(nih_sample, step=3):
        loaded = read_image(path)
        assert failures(run_checks(loaded.pixels, loaded.meta["colour_fraction"])) == [], path


def test_phantom_render_passes_every_cheap_check(shared_data):
    from cxr.phantom.render import Phantom

    for size in (64, 256):
        assert failures(run_checks(Phantom.load().render([], seed=1, size=size).image)) == []


@pytest.mark.parametrize("name, make, check", [
    ("uniform noise", lambda r: r.random((256, 256)), "noise"),
    ("gaussian noise", lambda r: np.clip(0.5 + 0.2 * r.standard_normal((300, 240)), 0, 1), "noise"),
    ("all black", lambda r: np.zeros((256, 256)), "blank"),
    ("all white", lambda r: np.ones((256, 256)), "blank"),
    ("one grey", lambda r: np.full((256, 256), 0.4), "blank"),
    ("one pixel", lambda r: np.full((1, 1), 0.5), "size"),
    ("a thumbnail", lambda r: r.random((20, 24)), "size"),
    ("a two-level drawing", lambda r: (np.add.outer(np.arange(200), np.arange(200)) % 50 < 10) * 1.0,
     "grey_levels"),
    ("a flat field with a speck", lambda r: np.pad(np.full((10, 10), 0.5), 123) + 0.5,
     "dynamic_range"),
])
def test_refusals(name, make, check):
    failed = _failed(np.asarray(make(np.random.default_rng(0)), np.float32))
    assert check in failed, (name, failed)


def test_real_film_stretched_ten_to_one_is_refused(nih_sample):
    film = read_image(_nih(nih_sample, 1)[0]).pixels
    assert _failed(film) == []
    failed = _failed(resize(film, (256, 2560)))
    assert failed == ["aspect"]
    reason = failures(run_checks(resize(film, (2560, 256))))[0]
    assert reason.startswith("aspect ratio 10.0:1")


def test_colour_photographs_are_refused_grey_films_in_colour_files_are_not(nih_sample, tmp_path):
    from PIL import Image
    from skimage.data import astronaut

    Image.fromarray(astronaut()).save(tmp_path / "photo.jpg", quality=90)
    photo = read_image(tmp_path / "photo.jpg")
    assert photo.meta["colour_fraction"] > 0.3
    assert "colour" in _failed(photo.pixels, photo.meta["colour_fraction"])
    assert "colour" in _failed(astronaut() / 255.0)  # a colour array handed in from Python

    grey = np.asarray(Image.open(_nih(nih_sample, 1)[0]).convert("L"))
    rgb = np.stack([grey] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "film.jpg", quality=75)  # JPEG chroma noise
    Image.fromarray(rgb).save(tmp_path / "film.png")
    for name in ("film.jpg", "film.png"):
        film = read_image(tmp_path / name)
        assert film.meta["mode"] == "RGB" and film.meta["colour_fraction"] < 0.01
        assert _failed(film.pixels, film.meta["colour_fraction"]) == []
    marked = rgb.copy()
    marked[10:30, 10:60] = (255, 0, 0)  # a red marker label on a film is not a colour photo
    assert _failed(marked / 255.0) == []


# -- the decision rule ----------------------------------------------------------------------

def _probs(kind=(0.98, 0.01, 0.01), rotation=(0.97, 0.01, 0.01, 0.01), inverted=0.01, mirrored=0.01):
    return {"kind": dict(zip(("frontal", "lateral", "other"), kind)),
            "rotation": dict(zip(("0", "90", "180", "270"), rotation)),
            "inverted": {"no": 1 - inverted, "yes": inverted},
            "mirrored": {"no": 1 - mirrored, "yes": mirrored}}


def test_decision_upright_frontal_is_read_as_it_is():
    r = decide(_probs())
    assert r.accepted and r.view == "frontal" and r.rotation == 0 and not r.inverted
    assert r.notes == [] and r.reasons == [] and not r.corrected
    assert r.summary() == "ok: frontal (p 0.98)"


def test_decision_refuses_other_and_lateral():
    other = decide(_probs(kind=(0.2, 0.1, 0.7)))
    assert not other.accepted and other.reasons == ["not a chest radiograph (p 0.70)"]
    lateral = decide(_probs(kind=(0.1, 0.85, 0.05)))
    assert not lateral.accepted and "lateral view (p 0.85)" in lateral.reason
    assert lateral.summary().startswith("not read: a lateral view")
    assert decide(_probs(kind=(0.1, 0.85, 0.05)), read_views=("frontal", "lateral")).accepted
    assert not decide(_probs(), read_views=("lateral",)).accepted


def test_decision_turns_back_rotation_and_polarity_reports_mirroring():
    r = decide(_probs(rotation=(0.1, 0.05, 0.8, 0.05), inverted=0.9, mirrored=0.95))
    assert r.accepted and r.rotation == 180 and r.inverted and r.mirrored and r.corrected
    assert len(r.notes) == 3 and "180" in r.notes[0] and "mirrored" in r.notes[2]
    assert not decide(_probs(mirrored=0.7)).mirrored  # a note only when confident
    assert not decide(_probs(kind=(0.05, 0.9, 0.05), mirrored=0.95)).mirrored  # laterals face either way
    unsure = decide(_probs(rotation=(0.4, 0.35, 0.2, 0.05), inverted=0.45))
    assert unsure.rotation == 0 and not unsure.inverted  # below p .5: left as stored


@pytest.mark.parametrize("k", [1, 2, 3])
def test_correct_undoes_the_stored_rotation_and_polarity(nih_sample, k):
    upright = read_image(_nih(nih_sample, 1)[0]).pixels
    stored = 1.0 - np.rot90(upright, k)
    report = QualityReport(accepted=True, rotation=90 * k, inverted=True)
    np.testing.assert_allclose(QualityGate.correct(stored, report), upright, atol=1e-6)


def test_report_round_trips_through_json():
    import json

    r = decide(_probs(rotation=(0.1, 0.8, 0.05, 0.05)), gate_model="g1")
    again = QualityReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.to_dict() == r.to_dict() and again.rotation == 90
