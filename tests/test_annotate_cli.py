"""`cxr annotate` on real PNG and DICOM files: JSON and overlay PNGs; a bad file is reported."""
from __future__ import annotations

import json

import numpy as np
from conftest import chest_film
from PIL import Image

from cxr.cli import main


def _chest(h=72, w=64, n=0):
    return chest_film(n, (h, w))  # a real film: the quality gate refuses drawings


def test_annotate_png_and_dicom(tiny_run, tmp_path, capsys):
    from cxr.dicom import write_dicom

    image = _chest()
    png = tmp_path / "in" / "chest.png"
    png.parent.mkdir()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(png)
    dcm = tmp_path / "in" / "chest2.dcm"
    write_dicom(dcm, image, view="PA")
    bad = tmp_path / "in" / "broken.dcm"
    bad.write_bytes(b"DICM but not really")
    out = tmp_path / "out.json"
    rc = main(["annotate", str(tiny_run), str(png), str(dcm), str(bad), "--json", str(out),
               "--overlay", str(tmp_path / "ov"), "--batch-size", "2", "--beams", "2"])
    assert rc == 1  # one file failed, the others were annotated
    entries = json.loads(out.read_text())
    assert [e["path"] for e in entries if "error" in e] == [str(bad)]
    good = {e["path"]: e for e in entries if "error" not in e}
    assert set(good) == {str(png), str(dcm)}
    for e in good.values():
        assert e["image_size"] == [72, 64]
        assert set(e["scores"]) and e["model_id"].startswith("tiny-")
        overlay = Image.open(e["overlay"])
        assert overlay.mode == "RGB" and min(overlay.size) >= 512
    # the DICOM and the PNG hold the same picture: the same scores (up to 8-bit rounding)
    a, b = good[str(png)]["scores"], good[str(dcm)]["scores"]
    assert all(abs(a[k] - b[k]) < 0.02 for k in a)
    assert "broken.dcm" in capsys.readouterr().err


def test_annotate_folder_to_stdout(tiny_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((_chest(n=i) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["annotate", str(tiny_run), str(folder), "--json", "-"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 3 and all("scores" in e for e in entries)


def test_annotate_nothing_readable(tiny_run, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    assert main(["annotate", str(tiny_run), str(bad), "--json", str(tmp_path / "o.json")]) == 2
    assert "none of the 1 images" in capsys.readouterr().err


def test_annotate_an_empty_folder_names_it(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("not an image")
    assert main(["annotate", str(tiny_run), str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no image files in {empty}" in err and "Traceback" not in err
