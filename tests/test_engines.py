"""`cxr export RUN --onnx` and the Reader's ONNX Runtime / OpenVINO engines: the same scores,
boxes and heatmaps as PyTorch, and a clear refusal of a graph that is missing, altered, or
exported from other weights."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cxr.cli import main
from cxr.errors import CxrError
from cxr.models.localize import Heatmaps, heatmaps_at, to_heatmap
from cxr.reader import Reader
from conftest import chest_film

pytest.importorskip("onnx", reason="the `fast` extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the `fast` extra (onnx, onnxruntime) is not installed")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    from service_helpers import run_asserting_every_finding

    run = run_asserting_every_finding(tiny_run, tmp_path_factory.mktemp("onnx") / "run")
    assert main(["export", str(run), "--onnx"]) == 0
    return run


def engines():
    out = ["onnxruntime"]
    try:
        import openvino  # noqa: F401
        out.append("openvino")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("engine", engines())
def test_engines_give_pytorchs_results(exported, engine, one_torch_thread):
    meta = json.loads((exported / "model.onnx.json").read_text())
    assert meta["opset"] >= 17 and len(meta["sha256"]) == 64
    films = [chest_film(i, (300, 260)) for i in range(3)]
    want = Reader.load(exported, gate=False)(films, batch_size=3)
    got = Reader.load(exported, gate=False, engine=engine)(films[:1]) + \
        Reader.load(exported, gate=False, engine=engine)(films[1:], batch_size=2)  # batch 1 and 2
    for a, b in zip(got, want):
        assert max(abs(a.scores[k] - b.scores[k]) for k in b.scores) < 1e-3
        assert [f.disease for f in a.findings] == [f.disease for f in b.findings]
        assert np.abs(a.embedding - b.embedding).max() < 1e-3
        assert set(a.heatmaps) == set(b.heatmaps) and a.heatmaps
        for k in b.heatmaps:
            assert np.abs(a.heatmaps[k] - b.heatmaps[k]).max() < 1e-2
        for fa, fb in zip(a.findings, b.findings):
            assert len(fa.boxes) == len(fb.boxes)


def test_a_graph_that_does_not_belong_is_refused(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported, run)
    Reader.load(run, gate=False, engine="onnxruntime")  # as exported: fine
    with open(run / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CxrError, match="does not match the sha256"):
        Reader.load(run, gate=False, engine="onnxruntime")
    (run / "model.onnx").unlink()
    with pytest.raises(CxrError, match="cxr export"):
        Reader.load(run, gate=False, engine="onnxruntime")
    shutil.copy(exported / "model.onnx", run / "model.onnx")
    meta = json.loads((run / "model.onnx.json").read_text())  # as if exported from other weights
    (run / "model.onnx.json").write_text(json.dumps(meta | {"weights_sha256": "0" * 64}))
    with pytest.raises(CxrError, match="other weights"):
        Reader.load(run, gate=False, engine="onnxruntime")
    with pytest.raises(CxrError, match="unknown engine"):
        Reader.load(exported, gate=False, engine="tensorrt")


def test_heatmaps_are_made_when_read_and_match_the_upsampled_cam():
    rng = np.random.default_rng(0)
    for cam_shape, size in [((8, 8), (1024, 1000)), ((16, 12), (256, 256)), ((8, 8), (5, 3))]:
        cam = rng.standard_normal(cam_shape).astype(np.float32)
        want = to_heatmap(torch.from_numpy(cam), size)
        assert np.abs(heatmaps_at(cam[None], size)[0] - want).max() < 1e-5
        lazy = Heatmaps({"Nodule": cam}, size)
        assert not lazy._made and list(lazy) == ["Nodule"] and len(lazy) == 1
        assert np.abs(lazy["Nodule"] - want).max() < 1e-5 and "Nodule" in lazy._made
