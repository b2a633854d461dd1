"""`--labels shin2016`: Shin et al.'s set-up, one disease pattern per image (the `cxr labels`
space), softmax, top-1 accuracy; on a few phantom images."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom(tiny_run):
    """The phantom images the tiny run was trained on (`cxr.testing.make_tiny_run`)."""
    from cxr.sources import open_source

    spec = f"phantom:{tiny_run.parent / 'data'}"
    return spec, open_source(spec)


def test_targets_are_the_pattern_space(phantom):
    """The targets are `cxr labels`' patterns on the same studies; each kept image has exactly
    its own pattern; images of other patterns are left out of every split."""
    from cxr.reports.labels import LabelSpace, study_pattern
    from cxr.training.prepare import prepare

    _, studies = phantom
    prep = prepare(studies, label_space="shin2016", min_label_count=2)
    assert prep.targets == LabelSpace.build(studies, 2).targets
    assert "normal" in prep.targets and len(prep.targets) >= 3
    by_id = {s.id: s for s in studies}
    kept = prep.split >= 0
    assert kept.any() and (~kept).any()  # this set has patterns below 2 images (multi-finding ones)
    for i, sid in enumerate(prep.study_ids):
        pattern = study_pattern(by_id[sid])
        if kept[i]:
            assert prep.labels[i].sum() == 1 and prep.targets[int(prep.labels[i].argmax())] == pattern
        else:
            assert prep.labels[i].sum() == 0 and pattern not in prep.targets
    assert {t for _, t, _ in prep.pairs} <= set(range(len(prep.targets)))
    # the default stays multi-label: an image can be a positive of two diseases
    multi = prepare(studies, min_label_count=2)
    assert multi.targets != prep.targets or (multi.labels.sum(1) > 1).any()


def test_training_and_evaluation(phantom, tmp_path):
    """A softmax run: its outputs sum to one, validation and `cxr evaluate` report top-1."""
    import torch

    from cxr.evaluation import evaluate_run
    from cxr.reader import Reader
    from cxr.testing import tiny_config
    from cxr.training import train

    spec_str, studies = phantom
    cfg = tiny_config(data=spec_str, labels="shin2016", cascade=False, epochs=1, rnn_epochs=2,
                      fractions=(0.5, 0.25, 0.25))
    run = train(cfg, tmp_path / "run", studies=studies)
    reader = Reader.load(run, device="cpu")
    assert reader.spec.architecture.head == "softmax"
    assert "val_top1" in reader.spec.validation
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    logits = reader.forward([image]).logits
    assert torch.softmax(logits, 1).sum().item() == pytest.approx(1.0, abs=1e-5)
    metrics = evaluate_run(run, split="test", out=tmp_path / "eval", studies=studies, progress=False,
                           bleu_splits=("test",))
    assert 0.0 <= metrics["top1_accuracy"] <= 1.0
