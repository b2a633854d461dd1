"""`cxr evaluate` on the tiny trained run: files, keys, and numbers that hang together."""
from __future__ import annotations

import json

import pytest

from cxr.cli import main
from cxr import evaluation as ev
from cxr.records import Box


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    rc = main(["evaluate", str(tiny_run), "--out", str(out), "--quiet", "--split", "all"])
    assert rc == 0
    return out


def test_evaluate_writes_json_and_markdown(evaluated, tiny_run):
    m = json.loads((evaluated / "metrics.json").read_text())
    config = json.loads((tiny_run / "config.json").read_text())
    for key in ("auc", "detection", "bleu", "calibration", "context", "localisation", "targets",
                "threshold_rule", "split_counts", "cascade"):
        assert key in m, key
    assert m["targets"] == config["targets"]
    assert m["n_images"] == sum(m["split_counts"].values())
    # AUC: every target either has a value in [0, 1] or a reason it has none
    for t in m["targets"]:
        v = m["auc"]["per_label"][t]
        assert (v is None and t in m["auc"]["skipped"]) or 0.0 <= v <= 1.0
    # BLEU before and after the cascade, per split, both ways
    assert set(m["bleu"]) == {"stage1", "cascade"}
    for per_split in m["bleu"].values():
        assert set(per_split) <= {"train", "val", "test"} and "train" in per_split
        for b in per_split.values():
            g = b["given_disease"]
            assert g["n"] > 0 and all(0.0 <= g[f"bleu{n}"] <= 1.0 for n in range(1, 5))
    # thresholds in use are the checkpoint's
    assert m["detection"]["thresholds"] == {t: config["thresholds"][t] for t in m["targets"]}
    cal = m["calibration"]
    assert cal["n"] == m["n_images"] * len(m["targets"]) and 0.0 <= cal["ece"] <= 1.0
    assert sum(b["count"] for b in cal["bins"]) == cal["n"]
    # phantom truth states context, and provides boxes
    assert set(m["context"]["fields"]) == {"side", "location", "severity"}
    loc = m["localisation"]["protocol_given_disease"]
    assert loc["thresholds"] == [0.1, 0.25, 0.5, 0.75, 0.9] and loc["n"]
    # the map the Reader's own boxes come from is the run's stored one, and the table says which
    stored = config["localization"].get("source") or ("attention" if config["architecture"].get(
        "annotator") == "grounded" else "cam")
    assert m["localisation"]["reader_box_source"] == stored
    md = (evaluated / "metrics.md").read_text()
    assert f"detected findings only; from the {ev.BOX_SOURCE_TITLES[stored]})" in md
    for heading in ("## Detection", "## Annotation BLEU", "## Context", "## Localisation accuracy by IoBB",
                    "## Calibration"):
        assert heading in md
    assert md == ev.metrics_markdown(m)
    if m.get("study"):  # the study-level note names the signal the run's gate uses
        from cxr.operating import SIGNAL_WORDS

        assert f"its probability is the calibrated {SIGNAL_WORDS[m['study']['signal']]};" in md


def test_evaluate_bad_inputs(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "not a trained run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--bleu-splits", "train,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_box_disease_reads_terms_and_plain_labels():
    assert ev.box_disease("Opacity/lung/base/left/mild") == "Opacity"
    assert ev.box_disease("Effusion") == "Effusion"
    assert Box("x", 0, 0, 1, 1).label == "x"


def test_target_lookup_maps_nih_and_mesh_names():
    lookup = ev.target_lookup(["normal", "Pleural Effusion", "Infiltration"])
    assert lookup["effusion"] == "Pleural Effusion"
    assert lookup["pleural effusion"] == "Pleural Effusion"
    assert lookup["infiltrate"] == "Infiltration"
    assert "mass" not in lookup
