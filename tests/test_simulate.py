"""`cxr simulate` writes a set the Open-i and NIH adapters read back, resumes after a SIGKILL
with nothing lost or duplicated, and gives the same bytes whatever the interruptions or workers."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr.errors import CxrError
from cxr.reports import mesh

N, SIZE, SEED = 16, 64, 7


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory):
    """An uninterrupted run, in this process, on one worker."""
    from cxr.phantom.simulate import simulate

    phantom = shared_data / "phantom"
    return simulate(tmp_path_factory.mktemp("sim") / "ref", n=N, size=SIZE, seed=SEED,
                    workers=1, progress=False, ct=phantom / "chest_ct.nii.gz",
                    labels=phantom / "chest_ct_labels.nii.gz",
                    reports=shared_data / "openi" / "NLMCXR_reports.tgz")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "cases.jsonl").read_text().splitlines()]


def test_layout_and_ground_truth(reference):
    files = _files(reference)
    for i in range(1, N + 1):
        assert f"ecgen-radiology/{i}.xml" in files
        assert f"images/CXR{i}_IM-0001-1001.png" in files
    for name in ("nlmcxr_dicom_metadata.csv", "Data_Entry_2017.csv", "BBox_List_2017.csv",
                 "cases.jsonl", "manifest.json"):
        assert name in files
    assert not [f for f in files if ".tmp-" in f]
    png_mode = (reference / "images" / "CXR1_IM-0001-1001.png").stat().st_mode & 0o777
    for name in ("cases.jsonl", "ecgen-radiology/1.xml", "Data_Entry_2017.csv"):
        assert (reference / name).stat().st_mode & 0o777 == png_mode  # readable like any file
    manifest = json.loads(files["manifest.json"])
    assert manifest["complete"] and manifest["done"] == N
    assert manifest["settings"]["ct_sha256"].startswith("b1c29dfa")
    records = _records(reference)
    assert [r["case"]["id"] for r in records] == [f"CXR{i}" for i in range(1, N + 1)]
    assert any(r["case"]["findings"] for r in records) and any(not r["case"]["findings"] for r in records)
    for r in records:
        assert len(r["boxes"]) == len(r["case"]["findings"])
        for b in r["boxes"]:
            assert 0 <= b["x"] and b["x"] + b["w"] <= SIZE + 1e-6 and b["w"] > 0 and b["h"] > 0
    from PIL import Image

    with Image.open(reference / "images" / "CXR1_IM-0001-1001.png") as im:
        assert im.size == (SIZE, SIZE) and im.mode.startswith("I;16")


def test_open_i_and_nih_adapters_read_it_back(reference):
    from cxr.sources import open_source, read_nih, read_openi

    records = {r["case"]["id"]: r for r in _records(reference)}
    studies = open_source(f"phantom:{reference}")
    assert [s.id for s in studies] == list(records)
    for s in studies:
        r = records[s.id]
        terms = [f["term"] for f in r["case"]["findings"]]
        assert s.meta["mesh"] == (list(dict.fromkeys(terms)) or ["normal"])
        assert s.normal == (not terms)
        (image,) = s.images
        assert image.id == r["image"]["id"] and image.path is not None and image.view == "PA"
        assert [(b.label, round(b.x, 3), round(b.w, 3)) for b in image.boxes] == \
               [(b["label"], round(b["x"], 3), round(b["w"], 3)) for b in r["boxes"]]
        assert "FINDINGS" in s.report and "IMPRESSION" in s.report
    assert len(read_openi(reference)) == N
    # NIH tables: one row per image, headings as labels, boxes in image pixels under the term
    nih = {s.id: s for s in read_nih(reference / "Data_Entry_2017.csv",
                                     reference / "BBox_List_2017.csv",
                                     images=reference / "images", box_frame=None)}
    for sid, r in records.items():
        study = nih[r["image"]["id"]]
        assert study.images[0].path.name == Path(r["image"]["png"]).name
        heads = {mesh.parse_term(f["term"]).disease for f in r["case"]["findings"]} or {"normal"}
        assert {f.disease for f in study.findings} == heads
        assert [(b.label, round(b.y, 3), round(b.h, 3)) for b in study.images[0].boxes] == \
               [(b["label"], round(b["y"], 3), round(b["h"], 3)) for b in r["boxes"]]
    via_spec = {s.id: [(b.label, b.x, b.y) for b in s.images[0].boxes]
                for s in open_source(f"nih:{reference}")}
    assert via_spec == {k: [(b.label, b.x, b.y) for b in s.images[0].boxes] for k, s in nih.items()}
    with open(reference / "BBox_List_2017.csv", newline="") as fh:
        header = fh.readline().strip()
        rows = list(csv.reader(fh))
    assert header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert len(rows) == sum(len(r["boxes"]) for r in records.values())


def _cli(out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "cxr.cli", "simulate", "--out", str(out), "--n", str(N),
            "--size", str(SIZE), "--seed", str(SEED), "--workers", str(workers), "--no-progress"]


def test_resume_after_sigkill_equals_an_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "cut"
    proc = subprocess.Popen(_cli(out, 2), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "records"
    deadline = time.monotonic() + 600  # generous: a loaded CI machine
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("CXR*.json"))) >= 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"run ended before it could be interrupted: {proc.stderr.read()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-case
    proc.wait()
    done = len(list(records.glob("CXR*.json")))
    assert 2 <= done < N
    assert not (out / "cases.jsonl").exists()
    from cxr.phantom.simulate import simulate

    simulate(out, n=N, size=SIZE, seed=SEED, workers=1, progress=False)  # the same command again
    assert _files(out) == _files(reference)  # nothing lost, nothing twice, same bytes
    simulate(out, n=N, size=SIZE, seed=SEED, workers=2, progress=False)  # all done: skips all
    assert _files(out) == _files(reference)


def test_other_settings_into_the_same_folder_are_refused(reference, tmp_path, capsys):
    from cxr.phantom.simulate import simulate

    with pytest.raises(CxrError, match="other settings.*seed"):
        simulate(reference, n=N, size=SIZE, seed=SEED + 1, progress=False)
    with pytest.raises(CxrError, match="would leave the others"):
        simulate(reference, n=N - 1, size=SIZE, seed=SEED, progress=False)
    (tmp_path / "stuff.txt").write_text("not a simulated set")
    with pytest.raises(CxrError, match="not empty"):
        simulate(tmp_path, n=2, size=SIZE, progress=False)
    from cxr.cli import main

    args = ["simulate", "--out", str(reference), "--n", str(N), "--size", "128", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "size: 64 there, 128 now" in err and "Traceback" not in err


def test_out_that_is_a_file_or_a_failed_claim(shared_data, tmp_path):
    """--out naming a file is one clear error; a set whose first run failed before any study
    (e.g. an unreadable --ct) can be started again with other settings."""
    from cxr.phantom.simulate import simulate

    phantom = shared_data / "phantom"
    kwargs = dict(n=1, size=SIZE, workers=1, progress=False,
                  labels=phantom / "chest_ct_labels.nii.gz",
                  reports=shared_data / "openi" / "NLMCXR_reports.tgz")
    afile = tmp_path / "a.csv"
    afile.write_text("x\n")
    with pytest.raises(CxrError, match="not a folder"):
        simulate(afile, ct=phantom / "chest_ct.nii.gz", **kwargs)
    bad_ct = tmp_path / "ct.nii.gz"
    bad_ct.write_text("not a CT")
    out = tmp_path / "set"
    with pytest.raises(CxrError, match="NIfTI"):
        simulate(out, ct=bad_ct, **kwargs)
    simulate(out, ct=phantom / "chest_ct.nii.gz", **kwargs)
    assert (out / "records" / "CXR1.json").is_file()


def test_dicom_output(shared_data, tmp_path):
    import pydicom
    from cxr.images import load_image
    from cxr.phantom.simulate import simulate

    out = simulate(tmp_path / "dcm", n=3, size=SIZE, seed=SEED, dicom=True,
                   photometric="MONOCHROME1", progress=False, masks=True)
    ds = pydicom.dcmread(out / "images" / "CXR1_IM-0001-1001.dcm")
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.ViewPosition == "PA" and ds.PatientID == "CXR1" and ds.Rows == SIZE
    png = load_image(out / "images" / "CXR1_IM-0001-1001.png")
    dcm = load_image(out / "images" / "CXR1_IM-0001-1001.dcm")
    import numpy as np

    assert np.corrcoef(png.ravel(), dcm.ravel())[0, 1] > 0.999  # the same picture, bright = dense
    # masks: one 1-bit PNG per finding, inside its box
    from PIL import Image

    boxes = [b for r in _records(out) for b in r["boxes"]]
    assert boxes and len(list((out / "masks").glob("*.png"))) == len(boxes)
    for b in boxes:
        mask = np.asarray(Image.open(out / b["mask"]))
        ys, xs = np.nonzero(mask)
        assert mask.shape == (SIZE, SIZE) and len(xs)
        assert b["x"] - 1 <= xs.min() and xs.max() <= b["x"] + b["w"] + 1
        assert b["y"] - 1 <= ys.min() and ys.max() <= b["y"] + b["h"] + 1


def test_a_larger_n_grows_the_set(reference, tmp_path):
    import shutil

    from cxr.phantom.simulate import simulate

    grown = tmp_path / "grown"
    shutil.copytree(reference, grown)
    simulate(grown, n=N + 1, size=SIZE, seed=SEED, progress=False)
    before, after = _files(reference), _files(grown)
    assert len(_records(grown)) == N + 1
    assert f"images/CXR{N + 1}_IM-0001-1001.png" in after
    for name, data in before.items():
        if name.startswith(("images/", "ecgen-radiology/", "records/")):
            assert after[name] == data  # the first N cases are untouched
    assert json.loads(after["manifest.json"])["settings"]["n"] == N + 1


def test_a_placement_failure_is_retried_with_a_derived_seed(tmp_path):
    """A renderer CxrError for one seed must not stop a long run at that case forever."""
    from cxr.phantom.cases import CaseGenerator
    from cxr.phantom.simulate import RENDER_ATTEMPTS, _Job

    class Refuses:  # the real renderer's failure mode, for every seed
        seeds: list[int] = []

        def render(self, findings, seed, size, geometry):
            self.seeds.append(seed)
            raise CxrError("no place for the finding at that site")

    gen = CaseGenerator([("CXR1", ["normal"]), ("CXR2", ["Cardiomegaly/mild"])], normal_share=0)
    job = _Job(tmp_path, {"seed": 0, "size": 64, "geometry": "parallel", "dicom": False,
                          "photometric": None}, gen, "", "")
    job._phantom = Refuses()
    with pytest.raises(CxrError, match=r"CXR1.*Cardiomegaly/mild.*3 tries"):
        job.make(1)
    assert len(set(Refuses.seeds)) == RENDER_ATTEMPTS == 3
    assert Refuses.seeds[0] == gen.case(1, 0).seed
    assert not list(tmp_path.rglob("*.json"))  # nothing recorded as done
