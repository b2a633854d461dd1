"""The archive's database, queries, vector index and DICOM output, on Result objects built here
(the layer below the Reader: these are the real values the archive stores)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import text

from cxr.archive.db import HEAD_REVISION, MIGRATIONS, Archive, Entry
from cxr.archive.vectors import VectorIndex, brute_force, normalise
from cxr.errors import CxrError
from cxr.records import Box
from cxr.results import DetectedFinding, Result

MODEL = "tiny-test-model"


def finding(disease, score, side=None, location=(), severity=None, organ="lung", boxes=()):
    words = [disease.lower(), organ, *location, side, severity]
    return DetectedFinding(disease, score, " ".join(w for w in words if w), organ, tuple(location),
                           side, severity, list(boxes))


def result(findings, embedding, scores=None):
    scores = dict(scores or {})
    for f in findings:
        scores.setdefault(f.disease, f.score)
    return Result(scores=scores, findings=findings, embedding=np.asarray(embedding, np.float32),
                  model_id=MODEL, image_size=(256, 256))


def finding_of_old_archive(tmp_path, revision: str, **columns):
    """The one finding of an archive written at schema `revision` (an image row and a finding row
    of Opacity with `columns` set beside the required ones), as today's `Archive` reads it after
    upgrading the file."""
    from cxr.testing import archive_migrated

    url = f"sqlite:///{tmp_path / f'v{revision}.db'}"
    row = {"image_id": 1, "disease": "Opacity", "disease_key": "opacity", "score": 0.7,
           "annotation": "opacity left", "location": "", **columns}
    with archive_migrated(url, revision) as conn:
        conn.execute(text("insert into images (sha256, model_id, path, status, indexed_at) values "
                          "('" + "a" * 64 + "', 'm', '/old.png', 'ok', '2026-01-01')"))
        conn.execute(text(f"insert into findings ({', '.join(row)}) values ({', '.join(':' + k for k in row)})"),
                     row)
    upgraded = Archive(url)
    try:
        return upgraded.get(1).findings[0]
    finally:
        upgraded.close()



# A small archive whose answers are known: image i -> its findings.
CASES = {
    "left_base_moderate": [finding("Opacity", 0.9, "left", ("base",), "moderate",
                                   boxes=[Box("Opacity", 20, 150, 60, 50)])],
    "left_base_mild": [finding("Opacity", 0.7, "left", ("base",), "mild")],
    "right_upper": [finding("Opacity", 0.8, "right", ("upper lobe",), "moderate")],
    "effusion_and_opacity": [finding("Pleural Effusion", 0.6, "right", (), "small"),
                             finding("Opacity", 0.55, "left", ("base",), "moderate")],
    "cardiomegaly": [finding("Cardiomegaly", 0.75, None, (), "mild", organ="heart")],
    "normal": [],
}


@pytest.fixture
def archive(tmp_path):
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(size=32) for name in CASES}
    a = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    entries = [Entry(f"/data/{name}.png", f"{i:064x}", MODEL,
                     result=result(fs, centres[name], scores={"Cardiomegaly": 0.1 * i}))
               for i, (name, fs) in enumerate(CASES.items())]
    entries.append(Entry("/data/broken.png", "f" * 64, MODEL, error="cannot decode image"))
    ids = a.add_results(entries)
    a.ids = dict(zip([*CASES, "broken"], ids))
    a.centres = centres
    yield a
    a.close()


def names(archive, hits):
    by_id = {v: k for k, v in archive.ids.items()}
    return [by_id[h.id] for h in hits]


def test_an_archive_of_the_first_schema_is_upgraded_keeping_its_rows(tmp_path):
    """0001 -> 0002 adds images.quality (the gate's report); rows indexed before keep theirs NULL."""
    from cxr.testing import archive_migrated

    url = f"sqlite:///{tmp_path / 'old.db'}"
    with archive_migrated(url, "0001") as conn:
        conn.execute(text("insert into images (sha256, model_id, path, status, indexed_at) values "
                          "('" + "a" * 64 + "', 'm', '/old.png', 'failed', '2026-01-01')"))
    archive = Archive(url)
    with archive.engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == HEAD_REVISION
    (old,) = archive.search(status="failed")
    assert old.path == "/old.png" and old.quality is None
    assert archive.add_results([Entry("/new.png", "b" * 64, MODEL, result=result([], np.ones(4)))])
    archive.close()


def test_schema_comes_from_the_migration_and_survives_reopening(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first = Archive(url)
    with first.engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == HEAD_REVISION
    first.close()
    again = Archive(url)
    assert again.uuid == first.uuid and again.count() == 0
    from alembic.script import ScriptDirectory
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION
    memory = Archive("sqlite://")
    assert memory.add_results([Entry("/m.png", "a" * 64, MODEL, result=result([], np.ones(4)))])
    assert memory.similar(embedding=np.ones(4), k=1)[0].path == "/m.png"
    with pytest.raises(CxrError, match="folder"):
        Archive(f"sqlite:///{tmp_path / 'missing' / 'a.db'}")
    with pytest.raises(CxrError, match="URL"):
        Archive("not a url")


def test_the_annotators_word_confidence_is_stored_with_the_finding(archive, tmp_path):
    """Each finding keeps how sure the annotator was of its side, site and grade words
    (migration 0005); a finding without them reads back an empty mapping, and an archive
    of schema 0004 is upgraded with its findings kept."""
    sure = finding("Opacity", 0.9, "left", ("base",), "moderate")
    sure.confidence = {"side": 0.83, "location": 0.61, "severity": 0.5}
    (new,) = archive.add_results([Entry("/data/sure.png", "c" * 64, MODEL, result=result([sure], np.ones(32)))])
    assert archive.get(new).findings[0].confidence == {"side": 0.83, "location": 0.61, "severity": 0.5}
    assert archive.get(archive.ids["left_base_mild"]).findings[0].confidence == {}
    assert result([sure], np.ones(4)).to_dict()["findings"][0]["confidence"]["side"] == 0.83

    old = finding_of_old_archive(tmp_path, "0004", side="left")
    assert old.side == "left" and old.confidence == {}


def test_what_was_measured_is_stored_with_the_finding(archive, tmp_path):
    """A finding's measurements (Cardiomegaly's cardiothoracic ratio) are kept (migration 0006)
    and survive the JSON form the Ray indexer passes; an archive of schema 0005 is upgraded with
    its findings and their word confidence kept."""
    from cxr.archive.index import result_from_dict

    big = finding("Cardiomegaly", 0.9, None, (), "mild")
    big.measurements = {"cardiothoracic_ratio": 0.56}
    (new,) = archive.add_results([Entry("/data/big.png", "d" * 64, MODEL, result=result([big], np.ones(32)))])
    assert archive.get(new).findings[0].measurements == {"cardiothoracic_ratio": 0.56}
    assert archive.get(archive.ids["left_base_mild"]).findings[0].measurements == {}
    back = result_from_dict(result([big], np.ones(4)).to_dict())
    assert back.findings[0].measurements == {"cardiothoracic_ratio": 0.56}

    old = finding_of_old_archive(tmp_path, "0005", side="left", confidence='{"side": 0.8}')
    assert old.side == "left" and old.confidence == {"side": 0.8} and old.measurements == {}


def test_why_a_number_is_missing_is_stored_with_the_finding(archive, tmp_path):
    """A finding's notes (no cardiothoracic ratio on an AP film) are kept (migration 0007) and
    survive the Ray indexer's JSON form; an archive of schema 0006 is upgraded with its
    measurements kept and no notes."""
    from cxr.archive.index import result_from_dict
    from cxr.reader import NO_RATIO_ON_AP

    big = finding("Cardiomegaly", 0.9, None, (), "mild")
    big.notes = [NO_RATIO_ON_AP]
    (new,) = archive.add_results([Entry("/data/ap.png", "c" * 64, MODEL, result=result([big], np.ones(32)))])
    assert archive.get(new).findings[0].notes == [NO_RATIO_ON_AP]
    assert archive.get(archive.ids["left_base_mild"]).findings[0].notes == []
    assert result_from_dict(result([big], np.ones(4)).to_dict()).findings[0].notes == [NO_RATIO_ON_AP]

    old = finding_of_old_archive(tmp_path, "0006", disease="Cardiomegaly", disease_key="cardiomegaly",
                                 annotation="cardiomegaly mild", measurements='{"cardiothoracic_ratio": 0.55}')
    assert old.measurements == {"cardiothoracic_ratio": 0.55} and old.notes == []


def test_a_batch_stored_twice_is_stored_once_and_failures_keep_their_reason(archive):
    assert archive.count() == 7 and archive.count(status="failed") == 1
    again = archive.add_results([Entry("/elsewhere/copy.png", f"{0:064x}", MODEL,
                                       result=result([], np.ones(32)))])
    assert again == [None] and archive.count() == 7
    failed = archive.search(status="failed")
    assert [(h.path, h.reason) for h in failed] == [("/data/broken.png", "cannot decode image")]
    assert archive.indexed([f"{0:064x}", "e" * 64], MODEL) == {f"{0:064x}"}
    # a retry replaces the failed row instead of colliding with it
    archive.add_results([Entry("/data/broken.png", "f" * 64, MODEL, result=result([], np.ones(32)))],
                        replace_failed=True)
    assert archive.count(status="failed") == 0 and archive.count() == 7


def test_structured_search(archive):
    hits = archive.search("opacity left base", severity="moderate")
    assert names(archive, hits) == ["left_base_moderate", "effusion_and_opacity"]
    assert hits[0].score == pytest.approx(0.9) and hits[0].findings[0].boxes[0].w == 60
    assert names(archive, archive.search("opacity left basal")) == [
        "left_base_moderate", "left_base_mild", "effusion_and_opacity"]
    assert names(archive, archive.search(finding="Opacity", side="left", location="base",
                                         min_score=0.6)) == ["left_base_moderate", "left_base_mild"]
    assert names(archive, archive.search("opacity upper lobe")) == ["right_upper"]
    # a word of a disease finds it; combinations must hold on the same image
    assert names(archive, archive.search("effusion")) == ["effusion_and_opacity"]
    assert names(archive, archive.search("effusion right", also=["opacity left"])) == [
        "effusion_and_opacity"]
    assert archive.search("effusion left") == []
    assert names(archive, archive.search("mild", finding="cardiomegaly")) == ["cardiomegaly"]
    # any target's score, asserted or not
    assert names(archive, archive.search(scores={"Cardiomegaly": 0.35})) == [
        "normal", "cardiomegaly"]
    assert archive.search("pneumothorax") == []
    page = archive.search("opacity", limit=2, offset=1)
    assert names(archive, page) == ["right_upper", "left_base_mild"]
    vocab = archive.vocabulary().to_dict()
    assert "Pleural Effusion" in vocab["diseases"] and "upper lobe" in vocab["locations"]


def test_similar_search_finds_neighbours_and_follows_the_database(archive, tmp_path):
    rng = np.random.default_rng(1)
    base = archive.centres["cardiomegaly"]
    near = [Entry(f"/data/near{i}.png", f"{100 + i:064x}", MODEL,
                  result=result([], base + 0.05 * rng.normal(size=32))) for i in range(3)]
    near_ids = archive.add_results(near)
    hits = archive.similar(image_id=archive.ids["cardiomegaly"], k=3)
    assert {h.id for h in hits} == set(near_ids)
    assert all(h.distance < 0.05 for h in hits)
    by_vector = archive.similar(embedding=base, k=1)
    assert by_vector[0].id == archive.ids["cardiomegaly"] and by_vector[0].distance < 1e-4
    # the saved index is picked up by another process and brought up to date incrementally
    index_file = VectorIndex.file_for(archive.vector_dir, MODEL)
    assert index_file.exists()
    later = archive.add_results([Entry("/data/late.png", f"{200:064x}", MODEL,
                                       result=result([], base + 0.01))])
    other = Archive(archive.url)
    assert other.similar(embedding=base, k=1)[0].id in (later[0], archive.ids["cardiomegaly"])
    assert len(other.sync_vectors(MODEL)) == 10
    # a database that no longer matches the file (rows gone) makes it rebuild
    with other.engine.begin() as conn:
        conn.execute(text("delete from images where id = :i"), {"i": near_ids[0]})
    third = Archive(archive.url)
    assert len(third.sync_vectors(MODEL)) == 9
    assert near_ids[0] not in {h.id for h in third.similar(image_id=archive.ids["cardiomegaly"])}
    with pytest.raises(CxrError, match="no indexed image"):
        archive.similar(image_id=12345)
    with pytest.raises(CxrError, match="no embedding"):
        archive.similar(image_id=archive.ids["broken"])


def test_vector_index_agrees_with_brute_force():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(2000, 48)).astype(np.float32)
    keys = np.arange(1, 2001)
    from cxr.archive.vectors import VectorState

    index = VectorIndex(VectorState("u", "m", 48))
    index.add(keys, data)
    queries = rng.normal(size=(20, 48)).astype(np.float32)
    recall = np.mean([len(set(index.search(q, 10)[0]) & set(brute_force(keys, normalise(data), q, 10)[0])) / 10
                      for q in queries])
    assert recall >= 0.9


def test_dicom_out_of_a_film_without_findings(tmp_path):
    """A normal (or refused) film still gets its SR: one image-level group saying no finding."""
    import highdicom as hd
    import pydicom

    from cxr.archive.dicom_out import NO_FINDING, write_result_dicom
    from cxr.dicom import write_dicom

    src = write_dicom(tmp_path / "chest.dcm", np.random.default_rng(4).random((64, 64)).astype(np.float32))
    out = write_result_dicom(result([], np.ones(8), scores={"normal": 0.9, "Opacity": 0.1}), src,
                             tmp_path / "out")
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(out["sr"]))
    (group,) = report.content.get_image_measurement_groups()
    assert group.finding_type.meaning == NO_FINDING
    assert group.get_measurements()[0].value == pytest.approx(0.9)
    assert not report.content.get_planar_roi_measurement_groups()


def test_dicom_out_sr_and_overlay_read_back(tmp_path):
    import highdicom as hd
    import pydicom

    from cxr.archive.dicom_out import write_result_dicom
    from cxr.dicom import write_dicom
    from cxr.reader import NO_RATIO_ON_AP

    pixels = np.random.default_rng(3).random((128, 128)).astype(np.float32)
    src = write_dicom(tmp_path / "chest.dcm", pixels, extra={"PatientName": "Doe^Jane"})
    src_ds = pydicom.dcmread(src)
    res = result([finding("Opacity", 0.8, "left", ("base",), "moderate",
                          boxes=[Box("Opacity", 10, 20, 30, 40)]),
                  finding("Cardiomegaly", 0.6, None, (), "mild", organ="heart")], np.ones(8))
    res.findings[1].measurements = {"cardiothoracic_ratio": 0.58}
    res.findings.append(finding("Cardiomegaly", 0.7, None, (), "moderate", organ="heart"))
    res.findings[2].notes = [NO_RATIO_ON_AP]  # a second film's finding, in the same report here
    res.heatmaps = {"Opacity": np.pad(np.ones((40, 30), np.float32), ((20, 68), (10, 88)))}
    out = write_result_dicom(res, src, tmp_path / "out")
    sr = pydicom.dcmread(out["sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == src_ds.StudyInstanceUID
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (roi,) = report.content.get_planar_roi_measurement_groups()
    assert roi.finding_type.meaning == "Opacity"
    assert roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src_ds.SOPInstanceUID
    assert roi.roi.value.tolist() == [[10, 20], [40, 20], [40, 60], [10, 60], [10, 20]]
    evaluations = {e.name.meaning: e.value.meaning for e in roi.get_qualitative_evaluations()}
    assert evaluations == {"Laterality": "Left", "Severity": "Moderate"}
    assert roi.get_measurements()[0].value == pytest.approx(0.8)
    assert str(roi.tracking_identifier) == "opacity lung base left moderate"
    image_level, unmeasured = report.content.get_image_measurement_groups()
    assert image_level.finding_type.meaning == "Cardiomegaly"
    measured = {m.name.meaning: m.value for m in image_level.get_measurements()}
    assert measured["cardiothoracic ratio"] == pytest.approx(0.58)
    # the finding without a ratio says why, as a Comment of its group (and nowhere else)
    def comments(group):
        return [item.TextValue for item in group[0].ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments(unmeasured) == [NO_RATIO_ON_AP] and comments(image_level) == []
    assert "cardiothoracic ratio 0.58" in pydicom.dcmread(out["overlay"]).ImageComments
    assert NO_RATIO_ON_AP in pydicom.dcmread(out["overlay"]).ImageComments
    sc = pydicom.dcmread(out["overlay"])
    assert sc.StudyInstanceUID == src_ds.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
    rgb = sc.pixel_array
    assert rgb.shape == (128, 128, 3)
    assert tuple(rgb[20, 25]) == (255, 230, 0)  # box edge burned in
    assert rgb[40, 25, 0] > rgb[40, 25, 2] + 40  # heatmap tints red inside the box
    # a PNG input gets its own Secondary Capture so the SR has an image to point at
    from PIL import Image

    Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / "chest.png")
    out = write_result_dicom(res, tmp_path / "chest.png", tmp_path / "out2")
    source = pydicom.dcmread(out["source"])
    sr = pydicom.dcmread(out["sr"])
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    roi = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()[0]
    assert roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_cli_search_prints_json(archive, capsys):
    from cxr.cli import main

    assert main(["search", "opacity left base", "--severity", "moderate", "--db", archive.url,
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["path"] for h in hits] == ["/data/left_base_moderate.png",
                                         "/data/effusion_and_opacity.png"]
    assert hits[0]["findings"][0]["boxes"][0]["x"] == 20
    assert main(["search", "--like-id", str(archive.ids["cardiomegaly"]), "--db", archive.url,
                 "--limit", "2"]) == 0
    assert "distance" in capsys.readouterr().out
    assert main(["search", "--failed", "--db", archive.url]) == 0
    assert "cannot decode image" in capsys.readouterr().out
    assert main(["search", "--like-id", "999", "--db", archive.url]) == 2
    assert "no indexed image with id 999" in capsys.readouterr().err
