"""The grounded annotator's decoding as two ONNX Runtime graphs, on a CPU.

Greedy decoding repeats a handful of small products for every word of every finding: the
attention over the map's regions, the GRU's input and hidden products, the output layer. In eager
PyTorch each is its own dispatch, and on the AMD CPU measured here MKL took 2.5x ONNX Runtime's
MLAS for the GRU's hidden product of seven findings (7 x 512 by 512 x 1536: 881 against 343
microseconds, one thread). So on a CPU, where ONNX Runtime is installed (`cxr[fast]`), the Reader
exports two graphs from the annotator's weights when it first decodes (about half a second) and
runs them: `first` (the regions of each image's map, and per finding its map, field heads, first
state and query) and `step` (one word: attention, GRU cell, the word's grounded log-probabilities).
Which word each finding writes, what it may no longer write and which findings have ended stay
the PyTorch code of `GroundedAnnotator.generate`, so both paths write the same words
(`tests/test_grounded.py`; on the demo's 450 validation and test films: the same words and boxes
for all 415 findings, their confidences within 1e-4).

Only the GRU cell is exported (`cxr train`'s default); an LSTM annotator decodes in PyTorch.
"""
from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .annotator import gru_update, weights_version
from .grounded import COORDS, coordinates, zone_evidence, zone_masks, zone_presence


class _First(nn.Module):
    """What `GroundedAnnotator.generate` does before the first word, for maps of one (h, w):
    each image's regions (values, keys), and per item (the image `rows[i]`, the finding
    `labels[i]`) its finding map, its field heads' log-probabilities in `_field_names`' order
    (weighed by where the map lies when `where`), its first state and its query. The zones are
    summed from the map's blocks, as `generate` sums them in PyTorch."""

    def __init__(self, ground, h: int, w: int, where: bool):
        super().__init__()
        self.ground, self.where, self.grid = ground, where, (h, w)
        self.register_buffer("coords", coordinates(h, w).reshape(1, COORDS, h * w).transpose(1, 2).contiguous())
        self.register_buffer("masks", zone_masks(h, w))

    def forward(self, maps, labels, rows):
        g = self.ground
        feats = torch.relu(g.region(maps)).flatten(2).transpose(1, 2)
        values = torch.cat([feats, self.coords.expand(feats.shape[0], -1, -1)], -1)
        keys = g.keys(values)
        q = g.label(labels)
        scores = g.find_attn.score(torch.tanh(keys[rows] + g.find_attn.query(q)[:, None]))[..., 0]
        presence = zone_presence(scores, self.masks, grid=self.grid) + g.presence_bias
        alpha = torch.softmax(scores, -1)
        pooled = torch.cat([torch.matmul(alpha[:, None], values[rows])[:, 0], q,
                            zone_evidence(scores, self.masks, grid=self.grid)], -1)
        logp = g.field_log_probs(pooled, presence, self.where)
        head = torch.cat([logp[f] for f in g._field_names], -1)
        return values, keys, alpha, head, torch.tanh(g.init_h(pooled)), q


class _Step(nn.Module):
    """One word of a GRU annotator in eval mode (`GroundedAnnotator._step`, then its
    log-softmax and `_ground`): the grounded log-probabilities of the next word, the new state
    and the word's map. `keys`/`values` hold one row per item, or one row every item shares."""

    def __init__(self, ground):
        super().__init__()
        cell, dim = ground.rnn_cell, ground.word.embedding_dim
        self.attn, self.out, self.cell = ground.step_attn, ground.out, cell
        with torch.no_grad():  # the word's share of the input gates, one row per vocabulary word
            self.register_buffer("gates", F.linear(ground.word.weight, cell.weight_ih[:, :dim], cell.bias_ih))
            self.register_buffer("ctx_weight", cell.weight_ih[:, dim:].contiguous())
        self.register_buffer("slots", ground.field_slots.clone())
        self.register_buffer("owner", ground.field_owner.clone())
        # per vocabulary word: its column among the field words (their count: not a field word)
        ids, vocab = ground.field_ids.tolist(), ground.out.out_features
        self.register_buffer("column", torch.tensor([ids.index(v) if v in ids else len(ids) for v in range(vocab)]))
        self.register_buffer("is_field", self.column < len(ids))

    def forward(self, words, h, keys, values, q, head):
        y = torch.tanh(keys + self.attn.query(torch.cat([q, h], -1))[:, None])
        alpha = torch.softmax(self.attn.score(y)[..., 0], -1)
        ctx = torch.matmul(alpha[:, None], values)[:, 0]
        gi = self.gates[words] + F.linear(ctx, self.ctx_weight)
        h = gru_update(gi, F.linear(h, self.cell.weight_hh, self.cell.bias_hh), h)
        logp = torch.log_softmax(self.out(torch.cat([h, ctx], -1)), -1)
        # within each context class the field head chooses the word (`GroundedAnnotator._ground`)
        mass = torch.logsumexp(torch.cat([logp, torch.full_like(logp[:, :1], -float("inf"))], 1)[:, self.slots], -1)
        field = torch.cat([mass[:, self.owner] + head, torch.zeros_like(head[:, :1])], 1)
        return torch.where(self.is_field, field[:, self.column], logp), h, alpha


def _export(module: nn.Module, example: tuple, inputs: list[str], outputs: list[str], dynamic: dict):
    from ..engines import OPSET, ort_session

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, buf, input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return ort_session(buf.getvalue(), 1)  # one thread: the words' core (the Reader's design)


class OnnxDecoding:
    """The graphs of one GroundedAnnotator's weights: `step` exported at once, `first` when first
    needed for a map size. `current(ground)` says whether they still match its weights."""

    def __init__(self, ground):
        self.ground, self.params = ground, list(ground.parameters())
        self.key = self._key()
        n, r, k = 2, 4, sum(len(ground.field_words[f]) for f in ground._field_names)
        self.step_session = _export(
            _Step(ground), (torch.full((n,), 1, dtype=torch.long), torch.zeros(n, ground.hidden),
                            torch.zeros(1, r, ground.keys.out_features),
                            torch.zeros(1, r, ground.keys.in_features),
                            torch.zeros(n, ground.label.embedding_dim), torch.zeros(n, k)),
            ["words", "h", "keys", "values", "q", "head"], ["logp", "state", "alpha"],
            {"words": {0: "n"}, "h": {0: "n"}, "keys": {0: "k", 1: "r"}, "values": {0: "k", 1: "r"},
             "q": {0: "n"}, "head": {0: "n"}, "logp": {0: "n"}, "state": {0: "n"}, "alpha": {0: "n", 1: "r"}})
        self._first: dict[tuple, object] = {}

    def _key(self) -> tuple:
        return weights_version(*self.params)

    def current(self, ground) -> bool:
        """Whether the graphs were exported from `ground`'s weights as they are now (an optimiser
        step or `load_state_dict` changes a parameter in place, which the key sees)."""
        return ground is self.ground and self._key() == self.key

    def first(self, maps: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, where: bool) -> tuple:
        """(values, keys) of each image, and per item its finding map, field heads' log-probabilities
        (in `_field_names`' order), first state and query (`_First`)."""
        b, c, h, w = maps.shape
        session = self._first.get((h, w, where))
        if session is None:
            session = self._first[h, w, where] = _export(
                _First(self.ground, h, w, where),
                (torch.zeros(1, c, h, w), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
                ["maps", "labels", "rows"], ["values", "keys", "alpha", "head", "state", "q"],
                {"maps": {0: "b"}, "labels": {0: "n"}, "rows": {0: "n"}, "values": {0: "b"}, "keys": {0: "b"},
                 "alpha": {0: "n"}, "head": {0: "n"}, "state": {0: "n"}, "q": {0: "n"}})
        out = session.run(None, {"maps": maps.float().contiguous().numpy(), "labels": labels.numpy(),
                                 "rows": rows.numpy()})
        return tuple(torch.from_numpy(a) for a in out)

    def step(self, words, h, keys, values, q, head):
        logp, state, alpha = self.step_session.run(None, {
            "words": words.numpy(), "h": h.numpy(), "keys": keys.numpy(), "values": values.numpy(),
            "q": q.numpy(), "head": head.numpy()})
        return torch.from_numpy(logp), torch.from_numpy(state), torch.from_numpy(alpha)


def onnx_decoding(ground) -> OnnxDecoding | None:
    """The ONNX Runtime graphs of a GRU grounded annotator on the CPU; None where ONNX Runtime or
    the exporter is missing, or for an LSTM (the caller then decodes in PyTorch)."""
    import importlib.util

    if ground.cell != "gru" or not ground._field_names or next(ground.parameters()).device.type != "cpu" \
            or importlib.util.find_spec("onnxruntime") is None:  # not installed: no export tried
        return None
    try:
        return OnnxDecoding(ground)
    except Exception:  # onnxruntime or onnx missing, or an exporter that cannot: eager torch
        return None
