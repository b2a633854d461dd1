"""Backbones, annotator, cascade clustering, CAM boxes, data dropout, calibration, checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxr.errors import CxrError
from cxr.models.annotator import END, START, Annotator, decode, encode, pad_batch
from cxr.models.cascade import RefinedLabels, refine, to_original
from cxr.models.cnn import BACKBONES, create_cnn, load_pretrained
from cxr.models.localize import boxes_from_heatmap, class_activation_maps, to_heatmap
from cxr.runspec import LocalizeParams



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def test_class_lse_pooling_lets_a_small_lesion_carry_its_score():
    """`class_lse`: each class's map (its CAM, bias included) is pooled by log-sum-exp with the
    sharpness that class learns. Near r = 0 it is exactly the average-pooled linear head; sharper,
    one hot cell of 196 raises the score far more than averaging lets it; a class marked
    mean-pooled (`normal`) keeps the mean whatever its sharpness; the cascade's new outputs start
    with their parents' sharpness and marks."""
    torch.manual_seed(0)
    model = create_cnn("tiny", 3, pooling="class_lse").eval()
    maps = torch.zeros(2, model.num_features, 14, 14)
    maps[0, :, 3, 9] = 1.0                                  # one small bright "lesion" in film 0
    with torch.no_grad():
        model.head.weight.fill_(4.0 / model.num_features)   # the lesion's cell reads logit +4
        model.head.log_sharpness.fill_(-20.0)               # r at its floor: the mean
        linear = torch.nn.functional.linear(maps.mean((2, 3)), model.head.weight, model.head.bias)
        assert torch.allclose(model.forward_head(maps), linear, atol=1e-3)  # r = .01: within r var/2
        model.head.log_sharpness.fill_(math.log(5.0))
        sharp = model.forward_head(maps)
    rise_mean, rise_sharp = linear[0] - linear[1], sharp[0] - sharp[1]   # what the lesion adds
    assert (rise_mean < 0.05).all() and (rise_sharp > 2.5).all()   # 4/196 against most of the 4
    model.pool_as_mean([1])
    with torch.no_grad():
        assert torch.allclose(model.forward_head(maps)[:, 1], linear[:, 1], atol=1e-3)
        assert not torch.allclose(model.forward_head(maps)[:, 0], linear[:, 0], atol=1e-2)
    model.head.log_sharpness.data[2] = math.log(2.0)
    model.reset_head(4, parents=[0, 1, 2, 2])
    assert model.head.mean_pooled.tolist() == [False, True, False, False]
    assert torch.allclose(model.head.sharpness()[2:], torch.tensor([2.0, 2.0]))
    with pytest.raises(CxrError, match="class_lse"):
        create_cnn("tiny", 3, pooling="max")


def test_class_lse_networks_merge_into_one_ensemble_exactly():
    """Two class_lse networks trained apart, merged as `cxr train --ensemble 2` merges them: the
    members-2 network's logit is the mean of the two networks' logits (each member pooling its
    maps with its own sharpness), `normal`'s mean pooling survives, each member's logits are its
    network's, and CAM reads the mean of their class maps."""
    from cxr.training.ensemble import merge_tensors

    torch.manual_seed(0)
    nets = [create_cnn("tiny", 3, pooling="class_lse").eval() for _ in range(2)]
    for j, net in enumerate(nets):
        net.pool_as_mean([0])
        with torch.no_grad():
            net.head.log_sharpness.copy_(torch.tensor([0.0, 1.5, -1.0]) * (j + 1))
    merged = create_cnn("tiny", 3, pooling="class_lse", members=2).eval()
    merged.load_state_dict({k[len("cnn."):]: v for k, v in merge_tensors(
        [{f"cnn.{k}": v for k, v in net.state_dict().items()} for net in nets]).items()})
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        alone = torch.stack([net(x) for net in nets])
        assert torch.allclose(merged(x), alone.mean(0), atol=1e-5)
        assert torch.allclose(merged(x, members=True), alone - torch.stack(
            [net.head.bias for net in nets])[:, None] + merged.head.bias, atol=1e-5)
        maps = merged.forward_features(x)
        cams = merged.head.class_maps(maps) - merged.head.bias[:, None, None]
        each = [net.head.class_maps(net.forward_features(x)) - net.head.bias[:, None, None] for net in nets]
        assert torch.allclose(cams, (each[0] + each[1]) / 2, atol=1e-5)
    assert merged.head.mean_pooled.tolist() == [True, False, False]
    assert merged.head.sharpness().shape == (2, 3)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_interface(name):
    torch.manual_seed(0)
    model = create_cnn(name, 5).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        maps = model.forward_features(x)
        logits = model.forward_head(maps)
        emb = model.embed(x)
    assert maps.ndim == 4 and maps.shape[:2] == (2, model.num_features)
    assert logits.shape == (2, 5)
    assert emb.shape == (2, model.num_features)
    # the head is linear on pooled maps, so CAM averages to the logit minus the bias
    cam = class_activation_maps(maps, model.head.weight, torch.tensor([[3], [3]]))
    assert torch.allclose(cam.mean(dim=(2, 3))[:, 0] + model.head.bias[3], logits[:, 3], atol=1e-4)


def test_unknown_backbone():
    with pytest.raises(CxrError, match="unknown backbone"):
        create_cnn("resnet9000", 3)


def test_load_pretrained_reports_keys(tmp_path):
    from safetensors.torch import save_file

    src = create_cnn("tiny", 7)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "w.safetensors"))
    dst = create_cnn("tiny", 2)
    report = load_pretrained(dst, tmp_path / "w.safetensors")
    assert "extra.weight" in report["unexpected"]
    assert not report["missing"] and not report["mismatched"]
    assert torch.equal(dst.features[0][0].weight, src.features[0][0].weight)
    assert not torch.equal(dst.head.weight[:2], src.head.weight[:2])  # head skipped (7 vs 2 classes)
    # a bare MONAI DenseNet121 state dict (features.*, class_layers.*) fits the densenet121 trunk
    from monai.networks.nets import DenseNet121

    monai_net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
    save_file(monai_net.state_dict(), str(tmp_path / "monai.safetensors"))
    report = load_pretrained(create_cnn("densenet121", 4), tmp_path / "monai.safetensors")
    assert not report["missing"] and len(report["loaded"]) == len(monai_net.features.state_dict())
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    assert load_pretrained(create_cnn("tiny", 7), tmp_path / "w.pt", head=True)["missing"] == []


def test_load_pretrained_from_a_run_folder(tiny_run, tmp_path):
    """`--pretrained RUN`: a finished run's CNN starts another (phantom pre-training), head left out."""
    from cxr.checkpoint import load_spec, load_tensors, unprefixed

    arch = load_spec(tiny_run).architecture
    model = create_cnn(arch.backbone, 3)
    report = load_pretrained(model, tiny_run)
    assert report["loaded"] and not any(k.startswith("head.") for k in report["loaded"])
    cnn = unprefixed("cnn", load_tensors(tiny_run / "weights.safetensors"))
    key = report["loaded"][0]
    assert torch.equal(model.state_dict()[key], cnn[key])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrError, match="not a cxr run"):
        load_pretrained(model, tmp_path / "empty")


def test_load_pretrained_refuses_pickled_objects(tmp_path):
    import argparse

    torch.save({"thing": argparse.Namespace(a=1)}, tmp_path / "bad.pt")
    with pytest.raises(CxrError, match="cannot read weights"):
        load_pretrained(create_cnn("tiny", 2), tmp_path / "bad.pt")
    with pytest.raises(CxrError, match="not found"):
        load_pretrained(create_cnn("tiny", 2), tmp_path / "missing.safetensors")


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "opacity", "lung", "base", "left", "right", "cardiomegaly", "mild"]
INDEX = {w: i for i, w in enumerate(WORDS)}


def _fit(cell: str) -> tuple[Annotator, torch.Tensor, torch.Tensor, list[list[str]]]:
    """An annotator overfitted to three (image, label) -> sequence examples; the same image
    gets two different sequences for two labels (conditioning on the finding)."""
    torch.manual_seed(0)
    seqs = [["opacity", "lung", "base", "left"], ["cardiomegaly", "mild"], ["opacity", "lung", "base", "right"]]
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    tokens = pad_batch([encode(s, INDEX) for s in seqs])
    model = Annotator(len(WORDS), 2, 2, hidden=32, embed_dim=8, cell=cell, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        model.loss(emb, labels, tokens).backward()
        opt.step()
    return model.eval(), emb, labels, seqs


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_annotator_greedy_and_beam(cell):
    model, emb, labels, seqs = _fit(cell)
    greedy = [decode(s, WORDS) for s in model.greedy(emb, labels)]
    assert greedy == seqs
    beam = [decode(s, WORDS) for s in model.beam(emb, labels, beams=3)]
    assert beam == seqs
    assert model.beam(emb, labels, beams=1) == model.greedy(emb, labels)
    ctx = model.context(emb, labels, pad_batch([encode(s, INDEX) for s in seqs]))
    assert ctx.shape == (3, 32)


def test_beam_finds_a_better_sequence_than_greedy():
    """A hand-set model where the greedy first word leads to a poor continuation: greedy takes
    `a` (p=.6) then must split .5/.5; beam search finds `b` (p=.4) followed by a sure <end>."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c", "d"]

    class Scripted(Annotator):
        def _step(self, prev, state):
            n = prev.shape[0]
            logp = torch.full((n, len(words)), -30.0)
            for i, w in enumerate(prev.tolist()):
                if w == START:
                    logp[i, 4], logp[i, 5] = np.log(0.6), np.log(0.4)
                elif w == 4:
                    logp[i, 6], logp[i, 7] = np.log(0.5), np.log(0.5)
                elif w == 5:
                    logp[i, END] = 0.0
                else:
                    logp[i, END] = np.log(0.5)
            return logp, state

    model = Scripted(len(words), 1, 2, hidden=4, embed_dim=2).eval()
    emb, lab = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    assert decode(model.greedy(emb, lab)[0], words)[:2] == ["a", "c"]
    assert decode(model.beam(emb, lab, beams=3)[0], words) == ["b"]


def test_decoding_never_repeats_a_word():
    """A model that always prefers `a` still writes it once: a MeSH term never repeats a part
    (this once gave annotations such as `airspace disease lung base base`)."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "b"]

    class Stuck(Annotator):
        def _step(self, prev, state):
            logp = torch.full((prev.shape[0], len(words)), -30.0)
            logp[:, 4], logp[:, 5], logp[:, END] = np.log(0.7), np.log(0.2), np.log(0.1)
            return logp, state

    model = Stuck(len(words), 1, 2, hidden=4, embed_dim=2).eval()
    emb, lab = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    assert decode(model.greedy(emb, lab)[0], words) == ["a", "b"]
    assert decode(model.beam(emb, lab, beams=3)[0], words) in (["a"], ["a", "b"])


def test_cascade_refines_big_labels_only():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (20, 4)) + np.array([3, 0, 0, 0])
    b = rng.normal(0, 0.1, (20, 4)) - np.array([3, 0, 0, 0])
    small = rng.normal(0, 1, (5, 4))
    contexts = np.concatenate([a, b, small])
    labels = np.array([0] * 40 + [1] * 5)
    refined, assigned = refine(contexts, labels, ["Opacity", "Nodule"], min_members=10, per_cluster=20, seed=0)
    assert refined.names == ["Opacity#1", "Opacity#2", "Nodule"]
    assert refined.parents == [0, 0, 1]
    assert len(set(assigned[:20])) == 1 and len(set(assigned[20:40])) == 1 and assigned[0] != assigned[20]
    assert set(assigned[40:]) == {2}
    probs = np.array([[0.2, 0.9, 0.1], [0.3, 0.1, 0.7]])
    np.testing.assert_allclose(to_original(probs, refined, 2), [[0.9, 0.1], [0.3, 0.7]])
    assert RefinedLabels.from_dict(refined.to_dict()) == refined


def test_cam_boxes_on_a_synthetic_map():
    heat = np.zeros((100, 120), dtype=np.float32)
    heat[10:30, 20:50] = 1.0       # strong blob
    heat[60:90, 80:110] = 0.7      # weaker, larger
    heat[0:2, 0:2] = 0.9           # speck, below min_area
    boxes = boxes_from_heatmap(heat, "Mass", LocalizeParams(threshold=0.5, max_boxes=3, min_area=0.001))
    assert [(b.x, b.y, b.w, b.h) for b in boxes] == [(80, 60, 30, 30), (20, 10, 30, 20)]
    assert all(b.label == "Mass" for b in boxes)
    assert len(boxes_from_heatmap(heat, "Mass", LocalizeParams(0.5, max_boxes=1, min_area=0.001))) == 1
    assert boxes_from_heatmap(heat, "Mass", LocalizeParams(0.95, 3, 0.001))[0].w == 30  # only the strong one
    assert boxes_from_heatmap(np.zeros((8, 8), np.float32), "x", LocalizeParams(0.5)) == []
    up = to_heatmap(torch.tensor([[0.0, 2.0], [1.0, 4.0]]), (40, 40))
    assert up.shape == (40, 40) and up.min() == 0 and up.max() == pytest.approx(1.0)
    assert up[35, 35] > up[5, 5]


def test_chestxray8_boxes_come_from_both_of_its_thresholds():
    """Wang et al.'s extraction: a box around every region above 180/255, then above 60/255."""
    from cxr.models.localize import boxes_from_heatmaps, chestxray8_params

    heat = np.zeros((100, 120), dtype=np.float32)
    heat[20:80, 10:70] = 0.4        # a broad region, between 60 and 180 of 255
    heat[40:50, 30:45] = 1.0        # its bright core
    heat[5:15, 100:115] = 0.8       # a separate bright speck
    params = chestxray8_params(max_boxes=3, min_area=0.001)
    boxes = [(b.x, b.y, b.w, b.h) for b in boxes_from_heatmap(heat, "Mass", params)]
    assert boxes == [(30, 40, 15, 10), (100, 5, 15, 10), (10, 20, 60, 60), (100, 5, 15, 10)]
    # the stack version gives the same boxes, map by map
    stacked = boxes_from_heatmaps(np.stack([heat, heat[::-1]]), ["Mass", "Mass"], params)
    assert [(b.x, b.y, b.w, b.h) for b in stacked[0]] == boxes and len(stacked[1]) == 4
    # one threshold (the default) gives only the first kind
    assert [(b.x, b.y) for b in boxes_from_heatmap(heat, "Mass", LocalizeParams(0.5, 3, 0.001))] == [(30, 40), (100, 5)]


def test_data_dropout_keeps_expected_fraction():
    from cxr.dataset import data_dropout_indices, normal_keep_probability

    # 400 normals, disease A on 40 images, disease B on 10
    y = np.zeros((450, 3), dtype=np.float32)
    y[:400, 0] = 1
    y[400:440, 1] = 1
    y[440:, 2] = 1
    p = normal_keep_probability(y, 0, keep_factor=4.0)
    assert p == pytest.approx(4 * 40 / 400)
    rng = np.random.default_rng(0)
    kept = [np.isin(data_dropout_indices(y, 0, rng, 4.0, 4), np.arange(400)).sum() for _ in range(100)]
    assert np.mean(kept) == pytest.approx(p * 400, rel=0.03)
    idx = data_dropout_indices(y, 0, rng, 4.0, 4)
    counts = np.bincount(idx, minlength=450)
    assert set(counts[400:440]) == {1}           # the largest class is not duplicated
    assert set(counts[440:]) == {4}              # 40 // 10 = 4 copies of the rare class
    assert counts[:400].max() <= 1


def test_platt_and_thresholds():
    from cxr.calibration import apply_platt
    from cxr.training.calibration import fit_platt, max_f1_thresholds

    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
    raw = true_logit / 3 + 1.0  # overconfident-in-the-wrong-way scores
    (a, b), = fit_platt(raw[:, None], y[:, None], prior=0.0)
    assert a == pytest.approx(3.0, rel=0.15) and b == pytest.approx(-3.0, abs=0.4)
    probs = apply_platt(raw[:, None], [(a, b)])
    assert abs(probs.mean() - y.mean()) < 0.02
    th = max_f1_thresholds(np.array([[0.1], [0.4], [0.6], [0.9]]), np.array([[0], [0], [1], [1]]))
    assert th == [pytest.approx(0.5)]  # halfway between the accepted 0.6 and the rejected 0.4
    assert max_f1_thresholds(np.array([[0.3]]), np.array([[0]])) == [0.5]


def test_optimizer_state_round_trip(tmp_path):
    from cxr.checkpoint import load_tensors, optimizer_tensors, restore_optimizer, save_tensors

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_tensors(opt)
    save_tensors(tmp_path / "s.safetensors", tensors)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    restore_optimizer(opt2, load_tensors(tmp_path / "s.safetensors"), meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for name in a["state"][k]:
            assert torch.equal(torch.as_tensor(a["state"][k][name]), torch.as_tensor(b["state"][k][name]))


def test_members_are_an_ensemble_inside_one_network(tmp_path):
    """`members=K`: K trunks, maps concatenated; the head's logit is the mean of the members' own
    logits (so CAM still explains it), a member's logit depends on its own trunk alone, its loss
    trains only its own trunk, and one trunk's pretrained weights start every member."""
    from safetensors.torch import save_file

    from cxr.training.loops import masked_bce, per_member

    torch.manual_seed(0)
    model = create_cnn("tiny", 4, members=3, pooling="lse").eval()
    single = create_cnn("tiny", 4)
    assert model.num_features == 3 * single.num_features
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        maps = model.forward_features(x)
        logits, members = model(x), model(x, members=True)
    assert members.shape == (3, 2, 4)
    assert torch.allclose(members.mean(0), logits, atol=1e-5)
    model.pooling = "avg"  # CAM's identity holds for average pooling
    with torch.no_grad():
        cam = class_activation_maps(maps, model.head.weight, torch.tensor([[1], [1]]))
        assert torch.allclose(cam.mean(dim=(2, 3))[:, 0] + model.head.bias[1], model.forward_head(maps)[:, 1],
                              atol=1e-4)
        before = model(x, members=True)
        model.features.trunks[2][0][0].weight.mul_(3.0)
        after = model(x, members=True)
    assert torch.equal(before[:2], after[:2]) and not torch.allclose(before[2], after[2])
    model.train()
    loss = per_member(model(x, members=True)[:1], lambda lg: masked_bce(lg, torch.ones_like(lg)))
    loss.backward()
    assert model.features.trunks[0][0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.features.trunks[1].parameters())
    save_file(single.state_dict(), str(tmp_path / "one.safetensors"))
    report = load_pretrained(model, tmp_path / "one.safetensors")
    assert not report["missing"] and not report["mismatched"]
    for trunk in model.features.trunks:
        assert torch.equal(trunk[0][0].weight, single.features[0][0].weight)
    with pytest.raises(CxrError, match="transition"):
        create_cnn("tiny", 2, members=2, transition=8)

