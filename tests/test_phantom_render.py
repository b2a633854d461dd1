"""The phantom renderer: deterministic, findings change the image where their box says, severity
is monotone, left/right follow the PA convention, and the image looks like a chest film."""
from __future__ import annotations

import numpy as np
import pytest

from cxr.errors import CxrError
from cxr.phantom.spec import KINDS, FindingSpec

SIZE = 256
SEED = 11


@pytest.fixture(scope="module")
def phantom(shared_data):
    from cxr.phantom.render import Phantom

    return Phantom.load()


@pytest.fixture(scope="module")
def normal(phantom):
    return phantom.render([], seed=SEED, size=SIZE)


def _diff(phantom, normal, spec, seed=SEED):
    r = phantom.render([spec], seed=seed, size=SIZE)
    return r, (r.image.astype(np.float64) - normal.image) ** 2


def _inside(box, shape, pad=0):
    m = np.zeros(shape, bool)
    x0, y0 = max(int(box.x) - pad, 0), max(int(box.y) - pad, 0)
    m[y0:int(box.y + box.h) + pad, x0:int(box.x + box.w) + pad] = True
    return m


def test_image_contract(normal):
    assert normal.image.dtype == np.float32 and normal.image.shape == (SIZE, SIZE)
    assert 0.0 <= normal.image.min() and normal.image.max() <= 1.0
    assert normal.boxes == [] and normal.masks == []
    assert normal.raw.shape == (SIZE, SIZE)
    assert 0.4 < normal.meta["ctr"] < 0.5  # a normal heart


def test_same_seed_same_image_bit_for_bit(phantom, normal):
    again = phantom.render([], seed=SEED, size=SIZE)
    assert np.array_equal(again.image, normal.image)
    spec = [FindingSpec("effusion", side="left", severity="moderate")]
    a, b = phantom.render(spec, seed=3, size=SIZE), phantom.render(spec, seed=3, size=SIZE)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    other = phantom.render([], seed=SEED + 1, size=SIZE)
    assert np.abs(other.image - normal.image).mean() > 0.01


def test_reloaded_phantom_renders_the_same(phantom, normal):
    from cxr.phantom.render import Phantom

    assert np.array_equal(Phantom.load().render([], seed=SEED, size=SIZE).image, normal.image)


def test_looks_like_a_chest_film(normal):
    """Lung fields dark, mediastinum/spine bright, outside the lungs' middle third brighter."""
    img = normal.image
    rows = slice(int(0.3 * SIZE), int(0.55 * SIZE))
    spine = img[rows, int(0.46 * SIZE):int(0.54 * SIZE)].mean()
    right_lung = img[rows, int(0.28 * SIZE):int(0.38 * SIZE)].mean()   # patient's right
    left_lung = img[rows, int(0.62 * SIZE):int(0.72 * SIZE)].mean()
    assert spine > right_lung + 0.25 and spine > left_lung + 0.2
    assert right_lung < 0.45 and left_lung < 0.5
    # heart on the patient's left = image right: more dense tissue right of the midline, low down
    low = slice(int(0.45 * SIZE), int(0.6 * SIZE))
    assert img[low, int(0.55 * SIZE):int(0.7 * SIZE)].mean() > img[low, int(0.3 * SIZE):int(0.45 * SIZE)].mean()


CASES = [FindingSpec("cardiomegaly", severity="moderate"),
         FindingSpec("effusion", side="right", severity="moderate"),
         FindingSpec("opacity", side="left", site="upper lobe", severity="moderate"),
         FindingSpec("airspace_disease", side="right", site="lower lobe", severity="moderate"),
         FindingSpec("consolidation", side="right", site="middle lobe", severity="severe"),
         FindingSpec("nodule", side="left", site="upper lobe", size_mm=15),
         FindingSpec("mass", side="right", site="lower lobe", size_mm=45),
         FindingSpec("granuloma", side="right", site="upper lobe", size_mm=5),
         FindingSpec("atelectasis", side="left", site="base", severity="moderate"),
         FindingSpec("pneumothorax", side="right", severity="moderate"),
         FindingSpec("hypoinflation", severity="moderate"),
         FindingSpec("hyperdistention", severity="moderate"),
         FindingSpec("catheter", side="right")]


EXTRA = [FindingSpec("density", side="right", site="lower lobe", severity="moderate"),
         FindingSpec("infiltrate", side="left", site="upper lobe", severity="moderate"),
         FindingSpec("diaphragm_elevated", side="right", severity="moderate"),
         FindingSpec("emphysema", severity="moderate"),
         FindingSpec("aortic_calcinosis", severity="severe"),
         FindingSpec("granulomatous_disease")]


def test_every_kind_is_covered():
    from cxr.phantom.findings import EXTRA_KINDS, HANDLERS

    assert {c.kind for c in CASES} == set(KINDS)
    assert {c.kind for c in EXTRA} == set(EXTRA_KINDS) == set(HANDLERS) - set(KINDS)


@pytest.mark.parametrize("spec", CASES + EXTRA, ids=[c.kind for c in CASES + EXTRA])
def test_finding_changes_the_image_inside_its_box(phantom, normal, spec):
    r, d = _diff(phantom, normal, spec)
    assert len(r.boxes) == len(r.masks) == 1
    box, mask = r.boxes[0], r.masks[0]
    from cxr.phantom.findings import EXTRA_KINDS

    assert box.label == {**KINDS, **EXTRA_KINDS}[spec.kind] and mask.dtype == bool and mask.any()
    assert box.w > 0 and box.h > 0
    ys, xs = np.nonzero(mask)
    assert box.x <= xs.min() and xs.max() < box.x + box.w  # the box bounds the mask
    inside = _inside(box, d.shape, pad=3)
    total = d.sum()
    assert total > 0
    assert d[inside].sum() / total > 0.8, "most of the change lies in the box"
    assert d[inside].mean() > 10 * d[~inside].mean()


def test_term_is_the_box_label(phantom):
    r = phantom.render([FindingSpec("opacity", side="left", site="lower lobe", severity="mild",
                                     term="Opacity/lung/base/left/mild")], seed=2, size=SIZE)
    assert r.boxes[0].label == "Opacity/lung/base/left/mild"


def test_left_effusion_is_on_the_image_right(phantom, normal):
    """PA as read: the patient's left is on the viewer's right."""
    for side, half in (("left", slice(SIZE // 2, SIZE)), ("right", slice(0, SIZE // 2))):
        r, d = _diff(phantom, normal, FindingSpec("effusion", side=side, severity="moderate"))
        assert d[:, half].sum() > 0.9 * d.sum(), side


def test_effusion_grows_with_severity(phantom, normal):
    changed = []
    for sev in ("small", "moderate", "large"):
        r, d = _diff(phantom, normal, FindingSpec("effusion", side="right", severity=sev))
        changed.append(int((d > 0.02 ** 2).sum()))
        assert r.meta["findings"][0]["severity"] == sev
    assert changed[0] < changed[1] < changed[2]


def test_denser_opacity_is_brighter(phantom, normal):
    gain = []
    for sev in ("mild", "moderate", "severe"):
        spec = FindingSpec("opacity", side="left", site="lower lobe", severity=sev)
        r = phantom.render([spec], seed=SEED, size=SIZE)
        m = r.masks[0]
        gain.append(float((r.image[m] - normal.image[m]).sum()))
    assert 0 < gain[0] < gain[1] < gain[2]


def test_cardiomegaly_ratio_is_monotone(phantom):
    ctr, width = [], []
    for sev in ("borderline", "mild", "moderate", "severe"):
        r = phantom.render([FindingSpec("cardiomegaly", severity=sev)], seed=SEED, size=SIZE)
        ctr.append(r.meta["ctr"])
        width.append(r.boxes[0].w)
        assert r.meta["findings"][0]["ctr"] == r.meta["ctr"]
    assert ctr == sorted(ctr) and ctr[0] >= 0.5 and ctr[-1] > 0.64
    assert width == sorted(width) and width[-1] > width[0]


def test_larger_nodule_larger_mask(phantom):
    areas = [phantom.render([FindingSpec("nodule", side="right", site="upper lobe", size_mm=s)],
                            seed=4, size=SIZE).masks[0].sum() for s in (6, 12, 24)]
    assert areas[0] < areas[1] < areas[2]


def test_inflation_moves_the_diaphragm(phantom):
    hypo = phantom.render([FindingSpec("hypoinflation", severity="severe")], seed=1, size=SIZE)
    hyper = phantom.render([FindingSpec("hyperdistention", severity="severe")], seed=1, size=SIZE)
    assert max(hypo.meta["diaphragm_mm"].values()) < 0 < min(hyper.meta["diaphragm_mm"].values())
    # more lung below the same row: the lower lung mask reaches further down
    assert hyper.boxes[0].y + hyper.boxes[0].h > hypo.boxes[0].y + hypo.boxes[0].h


def test_cone_geometry_and_512(phantom):
    cone = phantom.render([FindingSpec("nodule", side="left", site="lower lobe", size_mm=20)],
                          seed=5, size=SIZE, geometry="cone")
    par = phantom.render([FindingSpec("nodule", side="left", site="lower lobe", size_mm=20)],
                         seed=5, size=SIZE)
    assert cone.image.shape == par.image.shape and not np.array_equal(cone.image, par.image)
    big = phantom.render([FindingSpec("effusion", side="left", severity="small")], seed=5, size=512)
    assert big.image.shape == (512, 512) and big.masks[0].shape == (512, 512)
    raw = phantom.render_raw([], seed=5, size=SIZE)
    assert raw.dtype == np.float32 and raw.shape == (SIZE, SIZE) and raw.max() > 3


def test_bad_input_is_a_cxr_error(phantom, tmp_path):
    from cxr.phantom.render import Phantom

    with pytest.raises(CxrError, match="unknown finding kind"):
        phantom.render([FindingSpec("fracture")], seed=0, size=SIZE)
    with pytest.raises(CxrError, match="size"):
        phantom.render([], seed=0, size=7)
    with pytest.raises(CxrError, match="geometry"):
        phantom.render([], seed=0, size=SIZE, geometry="fan")
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(CxrError) as e:
        Phantom.load(ct=bad).render([], seed=0, size=64)
    assert str(bad) in str(e.value)


def test_lateral_view(phantom, normal):
    """A lateral is the same patient seen from the side: deterministic, a film's value range,
    a narrower body than on the PA (the chest is ~26 cm deep, ~31 cm wide), the spine behind,
    and no findings in this view."""
    lat = phantom.render([], seed=SEED, size=128, view="lateral")
    again = phantom.render([], seed=SEED, size=128, view="lateral")
    assert np.array_equal(lat.image, again.image) and lat.meta["view"] == "lateral"
    assert lat.image.shape == (128, 128) and 0.0 <= lat.image.min() and lat.image.max() <= 1.0
    pa = phantom.render([], seed=SEED, size=128)
    mid = slice(40, 90)
    assert (lat.image[mid] > 0.05).mean() < (pa.image[mid] > 0.05).mean()
    # the spine (posterior, image right) is denser than the retrosternal space (anterior, left)
    row = lat.image[45:60]
    body = np.nonzero(row.mean(axis=0) > 0.05)[0]
    front, back = body[0], body[-1]
    depth = back - front
    assert row[:, back - depth // 5:back].mean() > row[:, front + depth // 10:front + depth // 4].mean()
    with pytest.raises(CxrError):
        phantom.render([FindingSpec("effusion", side="left")], seed=1, size=128, view="lateral")
    with pytest.raises(CxrError):
        phantom.render([], seed=1, size=128, view="oblique")


def test_ap_view_magnifies_the_heart(phantom):
    pa = phantom.render([], seed=SEED, size=128)
    ap = phantom.render([], seed=SEED, size=128, view="AP")
    assert ap.meta["view"] == "AP" and ap.meta["ctr"] > pa.meta["ctr"] + 0.03
