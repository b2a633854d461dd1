"""Reader on the tiny trained run: contract of Result, checkpoint round trip, inputs, batching."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import cxr
from cxr.errors import CxrError
from cxr.models.localize import side_of_box


@pytest.fixture(scope="module")
def reader(tiny_run):
    # gate=False, deliberately: these tests check the cascade's contract on small drawn images
    # (`_image`), which the quality gate would refuse (tests/test_quality_gate.py tests the gate)
    return cxr.Reader.load(tiny_run, device="cpu", gate=False)


@pytest.fixture(scope="module")
def eager(tiny_run, tmp_path_factory):
    """The tiny run with every disease threshold at 0: each image has findings to check, whatever
    the tiny model happened to learn."""
    from service_helpers import run_asserting_every_finding

    return cxr.Reader.load(run_asserting_every_finding(tiny_run, tmp_path_factory.mktemp("eager") / "run"),
                           device="cpu", gate=False)  # drawn images, as `reader` above


def _image(h=80, w=96, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.3 + 0.4 * np.exp(-(((xx - w * 0.7) ** 2 + (yy - h * 0.7) ** 2) / (2 * (w / 8) ** 2)))
    return np.clip(img + 0.03 * rng.standard_normal((h, w)), 0, 1).astype(np.float32)


def vocabulary_words(text: str, vocabulary: list[str]) -> list[str]:
    """`text` cut into the fewest vocabulary words joined by spaces (a word may hold a space:
    "catheters, indwelling"); fails if it cannot be, i.e. the annotation holds something else."""
    best: dict[int, list[str]] = {0: []}  # best[i]: the words of text[:i], where a word ends at i
    for end in range(1, len(text) + 1):
        for word in filter(None, vocabulary):
            start = end - len(word)
            prefix = best.get(start - 1 if start else 0) if start == 0 or text[start - 1] == " " else None
            if start >= 0 and text[start:end] == word and prefix is not None \
                    and (end not in best or len(prefix) + 1 < len(best[end])):
                best[end] = prefix + [word]
    assert len(text) in best, f"not made of vocabulary words: {text!r}"
    return best[len(text)]


def test_result_contract(eager, tiny_run):
    reader = eager
    config = json.loads((tiny_run / "config.json").read_text())
    assert reader.targets == config["targets"]
    image = _image()
    result = reader(image)
    assert len(result.findings) >= len(reader.targets) - 1  # every disease, normal maybe
    assert set(result.scores) == set(reader.targets)
    assert all(0.0 <= s <= 1.0 for s in result.scores.values())
    assert result.image_size == (80, 96)
    assert result.embedding.shape == (config["architecture"]["image_dim"],)
    assert result.model_id == reader.model_id and reader.model_id.startswith("tiny-cascade-")
    assert any(f.boxes for f in result.findings)
    for f in result.findings:
        assert f.disease in reader.targets
        assert f.score >= reader.thresholds[reader.targets.index(f.disease)] - 1e-6
        assert 1 <= len(vocabulary_words(f.annotation, config["vocabulary"])) <= 6  # greedy decoding's max_len
        for b in f.boxes:
            assert 0 <= b.x <= 96 and 0 <= b.y <= 80 and b.x + b.w <= 96 + 1e-3 and b.y + b.h <= 80 + 1e-3
        if f.disease != "normal":
            assert result.heatmaps[f.disease].shape == (80, 96)
            assert 0.0 <= result.heatmaps[f.disease].min() and result.heatmaps[f.disease].max() <= 1.0
    json.dumps(result.to_dict(embedding=True))


def test_findings_follow_thresholds(tiny_run):
    """With every threshold at 0 all diseases are reported, each with heatmap and annotation (and,
    the run being grounded, one map per written word, keyed "Disease:word")."""
    from cxr.checkpoint import load_run
    from cxr.reader import Reader

    spec, tensors = load_run(tiny_run)
    assert spec.study is not None  # the tiny run's validation split has normal and abnormal studies
    called_abnormal = dataclasses.replace(spec.study, threshold=0.0)
    spec = dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets}, study=called_abnormal)
    result = Reader(spec, tensors, "cpu", gate=False)(_image())
    diseases = [t for t in spec.targets if t != "normal"]
    assert result.call == "abnormal" and 0 <= result.abnormal <= 1
    assert sorted(f.disease for f in result.findings) == sorted(diseases)
    assert {k for k in result.heatmaps if ":" not in k} == set(diseases)
    assert all(f.annotation for f in result.findings)
    for f in result.findings:
        words = [k.split(":", 1)[1] for k in result.heatmaps if k.startswith(f.disease + ":")]
        assert words and " ".join(words) == f.annotation
    spec = dataclasses.replace(spec, thresholds={t: 1.1 for t in spec.targets})
    assert Reader(spec, tensors, "cpu", gate=False)(_image()).findings == []


def test_a_study_called_normal_carries_no_disease(tiny_run):
    """Whatever the finding thresholds, a study under the study-level threshold comes out
    normal, with `normal` as its only finding."""
    from cxr.checkpoint import load_run
    from cxr.reader import Reader

    spec, tensors = load_run(tiny_run)
    spec = dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets},
                               study=dataclasses.replace(spec.study, threshold=1.1))
    result = Reader(spec, tensors, "cpu", gate=False)(_image())
    assert result.call == "normal" and result.abnormal < 1.1
    assert [f.disease for f in result.findings] == ["normal"]
    assert result.to_dict()["call"] == "normal"


def test_round_trip_same_outputs(reader, tiny_run):
    again = cxr.Reader.load(tiny_run, device="cpu", gate=False)
    image = _image(seed=3)
    a, b = reader(image), again(image)
    assert a.scores == b.scores
    np.testing.assert_array_equal(a.embedding, b.embedding)
    assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]
    assert again.model_id == reader.model_id


def test_batches_and_paths_give_the_same_results(reader, tmp_path):
    from PIL import Image

    images = [_image(seed=s) for s in range(5)]
    one_by_one = [reader(im) for im in images]
    batched = reader(images, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 5
    for x, y in zip(one_by_one, batched):
        assert x.scores == pytest.approx(y.scores, abs=1e-5)
    path = tmp_path / "x.png"
    Image.fromarray((images[0] * 255).round().astype(np.uint8)).save(path)
    from_file = reader(path)
    assert from_file.image_size == (80, 96)
    assert from_file.scores == pytest.approx(one_by_one[0].scores, abs=0.02)
    assert len(reader(np.stack(images[:3]))) == 3  # an (N, H, W) stack is N images
    assert reader.embed(images).shape == (5, one_by_one[0].embedding.shape[0])


def test_beam_search_annotations(eager):
    reader = eager
    greedy = reader(_image(), beams=1)
    beam = reader(_image(), beams=3)
    assert beam.findings and [f.disease for f in greedy.findings] == [f.disease for f in beam.findings]
    vocab = set(reader.words)
    for f in beam.findings:
        assert set(f.annotation.split()) <= {w for t in vocab for w in t.split()}


def test_bad_inputs(reader, tmp_path):
    with pytest.raises(CxrError, match="not found"):
        reader(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CxrError):
        reader(bad)
    with pytest.raises(CxrError, match=r"\[0, 1\]"):
        reader(np.full((32, 32), 255.0, dtype=np.float32))
    with pytest.raises(CxrError, match="not a trained run"):
        cxr.Reader.load(tmp_path)


def test_stage1_is_a_loadable_run(tiny_run):
    stage1 = cxr.Reader.load(tiny_run / "stage1", device="cpu", gate=False)
    assert stage1.targets == cxr.Reader.load(tiny_run, device="cpu").targets
    assert stage1.model_id.startswith("tiny-stage1-")
    assert set(stage1(_image()).scores) == set(stage1.targets)


def test_localise_matches_the_boxes_of_findings(tiny_run):
    """`localise` gives the boxes of any named target; for a detected finding they are the boxes
    the Reader reports (from the grounded finding map; for a finding said to be left or right,
    those of them on that side). Findings of a whole organ, boxed by the anatomy model where it
    is on, are `tests/test_anatomy.py`'s."""
    from cxr.checkpoint import load_run
    from cxr.reader import Reader

    spec, tensors = load_run(tiny_run)
    spec = dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets},
                               study=dataclasses.replace(spec.study, threshold=0.0))
    reader = Reader(spec, tensors, "cpu", gate=False)
    reader.boxes_of_whole_organs = False
    image = _image()
    diseases = [t for t in spec.targets if t != "normal"]
    assert set(reader.localise(image, diseases)) == set(diseases)  # CAM
    boxes = reader.localise(image, diseases, source="attention")
    findings = reader(image).findings
    assert any(f.boxes for f in findings)
    for f in findings:
        if f.side in ("left", "right"):
            assert all(side_of_box(b, image.shape[1]) == f.side for b in f.boxes)
        else:
            assert f.boxes == boxes[f.disease]
    with pytest.raises(CxrError, match="not a target"):
        reader.localise(image, ["Unicorn"])
    with pytest.raises(CxrError, match="unknown localisation source"):
        reader.localise(image, diseases, source="guess")


def test_the_study_answer_in_words():
    """What the overlay, the demo report and the web page print first about a film."""
    from cxr.results import Result

    assert Result(scores={}, call="abnormal", abnormal=0.9123).study_text == "study: abnormal (p abnormal 0.91)"
    assert Result(scores={}, call="normal", abnormal=0.05).study_text == "study: normal (p abnormal 0.05)"
    assert Result(scores={}).study_text is None  # a run without a study-level answer
