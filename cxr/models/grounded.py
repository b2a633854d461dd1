"""The grounded annotator: it looks at the image's feature map while it writes each word.

The annotator of Shin et al. 2016 starts from a globally pooled embedding, so nothing it writes
can depend on *where* a finding is. Here (Show, Attend and Tell, Xu et al. 2015, applied to the
cascade's annotation) the RNN reads the CNN's last feature map, not its average:

- **Regions.** Every position of the (h, w) map becomes a region vector: a 1x1 projection of
  the CNN features plus three coordinate channels (x, y, |x|: image left = -1). Side and site words are then learnable from where the attention lies;
  |x| tells "bilateral" (mass on both sides) from "midline".
- **Finding map.** The finding (the detected disease's embedding) attends over the regions
  (additive attention). That map is the model's answer to "where is it"; the pooled region
  vector under it feeds one small head per context field (side, location, severity), trained
  from the parsed MeSH terms, i.e. from words alone, never from boxes.
- **Word maps.** At every step the GRU/LSTM attends again, conditioned on the finding and its
  state; the attended vector enters the cell and the output layer. Every word's map is kept
  (`Result.heatmaps["Opacity:left"]`).
- **Grounded words.** When the RNN decides to write a word of a context class (a side word, a
  site word, a grade word), *which* word of that class comes from the field head, i.e. from the
  pooled features under the finding map: p(word) = p_rnn(class) * p_head(word | class).
- **Where, from the words** (multiple-instance learning): the finding map's evidence is pooled
  (log-sum-exp) over the image's two halves and its upper/middle/lower thirds; each pooled value
  is the logit that the finding lies there, trained from the side and site words alone ("left":
  the image's right half yes, its left half no; "bilateral": both; "base": the lower third). At
  use the side and site words weigh those logits with the field heads (a product of experts):
  alone they chose the side worse than the heads on the demo's phantom, but as a training
  signal they sharpen the map (`tests/test_grounded.py`'s phantom nodule: a box at least a
  quarter inside the nodule on 9 of 24 films instead of 2).
- **Report cross-attention** (Bhalodia et al. 2021), training only: the finding's report text
  (its sentence, or the MeSH term's words where there is no text) is encoded by a small GRU;
  regions x text tokens give a text-conditioned map whose pooled regions must predict the
  finding and its fields. The image-only finding map is distilled from it (KL), so at test time,
  with no report, the finding map carries what the text taught.

Token ids follow `cxr.models.annotator` (0 pad, 1 start, 2 end, 3 unk).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .annotator import END, PAD, START, gru_update, weights_version

FIELDS = ("side", "location", "severity")
COORDS = 3  # x, y, |x|


def coordinates(h: int, w: int, device=None) -> torch.Tensor:
    """(3, h, w): x and y of each cell centre in [-1, 1] (image left/top = -1) and |x|."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y, x.abs()])


class Attention(nn.Module):
    """Additive attention of one query per item over its regions: softmax_r v·tanh(K_r + W q)."""

    def __init__(self, key_dim: int, query_dim: int, dim: int):
        super().__init__()
        self.query = nn.Linear(query_dim, dim)
        self.score = nn.Linear(dim, 1)

    def scores(self, keys: torch.Tensor, query: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
        """keys (B, R, dim), query (B, query_dim) -> evidence per region (B, R), before softmax.

        At inference (eval mode, outside an ONNX export) the same sum within 1e-6, cheaper: tanh(y)
        = 2 sigmoid(2y) - 1, so v·tanh(y) + b = 2 v·sigmoid(2y) + b - sum(v), computed in place in
        `work` (a buffer shaped like `keys`, reused step after step). On the CPUs measured here
        torch's tanh of a (B, R, dim) block took 6x its sigmoid, and each fresh block of that size
        cost as much again in page faults: together most of the grounded Reader's time after the
        CNN."""
        if self.training or torch.onnx.is_in_onnx_export():  # an exported graph: plain ops, no `out=`
            return self.score(torch.tanh(keys + self.query(query)[:, None])).squeeze(-1)
        y = torch.add(keys, self.query(query)[:, None], out=work) if work is not None \
            else keys + self.query(query)[:, None]
        torch.sigmoid(y.mul_(2), out=y)
        v = self.score.weight[0]
        return y @ (v * 2) + (self.score.bias - v.sum())

    def forward(self, keys: torch.Tensor, query: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
        """keys (B, R, dim), query (B, query_dim) -> weights (B, R) summing to 1."""
        return torch.softmax(self.scores(keys, query, work), -1)


ZONES = 11  # image halves, thirds from top to bottom, and the six crossings


def zone_masks(h: int, w: int, device=None) -> torch.Tensor:
    """(ZONES, h*w) bool: image-left half, image-right half, upper/middle/lower thirds, and
    each half x third. The field heads read the finding's evidence per zone, so "left" can only
    be said where the evidence lies (the patient's left is the image's right on a PA film)."""
    c = coordinates(h, w, device)
    x, y = c[0].flatten(), c[1].flatten()
    halves = [x < 0, x >= 0]
    thirds = [y < -1 / 3, (y >= -1 / 3) & (y < 1 / 3), y >= 1 / 3]
    return torch.stack(halves + thirds + [a & b for a in halves for b in thirds])


@lru_cache(maxsize=32)
def _coordinates(h: int, w: int, device: torch.device) -> torch.Tensor:
    return coordinates(h, w, device)


@lru_cache(maxsize=32)
def _zone_masks(h: int, w: int, device: torch.device) -> torch.Tensor:
    return zone_masks(h, w, device)


def zone_masks_of(maps: torch.Tensor) -> torch.Tensor:
    """`zone_masks` of a feature map batch's (h, w), made once per size and device (read only)."""
    return _zone_masks(int(maps.shape[-2]), int(maps.shape[-1]), maps.device)


@lru_cache(maxsize=32)
def zone_blocks(h: int, w: int) -> tuple | None:
    """The zones of `zone_masks` as row and column ranges: ((top, middle, lower thirds' rows),
    (image-left, image-right halves' columns)); None where a third or a half is empty (maps
    under 3 x 2 cells: the masks then serve)."""
    c = coordinates(h, w)
    left = int((c[0, 0] < 0).sum())
    top, mid = int((c[1, :, 0] < -1 / 3).sum()), int((c[1, :, 0] < 1 / 3).sum())
    rows, cols = ((0, top), (top, mid), (mid, h)), ((0, left), (left, w))
    return None if any(b <= a for a, b in rows + cols) else (rows, cols)


def _zone_lse(scores: torch.Tensor, masks: torch.Tensor, r: float, grid: tuple[int, int] | None):
    """Log-sum-exp of r x the evidence (B, R) inside each zone: (B, ZONES). At inference with
    the map's (h, w) `grid`, from the six half x third crossings as slices of the map (a zone's
    log-sum-exp is that of its crossings'), within 1e-6 of the masked sum over every zone at
    once, which cost a twentieth of the grounded annotator's time at batch 1."""
    blocks = zone_blocks(*grid) if grid is not None and not torch.is_grad_enabled() else None
    if blocks is None:
        neg = torch.finfo(scores.dtype).min / 4
        s = r * scores[:, None, :]
        return torch.logsumexp(torch.where(masks[None], s, torch.full_like(s, neg)), -1)
    rows, cols = blocks  # sizes -1 below: the batch stays variable in an exported graph
    s = (r * scores).reshape(-1, *grid)
    cross = torch.stack([torch.logsumexp(s[:, a:b, c:d].flatten(1), -1)
                         for c, d in cols for a, b in rows], -1).reshape(-1, 2, 3)
    return torch.cat([torch.logsumexp(cross, 2), torch.logsumexp(cross, 1), cross.flatten(1)], 1)


def zone_evidence(scores: torch.Tensor, masks: torch.Tensor, r: float = 4.0,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Log-mean-exp (sharpness r) of the evidence (B, R) inside each zone, minus the same over
    the whole image: (B, ZONES), 0 where a zone holds as much evidence as the image. `grid`:
    the map's (h, w), for the faster sum at inference (`_zone_lse`)."""
    zone = _zone_lse(scores, masks, r, grid) - torch.log(masks.sum(-1).clamp(min=1).float())
    whole = torch.logsumexp(r * scores, -1, keepdim=True) - math.log(scores.shape[-1])
    return (zone - whole) / r


PRESENCE_R = 5.0  # sharpness of the log-sum-exp pooling of the evidence per half / third
# zones 0, 1 (image-left half = the patient's RIGHT, image-right half = the patient's LEFT on a
# PA/AP film) and 2-4 (upper / middle / lower thirds) that each word says the finding lies in
SIDE_HALVES = {"right": (1.0, 0.0), "left": (0.0, 1.0), "bilateral": (1.0, 1.0)}
SITE_THIRD = {"upper lobe": 0, "apex": 0, "middle lobe": 1, "lingula": 1, "hilum": 1,
              "base": 2, "lower lobe": 2, "retrocardiac": 2}


def zone_presence(scores: torch.Tensor, masks: torch.Tensor, r: float = PRESENCE_R,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Log-mean-exp (sharpness r) of the evidence (B, R) in the two halves and three thirds:
    (B, 5) logits that the finding lies there (ChestX-ray8's LSE pooling, per zone)."""
    masks = masks[:5]
    return (_zone_lse(scores, masks, r, grid)[:, :5] - torch.log(masks.sum(-1).clamp(min=1).float())) / r


class TextEncoder(nn.Module):
    """Word embeddings + a bidirectional GRU: one vector per report token (training only)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.rnn = nn.GRU(dim, dim // 2, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return out


class GroundedAnnotator(nn.Module):
    """See the module docstring. `field_words[f]` lists the vocabulary ids of field f's words
    (e.g. the ids of left/right/bilateral); a field head predicts one of them."""

    #: `generate` drops an item from the batch once it has written <end>; False decodes every
    #: item to the last step, as before (the same words; `benchmarks/decoding.py` compares them)
    drop_ended = True
    #: the regions and per-word step under ONNX Runtime (`cxr.models.grounded_onnx`), set by the
    #: Reader on a CPU; `generate` uses it only while it matches the weights (None: PyTorch)
    decoding = None

    def __init__(self, vocab_size: int, num_labels: int, feat_dim: int,
                 field_words: dict[str, list[int]], hidden: int = 256, embed_dim: int = 128,
                 cell: str = "gru", attn_dim: int = 128, dropout: float = 0.1,
                 text_vocab_size: int = 0, vocab: list[str] | None = None):
        super().__init__()
        if cell not in ("gru", "lstm"):
            from ..errors import CxrError
            raise CxrError(f"unknown rnn {cell!r}; choose gru or lstm")
        self.cell, self.hidden, self.vocab_size = cell, hidden, vocab_size
        self.field_words = {f: list(field_words.get(f, [])) for f in FIELDS}
        self.region = nn.Conv2d(feat_dim, attn_dim, 1)
        self.keys = nn.Linear(attn_dim + COORDS, attn_dim)
        self.label = nn.Embedding(num_labels, attn_dim)
        self.find_attn = Attention(attn_dim, attn_dim, attn_dim)
        ctx_dim = attn_dim + COORDS
        pooled_dim = ctx_dim + attn_dim + ZONES
        self.heads = nn.ModuleDict({f: nn.Sequential(nn.Linear(pooled_dim, attn_dim), nn.ReLU(),
                                                     nn.Linear(attn_dim, len(ids)))
                                    for f, ids in self.field_words.items() if ids})
        # the zone evidence speaks for side and site words directly (a linear map started from the
        # anatomy: "left" = evidence in the image's right half on a PA film, "base" = lower third)
        self.zone_heads = nn.ModuleDict({f: nn.Linear(ZONES, len(ids)) for f, ids in self.field_words.items()
                                         if ids and f in ("side", "location")})
        with torch.no_grad():
            for f, head in self.zone_heads.items():
                head.weight.copy_(zone_prior([vocab[i] for i in self.field_words[f]]) if vocab
                                  else torch.zeros_like(head.weight))
                head.bias.zero_()
        self.presence_bias = nn.Parameter(torch.zeros(5))
        # per side word the halves it names, per site word its third (nan / -1: says nothing);
        # not saved: they follow from the vocabulary
        names = [vocab[i] for i in self.field_words["side"]] if vocab else []
        self.register_buffer("side_halves", torch.tensor(
            [SIDE_HALVES.get(w, (float("nan"),) * 2) for w in names], dtype=torch.float32).reshape(-1, 2),
            persistent=False)
        names = [vocab[i] for i in self.field_words["location"]] if vocab else []
        self.register_buffer("site_third", torch.tensor([SITE_THIRD.get(w, -1) for w in names],
                                                        dtype=torch.long), persistent=False)
        self._init_decoding_tables(vocab_size)
        self.word = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.init_h = nn.Linear(pooled_dim, hidden)
        self.init_c = nn.Linear(pooled_dim, hidden) if cell == "lstm" else None
        self.step_attn = Attention(attn_dim, attn_dim + hidden, attn_dim)
        self.rnn_cell = (nn.GRUCell if cell == "gru" else nn.LSTMCell)(embed_dim + ctx_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden + ctx_dim, vocab_size)
        self.text = TextEncoder(text_vocab_size, attn_dim) if text_vocab_size else None
        self.text_label = nn.Linear(ctx_dim, num_labels) if text_vocab_size else None
        self.text_keys = nn.Linear(attn_dim, attn_dim) if text_vocab_size else None

    # ------------------------------------------------------------------ regions and maps
    def regions(self, maps: torch.Tensor):
        """CNN maps (B, C, h, w) -> (values (B, R, attn+3), keys (B, R, attn))."""
        b, _, h, w = maps.shape
        feats = torch.relu(self.region(maps.float()))
        coords = _coordinates(h, w, maps.device).expand(b, -1, -1, -1)
        values = torch.cat([feats, coords], 1).flatten(2).transpose(1, 2)
        return values, self.keys(values)

    def finding(self, values, keys, labels, zones, work=None, grid=None):
        """The finding map (B, R), the vector the field heads read (the regions pooled under the
        map, the finding's embedding, and its evidence per zone: B, ctx+attn+ZONES) and the
        presence logits per half and third (B, 5). `zones`: `zone_masks` of the map's (h, w)
        `grid`. Nothing is kept on the module: one Reader may be called from several threads."""
        q = self.label(labels)
        scores = self.find_attn.scores(keys, q, work)
        presence = zone_presence(scores, zones, grid=grid) + self.presence_bias
        alpha = torch.softmax(scores, -1)
        evidence = zone_evidence(scores, zones, grid=grid)
        return alpha, torch.cat([torch.bmm(alpha[:, None], values)[:, 0], q, evidence], -1), presence

    def presence_loss(self, presence: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict:
        """Binary cross-entropy of the per-zone presence logits (B, 5) against what the side and
        site words say: the multiple-instance signal that teaches the map where, from text only."""
        out = {}
        side = targets.get("side")
        if side is not None and len(self.side_halves):
            want = self.side_halves[side.clamp(min=0)]
            ok = (side >= 0) & ~want.isnan().any(-1)
            if ok.any():
                out["where_side"] = F.binary_cross_entropy_with_logits(presence[ok, :2], want[ok])
        site = targets.get("location")
        if site is not None and len(self.site_third):
            third = torch.where(site >= 0, self.site_third[site.clamp(min=0)], -1)
            ok = third >= 0
            if ok.any():
                want = F.one_hot(third[ok], 3).float()
                out["where_site"] = F.binary_cross_entropy_with_logits(presence[ok, 2:5], want)
        return out

    def where_logp(self, presence: torch.Tensor) -> dict[str, torch.Tensor]:
        """Log-probabilities of the side words from the two halves' presence (left = the image's
        right half only, bilateral = both; the field's other words get nothing), and of each site
        word's third (0 for words without one), to add to the field heads' log-probabilities."""
        out = {}
        if len(self.side_halves) and not self.side_halves.isnan().all():
            logp = F.logsigmoid(presence[:, :2])  # log p(in the image's left half), right half
            lognot = F.logsigmoid(-presence[:, :2])
            h = self.side_halves.nan_to_num(-1.0)
            known = (h >= 0).all(-1)
            score = torch.where(h[None] > 0.5, logp[:, None], lognot[:, None]).sum(-1)
            score = torch.where(known[None], score, torch.full_like(score, -float("inf")))
            out["side"] = torch.log_softmax(score, -1)
        if len(self.site_third) and (self.site_third >= 0).any():
            third = torch.log_softmax(presence[:, 2:5], -1)
            extra = third[:, self.site_third.clamp(min=0)]
            out["location"] = torch.where(self.site_third[None] >= 0, extra, torch.zeros_like(extra))
        return out

    def field_logits(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per field, logits over its words: an MLP of everything pooled (priors, appearance,
        severity) plus, for side and site, the linear read-out of the zone evidence."""
        zones = pooled[:, -ZONES:]
        return {f: head(self.drop(pooled)) + (self.zone_heads[f](zones) if f in self.zone_heads else 0)
                for f, head in self.heads.items()}

    def field_log_probs(self, pooled: torch.Tensor, presence: torch.Tensor,
                        where: bool = True) -> dict[str, torch.Tensor]:
        """Per field, log-probabilities over its words: the field heads, and with `where` the
        side and site words also weighed by where the map lies (a product of experts)."""
        logp = {f: torch.log_softmax(lg, -1) for f, lg in self.field_logits(pooled).items()}
        if where:
            for f, lp in self.where_logp(presence).items():
                if f in logp:
                    logp[f] = torch.log_softmax(logp[f] + lp, -1)
        return logp

    def _init_state(self, pooled):
        h = torch.tanh(self.init_h(pooled))
        if self.cell == "lstm":
            return h, torch.tanh(self.init_c(pooled))
        return h

    def _step(self, words, state, values, keys, q, work=None):
        h = state[0] if self.cell == "lstm" else state
        alpha = self.step_attn(keys, torch.cat([q, h], -1), work)
        ctx = torch.matmul(alpha[:, None], values)[:, 0]  # values: one row per item, or one shared
        if self.cell == "gru" and not self.training:
            state = self._gru_step(words, ctx, state)
        else:
            state = self.rnn_cell(torch.cat([self.drop(self.word(words)), ctx], -1), state)
        h = state[0] if self.cell == "lstm" else state
        return self.out(self.drop(torch.cat([h, ctx], -1))), state, alpha

    def _gru_step(self, words: torch.Tensor, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`rnn_cell` (a GRUCell on [word embedding, attended regions]) with the word's share of
        the input gates looked up in a table made once per set of weights (as
        `Annotator._gru_step`): a step reads the context's columns of W_ih and W_hh only.
        Within 1e-6 of the GRUCell (the input product is summed in two parts)."""
        cell, dim = self.rnn_cell, self.word.embedding_dim
        key = weights_version(self.word.weight, cell.weight_ih, cell.bias_ih)
        if getattr(self, "_gates_key", None) != key:
            with torch.no_grad():
                self._gates = F.linear(self.word.weight, cell.weight_ih[:, :dim], cell.bias_ih)
                self._ctx_weight = cell.weight_ih[:, dim:].contiguous()
            self._gates_key = key
        gi = self._gates[words] + F.linear(ctx, self._ctx_weight)
        return gru_update(gi, F.linear(h, cell.weight_hh, cell.bias_hh), h)

    # ------------------------------------------------------------------ training
    def forward(self, maps, labels, tokens):
        """Teacher forcing: word logits (B, T-1, V), word maps (B, T-1, R), finding map (B, R),
        field logits {field: (B, n_f)}; `tokens` = <start> w1 .. wn <end> <pad>..."""
        return self._teacher(maps, labels, tokens)[:4]

    def _teacher(self, maps, labels, tokens):
        """`forward`, and the presence logits per half and third (B, 5) that the loss needs."""
        values, keys = self.regions(maps)
        alpha_f, pooled, presence = self.finding(values, keys, labels, zone_masks_of(maps))
        q = self.label(labels)
        state = self._init_state(pooled)
        logits, alphas = [], []
        for t in range(tokens.shape[1] - 1):
            lg, state, a = self._step(tokens[:, t], state, values, keys, q)
            logits.append(lg)
            alphas.append(a)
        return torch.stack(logits, 1), torch.stack(alphas, 1), alpha_f, self.field_logits(pooled), presence

    def field_targets(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per field, the index (within the field's words) of the first such word in each
        sequence, -100 where the sequence has none (ignored by the loss)."""
        out = {}
        for f, ids in self.field_words.items():
            if not ids:
                continue
            target = torch.full((tokens.shape[0],), -100, dtype=torch.long, device=tokens.device)
            for k, wid in reversed(list(enumerate(ids))):
                hit = (tokens == wid).any(1)
                target[hit] = k
            out[f] = target
        return out

    def loss(self, maps, labels, tokens, text: torch.Tensor | None = None,
             text_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Word cross-entropy + field cross-entropy (+ report cross-attention and its distillation
        into the finding map when `text` (B, L) report tokens are given). Returns (loss, parts)."""
        logits, _, alpha_f, fields, presence = self._teacher(maps, labels, tokens)
        parts = {"words": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                          ignore_index=PAD)}
        targets = self.field_targets(tokens)
        for f, lg in fields.items():
            if (targets[f] >= 0).any():
                parts[f] = F.cross_entropy(lg, targets[f], ignore_index=-100)
        parts.update(self.presence_loss(presence, targets))
        if text is not None and self.text is not None:
            values, keys = self.regions(maps)
            beta, pooled_t = self.text_map(values, keys, text)
            parts["text_label"] = F.cross_entropy(self.text_label(pooled_t), labels)
            zones = zone_evidence(torch.log(beta + 1e-8), zone_masks_of(maps))
            for f, lg in self.field_logits(torch.cat([pooled_t, self.label(labels), zones], -1)).items():
                if (targets[f] >= 0).any():
                    parts[f"text_{f}"] = F.cross_entropy(lg, targets[f], ignore_index=-100)
            # the image-only finding map learns the text-conditioned one (test time has no text)
            parts["distil"] = F.kl_div(torch.log(alpha_f + 1e-8), beta.detach(), reduction="batchmean")
            for k in [k for k in parts if k.startswith("text_") or k == "distil"]:
                parts[k] = parts[k] * text_weight
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}

    def text_map(self, values, keys, text: torch.Tensor):
        """Regions x report tokens: each token's attention over the regions (scaled dot
        product), averaged over the tokens -> the text-conditioned map (B, R) and its pooled
        region vector (B, ctx). The tokens meet the regions' CONTENT only (no coordinate
        channels): "left" cannot simply point at the image's right half; the map must find the
        finding, and the side is then read from where it found it."""
        tok = self.text(text)  # (B, L, attn)
        content = self.text_keys(values[..., :-COORDS])
        scores = torch.einsum("bld,brd->blr", tok, content) / content.shape[-1] ** 0.5
        per_token = torch.softmax(scores, -1)
        mask = (text != 0).float()
        beta = (per_token * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return beta, torch.bmm(beta[:, None], values)[:, 0]

    # ------------------------------------------------------------------ use
    def _init_decoding_tables(self, vocab_size: int) -> None:
        """What greedy decoding looks up at every word, made once from the vocabulary (not
        saved): the fields' word ids (K,) in the heads' order, the field of each (K,), each
        field's ids padded with `vocab_size` (a column of -inf in `_ground`), and `barred_after`
        (V, V): the words a term may no longer hold once word w is in it, w itself (a MeSH term
        never repeats a part) and, for a side or grade word, its whole field (nor names two
        sides or two grades)."""
        self._field_names = [f for f in FIELDS if self.field_words[f]]  # the order of self.heads
        words = [self.field_words[f] for f in self._field_names]
        width = max(map(len, words), default=0)
        self.register_buffer("field_ids", torch.tensor([i for ids in words for i in ids], dtype=torch.long),
                             persistent=False)
        self.register_buffer("field_owner", torch.tensor([k for k, ids in enumerate(words) for _ in ids],
                                                         dtype=torch.long), persistent=False)
        self.register_buffer("field_slots", torch.tensor([ids + [vocab_size] * (width - len(ids)) for ids in words],
                                                         dtype=torch.long).reshape(len(words), width),
                             persistent=False)
        barred = torch.eye(vocab_size, dtype=torch.bool)
        for f in ("side", "severity"):
            ids = torch.tensor(self.field_words[f], dtype=torch.long)
            barred[ids[:, None], ids[None, :]] = True
        self.register_buffer("barred_after", barred, persistent=False)

    def _ground(self, logp: torch.Tensor, head: torch.Tensor | None) -> torch.Tensor:
        """Within each context class, the field head chooses the word; the RNN keeps the
        probability that a word of that class comes next. `head`: the field heads'
        log-probabilities (B, K), in `field_ids`' order; all fields at once."""
        if head is None:
            return logp
        padded = torch.cat([logp, torch.full_like(logp[:, :1], -float("inf"))], 1)
        mass = torch.logsumexp(padded[:, self.field_slots], -1)  # (B, fields): each field's share
        logp = logp.clone()
        logp[:, self.field_ids] = mass[:, self.field_owner] + head
        return logp

    @torch.no_grad()
    def generate(self, maps, labels, max_len: int = 6, grounded: bool = True, where: bool = True,
                 rows=None):
        """Greedy decoding. Returns (word ids per item, word maps per item (n_words, R),
        finding map (B, R), field probabilities {field: (B, n_f)}). `where`: side and site words
        weigh the map's presence per half / third (`where_logp`) with the field heads. `rows`:
        item i reads image rows[i] of `maps` (default: item i reads maps[i]); an image with
        several findings then has its regions made once (the 1x1 projection of a DenseNet's
        map was a fifth of the Reader's time after the CNN at batch 1, made once per finding).
        An item that has written <end> leaves the batch: the steps after it read only the items
        still writing (the GRU's hidden product, read for every item at every step, was the
        largest cost after the CNN). With `decoding` set (the Reader, on a CPU) the regions,
        the finding maps and each word's products run as its ONNX Runtime graphs."""
        if not len(labels):  # no finding: an empty batch of each output
            return [], [], maps.new_zeros(0, maps.shape[-2] * maps.shape[-1]), \
                {f: maps.new_zeros(0, len(self.field_words[f])) for f in self._field_names}
        fast = self.decoding if grounded and self.decoding is not None and self.decoding.current(self) else None
        if fast is not None:  # the same, as ONNX Runtime graphs (`cxr.models.grounded_onnx`)
            return fast.generate(maps, labels, max_len, where, rows, self.drop_ended)
        shared = rows is not None and len(maps) == 1  # one image: its regions shared, not copied
        values, keys = self.regions(maps)
        if shared:
            values, keys = (t.expand(len(rows), -1, -1) for t in (values, keys))
        elif rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=maps.device)
            values, keys = values[rows], keys[rows]
        work = torch.empty(keys.shape, dtype=keys.dtype, device=keys.device)  # attention's block, reused
        alpha_f, pooled, presence = self.finding(values, keys, labels, zone_masks_of(maps), work,
                                                 tuple(maps.shape[-2:]))
        field_logp = self.field_log_probs(pooled, presence, where)
        q = self.label(labels)
        state = self._init_state(pooled)
        head = torch.cat([field_logp[f] for f in self._field_names], -1) if self._field_names else None
        n, vocab, device = labels.shape[0], self.out.out_features, maps.device
        # one additive bar per item on the words it may not write next (pad and start always,
        # <end> at the first step, and `barred_after` each word it wrote), updated in place
        bar = torch.zeros(n, vocab, device=device)
        bar[:, [PAD, START, END]] = -float("inf")
        words = torch.full((n,), START, dtype=torch.long, device=device)
        live = torch.arange(n, device=device)  # the items still writing
        ended = torch.zeros(n, dtype=torch.bool, device=device)
        words_at = torch.full((n, max_len), END, dtype=torch.long, device=device)
        maps_at = torch.zeros(n, max_len, keys.shape[1], device=device)  # each word's map
        steps = 0
        for step in range(max_len):
            lg, state, alpha = self._step(words, state, values, keys, q, work)
            logp = torch.log_softmax(lg, -1)
            if grounded:
                logp = self._ground(logp, head)
            words = (logp + bar).argmax(-1)
            bar.masked_fill_(self.barred_after[words], -float("inf"))
            if step == 0:
                bar[:, END] = 0.0
            words_at[live, step], maps_at[live, step] = words, alpha
            steps = step + 1
            writing = words != END
            then = after_word(writing, ended, self.drop_ended)
            if then == "stop":
                break
            if then == "next":
                continue
            keep = writing.nonzero().squeeze(1)
            live, words, bar, q = live[keep], words[keep], bar[keep], q[keep]
            head = head[keep] if head is not None else None
            state = tuple(s[keep] for s in state) if self.cell == "lstm" else state[keep]
            if shared:
                values, keys = (t[:1].expand(len(keep), -1, -1) for t in (values, keys))
            else:
                values, keys = values[keep], keys[keep]
            work = work[:len(keep)]
        probs = {f: lp.exp() for f, lp in field_logp.items()}
        if not steps:
            return [[] for _ in range(n)], [alpha_f[i:i + 1, :0] for i in range(n)], alpha_f, probs
        written = words_at[:, :steps]
        # an item's words are those before its first <end>
        kept = torch.cumprod((written != END).long(), 1).bool()
        seqs = [[w for w, k in zip(ws, ks) if k] for ws, ks in zip(written.tolist(), kept.tolist())]
        maps_out = [maps_at[i, :steps][kept[i]] for i in range(n)]
        return seqs, maps_out, alpha_f, probs


def after_word(writing, ended, drop_ended: bool) -> str:
    """What greedy decoding does once every item still writing has its next word (the PyTorch
    loop of `GroundedAnnotator.generate` and the NumPy one of its ONNX Runtime graphs; `writing`:
    which of those items did not write <end>): "stop" (every item has ended), "next" (the same
    items write on) or "drop" (only those still writing go on). Without `drop_ended` every item
    is decoded to the last step, and `ended` (every item's) is updated in place."""
    if not drop_ended:
        ended |= ~writing
        return "stop" if ended.all() else "next"
    if writing.all():
        return "next"
    return "drop" if writing.any() else "stop"


ZONE_WEIGHT = 4.0
# zone indices (see zone_masks): 0 image-left half, 1 image-right half, 2-4 upper/middle/lower thirds
_ZONE_OF_WORD = {
    "left": {1: 1.0, 0: -1.0}, "right": {0: 1.0, 1: -1.0}, "bilateral": {0: 0.5, 1: 0.5},
    "upper lobe": {2: 1.0}, "apex": {2: 1.0}, "base": {4: 1.0}, "lower lobe": {4: 1.0},
    "middle lobe": {3: 1.0}, "lingula": {3: 1.0}, "hilum": {3: 1.0},
}


def zone_prior(words: list[str]) -> torch.Tensor:
    """(len(words), ZONES) starting weights of the zone read-out: the patient's left is the
    image's right on a PA/AP film; lobes and zones by height. Words without a place start at 0."""
    w = torch.zeros(len(words), ZONES)
    for i, word in enumerate(words):
        for z, v in _ZONE_OF_WORD.get(word, {}).items():
            w[i, z] = ZONE_WEIGHT * v
    return w


def field_word_ids(words: list[str]) -> dict[str, list[int]]:
    """Vocabulary ids of each context field's words (side: left/right/bilateral, ...)."""
    from ..reports.mesh import word_class

    out: dict[str, list[int]] = {f: [] for f in FIELDS}
    for i, w in enumerate(words):
        c = word_class(w)
        if c in out:
            out[c].append(i)
    return out
