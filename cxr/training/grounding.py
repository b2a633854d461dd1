"""Training the grounded annotator (`cxr.models.grounded`) on the CNN's fixed feature maps.

As with Shin et al.'s annotator, the CNN is trained first and frozen; the grounded annotator
reads its last feature maps (computed once, kept in memory as float16) instead of the pooled
embedding. Supervision is words only: the annotation sequences, the context fields parsed from
them, and (report cross-attention) the finding's report text. Boxes are never used.
"""
from __future__ import annotations

import re
import time

import numpy as np
import torch

from ..preprocess import MEAN, STD, normalise
from ..models.annotator import encode, pad_batch
from ..models.grounded import GroundedAnnotator
from .loops import Context, _epoch_seed, _resume, _save, cosine_lr, masked_bce, per_member, phase_done

_WORD = re.compile(r"[a-z]+")
_NEGATED = re.compile(r"^\s*(no|without|there is no|there are no|negative)\b")


@torch.no_grad()
def feature_maps(ctx: Context, model, idx: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
    """Last CNN feature maps (N, C, h, w) of whole images (eval mode), float16 on the CPU."""
    model.eval()
    bs = batch_size or max(ctx.cfg.batch_size, 1)
    out = []
    for s in range(0, len(idx), bs):
        rows = idx[s:s + bs]
        x = torch.from_numpy(np.asarray(ctx.images[np.sort(rows)], dtype=np.float32) / 65535.0)[:, None]
        order = np.argsort(np.argsort(rows))
        with ctx.autocast():
            maps = model.forward_features(normalise(x.to(ctx.device), MEAN, STD))
        out.append(maps.float()[order].half().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- report text
def sentences(report: dict[str, str]) -> list[str]:
    text = " ".join(report.get(k, "") for k in ("FINDINGS", "IMPRESSION") if report.get(k))
    return [s.strip() for s in re.split(r"(?<=[.;])\s+|\d\.\s", text) if s.strip()]


def finding_text(report: dict[str, str], tokens: list[str]) -> list[str]:
    """Words of the report's positive sentences about a finding: sentences sharing a word stem
    (5 letters) with the finding's annotation and not opening with a negation; the annotation's
    own words where the report says nothing usable (MeSH-only sources)."""
    stems = {w[:5] for t in tokens for w in _WORD.findall(t.lower()) if len(w) >= 4}
    chosen = []
    for s in sentences(report or {}):
        low = s.lower()
        if _NEGATED.match(low):
            continue
        words = _WORD.findall(low)
        if stems & {w[:5] for w in words}:
            chosen += words
    return chosen or [w for t in tokens for w in _WORD.findall(t.lower())]


def text_vocabulary(texts: list[list[str]], min_count: int = 2) -> list[str]:
    from collections import Counter

    counts = Counter(w for t in texts for w in t)
    return ["<pad>", "<unk>"] + sorted(w for w, c in counts.items() if c >= min_count)


def text_tokens(texts: list[list[str]], vocab: list[str], max_len: int = 40) -> torch.Tensor:
    index = {w: i for i, w in enumerate(vocab)}
    rows = [[index.get(w, 1) for w in t[:max_len]] or [1] for t in texts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------- training
def grounded_sequences(pairs, rows: set[int], word_index: dict[str, int], texts=None):
    """Pairs whose image is in `rows` -> (image idx, label idx, tokens, report text or None)."""
    chosen = [k for k, p in enumerate(pairs) if p[0] in rows]
    if not chosen:
        return None
    img = torch.tensor([pairs[k][0] for k in chosen])
    lab = torch.tensor([pairs[k][1] for k in chosen])
    tok = pad_batch([encode(pairs[k][2], word_index) for k in chosen])
    txt = texts[chosen] if texts is not None else None
    return img, lab, tok, txt


def train_grounded(ctx: Context, phase: str, model: GroundedAnnotator, maps: torch.Tensor, train_seqs,
                   val_seqs, epochs: int, lr: float, batch_size: int, text_weight: float = 1.0):
    """Teacher-forced training on fixed feature maps `maps` (N, C, h, w) indexed by image."""
    dev = ctx.device
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ctx.cfg.weight_decay)
    start = _resume(ctx, phase, {"rnn": model}, opt)
    if phase_done(ctx, phase) or start >= epochs or train_seqs is None:
        return model
    img, lab, tok, txt = train_seqs
    for epoch in range(start, epochs):
        seed = _epoch_seed(ctx.cfg, phase, epoch)
        torch.manual_seed(seed)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, epoch, epochs)
        model.train()
        t0 = time.time()
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(img)))
        total, parts_sum = 0.0, {}
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            m = maps[img[b]].to(dev).float()
            text = txt[b].to(dev) if txt is not None else None
            loss, parts = model.loss(m, lab[b].to(dev), tok[b].to(dev), text, text_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(b)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(b)
        record = {"phase": phase, "epoch": epoch + 1, "train_loss": total / len(img),
                  **{f"train_{k}": v / len(img) for k, v in parts_sum.items()},
                  "seconds": round(time.time() - t0, 3)}
        if val_seqs is not None:
            model.eval()
            with torch.no_grad():
                vi, vl, vt, _ = val_seqs
                loss, _ = model.loss(maps[vi].to(dev).float(), vl.to(dev), vt.to(dev))
                record["val_loss"] = float(loss)
        ctx.log(record)
        _save(ctx, phase, {"rnn": model}, opt, epoch + 1, epoch + 1 >= epochs)
        if ctx.on_epoch:
            ctx.on_epoch(phase, epoch + 1, record)
    return model


MIN_CALIBRATION_WORDS = 100  # fewer validation words of a field: its confidence stays uncalibrated (a few
# dozen gave the demo a side temperature that made its test words less well calibrated, not more)


@torch.no_grad()
def field_log_probs(ctx: Context, cnn, model: GroundedAnnotator, pairs, idx: np.ndarray,
                    word_index: dict[str, int], leave_out: dict[str, set[int]] | None = None
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per context field, over the (image, finding) pairs of images `idx` whose annotation names
    that field: the annotator's log-probabilities of the field's words, as `generate` weighs
    them (field head plus where the map lies), and the index of the word the annotation has.
    `leave_out`: per field, the target indices whose findings' words that field leaves out."""
    from ..models.grounded import zone_masks_of

    rows = set(int(i) for i in idx)
    chosen = [k for k, p in enumerate(pairs) if int(p[0]) in rows]
    out: dict[str, tuple[list, list]] = {}
    if not chosen:
        return {}
    images = np.unique([int(pairs[k][0]) for k in chosen])
    maps = feature_maps(ctx, cnn, images)
    where = {int(i): j for j, i in enumerate(images)}
    model.to(ctx.device).eval()
    for s in range(0, len(chosen), 256):
        ks = chosen[s:s + 256]
        m = maps[[where[int(pairs[k][0])] for k in ks]].to(ctx.device).float()
        labels = torch.tensor([pairs[k][1] for k in ks], device=ctx.device)
        tokens = pad_batch([encode(pairs[k][2], word_index) for k in ks]).to(ctx.device)
        values, keys = model.regions(m)
        _, pooled, presence = model.finding(values, keys, labels, zone_masks_of(m))
        logp = model.field_log_probs(pooled, presence)
        targets = model.field_targets(tokens)
        for f, lp in logp.items():
            ok = targets[f] >= 0
            if (leave_out or {}).get(f):
                ok &= ~torch.isin(labels, torch.tensor(sorted(leave_out[f]), device=labels.device))
            if ok.any():
                got = out.setdefault(f, ([], []))
                got[0].append(lp[ok].cpu().numpy())
                got[1].append(targets[f][ok].cpu().numpy())
    return {f: (np.concatenate(a), np.concatenate(b)) for f, (a, b) in out.items()}


def fit_temperature(logp: np.ndarray, truth: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of the true words under
    softmax(logp / T) (Guo et al. 2017's temperature scaling: one number per field, so the word
    chosen never changes, only how sure it says it is)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        return float(-log_softmax(logp / np.exp(log_t), axis=1)[np.arange(len(truth)), truth].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def word_temperatures(ctx: Context, cnn, model: GroundedAnnotator, pairs, val_idx: np.ndarray,
                      word_index: dict[str, int], targets: list[str] | None = None) -> dict[str, float]:
    """Per context field with at least `MIN_CALIBRATION_WORDS` validation words, its temperature.
    Severity is fitted without the findings whose grade the Reader reads from a measurement
    (Cardiomegaly's, from the cardiothoracic ratio: `cxr.anatomy.graded_by_measurement`): their
    words reach no one with the annotator's confidence, and were its least sure ones, so fitted
    with them the temperature lowered every other grade's confidence too far."""
    from ..anatomy import graded_by_measurement

    fitted = {}
    measured = {k for k, t in enumerate(targets or []) if graded_by_measurement(t)}
    fields = field_log_probs(ctx, cnn, model, pairs, val_idx, word_index, {"severity": measured})
    for f, (logp, truth) in fields.items():
        if len(truth) >= MIN_CALIBRATION_WORDS:
            fitted[f] = round(fit_temperature(logp, truth), 4)
    return fitted


def train_joint(ctx: Context, phase: str, cnn, model: GroundedAnnotator, labels: np.ndarray,
                train_idx: np.ndarray, pairs, word_index: dict[str, int], epochs: int, lr: float,
                texts: torch.Tensor | None = None, text_weight: float = 1.0, cnn_weight: float = 1.0,
                cnn_lr_scale: float = 1.0, mask: np.ndarray | None = None):
    """CNN and grounded annotator trained together: the CNN's multi-label loss on `labels` plus
    the annotator's word/field (and report-text) losses on the same images' findings. The field
    losses are what teach the CNN's feature map *where* a finding is (from the words "left",
    "base", never from a box). The CNN learns at `cnn_lr_scale` x `lr`: at the annotator's full
    rate its detection drifted (demo: study-level AUC .862 -> .755). Whole images (no crop: the coordinates must mean the same thing
    at training and use), light augmentation."""
    from ..dataset import augment

    cfg, dev = ctx.cfg, ctx.device
    cnn.to(dev)
    model.to(dev)
    params = list(cnn.parameters()) + list(model.parameters())
    opt = torch.optim.AdamW([{"params": list(cnn.parameters()), "scale": cnn_lr_scale},
                             {"params": list(model.parameters()), "scale": 1.0}],
                            lr=lr, weight_decay=cfg.weight_decay)
    start = _resume(ctx, phase, {"cnn": cnn, "rnn": model}, opt)
    if phase_done(ctx, phase) or start >= epochs:
        return cnn, model
    by_image: dict[int, list[int]] = {}
    for k, (i, _, _) in enumerate(pairs):
        by_image.setdefault(int(i), []).append(k)
    train_idx = np.asarray([i for i in train_idx if int(i) in by_image])
    tokens = pad_batch([encode(p[2], word_index) for p in pairs])
    pair_label = torch.tensor([p[1] for p in pairs])
    for epoch in range(start, epochs):
        seed = _epoch_seed(cfg, phase, epoch)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        rows = np.random.default_rng(seed).permutation(train_idx)
        for group in opt.param_groups:
            group["lr"] = group["scale"] * cosine_lr(lr, epoch, epochs)
        cnn.train()
        model.train()
        t0, total, n, parts_sum = time.time(), 0.0, 0, {}
        for s in range(0, len(rows), cfg.batch_size):
            b = np.sort(rows[s:s + cfg.batch_size])
            x = torch.from_numpy(np.asarray(ctx.images[b], dtype=np.float32) / 65535.0)[:, None].to(dev)
            x = normalise(augment(x, cfg.rotation, 0.0, cfg.intensity, generator=gen), MEAN, STD)
            y = torch.from_numpy(labels[b]).to(dev)
            with ctx.autocast():
                maps = cnn.forward_features(x)
                logits = cnn.member_logits(maps) if cnn.members > 1 else cnn.forward_head(maps)
            m = None if mask is None else torch.from_numpy(mask[b]).to(dev)
            loss = cnn_weight * per_member(logits, lambda lg: masked_bce(lg.float(), y, m))
            ks = [k for i in b for k in by_image[int(i)]]
            where = {int(i): j for j, i in enumerate(b)}
            sel = torch.tensor([where[int(pairs[k][0])] for k in ks], device=dev)
            text = texts[ks].to(dev) if texts is not None else None
            g_loss, g_parts = model.loss(maps.float()[sel], pair_label[ks].to(dev), tokens[ks].to(dev),
                                         text, text_weight)
            loss = loss + g_loss
            for k, v in g_parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            total += float(loss.detach()) * len(b)
            n += len(b)
        record = {"phase": phase, "epoch": epoch + 1, "train_loss": total / max(n, 1),
                  **{f"train_{k}": round(v / max(n, 1), 4) for k, v in parts_sum.items()},
                  "seconds": round(time.time() - t0, 3)}
        ctx.log(record)
        _save(ctx, phase, {"cnn": cnn, "rnn": model}, opt, epoch + 1, epoch + 1 >= epochs)
        if ctx.on_epoch:
            ctx.on_epoch(phase, epoch + 1, record)
    if ctx.world > 1:  # every rank ran the same epochs; GPU kernels may still differ: agree on rank 0's
        for p in params:
            torch.distributed.broadcast(p.data, 0)
        for b in list(cnn.buffers()) + list(model.buffers()):
            torch.distributed.broadcast(b, 0)
    return cnn, model
