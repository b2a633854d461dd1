"""`train(config, out)`: the whole recurrent neural cascade, stage by stage, resumable.

Phases (each saved every epoch under RUN/state/, skipped when done on resume):
  cnn1  CNN on the mined targets              -> rnn1  RNN on the CNN's embeddings
  -> calibrate + write RUN/stage1/ (the model before the cascade, a complete run)
  cascade: joint contexts of the training (image, finding) pairs -> k-means per target
  cnn2  CNN on the refined labels (started from cnn1, refined heads copied from their disease)
  rnn2  RNN on the new embeddings (started from rnn1)
  -> calibrate + write RUN/ (config.json + weights.safetensors)
Without the cascade, stage 1 is written to RUN/ directly (and RUN/stage1/ is not made).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..atomic import write_atomic
from ..checkpoint import prefixed, save_run
from ..dataset import build_cache
from ..errors import CxrError
from ..models.annotator import Annotator
from ..models.cascade import RefinedLabels, output_probabilities, refine, to_original
from ..models.cnn import create_cnn, load_pretrained
from ..models.localize import chestxray8_params
from ..preprocess import MEAN, STD, STRETCH
from ..records import MAX_TOKENS, Study
from ..runspec import Architecture, Calibration, DataSpec, LabelMining, LocalizeParams, Preprocessing, RunSpec
from ..calibration import apply_platt, logit
from ..operating import OperatingPoint, abnormal_truth, choose, finding_threshold
from .calibration import fit_platt
from .config import TrainConfig
from .loops import (Context, infer, load_phase_weights, mean_auc, phase_done, sequences, train_cnn,
                    train_rnn)
from .prepare import NORMAL, Prepared, prepare


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CxrError(f"device {cfg.device!r} asked for but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend)
    return rank, world, local


def load_studies(cfg: TrainConfig) -> list[Study]:
    if not cfg.data:
        raise CxrError("no training data: give a source such as phantom:DIR or openi:DIR")
    from ..sources import open_source

    return open_source(cfg.data)


def _state_matches(out: Path, cfg: TrainConfig) -> dict | None:
    path = out / "state" / "progress.json"
    if not path.exists():
        return None
    progress = json.loads(path.read_text())
    differ = TrainConfig.from_dict(progress["config"]).same_run(cfg)
    if differ:
        raise CxrError(f"holds a run with different settings ({', '.join(differ)}); "
                       "choose another --out or delete it", out)
    return progress


@contextlib.contextmanager
def _locked(out: Path, enabled: bool = True):
    """One training process per run dir: an exclusive lock on RUN/state/.lock while train() runs,
    so two `cxr train` commands cannot interleave their epochs."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    (out / "state").mkdir(parents=True, exist_ok=True)
    with open(out / "state" / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CxrError("another process is training into this run directory", out) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train(config: TrainConfig, out: str | Path, studies: list[Study] | None = None, resume: bool = True,
          on_epoch: Callable[[str, int, dict], None] | None = None) -> Path:
    """Train the cascade into run dir `out`; returns `out`. `studies` overrides `config.data`
    (the spec is still recorded). An interrupted run continues from its last finished epoch when
    called again with the same settings (`resume=False` refuses to touch an existing run).
    `on_epoch(phase, epoch, record)` is called after each saved epoch."""
    cfg = config
    out = Path(out).expanduser()
    progress = _state_matches(out, cfg)
    if progress is None and (out / "config.json").exists():
        raise CxrError("already holds a trained run; choose another --out", out)
    if progress is not None and not resume:
        raise CxrError("already holds a (partial) run; resume it or choose another --out", out)
    if progress is not None and progress.get("finished") and (out / "config.json").exists():
        return out
    rank, world, local = _distributed()
    with _locked(out, enabled=rank == 0):
        if cfg.ensemble > 1:
            return _train_ensemble(cfg, out, studies, on_epoch, rank)
        return _train(cfg, out, progress, studies, rank, world, local, on_epoch)


def _train(cfg: TrainConfig, out: Path, progress: dict | None, studies, rank: int, world: int, local: int,
           on_epoch) -> Path:
    device = _device(cfg, local)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    prep, mining = _prepare_data(cfg, out, studies, rank, (progress or {}).get("prepared") or {})
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or {"config": cfg.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "prepared": {"patient_split": prep.patient_split, "targets": prep.targets,
                                         "words": prep.words}, "phases": {}}
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else out / "cache"
    if rank == 0:
        images, failed = build_cache(prep.paths, cfg.image_size, cache_dir, cfg.num_workers, cfg.progress)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        images, failed = build_cache(prep.paths, cfg.image_size, cache_dir, cfg.num_workers, False)
    prep.leave_out(failed)  # unreadable files are left out of every split (and listed in the run config)
    if failed:
        if rank == 0:
            import sys

            print(f"cxr train: {len(failed)} unreadable image(s) left out, e.g. "
                  f"{next(iter(failed.values()))}", file=sys.stderr)
        if len(failed) == len(prep.paths):
            raise CxrError("none of the training images could be read", cache_dir)
    ctx = Context(cfg, out, device, images, rank, world, progress, on_epoch)
    ctx.mining = mining
    ctx.save_progress()
    return _run(ctx, prep)


def _prepare_data(cfg: TrainConfig, out: Path, studies: list[Study] | None, rank: int,
                  stored: dict) -> tuple[Prepared, object]:
    """The studies of `cfg.data` (or `studies`), labelled (mined from the reports with
    `--labels-from report`) and prepared: split, targets and words as `stored` gives them (a
    resumed run's, or an ensemble's first network's), else from the split seed."""
    if studies is None:
        studies = load_studies(cfg)
    if cfg.max_images:
        studies = studies[:cfg.max_images]
    mining = None
    if cfg.labels_from == "report":
        studies, mining = _labels_from_reports(studies, cfg, out, rank)
    prep = prepare(studies, cfg.views, cfg.fractions, cfg.patient_split_seed, cfg.min_label_count,
                   patient_split=stored.get("patient_split"), targets=stored.get("targets"),
                   words=stored.get("words"), label_space=cfg.labels)
    return prep, mining


def _labels_from_reports(studies: list[Study], cfg: TrainConfig, out: Path, rank: int):
    """`--labels-from report`: every study's findings mined from its report text
    (`cxr.reports.report_labels`), the records kept in RUN/mined_labels.jsonl."""
    import sys

    from ..reports.report_labels import RECORDS, note_summary, write_records

    studies, records = _mined(studies, cfg.uncertain)
    left_out = sum(1 for r in records if r.get("note"))
    if left_out == len(records):
        raise CxrError(f"no study has a usable report to mine labels from ({note_summary(records)})",
                       cfg.data or None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_records(out / RECORDS, records)
        summary = note_summary(records)
        if summary:
            print(f"cxr train: {summary}", file=sys.stderr)
    return studies, LabelMining(uncertain=cfg.uncertain, records=RECORDS,
                                studies=len(records) - left_out, left_out=left_out)


_MINED: dict | None = None  # while an ensemble trains: the reports it mined, by (policy, study ids)


@contextlib.contextmanager
def _mining_once():
    """The networks of `--ensemble K` and their merge read the same reports: they are mined once
    (the miner reads about 300 reports/s, `benchmarks/mining.py`: minutes per network for a
    MIMIC-CXR-sized archive), and forgotten when the ensemble is done."""
    global _MINED
    _MINED = {}
    try:
        yield
    finally:
        _MINED = None


def _mined(studies: list[Study], uncertain: str):
    from ..reports.report_labels import label_studies

    if _MINED is None:
        return label_studies(studies, uncertain)
    key = (uncertain, tuple(s.id for s in studies))
    if key not in _MINED:
        _MINED[key] = label_studies(studies, uncertain)
    return _MINED[key]


def _train_ensemble(cfg: TrainConfig, out: Path, studies, on_epoch, rank: int) -> Path:
    with _mining_once():
        return _train_networks(cfg, out, load_studies(cfg) if studies is None else studies, on_epoch, rank)


def _train_networks(cfg: TrainConfig, out: Path, studies, on_epoch, rank: int) -> Path:
    """`--ensemble K` (`cxr.training.ensemble`): the K networks, each a resumable run of its own
    under RUN/members/j, then their merged run in `out`."""
    import sys

    from ..checkpoint import load_spec, load_tensors
    from .ensemble import MEMBERS_DIR, check_compatible, member_config, merge_tensors

    progress = out / "state" / "progress.json"
    if rank == 0:
        write_atomic(progress, json.dumps({"config": cfg.to_dict(), "ensemble": cfg.ensemble}, indent=1))
    runs = []
    for j in range(cfg.ensemble):
        if rank == 0 and cfg.progress:
            print(f"cxr train: network {j + 1} of {cfg.ensemble} (seed {cfg.seed + j})", file=sys.stderr)
        hook = (lambda phase, epoch, record, j=j: on_epoch(f"m{j}:{phase}", epoch, record)) if on_epoch else None
        runs.append(train(member_config(cfg, j, out), out / MEMBERS_DIR / str(j), studies=studies,
                          on_epoch=hook))
    if rank != 0:
        return out
    specs = [load_spec(r) for r in runs]
    check_compatible(specs)
    merged = merge_tensors([load_tensors(r / "weights.safetensors") for r in runs])
    write_merged(cfg, out, merged, specs[0], studies)
    write_atomic(progress, json.dumps({"config": cfg.to_dict(), "ensemble": cfg.ensemble, "finished": True},
                                      indent=1))
    return out


def write_merged(cfg: TrainConfig, out: Path, tensors: dict[str, torch.Tensor], first,
                 studies: list[Study] | None) -> None:
    """An ensemble's merged run (`cxr.training.ensemble`): the networks' weights as one
    members-K network, calibrated and its operating points chosen on the validation patients
    they share, written as `_write_run` writes any run."""
    from ..checkpoint import unprefixed

    device = _device(cfg, 0)
    prep, mining = _prepare_data(cfg, out, studies, 0, {"patient_split": first.data.patients,
                                                        "targets": list(first.targets),
                                                        "words": list(first.vocabulary)})
    images, failed = build_cache(prep.paths, cfg.image_size, Path(cfg.cache_dir or out / "cache").expanduser(),
                                 cfg.num_workers, False)
    prep.leave_out(failed)
    arch = first.architecture
    cnn = create_cnn(cfg.backbone, len(prep.targets), drop=cfg.dropout, pooling=cfg.pooling, lse_r=cfg.lse_r,
                     batch_norm=cfg.batch_norm, members=cfg.ensemble)
    cnn.load_state_dict(unprefixed("cnn", tensors))
    rnn = Annotator(len(prep.words), len(prep.targets), cnn.num_features, arch.rnn_hidden, arch.rnn_embed, arch.rnn)
    rnn.load_state_dict(unprefixed("rnn", tensors))
    ground = None
    if arch.annotator == "grounded":
        from ..models.grounded import GroundedAnnotator, field_word_ids

        ground = GroundedAnnotator(len(prep.words), len(prep.targets), cnn.num_features,
                                   field_word_ids(prep.words), arch.rnn_hidden, arch.rnn_embed, arch.rnn,
                                   arch.attn_dim, vocab=prep.words)
        ground.load_state_dict(unprefixed("ground", tensors))
    ctx = Context(cfg, out, device, images, progress={"pretrained": first.pretrained})
    ctx.mining = mining
    cnn.to(device)
    _write_run(ctx, out, "ensemble", cnn, rnn, prep, RefinedLabels.identity(prep.targets), prep.scored("val"),
               ground)


def _run(ctx: Context, prep: Prepared) -> Path:
    cfg = ctx.cfg
    train_idx, val_idx = prep.indices("train"), prep.indices("val")
    if len(train_idx) == 0:
        raise CxrError("the training split is empty")
    scored_val = prep.scored("val")  # every label known (see Prepared.scored)
    n_t = len(prep.targets)
    normal_col = prep.targets.index(NORMAL) if NORMAL in prep.targets else None

    # ---- stage 1: CNN on the mined targets, then the RNN
    cnn = create_cnn(cfg.backbone, n_t, drop=cfg.dropout, pooling=cfg.pooling, lse_r=cfg.lse_r,
                     transition=cfg.transition, batch_norm=cfg.batch_norm, members=cfg.members)
    if normal_col is not None:
        cnn.pool_as_mean([normal_col])
    if cfg.pretrained and not ctx.progress["phases"].get("cnn1"):
        report = load_pretrained(cnn, cfg.pretrained)
        ctx.progress["pretrained"] = {"path": str(cfg.pretrained), "loaded": len(report["loaded"]),
                                      "missing": report["missing"], "unexpected": report["unexpected"],
                                      "mismatched": report["mismatched"]}
        if ctx.main:
            import sys

            print(f"cxr train: pretrained {cfg.pretrained}: {len(report['loaded'])} tensors loaded, "
                  f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
                  f"{len(report['mismatched'])} of another shape", file=sys.stderr)
    identity = RefinedLabels.identity(prep.targets)
    evaluate = _evaluator(ctx, cnn, prep, scored_val, identity)
    halves = side_halves(prep, len(prep.targets)) if cfg.side_mil else None
    if halves is not None and np.isnan(halves).all():  # no side word in the labels (NIH): nothing to learn
        halves = None
    train_cnn(ctx, "cnn1", cnn, prep.labels, train_idx, cfg.epochs, evaluate, normal_col, mask=prep.mask,
              halves=halves)
    ground = None
    if not cfg.cascade:
        ground = _train_grounding(ctx, "ground", cnn, prep.labels, prep, train_idx, prep.mask)
    rnn = Annotator(len(prep.words), n_t, cnn.num_features, cfg.rnn_hidden, cfg.rnn_embed, cfg.rnn)
    rnn = _train_annotator(ctx, "rnn1", cnn, rnn, prep, train_idx, val_idx)
    final_dir = ctx.out / "stage1" if cfg.cascade else ctx.out
    if not (ctx.progress.get("stage1_written") and (final_dir / "config.json").exists()):
        _write_run(ctx, final_dir, "stage1", cnn, rnn, prep, identity, scored_val, ground)
        ctx.progress["stage1_written"] = True
        ctx.save_progress()

    # ---- the cascade: refine labels by joint image/text context, retrain CNN then RNN
    if cfg.cascade:
        refined, pair_refined = _refine(ctx, cnn, rnn, prep, train_idx)
        labels2 = np.zeros((len(prep.paths), len(refined.names)), dtype=np.float32)
        train_rows = set(train_idx.tolist())
        train_pairs = [p for p in prep.pairs if p[0] in train_rows]
        for (i, _, _), r in zip(train_pairs, pair_refined):
            labels2[i, r] = 1
        # an unknown target leaves all its refined labels unknown
        mask2 = None if prep.mask is None else prep.mask[:, refined.parents].copy()
        if not ctx.progress["phases"].get("cnn2"):
            cnn.reset_head(len(refined.names), refined.parents)
        else:
            cnn.reset_head(len(refined.names))
        evaluate = _evaluator(ctx, cnn, prep, scored_val, refined)
        # data dropout in stage 2 decides on the original targets (normal = all normal sub-labels)
        halves2 = None
        if halves is not None:  # a refined label carries its disease's sides where the image has it
            halves2 = halves[:, refined.parents].copy()
            halves2[labels2 < 0.5] = np.nan
        train_cnn(ctx, "cnn2", cnn, labels2, train_idx, cfg.cascade_epochs or cfg.epochs, evaluate,
                  normal_col, sample_labels=prep.labels, mask=mask2, halves=halves2)
        ground = _train_grounding(ctx, "ground", cnn, labels2, prep, train_idx, mask2)
        rnn = _train_annotator(ctx, "rnn2", cnn, rnn, prep, train_idx, val_idx)
        _write_run(ctx, ctx.out, "cascade", cnn, rnn, prep, refined, scored_val, ground)
    ctx.progress["finished"] = True
    ctx.save_progress()
    if ctx.main:  # the phases' weights and optimizer moments are only needed to resume
        for f in ctx.state_dir.glob("*.safetensors"):
            f.unlink()
    return ctx.out


def side_halves(prep: Prepared, n_targets: int) -> np.ndarray:
    """(N, targets, 2): per image and disease, whether each image half holds it, from the side
    words of its annotations (a left and a right finding: both); NaN where unknown (no side
    word, or a finding of that disease without one: then only the named halves are known)."""
    from ..models.grounded import SIDE_HALVES  # image-left half = the patient's right on a PA film

    out = np.full((len(prep.paths), n_targets, 2), np.nan, dtype=np.float32)
    unsided = set()
    for i, t, tokens in prep.pairs:
        side = next((w for w in tokens if w in SIDE_HALVES), None)
        if side is None:
            unsided.add((i, t))
            continue
        now = np.nan_to_num(out[i, t], nan=0.0)
        out[i, t] = np.maximum(now, SIDE_HALVES[side])
    for i, t in unsided:
        out[i, t][out[i, t] == 0] = np.nan
    return out


def _train_grounding(ctx: Context, phase: str, cnn, labels: np.ndarray, prep: Prepared, train_idx,
                     mask: np.ndarray | None = None):
    """The grounded annotator, trained jointly with the CNN (which it fine-tunes) after the last
    CNN phase; None when the run uses Shin's global annotator."""
    cfg = ctx.cfg
    if cfg.annotator != "grounded":
        return None
    from ..models.grounded import GroundedAnnotator, field_word_ids
    from .grounding import finding_text, text_tokens, text_vocabulary, train_joint

    texts = None
    text_vocab: list[str] = []
    if cfg.report_text:
        raw = [finding_text(prep.reports[i], tokens) for i, _, tokens in prep.pairs]
        rows = set(train_idx.tolist())
        text_vocab = text_vocabulary([t for (i, _, _), t in zip(prep.pairs, raw) if i in rows])
        texts = text_tokens(raw, text_vocab)
    model = GroundedAnnotator(len(prep.words), len(prep.targets), cnn.num_features,
                              field_word_ids(prep.words), cfg.rnn_hidden, cfg.rnn_embed, cfg.rnn,
                              cfg.attn_dim, text_vocab_size=len(text_vocab), vocab=prep.words)
    train_joint(ctx, phase, cnn, model, labels, train_idx, prep.pairs, prep.word_index,
                cfg.ground_epochs, cfg.ground_lr, texts,
                cnn_lr_scale=cfg.ground_cnn_lr, mask=mask)
    return model


def _evaluator(ctx: Context, cnn, prep: Prepared, val_idx: np.ndarray, refined: RefinedLabels):
    if len(val_idx) == 0:
        return None

    def evaluate() -> dict:
        logits, _ = infer(ctx, cnn, val_idx)
        probs = _target_probabilities(ctx, logits, refined, len(prep.targets))
        y = prep.labels[val_idx]
        eps = 1e-6
        bce = float(-np.mean(y * np.log(probs + eps) + (1 - y) * np.log(1 - probs + eps)))
        auc = mean_auc(y, probs)
        return {"val_loss": bce, **({"val_auc": auc} if auc is not None else {}), **_top1(ctx, y, probs)}

    return evaluate


def _head(ctx: Context) -> str:
    return "softmax" if ctx.cfg.labels == "shin2016" else "sigmoid"


def _target_probabilities(ctx: Context, logits: torch.Tensor, refined: RefinedLabels, n_t: int) -> np.ndarray:
    """Per-target probabilities of CNN logits, refined labels folded back (what the Reader does)."""
    head = _head(ctx)
    return to_original(output_probabilities(logits, head), refined, n_t, head)


def _top1(ctx: Context, y: np.ndarray, probs: np.ndarray) -> dict:
    """Shin et al.'s measure for the one-pattern set-up: share of images whose highest-scoring
    pattern is theirs."""
    if ctx.cfg.labels != "shin2016" or len(y) == 0:
        return {}
    return {"val_top1": float((probs.argmax(1) == y.argmax(1)).mean())}


def _train_annotator(ctx: Context, phase: str, cnn, rnn: Annotator, prep: Prepared, train_idx, val_idx):
    all_idx = np.arange(len(prep.paths))
    if phase_done(ctx, phase):
        load_phase_weights(ctx, phase, {"rnn": rnn})
        return rnn.to(ctx.device)
    _, emb = infer(ctx, cnn, all_idx)
    wi = prep.word_index
    train_seqs = sequences(prep.pairs, set(train_idx.tolist()), wi)
    val_seqs = sequences(prep.pairs, set(val_idx.tolist()), wi)
    return train_rnn(ctx, phase, rnn, emb, train_seqs, val_seqs, ctx.cfg.rnn_epochs)


def _refine(ctx: Context, cnn, rnn: Annotator, prep: Prepared, train_idx) -> tuple[RefinedLabels, list[int]]:
    """Joint contexts of the training pairs -> k-means per target (stored for resuming)."""
    if ctx.progress.get("refined"):
        return RefinedLabels.from_dict(ctx.progress["refined"]), ctx.progress["pair_refined"]
    _, emb = infer(ctx, cnn, np.arange(len(prep.paths)))
    img, lab, tok = sequences(prep.pairs, set(train_idx.tolist()), prep.word_index)
    rnn.eval()
    with torch.no_grad():
        ctxv = rnn.context(emb[img].to(ctx.device), lab.to(ctx.device), tok.to(ctx.device)).cpu().numpy()
    refined, assigned = refine(ctxv, lab.numpy(), prep.targets, ctx.cfg.min_cluster_members,
                               ctx.cfg.images_per_cluster, ctx.cfg.seed)
    pair_refined = assigned.tolist()
    if ctx.world > 1:  # every rank uses rank 0's clustering
        box = [refined.to_dict(), pair_refined]
        torch.distributed.broadcast_object_list(box, 0)
        refined, pair_refined = RefinedLabels.from_dict(box[0]), box[1]
    ctx.progress["refined"] = refined.to_dict()
    ctx.progress["pair_refined"] = pair_refined
    ctx.save_progress()
    return refined, pair_refined


THRESHOLD_RULE = ("study: abnormal probability >= the threshold meeting {point} on the validation "
                  "patients; finding: reported only in a study called abnormal, at max F1 among the "
                  "validation studies called abnormal, shrunk toward .5 by n/(n+10) for n validation "
                  "positives (.5 below 5); normal: reported exactly when the study is called normal")


def _calibrate(ctx: Context, cnn, prep: Prepared, refined: RefinedLabels, val_idx):
    """Platt per target on validation logits (after folding refined labels back), then the
    study-level gate and the finding thresholds (`cxr.operating`). Returns ({target: [a, b]},
    {target: t}, val metrics, StudyGate or None, the threshold rule)."""
    n_t = len(prep.targets)
    if len(val_idx) == 0:
        return ({t: [1.0, 0.0] for t in prep.targets}, {t: 0.5 for t in prep.targets}, {}, None,
                "no validation split: .5 for every target")
    logits, _ = infer(ctx, cnn, val_idx)
    raw = logit(_target_probabilities(ctx, logits, refined, n_t))
    y = prep.labels[val_idx]
    platt = fit_platt(raw, y)
    probs = apply_platt(raw, platt)
    abnormal = abnormal_truth(y, prep.targets)
    if 0 < abnormal.sum() < len(abnormal):
        point = OperatingPoint.parse(ctx.cfg.operating_point)
        gate, thresholds = choose(probs, y, prep.targets, point, fit_platt)
        rule = THRESHOLD_RULE.format(point=point)
    else:  # a validation split of one kind only (tiny runs): no study-level answer
        gate = None
        thresholds = {t: finding_threshold(probs[:, k], y[:, k]) for k, t in enumerate(prep.targets)}
        rule = "finding: max F1 on the validation split shrunk toward .5 (no study-level gate: " \
               "the validation split holds only normal or only abnormal studies)"
    auc = mean_auc(y, probs)
    metrics = {"val_images": int(len(val_idx)), **({"val_auc": auc} if auc is not None else {}),
               **_top1(ctx, y, probs)}
    if gate is not None:
        metrics.update({"val_study_sensitivity": gate.validation["sensitivity"],
                        "val_study_specificity": gate.validation["specificity"]})
    return ({t: list(p) for t, p in zip(prep.targets, platt)},
            {t: float(th) for t, th in thresholds.items()}, metrics, gate, rule)


WHERE_MIN = 0.1  # share of training annotations naming a side or site that teaches the finding map where


def where_share(sequences) -> float:
    """The share of annotation token lists that name a side or a site (left, base, upper lobe...)."""
    from ..reports.mesh import word_class

    seqs = list(sequences)
    where = sum(any(word_class(w) in ("side", "location") for w in tokens) for tokens in seqs)
    return where / len(seqs) if seqs else 0.0


def box_source(cfg: TrainConfig, grounded: bool, prep: Prepared, train_rows: np.ndarray) -> str:
    """The map a detected finding's boxes come from (`LocalizeParams.source`): `--box-source`, or
    for auto: with the grounded annotator its finding map when at least WHERE_MIN of the training
    annotations name a side or site (its presence loss learns where from those words alone, and on
    the phantom it localised best), else its map while writing the finding's word (with labels
    that name no place, as NIH's, the finding map learns none: on real NIH films the word map
    localised better than both it and the CAM, `benchmarks/real_nih.py`); the CAM without one."""
    if not grounded:  # Shin's annotator, or the cascade's first stage before the grounded one
        return "cam"
    if cfg.box_source != "auto":
        return cfg.box_source
    share = where_share(tokens for i, _, tokens in prep.pairs if train_rows[i])
    return "attention" if share >= WHERE_MIN else "word"


def _write_run(ctx: Context, run_dir: Path, stage: str, cnn, rnn: Annotator, prep: Prepared,
               refined: RefinedLabels, val_idx, ground=None) -> None:
    cfg = ctx.cfg
    calibration, thresholds, metrics, gate, rule = _calibrate(ctx, cnn, prep, refined, val_idx)
    temperature = {}
    if ground is not None:  # how sure the grounded annotator's side / site / grade words are
        from .grounding import word_temperatures

        temperature = word_temperatures(ctx, cnn, ground, prep.pairs, val_idx, prep.word_index,
                                        list(prep.targets))
    if not ctx.main:
        return
    counts = {name: int((prep.split == i).sum()) for i, name in enumerate(("train", "val", "test"))}
    train_rows = prep.split == 0
    spec = RunSpec(
        cxr_version=__version__,
        stage=stage,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        architecture=Architecture(backbone=cfg.backbone, num_classes=len(refined.names), in_chans=1,
                                  image_dim=cnn.num_features, rnn=cfg.rnn, rnn_hidden=cfg.rnn_hidden,
                                  rnn_embed=cfg.rnn_embed, vocab_size=len(prep.words),
                                  num_labels=len(prep.targets), max_tokens=MAX_TOKENS,
                                  pooling=cfg.pooling, lse_r=cfg.lse_r, transition=cfg.transition,
                                  annotator="grounded" if ground is not None else "global",
                                  attn_dim=cfg.attn_dim if ground is not None else 0,
                                  batch_norm=cfg.batch_norm, head=_head(ctx), members=cnn.members),
        targets=list(prep.targets),
        refined=refined,
        vocabulary=list(prep.words),
        preprocessing=Preprocessing(image_size=cfg.image_size, crop=cfg.crop, mean=MEAN, std=STD,
                                    stretch=STRETCH),
        calibration=Calibration(method="platt", params=calibration),
        thresholds=thresholds,
        threshold_rule=rule,
        localization=dataclasses.replace(
            chestxray8_params(cfg.max_boxes) if cfg.boxes == "chestxray8"
            else LocalizeParams(cfg.localize_threshold, cfg.max_boxes),
            source=box_source(cfg, ground is not None, prep, train_rows)),
        validation=metrics,
        train_config=cfg.to_dict(),
        pretrained=ctx.progress.get("pretrained"),
        data=DataSpec(spec=cfg.data, views=cfg.views, split_seed=cfg.patient_split_seed, fractions=list(cfg.fractions),
                      patients=prep.patient_split, counts=counts, unreadable=prep.unreadable,
                      label_counts={t: int(prep.labels[train_rows, k].sum())
                                    for k, t in enumerate(prep.targets)}),
        seed=cfg.seed,
        study=gate,
        labels_from=cfg.labels_from,
        label_mining=ctx.mining,
        word_temperature=temperature,
    )
    tensors = {**prefixed("cnn", cnn.state_dict()), **prefixed("rnn", rnn.state_dict())}
    if ground is not None:  # the report-text branch is for training only: not kept
        tensors.update(prefixed("ground", {k: v for k, v in ground.state_dict().items()
                                           if not k.startswith(("text.", "text_label.", "text_keys."))}))
    save_run(run_dir, tensors, spec)
