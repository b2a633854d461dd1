"""Source adapters (Open-i, NIH, folder, phantom), `open_source` specs and patient splits, on
the real Open-i reports, the real NIH box images, and small folders written here."""
from __future__ import annotations

import csv
import gzip
import io
import tarfile

import numpy as np
import pytest
from PIL import Image as PILImage

from cxr.errors import CxrError
from cxr.sources import open_source, read_folder, read_nih, read_openi, read_phantom
from cxr.splits import split_by_patient, split_summary

REPORT_IDS = ("1", "10", "1776")


@pytest.fixture(scope="module")
def openi(shared_data):
    return read_openi(shared_data / "openi" / "NLMCXR_reports.tgz")


def _members(shared_data, ids=REPORT_IDS) -> dict[str, bytes]:
    with tarfile.open(shared_data / "openi" / "NLMCXR_reports.tgz") as tf:
        return {i: tf.extractfile(f"ecgen-radiology/{i}.xml").read() for i in ids}


def _png(path, size=(64, 48), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


@pytest.fixture()
def openi_folder(shared_data, tmp_path):
    """The layout `cxr simulate` writes: ecgen-radiology/, images/, metadata CSV."""
    out = tmp_path / "sim"
    (out / "ecgen-radiology").mkdir(parents=True)
    for i, data in _members(shared_data).items():
        (out / "ecgen-radiology" / f"{i}.xml").write_bytes(data)
    _png(out / "images" / "CXR1_1_IM-0001-3001.png")
    (out / "images" / "CXR1_1_IM-0001-4001.dcm").write_bytes(b"")  # found by name only
    _png(out / "images" / "sub" / "10_IM-0002-1001.png")  # Shin-style name, nested
    with open(out / "nlmcxr_dicom_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["imageid", "View Position"])
        w.writerows([["CXR1_1_IM-0001-3001", "PA"], ["CXR1_1_IM-0001-4001", "LL"],
                     ["CXR10_IM-0002-1001", ""]])
    return out


# --- Open-i ---

def test_openi_tgz(openi, shared_data):
    assert len(openi) == 3955 and sum(len(s.images) for s in openi) == 7470
    s = {x.id: x for x in openi}["CXR10"]
    assert s.patient_id == "CXR10" and s.source == "openi"
    assert set(s.report) == {"COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"}
    assert [f.disease for f in s.findings] == ["Calcified Granuloma"]
    assert s.findings[0].side == "right" and s.findings[0].location == ("upper lobe",)
    assert s.meta["automatic"] and s.meta["indexed"]
    views = [im.view for x in openi for im in x.images]
    assert views.count("PA") == 3591 and views.count("LL") == 717  # metadata found beside tgz
    codes = [(im.view, im.meta.get("processing_code")) for x in openi for im in x.images]
    assert codes.count(("PA", "60025")) == 1352 and codes.count(("PA", "60003")) == 1360
    unindexed = [x for x in openi if not x.meta["indexed"]]
    assert len(unindexed) == 95 and all(not x.findings for x in unindexed)
    assert len({x.patient_id for x in openi}) == 3955


def test_openi_views_from_the_whole_header(openi):
    """Laterals tagged PA and views of images with an empty View Position, from the real metadata
    (cxr/sources/openi_views.py gives the measured evidence for each rule)."""
    import collections

    images = [im for s in openi for im in s.images]
    by = collections.Counter((im.view, im.meta["view_class"]) for im in images)
    assert by[("PA", "lateral")] == 1361 and by[("PA", "frontal")] == 2230
    code_60003 = [im for im in images if im.meta.get("processing_code") == "60003"]
    assert len(code_60003) == 1366 and all(not im.frontal for im in code_60003)
    assert all(im.meta["view_class"] == "lateral" for im in images
               if im.view in ("LL", "RL", "LATERAL", "LARGE LATERAL"))
    empty = [im for im in images if im.view is None]
    decided = collections.Counter(im.meta["view_class"] for im in empty)
    assert len(empty) == 2589 and decided["lateral"] == 1164 and decided["frontal"] == 1116
    assert sum(im.frontal for im in images) == 2230 + 422 + 1116 + decided[None]
    one = {im.id: im for im in images}["CXR1000_IM-0003-2001"]  # PA in the header, 60003
    assert one.view == "PA" and one.meta["view_evidence"] == "processing code 60003" and not one.frontal


def test_openi_view_rules_agree_with_the_header_where_it_is_known(shared_data, openi):
    """Hide View Position where it is PA/AP/lateral (60003/60025 aside: their PA is the value in
    question) and decide from the rest of the header: the rules must agree with it."""
    from cxr.sources.openi import read_headers
    from cxr.sources.openi_views import agreement_when_hidden

    headers = read_headers(shared_data / "openi" / "nlmcxr_dicom_metadata.csv.gz")
    agree, disagree = agreement_when_hidden(openi, headers)
    assert agree >= 1500 and disagree / (agree + disagree) < 0.01, (agree, disagree)


def test_the_gate_decides_open_i_views_the_header_leaves_open(openi_folder, nih_sample):
    """CXR10's two images: an empty View Position, and no metadata row at all. With their files
    present (a real frontal film, a phantom lateral) the quality gate's model decides."""
    from cxr.images import load_image
    from cxr.phantom.render import Phantom

    film = load_image(sorted((nih_sample / "images").glob("*.png"))[0])
    lateral = Phantom.load().render([], seed=5, size=128, view="lateral").image
    for name, pixels in (("sub/10_IM-0002-1001.png", film), ("CXR10_IM-0002-2001.png", lateral)):
        PILImage.fromarray((pixels * 255).round().astype(np.uint8)).save(openi_folder / "images" / name)
    before = {im.id: im for s in read_openi(openi_folder, gate=False) for im in s.images}
    assert before["CXR10_IM-0002-1001"].meta["view_class"] is None
    assert before["CXR10_IM-0002-2001"].meta["view_evidence"] == "no header in the metadata"
    images = {im.id: im for s in read_openi(openi_folder) for im in s.images}
    frontal, side = images["CXR10_IM-0002-1001"], images["CXR10_IM-0002-2001"]
    assert frontal.view is None and frontal.meta["view_class"] == "frontal" and frontal.frontal
    assert side.meta["view_class"] == "lateral" and not side.frontal
    assert side.meta["view_evidence"].startswith("quality gate (p ")
    assert images["CXR1_1_IM-0001-4001"].meta["view_evidence"] == "View Position LL"


def test_openi_folder_layout_images_and_views(openi_folder, shared_data):
    studies = read_openi(openi_folder)
    assert [s.id for s in studies] == ["CXR1", "CXR10", "CXR1776"]
    ims = {im.id: im for s in studies for im in s.images}
    assert ims["CXR1_1_IM-0001-3001"].path.name == "CXR1_1_IM-0001-3001.png"
    assert ims["CXR1_1_IM-0001-3001"].view == "PA"
    assert ims["CXR1_1_IM-0001-4001"].path.suffix == ".dcm" and ims["CXR1_1_IM-0001-4001"].view == "LL"
    assert ims["CXR10_IM-0002-1001"].path.name == "10_IM-0002-1001.png"
    assert ims["CXR10_IM-0002-1001"].view is None
    assert ims["CXR10_IM-0002-2001"].path is None
    # a folder holding the release tgz, with the PNG release's file names under images/
    home = openi_folder.parent / "home"
    (home / "images").mkdir(parents=True)
    (home / "NLMCXR_reports.tgz").symlink_to(shared_data / "openi" / "NLMCXR_reports.tgz")
    _png(home / "images" / "CXR1000_IM-0003-1001.png")
    found = [im for s in open_source(f"openi:{home}") for im in s.images if im.path]
    assert [im.id for im in found] == ["CXR1000_IM-0003-1001"]
    # a folder of bare XML files works too
    assert [s.id for s in read_openi(openi_folder / "ecgen-radiology")] == ["CXR1", "CXR10", "CXR1776"]


def test_openi_bad_inputs(shared_data, tmp_path):
    with pytest.raises(CxrError, match="not found"):
        read_openi(tmp_path / "NLMCXR_reports.tgz")
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"\x1f\x8b\x08 this is not gzip")
    with pytest.raises(CxrError, match="tar archive") as e:
        read_openi(bad)
    assert str(bad) in str(e.value)
    # a tgz with one malformed member names the member
    tgz = tmp_path / "reports.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in [("ecgen-radiology/1.xml", _members(shared_data, ("1",))["1"]),
                           ("ecgen-radiology/2.xml", b"<eCitation><uId id='CXR2'/>")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(CxrError, match="malformed XML in report ecgen-radiology/2.xml"):
        read_openi(tgz)
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "5.xml").write_text("<eCitation><title>no id</title></eCitation>")
    with pytest.raises(CxrError, match="no <uId"):
        read_openi(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CxrError, match="no Open-i reports here"):
        read_openi(empty)
    meta = tmp_path / "meta.csv"
    meta.write_text("imageid,Rows\nCXR1,3\n")
    with pytest.raises(CxrError, match="View Position"):
        read_openi(shared_data / "openi" / "NLMCXR_reports.tgz", metadata=meta)


# --- NIH ---

def test_nih_boxes_scaled_to_real_256_images(nih_sample):
    d = nih_sample
    assert len(open_source(f"nih:{d}")) == 656
    studies = read_nih(d / "Data_Entry_2017_v2020.csv", d / "BBox_List_2017.csv", d / "images")
    assert len(studies) == 656 and all(s.images[0].path.is_file() for s in studies)
    official = read_nih(d / "Data_Entry_2017_v2020.csv", d / "BBox_List_2017.csv")  # no images
    assert all(s.images[0].path is None for s in official)
    by_id = {s.id: s for s in official}
    n_boxes = 0
    for s in studies:
        im = s.images[0]
        assert im.meta["box_frame"] == (256, 256) or not im.boxes
        for box, ref in zip(im.boxes, by_id[s.id].images[0].boxes, strict=True):
            assert box.label == ref.label
            assert np.allclose([box.x, box.y, box.w, box.h], np.array([ref.x, ref.y, ref.w, ref.h]) / 4)
            n_boxes += 1
    assert n_boxes == 731
    s = by_id["00000072_000"]
    assert s.patient_id == "72" and s.meta["age"] == 67 and s.meta["sex"] == "F"
    assert s.images[0].view == "PA" and s.images[0].meta["original_size"] == (2450, 2839)
    labels = {b.label for x in official for b in x.images[0].boxes}
    assert "Infiltration" in labels and "Infiltrate" not in labels


def test_nih_any_size_gz_and_normal(nih_sample, tmp_path):
    d = nih_sample
    with open(d / "Data_Entry_2017_v2020.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    keep = rows[0:1] + rows[1:4]
    keep[3][1] = "No Finding"
    with gzip.open(tmp_path / "Data_Entry_2017.csv.gz", "wt", newline="") as fh:
        csv.writer(fh).writerows(keep)
    names = [r[0] for r in keep[1:]]
    boxes = tmp_path / "BBox_List_2017.csv.gz"
    with gzip.open(boxes, "wt", newline="") as fh:
        fh.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        fh.write(f"{names[0]},Infiltrate,512,256,100,200\n")
    (tmp_path / "images").mkdir()
    for n in names:  # a non-square copy, 512 wide x 384 high
        PILImage.open(d / "images" / n).convert("L").resize((512, 384)).save(tmp_path / "images" / n)
    studies = open_source(f"nih:{tmp_path}")
    assert [s.id for s in studies] == [n[:-4] for n in names]
    box = studies[0].images[0].boxes[0]
    assert (box.label, box.x, box.y, box.w, box.h) == ("Infiltration", 256, 96, 50, 75)
    assert studies[2].findings[0].disease == "normal" and studies[2].findings[0].raw == "No Finding"
    # a DICOM copy (300 wide x 200 high): the size comes from its header
    from cxr.dicom import write_dicom

    (tmp_path / "images" / names[0]).unlink()
    write_dicom(tmp_path / "images" / (names[0][:-4] + ".dcm"), np.zeros((200, 300), np.float32))
    box = open_source(f"nih:{tmp_path}")[0].images[0].boxes[0]
    assert (box.x, box.y, box.w, box.h) == pytest.approx((150, 50, 100 * 300 / 1024, 200 * 200 / 1024))
    (tmp_path / "images" / names[1]).unlink()  # a missing image drops its row
    assert len(read_nih(tmp_path / "Data_Entry_2017.csv.gz", images=tmp_path / "images")) == 2


def test_nih_bad_inputs(tmp_path):
    with pytest.raises(CxrError, match="not found"):
        read_nih(tmp_path / "Data_Entry_2017.csv")
    bad = tmp_path / "Data_Entry_2017.csv"
    bad.write_text("Image Index,Labels\nx.png,Mass\n")
    with pytest.raises(CxrError, match="Finding Labels"):
        read_nih(bad)
    bad.write_text("Image Index,Finding Labels,Patient ID\nx.png,Mass,1\n")
    boxes = tmp_path / "BBox_List_2017.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nx.png,Mass,1,2,three,4\n")
    with pytest.raises(CxrError, match="line 2: bad box numbers"):
        read_nih(bad, boxes)
    boxes.write_text("name,label\n")
    with pytest.raises(CxrError, match="not a BBox_List file"):
        read_nih(bad, boxes)
    (tmp_path / "images").mkdir()
    with pytest.raises(CxrError, match="no NIH label file"):
        open_source(f"nih:{tmp_path / 'images'}")


# --- folder + manifest ---

def test_folder_with_and_without_manifest(tmp_path):
    for name in ("p1/a.png", "p1/b.png", "p2/c.png", "p3/d.png"):
        _png(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    bare = read_folder(tmp_path)
    assert [s.id for s in bare] == ["p1/a", "p1/b", "p2/c", "p3/d"]
    assert all(not s.meta["labelled"] and not s.findings for s in bare)
    (tmp_path / "manifest.csv").write_text(
        "path,patient_id,labels,view,report,study_id,site\n"
        'p1/a.png,P001,Pleural Effusion/right/small|Cardiomegaly,PA,"Small right effusion.",S1,A\n'
        "p1/b.png,P001,Pleural Effusion/right/small|Cardiomegaly,LL,,S1,A\n"
        "p2/c.png,P002,normal,AP,,,B\n"
        "p3/d.png,P003,,,,,B\n")
    studies = open_source(f"folder:{tmp_path},manifest.csv")
    assert [s.id for s in studies] == ["S1", "p2/c", "p3/d"]
    s1 = studies[0]
    assert [im.view for im in s1.images] == ["PA", "LL"] and s1.report == {"FINDINGS": "Small right effusion."}
    assert [(f.disease, f.side, f.severity) for f in s1.findings] == [
        ("Pleural Effusion", "right", "small"), ("Cardiomegaly", None, None)]
    assert s1.meta == {"labelled": True, "site": "A"} and s1.findings[0].source == "label"
    assert studies[1].normal and studies[1].meta["labelled"]
    assert not studies[2].meta["labelled"]


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(CxrError, match="image folder not found"):
        read_folder(tmp_path / "nope")
    with pytest.raises(CxrError, match="no images"):
        read_folder(tmp_path)
    _png(tmp_path / "a.png")
    with pytest.raises(CxrError, match="manifest CSV not found"):
        read_folder(tmp_path, "m.csv")
    (tmp_path / "m.csv").write_text("file,labels\na.png,normal\n")
    with pytest.raises(CxrError, match="needs a 'path' column"):
        read_folder(tmp_path, "m.csv")
    (tmp_path / "m.csv").write_text("path,labels\na.png,normal\nb.png,normal\n")
    with pytest.raises(CxrError, match="m.csv:3: image listed in the manifest not found"):
        read_folder(tmp_path, "m.csv")


# --- phantom and specs ---

def test_phantom_folder_gets_boxes(openi_folder):
    with open(openi_folder / "BBox_List_2017.csv", "w") as fh:
        fh.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        fh.write("CXR10_IM-0002-1001.png,Calcified Granuloma/lung/upper lobe/right,10,12,5,6\n")
    for spec in (f"phantom:{openi_folder}", str(openi_folder)):
        studies = open_source(spec)
        assert all(s.source == "phantom" for s in studies)
        ims = {im.id: im for s in studies for im in s.images}
        (box,) = ims["CXR10_IM-0002-1001"].boxes
        assert (box.label, box.x, box.y, box.w, box.h) == (
            "Calcified Granuloma/lung/upper lobe/right", 10, 12, 5, 6)
        assert ims["CXR1_1_IM-0001-3001"].boxes == []
    assert len(read_phantom(openi_folder)) == 3
    # its NIH-format label table reads through the NIH adapter, boxes left in image pixels
    (openi_folder / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
        "CXR1_1_IM-0001-3001.png,No Finding,0,1,50,F,PA,64,48,0.5,0.5\n")
    with open(openi_folder / "BBox_List_2017.csv", "a") as fh:
        fh.write("CXR1_1_IM-0001-3001.png,Marker,10,12,5,6\n")
    (study,) = open_source(f"nih:{openi_folder}")
    (box,) = study.images[0].boxes
    assert (box.x, box.y, box.w, box.h) == (10, 12, 5, 6)


def test_open_source_specs(shared_data, tmp_path):
    assert len(open_source("openi")) == 3955  # from the cache ($CXR_DATA_DIR)
    assert len(open_source(f"openi:{shared_data / 'openi'}")) == 3955
    assert len(open_source(str(shared_data / "openi" / "NLMCXR_reports.tgz"))) == 3955
    for spec, message in [("", "empty data spec"), ("mimic:/x", "unknown data source"),
                          ("folder:", "needs a path"), (f"openi:{tmp_path / 'x'}", "not found"),
                          (f"openi:{tmp_path}", "no Open-i reports")]:
        with pytest.raises(CxrError, match=message):
            open_source(spec)


# --- splits ---

def _check_split(studies) -> None:
    splits = split_by_patient(studies, seed=3)
    patients = [{s.patient_id for s in splits[k]} for k in ("train", "val", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert sum(len(v) for v in splits.values()) == len(studies)
    n = len(set().union(*patients))
    assert [len(p) for p in patients] == pytest.approx([0.7 * n, 0.1 * n, 0.2 * n], abs=1)
    again = split_by_patient(list(reversed(studies)), seed=3)
    assert {k: {s.id for s in v} for k, v in again.items()} == \
           {k: {s.id for s in v} for k, v in splits.items()}


def test_split_keeps_a_patients_images_together(nih_sample):
    nih = read_nih(nih_sample / "Data_Entry_2017_v2020.csv")
    assert len({s.patient_id for s in nih}) < len(nih)  # patients with several images
    _check_split(nih)


def test_split_by_patient(openi):
    _check_split(openi)
    other = split_by_patient(openi, seed=4)
    assert {s.id for s in other["test"]} != {s.id for s in split_by_patient(openi, seed=3)["test"]}
    tiny = split_by_patient(openi[:3])
    assert [len(v) for v in tiny.values()] == [1, 1, 1]
    assert split_summary(tiny)["train"]["patients"] == 1
    with pytest.raises(CxrError, match="fractions"):
        split_by_patient(openi, (0.5, 0.5, 0.5))


def test_phantom_spec_on_a_folder_that_is_no_finished_set(tmp_path):
    """phantom: on a run folder says it is no simulated set; on an interrupted `cxr simulate`
    (tables not yet written: the boxes would be lost) it says to finish the set first."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(CxrError, match="not a simulated set"):
        open_source(f"phantom:{tmp_path / 'run'}")
    unfinished = tmp_path / "sim"
    (unfinished / "ecgen-radiology").mkdir(parents=True)
    (unfinished / "manifest.json").write_text('{"settings": {}, "complete": false}')
    with pytest.raises(CxrError, match="unfinished"):
        open_source(f"phantom:{unfinished}")
