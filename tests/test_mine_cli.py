"""`cxr mine` on real Open-i XML: JSON per report id, read back; clear errors on bad input."""
from __future__ import annotations

import json
import tarfile

import pytest

from cxr.atomic import TEMP_PREFIX
from cxr.cli import main
from cxr.records import Finding

IDS = ("1792", "3029", "2358", "3154", "1056")


@pytest.fixture(scope="module")
def xml_folder(shared_data, tmp_path_factory):
    """Five real report XML files, extracted from the Open-i tgz into a plain folder."""
    folder = tmp_path_factory.mktemp("openi_xml")
    wanted = {f"ecgen-radiology/{i}.xml" for i in IDS}
    with tarfile.open(shared_data / "openi" / "NLMCXR_reports.tgz") as tf:
        for member in tf:
            if member.name in wanted:
                (folder / member.name.split("/")[-1]).write_bytes(tf.extractfile(member).read())
    assert len(list(folder.glob("*.xml"))) == len(IDS)
    return folder


def test_mine_folder_writes_json(xml_folder, tmp_path, capsys):
    out = tmp_path / "mined" / "findings.json"
    assert main(["mine", str(xml_folder), "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "micro average" in printed and "Pleural Effusion" in printed

    data = json.loads(out.read_text())
    assert data["n_reports"] == len(IDS)
    assert set(data["reports"]) == {f"CXR{i}" for i in IDS}
    report = data["reports"]["CXR1792"]
    mesh = [Finding.from_dict(d) for d in report["mesh"]]
    text = [Finding.from_dict(d) for d in report["text"]]
    assert {f.source for f in mesh} == {"mesh"} and {f.source for f in text} == {"text"}
    assert "Pleural Effusion/left/small" in {f.raw for f in mesh}
    said = "Small left pleural effusion with left basilar atelectasis."
    effusion = [f for f in text if f.disease == "Pleural Effusion" and f.sentence == said]
    assert [(f.certainty, f.side, f.severity) for f in effusion] == [("positive", "left", "small")]
    assert said in report["report"]["IMPRESSION"]
    negated = [f for f in text if f.disease == "Pneumothorax"]
    assert negated and negated[0].certainty == "negative"
    normal = data["reports"]["CXR2358"]
    assert [f["disease"] for f in normal["text"] if f["certainty"] == "positive"] == ["normal"]
    assert not list(out.parent.glob(f"{TEMP_PREFIX}*"))


def test_mine_tgz_with_limit(shared_data, tmp_path):
    out = tmp_path / "first.json"
    tgz = shared_data / "openi" / "NLMCXR_reports.tgz"
    assert main(["mine", str(tgz), "--json", str(out), "--limit", "12", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["n_reports"] == 12 and len(data["reports"]) == 12


@pytest.mark.parametrize("make", ["missing", "empty_folder", "not_a_tgz", "bad_xml"])
def test_bad_reports_path_is_one_clear_error(tmp_path, capsys, make):
    if make == "missing":
        path = tmp_path / "nowhere.tgz"
    elif make == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif make == "not_a_tgz":
        path = tmp_path / "reports.tgz"
        path.write_bytes(b"this is not a tar file")
    else:
        path = tmp_path / "xml"
        path.mkdir()
        (path / "1.xml").write_text("<eCitation><uId id='CXR1'/><MeSH>")
    assert main(["mine", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxr mine: error:") and str(path) in err
    assert "Traceback" not in err


def test_default_reports_come_from_the_data_cache(shared_data, tmp_path):
    """No REPORTS: the cached Open-i tgz (the test cache is the shared data folder, offline)."""
    out = tmp_path / "default.json"
    assert main(["mine", "--json", str(out), "--limit", "3", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["source"].endswith("NLMCXR_reports.tgz")
    assert list(data["reports"]) == ["CXR1", "CXR2", "CXR3"]


def test_mine_one_text(capsys, tmp_path):
    out = tmp_path / "one.json"
    assert main(["mine", "--text", "Small left effusion. No pneumothorax.", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Pleural Effusion | positive | left |" in printed
    found = json.loads(out.read_text())["findings"]
    assert [(f["disease"], f["certainty"]) for f in found] == [
        ("Pleural Effusion", "positive"), ("Pneumothorax", "negative")]


def test_unusable_json_or_limit_is_refused_before_mining(xml_folder, tmp_path, capsys):
    """A folder as --json, or --limit below 1, is one line up front (no mining, no temporary file left)."""
    from cxr.cli import main

    assert main(["mine", str(xml_folder), "--json", str(tmp_path), "--quiet"]) == 2
    assert main(["labels", str(xml_folder), "--json", str(tmp_path)]) == 2
    assert main(["mine", str(xml_folder), "--limit", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("is a folder: --json needs a file name") == 2
    assert "--limit must be at least 1" in err and "Traceback" not in err
    assert not list(tmp_path.parent.glob(f"{TEMP_PREFIX}*"))
