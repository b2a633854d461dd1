"""One training phase each for the CNN and the RNN: seeded, per-epoch resumable, DDP-aware."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import append_line, write_atomic
from ..checkpoint import load_tensors, optimizer_tensors, prefixed, restore_optimizer, save_tensors, unprefixed
from ..dataset import XrayDataset, augment, data_dropout_indices
from ..errors import CxrError
from ..models.annotator import Annotator, encode, pad_batch
from ..preprocess import MEAN, STD, normalise
from .config import TrainConfig


@dataclass
class Context:
    """What every phase needs: config, where state goes, device, the process group, the cache."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    images: np.ndarray                # disk-cached (N, S, S) uint16
    rank: int = 0
    world: int = 1
    progress: dict = field(default_factory=dict)  # state/progress.json content
    on_epoch: Callable | None = None
    mining: object = None             # runspec.LabelMining of a run trained on mined report labels

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def state_dir(self) -> Path:
        return self.out / "state"

    def save_progress(self) -> None:
        if self.main:
            write_atomic(self.state_dir / "progress.json", json.dumps(self.progress, indent=1))

    def log(self, record: dict) -> None:
        if self.main:
            append_line(self.out / "history.jsonl", json.dumps(record))

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def _epoch_seed(cfg: TrainConfig, phase: str, epoch: int) -> int:
    return (cfg.seed * 1_000_003 + sum(map(ord, phase)) * 1009 + epoch) % (2 ** 31)


def _resume(ctx: Context, phase: str, modules: dict[str, torch.nn.Module], opt) -> int:
    """Load the phase's last saved epoch, if any; returns the number of epochs done."""
    info = ctx.progress.get("phases", {}).get(phase)
    path = ctx.state_dir / f"{phase}.safetensors"
    if not info or not path.exists():
        return 0
    tensors = load_tensors(path)
    for name, module in modules.items():
        saved = unprefixed(name, tensors)
        if not saved:  # e.g. a phase saved by a cxr without the side-word head
            raise CxrError(f"phase {phase} was saved without its {name!r} part (an older cxr or other "
                           "settings): finish the run with the cxr that started it, or start again with --fresh",
                           ctx.out)
        module.load_state_dict(saved)
    if opt is not None and info.get("opt"):
        # CPU tensors: Optimizer.load_state_dict moves moments to each parameter's device and keeps
        # `step` where the optimizer wants it (CPU unless capturable/fused)
        restore_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, info["opt"])
    return int(info["epoch"])


def _save(ctx: Context, phase: str, modules: dict[str, torch.nn.Module], opt, epoch: int, done: bool) -> None:
    if ctx.main:
        tensors = {}
        for name, module in modules.items():
            tensors.update(prefixed(name, module.state_dict()))
        opt_t, opt_meta = optimizer_tensors(opt)
        tensors.update(opt_t)
        save_tensors(ctx.state_dir / f"{phase}.safetensors", tensors)
        ctx.progress.setdefault("phases", {})[phase] = {"epoch": epoch, "done": done, "opt": opt_meta}
        ctx.save_progress()
    ctx.barrier()


def phase_done(ctx: Context, phase: str) -> bool:
    return bool(ctx.progress.get("phases", {}).get(phase, {}).get("done"))


def load_phase_weights(ctx: Context, phase: str, modules: dict[str, torch.nn.Module]) -> None:
    tensors = load_tensors(ctx.state_dir / f"{phase}.safetensors")
    for name, module in modules.items():
        module.load_state_dict(unprefixed(name, tensors))


@torch.no_grad()
def infer(ctx: Context, model, idx: np.ndarray, batch_size: int | None = None):
    """Logits and embeddings of whole images (no crop), eval mode: what the Reader computes."""
    model.eval()
    bs = batch_size or max(ctx.cfg.batch_size, 1)
    logits, embs = [], []
    for s in range(0, len(idx), bs):
        rows = np.sort(idx[s:s + bs])
        order = np.argsort(np.argsort(idx[s:s + bs]))
        x = torch.from_numpy(np.asarray(ctx.images[rows], dtype=np.float32) / 65535.0)[:, None]
        x = normalise(x.to(ctx.device), MEAN, STD)
        with ctx.autocast():
            maps = model.forward_features(x)
            lg = model.forward_head(maps)
        logits.append(lg.float()[order].cpu())
        embs.append(model.pool(maps).float()[order].cpu())
    if not logits:
        return torch.zeros(0, model.head.out_features), torch.zeros(0, model.num_features)
    return torch.cat(logits), torch.cat(embs)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties averaged); no sklearn import in training."""
    from scipy.stats import rankdata

    y = np.asarray(y) > 0
    ranks = rankdata(p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    aucs = [auc(y[:, k], p[:, k]) for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None


def cnn_loss(logits: torch.Tensor, y: torch.Tensor, labels: str, pos_weight=None, class_weight=None,
             mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None):
    """Multi-label BCE (`labels` "diseases"), or Shin et al.'s softmax cross-entropy ("shin2016";
    the target row is normalised, so an image whose terms fell into two refined sub-labels of its
    pattern counts half to each). `mask` (0 = unknown label, e.g. an ignored uncertain mention)
    leaves those (image, label) terms out of the BCE: the mean is over the known ones.
    `sample_weight` (B,) weighs the images (a weighted mean)."""
    if labels == "shin2016":
        target = y / y.sum(1, keepdim=True).clamp(min=1)
        if sample_weight is None:
            return F.cross_entropy(logits, target, weight=class_weight)
        terms = F.cross_entropy(logits, target, weight=class_weight, reduction="none")
        return (terms * sample_weight).sum() / sample_weight.sum().clamp(min=1e-6)
    if sample_weight is not None:
        mask = (torch.ones_like(y) if mask is None else mask) * sample_weight[:, None]
    return masked_bce(logits, y, mask, pos_weight)


def per_member(logits: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`loss` of (B, classes) logits, or the mean of each member's for (K, B, classes): an
    ensemble inside one network (`Classifier(members=K)`) learns as K separate models would."""
    return torch.stack([loss(lg) for lg in logits]).mean() if logits.dim() == 3 else loss(logits)


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, pos_weight=None):
    """BCE with logits averaged over the known labels (`mask` 1); no mask: the plain mean."""
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
    terms = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    return (terms * mask).sum() / mask.sum().clamp(min=1)


def half_logits(side_head, maps: torch.Tensor, r: float = 5.0) -> torch.Tensor:
    """(B, classes, 2): a 1x1 head's map per class, LSE-pooled over the image's left half and its
    right half (ChestX-ray8's pooling, per half): the logits that each half holds the finding."""
    from ..models.cnn import lse_pool

    cam = side_head(maps)
    w = cam.shape[-1]
    return torch.stack([lse_pool(cam[..., : w // 2], r), lse_pool(cam[..., w - w // 2:], r)], -1)


class SideWords(torch.nn.Module):
    """The CNN with a training-only head that learns, from the side words alone, which image half
    holds each finding ("left": the image's right half on a PA film; "bilateral": both). Its
    gradient is what teaches the trunk where a finding lies during the CNN phases, which the
    grounded annotator's side words then read; the head itself is not kept in the run."""

    def __init__(self, model, classes: int):
        super().__init__()
        self.model = model
        self.head = torch.nn.Conv2d(model.num_features, classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.forward_features(x)
        return self.model.forward_head(maps), half_logits(self.head, maps.float())


def train_cnn(ctx: Context, phase: str, model, labels: np.ndarray, train_idx: np.ndarray,
              epochs: int, evaluate: Callable[[], dict] | None = None, normal_col: int | None = None,
              sample_labels: np.ndarray | None = None, mask: np.ndarray | None = None,
              halves: np.ndarray | None = None):
    """Multi-label BCE training of `model` on `labels` (N, K) over `train_idx` rows; `mask` (N, K)
    0 marks unknown labels, left out of the loss. Data dropout decides on `sample_labels` (default
    `labels`) whose column `normal_col` means normal. `halves` (N, K, 2), NaN where unknown: which
    image half holds each label, from the side words (`SideWords`, weighed by `cfg.side_mil`)."""
    cfg, dev = ctx.cfg, ctx.device
    model.to(dev)
    sided = SideWords(model, labels.shape[1]).to(dev) \
        if halves is not None and cfg.side_mil > 0 and model.members == 1 else None
    modules = {"model": model} if sided is None else {"model": model, "side": sided.head}
    opt = torch.optim.AdamW((sided or model).parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = _resume(ctx, phase, modules, opt)
    if phase_done(ctx, phase) or start >= epochs:
        return model
    net = sided or model
    if ctx.world > 1:
        if dev.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None)
    pos_weight = class_weight = None
    if cfg.class_weighted:
        y = labels[train_idx]
        pos = y.sum(0)
        pos_weight = torch.tensor(np.clip((len(y) - pos) / np.maximum(pos, 1), 1.0, 100.0),
                                  dtype=torch.float32, device=dev)
        # softmax: each class weighs n / (K n_c), so every class counts as much in the loss
        class_weight = torch.tensor(np.clip(len(y) / (len(pos) * np.maximum(pos, 1)), 0.01, 100.0),
                                    dtype=torch.float32, device=dev)
    scaler = torch.amp.GradScaler("cuda", enabled=(dev.type == "cuda" and cfg.amp
                                                   and not torch.cuda.is_bf16_supported()))
    from tqdm.auto import tqdm

    for epoch in range(start, epochs):
        seed = _epoch_seed(cfg, phase, epoch)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        if cfg.data_dropout:
            local = data_dropout_indices((labels if sample_labels is None else sample_labels)[train_idx], normal_col, rng, cfg.normal_keep_factor,
                                         cfg.max_duplicate)
            rows = train_idx[local]
        else:
            rows = rng.permutation(train_idx)
        if ctx.world > 1:  # equal shares (as DistributedSampler pads), else DDP waits forever
            rows = np.resize(rows, -(-len(rows) // ctx.world) * ctx.world)[ctx.rank::ctx.world]
        data = XrayDataset(ctx.images, labels, rows, crop=cfg.crop)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                            pin_memory=dev.type == "cuda", drop_last=len(data) > cfg.batch_size,
                            persistent_workers=False, generator=gen)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, epochs)
        net.train()
        total, count, t0, side_total = 0.0, 0, time.time(), 0.0
        bar = tqdm(loader, desc=f"{phase} epoch {epoch + 1}/{epochs}", leave=False, unit="batch",
                   disable=not (cfg.progress and ctx.main))
        for x, y, rows_b in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            m = None if mask is None else torch.from_numpy(mask[rows_b.numpy()]).to(dev)
            # an ensemble network's members (`Classifier(members=K)`) each see their own augmented view
            views = [normalise(augment(x, cfg.rotation, 0.05, cfg.intensity, generator=gen), MEAN, STD)
                     for _ in range(model.members)]
            side_loss = None
            with ctx.autocast():
                if sided is not None:
                    logits, half = net(views[0])
                    want = torch.from_numpy(halves[rows_b.numpy()]).to(dev)
                    known = ~torch.isnan(want)
                    # every batch adds the term (0 without a side word), so DDP's ranks agree
                    side_loss = F.binary_cross_entropy_with_logits(half[known], want[known]) \
                        if known.any() else half.sum() * 0.0
                else:
                    logits = net(torch.stack(views), members=True) if model.members > 1 else net(views[0])
            if model.members > 1:
                # online bagging: each member weighs each image of the batch by its own Poisson(1)
                # draw, as a bootstrap sample would, so the members differ in what they learn from
                # as well as in where they start and how their images were augmented
                weights = torch.poisson(torch.ones(model.members, len(y)), generator=gen).to(dev)
                loss = torch.stack([cnn_loss(lg.float(), y, cfg.labels, pos_weight, class_weight, m, w)
                                    for lg, w in zip(logits, weights)]).mean()
            else:
                loss = cnn_loss(logits.float(), y, cfg.labels, pos_weight, class_weight, m)
            if side_loss is not None:
                loss = loss + cfg.side_mil * side_loss.float()
                side_total += float(side_loss.detach()) * len(y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        seconds = time.time() - t0
        record = {"phase": phase, "epoch": epoch + 1, "train_loss": total / max(count, 1), "images": count,
                  "seconds": round(seconds, 3), "images_per_s": round(count * ctx.world / max(seconds, 1e-9), 2)}
        if sided is not None:
            record["train_side_words"] = side_total / max(count, 1)
        if evaluate is not None:
            record.update(evaluate())
        ctx.log(record)
        if cfg.progress and ctx.main:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        _save(ctx, phase, modules, opt, epoch + 1, epoch + 1 >= epochs)
        if ctx.on_epoch:
            ctx.on_epoch(phase, epoch + 1, record)
    return model


def sequences(pairs, rows: set[int], word_index: dict[str, int]):
    """Pairs whose image is in `rows` -> (image idx, label idx, token tensor)."""
    chosen = [p for p in pairs if p[0] in rows]
    if not chosen:
        return None
    return (torch.tensor([p[0] for p in chosen]), torch.tensor([p[1] for p in chosen]),
            pad_batch([encode(p[2], word_index) for p in chosen]))


def train_rnn(ctx: Context, phase: str, annotator: Annotator, embeddings: torch.Tensor, train_seqs,
              val_seqs, epochs: int):
    """Teacher-forced training of the annotator on fixed CNN embeddings (as Shin et al.)."""
    cfg, dev = ctx.cfg, ctx.device
    annotator.to(dev)
    opt = torch.optim.AdamW(annotator.parameters(), lr=cfg.rnn_lr, weight_decay=cfg.weight_decay)
    start = _resume(ctx, phase, {"rnn": annotator}, opt)
    if phase_done(ctx, phase) or start >= epochs or train_seqs is None:
        return annotator
    emb = embeddings.to(dev)
    img, lab, tok = (t.to(dev) for t in train_seqs)
    from tqdm.auto import tqdm

    bar = tqdm(range(start, epochs), desc=phase, leave=False, unit="epoch",
               disable=not (cfg.progress and ctx.main))
    for epoch in bar:
        seed = _epoch_seed(cfg, phase, epoch)
        torch.manual_seed(seed)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.rnn_lr, epoch, epochs)
        annotator.train()
        t0 = time.time()
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(img))).to(dev)
        total = 0.0
        for s in range(0, len(order), cfg.rnn_batch_size):
            b = order[s:s + cfg.rnn_batch_size]
            loss = annotator.loss(emb[img[b]], lab[b], tok[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(annotator.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(b)
        record = {"phase": phase, "epoch": epoch + 1, "train_loss": total / len(img),
                  "seconds": round(time.time() - t0, 3)}
        if val_seqs is not None:
            annotator.eval()
            with torch.no_grad():
                vi, vl, vt = (t.to(dev) for t in val_seqs)
                record["val_loss"] = float(annotator.loss(emb[vi], vl, vt))
        bar.set_postfix(loss=f"{record['train_loss']:.3f}")
        ctx.log(record)
        _save(ctx, phase, {"rnn": annotator}, opt, epoch + 1, epoch + 1 >= epochs)
        if ctx.on_epoch:
            ctx.on_epoch(phase, epoch + 1, record)
    if ctx.world > 1:  # GPU RNN kernels are not bitwise deterministic: make every rank agree
        for p in annotator.parameters():
            torch.distributed.broadcast(p.data, 0)
    return annotator
