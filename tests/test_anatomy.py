"""The anatomy model (`cxr.anatomy`): the heart and lungs of a frontal film, the boxes of
whole-organ findings, and the cardiothoracic ratio."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import chest_film, view_noting_reader

from cxr import metrics as M
from cxr.anatomy import AnatomyModel, organ_of
from cxr.anatomy.model import cardiothoracic_ratio, read_masks
from cxr.errors import CxrError
from cxr.records import Box


def test_the_ratio_is_the_hearts_widest_extent_over_the_widest_row_of_lungs():
    heart, lungs = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    heart[40:70, 30:60] = True             # 30 wide
    lungs[20:80, 10:40] = True             # outer edges 10 ... 89 on the rows both lungs reach
    lungs[20:90, 60:90] = True
    assert cardiothoracic_ratio(heart, lungs) == pytest.approx(30 / 80)
    assert cardiothoracic_ratio(np.zeros_like(heart), lungs) is None


def test_masks_become_the_largest_heart_and_the_two_largest_lungs_at_the_films_size():
    prob = np.zeros((2, 64, 64), np.float32)
    prob[0, 30:50, 25:45] = 0.9            # the heart
    prob[0, 2:5, 2:5] = 0.9                # a speck: not the heart
    prob[1, 10:55, 5:28] = 0.8             # right lung (image left)
    prob[1, 10:58, 36:60] = 0.8            # left lung
    prob[1, 60:62, 30:32] = 0.8            # a speck: not a lung
    organs = read_masks(prob, (256, 512))
    heart = organs.boxes["heart"]
    assert (heart.x, heart.y, heart.w, heart.h) == (25 * 8, 30 * 4, 20 * 8, 20 * 4)
    lungs = organs.boxes["lungs"]
    assert (lungs.x, lungs.y, lungs.w, lungs.h) == (5 * 8, 10 * 4, 55 * 8, 48 * 4)
    assert organs.cardiothoracic_ratio == pytest.approx(20 / 55)
    assert Box.around(np.zeros((4, 4), bool), "heart") is None


def test_whole_organ_findings_name_their_organ():
    assert organ_of("Cardiomegaly") == "heart"
    assert organ_of("Lung/hypoinflation") == "lungs" and organ_of("Emphysema") == "lungs"
    assert organ_of("Opacity") is None and organ_of("Pleural Effusion") is None


def test_missing_weights_and_a_bad_image_give_clear_errors(tmp_path):
    with pytest.raises(CxrError, match="anatomy weights not found"):
        AnatomyModel.load(tmp_path)
    with pytest.raises(CxrError, match="2D grey image"):
        AnatomyModel.load()([np.zeros(10, np.float32)])


def test_phantom_films_carry_organ_masks_that_the_cardiomegaly_box_is_made_of(shared_data):
    from cxr.phantom.render import Phantom
    from cxr.phantom.spec import FindingSpec

    r = Phantom.load().render([FindingSpec(kind="cardiomegaly")], seed=5, size=128)
    heart, lungs = r.anatomy["heart"], r.anatomy["lungs"]
    assert heart.shape == lungs.shape == r.image.shape and heart.any() and lungs.any()
    assert Box.around(heart, "Cardiomegaly") == r.boxes[0]
    assert heart.sum() < lungs.sum()


def test_the_shipped_model_finds_the_heart_and_lungs_of_films_it_never_saw(shared_data):
    """Phantom films of seeds the training never drew, one with a large heart: heart and lung
    boxes overlap the phantom's own organ masks (IoU > .6), and the ratio is within .05 of the
    ratio the phantom drew."""
    from cxr.phantom.render import Phantom
    from cxr.phantom.spec import FindingSpec

    phantom, model = Phantom.load(), AnatomyModel.load()
    films = [phantom.render([FindingSpec(kind="cardiomegaly")] if k == 0 else [], seed=900_000 + k, size=256)
             for k in range(4)]
    for r, organs in zip(films, model([r.image for r in films])):
        for organ in ("heart", "lungs"):
            assert M.iou(organs.boxes[organ], Box.around(r.anatomy[organ], organ)) > 0.6
        assert abs(organs.cardiothoracic_ratio - r.meta["ctr"]) < 0.05


def test_a_whole_organ_finding_the_reader_reports_is_boxed_where_the_organ_is(tiny_run):
    """Every disease reported (thresholds at 0): the whole-organ finding's box (the tiny run has
    Lung/hypoinflation; Cardiomegaly goes the same way) is the anatomy model's box of its organ,
    not one from its map, read on the Reader's second thread while the first writes the words;
    with the rule off it comes from the map again."""
    from cxr.checkpoint import load_run
    from cxr.reader import Reader

    spec, tensors = load_run(tiny_run)
    whole = [t for t in spec.targets if organ_of(t)]
    if not whole:
        pytest.fail(f"the tiny run has no whole-organ target: {spec.targets}")
    target = whole[0]
    spec = dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets},
                               study=dataclasses.replace(spec.study, threshold=0.0))
    reader = Reader(spec, tensors, "cpu", gate=False)
    film = chest_film(1, (256, 256))
    anatomy = AnatomyModel.load()
    organ = anatomy([film])[0].boxes[organ_of(target)]
    # the anatomy model reads on the Reader's background worker, beside the words being written
    threads = []
    reader._anatomy_model = lambda: _Noting(anatomy, lambda films: threads.append(threading.current_thread().name))
    found = {f.disease: f.boxes for f in reader(film).findings}
    assert found[target] == [Box(target, organ.x, organ.y, organ.w, organ.h)]
    assert len(threads) == 1 and threads[0].startswith("cxr-organs") and threads[0] != threading.current_thread().name
    del reader._anatomy_model
    # beside the words its ONNX Runtime session takes one thread (the words hold the other
    # core); read after them, the CNN's threads
    assert reader._anatomy_model().threads == 1
    reader.organs_beside_words = False
    assert reader._anatomy_model().threads == torch.get_num_threads()
    reader.organs_beside_words = True
    tiny = chest_film(2, (5, 5))  # a film read however small (forced past the gate): no batch is lost
    both = reader([film, tiny])
    assert len(both) == 2 and target in {f.disease for f in both[1].findings}
    reader.boxes_of_whole_organs = False
    assert {f.disease: f.boxes for f in reader(film).findings}[target] != found[target]


def test_training_writes_weights_the_model_loads(shared_data, tmp_path):
    """`python -m cxr.anatomy.train` on a handful of films: safetensors + JSON that load, with
    the organs and input size the code expects (the shipped weights are this run at full size)."""
    from cxr.anatomy.train import main

    assert main(["--out", str(tmp_path), "--films", "6", "--epochs", "1"]) == 0
    model = AnatomyModel.load(tmp_path)
    assert model.meta["films"] == 6 and model.size == 96 and tuple(model.meta["organs"]) == ("heart", "lungs")
    probs = model.probabilities([chest_film(0, (200, 180))])
    assert probs.shape == (1, 2, 96, 96) and ((probs >= 0) & (probs <= 1)).all()


def test_the_stretch_uses_torchs_quantiles_from_order_statistics():
    """`stretch`'s fast percentiles are torch.quantile's linear interpolation, on any film size."""
    import torch

    from cxr.anatomy.model import _quantiles

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 96 * 96):
        flat = torch.rand(3, n, generator=gen) ** 3
        for q, got in zip((0.01, 0.99), _quantiles(flat, (0.01, 0.99))):
            assert torch.allclose(got, torch.quantile(flat, q, dim=1), atol=1e-6)


def test_the_training_warp_moves_film_and_masks_together():
    """A bright disc and its own mask, warped, tilted and scaled by `augment`: the bright pixels
    are still the mask's (IoU > .9; a film deformed apart from its mask gave .0 to .4)."""
    import torch

    from cxr.anatomy.train import augment

    yy, xx = np.mgrid[:96, :96]
    disc = ((yy - 40) ** 2 + (xx - 55) ** 2 < 8 ** 2).astype(np.float32)
    x = torch.from_numpy(0.2 + 0.6 * disc)[None, None].repeat(8, 1, 1, 1)
    y = torch.from_numpy(np.stack([disc, 1 - disc]))[None].repeat(8, 1, 1, 1)
    xa, ya = augment(x, y, torch.Generator().manual_seed(1), warp=0.12)
    assert xa.shape == x.shape and ya.shape == y.shape
    for k in range(8):
        bright, mask = xa[k, 0] > 0.5, ya[k, 0] > 0.5
        assert float((bright & mask).sum() / (bright | mask).sum()) > 0.9
    assert not torch.equal(ya[0], ya[1])  # each film its own deformation


class _Noting:
    """The anatomy model, calling `note(films)` with what it is given before reading it."""

    def __init__(self, model: AnatomyModel, note):
        self.model, self.note, self.trained_from = model, note, model.trained_from

    def __call__(self, films, sizes=None):
        self.note(films)
        return self.model(films, sizes)


def test_the_anatomy_network_reads_the_cnns_square_of_a_larger_film(tiny_run):
    """Where the CNN's square of a film holds at least the 256 px the anatomy network was trained
    from, the network reads that square (a 1024-px film is resized once, not twice), its boxes
    in the film's pixels, about where reading the film puts them; a film no larger than the
    square, or a square under 256 px, is read itself."""
    from cxr.checkpoint import load_run
    from cxr.reader import Reader

    spec, tensors = load_run(tiny_run)
    target = next(t for t in spec.targets if organ_of(t))
    spec = dataclasses.replace(spec, thresholds={t: 0.0 for t in spec.targets},
                               study=dataclasses.replace(spec.study, threshold=0.0))
    anatomy = AnatomyModel.load()

    def read(image_size: int, film: np.ndarray):
        reader = Reader(dataclasses.replace(spec, preprocessing=dataclasses.replace(
            spec.preprocessing, image_size=image_size)), tensors, "cpu", gate=False)
        seen = []
        reader._anatomy_model = lambda: _Noting(anatomy, lambda films: seen.extend(f.shape for f in films))
        boxes = {f.disease: f.boxes for f in reader(film).findings}[target]
        return seen, boxes

    film = chest_film(1, (1024, 1024))
    seen, boxes = read(256, film)
    assert seen == [(256, 256)]
    organ = anatomy([film])[0].boxes[organ_of(target)]
    assert len(boxes) == 1 and M.iou(boxes[0], organ) > 0.9, (boxes, organ)  # the film's pixels
    assert read(128, film)[0] == [(1024, 1024)]  # a square under 256 px: the film
    assert read(256, chest_film(1, (200, 240)))[0] == [(200, 240)]  # a film smaller than the square


def test_a_cardiomegaly_on_a_film_its_dicom_calls_ap_is_boxed_but_not_measured(tiny_run, tmp_path):
    """An AP film magnifies the heart, so the ratio is not measured on one: a Cardiomegaly on a
    film whose DICOM says PA gets the ratio, on one that says AP only the heart's box; and the
    Reader hands each file's ViewPosition to that rule when it reads DICOM files."""
    from cxr.dicom import write_dicom
    from cxr.images import read_image
    from cxr.reader import NO_RATIO_ON_AP
    from cxr.results import DetectedFinding, Result

    reader = view_noting_reader(tiny_run)
    film = chest_film(3, (256, 256))
    heart = AnatomyModel.load()([film])[0].boxes["heart"]
    paths, measured = [], {}
    for view in ("PA", "AP"):
        paths.append(write_dicom(tmp_path / f"{view}.dcm", film, view=view))
        loaded = read_image(paths[-1])
        result = Result(scores={"Cardiomegaly": 0.9}, findings=[DetectedFinding("Cardiomegaly", 0.9)])
        reader._whole_organs([loaded.pixels], [result], [loaded.view])
        (finding,) = result.findings
        assert finding.boxes == [Box("Cardiomegaly", heart.x, heart.y, heart.w, heart.h)]
        measured[view] = finding.measurements, finding.notes
    assert 0.3 < measured["PA"][0]["cardiothoracic_ratio"] < 0.8 and measured["AP"][0] == {}
    # the reader of the finding is told why the number is missing, and only where it is
    assert measured["PA"][1] == [] and measured["AP"][1] == [NO_RATIO_ON_AP]
    assert NO_RATIO_ON_AP in result.to_dict()["findings"][0]["notes"]
    reader.seen.clear()
    reader(paths + [film])
    assert reader.seen == [["PA", "AP", None]]  # an array carries no view: the ratio is measured


def test_onnx_runtime_reads_the_organs_as_torch_does():
    """On a CPU the anatomy network runs under ONNX Runtime (`engine="auto"`, cxr[fast]): its
    probabilities within 1e-4 of eager PyTorch's and the same boxes and ratio on real films."""
    pytest.importorskip("onnxruntime")
    films = [chest_film(k, (256, 256)) for k in range(4)]
    fast, eager = AnatomyModel.load(), AnatomyModel.load(engine="torch")
    assert (fast.engine, eager.engine) == ("onnxruntime", "torch")
    assert np.abs(fast.probabilities(films) - eager.probabilities(films)).max() < 1e-4
    for a, b in zip(fast(films), eager(films)):
        assert a.boxes == b.boxes and a.cardiothoracic_ratio == b.cardiothoracic_ratio
    with pytest.raises(CxrError, match="anatomy engine must be one of"):
        AnatomyModel.load(engine="tensorrt")


def test_cardiomegalys_grade_word_follows_the_ratio_measured_on_a_pa_film(tiny_run, shared_data):
    """The word and the number beside it agree: on a PA film the grade comes from the measured
    ratio (the annotator's confidence in its own word no longer applies); on an AP film, where no
    ratio is measured, the annotator's word stays; and with the rule off it stays too."""
    from cxr.anatomy import grade_of_ratio
    from cxr.checkpoint import load_run
    from cxr.models.localize import Heatmaps
    from cxr.phantom.render import Phantom
    from cxr.phantom.spec import FindingSpec
    from cxr.reader import Reader
    from cxr.results import DetectedFinding, Result

    assert [grade_of_ratio(x) for x in (None, 0.5, 0.505, 0.55, 0.6, 0.7)] == \
        [None, None, "borderline", "mild", "moderate", "severe"]
    film = Phantom.load().render([FindingSpec("cardiomegaly", severity="severe")], seed=11, size=256).image
    grade = grade_of_ratio(AnatomyModel.load()([film])[0].cardiothoracic_ratio)
    assert grade in ("moderate", "severe")
    spec, tensors = load_run(tiny_run)
    reader = Reader(spec, tensors, "cpu", gate=False)
    for view, rule, expect in (("PA", True, grade), ("AP", True, "borderline"), ("PA", False, "borderline")):
        reader.grade_from_ratio = rule
        said = DetectedFinding("Cardiomegaly", 0.9, annotation="cardiomegaly borderline",
                               severity="borderline", confidence={"severity": 0.4})
        maps = Heatmaps({k: np.zeros((4, 4), np.float32) for k in ("Cardiomegaly", "Cardiomegaly:borderline")},
                        film.shape)
        reader._whole_organs([film], [Result(scores={"Cardiomegaly": 0.9}, findings=[said], heatmaps=maps)], [view])
        assert (said.severity, said.annotation) == (expect, f"cardiomegaly {expect}")
        assert ("severity" in said.confidence) == (expect == "borderline")
        # the map of the word it wrote goes with the word
        assert ("Cardiomegaly:borderline" in maps) == (expect == "borderline") and "Cardiomegaly" in maps
        assert ("cardiothoracic_ratio" in said.measurements) == (view == "PA")
