"""The quality gate's shipped network: loads without pickle, and on images it never trained on
(held-out NIH patients, held-out phantom seeds, fresh noise) its answers are right."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.errors import CxrError
from cxr.quality.model import HEADS, WEIGHTS_DIR, GateModel


@pytest.fixture(scope="module")
def gate(one_torch_thread):
    return GateModel.load()


def _top(pred: dict, head: str) -> str:
    return max(pred[head], key=pred[head].get)


def test_shipped_weights_are_safetensors_with_their_card(gate):
    from safetensors import safe_open

    with safe_open(str(WEIGHTS_DIR / "gate.safetensors"), "pt") as f:   # no pickle involved
        assert len(list(f.keys())) > 5
    meta = json.loads((WEIGHTS_DIR / "gate.json").read_text())
    assert meta["heads"] == HEADS and set(meta["temperatures"]) == set(HEADS)
    assert (WEIGHTS_DIR / "MODEL_CARD.md").is_file()
    assert gate.meta["input_size"] == 64


def test_probabilities_for_any_size(gate):
    rng = np.random.default_rng(0)
    images = [rng.random((1, 1), dtype=np.float32), rng.random((30, 300), dtype=np.float32),
              rng.random((700, 90), dtype=np.float32)]
    for pred in gate.predict(images):
        assert set(pred) == set(HEADS) | {"projection"}   # PA/AP: the shipped projection head
        for head, names in {**HEADS, "projection": ["PA", "AP"]}.items():
            assert list(pred[head]) == names
            assert abs(sum(pred[head].values()) - 1) < 1e-5
    assert gate.predict([]) == []
    with pytest.raises(CxrError):
        gate.predict([np.zeros((4, 4, 3), np.float32)])


def test_real_films_turned_by_software_are_recognised(gate, nih_sample):
    """Four films of patients the gate never saw, in every rotation and both polarities."""
    from cxr.images import load_image
    from cxr.quality.train import nih_split

    test = nih_split(nih_sample, gate.meta["training"]["seed"])["test"]
    films = [load_image(p) for p in test[:4]]
    images, truth = [], []
    for film in films:
        for k in range(4):
            for inv in (False, True):
                img = np.rot90(film, k)
                images.append(np.ascontiguousarray(1 - img if inv else img))
                truth.append((str(k * 90), "yes" if inv else "no"))
    preds = gate.predict(images)
    assert [(_top(p, "rotation"), _top(p, "inverted")) for p in preds] == truth
    upright = [p for p, t in zip(preds, truth) if t == ("0", "no")]
    assert all(p["kind"]["frontal"] > 0.5 for p in upright)


def test_phantom_lateral_is_lateral_and_pa_is_frontal(gate, shared_data):
    from cxr.phantom.render import Phantom
    from cxr.quality.train import TEST_SEEDS

    ph = Phantom.load()
    lat = ph.render(seed=TEST_SEEDS + 7, size=256, view="lateral").image
    pa = ph.render(seed=TEST_SEEDS + 7, size=256).image
    p_lat, p_pa = gate.predict([lat, pa])
    assert _top(p_lat, "kind") == "lateral"
    assert _top(p_pa, "kind") == "frontal"


def test_noise_and_blank_frames_are_other(gate):
    rng = np.random.default_rng(123)
    images = [rng.random((256, 256), dtype=np.float32), np.zeros((200, 200), np.float32),
              np.ones((300, 240), np.float32)]
    assert [_top(p, "kind") for p in gate.predict(images)] == ["other"] * 3
