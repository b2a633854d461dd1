"""The grounded annotator looks where it writes: side and site words come from where its
attention lies, its maps localise findings it never saw a box of, and words and boxes agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr.models.annotator import decode, encode, pad_batch
from cxr.models.cnn import create_cnn
from cxr.models.grounded import GroundedAnnotator, coordinates, field_word_ids, zone_masks
from cxr.models.localize import (boxes_from_heatmap, half_at_own_peak, side_consistent, side_of_box,
                                  site_band, to_heatmap)
from cxr.records import Box
from cxr.runspec import LocalizeParams

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "opacity", "nodule", "lung", "base", "upper lobe",
         "left", "right"]
INDEX = {w: i for i, w in enumerate(WORDS)}


def test_coordinates_and_zones_follow_the_image():
    c = coordinates(4, 4)
    assert c[0, 0, 0] < 0 < c[0, 0, 3]          # x grows to the image's right
    assert c[1, 0, 0] < 0 < c[1, 3, 0]          # y grows downwards
    assert torch.equal(c[2], c[0].abs())
    z = zone_masks(6, 6)
    assert z.shape == (11, 36) and z[0].sum() == z[1].sum() == 18
    assert not (z[0] & z[1]).any() and (z[2] | z[3] | z[4]).all()


@pytest.mark.parametrize("h,w", [(16, 16), (7, 5), (3, 2), (2, 2)])
def test_zone_sums_by_slices_match_the_masks(h, w):
    """At inference the zone log-sum-exps come from the map's half x third slices: the same
    values as the masked sums within 1e-5 (maps too small for every third: the masks serve)."""
    from cxr.models.grounded import zone_blocks, zone_evidence, zone_presence

    torch.manual_seed(0)
    scores, masks = torch.randn(5, h * w) * 4, zone_masks(h, w)
    assert (zone_blocks(h, w) is None) == (h < 3)
    with torch.no_grad():
        for f in (zone_evidence, zone_presence):
            torch.testing.assert_close(f(scores, masks, grid=(h, w)), f(scores, masks), atol=1e-5, rtol=1e-5)
    scores[:, masks[5]] += 8.0  # a zone that stands out must stand out the same way
    with torch.no_grad():
        fast = zone_evidence(scores, masks, grid=(h, w))
    assert int(fast.argmax(-1)[0]) in (0, 2, 5)


def test_side_consistency_uses_the_pa_convention():
    heat = np.zeros((10, 10), np.float32)
    heat[2:4, 1:3] = 1.0   # image left = the patient's RIGHT
    heat[6:8, 7:9] = 0.9   # image right = the patient's LEFT
    left = boxes_from_heatmap(side_consistent(heat, "left"), "Opacity")
    right = boxes_from_heatmap(side_consistent(heat, "right"), "Opacity")
    assert left and all(side_of_box(b, 10) == "left" and b.x >= 5 for b in left)
    assert right and all(side_of_box(b, 10) == "right" and b.x < 5 for b in right)
    assert np.array_equal(side_consistent(heat, "bilateral"), heat)
    assert side_of_box(Box("x", 6, 0, 2, 2), 10) == "left"
    # bilateral: each side's map at its own peak, so the weaker lung gets its box too
    heat[6:8, 7:9] = 0.3
    assert all(side_of_box(b, 10) == "right" for b in boxes_from_heatmap(heat, "Opacity"))
    sides = [side_of_box(b, 10) for s in ("left", "right")
             for b in boxes_from_heatmap(half_at_own_peak(heat, s), "Opacity")[:1]]
    assert sides == ["left", "right"]


def _blobs(n, size, rng):
    """Images with one bright blob, at the patient's left or right, base or upper zone."""
    x = rng.normal(0.3, 0.04, (n, 1, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    tokens, where = [], []
    for i in range(n):
        side, site = rng.choice(["left", "right"]), rng.choice(["base", "upper lobe"])
        cx = size * (0.72 if side == "left" else 0.28)  # the patient's left is the image's right
        cy = size * (0.72 if site == "base" else 0.28)
        x[i, 0] += 0.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 16) ** 2))
        tokens.append(["opacity", "lung", site, side])
        where.append((cx, cy))
    return torch.from_numpy(x), tokens, where


def _train(cnn, model, x, tokens, labels, epochs, rng_seed=0):
    torch.manual_seed(rng_seed)
    tok = pad_batch([encode(t, INDEX) for t in tokens])
    opt = torch.optim.AdamW(list(cnn.parameters()) + list(model.parameters()), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), 32):
            b = perm[s:s + 32]
            loss, _ = model.loss(cnn.forward_features(x[b]), labels[b], tok[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    cnn.eval()
    model.eval()


def test_attention_points_at_a_left_basal_blob_and_says_left(one_torch_thread):
    """Trained on words only (no box): a blob low on the image's right is the patient's left
    base; the finding map peaks there and the annotation says "left" and "base"."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x, tokens, _ = _blobs(160, 48, rng)
    cnn = create_cnn("tiny", 1, drop=0.0)
    model = GroundedAnnotator(len(WORDS), 1, cnn.num_features, field_word_ids(WORDS), hidden=32,
                              embed_dim=16, attn_dim=32, dropout=0.0, vocab=WORDS)
    _train(cnn, model, x, tokens, torch.zeros(len(x), dtype=torch.long), 10)

    test, truth, where = _blobs(40, 48, np.random.default_rng(1))
    with torch.no_grad():
        maps = cnn.forward_features(test)
        seqs, word_maps, finding, _ = model.generate(maps, torch.zeros(len(test), dtype=torch.long))
    said = [decode(s, WORDS) for s in seqs]
    side_ok = np.mean([t[3] in s for t, s in zip(truth, said)])
    site_ok = np.mean([t[2] in s for t, s in zip(truth, said)])
    assert side_ok >= 0.9 and site_ok >= 0.9, (side_ok, site_ok, said[:4])
    # one left-basal case: the finding map's peak lies in the image's lower right quadrant
    h, w = maps.shape[2:]
    k = next(i for i, t in enumerate(truth) if t[2:] == ["base", "left"])
    peak = int(finding[k].argmax())
    assert peak % w >= w // 2 and peak // w >= h // 2
    assert "left" in said[k]
    # and every word kept its own map
    assert len(word_maps[k]) == len(said[k]) and word_maps[k].shape[1] == h * w
    # the side comes from the image, not from a prior: mirrored films change sides
    with torch.no_grad():
        mirrored, _, _, _ = model.generate(cnn.forward_features(test.flip(-1)),
                                           torch.zeros(len(test), dtype=torch.long))
    other = {"left": "right", "right": "left"}
    flipped = np.mean([other[t[3]] in decode(s, WORDS) for t, s in zip(truth, mirrored)])
    assert flipped >= 0.9, flipped


def test_side_and_site_words_are_taught_by_where_the_map_lies(one_torch_thread):
    """The presence logits per half / third are trained from the side and site words alone
    ("left" = the image's right half, "bilateral" = both halves), and read back as the words."""
    torch.manual_seed(0)
    words = WORDS + ["bilateral"]
    model = GroundedAnnotator(len(words), 1, 8, field_word_ids(words), hidden=16, embed_dim=8,
                              attn_dim=8, dropout=0.0, vocab=words)
    side = {w: k for k, w in enumerate(words[i] for i in model.field_words["side"])}
    site = {w: k for k, w in enumerate(words[i] for i in model.field_words["location"])}
    # evidence in the image's right half (x > 0) and lower third: the patient's left base
    scores = torch.full((3, 36), -4.0)
    cells = zone_masks(6, 6)
    scores[0, cells[1] & cells[4]] = 4.0                      # left base
    scores[1, cells[0] & cells[2]] = 4.0                      # right upper zone
    scores[2, (cells[0] | cells[1]) & cells[4]] = 4.0         # both bases
    from cxr.models.grounded import zone_presence

    presence = zone_presence(scores, cells)
    logp = model.where_logp(presence)
    assert [side[n] for n in ("left", "right", "bilateral")] == logp["side"].argmax(-1).tolist()
    assert logp["location"][0, site["base"]] > logp["location"][0, site["upper lobe"]]
    assert logp["location"][1, site["upper lobe"]] > logp["location"][1, site["base"]]
    # the loss is low when the words say where the evidence is, high when they contradict it
    said = {"side": torch.tensor([side["left"], side["right"], side["bilateral"]]),
            "location": torch.tensor([site["base"], site["upper lobe"], site["base"]])}
    wrong = {"side": torch.tensor([side["right"], side["left"], side["left"]]),
             "location": torch.tensor([site["upper lobe"], site["base"], site["upper lobe"]])}
    good, bad = model.presence_loss(presence, said), model.presence_loss(presence, wrong)
    assert set(good) == {"where_side", "where_site"}
    assert all(good[k] < 0.1 < 1.0 < bad[k] for k in good), (good, bad)


@pytest.fixture(scope="module")
def phantom(shared_data):  # shared_data holds the CT (fetched once where not given)
    from cxr.phantom.render import Phantom

    return Phantom.load()


def test_trained_without_boxes_it_localises_a_phantom_nodule(phantom, one_torch_thread):
    """Phantom films (128 px) with a 30 mm nodule in an upper or lower lobe of either lung,
    described by words only ("nodule lung left"); on new films the side word is right and the
    finding map's box lies at least a quarter inside the nodule's true box (IoBB >= .25), which
    training never saw, on at least a quarter of the films. (Untrained, or trained without the
    zone read-out, this scores 0 hits and a coin's side; without the presence loss per half /
    third, 2 of 24 films.)"""
    from cxr.metrics import iobb
    from cxr.phantom.spec import FindingSpec
    from cxr.preprocess import MEAN, STD, normalise

    size = 128

    def films(n, seed0):
        xs, tokens, boxes = [], [], []
        for i in range(n):
            side = ["left", "right"][i % 2]
            site = ["upper lobe", "lower lobe"][(i // 2) % 2]
            r = phantom.render([FindingSpec("nodule", side=side, site=site, size_mm=30)],
                               seed=seed0 + i, size=size)
            xs.append(r.image)
            tokens.append(["nodule", "lung", side])
            boxes.append(r.boxes[0])
        x = normalise(torch.from_numpy(np.stack(xs))[:, None], MEAN, STD)
        return x, tokens, boxes

    x, tokens, _ = films(128, 100)
    torch.manual_seed(0)
    cnn = create_cnn("tiny", 1)
    model = GroundedAnnotator(len(WORDS), 1, cnn.num_features, field_word_ids(WORDS), hidden=32,
                              embed_dim=16, attn_dim=32, dropout=0.0, vocab=WORDS)
    _train(cnn, model, x, tokens, torch.zeros(len(x), dtype=torch.long), 35)
    test, truth, boxes = films(24, 1000)
    with torch.no_grad():
        maps = cnn.forward_features(test)
        seqs, _, finding, _ = model.generate(maps, torch.zeros(len(test), dtype=torch.long))
    h, w = maps.shape[2:]
    hits = 0
    for k in range(len(test)):
        heat = to_heatmap(finding[k].reshape(h, w), (size, size))
        found = boxes_from_heatmap(heat, "Nodule")
        hits += any(iobb(b, boxes[k]) >= 0.25 for b in found)
    said_side = np.mean([t[2] in decode(s, WORDS) for t, s in zip(truth, seqs)])
    assert hits / len(test) >= 0.25, hits
    assert said_side >= 0.75, said_side


def test_reader_words_maps_and_boxes_agree(tiny_run):
    """A trained grounded run: each detected finding has its finding map and one map per word,
    its boxes lie on the side its words name, and the maps can be asked for by source."""
    from cxr.evaluation import EvalData
    from cxr.reader import Reader
    from cxr.sources import open_source

    import dataclasses

    from cxr.checkpoint import load_run

    spec, tensors = load_run(tiny_run)
    assert spec.architecture.annotator == "grounded"
    # every finding reported, so that every one is checked
    reader = Reader(dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets}), tensors, "cpu")
    ed = EvalData(spec, open_source(spec.data.spec))
    results = reader([ed.prep.paths[i] for i in range(len(ed.prep.paths))], heatmaps=True)
    seen_words = sided = confident = 0
    for r in results:
        width = r.image_size[1]
        for f in r.findings:
            if f.disease == "normal":
                continue
            assert f.disease in r.heatmaps
            words = [k.split(":", 1)[1] for k in r.heatmaps if k.startswith(f.disease + ":")]
            seen_words += len(words)
            if f.side in ("left", "right"):
                assert all(side_of_box(b, width) == f.side for b in f.boxes), (f.side, f.boxes)
                sided += bool(f.boxes)
            if f.side == "bilateral":  # one box on each side
                assert sorted(side_of_box(b, width) for b in f.boxes) == ["left", "right"], f.boxes
                sided += 1
            # how sure it was of each context word it wrote, and of no other
            named = {"side": f.side, "location": f.location, "severity": f.severity}
            assert set(f.confidence) == {k for k, v in named.items() if v}, (f, f.confidence)
            assert all(0.0 < p <= 1.0 for p in f.confidence.values()), f.confidence
            confident += len(f.confidence)
            band = site_band(f.location)
            if band and f.boxes:  # and at the height its site word names
                top = max(b.y + b.h for b in f.boxes) / r.image_size[0]
                bottom = min(b.y for b in f.boxes) / r.image_size[0]
                assert top > band[0] and bottom < band[1], (f.location, f.boxes)
    assert seen_words > 0
    assert confident > 0
    # the run's temperature per field applies to the confidence, never to the word: at a very
    # high temperature every severity word is equally likely
    hot = Reader(dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets},
                                     word_temperature={"severity": 1e4}), tensors, "cpu")
    n_grades = len(hot.ground.field_words["severity"])
    for r, h in zip(results[:8], hot([ed.prep.paths[i] for i in range(8)], heatmaps=False)):
        assert [f.annotation for f in r.findings] == [f.annotation for f in h.findings]
        for f in h.findings:
            if "severity" in f.confidence:
                assert f.confidence["severity"] == pytest.approx(1 / n_grades, abs=1e-3)
    # the rule itself, on maps with a strong blob in the image's left half (the patient's right)
    # and a weak one in its right half: every side word gets boxes on its side only, "bilateral"
    # one box on each side
    size = reader.image_size
    heat = np.zeros((size, size), np.float32)
    heat[size // 2:size // 2 + 8, 8:16] = 1.0
    heat[size // 2:size // 2 + 8, size - 16:size - 8] = 0.3
    sides = ["left", "right", "bilateral", None]
    one = LocalizeParams(0.5)  # one threshold: one box per blob above it
    found = reader._boxes(np.stack([heat] * 4), ["Opacity"] * 4, [(2 * size, 2 * size)] * 4, sides, one)
    said = [sorted(side_of_box(b, 2 * size) for b in boxes) for boxes in found]
    assert said == [["left"], ["right"], ["left", "right"], ["right"]], said
    # the run's own rule (ChestX-ray8's two thresholds: the weak blob is a region at 60/255) keeps
    # every box of a sided word on its side, and one box per side for "bilateral"
    found = reader._boxes(np.stack([heat] * 4), ["Opacity"] * 4, [(2 * size, 2 * size)] * 4, sides)
    said = [sorted(side_of_box(b, 2 * size) for b in boxes) for boxes in found]
    assert [set(s) for s in said] == [{"left"}, {"right"}, {"left", "right"}, {"left", "right"}], said
    assert said[2] == ["left", "right"], said
    # and the height: a strong blob at the apex, a weak one at the base: "base" is boxed at the
    # base, "apex" at the apex, a finding without a site word at the stronger blob
    heat = np.zeros((size, size), np.float32)
    heat[size // 8:size // 8 + 8, 8:16] = 1.0
    heat[size - size // 8 - 8:size - size // 8, 8:16] = 0.3
    found = reader._boxes(np.stack([heat] * 3), ["Opacity"] * 3, [(size, size)] * 3, ["right"] * 3, one,
                          sites=[("base",), ("apex",), ()])
    centres = [[(b.y + b.h / 2) / size for b in boxes] for boxes in found]
    assert all(len(c) == 1 for c in centres), centres
    assert centres[0][0] > 0.7 and centres[1][0] < 0.3 and centres[2][0] < 0.3, centres
    # with no site word, an effusion (Open-i's or NIH's name) and the heart are boxed where they
    # can be, at the weaker basal blob; a nodule, which can be anywhere, at the stronger apical
    # one; a site word still wins; and the rule off boxes every one at the apex
    names = ["Pleural Effusion", "Effusion", "Cardiomegaly", "Nodule", "Pleural Effusion"]
    for follow, want in ((True, [">", ">", ">", "<", "<"]), (False, ["<"] * 5)):
        reader.boxes_follow_anatomy = follow
        found = reader._boxes(np.stack([heat] * 5), names, [(size, size)] * 5, [None] * 5, one,
                              sites=[(), (), (), (), ("apex",)])
        centres = [min((b.y + b.h / 2) / size for b in boxes) for boxes in found]
        assert [">" if c > 0.5 else "<" for c in centres] == want, (follow, centres)
    reader.boxes_follow_anatomy = True
    boxed = next(i for i in range(len(ed.prep.paths)) if ed.truth_boxes(i))
    label = ed.truth_boxes(boxed)[0].label
    for source in ("cam", "attention", "word"):
        assert set(reader.localise(ed.prep.paths[boxed], [label], source=source)) == {label}


@pytest.mark.parametrize("backbone", ["tiny", "nin", "googlenet"])  # densenet121: 18 s to build here
def test_every_backbone_keeps_a_map_of_stride_16_or_finer(backbone, one_torch_thread):
    cnn = create_cnn(backbone, 3).eval()
    with torch.no_grad():
        maps = cnn.forward_features(torch.zeros(1, 1, 128, 128))
        assert maps.shape[2] >= 128 // 16 and maps.shape[3] >= 128 // 16
        assert cnn.pool(maps).shape == (1, cnn.num_features)  # the search embedding


def test_chestxray8_lse_pooling_sits_between_mean_and_max(one_torch_thread):
    from cxr.models.cnn import lse_pool

    maps = torch.rand(2, 3, 5, 5)
    mean, top = maps.mean((2, 3)), maps.amax((2, 3))
    soft, hard = lse_pool(maps, 0.01), lse_pool(maps, 1000.0)
    assert torch.allclose(soft, mean, atol=1e-2) and torch.allclose(hard, top, atol=1e-2)
    mid = lse_pool(maps, 5.0)
    assert ((mid > mean) & (mid < top)).all()
    cnn = create_cnn("tiny", 4, pooling="lse", lse_r=5.0, transition=32)
    assert cnn(torch.rand(2, 1, 64, 64)).shape == (2, 4) and cnn.num_features == 32


def test_one_annotator_decodes_from_several_threads_at_once():
    """Nothing of one call is kept on the module (its zones and presence logits were, once): two
    threads decoding different batches at the same time get what each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from cxr.models.grounded import field_word_ids

    torch.manual_seed(0)
    words = ["<pad>", "<start>", "<end>", "<unk>", "opacity", "lung", "base", "left", "right", "mild"]
    model = GroundedAnnotator(len(words), 3, 32, field_word_ids(words), 32, 16, "gru", 16,
                              vocab=words).eval()
    jobs = [(torch.randn(n, 32, 12, 12), torch.randint(0, 3, (n,))) for n in (3, 5, 2, 7)]

    def decode_(job):
        seqs, _, finding, fields = model.generate(*job)
        return seqs, finding, {f: p.clone() for f, p in fields.items()}

    alone = [decode_(job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(20):
            for got, want in zip(pool.map(decode_, jobs), alone):
                assert got[0] == want[0]
                assert torch.equal(got[1], want[1])
                assert all(torch.equal(got[2][f], want[2][f]) for f in want[2])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_items_that_have_ended_leave_the_decoding_batch(cell):
    """Decoding drops an item from the batch once it writes <end>: a batch whose items end at
    different steps gives each item the words and word maps it gets decoded alone, for items
    with their own maps and for several findings of one image (`rows`, regions shared)."""
    from cxr.models.annotator import END
    from cxr.models.grounded import field_word_ids

    torch.manual_seed(0)
    words = ["<pad>", "<start>", "<end>", "<unk>", "opacity", "lung", "base", "left", "right", "mild",
             "upper", "lobe", "severe", "small"]
    model = GroundedAnnotator(len(words), 6, 32, field_word_ids(words), 32, 16, cell, 16,
                              vocab=words).eval()
    with torch.no_grad():  # findings distinct enough, <end> neither at once nor never
        model.label.weight.mul_(4)
        model.out.bias[END] = 0.0
    maps, labels = torch.randn(6, 32, 8, 8), torch.arange(6)
    one_image = torch.randn(1, 32, 8, 8)
    cases = (((maps, labels), [(maps[i:i + 1], labels[i:i + 1]) for i in range(6)]),
             ((one_image, labels, 8, True, True, [0] * 6),
              [(one_image, labels[i:i + 1], 8, True, True, [0]) for i in range(6)]))
    for batch, alone in cases:
        seqs, word_maps, _, _ = model.generate(*batch)
        lengths = [len(s) for s in seqs]  # the items end at different steps, some two apart
        assert max(lengths) - min(lengths) >= 2, seqs
        for i, job in enumerate(alone):
            want_seq, want_maps, _, _ = model.generate(*job)
            assert seqs[i] == want_seq[0]
            assert torch.allclose(word_maps[i], want_maps[0], atol=1e-6)
        model.drop_ended = False  # every item to the last step, as before: the same words and maps
        kept_seqs, kept_maps, _, _ = model.generate(*batch)
        del model.drop_ended
        assert kept_seqs == seqs
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kept_maps, word_maps))


def test_onnx_runtime_decoding_writes_the_same_words(monkeypatch):
    """The regions and per-word step as ONNX Runtime graphs (`cxr.models.grounded_onnx`, what the
    Reader decodes with on a CPU) give the words, word maps and field probabilities of the PyTorch
    path: items with their own maps, several findings of one image (regions shared), findings of
    several images; the graphs run at every step, and weights changed after the export put
    decoding back on PyTorch rather than on stale graphs; no finding gives empty outputs. An LSTM
    annotator gets no graphs, nor does any where ONNX Runtime is not installed."""
    pytest.importorskip("onnxruntime")
    from cxr.models.annotator import END
    from cxr.models.grounded import field_word_ids
    from cxr.models.grounded_onnx import onnx_decoding

    torch.manual_seed(0)
    words = ["<pad>", "<start>", "<end>", "<unk>", "opacity", "lung", "base", "left", "right", "mild",
             "upper", "lobe", "severe", "small"]
    model = GroundedAnnotator(len(words), 6, 32, field_word_ids(words), 32, 16, "gru", 16,
                              vocab=words).eval()
    with torch.no_grad():
        model.label.weight.mul_(4)
        model.out.bias[END] = 0.0
    decoding = onnx_decoding(model)
    calls = []
    step = decoding.step
    decoding.step = lambda *a: calls.append(len(a[0])) or step(*a)
    maps, labels = torch.randn(6, 32, 8, 8), torch.arange(6)
    jobs = [(maps, labels), (maps[:1], labels, 8, True, True, [0] * 6),
            (maps[:3], labels, 8, True, True, [0, 2, 1, 2, 0, 1])]
    for job, drop_ended in [(job, d) for job in jobs for d in (True, False)]:
        model.decoding, model.drop_ended = None, drop_ended
        want = model.generate(*job)
        model.decoding, calls[:] = decoding, []
        got = model.generate(*job)
        assert got[0] == want[0] and calls and calls[0] == 6  # every item's first word from the graph
        assert (calls[-1] < 6) == drop_ended, calls  # ended items leave the graph's batch, or stay
        assert max(map(len, got[0])) - min(map(len, got[0])) >= 1, got[0]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got[1], want[1]))
        assert torch.allclose(got[2], want[2], atol=1e-6)
        assert all(torch.allclose(got[3][f], want[3][f], atol=1e-6) for f in want[3])
    model.drop_ended = True
    with torch.no_grad():
        model.out.weight.mul_(-1)  # other weights: the graphs no longer match them
    calls[:] = []
    changed = model.generate(*jobs[0])
    assert not calls and not decoding.current(model)
    model.decoding = None
    assert changed[0] == model.generate(*jobs[0])[0]
    seqs, word_maps, finding, fields = model.generate(maps[:1], labels[:0], 8, True, True, [])
    assert seqs == [] and word_maps == [] and finding.shape == (0, 64) and all(len(p) == 0 for p in fields.values())
    lstm = GroundedAnnotator(len(words), 6, 32, field_word_ids(words), 32, 16, "lstm", 16, vocab=words).eval()
    assert onnx_decoding(lstm) is None
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    assert onnx_decoding(model) is None


def test_word_temperature_fits_overconfident_and_underconfident_words():
    """Temperature scaling (one number per field): words right 60% of the time at a stated 95%
    get T > 1 (less sure), words right 95% of the time at a stated 60% get T < 1."""
    from cxr.training.grounding import fit_temperature

    rng = np.random.default_rng(0)
    n, k = 400, 3

    def words(stated: float, right: float):
        logp = np.full((n, k), np.log((1 - stated) / (k - 1)))
        logp[:, 0] = np.log(stated)  # always says word 0
        truth = np.where(rng.random(n) < right, 0, rng.integers(1, k, n))
        return logp, truth

    over = fit_temperature(*words(0.95, 0.6))
    under = fit_temperature(*words(0.6, 0.95))
    assert over > 1.5 and under < 0.8, (over, under)
    logp, truth = words(0.95, 0.6)
    scaled = np.exp(logp[0] / over) / np.exp(logp[0] / over).sum()
    assert scaled[0] == pytest.approx(0.6, abs=0.05)  # now says what it gets right


def test_severity_temperature_leaves_out_grades_read_from_a_measurement(monkeypatch):
    """Cardiomegaly's grade comes from the cardiothoracic ratio at reading time, so its words never
    reach anyone with the annotator's confidence: the severity temperature is fitted on the other
    findings' words only (side and location on every finding)."""
    import cxr.training.grounding as G

    targets = ["Opacity", "Cardiomegaly", "Pleural Effusion"]
    pairs = [(i, i % 3, ["word"]) for i in range(300)]
    given = []

    def field_log_probs(ctx, cnn, model, pairs_in, idx, word_index, leave_out=None):
        out = {}
        for f in ("severity", "side"):  # each field's words, those it leaves out left out
            kept = [p for p in pairs_in if int(p[1]) not in (leave_out or {}).get(f, set())]
            given.append((f, sorted({int(p[1]) for p in kept})))
            out[f] = (np.log(np.full((len(kept), 3), 1 / 3)), np.zeros(len(kept), dtype=np.int64))
        return out

    monkeypatch.setattr(G, "field_log_probs", field_log_probs)
    fitted = G.word_temperatures(None, None, None, pairs, np.arange(300), {}, targets)
    assert given == [("severity", [0, 2]), ("side", [0, 1, 2])] and set(fitted) == {"severity", "side"}
    given.clear()
    G.word_temperatures(None, None, None, pairs, np.arange(300), {}, ["Opacity", "Nodule", "Mass"])
    assert given == [("severity", [0, 1, 2]), ("side", [0, 1, 2])]  # nothing graded by a measurement
