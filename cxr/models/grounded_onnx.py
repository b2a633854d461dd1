"""The grounded annotator's decoding as two ONNX Runtime graphs, on a CPU.

Greedy decoding repeats a handful of small products for every word of every finding: the
attention over the map's regions, the GRU's input and hidden products, the output layer. In eager
PyTorch each is its own dispatch, and on the AMD CPU measured here MKL took 2.29x ONNX Runtime's
MLAS for the GRU's hidden product of seven findings (512 wide, one thread: 478.5 against 208.5
microseconds, `benchmarks/decoding.py --compare onnx_decoding`). So on a CPU, where ONNX Runtime
is installed (`cxr[fast]`), the Reader exports two graphs from the annotator's own methods and
weights when it first decodes (about half a second) and runs them: `first` (the regions of each
image's map, and per finding its map, field heads, first state and query) and `step` (one word:
attention, GRU cell, the word's grounded log-probabilities). Which word each finding writes, what
it may no longer write and which findings have ended are decided between the graphs' calls in
NumPy (`OnnxDecoding.generate`), by the rules of `GroundedAnnotator.generate`'s PyTorch loop
(whose small eager operations, one dispatch each, took about a quarter of the decoding's time at
batch 1), so both paths write the same words (`tests/test_grounded.py`; on the demo's 450
validation and test films: the same words and boxes for all 415 findings, their confidences
within 1e-4).

Only the GRU cell is exported (`cxr train`'s default); an LSTM annotator decodes in PyTorch.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from .annotator import END, PAD, START, weights_version
from .grounded import after_word, zone_masks


class _First(nn.Module):
    """What `GroundedAnnotator.generate` does before the first word, for maps of one (h, w), in
    its own methods: each image's regions (values, keys), and per item (the image `rows[i]`, the
    finding `labels[i]`) its finding map, its field heads' log-probabilities in `_field_names`'
    order (weighed by where the map lies when `where`), its first state and its query."""

    def __init__(self, ground, h: int, w: int, where: bool):
        super().__init__()
        self.ground, self.where, self.grid = ground, where, (h, w)
        self.register_buffer("masks", zone_masks(h, w))

    def forward(self, maps, labels, rows):
        g = self.ground
        values, keys = g.regions(maps)
        alpha, pooled, presence = g.finding(values[rows], keys[rows], labels, self.masks, grid=self.grid)
        logp = g.field_log_probs(pooled, presence, self.where)
        head = torch.cat([logp[f] for f in g._field_names], -1)
        return values, keys, alpha, head, g._init_state(pooled), g.label(labels)


class _Step(nn.Module):
    """One word of a GRU annotator in eval mode, in its own methods (`GroundedAnnotator._step`,
    then the log-softmax and `_ground`): the grounded log-probabilities of the next word, the new
    state and the word's map. `keys`/`values` hold one row per item, or one row every item shares."""

    def __init__(self, ground):
        super().__init__()
        self.ground = ground

    def forward(self, words, h, keys, values, q, head):
        logits, h, alpha = self.ground._step(words, h, values, keys, q)
        return self.ground._ground(torch.log_softmax(logits, -1), head), h, alpha


def export_session(module: nn.Module, example: tuple, inputs: list[str], outputs: list[str], dynamic: dict):
    """An ONNX Runtime session of `module` exported from its own weights, on one thread."""
    from ..engines import OPSET, ort_session

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, buf, input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return ort_session(buf.getvalue(), 1)  # one thread: the words' core (the Reader's design)


class ExportedFrom:
    """Graphs exported from one module's weights: `current(module)` says whether they still match
    them (an optimiser step or `load_state_dict` changes a parameter in place, which the key sees)."""

    def __init__(self, module):
        self.module, self.params = module, list(module.parameters())
        self.key = weights_version(*self.params)

    def current(self, module) -> bool:
        return module is self.module and weights_version(*self.params) == self.key


class OnnxDecoding(ExportedFrom):
    """The graphs of one GroundedAnnotator's weights: `step` exported at once, `first` when first
    needed for a map size."""

    def __init__(self, ground):
        super().__init__(ground)
        self.ground = ground
        n, r, k = 2, 4, sum(len(ground.field_words[f]) for f in ground._field_names)
        self.step_session = export_session(
            _Step(ground), (torch.full((n,), 1, dtype=torch.long), torch.zeros(n, ground.hidden),
                            torch.zeros(1, r, ground.keys.out_features),
                            torch.zeros(1, r, ground.keys.in_features),
                            torch.zeros(n, ground.label.embedding_dim), torch.zeros(n, k)),
            ["words", "h", "keys", "values", "q", "head"], ["logp", "state", "alpha"],
            {"words": {0: "n"}, "h": {0: "n"}, "keys": {0: "k", 1: "r"}, "values": {0: "k", 1: "r"},
             "q": {0: "n"}, "head": {0: "n"}, "logp": {0: "n"}, "state": {0: "n"}, "alpha": {0: "n", 1: "r"}})
        self._first: dict[tuple, object] = {}
        self.barred_after = ground.barred_after.numpy()

    def first(self, maps: torch.Tensor, labels: np.ndarray, rows: np.ndarray, where: bool) -> list[np.ndarray]:
        """(values, keys) of each image, and per item its finding map, field heads' log-probabilities
        (in `_field_names`' order), first state and query (`_First`), as arrays."""
        b, c, h, w = maps.shape
        session = self._first.get((h, w, where))
        if session is None:
            session = self._first[h, w, where] = export_session(
                _First(self.ground, h, w, where),
                (torch.zeros(1, c, h, w), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
                ["maps", "labels", "rows"], ["values", "keys", "alpha", "head", "state", "q"],
                {"maps": {0: "b"}, "labels": {0: "n"}, "rows": {0: "n"}, "values": {0: "b"}, "keys": {0: "b"},
                 "alpha": {0: "n"}, "head": {0: "n"}, "state": {0: "n"}, "q": {0: "n"}})
        return session.run(None, {"maps": maps.float().contiguous().numpy(), "labels": labels, "rows": rows})

    def step(self, words, h, keys, values, q, head) -> list[np.ndarray]:
        """One word of every item still writing (`_Step`): grounded log-probabilities, state, map."""
        return self.step_session.run(None, {"words": words, "h": h, "keys": keys, "values": values,
                                            "q": q, "head": head})

    def generate(self, maps: torch.Tensor, labels: torch.Tensor, max_len: int, where: bool, rows,
                 drop_ended: bool = True):
        """`GroundedAnnotator.generate` with the graphs: the same greedy choice, bars and dropping
        of ended items, in NumPy between the graphs' calls (see the module docstring)."""
        g = self.ground
        n = len(labels)
        shared = rows is not None and len(maps) == 1  # one image: its regions shared, not copied
        item_rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        values, keys, alpha_f, head, state, q = self.first(maps, labels.numpy(), item_rows, where)
        field_logp = dict(zip(g._field_names, torch.from_numpy(head).split(
            [len(g.field_words[f]) for f in g._field_names], -1)))
        if rows is not None and not shared:
            values, keys = values[item_rows], keys[item_rows]
        vocab = g.out.out_features
        bar = np.zeros((n, vocab), dtype=np.float32)  # what each item may not write next (`generate`)
        bar[:, [PAD, START, END]] = -np.inf
        barred = self.barred_after
        words = np.full(n, START, dtype=np.int64)
        live = np.arange(n)
        words_at = np.full((n, max_len), END, dtype=np.int64)
        maps_at = np.zeros((n, max_len, keys.shape[1]), dtype=np.float32)
        ended = np.zeros(n, dtype=bool)
        steps = 0
        for step in range(max_len):
            logp, state, alpha = self.step(words, state, keys, values, q, head)
            words = (logp + bar).argmax(-1)
            bar[barred[words]] = -np.inf
            if step == 0:
                bar[:, END] = 0.0
            words_at[live, step], maps_at[live, step] = words, alpha
            steps = step + 1
            writing = words != END
            then = after_word(writing, ended, drop_ended)
            if then == "stop":
                break
            if then == "next":
                continue
            live, words, bar, q, head, state = (a[writing] for a in (live, words, bar, q, head, state))
            if not shared:
                values, keys = values[writing], keys[writing]
        probs = {f: lp.exp() for f, lp in field_logp.items()}
        alpha_f = torch.from_numpy(alpha_f)
        if not steps:
            return [[] for _ in range(n)], [alpha_f[i:i + 1, :0] for i in range(n)], alpha_f, probs
        written = words_at[:, :steps]
        kept = np.cumprod(written != END, 1).astype(bool)  # an item's words: those before its first <end>
        seqs = [w[k].tolist() for w, k in zip(written, kept)]
        maps_out = [torch.from_numpy(maps_at[i, :steps][kept[i]]) for i in range(n)]
        return seqs, maps_out, alpha_f, probs


def onnx_decoding(ground) -> OnnxDecoding | None:
    """The ONNX Runtime graphs of a GRU grounded annotator on the CPU; None where ONNX Runtime or
    the exporter is missing, or for an LSTM (the caller then decodes in PyTorch)."""
    return graphs_or_none(OnnxDecoding, ground, bool(ground._field_names))


def graphs_or_none(make, annotator, exportable: bool = True):
    """`make(annotator)`: its decoding graphs, where the annotator is a GRU on the CPU (and
    `exportable`) and ONNX Runtime is installed; else, or where the export fails, None."""
    import importlib.util

    if annotator.cell != "gru" or not exportable or next(annotator.parameters()).device.type != "cpu" \
            or importlib.util.find_spec("onnxruntime") is None:  # not installed: no export tried
        return None
    try:
        return make(annotator)
    except Exception:  # onnxruntime or onnx missing, or an exporter that cannot: eager torch
        return None
