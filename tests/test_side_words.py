"""The side words teach the CNN which image half holds a finding (`cxr train --side-mil`)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from cxr.models.cnn import create_cnn
from cxr.training.config import TrainConfig
from cxr.training.loops import Context, half_logits, train_cnn
from cxr.training.pipeline import side_halves


def test_side_words_become_image_halves():
    """"left" is the image's right half on a PA film, "right" its left half, "bilateral" and a
    left plus a right finding both; a finding of that disease without a side word leaves the
    halves it does not name unknown, and a disease the image lacks is unknown."""
    prep = SimpleNamespace(paths=["a", "b", "c", "d"], pairs=[
        (0, 0, ["opacity", "lung", "left"]),
        (1, 0, ["opacity", "right"]), (1, 0, ["opacity", "left"]),
        (2, 0, ["opacity"]), (2, 1, ["pleural effusion", "bilateral"]),
        (3, 0, ["opacity", "left"]), (3, 0, ["opacity", "base"]),
    ])
    h = side_halves(prep, 2)
    assert h[0, 0].tolist() == [0.0, 1.0]
    assert h[1, 0].tolist() == [1.0, 1.0]
    assert np.isnan(h[2, 0]).all() and h[2, 1].tolist() == [1.0, 1.0]
    assert np.isnan(h[3, 0, 0]) and h[3, 0, 1] == 1.0
    assert np.isnan(h[0, 1]).all()


def test_half_logits_read_the_image_halves_in_order():
    head = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.zero_()
    maps = torch.zeros(1, 1, 4, 4)
    maps[..., 3] = 5.0  # evidence in the image's right half only
    left, right = half_logits(head, maps)[0, 0].tolist()
    assert right > left + 3


def test_the_side_words_teach_the_cnn_which_half_holds_the_finding(tmp_path):
    """Films with one bright blob, on the image's left or right: the side-word loss falls well
    below chance (ln 2) only if each film's words reach its own halves."""
    rng = np.random.default_rng(0)
    n, size = 96, 32
    images = (rng.random((n, size, size)) * 12000).astype(np.uint16)
    halves = np.zeros((n, 1, 2), np.float32)
    for i in range(n):
        right = i % 2
        y, x = rng.integers(8, 20), (rng.integers(20, 26) if right else rng.integers(3, 9))
        images[i, y:y + 5, x:x + 5] = 60000
        halves[i, 0, right] = 1.0
    labels = np.ones((n, 1), np.float32)
    cfg = TrainConfig(backbone="tiny", image_size=size, crop=size, epochs=8, batch_size=16, lr=3e-3,
                      data_dropout=False, side_mil=1.0, num_workers=0, progress=False, rotation=0.0,
                      intensity=0.0)
    torch.manual_seed(0)
    cnn = create_cnn("tiny", 1)
    ctx = Context(cfg, tmp_path, torch.device("cpu"), images)
    train_cnn(ctx, "cnn1", cnn, labels, np.arange(n), cfg.epochs, halves=halves)
    side = [json.loads(line)["train_side_words"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(side) == cfg.epochs
    assert side[-1] < 0.35 < np.log(2), side


def test_a_phase_saved_without_the_side_head_is_refused_in_one_line(tmp_path):
    """Resuming a CNN phase saved by a cxr without the side-word head: a clear error, not a
    state-dict traceback."""
    import pytest

    from cxr.errors import CxrError
    from cxr.training.loops import _save

    images = np.zeros((4, 16, 16), np.uint16)
    cfg = TrainConfig(backbone="tiny", image_size=16, crop=16, epochs=2, batch_size=2, side_mil=0.1,
                      num_workers=0, progress=False, data_dropout=False)
    cnn = create_cnn("tiny", 1)
    ctx = Context(cfg, tmp_path, torch.device("cpu"), images)
    _save(ctx, "cnn1", {"model": cnn}, torch.optim.AdamW(cnn.parameters()), 1, False)
    halves = np.full((4, 1, 2), np.nan, np.float32)
    with pytest.raises(CxrError, match="without its 'side' part"):
        train_cnn(ctx, "cnn1", cnn, np.ones((4, 1), np.float32), np.arange(4), 2, halves=halves)
