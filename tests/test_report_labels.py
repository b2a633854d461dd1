"""Labels mined from report text (`cxr train --labels-from report`): what the miner's findings
become, the uncertainty policies, the masked loss, bad reports, and the run's record of it all."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cxr.records import Image, Study
from cxr.reports.report_labels import IGNORED, audit, label_studies, read_records
from cxr.training.loops import cnn_loss
from cxr.training.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _studies(*texts):
    """Studies of one (unread) image each with these reports."""
    return [Study(id=f"s{i}", patient_id=f"p{i}", images=[Image(id=f"s{i}", path=Path(f"s{i}.png"))],
                  report={"FINDINGS": t}) for i, t in enumerate(texts)]


def _by_id(records):
    return {r["study"]: r for r in records}


def test_mined_labels_follow_the_report():
    studies, records = label_studies(_studies(
        "Small left pleural effusion. No pneumothorax.",
        "The left hemidiaphragm is mildly elevated.",
        "The lungs are clear. No pleural effusion."))
    r = _by_id(records)
    assert r["s0"]["labels"] == {"Pleural Effusion": 1, "Pneumothorax": 0, "normal": 0}  # negated -> 0
    [effusion] = [f for f in studies[0].findings if f.certainty == "positive"]
    assert (effusion.side, effusion.severity) == ("left", "small")  # context from the text
    # written as Open-i indexes it, so Shin's pattern element is the truth's `Diaphragm/left`
    assert r["s1"]["labels"] == {"Diaphragm/left": 1, "normal": 0}
    assert r["s2"]["labels"] == {"Pleural Effusion": 0, "normal": 1}
    assert all(len(x["report_sha256"]) == 64 and x["note"] is None for x in records)
    assert r["s0"]["findings"][1] == {**r["s0"]["findings"][1], "disease": "Pneumothorax",
                                      "certainty": "negative"}


@pytest.mark.parametrize("policy, pneumonia, normal", [
    ("ignore", None, None), ("positive", 1, 0), ("negative", 0, 1)])
def test_uncertain_mentions_follow_the_policy(policy, pneumonia, normal):
    studies, records = label_studies(_studies(
        "Cannot exclude pneumonia.", "Possible right lower lobe pneumonia. Small right pleural effusion."),
        policy)
    r = _by_id(records)
    assert r["s0"]["labels"] == {"Pneumonia": pneumonia, "normal": normal}
    assert r["s1"]["labels"]["Pneumonia"] == pneumonia and r["s1"]["labels"]["Pleural Effusion"] == 1
    ignored = studies[0].meta[IGNORED]
    assert ignored == (["Pneumonia", "normal"] if policy == "ignore" else [])
    # the training rows: 1 / 0 as the policy says, and under `ignore` a mask that hides the label
    prep = prepare(studies, fractions=(1.0, 0.0, 0.0), min_label_count=1, targets=[
        "normal", "Pneumonia", "Pleural Effusion"], words=["<pad>", "<start>", "<end>", "<unk>"])
    first = prep.study_ids.index("s0")
    assert prep.labels[first].tolist() == [normal or 0, pneumonia or 0, 0]
    if policy == "ignore":
        assert prep.mask[first].tolist() == [0, 0, 1]
        assert prep.mask[prep.study_ids.index("s1")].tolist() == [1, 0, 1]
    else:
        assert prep.mask is None


def test_ignored_labels_are_out_of_the_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.1, -2.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    loss = cnn_loss(logits, y, "diseases", mask=mask)
    loss.backward()
    assert logits.grad[0, 1] == 0 and (logits.grad[mask > 0] != 0).all()
    flipped = y.clone()
    flipped[0, 1] = 1.0  # what an ignored label says cannot matter
    assert torch.isclose(cnn_loss(logits, flipped, "diseases", mask=mask), loss)
    # the mean is over the known labels; without a mask, the plain mean
    terms = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert torch.isclose(loss, terms[mask > 0].mean())
    assert torch.isclose(cnn_loss(logits, y, "diseases"), terms.mean())


def test_bad_reports_get_a_note_not_a_crash():
    studies, records = label_studies(_studies("", "   ", "#### 12.5 %% $$ !!", "<p>Mild cardiomegaly.</p>",
                                              "\u5fc3\u810f\u589e\u5927\u3002", "Mild cardiomegaly. " * 10_000))
    r = _by_id(records)
    assert "no report text" in r["s0"]["note"] and "no report text" in r["s1"]["note"]
    assert "not readable English text" in r["s2"]["note"]
    assert "not readable English text" in r["s4"]["note"]  # not mined as "nothing abnormal"
    assert "too long" in r["s5"]["note"]
    assert not studies[2].findings and studies[2].meta["labelled"] is False
    assert r["s3"]["note"] is None and r["s3"]["labels"]["Cardiomegaly"] == 1  # markup stripped


REPORTS = {  # what a radiologist would write for the synthetic studies' findings
    "Opacity/lung/base/left/mild": "Mild opacity in the left lung base.",
    "Opacity/lung/base/right/severe": "Severe opacity in the right lung base.",
    "Cardiomegaly/mild": "The heart is mildly enlarged.",
}


def test_folder_manifest_with_a_report_column_trains_from_the_text(tmp_path):
    from cxr.checkpoint import load_spec
    from cxr.cli import main
    from cxr.testing import synthetic_studies

    from cxr.splits import split_by_patient

    studies = synthetic_studies(tmp_path / "img", n=24, size=40)
    # one validation study (normal or opacity only) also hedges a target: validation leaves it out
    used = [s for k, s in enumerate(studies) if k not in (7, 11)]  # 7, 11: no usable report
    val = {s.patient_id for s in split_by_patient(used, (0.7, 0.1, 0.2), 0)["val"]}
    hedged = next(k for k, s in enumerate(studies) if s.patient_id in val and k % 4 in (0, 1))
    rows = []
    for k, s in enumerate(studies):
        terms = [f.raw or f.term for f in s.findings]
        text = " ".join(REPORTS[t] for t in terms if t in REPORTS) or "The lungs are clear. No effusion."
        if k == 5:
            text = "Cannot exclude pneumonia. " + text
        if k == hedged:
            text += " Possible cardiomegaly."
        rows.append({"path": s.images[0].path.name, "patient_id": s.patient_id, "labels": "|".join(terms),
                     "report": {7: "", 11: "%%%% 1234 ####"}.get(k, text)})
    manifest = tmp_path / "img" / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run"
    rc = main(["train", "--data", f"folder:{tmp_path / 'img'},manifest.csv", "--labels-from", "report",
               "--out", str(run), "--backbone", "tiny", "--image-size", "40", "--crop", "32",
               "--epochs", "1", "--rnn-epochs", "2", "--min-label-count", "2", "--ground-epochs", "1",
               "--min-cluster-members", "4", "--images-per-cluster", "2", "--attn-dim", "8",
               "--rnn-hidden", "16", "--rnn-embed", "8", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    spec = load_spec(run)
    assert spec.labels_from == "report" and spec.train_config["labels_from"] == "report"
    assert spec.stage == "cascade" and len(spec.refined.names) > len(spec.targets)  # masks in stage 2 too
    assert spec.label_mining.uncertain == "ignore"
    assert (spec.label_mining.studies, spec.label_mining.left_out) == (22, 2)
    assert {"normal", "Opacity", "Cardiomegaly"} <= set(spec.targets)
    records = read_records(run)  # the run keeps every study's mined labels
    assert len(records) == 24 and {r["study"] for r in records} == {s.id for s in studies}
    notes = {r["study"]: r["note"] for r in records if r["note"]}
    assert set(notes) == {"syn0007", "syn0011"}
    assert _by_id(records)["syn0005"]["labels"]["Pneumonia"] is None
    assert _by_id(records)[studies[hedged].id]["labels"]["Cardiomegaly"] is None
    assert set(spec.data.patients["val"]) == val
    assert spec.validation["val_images"] == len(val) - 1  # calibrated on the studies fully known
    # the mined labels agree with the manifest's where both exist (the reports say exactly that)
    result = audit(records)
    assert result["studies"] == 22
    assert result["per_disease"]["Opacity"]["precision"] == 1.0
    assert result["per_disease"]["Opacity"]["recall"] == 1.0
    assert result["per_disease"]["Cardiomegaly"]["recall"] == 1.0
    rc = main(["labels", "--audit", str(run), "--json", str(tmp_path / "audit.json")])
    assert rc == 0
    assert json.loads((tmp_path / "audit.json").read_text())["micro"]["precision"] == 1.0
    # evaluated on its source, it is scored against the given labels; on images with reports only,
    # against the labels mined from them, and it says so
    from cxr.evaluation import evaluate_run
    from cxr.sources import open_source

    given = open_source(spec.data.spec)
    kw = dict(split="all", bleu_splits=(), progress=False)
    assert evaluate_run(run, out=tmp_path / "e1", studies=given, **kw)["truth"] == "the source's labels"
    reports_only = [dataclasses.replace(s, findings=[]) for s in given]
    m = evaluate_run(run, out=tmp_path / "e2", studies=reports_only, **kw)
    assert m["truth"].startswith("labels mined from the reports") and m["n_images"] == 22


def test_a_source_without_any_report_is_a_clear_error(tmp_path):
    from cxr.errors import CxrError
    from cxr.testing import synthetic_studies, tiny_config
    from cxr.training import train

    studies = synthetic_studies(tmp_path / "img", n=4, size=32)
    with pytest.raises(CxrError, match="no study has a usable report"):
        train(tiny_config(data="folder:x", image_size=32, crop=28, labels_from="report"), tmp_path / "r",
              studies=studies)


def test_the_phantoms_reports_are_mined_into_its_truth(shared_data):
    """What `--labels-from report` learns on the phantom: 200 drawn cases' reports (no rendering)
    against their true terms; the diseases, and the side / site / severity of each matched
    finding, as the benchmark's runs see them (benchmarks/report_labels.py)."""
    from cxr import metrics as M
    from cxr.phantom.cases import CaseGenerator
    from cxr.phantom.reports import mesh_terms, report_sections
    from cxr.reports.mesh import parse_term
    from cxr.sources.openi import read_openi

    gen = CaseGenerator.from_studies(read_openi(shared_data / "openi" / "NLMCXR_reports.tgz"))
    cases = [gen.case(i, 0) for i in range(1, 201)]
    truth = [Study(id=c.id, patient_id=c.id, report=report_sections(c),
                   findings=[parse_term(t) for t in mesh_terms(c)]) for c in cases]
    mined, records = label_studies(truth)
    micro = audit(records)["micro"]
    assert micro["precision"] >= 0.97 and micro["recall"] >= 0.97
    context = M.context_accuracy(
        ([f for f in t.positive if f.disease != "normal"], [f for f in m.positive if f.disease != "normal"])
        for t, m in zip(truth, mined))
    assert context["fields"]["side"]["accuracy"] >= 0.95
    assert context["fields"]["severity"]["accuracy"] >= 0.93
    assert context["fields"]["location"]["accuracy"] >= 0.8  # the reports leave out "posterior", ...


def test_an_ensemble_mines_the_reports_once(tmp_path, monkeypatch):
    """`--ensemble 2 --labels-from report`: the two networks and their merge read the same
    reports, mined once (a large archive took minutes per mining); every run keeps the records."""
    from cxr.checkpoint import load_spec
    from cxr.reports import report_labels
    from cxr.testing import synthetic_studies, tiny_config
    from cxr.training import train
    from cxr.training.ensemble import member_dirs

    studies = [dataclasses.replace(s, findings=[], report={"FINDINGS": " ".join(
        REPORTS[t] for t in (f.raw or f.term for f in s.findings) if t in REPORTS) or "The lungs are clear."})
        for s in synthetic_studies(tmp_path / "img", n=24, size=32)]
    calls = []
    real = report_labels.label_studies
    monkeypatch.setattr(report_labels, "label_studies", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(labels_from="report", ensemble=2, cascade=False, image_size=32, crop=28, epochs=1,
                      rnn_epochs=2, ground_epochs=1, attn_dim=8, rnn_hidden=16, rnn_embed=8)
    run = train(cfg, tmp_path / "run", studies=studies)
    assert len(calls) == 1
    assert load_spec(run).labels_from == "report" and (run / report_labels.RECORDS).exists()
    assert all((d / report_labels.RECORDS).exists() for d in member_dirs(run)) and len(member_dirs(run)) == 2
    calls.clear()  # outside an ensemble nothing is remembered: a plain run mines its own
    train(dataclasses.replace(cfg, ensemble=1), tmp_path / "plain", studies=studies)
    assert len(calls) == 1
