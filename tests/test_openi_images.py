"""`openi:DIR` with Open-i's own layout, end to end: real report XML (copied here from the public
release at test time) in `ecgen-radiology/` or as `NLMCXR_reports.tgz`, and the PNG release
unpacked in `NLMCXR_png/` under Open-i's file names, whose pixels are phantom radiographs
(frontal with the report's findings drawn, lateral as the second image). No metadata CSV: Open-i
does not ship one, so the quality gate decides frontal/lateral. `cxr train`, `cxr evaluate` and
`cxr index` (with the reports stored beside the images) on it, with tiny settings."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image as PILImage

from cxr.errors import CxrError

# real reports whose MeSH indexing is one finding (or normal), each with a frontal and a lateral
REPORTS = {"Cardiomegaly": (530, 665, 906, 922, 948), "Opacity": (257, 332, 494, 501, 742),
           "normal": (3, 6, 8, 11, 12, 20)}


@pytest.fixture(scope="module")
def openi_home(shared_data, tmp_path_factory):
    """DIR/ecgen-radiology/<n>.xml + DIR/NLMCXR_png/CXR<n>_IM-....png, as Open-i distributes them."""
    from cxr.phantom.cases import parse_term
    from cxr.phantom.render import Phantom
    from cxr.phantom.spec import FindingSpec
    from cxr.sources import read_openi

    home = tmp_path_factory.mktemp("openi") / "openi"
    (home / "ecgen-radiology").mkdir(parents=True)
    (home / "NLMCXR_png").mkdir()
    wanted = {n for numbers in REPORTS.values() for n in numbers}
    with tarfile.open(shared_data / "openi" / "NLMCXR_reports.tgz") as tf:
        for n in sorted(wanted):
            data = tf.extractfile(f"ecgen-radiology/{n}.xml").read()
            (home / "ecgen-radiology" / f"{n}.xml").write_bytes(data)
    phantom = Phantom.load()
    studies = read_openi(home, gate=False)
    assert len(studies) == len(wanted)
    for k, study in enumerate(studies):
        assert len(study.images) == 2, study.id  # PA first, then the lateral
        mentions = [parse_term(t) for t in study.meta["mesh"]]
        specs = [FindingSpec(kind=m.kind, side=m.side, site=m.site, severity=m.severity,
                             term=m.term) for m in mentions if m is not None]
        frontal = phantom.render(specs, seed=k, size=96).image
        lateral = phantom.render([], seed=k, size=96, view="lateral").image
        for image, pixels in zip(study.images, (frontal, lateral)):
            PILImage.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(
                home / "NLMCXR_png" / f"{image.id}.png")
    return home


def test_open_i_layouts_find_their_pngs_and_the_gate_tells_the_views(openi_home, tmp_path,
                                                                     monkeypatch):
    from cxr.quality.gate import QualityGate
    from cxr.sources import open_source

    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    studies = open_source(f"openi:{openi_home}")
    images = [im for s in studies for im in s.images]
    assert len(images) == 32 and all(im.path and im.path.parent.name == "NLMCXR_png"
                                     for im in images)
    # no metadata: the quality gate's model decided each view from the pixels
    views = [(im.meta["view_class"], im.meta["view_evidence"]) for im in images]
    assert [v for v, _ in views] == ["frontal", "lateral"] * 16
    assert all(why.startswith("quality gate (p ") for _, why in views)
    # once: the next open (evaluate, index after train) takes the decisions from the cache
    assert (tmp_path / "cache" / "views-gate.json").is_file()

    def no_gate(*args, **kwargs):
        raise AssertionError("the gate was loaded although every file's view is cached")

    with monkeypatch.context() as patched:
        patched.setattr(QualityGate, "load", no_gate)
        assert [(im.meta["view_class"], im.meta["view_evidence"]) for s in
                open_source(f"openi:{openi_home}") for im in s.images] == views
    cardio = {s.id: s for s in studies}["CXR530"]
    assert cardio.report["IMPRESSION"].startswith("Slight cardiomegaly")
    assert [f.disease for f in cardio.findings] == ["Cardiomegaly"]

    # the release tgz beside the unpacked PNGs works the same
    other = tmp_path / "release"
    other.mkdir()
    with tarfile.open(other / "NLMCXR_reports.tgz", "w:gz") as tf:
        tf.add(openi_home / "ecgen-radiology", arcname="ecgen-radiology")
    (other / "NLMCXR_png").symlink_to(openi_home / "NLMCXR_png")
    again = open_source(f"openi:{other}")
    assert [(im.id, im.path.name) for s in again for im in s.images] == [
        (im.id, im.path.name) for im in images]

    # the PNG release still packed: one line saying to unpack it, not 32 images without files
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "NLMCXR_reports.tgz").symlink_to(other / "NLMCXR_reports.tgz")
    (packed / "NLMCXR_png.tgz").write_bytes(b"")
    with pytest.raises(CxrError, match="still packed in NLMCXR_png.tgz: unpack it"):
        open_source(f"openi:{packed}")


def test_train_evaluate_and_index_open_i_with_its_images(openi_home, tmp_path, capsys,
                                                         one_torch_thread):
    from cxr.archive.db import Archive
    from cxr.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", f"openi:{openi_home}", "--out", str(run), "--backbone", "tiny",
                 "--image-size", "64", "--crop", "56", "--epochs", "2", "--rnn-epochs", "3",
                 "--batch-size", "8", "--min-label-count", "2", "--min-cluster-members", "4",
                 "--images-per-cluster", "2", "--ground-epochs", "1", "--attn-dim", "16",
                 "--rnn-hidden", "16", "--rnn-embed", "8", "--num-workers", "0",
                 "--fractions", "0.6", "0.2", "0.2", "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert {"Cardiomegaly", "Opacity"} <= set(config["targets"])
    manifest = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trained")]
    assert manifest and "targets" in manifest[0]

    assert main(["evaluate", str(run), "--quiet", "--split", "all"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 16  # the frontal film of each of the 16 reports
    assert {"Cardiomegaly", "Opacity"} <= set(metrics["auc"]["per_label"])
    capsys.readouterr()

    db = f"sqlite:///{tmp_path / 'archive.db'}"
    assert main(["index", str(run), f"openi:{openi_home}", "--db", db, "--quiet"]) == 0
    with Archive(db) as archive:
        assert archive.count() == 32  # frontal read; laterals recorded as not read (the gate)
        frontal = archive.search(status="ok", limit=100)
        assert len(frontal) == 16 and all("NLMCXR_png" in h.path for h in frontal)
        assert all(h.report and h.report_findings for h in frontal)
        cardio = {h.path.rsplit("/", 1)[-1].split("_")[0] for h in archive.search(
            report="cardiomegaly", limit=100)}
        assert cardio == {f"CXR{n}" for n in REPORTS["Cardiomegaly"]}
        mined = {f["disease"] for h in archive.search(report="cardiomegaly") for f in
                 h.report_findings if f["certainty"] == "positive"}
        assert "Cardiomegaly" in mined
