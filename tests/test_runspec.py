"""RunSpec: the run's settings survive JSON unchanged; unknown, missing or inconsistent fields
and old runs lacking a setting are one clear error; old runs that have them load unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.checkpoint import load_spec
from cxr.errors import CxrError
from cxr.runspec import FORMAT, V1_FORMAT, RunSpec


def _copy_run(run: Path, out: Path, config: dict) -> Path:
    out.mkdir()
    (out / "weights.safetensors").write_bytes((run / "weights.safetensors").read_bytes())
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_round_trip(tiny_run):
    spec = load_spec(tiny_run)
    text = (tiny_run / "config.json").read_text()
    assert json.loads(text)["format"] == FORMAT
    assert RunSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json()) == json.loads(text)
    assert spec.preprocessing.stretch is True and spec.architecture.max_tokens == 5
    assert spec.refined.children(spec.targets.index("normal"))


def test_defaults_unknown_and_missing_fields(tiny_run):
    d = load_spec(tiny_run).to_dict()
    del d["preprocessing"]["input"]  # a field with a default: older runs get the default
    assert RunSpec.from_dict(d).preprocessing.input == RunSpec.from_dict(load_spec(tiny_run).to_dict()).preprocessing.input
    with pytest.raises(CxrError, match="missing field preprocessing.stretch"):
        RunSpec.from_dict({**d, "preprocessing": {k: v for k, v in d["preprocessing"].items() if k != "stretch"}})
    with pytest.raises(CxrError, match="unknown field.*architecture.colour"):
        RunSpec.from_dict({**d, "architecture": {**d["architecture"], "colour": 3}})
    with pytest.raises(CxrError, match="unknown run format 'cxr-run/9'"):
        RunSpec.from_dict({**d, "format": "cxr-run/9"})
    with pytest.raises(CxrError, match="no threshold for"):
        RunSpec.from_dict({**d, "thresholds": {}})
    with pytest.raises(CxrError, match="not valid JSON"):
        RunSpec.from_json("{")


def test_old_run_loads_through_the_converter(tiny_run, tmp_path):
    """A config.json as the writer before RunSpec made it (format cxr-run/1, the same keys) reads
    the same; one lacking a key its readers used to guess (`stretch`) is refused."""
    import cxr

    v1 = {**json.loads((tiny_run / "config.json").read_text()), "format": V1_FORMAT}
    old = _copy_run(tiny_run, tmp_path / "old", v1)
    assert load_spec(old) == load_spec(tiny_run)
    image = np.clip(np.linspace(0, 1, 64 * 80).reshape(64, 80), 0, 1).astype(np.float32)
    assert cxr.Reader.load(old, device="cpu")(image).scores == cxr.Reader.load(tiny_run, device="cpu")(image).scores

    del v1["preprocessing"]["stretch"]
    older = _copy_run(tiny_run, tmp_path / "older", v1)
    with pytest.raises(CxrError, match=r"old \(cxr-run/1\) run without preprocessing.stretch: retrain"):
        cxr.Reader.load(older)


def test_train_config_from_a_run(tiny_run, tmp_path, capsys):
    """`cxr train --config RUN/config.json` reads the run through RunSpec: an unreadable run is
    one line naming the file, before any training."""
    from cxr.cli import main

    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**json.loads((tiny_run / "config.json").read_text()), "format": "cxr-run/9"}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "unknown run format" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_preprocess_gives_float32_whatever_the_input(dtype):
    """The network is float32: a float64 input (what NumPy 2's promotion made of the stretched
    image, which broke the Reader on CUDA) must never reach it."""
    from cxr.preprocess import preprocess

    rng = np.random.default_rng(0)
    image = (rng.random((40, 50)) * (1000 if dtype is np.uint16 else 1)).astype(dtype)
    out = preprocess(image, 32, stretch=True)
    assert out.dtype == np.float32 and out.shape == (32, 32)
    assert 0.0 <= out.min() and out.max() <= 1.0
