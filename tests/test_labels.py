"""Shin et al. 2016's label space, rebuilt from the Open-i XML, against their released files.

Agreement, image for image, with `openi.mesh.top` (7,284 images):
* `case_sensitive=True` (Shin's own rule, headings as written): 0 differences.
* default (headings case- and whitespace-normalised): 6 images carry a different pattern
  string, all from spelling in the XML, and 2 of them change label:
  - CXR1776 (2 images): `Thoracic vertebrae/degenerative` (lower-case v). Shin's case-sensitive
    rule made the pattern `Thoracic vertebrae` (not a label); we read `Thoracic
    Vertebrae/degenerative`, a label: 120 images instead of the released 118.
  - CXR3077 (2 images): `Lymph nodes/...` -> `Lymph Nodes` (no label either way).
  - CXR2827 (2 images): `Subcutaneous  Emphysema` (two spaces) -> `Subcutaneous Emphysema`,
    inside a 7-element pattern (no label either way).
The 186 images absent from the released file are exactly those of reports indexed `No
Indexing` (172) or only `Technical Quality of Image Unsatisfactory` (14); we drop the same ones.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.records import Finding, Image, Study
from cxr.reports.labels import (
    LabelSpace,
    Vocabulary,
    count_patterns,
    study_pattern,
    study_terms,
)

RELEASED = {  # openi.mesh.top: images per single pattern with >= 30 images
    "normal": 2696, "Calcified Granuloma": 174, "Thoracic Vertebrae/degenerative": 118,
    "Lung/hypoinflation": 117, "Calcinosis": 84, "Opacity": 81, "Spine/degenerative": 80,
    "Cardiomegaly": 64, "Scoliosis": 61, "Lung/hyperdistention": 46, "Surgical Instruments": 41,
    "Spondylosis": 39, "Osteophyte": 39, "Catheters, Indwelling": 38, "Granulomatous Disease": 36,
    "Fractures, Bone": 36, "Nodule": 33,
}


def _read_released(path):
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split("|")
        out["CXR" + parts[0].rsplit("/", 1)[1][: -len(".png")]] = parts[1:]
    return out


@pytest.fixture(scope="module")
def openi(shared_data):
    from cxr.sources.openi import read_openi

    return read_openi(shared_data / "openi" / "NLMCXR_reports.tgz")


@pytest.fixture(scope="module")
def released(all_data):
    d = all_data / "openi" / "shin2016"
    return _read_released(d / "openi.mesh"), _read_released(d / "openi.mesh.top")


def test_released_counts_follow_from_the_file(released):
    _, top = released
    counts = {}
    for pattern in top.values():
        counts["|".join(pattern)] = counts.get("|".join(pattern), 0) + 1
    assert {p: n for p, n in counts.items() if n >= 30} == RELEASED
    assert len(top) == 7284


def test_terms_and_dropped_images_match_released(openi, released):
    mesh, _ = released
    kept = {}
    for s in openi:
        terms = study_terms(s, case_sensitive=True)
        for im in s.images:
            if terms:
                kept[im.id] = terms
    assert kept == mesh  # same 7,284 images, same sorted terms, image for image
    dropped = [(s, im) for s in openi for im in s.images if im.id not in mesh]
    assert len(dropped) == 7470 - 7284 == 186
    reasons = {tuple(sorted({t.strip() for t in s.meta["mesh"]})) for s, _ in dropped}
    assert reasons == {("No Indexing",), ("Technical Quality of Image Unsatisfactory",)}


def test_label_space_agrees_with_released_file_image_for_image(openi, released):
    _, top = released
    exact = LabelSpace.build(openi, 30, case_sensitive=True)
    assert exact.counts == RELEASED and len(exact) == 17
    ours = LabelSpace.build(openi, 30)
    assert set(ours.targets) == set(RELEASED)
    assert ours.counts == {**RELEASED, "Thoracic Vertebrae/degenerative": 120}
    assert ours.targets[0] == "normal" and abs(ours.counts["normal"] / 7284 - 0.37) < 0.005

    pattern_diff, label_diff = [], []
    for s in openi:
        for im in s.images:
            theirs = "|".join(top[im.id]) if im.id in top else None
            assert study_pattern(s, case_sensitive=True) == theirs, im.id
            if study_pattern(s) != theirs:
                pattern_diff.append(im.id)
            released_label = theirs if theirs in RELEASED else None
            row = ours.labels_of(s)
            our_label = ours.targets[int(row.argmax())] if row.any() else None
            if our_label != released_label:
                label_diff.append((im.id, released_label, our_label))
    assert sorted({i.split("_")[0] for i in pattern_diff}) == ["CXR1776", "CXR2827", "CXR3077"]
    assert len(pattern_diff) == 6
    assert label_diff == [("CXR1776_IM-0508-1001", None, "Thoracic Vertebrae/degenerative"),
                          ("CXR1776_IM-0508-2001", None, "Thoracic Vertebrae/degenerative")]


def test_pattern_table_counts_reports(openi):
    table = count_patterns(openi)
    assert table["normal"] == (2696, 1379)  # 12 more normal reports list no image
    assert sum(n for n, _ in table.values()) == 7284


def _study(*terms, images=1):
    return Study(id="s", patient_id="p", images=[Image(id=f"i{k}") for k in range(images)],
                 findings=[Finding(disease=t.split("/")[0], raw=t) for t in terms])


def test_labels_of_exclusive_and_multi_hot(tmp_path):
    studies = [_study("normal")] * 3 + [_study("Calcinosis/lung")] * 3 + \
              [_study("Nodule/lung/right", "Calcinosis/aorta")] * 3
    space = LabelSpace.build(studies, 3)
    assert space.targets == ["Calcinosis", "Calcinosis|Nodule", "normal"]
    combo = _study("Nodule", "Calcinosis")
    assert space.labels_of(combo).tolist() == [0, 1, 0]
    assert not space.covers(_study("Cardiomegaly")) and not space.covers(_study("No Indexing"))
    multi = LabelSpace(targets=["Calcinosis", "Nodule", "normal"], exclusive=False)
    assert multi.labels_of(combo).tolist() == [1, 1, 0]
    assert multi.labels_of(_study("normal")).dtype == np.float32
    path = tmp_path / "labels.json"
    space.save(path)
    assert LabelSpace.load(path) == space
    json.loads(path.read_text())


def test_vocabulary(openi, tmp_path):
    vocab = Vocabulary.build(openi)
    assert vocab.tokens[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert {"opacity", "lung", "upper lobe", "right", "mild", "normal"} <= set(vocab.tokens)
    assert "technical quality of image unsatisfactory" not in vocab  # Shin drops it too
    ids = vocab.encode("Opacity/lung/upper lobe/right/streaky/mild", length=7)
    assert len(ids) == 7 and ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == ["opacity", "lung", "upper lobe", "right", "streaky"]
    assert vocab.decode(vocab.encode("Opacity/martian")) == ["opacity", "<unk>"]
    assert vocab.encode("Nodule", length=5)[-2:] == [vocab.pad_id] * 2
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path).tokens == vocab.tokens


def test_bad_label_files(tmp_path):
    from cxr.errors import CxrError

    with pytest.raises(CxrError, match="not found"):
        LabelSpace.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CxrError, match="cannot read JSON"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(CxrError, match=">= 30"):
        LabelSpace.build([_study("normal")], 30)


def test_cli_prints_table_and_writes_json(shared_data, tmp_path, capsys):
    from cxr.cli import main

    out = tmp_path / "labels.json"
    assert main(["labels", str(shared_data / "openi" / "NLMCXR_reports.tgz"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Calcified Granuloma" in text and "2696" in text and "1379" in text
    data = json.loads(out.read_text())
    assert len(data["label_space"]["targets"]) == 17 and data["labelled_images"] == 7284
    assert main(["labels", str(tmp_path / "nope.tgz")]) == 2
    assert "not found" in capsys.readouterr().err


def test_patterns_of_mined_and_nih_findings(nih_sample, tmp_path):
    mined = Study(id="t", patient_id="t", images=[Image(id="t")], findings=[
        Finding(disease="Pleural Effusion", side="right", severity="small", raw="small right effusion",
                source="text"),
        Finding(disease="Pneumothorax", certainty="negative", raw="no pneumothorax", source="text")])
    assert study_terms(mined) == ["Pleural Effusion/right/small"]
    assert study_pattern(mined) == "Pleural Effusion"
    from cxr.sources.nih import read_nih

    nih = read_nih(nih_sample / "Data_Entry_2017_v2020.csv")
    table = count_patterns(nih)
    assert sum(n for n, _ in table.values()) == 656 and "Atelectasis" in table
    csv_file = tmp_path / "Data_Entry_2017.csv"
    csv_file.write_text("Image Index,Finding Labels,Patient ID\na.png,No Finding,1\nb.png,Mass|Nodule,2\n")
    assert list(count_patterns(read_nih(csv_file))) == ["Mass|Nodule", "normal"]
