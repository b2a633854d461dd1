"""train(): end to end on a few synthetic images, resume after an interruption, settings checks."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from cxr.checkpoint import load_spec
from cxr.errors import CxrError
from cxr.testing import synthetic_studies, tiny_config
from cxr.training import TrainConfig, split_studies, train


class Interrupt(Exception):
    pass



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    return synthetic_studies(tmp_path_factory.mktemp("syn"), n=24, size=48)


def _config(**kw):
    return tiny_config(**{"data": "folder:synthetic", "image_size": 48, "crop": 40, "epochs": 2, "rnn_epochs": 4,
                          **kw})


def test_interrupted_run_resumes_and_finishes(tmp_path, studies):
    out = tmp_path / "run"
    seen = []

    def stop_after_first_epoch(phase, epoch, record):
        seen.append((phase, epoch))
        if (phase, epoch) == ("cnn1", 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_config(), out, studies=studies, on_epoch=stop_after_first_epoch)
    assert not (out / "config.json").exists()
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert progress["phases"]["cnn1"]["epoch"] == 1 and not progress.get("finished")

    with pytest.raises(CxrError, match="resume"):
        train(_config(), out, studies=studies, resume=False)
    with pytest.raises(CxrError, match="different settings"):
        train(_config(backbone="nin"), out, studies=studies)

    resumed = []
    train(_config(), out, studies=studies, on_epoch=lambda p, e, r: resumed.append((p, e)))
    assert resumed[0] == ("cnn1", 2)  # epoch 1 was not redone
    assert {p for p, _ in resumed} == {"cnn1", "rnn1", "cnn2", "ground", "rnn2"}
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [(h["phase"], h["epoch"]) for h in history if h["phase"] == "cnn1"] == [("cnn1", 1), ("cnn1", 2)]

    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "cascade" and config["cxr_version"]
    assert config["targets"] == ["normal", "Cardiomegaly", "Opacity"]
    assert set(config["thresholds"]) == set(config["targets"]) == set(config["calibration"]["params"])
    assert len(config["refined"]["names"]) == config["architecture"]["num_classes"] > 3  # the cascade split labels
    assert all(0 <= p < 3 for p in config["refined"]["parents"])
    assert config["vocabulary"][:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "opacity" in config["vocabulary"]
    # ChestX-ray8's box rule, the default: thresholds 180 and 60 of 255
    assert config["localization"]["threshold"] == pytest.approx(180 / 255)
    assert config["localization"]["also"] == [pytest.approx(60 / 255)]
    assert config["data"]["spec"] == "folder:synthetic" and config["data"]["split_seed"] == 0
    patients = config["data"]["patients"]
    assert not set(patients["train"]) & set(patients["test"])
    stage1 = json.loads((out / "stage1" / "config.json").read_text())
    assert stage1["stage"] == "stage1" and stage1["refined"]["names"] == stage1["targets"]
    assert (out / "stage1" / "weights.safetensors").exists()

    assert not list((out / "state").glob("*.safetensors"))  # resume state dropped once finished
    # a finished run returns at once
    again = []
    train(_config(), out, studies=studies, on_epoch=lambda p, e, r: again.append(p))
    assert again == []

    import shutil

    shutil.rmtree(out / "state")
    with pytest.raises(CxrError, match="already holds a trained run"):
        train(_config(), out, studies=studies)

    splits = split_studies(load_spec(out), studies)
    assert {s.patient_id for s in splits["test"]} == set(patients["test"])
    assert sum(len(v) for v in splits.values()) == len(studies)


def test_without_cascade_and_with_class_weights(tmp_path, studies):
    """Also: an unreadable file is left out (and named in the config), the run goes on."""
    import dataclasses

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"broken")
    broken = dataclasses.replace(studies[0], id="broken", images=[dataclasses.replace(studies[0].images[0], path=bad)])
    out = train(_config(cascade=False, class_weighted=True, data_dropout=False, rnn="lstm", boxes="threshold",
                        localize_threshold=0.4), tmp_path / "r", studies=[*studies, broken])
    config = json.loads((out / "config.json").read_text())
    assert list(config["data"]["unreadable"]) == [str(bad)]
    assert config["stage"] == "stage1" and not (out / "stage1").exists()
    assert config["architecture"]["rnn"] == "lstm"
    assert config["train_config"]["class_weighted"] is True
    # the box rule is stored in the run: here one threshold (the default is ChestX-ray8's, below)
    from cxr.checkpoint import load_spec

    assert load_spec(out).localization.thresholds == (0.4,)


def test_image_cache_is_built_once(tmp_path, studies):
    from cxr.dataset import build_cache

    paths = [str(s.images[0].path) for s in studies[:5]]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths.append(str(bad))
    a, failed = build_cache(paths, 32, tmp_path, progress=False)
    assert list(failed) == [5] and "bad.png" in failed[5]
    files = list(tmp_path.glob("images-*.npy"))
    assert len(files) == 1 and a.shape == (6, 32, 32) and a.dtype == np.uint16
    assert a[:5].max() > 0 and a[5].max() == 0
    mtime = files[0].stat().st_mtime_ns
    b, failed_again = build_cache(paths, 32, tmp_path, progress=False)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(a, b) and failed_again == failed
    assert len(list(tmp_path.glob("images-*.npy"))) == 1
    build_cache(paths[:4], 32, tmp_path, progress=False)  # another list, another cache
    assert len(list(tmp_path.glob("images-*.npy"))) == 2


def test_config_checks():
    with pytest.raises(CxrError, match="backbone"):
        TrainConfig(backbone="vgg")
    with pytest.raises(CxrError, match="crop"):
        TrainConfig(image_size=128, crop=224)
    with pytest.raises(CxrError, match="fractions"):
        TrainConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(CxrError, match="unknown boxes"):
        TrainConfig(boxes="yolo")
    assert TrainConfig.from_dict(TrainConfig(epochs=3).to_dict()).epochs == 3


def test_no_data_is_a_clear_error(tmp_path):
    with pytest.raises(CxrError, match="no training data"):
        train(TrainConfig(backbone="tiny"), tmp_path / "r")


def test_train_cli_on_a_folder(tmp_path, studies):
    """`cxr train --data folder:...` through the command table (a manifest gives the labels)."""
    import csv

    from cxr.cli import main

    rows = [{"path": str(s.images[0].path), "patient_id": s.patient_id,
             "labels": "|".join(f.raw or f.term for f in s.findings)} for s in studies]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    rc = main(["train", "--data", f"folder:{studies[0].images[0].path.parent},{manifest}",
               "--out", str(tmp_path / "run"), "--backbone", "tiny", "--image-size", "48", "--crop", "40",
               "--epochs", "1", "--rnn-epochs", "2", "--min-label-count", "2", "--no-cascade",
               "--rnn-hidden", "16", "--rnn-embed", "8", "--num-workers", "0", "--no-progress"])
    assert rc == 0 and (tmp_path / "run" / "config.json").exists()


DDP_SCRIPT = """
import hashlib, os, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from cxr.testing import synthetic_studies, tiny_config
from cxr.training import train

wrapped = []  # the modules cxr hands to DistributedDataParallel, to read their weights per rank
class Recording(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        wrapped.append(module)
torch.nn.parallel.DistributedDataParallel = Recording

def digest():
    h = hashlib.sha256()
    for p in wrapped[-1].parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

out = Path(sys.argv[1])
studies = synthetic_studies(out / ("data" + os.environ["RANK"]), n=16, size=40)
def on_epoch(phase, epoch, record):  # one file per rank: torchrun interleaves the ranks' stdout
    with open(out / ("rank" + os.environ["RANK"] + ".txt"), "a") as f:
        print("RESULT", os.environ["RANK"], torch.distributed.get_world_size(), phase, epoch,
              record.get("images"), round(record.get("train_loss", 0.0), 6), digest(), file=f)
train(tiny_config(data="folder:synthetic", image_size=40, crop=32, epochs=1, rnn_epochs=1, cascade=False,
                  fractions=(0.75, 0.25, 0.0)),
      out / "run", studies=studies, on_epoch=on_epoch)
"""


@pytest.mark.slow
def test_distributed_data_parallel_on_cpu(tmp_path):
    """torchrun with 2 processes, gloo backend: each rank trains on its own half of the epoch (its
    loss differs), yet after the step every rank holds the same weights: gradients are averaged."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split()[1:] for rank in (0, 1)
            for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()]
    by_rank = {rank: {(phase, epoch): (images, loss, weights) for _, _, phase, epoch, images, loss, weights
                      in (r for r in rows if r[0] == rank)} for rank in ("0", "1")}
    assert {r[1] for r in rows} == {"2"} and by_rank["0"] and by_rank["0"].keys() == by_rank["1"].keys()
    for step, (images, loss, weights) in by_rank["0"].items():
        other = by_rank["1"][step]
        assert images == other[0], step                 # equal shares of the epoch
        assert weights == other[2], step                # the same weights on both ranks
    cnn = [step for step in by_rank["0"] if by_rank["0"][step][1] != by_rank["1"][step][1]]
    assert cnn, "the ranks saw the same data: equal weights would prove nothing"
    assert (tmp_path / "run" / "config.json").exists()


def test_same_config_same_weights(tmp_path, studies):
    """Seeded: two runs of one config give bit-identical weights (CPU)."""
    from cxr.checkpoint import weights_hash

    cfg = _config(epochs=1, rnn_epochs=2, cascade=False)
    a = train(cfg, tmp_path / "a", studies=studies)
    b = train(cfg, tmp_path / "b", studies=studies)
    assert weights_hash(a) == weights_hash(b)
    from cxr.checkpoint import load_spec
    from cxr.models.localize import CHESTXRAY8_THRESHOLDS

    assert load_spec(a).localization.thresholds == pytest.approx(CHESTXRAY8_THRESHOLDS)  # the default box rule
    c = train(_config(epochs=1, rnn_epochs=2, cascade=False, seed=1), tmp_path / "c", studies=studies)
    assert weights_hash(c) != weights_hash(a)


def test_one_trainer_per_run_dir(tmp_path, studies):
    pytest.importorskip("fcntl")
    (tmp_path / "r" / "state").mkdir(parents=True)
    with open(tmp_path / "r" / "state" / ".lock", "w") as held:  # another process's lock
        import subprocess
        import sys

        holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'w'); "
                                   "fcntl.flock(f, fcntl.LOCK_EX); print('x', flush=True); time.sleep(60)",
                                   held.name], stdout=subprocess.PIPE, text=True)
        try:
            holder.stdout.readline()
            with pytest.raises(CxrError, match="another process"):
                train(_config(epochs=1, rnn_epochs=1, cascade=False), tmp_path / "r", studies=studies)
        finally:
            holder.kill()
            holder.wait()


def test_a_heatmap_threshold_without_the_one_threshold_rule_is_refused(tmp_path, capsys):
    """`--localize-threshold` would be stored and never used under ChestX-ray8's box rule (the
    default): the command says so, in one line, before reading any data."""
    from cxr.cli import main

    code = main(["train", "--data", f"folder:{tmp_path}", "--out", str(tmp_path / "run"),
                 "--localize-threshold", "0.3"])
    err = capsys.readouterr().err
    assert code != 0 and "--boxes threshold" in err and "Traceback" not in err


def test_box_source_follows_whether_the_words_say_where(tmp_path, studies):
    """auto: the grounded finding map gives the boxes when the training annotations name sides
    and sites (its presence loss learns where from them); with labels that name no place (NIH's)
    the map written with the finding's word does, and the Reader draws that map; --box-source
    overrides, and a global-annotator run keeps the CAM (its words on a CPU from its ONNX Runtime
    step: those of PyTorch)."""
    import dataclasses

    from cxr.reader import Reader
    from cxr.training.pipeline import where_share

    assert where_share([["opacity", "lung", "base", "left"], ["cardiomegaly", "mild"]]) == 0.5
    placed = load_spec(train(_config(), tmp_path / "placed", studies=studies))
    assert placed.localization.source == "attention"
    bare = [dataclasses.replace(s, findings=[dataclasses.replace(f, side=None, location=(), raw="")
                                              for f in s.findings]) for s in studies]
    run = train(_config(), tmp_path / "bare", studies=bare)
    assert load_spec(run).localization.source == "word"
    reader = Reader.load(run, gate=False)
    hits = [f for s in studies for r in [reader(s.images[0].path)] for f in r.findings
            if f.disease != "normal" and f.annotation]
    assert hits, "no finding written on the synthetic films"
    result = next(r for s in studies for r in [reader(s.images[0].path)]
                  if any(f.disease != "normal" and f.annotation for f in r.findings))
    f = next(f for f in result.findings if f.disease != "normal" and f.annotation)
    first_word = f.annotation.split()[0]
    assert np.array_equal(result.heatmaps[f.disease], result.heatmaps[f"{f.disease}:{first_word}"])
    assert load_spec(train(_config(box_source="cam"), tmp_path / "cam", studies=bare)).localization.source == "cam"
    glob = train(_config(annotator="global"), tmp_path / "glob", studies=studies)
    assert load_spec(glob).localization.source == "cam"
    # the global annotator's words on a CPU come from its ONNX Runtime step: those of PyTorch
    reader, films, read = Reader.load(glob, device="cpu", gate=False), [s.images[0].path for s in studies], {}
    for on in (True, False):
        reader.onnx_decoding = on
        read[on] = [f.annotation for r in reader(films) for f in r.findings]
    assert read[True] == read[False] and any(read[True])
    assert reader._graphs.get(reader.rnn) or importlib.util.find_spec("onnxruntime") is None
    with pytest.raises(CxrError, match="grounded"):
        TrainConfig(annotator="global", box_source="word")


@pytest.mark.parametrize("pooling", ["avg", "class_lse"])
def test_members_train_read_and_export_as_one_model(studies, tmp_path, pooling):
    """`--members 2`: the run records it, the Reader builds the same network and reads, the
    members' trunks were trained apart (different weights), and the exported graph gives the
    Reader's scores (class_lse: each member pools its own class maps)."""
    from cxr.cli import main
    from cxr.reader import Reader

    run = train(_config(members=2, cascade=False, pooling=pooling), tmp_path / "run", studies=studies)
    assert load_spec(run).architecture.members == 2
    reader = Reader.load(run, gate=False)
    trunks = reader.cnn.features.trunks
    assert len(trunks) == 2 and not torch.equal(trunks[0][0][0].weight, trunks[1][0][0].weight)
    film = studies[0].images[0].path
    want = reader(film)
    assert want.embedding.shape == (reader.cnn.num_features,) and want.findings
    pytest.importorskip("onnxruntime")
    assert main(["export", str(run), "--onnx"]) == 0
    got = Reader.load(run, gate=False, engine="onnxruntime")(film)
    assert max(abs(got.scores[k] - want.scores[k]) for k in want.scores) < 1e-3
    with pytest.raises(CxrError, match="transition"):
        _config(members=2, transition=8)


def test_class_lse_pooling_trains_reads_and_exports(tmp_path):
    """`--pooling class_lse` on phantom films (which have `normal`): the run keeps `normal` mean-
    pooled through the cascade, the Reader rebuilds the same head from the run alone, its scores
    are the network's own, and the exported graph gives the Reader's scores."""
    from cxr.cli import main
    from cxr.reader import Reader
    from cxr.testing import make_tiny_run

    run = make_tiny_run(tmp_path, n=20, size=48, phantom=None, pooling="class_lse", epochs=2,
                        cascade_epochs=1, rnn_epochs=2)
    spec = load_spec(run)
    assert spec.architecture.pooling == "class_lse"
    reader = Reader.load(run, gate=False)
    head = reader.cnn.head
    normal = spec.targets.index("normal")
    assert head.mean_pooled.tolist() == [p == normal for p in spec.refined.parents]
    assert head.mean_pooled.any() and not head.mean_pooled.all()
    film = next((tmp_path / "data").rglob("*.png"))
    want = reader(film)
    assert set(want.scores) and all(0.0 <= v <= 1.0 for v in want.scores.values())
    pytest.importorskip("onnxruntime")
    assert main(["export", str(run), "--onnx"]) == 0
    got = Reader.load(run, gate=False, engine="onnxruntime")(film)
    assert max(abs(got.scores[k] - want.scores[k]) for k in want.scores) < 1e-3


def test_ensemble_merges_networks_trained_apart_into_one_run(studies, tmp_path):
    """`--ensemble 2`: two networks (seeds 0 and 1, one patient split) become one members-2 run
    whose logits are the mean of theirs, whose words and maps are the first network's (the plain
    run of seed 0), calibrated on the shared validation patients; it reads and resumes as a run."""
    from cxr.reader import Reader
    from cxr.training.ensemble import member_dirs

    def stop_in_second_network(phase, epoch, record):
        if (phase, epoch) == ("m1:cnn1", 1):
            raise Interrupt

    with pytest.raises(Interrupt):  # interrupted in the second network: resumes from there
        train(_config(ensemble=2, cascade=False), tmp_path / "run", studies=studies,
              on_epoch=stop_in_second_network)
    assert len(member_dirs(tmp_path / "run")) == 1 and not (tmp_path / "run" / "config.json").exists()
    first_weights = (tmp_path / "run" / "members" / "0" / "weights.safetensors").read_bytes()
    seen = []
    run = train(_config(ensemble=2, cascade=False), tmp_path / "run", studies=studies,
                on_epoch=lambda phase, epoch, record: seen.append((phase, epoch)))
    assert not any(phase.startswith("m0:") for phase, _ in seen) and ("m1:cnn1", 1) not in seen
    assert (run / "members" / "0" / "weights.safetensors").read_bytes() == first_weights
    nets = member_dirs(run)
    spec, specs = load_spec(run), [load_spec(d) for d in nets]
    assert len(nets) == 2 and spec.architecture.members == 2 and spec.stage == "ensemble"
    assert [s.seed for s in specs] == [0, 1] and specs[0].data.patients == specs[1].data.patients == spec.data.patients
    merged, parts = Reader.load(run, gate=False), [Reader.load(d, gate=False) for d in nets]
    assert not torch.equal(parts[0].cnn.head.weight, parts[1].cnn.head.weight)  # trained apart
    from cxr.images import load_image

    films = [load_image(s.images[0].path) for s in studies[:6]]
    feats, own = merged.forward(films), [p.forward(films) for p in parts]
    assert torch.allclose(feats.logits, (own[0].logits + own[1].logits) / 2, atol=1e-5)
    # the first network's annotator on its own channels: the same words and finding map
    both = torch.arange(len(films)) % len(merged.targets)
    words = merged._ground(list(range(len(films))), both.tolist(), feats.maps)
    first = parts[0]._ground(list(range(len(films))), both.tolist(), own[0].maps)
    assert words["tokens"] == first["tokens"]
    assert torch.allclose(words["finding"], first["finding"], atol=1e-5)
    assert spec.validation["val_images"] == specs[0].validation["val_images"]
    assert train(_config(ensemble=2, cascade=False), tmp_path / "run", studies=studies) == run  # finished: kept
    with pytest.raises(CxrError, match="no-cascade"):
        _config(ensemble=2)
    with pytest.raises(CxrError, match="members 1"):
        _config(ensemble=2, members=2, cascade=False)
