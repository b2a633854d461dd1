"""The Reader's speed work changes no output: micro-batched, channels-last CNN calls and boxes
found for all maps at once give the scores and boxes of the plain path (one image per CNN call
in the default memory format, one CAM and one labelling pass per finding), written out here."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cxr
from cxr.models.localize import (boxes_from_heatmap, boxes_from_heatmaps, class_activation_maps,
                                 half_at_own_peak, heatmaps_at)
from cxr.preprocess import normalise, preprocess
from cxr.runspec import LocalizeParams


@pytest.fixture(scope="module")
def eager(tiny_run, tmp_path_factory):
    from service_helpers import run_asserting_every_finding

    # every finding reported, so every image has CAMs and boxes to compare (gate off below:
    # the drawn images are for the cascade, not for the quality gate)
    return run_asserting_every_finding(tiny_run, tmp_path_factory.mktemp("speed") / "run")


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for k in range(n):
        h, w = 80 + 8 * k, 96 - 4 * k
        yy, xx = np.mgrid[0:h, 0:w]
        blob = np.exp(-(((xx - w * (0.3 + 0.1 * k)) ** 2 + (yy - h * 0.6) ** 2) / (2 * (w / 7) ** 2)))
        out.append(np.clip(0.3 + 0.4 * blob + 0.03 * rng.standard_normal((h, w)), 0, 1).astype(np.float32))
    return out


def _plain(reader, image: np.ndarray, cnn: torch.nn.Module):
    """Scores and each reported finding's boxes the plain way."""
    pre = reader.spec.preprocessing
    x = normalise(torch.from_numpy(preprocess(image, pre.image_size, pre.stretch))[None, None], pre.mean, pre.std)
    with torch.no_grad():
        maps = cnn.forward_features(x)
        scores, best = reader.scores(cnn.forward_head(maps))
    return maps, scores[0], best[0]


def test_the_fast_reader_gives_the_plain_scores_and_boxes(eager, one_torch_thread):
    reader = cxr.Reader.load(eager, device="cpu", gate=False, micro_batch=2)
    reader.boxes_of_whole_organs = False  # the maps' boxes (a whole organ's: tests/test_anatomy.py)
    conv = next(m for m in reader.cnn.modules() if isinstance(m, torch.nn.Conv2d))
    assert reader.micro_batch == 2 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain_cnn = copy.deepcopy(reader.cnn).to(memory_format=torch.contiguous_format)
    images = _images(5)
    results = reader(images, batch_size=5)  # 5 images in CNN calls of 2, 2 and 1
    compared = 0
    for image, result in zip(images, results):
        maps, scores, best = _plain(reader, image, plain_cnn)
        size = reader.box_grid(maps.shape[-1])
        for k, target in enumerate(reader.targets):
            # channels-last convolutions round differently; a class map pooled near its max
            # (class_lse) keeps that rounding where the mean would average it out
            assert result.scores[target] == pytest.approx(float(scores[k]), abs=1e-5)
        h, w = image.shape
        for finding in result.findings:
            if finding.disease == "normal":
                continue
            t = reader.targets.index(finding.disease)
            if reader.ground is not None:  # a grounded run's boxes come from its finding map
                grid = reader._ground([0], [t], maps)["finding"]
            else:
                grid = class_activation_maps(maps, reader.cnn.head.weight, torch.tensor([[int(best[t])]]))[0]
            heat = heatmaps_at(grid.detach().numpy(), (size, size))[0]
            rule = reader.spec.localization
            if finding.side == "bilateral":  # the first box of each side's own map
                want = [b for side in ("right", "left")
                        for b in boxes_from_heatmap(half_at_own_peak(heat, side), finding.disease, rule)[:1]]
            elif finding.side in ("left", "right"):  # that side's map, at its own peak
                want = boxes_from_heatmap(half_at_own_peak(heat, finding.side), finding.disease, rule)
            else:
                want = boxes_from_heatmap(heat, finding.disease, rule)
            want = [b.scaled(w / size, h / size) for b in want]
            assert finding.boxes == want
            compared += bool(want)
    assert compared >= 3  # boxes were there to compare


def test_boxes_are_found_on_a_grid_of_four_points_per_map_cell(eager):
    """A 256-px model's 16x16 map is labelled on a 64-px grid, not at the input size; a smaller
    model keeps its input size. On smooth random maps the 64-grid boxes (ChestX-ray8's rule, the
    default) stay within a grid step of the 256-grid ones for nearly every box (the time saved is
    in benchmarks/inference.py)."""
    from scipy import ndimage

    from cxr.models.localize import chestxray8_params

    reader = cxr.Reader.load(eager, device="cpu", gate=False)
    reader.image_size = 256
    assert reader.box_grid(16) == 64 and reader.box_grid(8) == 32 and reader.box_grid(128) == 256
    rng = np.random.default_rng(0)
    cams = np.stack([ndimage.gaussian_filter(c, 1.5) for c in rng.normal(size=(200, 16, 16))]).astype(np.float32)
    params = chestxray8_params()
    fine = boxes_from_heatmaps(heatmaps_at(cams, (256, 256)), ["x"] * len(cams), params)
    coarse = boxes_from_heatmaps(heatmaps_at(cams, (64, 64)), ["x"] * len(cams), params)
    close = total = 0
    for f, c in zip(fine, coarse):
        for a in f:
            total += 1
            close += any(max(abs(a.x - 4 * b.x), abs(a.y - 4 * b.y), abs(a.x + a.w - 4 * (b.x + b.w)),
                             abs(a.y + a.h - 4 * (b.y + b.h))) <= 4 for b in c)
    assert total > 500 and close / total >= 0.97


def test_boxes_of_a_stack_are_the_boxes_of_each_map():
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(1, 6))
        cams = rng.normal(size=(n, 8, 8)).astype(np.float32)
        if trial % 5 == 0:
            cams[0] = 1.0  # a flat map: no box
        heat = heatmaps_at(cams, (48, 64))
        params = LocalizeParams(threshold=float(rng.choice([0.3, 0.5, 0.7])), max_boxes=int(rng.integers(1, 4)),
                                min_area=float(rng.choice([0.0, 0.02])))
        labels = [f"t{i}" for i in range(n)]
        assert boxes_from_heatmaps(heat, labels, params) == \
            [boxes_from_heatmap(heat[i], labels[i], params) for i in range(n)]
    assert boxes_from_heatmaps(np.zeros((0, 8, 8), np.float32), []) == []


def test_the_annotators_gru_step_with_looked_up_input_gates_is_nn_gru():
    """Greedy decoding reads each word's input gates from a table (`Annotator._gru_step`); the
    state and the words must be those of `nn.GRU`, and new weights must remake the table."""
    from cxr.models.annotator import Annotator

    torch.manual_seed(3)
    ann = Annotator(30, 6, 24, 64, 16, "gru").eval()
    emb, labels = torch.randn(9, 24), torch.randint(0, 6, (9,))
    words = torch.randint(0, 30, (9,))
    with torch.no_grad():
        for _ in range(2):
            state = ann.init_state(emb, labels)
            _, want = ann.rnn(ann.word(words).unsqueeze(1), state)
            _, got = ann._step(words, state)
            assert torch.allclose(got, want, atol=1e-6)
            ann.word.weight.mul_(1.5)  # changed in place: the table must follow


def test_greedy_with_the_gate_table_writes_the_words_of_nn_gru():
    """Greedy decoding in eval mode (input gates from the table, one additive bar per row) must
    write exactly the words that `nn.GRU` steps give (train mode, no dropout in a step),
    including rows that end early and rows that never end, on many random annotators."""
    from cxr.models.annotator import Annotator

    ended_early = never_ended = 0
    for seed in range(40):
        torch.manual_seed(seed)
        ann = Annotator(12, 5, 16, 32, 8, "gru", dropout=0.0)
        with torch.no_grad():
            ann.out.bias[2] += float(torch.randn(())) * 2  # <end> more or less likely
        emb, labels = torch.randn(6, 16), torch.randint(0, 5, (6,))
        fast = ann.eval().greedy(emb, labels, max_len=6)
        general = ann.train().greedy(emb, labels, max_len=6)  # nn.GRU, no dropout in a step
        assert fast == general, seed
        ended_early += sum(len(s) < 6 for s in fast)
        never_ended += sum(len(s) == 6 for s in fast)
    assert ended_early and never_ended  # both kinds of row were compared


def test_the_global_annotators_onnx_step_writes_the_words_of_pytorch(monkeypatch):
    """The global annotator's GRU step as an ONNX Runtime graph (`cxr.models.annotator_onnx`,
    what the Reader decodes with on a CPU) writes the words of PyTorch's greedy decoding, rows
    that end early and rows that never end, on many random annotators; the graph runs at every
    step and ended rows leave its batch; weights changed after the export put decoding back on
    PyTorch; an LSTM gets no graph, nor does any annotator where ONNX Runtime is missing."""
    pytest.importorskip("onnxruntime")
    from cxr.models.annotator import Annotator
    from cxr.models.annotator_onnx import global_onnx_decoding

    ended_early = never_ended = shrank = 0
    for seed in range(20):
        torch.manual_seed(seed)
        ann = Annotator(12, 5, 16, 32, 8, "gru", dropout=0.0).eval()
        with torch.no_grad():
            ann.out.bias[2] += float(torch.randn(())) * 2  # <end> more or less likely
        emb, labels = torch.randn(6, 16), torch.randint(0, 5, (6,))
        want = ann.greedy(emb, labels, max_len=6)
        ann.decoding = decoding = global_onnx_decoding(ann)
        rows = []
        run = decoding.session.run
        decoding.session.run = lambda names, feed: rows.append(len(feed["h"])) or run(names, feed)
        got = ann.greedy(emb, labels, max_len=6)
        assert got == want, seed
        assert rows[0] == 6 and len(rows) == max(map(len, got)) + (max(map(len, got)) < 6)
        shrank += rows[-1] < 6
        ended_early += sum(len(s) < 6 for s in got)
        never_ended += sum(len(s) == 6 for s in got)
        with torch.no_grad():
            ann.out.weight.mul_(-1)  # other weights: the graph no longer matches them
        rows[:] = []
        changed = ann.greedy(emb, labels, max_len=6)
        ann.decoding = None
        assert not rows and changed == ann.greedy(emb, labels, max_len=6)
    assert ended_early and never_ended and shrank  # every kind of row was compared
    assert global_onnx_decoding(Annotator(12, 5, 16, 32, 8, "lstm").eval()) is None
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    assert global_onnx_decoding(ann) is None
