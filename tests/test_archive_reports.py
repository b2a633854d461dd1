"""Reports in the archive: each image's report stored and mined beside the model's findings,
full-text search over the text, and the queries that find where report and model disagree.
Real SQLite, the real TextMiner (medspaCy); PostgreSQL in test_archive_pg.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.archive.db import Archive, Entry
from cxr.archive.reports import MAX_REPORT_CHARS, label_key, mine_reports, prepare_report
from cxr.errors import CxrError
from cxr.results import DetectedFinding, Result

MODEL = "report-test-model"
TARGETS = ("Pleural Effusion", "Cardiomegaly", "Pneumothorax")

# name -> (the model's findings, the study's report)
CASES = {
    "agree_effusion": (["Pleural Effusion"], {"FINDINGS": "Small right pleural effusion.",
                                              "IMPRESSION": "Right effusion."}),
    "report_only_effusion": ([], {"FINDINGS": "Large left pleural effusion. Heart size normal."}),
    "model_only_cardio": (["Cardiomegaly"], {"IMPRESSION": "The lungs are clear. No pneumothorax."}),
    "no_report_cardio": (["Cardiomegaly"], None),
    "markup_cardio": (["Cardiomegaly"], {"FINDINGS": "<p>Mild <b>cardiomegaly</b>.</p>&nbsp;"}),
    "empty": ([], {"FINDINGS": "   ", "IMPRESSION": ""}),
    "not_utf8": (["Pneumothorax"], {"FINDINGS": b"Left pneumothorax \xff\xfe."}),
    "huge": ([], {"FINDINGS": "effusion " * (MAX_REPORT_CHARS // 8)}),
}


def result(diseases, i):
    scores = {t: (0.9 if t in diseases else 0.1) for t in TARGETS}
    findings = [DetectedFinding(d, 0.9, d.lower()) for d in diseases]
    return Result(scores=scores, findings=findings, embedding=np.eye(8, dtype=np.float32)[i],
                  model_id=MODEL, image_size=(64, 64))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    a = Archive(f"sqlite:///{tmp_path_factory.mktemp('reports') / 'a.db'}")
    entries = [Entry(f"/data/{name}.png", f"{i:064x}", MODEL, result=result(diseases, i),
                     report=prepare_report(report))
               for i, (name, (diseases, report)) in enumerate(CASES.items())]
    mine_reports([e.report for e in entries])  # one miner pass for the batch, as `cxr index`
    a.ids = dict(zip(CASES, a.add_results(entries)))
    yield a
    a.close()


def names(archive, hits):
    by_id = {v: k for k, v in archive.ids.items()}
    return {by_id[h.id] for h in hits}


def test_bad_reports_are_stored_or_refused_with_a_reason_and_the_batch_is_whole(archive):
    assert all(archive.ids.values()) and archive.count(status="ok") == len(CASES)
    got = {n: archive.get(i) for n, i in archive.ids.items()}
    assert got["empty"].report is None and got["no_report_cardio"].report is None
    assert got["not_utf8"].report == "" and "not UTF-8" in got["not_utf8"].report_note
    assert "0xff" in got["not_utf8"].report_note and got["not_utf8"].report_findings == []
    assert got["huge"].report == "" and "too long" in got["huge"].report_note
    markup = got["markup_cardio"]
    assert markup.report == "FINDINGS: Mild cardiomegaly ." and "markup removed" in markup.report_note
    assert ("Cardiomegaly", "positive") in {(f["disease"], f["certainty"])
                                            for f in markup.report_findings}
    agree = got["agree_effusion"]
    assert agree.report.startswith("FINDINGS: Small right pleural effusion.")
    effusion = [f for f in agree.report_findings if f["disease"] == "Pleural Effusion"]
    assert effusion and effusion[0]["side"] == "right" and effusion[0]["certainty"] == "positive"
    negated = {f["disease"]: f["certainty"] for f in got["model_only_cardio"].report_findings}
    assert negated.get("Pneumothorax") == "negative"
    sizes = prepare_report({"FINDINGS": "Nodule <1 cm, mass >3 cm. <br/>"})
    assert sizes.text == "FINDINGS: Nodule <1 cm, mass >3 cm." and "markup" in sizes.note
    assert "too long" in prepare_report(b"x" * (9 * MAX_REPORT_CHARS)).note
    with pytest.raises(CxrError, match="words"):
        archive.search(report="  ,, ")
    from sqlalchemy import text  # the external-content FTS5 index agrees with `reports`
    with archive.engine.begin() as conn:
        conn.execute(text("insert into reports_fts(reports_fts, rank) values ('integrity-check', 1)"))


def test_full_text_search_finds_the_reports_with_the_words(archive):
    assert names(archive, archive.search(report="effusion")) == {"agree_effusion",
                                                                 "report_only_effusion"}
    assert names(archive, archive.search(report="effusions")) == {"agree_effusion",
                                                                  "report_only_effusion"}  # stems
    assert names(archive, archive.search(report="right pleural effusion")) == {"agree_effusion"}
    assert names(archive, archive.search(report="pneumothorax")) == {"model_only_cardio"}
    assert names(archive, archive.search(report='cardiomegaly" OR "x')) == set()  # no FTS syntax
    # combined with a structured filter on the model's findings
    assert names(archive, archive.search("cardiomegaly", report="mild")) == {"markup_cardio"}
    assert names(archive, archive.search("cardiomegaly", report="effusion")) == set()
    # and with similar images: the nearest neighbours whose report has the words
    like = archive.similar(image_id=archive.ids["empty"], k=2, report="effusion")
    assert names(archive, like) == {"agree_effusion", "report_only_effusion"}
    assert names(archive, archive.similar(image_id=archive.ids["empty"], k=5,
                                          disagree="model-only")) == {"model_only_cardio"}


def test_disagreement_queries_find_planted_disagreements_both_ways(archive):
    assert names(archive, archive.search(disagree="report-only")) == {"report_only_effusion"}
    assert names(archive, archive.search(disagree="model-only")) == {"model_only_cardio"}
    assert names(archive, archive.search(disagree="model-only",
                                         disagree_finding="Cardiomegaly")) == {"model_only_cardio"}
    assert names(archive, archive.search(disagree="model-only",
                                         disagree_finding="Effusion")) == set()  # NIH name too
    assert names(archive, archive.search(disagree="report-only",
                                         disagree_finding="pleural effusion")) == {
        "report_only_effusion"}
    assert label_key("Effusion") == label_key("Pleural Effusion") == "pleural effusion"
    with pytest.raises(CxrError, match="no model .* reads 'Mass'"):
        archive.search(disagree="report-only", disagree_finding="Mass")
    with pytest.raises(CxrError, match="report-only, model-only"):
        archive.search(disagree="sideways")


def test_cli_search_by_report_and_disagreement(archive, capsys):
    from cxr.cli import main

    assert main(["search", "--db", archive.url, "--report", "effusion", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert {h["path"] for h in hits} == {"/data/agree_effusion.png", "/data/report_only_effusion.png"}
    assert all(h["report"] and h["report_findings"] for h in hits)
    assert main(["search", "--db", archive.url, "--disagree", "model-only",
                 "--finding", "Cardiomegaly"]) == 0
    out = capsys.readouterr().out
    assert "/data/model_only_cardio.png" in out and "report: IMPRESSION: The lungs are clear" in out


def test_index_stores_each_images_report_from_source_items(tiny_run, radiographs, tmp_path):
    """`cxr index` of a source with reports: (path, report) items; a refused report keeps its
    image, and a rerun stores nothing twice."""
    from cxr.archive.index import index_images
    from cxr.reader import Reader

    reader = Reader.load(tiny_run)
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    items = [(str(radiographs[0]), {"FINDINGS": "Moderate cardiomegaly."}),
             (str(radiographs[1]), {"FINDINGS": b"\xc3\x28 broken"}),
             str(radiographs[2])]
    stats = index_images(archive, reader, items, batch_size=8, progress=False, force=True)
    assert stats.indexed + stats.failed == 3 and stats.failed == 0
    by_path = {h.path: h for h in archive.search(limit=10)}
    first = by_path[str(radiographs[0])]
    assert first.report == "FINDINGS: Moderate cardiomegaly."
    assert {f["disease"] for f in first.report_findings} == {"Cardiomegaly"}
    assert "not UTF-8" in by_path[str(radiographs[1])].report_note
    assert by_path[str(radiographs[2])].report is None
    again = index_images(archive, reader, items, batch_size=8, progress=False, force=True)
    assert again.skipped == 3
    assert {h.path for h in archive.search(report="cardiomegaly")} == {str(radiographs[0])}
    archive.close()


def test_service_search_by_report_and_disagreement(archive, tiny_run, tmp_path):
    import httpx

    from cxr.service.app import create_app
    from cxr.service.server import running_server

    app = create_app(tiny_run, archive.url, upload_dir=tmp_path / "uploads",
                     audit_log=tmp_path / "audit.jsonl")
    with running_server(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        body = client.get("/search", params={"report": "effusion"}).json()
        assert body["query"] == {"report": "effusion"}
        assert {h["id"] for h in body["items"]} == {archive.ids["agree_effusion"],
                                                    archive.ids["report_only_effusion"]}
        assert all("path" not in h and h["report"] for h in body["items"])
        body = client.get("/search", params={"disagree": "report-only"}).json()
        assert [h["id"] for h in body["items"]] == [archive.ids["report_only_effusion"]]
        body = client.get("/search", params={"disagree": "model-only",
                                             "finding": "Pneumothorax"}).json()
        assert body["items"] == []
        assert client.get("/search", params={"disagree": "sideways"}).status_code == 422
        body = client.get("/search", params={"like_id": archive.ids["empty"], "k": 5,
                                             "report": "pneumothorax"}).json()
        assert [h["id"] for h in body["items"]] == [archive.ids["model_only_cardio"]]
        # one study's report beside the model, as the web page's report panel shows it
        body = client.get(f"/studies/{archive.ids['report_only_effusion']}/report").json()
        assert body["report_only"] == ["Pleural Effusion"] and body["model_only"] == []
        (effusion,) = [m for m in body["mentions"] if m["disease"] == "Pleural Effusion"]
        assert effusion["model"] == "not found" and effusion["certainty"] == "positive"
        assert body["report"][slice(*effusion["span"])] == "pleural effusion"
        body = client.get(f"/studies/{archive.ids['model_only_cardio']}/report").json()
        assert body["model_only"] == ["Cardiomegaly"] and body["report_only"] == []
        assert body["model_findings"] == [{"disease": "Cardiomegaly", "score": 0.9,
                                           "report": "not mentioned"}]
        mentions = {m["disease"]: m for m in body["mentions"]}
        assert mentions["Pneumothorax"]["certainty"] == "negative"
        assert mentions["Pneumothorax"]["model"] == "not found"
        assert mentions["normal"]["span"] is None  # a finding of the whole report
        body = client.get(f"/studies/{archive.ids['agree_effusion']}/report").json()
        assert body["report_only"] == body["model_only"] == []
        assert body["model_findings"][0]["report"] == "positive"
        body = client.get(f"/studies/{archive.ids['no_report_cardio']}/report").json()
        assert body["report"] is None and body["model_only"] == []  # no report: no disagreement
        assert body["model_findings"][0]["report"] == "no report"
        assert "path" not in json.dumps(body)
        assert client.get("/studies/999999/report").status_code == 404


def test_cli_index_of_a_folder_manifest_stores_its_report_column(tiny_run, radiographs, tmp_path,
                                                                 capsys):
    """`cxr index RUN folder:DIR,manifest.csv`: the report column reaches the archive, and
    similar-image hits carry their reports (case histories)."""
    import shutil

    from cxr.cli import main

    folder = tmp_path / "pacs"
    folder.mkdir()
    for png in radiographs[:3]:
        shutil.copy(png, folder / png.name)
    names_ = [p.name for p in radiographs[:3]]
    (folder / "manifest.csv").write_text(
        "path,report\n"
        f'{names_[0]},"Large right pneumothorax. No effusion."\n'
        f'{names_[1]},"<div>Heart size normal &amp; lungs clear.</div>"\n'
        f"{names_[2]},\n")
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert main(["index", str(tiny_run), f"folder:{folder},manifest.csv", "--db", db, "--quiet",
                 "--force"]) == 0
    capsys.readouterr()
    assert main(["search", "--db", db, "--report", "pneumothorax", "--json"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)
    assert hit["path"].endswith(names_[0]) and hit["report"].startswith("FINDINGS: Large right")
    mined = {(f["disease"], f["certainty"], f["side"]) for f in hit["report_findings"]}
    assert ("Pneumothorax", "positive", "right") in mined
    assert ("Pleural Effusion", "negative", None) in mined
    with Archive(db) as archive:
        reports = {h.path.rsplit("/", 1)[-1]: h for h in archive.similar(image_id=hit["id"], k=5)}
    assert reports[names_[1]].report == "FINDINGS: Heart size normal & lungs clear."
    assert "markup removed" in reports[names_[1]].report_note
    assert reports[names_[2]].report is None


def test_mined_mentions_keep_their_place_in_the_text(archive):
    """Each mention's offsets mark its words in the stored text (what the web page highlights),
    through the miner's sentence splitting, sections in any order, and a phrase of two headings."""
    agree = archive.get(archive.ids["agree_effusion"])
    marked = [(f["disease"], agree.report[slice(*f["span"])]) for f in agree.report_findings
              if f["span"]]
    assert marked == [("Pleural Effusion", "pleural effusion"), ("Pleural Effusion", "effusion")]
    assert agree.report.index("effusion.", 30) < agree.report_findings[1]["span"][0]  # IMPRESSION
    cardio = archive.get(archive.ids["markup_cardio"])
    (span,) = [f["span"] for f in cardio.report_findings if f["disease"] == "Cardiomegaly"]
    assert cardio.report[slice(*span)] == "cardiomegaly"

    report = prepare_report({"IMPRESSION": "Possible pneumonia.",
                             "FINDINGS": "Small effusion.There is a calcified nodule.. No "
                                         "pneumothorax."})
    mine_reports([report])
    got = [(f.disease, f.certainty, report.text[s[0]:s[1]] if s else None)
           for f, s in zip(report.findings, report.spans)]
    assert ("Pleural Effusion", "positive", "effusion") in got
    assert ("Nodule", "positive", "calcified nodule") in got
    assert ("Calcinosis", "positive", "calcified nodule") in got
    assert ("Pneumothorax", "negative", "pneumothorax") in got
    assert ("Pneumonia", "uncertain", "pneumonia") in got
    (pneumonia,) = [s for f, s in zip(report.findings, report.spans) if f.disease == "Pneumonia"]
    assert report.text.index("IMPRESSION") < pneumonia[0] < report.text.index("FINDINGS")


def test_an_archive_of_schema_0003_gains_mention_offsets_keeping_its_rows(tmp_path):
    from sqlalchemy import text

    from cxr.testing import archive_migrated

    url = f"sqlite:///{tmp_path / 'old.db'}"
    with archive_migrated(url, "0003") as conn:
        conn.execute(text("insert into images (id, sha256, model_id, path, status, indexed_at) "
                          "values (1, '" + "a" * 64 + "', 'm', '/old.png', 'ok', '2026-01-01')"))
        conn.execute(text("insert into reports (image_id, text) values (1, 'FINDINGS: Effusion.')"))
        conn.execute(text("insert into report_findings (image_id, disease, label_key, certainty, "
                          "location) values (1, 'Pleural Effusion', 'pleural effusion', "
                          "'positive', '')"))
    with Archive(url) as upgraded:
        old = upgraded.get(1)
        assert old.report == "FINDINGS: Effusion." and old.report_findings[0]["span"] is None
        assert [h.id for h in upgraded.search(report="effusion")] == [1]
    with archive_migrated(url, "0003", down=True) as conn:  # and back down
        assert conn.execute(text("select count(*) from report_findings")).scalar() == 1


def test_mention_offsets_on_real_open_i_reports(shared_data):
    """On 300 real Open-i reports (glued sentences, doubled periods, "XXXX" de-identification):
    every mined mention's offsets hold its words, inside its own sentence."""
    import re

    from cxr.sources import read_openi

    studies = read_openi(shared_data / "openi" / "NLMCXR_reports.tgz", gate=False)[:300]
    reports = [r for r in (prepare_report(s.report) for s in studies) if r and not r.refused]
    mine_reports(reports)
    checked = 0
    for r in reports:
        keep = [i for i, c in enumerate(r.text) if not c.isspace() and c != "."]
        squeezed = "".join(r.text[i] for i in keep)  # sentences as the miner split them, loosely
        for f, span in zip(r.findings, r.spans):
            if f.source != "text" or not f.raw:
                assert span is None
                continue
            assert r.text[span[0]:span[1]] == f.raw
            sentence = "".join(c for c in f.sentence if not c.isspace() and c != ".")
            assert any(keep[m.start()] <= span[0] and span[1] - 1 <= keep[m.end() - 1]
                       for m in re.finditer(re.escape(sentence), squeezed)), (r.text, f)
            checked += 1
    assert checked > 1000
